"""What a user's own test looks like: only the ``imsrelay_lab`` fixture and its client."""


def test_mail_from_the_internet_reaches_user2(imsrelay_lab):
    msgid = imsrelay_lab.send("User2@microsoft.com", subject="Hello from outside", via="Internet",
                              html="<p>Hi <b>User2</b></p>")
    msg = imsrelay_lab.wait_for(f"message-id:{msgid}", timeout=30)
    assert (msg["site"], msg["mailbox"]) == ("SiteB", "User2")
    assert "<b>User2</b>" in imsrelay_lab.message(msg["id"])["html"]
    chain = imsrelay_lab.track(msgid)["messages"][0]["chain"]
    assert chain == ["Internet", "SiteA", "SiteB"]
