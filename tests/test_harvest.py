"""--harvest: recipients' certificates from mail signed by an independent producer (OpenSSL)."""

import os
import re

import pytest
from cryptography import x509

from support import engines
from support.harness import run_tool
from support.pki import CA, DAY, NOW, pem_cert, pem_key, write

FRANK = "frank@example.net"
BODY = "Content-Type: text/plain; charset=us-ascii\n\nHello from Frank, signed by OpenSSL.\n"


@pytest.fixture(scope="module")
def frank(pki, tmp_path_factory):
    """Frank: a correspondent whose certificate we do not have yet (issued by the test CA)."""
    base = tmp_path_factory.mktemp("frank")
    key, cert = pki.inter.issue(FRANK)
    return {"key": write(str(base / "frank.key"), pem_key(key)),
            "cert": write(str(base / "frank.crt"), pem_cert(cert)),
            "inter": write(str(base / "inter.crt"), pem_cert(pki.inter.cert)),
            "obj": cert, "base": base}


def openssl_signed(tmp_path, signer_cert, signer_key, inter, detached=True, sender=FRANK,
                   to="bob@example.org"):
    """Return a message signed by `openssl smime -sign` (an independent producer)."""
    body = tmp_path / "body.txt"
    body.write_text(BODY)
    cmd = ["openssl", "smime", "-sign", "-in", str(body), "-signer", signer_cert,
           "-inkey", signer_key, "-from", sender, "-to", to, "-subject", "signed hello"]
    if inter:
        cmd += ["-certfile", inter]
    if not detached:
        cmd.append("-nodetach")
    return engines.run(cmd).stdout


def harvest(pki, tmp_path, data, *extra, name="in.eml"):
    path = tmp_path / name
    path.write_bytes(data)
    keys = tmp_path / "harvested"
    return run_tool(["--harvest", str(path), "--keys", str(keys), "--keys", pki.keys,
                     "--ca", pki.cafile] + list(extra)), keys


@pytest.mark.parametrize("detached", [True, False], ids=["detached", "nodetach"])
def test_harvest_openssl_signed_then_encrypt_to_it(pki, frank, tmp_path, openssl, detached):
    signed = openssl_signed(tmp_path, frank["cert"], frank["key"], frank["inter"], detached)
    proc, keys = harvest(pki, tmp_path, signed)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert out.startswith("saved %s: issuer " % FRANK) and "Test Intermediate CA" in out
    assert "valid until %s" % frank["obj"].not_valid_after_utc.strftime("%Y-%m-%d") in out
    saved = x509.load_pem_x509_certificate((keys / (FRANK + ".crt")).read_bytes())
    assert saved == frank["obj"]  # Frank's own certificate, not the intermediate's
    # the round trip: encrypt to the harvested certificate, Frank decrypts with OpenSSL
    msg = tmp_path / "reply.eml"
    msg.write_bytes(b"From: alice@example.com\r\nTo: frank@example.net\r\nSubject: re\r\n\r\n"
                    b"Thanks Frank.\r\n")
    proc = run_tool([str(msg), "--encrypt", "--keys", str(keys), "--keys", pki.keys])
    assert proc.returncode == 0, proc.stderr
    assert b"Thanks Frank." in openssl.decrypt(proc.stdout, frank["cert"], frank["key"])


def test_harvest_signed_then_encrypted_to_our_identity(pki, frank, tmp_path):
    signed = openssl_signed(tmp_path, frank["cert"], frank["key"], frank["inter"], False)
    encrypted = engines.run(["openssl", "smime", "-encrypt", "-aes256", "-from", FRANK,
                             "-to", "bob@example.org", "-subject", "secret",
                             pki.cert_path("bob@example.org")], signed).stdout
    proc, keys = harvest(pki, tmp_path, encrypted)
    assert proc.returncode == 0, proc.stderr
    assert (keys / (FRANK + ".crt")).exists()


def test_nested_in_a_forward(pki, frank, tmp_path):
    signed = openssl_signed(tmp_path, frank["cert"], frank["key"], frank["inter"], True)
    signed = re.sub(rb"(?<!\r)\n", b"\r\n", signed)  # OpenSSL mixes LF and CRLF lines
    outer = (b"From: Frank <frank@example.net>\r\nTo: bob@example.org\r\nSubject: fw\r\n"
             b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
             b"--zz\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--zz\r\n" +
             signed.split(b"MIME-Version: 1.0\r\n", 1)[1] + b"\r\n--zz--\r\n")
    proc, _ = harvest(pki, tmp_path, outer)
    assert proc.returncode == 0, proc.stderr


def refused(proc, words):
    assert proc.returncode == 65, proc.stderr
    assert proc.stdout.decode().startswith("refused ")
    assert words in proc.stderr.decode(), proc.stderr


def test_refuses_expired_certificate(pki, frank, tmp_path):
    key, cert = pki.inter.issue(FRANK, not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    signed = openssl_signed(tmp_path, write(str(tmp_path / "c"), pem_cert(cert)),
                            write(str(tmp_path / "k"), pem_key(key)), frank["inter"])
    proc, keys = harvest(pki, tmp_path, signed)
    refused(proc, "has expired")
    assert not (keys / (FRANK + ".crt")).exists()


def test_refuses_certificate_for_another_address(pki, frank, tmp_path):
    signed = openssl_signed(tmp_path, frank["cert"], frank["key"], frank["inter"],
                            sender="mallory@example.com")
    proc, _ = harvest(pki, tmp_path, signed)
    refused(proc, "no certificate for mallory@example.com (signed by frank@example.net)")


def test_refuses_untrusted_root(pki, tmp_path):
    rogue = CA("Rogue Root")
    key, cert = rogue.issue(FRANK)
    signed = openssl_signed(tmp_path, write(str(tmp_path / "c"), pem_cert(cert)),
                            write(str(tmp_path / "k"), pem_key(key)), None)
    proc, _ = harvest(pki, tmp_path, signed)
    refused(proc, "does not chain to a trusted root")


def test_refuses_unsigned_message(pki, tmp_path):
    proc, _ = harvest(pki, tmp_path, b"From: frank@example.net\r\nTo: bob@example.org\r\n\r\nhi\r\n")
    refused(proc, "no S/MIME signature found")


def test_several_inputs_directory_and_exit_code(pki, frank, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.eml").write_bytes(openssl_signed(tmp_path, frank["cert"], frank["key"],
                                                 frank["inter"]))
    (inbox / "b.eml").write_bytes(b"From: x@example.com\r\nTo: y@example.com\r\n\r\nplain\r\n")
    (inbox / "notes.txt").write_text("ignored")
    proc = run_tool(["--harvest", str(inbox), "--keys", str(tmp_path / "k"), "--ca", pki.cafile])
    assert proc.returncode == 65
    out = proc.stdout.decode().splitlines()
    assert len(out) == 2 and out[0].startswith("saved ") and out[1].startswith("refused ")


def test_existing_certificate_kept_or_replaced(pki, frank, tmp_path):
    keys = tmp_path / "harvested"
    keys.mkdir()
    target = keys / (FRANK + ".crt")
    _, later = pki.inter.issue(FRANK, not_after=NOW + 5000 * DAY)
    target.write_bytes(pem_cert(later))
    signed = openssl_signed(tmp_path, frank["cert"], frank["key"], frank["inter"])
    proc, _ = harvest(pki, tmp_path, signed)
    assert proc.returncode == 0
    assert "kept the existing certificate" in proc.stdout.decode()
    assert target.read_bytes() == pem_cert(later)
    _, sooner = pki.inter.issue(FRANK, not_after=NOW + 10 * DAY)
    target.write_bytes(pem_cert(sooner))
    proc, _ = harvest(pki, tmp_path, signed)
    assert proc.returncode == 0 and "older certificate kept beside it" in proc.stdout.decode()
    assert target.read_bytes().startswith(pem_cert(frank["obj"]))
    assert pem_cert(sooner) in target.read_bytes()  # the old one stays until it expires
    proc, _ = harvest(pki, tmp_path, signed)
    assert "unchanged" in proc.stdout.decode()


def test_harvest_conflicts_with_other_modes(tmp_path):
    proc = run_tool(["--harvest", "x.eml", "--sign"])
    assert proc.returncode == 64


def test_ca_from_environment(pki, frank, tmp_path):
    signed = openssl_signed(tmp_path, frank["cert"], frank["key"], frank["inter"])
    path = tmp_path / "in.eml"
    path.write_bytes(signed)
    proc = run_tool(["--harvest", str(path), "--keys", str(tmp_path / "k")],
                    env={"SMIME_CA_FILE": pki.cafile})
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(tmp_path / "k" / (FRANK + ".crt"))
