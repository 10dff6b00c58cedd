#!/usr/bin/env python3
"""Time and memory of --verify/--decrypt on the hostile messages of issue 17, measured by hand.

    .venv/bin/python tests/bench/receive_attacks.py [--tool OLD.py] [--tool NEW.py]

Writes each attack of tests/test_receive_attacks.py (a few MB each) to a scratch
directory and runs every --tool on it once, side by side: wall time, peak resident
memory (getrusage of the child) and exit code.  Default tool: this tree's script.
Nothing here is a pass/fail test.
"""

import argparse
import ast
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.dirname(HERE), ROOT]

import sparkpostSMIME as tool  # noqa: E402
import test_receive_attacks as t  # noqa: E402
from pki import CA, pem_cert, pem_key, write  # noqa: E402


def attacks(base):
    """Write the attack messages and our key; return [(name, mode, path)], the CA file."""
    keys = os.path.join(base, "keys")
    os.makedirs(keys)
    root = CA("Bench Root (TEST ONLY)")
    ca = root.intermediate()
    key, cert = ca.issue("alice@example.com")
    signer = tool.Identity("alice@example.com", cert, "-", key, ca.chain)
    key, cert = root.issue(t.BOB)
    write(os.path.join(keys, t.BOB + ".pem"), pem_key(key) + pem_cert(cert))
    bob = tool.Identity(t.BOB, cert, "-", key)
    made = [("header folded 200,000 times (1.4 MB)", "verify", t.folded_header(200000)),
            ("OID of 400 KB", "verify", t.huge_oid(400000)),
            ("INTEGER of 400 KB (SignerInfo version)", "verify", t.huge_integer(signer, 400000)),
            ("2,000 SignerInfos over 3 MB", "verify", t.many_signer_infos(signer, 2000, 3 << 20)),
            ("30 indefinite levels, 1.3M empty chunks", "verify",
             t.nested_indefinite(signer, 30, 1300000)),
            ("50 RecipientInfos for us, bad padding, 16-octet chunks, 3 MB", "decrypt",
             t.envelope(bob, t.TEXT + b"x" * (3 << 20), copies=49, chunk=16, spoil=True)),
            ("600 nested multiparts + binary part", "verify", t.nested_multiparts(600)),
            ("base64 with 9 MB of junk", "verify", t.base64_junk(9 << 20))]
    out = []
    for n, (name, mode, data) in enumerate(made):
        path = write(os.path.join(base, "%d.eml" % n), data)
        out.append((name, mode, path))
    return out, write(os.path.join(base, "ca.crt"), pem_cert(root.cert)), keys


def measure(script, mode, path, cafile, keys):
    """Return (seconds, peak RSS in MB, exit code) of one run."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--" + mode, path, "--ca", cafile,
                           "--keys", keys], capture_output=True, timeout=600)
    took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return took, peak / 1024, proc.returncode, proc.stderr.decode()[:70]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", action="append", default=[])
    args = ap.parse_args()
    tools = args.tool or [os.path.join(ROOT, "sparkpostSMIME.py")]
    with tempfile.TemporaryDirectory() as base:
        made, cafile, keys = attacks(base)
        for name, mode, path in made:
            size = os.path.getsize(path) / 1e6
            for script in tools:  # RUSAGE_CHILDREN peaks only grow: one child per run
                took, peak, code, err = subprocess_measure(script, mode, path, cafile, keys)
                print("%-48s %5.1f MB  %-22s %7.2f s %7.0f MB  exit %d  %s" % (
                    name, size, os.path.basename(script), took, peak, code, err.strip()))


def subprocess_measure(script, mode, path, cafile, keys):
    """measure() in a fresh process, so each peak is its own."""
    code = ("import sys; sys.path[:0] = %r; import receive_attacks as r; "
            "print(repr(r.measure(*sys.argv[1:])))" % [HERE])
    out = subprocess.run([sys.executable, "-c", code, script, mode, path, cafile, keys],
                         capture_output=True, text=True, timeout=900).stdout
    return ast.literal_eval(out)


if __name__ == "__main__":
    main()
