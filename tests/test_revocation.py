"""Revocation (RFC 5280 CRLs, RFC 6960 OCSP) against real counterparts on 127.0.0.1:
OpenSSL's `openssl ocsp` answering each request (-reqin/-respout) behind a small HTTP
server the tests start, and CRLs made with cryptography served over HTTP.  Signers on
--verify/--decrypt/--harvest, recipients before --encrypt, our own certificate before
signing; soft and hard policy; the on-disk cache's request counts; local CRL files."""

import collections
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from support import engines
import sparkpostSMIME as tool
from support.harness import need, one_line as fails, run_tool
from support.corpus import CORPUS
from support.pki import DAY, NOW, name, new_key, pem_cert, pem_key, write

ALICE, BOB = "alice@example.com", "bob@example.org"
BODY = "Content-Type: text/plain; charset=us-ascii\n\nRevocation test.\n"


class Server(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1: /ocsp/<ca> runs `openssl ocsp` for the request,
    /crl/<ca> serves that CA's CRL, /hang never answers; counts requests by path."""
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.cas, self.counts, self.stop = {}, collections.Counter(), threading.Event()

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.server_address[1], path)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.answer(body)

    def do_GET(self):
        self.answer(None)

    def answer(self, body):
        server = self.server
        _, kind, ca_name = (self.path.split("/") + ["", ""])[:3]
        server.counts[self.path if body is None else "/%s/%s" % (kind, ca_name)] += 1
        if kind == "hang":
            server.stop.wait(30)
            return
        if kind == "big":  # an answer larger than any OCSP response
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\0" * (128 << 10))
            return
        ca = server.cas.get(ca_name)
        data = None
        if ca is not None and kind == "crl":
            data = ca.crl
        elif ca is not None and kind == "ocsp" and body is not None:
            data = ca.ocsp(body)
        if data is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    need("openssl")
    made = Server()
    thread = threading.Thread(target=made.serve_forever, daemon=True)
    thread.start()
    yield made
    made.stop.set()
    made.shutdown()


def closed_port_url():
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return "http://127.0.0.1:%d/ocsp" % port


class Authority:
    """A CA whose certificates name its OCSP responder and CRL on *server*; keeps an
    OpenSSL index (V/R lines) and a CRL made with cryptography."""

    def __init__(self, server, base, label, parent=None, ocsp=None, crl=None):
        self.server, self.base, self.label = server, base, label
        self.key, self.index, self.revoked = new_key(), [], {}
        self.crl_next = NOW + DAY
        self.crl_key = self.key
        self.responder = "authorised"
        issuer = parent or self
        self.name = name(label)
        builder = (x509.CertificateBuilder().subject_name(self.name)
                   .issuer_name(parent.name if parent else self.name)
                   .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                False, False), critical=True))
        if parent:
            builder = parent.locations(builder, ocsp, crl)
        self.cert = builder.sign(issuer.key, hashes.SHA256())
        if parent:
            parent.index.append(self.cert)
        server.cas[label] = self
        self.files = {"ca": write(os.path.join(base, label + ".crt"), pem_cert(self.cert))}
        self.make_responders()
        self.make_crl()

    def locations(self, builder, ocsp=None, crl=None):
        """Add this CA's AIA (OCSP) and CDP (CRL) to a certificate it issues."""
        ocsp = ocsp if ocsp is not None else self.server.url("/ocsp/" + self.label)
        crl = crl if crl is not None else self.server.url("/crl/" + self.label)
        if ocsp:
            builder = builder.add_extension(x509.AuthorityInformationAccess([
                x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                                       x509.UniformResourceIdentifier(ocsp))]), critical=False)
        if crl:
            builder = builder.add_extension(x509.CRLDistributionPoints([
                x509.DistributionPoint([x509.UniformResourceIdentifier(crl)], None, None,
                                       None)]), critical=False)
        return builder

    def make_responders(self):
        """An authorised responder (id-kp-OCSPSigning) and an unauthorised one."""
        for kind, eku in (("authorised", ExtendedKeyUsageOID.OCSP_SIGNING),
                          ("unauthorised", ExtendedKeyUsageOID.CLIENT_AUTH)):
            key = new_key()
            cert = (x509.CertificateBuilder().subject_name(name("%s %s responder"
                                                                % (self.label, kind)))
                    .issuer_name(self.name).public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(NOW - DAY).not_valid_after(NOW + 30 * DAY)
                    .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                    .sign(self.key, hashes.SHA256()))
            self.files[kind] = write(os.path.join(self.base, "%s-%s.crt" % (self.label, kind)),
                                     pem_cert(cert))
            self.files[kind + ".key"] = write(os.path.join(self.base, "%s-%s.key"
                                                           % (self.label, kind)), pem_key(key))

    def issue(self, email, ocsp=None, crl=None):
        key = new_key()
        builder = (x509.CertificateBuilder().subject_name(name(email)).issuer_name(self.name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.KeyUsage(True, True, True, False, False, False, False,
                                                False, False), critical=True)
                   .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]),
                                  critical=False))
        cert = self.locations(builder, ocsp, crl).sign(self.key, hashes.SHA256())
        self.index.append(cert)
        return key, cert

    def revoke(self, cert, reason=x509.ReasonFlags.key_compromise):
        self.revoked[cert.serial_number] = reason
        self.make_crl()

    def make_crl(self):
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.name)
                   .last_update(min(NOW, self.crl_next) - DAY).next_update(self.crl_next))
        for serial, reason in self.revoked.items():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(NOW - DAY / 2)
                .add_extension(x509.CRLReason(reason), critical=False).build())
        self.crl = builder.sign(self.crl_key, hashes.SHA256()).public_bytes(
            serialization.Encoding.DER)

    def ocsp(self, request):
        """Answer one OCSP request with `openssl ocsp` over this CA's index."""
        lines = []
        for cert in self.index:
            expiry = cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
            serial = "%X" % cert.serial_number
            serial = ("0" if len(serial) % 2 else "") + serial
            if cert.serial_number in self.revoked:
                when = (NOW - DAY / 2).strftime("%y%m%d%H%M%SZ") + ",keyCompromise"
                lines.append("R\t%s\t%s\t%s\tunknown\t/CN=%s" % (expiry, when, serial, serial))
            else:
                lines.append("V\t%s\t\t%s\tunknown\t/CN=%s" % (expiry, serial, serial))
        index = write(os.path.join(self.base, self.label + ".index"),
                      ("\n".join(lines) + "\n").encode())
        stamp = "%s-%d" % (self.label, time.monotonic_ns())
        req = write(os.path.join(self.base, stamp + ".req"), request)
        resp = os.path.join(self.base, stamp + ".resp")
        signer = self.responder
        proc = subprocess.run(["openssl", "ocsp", "-index", index, "-CA", self.files["ca"],
                               "-rsigner", self.files[signer], "-rkey",
                               self.files[signer + ".key"], "-reqin", req, "-respout", resp,
                               "-ndays", "1"], capture_output=True, timeout=30)
        if proc.returncode != 0 or not os.path.exists(resp):
            return None
        with open(resp, "rb") as fh:
            return fh.read()


class World:
    """A root, an intermediate and alice (signer) and bob (recipient) under it."""

    def __init__(self, server, base, tag, leaf_ocsp=None, leaf_crl=None):
        self.base = str(base)
        self.root = Authority(server, self.base, "root-" + tag)
        self.inter = Authority(server, self.base, "inter-" + tag, parent=self.root)
        self.keys = os.path.join(self.base, "keys")
        os.makedirs(self.keys)
        self.ids = {}
        for who in (ALICE, BOB):
            key, cert = self.inter.issue(who, leaf_ocsp, leaf_crl)
            self.ids[who] = (key, cert)
            write(os.path.join(self.keys, who + ".pem"), pem_key(key))
            write(os.path.join(self.keys, who + ".crt"), pem_cert(cert, self.inter.cert))
        self.cache = os.path.join(self.base, "cache")
        self.signed = None

    def env(self, **more):
        env = {"XDG_CACHE_HOME": self.cache}
        env.update(more)
        return env

    def signed_by_openssl(self):
        """alice's message signed by `openssl smime -sign` (chain included)."""
        key, cert = self.ids[ALICE]
        files = [write(os.path.join(self.base, n), d) for n, d in (
            ("a.key", pem_key(key)), ("a.crt", pem_cert(cert)),
            ("chain.crt", pem_cert(self.inter.cert)), ("body.txt", BODY.encode()))]
        out = engines.run(["openssl", "smime", "-sign", "-in", files[3], "-signer", files[1],
                           "-inkey", files[0], "-certfile", files[2], "-from", ALICE,
                           "-to", BOB, "-subject", "hi"]).stdout
        return write(os.path.join(self.base, "signed.eml"), out)

    def verify(self, *extra, mode="--verify", env=None):
        path = self.signed or self.signed_by_openssl()
        self.signed = path
        return run_tool([mode, path, "--keys", self.keys, "--ca", self.root.files["ca"]]
                        + list(extra), env=env or self.env())

    def build(self, *flags, env=None):
        path = os.path.join(self.base, "in.eml")
        with open(path, "wb") as fh:
            fh.write(CORPUS["plain-ascii"])  # alice -> bob
        return run_tool([path, "--keys", self.keys] + list(flags), env=env or self.env())


def passes(proc, warnings=0):
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert err.count("no revocation answer") == warnings, err
    return err


@pytest.fixture
def world(server, tmp_path):
    return World(server, tmp_path, tmp_path.name[-20:])


def test_good_answers_and_the_cache(world, server):
    """A good chain passes silently; a second run and a batch ask nobody again."""
    passes(world.verify())
    ocsp = "/ocsp/" + world.inter.label
    assert server.counts[ocsp] == 1 and server.counts["/ocsp/" + world.root.label] == 1
    passes(world.verify())
    passes(world.build("--sign", "--encrypt"))
    inputs = []
    for n in range(5):
        inputs.append(write(os.path.join(world.base, "m%d.eml" % n), CORPUS["plain-ascii"]))
    out = os.path.join(world.base, "out")
    os.makedirs(out)
    proc = run_tool(inputs + ["--keys", world.keys, "--encrypt", "--sign", "-o", out,
                              "--jobs", "2"], env=world.env())
    passes(proc)
    assert server.counts[ocsp] == 2  # alice's (first run) and bob's (first --encrypt)
    assert server.counts["/crl/" + world.inter.label] == 0  # OCSP answered first


def test_corrupt_cache_entries_are_fetched_again(world, server):
    passes(world.verify())
    cache = os.path.join(world.cache, "sparkpostSMIME", "revocation")
    names = os.listdir(cache)
    assert len(names) == 2  # alice's and the intermediate's verdicts
    for entry in names:
        write(os.path.join(cache, entry), b"\xff garbage\n\0\0")
    passes(world.verify())
    assert server.counts["/ocsp/" + world.inter.label] == 2
    assert server.counts["/ocsp/" + world.root.label] == 2
    passes(world.verify())  # rewritten, fresh again
    assert server.counts["/ocsp/" + world.inter.label] == 2


def test_revoked_signer_everywhere(world, server):
    world.inter.revoke(world.ids[ALICE][1])
    serial = "%x" % world.ids[ALICE][1].serial_number
    for mode in ("--verify", "--decrypt"):
        fails(world.verify(mode=mode), 65, "is revoked", "key_compromise", serial,
              "/ocsp/" + world.inter.label)
    harvested = os.path.join(world.base, "harvested")
    proc = run_tool(["--harvest", world.signed, "--keys", harvested, "--ca",
                     world.root.files["ca"]], env=world.env())
    fails(proc, 65, "is revoked")
    assert not os.path.exists(os.path.join(harvested, ALICE + ".crt"))
    proc = world.build("--sign")
    fails(proc, 78, ALICE, "is revoked", serial)
    assert proc.stdout == b""


def test_revoked_recipient_is_refused_before_encrypting(world):
    world.inter.revoke(world.ids[BOB][1])
    proc = world.build("--encrypt")
    err = fails(proc, 78, BOB, "is revoked", "key_compromise")
    assert proc.stdout == b"" and err.count("\n") == 1
    proc = world.build("--encrypt", "--revocation", "off")
    assert proc.returncode == 0  # off: no request, no refusal


def test_revoked_intermediate_by_the_roots_crl(world, server):
    world.root.responder = "unauthorised"  # the root's OCSP answers do not count: CRL
    world.root.revoke(world.inter.cert, x509.ReasonFlags.ca_compromise)
    fails(world.verify(), 65, "is revoked", "ca_compromise", "/crl/" + world.root.label,
          world.inter.label)
    assert server.counts["/crl/" + world.root.label] == 1


def test_gateway_hook_recipient_problem(world):
    world.inter.revoke(world.ids[BOB][1])
    revocation = tool.Revocation("soft", os.path.join(world.cache, "sparkpostSMIME"))
    keystore = tool.Keystore([world.keys], revocation=revocation)
    assert "is revoked" in tool.recipient_problem(keystore, BOB)
    assert tool.recipient_problem(keystore, ALICE) == ""
    assert "no certificate for recipient" in tool.recipient_problem(keystore, "x@example.com")


@pytest.mark.parametrize("case", ["unknown", "down", "hang", "big", "stale-crl",
                                  "wrong-key-crl", "unauthorised-ocsp"])
def test_no_answer_soft_warns_hard_refuses(server, tmp_path, case):
    leaf_ocsp = {"down": closed_port_url(), "hang": server.url("/hang/x"),
                 "big": server.url("/big/x"),
                 "stale-crl": "", "wrong-key-crl": ""}.get(case)
    leaf_crl = "" if case in ("unknown", "down", "hang", "big", "unauthorised-ocsp") else None
    world = World(server, tmp_path, tmp_path.name[-20:], leaf_ocsp=leaf_ocsp,
                  leaf_crl=leaf_crl)
    if case == "unknown":
        world.inter.index.remove(world.ids[ALICE][1])
    elif case == "stale-crl":
        world.inter.crl_next = NOW - DAY / 4
        world.inter.make_crl()
    elif case == "wrong-key-crl":
        world.inter.crl_key = new_key()
        world.inter.make_crl()
    elif case == "unauthorised-ocsp":
        world.inter.responder = "unauthorised"
    err = passes(world.verify(), warnings=1)
    words = {"unknown": "does not know", "down": "127.0.0.1", "hang": "within 5 seconds",
             "big": "larger than 65536 octets",
             "stale-crl": "stale", "wrong-key-crl": "not signed by the certificate's issuer",
             "unauthorised-ocsp": "did not authorise"}[case]
    assert words in err and "serial %x" % world.ids[ALICE][1].serial_number in err, err
    fails(world.verify("--revocation", "hard"), 65, "no fresh revocation answer", words)
    fails(world.build("--sign", env=world.env(SMIME_REVOCATION="hard")), 78,
          "no fresh revocation answer")


def test_local_crl_files_offline(server, tmp_path):
    """No responder, no CDP: a CRL file set in SMIME_CRL_FILES answers."""
    world = World(server, tmp_path, tmp_path.name[-20:], leaf_ocsp="", leaf_crl="")
    world.inter.revoke(world.ids[BOB][1])
    crl = write(os.path.join(world.base, "inter.crl"), world.inter.crl)
    pem = write(os.path.join(world.base, "root.crl"), b"-----BEGIN X509 CRL-----\n"
                + __import__("base64").encodebytes(world.root.crl) + b"-----END X509 CRL-----\n")
    env = world.env(SMIME_CRL_FILES="%s:%s" % (crl, pem))
    fails(world.build("--encrypt", env=env), 78, BOB, "is revoked", crl)
    passes(world.build("--sign", env=env))
    fails(world.build("--sign", env=world.env(SMIME_REVOCATION="hard")), 78,
          "no OCSP responder or CRL named")
    fails(world.build("--sign", env=world.env(SMIME_REVOCATION="sometimes")), 78,
          "SMIME_REVOCATION")


def raw_http(answer=None, drip=0):
    """A hostile HTTP server on 127.0.0.1 answering every request with the bytes *answer*,
    or a status line then one header line a second *drip* times; return its URL."""
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(20)

    def serve():
        while True:
            conn, _ = listener.accept()
            try:
                conn.recv(65536)
                if drip:
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                    for _ in range(drip):
                        conn.sendall(b"X-Slow: yes\r\n")
                        time.sleep(1)
                else:
                    conn.sendall(answer)
            except OSError:
                pass
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return "http://127.0.0.1:%d/ocsp" % listener.getsockname()[1]


@pytest.mark.parametrize("case", ["bad-status-line", "bad-redirect", "header-line-too-long",
                                  "bad-chunk", "headers-dripped"])
def test_a_hostile_responder_is_no_answer(server, tmp_path, case):
    """A responder that answers garbage, redirects to a malformed URL, sends a 70 KB header
    line or a broken chunked body, or drips its headers one a second: no internal error,
    just no answer (soft: a warning and the message goes out, 0).  The dripping server
    would hold an unbounded fetch for 10 minutes: run_tool's timeout (120 s) fails a run
    that waits for it."""
    url = raw_http(drip=600) if case == "headers-dripped" else raw_http({
        "bad-status-line": b"garbage\r\n\r\n",
        "bad-redirect": b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:abc/\r\n"
                        b"Content-Length: 0\r\n\r\n",
        "header-line-too-long": b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n",
        "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    }[case])
    world = World(server, tmp_path, tmp_path.name[-20:], leaf_ocsp=url, leaf_crl="")
    proc = world.build("--encrypt")
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert "internal error" not in err and "no revocation answer" in err, err
