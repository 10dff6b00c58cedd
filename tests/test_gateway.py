"""--serve: the S/MIME gateway, between smtplib clients and a real aiosmtpd next hop.

Every test starts the tool as a process listening on 127.0.0.1 and speaks SMTP to it;
the next hop is tests/support/servers.py's recording aiosmtpd (or its HTTP API server).
"""

import json
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from support import engines
from support.harness import CACHE, ROOT, TOOL
from support.servers import ApiServer, EndlessReplies, SilentServer, SmtpServer, free_port

USER = "gateway-app"
PASSWORD = engines.plant_secret("gw-Pa55word-TEST-only")
RCPTS = ["bob@example.org", "carol@example.net", "dave@example.com"]  # dave: a Bcc
MSG = (b"From: Alice Example <alice@example.com>\r\n"
       b"To: Bob <bob@example.org>\r\n"
       b"Cc: carol@example.net\r\n"
       b"Subject: gateway test\r\n"
       b"Date: Mon, 02 Nov 2026 10:00:00 +0000\r\n"
       b"Message-ID: <gw-test@example.com>\r\n"
       b"MIME-Version: 1.0\r\n"
       b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
       b"Hello from an application that speaks SMTP only.\r\n")


class Gateway:
    """The tool running --serve on a free loopback port; its output goes to files."""

    def __init__(self, tmp_path, args, env, port=None, host="127.0.0.1"):
        self.port, self.host = port or free_port(), host
        self.out, self.err = tmp_path / ("gw-out-%d" % self.port), tmp_path / ("gw-err-%d"
                                                                               % self.port)
        full = {k: v for k, v in os.environ.items()
                if not k.startswith(("SMTP_", "SPARKPOST_", "SMIME_"))}
        full.update(XDG_CACHE_HOME=CACHE, **env)
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, TOOL, "--serve", "[%s]:%d" % (host, self.port) if ":" in host
                 else "%s:%d" % (host, self.port)] + list(args),
                env=full, cwd=ROOT, stdout=out, stderr=err, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((host, self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the gateway did not start: %s" % self.stderr())
                time.sleep(0.05)

    def client(self, timeout=30):
        smtp = smtplib.SMTP(self.host, self.port, timeout=timeout)
        smtp.ehlo("app.example")
        return smtp

    def stop(self, signum=signal.SIGTERM, timeout=60):
        """Signal the gateway, wait for it; return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        code = self.proc.wait(timeout)
        engines.OUTPUTS.append(self.stdout().encode() + self.stderr().encode())
        assert "Traceback" not in self.stderr(), self.stderr()
        return code

    def kill(self):
        """SIGKILL the gateway and its build processes (one process group)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stdout(self):
        return self.out.read_text(errors="replace")

    def stderr(self):
        return self.err.read_text(errors="replace")


@pytest.fixture
def sink():
    with SmtpServer() as srv:
        yield srv


def hop_env(srv, **extra):
    env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(srv.port), "SMTP_TLS": "none",
           "SMTP_TIMEOUT": "5"}
    env.update(extra)
    return env


@pytest.fixture
def start(tmp_path, pki):
    """start(args, env) -> a running Gateway (stopped, and checked, after the test)."""
    running = []

    def run(args=("--sign", "--encrypt"), env=None, keys=None, port=None):
        gw = Gateway(tmp_path, ["--keys", keys or pki.keys, "--send_smtp"] + list(args),
                     env or {}, port)
        running.append(gw)
        return gw
    yield run
    for gw in running:
        if gw.proc.poll() is None:
            gw.stop()


def raw_session(port, lines, timeout=10):
    """Send raw *lines* (bytes, each sent as it is) and return everything the server said."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        got = s.recv(4096)
        try:
            for line in lines:
                s.sendall(line)
                time.sleep(0.05)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server has closed the connection already
            pass
        return (got + read_to_end(s)).decode("ascii", "replace")


def read_to_end(s):
    """Return what the socket *s* receives until the server closes it (or resets it)."""
    got = b""
    while True:
        try:
            chunk = s.recv(4096)
        except OSError:
            return got
        if not chunk:
            return got
        got += chunk


def decrypt_all(openssl, pki, data, people):
    """Decrypt *data* for each of *people* with OpenSSL; return the inner entity."""
    inner = None
    for who in people:
        inner = openssl.decrypt(data, pki.cert_path(who), pki.key_path(who))
        assert inner
    return inner


# -- every mode, the envelope, the Received field -------------------------------------

@pytest.mark.parametrize("mode", [["--sign", "--encrypt"], ["--sign_detached", "--encrypt"],
                                  ["--sign"], ["--sign_detached"], ["--encrypt"]])
def test_every_mode_to_every_rcpt_bcc_included(start, sink, pki, openssl, mode):
    gw = start(mode + ["--jobs", "2"], hop_env(sink))
    with gw.client() as c:
        assert b"PIPELINING" in c.ehlo_resp and b"SIZE 20000000" in c.ehlo_resp
        assert b"8BITMIME" in c.ehlo_resp and b"SMTPUTF8" not in c.ehlo_resp
        assert c.sendmail("bounces@example.com", RCPTS, MSG) == {}
    assert gw.stop() == 0
    (mail_from, rcpts, data), = sink.messages
    assert mail_from == "bounces@example.com" and rcpts == RCPTS
    head = data.split(b"\r\n\r\n", 1)[0]
    assert re.match(rb"Received: from app\.example \(\[127\.0\.0\.1\]\)\r\n\tby \S+ "
                    rb"\(sparkpostSMIME\) with ESMTP id [0-9A-F]+(-\d+)?\.1;\r\n\t\w{3}, ", head)
    assert b"\r\nFrom: Alice Example <alice@example.com>\r\n" in head
    engines.check_transport_safe(data)
    entity = data
    if "--encrypt" in mode:
        assert b"enveloped-data" in head
        entity = decrypt_all(openssl, pki, data, RCPTS + ["alice@example.com"])
    if "--sign" in mode or "--sign_detached" in mode:
        assert b"Hello from an application" in openssl.verify(entity, pki.cafile)
    else:
        assert b"Hello from an application" in entity
    out = gw.stdout().splitlines()
    assert out[0].startswith("Opened SMTP connection (plain) to 127.0.0.1")
    assert re.fullmatch(r"Sending [0-9A-F]+(-\d+)?\.1\tFrom: bounces@example.com\tTo: "
                        + re.escape(", ".join(RCPTS)), out[1])
    assert re.fullmatch(r"OK - in \d+\.\d{3} seconds", out[2])
    assert out[3].startswith("Summary: 1 sent, 0 failed")


def test_rcpt_without_certificate_refused_at_rcpt(start, sink, pki):
    gw = start(["--sign", "--encrypt"], hop_env(sink))
    with gw.client() as c:
        refused = c.sendmail("alice@example.com", ["nobody@example.com"] + RCPTS[:1], MSG)
    code, text = refused["nobody@example.com"]
    assert code == 550 and text.startswith(b"5.7.1 <nobody@example.com>: no usable S/MIME")
    assert pki.keys.encode() not in text  # our key directories stay private
    (_, rcpts, _), = sink.messages  # the next hop never heard of the refused one
    assert rcpts == RCPTS[:1]
    with gw.client() as c:  # the next hop's refusal and a bad address count too
        sink.handler.refuse["carol@example.net"] = "550 5.1.1 no such user"
        assert c.mail("alice@example.com")[0] == 250
        assert c.rcpt("carol@example.net")[0] == 550 and c.rcpt("a\x01b@example.org")[0] == 553
    assert gw.stop() == 0
    assert "RCPT <nobody@example.com> refused: no certificate" in gw.stderr()
    assert "Summary: 1 sent, 0 failed, 3 recipients refused in " in gw.stdout()


def test_sender_without_key_refused_at_end_of_data(start, sink):
    gw = start(["--sign"], hop_env(sink))
    with gw.client() as c:
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail("x@example.com", RCPTS[:1], MSG.replace(b"alice@", b"nokey@"))
        assert err.value.smtp_code == 550 and err.value.smtp_error.startswith(
            b"5.7.1 no private key for nokey@example.com")
        assert c.sendmail("alice@example.com", RCPTS[:1], MSG) == {}  # the session goes on
    assert len(sink.messages) == 1
    assert gw.stop() == 0
    assert "Summary: 1 sent, 1 failed" in gw.stdout()


def test_opportunistic_signs_only_when_a_certificate_is_missing(start, sink, pki, openssl):
    gw = start(["--sign", "--encrypt", "--opportunistic"], hop_env(sink))
    with gw.client() as c:
        assert c.sendmail("alice@example.com", ["nobody@example.com", RCPTS[0]], MSG) == {}
        assert c.sendmail("alice@example.com", RCPTS, MSG) == {}
    assert gw.stop() == 0
    (_, _, first), (_, _, second) = sink.messages
    assert b"signed-data" in first and b"enveloped-data" not in first
    assert b"Hello from" in openssl.verify(first, pki.cafile)
    assert b"enveloped-data" in second
    assert "signed only (--opportunistic)" in gw.stderr()


def test_usage_of_serve_options(tmp_path, pki):
    from support.harness import run_tool
    for args, text in [(["--serve", "25"], b"--send_smtp or --send_api"),
                       (["--serve", "25", "--send_smtp", "x.eml"], b"give no EMLFILE"),
                       (["--serve", "no:port", "--send_smtp"], b"expected [HOST:]PORT"),
                       (["--serve", "25", "--send_smtp", "--encrypt", "--opportunistic"],
                        b"--opportunistic needs"),
                       (["--send_smtp"], b"EMLFILE (or --serve")]:
        proc = run_tool(args)
        assert proc.returncode == 64 and text in proc.stderr, proc.stderr
    proc = run_tool(["--serve", "0.0.0.0:%d" % free_port(), "--send_smtp", "--sign"],
                    env={"SMTP_HOST": "127.0.0.1"})
    assert proc.returncode == 78 and b"listens beyond loopback" in proc.stderr


# -- the next hop's answers ---------------------------------------------------------

def test_next_hop_refusing_a_recipient_is_heard_at_rcpt(start, sink):
    sink.handler.refuse["carol@example.net"] = "550 5.1.1 <carol@example.net>: no such user"
    gw = start(["--sign"], hop_env(sink))
    with gw.client() as c:
        refused = c.sendmail("alice@example.com", RCPTS, MSG)
    assert refused == {"carol@example.net": (550, b"5.1.1 <carol@example.net>: no such user")}
    (_, rcpts, _), = sink.messages
    assert rcpts == ["bob@example.org", "dave@example.com"]
    assert gw.stop() == 0


def test_next_hop_4xx_and_5xx_at_data_mapped(start, sink):
    gw = start(["--sign"], hop_env(sink))
    sink.handler.tempfail_data = 1
    with gw.client() as c:
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail("alice@example.com", RCPTS[:1], MSG)
        assert err.value.smtp_code == 451 and err.value.smtp_error.startswith(b"4.3.0 ")
        assert c.sendmail("alice@example.com", RCPTS[:1], MSG) == {}  # the retry goes
        sink.handler.reject_data = "554 5.7.0 content refused"
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail("alice@example.com", RCPTS[:1], MSG)
        assert err.value.smtp_code == 554 and b"5.7.0" in err.value.smtp_error
        assert b"content refused" in err.value.smtp_error
    assert len(sink.messages) == 1
    assert gw.stop() == 0
    assert "Summary: 1 sent, 2 failed" in gw.stdout()


def test_next_hop_down_or_silent_is_451(start, tmp_path):
    closed = free_port()
    gw = start(["--sign"], {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(closed),
                            "SMTP_TLS": "none"})
    with gw.client() as c:  # MAIL goes out with the first RCPT
        assert c.mail("alice@example.com")[0] == 250
        code, text = c.rcpt(RCPTS[0])
        assert code == 451 and text.startswith(b"4.4.1 next hop not available")
    assert gw.stop() == 0
    with SilentServer() as silent:
        gw = start(["--sign"], {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(silent.port),
                                "SMTP_TLS": "none", "SMTP_TIMEOUT": "1"})
        with gw.client() as c:
            assert c.mail("alice@example.com")[0] == 250
            code, text = c.rcpt(RCPTS[0])
            assert code == 451 and b"no answer" in text
        assert gw.stop() == 0


def test_next_hop_reply_of_too_many_lines_is_451(start):
    """smtplib bounds a reply's line length, not its number of lines: a next hop past
    MAX_REPLY_LINES is broken, the client hears 451 and keeps the message."""
    with EndlessReplies() as hop:
        gw = start(["--sign"], {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(hop.port),
                                "SMTP_TLS": "none"})
        with gw.client() as c:
            assert c.mail("alice@example.com")[0] == 250
            code, text = c.rcpt(RCPTS[0])
            assert code == 451 and b"more than 1000 lines" in text, text
        assert gw.stop() == 0


def test_next_hop_lost_during_data_is_451_then_retried(start, sink):
    sink.handler.drop_every = 1
    gw = start(["--sign"], hop_env(sink))
    with gw.client() as c:
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail("alice@example.com", RCPTS[:1], MSG)
        assert err.value.smtp_code == 451
        sink.handler.drop_every = 0
        assert c.sendmail("alice@example.com", RCPTS[:1], MSG) == {}
    assert len(sink.messages) == 1
    assert gw.stop() == 0


@pytest.mark.parametrize("tls", ["starttls", "tls"])
def test_next_hop_over_tls_with_auth_large_messages_and_reconnects(start, tls_ctx, pki, tls):
    """Over TLS and AUTH, as --send_smtp: a 6 MB message goes out whole, the session is
    reused and opened again after MESSAGES_PER_CONNECTION, the password is never shown."""
    big = MSG.replace(b"Hello", b"".join(b"%075d\r\n" % i for i in range(80_000)) + b"Hello")
    with SmtpServer(tls_ctx, implicit_tls=tls == "tls", users={USER: PASSWORD},
                    auth_require_tls=tls == "starttls") as hop:  # aiosmtpd: see test_implicit_tls
        gw = start(["--sign_detached", "-v"], hop_env(hop, SMTP_HOST="localhost", SMTP_TLS=tls,
                                           SMTP_CAFILE=pki.cafile, SMTP_USER=USER,
                                           SMTP_PASSWORD=PASSWORD, SMTP_TIMEOUT="30"))
        with gw.client(timeout=60) as c:
            assert c.sendmail("alice@example.com", RCPTS[:1], big) == {}
            for _ in range(101):
                assert c.sendmail("alice@example.com", RCPTS[1:], MSG) == {}
        assert gw.stop() == 0
        assert len(hop.messages) == 102 and len(hop.handler.auth_seen) == 2
        (_, rcpts, data) = hop.messages[0]
        assert rcpts == RCPTS[:1] and len(data) > 6_000_000 and b"%075d" % 79_999 in data
    err = gw.stderr()
    assert "next hop ~> MAIL FROM:<alice@example.com>" in err and "next hop <~ 250" in err
    assert re.search(r"next hop ~> <\d{7} octets of message data>", err)
    assert PASSWORD not in err + gw.stdout()


def test_api_next_hop_partial_refusal_recorded(tmp_path, pki):
    journal = tmp_path / "journal.jsonl"
    with ApiServer() as api:
        api.responses.append((200, {}, {"results": {"total_rejected_recipients": 1,
                                                    "total_accepted_recipients": 2,
                                                    "id": "70130001"}}))
        gw = Gateway(tmp_path, ["--keys", pki.keys, "--send_api", "--sign", "--encrypt",
                                "--results", str(journal)],
                     {"SPARKPOST_API_KEY": engines.plant_secret("api-KEY-gw-TEST"),
                      "SPARKPOST_HOST": api.url})
        with gw.client() as c:
            assert c.sendmail("alice@example.com", RCPTS, MSG) == {}
        assert gw.stop() == 0
        body = json.loads(api.requests[0]["body"])
    assert [r["address"]["email"] for r in body["recipients"]] == RCPTS
    row, = [json.loads(line) for line in journal.read_text().splitlines()]
    assert row["status"] == "partial" and row["recipients"] == RCPTS
    assert "PARTIAL" in gw.stdout() and "SparkPost rejected 1 recipient" in gw.stderr()


# -- what passes unchanged, what cannot be built ------------------------------------

def test_already_smime_passes_through_unchanged(start, sink, pki, tmp_path):
    from support.harness import run_tool
    src = tmp_path / "m.eml"
    src.write_bytes(MSG)
    signed = run_tool([str(src), "--sign", "--keys", pki.keys]).stdout
    gw = start(["--sign", "--encrypt"], hop_env(sink))
    with gw.client() as c:
        assert c.sendmail("alice@example.com", RCPTS[:1], signed) == {}
    assert gw.stop() == 0
    (_, _, data), = sink.messages
    received, rest = data.split(b"\r\n", 3)[:3], data.split(b"\r\n", 3)[3]
    assert received[0].startswith(b"Received: ") and rest == signed
    assert "already S/MIME, passed on unchanged" in gw.stderr()


def test_unbuildable_message_is_554_560(start, sink):
    gw = start(["--sign"], hop_env(sink))
    with gw.client() as c:
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail("alice@example.com", RCPTS[:1], b"Subject: no sender\r\n\r\nbody\r\n")
        assert err.value.smtp_code == 554 and err.value.smtp_error.startswith(
            b"5.6.0 ") and b"no From address" in err.value.smtp_error
    assert sink.messages == []
    assert gw.stop() == 0


def test_mail_loop_refused_554_546_also_when_already_smime(start, sink, pki, tmp_path):
    """More Received fields than the hop limit (RFC 5321 6.3): a loop, refused at the end
    of DATA, S/MIME or not (already-S/MIME mail would otherwise circle unchanged)."""
    from support.harness import run_tool
    src = tmp_path / "m.eml"
    src.write_bytes(MSG)
    signed = run_tool([str(src), "--sign", "--keys", pki.keys]).stdout
    hops = b"".join(b"Received: from hop%d.example by gw.example; Mon, 02 Nov 2026 10:00:00 "
                    b"+0000\r\n" % n for n in range(6))
    gw = start(["--sign", "--encrypt"], hop_env(sink, SMIME_HOP_LIMIT="5"))
    with gw.client() as c:
        for data in (hops + MSG, hops + signed):
            with pytest.raises(smtplib.SMTPDataError) as err:
                c.sendmail("alice@example.com", RCPTS[:1], data)
            assert err.value.smtp_code == 554 and err.value.smtp_error.startswith(b"5.4.6 ")
            assert b"hop limit of 5" in err.value.smtp_error
        assert c.sendmail("alice@example.com", RCPTS[:1], hops[hops.index(b"Received", 1):]
                          + signed) == {}  # 5: within the limit
    assert len(sink.messages) == 1
    assert gw.stop() == 0


def test_mime_bomb_refused_554_nothing_relayed(start, sink):
    """10,000 nested multiparts of plain text: refused (MAX_MIME_DEPTH), not signed."""
    depth = 10_000
    bomb = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (n, n)
                    for n in range(depth)) + b"Content-Type: text/plain\r\n\r\nboom\r\n"
    bomb += b"".join(b"--b%d--\r\n" % n for n in reversed(range(depth)))
    head = MSG.split(b"Content-Type:")[0]
    gw = start(["--sign", "--encrypt"], hop_env(sink))
    with gw.client() as c:
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail("alice@example.com", RCPTS[:1], head + bomb)
        assert err.value.smtp_code == 554 and err.value.smtp_error.startswith(b"5.6.0 ")
        assert b"nested deeper than 50" in err.value.smtp_error
        assert c.sendmail("alice@example.com", RCPTS[:1], MSG) == {}
    assert len(sink.messages) == 1 and b"boom" not in sink.messages[0][2]
    assert gw.stop() == 0


# -- hostile clients ---------------------------------------------------------------

def test_size_limit_announced_and_enforced(start, sink):
    gw = start(["--sign", "--max_size", "5000"], hop_env(sink))
    with gw.client() as c:
        assert b"SIZE 5000" in c.ehlo_resp
        assert c.mail("alice@example.com", ["SIZE=6000"])[0] == 552
        c.rset()
        assert c.mail("alice@example.com")[0] == 250  # no SIZE said: found out while reading
        assert c.rcpt(RCPTS[0])[0] == 250
        assert c.data(MSG + (b"x" * 80 + b"\r\n") * 100)[0] == 552
    # over the limit in the second read, whose last CRLF begins the final dot's line
    lines = (b"x" * 98 + b"\r\n") * 30
    said = raw_session(gw.port, [b"EHLO app\r\n", b"MAIL FROM:<alice@example.com>\r\n",
                                 b"RCPT TO:<bob@example.org>\r\n", b"DATA\r\n", MSG + lines,
                                 lines * 2, b".\r\n", b"NOOP\r\n", b"QUIT\r\n"])
    assert "552 5.3.4 message too big" in said and said.rstrip().endswith("221 Bye")
    assert sink.messages == []
    assert gw.stop() == 0


@pytest.mark.parametrize("trick", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r"])
def test_smtp_smuggling_refused(start, sink, trick):
    gw = start(["--sign"], hop_env(sink))
    smuggled = (b"mail FROM:<mallory@example.com>\r\nrcpt TO:<bob@example.org>\r\ndata\r\n"
                b"From: alice@example.com\r\nTo: bob@example.org\r\n\r\nforged\r\n")
    said = raw_session(gw.port, [b"EHLO evil\r\n", b"MAIL FROM:<alice@example.com>\r\n",
                                 b"RCPT TO:<bob@example.org>\r\n", b"DATA\r\n",
                                 MSG + b"first" + trick + smuggled + b"\r\n.\r\n",
                                 b"QUIT\r\n"])
    assert "554 5.6.0 bare CR or LF" in said and "221" in said
    assert sink.messages == []
    assert gw.stop() == 0


def test_refused_after_rcpt_passed_on_nothing_passed_on(start, sink):
    """Its envelope is at the next hop already: a message then refused here (too big,
    a bare LF, no signing key) leaves nothing at the next hop, and the next message on
    the same connection goes through."""
    gw = start(["--sign", "--max_size", "5000"], hop_env(sink))
    with gw.client() as c:
        for data, code in [(MSG + (b"x" * 80 + b"\r\n") * 100, 552),
                           (MSG + b"bare\nLF\r\n", 554),
                           (MSG.replace(b"alice@", b"nokey@"), 550)]:
            assert c.mail("alice@example.com")[0] == 250
            assert c.rcpt(RCPTS[0])[0] == 250
            assert c.data(data)[0] == code
        assert c.sendmail("alice@example.com", RCPTS[1:2], MSG) == {}
    assert gw.stop() == 0
    (_, rcpts, data), = sink.messages
    assert rcpts == RCPTS[1:2] and b"Subject: gateway test" in data


def test_final_dot_split_across_reads_and_commands_pipelined_behind_it(start, sink):
    """The final "." line is found wherever the reads split it, a line starting with "."
    comes out unstuffed (RFC 5321 4.5.2), and commands pipelined behind the final dot
    (RFC 2920) are the session's next ones."""
    gw = start(["--sign_detached"], hop_env(sink))
    body = MSG + b"..a line that starts with a dot\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
        said = bytearray()

        def send(*pieces, until=b"", times=1):
            for piece in pieces:
                s.sendall(piece)
                time.sleep(0.05)  # one read each
            while said.count(until) < times:
                said.extend(s.recv(4096) or b"(closed)")
        send(until=b"220 ")
        send(b"EHLO app\r\n", until=b"250 HELP")
        send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n",
             until=b"354 ")
        send(body[:-3], body[-3:] + b"\r", b"\n.", b"\r", b"\nMAIL FROM:<alice@example.com>\r\n"
             b"RCPT TO:<carol@example.net>\r\nDATA\r\n", until=b"354 ", times=2)
        send(MSG + b".\r\nQUIT\r\n", until=b"221 ")
    assert said.count(b"250 2.0.0 Ok: queued") == 2, said
    assert gw.stop() == 0
    (_, first_rcpts, first), (_, second_rcpts, second) = sink.messages
    assert first_rcpts == ["bob@example.org"] and second_rcpts == ["carol@example.net"]
    assert b"\r\n.a line that starts with a dot\r\n" in first
    assert b"Hello from an application" in second


def test_long_line_and_smtputf8_refused_cleanly(start, sink):
    gw = start(["--sign"], hop_env(sink))
    said = raw_session(gw.port, [b"EHLO app\r\n", b"MAIL FROM:<alice@example.com>\r\n",
                                 b"RCPT TO:<bob@example.org>\r\n", b"DATA\r\n",
                                 MSG + b"y" * 1200 + b"\r\n.\r\n",
                                 b"MAIL FROM:<alice@example.com> SMTPUTF8\r\n",
                                 "MAIL FROM:<j\u00f6rg@example.com>\r\n".encode(),
                                 b"QUIT\r\n"])
    assert "500 5.5.2 line too long" in said
    assert "501 Error: SMTPUTF8 disabled" in said and "500 Error: strict ASCII mode" in said
    assert said.rstrip().endswith("221 Bye")
    with gw.client() as c:  # still serving
        assert c.sendmail("alice@example.com", RCPTS[:1], MSG) == {}
    assert len(sink.messages) == 1
    assert gw.stop() == 0


@pytest.mark.parametrize("args", [["--sign"], ["--sign", "--encrypt", "--opportunistic"]])
def test_control_characters_and_8bit_in_mail_and_rcpt_refused(start, sink, args):
    """RFC 5321 4.1.2: no control character in an address, quoted or not; no 8-bit
    without SMTPUTF8 (refused): 501 5.1.7 at MAIL, 553 5.1.3 at RCPT, nothing of them
    goes to the next hop, and the session goes on."""
    gw = start(args, hop_env(sink))
    bad = [b"<ste\x00ve@example.com>", b'<"a\x00b"@example.com>', b'<"a\rRSET"@example.com>',
           b"<a\x7fb@example.com>", b"<a\tb@example.com>", b"<" + b"a" * 300 + b"@example.com>"]
    lines = [b"EHLO app\r\n"] + [b"MAIL FROM:%s\r\n" % a for a in bad]
    lines += [b"MAIL FROM:<alice@example.com>\r\n"] + [b"RCPT TO:%s\r\n" % a for a in bad]
    lines += [b"RCPT TO:<bob@example.org>\r\n", b"DATA\r\n", MSG + b".\r\n", b"QUIT\r\n"]
    said = raw_session(gw.port, lines)
    assert said.count("501 5.1.7 bad sender address syntax") == len(bad), said
    assert said.count("553 5.1.3 bad recipient address syntax") == len(bad), said
    assert "250 2.0.0 Ok: queued" in said
    (mail_from, rcpts, _), = sink.messages
    assert mail_from == "alice@example.com" and rcpts == ["bob@example.org"]
    assert sink.handler.addresses == ["alice@example.com", "bob@example.org"]
    assert gw.stop() == 0


def test_fuzzing_clients_never_stop_the_server_or_lose_a_message(start, sink):
    gw = start(["--sign", "--jobs", "2"], hop_env(sink))
    rng = random.Random(19)
    words = [b"EHLO x", b"HELO", b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.org>",
             b"DATA", b".", b"RSET", b"NOOP", b"AUTH PLAIN AAAA", b"STARTTLS", b"VRFY a",
             b"MAIL FROM:<>", b"RCPT TO:<>", b"BDAT 10", b"\x00\xff", b"QUIT"]

    def fuzz(seed):
        r = random.Random(seed)
        for _ in range(5):
            lines = []
            for _ in range(r.randint(1, 40)):
                word = r.choice(words)
                if r.random() < 0.3:
                    word += bytes(r.getrandbits(8) for _ in range(r.randint(0, 1500)))
                lines.append(word + r.choice([b"\r\n", b"\n", b"\r", b""]))
            try:
                raw_session(gw.port, [b"".join(lines)], timeout=5)
            except OSError:
                pass
    fuzzers = [threading.Thread(target=fuzz, args=(rng.random(),)) for _ in range(4)]
    for t in fuzzers:
        t.start()
    sent = 0
    with gw.client() as c:
        for _ in range(10):
            assert c.sendmail("alice@example.com", RCPTS[:1], MSG) == {}
            sent += 1
    for t in fuzzers:
        t.join(120)
    with gw.client() as c:
        assert c.noop()[0] == 250
    good = [m for m in sink.messages if b"<gw-test@example.com>" in m[2]]
    assert len(good) == sent == 10
    assert gw.proc.poll() is None
    assert gw.stop() == 0
    assert "internal error" not in gw.stderr()


def test_connection_cap_and_idle_timeout(start, sink):
    gw = start(["--sign"], hop_env(sink, SMIME_GATEWAY_CONNECTIONS="2",
                                   SMIME_GATEWAY_TIMEOUT="2"))
    first, second = gw.client(), gw.client()
    third = raw_session(gw.port, [b"QUIT\r\n"])
    assert third.startswith("421 4.7.0 too many connections")
    time.sleep(3)  # both idle longer than SMIME_GATEWAY_TIMEOUT: closed by the gateway
    try:  # its 421, or (the connection reset first) no reply at all
        assert first.noop()[0] == 421
    except smtplib.SMTPServerDisconnected:
        pass
    with pytest.raises(smtplib.SMTPServerDisconnected):
        first.noop()
    with gw.client() as c:
        assert c.noop()[0] == 250
    second.close()
    assert gw.stop() == 0


def greetings(sockets):
    """Return the first reply line each of the raw *sockets* got (then close them)."""
    said = []
    for s in sockets:
        try:
            said.append(s.makefile("rb").readline().decode("ascii", "replace"))
        except OSError:
            said.append("")
        s.close()
    return said


def test_connection_cap_counted_as_connections_are_accepted(start, sink):
    """A burst arriving while the gateway is busy (reading and building a big message)
    is counted connection by connection: never more than SMIME_GATEWAY_CONNECTIONS."""
    gw = start(["--sign", "--encrypt"], hop_env(sink, SMIME_GATEWAY_CONNECTIONS="5"))
    big = MSG + b"".join(b"%076d\r\n" % n for n in range(100_000))  # ~7.8 MB
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as busy:
        busy.sendall(b"EHLO app\r\nMAIL FROM:<alice@example.com>\r\n"
                     b"RCPT TO:<bob@example.org>\r\nDATA\r\n")
        reply = b""
        while b"354 " not in reply:
            reply += busy.recv(4096) or b"(closed)"
            assert b"(closed)" not in reply
        busy.sendall(big + b".\r\n")
        burst = [socket.create_connection(("127.0.0.1", gw.port), timeout=30)
                 for _ in range(20)]
        said = greetings(burst)
        while b"250 2.0.0 Ok: queued" not in reply:
            reply += busy.recv(4096) or b"(closed)"
            assert b"(closed)" not in reply
    assert sum(line.startswith("220 ") for line in said) == 4, said  # 5 with the busy one
    assert sum(line.startswith("421 4.7.0 too many connections") for line in said) == 16
    assert gw.stop() == 0


def client_when_free(gw):
    """Return a client of *gw* once a connection is free: with --jobs, the first process
    counts a closed connection until its process has seen it end."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return gw.client()
        except smtplib.SMTPConnectError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_connections_per_client_address_capped(start, sink, jobs):
    gw = start(["--sign", "--jobs", jobs],
               hop_env(sink, SMIME_GATEWAY_CONNECTIONS_PER_CLIENT="2"))
    first = client_when_free(gw)  # after the start-up probe's connection
    second = client_when_free(gw)
    third = raw_session(gw.port, [b"QUIT\r\n"])
    assert third.startswith("421 4.7.0 too many connections from your address"), third
    first.quit()
    with client_when_free(gw) as c:
        assert c.sendmail("alice@example.com", RCPTS[:1], MSG) == {}
    second.quit()
    assert gw.stop() == 0


def test_idle_commands_before_mail_end_the_session(start, sink):
    """NOOP, RSET, HELP, VRFY and failed commands keep no session alive for ever: the
    MAX_IDLE_COMMANDS-th (20) before a MAIL gets 421; a MAIL starts the count again."""
    gw = start(["--sign"], hop_env(sink))
    junk = [b"NOOP\r\n", b"RSET\r\n", b"HELP\r\n", b"VRFY x\r\n", b"BOGUS\r\n"]
    said = raw_session(gw.port, [b"EHLO app\r\n"] + junk * 5)
    assert said.rstrip().endswith("421 4.7.0 20 commands without a message, closing"), said
    assert said.count("\r\n") == 1 + 5 + 20 + 1  # greeting, EHLO, 20 replies, 421
    good = [b"MAIL FROM:<alice@example.com>\r\n", b"RCPT TO:<bob@example.org>\r\n",
            b"DATA\r\n", MSG + b".\r\n"]
    said = raw_session(gw.port, [b"EHLO app\r\n"] + junk[:4] * 4 + good + junk[:4] * 4
                       + [b"QUIT\r\n"])
    assert "421" not in said and said.rstrip().endswith("221 Bye"), said
    assert len(sink.messages) == 1
    assert gw.stop() == 0


def trickle(port, pieces, pause):
    """Send a message's DATA in *pieces* (bytes) *pause* seconds apart; return what the
    gateway said (until it closed or answered the end of data)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"EHLO app\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>"
                  b"\r\nDATA\r\n")
        said = b""
        while b"354 " not in said:
            said += s.recv(4096)
        try:
            for piece in pieces:
                time.sleep(pause)
                s.sendall(piece)
            s.sendall(b".\r\nQUIT\r\n")
        except OSError:
            pass
        return (said + read_to_end(s)).decode("ascii", "replace")


def test_data_timeout_is_silence_with_a_deadline_by_size(start, sink):
    """SMIME_GATEWAY_TIMEOUT is the silence allowed between reads, also in DATA; the
    whole upload has max(timeout, --max_size / 64 KiB/s) seconds (here 2 s and 6 s)."""
    gw = start(["--sign", "--max_size", str(6 * 65536)],
               hop_env(sink, SMIME_GATEWAY_TIMEOUT="2"))
    lines = [MSG] + [b"line %d of a slow upload\r\n" % n for n in range(9)]
    said = trickle(gw.port, lines, 0.5)  # 4.5 s in all, never 2 s silent
    assert "250 2.0.0 Ok: queued" in said, said
    said = trickle(gw.port, [MSG, b"then silence\r\n"], 3)  # 3 s silent
    assert "421 4.4.2" in said and "nothing heard for 2 seconds" in said
    said = trickle(gw.port, [MSG] + lines[1:], 0.9)  # 8.1 s in all: past the deadline
    assert "Ok: queued" not in said
    assert len(sink.messages) == 1
    assert gw.stop() == 0


# -- beyond loopback: STARTTLS and AUTH ----------------------------------------------

def test_auth_only_after_starttls(start, sink, pki, tls_ctx, tmp_path):
    from support.servers import server_context
    base = tmp_path / "tls"
    base.mkdir()
    server_context(pki.inter, str(base))
    env = hop_env(sink, SMIME_GATEWAY_TLS_CERT=str(base / "server.crt"),
                  SMIME_GATEWAY_TLS_KEY=str(base / "server.key"),
                  SMIME_GATEWAY_USER=USER, SMIME_GATEWAY_PASSWORD=PASSWORD)
    gw = start(["--sign", "-v"], env)
    with gw.client() as c:
        assert b"STARTTLS" in c.ehlo_resp and b"AUTH" not in c.ehlo_resp
        assert c.docmd("AUTH PLAIN AGFiYwBkZWY=")[0] == 538  # encryption required first
        assert c.mail("alice@example.com")[0] == 530
        c.rset()
        c.starttls(context=ssl.create_default_context(cafile=pki.cafile))
        c.ehlo("app.example")
        assert b"AUTH LOGIN PLAIN" in c.ehlo_resp
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login(USER, "wrong-password")
        c.login(USER, PASSWORD)
        assert c.sendmail("alice@example.com", RCPTS[:1], MSG) == {}
    assert gw.stop() == 0
    (_, _, data), = sink.messages
    assert b"with ESMTPSA id" in data.split(b"\r\n\r\n")[0]
    err = gw.stderr()
    assert "AUTH PLAIN refused" in err or "AUTH LOGIN refused" in err
    assert "client <~ AUTH" in err and "client <~ mail FROM:<alice@example.com>" in err
    assert "next hop -> MAIL FROM:<alice@example.com>" in err
    assert PASSWORD not in err + gw.stdout()


def test_failed_auth_slows_that_address_across_connections(start, sink, pki, tmp_path):
    """Each failed AUTH is logged and makes the next AUTH from that address wait (1 s,
    then doubled), on any of its connections; a success clears it."""
    import base64
    from support.servers import server_context
    base = tmp_path / "tls"
    base.mkdir()
    server_context(pki.inter, str(base))
    gw = start(["--sign"], hop_env(sink, SMIME_GATEWAY_TLS_CERT=str(base / "server.crt"),
                                   SMIME_GATEWAY_TLS_KEY=str(base / "server.key"),
                                   SMIME_GATEWAY_USER=USER, SMIME_GATEWAY_PASSWORD=PASSWORD))
    wrong = "AUTH PLAIN " + base64.b64encode(b"\0%s\0wrong" % USER.encode()).decode()

    def session():
        c = gw.client()
        c.starttls(context=ssl.create_default_context(cafile=pki.cafile))
        c.ehlo("app.example")
        return c
    first, second = session(), session()
    assert first.docmd(wrong)[0] == 535
    assert second.docmd(wrong)[0] == 535  # held 1 s first
    second.login(USER, PASSWORD)  # held 2 s, then clears the count
    assert first.docmd(wrong)[0] == 535
    first.close()
    second.close()
    assert gw.stop() == 0
    err = gw.stderr()
    assert err.count("AUTH PLAIN refused from 127.0.0.1 (wrong user or password; 1 failed "
                     "in a row: its next AUTH waits 1 seconds)") == 2, err
    assert "2 failed in a row: its next AUTH waits 2 seconds" in err
    assert re.search(r"AUTH from 127\.0\.0\.1 held [12]\.\d seconds \(2 failed in a row\)",
                     err), err


def test_listening_beyond_loopback_needs_tls_and_auth_or_trust(tmp_path, pki):
    from support.harness import run_tool
    env = {"SMTP_HOST": "127.0.0.1", "SMIME_GATEWAY_USER": USER,
           "SMIME_GATEWAY_PASSWORD": PASSWORD}
    proc = run_tool(["--serve", "127.0.0.1:25", "--send_smtp", "--sign"], env=env)
    assert proc.returncode == 78 and b"AUTH is offered only after STARTTLS" in proc.stderr
    proc = run_tool(["--serve", "[::]:%d" % free_port(), "--send_smtp", "--sign"],
                    env={"SMTP_HOST": "127.0.0.1"})
    assert proc.returncode == 78 and b"--trusted_network" in proc.stderr


# -- operations ----------------------------------------------------------------------

def test_sigterm_finishes_the_message_in_flight(start, sink):
    sink.handler.delay = 2.0
    gw = start(["--sign"], hop_env(sink))
    answers = []

    def send():
        with gw.client() as c:
            answers.append(c.sendmail("alice@example.com", RCPTS[:1], MSG))
    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 20
    while sink.handler.data_commands == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    gw.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):  # no longer listening
        socket.create_connection(("127.0.0.1", gw.port), timeout=2).close()
    sender.join(30)
    assert answers == [{}] and len(sink.messages) == 1
    assert gw.stop() == 0
    assert "Summary: 1 sent, 0 failed" in gw.stdout()


def test_sighup_reloads_certificates(start, sink, pki, tmp_path):
    keys = tmp_path / "keys"
    shutil.copytree(pki.keys, keys)
    (keys / "bob@example.org.crt").unlink()
    gw = start(["--sign", "--encrypt"], hop_env(sink), keys=str(keys))
    with gw.client() as c:
        assert c.mail("alice@example.com")[0] == 250
        assert c.rcpt("bob@example.org")[0] == 550
        shutil.copy(os.path.join(pki.keys, "bob@example.org.crt"), keys)
        gw.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert c.rcpt("bob@example.org")[0] == 250
    assert gw.stop() == 0
    assert "SIGHUP: keys and certificates are read again" in gw.stderr()


def write_p12(pki, address, path, password=b"p12-Pa55-TEST"):
    """Write *address*'s key and certificate as a password-protected PKCS#12 file."""
    from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12
    key, cert = pki.ids[address]
    path.write_bytes(pkcs12.serialize_key_and_certificates(
        address.encode(), key, cert, [pki.inter.cert], BestAvailableEncryption(password)))


def test_a_signing_key_that_cannot_be_opened_stops_the_start_78(tmp_path, pki):
    """Every signing key is opened before listening: a .p12 without SMIME_KEY_PASSWORD
    is exit 78 at start-up naming the file, not a 550 for every message."""
    from support.harness import run_tool
    keys = tmp_path / "keys"
    shutil.copytree(pki.keys, keys)
    (keys / "alice@example.com.pem").unlink()
    write_p12(pki, "alice@example.com", keys / "alice@example.com.p12")
    port = free_port()
    proc = run_tool(["--serve", str(port), "--send_smtp", "--sign", "--keys", str(keys)],
                    env={"SMTP_HOST": "127.0.0.1"})
    assert proc.returncode == 78, proc.stderr
    line = proc.stderr.decode().splitlines()[-1]  # before it: the key file's mode, warned
    assert "alice@example.com.p12: cannot open the PKCS#12 file" in line
    assert "SMIME_KEY_PASSWORD" in line and "serving on" not in line


def test_our_side_faults_while_serving_are_451_the_message_s_own_550(start, sink, pki, tmp_path):
    """Keys loaded at start-up serve on when their file goes; a key file added later
    that cannot be opened is our fault (451 4.3.0: the client keeps the message), a
    From address without any key the message's (550), and SIGHUP keeps the keys that
    work rather than take a broken one."""
    keys = tmp_path / "keys"
    shutil.copytree(pki.keys, keys)
    (keys / "bob@example.org.pem").unlink()
    gw = start(["--sign"], hop_env(sink), keys=str(keys))
    (keys / "alice@example.com.pem").unlink()  # loaded already
    write_p12(pki, "bob@example.org", keys / "bob@example.org.p12")  # no SMIME_KEY_PASSWORD
    bob = MSG.replace(b"From: Alice Example <alice@example.com>", b"From: bob@example.org")
    with gw.client() as c:
        assert c.sendmail("alice@example.com", RCPTS[1:2], MSG) == {}
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail("bob@example.org", RCPTS[1:2], bob)
        assert err.value.smtp_code == 451 and err.value.smtp_error.startswith(b"4.3.0 ")
        assert b"cannot open the PKCS#12 file" in err.value.smtp_error
        with pytest.raises(smtplib.SMTPDataError) as err:
            c.sendmail("x@example.com", RCPTS[1:2], MSG.replace(b"alice@", b"nokey@"))
        assert err.value.smtp_code == 550
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "SIGHUP" not in gw.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.sendmail("alice@example.com", RCPTS[1:2], MSG) == {}
    assert len(sink.messages) == 2
    assert gw.stop() == 0
    assert "the keys read before stay in use" in gw.stderr()
    assert "Summary: 2 sent, 2 failed" in gw.stdout()


def test_journal_and_archive_as_in_batch_mode(start, sink, tmp_path):
    journal, archive = tmp_path / "sent.jsonl", tmp_path / "archive"
    gw = start(["--sign", "--encrypt", "--results", str(journal), "--archive", str(archive)],
               hop_env(sink))
    with gw.client() as c:
        for _ in range(3):
            assert c.sendmail("alice@example.com", RCPTS, MSG) == {}
    assert gw.stop() == 0
    rows = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["sent"] * 3
    assert [r["input"].split(".")[1] for r in rows] == ["1", "2", "3"]
    assert all(r["recipients"] == RCPTS and r["accepted"] == RCPTS for r in rows)
    kept = sorted((archive / "new").iterdir())
    assert sorted(p.read_bytes() for p in kept) == sorted(m[2] for m in sink.messages)


# -- Postfix's advanced content filter (FILTER_README): Postfix -> us -> Postfix --------

POSTFIX_PEOPLE = ["steve.tuck@sparkpost.com", "bob@example.org", "carol@example.net"]


def postfix_filter(pki, base, gw_port, people):
    """A private Postfix whose content_filter is the gateway on *gw_port*, with a second
    smtpd for reinjection (its port: .reinject); queue timers in seconds, not minutes."""
    from support import mta
    from support.servers import server_context
    server_context(pki.inter, base, name="localhost")
    reinject = free_port()
    main = {"content_filter": "smime:[127.0.0.1]:%d" % gw_port,
            "queue_run_delay": "1s", "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s", "transport_retry_time": "1s",
            "smime_destination_concurrency_failed_cohort_limit": "100",
            "smime_initial_destination_concurrency": "4"}
    master = ["smime unix - - n - 4 smtp",
              "  -o smtp_send_xforward_command=yes",
              "  -o disable_mime_output_conversion=yes",
              "127.0.0.1:%d inet n - n - 10 smtpd" % reinject,
              "  -o content_filter=",
              "  -o receive_override_options=no_unknown_recipient_checks,"
              "no_header_body_checks,no_milters",
              "  -o smtpd_helo_restrictions=",
              "  -o smtpd_client_restrictions=",
              "  -o smtpd_sender_restrictions=",
              "  -o smtpd_relay_restrictions=permit_mynetworks,reject",
              "  -o smtpd_recipient_restrictions=permit_mynetworks,reject",
              "  -o mynetworks=127.0.0.0/8",
              "  -o smtpd_authorized_xforward_hosts=127.0.0.0/8"]
    server = mta.Postfix(base, people, os.path.join(base, "server.crt"),
                         os.path.join(base, "server.key"), main, master)
    server.reinject = reinject
    return server


@pytest.fixture
def postfix_gateway(pki, tmp_path):
    """(Postfix, gateway port, start()): a Postfix filtering through the gateway."""
    import tempfile
    from support import mta
    if not mta.tools_present():
        if os.environ.get("CI") == "true":
            pytest.fail("postfix/opendkim are not installed, and CI must run every test")
        pytest.skip("postfix/opendkim are not installed")
    base = tempfile.mkdtemp(prefix="smime-postfix-gw-")  # the postfix user must reach it
    gw_port = free_port()
    server = postfix_filter(pki, base, gw_port, POSTFIX_PEOPLE + ["steve@thetucks.com"])
    running = []

    def start():
        gw = Gateway(tmp_path, ["--keys", pki.keys, "--send_smtp", "--sign", "--encrypt",
                                "--jobs", "2"],
                     {"SMTP_HOST": "localhost", "SMTP_PORT": str(server.reinject),
                      "SMTP_TLS": "starttls", "SMTP_CAFILE": pki.cafile}, port=gw_port)
        running.append(gw)
        return gw
    try:
        server.start()
        yield server, start
    finally:
        for gw in running:
            if gw.proc.poll() is None:
                gw.stop()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def submit(port, count, people, tag):
    """Submit *count* messages to Postfix (one connection); return their Message-IDs."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        for n in range(count):
            mid = "<%s-%d@thetucks.com>" % (tag, n)
            msg = (b"From: Steve Tuck <steve@thetucks.com>\r\nTo: %s\r\nSubject: via Postfix %d"
                   b"\r\nMessage-ID: %s\r\nDate: Mon, 02 Nov 2026 10:00:00 +0000\r\n\r\n"
                   b"Statement %d, through the S/MIME content filter.\r\n"
                   % (", ".join(people[:2]).encode(), n, mid.encode(), n))
            assert c.sendmail("steve@thetucks.com", people, msg) == {}
            ids.append(mid.encode())
    return ids


def message_id(data):
    return re.search(rb"(?im)^Message-ID: (<[^>]+>)", data).group(1)


def test_postfix_content_filter_signs_and_encrypts_for_every_recipient(
        postfix_gateway, pki, openssl):
    postfix, start = postfix_gateway
    gw = start()
    ids = submit(postfix.port, 2, POSTFIX_PEOPLE, "filtered")
    for who in POSTFIX_PEOPLE:
        got = postfix.wait_for(who, 2)
        assert sorted(message_id(d) for d in got) == sorted(ids)
        for data in got:
            head = data.split(b"\r\n\r\n" if b"\r\n\r\n" in data else b"\n\n", 1)[0]
            assert b"application/pkcs7-mime; smime-type=enveloped-data" in head
            assert b"(sparkpostSMIME) with ESMTP id" in head
            signed = openssl.decrypt(data, pki.cert_path(who), pki.key_path(who))
            assert b"through the S/MIME content filter" in openssl.verify(signed, pki.cafile)
    assert gw.stop() == 0
    assert "Summary: 2 sent, 0 failed" in gw.stdout()


def test_postfix_retries_through_a_gateway_killed_and_restarted(postfix_gateway):
    postfix, start = postfix_gateway
    people = POSTFIX_PEOPLE[:1]
    gw = start()
    ids = submit(postfix.port, 200, people, "restart")
    deadline = time.monotonic() + 60
    while len(os.listdir(os.path.join(postfix.maildir(people[0]), "new"))) < 40:
        assert time.monotonic() < deadline, postfix.log()[-3000:]
        time.sleep(0.05)
    gw.kill()  # in the middle of the run, messages in flight
    time.sleep(2)  # Postfix meets a closed port and defers
    start()
    got = postfix.wait_for(people[0], 200, timeout=120)
    assert sorted(message_id(d) for d in got) == sorted(ids)  # each one, exactly once
    time.sleep(2)
    assert len(os.listdir(os.path.join(postfix.maildir(people[0]), "new"))) == 200
    assert "status=deferred" in postfix.log()


def test_a_gateway_process_that_dies_is_replaced(start, sink):
    gw = start(["--sign", "--jobs", "2"], hop_env(sink))
    with gw.client() as c:
        assert c.sendmail("alice@example.com", RCPTS[:1], MSG) == {}
    pid = gw.proc.pid
    children = open("/proc/%d/task/%d/children" % (pid, pid)).read().split()
    assert len(children) == 2
    os.kill(int(children[0]), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while "starting another" not in gw.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(4):  # connections go to each process in turn: all of them serve
        with gw.client() as c:
            assert c.sendmail("alice@example.com", RCPTS[:1], MSG) == {}
    with gw.client() as c:  # a refusal, counted by its process and added up at the end
        assert c.mail("alice@example.com")[0] == 250
        assert c.rcpt("bad\x7f@example.org")[0] == 553
    assert len(sink.messages) == 5
    assert gw.stop() == 0
    assert ", 1 recipient refused in " in gw.stdout()
    assert "ended (-9): starting another" in gw.stderr()


def test_ipv6_loopback(tmp_path, pki, sink):
    gw = Gateway(tmp_path, ["--keys", pki.keys, "--send_smtp", "--sign", "--jobs", "2"],
                 hop_env(sink), host="::1")
    with gw.client() as c:
        assert c.sendmail("alice@example.com", RCPTS[:1], MSG) == {}
    assert gw.stop() == 0
    (_, _, data), = sink.messages
    assert b"([::1])" in data.split(b"\r\n", 1)[0]
