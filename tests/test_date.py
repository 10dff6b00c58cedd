"""The outer Date of a signed message is its signing time (issue: Thunderbird's check).

Thunderbird (NSS) shows a good signature as "not valid" when the message's Date and the
SignerInfo's signing-time are more than an hour apart, or when there is no Date.  The
signing time is read with ``openssl cms -cmsout -print`` (not with our own reader), after
OpenSSL decrypted the message for its recipient when it is encrypted.
"""

import calendar
import os
import re
import time
from email.utils import format_datetime, formatdate, parsedate_tz, mktime_tz
from datetime import datetime, timedelta, timezone

import pytest

from support import harness
from support import engines
import sparkpostSMIME as tool
from support.harness import run_tool
from support.corpus import SENDER

RECIPIENT = "bob@example.org"
BODY = ("MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n"
        "Your statement is ready.\n")
STALE = "Mon, 02 Nov 2026 10:00:00 +0000"
MODES = {
    "sign": ["--sign"],
    "sign_detached": ["--sign_detached"],
    "sign+encrypt": ["--sign", "--encrypt"],
    "detached+encrypt": ["--sign_detached", "--encrypt"],
}


def future():
    return format_datetime(datetime.now(timezone.utc) + timedelta(days=2))


def recent():
    return formatdate(time.time() - 90, localtime=True)


#: Input Date line -> whether the tool must replace (or add) it.
DATES = {
    "stale": ("Date: %s\n" % STALE, True),
    "future": (None, True),          # filled in by the test: two days ahead
    "missing": ("", True),
    "unreadable": ("Date: sometime last week\n", True),
}


def message(date_line, subject="statement"):
    return ("From: Alice <%s>\nTo: Bob <%s>\nSubject: %s\n%sMessage-ID: <%s@example.com>\n"
            % (SENDER, RECIPIENT, subject, date_line, subject) + BODY).encode()


def outer_dates(raw):
    """The Date fields of the outer header, as strings."""
    head = re.split(rb"\r?\n\r?\n", raw, 1)[0].decode()
    return [line.split(":", 1)[1].strip() for line in re.split(r"\r?\n", head)
            if line.lower().startswith("date:")]


def epoch(date):
    return mktime_tz(parsedate_tz(date))


def signing_times(openssl, pki, raw, flags):
    """The signing-time values OpenSSL prints for the SignerInfos of *raw*, as epochs."""
    entity = raw
    if "--encrypt" in flags:
        entity = openssl.decrypt(raw, pki.cert_path(RECIPIENT), pki.key_path(RECIPIENT))
    printed = openssl.cms_print(entity)
    stamps = re.findall(r"signingTime.*?(?:UTCTIME|GENERALIZEDTIME):(\w{3} +\d+ [\d:]+ \d{4}) GMT",
                        printed, re.S)
    assert stamps, printed
    return [calendar.timegm(time.strptime(s, "%b %d %H:%M:%S %Y")) for s in stamps]


def build(pki, tmp_path, raw, flags):
    return harness.build(pki, tmp_path, raw, flags, ok=None)  # the tests check the code


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", DATES)
def test_date_becomes_the_signing_time(openssl, pki, tmp_path, mode, kind):
    line = DATES[kind][0] if kind != "future" else "Date: %s\n" % future()
    before = time.time()
    proc = build(pki, tmp_path, message(line), MODES[mode])
    assert proc.returncode == 0, proc.stderr
    dates = outer_dates(proc.stdout)
    assert len(dates) == 1, dates
    (signed,) = signing_times(openssl, pki, proc.stdout, MODES[mode])
    assert abs(epoch(dates[0]) - signed) <= 2, (dates[0], signed)
    assert before - 2 <= signed <= time.time() + 2
    replaced = b"Date replaced by the signing time in 1 message" in proc.stderr
    assert replaced == (kind != "missing"), proc.stderr  # an added Date is no news
    assert proc.stderr.count(b"Date replaced") <= 1


@pytest.mark.parametrize("mode", ["sign", "detached+encrypt"])
def test_a_recent_date_is_kept_byte_for_byte(openssl, pki, tmp_path, mode):
    date = recent()  # 90 seconds ago: within the few minutes allowed
    proc = build(pki, tmp_path, message("Date: %s\n" % date), MODES[mode])
    assert proc.returncode == 0, proc.stderr
    assert outer_dates(proc.stdout) == [date]
    assert b"Date" not in proc.stderr
    (signed,) = signing_times(openssl, pki, proc.stdout, MODES[mode])
    assert abs(epoch(date) - signed) < tool.DATE_SKEW


def test_encrypt_only_keeps_the_date(pki, tmp_path):
    """Nothing is signed: there is no signing time for Thunderbird to compare."""
    proc = build(pki, tmp_path, message("Date: %s\n" % STALE), ["--encrypt"])
    assert proc.returncode == 0, proc.stderr
    assert outer_dates(proc.stdout) == [STALE]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_batch_each_message_gets_its_own_time(openssl, pki, tmp_path, jobs):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    for n in range(5):
        (inputs / ("m%d.eml" % n)).write_bytes(message("Date: %s\n" % STALE if n % 2 else "",
                                                       "statement-%d" % n))
    proc = run_tool([str(inputs), "--keys", pki.keys, "--sign_detached", "--encrypt",
                     "-o", str(out), "--jobs", jobs])
    assert proc.returncode == 0, proc.stderr
    for n in range(5):
        raw = (out / ("m%d.eml" % n)).read_bytes()
        (date,) = outer_dates(raw)
        (signed,) = signing_times(openssl, pki, raw, ["--encrypt"])
        assert abs(epoch(date) - signed) <= 2
    # one line for the run, counting the stale ones (m1, m3), not the added ones
    assert proc.stderr.count(b"Date replaced by the signing time") == 1, proc.stderr
    assert b"Date replaced by the signing time in 2 messages" in proc.stderr


def test_keep_date_keeps_it_and_warns(openssl, pki, tmp_path):
    proc = build(pki, tmp_path, message("Date: %s\n" % STALE), ["--sign", "--keep_date"])
    assert proc.returncode == 0, proc.stderr
    assert outer_dates(proc.stdout) == [STALE]
    assert b"--keep_date: the Date of 1 message is more than an hour" in proc.stderr
    assert b"Thunderbird will show their signature as not valid" in proc.stderr
    # a recent Date is kept silently; a missing one is still added (RFC 5322 3.6)
    quiet = build(pki, tmp_path, message("Date: %s\n" % recent()), ["--sign", "--keep_date"])
    assert quiet.returncode == 0 and b"keep_date" not in quiet.stderr
    added = build(pki, tmp_path, message(""), ["--sign", "--keep_date"])
    (date,) = outer_dates(added.stdout)
    (signed,) = signing_times(openssl, pki, added.stdout, ["--sign"])
    assert abs(epoch(date) - signed) <= 2


def test_dry_run_shows_the_date_that_will_be_sent(pki, tmp_path):
    (tmp_path / "m.eml").write_bytes(message("Date: %s\n" % STALE))
    proc = run_tool([str(tmp_path / "m.eml"), "--keys", pki.keys, "--sign", "--send_smtp",
                     "--dry_run"], env={"SMTP_HOST": "127.0.0.1", "SMTP_PORT": "9"})
    assert proc.returncode == 0, proc.stderr
    shown = [line for line in proc.stdout.decode().splitlines() if line.strip().startswith("Date:")]
    assert len(shown) == 1, proc.stdout
    assert abs(epoch(shown[0].split(":", 1)[1].strip()) - time.time()) < 30
    assert STALE not in proc.stdout.decode()


@pytest.mark.parametrize("args", [["--encrypt", "--keep_date"],
                                  ["--sign", "--header", "Date: Mon, 02 Nov 2026 10:00:00 +0000"]])
def test_date_options_refused(pki, tmp_path, args):
    proc = build(pki, tmp_path, message(""), args)
    assert proc.returncode == 64, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_several_dates_become_one():
    msg = tool.parse_message(message("Date: %s\nDate: %s\n" % (STALE, STALE)))
    assert tool.date_at_signing(msg, time.time()) == "replaced"
    assert [f.name for f in msg.outer].count("date") == 1


# -- --verify: a good signature far from its Date passes, with a warning --------

def verify(pki, tmp_path, raw):
    path = tmp_path / "received.eml"
    path.write_bytes(raw)
    return run_tool(["--verify", str(path), "--ca", pki.cafile, "--keys", pki.keys])


def test_verify_warns_about_a_stale_date(pki, tmp_path):
    signed = build(pki, tmp_path, message("Date: %s\n" % STALE), ["--sign", "--keep_date"])
    proc = verify(pki, tmp_path, signed.stdout)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - signed by %s" % SENDER.encode())
    warnings = [l for l in proc.stderr.decode().splitlines() if "Thunderbird" in l]
    assert len(warnings) == 1, proc.stderr
    assert STALE in warnings[0] and "days from the signing time" in warnings[0]
    assert re.search(r"\(20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC\)", warnings[0])


def test_verify_warns_about_a_missing_date(pki, tmp_path):
    signed = build(pki, tmp_path, message(""), ["--sign_detached"]).stdout
    head, rest = signed.split(b"\r\n\r\n", 1)  # the outer header is not signed: drop Date
    head = b"\r\n".join(l for l in head.split(b"\r\n") if not l.startswith(b"Date:"))
    proc = verify(pki, tmp_path, head + b"\r\n\r\n" + rest)
    assert proc.returncode == 0, proc.stderr
    assert b"no Date header: Thunderbird shows the signature" in proc.stderr


def test_verify_is_quiet_when_date_and_signing_time_agree(pki, tmp_path):
    signed = build(pki, tmp_path, message("Date: %s\n" % STALE), ["--sign"])
    proc = verify(pki, tmp_path, signed.stdout)
    assert proc.returncode == 0, proc.stderr
    assert b"Thunderbird" not in proc.stderr


def test_verify_with_an_unreadable_signing_time(pki, tmp_path, monkeypatch):
    """A good signature whose signed signing-time attribute is garbage (the signer chose
    it): --verify passes it, quietly about the Date, never an internal error."""
    monkeypatch.setattr(tool, "signing_time", lambda now=None: tool.der(0x17, b"20XX13Z"))
    keystore = tool.Keystore([pki.keys])
    msg = tool.parse_message(message("Date: %s\n" % STALE))
    data = tool.build_smime(msg, tool.Settings(("-",), sign_mode="opaque"),
                            keystore.signer(SENDER))
    proc = verify(pki, tmp_path, data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - signed by %s" % SENDER.encode())
    assert b"internal error" not in proc.stderr
