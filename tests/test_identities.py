"""Keys and certificates: lookup order, passphrases, PKCS#12, EC, and every refusal."""

import os
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12, BestAvailableEncryption
from cryptography.x509.oid import ExtendedKeyUsageOID

from support import engines
from support.harness import KEY_PASSWORD, run_tool
from support.corpus import CORPUS
from support.pki import DAY, NOW, new_key, pem_cert, pem_key, write

MSG = CORPUS["plain-ascii"]  # alice@example.com -> bob@example.org
ALICE, BOB = "alice@example.com", "bob@example.org"


def tool(keys, flags, env=None, msg=MSG, cwd=None):
    path = keys.parent / "in.eml"
    path.write_bytes(msg)
    return run_tool([str(path), "--keys", str(keys)] + flags, env=env, cwd=cwd)


def refused(proc, *words, code=78):
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert err.count("\n") == 1, "one line on stderr: " + err
    for word in words:
        assert word in err, err
    assert proc.stdout == b""


def replace_cert(pki, keys, address, **kw):
    key, cert = pki.inter.issue(address, **kw)
    write(str(keys / (address + ".pem")), pem_key(key))
    write(str(keys / (address + ".crt")), pem_cert(cert, pki.inter.cert))


def test_good_identity_signs(keys, openssl, pki):
    proc = tool(keys, ["--sign", "--encrypt"])
    assert proc.returncode == 0, proc.stderr
    signed = openssl.decrypt(proc.stdout, pki.cert_path(BOB), pki.key_path(BOB))
    assert b"Just text." in openssl.verify(signed, pki.cafile)


@pytest.mark.parametrize("case,kw,words", [
    ("expired", dict(not_before=NOW - 400 * DAY, not_after=NOW - DAY), ["expired"]),
    ("future", dict(not_before=NOW + 10 * DAY), ["not valid yet"]),
    ("wrong-address", dict(san=True), ["issued to mallory@example.com"]),
    ("no-signing-usage", dict(key_usage=x509.KeyUsage(False, False, True, False, False, False,
                                                       False, False, False)),
     ["digital signatures"]),
    ("server-eku", dict(eku=x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])),
     ["e-mail protection"]),
])
def test_signer_certificate_refusals(pki, keys, case, kw, words):
    if case == "wrong-address":
        key, cert = pki.inter.issue("mallory@example.com")
        write(str(keys / (ALICE + ".pem")), pem_key(key))
        write(str(keys / (ALICE + ".crt")), pem_cert(cert))
    else:
        replace_cert(pki, keys, ALICE, **kw)
    refused(tool(keys, ["--sign"]), ALICE, ".crt", *words)


def test_subject_email_is_used_without_san(pki, keys, openssl):
    replace_cert(pki, keys, ALICE, san=False, subject_email=True)
    proc = tool(keys, ["--sign_detached"])
    assert proc.returncode == 0, proc.stderr
    openssl.verify(proc.stdout, pki.cafile)


def test_no_usage_extensions_is_fine(pki, keys):
    replace_cert(pki, keys, ALICE, key_usage=None, eku=None)
    assert tool(keys, ["--sign"]).returncode == 0


def test_key_does_not_match_certificate(pki, keys):
    write(str(keys / (ALICE + ".pem")), pem_key(new_key()))
    refused(tool(keys, ["--sign"]), ALICE, "does not match the private key")


def test_missing_key_and_certificate(pki, keys):
    os.remove(keys / (ALICE + ".pem"))
    refused(tool(keys, ["--sign"]), "no private key for " + ALICE, ".pem")
    os.remove(keys / (BOB + ".crt"))
    refused(tool(keys, ["--encrypt"]), "no certificate for recipient " + BOB, BOB + ".crt")


def test_key_only_pem_needs_crt(pki, keys):
    os.remove(keys / (ALICE + ".crt"))
    refused(tool(keys, ["--sign"]), "no certificate for " + ALICE)


def test_pem_holding_key_and_chain(pki, keys, openssl):
    key, cert = pki.ids[ALICE]
    os.remove(keys / (ALICE + ".crt"))
    write(str(keys / (ALICE + ".pem")), pem_key(key) + pem_cert(cert, pki.inter.cert))
    proc = tool(keys, ["--sign"])
    assert proc.returncode == 0, proc.stderr
    openssl.verify(proc.stdout, pki.cafile)


def test_encrypted_key_and_password(pki, keys, openssl):
    engines.plant_secret(KEY_PASSWORD)
    key, _ = pki.ids[ALICE]
    write(str(keys / (ALICE + ".pem")), pem_key(key, KEY_PASSWORD.encode()))
    refused(tool(keys, ["--sign"]), "encrypted", "SMIME_KEY_PASSWORD")
    refused(tool(keys, ["--sign"], env={"SMIME_KEY_PASSWORD": "wrong-one"}),
            "wrong SMIME_KEY_PASSWORD")
    proc = tool(keys, ["--sign"], env={"SMIME_KEY_PASSWORD": KEY_PASSWORD})
    assert proc.returncode == 0, proc.stderr
    openssl.verify(proc.stdout, pki.cafile)


def test_pkcs12_identity(pki, keys, openssl):
    key, cert = pki.ids[ALICE]
    os.remove(keys / (ALICE + ".pem"))
    os.remove(keys / (ALICE + ".crt"))
    blob = pkcs12.serialize_key_and_certificates(b"alice", key, cert, [pki.inter.cert],
                                                 BestAvailableEncryption(KEY_PASSWORD.encode()))
    write(str(keys / (ALICE + ".p12")), blob)
    refused(tool(keys, ["--sign"]), ALICE + ".p12", "SMIME_KEY_PASSWORD")
    proc = tool(keys, ["--sign", "--encrypt"], env={"SMIME_KEY_PASSWORD": KEY_PASSWORD})
    assert proc.returncode == 0, proc.stderr
    signed = openssl.decrypt(proc.stdout, pki.cert_path(ALICE), pki.key_path(ALICE))
    openssl.verify(signed, pki.cafile)


def test_ec_signer(pki, keys, openssl):
    replace_cert(pki, keys, ALICE, key=new_key("ec"))
    proc = tool(keys, ["--sign_detached"])
    assert proc.returncode == 0, proc.stderr
    assert b"Just text." in openssl.verify(proc.stdout, pki.cafile)


def test_recipient_certificate_checked(pki, keys):
    replace_cert(pki, keys, BOB, not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    refused(tool(keys, ["--encrypt"]), BOB, "expired")


def test_sender_copy_included_when_available(pki, keys, openssl):
    os.remove(keys / (ALICE + ".pem"))
    proc = tool(keys, ["--encrypt"])
    assert proc.returncode == 0
    assert b"Just text." in openssl.decrypt(proc.stdout, pki.cert_path(ALICE), pki.key_path(ALICE))
    os.remove(keys / (ALICE + ".crt"))
    proc = tool(keys, ["--encrypt"])
    assert proc.returncode == 0  # no sender certificate: only the recipients can read it
    assert b"Just text." in openssl.decrypt(proc.stdout, pki.cert_path(BOB), pki.key_path(BOB))


def test_search_order(pki, keys, tmp_path, openssl):
    """--keys first, then $SMIME_KEYS_DIR (":"-separated), then the current directory."""
    bad = tmp_path / "bad"
    bad.mkdir()
    write(str(bad / (ALICE + ".pem")), pem_key(new_key()))  # mismatching key
    shutil.copy(keys / (ALICE + ".crt"), bad / (ALICE + ".crt"))
    # env dir after --keys: the good key in --keys wins
    proc = tool(keys, ["--sign"], env={"SMIME_KEYS_DIR": str(bad)})
    assert proc.returncode == 0
    # no --keys: the first env dir holding the file wins
    msg = keys.parent / "in.eml"
    proc = run_tool([str(msg), "--sign"], env={"SMIME_KEYS_DIR": "%s:%s" % (keys, bad)})
    assert proc.returncode == 0
    proc = run_tool([str(msg), "--sign"], env={"SMIME_KEYS_DIR": "%s:%s" % (bad, keys)})
    refused(proc, "does not match")
    # nothing configured: the current directory, as the original tool did
    proc = run_tool([str(msg), "--sign"], cwd=str(keys))
    assert proc.returncode == 0


@pytest.mark.parametrize("sender", [
    "../../etc/passwd@example.com", "a/b@example.com", "x@..", ".hidden@example.com",
    "a..b@example.com",
])
def test_addresses_never_escape_the_key_directory(keys, sender):
    msg = MSG.replace(b"From: Alice Example <alice@example.com>",
                      b"From: <" + sender.encode() + b">")
    proc = tool(keys, ["--sign"], msg=msg)
    assert proc.returncode == 65  # the address cannot name a key file
    assert "cannot name a key file" in proc.stderr.decode()
    assert proc.stdout == b""
    assert "Traceback" not in proc.stderr.decode()


def test_uppercase_addresses_use_lowercase_files(keys, openssl, pki):
    msg = MSG.replace(b"alice@example.com", b"Alice@Example.COM").replace(
        b"bob@example.org", b"BOB@example.org")
    proc = tool(keys, ["--sign", "--encrypt"], msg=msg)
    assert proc.returncode == 0, proc.stderr
    openssl.decrypt(proc.stdout, pki.cert_path(BOB), pki.key_path(BOB))


@pytest.mark.parametrize("argv,words", [
    (["x.eml", "--bogus"], "unrecognized arguments"),
    (["x.eml", "--sign", "--sign_detached"], "not allowed with"),
    (["x.eml", "--cipher", "des"], "invalid choice"),
    ([], "required"),
])
def test_usage_errors_exit_64(argv, words):
    refused(run_tool(argv), words, code=64)


def test_input_errors(tmp_path, keys):
    refused(run_tool([str(tmp_path / "missing.eml")]), "missing.eml", "cannot read", code=66)
    refused(run_tool([str(tmp_path)]), "directory holds no .eml files", code=66)
    batch = tmp_path / "batch"
    batch.mkdir()
    for name in ("a.eml", "b.eml"):
        (batch / name).write_bytes(b"From: a@example.com\nTo: b@example.com\n\nx\n")
    refused(run_tool([str(batch)]), "need -o DIR", code=64)  # two messages, one stdout
    os.symlink(tmp_path / "nowhere.eml", tmp_path / "unreadable.eml")  # unreadable, even by root
    refused(run_tool([str(tmp_path / "unreadable.eml")]), "cannot read", code=66)
    (tmp_path / "empty.eml").write_bytes(b"")
    refused(run_tool([str(tmp_path / "empty.eml")]), "empty", code=65)
    (tmp_path / "bin.eml").write_bytes(b"\x00\x01\x02binary\xff")
    refused(run_tool([str(tmp_path / "bin.eml")]), "not an RFC 5322 message", code=65)
    (tmp_path / "nofrom.eml").write_bytes(b"To: bob@example.org\n\nhi\n")
    refused(run_tool([str(tmp_path / "nofrom.eml")]), "no From", code=65)
    (tmp_path / "norcpt.eml").write_bytes(b"From: alice@example.com\n\nhi\n")
    refused(run_tool([str(tmp_path / "norcpt.eml")]), "no recipient", code=65)
    (tmp_path / "badrcpt.eml").write_bytes(b"From: alice@example.com\nTo: not an address\n\nhi\n")
    refused(run_tool([str(tmp_path / "badrcpt.eml")]), "not a valid e-mail address", code=65)


def test_several_inputs_to_directory(pki, keys, tmp_path, openssl):
    out = tmp_path / "out"
    out.mkdir()
    a, b = tmp_path / "a.eml", tmp_path / "b.eml"
    a.write_bytes(MSG)
    b.write_bytes(CORPUS["eightbit-lf"])
    proc = run_tool([str(a), str(b), "--keys", str(keys), "--sign", "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["a.eml", "b.eml"]
    openssl.verify((out / "b.eml").read_bytes(), pki.cafile)
    refused(run_tool([str(a), str(b)]), "-o DIR", code=64)


def test_two_inputs_of_one_name_refused_for_a_directory(keys, tmp_path):
    """Nothing lost (review): a/m.eml and b/m.eml into one -o DIR would leave one file for
    two messages reported written; the run is refused before writing anything."""
    out = tmp_path / "out"
    out.mkdir()
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "m.eml").write_bytes(MSG)
    first, second = str(tmp_path / "a" / "m.eml"), str(tmp_path / "b" / "m.eml")
    for flags in (["--sign"], ["--verify"]):
        proc = run_tool([first, second, "--keys", str(keys), "-o", str(out)] + flags)
        refused(proc, first, second, str(out / "m.eml"), code=64)
    assert os.listdir(out) == []


def test_corrupt_key_and_certificate(pki, keys):
    good_key = (keys / (ALICE + ".pem")).read_bytes()
    (keys / (ALICE + ".pem")).write_bytes(good_key[:200] + b"garbage" + good_key[400:])
    refused(tool(keys, ["--sign"]), ALICE + ".pem", "cannot be read")
    (keys / (ALICE + ".pem")).write_bytes(good_key)
    (keys / (BOB + ".crt")).write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                                        b"-----END CERTIFICATE-----\n")
    refused(tool(keys, ["--encrypt"]), BOB + ".crt", "not a readable PEM or DER certificate")
    (keys / (BOB + ".crt")).write_bytes(b"\x30\x03\x02\x01\x00")  # DER, but no certificate
    refused(tool(keys, ["--encrypt"]), BOB + ".crt", "not a readable PEM or DER certificate")
