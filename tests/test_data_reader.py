"""imsrelay.ingress.data_reader: the DATA stream taken in chunks gives what aiosmtpd's
line-at-a-time loop gives — end, content, refusal, and the bytes left for the next
command — however the stream is cut (byte by byte, random chunks, all at once)."""

from __future__ import annotations

import random

import pytest

from imsrelay.ingress.data_reader import (
    SCAN_EVERY,
    DataResult,
    DataScanner,
    line_ends_clean,
    unstuff,
)
from imsrelay.transport.smtp_body import crlf_clean, dot_stuffed


def reference(stream: bytes, *, size_limit: int | None, line_limit: int,
              forbid_bare_lf: bool) -> tuple[DataResult, bytes | None, int | None] | None:
    """aiosmtpd 1.4.6's smtp_DATA loop written out line by line (plus LineReader's
    bare-LF check): (outcome, content, bytes of DATA), or None when the stream never
    ends the message."""
    pos = counted = 0
    state = DataResult.OK
    lines: list[bytes] = []
    while True:
        nxt = stream.find(b"\r\n", pos)
        if nxt < 0:
            if forbid_bare_lf and b"\n" in stream[pos:]:
                return DataResult.BARE_LF, None, None
            return None
        line = stream[pos:nxt + 2]
        if forbid_bare_lf and b"\n" in line[:-2]:
            return DataResult.BARE_LF, None, None  # 521 and the connection closes: nothing is left to read
        pos = nxt + 2
        if line == b".\r\n":
            break
        if state is DataResult.OK and len(line) - 2 > line_limit:  # StreamReader's LimitOverrunError
            state = DataResult.TOO_LONG
        counted += len(line)
        if state is DataResult.OK and size_limit and counted > size_limit:
            state = DataResult.TOO_MUCH
        if state is DataResult.OK and len(line) > line_limit:
            state = DataResult.TOO_LONG
        if state is DataResult.OK:
            lines.append(line[1:] if line.startswith(b".") else line)
    return state, (b"".join(lines) if state is DataResult.OK else None), pos


def scan(stream: bytes, cuts: list[int] | None = None, *, size_limit: int | None = 10_000,
         line_limit: int = 1001, forbid_bare_lf: bool = False) -> tuple[DataResult, bytes | None, int | None] | None:
    """Feed ``stream`` cut at ``cuts`` (offsets); the same shape as ``reference``."""
    s = DataScanner(size_limit=size_limit, line_limit=line_limit, forbid_bare_lf=forbid_bare_lf)
    bounds = [0, *(cuts or []), len(stream)]
    used = 0
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b <= a:
            continue
        chunk = stream[a:b]
        took = s.feed(chunk)
        assert 0 <= took <= len(chunk)
        used += took
        if s.done:
            break
        assert took == len(chunk), "bytes left over before the end"
    if not s.done:
        return None
    if s.outcome is DataResult.BARE_LF:
        return s.outcome, None, None
    content = s.content() if s.outcome is DataResult.OK else None
    if content is not None:  # dot_lines is exact, however the chunks cut the stream
        stuffed = stream[:used - 3]
        assert s.dot_lines == (stuffed[:1] == b"." or b"\r\n." in stuffed), (stream, cuts)
    if content is not None and not s.dot_lines:  # "no line starts with a dot" is never wrong
        assert not content.startswith(b".") and b"\r\n." not in content, content
        assert dot_stuffed(content, known_dotless=True) == dot_stuffed(content)  # the plain path
    if s.outcome is not DataResult.OK:
        with pytest.raises(ValueError):
            s.content()
    return s.outcome, content, used


def all_cuts(stream: bytes) -> list[int]:
    return list(range(1, len(stream)))


def random_cuts(rng: random.Random, n: int) -> list[int]:
    cuts, pos = [], 0
    while pos < n:
        pos += rng.choice((1, 1, 2, 3, 4, 5, 7, 64, rng.randint(1, 3000)))
        cuts.append(pos)
    return cuts


CASES = [
    b".\r\n",  # the message is just the terminator
    b"\r\n.\r\n",  # one empty line
    b"Subject: x\r\n\r\nhello\r\n.\r\n",
    b"..\r\n.\r\n",  # a stuffed dot at the very start
    b"..leading\r\n...two\r\n.x\r\n.\r\n",  # aiosmtpd takes any leading dot away
    b"a\r\n..\r\n.\r\n",  # a line that was "." on its own, stuffed
    b"mid . dot\r\n a.\r\nend.\r\n.\r\n",  # a dot inside or at the end of a line stays
    b"x\r\n. \r\n.\r\r\n.\n\r\n.\r\n",  # ". " / ".\r" / ".\n" are lines, not the end
    b"bare\nlf\r\n.\r\n",
    b"bare\rcr\r\n.\r\n",
    b"\n.\r\n.\r\n",  # a bare LF first, then a dot that does not start a line
    b"a\r\n.\n.\r\n.\r\n",
    b"a\r\r\n.\r\n",
    b"\r\r\n\n\r\n.\r\n",
    b"x\r\n.\r\nQUIT\r\n",  # pipelined: QUIT is left for the command loop
    b"x\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n",
    b".\r\nNOOP\r\n",
    b"x\r\n.\r\n.\r\n",  # the second "." line is the next command's
]


@pytest.mark.parametrize("stream", CASES)
@pytest.mark.parametrize("forbid", [False, True])
def test_every_cut_of_the_curated_streams_matches_the_line_reader(stream, forbid):
    want = reference(stream, size_limit=10_000, line_limit=1001, forbid_bare_lf=forbid)
    assert want is not None
    assert scan(stream, forbid_bare_lf=forbid) == want
    assert scan(stream, all_cuts(stream), forbid_bare_lf=forbid) == want
    for cut in range(1, len(stream)):  # the terminator or a CRLF split at every place
        assert scan(stream, [cut], forbid_bare_lf=forbid) == want, cut
        for second in range(cut + 1, min(len(stream), cut + 6)):
            assert scan(stream, [cut, second], forbid_bare_lf=forbid) == want, (cut, second)


def test_the_named_cases():
    assert scan(b".\r\n") == (DataResult.OK, b"", 3)
    assert scan(b"..\r\n.\r\n") == (DataResult.OK, b".\r\n", 7)
    assert scan(b"..a\r\n.b\r\nc.\r\n.\r\n") == (DataResult.OK, b".a\r\nb\r\nc.\r\n", 16)
    assert scan(b"a\r\n.\r\nQUIT\r\n") == (DataResult.OK, b"a\r\n", 6)  # QUIT stays for the next command
    assert scan(b"a\nb\r\n.\r\n") == (DataResult.OK, b"a\nb\r\n", 8)  # normalised later (smtp.bare_newline)
    assert scan(b"a\nb\r\n.\r\n", forbid_bare_lf=True)[0] is DataResult.BARE_LF
    assert scan(b"a\rb\r\n.\r\n", forbid_bare_lf=True) == (DataResult.OK, b"a\rb\r\n", 8)  # a bare CR is data
    assert scan(b"a\r\n.\r\n\n", forbid_bare_lf=True) == (DataResult.OK, b"a\r\n", 6)  # after the end: a command's
    assert scan(b"a\r\n.\r") is None and scan(b"a\r\n") is None and scan(b"") is None


def test_unstuff():
    assert unstuff(b"") == b""
    assert unstuff(b"..\r\n") == b".\r\n"
    assert unstuff(b"a\r\n..b\r\n.c\r\n") == b"a\r\n.b\r\nc\r\n"
    assert unstuff(b"a\n.b\r.c\r\n") == b"a\n.b\r.c\r\n"  # only CRLF starts a line


TOKENS = [b"x", b"hello ", b".", b"..", b"\r\n", b"\r\n", b"\r\n", b"\r", b"\n", b"\r\n.", b"\r\n..",
          b"\r\n.x", b" . ", b"\r\r\n", b"\n\r"]


def random_stream(rng: random.Random, line_limit: int) -> bytes:
    parts = []
    for _ in range(rng.randint(0, 60)):
        if rng.random() < 0.08:
            parts.append(b"y" * rng.randint(line_limit - 4, line_limit + 4))  # around the line limit
        else:
            parts.append(rng.choice(TOKENS))
    body = b"".join(parts)
    tail = rng.choice([b"\r\n.\r\n", b"\r\n.\r\nQUIT\r\n", b"\r\n.\r\nMAIL FROM:<a@b>\r\n", b"\r\n.\r", b""])
    return body + tail


@pytest.mark.parametrize("seed", range(6))
def test_random_streams_random_cuts_match_the_line_reader(seed):
    rng = random.Random(seed)
    for _ in range(400):
        line_limit = rng.choice([8, 20, 1001])
        size_limit = rng.choice([None, 30, 100, 400, 100_000])
        forbid = rng.random() < 0.5
        stream = random_stream(rng, line_limit)
        want = reference(stream, size_limit=size_limit, line_limit=line_limit, forbid_bare_lf=forbid)
        opts = {"size_limit": size_limit, "line_limit": line_limit, "forbid_bare_lf": forbid}
        assert scan(stream, **opts) == want, stream
        assert scan(stream, random_cuts(rng, len(stream)), **opts) == want, stream
        if len(stream) < 400:
            assert scan(stream, all_cuts(stream), **opts) == want, stream


@pytest.mark.parametrize("length", [998, 999, 1000, 1001, 1002, 1003])
@pytest.mark.parametrize("size_limit", [None, 500, 1000, 1001, 1002, 1003, 1004, 1005, 1006])
def test_a_long_line_against_the_size_limit_settles_as_aiosmtpd_does(length, size_limit):
    """Which of 500 and 552 wins when one line crosses both limits (aiosmtpd: a line
    whose text passes 1001 is too long before it is counted; one of 1000-1001 is
    counted first)."""
    stream = b"a\r\n" + b"z" * length + b"\r\n.\r\n"
    want = reference(stream, size_limit=size_limit, line_limit=1001, forbid_bare_lf=False)
    assert scan(stream, size_limit=size_limit) == want
    assert scan(stream, list(range(1, len(stream), 97)), size_limit=size_limit) == want


def test_an_oversized_message_is_read_to_the_end_in_bounded_memory():
    limit, chunk = 1024 * 1024, 65536
    s = DataScanner(size_limit=limit, line_limit=1001, forbid_bare_lf=False)
    line = b"0123456789" * 7 + b"\r\n"
    block = line * (chunk // len(line))
    held = []
    for _ in range(10 * limit // len(block)):
        assert s.feed(block) == len(block) and not s.done
        held.append(s.held)
    assert max(held) <= limit + 1003 + len(block)
    assert held[-1] == 0 and s.outcome is DataResult.TOO_MUCH  # past the limit nothing is kept
    assert s.feed(b".\r\nQUIT\r\n") == 3 and s.done and s.outcome is DataResult.TOO_MUCH


def test_a_message_just_under_the_limit_is_whole():
    body = (b"x" * 98 + b"\r\n") * 10  # 1000 bytes
    assert scan(body + b".\r\n", size_limit=1000) == (DataResult.OK, body, 1003)
    assert scan(body + b"y\r\n.\r\n", size_limit=1000)[0] is DataResult.TOO_MUCH
    assert scan(body + b"y\r\n.\r\n", size_limit=None) == (DataResult.OK, body + b"y\r\n", 1006)


def test_with_no_size_limit_a_long_line_drops_what_was_kept():
    s = DataScanner(size_limit=None, line_limit=1001, forbid_bare_lf=False)
    s.feed(b"ok\r\n" * 10)
    s.feed(b"z" * (SCAN_EVERY + 10))
    assert s.outcome is DataResult.TOO_LONG and s.held == 0
    s.feed(b"z" * SCAN_EVERY + b"\r\n")
    assert s.feed(b".\r\n") == 3 and s.done and s.outcome is DataResult.TOO_LONG


def test_a_big_message_in_chunks_is_byte_identical():
    rng = random.Random(16)
    lines = []
    for i in range(20000):
        text = bytes(rng.choice(b"abc .xyz") for _ in range(rng.randint(0, 120)))
        lines.append(b"." + text + b"\r\n" if i % 7 == 0 else text + b"\r\n")
    stream = b"".join(lines) + b".\r\nQUIT\r\n"
    want = reference(stream, size_limit=None, line_limit=1001, forbid_bare_lf=True)
    assert want is not None and want[0] is DataResult.OK
    assert scan(stream, random_cuts(rng, len(stream)), size_limit=None, forbid_bare_lf=True) == want
    assert scan(stream, list(range(65536, len(stream), 65536)), size_limit=None) == want


def test_nothing_is_taken_after_the_end():
    s = DataScanner(size_limit=None, line_limit=1001, forbid_bare_lf=False)
    assert s.feed(b"a\r\n.\r\n") == 6 and s.done
    assert s.feed(b"QUIT\r\n") == 0 and s.content() == b"a\r\n"


def test_line_ends_clean_is_the_regular_expression_and_the_outbound_check_it_replaces():
    import re
    bare = re.compile(rb"(?<!\r)\n")
    rng = random.Random(2)
    for _ in range(3000):
        raw = b"".join(rng.choice([b"a", b"\r", b"\n", b"\r\n", b"\r\r\n", b"\n\n", b"."])
                       for _ in range(rng.randint(0, 30)))
        normalised, clean = line_ends_clean(raw)
        assert normalised == bare.sub(b"\r\n", raw), raw
        assert clean == crlf_clean(normalised), raw  # what outbound delivery would have counted
        if not bare.search(raw):  # what the DATA reader lets through with bare_newline = "reject"
            assert line_ends_clean(raw, bare_lf_possible=False) == (raw, crlf_clean(raw)), raw
    crlf = b"a\r\nb\r\n"
    assert line_ends_clean(crlf)[0] is crlf  # nothing to change: no copy
