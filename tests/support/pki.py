"""Throwaway test PKI: a CA, intermediates and S/MIME identities, made with cryptography.

TEST-ONLY.  Nothing made here protects anything: every key is generated for tests
and demos, and the demo keys committed under tests/keys/ are public.
"""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: ML-KEM private key classes by new_key() kind.
ML_KEM_KEYS = {"mlkem768": mlkem.MLKEM768PrivateKey, "mlkem1024": mlkem.MLKEM1024PrivateKey}
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def new_key(kind="rsa"):
    """Return a new private key: 'rsa' (2048 bits), 'ec' (P-256), 'mlkem768' or 'mlkem1024'."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind in ML_KEM_KEYS:
        return ML_KEM_KEYS[kind].generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def name(common, email=None):
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sparkpostSMIME TEST ONLY"),
             x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if email:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    return x509.Name(attrs)


class CA:
    """A certificate authority that can issue intermediates and end-entity certificates."""

    def __init__(self, common="sparkpostSMIME Test Root CA (TEST ONLY)", parent=None, days=3650,
                 constraints=None):
        """*constraints*: an x509.NameConstraints extension for this CA (RFC 5280 4.2.1.10)."""
        self.key = new_key()
        self.name = name(common)
        issuer = parent or self
        builder = (x509.CertificateBuilder().subject_name(self.name)
                   .issuer_name(issuer.name if parent else self.name)
                   .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(NOW - DAY).not_valid_after(NOW + days * DAY)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                False, False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                                  critical=False))
        if constraints is not None:
            builder = builder.add_extension(constraints, critical=True)
        if parent:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
                critical=False)
        self.cert = builder.sign((parent or self).key, hashes.SHA256())
        self.chain = ([self.cert] + parent.chain) if parent else []

    def intermediate(self, common="sparkpostSMIME Test Intermediate CA (TEST ONLY)", days=3650,
                     constraints=None):
        return CA(common, parent=self, days=days, constraints=constraints)

    def issue(self, email, key=None, *, san=True, subject_email=False, key_usage="default",
              eku="default", not_before=None, not_after=None, common=None):
        """Return (key, certificate) for *email*; keyword arguments make broken ones.

        *san*: True (an rfc822Name of *email*), False (no SAN) or a list of GeneralNames.
        """
        key = key or new_key()
        builder = (x509.CertificateBuilder()
                   .subject_name(name(common or email, email if subject_email else None))
                   .issuer_name(self.name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or NOW - DAY)
                   .not_valid_after(not_after or NOW + 3650 * DAY)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        if san:
            names = san if isinstance(san, list) else [x509.RFC822Name(email)]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if key_usage == "default" and isinstance(key, tuple(ML_KEM_KEYS.values())):
            # RFC 9935 5: keyEncipherment only
            key_usage = x509.KeyUsage(False, False, True, False, False, False, False, False,
                                      False)
        elif key_usage == "default":
            is_rsa = isinstance(key, rsa.RSAPrivateKey)
            key_usage = x509.KeyUsage(True, True, is_rsa, False, not is_rsa, False, False,
                                      False, False)
        if key_usage is not None:
            builder = builder.add_extension(key_usage, critical=True)
        if eku == "default":
            eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION])
        if eku is not None:
            builder = builder.add_extension(eku, critical=False)
        return key, builder.sign(self.key, hashes.SHA256())


def pem_cert(*certs):
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def pem_key(key, password=None):
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def write(path, data, mode=0o600):
    with open(path, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)
    return path
