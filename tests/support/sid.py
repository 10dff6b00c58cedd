"""OpenSSL 3.6 of Debian sid in a chroot: the independent engine for ML-KEM (RFC 9629, 9936).

Debian 12's OpenSSL 3.0 knows no ML-KEM; OpenSSL 3.5 added ML-KEM keys and 3.6 the CMS
KEMRecipientInfo, so the tests check post-quantum messages with sid's OpenSSL instead.
:func:`chroot` builds (once, then reuses) a minimal sid tree with ``debootstrap``
(tests/support/debian.py, cached in /var/cache/sparkpostSMIME-tests/sid or $SMIME_TEST_SID);
:class:`SidOpenSSL` runs ``openssl`` inside it on files of its own work directory.
TEST-ONLY: every key handled here is a test key.
"""

import re

from . import debian

#: OpenSSL itself; its version is recorded in the tree's marker.
SUITE = debian.Suite("sid", ("openssl",), "SMIME_TEST_SID", ("openssl",), ("openssl", "version"))


def chroot():
    """Return this process's :class:`debian.Chroot` of the cached sid tree (see
    :func:`debian.chroot`)."""
    return debian.chroot(SUITE)


def version(tree):
    """Return (major, minor, patch) of the tree's OpenSSL, from its marker."""
    line = tree.marker()["versions"]["openssl version"]
    return tuple(int(n) for n in re.match(r"OpenSSL (\d+)\.(\d+)\.(\d+)", line).groups())


class SidOpenSSL(debian.WorkFiles):
    """``openssl`` of the sid tree *tree*: makes ML-KEM keys, encrypts, decrypts, verifies."""

    def __init__(self, tree):
        self._open(tree)

    def openssl(self, args, data=None, ok=(0,)):
        """Run ``openssl *args*`` in the chroot; return the process (asserts the exit code)."""
        return self.chroot.run(["openssl"] + list(args), data, ok=ok)

    def genkey(self, algorithm):
        """Return a new private key of *algorithm* (e.g. ML-KEM-768) as OpenSSL writes it
        by default (PEM PKCS#8; for ML-KEM the 'both' form: seed and expanded key)."""
        out = self._new("key.pem")
        self.openssl(["genpkey", "-algorithm", algorithm, "-out", out])
        return self._read(out)

    def public_key(self, key_pem):
        """Return the PEM SubjectPublicKeyInfo of private key *key_pem*."""
        return self.openssl(["pkey", "-in", self._file("key.pem", key_pem), "-pubout"]).stdout

    def certify(self, public_pem, ca_cert_pem, ca_key_pem, email):
        """Return a PEM certificate for *email* (subject alternative name) of public key
        *public_pem* -- of any algorithm OpenSSL knows, ML-KEM-512 too -- issued by the CA
        of *ca_cert_pem* / *ca_key_pem*; key usage keyEncipherment, e-mail protection."""
        ext = self._file("ext.cnf", ("subjectAltName=email:%s\nkeyUsage=critical,keyEncipherment"
                                     "\nextendedKeyUsage=emailProtection\n" % email).encode())
        out = self._new("cert.pem")
        self.openssl(["x509", "-new", "-subj", "/CN=%s" % email, "-days", "30",
                      "-force_pubkey", self._file("public.pem", public_pem),
                      "-CA", self._file("ca.crt", ca_cert_pem),
                      "-CAkey", self._file("ca.key", ca_key_pem), "-extfile", ext, "-out", out])
        return self._read(out)

    def encrypt(self, content, cert_pems, cipher="-aes-256-cbc"):
        """Return the DER EnvelopedData of *content* for every certificate of *cert_pems*."""
        out = self._new("enveloped.der")
        args = ["cms", "-encrypt", "-binary", "-outform", "DER", cipher,
                "-in", self._file("content", content), "-out", out]
        for pem in cert_pems:
            args += ["-recip", self._file("recipient.crt", pem)]
        self.openssl(args)
        return self._read(out)

    def decrypt(self, der, cert_pem, key_pem):
        """Return the exact content of EnvelopedData *der* for the recipient of *cert_pem*
        (its RecipientInfo, found by the certificate) with private key *key_pem*."""
        out = self._new("decrypted")
        self.openssl(["cms", "-decrypt", "-binary", "-inform", "DER",
                      "-in", self._file("enveloped.der", der),
                      "-recip", self._file("recipient.crt", cert_pem),
                      "-inkey", self._file("recipient.key", key_pem), "-out", out])
        return self._read(out)

    def verify(self, entity, ca_pem, detached):
        """Verify the S/MIME signed *entity* against root *ca_pem*; return OpenSSL's output
        (the signed content; for multipart/signed in text mode, as engines.OpenSSL)."""
        out = self._new("verified")
        args = ["cms", "-verify", "-CAfile", self._file("ca.crt", ca_pem), "-purpose",
                "smimesign", "-in", self._file("signed.eml", entity), "-out", out]
        self.openssl(args + ([] if detached else ["-binary"]))
        return self._read(out)
