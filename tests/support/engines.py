"""Independent S/MIME engines (OpenSSL, NSS cmsutil, GnuPG gpgsm) and MIME helpers.

Our output is checked by these, never by our own code.
"""

import base64
import email
import email.policy
import os
import re
import subprocess
import tempfile

#: Every stdout+stderr the tool produced in this test session (scanned for secrets).
OUTPUTS = []
#: Byte strings that must never appear in any output (extended by tests that plant secrets).
SECRETS = set()

P12_PASSWORD = "p12-test-only"


def plant_secret(text):
    """Register *text* (and its base64 forms) as a secret that must never be printed."""
    raw = text.encode()
    SECRETS.add(raw)
    SECRETS.add(base64.b64encode(raw))
    return text


def run(cmd, data=None, ok=(0,), **kw):
    proc = subprocess.run(cmd, input=data, capture_output=True, timeout=120, **kw)
    assert proc.returncode in ok, "%s -> %d\n%s" % (" ".join(cmd), proc.returncode,
                                                     proc.stderr.decode(errors="replace"))
    return proc


# -- MIME helpers ------------------------------------------------------------

def parse(data):
    return email.message_from_bytes(data, policy=email.policy.compat32)


def der_of(entity):
    """Return the DER inside an application/pkcs7-mime entity (bytes)."""
    return parse(entity).get_payload(decode=True)


def split_signed(entity):
    """Return (exact signed content bytes, signature DER) of a multipart/signed entity."""
    msg = parse(entity)
    boundary = msg.get_param("boundary").encode()
    body = entity.split(b"\r\n\r\n", 1)[1]
    parts = body.split(b"\r\n--" + boundary)
    first = body.index(b"--" + boundary + b"\r\n") + len(boundary) + 4
    content = body[first:body.index(b"\r\n--" + boundary, first)]
    sig = parse(parts[-2].split(b"\r\n", 1)[1]).get_payload(decode=True)
    return content, sig


def leaves(data):
    """Return [(content type, filename, decoded payload with LF endings)] of every leaf.

    Embedded messages (message/rfc822) are descended into, their Subject included.
    """
    return _leaves(email.message_from_bytes(data, policy=email.policy.default))


def _leaves(msg):
    out = []
    for part in msg.walk():
        if part.is_multipart() and part.get_content_type() != "message/rfc822":
            continue
        if part.get_content_type() == "message/rfc822":
            inner = part.get_payload()
            inner = inner[0] if isinstance(inner, list) else parse(inner.encode())
            out.append(("message/rfc822", str(inner["subject"]), None))
            out.extend(_leaves(inner))
            break
        payload = part.get_payload(decode=True) or b""
        out.append((part.get_content_type(), part.get_filename(),
                    payload.replace(b"\r\n", b"\n")))
    return out


def header_text(msg, name):
    """Return a header's value with RFC 2047 words decoded."""
    from email.header import decode_header, make_header
    value = msg.get(name)
    return "" if value is None else str(make_header(decode_header(value)))


def check_transport_safe(data):
    """Assert the RFC 5322 / RFC 8551 rules our output promises."""
    assert data.isascii(), "output is not 7-bit"
    assert b"\x00" not in data
    assert not re.search(rb"(?<!\r)\n|\r(?!\n)", data), "bare LF or CR in output"
    for line in data.split(b"\r\n"):
        assert len(line) <= 998, "line longer than 998 octets"


def inner_content_safe(content):
    """Assert signed content cannot be altered by relays (7-bit, no From, no trailing ws)."""
    check_transport_safe(content)
    assert not re.search(rb"(?m)^From ", content), "a line starts with 'From '"
    assert not re.search(rb"[ \t]\r\n", content), "trailing white space in signed content"


def verify_signed(engine, signed):
    """Verify a signed message or entity with NSS or gpgsm; return the signed content.

    Both engines check the signature and the chain to the test root: NSS reports its
    verdict in a status line checked here, gpgsm.verify() checks its own status lines.
    """
    detached = parse(signed).get_content_type() == "multipart/signed"
    if detached:
        content, sig = split_signed(signed)
        args = (sig, content)
    else:
        args = (der_of(signed),)
    if isinstance(engine, NSS):
        status, out = engine.verify(*args)
        assert "signer0.status=GoodSignature" in status, status
        return content if detached else out
    return engine.verify(*args)


# -- OpenSSL -------------------------------------------------------------------

class OpenSSL:
    def decrypt(self, message, cert_path, key_path):
        """Decrypt with -binary: the exact bytes inside the envelope."""
        return run(["openssl", "cms", "-decrypt", "-binary", "-recip", cert_path,
                    "-inkey", key_path], message).stdout

    def verify(self, entity, cafile):
        """Verify an S/MIME signed entity; return the exact signed content.

        -binary keeps opaque content byte-exact; for multipart/signed OpenSSL reads
        the parts in text mode (its -binary mishandles the CRLF before the boundary),
        so the content returned is the exact first part, once verified.
        """
        detached = parse(entity).get_content_type() == "multipart/signed"
        cmd = ["openssl", "cms", "-verify", "-CAfile", cafile, "-purpose", "smimesign"]
        out = run(cmd + ([] if detached else ["-binary"]), entity).stdout
        return split_signed(entity[entity.index(b"Content-Type: multipart/signed"):])[0] \
            if detached else out

    def cms_print(self, entity):
        return run(["openssl", "cms", "-cmsout", "-print", "-inform", "SMIME"],
                   entity).stdout.decode()


# -- NSS -----------------------------------------------------------------------

def legacy_p12(pki, address, path):
    """Write a PKCS#12 with legacy (3DES/SHA-1) protection that gpgsm 2.2 can import."""
    run(["openssl", "pkcs12", "-export", "-certpbe", "PBE-SHA1-3DES", "-keypbe",
         "PBE-SHA1-3DES", "-macalg", "sha1", "-in", pki.cert_path(address),
         "-inkey", pki.key_path(address), "-out", path, "-passout", "pass:" + P12_PASSWORD,
         "-name", address])
    return path


class NSS:
    """An NSS database holding every test identity, the test root trusted."""

    def __init__(self, base, pki):
        self.db = "sql:" + base
        run(["certutil", "-N", "-d", self.db, "--empty-password"])
        for address in pki.ids:
            p12 = legacy_p12(pki, address, os.path.join(base, address + ".p12"))
            run(["pk12util", "-i", p12, "-d", self.db, "-W", P12_PASSWORD])
        run(["certutil", "-A", "-d", self.db, "-n", "test-root", "-t", "C,C,C",
             "-i", pki.cafile])
        run(["certutil", "-A", "-d", self.db, "-n", "test-inter", "-t", ",,",
             "-i", write_tmp(base, "inter.crt", pki.inter.cert)])

    def decrypt(self, der):
        with tempfile.NamedTemporaryFile() as fh:
            fh.write(der)
            fh.flush()
            return run(["cmsutil", "-D", "-i", fh.name, "-d", self.db]).stdout

    def verify(self, der, content=None):
        """Return cmsutil's signer status line(s) for a SignedData (detached: *content*)."""
        with tempfile.TemporaryDirectory() as tmp:
            sig = os.path.join(tmp, "sig.der")
            with open(sig, "wb") as fh:
                fh.write(der)
            cmd = ["cmsutil", "-D", "-i", sig, "-d", self.db, "-u", "4"]
            if content is not None:
                with open(os.path.join(tmp, "content"), "wb") as fh:
                    fh.write(content)
                cmd += ["-c", os.path.join(tmp, "content")]
            status = run(cmd + ["-h", "1", "-n"]).stdout.decode()
            run(cmd + ["-o", os.path.join(tmp, "out")], ok=(0, 1))  # 1: bad signature
            with open(os.path.join(tmp, "out"), "rb") as fh:
                return status, fh.read()


def write_tmp(base, name, cert):
    from cryptography.hazmat.primitives import serialization
    path = os.path.join(base, name)
    with open(path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    return path


# -- GnuPG gpgsm ---------------------------------------------------------------

PINENTRY = """#!/bin/sh
# TEST-ONLY pinentry: answers every GETPIN with the test PKCS#12 password.
echo "OK stub pinentry"
while read -r cmd rest; do
  case "$cmd" in
    GETPIN) echo "D %s"; echo OK;;
    BYE) echo OK; exit 0;;
    *) echo OK;;
  esac
done
"""


class GpgSM:
    """A private GNUPGHOME with every test identity and the test root trusted."""

    def __init__(self, base, pki):
        self.home = os.path.join(base, "h")
        os.makedirs(self.home, mode=0o700)
        stub = os.path.join(base, "pinentry.sh")
        with open(stub, "w") as fh:
            fh.write(PINENTRY % P12_PASSWORD)
        os.chmod(stub, 0o755)
        self._conf("gpg-agent.conf", "pinentry-program %s\n" % stub)
        self._conf("gpgsm.conf", "disable-crl-checks\ndisable-policy-checks\n")
        self.env = dict(os.environ, GNUPGHOME=self.home)
        for address in pki.ids:
            self.import_identity(pki, address, base)
        self.gpgsm(["--import", pki.cafile])
        fpr = pki.root.cert.fingerprint(__import__("cryptography.hazmat.primitives.hashes",
                                                   fromlist=["SHA1"]).SHA1()).hex().upper()
        self._conf("trustlist.txt", "%s S relax\n" % fpr)

    def import_identity(self, pki, address, base, attempts=6):
        """Import *address*'s key and certificate from a fresh legacy PKCS#12.

        gpgsm 2.2 rejects about one legacy PKCS#12 file in thirty ("decryption failed"),
        depending on the random salt; a new export of the same key imports fine.
        """
        for attempt in range(attempts):
            p12 = legacy_p12(pki, address, os.path.join(base, "%s-%d.p12" % (address, attempt)))
            if self.gpgsm(["--import", p12], ok=(0, 2)).returncode == 0:
                return
        raise AssertionError("gpgsm could not import %s" % address)

    def _conf(self, name, text):
        with open(os.path.join(self.home, name), "w") as fh:
            fh.write(text)

    def gpgsm(self, args, data=None, ok=(0,)):
        return run(["gpgsm", "--batch", "--status-fd", "1"] + args, data, ok=ok, env=self.env)

    def decrypt(self, der):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out")
            # exit 2 happens when other recipients' keys are unknown, even on success
            proc = self.gpgsm(["--output", out, "--decrypt"], der, ok=(0, 2))
            assert b"DECRYPTION_OKAY" in proc.stdout, proc.stderr
            with open(out, "rb") as fh:
                return fh.read()

    def verify(self, der, content=None):
        """Verify; assert GOODSIG/VALIDSIG/TRUST_FULLY; return the signed content."""
        with tempfile.TemporaryDirectory() as tmp:
            sig = os.path.join(tmp, "sig")
            with open(sig, "wb") as fh:
                fh.write(der)
            args = ["--verify", sig]
            if content is not None:
                with open(os.path.join(tmp, "content"), "wb") as fh:
                    fh.write(content)
                args.append(os.path.join(tmp, "content"))
            else:
                args = ["--output", os.path.join(tmp, "out")] + args
            status = self.gpgsm(args).stdout
            for word in (b"GOODSIG", b"VALIDSIG", b"TRUST_FULLY"):
                assert word in status, status
            if content is not None:
                return content
            with open(os.path.join(tmp, "out"), "rb") as fh:
                return fh.read()

    def close(self):
        subprocess.run(["gpgconf", "--kill", "all"], env=self.env, capture_output=True)
