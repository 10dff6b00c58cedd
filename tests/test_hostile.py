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
@given(st.lists(st.sampled_from([b".", b"a", b"\r\n", b"\n", b"\r", b"=="]), max_size=200),
       st.integers(min_value=0, max_value=20))
def test_dot_stuffing_check_matches_its_definition(pieces, probes):
    """starts_a_line() (memchr probes, then a regular expression) agrees with the plain
    definition: a line starting with "." anywhere means the message must be dot-stuffed."""
    data = b"".join(pieces)
    expected = data.startswith(b".") or b"\n." in data
    assert tool.starts_a_line(data, probes) == expected


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
