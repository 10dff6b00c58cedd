"""Base64 lines proven once (issue 29): the checks that skip them decide as a full search.

unproven_spans() leaves out of a big message the windows that are nothing but lines of
one width, each of the base64 alphabet and a CRLF; is_crlf(), is_transport_safe(),
has_long_line(), declares_binary() and the MIME limits then search only the rest.  Each case below puts
one line that breaks a rule somewhere in a 5 MB attachment (inside a window, on a
window's first or last line, at a halving point) and checks that every function gives
the answer it gives without spans.
"""

import base64
import hashlib
import os
import random
import re

import pytest

import sparkpostSMIME as tool

HEAD = (b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: big\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: text/plain\r\n\r\nSee the file.\r\n--b\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n")
TAIL = b"--b--\r\n"
#: Lines that break a rule, each alone in an otherwise proven run.
BAD_LINES = [
    b"QUJD \r\n",                  # white space at a line's end
    b"QUJD\t\r\n",                 # a tab at a line's end
    b"From QUJD\r\n",              # a "From " line
    b".\r\n",                      # a lone dot
    b"QUJD\nQUJD\r\n",             # a lone LF
    b"QUJD\rQUJD\r\n",             # a lone CR
    b"QU\xe9JD\r\n",               # 8-bit
    b"QU\x00JD\r\n",               # NUL
    b"Q" * 1200 + b"\r\n",         # a long line
    b"--b\r\n",                    # a delimiter
    b"Content-Transfer-Encoding: BiNaRy\r\n",  # a field (binary, in any case)
    b"Content-Type: Message/RFC822\r\n",
    b"QUJDRA==\r\n",               # a shorter line: harmless, not of the run's width
    b"Q" * 76 + b"\rA\n" + b"Q" * 75 + b"\r\n",  # a CR in place, its LF one octet on
]


def attachment(megabytes=5, seed=1):
    """Return *megabytes* of random bytes in base64 lines of 76 and CRLF."""
    rng = random.Random(seed)
    raw = rng.randbytes(int(megabytes * 3 / 4 * (1 << 20)))
    return base64.encodebytes(raw).replace(b"\n", b"\r\n")


BODY = attachment()
#: Where the bad line goes: near the start, a window's edge, a halving point, the end.
PLACES = [78 * 3, (1 << 20) - 78 * 2, 1 << 20, (1 << 19) + 78, (1 << 20) + (1 << 16),
          len(BODY) // 2, len(BODY) - 78 * 2]


def message_with(bad, at):
    """The message, *bad* put after the line that holds octet *at* of the attachment."""
    cut = BODY.index(b"\r\n", at) + 2
    return HEAD + BODY[:cut] + bad + BODY[cut:] + TAIL


def checks(data, spans):
    """Every check that takes spans, on *data* (a whole message, CRLF or not)."""
    results = {"crlf": tool.is_crlf(data, spans),
               "safe": tool.is_transport_safe(data, spans),
               "lone_dot": tool.has_lone_dot(data, spans),
               "long_line": tool.has_long_line(data, tool.MAX_LINE, spans),
               "binary": tool.declares_binary(data, spans),
               "rfc822": tool.count_any_case(data, (b"rfc822",), spans) > 0,
               "any_case": tool.count_any_case(data, (b"boundary", b"rfc822"), spans)}
    return results


@pytest.mark.parametrize("bad", BAD_LINES, ids=[repr(b[:12]) for b in BAD_LINES])
@pytest.mark.parametrize("at", PLACES)
def test_a_bad_line_anywhere_is_seen_as_without_spans(bad, at):
    data = message_with(bad, at)
    spans = tool.unproven_spans(data)
    assert spans is not None and sum(b - a for a, b in spans) < len(data) // 4, spans
    with_spans, without = checks(data, spans), checks(data, None)
    assert with_spans == without
    # The bad line is in a span, whole: the proof never covers what it cannot hold.
    start = data.index(bad, len(HEAD))
    assert any(a <= start and start + len(bad) <= b for a, b in spans), (start, spans)


def test_a_span_is_searched_from_the_proven_line_before_it():
    """A span starts after a proven line's CRLF: a "." line there, or a delimiter, is
    found (its needle starts in that CRLF)."""
    data = b"QUJD\r\n.\r\n--b\r\n"
    assert tool.holds_any(data, (b"\r\n.\r\n",), [(6, 9)])
    assert tool.has_lone_dot(data, [(6, 9)])
    assert not tool.holds_any(data, (b"\r\n.\r\n",), [(9, 14)])
    msg = tool.Message("-", [], [], data)
    msg.spans = [(9, len(data))]
    assert sum(data.count(b"\n--", max(a - 2, 0), b) for a, b in msg.spans) == 1


def longest_line(data):
    """The plain way: the longest line, its CR (before a LF or at the end) not counted."""
    return max(len(line[:-1] if line.endswith(b"\r") else line) for line in data.split(b"\n"))


@pytest.mark.parametrize("length", [997, 998, 999, 1000, 1001, 2500])
@pytest.mark.parametrize("ending", [b"", b"\r", b"\r\n"])
@pytest.mark.parametrize("before", [b"", b"a\r\n", b"b" * 997 + b"\r\n"])
def test_long_lines_as_the_plain_way(length, ending, before):
    """The window jumps agree with cutting every line: lines about the limit, last or
    not, with or without their CRLF, and in a span of a bigger text."""
    data = before + b"x" * length + ending
    assert tool.has_long_line(data) == (longest_line(data) > tool.MAX_LINE)
    proven = b"QUJD\r\n" * 10  # a span starts after a LF, stops after one or at the end
    within = proven + data + (proven if ending == b"\r\n" else b"")
    span = [(len(proven), len(proven) + len(data))]
    assert tool.has_long_line(within, tool.MAX_LINE, span) == tool.has_long_line(data)


def test_a_window_cut_inside_a_line_proves_nothing():
    """A line of 2 MB has no LF for a window to end after: the window after the cut starts
    inside it, and its rest ("rfc822", a base64 word) must not be proven (review)."""
    data = HEAD + b"x" * (2 * tool.PROVE_WINDOW - 3) + b"rfc822\r\n"
    spans = tool.unproven_spans(data)
    assert tool.count_any_case(data, (b"rfc822",), spans) == 1 == \
        tool.count_any_case(data, (b"rfc822",))
    assert all(a == 0 or data[a - 1:a] == b"\n" for a, b in spans)


def test_a_window_halved_inside_a_long_field_keeps_binary():
    """A Content-Transfer-Encoding line of 200 KB: a half window starts inside it; its
    "binary" stays seen, and the binary body's bare LFs are kept (review)."""
    rng = random.Random(5)
    noise = bytes(c for c in rng.randbytes(2_600_000) if c not in b"\r\n")
    head = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: an attachment\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n")
    line = b"Content-Transfer-Encoding:" + b" " * (200_000 - 26) + b"binary\r\n"
    data = (head + line + noise[:199_990] + b"\r\n" + noise[199_990:2_399_990]
            + b"\nbare LF\nkept\r\n")
    assert tool.declares_binary(data, tool.unproven_spans(data)) and tool.declares_binary(data)
    assert b"bare LF\nkept" in tool.parse_message(data).body


def test_a_clean_attachment_is_proven_but_its_edges():
    """Nearly all of a clean message is proven; the header and the end are not."""
    data = HEAD + BODY + TAIL
    spans = tool.unproven_spans(data)
    assert spans[0][0] == 0 and spans[0][1] >= len(HEAD) and spans[-1][1] == len(data)
    assert sum(b - a for a, b in spans) <= 4 * tool.PROVE_LEAST
    assert checks(data, spans) == checks(data, None)
    assert checks(data, spans)["safe"] and checks(data, spans)["crlf"]


def test_small_messages_are_not_looked_at():
    small = HEAD + BODY[:tool.PROVE_ABOVE - len(HEAD) - len(TAIL)] + TAIL
    assert len(small) <= tool.PROVE_ABOVE and tool.unproven_spans(small) is None
    assert tool.unproven_spans(small + BODY[:78]) is not None


@pytest.mark.parametrize("ending", [b"\n", b"\r"])
def test_lf_or_cr_only_messages_are_not_proven(ending):
    """Lines ending in a bare LF or CR prove nothing: all of the message is a span."""
    data = (HEAD + BODY + TAIL).replace(b"\r\n", ending)
    assert tool.unproven_spans(data) == [(0, len(data))]
    assert not tool.is_crlf(data, tool.unproven_spans(data))


@pytest.mark.parametrize("bad", [b"QUJD \r\n", b".\r\n", b"From QUJD\r\n"])
def test_parse_and_canonical_form_as_without_spans(bad):
    """parse_message() hands the body's spans on: the canonical form of a message with
    a bad line deep in its attachment is the one made without any proof."""
    data = message_with(bad, len(BODY) // 2)
    msg = tool.parse_message(data)
    assert msg.spans is not None
    proven = b"".join(tool.canonical_content(msg))
    msg.spans = None
    assert proven == b"".join(tool.canonical_content(msg))
    assert b"\r\n" + bad not in proven  # the part was re-encoded


@pytest.mark.parametrize("size", [150_000, 3 << 20])
def test_random_mutations_agree(size):
    """200 random one-octet changes of a 150 KB and a 3 MB message: the same answers with
    and without spans."""
    rng = random.Random(29)
    base = bytearray(HEAD + BODY[:size] + b"\r\n" + TAIL)
    specials = b" \t\r\n.-:\x00\xe9F"
    for _ in range(200):
        data = bytearray(base)
        at = rng.randrange(len(HEAD), len(data) - len(TAIL))
        data[at] = rng.choice(specials)
        data = bytes(data)
        spans = tool.unproven_spans(data)
        assert checks(data, spans) == checks(data, None), (at, data[at - 80:at + 80])


# -- Receiving: base64 decoded a block at a time, line breaks skipped by a2b_base64 ----

def spool_of(tmp_path, data):
    path = tmp_path / "spool"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    return tool.Spool(fd, 0, len(data))


@pytest.mark.parametrize("width", [76, 64, 75, 1])
@pytest.mark.parametrize("extra", [b"", b"=\r\nQUJD\r\n", b"QUJD*\r\n\t!QUJDRA\r\n", b"QQ\r\n",
                                   b"Q\r\n"])
def test_spooled_base64_decodes_as_decode_body(tmp_path, width, extra):
    """Lines of 76 and 64 decode a block at a time without translate(); lines of 75 (not
    whole groups of four), a "=" in the middle, stray octets and a dangling group take
    the lenient way: the same octets as decode_body() in every case."""
    raw = random.Random(width).randbytes(3 * tool.STREAM_BLOCK // 2)
    text = base64.b64encode(raw)
    lines = b"".join(text[at:at + width] + b"\r\n" for at in range(0, len(text), width))
    at = len(lines) // 3
    data = lines[:at] + extra + lines[at:] + extra
    assert b"".join(tool.base64_decoded(spool_of(tmp_path, data))) == \
        tool.decode_body(data, b"base64")


@pytest.mark.parametrize("at", PLACES)
def test_a_boundary_in_the_body_is_found_as_without_spans(at):
    """--sign_detached makes sure its boundary is nowhere in the content: with the body's
    spans it still finds one anywhere, on a line of its own."""
    boundary = b"----=_smime_" + b"0123456789ab" * 2
    data = message_with(b"--" + boundary + b"\r\n", at)
    msg = tool.parse_message(data)
    pieces = tool.canonical_content(msg)
    assert pieces[-1] is msg.body and msg.spans is not None
    assert tool.holds(pieces, boundary, msg.spans) and tool.holds(pieces, boundary)
    assert not tool.holds(pieces, boundary + b"x", msg.spans)


def test_a_closed_spool_is_not_read(tmp_path):
    """Spool.close() frees its descriptor at once: a view of it read after that raises
    instead of reading whatever file has the number now (review)."""
    spool = spool_of(tmp_path, b"x" * 100)
    view = spool.view(10, 20)
    assert view.pread(0, 5) == b"xxxxx"
    spool.close()
    other = os.open(tmp_path / "spool", os.O_RDONLY)  # likely the number just freed
    try:
        with pytest.raises(ValueError, match="closed"):
            view.pread(0, 5)
        with pytest.raises(ValueError, match="closed"):
            spool.pread(0, 5)
    finally:
        os.close(other)


# -- Sending: a big message read apart, header and body, its body never a copy -----------

def same_message(a, b):
    return ([f.raw for f in a.outer + a.entity_fields], a.body, a.binary, a.sender, a.to) == \
        ([f.raw for f in b.outer + b.entity_fields], b.body, b.binary, b.sender, b.to)


@pytest.mark.parametrize("name, data, taken", [
    ("crlf", HEAD + BODY + TAIL, True),
    ("lf only", (HEAD + BODY + TAIL).replace(b"\r\n", b"\n"), None),
    ("a bare LF in the body", HEAD + BODY[:4000] + b"x\ny\r\n" + BODY + TAIL, False),
    ("an mbox From line", b"From alice Mon Dec  7 10:00:00 2026\r\n" + HEAD + BODY + TAIL, False),
    ("a part declared binary", HEAD + BODY + b"--b\r\nContent-Transfer-Encoding: binary\r\n\r\n"
     b"\x00\xff\n\r\n" + TAIL, False),
    ("a body without an empty line before it", HEAD.replace(b"\r\n\r\n--b", b"\r\n--b", 1)
     .replace(b"See the file.\r\n", b"See the file.\r\n\r\n") + BODY + TAIL, False),
    ("an empty line first", b"\r\n" + HEAD + BODY + TAIL, False),
])
def test_read_apart_as_read_whole(tmp_path, name, data, taken):
    """read_message() of a big file: the same Message (and digest) as parse_message() of
    the whole; taken apart as it is only where nothing would change it, else joined."""
    path = tmp_path / "big.eml"
    path.write_bytes(data)
    parts = tool.read_apart(str(path))
    assert (parts[1] is not None) == (taken is not None)
    if taken is not None:
        assert parts[0] + parts[1] == data
        assert (tool.parse_apart(*parts) is not None) == taken
    try:
        whole = tool.parse_message(data, str(path))
    except tool.MessageError as exc:
        with pytest.raises(tool.MessageError, match=re.escape(str(exc))):
            tool.read_message(str(path))
        return
    msg, digest = tool.read_message(str(path), digest=True)
    assert same_message(msg, whole) and digest == hashlib.sha256(data).hexdigest()
    assert tool.canonical_content(msg) == tool.canonical_content(whole)


def test_a_spooled_message_read_apart_as_read_whole(tmp_path):
    """The gateway's Spool.apart(): the header and the rest, as read_apart() reads a file."""
    data = HEAD + BODY + TAIL
    head, rest = spool_of(tmp_path, data).apart()
    assert head == HEAD[:HEAD.index(b"\r\n\r\n") + 4] and head + rest == data
    assert same_message(tool.message_apart([head, rest]), tool.parse_message(data))
    assert spool_of(tmp_path, b"x" * 100).apart() == [b"x" * 100, None]
