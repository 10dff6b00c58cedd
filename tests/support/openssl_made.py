"""S/MIME messages made by OpenSSL (Debian 12's 3.0) for the receiving side, each one proven.

The tool's --verify and --decrypt are tested on mail that an independent producer made:
``openssl cms`` (and ``openssl smime``) sign and encrypt every message here.  And each
message is checked by OpenSSL itself when it is made, so a test that uses it knows what
it holds:

- a good signature verifies against the trusted root, yields the exact content, and its
  signer certificates are the ones named;
- a spoilt one is refused by OpenSSL for the reason it claims (content digest, signature
  value, unknown root, expiry), and only for that reason (it verifies once that one fault
  is allowed for, e.g. with the other root trusted, or ``-no_check_time``);
- an encrypted one decrypts to the exact plaintext with the recipient's key and has the
  structure it claims (cipher, key transport, recipient identifier, AuthEnvelopedData),
  and one meant for somebody else decrypts with none of our keys.

Everything lives in a World (the PKI on disk) and a Catalogue (the messages, built on
first use and kept: each is made once per test module).

TEST-ONLY: every key here is generated for the test run and protects nothing.
"""

import base64
import os
import random
import re
import subprocess
import tempfile
from email.utils import formatdate

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from . import engines
from .pki import CA, DAY, NOW, new_key, pem_cert, pem_key, write

# -- the people ------------------------------------------------------------------

ROOT_CN = "Receive Test Root CA"
ISSUER = "Receive Test Issuing CA"          #: issues almost everybody
DEPT = "Receive Test Department CA"         #: under ISSUER: a chain of two intermediates
ROGUE_ROOT_CN = "Rogue Root CA"
ROGUE = "Rogue Issuing CA"                  #: a chain that ends at a root we do not trust

FRANK = "frank@example.net"       # RSA 2048 signer, ISSUER
FIONA = "fiona@example.net"       # EC P-256 signer, ISSUER
FRED = "fred@example.net"         # EC P-384 signer, ISSUER
DEB = "deb@example.com"           # RSA signer under DEPT (two intermediates)
STRANGER = "stranger@untrusted.example"   # RSA signer, ROGUE
STRAY = "stray@untrusted.example"         # EC P-256 signer, ROGUE
MALLORY = "mallory@example.com"   # has no certificate: the forger's From
BOB = "bob@example.org"           # ours (key in the --keys dir), RSA
PAT = "pat@example.org"           # ours, EC P-256
QUINN = "quinn@example.org"       # ours, EC P-384
OLGA = "olga@example.com"         # somebody else, RSA (key in no --keys dir)
OTTO = "otto@example.com"         # somebody else, EC P-256
ALICE = "alice@example.com"       # round trips: the tool signs as Alice (RSA) ...
ANN = "ann@example.com"           # ... or as Ann (EC P-256)

#: The content every OpenSSL signature covers, canonical (CRLF); MARKER occurs once.
MARKER = b"signed with OpenSSL"
SIGNED = (b"Content-Type: text/plain; charset=us-ascii\r\n"
          b"Content-Transfer-Encoding: 7bit\r\n\r\n"
          b"Hello Bob,\r\n\r\nthis message is " + MARKER + b" 3.0.\r\n-- \r\nFrank\r\n")
#: The plaintext inside envelopes: exact bytes, 8-bit and a binary attachment included.
PLAIN = (b"Content-Type: multipart/mixed; boundary=\"=-plain-=\"\r\n\r\n"
         b"--=-plain-=\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Transfer-Encoding: 8bit\r\n\r\nFor your eyes only: caf\xc3\xa9 cr\xc3\xa8me.\r\n"
         b"--=-plain-=\r\nContent-Type: application/octet-stream; name=\"k.bin\"\r\n"
         b"Content-Transfer-Encoding: base64\r\n\r\n"
         + base64.encodebytes(bytes(range(256))).replace(b"\n", b"\r\n")
         + b"--=-plain-=--\r\n")
#: The Date of every message: when the corpus is made, as a signing client writes it, so the
#: signing-time OpenSSL puts in is minutes from it (no Date warning from --verify).
DATE = b"Date: " + formatdate(localtime=True).encode("ascii")


# -- the PKI ---------------------------------------------------------------------

def with_ski(ca, cert):
    """Return *cert* re-issued by *ca* with a subjectKeyIdentifier (for ``-keyid``).

    pki.CA.issue() writes none, and OpenSSL 3.0 will not identify a recipient by a key
    identifier the certificate lacks ("certificate has no keyid").
    """
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(cert.serial_number)
               .not_valid_before(cert.not_valid_before_utc)
               .not_valid_after(cert.not_valid_after_utc))
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(cert.public_key()),
                                    critical=False)
    return builder.sign(ca.key, hashes.SHA256())


class Identity:
    """One person: address, key and certificate files, issuer's common name, chain file."""

    def __init__(self, address, key, cert, ca, key_path, cert_path, chain_path):
        self.address, self.key, self.cert, self.ca = address, key, cert, ca
        self.key_path, self.cert_path, self.chain_path = key_path, cert_path, chain_path
        self.issuer = ca.cert.subject.get_attributes_for_oid(
            x509.oid.NameOID.COMMON_NAME)[0].value
        self.chain = pem_cert(*ca.chain)   #: the CA certificates up to (not incl.) the root
        self.ec = isinstance(key, ec.EllipticCurvePrivateKey)

    def __repr__(self):
        return "<%s>" % self.address


class World:
    """The module's PKI on disk: trusted and rogue CAs, signers, our identities, others.

    - ``cafile``: the trusted root only (what --ca gets); ``rogue_cafile``: the rogue root;
      ``bundle``: both roots, the rogue one first (a real bundle holds many).
    - ``keys``: our key directory, <address>.pem and <address>.crt (with its chain) of BOB,
      PAT and QUINN: the identities mail is decrypted for.  No signer's file is in it.
    - ``sender_keys``: the round trips' sender directory (ALICE and ANN with their private
      keys; BOB's and QUINN's certificates to encrypt to).
    - Each identity's ``chain_path`` is what its signatures carry (-certfile): the
      intermediates, and for the rogue chain its root too (only the trust is missing).
    """

    def __init__(self, base):
        self.base = base
        self.keys = os.path.join(base, "keys")
        self.sender_keys = os.path.join(base, "sender-keys")
        self.ids_dir = os.path.join(base, "ids")
        for d in (self.keys, self.sender_keys, self.ids_dir):
            os.makedirs(d)
        self.root = CA(ROOT_CN)
        self.inter = self.root.intermediate(ISSUER)
        self.dept = self.inter.intermediate(DEPT)
        self.rogue_root = CA(ROGUE_ROOT_CN)
        self.rogue = self.rogue_root.intermediate(ROGUE)
        self.cafile = self.file("ca.pem", pem_cert(self.root.cert))
        self.rogue_cafile = self.file("rogue-ca.pem", pem_cert(self.rogue_root.cert))
        self.bundle = self.file("bundle.pem", pem_cert(self.rogue_root.cert, self.root.cert))
        self.chains = {
            self.inter: self.file("chain-inter.pem", pem_cert(self.inter.cert)),
            self.dept: self.file("chain-dept.pem", pem_cert(self.dept.cert, self.inter.cert)),
            self.rogue: self.file("chain-rogue.pem",
                                  pem_cert(self.rogue.cert, self.rogue_root.cert))}
        self.ids = {}
        p256, p384 = ec.SECP256R1, ec.SECP384R1
        expired = {"not_before": NOW - 400 * DAY, "not_after": NOW - DAY}
        for label, address, ca, curve, kw in [
                ("frank", FRANK, self.inter, None, {}),
                ("fiona", FIONA, self.inter, p256, {}),
                ("fred", FRED, self.inter, p384, {}),
                ("deb", DEB, self.dept, None, {}),
                ("stranger", STRANGER, self.rogue, None, {}),
                ("stray", STRAY, self.rogue, p256, {}),
                ("frank-expired", FRANK, self.inter, None, expired),
                ("fiona-expired", FIONA, self.inter, p256, expired),
                ("bob", BOB, self.inter, None, {}),
                ("pat", PAT, self.inter, p256, {}),
                ("quinn", QUINN, self.inter, p384, {}),
                ("olga", OLGA, self.inter, None, {}),
                ("otto", OTTO, self.inter, p256, {}),
                ("alice", ALICE, self.inter, None, {}),
                ("ann", ANN, self.inter, p256, {})]:
            self._add(label, address, ca, curve, kw)
        for label in ("bob", "pat", "quinn"):
            self.install(self.keys, label, private=True)
        for label in ("alice", "ann"):
            self.install(self.sender_keys, label, private=True)
        for label in ("bob", "quinn"):
            self.install(self.sender_keys, label, private=False)

    def file(self, name, data):
        return write(os.path.join(self.base, name), data)

    def _add(self, label, address, ca, curve, kw):
        key = ec.generate_private_key(curve()) if curve else new_key()
        key, cert = ca.issue(address, key, **kw)
        cert = with_ski(ca, cert)
        self.ids[label] = Identity(
            address, key, cert, ca,
            write(os.path.join(self.ids_dir, label + ".pem"), pem_key(key)),
            write(os.path.join(self.ids_dir, label + ".crt"), pem_cert(cert)),
            self.chains[ca])

    def install(self, directory, label, private):
        """Write *label*'s <address>.crt (with chain), and .pem when *private*, to *directory*."""
        ident = self.ids[label]
        if private:
            write(os.path.join(directory, ident.address + ".pem"), pem_key(ident.key))
        write(os.path.join(directory, ident.address + ".crt"),
              pem_cert(ident.cert) + ident.chain)

    def __getitem__(self, label):
        return self.ids[label]


# -- OpenSSL -----------------------------------------------------------------------

def openssl(args, data=b"", ok=(0,)):
    """Run ``openssl *args*`` on *data*; assert its exit status; return the process."""
    return engines.run(["openssl"] + list(args), data, ok=ok)


def to_crlf(data):
    """Return *data* with every line ending CRLF.

    (OpenSSL 3.0's -crlfeol is no help: it ends the MIME header lines with CRLF but
    leaves the base64 lines with LF.)
    """
    return re.sub(rb"\r?\n", b"\r\n", data)


def eol_of(data):
    """The line ending a message was written with (OpenSSL writes LF unless -crlfeol)."""
    first = data.split(b"\n", 1)[0]
    return b"\r\n" if first.endswith(b"\r") else b"\n"


def with_headers(entity, sender, to, subject, cc=None):
    """Return *entity* under outer header fields From/To/(Cc)/Subject/Date/Message-ID."""
    eol = eol_of(entity)
    fields = [b"From: " + sender.encode(), b"To: " + to.encode()]
    if cc:
        fields.append(b"Cc: " + cc.encode())
    fields += [b"Subject: " + subject.encode(), DATE,
               b"Message-ID: <%d.receive-test@example.net>" % random.getrandbits(48)]
    return eol.join(fields) + eol + entity


def smime_der(message):
    """Return (DER, detached) of the one S/MIME structure in *message* (top level)."""
    msg = engines.parse(message)
    if msg.get_content_type() == "multipart/signed":
        for part in msg.get_payload():
            if "pkcs7-signature" in part.get_content_type():
                return part.get_payload(decode=True), True
        raise AssertionError("no signature part")
    return msg.get_payload(decode=True), False


def swap_der(message, old, new):
    """Return *message* with the base64 of DER *old* replaced by that of *new*."""
    eol = eol_of(message)
    start = message.index(base64.b64encode(old)[:48])
    end = re.compile(rb"[A-Za-z0-9+/=\r\n]*").match(message, start).end()
    block = message[start:end]
    body = block.rstrip(b"\r\n")
    assert base64.b64decode(body) == old, "the base64 found is not the DER's"
    text = base64.b64encode(new)
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return message[:start] + eol.join(lines) + block[len(body):] + message[end:]


def read(path):
    with open(path, "rb") as fh:
        return fh.read()


def flip(data, at, mask=0x01):
    """Return *data* with the byte at *at* XORed with *mask*."""
    return data[:at] + bytes([data[at] ^ mask]) + data[at + 1:]


# -- BER: just enough to find the signature values of a SignedData -------------------

def _element(data, pos):
    """Return (tag, contents start, contents stop, end) of the BER element at *pos*."""
    tag, length, start = data[pos], data[pos + 1], pos + 2
    if length == 0x80:  # indefinite: elements up to the end-of-contents octets
        at = start
        while data[at:at + 2] != b"\0\0":
            at = _element(data, at)[3]
        return tag, start, at, at + 2
    if length & 0x80:
        count = length & 0x7F
        length, start = int.from_bytes(data[start:start + count], "big"), start + count
    return tag, start, start + length, start + length


def _children(data, element):
    out, at = [], element[1]
    while at < element[2]:
        out.append(_element(data, at))
        at = out[-1][3]
    return out


def signature_values(der):
    """Return [(start, stop)] of every SignerInfo's signature OCTET STRING contents."""
    info = _element(der, 0)                                   # ContentInfo
    content = _children(der, info)[1]                         # [0] EXPLICIT
    signed_data = _children(der, content)[0]                  # SignedData
    signer_infos = _children(der, signed_data)[-1]            # SET OF SignerInfo
    assert signer_infos[0] == 0x31, "no SignerInfos where expected"
    out = []
    for signer_info in _children(der, signer_infos):
        value = [c for c in _children(der, signer_info) if c[0] == 0x04][0]
        out.append((value[1], value[2]))
    return out


# -- proofs: what OpenSSL says about a message -------------------------------------------

def openssl_verify(message, *args, binary=False):
    """Run ``openssl cms -verify`` on a whole S/MIME message; return (process, signers).

    *signers* are the e-mail addresses (SAN) of the certificates OpenSSL verified the
    signatures with (``-signer``); empty when verification failed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "signers.pem")
        cmd = ["openssl", "cms", "-verify", "-purpose", "smimesign", "-signer", out]
        proc = subprocess.run(cmd + list(args) + (["-binary"] if binary else []),
                              input=message, capture_output=True, timeout=60)
        signers = []
        if proc.returncode == 0:
            for cert in x509.load_pem_x509_certificates(read(out)):
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                signers += san.value.get_values_for_type(x509.RFC822Name)
    return proc, sorted(signers)


def prove_signed(message, content, signers, cafile):
    """Assert OpenSSL verifies *message* against *cafile*: exact *content*, *signers*."""
    der, detached = smime_der(message)
    proc, found = openssl_verify(message, "-CAfile", cafile, binary=not detached)
    assert proc.returncode == 0, proc.stderr.decode()
    assert found == sorted(s.address for s in signers), found
    if not detached:
        assert proc.stdout == content, "opaque content is not the exact bytes"
        return
    # the exact bytes signed: the DER checked against *content* as a binary file
    with tempfile.TemporaryDirectory() as tmp:
        sig, data = os.path.join(tmp, "sig.der"), os.path.join(tmp, "content")
        write(sig, der)
        write(data, content)
        openssl(["cms", "-verify", "-purpose", "smimesign", "-CAfile", cafile, "-binary",
                 "-inform", "DER", "-in", sig, "-content", data, "-out", os.devnull])


def prove_refused(message, why, cafile, *passes_with):
    """Assert OpenSSL refuses *message* (stderr matching *why*) with *cafile* trusted.

    With *passes_with* (other verify options), assert it verifies then: that fault, and
    nothing else, is what is wrong with the message.
    """
    proc, _ = openssl_verify(message, "-CAfile", cafile)
    assert proc.returncode != 0, "OpenSSL verified a message meant to fail"
    assert re.search(why, proc.stderr.decode(), re.I), proc.stderr.decode()
    if passes_with:
        proc, _ = openssl_verify(message, *passes_with)
        assert proc.returncode == 0, proc.stderr.decode()


def decrypt(message, ident, ok=(0,)):
    """``openssl cms -decrypt -binary`` with *ident*'s certificate and key."""
    return openssl(["cms", "-decrypt", "-binary", "-recip", ident.cert_path,
                    "-inkey", ident.key_path], message, ok=ok)


def prove_decrypts(message, ident, plaintext):
    """Assert *message* decrypts with *ident*'s key to exactly *plaintext*."""
    assert decrypt(message, ident).stdout == plaintext


def prove_for_none_of(message, idents):
    """Assert *message* decrypts with none of *idents*' keys."""
    for ident in idents:
        proc = decrypt(message, ident, ok=range(256))
        assert proc.returncode != 0, "%s can decrypt it" % ident.address


def cms_print(message):
    return openssl(["cms", "-cmsout", "-print", "-inform", "SMIME"], message).stdout.decode()


def prove_structure(message, *words):
    """Assert ``openssl cms -cmsout -print`` of *message* shows every one of *words*."""
    text = cms_print(message)
    for word in words:
        assert re.search(word, text), "%r not in the structure:\n%s" % (word, text[:3000])


# -- the catalogue ------------------------------------------------------------------------

class Made:
    """A message on disk and what it claims to be.

    *content* is the innermost entity, exact (what was signed or encrypted);
    *signer* the Identity whose signature is for the From address (None: unsigned or
    the From address signed nothing); *recipient* our Identity it is encrypted to.
    """

    def __init__(self, name, path, data, content=None, signer=None, recipient=None,
                 sender=None):
        self.name, self.path, self.data, self.content = name, path, data, content
        self.signer, self.recipient, self.sender = signer, recipient, sender

    @property
    def ok_line(self):
        """The exact --verify report line of this message (one input)."""
        return "OK - signed by %s (%s), verified" % (self.signer.address, self.signer.issuer)

    def __repr__(self):
        return "<Made %s>" % self.name


#: Signature kinds: (signer label, digest, RSA-PSS).
KINDS = {"rsa": ("frank", "sha256", False), "pss": ("frank", "sha256", True),
         "p256": ("fiona", "sha256", False), "p384": ("fred", "sha384", False),
         "sha1": ("frank", "sha1", False)}
FORMS = ("detached", "opaque")


class Catalogue:
    """Every OpenSSL-made message, built (and proven) the first time a test asks for it."""

    def __init__(self, world, base):
        self.world, self.base = world, base
        self.made, self.entities, self.count = {}, {}, 0
        self.rng = random.Random(8551)

    def __getitem__(self, name):
        if name not in self.made:
            recipe = RECIPES[name]
            self.made[name] = recipe(self, name)
        return self.made[name]

    def save(self, name, data, **claims):
        path = os.path.join(self.base, name.replace("/", "_").replace("+", "-") + ".eml")
        write(path, data)
        return Made(name, path, data, **claims)

    # -- OpenSSL producers --

    def sign(self, signers, content=SIGNED, detached=True, md="sha256", pss=False,
             chain=True, app="cms", crlf=False):
        """Return an S/MIME entity signed by ``openssl *app* -sign`` (no outer fields)."""
        args = [app, "-sign", "-md", md]
        for ident in signers:
            args += ["-signer", ident.cert_path, "-inkey", ident.key_path]
            if pss:
                args += ["-keyopt", "rsa_padding_mode:pss"]
        if chain:
            chains = sorted({ident.chain_path for ident in signers})
            data = b"".join(read(p) for p in chains)
            self.count += 1
            args += ["-certfile", self.world.file("certfile-%d.pem" % self.count, data)]
        if not detached:
            args.append("-nodetach")
        entity = openssl(args, content).stdout
        return to_crlf(entity) if crlf else entity

    def encrypt(self, recipients, content=PLAIN, cipher="aes-256-cbc", oaep=False,
                keyid=False, kdf=None, app="cms", crlf=False):
        """Return an S/MIME entity encrypted by ``openssl *app* -encrypt`` (binary mode)."""
        args = [app, "-encrypt", "-binary", "-" + cipher]
        if keyid:
            args.append("-keyid")
        if app == "smime":
            args += [r.cert_path for r in recipients]
        else:
            for ident in recipients:
                args += ["-recip", ident.cert_path]
                if oaep and not ident.ec:
                    args += ["-keyopt", "rsa_padding_mode:oaep"]
                if kdf and ident.ec:
                    args += ["-keyopt", "ecdh_kdf_md:" + kdf]
        entity = openssl(args, content).stdout
        return to_crlf(entity) if crlf else entity

    def good_entity(self, kind, form):
        """The one signed entity of *kind* and *form* the good and spoilt messages share."""
        key = (kind, form)
        if key not in self.entities:
            label, md, pss = KINDS[kind]
            self.entities[key] = self.sign([self.world[label]], detached=form == "detached",
                                           md=md, pss=pss)
        return self.entities[key]


# -- recipes: name -> function(catalogue, name) -> Made -----------------------------------

RECIPES = {}


def recipe(*names):
    def register(func):
        for name in names:
            RECIPES[name] = func
        return func
    return register


def _parts(name):
    return name.split("/")


@recipe(*["%s/%s" % (k, f) for k in KINDS for f in FORMS])
def _good(cat, name):
    """A good signature of each kind and form (frank/fiona/fred, the intermediate carried)."""
    kind, form = _parts(name)
    label, md, pss = KINDS[kind]
    signer = cat.world[label]
    entity = cat.good_entity(kind, form)
    data = with_headers(entity, signer.address, BOB, "signed %s %s" % (kind, form))
    prove_signed(data, SIGNED, [signer], cat.world.cafile)
    algorithm = {"rsa": r"sha256WithRSAEncryption|rsaEncryption", "pss": "rsassaPss",
                 "p256": "ecdsa-with-SHA256", "p384": "ecdsa-with-SHA384",
                 "sha1": r"rsaEncryption"}[kind]
    prove_structure(data, "signatureAlgorithm: \n *algorithm: (%s)" % algorithm,
                    r"digestAlgorithm: \n *algorithm: %s " % md)
    return cat.save(name, data, content=SIGNED, signer=signer, sender=signer.address)


def _rewrite_types(entity):
    """application/pkcs7-* -> application/x-pkcs7-* (headers only: base64 has no '-')."""
    assert b"application/pkcs7-" in entity
    return entity.replace(b"application/pkcs7-", b"application/x-pkcs7-")


def _strip_names(entity):
    """Drop name=/filename= parameters and Content-Disposition: the type alone must do."""
    out = re.sub(rb'; name="smime\.p7[ms]"', b"", entity)
    out = re.sub(rb'Content-Disposition: attachment; filename="smime\.p7[ms]"\r?\n', b"", out)
    assert b"smime.p7" not in out
    return out


VARIANTS = ("smime-x", "x-types", "bare", "crlf", "lf", "display")


@recipe(*["%s/%s" % (v, f) for v in VARIANTS for f in FORMS])
def _variant(cat, name):
    """Frank's RSA signature in other clothes.

    smime-x: made by ``openssl smime`` (application/x-pkcs7-*, smime.p7m/.p7s names);
    x-types: ``openssl cms`` output with its types rewritten to x-pkcs7;
    bare: no name/filename parameters and no Content-Disposition;
    crlf: every line ending CRLF (OpenSSL writes LF, but the signed part as CRLF);
    lf: every line ending LF, the signed part too (a Unix mailbox's copy);
    display: From with a display name, "Frank Example" <frank@example.net>.
    """
    variant, form = _parts(name)
    frank = cat.world["frank"]
    detached = form == "detached"
    sender = frank.address
    if variant == "smime-x":
        entity = cat.sign([frank], detached=detached, app="smime")
        assert b"application/x-pkcs7-" in entity and b"application/pkcs7-" not in entity
        assert (b'filename="smime.p7s"' if detached else b'filename="smime.p7m"') in entity
    elif variant == "crlf":
        entity = cat.sign([frank], detached=detached, crlf=True)
        assert not re.search(rb"(?<!\r)\n", entity)
        assert b"\r\n" + SIGNED + b"\r\n" in entity or not detached
    elif variant == "lf":
        entity = cat.good_entity("rsa", form).replace(b"\r\n", b"\n")
        assert b"\r" not in entity
        assert SIGNED.replace(b"\r\n", b"\n") in entity or not detached
    else:
        entity = cat.good_entity("rsa", form)
        if variant == "x-types":
            entity = _rewrite_types(entity)
        elif variant == "bare":
            entity = _strip_names(entity)
        else:
            sender = '"Frank Example" <%s>' % frank.address
    data = with_headers(entity, sender, BOB, "variant " + variant)
    prove_signed(data, SIGNED, [frank], cat.world.cafile)
    return cat.save(name, data, content=SIGNED, signer=frank, sender=frank.address)


@recipe("deep/detached", "deep/opaque")
def _deep(cat, name):
    """Deb's signature under two intermediates (DEPT, ISSUER), both carried (-certfile)."""
    form = _parts(name)[1]
    deb = cat.world["deb"]
    entity = cat.sign([deb], detached=form == "detached")
    data = with_headers(entity, DEB, BOB, "two intermediates")
    prove_signed(data, SIGNED, [deb], cat.world.cafile)
    assert cms_print(data).count("issuer: ") >= 3  # deb's, DEPT's and ISSUER's certificates
    return cat.save(name, data, content=SIGNED, signer=deb, sender=DEB)


@recipe("chainless/detached", "chainless/opaque")
def _chainless(cat, name):
    """Deb's signature carrying no intermediate: no path to the root can be built."""
    form = _parts(name)[1]
    deb = cat.world["deb"]
    entity = cat.sign([deb], detached=form == "detached", chain=False)
    data = with_headers(entity, DEB, BOB, "no intermediates")
    full = cat.world.file("full-chain.pem", pem_cert(cat.world.root.cert, cat.world.dept.cert,
                                                     cat.world.inter.cert))
    prove_refused(data, "unable to get local issuer certificate", cat.world.cafile,
                  "-CAfile", full)
    return cat.save(name, data, signer=deb, sender=DEB)


TWO = {"two/frank+fiona/from-frank": (("frank", "fiona"), "opaque", "frank"),
       "two/frank+fiona/from-fiona": (("frank", "fiona"), "opaque", "fiona"),
       "two/frank+fiona/from-mallory": (("frank", "fiona"), "opaque", None),
       "two/frank+stranger/from-frank": (("frank", "stranger"), "detached", "frank"),
       "two/frank+stranger/from-stranger": (("frank", "stranger"), "detached", "stranger")}


@recipe(*TWO)
def _two(cat, name):
    """Two SignerInfos in one SignedData (-signer a -inkey a -signer b -inkey b)."""
    labels, form, sender = TWO[name]
    signers = [cat.world[label] for label in labels]
    key = ("two",) + labels
    if key not in cat.entities:
        cat.entities[key] = cat.sign(signers, detached=form == "detached")
    entity = cat.entities[key]
    signer = cat.world[sender] if sender else None
    data = with_headers(entity, signer.address if signer else MALLORY, BOB, "two signers")
    assert cms_print(data).count("signatureAlgorithm:") == 2
    if "stranger" in labels:  # OpenSSL wants every signer trusted: both roots, then
        prove_refused(data, "certificate verify error", cat.world.cafile)
        prove_signed(data, SIGNED, signers, cat.world.bundle)
    else:
        prove_signed(data, SIGNED, signers, cat.world.cafile)
    return cat.save(name, data, content=SIGNED, signer=signer,
                    sender=signer.address if signer else MALLORY)


SPOILS = ("tampered", "forged", "badsig")


@recipe(*["%s/%s/%s" % (s, k, f) for s in SPOILS for k in KINDS for f in FORMS])
def _spoilt(cat, name):
    """A good signature spoilt once.

    tampered: one byte of the signed content flipped (detached: in the first part's text;
    opaque: inside the DER's eContent, base64 re-encoded); forged: From changed to
    MALLORY (the signature itself is fine); badsig: one byte of the signature value
    flipped (its last one), found by walking the DER.
    """
    spoil, kind, form = _parts(name)
    signer = cat.world[KINDS[kind][0]]
    entity = cat.good_entity(kind, form)
    sender = MALLORY if spoil == "forged" else signer.address
    der, detached = smime_der(entity)
    if spoil == "tampered":
        marker = MARKER.replace(b"O", b"o")
        if detached:
            assert entity.count(MARKER) == 1
            entity = entity.replace(MARKER, marker)
        else:
            assert der.count(MARKER) == 1
            entity = swap_der(entity, der, der.replace(MARKER, marker))
    elif spoil == "badsig":
        (start, stop), = signature_values(der)
        assert stop - start >= 64
        entity = swap_der(entity, der, flip(der, stop - 1))
    data = with_headers(entity, sender, BOB, "%s %s %s" % (spoil, kind, form))
    ca = cat.world.cafile
    if spoil == "forged":
        prove_signed(data, SIGNED, [signer], ca)  # a good signature, by frank, not mallory
    else:
        # OpenSSL: "verification failure" either way; signed attributes are checked first,
        # so a changed content is a messageDigest mismatch, a changed value a bad signature
        prove_refused(data, r"CMS_SignerInfo_verify_content|content verify error"
                      if spoil == "tampered" else r"CMS_SignerInfo_verify:", ca)
    return cat.save(name, data, content=SIGNED, signer=signer, sender=sender)


@recipe(*["%s/%s/%s" % (s, k, f) for s in ("untrusted", "expired") for k in ("rsa", "p256")
          for f in FORMS])
def _bad_certificate(cat, name):
    """A good signature by a certificate we must not accept.

    untrusted: chain to the rogue root, which travels in the message (-certfile) and is
    not in --ca; expired: frank's / fiona's certificate expired yesterday (OpenSSL signs
    with it anyway, and its signingTime is now).
    """
    problem, kind, form = _parts(name)
    label = {("untrusted", "rsa"): "stranger", ("untrusted", "p256"): "stray",
             ("expired", "rsa"): "frank-expired", ("expired", "p256"): "fiona-expired"}[
                 (problem, kind)]
    signer = cat.world[label]
    entity = cat.sign([signer], detached=form == "detached")
    data = with_headers(entity, signer.address, BOB, "%s %s" % (problem, kind))
    ca = cat.world.cafile
    if problem == "untrusted":
        prove_refused(data, "self-signed certificate in certificate chain", ca,
                      "-CAfile", cat.world.rogue_cafile)
    else:
        prove_refused(data, "certificate has expired", ca, "-CAfile", ca, "-no_check_time")
    return cat.save(name, data, content=SIGNED, signer=signer, sender=signer.address)


@recipe("unsigned/plain", "unsigned/multipart")
def _unsigned(cat, name):
    """Mail with no S/MIME at all: a text/plain one and a multipart/mixed one."""
    body = SIGNED if name.endswith("plain") else PLAIN.replace(b"\xc3\xa9", b"e").replace(
        b"\xc3\xa8", b"e")
    data = with_headers(b"MIME-Version: 1.0\r\n" + body, FRANK, BOB, "not signed")
    prove_refused(data, "Error reading SMIME Content Info|content type", cat.world.cafile)
    return cat.save(name, data, content=body, sender=FRANK)


GARBAGE = ("garbage/random", "garbage/empty", "garbage/bad-base64", "garbage/bad-der",
           "garbage/truncated-der", "garbage/bad-signature-part", "garbage/bad-enveloped")


def _pkcs7_mime(smime_type, body):
    return (b"MIME-Version: 1.0\nContent-Type: application/pkcs7-mime; smime-type="
            + smime_type + b'; name="smime.p7m"\nContent-Transfer-Encoding: base64\n'
            b'Content-Disposition: attachment; filename="smime.p7m"\n\n' + body)


@recipe(*GARBAGE)
def _garbage(cat, name):
    """Input that is not a usable message, or whose S/MIME part is broken.

    random: 3000 random octets; empty: nothing; bad-base64: a signed-data part whose body
    is not base64; bad-der: good base64 of random octets; truncated-der: the first half of
    a real SignedData; bad-signature-part: multipart/signed whose signature part is random
    octets; bad-enveloped: an enveloped-data part of random octets.
    """
    kind = _parts(name)[1]
    rng = cat.rng
    if kind == "random":
        data = rng.randbytes(3000)
    elif kind == "empty":
        data = b""
    else:
        if kind == "bad-base64":
            entity = _pkcs7_mime(b"signed-data", b"This is not base64 at all: %%% !!!\n***\n")
        elif kind == "bad-der":
            entity = _pkcs7_mime(b"signed-data", base64.encodebytes(b"\x30\x82" + rng.randbytes(900)))
        elif kind == "truncated-der":
            der, _ = smime_der(cat.good_entity("rsa", "opaque"))
            entity = _pkcs7_mime(b"signed-data", base64.encodebytes(der[:len(der) // 2]))
        elif kind == "bad-signature-part":
            good = cat.good_entity("rsa", "detached")
            der, _ = smime_der(good)
            entity = swap_der(good, der, rng.randbytes(len(der)))
        else:
            entity = _pkcs7_mime(b"enveloped-data", base64.encodebytes(rng.randbytes(700)))
        data = with_headers(entity, FRANK, BOB, "garbage " + kind)
    proc, _ = openssl_verify(data, "-CAfile", cat.world.cafile)
    assert proc.returncode != 0
    if kind == "bad-enveloped":
        assert decrypt(data, cat.world["bob"], ok=range(256)).returncode != 0
    return cat.save(name, data, sender=FRANK)


#: Encrypted, unsigned: name -> (recipient labels, our label or None, To, Cc, options,
#: structure words that ``openssl cms -cmsout -print`` must show).
ENCRYPTED = {
    "enc/rsa-aes128": (["bob"], "bob", BOB, None, {"cipher": "aes-128-cbc"},
                       ["aes-128-cbc", "rsaEncryption", "d.issuerAndSerialNumber"]),
    "enc/rsa-aes192": (["bob"], "bob", BOB, None, {"cipher": "aes-192-cbc"},
                       ["aes-192-cbc"]),
    "enc/rsa-aes256": (["bob"], "bob", BOB, None, {}, ["aes-256-cbc"]),
    "enc/rsa-oaep": (["bob"], "bob", BOB, None, {"oaep": True}, ["rsaesOaep"]),
    "enc/rsa-keyid": (["bob"], "bob", BOB, None, {"keyid": True},
                      ["d.subjectKeyIdentifier"]),
    "enc/rsa-gcm": (["bob"], "bob", BOB, None, {"cipher": "aes-256-gcm"},
                    ["id-smime-ct-authEnvelopedData", "aes-256-gcm"]),
    "enc/rsa-smime-x": (["bob"], "bob", BOB, None, {"app": "smime"}, ["aes-256-cbc"]),
    "enc/p256": (["pat"], "pat", PAT, None, {},
                 ["d.kari", "dhSinglePass-stdDH-sha1kdf-scheme", "id-aes256-wrap"]),
    "enc/p256-sha256kdf": (["pat"], "pat", PAT, None, {"kdf": "sha256", "cipher": "aes-128-cbc"},
                           ["d.kari", "dhSinglePass-stdDH-sha256kdf-scheme"]),
    "enc/p256-keyid": (["pat"], "pat", PAT, None, {"keyid": True},
                       ["d.kari", "d.rKeyId"]),
    "enc/p256-gcm": (["pat"], "pat", PAT, None, {"cipher": "aes-256-gcm"},
                     ["id-smime-ct-authEnvelopedData", "d.kari"]),
    "enc/p384-sha384kdf": (["quinn"], "quinn", QUINN, None, {"kdf": "sha384"},
                           ["d.kari", "dhSinglePass-stdDH-sha384kdf-scheme"]),
    "enc/multi-rsa": (["olga", "otto", "bob"], "bob", OLGA, BOB, {}, ["d.ktri", "d.kari"]),
    "enc/multi-ec": (["olga", "otto", "quinn"], "quinn", OTTO, QUINN, {"kdf": "sha256"},
                     ["d.ktri", "d.kari"]),
    "notforus/to-bob": (["olga"], None, BOB, None, {}, ["d.ktri"]),
    "notforus/to-olga": (["olga", "otto"], None, OLGA, OTTO, {}, ["d.ktri", "d.kari"]),
}


@recipe(*ENCRYPTED)
def _encrypted(cat, name):
    """PLAIN encrypted by OpenSSL (not signed), for us or, notforus/*, for somebody else.

    The To/Cc fields say whose keys to try: multi-* carry other recipients too (olga RSA,
    otto EC) before ours; notforus/to-bob is addressed to bob, but its envelope is only
    for olga (bob holds a key, just not one it can use).
    """
    labels, ours, to, cc, options, words = ENCRYPTED[name]
    world = cat.world
    entity = cat.encrypt([world[label] for label in labels], **options)
    data = with_headers(entity, OLGA if to != OLGA else OTTO, to, "encrypted", cc)
    if options.get("app") == "smime":
        assert b"application/x-pkcs7-mime; smime-type=enveloped-data" in data
    elif "gcm" in options.get("cipher", ""):
        assert b"smime-type=authEnveloped-data" in data
    else:
        assert b"application/pkcs7-mime; smime-type=enveloped-data" in data
    prove_structure(data, *words)
    for label in labels:
        prove_decrypts(data, world[label], PLAIN)
    mine = [world[label] for label in ("bob", "pat", "quinn") if label not in labels]
    prove_for_none_of(data, mine)
    return cat.save(name, data, content=PLAIN, recipient=world[ours] if ours else None,
                    sender=OLGA if to != OLGA else OTTO)


#: Nested: name -> layers, innermost first: ("sign", signer, form, options) or
#: ("encrypt", recipient labels, options); From; To; the From signer; our recipient.
NESTED = {
    "nest/sign-encrypt/rsa-detached": ([("sign", "frank", "detached", {}),
                                        ("encrypt", ["bob"], {})], FRANK, BOB, "frank", "bob"),
    "nest/sign-encrypt/rsa-opaque": ([("sign", "frank", "opaque", {}),
                                      ("encrypt", ["bob"], {"cipher": "aes-128-cbc"})],
                                     FRANK, BOB, "frank", "bob"),
    "nest/sign-encrypt/p384-to-quinn": ([("sign", "fred", "opaque", {"md": "sha384"}),
                                         ("encrypt", ["quinn"], {"kdf": "sha384"})],
                                        FRED, QUINN, "fred", "quinn"),
    "nest/sign-encrypt/p256-gcm-to-pat": ([("sign", "fiona", "detached", {}),
                                           ("encrypt", ["pat"], {"cipher": "aes-256-gcm"})],
                                          FIONA, PAT, "fiona", "pat"),
    "nest/sign-encrypt/rsa-to-pat": ([("sign", "frank", "opaque", {}),
                                      ("encrypt", ["pat"], {})], FRANK, PAT, "frank", "pat"),
    "nest/encrypt-sign": ([("encrypt", ["bob"], {}), ("sign", "frank", "detached", {})],
                          FRANK, BOB, "frank", "bob"),
    "nest/triple": ([("sign", "frank", "opaque", {}), ("encrypt", ["bob"], {}),
                     ("sign", "frank", "detached", {})], FRANK, BOB, "frank", "bob"),
    "nest/sign-encrypt/tampered": ([("sign", "frank", "detached", {"tamper": True}),
                                    ("encrypt", ["bob"], {})], FRANK, BOB, "frank", "bob"),
    "nest/sign-encrypt/forged": ([("sign", "frank", "opaque", {}), ("encrypt", ["bob"], {})],
                                 MALLORY, BOB, None, "bob"),
    "nest/sign-encrypt/not-for-us": ([("sign", "frank", "opaque", {}),
                                      ("encrypt", ["olga"], {})], FRANK, BOB, "frank", None),
}


@recipe(*NESTED)
def _nested(cat, name):
    """S/MIME layers inside one another, each proven as it is wrapped.

    sign-encrypt: signed (the entity turned CRLF) then encrypted (binary) to us; encrypt-sign: the
    envelope signed (detached); triple: signed, encrypted, signed (RFC 2634); tampered:
    the inner signed content altered before encryption; forged: From is mallory's;
    not-for-us: the envelope is for olga only.
    """
    layers, sender, to, signer_label, ours = NESTED[name]
    world = cat.world
    entity = content = SIGNED if layers[0][0] == "sign" else PLAIN
    for layer in layers:
        if layer[0] == "sign":
            _, label, form, options = layer
            options = dict(options)
            tamper = options.pop("tamper", False)
            signer = world[label]
            # OpenSSL signs text canonically: CRLF, trailing empty lines dropped (an
            # enveloped entity ends with one): the content signed is that form
            inner = entity.rstrip(b"\r\n") + b"\r\n"
            entity = cat.sign([signer], content=inner, detached=form == "detached",
                              crlf=True, **options)
            prove_signed(entity, inner, [signer], world.cafile)
            if tamper:
                assert entity.count(MARKER) == 1
                entity = entity.replace(MARKER, MARKER.replace(b"O", b"o"))
                prove_refused(entity, "content verify error", world.cafile)
        else:
            _, labels, options = layer
            inner = entity
            entity = cat.encrypt([world[label] for label in labels], content=inner,
                                 crlf=True, **options)
            for label in labels:
                prove_decrypts(entity, world[label], inner)
            prove_for_none_of(entity, [world[x] for x in ("bob", "pat", "quinn")
                                       if x not in labels])
    data = with_headers(entity, sender, to, "nested")
    return cat.save(name, data, content=content,
                    signer=world[signer_label] if signer_label else None,
                    recipient=world[ours] if ours else None, sender=sender)
