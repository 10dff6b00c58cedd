"""Debian 13 (trixie) S/MIME engines in a chroot: NSS cmsutil 3.110 and GnuPG gpgsm 2.4.

Debian 12's NSS 3.87 and gpgsm 2.2.40 cannot decrypt CMS EnvelopedData for EC recipients
(KeyAgreeRecipientInfo, ECDH ephemeral-static, AES key wrap), so the tests check such
messages with trixie's tools instead.  :func:`chroot` builds (once, then reuses) a minimal
trixie tree (tests/support/debian.py, cached in /var/cache/sparkpostSMIME-tests/trixie or
$SMIME_TEST_TRIXIE); :class:`TrixieNSS` and :class:`TrixieGpgSM` mirror ``engines.NSS``
and ``engines.GpgSM`` (and are subclasses of them, so ``engines.verify_signed`` treats
them alike) but run the trixie tools inside it.  TEST-ONLY: every key is a test key.
"""

import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from . import debian
from . import engines
from .debian import _mounts_under  # noqa: F401  (the tests check nothing is left mounted)

#: NSS's cmsutil, GnuPG's gpgsm (cmsutil has no version option: libnss3's version is NSS's).
SUITE = debian.Suite("trixie", ("libnss3-tools", "gpgsm", "gpg-agent"), "SMIME_TEST_TRIXIE",
                     ("libnss3", "libnss3-tools", "gpgsm", "gpg-agent", "libgcrypt20",
                      "libksba8"), ("gpgsm", "--version"))


def chroot():
    """Return this process's :class:`debian.Chroot` of the cached trixie tree (see
    :func:`debian.chroot`)."""
    return debian.chroot(SUITE)


def modern_p12(pki, address, password=engines.P12_PASSWORD):
    """Return a PKCS#12 (bytes) of *address*'s key, certificate and intermediate CA.

    Modern protection: PBES2 with PBKDF2-HMAC-SHA256 and AES-256-CBC, SHA-256 MAC.  A low
    iteration count keeps imports fast; these are test keys.
    """
    key, cert = pki.ids[address]
    enc = (serialization.PrivateFormat.PKCS12.encryption_builder().kdf_rounds(2048)
           .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
           .hmac_hash(hashes.SHA256()).build(password.encode()))
    return pkcs12.serialize_key_and_certificates(address.encode(), key, cert,
                                                 [pki.inter.cert], enc)


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _fingerprint(cert):
    return cert.fingerprint(hashes.SHA256())


class _TrixieEngine(debian.WorkFiles):
    """What both engines share: a work directory in the chroot, identity bookkeeping."""

    def _setup(self, tree, pki):
        self._open(tree)
        self.pki = pki
        self._imported = set()  # SHA-256 fingerprints of the identity certificates imported

    def _pending(self):
        """Return the addresses of the PKI whose current certificate is not imported yet."""
        return [address for address, (_, cert) in self.pki.ids.items()
                if _fingerprint(cert) not in self._imported]

    def sync(self):
        """Import every identity added to (or re-issued in) the PKI since the last call.

        decrypt() and verify() call this first, so identities that tests add to the
        session PKI later are there too.  Returns the addresses imported.
        """
        pending = self._pending()
        if pending:
            self._import(pending)
            for address in pending:
                self._imported.add(_fingerprint(self.pki.ids[address][1]))
        return pending

    def import_identity(self, pki, address, base=None):
        """Import *address* of *pki* (which must be this engine's PKI) if not yet imported.

        Replaces the host engines' method of the same name; *base* is unused.
        """
        assert pki is self.pki and address in pki.ids, address
        self.sync()


class TrixieNSS(_TrixieEngine, engines.NSS):
    """NSS 3.110 (Debian 13) cmsutil: an NSS database with every identity of *pki*.

    ``TrixieNSS(tree, pki)``: *tree* is a :class:`Chroot` (see :func:`chroot`).  The test
    root is trusted for everything (C,C,C), the intermediate is known; each identity is
    imported from a modern PKCS#12 with nickname = its address.
    """

    def __init__(self, tree, pki):
        self._setup(tree, pki)
        self.db = "sql:" + self.chroot.inside(os.path.join(self.base, "nssdb"))
        os.mkdir(os.path.join(self.base, "nssdb"))
        self.cmd(["certutil", "-N", "--empty-password"])
        self.cmd(["certutil", "-A", "-n", "test-root", "-t", "C,C,C",
                  "-i", self._file("root.crt", _pem(pki.root.cert))])
        self.cmd(["certutil", "-A", "-n", "test-inter", "-t", ",,",
                  "-i", self._file("inter.crt", _pem(pki.inter.cert))])
        self.sync()

    def cmd(self, args, data=None, ok=(0,)):
        """Run NSS tool *args* (e.g. ["certutil", "-L"]) on the database; return the process."""
        return self.chroot.run(args[:1] + ["-d", self.db] + args[1:], data, ok=ok)

    def _import(self, addresses):
        for address in addresses:
            p12 = self._file(address + ".p12", modern_p12(self.pki, address))
            self.cmd(["pk12util", "-i", p12, "-W", engines.P12_PASSWORD])
            os.unlink(self.chroot.host(p12))

    def decrypt(self, der):
        """Return the exact content of EnvelopedData *der* (bytes), decrypted by cmsutil.

        Asserts cmsutil exits 0 (it fails when no recipient key is in the database).
        Output goes through -o FILE: cmsutil's standard output is not reliable for it.
        """
        self.sync()
        out = self._new("decrypted")
        self.cmd(["cmsutil", "-D", "-i", self._file("enveloped.der", der), "-o", out])
        return self._read(out)

    def verify(self, der, content=None):
        """Return (status, output) of cmsutil for SignedData *der* (detached: *content*).

        *status* is cmsutil's header text for certUsageEmailSigner (-u 4): each signer's
        line reads ``signer0.status=GoodSignature`` only when the signature, the digest and
        the chain to the trusted test root all check out (else BadSignature,
        DigestMismatch, SigningCertNotTrusted...).  *output* is what cmsutil writes as
        the content (b"" when it refuses to).  Asserts nothing: use :meth:`verified`, or
        ``engines.verify_signed`` for a MIME entity, to require a good signature.
        """
        self.sync()
        args = ["cmsutil", "-D", "-u", "4", "-i", self._file("signed.der", der)]
        if content is not None:
            args += ["-c", self._file("content", content)]
        status = self.cmd(args + ["-h", "1", "-n"]).stdout.decode()
        out = self._new("verified")
        self.cmd(args + ["-o", out], ok=(0, 1))  # 1: a signature that does not verify
        return status, self._read(out, missing=b"")

    def verified(self, der, content=None):
        """Verify *der*; assert every signer is GoodSignature; return the signed content."""
        status, out = self.verify(der, content)
        signers = [w for w in status.split() if w.startswith("signer") and ".status=" in w]
        assert signers and all(w.endswith("=GoodSignature;") for w in signers), status
        return content if content is not None else out


class TrixieGpgSM(_TrixieEngine, engines.GpgSM):
    """GnuPG gpgsm 2.4 (Debian 13): a GNUPGHOME with every identity of *pki*.

    ``TrixieGpgSM(tree, pki)``: *tree* is a :class:`Chroot`.  The root and intermediate
    are imported, the root trusted in trustlist.txt (``FPR S relax``); CRL, policy and
    dirmngr checks are off (dirmngr is not installed: nothing goes online).  Identities
    are imported from modern PKCS#12 files with --pinentry-mode loopback and the
    passphrase on standard input; gpg-agent keeps them protected with that passphrase,
    which decrypt() gives back the same way.  gpg-agent lives only as long as each gpgsm
    command (its PID namespace ends with it), so there is nothing to stop.
    """

    def __init__(self, tree, pki):
        self._setup(tree, pki)
        self.home = os.path.join(self.base, "gnupg")
        os.mkdir(self.home, 0o700)
        self.env = {"GNUPGHOME": self.chroot.inside(self.home)}
        self._conf("gpgsm.conf", "disable-crl-checks\ndisable-policy-checks\ndisable-dirmngr\n")
        # Loopback is 2.4's default; the low s2k count keeps imports and decryption fast.
        self._conf("gpg-agent.conf", "allow-loopback-pinentry\ns2k-count 65536\n")
        self.gpgsm(["--import", self._file("root.crt", _pem(pki.root.cert)),
                    self._file("inter.crt", _pem(pki.inter.cert))])
        fpr = pki.root.cert.fingerprint(hashes.SHA1()).hex().upper()
        self._conf("trustlist.txt", "%s S relax\n" % fpr)
        self.sync()

    def gpgsm(self, args, data=None, ok=(0,)):
        """Run ``gpgsm --batch --status-fd 1 *args*`` in the chroot; return the process."""
        return self.chroot.run(["gpgsm", "--batch", "--status-fd", "1"] + list(args), data,
                               ok=ok, env=self.env)

    def _with_passphrase(self, args, ok=(0,)):
        """Run gpgsm *args* with loopback pinentry, the PKCS#12 password on stdin."""
        return self.gpgsm(["--pinentry-mode", "loopback", "--passphrase-fd", "0"] + args,
                          engines.P12_PASSWORD.encode(), ok=ok)

    def _import(self, addresses):
        files = [self._file(a + ".p12", modern_p12(self.pki, a)) for a in addresses]
        status = self._with_passphrase(["--import"] + files).stdout.decode()
        # IMPORT_RES count no_user_id imported imported_rsa unchanged n_uids n_subk n_sigs
        #            n_revoc sec_read sec_imported sec_dups ...
        res = [line.split()[2:] for line in status.splitlines()
               if line.startswith("[GNUPG:] IMPORT_RES ")]
        assert res and int(res[0][9]) == len(files), status
        assert int(res[0][10]) + int(res[0][11]) == len(files), status
        for path in files:
            os.unlink(self.chroot.host(path))

    def _conf(self, name, text):
        with open(os.path.join(self.home, name), "w") as fh:
            fh.write(text)

    def decrypt(self, der):
        """Return the exact content of EnvelopedData *der* (bytes), decrypted by gpgsm.

        Asserts DECRYPTION_OKAY in gpgsm's status output and an exit code of 0 or 2
        (gpgsm exits 2 when other recipients' keys are unknown, even on success).
        """
        self.sync()
        out = self._new("decrypted")
        proc = self._with_passphrase(["--output", out, "--decrypt",
                                      self._file("enveloped.der", der)], ok=(0, 2))
        assert b"[GNUPG:] DECRYPTION_OKAY" in proc.stdout, \
            proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        return self._read(out)

    def verify(self, der, content=None):
        """Verify SignedData *der* (detached: over *content*); return the signed content.

        Asserts gpgsm exits 0 and reports GOODSIG, VALIDSIG and TRUST_FULLY (the chain to
        the trusted test root) and no BADSIG or ERRSIG; AssertionError otherwise.  Exit 0
        is required: gpgsm exits 2 after a GOODSIG when it saw a problem, e.g. an ECDSA
        P-384 signature over a SHA-256 digest ("a 256 bit hash is not valid for a 384
        bit ECC key").
        """
        self.sync()
        args = ["--verify", self._file("signed.der", der)]
        out = None
        if content is not None:
            args.append(self._file("content", content))
        else:
            out = self._new("verified")
            args = ["--output", out] + args
        proc = self.gpgsm(args, ok=(0, 1, 2))
        report = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, "gpgsm --verify -> %d\n%s" % (proc.returncode, report)
        for word in (b"GOODSIG", b"VALIDSIG", b"TRUST_FULLY"):
            assert b"[GNUPG:] " + word + b" " in proc.stdout, report
        for word in (b"BADSIG", b"ERRSIG"):
            assert b"[GNUPG:] " + word not in proc.stdout, report
        return content if content is not None else self._read(out)

    def verified(self, der, content=None):
        """The same as :meth:`verify` (which asserts a good signature): the content."""
        return self.verify(der, content)
