#!/usr/bin/env python3
"""sparkpostSMIME benchmark: one-shot start-up, envelope writer, ML-KEM vs RSA, batch injection
(1,000 and a steady 5,000 messages), the openssl|swaks loop, memory.

Run from the repository root (after the README's install):

    .venv/bin/python tests/bench/bench.py            # everything (about 2 minutes)
    .venv/bin/python tests/bench/bench.py --quick    # fewer repetitions

Everything is measured side by side in one run on this machine and printed as
absolute figures and ratios; nothing here is a pass/fail test.  Traffic goes only to
Postfix's smtp-sink on 127.0.0.1, started and stopped by this script.

Side by side with M2Crypto (--m2crypto): the tool and m2crypto_smime.py (what a Python
user would write with M2Crypto) against cryptography's floor, CPU per message in steady
state on one core, in every mode (-o DIR, --send_smtp; detached and opaque; with and
without --encrypt), then one-shot wall times.  M2Crypto is a bench-only dependency, never
one of the tool's: it builds from PyPI with Debian's swig, best in a venv of the same
Python as the tool's (Debian's python3-m2crypto, 0.38, serves Debian's /usr/bin/python3
only):

    sudo apt-get install -y swig libssl-dev postfix
    python3 -m venv /tmp/m2venv && /tmp/m2venv/bin/pip install M2Crypto
    .venv/bin/python tests/bench/bench.py --m2crypto --m2python /tmp/m2venv/bin/python

It takes 5-10 minutes (--rounds 3 or --quick for less); outputs go to a fresh directory
under --outdir (default: the temporary directory; its file system type is printed).
"""

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "sparkpostSMIME.py")
KEYS = os.path.join(ROOT, "tests", "keys")
SMALL = os.path.join(ROOT, "tests", "fancy-HTML-to-smt.eml")
LARGE = os.path.join(ROOT, "tests", "avocado-577k.eml")
FLOOR = "import cryptography.hazmat.primitives.serialization.pkcs7, email.parser, smtplib"
PY = sys.executable
ROUNDS, ROUNDS_QUICK = 5, 1  # batch rounds; a ratio is the median of the rounds' ratios


def clean_env(**extra):
    """The environment without our settings, with this Python first on PATH.

    The tool is run as ./sparkpostSMIME.py, as users do: its launcher line starts
    the python3 found on PATH, here the one running this benchmark (the venv's).
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SMTP_", "SPARKPOST_", "SMIME_"))}
    env["PATH"] = os.path.dirname(PY) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def timed(cmd, env=None, stdin=None):
    """Run *cmd*; return (wall seconds, peak RSS of that child in KiB)."""
    start = time.perf_counter()
    with open(stdin or os.devnull, "rb") as inp:
        proc = subprocess.run(cmd, stdin=inp, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env or clean_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit("failed (%d): %s\n%s" % (proc.returncode, " ".join(cmd),
                                                  proc.stderr.decode(errors="replace")))
    return wall


def alternate(commands, rounds):
    """Run each command once per round, alternating; return {name: [seconds]}."""
    times = {name: [] for name in commands}
    for _ in range(rounds):
        for name, cmd in commands.items():
            times[name].append(timed(cmd))
    return times


def oneshot(rounds):
    """One-shot --sign_detached --encrypt to stdout vs the bare import floor."""
    print("\n== One-shot runs (median of %d, alternated with the import floor) ==" % rounds)
    for _ in range(3):  # warm the page cache, __pycache__ and the validated-key cache
        timed([TOOL, SMALL, "--sign_detached", "--encrypt", "--keys", KEYS])
    commands = {
        "floor": [PY, "-c", FLOOR],
        "19 KB": [TOOL, SMALL, "--sign_detached", "--encrypt", "--keys", KEYS],
        "577 KB": [TOOL, LARGE, "--sign_detached", "--encrypt", "--keys", KEYS],
    }
    times = alternate(commands, rounds)
    floor = statistics.median(times["floor"])
    print("  import floor (%s): %.1f ms" % (FLOOR, floor * 1000))
    ratios = {}
    for name in ("19 KB", "577 KB"):
        med = statistics.median(times[name])
        ratios[name] = med / floor
        print("  %-7s --sign_detached --encrypt: %.1f ms  = %.2f x floor" % (name, med * 1000,
                                                                             med / floor))
    return ratios


# -- smtp-sink ------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    """Postfix's smtp-sink on 127.0.0.1: accepts and discards everything."""

    def __init__(self):
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not os.path.exists(binary):
            raise SystemExit("smtp-sink not found: apt-get install postfix")
        self.port = free_port()
        # no -c: a running counter would cost the sink a write per message
        self.proc = subprocess.Popen([binary, "-u", "postfix", "127.0.0.1:%d" % self.port,
                                      "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise SystemExit("smtp-sink did not start")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


CRYPTO_FLOOR = r"""
import sys, time, multiprocessing
sys.path.insert(0, %(root)r)
import os
import sparkpostSMIME as s
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
settings = s.load_settings([%(msg)r, "--sign_detached", "--encrypt", "--keys", %(keys)r],
                           os.environ)
keys = s.keystore_of(settings, s.Reporter())
signer = keys.signer("steve@thetucks.com")
rcpt = keys.recipient("steve.tuck@sparkpost.com")
data = open(%(msg)r, "rb").read()
N = %(n)d

s.build_job((%(msg)r, 0), settings, keys)  # load the keys once, as a batch worker does


def build(_):
    # the tool's own sign + encrypt path: parse, canonicalise, sign, encrypt, MIME
    for _ in range(N // 2):
        s.build_job((%(msg)r, 0), settings, keys)


def work(_):
    # cryptography's PKCS#7 calls alone
    for _ in range(N // 2):
        sig = (pkcs7.PKCS7SignatureBuilder().set_data(data)
               .add_signer(signer.cert.x509(), signer.key, hashes.SHA256())
               .sign(Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary]))
        (pkcs7.PKCS7EnvelopeBuilder().set_data(data + sig)
         .set_content_encryption_algorithm(algorithms.AES256)
         .add_recipient(rcpt.cert.x509()).add_recipient(signer.cert.x509())
         .encrypt(Encoding.DER, [pkcs7.PKCS7Options.Binary]))

rates = []
for func in (work, build):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(abs, range(2))  # workers up
        start = time.perf_counter()
        pool.map(func, range(2))
        rates.append(N / (time.perf_counter() - start))
print(rates[0], rates[1])
"""


def crypto_floor(n):
    """Return (raw, build) messages per second in two processes, keys preloaded.

    raw: cryptography's PKCS#7 sign + encrypt calls alone on the 19 KB message;
    build: the tool's whole sign + encrypt path (build_job) without delivery.
    """
    code = CRYPTO_FLOOR % {"root": ROOT, "keys": KEYS, "msg": SMALL, "n": n}
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    raw, build = out.stdout.split()
    return float(raw), float(build)


FLOOR_ONE_CORE = r"""
import sys, time
sys.path.insert(0, %(root)r)
import os
import sparkpostSMIME as s
settings = s.load_settings([%(msg)r, "--sign_detached", "--encrypt", "--keys", %(keys)r],
                           os.environ)
keys = s.keystore_of(settings, s.Reporter())
s.build_job((%(msg)r, 0), settings, keys)  # keys loaded, imports done
start = time.perf_counter()
for _ in range(%(n)d):
    s.build_job((%(msg)r, 0), settings, keys)
print(%(n)d / (time.perf_counter() - start))
"""


def on_core(core):
    """Return a preexec_fn pinning the child process to CPU *core*."""
    return lambda: os.sched_setaffinity(0, {core})


def separate_cores(sink, n):
    """Return (floor, tool) msg/s with the tool on core 0 and smtp-sink alone on core 1.

    floor: the build alone in one process on core 0; tool: --jobs 1 on core 0, start-up
    included.  Shows what the sink's own CPU costs when it shares the cores.
    """
    os.sched_setaffinity(sink.proc.pid, {1})
    try:
        code = FLOOR_ONE_CORE % {"root": ROOT, "keys": KEYS, "msg": SMALL, "n": n}
        out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True,
                             preexec_fn=on_core(0))
        env = clean_env(SMTP_HOST="127.0.0.1", SMTP_PORT=str(sink.port))
        start = time.perf_counter()
        proc = subprocess.run([TOOL, SMALL, "--sign_detached", "--encrypt", "--keys", KEYS,
                               "--send_smtp", "--repeat", str(n)], env=env,
                              capture_output=True, text=True, preexec_fn=on_core(0))
        wall = time.perf_counter() - start
        if ("Summary: %d sent, 0 failed" % n) not in proc.stdout:
            raise SystemExit("pinned run failed:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])
        return float(out.stdout), n / wall
    finally:
        os.sched_setaffinity(sink.proc.pid, set(range(os.cpu_count())))


def batch_rate(sink, n, jobs=2):
    """Messages per second of the tool: n x 19 KB, --sign_detached --encrypt --send_smtp."""
    env = clean_env(SMTP_HOST="127.0.0.1", SMTP_PORT=str(sink.port))
    cmd = [TOOL, SMALL, "--sign_detached", "--encrypt", "--keys", KEYS, "--send_smtp",
           "--repeat", str(n), "--jobs", str(jobs)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or ("Summary: %d sent, 0 failed" % n) not in proc.stdout:
        raise SystemExit("batch run failed:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])
    return n / wall, proc.stdout.strip().splitlines()[-1]


def steady_state(sink, rounds, n=5000, warm=500):
    """Return [(raw floor, steady tool rate, tool rate over n)] msg/s, one per round.

    The steady rate is the marginal one: (n - warm) messages over the difference
    between a run of n and a run of warm messages, so Python's start-up and the
    keys' loading (paid once per run) cancel out.  Each round measures
    cryptography's raw floor (n messages) right before the tool.
    """
    out = []
    for _ in range(rounds):
        raw = crypto_floor(n)[0]
        full, _ = batch_rate(sink, n)
        short, _ = batch_rate(sink, warm)
        out.append((raw, (n - warm) / (n / full - warm / short), full))
    return out


def shell_loop(sink, n):
    """Seconds per message of `openssl smime -sign | openssl smime -encrypt | swaks`."""
    swaks = shutil.which("swaks")
    if not swaks:
        return None
    key, cert = os.path.join(KEYS, "steve@thetucks.com.pem"), os.path.join(KEYS,
                                                                       "steve@thetucks.com.crt")
    rcpt = os.path.join(KEYS, "steve.tuck@sparkpost.com.crt")
    script = ("openssl smime -sign -in %s -signer %s -inkey %s -certfile %s | "
              "openssl smime -encrypt -aes256 %s %s | "
              "swaks --silent 2 --server 127.0.0.1:%d --from steve@thetucks.com "
              "--to steve.tuck@sparkpost.com --data - >/dev/null"
              % (SMALL, cert, key, cert, rcpt, cert, sink.port))
    start = time.perf_counter()
    for _ in range(n):
        subprocess.run(["sh", "-c", script], check=True)
    return (time.perf_counter() - start) / n


ENVELOPE = r"""
import sys, time, statistics
sys.path.insert(0, %(root)r)
import sparkpostSMIME as s
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
keys = s.Keystore([%(keys)r])
rcpts = [keys.recipient(a) for a in ("steve.tuck@sparkpost.com", "steve@thetucks.com")]


def builder(content):
    # what --encrypt did before the EnvelopedData writer: cryptography's builder
    b = pkcs7.PKCS7EnvelopeBuilder().set_data(content)
    b = b.set_content_encryption_algorithm(algorithms.AES256)
    for ident in rcpts:
        b = b.add_recipient(ident.cert.x509())
    der = b.encrypt(Encoding.DER, [pkcs7.PKCS7Options.Binary])
    return b"".join([s.ENVELOPED_DATA_HEADER, b"\r\n", s.encode_base64(der)])


def writer(content):
    return s.encrypt(content, rcpts)


for path in sys.argv[1:]:  # one path per process: the heap a size leaves skews the next
    content = s.canonical_content(s.parse_message(open(path, "rb").read(), path))
    n = max(50, 20000000 // len(content))
    ratios = []
    for _ in range(%(rounds)d):
        times = [0.0, 0.0]
        for i in range(n):  # interleaved, first one then the other: the heap sees both alike
            for k in ((0, 1), (1, 0))[i %% 2]:
                start = time.perf_counter()
                (builder, writer)[k](content)
                times[k] += time.perf_counter() - start
        ratios.append(times[1] / times[0])
    print(len(content), times[0] / n, times[1] / n, statistics.median(ratios))
"""


def envelope_speed(rounds):
    """RSA-only --encrypt: our EnvelopedData writer vs cryptography's PKCS7EnvelopeBuilder."""
    print("\n== --encrypt to two RSA recipients: EnvelopedData writer vs cryptography's "
          "builder (median of %d alternated rounds) ==" % rounds)
    code = ENVELOPE % {"root": ROOT, "keys": KEYS, "rounds": rounds}
    ratios = {}
    for path, name in ((SMALL, "19 KB"), (LARGE, "577 KB")):
        out = subprocess.run([PY, "-c", code, path], capture_output=True, text=True, check=True)
        size, old, new, ratio = out.stdout.split()
        ratios[name] = float(ratio)
        print("  %-7s content %s octets: builder %.0f us, writer %.0f us = %.2f x"
              % (name, size, float(old) * 1e6, float(new) * 1e6, float(ratio)))
    return ratios


ML_KEM_VS_RSA = r"""
import statistics, sys, time
sys.path.insert(0, %(root)r)
sys.path.insert(0, %(tests)r)
import sparkpostSMIME as s
from support import pki
from cryptography.hazmat.primitives.asymmetric import padding
ca = pki.CA().intermediate()
rcpt = {kind: s.Identity("%%s@bench.example" %% kind, ca.issue("%%s@bench.example" %% kind,
                                                              pki.new_key(kind))[1], "-")
        for kind in ("rsa", "mlkem768")}
content = s.canonical_content(s.parse_message(open(%(path)r, "rb").read(), %(path)r))
key = bytes(32)
pad = padding.PKCS1v15()
primitive = {"rsa": lambda ident: ident.cert.public_key().encrypt(key, pad),
             "mlkem": lambda ident: ident.cert.public_key().encapsulate()}
steps = {"envelope": lambda ident: s.encrypt(content, [ident]),
         "RecipientInfo": lambda ident: s.recipient_info(ident, key),
         "public-key-op": lambda ident: primitive[ident.kind](ident)}
for step, run in steps.items():
    n = 400 if step == "envelope" else 2000
    ratios, totals = [], {"rsa": 0.0, "mlkem768": 0.0}
    for _ in range(%(rounds)d):
        times = {"rsa": 0.0, "mlkem768": 0.0}
        for i in range(n):  # alternated, each first in turn
            for kind in (("rsa", "mlkem768"), ("mlkem768", "rsa"))[i %% 2]:
                start = time.perf_counter()
                run(rcpt[kind])
                times[kind] += time.perf_counter() - start
        ratios.append(times["mlkem768"] / times["rsa"])
        for kind in times:
            totals[kind] += times[kind] / n
    print(step, totals["rsa"] / %(rounds)d, totals["mlkem768"] / %(rounds)d,
          statistics.median(ratios))
"""


def ml_kem_vs_rsa(rounds):
    """--encrypt to one ML-KEM-768 recipient vs one RSA-2048 recipient, same message."""
    print("\n== --encrypt to one ML-KEM-768 vs one RSA-2048 recipient, 19 KB message "
          "(median of %d alternated rounds) ==" % rounds)
    code = ML_KEM_VS_RSA % {"root": ROOT, "tests": os.path.dirname(KEYS), "path": SMALL,
                            "rounds": rounds}
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    ratios = {}
    for line in out.stdout.splitlines():
        step, rsa, kem, ratio = line.split()
        ratios[step] = float(ratio)
        print("  %-13s RSA-2048 %.1f us, ML-KEM-768 %.1f us = %.2f x"
              % (step, float(rsa) * 1e6, float(kem) * 1e6, float(ratio)))
    return ratios


PEAK_RSS = r"""
import resource, subprocess, sys
subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mib(path):
    """Peak RSS (MiB) of one --sign_detached --encrypt run on *path*."""
    out = subprocess.run([PY, "-c", PEAK_RSS, TOOL, path, "--sign_detached", "--encrypt",
                          "--keys", KEYS], capture_output=True, text=True, check=True,
                         env=clean_env())
    return int(out.stdout) / 1024.0


def big_message(directory, megabytes=20):
    """Write a ~20 MB message (text + a random attachment) and return its path."""
    import base64
    payload = base64.encodebytes(os.urandom(int(megabytes * 1024 * 1024 * 3 / 4)))
    path = os.path.join(directory, "big.eml")
    with open(path, "wb") as fh:
        fh.write(b"From: Steve Tuck <steve@thetucks.com>\r\nTo: steve.tuck@sparkpost.com\r\n"
                 b"Subject: 20 MB\r\nMIME-Version: 1.0\r\n"
                 b"Content-Type: multipart/mixed; boundary=b20\r\n\r\n--b20\r\n"
                 b"Content-Type: text/plain\r\n\r\nA big attachment follows.\r\n--b20\r\n"
                 b"Content-Type: application/octet-stream; name=big.bin\r\n"
                 b"Content-Transfer-Encoding: base64\r\n\r\n"
                 + payload.replace(b"\n", b"\r\n") + b"--b20--\r\n")
    return path


# -- side by side with M2Crypto ---------------------------------------------------

M2_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "m2crypto_smime.py")

FLOOR_LOOP = r"""
import sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
keys, path, mode, encrypt, count = sys.argv[1:]
def load(name):
    with open("%s/%s" % (keys, name), "rb") as fh:
        return fh.read()
cert = x509.load_pem_x509_certificate(load("steve@thetucks.com.crt"))
key = serialization.load_pem_private_key(load("steve@thetucks.com.pem"), None)
rcpt = x509.load_pem_x509_certificate(load("steve.tuck@sparkpost.com.crt"))
with open(path, "rb") as fh:
    data = fh.read()
options = [pkcs7.PKCS7Options.Binary]
if mode == "detached":
    options.append(pkcs7.PKCS7Options.DetachedSignature)
for _ in range(int(count)):
    sig = (pkcs7.PKCS7SignatureBuilder().set_data(data)
           .add_signer(cert, key, hashes.SHA256()).sign(Encoding.DER, options))
    if encrypt == "1":
        (pkcs7.PKCS7EnvelopeBuilder().set_data(data + sig if mode == "detached" else sig)
         .set_content_encryption_algorithm(algorithms.AES256)
         .add_recipient(rcpt).add_recipient(cert)
         .encrypt(Encoding.DER, [pkcs7.PKCS7Options.Binary]))
"""

PLAIN_WRITES = r"""
import os, sys
directory, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(size)
for n in range(count):  # what most code does, M2Crypto's script too: no temporary file, no sync
    with open(os.path.join(directory, "m.%d.eml" % n), "wb") as fh:
        fh.write(data)
"""

#: (signing, --encrypt, output) of every mode compared, in the order printed.
MODES = [(sign, encrypt, out) for out in ("dir", "smtp") for sign in ("detached", "opaque")
         for encrypt in (True, False)]


def cpu_seconds(cmd, env=None, core=0, check=None):
    """Run *cmd* on CPU *core*; return its CPU seconds (user + system, from wait4).

    *check*: a text its standard output must hold (the tool's summary line).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=env or clean_env(), preexec_fn=on_core(core))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace")
        if proc.returncode or (check and check not in text):
            raise SystemExit("failed (%d): %s\n%s%s" % (proc.returncode, " ".join(cmd),
                                                       text[-1000:], err.read().decode()[-2000:]))
    return usage.ru_utime + usage.ru_stime


def per_message(command, n, warm, env=None, check=None):
    """Return the CPU milliseconds per message in steady state: the run of *n* messages
    less the run of *warm* ones, over n - warm (start-up and loading cancel out).

    *command(count, directory)*: the command line for *count* messages; *directory*:
    a fresh empty one (removed afterwards) for outputs.
    """
    spent = []
    for count in (n, warm):
        directory = tempfile.mkdtemp(prefix="bench-", dir=per_message.base)
        per_message.made.append(directory)
        spent.append(cpu_seconds(command(count, directory), env,
                                 check=check % count if check else None))
    return (spent[0] - spent[1]) / (n - warm) * 1000


per_message.base = None  #: where output directories are made (--outdir)
#: Output directories, removed only at the end: ext4 makes a new file slow to create
#: while many inodes near it were deleted recently (its allocator skips each of them),
#: so removing them between runs would slow down the next ones.
per_message.made = []


def mode_name(sign, encrypt, out):
    flags = "--sign_detached" if sign == "detached" else "--sign"
    return "%s%s %s" % (flags, " --encrypt" if encrypt else "",
                        "-o DIR" if out == "dir" else "--send_smtp")


def versus_commands(sign, encrypt, out, m2python, sink):
    """Return {name: command(count, directory)} for one mode: floor, ours, M2Crypto."""
    flags = ["--sign_detached" if sign == "detached" else "--sign"]
    flags += ["--encrypt"] if encrypt else []
    enc = "1" if encrypt else "0"
    if out == "dir":
        ours = lambda c, d: [TOOL, SMALL, *flags, "--keys", KEYS, "--repeat", str(c),  # noqa
                             "-o", d]
        m2 = lambda c, d: [m2python, M2_SCRIPT, SMALL, KEYS, sign, enc, d, str(c)]  # noqa
    else:
        ours = lambda c, d: [TOOL, SMALL, *flags, "--keys", KEYS, "--repeat", str(c),  # noqa
                             "--send_smtp"]
        m2 = lambda c, d: [m2python, M2_SCRIPT, SMALL, KEYS, sign, enc,  # noqa
                           "smtp:%d" % sink.port, str(c)]
    floor = lambda c, d: [PY, "-c", FLOOR_LOOP, KEYS, SMALL, sign, enc, str(c)]  # noqa
    commands = {"floor": floor, "ours": ours, "m2": m2}
    if out == "dir":  # the file system's own share: plain writes of files of that size
        size = len(subprocess.run([TOOL, SMALL, *flags, "--keys", KEYS], capture_output=True,
                                  env=clean_env(), check=True).stdout)
        commands["files"] = lambda c, d: [PY, "-c", PLAIN_WRITES, d, str(c), str(size)]  # noqa
    return commands


def versus_m2crypto(m2python, rounds, n, warm):
    """Print CPU per message of the tool and of M2Crypto against cryptography's floor,
    every mode, alternated rounds on one core (smtp-sink alone on the other)."""
    print("\n== Side by side with M2Crypto: CPU ms per message in steady state (%d minus %d "
          "messages), one core, median of %d alternated rounds ==" % (n, warm, rounds))
    print("  outputs (-o DIR) in %s (%s); M2Crypto: %s" % (
        per_message.base or tempfile.gettempdir(), fs_type(per_message.base or
                                                           tempfile.gettempdir()),
        subprocess.run([m2python, "-c", "import M2Crypto, sys; print(M2Crypto.__version__, "
                        "sys.version.split()[0])"], capture_output=True, text=True,
                       check=True).stdout.strip()))
    sink = Sink()
    os.sched_setaffinity(sink.proc.pid, {1})
    env = clean_env(SMTP_HOST="127.0.0.1", SMTP_PORT=str(sink.port))
    figures = {mode: {"floor": [], "ours": [], "m2": [], "files": []} for mode in MODES}
    try:
        for r in range(rounds):
            for mode in MODES:
                commands = list(versus_commands(*mode, m2python, sink).items())
                turn = r % len(commands)  # each takes its turn at going first
                for name, command in commands[turn:] + commands[:turn]:
                    check = ("Summary: %d sent, 0 failed" if name == "ours" and mode[2] ==
                             "smtp" else None)
                    figures[mode][name].append(per_message(
                        command, n, warm, env if name == "ours" else None, check))
            print("  round %d done" % (r + 1), file=sys.stderr)
    finally:
        sink.stop()
        for directory in per_message.made:
            shutil.rmtree(directory, ignore_errors=True)
    print("  %-40s %7s %7s %7s %8s %7s %6s %7s" % ("mode", "floor", "ours", "x floor",
                                                  "M2Crypto", "x floor", "ours/M2", "files"))
    worst = 0.0
    for mode in MODES:
        f = figures[mode]
        ours = statistics.median(o / fl for o, fl in zip(f["ours"], f["floor"]))
        m2 = statistics.median(m / fl for m, fl in zip(f["m2"], f["floor"]))
        worst = max(worst, ours)
        print("  %-40s %7.3f %7.3f %7.2f %8.3f %7.2f %6.2f %7s" % (
            mode_name(*mode), statistics.median(f["floor"]), statistics.median(f["ours"]),
            ours, statistics.median(f["m2"]), m2,
            statistics.median(o / m for o, m in zip(f["ours"], f["m2"])),
            "%.3f" % statistics.median(f["files"]) if f["files"] else "-"))
    print("  (ms: CPU per message, medians of the rounds; x floor and ours/M2: medians of each "
          "round's ratio;\n   floor: cryptography's PKCS7SignatureBuilder, + "
          "PKCS7EnvelopeBuilder with --encrypt, DER, no I/O;\n   files: plain open/write/close "
          "of a file of our output's size in Python, the file system's own share)")
    print("  worst mode: %.2f x floor" % worst)


def fs_type(path):
    """Return the type of the file system holding *path* (from /proc/mounts)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                mount, fstype = line.split()[1:3]
                if os.path.realpath(path).startswith(mount) and len(mount) > len(best):
                    best, kind = mount, fstype
    except OSError:
        pass
    return kind


def oneshot_versus(m2python, rounds):
    """Print one-shot wall times, the tool as ./sparkpostSMIME.py against M2Crypto's
    script, sign and encrypt one 19 KB message, to stdout and to a file."""
    print("\n== One-shot wall time, one core, median of %d alternated runs ==" % rounds)
    work = tempfile.mkdtemp(prefix="bench-", dir=per_message.base)
    try:
        cases = []
        for sign in ("detached", "opaque"):
            flags = ["--sign_detached" if sign == "detached" else "--sign", "--encrypt"]
            for target in ("-", work):
                ours = [TOOL, SMALL, *flags, "--keys", KEYS]
                ours += ["-o", os.path.join(work, "out.eml")] if target != "-" else []
                m2 = [m2python, M2_SCRIPT, SMALL, KEYS, sign, "1", target, "1"]
                cases.append(("%s --encrypt to %s" % (flags[0], "stdout" if target == "-"
                                                      else "a file"), ours, m2))
        times = {case[0]: ([], []) for case in cases}
        for name, ours, m2 in cases:  # warm the page cache and __pycache__
            for cmd in (ours, m2):
                timed(cmd)
        for r in range(rounds):
            for name, ours, m2 in cases:
                pair = ((0, ours), (1, m2)) if r % 2 == 0 else ((1, m2), (0, ours))
                for k, cmd in pair:
                    start = time.perf_counter()
                    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env=clean_env(), preexec_fn=on_core(0), check=True)
                    times[name][k].append(time.perf_counter() - start)
        for name, (ours, m2) in times.items():
            print("  %-40s ours %.1f ms, M2Crypto %.1f ms = %.2f x" % (
                name, statistics.median(ours) * 1000, statistics.median(m2) * 1000,
                statistics.median(ours) / statistics.median(m2)))
    finally:
        shutil.rmtree(work)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--m2crypto", action="store_true",
                    help="only the side-by-side comparison with M2Crypto (every mode, one-shot)")
    ap.add_argument("--m2python", default=os.environ.get("M2CRYPTO_PYTHON", PY),
                    help="a Python that imports M2Crypto (default: $M2CRYPTO_PYTHON, or this one)")
    ap.add_argument("--outdir", default=None,
                    help="where -o DIR outputs go (default: the temporary directory)")
    ap.add_argument("--rounds", type=int, default=None, help="alternated rounds")
    args = ap.parse_args()
    if args.m2crypto:
        per_message.base = args.outdir
        if subprocess.run([args.m2python, "-c", "import M2Crypto"],
                          capture_output=True).returncode:
            raise SystemExit("%s cannot import M2Crypto: see this script's docstring"
                             % args.m2python)
        print("sparkpostSMIME vs M2Crypto on %d cores, Python %s, %s"
              % (os.cpu_count(), sys.version.split()[0], time.strftime("%Y-%m-%d %H:%M")))
        versus_m2crypto(args.m2python, args.rounds or (1 if args.quick else 5),
                        300 if args.quick else 1000, 30 if args.quick else 100)
        oneshot_versus(args.m2python, 5 if args.quick else 21)
        return
    print("sparkpostSMIME benchmark on %d cores, Python %s, %s"
          % (os.cpu_count(), sys.version.split()[0], time.strftime("%Y-%m-%d")))
    ratios = oneshot(9 if args.quick else 25)
    envelope = envelope_speed(3 if args.quick else 9)
    ml_kem_vs_rsa(3 if args.quick else 9)
    n = 300 if args.quick else 1000
    sink = Sink()
    try:
        print("\n== Batch: %d x 19 KB, --sign_detached --encrypt --send_smtp --jobs 2, into "
              "smtp-sink on 127.0.0.1 (medians of %d rounds) ==" % (
                  n, ROUNDS_QUICK if args.quick else ROUNDS))
        rounds = []  # alternate floor and batch: each round's ratio is measured side by side
        for _ in range(ROUNDS_QUICK if args.quick else ROUNDS):
            rounds.append(crypto_floor(n) + batch_rate(sink, n))
        raw = statistics.median(r[0] for r in rounds)
        floor = statistics.median(r[1] for r in rounds)
        rate = statistics.median(r[2] for r in rounds)
        batch_ratio = statistics.median(r[2] / r[1] for r in rounds)
        raw_ratio = statistics.median(r[2] / r[0] for r in rounds)
        summary = sorted(rounds, key=lambda r: r[2])[len(rounds) // 2][3]
        print("  crypto floor, 2 processes, keys preloaded:")
        print("    the tool's sign + encrypt build alone (no delivery): %.0f msg/s" % floor)
        print("    cryptography's PKCS#7 calls alone (no MIME at all): %.0f msg/s" % raw)
        print("  sparkpostSMIME --jobs 2: %.0f msg/s (wall, start-up included)" % rate)
        print("  its report: %s" % summary)
        print("  each round, tool / build floor: %s" % " ".join(
            "%.0f/%.0f=%.2f" % (r[2], r[1], r[2] / r[1]) for r in rounds))
        steady = steady_state(sink, ROUNDS_QUICK if args.quick else 3, 2000 if args.quick
                              else 5000, 200 if args.quick else 500)
        print("  steady state, %d x 19 KB --jobs 2 (marginal rate, start-up cancelled) vs "
              "cryptography's raw floor, each round: %s" % (
                  2000 if args.quick else 5000, " ".join(
                      "%.0f/%.0f=%.2f" % (t, r, t / r) for r, t, _ in steady)))
        pinned = None
        if os.cpu_count() >= 2 and hasattr(os, "sched_setaffinity"):
            pinned = [separate_cores(sink, n) for _ in range(ROUNDS_QUICK if args.quick
                                                              else ROUNDS)]
            print("  smtp-sink alone on core 1, the tool --jobs 1 on core 0 (start-up included) "
                  "vs the build alone on core 0: %s" % " ".join(
                      "%.0f/%.0f=%.2f" % (t, f, t / f) for f, t in pinned))
        loops = 10 if args.quick else 30
        per_shell = shell_loop(sink, loops)
        if per_shell is None:
            print("  shell loop: swaks is not installed (apt-get install swaks), skipped")
        else:
            print("  shell loop openssl smime -sign | openssl smime -encrypt | swaks: "
                  "%.1f ms per message (%d runs)" % (per_shell * 1000, loops))
    finally:
        sink.stop()
    print("\n== Memory (peak RSS, --sign_detached --encrypt) ==")
    rss_large = peak_rss_mib(LARGE)
    with tempfile.TemporaryDirectory() as tmp:
        big = big_message(tmp)
        rss_big = peak_rss_mib(big)
        big_size = os.path.getsize(big) / 1024.0 / 1024.0
    print("  577 KB fixture: %.0f MiB" % rss_large)
    print("  %.1f MB message: %.0f MiB" % (big_size, rss_big))
    print("\n== Summary (%d cores) ==" % os.cpu_count())
    for name, ratio in ratios.items():
        print("  one-shot %s: %.2f x the import floor" % (name, ratio))
    print("  batch: %.2f x the crypto floor (%.0f / %.0f msg/s: sign + encrypt build alone)"
          % (batch_ratio, rate, floor))
    print("  batch: %.2f x cryptography's raw PKCS#7 calls (%.0f / %.0f msg/s)"
          % (raw_ratio, rate, raw))
    print("  steady state (5,000 messages): %.2f x cryptography's raw floor (median of the "
          "rounds; %.0f msg/s; the 5,000-message run with start-up: %.2f x)" % (
              statistics.median(t / r for r, t, _ in steady),
              statistics.median(t for _, t, _ in steady),
              statistics.median(f / r for r, _, f in steady)))
    if pinned:
        print("  batch, the sink on its own core: %.2f x the one-core build floor "
              "(--jobs 1 on the other core)" % statistics.median(t / f for f, t in pinned))
    if per_shell is not None:
        print("  batch vs shell loop: %.0f x faster per message (%.2f ms vs %.1f ms)"
              % (per_shell * rate, 1000 / rate, per_shell * 1000))
    for name, ratio in envelope.items():
        print("  --encrypt (RSA only) %s: %.2f x the time of cryptography's envelope builder"
              % (name, ratio))
    print("  peak RSS: %.0f MiB (577 KB), %.0f MiB (%.0f MB)" % (rss_large, rss_big, big_size))


if __name__ == "__main__":
    main()
