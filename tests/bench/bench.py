#!/usr/bin/env python3
"""sparkpostSMIME benchmark: one-shot start-up, batch injection, the openssl|swaks loop, memory.

Run from the repository root (after the README's install):

    .venv/bin/python tests/bench/bench.py            # everything (~3 minutes)
    .venv/bin/python tests/bench/bench.py --quick    # fewer repetitions

Everything is measured side by side in one run on this machine and printed as
absolute figures and ratios; nothing here is a pass/fail test.  Traffic goes only to
Postfix's smtp-sink on 127.0.0.1, started and stopped by this script.
"""

import argparse
import os
import resource
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
        self.proc = subprocess.Popen([binary, "-c", "-u", "postfix", "127.0.0.1:%d" % self.port,
                                      "256"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    print("sparkpostSMIME benchmark on %d cores, Python %s, %s"
          % (os.cpu_count(), sys.version.split()[0], time.strftime("%Y-%m-%d")))
    ratios = oneshot(9 if args.quick else 25)
    print("\n== Summary ==")
    for name, ratio in ratios.items():
        print("  one-shot %s: %.2f x the import floor" % (name, ratio))


if __name__ == "__main__":
    main()
