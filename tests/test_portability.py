"""Portability smoke: the tool's main paths under other Pythons and dependency versions.

Under Debian 13's python3 (3.13) and pypy3 (in a cached chroot, support/pythons.py) and
under this machine's Python with the minimum versions requirements.txt declares: sign and
encrypt (OpenSSL decrypts and verifies), sign detached (the tool's own --verify), a batch
with --results and --jobs 2, a --send_smtp with STARTTLS and AUTH, and the gateway (--serve
--jobs 2) relaying to an SMTP server.  The servers run here; the tool reaches them over loopback.  The newest
release of every dependency is what the rest of the suite runs on (tests/requirements.txt
has no upper bounds).
"""

import os
import re
import shutil
import smtplib
import socket
import time

import pytest

from support import engines, pythons
from support.corpus import CORPUS
from support.harness import SUMMARY, need
from support.servers import SmtpServer, free_port

pytestmark = pytest.mark.system

USER = "SMTP_Injection"
PASSWORD = engines.plant_secret("s3cret-portable-pw-TEST-only")
MSG = CORPUS["plain-ascii"]  # alice -> bob
PYTHONS = ["debian13-python3", "debian13-pypy3", "host-minimum-versions"]


@pytest.fixture(scope="module", params=PYTHONS)
def runner(request, pki, tmp_path_factory):
    """The tool under one Python, with pki's keys and CA in its work directory."""
    if request.param == "host-minimum-versions":
        made = pythons.on_host(pythons.host_venv(pythons.MINIMUM),
                               str(tmp_path_factory.mktemp("min")))
    else:
        tree = request.getfixturevalue("pythons_tree")
        python = request.param.split("-")[1]
        made = pythons.in_chroot(tree, python,
                                 pythons.PYPY if python == "pypy3" else pythons.NEWEST)
    shutil.copytree(pki.keys, os.path.join(made.base, "keys"))
    shutil.copy(pki.cafile, os.path.join(made.base, "ca.crt"))
    yield made
    made.close()


def write(runner, name, data):
    """Write *data* to *name* in the runner's work directory; return the tool's path."""
    path = os.path.join(runner.base, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return runner.path(path)


def ok(proc):
    """Assert exit 0 and no traceback; return stdout as text."""
    assert proc.returncode == 0, (proc.returncode, proc.stderr.decode(errors="replace"))
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    engines.OUTPUTS.append(proc.stdout + proc.stderr)
    return proc.stdout.decode(errors="replace")


def keys(runner):
    return ["--keys", runner.path(os.path.join(runner.base, "keys"))]


def test_sign_and_encrypt_read_by_openssl(runner, pki):
    need("openssl")
    out = runner.run([write(runner, "m.eml", MSG), "--sign", "--encrypt"] + keys(runner))
    openssl = engines.OpenSSL()
    ok(out)
    inner = openssl.decrypt(out.stdout, pki.cert_path("bob@example.org"),
                            pki.key_path("bob@example.org"))
    assert b"Just text." in openssl.verify(inner, pki.cafile)


def test_sign_detached_read_by_its_own_verify(runner):
    signed = ok(runner.run([write(runner, "d.eml", MSG), "--sign_detached"] + keys(runner)))
    path = write(runner, "signed.eml", signed.encode())
    report = ok(runner.run(["--verify", path, "--ca", runner.path(
        os.path.join(runner.base, "ca.crt"))] + keys(runner)))
    assert report.startswith("OK"), report


@pytest.fixture
def tls_server(tls_ctx):
    with SmtpServer(tls_ctx, users={USER: PASSWORD}) as srv:
        yield srv


def smtp_env(runner, srv):
    """STARTTLS to *srv* (certificate for localhost, from the test CA) and AUTH."""
    return {"SMTP_HOST": "localhost", "SMTP_PORT": str(srv.port), "SMTP_USER": USER,
            "SMTP_PASSWORD": PASSWORD, "SMTP_TIMEOUT": "20",
            "SMTP_CAFILE": runner.path(os.path.join(runner.base, "ca.crt"))}


def test_send_smtp_with_starttls_and_auth(runner, tls_server):
    out = ok(runner.run([write(runner, "s.eml", MSG), "--sign", "--encrypt", "--send_smtp"]
                        + keys(runner), env=smtp_env(runner, tls_server)))
    assert out.startswith("Opened SMTP connection (STARTTLS) to localhost"), out
    assert re.fullmatch(r"OK - in \d+\.\d{3} seconds", out.splitlines()[-1]), out
    assert len(tls_server.messages) == 1
    assert tls_server.handler.auth_seen and tls_server.handler.auth_seen[0][1] == USER


def test_batch_with_results(runner, tls_server):
    for i in range(3):
        write(runner, "inbox/m%d.eml" % i, MSG.replace(b"Just text.", b"Message %d." % i))
    results = write(runner, "results.jsonl", b"")
    os.unlink(os.path.join(runner.base, "results.jsonl"))
    out = ok(runner.run([runner.path(os.path.join(runner.base, "inbox")), "--sign",
                         "--send_smtp", "--results", results, "--jobs", "2"] + keys(runner),
                        env=smtp_env(runner, tls_server)))
    match = SUMMARY.match(out.strip().splitlines()[-1])
    assert match and match.groups()[:2] == ("3", "0"), out
    assert len(tls_server.messages) == 3
    with open(os.path.join(runner.base, "results.jsonl")) as fh:
        assert len(fh.read().splitlines()) == 3


def test_gateway_relays_signed_and_encrypted(runner, pki):
    need("openssl")
    port = free_port()
    with SmtpServer() as sink, open(os.path.join(runner.base, "gw.err"), "wb") as err:
        proc = runner.serve(["--serve", "127.0.0.1:%d" % port, "--send_smtp", "--sign",
                             "--encrypt", "--jobs", "2"] + keys(runner),
                            {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(sink.port),
                             "SMTP_TLS": "none", "SMTP_TIMEOUT": "10"},
                            out=err, err=err)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    stopped = proc.poll()
                    assert stopped is None and time.monotonic() < deadline, \
                        (stopped, open(err.name, "rb").read().decode(errors="replace"))
                    time.sleep(0.1)
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
                refused = client.sendmail("alice@example.com", ["bob@example.org"],
                                          MSG.replace(b"\n", b"\r\n"))
            assert refused == {}
        finally:
            proc.stdin.close()
            code = proc.wait(60)
        stderr = open(err.name, "rb").read()
    engines.OUTPUTS.append(stderr)
    assert b"Traceback" not in stderr, stderr.decode(errors="replace")
    assert code == 0, (code, stderr.decode(errors="replace"))
    assert len(sink.messages) == 1 and sink.messages[0][1] == ["bob@example.org"]
    openssl = engines.OpenSSL()
    inner = openssl.decrypt(sink.messages[0][2], pki.cert_path("bob@example.org"),
                            pki.key_path("bob@example.org"))
    assert b"Just text." in openssl.verify(inner, pki.cafile)
