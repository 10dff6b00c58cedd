"""Debian 13 (trixie) S/MIME engines in a chroot: NSS cmsutil 3.110 and GnuPG gpgsm 2.4.

Debian 12's NSS 3.87 and gpgsm 2.2.40 cannot decrypt CMS EnvelopedData for EC recipients
(KeyAgreeRecipientInfo, ECDH ephemeral-static, AES key wrap), so the tests check such
messages with trixie's tools instead.  :func:`chroot` builds (once, then reuses) a minimal
trixie tree with ``debootstrap``; :class:`TrixieNSS` and :class:`TrixieGpgSM` mirror
``engines.NSS`` and ``engines.GpgSM`` (and are subclasses of them, so
``engines.verify_signed`` treats them alike) but run the trixie tools inside it.

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

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

import engines

#: Where the tree is cached unless SMIME_TEST_TRIXIE names another directory.
DEFAULT_CACHE = "/var/cache/sparkpostSMIME-tests/trixie"
SUITE = "trixie"
VARIANT = "minbase"
#: Installed by debootstrap itself (--include), from the same signed Release as the base.
PACKAGES = ("libnss3-tools", "gpgsm", "gpg-agent")
#: Changing this list, the suite or the variant makes the next run rebuild the tree.
RECIPE = {"suite": SUITE, "variant": VARIANT, "packages": sorted(PACKAGES), "format": 1}
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

_CHROOT = None  # the Chroot of this process, once made
_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


class BuildError(RuntimeError):
    """The trixie tree could not be built; the message says why and ends with the log tail."""


def cache_dir():
    """Return the absolute path of the cached tree: $SMIME_TEST_TRIXIE or DEFAULT_CACHE."""
    return os.path.abspath(os.environ.get("SMIME_TEST_TRIXIE") or DEFAULT_CACHE)


def debian_mirror(paths=None):
    """Return the Debian archive URL this machine's APT uses (e.g. http://deb.debian.org/debian).

    Reads deb822 ``*.sources`` and one-line ``*.list`` files (*paths*: default, the files in
    /etc/apt/sources.list.d/ and /etc/apt/sources.list) and returns the first ``deb`` URI whose
    path ends in ``/debian`` (so not debian-security, nor third-party repositories);
    $SMIME_TEST_TRIXIE_MIRROR wins, FALLBACK_MIRROR when nothing matches.
    """
    if os.environ.get("SMIME_TEST_TRIXIE_MIRROR"):
        return os.environ["SMIME_TEST_TRIXIE_MIRROR"].rstrip("/")
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


def chroot():
    """Return this process's :class:`Chroot` of the cached trixie tree, building it if needed.

    The first call takes the cache lock exclusively, builds the tree when it is missing or
    was built from another RECIPE (about 30 s plus downloads), removes work directories
    that dead processes left in ROOT/tmp, then holds the lock *shared* for the life of the
    process, so another process never rebuilds the tree under a running test session.
    Raises :class:`BuildError` when the build fails (again on later calls, without
    retrying) and PermissionError when not root.
    """
    global _CHROOT
    if isinstance(_CHROOT, Exception):
        raise _CHROOT  # the build failed earlier in this process: do not retry it
    if _CHROOT is None:
        if os.geteuid() != 0:
            raise PermissionError("the trixie chroot needs root (debootstrap, chroot, unshare)")
        root = cache_dir()
        os.makedirs(os.path.dirname(root), exist_ok=True)
        lock = open(root + ".lock", "a+")
        try:
            while True:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if _recipe_of(root) != RECIPE:
                    _build(root)
                _remove_stale_work_dirs(root)
                # Not atomic: another process may rebuild in between, so check again.
                fcntl.flock(lock, fcntl.LOCK_SH)
                if _recipe_of(root) == RECIPE:
                    break
                fcntl.flock(lock, fcntl.LOCK_UN)
        except BuildError as exc:
            lock.close()
            _CHROOT = exc
            raise
        except BaseException:
            lock.close()
            raise
        _CHROOT = Chroot(root, lock)
    return _CHROOT


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


def _build(root):
    """Build the tree in a temporary sibling of *root* and rename it into place.

    The caller holds the exclusive lock.  debootstrap runs in its own mount and PID
    namespaces, so its /proc and /sys mounts (and any daemon a maintainer script might
    start) disappear even if it is killed.  The Release file is verified with the host's
    debian-archive-keyring: trixie's is signed by the "12/bookworm" automatic archive key
    too, which every bookworm keyring has (2023.3+deb12u2 adds the trixie keys).
    Returns nothing; raises BuildError with the tail of debootstrap's log on failure.
    """
    parent, name = os.path.split(root)
    if os.path.lexists(root) and not os.path.exists(os.path.join(root, MARKER)) \
            and (not os.path.isdir(root) or os.listdir(root)):
        raise BuildError("%s exists and is not a tree built here; move it away or set "
                         "SMIME_TEST_TRIXIE to another path" % root)
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
           "--include=" + ",".join(PACKAGES), "--keyring=" + KEYRING, SUITE, work, mirror]
    with open(log_path, "wb") as log:
        log.write(("$ %s\n" % " ".join(cmd)).encode())
        log.flush()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                              env={"PATH": HOST_PATH, "LC_ALL": "C.UTF-8"}, timeout=1800,
                              preexec_fn=_die_with_parent())
    if proc.returncode != 0:
        with open(log_path, "rb") as fh:
            tail = fh.read()[-3000:].decode(errors="replace")
        hint = ""
        if "NO_PUBKEY" in tail or "unknown key" in tail or "Release signed" in tail:
            hint = ("\nNo key of the host keyring %s signed the %s Release file: upgrade "
                    "it with 'apt-get install debian-archive-keyring' (bookworm's "
                    "2023.3+deb12u2 and later have the trixie keys)." % (KEYRING, SUITE))
        raise BuildError("debootstrap %s failed (exit %d; log %s)%s\n%s"
                         % (SUITE, proc.returncode, log_path, hint, tail))
    _make_devices(work)
    tree = Chroot(work, None)
    tree.run(["apt-get", "clean"])
    versions = tree.versions()
    marker = {"recipe": RECIPE, "mirror": mirror, "versions": versions,
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


def _die_with_parent():
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
    """A complete trixie tree at *root*; runs commands inside it, in throwaway namespaces."""

    def __init__(self, root, lock):
        self.root = root
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
        return engines.run(self._prefix + list(args), data, ok=ok,
                           env=dict(INNER_ENV, **(env or {})), preexec_fn=_die_with_parent())

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
        """Return {package: version} of the engines' packages, plus 'gpgsm --version': its line 1.

        cmsutil has no version option: libnss3's version is NSS's.
        """
        out = self.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", "libnss3",
                        "libnss3-tools", "gpgsm", "gpg-agent", "libgcrypt20", "libksba8"])
        versions = dict(line.split(" ", 1) for line in out.stdout.decode().splitlines())
        versions["gpgsm --version"] = self.run(["gpgsm", "--version"]).stdout.decode() \
            .splitlines()[0]
        return versions

    def marker(self):
        """Return the build record of the tree (recipe, mirror, versions, built, seconds)."""
        with open(os.path.join(self.root, MARKER)) as fh:
            return json.load(fh)


# -- identities ------------------------------------------------------------------

def modern_p12(pki, address, password=engines.P12_PASSWORD):
    """Return a PKCS#12 (bytes) of *address*'s key, certificate and intermediate CA.

    Modern protection: PBES2 with PBKDF2-HMAC-SHA256 and AES-256-CBC, SHA-256 MAC.  A low
    iteration count keeps imports fast; these are test keys.
    """
    key, cert = pki.ids[address]
    enc = (serialization.PrivateFormat.PKCS12.encryption_builder().kdf_rounds(2048)
           .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
           .hmac_hash(hashes.SHA256()).build(password.encode()))
    return pkcs12.serialize_key_and_certificates(address.encode(), key, cert,
                                                 [pki.inter.cert], enc)


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _fingerprint(cert):
    return cert.fingerprint(hashes.SHA256())


class _TrixieEngine:
    """What both engines share: a work directory in the chroot, identity bookkeeping."""

    def _setup(self, tree, pki):
        self.chroot = tree
        self.pki = pki
        self.base, self._lock = tree.workdir()
        self._imported = set()  # SHA-256 fingerprints of the identity certificates imported
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

    def _pending(self):
        """Return the addresses of the PKI whose current certificate is not imported yet."""
        return [address for address, (_, cert) in self.pki.ids.items()
                if _fingerprint(cert) not in self._imported]

    def sync(self):
        """Import every identity added to (or re-issued in) the PKI since the last call.

        decrypt() and verify() call this first, so identities that tests add to the
        session PKI later are there too.  Returns the addresses imported.
        """
        pending = self._pending()
        if pending:
            self._import(pending)
            for address in pending:
                self._imported.add(_fingerprint(self.pki.ids[address][1]))
        return pending

    def import_identity(self, pki, address, base=None):
        """Import *address* of *pki* (which must be this engine's PKI) if not yet imported.

        Replaces the host engines' method of the same name; *base* is unused.
        """
        assert pki is self.pki and address in pki.ids, address
        self.sync()

    def close(self):
        """Remove the work directory (databases, keys, messages).  Safe to call twice."""
        if self._lock is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self._lock.close()
            self._lock = None


class TrixieNSS(_TrixieEngine, engines.NSS):
    """NSS 3.110 (Debian 13) cmsutil: an NSS database with every identity of *pki*.

    ``TrixieNSS(tree, pki)``: *tree* is a :class:`Chroot` (see :func:`chroot`).  The test
    root is trusted for everything (C,C,C), the intermediate is known; each identity is
    imported from a modern PKCS#12 with nickname = its address.
    """

    def __init__(self, tree, pki):
        self._setup(tree, pki)
        self.db = "sql:" + self.chroot.inside(os.path.join(self.base, "nssdb"))
        os.mkdir(os.path.join(self.base, "nssdb"))
        self.cmd(["certutil", "-N", "--empty-password"])
        self.cmd(["certutil", "-A", "-n", "test-root", "-t", "C,C,C",
                  "-i", self._file("root.crt", _pem(pki.root.cert))])
        self.cmd(["certutil", "-A", "-n", "test-inter", "-t", ",,",
                  "-i", self._file("inter.crt", _pem(pki.inter.cert))])
        self.sync()

    def cmd(self, args, data=None, ok=(0,)):
        """Run NSS tool *args* (e.g. ["certutil", "-L"]) on the database; return the process."""
        return self.chroot.run(args[:1] + ["-d", self.db] + args[1:], data, ok=ok)

    def _import(self, addresses):
        for address in addresses:
            p12 = self._file(address + ".p12", modern_p12(self.pki, address))
            self.cmd(["pk12util", "-i", p12, "-W", engines.P12_PASSWORD])
            os.unlink(self.chroot.host(p12))

    def decrypt(self, der):
        """Return the exact content of EnvelopedData *der* (bytes), decrypted by cmsutil.

        Asserts cmsutil exits 0 (it fails when no recipient key is in the database).
        Output goes through -o FILE: cmsutil's standard output is not reliable for it.
        """
        self.sync()
        out = self._new("decrypted")
        self.cmd(["cmsutil", "-D", "-i", self._file("enveloped.der", der), "-o", out])
        return self._read(out)

    def verify(self, der, content=None):
        """Return (status, output) of cmsutil for SignedData *der* (detached: *content*).

        *status* is cmsutil's header text for certUsageEmailSigner (-u 4): each signer's
        line reads ``signer0.status=GoodSignature`` only when the signature, the digest and
        the chain to the trusted test root all check out (else BadSignature,
        DigestMismatch, SigningCertNotTrusted...).  *output* is what cmsutil writes as
        the content (b"" when it refuses to).  Asserts nothing: use :meth:`verified`, or
        ``engines.verify_signed`` for a MIME entity, to require a good signature.
        """
        self.sync()
        args = ["cmsutil", "-D", "-u", "4", "-i", self._file("signed.der", der)]
        if content is not None:
            args += ["-c", self._file("content", content)]
        status = self.cmd(args + ["-h", "1", "-n"]).stdout.decode()
        out = self._new("verified")
        self.cmd(args + ["-o", out], ok=(0, 1))  # 1: a signature that does not verify
        return status, self._read(out, missing=b"")

    def verified(self, der, content=None):
        """Verify *der*; assert every signer is GoodSignature; return the signed content."""
        status, out = self.verify(der, content)
        signers = [w for w in status.split() if w.startswith("signer") and ".status=" in w]
        assert signers and all(w.endswith("=GoodSignature;") for w in signers), status
        return content if content is not None else out


class TrixieGpgSM(_TrixieEngine, engines.GpgSM):
    """GnuPG gpgsm 2.4 (Debian 13): a GNUPGHOME with every identity of *pki*.

    ``TrixieGpgSM(tree, pki)``: *tree* is a :class:`Chroot`.  The root and intermediate
    are imported, the root trusted in trustlist.txt (``FPR S relax``); CRL, policy and
    dirmngr checks are off (dirmngr is not installed: nothing goes online).  Identities
    are imported from modern PKCS#12 files with --pinentry-mode loopback and the
    passphrase on standard input; gpg-agent keeps them protected with that passphrase,
    which decrypt() gives back the same way.  gpg-agent lives only as long as each gpgsm
    command (its PID namespace ends with it), so there is nothing to stop.
    """

    def __init__(self, tree, pki):
        self._setup(tree, pki)
        self.home = os.path.join(self.base, "gnupg")
        os.mkdir(self.home, 0o700)
        self.env = {"GNUPGHOME": self.chroot.inside(self.home)}
        self._conf("gpgsm.conf", "disable-crl-checks\ndisable-policy-checks\ndisable-dirmngr\n")
        # Loopback is 2.4's default; the low s2k count keeps imports and decryption fast.
        self._conf("gpg-agent.conf", "allow-loopback-pinentry\ns2k-count 65536\n")
        self.gpgsm(["--import", self._file("root.crt", _pem(pki.root.cert)),
                    self._file("inter.crt", _pem(pki.inter.cert))])
        fpr = pki.root.cert.fingerprint(hashes.SHA1()).hex().upper()
        self._conf("trustlist.txt", "%s S relax\n" % fpr)
        self.sync()

    def gpgsm(self, args, data=None, ok=(0,)):
        """Run ``gpgsm --batch --status-fd 1 *args*`` in the chroot; return the process."""
        return self.chroot.run(["gpgsm", "--batch", "--status-fd", "1"] + list(args), data,
                               ok=ok, env=self.env)

    def _with_passphrase(self, args, ok=(0,)):
        """Run gpgsm *args* with loopback pinentry, the PKCS#12 password on stdin."""
        return self.gpgsm(["--pinentry-mode", "loopback", "--passphrase-fd", "0"] + args,
                          engines.P12_PASSWORD.encode(), ok=ok)

    def _import(self, addresses):
        files = [self._file(a + ".p12", modern_p12(self.pki, a)) for a in addresses]
        status = self._with_passphrase(["--import"] + files).stdout.decode()
        # IMPORT_RES count no_user_id imported imported_rsa unchanged n_uids n_subk n_sigs
        #            n_revoc sec_read sec_imported sec_dups ...
        res = [line.split()[2:] for line in status.splitlines()
               if line.startswith("[GNUPG:] IMPORT_RES ")]
        assert res and int(res[0][9]) == len(files), status
        assert int(res[0][10]) + int(res[0][11]) == len(files), status
        for path in files:
            os.unlink(self.chroot.host(path))

    def _conf(self, name, text):
        with open(os.path.join(self.home, name), "w") as fh:
            fh.write(text)

    def decrypt(self, der):
        """Return the exact content of EnvelopedData *der* (bytes), decrypted by gpgsm.

        Asserts DECRYPTION_OKAY in gpgsm's status output and an exit code of 0 or 2
        (gpgsm exits 2 when other recipients' keys are unknown, even on success).
        """
        self.sync()
        out = self._new("decrypted")
        proc = self._with_passphrase(["--output", out, "--decrypt",
                                      self._file("enveloped.der", der)], ok=(0, 2))
        assert b"[GNUPG:] DECRYPTION_OKAY" in proc.stdout, \
            proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        return self._read(out)

    def verify(self, der, content=None):
        """Verify SignedData *der* (detached: over *content*); return the signed content.

        Asserts gpgsm exits 0 and reports GOODSIG, VALIDSIG and TRUST_FULLY (the chain to
        the trusted test root) and no BADSIG or ERRSIG; AssertionError otherwise.  Exit 0
        is required: gpgsm exits 2 after a GOODSIG when it saw a problem, e.g. an ECDSA
        P-384 signature over a SHA-256 digest ("a 256 bit hash is not valid for a 384
        bit ECC key").
        """
        self.sync()
        args = ["--verify", self._file("signed.der", der)]
        out = None
        if content is not None:
            args.append(self._file("content", content))
        else:
            out = self._new("verified")
            args = ["--output", out] + args
        proc = self.gpgsm(args, ok=(0, 1, 2))
        report = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, "gpgsm --verify -> %d\n%s" % (proc.returncode, report)
        for word in (b"GOODSIG", b"VALIDSIG", b"TRUST_FULLY"):
            assert b"[GNUPG:] " + word + b" " in proc.stdout, report
        for word in (b"BADSIG", b"ERRSIG"):
            assert b"[GNUPG:] " + word not in proc.stdout, report
        return content if content is not None else self._read(out)

    def verified(self, der, content=None):
        """The same as :meth:`verify` (which asserts a good signature): the content."""
        return self.verify(der, content)
