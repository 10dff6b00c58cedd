"""Big messages (issue 29): built and written a chunk at a time, read back byte-exact by
OpenSSL, NSS cmsutil and gpgsm; lines that start a chunk, CRLFs and 8-bit characters split
between chunks, stdin, SMTP DATA dot-stuffed across chunks, and the peak memory of a 100 MB
message (ru_maxrss of the child); --verify and --decrypt of big messages, read a block at
a time (byte-exact, bounded memory, hostile ones refused, no temporary file left).  A disk
filling up in the middle of a big output: in test_faults.py."""

import base64
import email
import email.policy
import os
import subprocess
import sys
import time

import pytest

import sparkpostSMIME as tool
from support import engines
from support.harness import TOOL, run_tool, tool_env
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


def big_message(megabytes, seed=b"x"):
    """A CRLF multipart/mixed message: a text part of dotted_text() over three chunk
    boundaries, then *megabytes* MB of random bytes as a base64 attachment."""
    head = (b"From: %s\r\nTo: %s\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="big-b"\r\n\r\n'
            % (SENDER.encode(), RCPT.encode()))
    first = b'--big-b\r\nContent-Type: text/plain; charset="us-ascii"\r\n\r\n'
    text = dotted_text(len(first), 3)
    blob = os.urandom(megabytes * 1000 * 750)
    attachment = (b"\r\n--big-b\r\nContent-Type: application/octet-stream; name=big.bin\r\n"
                  b"Content-Transfer-Encoding: base64\r\n\r\n"
                  + base64.encodebytes(blob).replace(b"\n", b"\r\n") + b"--big-b--\r\n")
    return head + first + text + attachment, text, blob


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


@pytest.fixture(scope="module")
def ten(tmp_path_factory):
    """A 10 MB message on disk: (path, its text part, its attachment)."""
    data, text, blob = big_message(10)
    path = tmp_path_factory.mktemp("big") / "ten.eml"
    path.write_bytes(data)
    return str(path), text, blob


@pytest.fixture(scope="module")
def built(pki, ten, tmp_path_factory):
    """Return mode -> the 10 MB message built in that mode, written by -o FILE."""
    out, base = {}, tmp_path_factory.mktemp("built")
    for mode, flags in MODES.items():
        target = str(base / (mode + ".eml"))
        proc = run_tool([ten[0], "--keys", pki.keys, "-o", target] + flags)
        assert proc.returncode == 0, proc.stderr
        with open(target, "rb") as fh:
            out[mode] = fh.read()
    return out


@pytest.mark.parametrize("mode", MODES)
def test_ten_megabytes_byte_exact_through_openssl(pki, openssl, ten, built, mode):
    out = built[mode]
    engines.check_transport_safe(out)
    assert parts(recovered(out, MODES[mode], pki, openssl)) == [ten[1], ten[2]]


def nss_or_gpgsm_content(engine, out, flags, pki):
    """Return what *engine* (NSS or gpgsm) finds in *out*: decrypted, signature checked."""
    content = out
    if "--encrypt" in flags:
        content = engine.decrypt(engines.der_of(out))
    if any(f.startswith("--sign") for f in flags):
        content = engines.verify_signed(engine, content)
    return content


@pytest.mark.parametrize("mode", MODES)
def test_ten_megabytes_through_nss(pki, nss, ten, built, mode):
    content = nss_or_gpgsm_content(nss, built[mode], MODES[mode], pki)
    assert parts(content) == [ten[1], ten[2]]


@pytest.mark.parametrize("mode", MODES)
def test_ten_megabytes_through_gpgsm(pki, gpgsm, ten, built, mode):
    content = nss_or_gpgsm_content(gpgsm, built[mode], MODES[mode], pki)
    assert parts(content) == [ten[1], ten[2]]


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
@pytest.mark.parametrize("mode", ["sign+encrypt", "detached"])
def test_hundred_megabytes_in_bounded_memory(pki, openssl, tmp_path, mode):
    """A 100 MB message: peak RSS of the child (wait4) within twice the message size +
    64 MiB (issue 29's bound), and OpenSSL reads back the exact parts."""
    data, text, blob = big_message(100)
    path = tmp_path / "hundred.eml"
    path.write_bytes(data)
    out = tmp_path / "out.eml"
    del data
    # The peak of the child alone: a process started by this one counts this one's pages
    # until its exec (Linux folds them into ru_maxrss), so a small process starts it.
    proc = subprocess.run([sys.executable, "-c", PEAK, TOOL, str(path), "--keys", pki.keys,
                           "-o", str(out)] + MODES[mode], env=tool_env(), capture_output=True)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout)
    assert peak < 2 * os.path.getsize(path) + (64 << 20), peak >> 20
    assert parts(recovered(out.read_bytes(), MODES[mode], pki, openssl)) == [text, blob]


#: Runs argv[1:], exits with its exit code, prints its peak RSS in octets (wait4).
PEAK = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss * 1024)
sys.exit(os.waitstatus_to_exitcode(status))
"""


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


@pytest.mark.parametrize("maker", ["tool", "openssl"])
@pytest.mark.parametrize("mode", MODES)
def test_ten_megabytes_received_byte_exact(pki, openssl, ten, built, tmp_path, maker, mode):
    """--verify (--decrypt when only encrypted) of a 10 MB message made by the tool or by
    OpenSSL: -o holds the outer header, then exactly the content OpenSSL recovers."""
    if maker == "tool":
        path = tmp_path / "in.eml"
        path.write_bytes(built[mode])
    else:
        path = openssl_made(pki, mode, ten[0], tmp_path)
    out = tmp_path / "out.eml"
    proc = run_tool(receive_args(pki, mode, path, out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - "), proc.stdout
    got = out.read_bytes()
    with open(path, "rb") as fh:
        expected = recovered(fh.read(), MODES[mode], pki, openssl)
    assert got.endswith(expected) and parts(got) == [ten[1], ten[2]]
    assert not (got[:-len(expected)].lower().count(b"content-type"))  # the outer header only


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
def test_hundred_megabytes_received_in_bounded_memory(pki, openssl, tmp_path, mode):
    """--verify of a 100 MB signed and encrypted message: the child's peak RSS (wait4)
    within issue 29's bound, and below the message's own size (never held whole); the
    parts come back byte-exact."""
    data, text, blob = big_message(100)
    source = tmp_path / "hundred.eml"
    source.write_bytes(data)
    size = len(data)
    del data
    path, out = tmp_path / "built.eml", tmp_path / "out.eml"
    proc = run_tool([str(source), "--keys", pki.keys, "-o", str(path)] + MODES[mode])
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-c", PEAK, TOOL] + receive_args(pki, mode, path, out),
                          env=tool_env(), capture_output=True)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split()[-1])  # after the tool's report line
    assert peak < min(2 * size + (64 << 20), size), peak >> 20
    assert parts(out.read_bytes()) == [text, blob]
