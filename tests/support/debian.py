"""Newer Debian releases in cached chroots, for S/MIME engines the host's Debian lacks.

A :class:`Suite` names a release and the packages the tests need from it (tests/support/trixie.py:
Debian 13's NSS and gpgsm; tests/support/sid.py: Debian sid's OpenSSL 3.6 for ML-KEM).
:func:`chroot` builds (once, then reuses) a minimal tree of it with ``debootstrap`` in the
suite's cache directory and returns a :class:`Chroot` that runs commands inside it.

Every command runs as ``unshare --mount --pid --fork --kill-child --mount-proc=ROOT/proc
chroot ROOT ...``: the proc mount belongs to a private mount namespace and gpg-agent to a
private PID namespace, so both vanish with the command, even when the test process is
killed; nothing is ever left mounted or running.  The device nodes (/dev/null, /dev/urandom,
...) are real nodes in the tree, made once when it is built.  Files are exchanged through a
work directory under ROOT/tmp per engine.

Needs root (chroot, unshare, mknod), ``debootstrap``, and the Debian mirror (a package
registry) for the first build only.  TEST-ONLY: every key handled here is a test key.
"""

import ctypes
import fcntl
import glob
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time

from typing import NamedTuple

from . import engines

#: Trees are cached in CACHE_ROOT/<suite> unless the suite's variable names another directory.
CACHE_ROOT = "/var/cache/sparkpostSMIME-tests"
VARIANT = "minbase"
#: Marker inside a complete tree: the recipe it was built from, versions, build time.
MARKER = ".sparkpostSMIME-tests.json"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The environment of every command inside the chroot (plus per-engine variables).
INNER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8",
             "TZ": "UTC"}
#: Character devices the tools need: name -> (major, minor).  All mode 0666.
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
           "urandom": (1, 9), "tty": (5, 0)}
#: Work directories of engines live in ROOT/tmp under this prefix.
WORK_PREFIX = "smime-work-"

_CHROOTS = {}  # Suite -> the Chroot of this process (or the BuildError), once made
_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


class BuildError(RuntimeError):
    """A tree could not be built; the message says why and ends with the log tail."""


class Suite(NamedTuple):
    """A Debian release to build a tree of, and what to install in it.

    *name*: the debootstrap suite (also the cache directory's name, unless *tree*
    names another); *packages*:
    installed by debootstrap itself (--include), from the same signed Release as the
    base; *env*: the variable naming another cache directory; *versions*: packages
    whose versions the marker records; *version_command*: a command whose first output
    line the marker records too (or ()).
    """
    name: str
    packages: tuple
    env: str
    versions: tuple
    version_command: tuple = ()
    tree: str = ""

    def recipe(self):
        """Return the recipe: changing the suite, variant or packages rebuilds the tree."""
        return {"suite": self.name, "variant": VARIANT, "packages": sorted(self.packages),
                "format": 1}

    def cache_dir(self):
        """Return the absolute path of the cached tree: $<env> or CACHE_ROOT/<tree or name>."""
        return os.path.abspath(os.environ.get(self.env) or
                               os.path.join(CACHE_ROOT, self.tree or self.name))


def debian_mirror(paths=None):
    """Return the Debian archive URL this machine's APT uses (e.g. http://deb.debian.org/debian).

    Reads deb822 ``*.sources`` and one-line ``*.list`` files (*paths*: default, the files in
    /etc/apt/sources.list.d/ and /etc/apt/sources.list) and returns the first ``deb`` URI whose
    path ends in ``/debian`` (so not debian-security, nor third-party repositories);
    $SMIME_TEST_DEBIAN_MIRROR wins, FALLBACK_MIRROR when nothing matches.
    """
    if os.environ.get("SMIME_TEST_DEBIAN_MIRROR"):
        return os.environ["SMIME_TEST_DEBIAN_MIRROR"].rstrip("/")
    if paths is None:
        paths = sorted(glob.glob("/etc/apt/sources.list.d/*")) + ["/etc/apt/sources.list"]
    for path in paths:
        try:
            with open(path) as fh:
                text = fh.read()
        except OSError:
            continue
        uris = []
        if path.endswith(".sources"):
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.split()
                if "deb" in fields.get("types", []) and \
                        fields.get("enabled", ["yes"])[0].lower() != "no":
                    uris += fields.get("uris", [])
        elif path.endswith(".list"):
            for line in text.splitlines():
                words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb":
                    uris.append(words[1])
        for uri in uris:
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return FALLBACK_MIRROR


def chroot(suite):
    """Return this process's :class:`Chroot` of *suite*'s cached tree, building it if needed.

    The first call takes the cache lock exclusively, builds the tree when it is missing or
    was built from another recipe (about 30 s plus downloads), removes work directories
    that dead processes left in ROOT/tmp, then holds the lock *shared* for the life of the
    process, so another process never rebuilds the tree under a running test session.
    Raises :class:`BuildError` when the build fails (again on later calls, without
    retrying) and PermissionError when not root.
    """
    made = _CHROOTS.get(suite)
    if isinstance(made, Exception):
        raise made  # the build failed earlier in this process: do not retry it
    if made is None:
        if os.geteuid() != 0:
            raise PermissionError("the %s chroot needs root (debootstrap, chroot, unshare)"
                                  % suite.name)
        root, recipe = suite.cache_dir(), suite.recipe()
        os.makedirs(os.path.dirname(root), exist_ok=True)
        lock = open(root + ".lock", "a+")
        try:
            while True:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if _recipe_of(root) != recipe:
                    _build(root, suite)
                _remove_stale_work_dirs(root)
                # Not atomic: another process may rebuild in between, so check again.
                fcntl.flock(lock, fcntl.LOCK_SH)
                if _recipe_of(root) == recipe:
                    break
                fcntl.flock(lock, fcntl.LOCK_UN)
        except BuildError as exc:
            lock.close()
            _CHROOTS[suite] = exc
            raise
        except BaseException:
            lock.close()
            raise
        made = _CHROOTS[suite] = Chroot(root, lock, suite)
    return made


def _recipe_of(root):
    """Return the recipe recorded in *root*'s marker, or None when the tree is not complete."""
    try:
        with open(os.path.join(root, MARKER)) as fh:
            return json.load(fh).get("recipe")
    except (OSError, ValueError):
        return None


def _mounts_under(path):
    """Return the mount points (of this mount namespace) at or below *path*."""
    path = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == path or point.startswith(path + "/"):
                found.append(point)
    return found


def _remove_tree(path):
    """Remove a (partial) tree, refusing when anything is mounted inside it.

    Raises BuildError rather than let rmtree descend into a mounted /proc or /dev.
    """
    mounts = _mounts_under(path)
    if mounts:
        raise BuildError("refusing to remove %s: mounted inside it: %s" % (path, mounts))
    shutil.rmtree(path)


def _build(root, suite):
    """Build the tree in a temporary sibling of *root* and rename it into place.

    The caller holds the exclusive lock.  debootstrap runs in its own mount and PID
    namespaces, so its /proc and /sys mounts (and any daemon a maintainer script might
    start) disappear even if it is killed.  The Release file is verified with the host's
    debian-archive-keyring: trixie's is signed by the "12/bookworm" automatic archive key
    too, which every bookworm keyring has (2023.3+deb12u2 adds the trixie keys).
    sid's is signed by the same archive keys.  Returns nothing; raises BuildError with the
    tail of debootstrap's log on failure.
    """
    parent, name = os.path.split(root)
    if os.path.lexists(root) and not os.path.exists(os.path.join(root, MARKER)) \
            and (not os.path.isdir(root) or os.listdir(root)):
        raise BuildError("%s exists and is not a tree built here; move it away or set "
                         "%s to another path" % (root, suite.env))
    for stale in glob.glob(os.path.join(parent, name + ".build-*")) + \
            glob.glob(os.path.join(parent, name + ".old-*")):
        _remove_tree(stale)
    debootstrap = shutil.which("debootstrap", path=HOST_PATH)
    if not debootstrap:
        raise BuildError("debootstrap is not installed (apt-get install debootstrap)")
    work = tempfile.mkdtemp(prefix=name + ".build-", dir=parent)
    os.chmod(work, 0o755)
    log_path = root + ".log"
    mirror = debian_mirror()
    start = time.monotonic()
    cmd = [_host_tool("unshare"), "--mount", "--propagation", "private", "--pid", "--fork",
           "--kill-child", "--mount-proc", debootstrap, "--variant=" + VARIANT,
           "--include=" + ",".join(suite.packages), "--keyring=" + KEYRING, suite.name, work,
           mirror]
    with open(log_path, "wb") as log:
        log.write(("$ %s\n" % " ".join(cmd)).encode())
        log.flush()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                              env={"PATH": HOST_PATH, "LC_ALL": "C.UTF-8"}, timeout=1800,
                              preexec_fn=die_with_parent())
    if proc.returncode != 0:
        with open(log_path, "rb") as fh:
            tail = fh.read()[-3000:].decode(errors="replace")
        hint = ""
        if "NO_PUBKEY" in tail or "unknown key" in tail or "Release signed" in tail:
            hint = ("\nNo key of the host keyring %s signed the %s Release file: upgrade "
                    "it with 'apt-get install debian-archive-keyring' (bookworm's "
                    "2023.3+deb12u2 and later have the trixie keys)." % (KEYRING, suite.name))
        raise BuildError("debootstrap %s failed (exit %d; log %s)%s\n%s"
                         % (suite.name, proc.returncode, log_path, hint, tail))
    _make_devices(work)
    tree = Chroot(work, None, suite)
    tree.run(["apt-get", "clean"])
    versions = tree.versions()
    marker = {"recipe": suite.recipe(), "mirror": mirror, "versions": versions,
              "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "seconds": round(time.monotonic() - start, 1)}
    with open(os.path.join(work, MARKER), "w") as fh:
        json.dump(marker, fh, indent=1)
    if os.path.lexists(root):
        old = tempfile.mkdtemp(prefix=name + ".old-", dir=parent)
        os.rename(root, os.path.join(old, "tree"))
        os.rename(work, root)
        _remove_tree(old)
    else:
        os.rename(work, root)


def _make_devices(root):
    """Make sure ROOT/dev has the character devices of DEVICES (mknod where missing).

    debootstrap makes them when it may; in a container it may bind-mount /dev instead,
    which leaves nothing behind in the tree.  Raises BuildError when mknod is refused.
    """
    dev = os.path.join(root, "dev")
    os.makedirs(dev, exist_ok=True)
    for node, (major, minor) in DEVICES.items():
        path = os.path.join(dev, node)
        try:
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == major \
                    and os.minor(st.st_rdev) == minor:
                continue
            os.unlink(path)
        except FileNotFoundError:
            pass
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(path, 0o666)
        except OSError as exc:
            raise BuildError("cannot make %s in the chroot: %s" % (path, exc)) from exc


def _remove_stale_work_dirs(root):
    """Remove work directories in ROOT/tmp whose owner died (its .lock is no longer held).

    Called under the exclusive cache lock, when no other process uses the tree (users
    hold it shared), so every work directory found is stale; the per-directory lock is
    a second guard.
    """
    for path in glob.glob(os.path.join(root, "tmp", WORK_PREFIX + "*")):
        try:
            with open(os.path.join(path, ".lock")) as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(path)
        except BlockingIOError:
            continue  # a live engine of some process
        except FileNotFoundError:
            shutil.rmtree(path, ignore_errors=True)  # died before making its lock


def die_with_parent():
    """Return a preexec_fn making the child (unshare) get SIGKILL when this process dies.

    unshare's --kill-child then kills the namespace's first process, and with it every
    process of the PID namespace: a killed test run leaves nothing running (nor, with
    the mount namespace gone, mounted).
    """
    parent = os.getpid()

    def preexec():
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)
    return preexec


def _host_tool(name):
    """Return the absolute path of host tool *name* (sbin included); raise if missing."""
    path = shutil.which(name, path=HOST_PATH)
    if not path:
        raise FileNotFoundError("%s is not installed on this machine" % name)
    return path


class Chroot:
    """A complete tree of *suite* at *root*; runs commands inside it, in throwaway namespaces."""

    def __init__(self, root, lock, suite):
        self.root, self.suite = root, suite
        self._lock = lock  # the shared cache lock, held for the life of the process
        self._prefix = [_host_tool("unshare"), "--mount", "--propagation", "private", "--pid",
                        "--fork", "--kill-child", "--mount-proc=" + os.path.join(root, "proc"),
                        _host_tool("chroot"), root]

    def run(self, args, data=None, ok=(0,), env=None):
        """Run *args* inside the chroot; return the CompletedProcess (bytes stdout/stderr).

        *data* goes to standard input; *env* adds variables to INNER_ENV (the host's
        environment is not passed in).  Asserts the exit code is in *ok*, showing stderr.
        Every process the command starts (gpg-agent too) is killed when it ends, or when
        this process dies.
        """
        return engines.run(self.command(args), data, ok=ok,
                           env=dict(INNER_ENV, **(env or {})), preexec_fn=die_with_parent())

    def command(self, args):
        """Return the host command line that runs *args* inside the chroot (for Popen: give
        it env=INNER_ENV plus variables, and preexec_fn=die_with_parent())."""
        return self._prefix + list(args)

    def inside(self, host_path):
        """Return the path inside the chroot of *host_path*, which must be in the tree."""
        rel = os.path.relpath(host_path, self.root)
        assert not rel.startswith(".."), "%s is outside %s" % (host_path, self.root)
        return "/" + rel

    def host(self, inner_path):
        """Return the host path of *inner_path* (an absolute path inside the chroot)."""
        return os.path.join(self.root, inner_path.lstrip("/"))

    def workdir(self):
        """Return (host path, lock file) of a new private work directory in ROOT/tmp.

        The directory holds a .lock kept flock'ed through the returned file; once that is
        closed (or the process dies) :func:`chroot` may remove the directory.
        """
        path = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=os.path.join(self.root, "tmp"))
        os.chmod(path, 0o700)
        lock = open(os.path.join(path, ".lock"), "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        return path, lock

    def versions(self):
        """Return {package: version} of the suite's *versions* packages, plus its
        version command's first output line under that command's text."""
        out = self.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n"]
                       + list(self.suite.versions))
        versions = dict(line.split(" ", 1) for line in out.stdout.decode().splitlines())
        if self.suite.version_command:
            versions[" ".join(self.suite.version_command)] = \
                self.run(list(self.suite.version_command)).stdout.decode().splitlines()[0]
        return versions

    def marker(self):
        """Return the build record of the tree (recipe, mirror, versions, built, seconds)."""
        with open(os.path.join(self.root, MARKER)) as fh:
            return json.load(fh)


# -- engines' work files -----------------------------------------------------------

class WorkFiles:
    """A private work directory in a :class:`Chroot`'s ROOT/tmp, and its files, for an
    engine (a subclass calls _open(tree) first)."""

    def _open(self, tree):
        self.chroot = tree
        self.base, self._lock = tree.workdir()
        self._count = 0

    def _new(self, name):
        """Return the path inside the chroot of a new (not yet existing) work file."""
        self._count += 1
        return self.chroot.inside(os.path.join(self.base, "%d-%s" % (self._count, name)))

    def _file(self, name, data):
        """Write *data* to a new work file; return its path inside the chroot."""
        path = self._new(name)
        with open(self.chroot.host(path), "wb") as fh:
            fh.write(data)
        return path

    def _read(self, inner_path, missing=None):
        """Return the bytes of work file *inner_path*; *missing* if given and it is absent."""
        try:
            with open(self.chroot.host(inner_path), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            if missing is None:
                raise
            return missing

    def close(self):
        """Remove the work directory (databases, keys, messages).  Safe to call twice."""
        if self._lock is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self._lock.close()
            self._lock = None
