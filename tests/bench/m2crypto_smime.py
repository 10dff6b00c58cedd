#!/usr/bin/env python3
"""What a Python user would write with M2Crypto instead of sparkpostSMIME: the comparison
bench.py --m2crypto runs side by side with the tool.  Not part of the tool.

    python m2crypto_smime.py MESSAGE KEYS detached|opaque 0|1 OUT COUNT

Reads MESSAGE (once per message, as the tool does), moves its Content-* fields into the
signed entity, signs it as steve@thetucks.com (RSA-2048, SHA-256, the certificate chain,
OpenSSL's default signed attributes) with SMIME_write_PKCS7 (CRLF after header lines,
LF after base64 lines: made CRLF before SMTP, kept in files), with 1
encrypts that to steve.tuck@sparkpost.com and the sender's own copy (AES-256-CBC), and
writes COUNT messages: OUT is a directory (one plain file per message: open, write,
close, no fsync, as most code does), "-" (standard output) or smtp:PORT (smtplib on
127.0.0.1, one connection per 100 messages, as the tool does).

M2Crypto builds from PyPI with Debian's swig (see bench.py for the commands).
"""

import os
import sys

from M2Crypto import BIO, SMIME, X509

SMIME_CRLFEOL = 0x800  #: OpenSSL's flag: write CRLF line ends (SMTP's, the tool's)
SENDER, RECIPIENT = "steve@thetucks.com", "steve.tuck@sparkpost.com"


def identities(keys):
    """Return (signer, encrypter) SMIME objects, keys and certificates loaded once."""
    signer = SMIME.SMIME()
    signer.load_key(os.path.join(keys, SENDER + ".pem"), os.path.join(keys, SENDER + ".crt"))
    chain = X509.X509_Stack()
    with open(os.path.join(keys, SENDER + ".crt"), "rb") as fh:
        chain_pem = fh.read()
    for block in chain_pem.split(b"-----END CERTIFICATE-----")[1:-1]:
        chain.push(X509.load_cert_string(block.strip() + b"\n-----END CERTIFICATE-----\n"))
    signer.set_x509_stack(chain)
    encrypter = SMIME.SMIME()
    recipients = X509.X509_Stack()
    for address in (RECIPIENT, SENDER):
        recipients.push(X509.load_cert(os.path.join(keys, address + ".crt")))
    encrypter.set_x509_stack(recipients)
    encrypter.set_cipher(SMIME.Cipher("aes_256_cbc"))
    return signer, encrypter


def split(data):
    """Return (outer header lines, the MIME entity to sign) of a CRLF message."""
    head, body = data.split(b"\r\n\r\n", 1)
    fields = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    outer = [f for f in fields if not f.lower().startswith((b"content-", b"mime-version:"))]
    entity = [f for f in fields if f.lower().startswith(b"content-")]
    return b"\r\n".join(outer) + b"\r\n", b"\r\n".join(entity) + b"\r\n\r\n" + body


def build(path, signer, encrypter, detached, encrypt):
    """Return the S/MIME message built from *path*."""
    with open(path, "rb") as fh:
        outer, entity = split(fh.read())
    out = BIO.MemoryBuffer()
    if detached:
        p7 = signer.sign(BIO.MemoryBuffer(entity), SMIME.PKCS7_DETACHED)
        signer.write(out, p7, BIO.MemoryBuffer(entity), SMIME.PKCS7_DETACHED | SMIME_CRLFEOL)
    else:
        p7 = signer.sign(BIO.MemoryBuffer(entity), 0)
        signer.write(out, p7, None, SMIME_CRLFEOL)
    smime = out.read()
    if encrypt:
        p7 = encrypter.encrypt(BIO.MemoryBuffer(smime), SMIME.PKCS7_BINARY)
        out = BIO.MemoryBuffer()
        encrypter.write(out, p7, None, SMIME_CRLFEOL)
        smime = out.read()
    return outer + smime  # SMIME_write_PKCS7 writes MIME-Version itself


def main(argv):
    path, keys, mode, encrypt, target, count = argv
    signer, encrypter = identities(keys)
    detached, encrypt, count = mode == "detached", encrypt == "1", int(count)
    if target.startswith("smtp:"):
        import smtplib
        session = None
        for n in range(count):
            data = build(path, signer, encrypter, detached, encrypt)
            if n % 100 == 0:
                if session:
                    session.quit()
                session = smtplib.SMTP("127.0.0.1", int(target[5:]))
            # OpenSSL ends base64 lines with LF; SMTP needs CRLF (RFC 5321 2.3.8)
            session.sendmail(SENDER, [RECIPIENT], data.replace(b"\r\n", b"\n").replace(
                b"\n", b"\r\n"))
        session.quit()
    elif target == "-":
        for _ in range(count):
            sys.stdout.buffer.write(build(path, signer, encrypter, detached, encrypt))
        sys.stdout.buffer.flush()
    else:
        for n in range(count):
            data = build(path, signer, encrypter, detached, encrypt)
            with open(os.path.join(target, "m.%d.eml" % n), "wb") as fh:
                fh.write(data)


if __name__ == "__main__":
    main(sys.argv[1:])
