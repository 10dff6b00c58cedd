"""The Debian 13 engines (NSS cmsutil 3.110, gpgsm 2.4 in a chroot, tests/support/trixie.py) work.

OpenSSL 3.0 (the host's) makes CMS messages encrypted to EC P-256 and P-384 recipients
(KeyAgreeRecipientInfo, ephemeral-static ECDH, AES key wrap) and to RSA ones, and ECDSA
signatures, opaque and detached; both trixie engines must decrypt them to the exact
plaintext and verify the signatures against the trusted test root.  Tampered and untrusted
signatures, and messages for nobody they know, must fail, so the checks can fail.

The EC identities live in a PKI of this module, not in the session PKI: gpgsm 2.2 (the
host engine ``gpgsm``) cannot import EC PKCS#12, so adding them to the session PKI would
break that fixture for tests that run later.  The session fixtures ``nss13`` and
``gpgsm24`` are checked with the session PKI's RSA identities.
"""

import os
import re
import subprocess

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from support import engines
from support import trixie
from support.harness import PEOPLE, PKI, need
from support.pki import CA, pem_cert, pem_key, write

EC256 = "ec-p256@trixie.example"
EC384 = "ec-p384@trixie.example"
RSA = "rsa-2048@trixie.example"
OUTSIDER_EC = "outsider-ec@trixie.example"    # issued by the same CA, keys in no engine
OUTSIDER_RSA = "outsider-rsa@trixie.example"
STRANGER = "stranger@untrusted.example"       # its chain ends at a root no engine trusts
ENGINES = ("nss13", "gpgsm24")
#: Exact bytes, CRLF, NUL and 8-bit included: decryption must return them unchanged.
PLAIN = (b"Content-Type: application/octet-stream\r\n\r\nECDH via trixie \x00\xff\xfe"
         + bytes(range(256)) + b"\r\nend\n")


class Material:
    """This module's PKI on disk (plus out-of-engine certificates) and its openssl helpers."""

    def __init__(self, base):
        self.base = base
        self.pki = PKI(os.path.join(base, "pki"))
        self.pki.add(EC256, key=ec.generate_private_key(ec.SECP256R1()))
        self.pki.add(EC384, key=ec.generate_private_key(ec.SECP384R1()))
        self.pki.add(RSA)
        self.inter = write(os.path.join(base, "inter.crt"), pem_cert(self.pki.inter.cert))
        self.certs = {a: self.pki.cert_path(a) for a in self.pki.ids}
        self.keys = {a: self.pki.key_path(a) for a in self.pki.ids}
        for address, key in ((OUTSIDER_EC, ec.generate_private_key(ec.SECP256R1())),
                             (OUTSIDER_RSA, None)):
            self._save(address, *self.pki.inter.issue(address, key))
        root = CA("Untrusted Root (TEST ONLY)")
        other = root.intermediate("Untrusted Inter (TEST ONLY)")
        self._save(STRANGER, *other.issue(STRANGER, ec.generate_private_key(ec.SECP256R1())))
        # The whole chain travels in the signature: only trust is missing.
        self.stranger_chain = write(os.path.join(base, "stranger-chain.crt"),
                                    pem_cert(other.cert, root.cert))
        self.count = 0

    def _save(self, address, key, cert):
        self.keys[address] = write(os.path.join(self.base, address + ".pem"), pem_key(key))
        self.certs[address] = write(os.path.join(self.base, address + ".crt"), pem_cert(cert))

    def openssl(self, args, data):
        """Run ``openssl cms *args*`` on *data*; return its standard output (bytes)."""
        return engines.run(["openssl", "cms"] + args, data).stdout

    def encrypt(self, recipients, cipher="aes256", content=PLAIN):
        """Return DER EnvelopedData of *content* for *recipients*: [(address, kdf md | None)].

        A kdf md (sha256...) selects dhSinglePass-stdDH-<md>kdf-scheme for an EC recipient
        (OpenSSL's default is sha1kdf); "cofactor:<md>" selects the cofactorDH scheme.
        """
        args = ["-encrypt", "-binary", "-" + cipher, "-outform", "DER"]
        for address, kdf in recipients:
            args += ["-recip", self.certs[address]]
            if kdf and kdf.startswith("cofactor:"):
                args += ["-keyopt", "ecdh_cofactor_mode:1"]
                kdf = kdf.split(":", 1)[1]
            if kdf:
                args += ["-keyopt", "ecdh_kdf_md:" + kdf]
        return self.openssl(args, content)

    def sign(self, signer, md="sha256", detached=False, content=PLAIN, outform="DER"):
        """Return a CMS SignedData by *signer* (digest *md*), the intermediate included."""
        inter = self.stranger_chain if signer == STRANGER else self.inter
        args = ["-sign", "-md", md, "-signer", self.certs[signer], "-inkey", self.keys[signer],
                "-certfile", inter, "-outform", outform]
        args += ["-binary"] if outform == "DER" else ["-crlfeol"]
        return self.openssl(args + ([] if detached else ["-nodetach"]), content)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    need("openssl")
    return Material(str(tmp_path_factory.mktemp("trixie-pki")))


@pytest.fixture(scope="module")
def both(trixie_tree, material):
    """{"nss13": TrixieNSS, "gpgsm24": TrixieGpgSM} holding this module's identities."""
    made = {"nss13": trixie.TrixieNSS(trixie_tree, material.pki),
            "gpgsm24": trixie.TrixieGpgSM(trixie_tree, material.pki)}
    yield made
    for engine in made.values():
        engine.close()


@pytest.fixture(params=ENGINES)
def engine(request, both):
    return both[request.param]


def version_tuple(text):
    """Return (major, minor) of a Debian version such as '2:3.110-1+deb13u5' or '2.4.7-21'."""
    major, minor = re.match(r"(?:\d+:)?(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def test_chroot_has_the_debian_13_tools(trixie_tree):
    versions = trixie_tree.marker()["versions"]
    assert version_tuple(versions["libnss3-tools"]) >= (3, 110), versions
    assert version_tuple(versions["gpgsm"]) >= (2, 4), versions
    assert trixie_tree.versions() == versions  # the tree is what its marker says
    # Nothing of ours is left mounted: each command's proc mount died with its namespace.
    assert trixie._mounts_under(trixie_tree.root) == []


@pytest.mark.parametrize("recipient, cipher, kdf", [
    (EC256, "aes256", None),        # OpenSSL's default: dhSinglePass-stdDH-sha1kdf-scheme
    (EC256, "aes128", "sha256"),
    (EC256, "aes256", "sha256"),
    (EC384, "aes256", "sha384"),
    (EC384, "aes128", "sha256"),
    (EC384, "aes192", "sha512"),
    (RSA, "aes256", None),
])
def test_decrypts_for_the_recipient(engine, material, recipient, cipher, kdf):
    der = material.encrypt([(recipient, kdf)], cipher)
    assert engine.decrypt(der) == PLAIN


@pytest.mark.parametrize("recipient", [EC256, EC384, RSA])
def test_decrypts_its_own_part_of_a_multi_recipient_message(engine, material, recipient):
    """The only key the engine holds is *recipient*'s: its RecipientInfo is the one used."""
    der = material.encrypt([(OUTSIDER_RSA, None), (OUTSIDER_EC, "sha256"),
                            (recipient, "sha256" if recipient != RSA else None)])
    assert engine.decrypt(der) == PLAIN


def test_refuses_a_message_for_nobody_it_knows(engine, material):
    der = material.encrypt([(OUTSIDER_EC, "sha256"), (OUTSIDER_RSA, None)])
    with pytest.raises(AssertionError):
        engine.decrypt(der)


@pytest.mark.parametrize("kdf", ["cofactor:sha256", "sha224"])
def test_ecdh_schemes_only_nss_decrypts(both, material, kdf):
    """NSS 3.110 also takes cofactorDH and sha224kdf; gpgsm 2.4 refuses them.

    gpgsm 2.4.7 implements dhSinglePass-stdDH with sha1/256/384/512 KDFs only, so what the
    tool sends to EC recipients must stay among those.
    """
    der = material.encrypt([(EC256, kdf)])
    assert both["nss13"].decrypt(der) == PLAIN
    with pytest.raises(AssertionError, match="Invalid public key algorithm"):
        both["gpgsm24"].decrypt(der)


@pytest.mark.parametrize("signer, md", [(EC256, "sha256"), (EC384, "sha384"),
                                        (EC384, "sha512"), (RSA, "sha256")])
@pytest.mark.parametrize("detached", [False, True], ids=["opaque", "detached"])
def test_verifies_signatures(engine, material, signer, md, detached):
    der = material.sign(signer, md, detached)
    if detached:
        assert engine.verified(der, PLAIN) == PLAIN
    else:
        assert engine.verified(der) == PLAIN


def test_p384_over_sha256_is_good_for_nss_but_an_error_for_gpgsm(both, material):
    """gpgsm 2.4 reports GOODSIG, then exits 2: "a 256 bit hash is not valid for a 384 bit
    ECC key".  ECDSA signatures must use a digest at least as long as the curve."""
    der = material.sign(EC384, "sha256")
    assert both["nss13"].verified(der) == PLAIN
    with pytest.raises(AssertionError, match="256 bit hash is not valid for a 384 bit"):
        both["gpgsm24"].verified(der)


#: What each engine says about a signature that must not verify: (NSS status, gpgsm words).
REFUSALS = {
    "signature": ("BadSignature", "BADSIG"),
    "content": ("DigestMismatch", "BADSIG"),
    "untrusted": ("SigningCertNotTrusted", "TRUST_UNDEFINED"),
}


def _tampered(material, case, detached):
    """Return (der, content) of a signed message spoilt as *case* says."""
    signer = STRANGER if case == "untrusted" else EC256
    der = material.sign(signer, "sha256", detached)
    content = PLAIN if detached else None
    if case == "signature":
        der = der[:-1] + bytes([der[-1] ^ 0x01])  # the last byte of the ECDSA value s
    elif case == "content":
        if detached:
            content = PLAIN.replace(b"trixie", b"TRIXIE")
        else:
            assert der.count(b"ECDH via trixie") == 1
            der = der.replace(b"ECDH via trixie", b"ECDH via TRIXIE")
    return der, content


@pytest.mark.parametrize("case", sorted(REFUSALS))
@pytest.mark.parametrize("detached", [False, True], ids=["opaque", "detached"])
def test_bad_signatures_do_not_verify(both, material, case, detached):
    der, content = _tampered(material, case, detached)
    nss_word, gpgsm_words = REFUSALS[case]
    status, _ = both["nss13"].verify(der, content)
    assert "signer0.status=%s;" % nss_word in status, status
    with pytest.raises(AssertionError, match=nss_word):
        both["nss13"].verified(der, content)
    with pytest.raises(AssertionError, match=gpgsm_words):
        both["gpgsm24"].verify(der, content)


@pytest.mark.parametrize("detached", [False, True], ids=["opaque", "detached"])
def test_engines_verify_signed_takes_them(engine, material, detached):
    """They are engines.NSS / engines.GpgSM, so the suite's MIME helper works unchanged."""
    entity = material.sign(EC384, "sha384", detached, content=b"Hello from trixie\r\n",
                           outform="SMIME")
    assert engines.verify_signed(engine, entity) == b"Hello from trixie\r\n"


def test_identities_added_later_are_imported(both, material):
    """decrypt() first imports identities added to the PKI since the engine was made."""
    address = "late-p384@trixie.example"
    if address not in material.pki.ids:
        material.pki.add(address, key=ec.generate_private_key(ec.SECP384R1()))
        material.certs[address] = material.pki.cert_path(address)
        material.keys[address] = material.pki.key_path(address)
    der = material.encrypt([(address, "sha384")])
    for engine in both.values():
        assert engine.decrypt(der) == PLAIN
        assert address not in engine._pending()


def test_session_fixtures(nss13, gpgsm24, pki, tmp_path):
    """nss13 and gpgsm24 hold the session PKI: decrypt for and verify its (RSA) people."""
    need("openssl")
    sender, recipient = PEOPLE[0], PEOPLE[1]
    inter = write(str(tmp_path / "inter.crt"), pem_cert(pki.inter.cert))
    der = engines.run(["openssl", "cms", "-encrypt", "-binary", "-aes256", "-outform", "DER",
                       pki.cert_path(recipient)], PLAIN).stdout
    sig = engines.run(["openssl", "cms", "-sign", "-binary", "-nodetach", "-md", "sha256",
                       "-signer", pki.cert_path(sender), "-inkey", pki.key_path(sender),
                       "-certfile", inter, "-outform", "DER"], PLAIN).stdout
    for engine in (nss13, gpgsm24):
        assert engine.decrypt(der) == PLAIN
        assert engine.verified(sig) == PLAIN


def test_nothing_left_running(both, material):
    """gpg-agent dies with each gpgsm command: none of this engine's processes outlive it.

    (Only processes of this engine's GNUPGHOME count: another test session may be using
    the same cached tree at the same time.)
    """
    engine = both["gpgsm24"]
    engine.decrypt(material.encrypt([(EC256, "sha256")]))
    home = engine.env["GNUPGHOME"].encode()
    root = os.path.realpath(engine.chroot.root)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.path.realpath("/proc/%s/root" % pid) != root:
                continue
            with open("/proc/%s/environ" % pid, "rb") as fh:
                environ = fh.read()
            with open("/proc/%s/cmdline" % pid, "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue  # it ended meanwhile
        if home in environ or home in cmdline:
            left.append(pid)
    assert left == [], subprocess.run(["ps", "-o", "pid,args", "-p", ",".join(left)],
                                      capture_output=True, text=True).stdout
