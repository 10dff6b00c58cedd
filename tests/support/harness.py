"""The tool as a subprocess and what most tests share: a throwaway PKI on disk, the
environment of a run, a directory of messages, the batch summary and journal.

Fixtures are in tests/conftest.py; they build on these helpers.  TEST-ONLY keys.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from . import engines
from .corpus import CORPUS
from .pki import CA, pem_cert, pem_key, write

#: tests/, the repository root, and the tool.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
TOOL = os.path.join(ROOT, "sparkpostSMIME.py")

#: Everyone in the test PKI; the first is the usual sender.
PEOPLE = ("alice@example.com", "bob@example.org", "carol@example.net", "dave@example.com",
          "erin@example.org", "steve@thetucks.com", "steve.tuck@sparkpost.com")
#: Cache directory of the tool during the tests (validated-key list).
CACHE = os.path.join(tempfile.mkdtemp(prefix="smime-cache-"), "cache")
#: Secrets planted in tests; no output of the tool may ever contain them.
KEY_PASSWORD = "k3y-Pa55phrase-TEST"


def need(tool):
    """Skip when *tool* is missing; under CI=true a missing tool fails the test."""
    if shutil.which(tool):
        return
    if os.environ.get("CI") == "true":
        pytest.fail("%s is not installed, and CI must run every test" % tool)
    pytest.skip("%s is not installed" % tool)


class PKI:
    """A root CA, an intermediate, and one identity per address in PEOPLE, on disk."""

    def __init__(self, base):
        self.base = base
        self.keys = os.path.join(base, "keys")       # what the tool reads
        self.private = os.path.join(base, "private")  # recipients' keys, for engines
        os.makedirs(self.keys)
        os.makedirs(self.private)
        self.root = CA()
        self.inter = self.root.intermediate()
        self.cafile = write(os.path.join(base, "ca.crt"), pem_cert(self.root.cert))
        self.ids = {}
        for address in PEOPLE:
            self.add(address)

    def add(self, address, key=None, **kw):
        """Issue a certificate for *address*; write .pem (key) and .crt (cert + chain)."""
        key, cert = self.inter.issue(address, key, **kw)
        self.ids[address] = (key, cert)
        write(os.path.join(self.keys, address + ".pem"), pem_key(key))
        write(os.path.join(self.keys, address + ".crt"), pem_cert(cert, self.inter.cert))
        write(os.path.join(self.private, address + ".pem"), pem_key(key))
        write(os.path.join(self.private, address + ".crt"), pem_cert(cert))
        return key, cert

    def key_path(self, address):
        return os.path.join(self.private, address + ".pem")

    def cert_path(self, address):
        return os.path.join(self.private, address + ".crt")


def tool_env(extra=None):
    """Return the environment run_tool gives the tool (for runs that need their own
    stdout): ours without SMTP_*, SPARKPOST_*, SMIME_*, the session's cache, *extra*."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SMTP_", "SPARKPOST_", "SMIME_"))}
    env["XDG_CACHE_HOME"] = CACHE  # the validated-key list of the test session
    env.update(extra or {})
    return env


def run_tool(args, stdin=None, env=None, cwd=None, timeout=120, preexec=None):
    """Run the tool; return CompletedProcess (bytes).  Never a Traceback on stderr.

    *preexec*: run in the child before the tool starts (resource limits)."""
    proc = subprocess.run([sys.executable, TOOL] + list(args), input=stdin, env=tool_env(env),
                          cwd=cwd or ROOT, capture_output=True, timeout=timeout,
                          preexec_fn=preexec)
    engines.OUTPUTS.append(proc.stdout + proc.stderr)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    return proc


def build(pki, tmp_path, raw, flags, name="in.eml", ok=0, safe=False, env=None):
    """Write *raw* to tmp_path/name and run the tool on it with pki's keys and *flags*;
    return the CompletedProcess.  Its exit code must be *ok* (unless None); with
    *safe*, a message built (exit 0) must be transport-safe (engines); *env*: variables
    added to the tool's environment."""
    path = tmp_path / name
    path.write_bytes(raw)
    proc = run_tool([str(path), "--keys", pki.keys] + list(flags), env=env)
    if ok is not None:
        assert proc.returncode == ok, proc.stderr
    if safe and proc.returncode == 0:
        engines.check_transport_safe(proc.stdout)
    return proc


def send(pki, tmp_path, raw, flags, env, name="msg.eml"):
    """Write *raw* to tmp_path/name and send it: the tool with pki's keys, then *flags*
    (--send_smtp or --send_api among them), in the environment *env*; return the
    CompletedProcess, whatever its exit code (the tests check the failures too)."""
    return build(pki, tmp_path, raw, flags, name, ok=None, env=env)


# -- batches: a directory of messages, the summary line, the journal -----------------

SUMMARY = re.compile(r"Summary: (\d+) sent, (\d+) failed(?:, (\d+) not sent)? in [\d.]+ seconds "
                     r"\([\d.]+ msg/s\)(?:; latency min [\d.]+ ms, median [\d.]+ ms, "
                     r"p95 [\d.]+ ms, max [\d.]+ ms)?$")


def inbox(tmp_path, count, raw=CORPUS["plain-ascii"]):
    """A directory of *count* messages (alice -> bob)."""
    d = tmp_path / "inbox"
    d.mkdir(exist_ok=True)
    for i in range(count):
        (d / ("m%03d.eml" % i)).write_bytes(raw.replace(b"Just text.", b"Message %d." % i))
    return d


def smtp_env(srv):
    """Return the SMTP_* settings that send to test server *srv* (plain, no AUTH)."""
    return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(srv.port), "SMTP_TIMEOUT": "10"}


def summary(proc):
    """Return [sent, failed, not sent] of the summary line ending *proc*'s stdout."""
    last = proc.stdout.decode().strip().splitlines()[-1]
    match = SUMMARY.match(last)
    assert match, last
    return [int(g or 0) for g in match.groups()]


def journal(path):
    """Return the rows (dicts) of journal *path*."""
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def one_line(proc, code, *words):
    """Assert that *proc* ended with exit *code* and that its stderr holds every one of
    *words*; return that stderr."""
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    for word in words:
        assert word in err, err
    return err
