"""Edge cases an independent review of the delivery/batch redesign and of the receiving side
found; each test failed before its fix.  Real servers on loopback, real OpenSSL."""

import datetime
import os
import re
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtensionOID, NameOID

from support import engines
from support.harness import ROOT, TOOL, inbox, journal, run_tool, send, smtp_env, tool_env
from support.corpus import CORPUS
from support.pki import pem_cert, pem_key, write
from support.servers import ApiServer, SmtpServer

SMTP = ["--send_smtp", "--retry_delay", "0.05"]
THREE = (b"From: alice@example.com\r\nTo: bob@example.org, carol@example.net, "
         b"erin@example.org\r\nSubject: three\r\n\r\nHello three.\r\n")


def test_a_refusal_outlives_a_later_success(pki, tmp_path):
    """carol refused for good, bob only at first: bob gets it on the retry, yet the message
    is PARTIAL with exit 69, in the report and the journal (not 0)."""
    results = tmp_path / "results.jsonl"
    with SmtpServer() as srv:
        srv.handler.refuse = {"carol@example.net": "550 5.1.1 no such user"}
        srv.handler.refuse_once = {"bob@example.org": "451 4.2.0 try later"}
        proc = send(pki, tmp_path, THREE, SMTP + ["--results", str(results)], smtp_env(srv))
    assert proc.returncode == 69, proc.stderr
    assert proc.stdout.decode().splitlines()[-2].startswith("PARTIAL - in ")  # then Summary
    row, = journal(results)
    assert row["status"] == "partial" and row["exit_code"] == 69 and row["attempts"] == 2
    assert sorted(row["accepted"]) == ["bob@example.org", "erin@example.org"]
    assert [sorted(m[1]) for m in srv.messages] == [["erin@example.org"], ["bob@example.org"]]


def test_resume_sends_a_partial_message_to_the_others_only(pki, tmp_path):
    results = tmp_path / "results.jsonl"
    with SmtpServer() as srv:
        srv.handler.refuse = {"carol@example.net": "550 5.1.1 mailbox full"}
        first = send(pki, tmp_path, THREE, SMTP + ["--sign", "--results", str(results)],
                     smtp_env(srv))
        assert first.returncode == 69, first.stderr
        srv.handler.refuse = {}
        again = send(pki, tmp_path, THREE, SMTP + ["--sign", "--results", str(results),
                                                   "--resume"], smtp_env(srv))
    assert again.returncode == 0, again.stderr
    assert "partly sent" in again.stderr.decode()
    assert [sorted(m[1]) for m in srv.messages] == [
        ["bob@example.org", "erin@example.org"], ["carol@example.net"]]
    assert [r["status"] for r in journal(results)] == ["partial", "sent"]


def bad_san_certificate(address):
    """Return (key, certificate) whose subjectAltName cannot be parsed."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, address)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=9))
            .add_extension(x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                                                      b"\x30\x03\x81\x01"), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def test_a_message_that_cannot_be_built_fails_alone(pki, tmp_path):
    """The third message's recipient has a malformed certificate: that message fails with
    its own reason; the others are delivered once each (it is never blamed on them)."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in os.listdir(pki.keys):
        (keys / name).write_bytes(open(os.path.join(pki.keys, name), "rb").read())
    write(str(keys / "bad@example.org.crt"), pem_cert(bad_san_certificate("bad@example.org")[1]))
    d = inbox(tmp_path, 5)
    (d / "m002.eml").write_bytes(CORPUS["plain-ascii"].replace(b"bob@example.org",
                                                               b"bad@example.org"))
    results = tmp_path / "results.jsonl"
    with SmtpServer() as srv:
        proc = run_tool([str(d), "--keys", str(keys), "--encrypt", "--send_smtp",
                         "--results", str(results)], env=smtp_env(srv))
    assert proc.returncode == 78, proc.stderr
    assert len(srv.messages) == 4
    rows = {os.path.basename(r["input"]): r for r in journal(results)}
    assert rows["m002.eml"]["status"] == "failed" and rows["m002.eml"]["exit_code"] == 78
    assert all(rows[n]["attempts"] == 1 for n in rows if n != "m002.eml")
    assert "bad@example.org.crt" in proc.stderr.decode()


def test_a_waiting_retry_holds_nobody_up(pki, tmp_path):
    """The first message gets 451 once and waits 3 s for its retry; the seven others go on
    meanwhile, and the retried one is the last to arrive."""
    results = tmp_path / "results.jsonl"
    with SmtpServer() as srv:
        srv.handler.tempfail_once = {b"Message 0."}
        proc = run_tool([str(inbox(tmp_path, 8)), "--keys", pki.keys, "--send_smtp",
                         "--retry_delay", "3", "--results", str(results)], env=smtp_env(srv))
    assert proc.returncode == 0, proc.stderr
    numbers = [int(re.search(rb"Message (\d+)\.", m[2]).group(1)) for m in srv.messages]
    assert numbers == [1, 2, 3, 4, 5, 6, 7, 0]
    others = [r["duration"] for r in journal(results) if not r["input"].endswith("m000.eml")]
    assert max(others) < 2.0, others  # none of them waited for the 3 s retry


def test_closed_stdout_stops_a_send_and_says_so(pki, tmp_path):
    """The report's reader goes away (| head -1): the run stops, exit 74, one line and the
    summary on stderr, and every message the server got is in the journal.  (Report lines
    come a group of journal rows at a time, up to 64: the batch is larger than that.)"""
    results = tmp_path / "results.jsonl"
    with SmtpServer() as srv:
        proc = subprocess.Popen([sys.executable, TOOL, str(inbox(tmp_path, 300)), "--keys",
                                 pki.keys, "--send_smtp", "--results", str(results)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                                env=tool_env(smtp_env(srv)))
        proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(60)
    engines.OUTPUTS.append(err.encode())
    assert code == 74, err
    assert "Traceback" not in err and "standard output was closed" in err
    assert re.search(r"Summary: \d+ sent, \d+ failed, \d+ not sent", err), err
    sent = [r for r in journal(results) if r["status"] == "sent"]
    assert len(srv.messages) == len(sent) < 300


def test_no_usable_auth_mechanism_is_a_configuration_error(tls_ctx, pki, tmp_path):
    user, password = "u", engines.plant_secret("no-mech-pw-TEST")
    with SmtpServer(tls_ctx, users={user: password}, exclude_mechanisms=["PLAIN", "LOGIN"]) as srv:
        proc = send(pki, tmp_path, THREE, SMTP, {"SMTP_HOST": "localhost",
                                                 "SMTP_PORT": str(srv.port), "SMTP_USER": user,
                                                 "SMTP_PASSWORD": password,
                                                 "SMTP_CAFILE": pki.cafile})
    assert proc.returncode == 78, proc.stderr
    assert "retrying" not in proc.stderr.decode() and "AUTH mechanism" in proc.stderr.decode()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_timeouts_must_be_numbers(pki, tmp_path, value):
    proc = run_tool([str(write(str(tmp_path / "m.eml"), THREE)), "--send_smtp"],
                    env={"SMTP_HOST": "127.0.0.1", "SMTP_TIMEOUT": value})
    assert proc.returncode == 78 and "SMTP_TIMEOUT" in proc.stderr.decode()


def test_api_rejected_recipients_are_not_ok(pki, tmp_path):
    """SparkPost answers 200 but rejected a recipient: not OK, exit 69, reported."""
    with ApiServer() as api:
        api.responses = [(200, {}, {"results": {"id": "7", "total_accepted_recipients": 2,
                                                "total_rejected_recipients": 1}})]
        proc = send(pki, tmp_path, THREE, ["--send_api"], {"SPARKPOST_API_KEY": "k" * 40,
                                                           "SPARKPOST_HOST": api.url})
    assert proc.returncode == 69, proc.stderr
    assert "rejected 1 recipient" in proc.stderr.decode()
    assert len(api.requests) == 1  # never sent again


def signed_by_mallory(pki, tmp_path, header):
    """A message signed by mallory (trusted CA) under *header*."""
    key, cert = pki.inter.issue("mallory@example.com")
    signed = engines.run(["openssl", "smime", "-sign", "-signer",
                          write(str(tmp_path / "c.pem"), pem_cert(cert)),
                          "-inkey", write(str(tmp_path / "k.pem"), pem_key(key))],
                         b"Content-Type: text/plain\n\nPay the bearer.\n").stdout
    path = tmp_path / "forged.eml"
    path.write_bytes(header + signed)
    return path


@pytest.mark.parametrize("header", [
    b"From: mallory@example.com\nFrom: CEO <alice@example.com>\nTo: bob@example.org\n",
    b"From: mallory@example.com, CEO <alice@example.com>\nTo: bob@example.org\n",
], ids=["two-fields", "two-addresses"])
def test_a_signature_vouches_for_one_author_only(pki, tmp_path, header):
    path = signed_by_mallory(pki, tmp_path, header)
    proc = run_tool(["--verify", str(path), "--ca", pki.cafile, "--keys", pki.private])
    assert proc.returncode == 65, proc.stdout
    assert "From names 2 addresses" in proc.stdout.decode()


def test_a_malformed_signer_certificate_is_a_refusal(tmp_path):
    key, cert = bad_san_certificate("mallory@example.com")
    content = b"Content-Type: text/plain\r\n\r\nhello\r\n"
    out = (pkcs7.PKCS7SignatureBuilder().set_data(content).add_signer(cert, key, hashes.SHA256())
           .sign(serialization.Encoding.SMIME, [pkcs7.PKCS7Options.DetachedSignature]))
    path = tmp_path / "bad.eml"
    path.write_bytes(b"From: mallory@example.com\r\nTo: bob@example.org\r\n" + out)
    ca = write(str(tmp_path / "ca.pem"), pem_cert(cert))
    for extra in ([], ["-v"]):
        proc = run_tool(["--verify", str(path), "--ca", ca] + extra)
        assert proc.returncode == 65, proc.stderr
        assert proc.stdout.decode().startswith("FAILED - ")


def test_keys_of_non_recipients_stay_unread(pki, tmp_path, openssl):
    """A message encrypted to bob, whose To names someone else (a Bcc copy), beside an
    unrelated password-protected key: bob decrypts it; the other key is never opened."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("bob@example.org.pem", "bob@example.org.crt"):
        (keys / name).write_bytes(open(os.path.join(pki.private, name), "rb").read())
    locked, _ = pki.inter.issue("aaa@example.org")
    write(str(keys / "aaa@example.org.pem"), pem_key(locked, b"locked-TEST"))
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"From: alice@example.com\r\nTo: zed@example.org\r\nSubject: s\r\n\r\nhi\r\n")
    encrypted = engines.run(["openssl", "smime", "-encrypt", "-aes256", "-in", str(msg),
                             pki.cert_path("bob@example.org")]).stdout
    path = tmp_path / "bcc.eml"
    path.write_bytes(b"From: alice@example.com\r\nTo: zed@example.org\r\n" + encrypted)
    proc = run_tool(["--decrypt", str(path), "--keys", str(keys)])
    assert proc.returncode == 0, proc.stderr
    assert "decrypted for bob@example.org" in proc.stdout.decode()


def test_a_decrypted_message_is_written_private(pki, tmp_path):
    msg = tmp_path / "m.eml"
    msg.write_bytes(THREE)
    encrypted = run_tool([str(msg), "--keys", pki.keys, "--encrypt"]).stdout
    path, out = tmp_path / "enc.eml", tmp_path / "plain.eml"
    path.write_bytes(encrypted)
    proc = run_tool(["--decrypt", str(path), "--keys", pki.private, "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert os.stat(out).st_mode & 0o777 == 0o600
    assert b"Hello three." in out.read_bytes()


@pytest.mark.parametrize("mode,trusted", [(0o600, True), (0o666, False)])
def test_dot_env_only_when_only_we_can_change_it(tmp_path, mode, trusted):
    env_file = tmp_path / ".env"
    env_file.write_text("SMTP_HOST=mx.example.test\n")
    os.chmod(env_file, mode)
    msg = write(str(tmp_path / "m.eml"), THREE)
    proc = run_tool([msg, "--send_smtp", "--dry_run"], cwd=str(tmp_path))
    assert (proc.returncode == 0) is trusted, proc.stderr
    assert ("mx.example.test" in proc.stdout.decode()) is trusted
