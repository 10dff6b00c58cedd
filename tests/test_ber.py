"""The BER reader (X.690) under the CMS structures: a field never runs past the one
holding it, no field where the ASN.1 has none, constructed OCTET STRINGs read where BER
allows them, and DER re-encoding of what a KDF takes (RFC 9629 5).  End to end on
ML-KEM messages our --encrypt made, re-encoded in legal (or not) BER."""

import base64

import pytest

from support import engines
import sparkpostSMIME as tool
from support.harness import run_tool
from support.pki import new_key, pem_cert, pem_key, write

KEM = "kem768@ber.example"
BODY = b"Hello through BER.\r\n"


@pytest.fixture(scope="module")
def kem(pki, tmp_path_factory):
    """An ML-KEM-768 recipient's key directory and a message --encrypt made for it."""
    base = tmp_path_factory.mktemp("ber")
    key, cert = pki.inter.issue(KEM, new_key("mlkem768"))
    keys = base / "keys"
    keys.mkdir()
    write(str(keys / (KEM + ".pem")), pem_key(key))
    write(str(keys / (KEM + ".crt")), pem_cert(cert, pki.inter.cert))
    eml = base / "in.eml"
    eml.write_bytes(b"From: nobody@example.com\r\nTo: %s\r\nSubject: ber\r\n"
                    b"Content-Type: text/plain\r\n\r\n%s" % (KEM.encode(), BODY))
    out = run_tool([str(eml), "--encrypt", "--keys", str(keys)])
    assert out.returncode == 0, out.stderr
    return {"keys": str(keys), "out": out.stdout, "base": base, "cafile": pki.cafile}


def rewrite(item, change):
    """Return BER element *item* re-encoded, definite lengths, with change(item) (bytes or
    None: no change) applied to every element inside."""
    replaced = change(item)
    if replaced is not None:
        return replaced
    if not item.constructed:
        return bytes(item.raw)
    return tool.der(item.tag, *(rewrite(child, change) for child in item.each()))


def constructed(octets, size=7):
    """A constructed OCTET STRING of *octets* in pieces of *size* (X.690 8.7.3), indefinite."""
    pieces = [tool.der(tool.OCTET_STRING, octets[n:n + size]) for n in range(0, len(octets), size)]
    return b"\x24\x80" + b"".join(pieces) + b"\0\0"


def indefinite(item):
    """*item* (a constructed Ber) with an indefinite length, its elements unchanged."""
    return bytes([item.tag, 0x80]) + b"".join(bytes(c.raw) for c in item.each()) + b"\0\0"


def kem_fields(kemri):
    """The encodings of a KEMRecipientInfo's fields, by name (RFC 9629 3; no ukm)."""
    names = ("version", "rid", "kem", "kemct", "kdf", "kekLength", "wrap", "encryptedKey")
    items = kemri.children()
    assert len(items) == len(names)
    return {name: bytes(item.raw) for name, item in zip(names, items)}, items


def with_kemri(kem, build):
    """The message of *kem* with its KEMRecipientInfo replaced by build(fields, items) ->
    the new OtherRecipientInfo's contents after the OID; returns the decrypt run."""
    out = kem["out"]
    der = engines.der_of(out[out.index(b"Content-Type: application/pkcs7-mime"):])

    def change(item):
        if item.tag == tool.ctx(4):
            oid, kemri = item.children()
            return tool.der(tool.ctx(4), bytes(oid.raw), build(*kem_fields(kemri)))
        return None
    new = rewrite(tool.Ber(der), change)
    head = out[:out.index(b"\r\n\r\n", out.index(b"Content-Type: application/pkcs7-mime"))]
    eml = kem["base"] / "changed.eml"
    eml.write_bytes(head + b"\r\n\r\n" + base64.encodebytes(new).replace(b"\n", b"\r\n"))
    return run_tool(["--decrypt", str(eml), "--keys", kem["keys"], "--ca", kem["cafile"]])


def sequence(*parts):
    return tool.der(tool.SEQUENCE, *parts)


def test_unchanged_decrypts(kem):
    proc = with_kemri(kem, lambda f, items: sequence(*f.values()))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - decrypted for " + KEM.encode())


def test_legal_ber_decrypts(kem):
    """kemct and encryptedKey as constructed OCTET STRINGs, the wrap AlgorithmIdentifier
    and the KEMRecipientInfo itself with indefinite lengths: the KDF gets the wrap's DER."""
    def build(f, items):
        f["kemct"] = constructed(items[3].octets())
        f["encryptedKey"] = constructed(items[7].octets(), 5)
        f["wrap"] = indefinite(items[6])
        return b"\x30\x80" + b"".join(f.values()) + b"\0\0"
    proc = with_kemri(kem, build)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - decrypted for " + KEM.encode())


def test_a_field_running_past_its_container_is_refused(kem):
    """A ukm [0] whose OCTET STRING claims 13 octets more than the [0] holds (reading the
    next field as ukm): refused as malformed, as OpenSSL does ("too long")."""
    def build(f, items):
        ukm = b"\xa0\x02\x04\x0d"  # [0] of 2 octets: an OCTET STRING header claiming 13
        return sequence(f["version"], f["rid"], f["kem"], f["kemct"], f["kdf"],
                        f["kekLength"], ukm, f["wrap"], f["encryptedKey"])
    proc = with_kemri(kem, build)
    err = proc.stderr.decode()
    assert proc.returncode == 65 and err.count("\n") == 1, err
    assert "runs past the end" in err, err


@pytest.mark.parametrize("where", ["ori", "kemri", "ukm"])
def test_a_field_the_asn1_does_not_have_is_refused(kem, where):
    def build(f, items):
        parts = list(f.values())
        if where == "ukm":
            parts.insert(6, tool.der(tool.ctx(0), tool.der(tool.OCTET_STRING, b"u"),
                                     b"\x05\x00"))
        kemri = sequence(*parts, b"\x05\x00" if where == "kemri" else b"")
        return kemri + (b"\x05\x00" if where == "ori" else b"")
    proc = with_kemri(kem, build)
    err = proc.stderr.decode()
    assert proc.returncode == 65 and err.count("\n") == 1, err
    assert "malformed" in err and ("a field too many" in err or "unlike RFC 9629" in err), err


def test_reader_units():
    with pytest.raises(ValueError, match="runs past"):
        tool.Ber(b"\x30\x03\x04\x05abcdefgh").children()
    nested = b"\x24\x80" + constructed(b"abcdefghijklmnop", 3) + b"\x04\x01q\0\0"
    assert tool.Fields(tool.Ber(b"\x30\x80" + nested + b"\0\0")).take(
        tool.OCTET_STRING).octets() == b"abcdefghijklmnopq"
    ber = b"\x30\x80\x06\x09\x60\x86\x48\x01\x65\x03\x04\x01\x2d\x24\x80\x04\x01\x01\0\0\0\0"
    assert tool.der_encoding(tool.Ber(ber)) == bytes.fromhex(
        "300e060960864801650304012d040101")
    with pytest.raises(ValueError):  # more elements than MAX_BER_ELEMENTS: bounded
        tool.Ber(b"\x24\x80" + b"\x04\x00" * (tool.MAX_BER_ELEMENTS + 1) + b"\0\0").octets()
