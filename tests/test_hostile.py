"""Hostile input: arbitrary, truncated and mutated messages, odd headers, addresses as paths.

Property-based (hypothesis): whatever comes in, the tool either builds a transport-safe
message or raises one of its own errors (a clear line and an exit code), never a crash.
"""

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import engines
import sparkpostSMIME as tool
from support.harness import CACHE, run_tool
from support.corpus import CORPUS

PASSTHROUGH = tool.parse_args(["x.eml"])
FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def build_or_refuse(data, opts=PASSTHROUGH, pki=None):
    """Build *data*; return the output, or None when the tool refuses it properly."""
    try:
        msg = tool.parse_message(data, "fuzz.eml")
        signer, recipients = (None, [])
        if pki is not None:
            keystore = tool.Keystore([pki.keys], validated=os.path.join(CACHE, "v"))
            signer, recipients = tool.find_identities(msg, opts, keystore)
        out = tool.build_smime(msg, opts, signer, recipients)
    except tool.SmimeToolError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None
    engines.check_transport_safe(out)
    return out


@FAST
@given(st.binary(max_size=3000))
def test_arbitrary_bytes(data):
    build_or_refuse(data)


@st.composite
def mutated(draw):
    """A real message, truncated or with bytes inserted, replaced or deleted."""
    data = bytearray(CORPUS[draw(st.sampled_from(sorted(CORPUS)))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["truncate", "insert", "replace", "delete"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
        elif kind == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif pos < len(data):
            del data[pos:pos + draw(st.integers(1, 50))]
    return bytes(data)


@FAST
@given(mutated())
def test_mutated_real_messages(data):
    build_or_refuse(data)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated())
def test_mutated_messages_signed_and_encrypted(pki, data):
    opts = tool.parse_args(["x.eml", "--sign_detached", "--encrypt", "--keys", pki.keys])
    build_or_refuse(data, opts, pki)


HEADER_NAME = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=":"),
                      min_size=1, max_size=30)
HEADER_VALUE = st.text(st.characters(blacklist_categories=["Cs"]), max_size=1200)


@FAST
@given(st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=8),
       st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_odd_headers(fields, eol):
    head = b"From: a@example.com" + eol + b"To: b@example.org" + eol
    for name, value in fields:
        head += ("%s: %s" % (name, value)).encode("utf-8", "surrogateescape") + eol
    build_or_refuse(head + eol + b"body" + eol)


@FAST
@given(st.text(max_size=80))
def test_addresses_never_escape_key_directories(tmp_path_factory, address):
    try:
        name = tool.safe_address(address)
    except tool.MessageError:
        return
    assert "/" not in name and "\\" not in name and "\0" not in name
    assert ".." not in name and not name.startswith(".")
    base = str(tmp_path_factory.getbasetemp())
    found = tool.find_file(address, (".crt",), [base])
    assert found is None or os.path.realpath(found).startswith(os.path.realpath(base) + os.sep)


@pytest.mark.parametrize("data,code", [
    (b"", 65), (b"\x00" * 100, 65), (os.urandom(2000), 65), (b"From: \n\n", 65),
    (b"Content-Type: multipart/mixed\n\n--x\n", 65),
    (CORPUS["nested"][:300], 78),  # a usable message, but no key for its sender here
])
def test_cli_never_tracebacks(tmp_path, data, code):
    path = tmp_path / "in.eml"
    path.write_bytes(data)
    proc = run_tool([str(path), "--sign", "--encrypt", "--keys", str(tmp_path)])
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.count(b"\n") == 1


@FAST
@given(st.lists(st.sampled_from([b".", b"..", b"a", b"\r\n", b"\n", b"\r"]), max_size=200),
       st.sampled_from([b"", b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"]))
def test_dot_stuffing_doubles_every_leading_dot(pieces, then):
    """dot_terminated() doubles a "." at the start of every line (RFC 5321 4.5.2, as
    smtplib's quotedata() does once it has made every line end CRLF), ends the data with
    <CRLF>.<CRLF> and appends *then*: nothing in the data can end it early."""
    data = b"".join(pieces)
    stuffed = re.sub(rb"(?m)^\.", b"..", data)
    end = b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"
    sent = tool.dot_terminated(data, then)
    assert sent == stuffed + end + then
    assert b"\r\n.\r\n" not in b"\r\n" + sent[:len(sent) - len(end + then)]


def nested_multiparts(levels):
    """A message of *levels* multiparts nested in one another, plain text at the bottom:
    7-bit and short-lined all through (no part needs re-encoding)."""
    head = [b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: nest\r\n"
            b"MIME-Version: 1.0\r\n"]
    tail = []
    for n in range(levels):
        head.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (n, n))
        tail.append(b"\r\n--b%d--\r\n" % n)
    return b"".join(head) + b"Content-Type: text/plain\r\n\r\nbottom\r\n" + b"".join(
        reversed(tail))


@pytest.mark.parametrize("flags", [["--sign"], ["--sign", "--encrypt"], []])
def test_a_mime_bomb_of_plain_text_is_refused(pki, tmp_path, flags):
    """10,000 nested multiparts of plain text (nothing declared binary, nothing to
    re-encode): refused (65) whatever is asked, naming the limit; 50 levels pass."""
    path = tmp_path / "bomb.eml"
    path.write_bytes(nested_multiparts(10_000))
    proc = run_tool([str(path), "--keys", pki.keys] + flags)
    assert proc.returncode == 65, proc.stderr
    assert b"nested deeper than 50" in proc.stderr and proc.stderr.count(b"\n") == 1
    path.write_bytes(nested_multiparts(49))
    assert run_tool([str(path), "--keys", pki.keys] + flags).returncode == 0


def nested_messages(levels, filler=b""):
    """A message of *levels* message/rfc822 parts nested in one another (no multipart: no
    delimiter line at all), *filler* in the innermost text."""
    head = [b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: nest\r\n"
            b"MIME-Version: 1.0\r\n"]
    for n in range(levels):
        head.append(b"Content-Type: Message/RFC822\r\n\r\nSubject: level %d\r\n" % n)
    return b"".join(head) + b"Content-Type: text/plain\r\n\r\n" + filler + b"bottom\r\n"


@pytest.mark.parametrize("filler", [b"", b"x822 " * 2000 + b"\r\n"])
def test_nested_embedded_messages_are_refused(pki, tmp_path, filler):
    """60 message/rfc822 entities nested without one delimiter line: refused (65), also
    behind 2,000 other "822"s; 49 levels pass."""
    path = tmp_path / "nest.eml"
    path.write_bytes(nested_messages(60, filler))
    proc = run_tool([str(path), "--keys", pki.keys, "--sign"])
    assert proc.returncode == 65 and b"nested deeper than 50" in proc.stderr, proc.stderr
    path.write_bytes(nested_messages(49, filler))
    assert run_tool([str(path), "--keys", pki.keys, "--sign"]).returncode == 0


def test_too_many_parts_are_refused(pki, tmp_path):
    """One multipart of 10,001 empty parts: refused (65); 9,000 pass."""
    def message(parts):
        body = b"".join(b"--p\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(parts))
        return (b"From: alice@example.com\r\nTo: bob@example.org\r\nMIME-Version: 1.0\r\n"
                b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n' + body + b"--p--\r\n")
    path = tmp_path / "parts.eml"
    path.write_bytes(message(10_001))
    proc = run_tool([str(path), "--keys", pki.keys, "--sign"])
    assert proc.returncode == 65 and b"more than 10000 MIME parts" in proc.stderr, proc.stderr
    path.write_bytes(message(9_000))
    assert run_tool([str(path), "--keys", pki.keys, "--sign"]).returncode == 0


@pytest.mark.parametrize("address", ['"a\x01b"@example.org', "ste\x1bve@example.org",
                                     "bob\x7f@example.org"])
def test_control_characters_in_a_header_address_are_refused(pki, tmp_path, address):
    """A To address with a control character, quoted or not (RFC 5321 4.1.2 allows none
    in a path): 65, naming the field, before anything is built or sent.  (A NUL makes the
    whole header unreadable: refused as no RFC 5322 message, 65 too.)"""
    path = tmp_path / "ctl.eml"
    path.write_bytes(b"From: alice@example.com\r\nTo: <%s>\r\nSubject: x\r\n\r\nhi\r\n"
                     % address.encode())
    proc = run_tool([str(path), "--keys", pki.keys, "--sign"])
    assert proc.returncode == 65, proc.stderr
    assert b"To address" in proc.stderr and proc.stderr.count(b"\n") == 1, proc.stderr
