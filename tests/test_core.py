"""S/MIME core: every mode and every trap message, checked by OpenSSL, NSS and gpgsm."""

import os
import re

import pytest

from support import engines
from support.harness import build, run_tool
from support.corpus import CORPUS, SENDER

MODES = {
    "sign": ["--sign"],
    "sign_detached": ["--sign_detached"],
    "sign+encrypt": ["--sign", "--encrypt"],
    "detached+encrypt": ["--sign-detached", "--encrypt"],
    "encrypt": ["--encrypt"],
}


def recipients_of(raw):
    msg = engines.parse(raw)
    from email.utils import getaddresses
    found = getaddresses(msg.get_all("to", []) + msg.get_all("cc", []) + msg.get_all("bcc", []))
    return [a.lower() for _, a in found if a]


def outer_names(raw):
    """Names of the outer (non-Content, non-MIME-Version, non-Bcc) header fields, in order."""
    head = re.split(rb"\r?\n\r?\n", raw, 1)[0].decode("utf-8")
    names = [line.split(":", 1)[0].lower() for line in re.split(r"\r?\n", head)
             if line and not line[0].isspace() and ":" in line and not line.startswith("From ")]
    return [n for n in names if not n.startswith("content-") and n not in ("mime-version", "bcc")]


def open_message(openssl, pki, out, flags, raw):
    """Decrypt (for every recipient) and verify; return the innermost content."""
    entity = out
    if "--encrypt" in flags:
        plains = {openssl.decrypt(out, pki.cert_path(a), pki.key_path(a))
                  for a in recipients_of(raw) + [SENDER]}
        assert len(plains) == 1, "recipients decrypted different contents"
        entity = plains.pop()
        engines.check_transport_safe(entity)
    if "--sign" in flags or "--sign_detached" in flags or "--sign-detached" in flags:
        entity = openssl.verify(entity, pki.cafile)
        engines.inner_content_safe(entity)
    return entity


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CORPUS)
def test_openssl_reads_every_mode(pki, openssl, tmp_path, name, mode):
    raw = CORPUS[name]
    out = build(pki, tmp_path, raw, MODES[mode]).stdout
    engines.check_transport_safe(out)
    head = out.split(b"\r\n\r\n", 1)[0]
    assert head.count(b"\r\nMIME-Version: 1.0\r\n") == 1
    assert not re.search(rb"(?im)^bcc:", head), "Bcc must not be in the output"
    assert outer_names(out) == outer_names(raw), "outer header order changed"
    content = open_message(openssl, pki, out, MODES[mode], raw)
    assert engines.leaves(content) == engines.leaves(raw)


def test_outer_headers_stay_outside_and_are_encoded(pki, openssl, tmp_path):
    raw = CORPUS["non-ascii-headers"]
    out = build(pki, tmp_path, raw, ["--sign", "--encrypt"]).stdout
    msg = engines.parse(out)
    assert engines.header_text(msg, "subject") == "Réunion demain — ordre du jour ✓"
    assert engines.header_text(msg, "x-note") == "naïve"
    assert "=?utf-8?" in msg["from"].lower() and "<alice@example.com>" in msg["from"]
    assert msg.get_content_type() == "application/pkcs7-mime"
    assert msg.get_param("smime-type") == "enveloped-data"
    assert msg.get_param("name") == "smime.p7m"


def test_opaque_and_detached_structure(pki, openssl, tmp_path):
    raw = CORPUS["plain-ascii"]
    opaque = engines.parse(build(pki, tmp_path, raw, ["--sign"]).stdout)
    assert opaque.get_content_type() == "application/pkcs7-mime"
    assert opaque.get_param("smime-type") == "signed-data"
    assert opaque["content-transfer-encoding"] == "base64"
    detached = engines.parse(build(pki, tmp_path, raw, ["--sign_detached"]).stdout)
    assert detached.get_content_type() == "multipart/signed"
    assert detached.get_param("protocol") == "application/pkcs7-signature"
    assert detached.get_param("micalg") == "sha-256"
    assert detached.get_payload()[1].get_content_type() == "application/pkcs7-signature"


def test_signature_carries_chain_but_not_root(pki, openssl, tmp_path):
    out = build(pki, tmp_path, CORPUS["plain-ascii"], ["--sign"]).stdout
    printed = openssl.cms_print(out)
    assert "Test Intermediate CA" in printed and "CN=alice@example.com" in printed
    assert "subject: O=sparkpostSMIME TEST ONLY, CN=sparkpostSMIME Test Root CA" not in printed
    assert "sha256" in printed


def test_cipher_choice(pki, openssl, tmp_path):
    for flag, oid in (([], "aes-256-cbc"), (["--cipher", "aes128"], "aes-128-cbc")):
        out = build(pki, tmp_path, CORPUS["plain-ascii"], ["--encrypt"] + flag).stdout
        assert oid in openssl.cms_print(out)


def test_passthrough_normalises_only(pki, tmp_path):
    out = build(pki, tmp_path, CORPUS["no-trailing-newline"], []).stdout
    engines.check_transport_safe(out)
    assert out.endswith(b"last line has no newline\r\n")
    out = build(pki, tmp_path, CORPUS["many-recipients"], []).stdout
    assert b"Bcc" not in out and b"Hi all.\r\n" in out


def test_stdin_and_output_file(pki, openssl, tmp_path):
    target = tmp_path / "out.eml"
    proc = run_tool(["-", "--keys", pki.keys, "--sign", "-o", str(target)],
                    stdin=CORPUS["plain-ascii"])
    assert proc.returncode == 0 and proc.stdout == b""
    assert b"Just text." in openssl.verify(target.read_bytes(), pki.cafile)


@pytest.mark.parametrize("mode", ["--sign", "--sign_detached"])
@pytest.mark.parametrize("name", ["attachments", "non-ascii-headers", "forwarded", "nested"])
def test_nss_and_gpgsm_decrypt_and_verify(pki, nss, gpgsm, tmp_path, name, mode):
    raw = CORPUS[name]
    out = build(pki, tmp_path, raw, [mode, "--encrypt"]).stdout
    der = engines.der_of(out)
    for engine in (nss, gpgsm):
        content = engines.verify_signed(engine, engine.decrypt(der))
        assert engines.leaves(content) == engines.leaves(raw)


def test_nss_detects_tampering(pki, nss, tmp_path):
    """The engines used above really check: a changed byte is a bad signature."""
    out = build(pki, tmp_path, CORPUS["plain-ascii"], ["--sign_detached"]).stdout
    content, sig = engines.split_signed(out)
    status, _ = nss.verify(sig, content.replace(b"Just text", b"Just test"))
    assert "GoodSignature" not in status


def test_demo_command_from_readme(openssl):
    """The README's demo: the fixture, the committed demo keys, sign + encrypt."""
    keys = os.path.join(os.path.dirname(__file__), "keys")
    proc = run_tool(["tests/fancy-HTML-to-smt.eml", "--sign", "--encrypt", "--keys", "tests/keys"])
    assert proc.returncode == 0, proc.stderr
    for who in ("steve.tuck@sparkpost.com", "steve@thetucks.com"):
        signed = openssl.decrypt(proc.stdout, os.path.join(keys, who + ".crt"),
                                 os.path.join(keys, who + ".pem"))
        content = openssl.verify(signed, os.path.join(keys, "demo-ca.crt"))
        with open(os.path.join(os.path.dirname(__file__), "fancy-HTML-to-smt.eml"), "rb") as fh:
            assert engines.leaves(content) == engines.leaves(fh.read())


@pytest.mark.parametrize("fixture", ["fancy-HTML-to-smt.eml", "avocado-577k.eml"])
def test_fixtures_sizes_and_roundtrip(openssl, fixture):
    path = os.path.join(os.path.dirname(__file__), fixture)
    size = os.path.getsize(path)
    assert (15000 < size < 25000) if "fancy" in fixture else (540000 < size < 620000)
    proc = run_tool([path, "--sign_detached", "--keys", "tests/keys"])
    assert proc.returncode == 0
    content = openssl.verify(proc.stdout, os.path.join(os.path.dirname(__file__), "keys",
                                                       "demo-ca.crt"))
    with open(path, "rb") as fh:
        assert engines.leaves(content) == engines.leaves(fh.read())
