"""Through a real MTA: Postfix + OpenDKIM on loopback; S/MIME intact and DKIM valid after transit.

The tool injects with --send_smtp (STARTTLS, SMTP_CAFILE = the test CA) into a private
Postfix instance whose OpenDKIM milter signs mail from thetucks.com.  For every delivered
copy: DKIM verifies (dkimpy, with the test key instead of DNS), the recipient decrypts,
the signature verifies with OpenSSL, NSS cmsutil and gpgsm, the content equals the
original's MIME parts, no Bcc header arrived, and each Bcc recipient got a copy.
"""

import contextlib
import os
import re
import shutil
import tempfile

import pytest

from support import engines
from support import mta
from support import servers
from support.harness import TESTS, run_tool
from support.corpus import CORPUS

SENDER = "steve@thetucks.com"
TO = ["steve.tuck@sparkpost.com", "bob@example.org"]
CC = ["carol@example.net"]
BCC = ["dave@example.com", "erin@example.org"]
EVERYONE = TO + CC + BCC
HEADER = ("From: Steve Tuck <steve@thetucks.com>\r\n"
          "To: Steve Tuck <steve.tuck@sparkpost.com>, Bob <bob@example.org>\r\n"
          "Cc: carol@example.net\r\nBcc: dave@example.com, Erin <erin@example.org>\r\n")


def readdress(raw):
    """Give a fixture message our sender and several To/Cc/Bcc recipients."""
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    kept = [line for line in re.split(rb"\r\n(?![ \t])", head)
            if not re.match(rb"(?i)(from|to|cc|bcc):", line)]
    return HEADER.encode() + b"\r\n".join(kept) + b"\r\n\r\n" + body


def fixture(name):
    with open(os.path.join(TESTS, name), "rb") as fh:
        return fh.read()


MESSAGES = {
    "19k": lambda: readdress(fixture("fancy-HTML-to-smt.eml")),
    "577k": lambda: readdress(fixture("avocado-577k.eml")),
    "8bit-long-lines": lambda: readdress(CORPUS["eightbit-lf"].replace(
        b"Trailing tab\t\n", b"Trailing tab\t\n" + (b"tr\xc3\xa8s long " * 150) + b"\n")),
}
MODES = {"sign": ["--sign"], "detached": ["--sign_detached"],
         "sign+encrypt": ["--sign", "--encrypt"], "detached+encrypt": ["--sign_detached",
                                                                       "--encrypt"]}


@pytest.fixture(scope="module")
def postfix(pki, tls_ctx, tmp_path_factory):
    if not mta.tools_present():
        if os.environ.get("CI") == "true":
            pytest.fail("postfix/opendkim are not installed, and CI must run every test")
        pytest.skip("postfix/opendkim are not installed")
    # not under pytest's 0700 temp root: the postfix and nobody users must reach it
    base = tempfile.mkdtemp(prefix="smime-postfix-")
    servers.server_context(pki.inter, base, name="localhost")  # writes server.crt/key in base
    server = mta.Postfix(base, EVERYONE + [SENDER], os.path.join(base, "server.crt"),
                         os.path.join(base, "server.key"))
    with contextlib.ExitStack() as cleanup:  # on leaving: server.stop(), then the rmtree
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        cleanup.callback(server.stop)
        server.start()
        yield server


def dkim_ok(postfix, data):
    import dkim
    return dkim.verify(data, dnsfunc=postfix.dns_txt)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MESSAGES)
def test_smime_survives_postfix_and_dkim(postfix, pki, nss, gpgsm, openssl, tmp_path, name,
                                         mode):
    raw = MESSAGES[name]()
    path = tmp_path / (name + ".eml")
    path.write_bytes(raw)
    postfix.clear()
    env = {"SMTP_HOST": "localhost", "SMTP_PORT": str(postfix.port),
           "SMTP_CAFILE": pki.cafile, "SMTP_TLS": "starttls", "SMTP_TIMEOUT": "30"}
    proc = run_tool([str(path), "--keys", pki.keys, "--send_smtp"] + MODES[mode], env=env)
    assert proc.returncode == 0, proc.stderr.decode() + postfix.log()
    assert proc.stdout.decode().startswith("Opened SMTP connection (STARTTLS) to localhost")
    expected = engines.leaves(raw)
    for who in EVERYONE:
        delivered, = postfix.wait_for(who, 1)
        data = delivered.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # Maildir keeps LF
        head = mta.unfold_headers(data)
        assert b"DKIM-Signature:" in head and b"d=thetucks.com" in head
        assert dkim_ok(postfix, data), "DKIM does not verify for %s" % who
        assert not re.search(rb"(?im)^bcc:", head), "a Bcc header reached %s" % who
        entity = data
        if "--encrypt" in MODES[mode]:
            entity = openssl.decrypt(data, pki.cert_path(who), pki.key_path(who))
        content = openssl.verify(entity, pki.cafile)
        assert engines.leaves(content) == expected
        if who == TO[0]:  # one copy per message through the two other engines, and ours
            check_nss_and_gpgsm(nss, gpgsm, data, entity, MODES[mode], expected)
            check_our_verify(pki, tmp_path, delivered, expected)


def check_our_verify(pki, tmp_path, delivered, expected):
    """Our own --verify on the file as delivered (Maildir, LF): decrypted for *who*, the
    signature of the sender verified, and -o recovers the original's MIME parts."""
    path, out = tmp_path / "delivered.eml", tmp_path / "recovered.eml"
    path.write_bytes(delivered)
    proc = run_tool(["--verify", str(path), "--keys", pki.private, "--ca", pki.cafile,
                     "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith("OK - signed by %s (" % SENDER)
    recovered = out.read_bytes()
    assert b"\r\nFrom: Steve Tuck <steve@thetucks.com>\r\n" in recovered.split(b"\r\n\r\n")[0]
    assert engines.leaves(recovered) == expected


def check_nss_and_gpgsm(nss, gpgsm, data, entity, flags, expected):
    for engine in (nss, gpgsm):
        signed = engine.decrypt(engines.der_of(data)) if "--encrypt" in flags else entity
        assert engines.leaves(engines.verify_signed(engine, signed)) == expected


def test_postfix_is_hardened_and_private(postfix):
    """The instance is ours: loopback, a free port, and bare LF forbidden where supported."""
    assert postfix.port != 25
    with open(os.path.join(postfix.conf, "main.cf")) as fh:
        main = fh.read()
    assert "inet_interfaces = 127.0.0.1" in main
    if postfix.forbids_bare_newline:
        assert "smtpd_forbid_bare_newline = yes" in main


def test_pipelined_partial_refusal_through_postfix(postfix, pki, tmp_path):
    """Postfix offers PIPELINING: a refused recipient among accepted ones is still named."""
    raw = (b"From: steve@thetucks.com\r\nTo: bob@example.org, nobody@example.org\r\n"
           b"Subject: partial\r\n\r\nhello\r\n")
    path = tmp_path / "partial.eml"
    path.write_bytes(raw)
    postfix.clear()
    env = {"SMTP_HOST": "localhost", "SMTP_PORT": str(postfix.port), "SMTP_CAFILE": pki.cafile,
           "SMTP_TIMEOUT": "30"}
    proc = run_tool([str(path), "--keys", pki.keys, "--sign", "--send_smtp", "-v"], env=env)
    assert proc.returncode == 69, proc.stderr.decode() + postfix.log()
    err = proc.stderr.decode()
    assert "PIPELINING" in err  # offered, so MAIL/RCPT/DATA went in one group
    assert re.search(r"refused nobody@example\.org: 550 5\.1\.1 ", err)
    last = proc.stdout.decode().splitlines()[-1]
    assert last.startswith("PARTIAL - in ") and "accepted bob@example.org" in last
    delivered, = postfix.wait_for("bob@example.org", 1)
    assert b"Subject: partial" in delivered
