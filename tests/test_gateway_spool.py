"""--serve and big messages (issue 29): DATA above SPOOL_ABOVE is written to a private
temporary file as it arrives and the message is built from it.  A 20 MB message comes
out byte-exact (OpenSSL); four 20 MB uploads held in DATA at once stay under a memory
bound that four in-memory copies would pass (VmHWM of the gateway); a "." line, a CRLF,
a bare CR or LF, a long line and the final "." split where the reads and the spooled
pieces are cut; --max_size while reading; no temporary file left on any path (the
gateway's $TMPDIR and its descriptors); a full $TMPDIR (a small tmpfs) is 451.

The gateway and its fixtures are test_gateway.py's; the big messages test_big_messages.py's.
"""

import os
import re
import smtplib
import socket
import threading
import time

import pytest

import sparkpostSMIME as tool
from support import engines
from test_big_messages import big_message, parts
from test_faults import tmpfs  # noqa: F401 - the fixture (a test using it is "system")
from test_gateway import MSG, hop_env, sink, start  # noqa: F401 - fixtures

SPOOL = tool.SPOOL_ABOVE
SENDER, RCPT = "alice@example.com", "bob@example.org"
#: Messages up to 50 MB taken (the default --max_size is 20,000,000 octets).
BIG = ["--max_size", "50000000"]
#: A 7-bit line of 78 octets with its CRLF.
LINE = b"%076d\r\n" % 0


class Raw:
    """A raw SMTP client: each piece of DATA sent as one write, then a pause (one read
    at the gateway each, as far as the kernel goes)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.got = b""
        assert self.reply().startswith("220")

    def reply(self):
        """Return the next reply's last line (its code first)."""
        while True:
            match = re.search(rb"^(\d{3}) [^\r\n]*\r\n", self.got, re.M)
            if match:
                self.got = self.got[match.end():]
                return match.group(0).decode().strip()
            chunk = self.sock.recv(65536)
            if not chunk:
                return "(closed)"
            self.got += chunk

    def command(self, line):
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def begin(self, rcpt=RCPT):
        """EHLO, MAIL, RCPT, DATA: the gateway waits for the content."""
        assert self.command(b"EHLO app.example").startswith("250")
        assert self.command(b"MAIL FROM:<%s>" % SENDER.encode()).startswith("250")
        assert self.command(b"RCPT TO:<%s>" % rcpt.encode()).startswith("250")
        assert self.command(b"DATA").startswith("354")

    def pieces(self, *pieces, pause=0.1):
        for piece in pieces:
            self.sock.sendall(piece)
            time.sleep(pause)

    def close(self):
        self.sock.close()


def private_tmp(tmp_path):
    """Return a fresh directory for the gateway's $TMPDIR."""
    where = tmp_path / "gw-tmp"
    where.mkdir()
    return where


def temporary_files(gw, tmpdir):
    """Return the temporary files *gw* holds or left: names in *tmpdir*, and its open
    descriptors of deleted files (an unnamed O_TMPFILE file, or an unlinked one)."""
    held = []
    fds = "/proc/%d/fd" % gw.proc.pid
    for fd in os.listdir(fds):
        try:
            target = os.readlink(os.path.join(fds, fd))
        except OSError:
            continue
        if target.endswith("(deleted)"):
            held.append(target)
    return sorted(os.listdir(tmpdir)) + held


def none_left(gw, tmpdir, within=10.0):
    """True once *gw* holds and left no temporary file (waiting up to *within* seconds:
    a connection ends after its last reply)."""
    deadline = time.monotonic() + within
    while temporary_files(gw, tmpdir) and time.monotonic() < deadline:
        time.sleep(0.05)
    return temporary_files(gw, tmpdir) == []


def peak_rss(pid):
    """Return the peak resident set size of process *pid* in octets (VmHWM)."""
    with open("/proc/%d/status" % pid) as fh:
        return int(re.search(r"VmHWM:\s+(\d+) kB", fh.read()).group(1)) * 1024


def text_message(body):
    """Return a plain-text message from alice to bob with *body* (CRLF lines)."""
    return (b"From: %s\r\nTo: %s\r\nSubject: spooled\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" % (SENDER.encode(),
                                                                      RCPT.encode()) + body)


def unstuffed(wire):
    """Return DATA content *wire* (up to the CRLF before its final ".") as RFC 5321
    4.5.2 makes it: the first "." of each line starting with one removed."""
    return (b"\r\n" + wire).replace(b"\r\n.", b"\r\n")[2:]


def filler(size):
    """Return *size* octets of 7-bit CRLF lines (the last one shorter)."""
    whole, left = divmod(size, len(LINE))
    return LINE * whole + (b"y" * (left - 2) + b"\r\n" if left >= 2 else b"\r\n"[:left])


def verified_text(data, pki, openssl):
    """Return the text of the --sign_detached message *data*, checked by OpenSSL."""
    return parts(openssl.verify(data, pki.cafile))


# -- byte-exact, four at once, nothing left ------------------------------------------

@pytest.mark.system
def test_twenty_megabytes_byte_exact_after_a_next_hop_failure(start, sink, pki, openssl,
                                                               tmp_path):
    """A 20 MB message: a 451 from the next hop first (the client keeps it), then
    relayed: OpenSSL decrypts and verifies the text part and the attachment as they
    were; no temporary file is left after either."""
    tmpdir = private_tmp(tmp_path)
    data, text, blob = big_message(20)
    gw = start(["--sign_detached", "--encrypt"] + BIG, hop_env(sink, TMPDIR=str(tmpdir)))
    sink.handler.tempfail_data = 1
    with gw.client(timeout=120) as c:
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail(SENDER, [RCPT], data)
        assert err.value.smtp_code == 451
        assert none_left(gw, tmpdir, within=0)
        assert c.sendmail(SENDER, [RCPT], data) == {}
        assert none_left(gw, tmpdir, within=0)
    assert gw.stop() == 0
    (_, rcpts, out), = sink.messages
    assert rcpts == [RCPT]
    engines.check_transport_safe(out)
    inner = openssl.decrypt(out, pki.cert_path(RCPT), pki.key_path(RCPT))
    assert parts(openssl.verify(inner, pki.cafile)) == [text, blob]


def upload(port, data, barrier, replies):
    """Send *data* as one message, all of it but its final line before *barrier* is
    passed (every client holds its message in DATA then); add the reply to *replies*."""
    with smtplib.SMTP("127.0.0.1", port, timeout=300) as c:
        c.ehlo("app.example")
        assert c.mail(SENDER)[0] == 250 and c.rcpt(RCPT)[0] == 250
        c.putcmd("data")
        assert c.getreply()[0] == 354
        wire = (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]
        c.send(wire[:-100])
        barrier.wait()
        c.send(wire[-100:] + b"\r\n.\r\n")
        replies.append(c.getreply()[0])


@pytest.mark.system
def test_four_uploads_of_twenty_megabytes_at_once_bounded_memory(start, sink, tmp_path):
    """Four clients hold a 20 MB message each in DATA at the same time, then end them:
    the gateway's peak RSS grows by less than four times the message (what four
    in-memory copies would take; one message is built at a time, from its file, and
    that takes about two), and every message is relayed, no temporary file left."""
    tmpdir = private_tmp(tmp_path)
    data = big_message(20)[0]
    gw = start(["--sign_detached", "--encrypt"] + BIG, hop_env(sink, TMPDIR=str(tmpdir)))
    with gw.client() as c:  # keys loaded, modules imported: the baseline
        assert c.sendmail(SENDER, [RCPT], MSG) == {}
    before = peak_rss(gw.proc.pid)
    barrier, replies = threading.Barrier(4, timeout=300), []
    clients = [threading.Thread(target=upload, args=(gw.port, data, barrier, replies))
               for _ in range(4)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(600)
    grown = peak_rss(gw.proc.pid) - before
    assert replies == [250] * 4
    assert none_left(gw, tmpdir)
    assert gw.stop() == 0
    assert len(sink.messages) == 5
    print("peak RSS grew by %.1f MB for 4 x %.1f MB" % (grown / 1e6, len(data) / 1e6))
    assert grown < 4 * len(data), "peak RSS grew by %d octets" % grown


# -- cut where the reads and the pieces are cut ----------------------------------------
# The gateway writes what it holds once that passes SPOOL_ABOVE, up to the last CRLF of
# the read that passed it: a first piece of just under SPOOL_ABOVE, then a short one,
# puts a read's end (and so that cut) exactly where the next test wants it.

def test_dot_lines_crlf_and_final_dot_split_at_the_cuts(start, sink, pki, openssl, tmp_path):
    """A "." line right after a cut, a CRLF split between two reads at a cut, and the
    final "." line split over three reads: the message comes out byte-exact (dot-
    unstuffed, RFC 5321 4.5.2), checked by OpenSSL; no temporary file left."""
    tmpdir = private_tmp(tmp_path)
    head = text_message(b"")
    pieces = [head + filler(SPOOL - 5000 - len(head)), filler(10_000),
              b"..a dot line right after a cut\r\n" + filler(SPOOL - 10_000),
              filler(20_000)[:-1],  # ends with CR: the cut is before that line
              b"\n..a dot line after a CRLF split by two reads\r\n" + filler(SPOOL - 10_000),
              filler(20_000)[:-1], b"\n.", b"\r\n"]
    content = unstuffed(b"".join(pieces)[:-3])
    gw = start(["--sign_detached"], hop_env(sink, TMPDIR=str(tmpdir)))
    raw = Raw(gw.port)
    raw.begin()
    raw.pieces(*pieces)
    assert raw.reply().startswith("250 2.0.0 Ok: queued")
    assert none_left(gw, tmpdir, within=0)
    assert raw.command(b"QUIT").startswith("221")
    raw.close()
    assert gw.stop() == 0
    (_, _, out), = sink.messages
    body = content.split(b"\r\n\r\n", 1)[1]
    assert b"\r\n.a dot line right after a cut\r\n" in body
    assert verified_text(out, pki, openssl) == [body]


def test_bare_cr_or_lf_split_at_a_cut_refused_554(start, sink, tmp_path):
    """SMTP smuggling in a spooled message: a CR ending one read before an "x", and
    "\\n.\\n" right after a cut, are refused as in a small one (554 5.6.0); nothing
    reaches the next hop, the session goes on, no temporary file is left."""
    tmpdir = private_tmp(tmp_path)
    head = text_message(b"")
    gw = start(["--sign"], hop_env(sink, TMPDIR=str(tmpdir)))
    raw = Raw(gw.port)
    for tail in [(filler(10_000)[:-1], b"x\r\n"), (filler(10_000), b"\n.\nforged\r\n")]:
        raw.begin()
        raw.pieces(head + filler(SPOOL - 5000 - len(head)), *tail)
        raw.pieces(filler(SPOOL), b".\r\n")
        assert raw.reply().startswith("554 5.6.0 bare CR or LF")
        assert none_left(gw, tmpdir, within=0)
    assert raw.command(b"NOOP").startswith("250")
    assert raw.command(b"QUIT").startswith("221")
    raw.close()
    assert gw.stop() == 0
    assert sink.messages == []
    assert gw.stderr().count("a bare CR or LF in DATA") == 2


@pytest.mark.parametrize("ending", [b"\n"])
def test_lf_only_lines_over_the_buffer_refused_554(start, sink, tmp_path, ending):
    """A message of short lines ending in a bare LF only, bigger than SPOOL_ABOVE: no CRLF
    to cut at, refused as a small one is (554 5.6.0, a warning), not as a long line
    (review: it was 500); nothing reaches the next hop, no file is left.  (Lines ending
    in a bare CR are one line without a LF, in memory as spooled: 500.)"""
    tmpdir = private_tmp(tmp_path)
    gw = start(["--sign"], hop_env(sink, TMPDIR=str(tmpdir)))
    raw = Raw(gw.port)
    raw.begin()
    lines = text_message(b"").replace(b"\r\n", ending) + b"short line" + ending
    raw.pieces(lines + (b"short line" + ending) * (SPOOL // 8), b"\r\n.\r\n")
    assert raw.reply().startswith("554 5.6.0 bare CR or LF")
    assert none_left(gw, tmpdir, within=0)
    assert raw.command(b"QUIT").startswith("221")
    raw.close()
    assert gw.stop() == 0
    assert sink.messages == [] and "a bare CR or LF in DATA" in gw.stderr()


def test_long_lines_across_a_cut_and_longer_than_the_buffer_refused_500(start, sink, tmp_path):
    """A line of 1,200 octets split by a cut, and one longer than SPOOL_ABOVE: 500 5.5.2
    as for a small message, the session goes on, nothing relayed or left."""
    tmpdir = private_tmp(tmp_path)
    head = text_message(b"")
    gw = start(["--sign"], hop_env(sink, TMPDIR=str(tmpdir)))
    raw = Raw(gw.port)
    for tail in [(filler(10_000) + b"y" * 600, b"y" * 600 + b"\r\n"),
                 (b"z" * (SPOOL + 100_000), b"\r\n")]:
        raw.begin()
        raw.pieces(head + filler(SPOOL - 5000 - len(head)), *tail)
        raw.pieces(filler(100_000), b".\r\n")
        assert raw.reply().startswith("500 5.5.2 line too long")
        assert none_left(gw, tmpdir, within=0)
    assert raw.command(b"QUIT").startswith("221")
    raw.close()
    assert gw.stop() == 0
    assert sink.messages == []


def test_max_size_enforced_while_a_spooled_message_is_read(start, sink, tmp_path):
    """--max_size 3,000,000: a message spooled (its file seen among the gateway's
    descriptors) is let go as soon as it passes the limit, while DATA goes on (nothing
    more written), and refused 552 at its end; the session goes on."""
    tmpdir = private_tmp(tmp_path)
    head = text_message(b"")
    gw = start(["--sign", "--max_size", "3000000"], hop_env(sink, TMPDIR=str(tmpdir)))
    raw = Raw(gw.port)
    raw.begin()
    raw.pieces(head + filler(2_500_000), pause=0.5)
    assert len(temporary_files(gw, tmpdir)) == 1  # the spooled message, unnamed
    raw.pieces(filler(1_000_000), pause=0.5)
    assert none_left(gw, tmpdir)  # over the limit: its file is gone, DATA still going
    raw.pieces(filler(1_000_000), b".\r\n")
    assert raw.reply().startswith("552 5.3.4 message too big: at most 3000000 octets")
    assert raw.command(b"NOOP").startswith("250")
    raw.close()
    assert gw.stop() == 0
    assert sink.messages == []


def test_client_gone_in_the_middle_of_data_leaves_nothing(start, sink, tmp_path):
    """A client that hangs up in the middle of a spooled upload: its file goes; the
    gateway serves on."""
    tmpdir = private_tmp(tmp_path)
    head = text_message(b"")
    gw = start(["--sign"], hop_env(sink, TMPDIR=str(tmpdir)))
    raw = Raw(gw.port)
    raw.begin()
    raw.pieces(head + filler(3_000_000), pause=0.5)
    assert len(temporary_files(gw, tmpdir)) == 1
    raw.close()
    assert none_left(gw, tmpdir)
    with gw.client() as c:
        assert c.sendmail(SENDER, [RCPT], MSG) == {}
    assert gw.stop() == 0
    assert len(sink.messages) == 1


def test_full_tmpdir_is_451_with_one_warning(start, sink, tmp_path, tmpfs):
    """$TMPDIR on a 1 MB tmpfs: a 5 MB message cannot be spooled: 451 4.3.0 (the client
    keeps it and tries again), one warning line, no traceback; small messages go on."""
    tmpdir = tmpfs("small-tmp", size="1m")
    head = text_message(b"")
    gw = start(["--sign"], hop_env(sink, TMPDIR=str(tmpdir)))
    raw = Raw(gw.port)
    raw.begin()
    raw.pieces(head + filler(5_000_000), b".\r\n")
    assert raw.reply().startswith("451 4.3.0 ")
    assert none_left(gw, tmpdir, within=0)
    assert raw.command(b"QUIT").startswith("221")
    raw.close()
    with gw.client() as c:
        assert c.sendmail(SENDER, [RCPT], MSG) == {}
    assert gw.stop() == 0
    assert len(sink.messages) == 1
    warned = [line for line in gw.stderr().splitlines() if "not taken" in line]
    assert len(warned) == 1 and "No space left on device" in warned[0], gw.stderr()
