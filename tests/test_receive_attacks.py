"""The receiving side under attack (issue 17): messages crafted against --verify, --decrypt
and --harvest, each written so that it got through (or cost seconds and memory) before.

The messages are made here with the tool's own writer (signed_der, enveloped_data) and a
few DER pieces of our own for what no honest writer makes; OpenSSL's verdict is asked for
where it has one (a name-constraint violation), so the tool never stands alone.
"""

import os
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from support import engines
import sparkpostSMIME as tool
from support.harness import need, run_tool
from support.pki import CA, pem_cert, pem_key, write

VICTIM = "victim@bank.example"
BOB = "bob@example.org"
TEXT = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nPay the bearer.\r\n"


# -- helpers -----------------------------------------------------------------------------

class Attack:
    """A trusted root, key directory and scratch space for one test."""

    def __init__(self, base, root):
        self.base, self.root = base, root
        self.keys = os.path.join(base, "keys")
        os.makedirs(self.keys, exist_ok=True)
        self.cafile = write(os.path.join(base, "ca.crt"), pem_cert(root.cert))

    def identity(self, ca, address, **kw):
        """Return an unchecked tool.Identity issued by *ca* (its chain travels with it)."""
        key, cert = ca.issue(address, **kw)
        return tool.Identity(address, cert, "-", key, ca.chain)

    def file(self, name, data):
        return write(os.path.join(self.base, name), data)

    def run(self, mode, *paths, extra=()):
        return run_tool(["--" + mode] + [str(p) for p in paths]
                        + ["--keys", self.keys, "--ca", self.cafile] + list(extra))


def message(sender, entity, to=BOB, extra=b""):
    """Return an RFC 5322 message around the S/MIME *entity*, dated now (as signed)."""
    from email.utils import formatdate
    return (b"From: %s\r\nTo: %s\r\nSubject: attack\r\nDate: %s\r\n%sMIME-Version: 1.0\r\n"
            % (sender.encode(), to.encode(), formatdate().encode(), extra)) + bytes(entity)


def signed(ident, content=TEXT, sender=None, detached=True):
    """A message signed by *ident* with the tool's own writer, From *sender*."""
    sign = tool.sign_detached if detached else tool.sign_opaque
    return message(sender or ident.address, sign(content, ident))


def one_line_refusal(proc, code=65, reason=None):
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, err + proc.stdout.decode(errors="replace")
    assert err.count("\n") == 1 and "Traceback" not in err, err
    if reason:
        assert re.search(reason, err, re.I), err
    return err


@pytest.fixture(scope="module")
def root():
    return CA("Attack Root CA (TEST ONLY)")


@pytest.fixture
def attack(tmp_path, root):
    return Attack(str(tmp_path), root)


# -- High: rfc822Name constraints (RFC 5280 4.2.1.10) ----------------------------------

def constrained(root, permitted=None, excluded=None):
    """A sub-CA under *root* with rfc822Name constraints (lists of strings)."""
    names = [(lambda xs: [x509.RFC822Name(x) for x in xs] if xs is not None else None)(xs)
             for xs in (permitted, excluded)]
    return root.intermediate("Constrained CA (TEST ONLY)",
                             constraints=x509.NameConstraints(*names))


@pytest.fixture(scope="module")
def corp_ca(root):
    """A sub-CA allowed to certify mail addresses in corp.example only."""
    return constrained(root, permitted=["corp.example"])


@pytest.mark.parametrize("san", [False, [x509.DNSName("www.corp.example")]],
                         ids=["no-san", "dns-san-only"])
@pytest.mark.parametrize("detached", [True, False], ids=["detached", "opaque"])
def test_constrained_ca_cannot_vouch_for_a_subject_email_outside(attack, corp_ca, san,
                                                                 detached):
    ident = attack.identity(corp_ca, VICTIM, san=san, subject_email=True)
    path = attack.file("in.eml", signed(ident, detached=detached))
    proc = attack.run("verify", path)
    one_line_refusal(proc, 65, "name constraint|not permitted")
    assert proc.stdout.decode().startswith("FAILED - ")
    need("openssl")  # the independent verdict: OpenSSL refuses it too
    check = engines.run(["openssl", "cms", "-verify", "-in", path, "-CAfile", attack.cafile,
                         "-out", os.devnull], ok=(0, 4))
    assert check.returncode != 0 and b"subtree" in check.stderr, check.stderr


def test_constrained_ca_inside_its_subtree_still_verifies(attack, corp_ca):
    ident = attack.identity(corp_ca, "alice@corp.example", san=False, subject_email=True)
    proc = attack.run("verify", attack.file("in.eml", signed(ident)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - signed by alice@corp.example")


def test_harvest_saves_nothing_from_a_constrained_ca_outside(attack, corp_ca):
    ident = attack.identity(corp_ca, VICTIM, san=False, subject_email=True)
    proc = attack.run("harvest", attack.file("in.eml", signed(ident)))
    one_line_refusal(proc, 65, "name constraint|not permitted")
    assert os.listdir(attack.keys) == []


def test_decrypt_refuses_a_signature_outside_the_constraints(attack, corp_ca):
    ident = attack.identity(corp_ca, VICTIM, san=False, subject_email=True)
    proc = attack.run("decrypt", attack.file("in.eml", signed(ident)))
    one_line_refusal(proc, 65, "name constraint|not permitted")


@pytest.mark.parametrize("permitted,excluded,address,allowed", [
    (["boss@corp.example"], None, "boss@corp.example", True),      # a mailbox
    (["boss@corp.example"], None, "clerk@corp.example", False),
    (["corp.example"], None, "x@corp.example", True),              # a host
    (["corp.example"], None, "x@mail.corp.example", False),
    ([".corp.example"], None, "x@mail.corp.example", True),        # any host in a domain
    ([".corp.example"], None, "x@corp.example", False),
    ([".corp.example"], None, "x@evilcorp.example", False),
    (None, ["bank.example"], VICTIM, False),                       # excluded host
    (None, [".bank.example"], "x@mail.bank.example", False),       # excluded domain
    (None, [".bank.example"], VICTIM, True),
    (None, [VICTIM.upper()], VICTIM, False),                       # case does not help
    (["corp.example"], ["boss@corp.example"], "boss@corp.example", False),
])
def test_rfc822_constraint_forms(attack, root, permitted, excluded, address, allowed):
    ca = constrained(root, permitted, excluded)
    ident = attack.identity(ca, address.lower(), san=False, subject_email=True)
    proc = attack.run("verify", attack.file("in.eml", signed(ident)))
    if allowed:
        assert proc.returncode == 0, proc.stderr
    else:
        one_line_refusal(proc, 65, "name constraint|not permitted|excluded")


def test_constraints_of_every_ca_on_the_path(attack, root):
    """The upper CA excludes the address; the lower one has no constraint."""
    upper = constrained(root, excluded=["bank.example"])
    lower = upper.intermediate("Unconstrained below (TEST ONLY)")
    ident = attack.identity(lower, VICTIM, san=False, subject_email=True)
    one_line_refusal(attack.run("verify", attack.file("in.eml", signed(ident))), 65,
                     "name constraint|excluded")


def test_sending_refuses_a_recipient_certificate_outside_its_issuer(tmp_path, corp_ca):
    """--encrypt to <victim>.crt that carries its constrained issuer: refused (78)."""
    key, cert = corp_ca.issue(VICTIM, san=False, subject_email=True)
    keys = tmp_path / "keys"
    keys.mkdir()
    write(str(keys / (VICTIM + ".crt")), pem_cert(cert, *corp_ca.chain))
    msg = write(str(tmp_path / "m.eml"), b"From: a@corp.example\r\nTo: %s\r\n"
                b"Subject: s\r\n\r\nhi\r\n" % VICTIM.encode())
    proc = run_tool([msg, "--encrypt", "--keys", str(keys)])
    one_line_refusal(proc, 78, "name constraint|not permitted")


def test_sending_refuses_a_signer_certificate_outside_its_issuer(tmp_path, corp_ca):
    key, cert = corp_ca.issue(VICTIM, san=False, subject_email=True)
    keys = tmp_path / "keys"
    keys.mkdir()
    write(str(keys / (VICTIM + ".pem")), pem_key(key) + pem_cert(cert, *corp_ca.chain))
    msg = write(str(tmp_path / "m.eml"), b"From: %s\r\nTo: b@example.org\r\n"
                b"Subject: s\r\n\r\nhi\r\n" % VICTIM.encode())
    proc = run_tool([msg, "--sign", "--keys", str(keys)])
    one_line_refusal(proc, 78, "name constraint|not permitted")


# -- Medium: hostile input costs time, memory or the rest of a batch -------------------
# Each attack is a message of a few MB.  No timing is asserted: the reader is linear and
# every unbounded structure has a limit (tool.MAX_*), which these tests see enforced.
# tests/bench/receive_attacks.py writes the same messages for measuring by hand.

SEQ, CTX0 = tool.SEQUENCE, tool.ctx(0)


def der(tag, *parts):
    return tool.der(tag, *parts)


def content_info(oid, inner):
    return der(SEQ, tool.der_oid(oid), der(CTX0, inner))


def pkcs7_entity(der_bytes, smime_type=b"signed-data"):
    return (b"Content-Type: application/pkcs7-mime; smime-type=%s; name=smime.p7m\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" % smime_type
            + tool.encode_base64(der_bytes))


def detached_entity(content, der_bytes):
    return (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
            b'micalg=sha-256; boundary="BOUNDARY"\r\n\r\n--BOUNDARY\r\n' + content
            + b"\r\n--BOUNDARY\r\n" + tool.SIGNATURE_PART_HEADER + b"\r\n"
            + tool.encode_base64(der_bytes) + b"\r\n--BOUNDARY--\r\n")


def signed_fields(ident, content=TEXT, detached=True):
    """The raw fields of a SignedData made by the tool: version, digestAlgorithms,
    encapContentInfo, certificates, signerInfos."""
    sd = tool.Ber(bytes(tool.signed_der(content, ident, detached))).children()[1].children()[0]
    return [f.raw for f in sd.children()]


def folded_header(lines):
    """A message whose one header field goes on over *lines* continuation lines."""
    return (b"From: a@example.com\r\nTo: b@example.org\r\nX-Folded: start\r\n"
            + b" more\r\n" * lines + b"\r\nbody\r\n")


def huge_oid(size):
    """A pkcs7-mime part whose ContentInfo type is an OID of *size* octets."""
    oid = der(tool.OID, b"\x81" * (size - 1) + b"\x01")
    return message("a@example.com", pkcs7_entity(der(SEQ, oid, der(CTX0, der(SEQ)))))


def huge_integer(ident, size):
    """A signature whose SignerInfo's version is an INTEGER of *size* octets."""
    fields = signed_fields(ident)
    si = tool.Ber(fields[-1]).children()[0].children()
    version = der(tool.INTEGER, b"\x01" * size)
    fields[-1] = der(tool.SET, der(SEQ, version, *(f.raw for f in si[1:])))
    return message(ident.address, detached_entity(
        TEXT, content_info(tool.ID_SIGNED_DATA, der(SEQ, *fields))))


def many_signer_infos(ident, count, size):
    """A multipart/signed over *size* octets of content with *count* SignerInfos."""
    content = b"Content-Type: text/plain\r\n\r\n" + b"x" * (size - 30)
    fields = signed_fields(ident, content)
    one = tool.Ber(fields[-1]).children()[0].raw
    fields[-1] = der(tool.SET, one * count)
    return message(ident.address, detached_entity(
        content, content_info(tool.ID_SIGNED_DATA, der(SEQ, *fields))))


def nested_indefinite(ident, levels, chunks):
    """An opaque SignedData whose content is *levels* nested indefinite-length OCTET
    STRINGs around the signed text and *chunks* empty ones."""
    inner = der(tool.OCTET_STRING, TEXT) + b"\x04\x00" * chunks
    for _ in range(levels):
        inner = b"\x24\x80" + inner + b"\x00\x00"
    fields = signed_fields(ident, detached=False)
    fields[2] = der(SEQ, tool.der_oid(tool.ID_DATA), b"\xa0\x80" + inner + b"\x00\x00")
    return message(ident.address, pkcs7_entity(
        content_info(tool.ID_SIGNED_DATA, der(SEQ, *fields))))


def envelope(ours, content, before=0, after=0, chunk=0, copies=0, spoil=False):
    """An EnvelopedData to *ours* (an Identity): *before*/*after* more RecipientInfos
    naming it that hold a wrong key, or *copies* of its own one; the ciphertext in
    *chunk*-octet pieces, its last octet flipped when *spoil* (a bad padding)."""
    ci = tool.Ber(b"".join(tool.enveloped_data(content, [ours]))).children()[1].children()[0]
    version, infos, encrypted = ci.children()
    real = infos.children()[0]
    parts = real.children()
    bogus = der(SEQ, parts[0].raw, parts[1].raw, parts[2].raw,
                der(tool.OCTET_STRING, os.urandom(len(parts[3].body))))
    eci = encrypted.children()
    data = bytearray(eci[2].body)
    data[-1] ^= spoil
    pieces = [bytes(data)]
    if chunk:
        pieces = [der(tool.OCTET_STRING, data[i:i + chunk]) for i in range(0, len(data), chunk)]
    body = der(SEQ, version.raw, der(tool.SET, bogus * before + real.raw * (1 + copies)
                                     + bogus * after),
               der(SEQ, eci[0].raw, eci[1].raw, der(tool.ctx(0, bool(chunk)), *pieces)))
    return message("a@example.com", pkcs7_entity(content_info(tool.ID_ENVELOPED_DATA, body),
                                                 b"enveloped-data"), to=ours.address)


def nested_multiparts(depth):
    """A message of *depth* nested multiparts around a binary part."""
    body = (b"Content-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: binary\r\n\r\n\x00\x01\x02 binary\r\n")
    for n in range(depth):
        b = b"b%d" % n
        body = (b'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n--%s\r\n%s\r\n--%s--\r\n'
                % (b, b, body, b))
    return b"From: a@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n" + body


def base64_junk(size):
    """A pkcs7-mime part whose base64 body is *size* junk characters around a few bytes."""
    return message("a@example.com",
                   b"Content-Type: application/pkcs7-mime; smime-type=signed-data\r\n"
                   b"Content-Transfer-Encoding: base64\r\n\r\n"
                   + b"MIIB" + b"!*" * (size // 2) + b"AAAA\r\n")


@pytest.fixture(scope="module")
def signer(root):
    ca = root.intermediate()
    key, cert = ca.issue("alice@example.com")
    return tool.Identity("alice@example.com", cert, "-", key, ca.chain)


@pytest.fixture
def bob(attack):
    """Our own identity: bob's key and certificate in the key directory."""
    key, cert = attack.root.issue(BOB)
    write(os.path.join(attack.keys, BOB + ".pem"), pem_key(key) + pem_cert(cert))
    return tool.Identity(BOB, cert, "-", key)


def test_header_folded_over_many_lines(attack):
    proc = attack.run("verify", attack.file("in.eml", folded_header(200000)))
    one_line_refusal(proc, 65, r"header .*larger than %d" % tool.MAX_HEADER_SIZE)


def test_oid_of_hundreds_of_kilobytes(attack):
    proc = attack.run("verify", attack.file("in.eml", huge_oid(400000)))
    one_line_refusal(proc, 65, r"OBJECT IDENTIFIER .*longer than %d" % tool.MAX_OID_OCTETS)


def test_integer_of_hundreds_of_kilobytes(attack, signer):
    proc = attack.run("verify", attack.file("in.eml", huge_integer(signer, 400000)))
    one_line_refusal(proc, 65, r"INTEGER .*longer than %d" % tool.MAX_INTEGER_OCTETS)


def test_thousands_of_signer_infos(attack, signer):
    proc = attack.run("verify", attack.file("in.eml", many_signer_infos(signer, 2000, 3 << 20)))
    one_line_refusal(proc, 65, r"more than %d SignerInfos" % tool.MAX_SIGNER_INFOS)


def test_as_many_signer_infos_as_allowed_verify(attack, signer):
    data = many_signer_infos(signer, tool.MAX_SIGNER_INFOS, 1 << 20)
    proc = attack.run("verify", attack.file("in.eml", data))
    assert proc.returncode == 0, proc.stderr


def test_nested_indefinite_lengths_around_empty_chunks(attack, signer):
    proc = attack.run("verify", attack.file("in.eml", nested_indefinite(signer, 30, 1300000)))
    one_line_refusal(proc, 65, r"more than %d ASN.1 elements" % tool.MAX_BER_ELEMENTS)


def test_nested_indefinite_lengths_within_limits_verify(attack, signer):
    """Deep indefinite nesting of a few chunks is legal BER: it verifies (linearly)."""
    data = nested_indefinite(signer, 30, 1000)
    proc = attack.run("verify", attack.file("in.eml", data))
    assert proc.returncode == 0, proc.stderr


def test_dozens_of_recipient_infos_for_our_key(attack, bob):
    """Fifty copies of our own RecipientInfo, a spoilt padding, the ciphertext in 16-octet
    chunks: decrypted once (the first RecipientInfo naming our certificate is the one),
    and the failure is 'altered or corrupt', never 'not for our keys'."""
    data = envelope(bob, TEXT + b"x" * (3 << 20), copies=49, chunk=16, spoil=True)
    proc = attack.run("decrypt", attack.file("in.eml", data))
    one_line_refusal(proc, 65, r"altered or corrupt")


def test_a_wrong_key_first_is_altered_or_corrupt(attack, bob):
    data = envelope(bob, TEXT, before=1)
    proc = attack.run("decrypt", attack.file("in.eml", data))
    one_line_refusal(proc, 65, r"altered or corrupt")


def test_recipient_info_limit(attack, bob):
    data = envelope(bob, TEXT, after=tool.MAX_RECIPIENT_INFOS)
    proc = attack.run("decrypt", attack.file("in.eml", data))
    one_line_refusal(proc, 65, r"more than %d RecipientInfos" % tool.MAX_RECIPIENT_INFOS)


def test_our_recipient_info_first_decrypts(attack, bob):
    data = envelope(bob, TEXT, after=30, chunk=64)
    proc = attack.run("decrypt", attack.file("in.eml", data))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - decrypted for " + BOB.encode())


def test_nested_multiparts_refused_and_the_batch_goes_on(attack, signer):
    batch = os.path.join(attack.base, "batch")
    os.makedirs(batch)
    write(os.path.join(batch, "1-good.eml"), signed(signer))
    write(os.path.join(batch, "2-bomb.eml"), nested_multiparts(600))
    write(os.path.join(batch, "3-good.eml"), signed(signer))
    proc = attack.run("verify", batch)
    assert proc.returncode == 65, proc.stderr
    out = proc.stdout.decode().splitlines()
    assert [line.split(": ", 1)[0] for line in out] == [
        os.path.join(batch, n) for n in ("1-good.eml", "2-bomb.eml", "3-good.eml")]
    assert out[0].endswith("verified") and out[2].endswith("verified"), out
    assert re.search(r"nested deeper than %d" % tool.MAX_MIME_DEPTH, out[1]), out


def test_nested_multiparts_when_sending(tmp_path):
    path = write(str(tmp_path / "in.eml"), nested_multiparts(600))
    proc = run_tool([path, "-o", str(tmp_path / "out.eml")])
    one_line_refusal(proc, 65, r"nested deeper than %d" % tool.MAX_MIME_DEPTH)


def test_base64_padded_with_megabytes_of_junk(attack):
    """Decoding keeps memory near the input's size: the tool runs within 200 MB of address
    space (it needed 800 MB for this message before)."""
    import resource
    path = attack.file("in.eml", base64_junk(9 << 20))
    limit = 200 << 20
    proc = run_tool(["--verify", path, "--keys", attack.keys, "--ca", attack.cafile],
                    preexec=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    one_line_refusal(proc, 65, r"malformed|S/MIME")


# -- Low: strict where the standards are strict, honest reports ------------------------

ALICE = "alice@example.com"
SHA256 = tool.algorithm(tool.HASH_OIDS["SHA256"], tool.der(tool.NULL))


def attribute(oid, *values):
    return der(SEQ, tool.der_oid(oid), tool.der_set(*values))


def content_type_attr(oid=tool.ID_DATA):
    return attribute(tool.ATTR_CONTENT_TYPE, tool.der_oid(oid))


def digest_attr(content):
    import hashlib
    return attribute(tool.ATTR_MESSAGE_DIGEST, der(tool.OCTET_STRING,
                                                    hashlib.sha256(content).digest()))


def crafted(ident, content=TEXT, e_content_type=tool.ID_DATA, attributes=None, sort=True,
            detached=True, sender=None):
    """A message signed by *ident* over exactly the *attributes* given (default: one
    content-type and one message-digest), sorted as DER wants unless not *sort*."""
    if attributes is None:
        attributes = [content_type_attr(e_content_type), digest_attr(content)]
    attrs = tool.der_set(*attributes) if sort else der(tool.SET, *attributes)
    si = der(SEQ, tool.der_int(1), ident.rid, SHA256, b"\xa0" + attrs[1:],
             *tool.sign_attributes(ident, attrs))
    encap = [tool.der_oid(e_content_type)]
    if not detached:
        encap.append(der(CTX0, der(tool.OCTET_STRING, content)))
    sd = der(SEQ, tool.der_int(1), tool.der_set(SHA256), der(SEQ, *encap),
             ident.certificate_set(), tool.der_set(si))
    ci = content_info(tool.ID_SIGNED_DATA, sd)
    entity = detached_entity(content, ci) if detached else pkcs7_entity(ci)
    return message(sender or ident.address, entity)


@pytest.fixture(scope="module")
def ca(root):
    return root.intermediate()


def alice(ca, **kw):
    key, cert = ca.issue(ALICE, **kw)
    return tool.Identity(ALICE, cert, "-", key, ca.chain)


def test_crafted_signature_verifies(attack, ca):
    """The crafting below is sound: with nothing spoilt, it verifies."""
    for detached in (True, False):
        proc = attack.run("verify", attack.file("in.eml", crafted(alice(ca),
                                                                  detached=detached)))
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("key,reason", [
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), "1024-bit RSA"),
    (lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
], ids=["rsa-1024", "secp256k1"])
def test_weak_signer_keys_are_refused(attack, ca, key, reason):
    ident = alice(ca, key=key())
    one_line_refusal(attack.run("verify", attack.file("in.eml", signed(ident))), 65, reason)


@pytest.mark.parametrize("detached", [True, False], ids=["detached", "opaque"])
def test_signed_content_must_be_id_data(attack, ca, detached):
    tst_info = "1.2.840.113549.1.9.16.1.4"  # a time-stamp token's content type
    data = crafted(alice(ca), e_content_type=tst_info, detached=detached)
    one_line_refusal(attack.run("verify", attack.file("in.eml", data)), 65, "id-data")


def test_signed_content_must_be_a_mime_entity(attack, ca):
    data = crafted(alice(ca), content=b"%PDF-1.4 not a MIME entity\r\n\x00\x01", detached=False)
    one_line_refusal(attack.run("verify", attack.file("in.eml", data)), 65, "MIME entity")


@pytest.mark.parametrize("attributes", [
    lambda: [content_type_attr(), content_type_attr(), digest_attr(TEXT)],
    lambda: [content_type_attr(), digest_attr(TEXT), digest_attr(TEXT)],
    lambda: [content_type_attr(), attribute(tool.ATTR_MESSAGE_DIGEST, *(
        digest_attr(TEXT)[-34:], der(tool.OCTET_STRING, b"\0" * 32)))],
    lambda: [digest_attr(TEXT)],
], ids=["two-content-types", "two-digests", "digest-with-two-values", "no-content-type"])
def test_exactly_one_content_type_and_message_digest(attack, ca, attributes):
    data = crafted(alice(ca), attributes=attributes())
    one_line_refusal(attack.run("verify", attack.file("in.eml", data)), 65,
                     "exactly one content-type and one message-digest")


@pytest.mark.parametrize("attrs,openssl_refuses", [
    (lambda: [digest_attr(TEXT), content_type_attr()], False),  # OpenSSL keeps the order
    (lambda: [content_type_attr(), attribute(tool.ATTR_MESSAGE_DIGEST, b"\x04\x81\x20"
                                             + digest_attr(TEXT)[-32:])], True),
], ids=["unsorted-set-of", "long-form-length"])
def test_signed_attributes_must_be_der(attack, ca, attrs, openssl_refuses):
    """RFC 5652 5.4: the signature covers the DER of the signed attributes.  OpenSSL
    re-encodes lengths (so it refuses a long form) but keeps the order of a SET OF."""
    attrs = attrs()
    path = attack.file("in.eml", crafted(alice(ca), attributes=attrs, sort=False))
    one_line_refusal(attack.run("verify", path), 65, "not DER")
    need("openssl")
    check = engines.run(["openssl", "cms", "-verify", "-in", path, "-CAfile", attack.cafile,
                         "-out", os.devnull], ok=(0, 4))
    assert check.returncode == (4 if openssl_refuses else 0), check.stderr


def test_inner_from_contradicting_the_signer_is_refused(attack, ca, tmp_path):
    inner = (b"From: ceo@bank.example\r\nContent-Type: text/plain\r\n\r\n"
             b"Wire the money.\r\n")
    out = tmp_path / "out.eml"
    proc = attack.run("verify", attack.file("in.eml", signed(alice(ca), inner)),
                      extra=["-o", str(out)])
    one_line_refusal(proc, 65, "From.*ceo@bank.example")
    assert not out.exists()


def test_inner_from_naming_the_signer_is_fine(attack, ca):
    inner = b"From: Alice <alice@example.com>\r\nContent-Type: text/plain\r\n\r\nHi.\r\n"
    proc = attack.run("verify", attack.file("in.eml", signed(alice(ca), inner)))
    assert proc.returncode == 0, proc.stderr


def test_report_names_the_verified_from_address(attack, ca):
    ident = alice(ca, san=[x509.RFC822Name("other@example.net"), x509.RFC822Name(ALICE)])
    proc = attack.run("verify", attack.file("in.eml", signed(ident)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - signed by alice@example.com ("), proc.stdout


def test_decrypting_unsigned_content_warns(attack, bob):
    proc = attack.run("decrypt", attack.file("in.eml", envelope(bob, TEXT)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - decrypted for bob@example.org, not signed")
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "not authenticated" in err and "--require_signed" in err


def test_require_signed_refuses_unsigned_content(attack, bob, tmp_path):
    out = tmp_path / "out.eml"
    proc = attack.run("decrypt", attack.file("in.eml", envelope(bob, TEXT)),
                      extra=["--require_signed", "-o", str(out)])
    one_line_refusal(proc, 65, "not signed")
    assert proc.stdout.startswith(b"FAILED - ") and not out.exists()


def test_require_signed_passes_signed_content(attack, bob, ca):
    inner = tool.sign_opaque(TEXT, alice(ca))
    data = envelope(bob, inner).replace(b"From: a@example.com", b"From: " + ALICE.encode())
    proc = attack.run("decrypt", attack.file("in.eml", data), extra=["--require_signed"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""


def test_require_signed_is_for_decrypt(tmp_path):
    proc = run_tool(["x.eml", "--require_signed"])
    one_line_refusal(proc, 64, "--require_signed")


@pytest.mark.parametrize("content", [b"\x00\x01 not a MIME entity at all", b""],
                         ids=["garbage", "empty"])
def test_garbage_plaintext_is_altered_or_corrupt(attack, bob, content):
    proc = attack.run("decrypt", attack.file("in.eml", envelope(bob, content)))
    one_line_refusal(proc, 65, "altered or corrupt")


def test_corrupt_padding_is_altered_or_corrupt(attack, bob):
    """The last ciphertext octet spoilt: a padding error looks like any other damage."""
    proc = attack.run("decrypt", attack.file("in.eml", envelope(bob, TEXT, spoil=True)))
    one_line_refusal(proc, 65, "altered or corrupt")


def test_harvest_saves_the_validated_chain_only(attack, ca, root):
    stranger_ca = root.intermediate("Stranger CA (TEST ONLY)")
    _, stranger = stranger_ca.issue("stranger@example.net")
    key, cert = ca.issue(ALICE)
    ident = tool.Identity(ALICE, cert, "-", key, ca.chain + [stranger_ca.cert, stranger])
    proc = attack.run("harvest", attack.file("in.eml", signed(ident)))
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(attack.keys, ALICE + ".crt"), "rb") as fh:
        saved = x509.load_pem_x509_certificates(fh.read())
    assert saved == [cert, ca.cert]


@pytest.mark.parametrize("mode", ["--verify", "--harvest"])
def test_a_bug_on_one_input_never_stops_the_others(tmp_path, monkeypatch, capfd, mode):
    """A fault of ours (here injected: the reader raises on the first input) fails that
    input with 70, and every other input of the directory is still read and reported."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a.eml", "b.eml", "c.eml"):
        (inbox / name).write_bytes(b"From: x@example.com\r\nTo: y@example.com\r\n\r\nhi\r\n")
    seen = []
    real = tool.receive if mode == "--verify" else tool.harvest
    name = "receive" if mode == "--verify" else "harvest"

    def reader(path_or_data, *args):
        source = path_or_data if mode == "--harvest" else args[0]
        seen.append(os.path.basename(source))
        if source.endswith("a.eml"):
            raise RecursionError("maximum recursion depth exceeded")
        return real(path_or_data, *args)
    monkeypatch.setattr(tool, name, reader)
    code = tool.main([mode, str(inbox), "--keys", str(tmp_path / "keys"),
                      "--ca", os.path.join(os.path.dirname(__file__), "keys", "demo-ca.crt")],
                     {"XDG_CACHE_HOME": str(tmp_path / "cache")})
    out, err = capfd.readouterr()
    assert seen == ["a.eml", "b.eml", "c.eml"]
    assert code == tool.EX_SOFTWARE
    assert "a.eml: internal error while reading: RecursionError" in err
    assert "b.eml" in out and "c.eml" in out
