"""Post-quantum recipients: ML-KEM-768/1024 KEMRecipientInfo (RFC 9629, RFC 9936, RFC 9935).

The independent engine is OpenSSL >= 3.6 of Debian sid in a cached chroot (tests/support/sid.py):
it decrypts what we encrypt, for every recipient of every mix with RSA and EC P-256, in
every encrypt mode, and verifies the signature inside; it makes the messages, keys (in
its default 'seed and expanded key' form) and ML-KEM-512 certificates we must read or
refuse.  Under CI=true a chroot that cannot be built fails the tests instead of skipping.
"""

import base64
import os
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mlkem
from hypothesis import HealthCheck, given, settings, strategies as st

from support import debian
from support import harness
from support import engines
from support import sid
from support.harness import KEY_PASSWORD, PKI, run_tool
from support.pki import new_key, pem_cert, pem_key, write

SENDER = "alice@example.com"                       # RSA signing key, RSA own copy
PQ_SENDER = "pq-sender@pq.example"                 # RSA signing key, ML-KEM-768 <from>.crt
KEM768, KEM1024 = "kem768@pq.example", "kem1024@pq.example"
RSA, EC = "rsa@pq.example", "ec@pq.example"
PQ = (KEM768, KEM1024)
EVERYONE = (KEM768, KEM1024, RSA, EC)
MODES = {"encrypt": ["--encrypt"], "sign+encrypt": ["--sign", "--encrypt"],
         "detached+encrypt": ["--sign_detached", "--encrypt"]}
MIXES = {"768": (KEM768,), "1024": (KEM1024,), "768+rsa": (KEM768, RSA),
         "all": (KEM768, KEM1024, RSA, EC)}
BODY = b"Hello from a post-quantum test.\r\n"
#: AES-256 key wrap's AlgorithmIdentifier, then the 40-octet wrapped 32-octet key.
WRAPPED_KEY = bytes.fromhex("300b060960864801650304012d") + b"\x04\x28"


@pytest.fixture(scope="module")
def osl(sid_tree):
    engine = sid.SidOpenSSL(sid_tree)
    yield engine
    engine.close()


class Public:
    """A key holder for CA.issue() of a public key only (one OpenSSL made)."""

    def __init__(self, pem):
        self.public = serialization.load_pem_public_key(pem)

    def public_key(self):
        return self.public


@pytest.fixture(scope="module")
def pq(tmp_path_factory):
    """RSA people (conftest PKI), ML-KEM-768/1024, RSA and EC recipients, and a sender
    whose <from>.crt is ML-KEM-768 beside its RSA signing key."""
    made = PKI(str(tmp_path_factory.mktemp("pq")))
    made.add(KEM768, key=new_key("mlkem768"))
    made.add(KEM1024, key=new_key("mlkem1024"))
    made.add(RSA)
    made.add(EC, key=new_key("ec"))
    signing_key, signing = made.inter.issue(PQ_SENDER)
    kem_key, kem_cert = made.inter.issue(PQ_SENDER, new_key("mlkem768"))
    made.ids[PQ_SENDER] = (kem_key, kem_cert)  # what decrypts its own copy
    write(os.path.join(made.keys, PQ_SENDER + ".pem"),
          pem_key(signing_key) + pem_cert(signing, made.inter.cert))
    write(os.path.join(made.keys, PQ_SENDER + ".crt"), pem_cert(kem_cert, made.inter.cert))
    write(made.key_path(PQ_SENDER), pem_key(kem_key))
    write(made.cert_path(PQ_SENDER), pem_cert(kem_cert))
    return made


def message(sender, to, body=BODY):
    return b"From: %s\r\nTo: %s\r\nSubject: pq\r\nContent-Type: text/plain\r\n\r\n%s" % (
        sender.encode(), ", ".join(to).encode(), body)


def build(pki, tmp_path, raw, flags, ok=0):
    return harness.build(pki, tmp_path, raw, flags, name="m.eml", ok=ok, safe=True)


def der_of(out):
    return engines.der_of(out[out.index(b"Content-Type: application/pkcs7-mime"):])


def opened(osl, pki, der, who, sign=()):
    """Return what OpenSSL 3.6 decrypts from *der* for *who*, LF line ends; with a *sign*
    option, the content of the signature inside, which must verify to the test root."""
    key, cert = pki.ids[who]
    plain = osl.decrypt(der, pem_cert(cert), pem_key(key))
    if sign:
        plain = osl.verify(plain, pem_cert(pki.root.cert), detached="--sign_detached" in sign)
    return plain.replace(b"\r\n", b"\n")


def test_sid_has_openssl_3_6(sid_tree):
    assert sid.version(sid_tree) >= (3, 6, 0), sid_tree.marker()["versions"]
    assert sid_tree.versions() == sid_tree.marker()["versions"]  # the tree is what its marker says
    assert debian._mounts_under(sid_tree.root) == []


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("mode", MODES)
def test_sid_openssl_decrypts_every_recipient_of_every_mix(pq, osl, tmp_path, mode, mix):
    """RFC 9936: one KEMRecipientInfo per ML-KEM recipient (HKDF-SHA256, AES-256 wrap),
    EnvelopedData version 3; OpenSSL 3.6 decrypts every copy, the sender's too, and the
    signature inside verifies."""
    recipients = MIXES[mix]
    out = build(pq, tmp_path, message(SENDER, recipients), MODES[mode]).stdout
    der = der_of(out)
    printed = osl.openssl(["cms", "-cmsout", "-print", "-inform", "DER"], der).stdout.decode()
    assert re.search(r"envelopedData: \n\s+version: 3\n", printed), printed[:400]
    assert printed.count("d.kemri:") == sum(r in PQ for r in recipients)
    assert printed.count("d.ktri:") == 1 + (RSA in recipients)  # the sender's copy: RSA
    assert printed.count("d.kari:") == (EC in recipients)
    for name in re.findall(r"kem: \n\s+algorithm: (\S+)", printed):
        assert name in ("ML-KEM-768", "ML-KEM-1024")
    assert printed.count("HKDF-SHA256") == printed.count("kekLength: 32") == \
        printed.count("d.kemri:")
    for who in recipients + (SENDER,):
        assert b"Hello from a post-quantum test.\n" in opened(osl, pq, der, who,
                                                              MODES[mode][:-1]), who


@pytest.mark.parametrize("form", ["default", "seed-only encrypted"])
@pytest.mark.parametrize("kind", ["ML-KEM-768", "ML-KEM-1024"])
def test_decrypt_opens_openssl_made_messages(pq, osl, tmp_path, kind, form):
    """OpenSSL 3.6 encrypts to an ML-KEM certificate (and an RSA one); our --decrypt opens
    it with the private key file exactly as 'openssl genpkey' wrote it (seed and expanded
    key, RFC 9935 6), or as the README's seed-only encrypted form."""
    address = "osl-%s@pq.example" % kind.lower()
    key_pem = osl.genkey(kind)
    assert len(key_pem) > 3000  # the 'both' form: seed and the expanded key
    with pytest.raises(ValueError):  # cryptography alone cannot read it
        serialization.load_pem_private_key(key_pem, None)
    public = osl.public_key(key_pem)
    if form != "default":
        key_pem = osl.openssl(["pkey", "-in", osl._file("k.pem", key_pem), "-provparam",
                               "ml-kem.output_formats=seed-only", "-aes256", "-passout",
                               "pass:" + KEY_PASSWORD]).stdout
        assert b"ENCRYPTED PRIVATE KEY" in key_pem
    _, cert = pq.inter.issue(address, Public(public))
    keys = tmp_path / "keys"
    keys.mkdir()
    write(str(keys / (address + ".pem")), key_pem)
    write(str(keys / (address + ".crt")), pem_cert(cert, pq.inter.cert))
    content = b"Content-Type: text/plain\r\n\r\nfrom OpenSSL %s\r\n" % kind.encode()
    der = osl.encrypt(content, [pem_cert(cert), pem_cert(pq.ids[RSA][1])])
    eml = tmp_path / "in.eml"
    eml.write_bytes(envelope(address, der))
    out = tmp_path / "out.eml"
    proc = run_tool(["--decrypt", str(eml), "--keys", str(keys), "--ca", pq.cafile,
                     "-o", str(out)], env={"SMIME_KEY_PASSWORD": KEY_PASSWORD})
    assert proc.returncode == 0, proc.stderr
    assert b"decrypted for %s" % address.encode() in proc.stdout
    assert out.read_bytes().endswith(content)


def envelope(to, der):
    """Return a message whose body is EnvelopedData *der*."""
    return (b"From: sender@pq.example\r\nTo: %s\r\nSubject: pq\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" % to.encode()
            + base64.encodebytes(der).replace(b"\n", b"\r\n"))


def pkcs8(oid_der, private_key):
    """Return a PEM PKCS#8 PrivateKeyInfo (version 0) of algorithm *oid_der* (DER OID)."""
    def der(tag, body):
        head = bytes([tag]) + (bytes([len(body)]) if len(body) < 128 else
                               b"\x82" + len(body).to_bytes(2, "big"))
        return head + body
    info = der(0x30, b"\x02\x01\x00" + der(0x30, oid_der) + der(0x04, private_key))
    return (b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(info) +
            b"-----END PRIVATE KEY-----\n")


def both_parts(key_pem):
    """Return (OID DER, seed, expanded key) of OpenSSL's 'both' ML-KEM private key."""
    data = base64.b64decode(b"".join(key_pem.splitlines()[1:-1]))
    oid = data[9:20]
    both = data[data.index(b"\x04\x40", 20):]
    seed = both[2:66]
    expanded = both[66 + 4:]  # OCTET STRING, two length octets
    return oid, seed, expanded


@pytest.mark.parametrize("form,reason", [
    ("expanded", "holds only the expanded key"),
    ("mismatch", "do not match"),
    ("short-seed", "not 64"),
])
def test_unusable_ml_kem_key_files_refused(pq, osl, tmp_path, form, reason):
    """A form the seed cannot be had from, or a damaged one, is a clear 78 naming the file."""
    key_pem = osl.genkey("ML-KEM-768")
    oid, seed, expanded = both_parts(key_pem)
    assert len(seed) == 64 and len(expanded) == 2400
    if form == "expanded":
        private = b"\x04\x82\x09\x60" + expanded
    elif form == "mismatch":
        other = both_parts(osl.genkey("ML-KEM-768"))[2]
        private = b"\x30\x82\x09\xa6\x04\x40" + seed + b"\x04\x82\x09\x60" + other
    else:
        private = b"\x80\x20" + seed[:32]
    keys = tmp_path / "keys"
    keys.mkdir()
    address = KEM768
    write(str(keys / (address + ".pem")), pkcs8(oid, private))
    write(str(keys / (address + ".crt")), pem_cert(pq.ids[address][1]))
    out = build(pq, tmp_path, message(SENDER, [KEM768]), ["--encrypt"]).stdout
    eml = tmp_path / "in.eml"
    eml.write_bytes(out)
    proc = run_tool(["--decrypt", str(eml), "--keys", str(keys), "--ca", pq.cafile])
    err = proc.stderr.decode()
    assert proc.returncode == 78, err
    assert err.count("\n") == 1 and str(keys / (address + ".pem")) in err and reason in err


def solo_keys(pki, tmp_path, who, key=None):
    """Return a key directory holding only *who*'s private key (or *key*) and certificate."""
    keys = tmp_path / ("solo-" + who)
    keys.mkdir(exist_ok=True)
    write(str(keys / (who + ".pem")), pem_key(key or pki.ids[who][0]))
    write(str(keys / (who + ".crt")), pem_cert(pki.ids[who][1], pki.inter.cert))
    return str(keys)


def altered(out, needle, skip):
    """Return message *out* with one octet of its EnvelopedData flipped, *skip* octets
    after the end of *needle*."""
    der = bytearray(der_of(out))
    at = der.index(needle) + len(needle) + skip
    der[at] ^= 0x01
    head = out[:out.index(b"\r\n\r\n", out.index(b"Content-Type: application/pkcs7-mime"))]
    return head + b"\r\n\r\n" + base64.encodebytes(bytes(der)).replace(b"\n", b"\r\n")


@pytest.mark.parametrize("who,kemct", [(KEM768, b"\x04\x82\x04\x40"),
                                       (KEM1024, b"\x04\x82\x06\x20")])
@pytest.mark.parametrize("damage", ["kemct", "wrapped key", "kekLength", "wrong key", "none"])
def test_altered_or_foreign_messages_are_65(pq, tmp_path, who, kemct, damage):
    """ML-KEM's implicit rejection gives a wrong secret for an altered ciphertext, AES key
    wrap's check then fails: 'altered or corrupt', as a wrapped key altered; a kekLength
    that is not the wrap's key size is refused by name; another ML-KEM key is not a
    recipient: each one line, exit 65."""
    out = build(pq, tmp_path, message(SENDER, [who]), ["--encrypt"]).stdout
    keys = solo_keys(pq, tmp_path, who)
    if damage == "kemct":
        out = altered(out, kemct, 100)
    elif damage == "wrapped key":
        out = altered(out, WRAPPED_KEY, 5)
    elif damage == "kekLength":  # 33, not the wrap's 32 (RFC 9936 2.2.1)
        out = altered(out, b"\x02\x01\x20" + WRAPPED_KEY[:2], -3)
    elif damage == "wrong key":
        other = KEM1024 if who == KEM768 else KEM768
        keys = solo_keys(pq, tmp_path, other)
    eml = tmp_path / "in.eml"
    eml.write_bytes(out)
    proc = run_tool(["--decrypt", str(eml), "--keys", keys, "--ca", pq.cafile])
    if damage == "none":
        assert proc.returncode == 0 and b"decrypted for %s" % who.encode() in proc.stdout
        return
    err = proc.stderr.decode()
    assert proc.returncode == 65, err
    expected = {"kemct": "altered or corrupt", "wrapped key": "altered or corrupt",
                "kekLength": "kekLength 33", "wrong key": "none of them an identity"}
    assert err.count("\n") == 1 and expected[damage] in err, err


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipients=st.lists(st.sampled_from(EVERYONE), min_size=1, max_size=4, unique=True)
       .filter(lambda r: any(a in PQ for a in r)),
       sender=st.sampled_from([SENDER, PQ_SENDER]),
       sign=st.sampled_from([[], ["--sign"], ["--sign_detached"]]),
       size=st.integers(0, 20000))
def test_any_mix_with_ml_kem_decrypts_for_everyone(pq, osl, tmp_path, recipients, sender,
                                                   sign, size):
    """Random mixes including ML-KEM: OpenSSL 3.6 decrypts every copy (the sender's own
    copy too: ML-KEM for PQ_SENDER); our --decrypt opens the ML-KEM ones."""
    body = b"".join(b"line %d of the post-quantum property\r\n" % n
                    for n in range(size // 40 + 1))  # whole lines: no quoted-printable
    out = build(pq, tmp_path, message(sender, recipients, body), sign + ["--encrypt"]).stdout
    der = der_of(out)
    for who in set(recipients) | {sender}:
        assert body.replace(b"\r\n", b"\n") in opened(osl, pq, der, who, sign), who
    for who in [r for r in recipients if r in PQ][:1]:
        eml = tmp_path / "in.eml"
        eml.write_bytes(out)
        proc = run_tool(["--decrypt", str(eml), "--keys", solo_keys(pq, tmp_path, who),
                         "--ca", pq.cafile])
        assert proc.returncode == 0, proc.stderr


def test_ml_kem_512_is_refused_by_name(pq, osl, tmp_path):
    """cryptography has no ML-KEM-512: 78, naming it (not 'a type this tool cannot read')."""
    address = "kem512@pq.example"
    cert = osl.certify(osl.public_key(osl.genkey("ML-KEM-512")), pem_cert(pq.inter.cert),
                       pem_key(pq.inter.key), address)
    write(os.path.join(pq.keys, address + ".crt"), cert)
    proc = build(pq, tmp_path, message(SENDER, [address]), ["--encrypt"], ok=78)
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "ML-KEM-512" in err and address + ".crt" in err, err


def test_unknown_key_algorithm_is_named_by_oid(pq, osl, tmp_path):
    address = "slh@pq.example"
    cert = osl.certify(osl.public_key(osl.genkey("SLH-DSA-SHA2-128s")),
                       pem_cert(pq.inter.cert), pem_key(pq.inter.key), address)
    write(os.path.join(pq.keys, address + ".crt"), cert)
    proc = build(pq, tmp_path, message(SENDER, [address]), ["--encrypt"], ok=78)
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "2.16.840.1.101.3.4.3.20" in err, err


def test_ml_kem_certificate_without_key_encipherment_is_refused(pq, tmp_path):
    address = "kem-no-ku@pq.example"
    ku = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    _, cert = pq.inter.issue(address, mlkem.MLKEM768PrivateKey.generate(), key_usage=ku)
    write(os.path.join(pq.keys, address + ".crt"), pem_cert(cert))
    proc = build(pq, tmp_path, message(SENDER, [address]), ["--encrypt"], ok=78)
    assert b"does not allow key encipherment" in proc.stderr


def test_pq_only_refuses_classical_copies(pq, tmp_path):
    """--pq_only: 78 naming each classical recipient and a classical own copy."""
    proc = build(pq, tmp_path, message(SENDER, [KEM768, RSA, EC]),
                 ["--sign", "--encrypt", "--pq_only"], ok=78)
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "--pq_only" in err and proc.stdout == b""
    assert RSA in err and EC in err and SENDER + " (own copy" in err and KEM768 not in err


@pytest.mark.parametrize("sign", [[], ["--sign"], ["--sign_detached"]])
def test_pq_only_accepts_an_all_ml_kem_message(pq, osl, tmp_path, sign):
    """Every recipient ML-KEM and the sender's own copy to its ML-KEM <from>.crt (not to
    its RSA signing certificate): built, no warning, only KEMRecipientInfos."""
    proc = build(pq, tmp_path, message(PQ_SENDER, [KEM768, KEM1024]),
                 sign + ["--encrypt", "--pq_only"])
    assert proc.stderr == b""
    der = der_of(proc.stdout)
    printed = osl.openssl(["cms", "-cmsout", "-print", "-inform", "DER"], der).stdout.decode()
    assert printed.count("d.kemri:") == 3 and "d.ktri:" not in printed
    assert b"Hello from a post-quantum test.\n" in opened(osl, pq, der, PQ_SENDER, sign)


def test_pq_only_needs_encrypt(pq, tmp_path):
    proc = build(pq, tmp_path, message(SENDER, [KEM768]), ["--sign", "--pq_only"], ok=64)
    assert b"--pq_only" in proc.stderr


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_mixed_recipients_warned_once_per_run(pq, tmp_path, jobs):
    """Classical copies beside post-quantum ones: one warning for the whole run, naming
    them, with how many messages had them (each of the two workers meets one); none for a
    message that is all post-quantum or all classical."""
    inputs = []
    for n, to in enumerate([[KEM768, RSA], [KEM1024, EC], [RSA], [KEM768]]):
        path = tmp_path / ("m%d.eml" % n)
        path.write_bytes(message(PQ_SENDER if to == [KEM768] else SENDER, to))
        inputs.append(str(path))
    out = tmp_path / "out"
    out.mkdir()
    proc = run_tool(inputs + ["--keys", pq.keys, "--encrypt", "-o", str(out), "--jobs", jobs])
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.decode().splitlines() if "quantum-safe" in line]
    assert len(warnings) == 1, proc.stderr
    assert "(2 messages in all)" in warnings[0], warnings
    if jobs == "1":
        assert "m0.eml" in warnings[0] and RSA in warnings[0] and SENDER in warnings[0]
    single = run_tool([inputs[3], "--keys", pq.keys, "--encrypt"])
    assert single.returncode == 0 and b"quantum" not in single.stderr
    classical = run_tool([inputs[2], "--keys", pq.keys, "--encrypt"])
    assert classical.returncode == 0 and b"quantum" not in classical.stderr


def test_harvest_saves_the_ml_kem_certificate(pq, tmp_path):
    """Our signed mail carries the sender's ML-KEM <from>.crt beside the signing
    certificate; --harvest saves that post-quantum certificate for the sender's address,
    and a message encrypted with what was harvested is ML-KEM for that address."""
    signed = build(pq, tmp_path, message(PQ_SENDER, [RSA]), ["--sign"]).stdout
    eml = tmp_path / "signed.eml"
    eml.write_bytes(signed)
    keys = tmp_path / "harvested"
    keys.mkdir()
    proc = run_tool(["--harvest", str(eml), "--keys", str(keys), "--ca", pq.cafile])
    assert proc.returncode == 0, proc.stderr
    saved = x509.load_pem_x509_certificates((keys / (PQ_SENDER + ".crt")).read_bytes())
    assert saved[0] == pq.ids[PQ_SENDER][1]
    assert isinstance(saved[0].public_key(), mlkem.MLKEM768PublicKey)


def test_harvested_ml_kem_certificate_replaces_a_classical_one(pq, tmp_path):
    """A classical certificate harvested first (mail signed without the ML-KEM one) is
    replaced by the post-quantum one from later mail, though it expires no earlier."""
    classical_keys = tmp_path / "classical"
    classical_keys.mkdir()
    pem = os.path.join(pq.keys, PQ_SENDER + ".pem")
    write(str(classical_keys / (PQ_SENDER + ".pem")), open(pem, "rb").read())
    harvested = tmp_path / "harvested"
    harvested.mkdir()
    saved = harvested / (PQ_SENDER + ".crt")
    for keys, kind in ((str(classical_keys), "rsa"), (pq.keys, "mlkem")):
        path = tmp_path / ("signed-%s.eml" % kind)
        proc = run_tool(["-", "--keys", keys, "--sign"],
                        stdin=message(PQ_SENDER, [RSA]))
        assert proc.returncode == 0, proc.stderr
        path.write_bytes(proc.stdout)
        proc = run_tool(["--harvest", str(path), "--keys", str(harvested), "--ca", pq.cafile])
        assert proc.returncode == 0, proc.stderr
        cert = x509.load_pem_x509_certificates(saved.read_bytes())[0]
        assert isinstance(cert.public_key(), mlkem.MLKEM768PublicKey) == (kind == "mlkem")
    assert b"replaced" in proc.stdout


@pytest.mark.parametrize("kemri", [
    b"\x02\x01\x00",                                    # a KEMRecipientInfo of one field
    b"\x02\x01\x00" * 10,                               # ... of ten
    b"\x02\x01\x00\x04\x00" + b"\x30\x00" * 6,          # eight fields of the wrong types
])
def test_malformed_kem_recipient_info_is_65(pq, tmp_path, kemri):
    """Hostile KEMRecipientInfo structures: one line, exit 65, never a traceback."""
    import sparkpostSMIME as tool
    ori = tool.der(tool.ctx(4), tool.der_oid(tool.ID_ORI_KEM), tool.der(tool.SEQUENCE, kemri))
    content = tool.der(tool.SEQUENCE, tool.der_oid(tool.ID_DATA),
                       tool.algorithm(tool.AES_CBC[32], tool.der(tool.OCTET_STRING, bytes(16))),
                       tool.der(tool.ctx(0, constructed=False), bytes(32)))
    enveloped = tool.der(tool.SEQUENCE, tool.der_int(3), tool.der_set(ori), content)
    der = tool.der(tool.SEQUENCE, tool.der_oid(tool.ID_ENVELOPED_DATA),
                   tool.der(tool.ctx(0), enveloped))
    eml = tmp_path / "in.eml"
    eml.write_bytes(envelope(KEM768, der))
    proc = run_tool(["--decrypt", str(eml), "--keys", solo_keys(pq, tmp_path, KEM768),
                     "--ca", pq.cafile])
    err = proc.stderr.decode()
    assert proc.returncode == 65 and err.count("\n") == 1, err
