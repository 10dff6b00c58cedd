"""Renewals: an own certificate expired, not yet valid or expiring soon; several
certificates for one address (the old one and its renewal) in <address>.crt, for
encrypting, signing, decrypting and --harvest."""

import os
import shutil

import pytest

from support.harness import run_tool
from support.corpus import CORPUS
from support.pki import DAY, NOW, pem_cert, pem_key, write

ALICE, BOB = "alice@example.com", "bob@example.org"
MSG = CORPUS["plain-ascii"]  # alice -> bob


def tool(keys, flags, inputs=1):
    paths = []
    for n in range(inputs):
        path = keys.parent / ("in%d.eml" % n)
        path.write_bytes(MSG)
        paths.append(str(path))
    return run_tool(paths + ["--keys", str(keys)] + flags)


def own(pki, keys, **kw):
    key, cert = pki.inter.issue(ALICE, **kw)
    write(str(keys / (ALICE + ".pem")), pem_key(key))
    write(str(keys / (ALICE + ".crt")), pem_cert(cert, pki.inter.cert))
    return key, cert


@pytest.mark.parametrize("kw,words", [
    (dict(not_before=NOW - 400 * DAY, not_after=NOW - DAY), "has expired"),
    (dict(not_before=NOW + 2 * DAY), "is not valid yet")])
def test_signing_with_an_own_certificate_not_valid_now(pki, keys, kw, words):
    own(pki, keys, **kw)
    proc = tool(keys, ["--sign"])
    assert proc.returncode == 78, proc.stderr
    assert words in proc.stderr.decode() and ALICE in proc.stderr.decode()
    assert proc.stdout == b""


def test_expiring_own_certificate_warns_once_per_run(pki, keys, tmp_path, openssl):
    _, cert = own(pki, keys, not_after=NOW + 10 * DAY)
    out = tmp_path / "out"
    out.mkdir()
    proc = tool(keys, ["--sign", "-o", str(out)], inputs=3)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert err.count("expires on %s" % cert.not_valid_after_utc.date()) == 1, err
    assert "renew it" in err and len(os.listdir(out)) == 3
    own(pki, keys, not_after=NOW + 60 * DAY)
    proc = tool(keys, ["--sign"])
    assert proc.returncode == 0 and b"expires" not in proc.stderr


def test_encryption_uses_the_current_renewal(pki, keys, tmp_path, openssl):
    """bob.crt holds an expired one, the old one (valid, expires soon) and the renewed one
    (another key, expires later), in that order and reversed: the renewed one is used."""
    expired_key, expired = pki.inter.issue(BOB, not_before=NOW - 400 * DAY,
                                           not_after=NOW - DAY)
    old_key, old = pki.inter.issue(BOB, not_after=NOW + 20 * DAY)
    new_key_, new = pki.inter.issue(BOB, not_after=NOW + 700 * DAY)
    files = {name: write(str(tmp_path / name), data) for name, data in (
        ("old.pem", pem_key(old_key)), ("old.crt", pem_cert(old)),
        ("new.pem", pem_key(new_key_)), ("new.crt", pem_cert(new)))}
    for order in ([expired, old, new], [new, old, expired]):
        write(str(keys / (BOB + ".crt")), pem_cert(*order, pki.inter.cert))
        proc = tool(keys, ["--encrypt"])
        assert proc.returncode == 0, proc.stderr
        assert b"Just text." in openssl.decrypt(proc.stdout, files["new.crt"], files["new.pem"])
        with pytest.raises(AssertionError):
            openssl.decrypt(proc.stdout, files["old.crt"], files["old.pem"])


def test_only_expired_certificates_refuse_naming_the_latest(pki, keys):
    _, first = pki.inter.issue(BOB, not_before=NOW - 800 * DAY, not_after=NOW - 400 * DAY)
    _, last = pki.inter.issue(BOB, not_before=NOW - 400 * DAY, not_after=NOW - 2 * DAY)
    write(str(keys / (BOB + ".crt")), pem_cert(first, last, pki.inter.cert))
    proc = tool(keys, ["--encrypt"])
    assert proc.returncode == 78
    assert "has expired (on %s)" % last.not_valid_after_utc.date() in proc.stderr.decode()


def test_signing_picks_the_renewal_of_the_same_key(pki, keys, tmp_path, openssl):
    """The same key certified twice (a renewal keeping the key): the current certificate
    signs, and mail encrypted to the old certificate still decrypts."""
    key, old = pki.inter.issue(ALICE, not_after=NOW + 20 * DAY)
    _, new = pki.inter.issue(ALICE, key=key, not_after=NOW + 700 * DAY)
    write(str(keys / (ALICE + ".pem")), pem_key(key))
    write(str(keys / (ALICE + ".crt")), pem_cert(old, pki.inter.cert))
    bob_keys = tmp_path / "bobs"
    bob_keys.mkdir()
    shutil.copy(keys / (ALICE + ".crt"), bob_keys / (ALICE + ".crt"))
    note = (b"From: bob@example.org\r\nTo: alice@example.com\r\nSubject: old\r\n\r\n"
            b"Sent before the renewal.\r\n")
    (tmp_path / "note.eml").write_bytes(note)
    sealed = run_tool([str(tmp_path / "note.eml"), "--keys", str(bob_keys), "--encrypt"])
    assert sealed.returncode == 0, sealed.stderr
    write(str(keys / (ALICE + ".crt")), pem_cert(old, new, pki.inter.cert))
    proc = tool(keys, ["--sign"])
    assert proc.returncode == 0, proc.stderr
    assert b"expires" not in proc.stderr  # the renewed one signs, not the expiring one
    signer = openssl.verify(proc.stdout, pki.cafile)
    assert b"Just text." in signer
    (tmp_path / "sealed.eml").write_bytes(sealed.stdout)
    write(str(keys / (ALICE + ".crt")), pem_cert(new, old, pki.inter.cert))
    proc = run_tool(["--decrypt", str(tmp_path / "sealed.eml"), "--keys", str(keys),
                     "--ca", pki.cafile])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - decrypted for " + ALICE.encode())
