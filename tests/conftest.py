"""Shared fixtures: a throwaway PKI on disk, the tool as a subprocess, S/MIME engines."""

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOOL = os.path.join(ROOT, "sparkpostSMIME.py")
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import engines  # noqa: E402
from pki import CA, pem_cert, pem_key, write  # noqa: E402

#: Everyone in the test PKI; the first is the usual sender.
PEOPLE = ("alice@example.com", "bob@example.org", "carol@example.net", "dave@example.com",
          "erin@example.org", "steve@thetucks.com", "steve.tuck@sparkpost.com")
#: Cache directory of the tool during the tests (validated-key list).
CACHE = os.path.join(__import__("tempfile").mkdtemp(prefix="smime-cache-"), "cache")
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


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return PKI(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="session")
def nss(pki, tmp_path_factory):
    need("cmsutil")
    return engines.NSS(str(tmp_path_factory.mktemp("nss")), pki)


@pytest.fixture(scope="session")
def gpgsm(pki, tmp_path_factory):
    need("gpgsm")
    home = engines.GpgSM(str(tmp_path_factory.mktemp("gnupg")), pki)
    yield home
    home.close()


@pytest.fixture(scope="session")
def tls_ctx(pki, tmp_path_factory):
    """Server TLS context: a localhost/127.0.0.1 certificate issued by the test CA."""
    import servers
    return servers.server_context(pki.inter, str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="session")
def openssl():
    need("openssl")
    return engines.OpenSSL()


def run_tool(args, stdin=None, env=None, cwd=None, timeout=120, preexec=None):
    """Run the tool; return CompletedProcess (bytes).  Never a Traceback on stderr.

    *preexec*: run in the child before the tool starts (resource limits)."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("SMTP_", "SPARKPOST_", "SMIME_"))}
    full_env["XDG_CACHE_HOME"] = CACHE  # the validated-key list of the test session
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, TOOL] + list(args), input=stdin, env=full_env,
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


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_output():
    """After the whole session: no planted secret appeared in any output of the tool."""
    yield
    for blob in engines.OUTPUTS:
        for secret in engines.SECRETS:
            assert secret not in blob, "a secret leaked into the tool's output"


@pytest.fixture(scope="session")
def nss13(pki):
    """Debian 13's NSS cmsutil (3.110) in a cached trixie chroot, holding the session PKI.

    Decrypts EC (ECDH) recipients, which Debian 12's NSS cannot; see tests/trixie.py.
    """
    need("debootstrap")
    import trixie
    engine = trixie.TrixieNSS(trixie.chroot(), pki)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def gpgsm24(pki):
    """Debian 13's GnuPG gpgsm (2.4) in a cached trixie chroot, holding the session PKI.

    Imports EC PKCS#12 and decrypts EC (ECDH) recipients, which gpgsm 2.2 cannot.
    """
    need("debootstrap")
    import trixie
    engine = trixie.TrixieGpgSM(trixie.chroot(), pki)
    yield engine
    engine.close()
