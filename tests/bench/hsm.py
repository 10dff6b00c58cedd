#!/usr/bin/env python3
"""Signing with a key on a PKCS#11 token (SoftHSM2) against a key in a file: the same
--sign batch into -o DIR, side by side, alternated rounds, RSA 2048 and EC P-256.

Run from the repository root (after the README's install, python-pkcs11 and
`apt-get install -y softhsm2`):

    .venv/bin/python tests/bench/hsm.py [--messages 300] [--rounds 3] [--jobs 1]

The token is SoftHSM2's, made in a temporary directory (its own SOFTHSM2_CONF) by
tests/test_pkcs11.py's Token; a hardware token or a network HSM is slower, a cloud HSM
much slower: measure yours with PKCS11_MODULE and a .p11 of your own the same way.
Nothing here is a pass/fail test.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)
sys.path.insert(0, os.path.join(TESTS, "bench"))
from bench import clean_env, timed  # noqa: E402
from support.harness import PKI, TOOL  # noqa: E402
from support.pki import new_key  # noqa: E402
from test_pkcs11 import EC_ADDR, MSG, RSA_ADDR, Token  # noqa: E402


def batch(inbox, keys, out, env, jobs):
    """Sign every message of *inbox* into *out*; return the wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    os.mkdir(out)
    return timed([sys.executable, TOOL, inbox, "--keys", keys, "--sign", "-o", out, "--jobs",
                  str(jobs)], clean_env(XDG_CACHE_HOME=os.path.join(os.path.dirname(out),
                                                                    "cache"), **env))


def inbox_of(base, sender, count):
    path = os.path.join(base, "inbox-" + sender)
    os.mkdir(path)
    for n in range(count):
        with open(os.path.join(path, "m%05d.eml" % n), "wb") as fh:
            fh.write(MSG % (sender.encode(), b"message %d" % n))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pkcs11-bench-")
    try:
        pki = PKI(os.path.join(work, "pki"))
        pki.add("ec-file@example.com", new_key("ec"))
        token = Token(os.path.join(work, "softhsm"), pki)
        runs = {"RSA file": (pki.keys, "alice@example.com", {}),
                "RSA token": (token.keys, RSA_ADDR, token.env),
                "EC file": (pki.keys, "ec-file@example.com", {}),
                "EC token": (token.keys, EC_ADDR, token.env)}
        inboxes = {name: inbox_of(work, sender, args.messages)
                   for name, (_, sender, _) in runs.items()}
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, (keys, _, env) in runs.items():
                times[name].append(batch(inboxes[name], keys, os.path.join(work, "out"),
                                         env, args.jobs))
        print("%d messages, --sign -o DIR, --jobs %d, median of %d rounds"
              % (args.messages, args.jobs, args.rounds))
        for kind in ("RSA", "EC"):
            file_rate = args.messages / statistics.median(times[kind + " file"])
            token_rate = args.messages / statistics.median(times[kind + " token"])
            print("  %-3s  file key %7.1f msg/s   SoftHSM2 key %7.1f msg/s   token/file %.2f"
                  % (kind, file_rate, token_rate, token_rate / file_rate))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
