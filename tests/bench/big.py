#!/usr/bin/env python3
"""Big messages (issue 29): the tool against OpenSSL's CLI, side by side, 19 MB and 100 MB.

Run from the repository root (after the README's install):

    .venv/bin/python tests/bench/big.py                  # 19 and 100 MB, best of 3
    .venv/bin/python tests/bench/big.py --sizes 19 --rounds 1
    .venv/bin/python tests/bench/big.py --tool OLD.py    # another copy of the script too

The message is bench.py's big_message() (a text part and a base64 attachment of random
bytes), signed as steve@thetucks.com and encrypted to steve.tuck@sparkpost.com and the
sender's own copy (tests/keys).  Each program runs as its own process, its output to a
file; wall time and peak RSS (ru_maxrss from wait4) are the best of the rounds, every
program once per round in turn.  OpenSSL's pipeline is two processes, `openssl cms -sign`
(-nodetach when opaque) then `openssl cms -encrypt` (-aes256, the same two recipients):
its time is their sum, its peak the larger.  Receiving (--receive): the first tool's
--sign --encrypt and --sign_detached --encrypt outputs, read by `--verify -o FILE` against
`openssl cms -decrypt` then `openssl cms -verify`.  Nothing here is pass/fail.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import KEYS, TOOL, clean_env  # noqa: E402

SIGNER, RCPT = "steve@thetucks.com", "steve.tuck@sparkpost.com"
MODES = [("--sign --encrypt", True, True), ("--sign_detached --encrypt", False, True),
         ("--sign", True, False), ("--sign_detached", False, False), ("--encrypt", None, True)]


def run(argv):
    """Run *argv* (stdout and stderr to /dev/null); return (seconds, peak MiB, exit code)."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=clean_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def ours(tool, message, flags, out):
    return [run([tool, message, *flags.split(), "--keys", KEYS, "-o", out])]


def openssl(message, opaque, encrypt, out):
    """OpenSSL's CLI pipeline: sign (opaque or detached), then encrypt; a list of runs."""
    key = lambda name: os.path.join(KEYS, name)  # noqa: E731
    runs, signed = [], message
    if opaque is not None:
        signed = out + ".signed"
        runs.append(run(["openssl", "cms", "-sign", "-md", "sha256", "-in", message,
                         "-signer", key(SIGNER + ".crt"), "-inkey", key(SIGNER + ".pem"),
                         "-out", signed] + (["-nodetach"] if opaque else [])))
    if encrypt:
        runs.append(run(["openssl", "cms", "-encrypt", "-aes256", "-in", signed, "-out", out,
                         key(RCPT + ".crt"), key(SIGNER + ".crt")]))
    return runs


RECEIVE_MODES = [("--sign --encrypt", None, None), ("--sign_detached --encrypt", None, None)]


def verify_ours(tool, message, out):
    return [run([tool, "--verify", message, "--keys", KEYS, "--ca",
                 os.path.join(KEYS, "demo-ca.crt"), "-o", out])]


def verify_openssl(message, out):
    """OpenSSL's CLI pipeline: decrypt for RCPT, then verify; a list of runs."""
    key = lambda name: os.path.join(KEYS, name)  # noqa: E731
    return [run(["openssl", "cms", "-decrypt", "-in", message, "-recip", key(RCPT + ".crt"),
                 "-inkey", key(RCPT + ".pem"), "-out", out + ".decrypted"]),
            run(["openssl", "cms", "-verify", "-in", out + ".decrypted", "-CAfile",
                 key("demo-ca.crt"), "-out", out])]


def make_message(directory, size):
    """Return the path of a big_message() of *size* MB, made by another process: a child's
    ru_maxrss counts its parent's pages up to its exec, so this one stays small."""
    code = "import sys; sys.path.insert(0, %r); from bench import big_message; " \
           "print(big_message(%r, %d))" % (os.path.dirname(os.path.abspath(__file__)),
                                           directory, size)
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip()


def best(rounds):
    """Return (best total seconds, best peak MiB) of *rounds* (each a list of runs)."""
    for runs in rounds:
        assert all(code == 0 for _, _, code in runs), runs
    return (min(sum(t for t, _, _ in runs) for runs in rounds),
            min(max(p for _, p, _ in runs) for runs in rounds))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="19,100", help="message sizes in MB (default 19,100)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tool", action="append", help="a copy of sparkpostSMIME.py (repeatable)")
    ap.add_argument("--receive", action="store_true", help="--verify instead of building")
    args = ap.parse_args()
    tools = [os.path.abspath(t) for t in args.tool or [TOOL]]
    with tempfile.TemporaryDirectory(prefix="smime-big-") as tmp:
        print("| mode | size | OpenSSL CLI | " + " | ".join(
            "%s: time / peak | / OpenSSL" % os.path.relpath(t) for t in tools) + " |")
        print("|---|---|---|" + "---|---|" * len(tools))
        for size in [int(s) for s in args.sizes.split(",")]:
            message = make_message(tmp, size)
            out = os.path.join(tmp, "out.eml")
            for flags, opaque, encrypt in MODES if not args.receive else RECEIVE_MODES:
                if args.receive:  # flags: how the message to read is built
                    built = os.path.join(tmp, "built.eml")
                    best([ours(tools[0], message, flags, built)])
                    programs = [lambda: verify_openssl(built, out)]
                    programs += [lambda t=t: verify_ours(t, built, out) for t in tools]
                    flags = "--verify of " + flags
                else:
                    programs = [lambda: openssl(message, opaque, encrypt, out)]
                    programs += [lambda t=t: ours(t, message, flags, out) for t in tools]
                rounds = [[] for _ in programs]
                for _ in range(args.rounds):
                    for n, program in enumerate(programs):
                        rounds[n].append(program())
                results = [best(r) for r in rounds]
                cells = ["%.2f s / %.0f MiB" % results[0]]
                for seconds, peak in results[1:]:
                    cells += ["%.2f s / %.0f MiB" % (seconds, peak),
                              "%.2f x / %.2f x" % (seconds / results[0][0], peak / results[0][1])]
                print("| `%s` | %d MB | %s |" % (flags, size, " | ".join(cells)), flush=True)
            os.unlink(message)


if __name__ == "__main__":
    main()
