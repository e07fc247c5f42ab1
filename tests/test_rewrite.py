"""Address rewriting by Site Addressing (pure, bytes kept)."""

from imsrelay.policy.rewrite import RewriteRules, header_addresses, rewrite_address, rewrite_message

ON = RewriteRules("SiteA.microsoft.com", "microsoft.com")
OFF = RewriteRules("SiteA.microsoft.com", "SiteA.microsoft.com")
PRIMARIES = {"user1@sitea.microsoft.com": "User1@microsoft.com", "u1@alias.example": "User1@microsoft.com"}


def test_rules_active_only_after_site_addressing_change():
    assert ON.active and not OFF.active


def test_envelope_sender():
    assert rewrite_address("user1@SiteA.microsoft.com", ON, PRIMARIES) == "User1@microsoft.com"
    assert rewrite_address("u1@alias.example", ON, PRIMARIES) == "User1@microsoft.com"
    assert rewrite_address("postmaster@SiteA.microsoft.com", ON, PRIMARIES) == "postmaster@microsoft.com"
    assert rewrite_address("bob@example.org", ON, PRIMARIES) == "bob@example.org"
    assert rewrite_address("", ON, PRIMARIES) == ""
    assert rewrite_address("user1@SiteA.microsoft.com", OFF, PRIMARIES) == "user1@SiteA.microsoft.com"


MSG = (b"Received: from x\r\n"
       b"From: \"User One\" <user1@SiteA.microsoft.com>\r\n"
       b"Sender: user1@SiteA.microsoft.com\r\n"
       b"Reply-To: Someone <bob@example.org>,\r\n Post <postmaster@SiteA.microsoft.com>\r\n"
       b"To: user1@SiteA.microsoft.com\r\n"
       b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
       b"\r\n"
       b"Body with user1@SiteA.microsoft.com and 8-bit \xe9\xff bytes\r\n")


def test_headers_rewritten_body_untouched():
    out = rewrite_message(MSG, ON, PRIMARIES)
    assert b'From: "User One" <User1@microsoft.com>\r\n' in out
    assert b"Sender: User1@microsoft.com\r\n" in out
    assert b"Reply-To: Someone <bob@example.org>,\r\n Post <postmaster@microsoft.com>\r\n" in out
    assert b"To: user1@SiteA.microsoft.com\r\n" in out  # recipients are not rewritten
    assert out.endswith(b"\r\n\r\nBody with user1@SiteA.microsoft.com and 8-bit \xe9\xff bytes\r\n")
    assert out.startswith(b"Received: from x\r\n")


def test_off_returns_identical_bytes():
    assert rewrite_message(MSG, OFF, PRIMARIES) is MSG


def test_header_addresses():
    assert set(header_addresses(MSG)) == {"user1@SiteA.microsoft.com", "bob@example.org",
                                          "postmaster@SiteA.microsoft.com"}


def test_bare_lf_message_and_no_body():
    msg = b"From: user1@SiteA.microsoft.com\nSubject: x\n\nbody\n"
    assert rewrite_message(msg, ON, PRIMARIES) == b"From: User1@microsoft.com\nSubject: x\n\nbody\n"
    assert rewrite_message(b"From: user1@SiteA.microsoft.com\r\n", ON, PRIMARIES) == b"From: User1@microsoft.com\r\n"
