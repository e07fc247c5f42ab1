"""What a user's own test looks like: only the ``imsrelay_lab`` fixture and its client."""


def test_mail_from_the_internet_reaches_user2(imsrelay_lab):
    msgid = imsrelay_lab.send("User2@microsoft.com", subject="Hello from outside", via="Internet",
                              html="<p>Hi <b>User2</b></p>")
    msg = imsrelay_lab.wait_for(f"message-id:{msgid}", timeout=30)
    assert (msg["site"], msg["mailbox"]) == ("SiteB", "User2")
    assert "<b>User2</b>" in imsrelay_lab.message(msg["id"])["html"]
    chain = imsrelay_lab.track(msgid)["messages"][0]["chain"]
    assert chain == ["Internet", "SiteA", "SiteB"]


def test_user2_reads_it_over_imap(imsrelay_lab):
    msgid = imsrelay_lab.send("User2@microsoft.com", subject="Read me over IMAP", via="Internet")
    msg = imsrelay_lab.wait_for(f"message-id:{msgid}", timeout=30)
    with imsrelay_lab.imap("User2") as imap:  # STARTTLS with the lab's CA verified, logged in as User2
        imap.select("INBOX")
        _, found = imap.search(None, "HEADER", "Message-ID", msgid)
        number = found[0].split()[-1]
        _, data = imap.fetch(number, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b"Read me over IMAP" in data[0][1]
        imap.store(number, "+FLAGS", "\\Seen")
    assert imsrelay_lab.message(msg["id"])["read"] is True  # IMAP's \Seen is the message API's read flag
