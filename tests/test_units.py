"""Direct tests of the pure core: values in, values out, no process, no server.

The retry policy, one message's tally of attempts, SparkPost's answer turned into an Outcome,
the Date rule of signed mail, the DER encoder read back by the BER reader.  Every other test file drives the tool as a user does; these
pin down the decisions those runs depend on, one case at a time.
"""

import datetime
import os
import re
import subprocess
import sys
import time

import pytest
import requests

import sparkpostSMIME as tool

JOB = tool.Job("m.eml", recipients=("a@example.com", "b@example.com"),
               started=time.perf_counter())


def outcome(status, **kw):
    return tool.Outcome(JOB, status, **kw)


# -- retry_policy ---------------------------------------------------------------------

@pytest.mark.parametrize("status", ["sent", "written", "permanent", "halt", "failed"])
def test_no_retry_unless_temporary_or_4xx(status):
    assert tool.retry_policy(outcome(status), 1, 0.0, 3, 1.0) is None


def test_backoff_doubles_then_stops_after_the_retries():
    temporary = outcome("temporary", code=tool.EX_TEMPFAIL)
    assert [tool.retry_policy(temporary, n, 0.0, 3, 1.0) for n in (1, 2, 3, 4)] == \
        [1.0, 2.0, 4.0, None]


def test_retry_after_wins_when_longer_and_waits_are_capped():
    asked = outcome("temporary", retry_after=7.0)
    assert tool.retry_policy(asked, 1, 0.0, 3, 1.0) == 7.0
    greedy = outcome("temporary", retry_after=600.0)
    assert tool.retry_policy(greedy, 1, 0.0, 3, 1.0) == tool.MAX_RETRY_WAIT
    # all the waits for one message stay within MAX_TOTAL_WAIT
    assert tool.retry_policy(greedy, 1, tool.MAX_TOTAL_WAIT - 1, 3, 1.0) is None


def test_refusals_retry_only_for_4xx():
    soft = outcome("refused", refused=(("a@example.com", 451, "later"),))
    hard = outcome("refused", refused=(("a@example.com", 550, "no such user"),))
    assert tool.retry_policy(soft, 1, 0.0, 3, 0.5) == 0.5
    assert tool.retry_policy(hard, 1, 0.0, 3, 0.5) is None


# -- Tally ----------------------------------------------------------------------------

def test_tally_all_accepted_is_sent():
    tally = tool.Tally(JOB)
    tally.add(outcome("sent", accepted=JOB.recipients, reply="250 ok"))
    res = tally.result()
    assert (res.status, res.code, res.accepted, res.attempts) == ("sent", 0, JOB.recipients, 1)


def test_tally_retry_goes_to_the_recipients_left_and_a_refusal_outlives_success():
    tally = tool.Tally(JOB)
    tally.add(outcome("refused", accepted=("a@example.com",),
                      refused=(("b@example.com", 451, "try later"),)))
    assert tally.pending() == ("b@example.com",)
    retry = tally.retrying(1.0, 3)
    assert retry.recipients == ("b@example.com",) and tally.waited == 1.0
    tally.add(tool.Outcome(retry, "refused", refused=(("b@example.com", 550, "unknown"),)))
    assert tally.pending() == ()
    res = tally.result()
    assert res.status == "partial" and res.accepted == ("a@example.com",)
    assert res.code == tool.EX_UNAVAILABLE  # the 550 decides
    assert res.refused == (("b@example.com", 550, "unknown"),)
    assert any("retrying in 1 s (attempt 2 of 4)" in e for e in res.errors)


def test_tally_temporary_failure_is_75_with_its_detail_and_hint():
    tally = tool.Tally(JOB)
    tally.add(outcome("temporary", code=tool.EX_TEMPFAIL, detail="connection dropped",
                      hint="check the network"))
    res = tally.result()
    assert (res.status, res.code) == ("failed", tool.EX_TEMPFAIL)
    assert res.errors == ("connection dropped", "hint: check the network")


def test_tally_halt_is_carried_to_the_result():
    tally = tool.Tally(JOB)
    tally.add(outcome("halt", code=tool.EX_NOPERM, detail="535 authentication failed"))
    res = tally.result()
    assert res.halt and res.code == tool.EX_NOPERM and res.status == "failed"


# -- api_outcome ----------------------------------------------------------------------

def response(code, body=b"", headers=None):
    """A requests Response as the API back end receives it (no network involved)."""
    resp = requests.models.Response()
    resp.status_code, resp._content = code, body
    resp.reason = {200: "OK", 401: "Unauthorized", 420: "Enhance Your Calm",
                   429: "Too Many Requests", 400: "Bad Request", 502: "Bad Gateway"}.get(code, "")
    resp.headers.update(headers or {})
    return resp


def test_api_200_is_sent_with_id_and_counts():
    got = tool.api_outcome(JOB, response(200, b'{"results": {"id": "84", '
                                              b'"total_accepted_recipients": 2, '
                                              b'"total_rejected_recipients": 0}}'))
    assert got.status == "sent" and got.accepted == JOB.recipients
    assert got.reply == "id 84, accepted 2, rejected 0"


def test_api_200_with_rejected_recipients_is_permanent():
    got = tool.api_outcome(JOB, response(200, b'{"results": {"id": "9", '
                                              b'"total_accepted_recipients": 1, '
                                              b'"total_rejected_recipients": 1}}'))
    assert got.status == "permanent" and got.code == tool.EX_UNAVAILABLE
    assert "rejected 1 recipient" in got.detail


@pytest.mark.parametrize("code, status, exit_code", [
    (401, "halt", tool.EX_NOPERM), (420, "halt", tool.EX_TEMPFAIL),
    (429, "temporary", tool.EX_TEMPFAIL), (503, "temporary", tool.EX_TEMPFAIL),
    (400, "permanent", tool.EX_UNAVAILABLE)])
def test_api_errors(code, status, exit_code):
    got = tool.api_outcome(JOB, response(code, b'{"errors": [{"message": "nope", '
                                               b'"code": "1902"}]}', {"Retry-After": "12"}))
    assert (got.status, got.code) == (status, exit_code)
    assert got.detail.startswith("SparkPost API answered %d" % code)
    assert "nope [1902]" in got.detail
    assert got.retry_after == (12.0 if status == "temporary" else 0.0)


def test_api_body_that_is_not_json():
    got = tool.api_outcome(JOB, response(502, b"<html>bad gateway</html>"))
    assert got.status == "temporary" and got.detail == "SparkPost API answered 502 Bad Gateway"


# -- the Date of signed mail ----------------------------------------------------------

STALE = b"Mon, 02 Nov 2026 10:00:00 +0000"


def message(*dates):
    head = b"".join(b"Date: %s\n" % d for d in dates)
    return tool.parse_message(b"From: a@example.com\nTo: b@example.com\n" + head
                              + b"Subject: s\n\nbody\n")


def dates_of(msg):
    return [f.value for f in msg.outer if f.name == "date"]


def test_date_skew():
    when = 1793613600.0  # Mon, 02 Nov 2026 10:00:00 +0000
    assert tool.date_skew(STALE, when) == 0
    assert tool.date_skew(b"Mon, 02 Nov 2026 11:00:00 +0100", when) == 0
    assert tool.date_skew(STALE, when + 90) == 90
    assert tool.date_skew(b"the day before yesterday", when) is None


def slow_timestamp(value):
    """What date_timestamp() gives for anything its fast path does not read."""
    from email._parseaddr import mktime_tz, parsedate_tz
    try:
        parsed = parsedate_tz(value.decode("ascii", "replace"))
        return mktime_tz(parsed) if parsed else None
    except (ValueError, OverflowError, TypeError):
        return None


def test_date_fast_path_reads_as_email_parseaddr():
    """The fast path for RFC 5322's own form gives parsedate_tz's reading, whatever the
    numbers (out of range ones too), and leaves "-0000", zone names and others to it."""
    from hypothesis import given, settings, strategies as st
    names = st.sampled_from(["Mon", "Sun", "Xyz", "mon", "Nov", "Jan", "Foo", "nov", "Dec"])
    two = st.integers(0, 99).map(lambda n: "%02d" % n)

    @settings(max_examples=3000, deadline=None)
    @given(st.one_of(st.none(), names), st.integers(0, 99), names, st.integers(0, 9999),
           two, two, two, st.sampled_from("+-"), two, two, st.sampled_from(["", " ", "  "]))
    def check(weekday, day, month, year, hour, minute, second, sign, zh, zm, gap):
        value = ("%s, " % weekday if weekday else "") + "%d %s %04d %s:%s:%s %s%s%s" % (
            day, month, year, hour, minute, second, sign, zh, zm)
        value = value.replace(" ", " " + gap, 1).encode()
        assert tool.date_timestamp(value) == slow_timestamp(value), value

    check()
    for value in (b"Mon, 02 Nov 2026 10:00:00 -0000", b"Mon, 02 Nov 2026 10:00:00 GMT",
                  b"2 Nov 2026 10:00 +0100", b"Mon, 02 Nov 26 10:00:00 +0000"):
        assert tool.date_timestamp(value) == slow_timestamp(value) is not None, value
    assert tool.date_timestamp(b"Mon, 02 Nov 2026 10:00:00 +0000") == 1793613600


def test_rfc5322_date_follows_the_second_and_the_zone(monkeypatch):
    """The date-time written is that of its second (fractions dropped) in the time zone
    in force when it is written."""
    when = 1793613600.25
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert tool.rfc5322_date(when) == "Mon, 02 Nov 2026 10:00:00 +0000"
        assert tool.rfc5322_date(when + 0.5) == "Mon, 02 Nov 2026 10:00:00 +0000"
        assert tool.rfc5322_date(when + 1) == "Mon, 02 Nov 2026 10:00:01 +0000"
        monkeypatch.setenv("TZ", "Europe/Paris")
        time.tzset()
        assert tool.rfc5322_date(when) == "Mon, 02 Nov 2026 11:00:00 +0100"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_date_missing_is_added_silently():
    msg, now = message(), time.time()
    assert tool.date_at_signing(msg, now) == ""
    (date,) = dates_of(msg)
    assert tool.date_skew(date, now) < 1


def test_date_recent_is_kept_stale_replaced_in_place():
    now = time.time()
    recent = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(now - 60)).encode()
    msg = message(recent)
    assert tool.date_at_signing(msg, now) == "" and dates_of(msg) == [recent]
    msg = message(STALE)
    position = [f.name for f in msg.outer].index("date")
    assert tool.date_at_signing(msg, now) == "replaced"
    assert [f.name for f in msg.outer].index("date") == position
    assert tool.date_skew(dates_of(msg)[0], now) < 1


def test_date_keep():
    now = time.time()
    msg = message(STALE)
    assert tool.date_at_signing(msg, now, keep=True) == "kept" and dates_of(msg) == [STALE]
    # within Thunderbird's hour: kept without a word
    near = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(now - 1800)).encode()
    assert tool.date_at_signing(message(near), now, keep=True) == ""


def test_notices_count_the_run_across_workers():
    stats = tool.Stats(3)
    assert stats.notices() == []
    worker = tool.Stats(3)  # a forked worker's counts arrive through merge()
    worker.note("date-replaced", "")
    worker.note("date-replaced", "")
    worker.note("quantum", "m1.eml: the copies for bob are not quantum-safe")
    stats.merge(*worker.counts())
    stats.note("date-replaced", "")
    stats.note("quantum", "m7.eml: the copies for carol are not quantum-safe")
    stats.note("date-kept", "")
    assert stats.notices() == [
        tool.RUN_NOTICES["date-replaced"] % "3 messages",
        "m1.eml: the copies for bob are not quantum-safe (2 messages in all)",
        tool.RUN_NOTICES["date-kept"] % "1 message"]
    assert stats.notices()[0].startswith("Date replaced by the signing time in 3 messages")


# -- DER encoder <-> BER reader (X.690) -------------------------------------------------

@pytest.mark.parametrize("number", [0, 1, -1, 127, 128, -128, -129, 255, 256, 2 ** 64 + 5,
                                    -(2 ** 70)])
def test_der_integer_reads_back(number):
    element = tool.Ber(tool.der_int(number))
    assert element.tag == tool.INTEGER and element.integer() == number
    assert element.end == len(element.data)


@pytest.mark.parametrize("dotted", ["1.2.840.113549.1.7.2", "2.16.840.1.101.3.4.4.2",
                                    "1.3.132.1.11.1", "2.999.3", "0.9.2342"])
def test_der_oid_reads_back(dotted):
    assert tool.Ber(tool.der_oid(dotted)).oid() == dotted


def test_der_structure_reads_back_by_field():
    long_octets = bytes(range(256)) * 3  # a long form length (X.690 8.1.3.5)
    encoded = tool.der(tool.SEQUENCE, tool.der_int(3), tool.der_oid("1.2.3.4"),
                       tool.der(tool.ctx(0), tool.der(tool.OCTET_STRING, long_octets)),
                       tool.der_set(tool.der_int(2), tool.der_int(1)))
    fields = tool.Fields(tool.Ber(encoded))
    assert fields.take(tool.INTEGER).integer() == 3
    assert fields.take(tool.OID).oid() == "1.2.3.4"
    assert fields.optional(tool.ctx(1)) is None
    tagged = fields.take(tool.ctx(0))
    (inner,) = tagged.children()
    assert inner.octets() == long_octets and inner.raw[:4] == b"\x04\x82\x03\x00"
    assert [e.integer() for e in fields.take(tool.SET).children()] == [1, 2]  # sorted
    assert fields.rest() == []
    with pytest.raises(ValueError):
        fields.take()


def test_ber_reads_what_der_never_writes_indefinite_and_constructed():
    pieces = tool.der(tool.OCTET_STRING, b"ab") + tool.der(tool.OCTET_STRING, b"cd")
    indefinite = bytes((tool.OCTET_STRING | 0x20, 0x80)) + pieces + b"\0\0"
    element = tool.Ber(bytes((tool.SEQUENCE, 0x80)) + indefinite + b"\0\0")
    (string,) = element.children()
    assert string.octets() == b"abcd" and element.end == len(element.data)


@pytest.mark.parametrize("data", [b"\x30\x05\x02\x01", b"\x02\x00", b"\x30\x80\x02\x01\x01"])
def test_ber_refuses_truncated_or_empty(data):
    with pytest.raises(ValueError):
        element = tool.Ber(data)
        element.children() if element.constructed else element.integer()


# -- Certificate: the DER reading of a sending run, against cryptography's -----------------

def certificate_cases():
    """Return (cryptography certificate, its issuer's or None) of many kinds."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from support.pki import CA, new_key
    root = CA()
    inter = root.intermediate(constraints=x509.NameConstraints(
        permitted_subtrees=[x509.RFC822Name(".example.org"), x509.DNSName("example.org")],
        excluded_subtrees=[x509.RFC822Name("evil@a.example.org")]))
    cases = [(root.cert, root.cert), (inter.cert, root.cert)]
    for key, kw in [(None, {}), (new_key("ec"), {}), (new_key("mlkem768"), {}),
                    (None, {"san": False, "subject_email": True}),
                    (None, {"key_usage": None, "eku": None}),
                    (None, {"san": [x509.DNSName("x.example.org"),
                                    x509.RFC822Name("Two@Example.org")],
                            "subject_email": True}),
                    (None, {"eku": x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.
                                                          CLIENT_AUTH])})]:
        cases.append((inter.issue("a@b.example.org", key, **kw)[1], inter.cert))
    ed_ca = CA()
    ed_ca.key = ed25519.Ed25519PrivateKey.generate()
    cert = (x509.CertificateBuilder().subject_name(ed_ca.name).issuer_name(ed_ca.name)
            .public_key(ed_ca.key.public_key()).serial_number(7)
            .not_valid_before(datetime.datetime(1999, 1, 1))
            .not_valid_after(datetime.datetime(2051, 1, 1)).sign(ed_ca.key, None))
    return cases + [(cert, cert)]


def test_certificate_reads_what_cryptography_reads():
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for cert, issuer in certificate_cases():
        ours = tool.Certificate(cert.public_bytes(serialization.Encoding.DER))
        assert ours == tool.Certificate.of(cert) and hash(ours) == hash(tool.Certificate.of(cert))
        assert ours.not_valid_before_utc == cert.not_valid_before_utc
        assert ours.not_valid_after_utc == cert.not_valid_after_utc
        assert ours.key_algorithm == cert.public_key_algorithm_oid.dotted_string
        assert ours.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
        assert ours.issuer == cert.issuer  # cryptography's Name, read when asked for
        assert tool.issuer_and_serial(ours) == tool.issuer_and_serial(cert)
        assert tool.issued_by(ours, tool.Certificate.of(issuer))
        assert not tool.issued_by(tool.Certificate.of(issuer), ours) or issuer is cert
        assert tool.is_self_signed(ours) == (issuer is cert)
        exts = {e.oid.dotted_string: e.value for e in cert.extensions}
        san = exts.get("2.5.29.17")
        emails = [e.lower() for e in san.get_values_for_type(x509.RFC822Name)] if san else []
        assert tool.certificate_addresses(ours) == emails + [
            a.value.lower() for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)]
        ku = exts.get("2.5.29.15")
        if ku is None:
            assert tool.key_usage(ours) is None
        else:
            assert tool.key_usage(ours) == {n for n, flag in enumerate(
                [ku.digital_signature, ku.content_commitment, ku.key_encipherment,
                 ku.data_encipherment, ku.key_agreement, ku.key_cert_sign, ku.crl_sign]) if flag}
        eku = exts.get("2.5.29.37")
        assert tool.extended_key_usage(ours) == (
            None if eku is None else {p.dotted_string for p in eku})
        for purpose in ("sign", "encrypt"):
            assert tool.usage_problem(ours, purpose) == tool.usage_problem(cert, purpose)


def test_certificate_name_constraints_and_refusals():
    from cryptography.hazmat.primitives import serialization
    cases = certificate_cases()
    inter = tool.Certificate.of(cases[1][0])
    assert tool.mail_subtrees(inter) == ([".example.org"], ["evil@a.example.org"])
    assert tool.mail_subtrees(tool.Certificate.of(cases[0][0])) == ([], [])
    good = cases[2][0].public_bytes(serialization.Encoding.DER)
    for bad in (b"", b"\x30\x03\x02\x01\x00", good[:-1], good + b"\0",
                b"\x30\x80" + good[2 + (good[1] & 0x7F):] + b"\0\0"):
        with pytest.raises(ValueError):
            tool.Certificate(bad)
    with pytest.raises(tool.IdentityError, match="not a readable PEM or DER certificate"):
        tool.load_certificates(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                               b"-----END CERTIFICATE-----\n", "x.crt")


def reencoded(ber, longer):
    """Return *ber* encoded again, minimally but for the element at offset *longer*,
    whose length gets one more octet than it needs (BER allows it, DER does not)."""
    body = (b"".join(reencoded(child, longer) for child in ber.children())
            if ber.constructed else ber.body)
    size = len(body)
    octets = size.to_bytes((size.bit_length() + 7) // 8 or 1, "big")
    if ber.pos == longer:
        length = bytes((0x80 | (len(octets) + (size >= 0x80)),)) + b"\0" * (size >= 0x80) + octets
    else:
        length = bytes((size,)) if size < 0x80 else bytes((0x80 | len(octets),)) + octets
    return bytes((ber.tag,)) + length + body


def test_certificates_must_be_der_not_ber():
    """A length longer than it needs to be is BER, not DER (X.690 10.1): cryptography and
    every receiver refuse such a certificate, so the sender does too (it used to sign
    with it, and its own --verify then called the message malformed)."""
    from cryptography.hazmat.primitives import serialization
    good = certificate_cases()[2][0].public_bytes(serialization.Encoding.DER)
    top = tool.Ber(good)
    assert reencoded(top, -1) == good
    tbs = top.children()[0]
    subject = tbs.children()[5]  # version, serial, signature, issuer, validity, subject
    for at in (top.pos, tbs.pos, subject.pos, subject.children()[0].pos):
        bad = reencoded(top, at)
        assert bad != good and tool.Ber(bad).end == len(bad)  # good BER
        with pytest.raises(ValueError, match="not DER"):
            tool.Certificate(bad)
        with pytest.raises(tool.IdentityError, match="not a readable PEM or DER certificate"):
            tool.load_certificates(bad, "x.crt")


def test_a_signing_run_does_not_import_cryptography_x509(tmp_path):
    """One-shot start-up: the certificates of a sending run are read by the DER layer,
    never by cryptography.x509 (15-20 ms to import)."""
    here = os.path.dirname(os.path.abspath(__file__))
    probe = ("import sys; sys.path.insert(0, %r); import sparkpostSMIME as t\n"
             "code = t.main([%r, '--sign', '--encrypt', '--keys', %r]); sys.stdout.flush()\n"
             "sys.stderr.write('exit %%d, x509 loaded: %%s' %% (code, 'cryptography.x509' in "
             "sys.modules))" % (os.path.dirname(here), os.path.join(here, "fancy-HTML-to-smt.eml"),
                                os.path.join(here, "keys")))
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert b"exit 0, x509 loaded: False" in proc.stderr, proc.stderr
    assert proc.stdout.count(b"Content-Type: application/pkcs7-mime") == 1


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/St_Johns", "Asia/Kolkata"])
def test_rfc5322_date_is_formatdates(zone, monkeypatch):
    from email.utils import formatdate
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        for when in (0, 1_000_000_000, 1_790_000_000.7, time.time()):
            assert tool.rfc5322_date(when) == formatdate(when, localtime=True)
    finally:
        monkeypatch.undo()
        time.tzset()


# -- OutputGroup: unnamed files, or temporary names where a directory has none ---------

@pytest.mark.system  # as another user, open(/proc, O_TMPFILE) is EACCES before EOPNOTSUPP
def test_unnamed_files_are_decided_once_per_directory(tmp_path, monkeypatch):
    """/proc cannot hold unnamed files (open(O_TMPFILE) fails with EOPNOTSUPP): that
    directory is marked for temporary names; tmp_path (ext4 or tmpfs) can, and an
    unnamed file leaves no name in it."""
    monkeypatch.setattr(tool, "_UNNAMED", {})
    assert tool.open_unnamed("/proc", 0o600) is None
    assert tool._UNNAMED == {"/proc": False}
    fd = tool.open_unnamed(str(tmp_path), 0o600)
    os.close(fd)
    assert tool._UNNAMED[str(tmp_path)] is True and os.listdir(tmp_path) == []


@pytest.mark.parametrize("unnamed", [True, False])
def test_output_group_names_files_only_at_commit(tmp_path, monkeypatch, unnamed):
    """Until commit() the files of a group have no name in their directory (unnamed),
    or a hidden temporary one (the fallback, forced here); commit() gives each its
    name; discard() leaves nothing behind, either way."""
    monkeypatch.setattr(tool, "_UNNAMED", {} if unnamed else {str(tmp_path): False})
    group = tool.OutputGroup()
    group.add(str(tmp_path / "a.eml"), b"A" * 10)
    group.add(str(tmp_path / "b.eml"), b"B" * 100_000)
    before = os.listdir(tmp_path)
    if unnamed:
        assert before == []
    else:
        assert sorted(n[:7] for n in before) == [".a.eml.", ".b.eml."], before
    group.commit()
    assert sorted(os.listdir(tmp_path)) == ["a.eml", "b.eml"]
    assert (tmp_path / "b.eml").read_bytes() == b"B" * 100_000
    group.add(str(tmp_path / "c.eml"), b"C")
    group.discard()
    assert sorted(os.listdir(tmp_path)) == ["a.eml", "b.eml"]


# -- the canonical checks, against plain definitions ----------------------------------

def test_canonical_checks_answer_as_their_definitions():
    """declares_binary(), has_lone_dot() and is_transport_safe() answer as their plain
    definitions do (RFC 2045 6.2, the SMTP end of data, RFC 5322 2.1.1), on small data
    and on data of several KB."""
    from hypothesis import given, settings, strategies as st
    pieces = st.sampled_from([b" ", b"\t", b".", b"From ", b"x" * 50, b"binary", b"BiNaRy",
                              b"Content-Transfer-Encoding: ", b"Content-TrAnsfer-eNcoding:",
                              b"CONTENT-TRANSFER-ENCODING:", b"\x00", b"\xe9"])

    def slow_declares_binary(data):  # field names and values are case-insensitive
        return re.search(rb"(?i)ransfer-encoding[ \t]*:[ \t]*binary\b", data) is not None

    def slow_transport_safe(lines):
        data = b"\r\n".join(lines)
        return (data.isascii() and b"\0" not in data
                and all(len(line) <= 998 and not line.startswith(b"From ")
                        and not line.endswith((b" ", b"\t")) and line != b"." for line in lines))

    @settings(max_examples=1500, deadline=None)
    @given(st.lists(st.lists(pieces, max_size=12).map(b"".join), min_size=1, max_size=12),
           st.sampled_from([b"", b"y" * 5000]), st.sampled_from([b"", b"z" * 4100]))
    def check(lines, head, tail):
        lines = [head + lines[0]] + lines[1:-1] + [lines[-1] + tail] if len(lines) > 1 \
            else [head + lines[0] + tail]
        data = b"\r\n".join(lines)
        assert tool.declares_binary(data) == slow_declares_binary(data)
        assert tool.has_lone_dot(data) == (b"." in lines)
        assert tool.is_transport_safe(data) == slow_transport_safe(lines), lines

    check()
    big = b"a" * 8000 + b" \r\n"
    assert not tool.is_transport_safe(big)


def test_signing_time_values():
    """UTCTime up to 2049, GeneralizedTime after (RFC 5652 11.3); each value is its own
    second's (fractions dropped), never the previous one's."""
    assert tool.signing_time(1793613600.9) == b"\x17\x0d261102100000Z"
    assert tool.signing_time(1793613600.1) == b"\x17\x0d261102100000Z"
    assert tool.signing_time(1793613601.0) == b"\x17\x0d261102100001Z"
    assert tool.signing_time(2524608000.5) == b"\x18\x0f20500101000000Z"
    assert tool.signing_time(2524607999.5) == b"\x17\x0d491231235959Z"


def test_is_crlf_as_counting_line_ends():
    """is_crlf() says what counting CRLF, CR and LF says, whatever the breaks."""
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=3000, deadline=None)
    @given(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b"a", b"bc", b"\r\r\n", b"\n\r"]),
                    max_size=30))
    def check(parts):
        data = b"".join(parts)
        crlf = data.count(b"\r\n")
        assert tool.is_crlf(data) == (crlf == data.count(b"\n") == data.count(b"\r")), data
        assert tool.to_crlf(data) == tool._LINE_END.sub(b"\r\n", data)

    check()
    many = b"a\r\n" * 400_000
    assert tool.is_crlf(many) and not tool.is_crlf(many + b"\n") and not tool.is_crlf(b"\r" + many)


def test_base64_as_the_standard_library_writes_it():
    """encode_base64() writes what base64.encodebytes() writes, in CRLF lines of 76
    characters (RFC 2045 6.8), at every length around line and size boundaries."""
    import base64
    from hypothesis import given, settings, strategies as st

    def reference(blob):
        return base64.encodebytes(blob).replace(b"\n", b"\r\n")

    for size in [0, 1, 2, 3, 56, 57, 58, 4095, 4096, 4097, 4098, 57 * 80, 57 * 80 + 1, 20000]:
        blob = os.urandom(size)
        assert tool.encode_base64(blob) == reference(blob), size

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=9000))
    def check(blob):
        assert tool.encode_base64(blob) == reference(blob)
        assert tool.base64_text(blob) == base64.b64encode(blob)

    check()


def test_chunked_writers_as_their_whole_definitions():
    """What is made a chunk at a time (issue 29) equals what the whole definitions make,
    wherever the chunks are cut: base64 lines, AES-CBC, dot-stuffing for SMTP, and the
    counts and binary field found a lowered window at a time across window boundaries."""
    import base64
    from cryptography.hazmat.primitives import padding as pkcs7_padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from hypothesis import given, settings, strategies as st
    block = tool.STREAM_BLOCK
    sizes = [0, 1, 56, 57, block - 1, block, block + 1, 2 * block + 57]

    def chunked(data, cuts):
        pieces, at = [], 0
        for cut in sorted(cuts):
            pieces.append(data[at:cut])
            at = cut
        pieces.append(data[at:])
        return tool.Chunks.joined(*pieces)

    key, iv = os.urandom(32), os.urandom(16)
    for size in sizes:
        data = os.urandom(size)
        for cuts in ([], [size // 3, size // 2], [block - 1] if size >= block else [1]):
            whole = chunked(data, [c for c in cuts if c <= size])
            out = tool.base64_lines(whole)
            assert bytes(out) == base64.encodebytes(data).replace(b"\n", b"\r\n")
            assert len(out) == len(bytes(out))
            padder = pkcs7_padding.PKCS7(128).padder()
            enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
            expected = enc.update(padder.update(data) + padder.finalize()) + enc.finalize()
            assert bytes(tool.aes_cbc(key, iv, whole)) == expected
            assert len(tool.aes_cbc(key, iv, whole)) == len(expected)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.sampled_from([b".", b"\r\n", b"\r", b"\n", b"a", b"..", b"\r\n."]),
                    max_size=40), st.lists(st.integers(0, 80), max_size=5))
    def check_stuffing(parts, cuts):
        data = b"".join(parts) + b"\r\n"
        sent = b"".join(tool.dot_stuffed(chunked(data, [c for c in cuts if c <= len(data)])))
        assert sent + b".\r\n" == tool.dot_terminated(data)

    check_stuffing()
    text = bytearray(b"x" * (3 * block))
    for n, word in enumerate([b"BOUNDARY", b"rfc822", b"Binary", b"boundary"]):
        at = (n + 1) * block - 3 if n < 3 else 10
        text[at:at + len(word)] = word
    text = bytes(text)
    assert tool.count_any_case(text, (b"boundary", b"rfc822")) == 3
    assert tool.count_any_case(text, (b"binary",)) == 1
    field = b"\r\nContent-Transfer-Encoding:   BINARY\r\n"
    at = block - 20  # "ransfer-encoding" across the first window's end
    mixed = b"y" * at + field + b"y" * 100
    assert tool.declares_binary(mixed) and not tool.declares_binary(mixed.replace(b"BIN", b"b1n"))


# -- Signature.issuer: the issuer's common name read with the DER layer ---------------

@pytest.mark.parametrize("issuer, shown", [
    ([("CN", "Démo CA ☃")], "Démo CA ☃"),
    ([("O", "Example"), ("CN", "First"), ("CN", "Second")], "First"),
    ([("O", "Example Org"), ("C", "FR")], "C=FR,O=Example Org")])
def test_signature_issuer_as_cryptography_reads_it(issuer, shown):
    """The common name (the first), any characters; without one the whole RFC 4514 name,
    as cryptography writes it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    oids = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME,
            "C": NameOID.COUNTRY_NAME}
    name = x509.Name([x509.NameAttribute(oids[k], v) for k, v in issuer])
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    ours = tool.Certificate.of(cert)
    assert tool.Signature(ours, [ours], "").issuer == shown == tool.common_name(cert.issuer)


@pytest.mark.parametrize("body, text", [("Müller Root CA".encode(), "Müller Root CA"),
                                        ("Müller".encode("latin-1"), "Müller")])
def test_a_t61string_name_is_utf8_where_it_is_that(body, text):
    """T61String (0x14) common names: UTF-8 as CAs write them (and cryptography reads
    them), else Latin-1 (review: read as Latin-1 only, "MÃ¼ller")."""
    cn = tool.der(tool.SEQUENCE, tool.der_oid(tool.ATTR_COMMON_NAME), tool.der(0x14, body))
    name = tool.der(tool.SEQUENCE, tool.der(tool.SET, cn))
    assert tool.name_values(name, tool.ATTR_COMMON_NAME) == [text]
