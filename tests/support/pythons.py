"""Other Pythons to run the tool with, for the portability smoke (test_portability.py).

- Debian 13's python3 (3.13) and pypy3, in a cached trixie chroot of their own
  (support/debian.py; /var/cache/sparkpostSMIME-tests/trixie-pythons or
  $SMIME_TEST_PYTHONS), with the dependencies installed by the host's pip into a
  directory of the tree (``pip install --target`` for that interpreter's wheel tags),
  given to the tool as PYTHONPATH;
- this machine's Python in a virtual environment with the minimum declared versions
  (cached in /var/cache/sparkpostSMIME-tests/venv-min-<key>).

A :class:`Runner` runs the tool under one of them on files of its own work directory,
whose path it gives both as the host sees it and as the tool sees it.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from . import debian
from .harness import TOOL

#: Debian 13's CPython and PyPy (cryptography wheels exist for both).
SUITE = debian.Suite("trixie", ("python3", "pypy3"), "SMIME_TEST_PYTHONS",
                     ("python3", "pypy3"), ("pypy3", "--version"), tree="trixie-pythons")
#: The newest of every dependency (what a fresh pip install brings).
NEWEST = ("cryptography>=45", "requests>=2.28", "python-dotenv>=1.0", "aiosmtpd>=1.4.6")
#: Debian 13's pypy3 loads cryptography 45.x/46.x wheels only.
PYPY = ("cryptography>=45,<47", "requests>=2.28", "python-dotenv>=1.0", "aiosmtpd>=1.4.6")
#: The minimum versions requirements.txt declares.
MINIMUM = ("cryptography==45.0.0", "requests==2.28.0", "python-dotenv==1.0.0", "aiosmtpd==1.4.6")
#: Wheel platforms of an x86-64 glibc >= 2.34 (Debian 13 has 2.41).
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "linux_x86_64")


def chroot():
    """Return this process's :class:`debian.Chroot` of the trixie tree with python3 and pypy3."""
    return debian.chroot(SUITE)


def _key(*parts):
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def _pip(args):
    """Run the host's pip with *args*; raise with its output when it fails."""
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check"] + args,
                          capture_output=True, timeout=900)
    if proc.returncode:
        raise RuntimeError("pip %s failed: %s" % (" ".join(args), proc.stderr.decode()[-3000:]))


def _made_once(final, make):
    """Return *final*, made by make(temporary sibling) unless it is there already; the
    rename makes it appear whole or not at all."""
    if not os.path.isdir(final):
        os.makedirs(os.path.dirname(final), exist_ok=True)
        work = tempfile.mkdtemp(prefix=os.path.basename(final) + ".build-",
                                dir=os.path.dirname(final))
        try:
            make(work)
            os.rename(work, final)
        except OSError:
            if not os.path.isdir(final):
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def chroot_site(tree, python, requirements):
    """Return the path inside *tree* of a directory holding *requirements* for *python*
    (python3 or pypy3 of the tree), made once by the host's pip for its wheel tags."""
    tag = tree.run([python, "-c", "import sys; print(sys.implementation.name, "
                    "'%d%d' % sys.version_info[:2])"]).stdout.decode().split()
    impl, version = ("cp", tag[1]) if tag[0] == "cpython" else ("pp", tag[1])
    abi = "cp%s" % version if impl == "cp" else "pypy%s_pp73" % version
    where = "/opt/sparkpostSMIME-tests/site-%s%s-%s" % (impl, version, _key(requirements))
    target = ["--implementation", impl, "--python-version", version, "--abi", abi,
              "--only-binary=:all:"] + ["--platform=" + p for p in PLATFORMS]

    def make(work):
        crypto = [r for r in requirements if r.startswith("cryptography")]
        others = [r for r in requirements if not r.startswith("cryptography")]
        # pip evaluates markers for this Python, not the target: cryptography's cffi
        # (CPython only; PyPy has its own) is named here for CPython targets.
        _pip(["install", "-q", "--target", work, "--no-deps"] + target + crypto)
        _pip(["install", "-q", "--target", work + "/deps"] + target + others
             + (["cffi"] if impl == "cp" else []))
        for name in os.listdir(work + "/deps"):
            os.rename(os.path.join(work, "deps", name), os.path.join(work, name))
        os.rmdir(work + "/deps")
    _made_once(tree.host(where), make)
    return where


def host_venv(requirements, cache_root=debian.CACHE_ROOT):
    """Return the python of a virtual environment of this Python holding exactly
    *requirements*, made once under *cache_root* ($SMIME_TEST_PYTHONS_VENV wins)."""
    base = os.environ.get("SMIME_TEST_PYTHONS_VENV") or cache_root
    final = os.path.join(base, "venv-min-%s" % _key(requirements, sys.version))

    def make(work):
        subprocess.run([sys.executable, "-m", "venv", work], check=True, timeout=300)
        # pip's scripts name the directory they were made in: install through python -m.
        proc = subprocess.run([os.path.join(work, "bin", "python"), "-m", "pip", "install",
                               "-q", "--disable-pip-version-check"] + list(requirements),
                              capture_output=True, timeout=900)
        if proc.returncode:
            raise RuntimeError("pip install %s failed: %s"
                               % (" ".join(requirements), proc.stderr.decode()[-3000:]))
    _made_once(final, make)
    return os.path.join(final, "bin", "python")


class Runner:
    """The tool under one Python, with a work directory: *base* on the host, *inner* as
    the tool sees it; *prefix*: the command that runs the tool (then its arguments);
    *env*: the tool's whole environment (no SMTP_*, SPARKPOST_*, SMIME_* from ours)."""

    def __init__(self, name, base, inner, prefix, env, close=None):
        self.name, self.base, self.inner, self.prefix = name, base, inner, prefix
        self.env, self._close = dict(env, XDG_CACHE_HOME=inner + "/cache"), close

    def path(self, host_path):
        """Return how the tool sees *host_path* (a path in the work directory)."""
        return self.inner + "/" + os.path.relpath(host_path, self.base)

    def run(self, args, env=None, timeout=180):
        """Run the tool with *args*; return the CompletedProcess (bytes)."""
        return subprocess.run(self.prefix + list(args), env=dict(self.env, **(env or {})),
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              preexec_fn=debian.die_with_parent())

    def serve(self, args, env, out, err):
        """Start the tool with *args* in the background; return the Popen.  Closing its
        standard input sends the tool SIGTERM; its exit code is the tool's."""
        shell = 'exec 3<&0; "$@" </dev/null & pid=$!; read _ <&3; kill -TERM $pid; wait $pid'
        return subprocess.Popen(self.prefix[:-2] + ["sh", "-c", shell, "sh"] + self.prefix[-2:]
                                + list(args), env=dict(self.env, **env), stdin=subprocess.PIPE,
                                stdout=out, stderr=err, preexec_fn=debian.die_with_parent())

    def close(self):
        if self._close:
            self._close()


def in_chroot(tree, python, requirements):
    """Return a :class:`Runner` of the tool under *python* (python3 or pypy3) of *tree*."""
    site = chroot_site(tree, python, requirements)
    base, lock = tree.workdir()
    shutil.copy(TOOL, os.path.join(base, "sparkpostSMIME.py"))
    inner = tree.inside(base)

    def close():
        shutil.rmtree(base, ignore_errors=True)
        lock.close()
    env = dict(debian.INNER_ENV, PYTHONPATH=site, PYTHONDONTWRITEBYTECODE="1")
    return Runner("debian13-" + python, base, inner,
                  tree.command([python, inner + "/sparkpostSMIME.py"]), env, close)


def on_host(python, base):
    """Return a :class:`Runner` of the tool under *python* (a venv's) in directory *base*."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SMTP_", "SPARKPOST_", "SMIME_", "PYTHON"))}
    return Runner("host-" + os.path.basename(os.path.dirname(os.path.dirname(python))),
                  base, base, [python, TOOL], env)
