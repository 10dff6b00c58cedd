"""Batch mode and "nothing lost": --jobs, --repeat, reuse, retries, journal, resume, archive, Ctrl-C."""

import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from support import engines
from support.harness import TOOL, inbox, journal, run_tool, smtp_env, summary
from support.corpus import CORPUS
from support.servers import ApiServer, SmtpServer


def test_jobs_repeat_and_directories(smtp, pki, tmp_path):
    d = inbox(tmp_path, 5)
    extra = tmp_path / "extra.eml"
    extra.write_bytes(CORPUS["many-recipients"])
    proc = run_tool([str(d), str(extra), "--keys", pki.keys, "--sign", "--encrypt",
                     "--send_smtp", "--jobs", "2", "--repeat", "3"], env=smtp_env(smtp))
    assert proc.returncode == 0, proc.stderr
    assert summary(proc) == [18, 0, 0]
    out = proc.stdout.decode()
    assert out.count("\nOK - in ") + out.startswith("OK - in ") == 18
    assert out.count("Opened SMTP connection (plain)") == 2  # one session per worker
    assert len(smtp.messages) == 18
    sources = [line.split("\t")[0] for line in out.splitlines() if line.startswith("Sending ")]
    assert sorted(set(sources)) == sorted(["Sending " + str(d / ("m%03d.eml" % i))
                                           for i in range(5)] + ["Sending " + str(extra)])


def test_connection_reused_for_100_messages(smtp, pki, tmp_path):
    msg = tmp_path / "m.eml"
    msg.write_bytes(CORPUS["plain-ascii"])
    proc = run_tool([str(msg), "--keys", pki.keys, "--send_smtp", "--repeat", "150"],
                    env=smtp_env(smtp))
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)[:2] == [150, 0]
    assert len(smtp.messages) == 150
    assert smtp.handler.connections == 2  # 100 on the first connection, 50 on the second


def test_api_batch_keeps_one_session_per_worker(pki, tmp_path):
    with ApiServer() as api:
        d = inbox(tmp_path, 4)
        proc = run_tool([str(d), "--keys", pki.keys, "--sign", "--send_api", "--jobs", "2",
                         "--repeat", "2"],
                        env={"SPARKPOST_API_KEY": engines.plant_secret("batch-api-key-TEST-0001"),
                             "SPARKPOST_HOST": api.url})
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)[:2] == [8, 0]
    assert len(api.requests) == 8
    assert proc.stdout.decode().count("Opened connection to %s/api/v1" % api.url) == 2


def test_output_directory_with_repeat(pki, tmp_path, openssl):
    out = tmp_path / "out"
    out.mkdir()
    d = inbox(tmp_path, 2)
    proc = run_tool([str(d), "--keys", pki.keys, "--sign", "--repeat", "2", "-o", str(out),
                     "--jobs", "2"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b""  # files, not stdout
    assert sorted(os.listdir(out)) == ["m000.0.eml", "m000.1.eml", "m001.0.eml", "m001.1.eml"]
    assert b"Message 1." in openssl.verify((out / "m001.1.eml").read_bytes(), pki.cafile)
    assert "Summary: 4 written, 0 failed" in proc.stderr.decode()


def test_every_message_accounted_for(smtp, pki, tmp_path):
    d = inbox(tmp_path, 3)
    (d / "m001.eml").write_bytes(b"To: bob@example.org\r\n\r\nno sender\r\n")
    results = tmp_path / "results.jsonl"
    proc = run_tool([str(d), "--keys", pki.keys, "--send_smtp", "--results", str(results)],
                    env=smtp_env(smtp))
    assert proc.returncode == 65
    assert summary(proc)[:2] == [2, 1]
    rows = journal(results)
    assert [(r["input"].endswith(n), r["status"]) for r, n in zip(
        rows, ("m000.eml", "m001.eml", "m002.eml"))] == [(True, "sent"), (True, "failed"),
                                                         (True, "sent")]
    assert rows[1]["exit_code"] == 65 and rows[0]["exit_code"] == 0
    assert rows[0]["recipients"] == ["bob@example.org"] and rows[0]["attempts"] == 1
    assert rows[0]["reply"].startswith("250 2.0.0 Ok: queued as Q")
    assert "no From address" in proc.stderr.decode()


def test_drops_at_end_of_data_are_retried_without_duplicates(smtp, pki, tmp_path):
    """40 messages through a server that drops the connection at the end of every 4th
    new DATA (before its reply): exactly 40 delivered, once each, and 40 journal rows."""
    smtp.handler.drop_every = 4
    d = inbox(tmp_path, 40)
    results = tmp_path / "results.jsonl"
    archive = tmp_path / "archive"
    proc = run_tool([str(d), "--keys", pki.keys, "--send_smtp", "--results",
                     str(results), "--archive", str(archive), "--retry_delay", "0.05"],
                    env=smtp_env(smtp))
    assert proc.returncode == 0, proc.stderr
    assert smtp.handler.dropped == 10  # every 4th of 40 (a retry is not dropped again)
    assert len(smtp.messages) == 40
    bodies = [m[2] for m in smtp.messages]
    numbers = sorted(int(re.search(rb"Message (\d+)\.", b).group(1)) for b in bodies)
    assert numbers == list(range(40))  # each message exactly once
    rows = journal(results)
    assert len(rows) == 40 and all(r["status"] == "sent" for r in rows)
    # each drop costs the message in DATA one attempt; a next message whose envelope was
    # in flight behind its dot is sent again on the new connection, as not yet tried
    assert sum(r["attempts"] - 1 for r in rows) == smtp.handler.dropped
    assert "retrying in" in proc.stderr.decode()
    assert summary(proc)[:2] == [40, 0]
    kept = sorted(os.listdir(archive / "new"))
    assert len(kept) == 40 and os.listdir(archive / "tmp") == []
    received = sorted(bodies)
    archived = sorted((archive / "new" / name).read_bytes() for name in kept)
    assert archived == received  # the exact bytes that were sent, once each


def test_temporary_data_failure_retried(smtp, pki, tmp_path):
    smtp.handler.tempfail_data = 2
    msg = tmp_path / "m.eml"
    msg.write_bytes(CORPUS["plain-ascii"])
    results = tmp_path / "r.jsonl"
    proc = run_tool([str(msg), "--keys", pki.keys, "--send_smtp", "--retry_delay", "0.05",
                     "--results", str(results)], env=smtp_env(smtp))
    assert proc.returncode == 0, proc.stderr
    assert len(smtp.messages) == 1
    assert journal(results)[0]["attempts"] == 3
    smtp.handler.tempfail_data = 5
    proc = run_tool([str(msg), "--keys", pki.keys, "--send_smtp", "--retry_delay", "0.05",
                     "--retries", "2"], env=smtp_env(smtp))
    assert proc.returncode == 75
    assert "451 4.3.0" in proc.stderr.decode() and len(smtp.messages) == 1


def test_resume_skips_what_was_sent(smtp, pki, tmp_path):
    d = inbox(tmp_path, 4)
    results = tmp_path / "results.jsonl"
    run_tool([str(d / "m000.eml"), str(d / "m001.eml"), "--keys", pki.keys, "--send_smtp",
              "--results", str(results)], env=smtp_env(smtp))
    assert len(smtp.messages) == 2
    with open(results, "a") as fh:
        fh.write('{"input": "cut short by a cr')  # a crash mid-line loses nothing else
    proc = run_tool([str(d), "--keys", pki.keys, "--send_smtp", "--results", str(results),
                     "--resume"], env=smtp_env(smtp))
    assert proc.returncode == 0, proc.stderr
    assert len(smtp.messages) == 4
    assert "2 message(s) already sent" in proc.stderr.decode()
    assert summary(proc)[:2] == [2, 0]


def batch_in_background(smtp, pki, tmp_path, count, delivered, *options):
    """Start a batch of *count* messages; return (Popen, journal path) once the server
    holds *delivered* of them."""
    results = tmp_path / "results.jsonl"
    proc = subprocess.Popen([sys.executable, TOOL, str(inbox(tmp_path, count)), "--keys",
                             pki.keys, "--send_smtp", "--results", str(results)] + list(options),
                            env=dict(os.environ, **smtp_env(smtp)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while time.time() < deadline and len(smtp.messages) < delivered:
        time.sleep(0.02)
    return proc, results


def finished(proc):
    """Wait for *proc*; return its CompletedProcess, scanned like every output of the tool."""
    out, err = proc.communicate(timeout=30)
    engines.OUTPUTS.append(out + err)
    assert b"Traceback" not in err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_finishes_in_flight_and_prints_summary(smtp, pki, tmp_path, jobs):
    smtp.handler.delay = 0.2
    proc, results = batch_in_background(smtp, pki, tmp_path, 30, 2, "--jobs", jobs)
    proc.send_signal(signal.SIGINT)
    done = finished(proc)
    assert done.returncode == 130, done.stderr
    assert b"interrupted" in done.stderr
    sent, failed, left = summary(done)
    assert sent == len(smtp.messages) and failed == 0 and sent + left == 30 and left > 0
    assert len(journal(results)) == sent


def test_report_lines_come_as_messages_are_sent(smtp, pki, tmp_path):
    """Without --results no journal row is waited for: a message is reported once the
    server has accepted it, not when the run ends."""
    smtp.handler.delay = 0.2
    proc = subprocess.Popen([sys.executable, TOOL, str(inbox(tmp_path, 12)), "--keys",
                             pki.keys, "--send_smtp"], env=dict(os.environ, **smtp_env(smtp)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, seen = time.time() + 20, b""
    while time.time() < deadline and b"OK - in" not in seen:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            seen += os.read(proc.stdout.fileno(), 4096)
    assert b"OK - in" in seen and proc.poll() is None, seen
    assert len(smtp.messages) < 12
    proc.send_signal(signal.SIGINT)
    done = finished(proc)
    assert done.returncode == 130 and summary(done)[0] == len(smtp.messages)


def test_config_failure_stops_the_batch(pki, tmp_path):
    with SmtpServer(users={"u": "p-TEST-pw"}, auth_require_tls=False) as srv:
        engines.plant_secret("p-TEST-pw")
        d = inbox(tmp_path, 5)
        proc = run_tool([str(d), "--keys", pki.keys, "--send_smtp"],
                        env=dict(smtp_env(srv), SMTP_USER="u", SMTP_PASSWORD="p-TEST-pw"))
    assert proc.returncode == 78
    assert srv.messages == [] and proc.stderr.decode().count("refusing to send") == 1


def mixed_inbox(tmp_path, tos):
    """One message per To: header in *tos* (m000.eml, m001.eml, ...), alice -> them."""
    d = tmp_path / "mixed"
    d.mkdir()
    for i, to in enumerate(tos):
        (d / ("m%03d.eml" % i)).write_bytes(CORPUS["plain-ascii"].replace(
            b"To: Bob <bob@example.org>", b"To: " + to).replace(b"Just text.", b"Message %d." % i))
    return d


def test_messages_stream_behind_each_other(pki, tmp_path):
    """With PIPELINING, a message's final dot and the next MAIL/RCPT/DATA share one group
    (RFC 2920 3.1): the transcript shows them sent before the end-of-DATA reply."""
    for pipelining in (True, False):
        with SmtpServer(pipelining=pipelining) as srv:
            proc = run_tool([str(inbox(tmp_path, 3)), "--keys", pki.keys, "--send_smtp", "-v"],
                            env=smtp_env(srv))
        assert proc.returncode == 0, proc.stderr
        assert len(srv.messages) == 3
        err = proc.stderr.decode()
        second_dot = err.index("-> .\n", err.index("-> .\n") + 1)  # the first goes alone
        queued = err.index("<- 250 2.0.0 Ok: queued as Q00002")
        next_mail = err.index("-> MAIL FROM:<alice@example.com>", second_dot)
        assert (next_mail < queued) == pipelining, err


def test_refusals_inside_a_streamed_batch(smtp, pki, tmp_path):
    """Partial and total refusals among accepted messages: each message gets its own
    outcome, in order, and the others are delivered once."""
    smtp.handler.refuse = {"carol@example.net": "550 5.7.1 relaying denied",
                           "dave@example.com": "550 5.1.1 no such user"}
    d = mixed_inbox(tmp_path, [b"bob@example.org", b"bob@example.org, carol@example.net",
                               b"dave@example.com", b"bob@example.org", b"erin@example.org"])
    results = tmp_path / "results.jsonl"
    proc = run_tool([str(d), "--keys", pki.keys, "--send_smtp", "--results", str(results)],
                    env=smtp_env(smtp))
    assert proc.returncode == 69, proc.stderr
    rows = journal(results)
    assert [os.path.basename(r["input"]) for r in rows] == ["m%03d.eml" % i for i in range(5)]
    assert [r["status"] for r in rows] == ["sent", "partial", "failed", "sent", "sent"]
    assert all(r["attempts"] == 1 for r in rows)
    numbers = [int(re.search(rb"Message (\d+)\.", m[2]).group(1)) for m in smtp.messages]
    assert numbers == [0, 1, 3, 4]
    assert smtp.messages[1][1] == ["bob@example.org"]
    out = proc.stdout.decode()
    assert out.count("OK - in ") == 3 and out.count("PARTIAL - in ") == 1
    assert "FAILED - in " in out and summary(proc)[:2] == [3, 2]
    err = proc.stderr.decode()
    assert "refused carol@example.net: 550 5.7.1" in err
    assert "refused dave@example.com: 550 5.1.1" in err


def test_end_of_data_tempfail_in_a_streamed_batch(smtp, pki, tmp_path):
    """451 at the end of DATA for two messages in a row while the next ones are in flight:
    every message is delivered exactly once; exactly those two took a second attempt."""
    smtp.handler.tempfail_once = {b"Message 2.", b"Message 3."}
    results = tmp_path / "results.jsonl"
    proc = run_tool([str(inbox(tmp_path, 6)), "--keys", pki.keys, "--send_smtp",
                     "--retry_delay", "0.05", "--results", str(results)], env=smtp_env(smtp))
    assert proc.returncode == 0, proc.stderr
    numbers = sorted(int(re.search(rb"Message (\d+)\.", m[2]).group(1)) for m in smtp.messages)
    assert numbers == list(range(6))
    rows = journal(results)
    assert len(rows) == 6 and all(r["status"] == "sent" for r in rows)
    # a message waiting for its retry does not hold the others up: rows come as they end
    rows.sort(key=lambda r: r["input"])
    assert [r["attempts"] for r in rows] == [1, 1, 2, 2, 1, 1]
    assert proc.stderr.decode().count("451 4.3.0") == 2


REPORT_LINE = re.compile(r"(Opened SMTP connection \(plain\) to 127\.0\.0\.1, port \d+|Sending \S+\t"
                         r"From: \S+\tTo: \S+|OK - in [\d.]+ seconds|FAILED - in [\d.]+ seconds.*"
                         r"|Summary: .*)$")


def test_parallel_workers_print_whole_lines_and_journal(smtp, pki, tmp_path):
    """--jobs 3: the workers print their own lines (never mixed), journal every message
    once, and the summary and exit code add up their counts."""
    d = inbox(tmp_path, 12)
    (d / "m005.eml").write_bytes(b"To: bob@example.org\r\n\r\nno sender\r\n")
    results = tmp_path / "results.jsonl"
    proc = run_tool([str(d), "--keys", pki.keys, "--sign", "--send_smtp", "--jobs", "3",
                     "--repeat", "5", "--results", str(results)], env=smtp_env(smtp))
    assert proc.returncode == 65, proc.stderr
    assert summary(proc)[:2] == [55, 5]
    lines = proc.stdout.decode().splitlines()
    assert [line for line in lines if not REPORT_LINE.match(line)] == []
    assert sum(line.startswith("OK - in") for line in lines) == 55 == len(smtp.messages)
    assert proc.stderr.decode().count("no From address") == 5
    rows = journal(results)
    assert sorted((os.path.basename(r["input"]), r.get("copy", 0)) for r in rows) == sorted(
        ("m%03d.eml" % i, c) for i in range(12) for c in range(5))
    assert [r["exit_code"] for r in rows if r["status"] == "failed"] == [65] * 5


def test_parallel_config_failure_stops_every_worker(pki, tmp_path):
    with SmtpServer(users={"u": "p-TEST-pw"}, auth_require_tls=False) as srv:
        engines.plant_secret("p-TEST-pw")
        proc = run_tool([str(inbox(tmp_path, 40)), "--keys", pki.keys, "--send_smtp",
                         "--jobs", "2"],
                        env=dict(smtp_env(srv), SMTP_USER="u", SMTP_PASSWORD="p-TEST-pw"))
    assert proc.returncode == 78
    assert srv.messages == []
    assert 1 <= proc.stderr.decode().count("refusing to send") <= 2  # at most once per worker
    sent, failed, left = summary(proc)
    assert sent == 0 and failed <= 2 and left >= 38


def worker_pids(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as fh:
        return [int(p) for p in fh.read().split()]


def test_killed_worker_is_reported_not_hidden(smtp, pki, tmp_path):
    """A worker killed mid-batch: the parent says so, the other worker finishes, the
    summary counts what it could not account for as not sent, and the exit code is 75."""
    smtp.handler.delay = 0.1
    proc, results = batch_in_background(smtp, pki, tmp_path, 20, 2, "--jobs", "2")
    victim = worker_pids(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    done = finished(proc)
    assert done.returncode == 75, done.stderr
    assert (b"a worker process (pid %d) ended without reporting its counts" % victim
            in done.stderr)
    sent, failed, left = summary(done)
    assert failed == 0 and left > 0 and sent + left == 20
    rows = journal(results)
    assert all(r["status"] == "sent" for r in rows) and len(rows) <= len(smtp.messages)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_progress_bar_on_a_terminal(smtp, pki, tmp_path, jobs):
    """stderr on a terminal and many messages: a progress bar there, report lines off
    stdout only when stdout is the same terminal; the summary as usual."""
    import pty
    master, slave = pty.openpty()
    env = dict(os.environ, **smtp_env(smtp))
    try:
        proc = subprocess.run([sys.executable, TOOL, str(inbox(tmp_path, 60)), "--keys",
                               pki.keys, "--send_smtp", "--jobs", jobs], env=env,
                              stdout=subprocess.PIPE, stderr=slave, timeout=60)
        os.close(slave)
        bar = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal is closed and drained
                break
            if not chunk:
                break
            bar += chunk
    finally:
        os.close(master)
    engines.OUTPUTS.append(proc.stdout + bar)
    assert proc.returncode == 0, bar
    assert b"[##############################] 60/60, 0 failed" in bar
    assert b"\r[" in bar and bar.count(b"/60, 0 failed") >= 2
    assert b"sparkpostSMIME:" not in bar  # no warning: every worker reported its counts
    out = proc.stdout.decode()
    assert out.count("OK - in ") == 60  # stdout is a pipe: the report still goes there
    assert summary(proc)[:2] == [60, 0]


def test_resume_knows_an_input_under_another_spelling(smtp, pki, tmp_path):
    """A batch run with absolute paths, resumed with relative ones (or through a link):
    the messages already sent are recognised by their resolved path, not sent again."""
    d = inbox(tmp_path, 3)
    results = tmp_path / "results.jsonl"
    first = run_tool([str(d / "m000.eml"), str(d / "m001.eml"), "--keys", pki.keys,
                      "--send_smtp", "--results", str(results)], env=smtp_env(smtp))
    assert first.returncode == 0, first.stderr
    os.symlink(d, tmp_path / "link")
    again = run_tool(["inbox/m000.eml", "link/m001.eml", "./inbox/m002.eml", "--keys", pki.keys,
                      "--send_smtp", "--results", str(results), "--resume"],
                     env=smtp_env(smtp), cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert b"2 message(s) already sent" in again.stderr, again.stderr
    bodies = [m[2] for m in smtp.messages]
    assert len(bodies) == 3 and sum(b"Message 2." in b for b in bodies) == 1


def test_resume_reports_an_input_changed_since_it_was_sent(smtp, pki, tmp_path):
    """A file that was sent, then changed under the same name: --resume says so, naming
    it, and does not send it as if it were the one already sent (nor skip it silently)."""
    d = inbox(tmp_path, 2)
    results = tmp_path / "results.jsonl"
    first = run_tool([str(d), "--keys", pki.keys, "--send_smtp", "--results", str(results)],
                     env=smtp_env(smtp))
    assert first.returncode == 0, first.stderr
    assert all(len(row["sha256"]) == 64 and os.path.isabs(row["path"])
               for row in journal(results))
    (d / "m001.eml").write_bytes((d / "m001.eml").read_bytes().replace(b"Message 1.",
                                                                      b"Message 1, corrected."))
    again = run_tool([str(d), "--keys", pki.keys, "--send_smtp", "--results", str(results),
                      "--resume"], env=smtp_env(smtp))
    assert again.returncode == 0, again.stderr
    err = again.stderr.decode()
    assert "m001.eml has changed since" in err and "1 message(s) already sent" in err, err
    assert len(smtp.messages) == 2


def test_a_mail_loop_is_not_sent(smtp, pki, tmp_path):
    """A message that has passed 51 hops (Received fields) is a loop: not sent (65),
    named; 50 hops are sent; SMIME_HOP_LIMIT moves the limit; writing a file is no hop."""
    def message(hops):
        received = b"".join(b"Received: from a%d.example by b.example; Mon, 7 Dec 2026 "
                            b"10:00:00 +0000\r\n" % n for n in range(hops))
        return received + CORPUS["plain-ascii"]
    loop, fine = tmp_path / "loop.eml", tmp_path / "fine.eml"
    loop.write_bytes(message(51))
    fine.write_bytes(message(50))
    proc = run_tool([str(loop), str(fine), "--keys", pki.keys, "--send_smtp"],
                    env=smtp_env(smtp))
    assert proc.returncode == 65, proc.stderr
    assert b"loop.eml: 51 Received header fields, more than the hop limit of 50" in proc.stderr
    assert len(smtp.messages) == 1
    lower = dict(smtp_env(smtp), SMIME_HOP_LIMIT="60")
    assert run_tool([str(loop), "--keys", pki.keys, "--send_smtp"], env=lower).returncode == 0
    assert run_tool([str(loop), "--keys", pki.keys, "--sign"]).returncode == 0
