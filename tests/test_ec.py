"""Encryption to EC recipients (ECDH, RFC 5753) beside RSA ones, and ECDSA signers.

Checked by OpenSSL 3.0 (Debian 12) for every recipient of every mix, and by Debian 13's
NSS cmsutil 3.110 and gpgsm 2.4.7 (tests/support/trixie.py): Debian 12's NSS and gpgsm 2.2 cannot
decrypt ECDH.  The identities live in this module's own PKI (the session PKI stays RSA-only:
gpgsm 2.2 cannot import EC PKCS#12).
"""

import email
import email.policy
import os
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, x25519
from hypothesis import HealthCheck, given, settings, strategies as st

from support import harness
from support import engines
from support.harness import PKI, run_tool
from support.pki import pem_cert, pem_key, write

RSA = "rsa@ec.example"
P256, P384, P521 = "p256@ec.example", "p384@ec.example", "p521@ec.example"
CURVES = {P256: ec.SECP256R1(), P384: ec.SECP384R1(), P521: ec.SECP521R1()}
EVERYONE = (RSA, P256, P384, P521)
MODES = {"encrypt": ["--encrypt"], "sign+encrypt": ["--sign", "--encrypt"],
         "detached+encrypt": ["--sign_detached", "--encrypt"]}


@pytest.fixture(scope="module")
def ecpki(tmp_path_factory):
    """RSA and P-256/P-384/P-521 identities, plus certificates we must refuse to encrypt to."""
    pki = PKI(str(tmp_path_factory.mktemp("ecpki")))
    pki.add(RSA)
    for address, curve in CURVES.items():
        pki.add(address, key=ec.generate_private_key(curve))
    ku = x509.KeyUsage(True, True, False, False, False, False, False, False, False)
    unfit = {"no-agreement@ec.example": (ec.generate_private_key(ec.SECP256R1()), ku),
             "k1@ec.example": (ec.generate_private_key(ec.SECP256K1()), "default"),
             "ed@ec.example": (ed25519.Ed25519PrivateKey.generate(), "default"),
             "x@ec.example": (x25519.X25519PrivateKey.generate(), "default"),
             "dsa@ec.example": (dsa.generate_private_key(2048), "default")}
    for address, (key, usage) in unfit.items():  # certificates only: engines never see them
        _, cert = pki.inter.issue(address, key, key_usage=usage)
        write(os.path.join(pki.keys, address + ".crt"), pem_cert(cert, pki.inter.cert))
    return pki


def message(sender, to, cc=(), bcc=(), body="Hello from an EC test.\n"):
    lines = ["From: %s" % sender, "To: %s" % ", ".join(to)]
    if cc:
        lines.append("Cc: %s" % ", ".join(cc))
    if bcc:
        lines.append("Bcc: %s" % ", ".join(bcc))
    lines += ["Subject: ec", "Content-Type: text/plain; charset=utf-8", "", body]
    return "\n".join(lines).encode("utf-8")


def build(pki, tmp_path, raw, flags):
    return harness.build(pki, tmp_path, raw, flags, name="m.eml", safe=True).stdout


def text_of(entity):
    return email.message_from_bytes(entity, policy=email.policy.compat32).get_payload(
        decode=True)


@pytest.mark.parametrize("cipher", ["aes256", "aes128"])
@pytest.mark.parametrize("sender", [P256, RSA, P384])
@pytest.mark.parametrize("mode", MODES)
def test_openssl_decrypts_every_recipient_of_a_mix(ecpki, openssl, tmp_path, mode, sender,
                                                   cipher):
    others = [a for a in EVERYONE if a != sender]
    raw = message(sender, others[:1], others[1:2], others[2:])
    out = build(ecpki, tmp_path, raw, MODES[mode] + ["--cipher", cipher])
    info = openssl.cms_print(out)
    assert info.count("d.kari:") == sum(a in CURVES for a in EVERYONE)  # sender's copy too
    assert info.count("d.ktri:") == 1 and "version: 2" in info
    assert "id-aes%s-wrap" % cipher[3:] in info
    for scheme, curve in (("sha256kdf", P256), ("sha384kdf", P384), ("sha512kdf", P521)):
        assert "dhSinglePass-stdDH-%s-scheme" % scheme in info, curve
    for who in EVERYONE:
        plain = openssl.decrypt(out, ecpki.cert_path(who), ecpki.key_path(who))
        if mode != "encrypt":
            plain = openssl.verify(plain, ecpki.cafile)
        assert text_of(plain) == b"Hello from an EC test.\r\n"


def test_rsa_only_stays_version_0(ecpki, openssl, tmp_path):
    """Only KeyTransRecipientInfos: EnvelopedData version 0, as every reader expects."""
    out = build(ecpki, tmp_path, message(RSA, ["bob@example.org"]), ["--encrypt"])
    info = openssl.cms_print(out)
    assert "version: 0" in info and "d.kari:" not in info


@pytest.mark.parametrize("address,reason", [
    ("no-agreement@ec.example", "does not allow key agreement"),
    ("k1@ec.example", "curve secp256k1"),
    ("ed@ec.example", "Ed25519 key"),
    ("x@ec.example", "X25519 key"),
    ("dsa@ec.example", "DSA key"),
])
def test_unusable_recipients_refused(ecpki, tmp_path, address, reason):
    path = tmp_path / "m.eml"
    path.write_bytes(message(P256, [address]))
    proc = run_tool([str(path), "--keys", ecpki.keys, "--encrypt"])
    assert proc.returncode == 78
    err = proc.stderr.decode()
    assert err.count("\n") == 1
    assert os.path.join(ecpki.keys, address + ".crt") in err and address in err
    assert reason in err, err


@pytest.mark.parametrize("sender,digest", [(P256, "sha256"), (P384, "sha384"),
                                           (P521, "sha512"), (RSA, "sha256")])
def test_signature_hash_follows_the_curve(ecpki, openssl, tmp_path, sender, digest):
    """P-384 signs over SHA-384 and P-521 over SHA-512 (gpgsm refuses a shorter hash)."""
    out = build(ecpki, tmp_path, message(sender, [RSA]), ["--sign_detached"])
    assert re.search(rb"micalg=sha-%s;" % digest[3:].encode(), out)
    _, signature = engines.split_signed(out[out.index(b"Content-Type: multipart/signed"):])
    printed = engines.run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER"],
                          signature).stdout.decode()
    assert re.search(r"digestAlgorithm:\s+algorithm: %s " % digest, printed), printed
    assert b"Hello from" in openssl.verify(out, ecpki.cafile)


def test_signing_only_certificate_gets_no_own_copy(ecpki, openssl, tmp_path):
    """A signer certificate that forbids key agreement signs, but the sender's own copy is
    not encrypted to it (RFC 8550 4.4.2): one warning, and every recipient still reads it."""
    sender = "signonly@ec.example"
    ku = x509.KeyUsage(True, True, False, False, False, False, False, False, False)
    key, cert = ecpki.inter.issue(sender, ec.generate_private_key(ec.SECP256R1()),
                                  key_usage=ku)
    keys = tmp_path / "keys"
    keys.mkdir()
    write(str(keys / (sender + ".pem")), pem_key(key) + pem_cert(cert, ecpki.inter.cert))
    path = tmp_path / "m.eml"
    path.write_bytes(message(sender, [P384]))
    proc = run_tool([str(path), "--keys", str(keys), "--keys", ecpki.keys, "--sign",
                     "--encrypt"])
    assert proc.returncode == 0, proc.stderr
    assert "not encrypted to its sender" in proc.stderr.decode()
    info = openssl.cms_print(proc.stdout)
    assert info.count("d.kari:") == 1  # P-384 only
    plain = openssl.decrypt(proc.stdout, ecpki.cert_path(P384), ecpki.key_path(P384))
    assert text_of(openssl.verify(plain, ecpki.cafile)) == b"Hello from an EC test.\r\n"


# -- Debian 13's NSS and gpgsm -------------------------------------------------

@pytest.fixture(scope="module")
def engines13(ecpki, trixie_tree):
    """Debian 13's NSS and gpgsm holding this module's identities (trusting its root)."""
    from support import trixie
    nss, gpg = trixie.TrixieNSS(trixie_tree, ecpki), trixie.TrixieGpgSM(trixie_tree, ecpki)
    yield {"nss": nss, "gpgsm": gpg}
    nss.close()
    gpg.close()


@pytest.mark.parametrize("engine", ["nss", "gpgsm"])
@pytest.mark.parametrize("curve", [P256, P384, P521])
@pytest.mark.parametrize("flags", [["--sign", "--encrypt"], ["--sign_detached", "--encrypt"]],
                         ids=["opaque", "detached"])
def test_debian13_engines_decrypt_ecdh_and_verify_ecdsa(ecpki, engines13, openssl, tmp_path,
                                                       engine, curve, flags):
    """Signed by an EC sender and encrypted to itself: one KeyAgreeRecipientInfo only, so
    the engine can decrypt by ECDH alone, then verifies the ECDSA signature."""
    out = build(ecpki, tmp_path, message(curve, [curve]), flags)
    info = openssl.cms_print(out)
    assert info.count("d.kari:") == 1 and "d.ktri:" not in info
    reader = engines13[engine]
    content = engines.verify_signed(reader, reader.decrypt(engines.der_of(out)))
    assert text_of(content) == b"Hello from an EC test.\r\n"


@pytest.mark.parametrize("engine", ["nss", "gpgsm"])
def test_debian13_engines_decrypt_a_mixed_message(ecpki, engines13, tmp_path, engine):
    out = build(ecpki, tmp_path, message(RSA, [P521, P256], [P384]), ["--encrypt"])
    assert text_of(engines13[engine].decrypt(engines.der_of(out))) == \
        b"Hello from an EC test.\r\n"


# -- property: any mix, any size ------------------------------------------------

@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipients=st.lists(st.sampled_from(EVERYONE), min_size=1, max_size=4, unique=True),
       sender=st.sampled_from(EVERYONE), size=st.integers(0, 40000),
       sign=st.sampled_from([[], ["--sign"], ["--sign_detached"]]))
def test_any_mix_decrypts_for_everyone(ecpki, openssl, tmp_path, recipients, sender, size,
                                       sign):
    body = ("".join("line %d of the EC property test\n" % n for n in range(size // 32 + 1))
            [:size])
    out = build(ecpki, tmp_path, message(sender, recipients, body=body),
                sign + ["--encrypt"])
    for who in set(recipients) | {sender}:
        plain = openssl.decrypt(out, ecpki.cert_path(who), ecpki.key_path(who))
        if sign:
            plain = openssl.verify(plain, ecpki.cafile)
        assert text_of(plain).replace(b"\r\n", b"\n") == body.encode()
