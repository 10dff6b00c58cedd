"""Path rules for mail (RFC 5280 6.1, EKU chaining), one set for sending and receiving:
chains shaped as CAs issue them (CA/Browser Forum S/MIME BR), private CAs made with
OpenSSL, and certificates that break a rule.  Signed mail comes from OpenSSL."""

import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from support import engines
from support.harness import need, one_line, run_tool
from support.corpus import CORPUS
from support.pki import CA, DAY, NOW, name, new_key, pem_cert, pem_key, write

ALICE = "alice@example.com"
BODY = "Content-Type: text/plain; charset=us-ascii\n\nHello, signed by OpenSSL.\n"
EKUS = {"emailProtection": [ExtendedKeyUsageOID.EMAIL_PROTECTION],
        "anyEKU": [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE],
        "email+client": [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION],
        "none": None,
        "clientAuth": [ExtendedKeyUsageOID.CLIENT_AUTH],
        "serverAuth": [ExtendedKeyUsageOID.SERVER_AUTH]}
#: An extension this tool does not know (a private arc).
UNKNOWN = ObjectIdentifier("1.3.6.1.4.1.55555.7.1")


def ca_cert(issuer_key, issuer_name, common, *, eku=None, key_usage=True, ca=True):
    """Return (key, certificate) of a CA issued by *issuer_key*: cA=TRUE, keyCertSign,
    *eku* (a list of purposes, None: no extension)."""
    key = new_key()
    builder = (x509.CertificateBuilder().subject_name(name(common)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if key_usage:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True,
                                                      True, False, False), critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return key, builder.sign(issuer_key, hashes.SHA256())


def leaf_cert(issuer_key, issuer_name, email=ALICE, *, ca=False, extra=()):
    """Return (key, certificate) of a person's certificate for *email*; *extra*: more
    (extension, critical) pairs."""
    key = new_key()
    builder = (x509.CertificateBuilder().subject_name(name(email)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(True, True, True, False, False, False, False,
                                            False, False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                              critical=False)
               .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]),
                              critical=False))
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return key, builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    made = CA("Trust Rules Root (TEST ONLY)")
    made.file = write(str(tmp_path_factory.mktemp("root") / "root.crt"), pem_cert(made.cert))
    return made


class Signer:
    """A person's key and certificate with the CAs above it, on disk; signs with OpenSSL,
    verifies and harvests with the tool, and signs with the tool."""

    def __init__(self, base, key, cert, cas, cafile):
        self.base, self.cert, self.cafile = base, cert, cafile
        os.makedirs(base, exist_ok=True)
        self.keys = os.path.join(base, "keys")
        os.makedirs(self.keys, exist_ok=True)
        self.key_file = write(os.path.join(base, "signer.key"), pem_key(key))
        self.cert_file = write(os.path.join(base, "signer.crt"), pem_cert(cert))
        self.chain_file = write(os.path.join(base, "chain.crt"), pem_cert(*cas)) if cas else None
        write(os.path.join(self.keys, ALICE + ".pem"), pem_key(key))
        write(os.path.join(self.keys, ALICE + ".crt"), pem_cert(cert, *cas))

    def signed_by_openssl(self):
        body = os.path.join(self.base, "body.txt")
        with open(body, "w") as fh:
            fh.write(BODY)
        cmd = ["openssl", "smime", "-sign", "-in", body, "-signer", self.cert_file,
               "-inkey", self.key_file, "-from", ALICE, "-to", "bob@example.org",
               "-subject", "hello"]
        if self.chain_file:
            cmd += ["-certfile", self.chain_file]
        path = os.path.join(self.base, "signed.eml")
        with open(path, "wb") as fh:
            fh.write(engines.run(cmd).stdout)
        return path

    def verify(self, *extra, env=None):
        return run_tool(["--verify", self.signed_by_openssl()] + list(extra)
                        + ([] if env else ["--ca", self.cafile]), env=env)

    def harvest(self):
        into = os.path.join(self.base, "harvested")
        return run_tool(["--harvest", self.signed_by_openssl(), "--keys", into,
                         "--ca", self.cafile]), into

    def sign(self):
        path = os.path.join(self.base, "in.eml")
        with open(path, "wb") as fh:
            fh.write(CORPUS["plain-ascii"])
        return run_tool([path, "--keys", self.keys, "--sign"])


def signer_under(root, tmp_path, **ca_kw):
    """A Signer issued by an intermediate of *root* made with *ca_kw*."""
    inter_key, inter = ca_cert(root.key, root.name, "Shaped Intermediate (TEST ONLY)", **ca_kw)
    key, cert = leaf_cert(inter_key, inter.subject)
    return Signer(str(tmp_path), key, cert, [inter], root.file)


@pytest.mark.parametrize("shape", ["emailProtection", "anyEKU", "email+client", "none"])
def test_intermediate_ekus_allowing_mail(root, tmp_path, openssl, shape):
    signer = signer_under(root, tmp_path, eku=EKUS[shape])
    proc = signer.verify()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - signed by " + ALICE.encode())
    proc, into = signer.harvest()
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(os.path.join(into, ALICE + ".crt"))
    proc = signer.sign()
    assert proc.returncode == 0, proc.stderr
    if shape != "anyEKU":  # OpenSSL 3.0 refuses a CA whose EKU is anyExtendedKeyUsage only
        assert b"Just text." in openssl.verify(proc.stdout, root.file)


@pytest.mark.parametrize("shape,words", [("clientAuth", "TLS client"),
                                         ("serverAuth", "TLS server")])
def test_intermediate_ekus_excluding_mail(root, tmp_path, openssl, shape, words):
    signer = signer_under(root, tmp_path, eku=EKUS[shape])
    for proc in (signer.verify(), signer.harvest()[0]):
        one_line(proc, 65, "Shaped Intermediate", words, "extended key usage",
                 "not e-mail protection")
    proc = signer.sign()
    err = one_line(proc, 78, ALICE + ".crt", "Shaped Intermediate", words, "extended key usage")
    assert err.count("\n") == 1 and proc.stdout == b""


def test_intermediate_without_ca_flag_or_cert_sign(root, tmp_path):
    signer = signer_under(root, tmp_path, ca=False)
    one_line(signer.verify(), 65, "Shaped Intermediate", "not a CA certificate")
    one_line(signer.sign(), 78, "Shaped Intermediate", "not a CA certificate")
    signer = signer_under(root, tmp_path / "ku", key_usage=False)
    assert signer.verify().returncode == 0  # a CA without keyUsage passes (RFC 5280 6.1.4 (n))


def test_ca_leaf_is_not_a_mail_signer(root, tmp_path):
    key, cert = leaf_cert(root.key, root.name, ca=True)
    signer = Signer(str(tmp_path), key, cert, [], root.file)
    one_line(signer.verify(), 65, "cA=TRUE")
    one_line(signer.sign(), 78, ALICE, "cA=TRUE")


def test_unknown_extensions(root, tmp_path, openssl):
    """Non-critical unknown, even with an empty value, is ignored; critical is refused."""
    empty = x509.UnrecognizedExtension(UNKNOWN, b"")
    key, cert = leaf_cert(root.key, root.name, extra=[(empty, False)])
    signer = Signer(str(tmp_path / "quiet"), key, cert, [], root.file)
    proc = signer.verify()
    assert proc.returncode == 0, proc.stderr
    proc = signer.sign()
    assert proc.returncode == 0, proc.stderr
    assert b"Just text." in openssl.verify(proc.stdout, root.file)
    key, cert = leaf_cert(root.key, root.name, extra=[(empty, True)])
    signer = Signer(str(tmp_path / "loud"), key, cert, [], root.file)
    one_line(signer.verify(), 65, "critical extension", UNKNOWN.dotted_string)
    one_line(signer.sign(), 78, "critical extension", UNKNOWN.dotted_string)


def openssl_ca(base, common, issuer=None, v1=False):
    """Return (key file, certificate file) of a CA made by the openssl command line:
    `openssl req -x509` (v3, no keyUsage: OpenSSL 3.0's defaults) or, with *v1*,
    `openssl x509 -req` (a version 1 certificate), signed by *issuer* (key, cert files)."""
    key, cert = os.path.join(base, common + ".key"), os.path.join(base, common + ".crt")
    subject = "/O=sparkpostSMIME TEST ONLY/CN=%s" % common
    if not v1 and issuer is None:
        engines.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                     "-out", cert, "-subj", subject, "-days", "30"])
        return key, cert
    csr = os.path.join(base, common + ".csr")
    engines.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                 "-out", csr, "-subj", subject])
    sign = ["-CA", issuer[1], "-CAkey", issuer[0]] if issuer else ["-signkey", key]
    engines.run(["openssl", "x509", "-req", "-in", csr, "-out", cert, "-days", "30"] + sign)
    return key, cert


def loaded(key_file, cert_file):
    from cryptography.hazmat.primitives import serialization
    with open(key_file, "rb") as fh:
        key = serialization.load_pem_private_key(fh.read(), None)
    with open(cert_file, "rb") as fh:
        return key, x509.load_pem_x509_certificate(fh.read())


@pytest.mark.parametrize("kind", ["req-x509", "v1-root"])
def test_private_roots_made_with_openssl(tmp_path, openssl, kind):
    need("openssl")
    files = openssl_ca(str(tmp_path), "Private Root", v1=kind == "v1-root")
    root_key, root = loaded(*files)
    assert root.version == (x509.Version.v1 if kind == "v1-root" else x509.Version.v3)
    key, cert = leaf_cert(root_key, root.subject)
    signer = Signer(str(tmp_path / "s"), key, cert, [], files[1])
    proc = signer.verify()
    assert proc.returncode == 0, proc.stderr
    proc, into = signer.harvest()
    assert proc.returncode == 0, proc.stderr
    proc = signer.sign()
    assert proc.returncode == 0, proc.stderr
    assert b"Just text." in openssl.verify(proc.stdout, files[1])


def test_v1_intermediate_is_refused(tmp_path):
    need("openssl")
    root_files = openssl_ca(str(tmp_path), "Private Root")
    inter_files = openssl_ca(str(tmp_path), "Old Intermediate", issuer=root_files, v1=True)
    inter_key, inter = loaded(*inter_files)
    key, cert = leaf_cert(inter_key, inter.subject)
    signer = Signer(str(tmp_path / "s"), key, cert, [inter], root_files[1])
    one_line(signer.verify(), 65, "Old Intermediate", "version 1", "must be v3")
    one_line(signer.sign(), 78, "Old Intermediate", "version 1", "must be v3")


def test_the_ca_hint_only_without_ca(root, tmp_path):
    stranger = CA("Stranger Root (TEST ONLY)")
    other = write(str(tmp_path / "other.crt"), pem_cert(stranger.cert))
    key, cert = leaf_cert(root.key, root.name)
    signer = Signer(str(tmp_path / "s"), key, cert, [], other)
    err = one_line(signer.verify(), 65, "does not chain to a trusted root of " + other)
    assert "--ca" not in err
    err = one_line(signer.verify(env={"SSL_CERT_FILE": other}), 65,
                   "pass the issuing CA with --ca")
