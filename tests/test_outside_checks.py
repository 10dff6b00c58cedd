"""Checks against references nobody here wrote: RFC 2045/2046 binary parts, SMTP's lone dot,
PEP 723 metadata, TLS host names (issue "Outside checks")."""

import email
import email.policy
import json
import os
import re
import tomllib

import pytest

from support import engines
from support.harness import ROOT, TOOL, run_tool
from support import sparkpost_rules
from support.servers import ApiServer, SmtpServer, server_context

#: 5,100 bytes of data full of bare LFs and CRs, as an attachment declared "binary".
PAYLOAD = (b"\nline\nanother\r\r\n\n\rend" + bytes(range(256)) * 20)[:5099] + b"!"
assert len(PAYLOAD) == 5100 and PAYLOAD.count(b"\n") > 20


def binary_message(eol=b"\n"):
    """A multipart/mixed message whose second part is declared binary (RFC 2045 6.2)."""
    head = eol.join([
        b"From: alice@example.com", b"To: bob@example.org", b"Subject: binary part",
        b"MIME-Version: 1.0", b'Content-Type: multipart/mixed; boundary="b1"', b"",
        b"--b1", b"Content-Type: text/plain", b"", b"Text with bare line ends.", b"Two.",
        b"--b1", b"Content-Type: application/octet-stream",
        b'Content-Disposition: attachment; filename="data.bin"',
        b"Content-Transfer-Encoding: binary", b"", b""])
    return head + PAYLOAD + eol + b"--b1--" + eol


def attachment_and_text(content):
    """Return (decoded attachment, decoded text) of a recovered MIME entity."""
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    parts = [p for p in msg.walk() if not p.is_multipart()]
    return parts[1].get_payload(decode=True), parts[0].get_payload(decode=True)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["LF-file", "CRLF-file"])
@pytest.mark.parametrize("flags", [["--sign"], ["--sign_detached"], ["--encrypt"],
                                   ["--sign_detached", "--encrypt"], []],
                         ids=["sign", "detached", "encrypt", "detached+encrypt", "plain"])
def test_binary_part_is_base64_of_its_exact_bytes(pki, openssl, tmp_path, flags, eol):
    path = tmp_path / "bin.eml"
    path.write_bytes(binary_message(eol))
    proc = run_tool([str(path), "--keys", pki.keys] + flags)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    engines.check_transport_safe(out)
    content = out
    if "--encrypt" in flags:
        content = openssl.decrypt(out, pki.cert_path("bob@example.org"),
                                  pki.key_path("bob@example.org"))
    if flags and flags[0].startswith("--sign"):
        content = openssl.verify(content, pki.cafile)
    data, text = attachment_and_text(content)
    assert data == PAYLOAD  # 5,100 bytes, not 5,120: no LF became CRLF
    assert text == b"Text with bare line ends.\r\nTwo."  # text parts are still canonical
    assert b"Content-Transfer-Encoding: binary" not in content


@pytest.mark.parametrize("field", [b"Content-Transfer-Encoding: binary",
                                   b"Content-TrAnsfer-eNcoding: BiNary",
                                   b"CONTENT-TRANSFER-ENCODING: BINARY"])
def test_top_level_binary_body(pki, openssl, tmp_path, field):
    """Field names and values are case-insensitive (RFC 2045 6.1): however it is spelt, the
    binary body keeps its exact bytes."""
    path = tmp_path / "single.eml"
    path.write_bytes(b"From: alice@example.com\nTo: bob@example.org\nSubject: one part\n"
                     b"Content-Type: application/octet-stream\n" + field + b"\n\n" + PAYLOAD)
    proc = run_tool([str(path), "--keys", pki.keys, "--sign"])
    assert proc.returncode == 0, proc.stderr
    content = openssl.verify(proc.stdout, pki.cafile)
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert msg.get_payload(decode=True) == PAYLOAD


LONE_DOT = (b"From: alice@example.com\nTo: bob@example.org\nSubject: dots\n"
            b"Content-Type: text/plain; charset=us-ascii\n\n"
            b"Signed text.\n.\nA line with a dot: .\n..\n.\n")


@pytest.mark.parametrize("flags", [["--sign_detached"], ["--sign"], []],
                         ids=["detached", "opaque", "plain"])
def test_lone_dot_line_never_reaches_the_output(pki, openssl, tmp_path, flags):
    """SMTP's end of data (CRLF . CRLF) is written =2E in quoted-printable: same text."""
    path = tmp_path / "dots.eml"
    path.write_bytes(LONE_DOT)
    proc = run_tool([str(path), "--keys", pki.keys] + flags)
    assert proc.returncode == 0, proc.stderr
    assert b"\r\n.\r\n" not in proc.stdout and not proc.stdout.endswith(b"\r\n.")
    content = openssl.verify(proc.stdout, pki.cafile) if flags else proc.stdout
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_payload(decode=True) == LONE_DOT.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")


def test_pep723_metadata_matches_requirements():
    """uv run / pipx run read this block (PEP 723); it must name what requirements.txt does."""
    with open(TOOL, encoding="utf-8") as fh:
        source = fh.read()
    block = re.search(r"(?m)^# /// script\n((?:^#(?: .*)?\n)+)^# ///$", source)
    assert block, "no PEP 723 block"
    meta = tomllib.loads("".join(line[2:] + "\n" for line in block.group(1).splitlines()))
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as fh:
        required = [line.split("#")[0].strip() for line in fh]
    assert sorted(meta["dependencies"]) == sorted(r for r in required if r)
    assert meta["requires-python"].startswith(">=3.")


def test_campaign_over_64_bytes_refused_before_sending(pki, tmp_path):
    path = tmp_path / "m.eml"
    path.write_bytes(LONE_DOT)
    proc = run_tool([str(path), "--keys", pki.keys, "--send_api", "--campaign", "é" * 33],
                    env={"SPARKPOST_API_KEY": "x" * 40, "SPARKPOST_HOST": "http://127.0.0.1:9"})
    assert proc.returncode == 64
    err = proc.stderr.decode()
    assert "--campaign" in err and "66 bytes" in err and "at most 64" in err
    ok = run_tool([str(path), "--keys", pki.keys, "--campaign", "c" * 64])
    assert ok.returncode == 0, ok.stderr


def test_output_directory_summary_says_written(pki, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    inputs = []
    for n in range(2):
        inputs.append(tmp_path / ("m%d.eml" % n))
        inputs[-1].write_bytes(LONE_DOT)
    proc = run_tool([str(p) for p in inputs] + ["--keys", pki.keys, "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^sparkpostSMIME: Summary: 2 written, 0 failed in ", proc.stderr.decode(), re.M)
    assert "sent" not in proc.stderr.decode()


def test_host_name_mismatch_names_the_certificate_names(pki, tmp_path):
    """A certificate for mx.example.test (and 127.0.0.1), reached as localhost: exit 78."""
    ctx = server_context(pki.inter, str(tmp_path), name="mx.example.test")
    with SmtpServer(ctx) as srv:
        path = tmp_path / "m.eml"
        path.write_bytes(LONE_DOT)
        proc = run_tool([str(path), "--keys", pki.keys, "--send_smtp"],
                        env={"SMTP_HOST": "localhost", "SMTP_PORT": str(srv.port),
                             "SMTP_TLS": "starttls", "SMTP_CAFILE": pki.cafile})
    assert proc.returncode == 78
    err = proc.stderr.decode()
    assert ("TLS certificate of localhost:%d is for another name: it carries mx.example.test, "
            "127.0.0.1, not localhost" % srv.port) in err
    assert "SMTP_CAFILE" not in err
    assert srv.messages == []


# -- SparkPost's published rules for content.email_rfc822 ------------------------------

API_KEY = engines.plant_secret("fedcba9876543210fedcba9876543210RULESKEY")
TEMPLATED = (b"From: alice@example.com\nTo: Bob <bob@example.org>\nSubject: Hi {{first_name}}\n"
             b"Content-Type: text/plain; charset=us-ascii\n\n"
             b"Hello {{first_name}},\nyour balance is attached.\n.\nBye.\n")


@pytest.fixture
def rules_api():
    with ApiServer(rules=True) as srv:
        yield srv


def send_api(tmp_path, pki, api, flags, data=TEMPLATED, names=("m.eml",)):
    paths = []
    for name in names:
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    return run_tool([str(p) for p in paths] + ["--keys", pki.keys, "--send_api",
                                               "--retry_delay", "0.01"] + flags,
                    env={"SPARKPOST_API_KEY": API_KEY, "SPARKPOST_HOST": api.url})


@pytest.mark.parametrize("flags", [["--sign_detached"], ["--sign"],
                                   ["--sign_detached", "--encrypt"]],
                         ids=["detached", "opaque", "detached+encrypt"])
def test_what_sparkpost_delivers_still_verifies(pki, openssl, tmp_path, rules_api, flags):
    proc = send_api(tmp_path, pki, rules_api, flags)
    assert proc.returncode == 0, proc.stderr
    body = json.loads(rules_api.requests[0]["body"])
    assert body["options"]["perform_substitutions"] is False
    delivered = rules_api.delivered()["bob@example.org"]
    assert b"Subject: Hi \r\n" in delivered  # SparkPost substitutes headers regardless
    entity = delivered
    if "--encrypt" in flags:
        entity = openssl.decrypt(delivered, pki.cert_path("bob@example.org"),
                                 pki.key_path("bob@example.org"))
    content = openssl.verify(entity, pki.cafile)
    assert b"Hello {{first_name}}," in content
    err = proc.stderr.decode()
    assert err.count("the Subject header holds '{{'") == 1, err


def test_substitutions_would_break_a_detached_signature(pki, openssl, tmp_path, rules_api):
    """Why perform_substitutions is false: with it on, SparkPost's rules break the signature."""
    proc = send_api(tmp_path, pki, rules_api, ["--sign_detached"])
    assert proc.returncode == 0, proc.stderr
    body = json.loads(rules_api.requests[0]["body"])
    body["options"]["perform_substitutions"] = True
    recipient = body["recipients"][0]
    delivered = sparkpost_rules.delivered_message(body, recipient)
    assert b"Hello ," in delivered
    bad = engines.run(["openssl", "cms", "-verify", "-CAfile", pki.cafile, "-purpose",
                       "smimesign"], delivered, ok=(4,))
    assert b"Verification failure" in bad.stderr or b"digest failure" in bad.stderr.lower()


def test_unsigned_mail_keeps_sparkpost_default(pki, tmp_path, rules_api):
    proc = send_api(tmp_path, pki, rules_api, [])
    assert proc.returncode == 0, proc.stderr
    assert "perform_substitutions" not in json.loads(rules_api.requests[0]["body"])["options"]
    assert b"Hello ,\r\n" in rules_api.delivered()["bob@example.org"]
    assert "holds '{{'" not in proc.stderr.decode()  # unsigned: substituting is wanted


def test_warned_once_per_run(pki, tmp_path, rules_api):
    proc = send_api(tmp_path, pki, rules_api, ["--sign"], names=("a.eml", "b.eml", "c.eml"))
    assert proc.returncode == 0, proc.stderr
    assert len(rules_api.requests) == 3
    assert proc.stderr.decode().count("holds '{{'") == 1


def test_message_over_20_mb_refused_before_any_request(pki, tmp_path, rules_api):
    big = (b"From: alice@example.com\nTo: bob@example.org\nSubject: big\n"
           b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
           + (b"QUFB" * 19 + b"\n") * 200_000)  # 15.4 MB of base64: 21 MB once signed
    proc = send_api(tmp_path, pki, rules_api, ["--sign"], data=big)
    assert proc.returncode == 65, proc.stderr
    err = proc.stderr.decode()
    assert "SparkPost's API accepts at most 20000000" in err and "--send_smtp" in err
    assert rules_api.requests == []


def test_sending_limit_420_is_not_retried_and_stops_the_run(pki, tmp_path):
    with ApiServer(rules=True, remaining=1) as srv:
        proc = send_api(tmp_path, pki, srv, ["--sign"], names=("a.eml", "b.eml", "c.eml"))
    assert proc.returncode == 75
    assert len(srv.requests) == 2  # one sent, one refused with 420, the third never tried
    err = proc.stderr.decode()
    assert "420" in err and "sending limit" in err and "retrying" not in err
    assert re.search(r"Summary: 1 sent, 1 failed, 1 not sent in ", proc.stdout.decode())
