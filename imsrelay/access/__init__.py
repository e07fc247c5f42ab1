"""Mailbox access: IMAP4rev1 and POP3 for the mailboxes homed on this server.

Exchange 5.5 served its mailboxes over POP3 and IMAP4 (Q233081, Q171032).  imsrelay
does not speak those protocols itself: a Dovecot per server reads the site's
Maildirs (``<data>/mailboxes/<alias>``), and asks imsrelay about every login.

- ``dovecot_config``: the Dovecot configuration of one server (pure: settings in,
  text out);
- ``dovecot``: finds the Dovecot binary, writes its files under ``<data>/dovecot``,
  starts, watches and stops the process;
- ``bridge``: the auth bridge, a UNIX socket in ``<data>/dovecot`` that answers
  Dovecot's checkpassword helper from the directory (passwords, lock-out, protocol
  settings): Dovecot never holds a copy of the password hashes;
- ``checkpassword``: that helper (standard library only; Dovecot runs it per login);
- ``ports``: what the access service asks of its site (``AccessSite``);
- ``service``: ``MailboxAccess``, the part ``imsrelay.site`` composes.
"""
