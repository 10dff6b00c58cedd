"""Big messages (issue 29): built and written a chunk at a time, read back byte-exact by
OpenSSL, NSS cmsutil and gpgsm at 10 MB and (system) 100 MB in every mode; lines that start
a chunk, CRLFs and 8-bit characters split between chunks, stdin, SMTP DATA dot-stuffed across
chunks, and the peak memory of a 100 MB message (ru_maxrss of the child); --verify and
--decrypt of big messages, read a block at a time (byte-exact, bounded memory, hostile ones
refused, no temporary file left).  A disk filling up in the middle of a big output: in
test_faults.py.

The big files stay on disk: each message is made once per module, the engines read and
write files, and this process compares SHA-256 digests read a MiB at a time."""

import base64
import email
import email.policy
import hashlib
import io
import os
import shutil
import subprocess
import sys
import time

import pytest

import sparkpostSMIME as tool
from support import engines
from support.harness import ROOT, TOOL, run_tool, tool_env
from support.servers import SmtpServer

SENDER, RCPT = "alice@example.com", "bob@example.org"
#: Where the tool cuts what it makes and writes (base64, AES, dot-stuffing, lowering).
BLOCK = tool.STREAM_BLOCK
MODES = {"sign": ["--sign"], "detached": ["--sign_detached"], "encrypt": ["--encrypt"],
         "sign+encrypt": ["--sign", "--encrypt"],
         "detached+encrypt": ["--sign_detached", "--encrypt"]}


def lines_up_to(pos, end):
    """Return 7-bit CRLF lines filling the octets from *pos* up to *end* exactly."""
    out = []
    while end - pos > 80:
        out.append(b"%076d\r\n" % pos)
        pos += 78
    out.append(b"y" * (end - pos - 2) + b"\r\n")
    return b"".join(out)


def dotted_text(start, blocks):
    """Return a 7-bit text body that begins *start* octets into the message body, where
    lines starting with "." begin at chunk boundaries (offsets k * BLOCK of the body) and,
    at every other one, the CRLF before it is split by the boundary."""
    out, pos = [b".a dot at the very start\r\n"], start + 26
    for k in range(1, blocks + 1):
        end = k * BLOCK + (k % 2)  # odd k: CR at the boundary's last octet, LF after it
        out.append(lines_up_to(pos, end))
        out.append(b".line %d starts a chunk\r\n..and a double dot\r\n" % k)
        pos = end + len(out[-1])
    return b"".join(out)


#: The big message's sizes (MB): 10 in the quick tier, 100 with the system tests.
SIZES = [pytest.param(10, id="10MB"), pytest.param(100, id="100MB", marks=pytest.mark.system)]
#: The engines that read back every mode at every size (fixtures of conftest.py).
ENGINES = ["openssl", "nss", "gpgsm"]
#: What this process reads of a big file at a time.
CHUNK = 1 << 20


def message_start():
    """Return (the octets of big_message() up to its attachment's base64, its text part)."""
    head = (b"From: %s\r\nTo: %s\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="big-b"\r\n\r\n'
            % (SENDER.encode(), RCPT.encode()))
    first = b'--big-b\r\nContent-Type: text/plain; charset="us-ascii"\r\n\r\n'
    text = dotted_text(len(first), 3)
    attachment = (b"\r\n--big-b\r\nContent-Type: application/octet-stream; name=big.bin\r\n"
                  b"Content-Transfer-Encoding: base64\r\n\r\n")
    return head + first + text + attachment, text


#: The close delimiter that ends big_message().
END = b"--big-b--\r\n"


def base64_lines(blob):
    """Return *blob* in base64 lines of 76 columns, each ending CRLF (RFC 2045 6.8)."""
    return base64.encodebytes(blob).replace(b"\n", b"\r\n")


def big_message(megabytes):
    """A CRLF multipart/mixed message: a text part of dotted_text() over three chunk
    boundaries, then *megabytes* MB of random bytes as a base64 attachment."""
    start, text = message_start()
    blob = os.urandom(megabytes * 1000 * 750)
    return start + base64_lines(blob) + END, text, blob


def write_big_message(path, megabytes):
    """Write a big_message() of *megabytes* MB to *path*, its attachment BLOCK random
    octets at a time (BLOCK is a multiple of 57: the same lines as one base64 of it all)."""
    assert BLOCK % 57 == 0
    start, left = message_start()[0], megabytes * 1000 * 750
    with open(path, "wb") as fh:
        fh.write(start)
        while left:
            size = min(BLOCK, left)
            fh.write(base64_lines(os.urandom(size)))
            left -= size
        fh.write(END)


def parts(content):
    """Return the decoded leaf parts of a MIME entity."""
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    return [p.get_payload(decode=True) for p in msg.walk() if not p.is_multipart()]


def recovered(out, flags, pki, openssl):
    """Return the content OpenSSL finds in *out*, decrypted for RCPT and verified."""
    content = out
    if "--encrypt" in flags:
        content = openssl.decrypt(out, pki.cert_path(RCPT), pki.key_path(RCPT))
    if any(f.startswith("--sign") for f in flags):
        content = openssl.verify(content, pki.cafile)
    return content


# -- Big files: read a MiB at a time, engines from file to file -------------------------

def copy_until(src, dst, mark, limit=None):
    """Copy the octets of the file *src* up to the first *mark* to *dst* (None: skip
    them) and leave *src* just after the mark; return how many were copied.  Raise
    AssertionError when there is no mark (within *limit* octets)."""
    kept, done = b"", 0
    while True:
        chunk = src.read(CHUNK)
        assert chunk, "no %r in %s" % (mark, src.name)
        data = kept + chunk
        at = data.find(mark)
        if at >= 0:
            if dst is not None:
                dst.write(data[:at])
            src.seek(at + len(mark) - len(data), os.SEEK_CUR)
            return done + at
        cut = max(0, len(data) - len(mark) + 1)
        if dst is not None:
            dst.write(data[:cut])
        done, kept = done + cut, data[cut:]
        assert limit is None or done <= limit, "no %r in %s's first %d octets" % (
            mark, src.name, limit)


def read_header(src):
    """Return the header of the MIME entity in the file *src* (with its blank line),
    parsed; leave *src* at the start of the body."""
    head = io.BytesIO()
    copy_until(src, head, b"\r\n\r\n", limit=1 << 16)
    return engines.parse(head.getvalue() + b"\r\n\r\n")


def sha256_rest(src):
    """Return the SHA-256 (hex) of what is left of the file *src*."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: src.read(CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def split_tail(path, length, offset=0):
    """Return (the octets of the file *path* from *offset* up to its last *length* ones,
    the SHA-256 of those last octets); the first must be under 64 KiB."""
    with open(path, "rb") as fh:
        head_length = os.path.getsize(path) - offset - length
        assert 0 <= head_length < 1 << 16, (path, head_length)
        fh.seek(offset)
        return fh.read(head_length), sha256_rest(fh)


def assert_content(path, offset, body):
    """Assert that the file *path* holds from *offset* on a header naming multipart/mixed
    with boundary "big-b", then byte-exact the big message's *body* (length, SHA-256)."""
    head, digest = split_tail(path, body[0], offset)
    assert digest == body[1], (path, os.path.getsize(path), body)
    msg = engines.parse(head)
    assert head.endswith(b"\r\n\r\n"), head
    assert (msg.get_content_type(), msg.get_param("boundary")) == ("multipart/mixed", "big-b")


def check_transport_safe_file(path):
    """engines.check_transport_safe() of the file *path*, a MiB of whole lines at a time.
    Its regex costs 3 s a 200 MB file, so a chunk is first checked by the same rules
    counted (no bare CR or LF: as many CRs and LFs as CRLFs), and by the regex if not."""
    with open(path, "rb") as fh:
        for lines in iter(lambda: fh.readlines(CHUNK), []):
            chunk = b"".join(lines)
            crlfs = chunk.count(b"\r\n")
            if not (chunk.isascii() and b"\0" not in chunk
                    and chunk.count(b"\r") == crlfs == chunk.count(b"\n")
                    and max(map(len, chunk.split(b"\r\n"))) <= 998):
                engines.check_transport_safe(chunk)  # what is wrong
                raise AssertionError("not transport-safe")


def der_file(entity, work):
    """Return the path of the DER in the application/pkcs7-mime entity file *entity* (its
    base64 body, decoded a MiB at a time), written in the directory *work*."""
    der = os.path.join(work, os.path.basename(entity) + ".der")
    with open(entity, "rb") as src, open(der, "wb") as dst:
        header = read_header(src)
        assert header.get_content_type().endswith("pkcs7-mime"), header
        assert header["Content-Transfer-Encoding"].lower() == "base64", header
        kept = b""
        for chunk in iter(lambda: src.read(CHUNK), b""):
            data = kept + chunk.translate(None, b"\r\n")
            cut = len(data) - len(data) % 4
            dst.write(base64.b64decode(data[:cut], validate=True))
            kept = data[cut:]
        assert not kept, kept
    return der


def signed_files(entity, work):
    """Return (the path of the SignedData DER, the path of the exact signed content or
    None when the content is inside it) of the signed entity file *entity*, as
    engines.split_signed() and der_of() do, written in the directory *work*."""
    with open(entity, "rb") as src:
        header = read_header(src)
        if header.get_content_type() != "multipart/signed":
            return der_file(entity, work), None
        boundary = header.get_param("boundary").encode()
        content = os.path.join(work, "signed-content")
        copy_until(src, None, b"--" + boundary + b"\r\n", limit=1 << 16)
        with open(content, "wb") as dst:
            copy_until(src, dst, b"\r\n--" + boundary + b"\r\n")  # RFC 2046 5.1.1
        rest = src.read(1 << 20)  # the signature part and the close delimiter
    der = os.path.join(work, "signature.der")
    with open(der, "wb") as fh:
        fh.write(engines.der_of(rest.split(b"\r\n--" + boundary + b"--")[0]))
    return der, content


def decrypted(engine, entity, pki, work):
    """Return the path of what *engine* decrypts (for RCPT, or any identity it holds) from
    the enveloped message file *entity*."""
    out = os.path.join(work, "decrypted")
    if isinstance(engine, engines.OpenSSL):
        engines.run(["openssl", "cms", "-decrypt", "-binary", "-recip", pki.cert_path(RCPT),
                     "-inkey", pki.key_path(RCPT), "-in", entity, "-out", out])
    elif isinstance(engine, engines.NSS):
        engines.run(["cmsutil", "-D", "-i", der_file(entity, work), "-d", engine.db, "-o", out])
    else:  # exit 2 when other recipients' keys are unknown, even on success
        proc = engine.gpgsm(["--output", out, "--decrypt", der_file(entity, work)], ok=(0, 2))
        assert b"DECRYPTION_OKAY" in proc.stdout, proc.stderr
    return out


#: cmsutil -h 1 writes its verdict before the content; this line ends it (one signer).
NSS_CONTENT_FOLLOWS = b"\tlevel=1.1; type=data; \n"


def verified(engine, entity, pki, work):
    """Return (path, offset): the file holding, from *offset* on, the content signed in
    the signed message file *entity*, once *engine* checked its signature up to the test
    root (as engines.verify_signed() does).  OpenSSL writes the content (-binary unless
    detached: see engines.OpenSSL.verify), NSS its verdict then the content."""
    out = os.path.join(work, "verified")
    if isinstance(engine, engines.OpenSSL):
        with open(entity, "rb") as src:
            detached = read_header(src).get_content_type() == "multipart/signed"
        engines.run(["openssl", "cms", "-verify", "-CAfile", pki.cafile, "-purpose",
                     "smimesign", "-in", entity, "-out", out] + ([] if detached else ["-binary"]))
        return out, 0
    der, content = signed_files(entity, work)
    if isinstance(engine, engines.NSS):
        engines.run(["cmsutil", "-D", "-i", der, "-d", engine.db, "-u", "4", "-h", "1",
                     "-o", out] + (["-c", content] if content else []))
        with open(out, "rb") as fh:
            status, ends, _ = fh.read(4096).partition(NSS_CONTENT_FOLLOWS)
        assert ends and b"signer0.status=GoodSignature" in status, status
        return out, len(status) + len(ends)
    status = engine.gpgsm(["--verify", der, content] if content else
                          ["--output", out, "--verify", der]).stdout
    for word in (b"GOODSIG", b"VALIDSIG", b"TRUST_FULLY"):
        assert word in status, status
    return content or out, 0


def engine_content(engine, path, flags, pki, work):
    """Return (path, offset) of the content *engine* (engines.OpenSSL, NSS or GpgSM) finds
    in the message file *path* made with *flags*: decrypted, signature checked; its
    files are written in the directory *work*."""
    content, offset = path, 0
    if "--encrypt" in flags:
        content = decrypted(engine, content, pki, work)
    if any(f.startswith("--sign") for f in flags):
        content, offset = verified(engine, content, pki, work)
    return content, offset


#: Runs argv[1:], exits with its exit code, prints its peak RSS in octets (wait4).
PEAK = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss * 1024)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_of(args):
    """Run the tool with *args* (as run_tool, exit 0); return (its CompletedProcess, its
    peak RSS in octets).  The peak of the child alone: a process started by this one
    counts this one's pages until its exec (Linux folds them into ru_maxrss), so a small
    process starts it."""
    proc = subprocess.run([sys.executable, "-c", PEAK, TOOL] + list(args), env=tool_env(),
                          cwd=ROOT, capture_output=True, timeout=600)
    engines.OUTPUTS.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
    return proc, int(proc.stdout.split()[-1])  # after the tool's report line, if any


# -- The messages, made once per module -------------------------------------------------

class Made:
    """The big messages on disk in *base*, each made on first use: the source of each
    size (the 10 MB one is *ten*), its body's length and SHA-256, and what the tool
    builds of it in each mode by -o FILE, with the peak RSS of that run."""

    def __init__(self, base, pki, ten):
        self.base, self.pki = base, pki
        self.sources, self.bodies, self.outputs = {10: ten}, {}, {}

    def source(self, size):
        """Return the path of the *size* MB message."""
        if size not in self.sources:
            self.sources[size] = os.path.join(self.base, "%d.eml" % size)
            write_big_message(self.sources[size], size)
        return self.sources[size]

    def body(self, size):
        """Return (length, SHA-256) of the *size* MB message's body."""
        if size not in self.bodies:
            with open(self.source(size), "rb") as fh:
                read_header(fh)
                self.bodies[size] = (os.path.getsize(fh.name) - fh.tell(), sha256_rest(fh))
        return self.bodies[size]

    def built(self, size, mode):
        """Return (path, peak RSS of the tool) of the *size* MB message built in *mode*."""
        if (size, mode) not in self.outputs:
            path = os.path.join(self.base, "%d-%s.eml" % (size, mode))
            _, peak = peak_of([self.source(size), "--keys", self.pki.keys, "-o", path]
                              + MODES[mode])
            self.outputs[size, mode] = path, peak
        return self.outputs[size, mode]


@pytest.fixture(scope="module")
def ten(tmp_path_factory):
    """A 10 MB message on disk: (path, its text part, its attachment)."""
    data, text, blob = big_message(10)
    path = tmp_path_factory.mktemp("big") / "ten.eml"
    path.write_bytes(data)
    return str(path), text, blob


@pytest.fixture(scope="module")
def made(pki, ten, tmp_path_factory):
    """The module's Made; its files (about 1 GB with the 100 MB ones) go at its end."""
    base = tmp_path_factory.mktemp("made")
    yield Made(str(base), pki, ten[0])
    shutil.rmtree(base)


@pytest.fixture
def output(made, size, mode):
    """The path of the *size* MB message built in *mode* (made once per module)."""
    return made.built(size, mode)[0]


@pytest.fixture
def scratch(tmp_path):
    """tmp_path, emptied after the test (engines' outputs of 100 MB and more)."""
    yield tmp_path
    for entry in tmp_path.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


@pytest.fixture(scope="module")
def built(made):
    """Return mode -> the 10 MB message built in that mode, written by -o FILE."""
    out = {}
    for mode in MODES:
        with open(made.built(10, mode)[0], "rb") as fh:
            out[mode] = fh.read()
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
def test_big_output_transport_safe(output, size, mode):
    """What the tool writes by -o FILE is 7-bit, CRLF lines of at most 998 octets (RFC
    5322 2.1.1), at 10 and 100 MB."""
    check_transport_safe_file(output)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size", SIZES)
def test_byte_exact_through_engines(request, pki, made, output, scratch, size, engine, mode):
    """OpenSSL, NSS cmsutil and gpgsm decrypt and verify the message built in *mode*,
    from file to file: the content is the source's body, byte-exact."""
    content, offset = engine_content(request.getfixturevalue(engine), output, MODES[mode],
                                     pki, str(scratch))
    assert_content(content, offset, made.body(size))


@pytest.mark.parametrize("mode", ["detached", "sign+encrypt"])
def test_stdin_to_stdout_same_content_as_a_file(pki, openssl, ten, mode):
    with open(ten[0], "rb") as fh:
        proc = run_tool(["-", "--keys", pki.keys] + MODES[mode], stdin=fh.read())
    assert proc.returncode == 0, proc.stderr
    assert parts(recovered(proc.stdout, MODES[mode], pki, openssl)) == [ten[1], ten[2]]


def lf_lines(size):
    """Return 7-bit LF lines of exactly *size* octets."""
    lines = b"".join(b"%075d\n" % n for n in range(size // 76))
    return lines + b"w" * (size - len(lines) - 1) + b"\n" if size > len(lines) else lines


def test_eight_bit_lone_cr_and_binary_field_across_chunk_boundaries(pki, openssl, tmp_path):
    """An LF file: a UTF-8 character split by a chunk boundary, a lone CR at a chunk's
    end, a "Content-Transfer-Encoding: binary" field split by one: the text comes back
    (its line ends CRLF), the binary part byte-exact."""
    head = (b"From: %s\nTo: %s\nSubject: 8-bit\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/mixed; boundary="b8"\n\n--b8\n'
            b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            % (SENDER.encode(), RCPT.encode()))
    second = b"--b8\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: binary\n\n"
    field_at = second.index(b"ransfer-Encoding") + 8  # its middle at the third boundary
    text = bytearray(lf_lines(3 * BLOCK - len(head) - field_at))
    text[BLOCK - len(head) - 1:BLOCK - len(head) + 1] = "é".encode()
    text[2 * BLOCK - len(head) - 1] = ord("\r")  # lone, the last octet of the second chunk
    assert text[2 * BLOCK - len(head) - 2:2 * BLOCK - len(head) + 1].count(b"\n") == 0
    payload = bytes(range(256)) * 64 + b"\r\r\n\n"
    path = tmp_path / "eight.eml"
    path.write_bytes(head + bytes(text) + second + payload + b"\n--b8--\n")
    expected = bytes(text[:-1]).replace(b"\r", b"\n")  # its last LF belongs to the delimiter
    for flags in (MODES["detached+encrypt"], MODES["sign"]):
        proc = run_tool([str(path), "--keys", pki.keys] + flags)
        assert proc.returncode == 0, proc.stderr
        engines.check_transport_safe(proc.stdout)
        got = parts(recovered(proc.stdout, flags, pki, openssl))
        assert [got[0].replace(b"\r\n", b"\n"), got[1]] == [expected, payload]


def test_smtp_data_dot_stuffed_across_chunks(pki, openssl, ten, tmp_path):
    """--sign_detached sends the text as it is: every line starting with "." (at chunk
    starts, behind a split CRLF) reaches the server as it was, the signature holds."""
    with SmtpServer() as srv:
        env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(srv.port), "SMTP_TLS": "none"}
        proc = run_tool([ten[0], "--keys", pki.keys, "--sign_detached", "--send_smtp", "-v"],
                        env=env)
        assert proc.returncode == 0, proc.stderr
        (mail_from, rcpts, data), = srv.messages
    assert rcpts == [RCPT]
    assert parts(openssl.verify(data, pki.cafile)) == [ten[1], ten[2]]
    assert b"\r\n.line 2 starts a chunk\r\n..and a double dot\r\n" in data
    err = proc.stderr.decode()
    assert "octets of message data>" in err and ".line" not in err  # size only


@pytest.mark.system
@pytest.mark.parametrize("mode", MODES)
def test_hundred_megabytes_in_bounded_memory(made, mode):
    """The 100 MB message built in *mode* by -o FILE (the build the engines read back
    above): peak RSS of the child (wait4) within twice the message size + 64 MiB (issue
    29's bound); and, a CRLF message read apart (header, then body: never a copy cut out
    of the whole), within the message once + 64 MiB."""
    peak, size = made.built(100, mode)[1], os.path.getsize(made.source(100))
    assert peak < 2 * size + (64 << 20), peak >> 20
    assert peak < size + (64 << 20), (peak >> 20, size >> 20)


# -- Received: --verify and --decrypt of big messages, read a block at a time ---------

RECEIVE = {"sign": "--verify", "detached": "--verify", "encrypt": "--decrypt",
           "sign+encrypt": "--verify", "detached+encrypt": "--verify"}


def receive_args(pki, mode, path, out):
    return [RECEIVE[mode], str(path), "--keys", pki.keys, "--ca", pki.cafile, "-o", str(out)]


def openssl_made(pki, mode, source, base):
    """Return the path of *source* (a message file) made into *mode* by OpenSSL's CLI
    (-binary: its exact bytes signed), From SENDER to RCPT."""
    with open(os.path.join(pki.keys, SENDER + ".crt"), "rb") as fh:  # cert + chain
        chain = base / "chain.pem"
        chain.write_bytes(fh.read().split(b"-----END CERTIFICATE-----\n", 1)[1])
    signer = ["-signer", pki.cert_path(SENDER), "-inkey", pki.key_path(SENDER),
              "-certfile", str(chain)]
    addresses = ["-from", SENDER, "-to", RCPT, "-subject", "big", "-crlfeol"]
    path = source
    if mode != "encrypt":
        path = str(base / (mode + ".signed"))
        subprocess.run(["openssl", "cms", "-sign", "-binary", "-md", "sha256", "-in", source,
                        "-out", path] + signer + addresses
                       + (["-nodetach"] if mode.startswith("sign") else []), check=True)
    if mode.endswith("encrypt"):
        signed, path = path, str(base / (mode + ".eml"))
        subprocess.run(["openssl", "cms", "-encrypt", "-aes256", "-in", signed, "-out", path]
                       + addresses + [pki.cert_path(RCPT)], check=True)
    return path


#: (size, maker, mode) of the received test: every one at 10 MB, OpenSSL's sign+encrypt
#: at 100 MB (the tool's own 100 MB ones: the bounded-memory test below).
RECEIVED = [pytest.param(10, maker, mode, id="10MB-%s-%s" % (maker, mode))
            for maker in ("tool", "openssl") for mode in MODES] + [
    pytest.param(100, "openssl", "sign+encrypt", id="100MB-openssl-sign+encrypt",
                 marks=pytest.mark.system)]


@pytest.mark.parametrize("size, maker, mode", RECEIVED)
def test_received_byte_exact(pki, openssl, made, scratch, size, maker, mode):
    """--verify (--decrypt when only encrypted) of a big message made by the tool or by
    OpenSSL: -o holds the outer header, then exactly the content OpenSSL recovers (the
    source's body at its end)."""
    if maker == "tool":
        path = made.built(size, mode)[0]
    else:
        path = openssl_made(pki, mode, made.source(size), scratch)
    out = str(scratch / "out.eml")
    proc = run_tool(receive_args(pki, mode, path, out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - "), proc.stdout
    expected, offset = engine_content(openssl, path, MODES[mode], pki, str(scratch))
    assert offset == 0
    with open(expected, "rb") as fh:
        head, digest = split_tail(out, os.path.getsize(expected))
        assert digest == sha256_rest(fh)
    assert not head.lower().count(b"content-type"), head  # the outer header only
    assert_content(out, 0, made.body(size))


def test_big_received_from_stdin_same_as_from_a_file(pki, built, tmp_path):
    """--verify - of a 10 MB signed and encrypted message: the same output as its file."""
    path, outs = tmp_path / "in.eml", []
    path.write_bytes(built["detached+encrypt"])
    for source in (str(path), "-"):
        outs.append(tmp_path / ("out%d.eml" % len(outs)))
        proc = run_tool(receive_args(pki, "detached+encrypt", source, outs[-1]),
                        stdin=built["detached+encrypt"] if source == "-" else None)
        assert proc.returncode == 0, proc.stderr
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_big_received_leaves_no_temporary_file(pki, built, tmp_path):
    """Decrypted content goes to private temporary files ($TMPDIR): none is left after
    success, after a refusal (a truncated message) or after Ctrl-C in the middle."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    env = {"TMPDIR": str(spool)}
    good, cut = tmp_path / "good.eml", tmp_path / "cut.eml"
    good.write_bytes(built["sign+encrypt"])
    cut.write_bytes(built["sign+encrypt"][:len(built["sign+encrypt"]) // 2])
    proc = run_tool(receive_args(pki, "sign+encrypt", good, tmp_path / "o.eml"), env=env)
    assert proc.returncode == 0, proc.stderr
    proc = run_tool(receive_args(pki, "sign+encrypt", cut, tmp_path / "c.eml"), env=env)
    assert proc.returncode == 65 and b"FAILED - " in proc.stdout, proc.stderr
    assert not (tmp_path / "c.eml").exists()
    child = subprocess.Popen([sys.executable, TOOL] + receive_args(
        pki, "sign+encrypt", good, tmp_path / "i.eml"), env=tool_env(env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)  # somewhere in the middle, or done: either way nothing may be left
    child.send_signal(2)
    child.communicate(timeout=60)
    assert os.listdir(spool) == []


def hostile_signed(econtent, count, depth=1):
    """Return a message whose opaque SignedData holds *econtent* *count* times as a
    constructed OCTET STRING nested *depth* deep, base64."""
    der = tool.der
    piece = der(4, econtent)
    octets = b"\x24\x80" * depth + piece * count + b"\0\0" * depth
    encap = b"\x30\x80" + tool.der_oid(tool.ID_DATA) + b"\xa0\x80" + octets + b"\0\0\0\0"
    signed = b"\x30\x80" + der(2, b"\x01") + der(0x31) + encap + der(0x31) + b"\0\0"
    info = b"\x30\x80" + tool.der_oid(tool.ID_SIGNED_DATA) + b"\xa0\x80" + signed + b"\0\0\0\0"
    body = base64.encodebytes(info).replace(b"\n", b"\r\n")
    return (b"From: %s\r\nTo: %s\r\nSubject: hostile\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: application/pkcs7-mime; smime-type=signed-data\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" % (SENDER.encode(), RCPT.encode())
            + body)


def test_big_hostile_messages_still_refused(pki, built, tmp_path):
    """Read a block at a time, the limits hold: more than MAX_BER_ELEMENTS pieces, an
    eContent nested past MAX_BER_DEPTH, a truncated envelope: one line, 65."""
    cases = {"elements": (hostile_signed(b"x" * 6, tool.MAX_BER_ELEMENTS + 10),
                          b"more than %d ASN.1 elements" % tool.MAX_BER_ELEMENTS),
             "depth": (hostile_signed(b"x" * 100, 30_000, tool.MAX_BER_DEPTH + 5),
                       b"malformed"),
             "truncated": (built["encrypt"][:len(built["encrypt"]) * 2 // 3], b"malformed")}
    for name, (data, reason) in cases.items():
        path = tmp_path / (name + ".eml")
        path.write_bytes(data)
        assert len(data) > tool.SPOOL_ABOVE
        proc = run_tool(["--verify", str(path), "--keys", pki.keys, "--ca", pki.cafile])
        assert proc.returncode == 65, (name, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1 and reason in proc.stderr, (name, proc.stderr)


@pytest.mark.system
@pytest.mark.parametrize("mode", ["sign+encrypt", "detached+encrypt"])
def test_hundred_megabytes_received_in_bounded_memory(pki, made, scratch, mode):
    """--verify of the 100 MB signed and encrypted message: the child's peak RSS (wait4)
    within issue 29's bound, and below the message's own size (never held whole); the
    content comes back byte-exact."""
    size, out = os.path.getsize(made.source(100)), str(scratch / "out.eml")
    _, peak = peak_of(receive_args(pki, mode, made.built(100, mode)[0], out))
    assert peak < min(2 * size + (64 << 20), size), peak >> 20
    assert_content(out, 0, made.body(100))
