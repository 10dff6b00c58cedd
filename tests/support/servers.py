"""Real test servers on loopback: aiosmtpd (STARTTLS, implicit TLS, AUTH) and an HTTP API.

They record what they receive and can be told to refuse, so tests check the tool's
behaviour against real protocol peers, never against mocks.
"""

import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from . import sparkpost_rules
from .pki import pem_cert, pem_key, write


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_context(ca, base, name="localhost"):
    """Return an SSLContext with a certificate for localhost/127.0.0.1 issued by *ca*."""
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from .pki import DAY, NOW, new_key
    key = new_key()
    cert = (x509.CertificateBuilder().subject_name(x509.Name([
        x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY).not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        # RFC 5280 4.2.1.1; Python 3.13's default context (VERIFY_X509_STRICT) requires it
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
        .sign(ca.key, hashes.SHA256()))
    certfile = write(base + "/server.crt", pem_cert(cert, *ca.chain))
    keyfile = write(base + "/server.key", pem_key(key))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


class Recorder:
    """aiosmtpd handler: records envelopes; can refuse, fail, stall or drop on purpose.

    refuse: address -> reply for RCPT; refuse_once: the same, for the first RCPT only; drop_every: N drops the connection at the end
    of every Nth DATA of a content not seen before (no reply, message not kept; a
    retry goes through, so the number of drops is known); tempfail_data: that many DATA
    commands get "451 4.3.0"; tempfail_once: a DATA whose content holds one of these byte
    strings gets "451 4.3.0" the first time only; delay: seconds to wait before answering DATA;
    pipelining: offer PIPELINING (RFC 2920) in the EHLO reply, as production MTAs do
    (aiosmtpd reads commands in order from its buffer, so it can take them in groups).
    """

    def __init__(self, pipelining=True):
        self.pipelining = pipelining
        self.messages = []      # (mail_from, [rcpt], data bytes)
        self.refuse = {}        # address -> "550 5.7.1 relaying denied"
        self.refuse_once = {}   # address -> reply for its first RCPT only
        self.auth_seen = []     # (mechanism, login)
        self.addresses = []     # every address of MAIL and RCPT, as received
        self.connections = 0    # connections that sent MAIL so far
        self.drop_every = 0
        self.tempfail_data = 0
        self.reject_data = ""   # a reply for every end of DATA, e.g. "554 5.7.0 no"
        self.tempfail_once = set()
        self.delay = 0.0
        self.dropped = 0
        self.data_commands = 0
        self.seen, self.fresh = set(), 0  # contents seen at DATA; how many were new

    def connection(self, session):
        """Return the number of *session*'s connection (1, 2, ...)."""
        if not hasattr(session, "test_number"):
            self.connections += 1
            session.test_number = self.connections
        return session.test_number

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname  # this hook's duty (aiosmtpd 1.4)
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.connection(session)
        self.addresses.append(address)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.addresses.append(address)
        if address.lower() in self.refuse_once:
            return self.refuse_once.pop(address.lower())
        if address.lower() in self.refuse:
            return self.refuse[address.lower()]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        import asyncio
        if self.delay:
            await asyncio.sleep(self.delay)
        self.data_commands += 1
        content = envelope.original_content
        fresh = content not in self.seen  # a retry of a dropped message goes through
        self.seen.add(content)
        self.fresh += fresh
        if self.drop_every and fresh and self.fresh % self.drop_every == 0:
            self.dropped += 1
            server.transport.close()  # gone before the end-of-DATA reply
            return "421 4.4.2 (never seen: the connection is closed)"
        if self.reject_data:
            return self.reject_data
        marked = [m for m in self.tempfail_once if m in envelope.original_content]
        if self.tempfail_data > 0 or marked:
            self.tempfail_data -= not marked
            self.tempfail_once.difference_update(marked)
            return "451 4.3.0 Temporary failure, try again"
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content))
        return "250 2.0.0 Ok: queued as Q%05d" % len(self.messages)


class StopOnExit:
    """``with Server(...) as srv:`` gives the running server and stops it on leaving the block.

    Only stop() is called: what the server recorded (srv.messages, srv.requests, ...)
    stays readable after the block.
    """

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


class SmtpServer(StopOnExit):
    """A running aiosmtpd on 127.0.0.1 with optional STARTTLS, implicit TLS and AUTH."""

    def __init__(self, ctx=None, implicit_tls=False, users=None, auth_require_tls=True,
                 exclude_mechanisms=(), pipelining=True):
        self.handler = Recorder(pipelining)
        self.users = users or {}
        self.port = free_port()
        kwargs = dict(auth_require_tls=auth_require_tls,
                      auth_exclude_mechanism=list(exclude_mechanisms))
        if self.users:
            kwargs["authenticator"] = self.authenticate
        if ctx is not None and implicit_tls:
            kwargs["ssl_context"] = ctx
        elif ctx is not None:
            kwargs["tls_context"] = ctx
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     server_hostname="localhost", **kwargs)
        self.controller.start()

    @property
    def messages(self):
        return self.handler.messages

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.handler.auth_seen.append((mechanism, login))
        return AuthResult(success=self.users.get(login) == password, handled=False)

    def stop(self):
        self.controller.stop()


class SilentServer(StopOnExit):
    """Accepts TCP connections and never says a word (for timeouts)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.talk(conn)

    def talk(self, conn):
        """What it says on a connection: nothing."""

    def stop(self):
        self.sock.close()
        for c in self.conns:
            c.close()


class EndlessReplies(SilentServer):
    """An SMTP server whose EHLO reply never ends (ten thousand '250-' lines, then a
    last one); every other command is answered 250."""

    def talk(self, conn):
        threading.Thread(target=self.converse, args=(conn,), daemon=True).start()

    @staticmethod
    def converse(conn):
        try:
            conn.sendall(b"220 endless ESMTP\r\n")
            for line in conn.makefile("rb"):
                if line[:4].upper() in (b"EHLO", b"HELO"):
                    conn.sendall(b"250-talkative\r\n" * 10_000 + b"250 OK\r\n")
                else:
                    conn.sendall(b"250 OK\r\n")
        except (OSError, ValueError):
            pass


class ApiServer(StopOnExit):
    """A local HTTP server standing in for SparkPost's transmissions API.

    Records every request; answers from *responses* (status, headers, body dict) in
    order, then with 200 and a transmission id.  With *rules*, the answer is what
    SparkPost's documentation says it would be (sparkpost_rules.check_transmission;
    *remaining* recipients before its sending limit answers 420), and
    delivered(n) gives what each recipient of request n would receive.
    """

    def __init__(self, rules=False, remaining=None):
        self.requests = []
        self.responses = []
        self.rules, self.remaining = rules, remaining
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                outer.requests.append({"path": self.path, "headers": dict(self.headers),
                                       "body": body})
                if outer.responses:
                    status, headers, data = outer.responses.pop(0)
                elif outer.rules:
                    status, data = sparkpost_rules.check_transmission(
                        json.loads(body), remaining=outer.remaining)
                    headers = {}
                    if status == 200 and outer.remaining is not None:
                        outer.remaining -= data["results"]["total_accepted_recipients"]
                else:
                    status, headers, data = 200, {}, {"results": {
                        "total_rejected_recipients": 0,
                        "total_accepted_recipients": len(json.loads(body)["recipients"]),
                        "id": "7013%04d" % len(outer.requests)}}
                payload = json.dumps(data).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def delivered(self, n=-1):
        """Return {address: bytes delivered} for request *n*, as SparkPost would send them."""
        body = json.loads(self.requests[n]["body"])
        return {r["address"]["email"]: sparkpost_rules.delivered_message(body, r)
                for r in body["recipients"]}

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
