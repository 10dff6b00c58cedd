#!/usr/bin/env python3
"""What the durable journal costs: a --send_smtp batch to smtp-sink with and without
--results, side by side, alternated rounds (issue 27: each row is on disk before the next
message can be delivered, so a crash leaves at most one delivered, unrecorded message
per worker).

Run from the repository root (after the README's install; smtp-sink comes with Postfix):

    .venv/bin/python tests/bench/journal.py [--messages 500] [--rounds 5] [--dir DIR]

    --tool OTHER.py adds a third column: another copy of the tool run the same way (an
    older commit's, say: git show REV:sparkpostSMIME.py > /tmp/old.py).

The journal is written in --dir (default: the temporary directory; its file system
decides what an fdatasync costs: tmpfs nothing, a disk a journal commit).  Traffic goes
only to smtp-sink on 127.0.0.1.  Nothing here is a pass/fail test.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import KEYS, SMALL, TOOL, Sink, clean_env, fs_type  # noqa: E402


def batch(tool, inbox, sink, results=None):
    """Send every message of *inbox* with *tool*; return the wall seconds."""
    cmd = [sys.executable, tool, inbox, "--sign_detached", "--encrypt", "--keys", KEYS,
           "--send_smtp"] + (["--results", results] if results else [])
    env = clean_env(SMTP_HOST="127.0.0.1", SMTP_PORT=str(sink.port), SMTP_TLS="none")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit("failed (%d): %s" % (proc.returncode, proc.stderr.decode()[-500:]))
    return wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the journal is written")
    ap.add_argument("--tool", default=None, help="another copy of the tool, for a third column")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="journal-bench-", dir=args.dir)
    inbox = os.path.join(work, "inbox")
    os.mkdir(inbox)
    with open(SMALL, "rb") as fh:
        data = fh.read()
    for n in range(args.messages):
        with open(os.path.join(inbox, "m%05d.eml" % n), "wb") as fh:
            fh.write(data)
    runs = {"no --results": (TOOL, False), "--results": (TOOL, True)}
    if args.tool:
        runs["--results, " + os.path.basename(args.tool)] = (args.tool, True)
    sink = Sink()
    times = {name: [] for name in runs}
    try:
        for r in range(args.rounds):
            for name, (tool, journaled) in runs.items():
                results = os.path.join(work, "results-%d.jsonl" % r) if journaled else None
                times[name].append(batch(tool, inbox, sink, results))
                if results:
                    os.unlink(results)
    finally:
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("%d messages (19 KB, --sign_detached --encrypt, --send_smtp to smtp-sink), "
          "journal on %s, median of %d alternated rounds:" % (
              args.messages, fs_type(args.dir or tempfile.gettempdir()), args.rounds))
    base = statistics.median(times["no --results"]) / args.messages
    for name, values in times.items():
        per = statistics.median(values) / args.messages
        print("  %-28s %.3f ms per message  = %.3f x without --results"
              % (name, per * 1000, per / base))


if __name__ == "__main__":
    main()
