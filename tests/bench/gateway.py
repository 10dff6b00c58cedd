#!/usr/bin/env python3
"""sparkpostSMIME gateway benchmark: --serve against the CLI batch, side by side.

Run from the repository root (after the README's install):

    .venv/bin/python tests/bench/gateway.py            # 3 rounds of 2,000 messages
    .venv/bin/python tests/bench/gateway.py --quick    # 1 round of 500

Each round, alternately:
  - the CLI batch: ./sparkpostSMIME.py fancy-HTML-to-smt.eml --repeat N --jobs 2
    --sign_detached --encrypt --send_smtp, into Postfix's smtp-sink (wall time of the
    whole run, start-up included);
  - the gateway: ./sparkpostSMIME.py --serve PORT --jobs 2 --sign_detached --encrypt
    --send_smtp into the same sink, fed the same message N times by 4 concurrent SMTP
    clients (4 processes, one connection each, smtplib); timed from the clients' first
    connection to the last 250 reply, the gateway already listening (its keys are
    loaded by its first message, inside the timing).
The ratio is gateway msg/s / CLI msg/s of the same round; the median is printed.

    .venv/bin/python tests/bench/gateway.py --baseline /tmp/old/sparkpostSMIME.py

compares two gateways instead (SCRIPT executable), side by side: each round runs this
script's and the other copy's (in turn first), each fed as above; the ratio is
ours / the other's.
Traffic goes only to 127.0.0.1.  Nothing here is a pass/fail test.
"""

import argparse
import multiprocessing
import os
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import KEYS, SMALL, TOOL, Sink, batch_rate, clean_env, free_port  # noqa: E402

CLIENTS = 4
MODE = ["--sign_detached", "--encrypt"]
RCPT = "steve.tuck@sparkpost.com"


def start_gateway(sink, tool=TOOL):
    """Start the gateway (*tool*) into *sink*; return (process, port) once it listens."""
    port = free_port()
    env = clean_env(SMTP_HOST="127.0.0.1", SMTP_PORT=str(sink.port))
    out = tempfile.TemporaryFile()  # a pipe nobody reads would fill and stop the gateway
    proc = subprocess.Popen([tool, "--serve", str(port), "--jobs", "2", "--keys", KEYS,
                             "--send_smtp"] + MODE, env=env, stdout=out,
                            stderr=subprocess.DEVNULL)
    proc.out = out
    deadline = time.time() + 20
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    raise SystemExit("the gateway did not start")


def client(port, count, data, ready, go):
    """One SMTP client: wait for *go*, send *count* messages on one connection."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("bench.example")
        ready.release()
        go.wait()
        for _ in range(count):
            refused = smtp.sendmail("steve@thetucks.com", [RCPT], data)
            if refused:
                raise SystemExit("refused: %r" % refused)


def gateway_rate(sink, n, tool=TOOL):
    """Return (msg/s, the gateway's summary line) for n messages from CLIENTS clients."""
    with open(SMALL, "rb") as fh:
        data = fh.read()
    proc, port = start_gateway(sink, tool)
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Semaphore(0), ctx.Event()
    clients = [ctx.Process(target=client, args=(port, n // CLIENTS, data, ready, go))
               for _ in range(CLIENTS)]
    for c in clients:
        c.start()
    for _ in clients:
        ready.acquire()
    start = time.perf_counter()
    go.set()
    for c in clients:
        c.join()
    wall = time.perf_counter() - start
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    proc.out.seek(0)
    out = proc.out.read().decode(errors="replace")
    if any(c.exitcode for c in clients) or proc.returncode != 0 or \
            ("Summary: %d sent, 0 failed" % n) not in out:
        raise SystemExit("gateway run failed:\n" + out[-2000:])
    return n / wall, out.strip().splitlines()[-1]


def started(what, n):
    """Print the run's banner; return the smtp-sink, started, with caches warmed (page
    cache, __pycache__, validated keys)."""
    print("sparkpostSMIME gateway %s on %d cores, Python %s, %s: %d x 19 KB, %s, into "
          "smtp-sink on 127.0.0.1" % (what, os.cpu_count(), sys.version.split()[0],
                                      time.strftime("%Y-%m-%d"), n, " ".join(MODE)))
    sink = Sink()
    try:
        batch_rate(sink, 50)
    except BaseException:
        sink.stop()
        raise
    return sink


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 500 messages")
    ap.add_argument("--baseline", metavar="SCRIPT",
                    help="another copy of sparkpostSMIME.py: its gateway against this one's")
    args = ap.parse_args()
    n, rounds = (500, 1) if args.quick else (2000, 3)
    if args.baseline:
        return against(args.baseline, n, rounds)
    sink, results = started("benchmark", n), []
    try:
        for _ in range(rounds):
            cli, cli_summary = batch_rate(sink, n)
            gw, gw_summary = gateway_rate(sink, n)
            results.append((cli, gw))
            print("  CLI --repeat %d --jobs 2 --send_smtp: %.0f msg/s (%s)" % (n, cli,
                                                                              cli_summary))
            print("  gateway --jobs 2, %d clients:         %.0f msg/s (%s)" % (CLIENTS, gw,
                                                                               gw_summary))
    finally:
        sink.stop()
    print("== gateway / CLI batch, each round: %s; median %.2f x ==" % (
        " ".join("%.0f/%.0f=%.2f" % (g, c, g / c) for c, g in results),
        statistics.median(g / c for c, g in results)))


def against(baseline, n, rounds):
    """Run this gateway and *baseline*'s side by side, in turn first; print the rates
    and the median of ours / theirs."""
    sink, results = started("against " + baseline, n), []
    try:
        for round_ in range(rounds):
            rate = {}
            for tool in (TOOL, baseline) if round_ % 2 == 0 else (baseline, TOOL):
                rate[tool] = gateway_rate(sink, n, tool)[0]
            results.append((rate[TOOL], rate[baseline]))
            print("  round %d: this %.0f msg/s, baseline %.0f msg/s: %.3f x" % (
                round_ + 1, rate[TOOL], rate[baseline], rate[TOOL] / rate[baseline]))
    finally:
        sink.stop()
    print("== this gateway / baseline, median of %d rounds: %.3f x ==" % (
        rounds, statistics.median(ours / theirs for ours, theirs in results)))


if __name__ == "__main__":
    main()
