"""Faults on the tool's own side: outputs that cannot be created (73, EX_CANTCREAT) or
written (74, EX_IOERR), journal and archive failures in the middle of a send, a full
standard output, a torn journal line, unreadable inputs, and the ./sparkpostSMIME.py
launcher itself.

"Full" is a real small tmpfs (mounted here, we are root), "read-only" a read-only
tmpfs (root ignores permission bits), never a mock.
"""

import errno
import importlib.util
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import time

import pytest

from support import engines
from support.harness import (ROOT, TESTS, TOOL, inbox, journal, need, run_tool, smtp_env,
                             summary, tool_env)
from support.corpus import CORPUS


PAGE = resource.getpagesize()
AVOCADO = os.path.join(TESTS, "avocado-577k.eml")  # 577 KB: never fits in a 64k tmpfs
FANCY = os.path.join(TESTS, "fancy-HTML-to-smt.eml")
IN_CI = os.environ.get("CI") == "true"
NOT_RECORDED = re.compile(r"^sparkpostSMIME: delivered but not recorded \((.*)\): (\S+)$")


# -- a small file system, full or read-only ------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """Return mount(name, size="64k", ro=False, free=None): a fresh tmpfs at tmp_path/name.

    *free*: leave only that many pages free (the rest taken by a file of zeros named
    "filler").  Every mount is lazily unmounted at teardown, whatever happened.
    """
    mounts = []

    def mount(name="fs", size="64k", ro=False, free=None):
        where = tmp_path / name
        where.mkdir()
        opts = "size=%s%s" % (size, ",ro" if ro else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                              capture_output=True)
        if proc.returncode:
            why = "cannot mount a tmpfs: %s" % proc.stderr.decode(errors="replace").strip()
            if IN_CI:
                pytest.fail(why + " (CI runs as root: it must work)")
            pytest.skip(why)
        mounts.append(where)
        if free is not None:
            fill(where, free)
        return where

    yield mount
    for where in reversed(mounts):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(directory, free_pages):
    """Fill *directory*'s file system with zeros, then give back *free_pages* pages."""
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    size, chunk = 0, b"\0" * PAGE
    try:
        while True:
            size += os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    os.ftruncate(fd, max(0, size - free_pages * PAGE))
    os.close(fd)
    st = os.statvfs(directory)
    assert st.f_bavail * st.f_frsize == free_pages * PAGE  # the fixture does what it says


def leftovers(directory, *expected):
    """Return the names in *directory* other than *expected* and the filler."""
    return sorted(set(os.listdir(directory)) - {"filler"} - set(expected))


def diagnostics(proc):
    """Return the tool's stderr as a list of lines."""
    return proc.stderr.decode(errors="replace").splitlines()


def signed_message(pki, source=FANCY):
    """Return *source* signed by the tool (steve@thetucks.com, opaque)."""
    proc = run_tool([source, "--sign", "--keys", pki.keys])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- outputs: 73 when they cannot be created, 74 when they cannot be written ---------

def ten_megabytes(path):
    """Write a 10 MB message (a base64 attachment of random bytes) to *path*; return it."""
    import base64
    path.write_bytes(b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: big\r\n"
                     b"Content-Type: application/octet-stream\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n"
                     + base64.encodebytes(os.urandom(7_500_000)).replace(b"\n", b"\r\n"))
    return str(path)


@pytest.mark.parametrize("target", ["file", "directory"])
def test_disk_full_in_the_middle_of_a_big_output_leaves_nothing(pki, tmp_path, tmpfs, target):
    """A 10 MB message is written as it is made (issue 29): the disk fills up in the middle
    of it, 74 with one line, and nothing of it is left."""
    source = ten_megabytes(tmp_path / "big.eml")
    where = tmpfs("small", size="4m")
    out = str(where / "out.eml") if target == "file" else str(where)
    proc = run_tool([source, "--keys", pki.keys, "--sign", "--encrypt", "-o", out])
    assert proc.returncode == 74, proc.stderr
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "No space left" in err, err
    assert os.listdir(where) == []


@pytest.mark.parametrize("where", ["missing-directory", "parent-is-a-file", "read-only"])
def test_output_that_cannot_be_created_is_73(pki, tmp_path, tmpfs, where):
    msg = tmp_path / "m.eml"
    msg.write_bytes(CORPUS["plain-ascii"])
    if where == "missing-directory":
        target, look = tmp_path / "no" / "such" / "out.eml", tmp_path
    elif where == "parent-is-a-file":
        (tmp_path / "plainfile").write_bytes(b"I am a file\n")
        target, look = tmp_path / "plainfile" / "out.eml", tmp_path
    else:
        look = tmpfs("ro", ro=True)
        target = look / "out.eml"
    before = sorted(os.listdir(look))
    proc = run_tool([str(msg), "--sign", "--keys", pki.keys, "-o", str(target)])
    assert proc.returncode == 73, proc.stderr
    lines = diagnostics(proc)
    assert len(lines) == 1 and str(target) in lines[0], lines
    assert proc.stdout == b""
    assert sorted(os.listdir(look)) == before  # nothing created, no temporary file
    if where == "parent-is-a-file":
        assert (tmp_path / "plainfile").read_bytes() == b"I am a file\n"


def test_output_on_a_full_disk_is_74_and_leaves_the_old_file(pki, tmp_path, tmpfs):
    """-o FILE on a 64k tmpfs, for a 577k message: 74; the file that was there is intact
    (written through a temporary file, renamed only once complete) and no temporary
    file is left behind."""
    fs = tmpfs("full")
    old = b"From: old@example.com\r\n\r\nthe previous output\r\n"
    (fs / "out.eml").write_bytes(old)
    proc = run_tool([AVOCADO, "--sign", "--keys", pki.keys, "-o", str(fs / "out.eml")])
    assert proc.returncode == 74, proc.stderr
    lines = diagnostics(proc)
    assert len(lines) == 1 and str(fs / "out.eml") in lines[0], lines
    assert (fs / "out.eml").read_bytes() == old
    assert leftovers(fs, "out.eml") == []
    st = os.statvfs(fs)
    assert st.f_bfree == st.f_blocks - 1  # all space given back but out.eml's page


def test_output_directory_on_a_full_disk_keeps_what_fits(pki, tmp_path, tmpfs, openssl):
    """-o DIR with a small message and a big one: the small one is written whole and
    verifies, the big one fails with 74 and leaves nothing."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "a-small.eml").write_bytes(CORPUS["plain-ascii"].replace(
        b"Alice Example <alice@example.com>", b"Steve <steve@thetucks.com>"))
    (d / "b-big.eml").write_bytes(open(AVOCADO, "rb").read())
    fs = tmpfs("outdir")
    proc = run_tool([str(d), "--sign", "--keys", pki.keys, "-o", str(fs)])
    assert proc.returncode == 74, proc.stderr
    assert leftovers(fs) == ["a-small.eml"]
    assert b"Just text." in openssl.verify((fs / "a-small.eml").read_bytes(), pki.cafile)
    assert str(fs / "b-big.eml") in proc.stderr.decode()


#: Run a command with /proc hidden (an empty tmpfs over it, in a mount namespace of its
#: own): the tool cannot name unnamed files through /proc/self/fd and falls back to
#: temporary names.  unshare and sh exec the command: its pid is the process started.
WITHOUT_PROC = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs -o size=4k none /proc && exec "$@"', "sh"]


#: How the tool writes -o DIR files: as is (unnamed files), or with /proc hidden.
FILES = ["unnamed", pytest.param("temporary names (no /proc)", marks=pytest.mark.system)]


def file_batch(tmp_path, files):
    """Return (command prefix, input message, -o DIR) for a -o DIR batch: the prefix is
    WITHOUT_PROC unless *files* is "unnamed"."""
    prefix = []
    if files != "unnamed":
        need("unshare")
        if os.geteuid() != 0:  # mounting over /proc: CI runs as root, and must run this
            if os.environ.get("CI") == "true":
                pytest.fail("hiding /proc needs root, and CI must run every test")
            pytest.skip("hiding /proc needs root")
        prefix = WITHOUT_PROC
    msg, out = tmp_path / "m.eml", tmp_path / "out"
    msg.write_bytes(CORPUS["plain-ascii"])
    out.mkdir()
    return prefix, msg, out


def unnamed_files(pid, directory):
    """Return how many unnamed files (O_TMPFILE) in *directory* process *pid* holds open."""
    count, prefix = 0, os.path.join(str(directory), "#")
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            count += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith(prefix)
        except OSError:  # closed meanwhile
            pass
    return count


@pytest.mark.parametrize("files", FILES)
def test_killed_in_the_middle_of_a_file_batch(pki, tmp_path, openssl, files):
    """kill -9 while -o DIR writes a batch (files are made durable in groups, one sync per
    group, named only after it): every file under its own name is whole and decrypts and
    verifies, and every journal row names such a file.  The files of the group in
    progress are unnamed: no other name ever appears in DIR, during the run or after the
    kill.  Where /proc is missing the tool falls back to hidden temporary names
    (.NAME.RANDOM), and only those are left of the group in progress."""
    prefix, msg, out = file_batch(tmp_path, files)
    fallback, results = bool(prefix), tmp_path / "results.jsonl"
    proc = subprocess.Popen(prefix + [
        sys.executable, TOOL, str(msg), "--sign", "--encrypt", "--keys", pki.keys, "--repeat",
        "3000", "-o", str(out), "--results", str(results)], env=tool_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, deadline = set(), time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        names = os.listdir(out)  # wait for a group committed and the next one under way
        seen.update(names)
        in_progress = (any(n.startswith(".") for n in names) if fallback
                       else unnamed_files(proc.pid, out) > 0)
        if in_progress and any(n[0] != "." for n in names):
            break
    proc.kill()
    assert proc.wait() == -9, proc.stderr.read()
    names = os.listdir(out)
    final = sorted((n for n in names if not n.startswith(".")),
                   key=lambda n: int(n.split(".")[1]))
    temporary = [n for n in names if n.startswith(".")]
    assert final and all(re.fullmatch(r"m\.\d+\.eml", n) for n in final), names
    if fallback:
        assert temporary and all(re.fullmatch(r"\.m\.\d+\.eml\.[0-9a-f]{12}", n)
                                 for n in temporary), names
    else:
        assert temporary == [] and not any(n.startswith(".") for n in seen), seen
    # the same message each time: every whole output has the same size
    assert len({(out / n).stat().st_size for n in final}) == 1
    with open(results) as fh:
        rows = [json.loads(line) for line in fh]  # a row is one write: none torn by a kill
    claimed = {"m.%d.eml" % row.get("copy", 0) for row in rows}
    assert all(row["status"] == "written" for row in rows)
    assert claimed <= set(final)  # the journal claims only files already on disk
    bob = pki.cert_path("bob@example.org"), pki.key_path("bob@example.org")
    for name in {final[0], final[-1]} | set(sorted(claimed)[-1:]):
        inner = openssl.decrypt((out / name).read_bytes(), *bob)
        assert b"Just text." in openssl.verify(inner, pki.cafile)


def test_file_batch_under_a_low_open_files_limit(pki, tmp_path, openssl):
    """Each unnamed file of a group stays open until the group's commit: under a soft
    RLIMIT_NOFILE of 48 (a group of 256 would need five times that) the tool commits
    smaller groups, and all 300 files are written, whole, with no other name in DIR."""
    _, msg, out = file_batch(tmp_path, "unnamed")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proc = run_tool([str(msg), "--sign", "--keys", pki.keys, "--repeat", "300", "-o",
                     str(out)], preexec=lambda: resource.setrlimit(
                         resource.RLIMIT_NOFILE, (48, hard)))
    assert proc.returncode == 0, proc.stderr
    assert "Summary: 300 written, 0 failed" in proc.stderr.decode()
    assert sorted(os.listdir(out)) == sorted("m.%d.eml" % n for n in range(300))
    assert len({(out / n).stat().st_size for n in os.listdir(out)}) == 1
    assert b"Just text." in openssl.verify((out / "m.299.eml").read_bytes(), pki.cafile)


@pytest.mark.parametrize("files", FILES)
def test_file_batch_replaces_existing_outputs(pki, tmp_path, openssl, files):
    """An output whose name exists is replaced, atomically, as rename(2) replaces it: a
    file gets the new content (its old inode is untouched, a reader holding it keeps the
    old bytes), a symbolic link is replaced by the file (never written through), and a
    directory of that name fails its group with 73; no temporary name is left behind."""
    prefix, msg, out = file_batch(tmp_path, files)
    victim = tmp_path / "victim"
    victim.write_bytes(b"not to be overwritten\n")
    old = b"From: old@example.com\r\n\r\nthe previous output\r\n"
    (out / "m.0.eml").write_bytes(old)
    os.link(out / "m.0.eml", tmp_path / "old-link")
    os.symlink(victim, out / "m.1.eml")
    command = [sys.executable, TOOL, str(msg), "--sign", "--keys", pki.keys, "--repeat", "3",
               "-o", str(out)]
    proc = subprocess.run(prefix + command, env=tool_env(), capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["m.0.eml", "m.1.eml", "m.2.eml"]
    assert (tmp_path / "old-link").read_bytes() == old
    assert victim.read_bytes() == b"not to be overwritten\n"
    assert not os.path.islink(out / "m.1.eml")
    for n in range(3):
        assert b"Just text." in openssl.verify((out / ("m.%d.eml" % n)).read_bytes(),
                                               pki.cafile)
    (out / "m.2.eml").unlink()
    (out / "m.2.eml").mkdir()
    proc = subprocess.run(prefix + command, env=tool_env(), capture_output=True)
    assert proc.returncode == 73, proc.stderr
    assert "m.2.eml: cannot write: Is a directory" in proc.stderr.decode()
    assert sorted(os.listdir(out)) == ["m.0.eml", "m.1.eml", "m.2.eml"]
    assert os.listdir(out / "m.2.eml") == []


def sending_400(smtp, pki, tmp_path, jobs):
    """Start a batch of 400 messages with --results in its own process group; return
    (process, journal path, command) once the server has 150 of them."""
    smtp.handler.delay = 0.005
    results = tmp_path / "results.jsonl"
    command = [sys.executable, TOOL, str(inbox(tmp_path, 400)), "--keys", pki.keys,
               "--send_smtp", "--results", str(results), "--jobs", jobs]
    proc = subprocess.Popen(command, env=tool_env(smtp_env(smtp)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline and len(smtp.messages) < 150:
        time.sleep(0.01)
    return proc, results, command


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_killed_in_the_middle_of_a_send(smtp, pki, tmp_path, jobs):
    """kill -9 (the whole process group) while a batch sends with --results: every row
    is whole and names a message the server got, at most one delivered message per
    worker has no row (each row is on disk before the next message goes), and every
    message reported on standard output has its row: a report line comes only after
    its row is on disk."""
    proc, results, _ = sending_400(smtp, pki, tmp_path, jobs)
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -9
    received = delivered_numbers(smtp)
    assert 150 <= len(received) < 400
    with open(results) as fh:
        rows = [json.loads(line) for line in fh]  # a group is one write: none torn by a kill
    journaled = [number(r["input"]) for r in rows]
    assert all(r["status"] == "sent" for r in rows) and set(journaled) <= set(received)
    assert len(set(received) - set(journaled)) <= int(jobs), sorted(set(received) - set(journaled))
    reported = [number(line.split("\t")[0][len("Sending "):])
                for line in out.decode().splitlines() if line.startswith("Sending ")]
    assert reported and set(reported) <= set(journaled)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_sigterm_to_the_process_group_then_resume_sends_each_message_once(smtp, pki,
                                                                         tmp_path, jobs):
    """SIGTERM to the whole process group (a service manager's stop, kill -- -PGID) in
    the middle of a batch whose journal rows are committed in groups: the messages in
    flight finish, every delivered message has its row, and --resume sends exactly the
    others: 400 messages delivered once each."""
    proc, results, command = sending_400(smtp, pki, tmp_path, jobs)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err
    assert b"SIGTERM: finishing the messages in flight (SIGTERM or Ctrl-C again" in err, err
    first = delivered_numbers(smtp)
    assert 150 <= len(first) < 400
    assert sorted(number(r["input"]) for r in journal(results)) == first
    resumed = run_tool(command[2:] + ["--resume"], env=smtp_env(smtp))
    assert resumed.returncode == 0, resumed.stderr
    assert delivered_numbers(smtp) == list(range(400))  # each once: no duplicate


def test_verify_output_on_a_full_disk(pki, tmp_path, tmpfs):
    """--verify -o FILE: the message passes, but the recovered copy does not fit: 74,
    the old file intact, nothing partial."""
    signed = tmp_path / "signed.eml"
    signed.write_bytes(signed_message(pki, AVOCADO))
    fs = tmpfs("verified")
    (fs / "out.eml").write_bytes(b"old\r\n")
    proc = run_tool(["--verify", str(signed), "--ca", pki.cafile, "--keys", pki.private,
                     "-o", str(fs / "out.eml")])
    assert proc.returncode == 74, proc.stderr
    assert proc.stdout.decode().startswith("OK - signed by steve@thetucks.com")
    assert str(fs / "out.eml") in proc.stderr.decode()
    assert (fs / "out.eml").read_bytes() == b"old\r\n"
    assert leftovers(fs, "out.eml") == []
    # the same command with room to write: 0 and the whole message
    roomy = tmp_path / "roomy.eml"
    proc = run_tool(["--verify", str(signed), "--ca", pki.cafile, "--keys", pki.private,
                     "-o", str(roomy)])
    assert proc.returncode == 0, proc.stderr
    assert roomy.stat().st_size > 500 * 1024


@pytest.mark.parametrize("fault,code", [("full", 74), ("read-only", 73)])
def test_harvest_into_a_key_directory_that_cannot_take_it(pki, tmp_path, tmpfs, fault, code):
    signed = tmp_path / "signed.eml"
    signed.write_bytes(signed_message(pki))
    keys = tmpfs("keys", free=0) if fault == "full" else tmpfs("keys", ro=True)
    proc = run_tool(["--harvest", str(signed), "--keys", str(keys), "--keys", pki.keys,
                     "--ca", pki.cafile])
    assert proc.returncode == code, proc.stderr
    assert b"saved" not in proc.stdout
    assert str(keys / "steve@thetucks.com.crt") in proc.stderr.decode()
    assert leftovers(keys) == []  # neither the .crt nor a temporary file
    # with room, the same harvest saves it
    roomy = tmp_path / "roomy"
    proc = run_tool(["--harvest", str(signed), "--keys", str(roomy), "--keys", pki.keys,
                     "--ca", pki.cafile])
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(roomy) == ["steve@thetucks.com.crt"]


# -- standard output on a full device ----------------------------------------------------

@pytest.mark.parametrize("what", ["build", "verify-report", "version", "help"])
def test_stdout_on_a_full_device(pki, tmp_path, what):
    signed = tmp_path / "signed.eml"
    if what == "build":
        args = [FANCY, "--sign", "--keys", pki.keys]
    elif what == "verify-report":
        signed.write_bytes(signed_message(pki))
        args = ["--verify", str(signed), "--ca", pki.cafile, "--keys", pki.private]
    else:
        args = ["--" + what]
    to_full_stdout(args, tool_env())


def to_full_stdout(args, env):
    """Run the tool with standard output on /dev/full: exit 74 and one line naming it."""
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, TOOL] + args, stdout=full,
                              stderr=subprocess.PIPE, env=env, cwd=ROOT, timeout=60)
    engines.OUTPUTS.append(proc.stderr)
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode == 74, err
    lines = err.splitlines()
    assert len(lines) == 1 and "standard output" in lines[0], lines


def test_stdout_full_during_a_send(smtp, pki, tmp_path):
    """The report lines of a send cannot be written: 74, one line naming standard
    output, and every message the server received is in the journal as sent."""
    results = tmp_path / "results.jsonl"
    to_full_stdout([str(inbox(tmp_path, 5)), "--keys", pki.keys, "--send_smtp", "--results",
                    str(results)], tool_env(smtp_env(smtp)))
    rows = journal(results) if results.exists() else []
    assert len(smtp.messages) == len([r for r in rows if r["status"] == "sent"])
    assert len(smtp.messages) < 5  # it stopped


# -- the journal and the archive failing in the middle of a send -----------------------

def not_recorded(proc):
    """Return [(reason, source)] of the messages named as delivered but not recorded."""
    return [m.groups() for m in map(NOT_RECORDED.match, diagnostics(proc)) if m]


def journal_rows(path):
    """Every row of journal *path*: each line is JSON, the file ends with a newline (a row
    that could not be written whole was cut back, not left half written)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert text.endswith("\n"), text[-200:]
    return [json.loads(line) for line in text.splitlines()]


def delivered_numbers(srv):
    return sorted(int(re.search(rb"Message (\d+)\.", m[2]).group(1)) for m in srv.messages)


def number(path):
    return int(re.search(r"m(\d{3})\.eml$", path).group(1))


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_journal_fills_up_during_a_send(smtp, pki, tmp_path, tmpfs, jobs):
    """--results on a file system with eight pages free: each row is committed before
    the next message goes, and after some 150 rows the journal cannot grow; the tool
    stops, exits 74 and names every message delivered but not journaled (one per
    worker at most), so that server == journal + named, message by message."""
    total = 150
    d = inbox(tmp_path, total)
    results = tmpfs("journal", free=8) / "results.jsonl"
    proc = run_tool([str(d), "--keys", pki.keys, "--send_smtp", "--results", str(results),
                     "--jobs", jobs], env=smtp_env(smtp))
    assert proc.returncode == 74, proc.stderr
    err = proc.stderr.decode()
    assert "--results %s: cannot write" % results in err and "stopping" in err, err
    rows = journal_rows(results)
    sent_rows = [number(r["input"]) for r in rows if r["status"] == "sent"]
    named = not_recorded(proc)
    assert all(reason.startswith("--results %s" % results) for reason, _ in named), named
    named = [number(source) for _, source in named]
    received = delivered_numbers(smtp)
    assert 5 <= len(sent_rows) < total  # the journal took some rows, then was full
    assert named, err  # at least the message whose row could not be written
    assert sorted(sent_rows + named) == received  # each delivered message accounted once
    # it stopped at the failed commit: per worker, at most the message whose row failed
    assert len(named) <= int(jobs), named
    sent, failed, left = summary(proc)
    assert left > 0 and sent + failed + left == total
    assert sent == len(received)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_archive_fills_up_during_a_send(smtp, pki, tmp_path, tmpfs, jobs):
    """--archive on a file system with four pages free (a page per message): the fifth
    store fails; the tool stops at once, exits 74, names what was delivered but not
    archived, and leaves nothing in the Maildir's tmp/."""
    total = 40
    d = inbox(tmp_path, total)
    archive = tmpfs("archive", free=4) / "maildir"
    results = tmp_path / "results.jsonl"  # on a disk with room
    proc = run_tool([str(d), "--keys", pki.keys, "--send_smtp", "--results", str(results),
                     "--archive", str(archive), "--jobs", jobs], env=smtp_env(smtp))
    assert proc.returncode == 74, proc.stderr
    err = proc.stderr.decode()
    assert "--archive %s: cannot store a message" % archive in err and "stopping" in err, err
    assert os.listdir(archive / "tmp") == []  # the partial file was removed
    kept = sorted(os.listdir(archive / "new"))
    assert len(kept) == 4
    rows = journal(results)
    sent_rows = [number(r["input"]) for r in rows if r["status"] == "sent"]
    named = [number(source) for _, source in not_recorded(proc)]
    received = delivered_numbers(smtp)
    assert named
    assert sorted(sent_rows + named) == received
    assert len(received) <= len(sent_rows) + int(jobs)  # it stopped at once: one in flight
    # every journaled message is archived: the exact bytes the server received
    archived = sorted((archive / "new" / name).read_bytes() for name in kept)
    by_number = {int(re.search(rb"Message (\d+)\.", m[2]).group(1)): m[2]
                 for m in smtp.messages}
    assert archived == sorted(by_number[n] for n in sent_rows)


@pytest.mark.parametrize("option", ["--results", "--archive"])
def test_journal_or_archive_that_cannot_be_created_sends_nothing(smtp, pki, tmp_path,
                                                                 option):
    (tmp_path / "plainfile").write_bytes(b"not a directory\n")
    where = tmp_path / "plainfile" / "below"
    proc = run_tool([str(inbox(tmp_path, 3)), "--keys", pki.keys, "--send_smtp",
                     option, str(where)], env=smtp_env(smtp))
    assert proc.returncode == 73, proc.stderr
    assert smtp.messages == []
    assert "%s %s" % (option, where) in proc.stderr.decode()


# -- resume after a crash mid-line --------------------------------------------------------

def test_resume_tolerates_a_torn_last_line(smtp, pki, tmp_path):
    d = inbox(tmp_path, 5)
    results = tmp_path / "results.jsonl"
    proc = run_tool([str(d / "m000.eml"), str(d / "m002.eml"), "--keys", pki.keys,
                     "--send_smtp", "--results", str(results)], env=smtp_env(smtp))
    assert proc.returncode == 0, proc.stderr
    # a crash in the middle of m003's row: it says "sent" but is not a record of it
    torn = '{"attempts": 1, "input": "%s", "status": "sent", "reply": "250 2.0.0 Ok: q' % (
        d / "m003.eml")
    with open(results, "a") as fh:
        fh.write(torn)
    proc = run_tool([str(d), "--keys", pki.keys, "--send_smtp", "--results", str(results),
                     "--resume"], env=smtp_env(smtp))
    assert proc.returncode == 0, proc.stderr
    assert "2 message(s) already sent" in proc.stderr.decode()
    assert delivered_numbers(smtp) == [0, 1, 2, 3, 4]  # each once: only m001, m003, m004 again
    assert summary(proc)[:2] == [3, 0]
    lines = results.read_text().split("\n")
    assert lines[-1] == ""  # every row ends its line
    assert lines[2] == torn  # the torn line is left as it was, on its own
    rows = [json.loads(line) for i, line in enumerate(lines[:-1]) if i != 2]
    assert [(number(r["input"]), r["status"]) for r in rows] == [
        (0, "sent"), (2, "sent"), (1, "sent"), (3, "sent"), (4, "sent")]
    # and once more: nothing is left to send
    proc = run_tool([str(d), "--keys", pki.keys, "--send_smtp", "--results", str(results),
                     "--resume"], env=smtp_env(smtp))
    assert proc.returncode == 0, proc.stderr
    assert "5 message(s) already sent" in proc.stderr.decode()
    assert len(smtp.messages) == 5


# -- inputs that cannot be read, as root ---------------------------------------------

@pytest.mark.parametrize("mode", ["sign", "sign-o-dir", "verify"])
@pytest.mark.parametrize("kind", ["directory", "dangling-symlink"])
def test_unreadable_input_is_66(pki, tmp_path, kind, mode):
    """Root reads any file whatever its mode bits: an input that cannot be read is a
    directory named x.eml (holding no message) or a symlink to nothing."""
    if kind == "directory":
        path = tmp_path / "x.eml"
        path.mkdir()
    else:
        path = tmp_path / "y.eml"
        os.symlink(str(tmp_path / "gone.eml"), str(path))
    out = tmp_path / "out"
    out.mkdir()
    args = {"sign": ["--sign", "--keys", pki.keys],
            "sign-o-dir": ["--sign", "--keys", pki.keys, "-o", str(out)],
            "verify": ["--verify", "--keys", pki.private, "--ca", pki.cafile]}[mode]
    proc = run_tool([str(path)] + args)
    assert proc.returncode == 66, proc.stderr
    lines = diagnostics(proc)
    assert len(lines) == 1 and str(path) in lines[0], lines
    report = proc.stdout.decode().splitlines()
    assert report == [] or (mode == "verify" and len(report) == 1 and
                            report[0].startswith("FAILED") and str(path) in report[0]), report
    assert os.listdir(out) == []


# -- the launcher: ./sparkpostSMIME.py is a shell script too ----------------------------

def test_launcher_runs_the_same_tool(pki, openssl):
    env = tool_env({"SPARKPOST_SMIME_PYTHON": sys.executable, "PYTHONDONTWRITEBYTECODE": "1"})
    env.pop("PYTHONPYCACHEPREFIX", None)
    compiled = importlib.util.cache_from_source(TOOL)
    if os.path.exists(compiled):
        os.unlink(compiled)

    def launch(args):
        proc = subprocess.run(["./sparkpostSMIME.py"] + args, env=env, cwd=ROOT,
                              capture_output=True, timeout=120)
        engines.OUTPUTS.append(proc.stdout + proc.stderr)
        assert b"Traceback" not in proc.stderr, proc.stderr
        return proc

    version = launch(["--version"])
    plain = run_tool(["--version"])
    assert version.returncode == plain.returncode == 0, version.stderr
    assert version.stdout == plain.stdout and version.stdout.startswith(b"sparkpostSMIME.py ")

    args = [FANCY, "--sign", "--keys", pki.keys]
    launched, plain = launch(args), run_tool(args)
    assert launched.returncode == plain.returncode == 0, launched.stderr
    assert openssl.verify(launched.stdout, pki.cafile) == openssl.verify(plain.stdout,
                                                                         pki.cafile)
    # the launcher left a compiled copy of this very source (PYTHONDONTWRITEBYTECODE or not)
    assert os.path.exists(compiled), os.listdir(os.path.dirname(compiled))
    with open(compiled, "rb") as fh:
        header = fh.read(16)
    st = os.stat(TOOL)
    assert header[:4] == importlib.util.MAGIC_NUMBER
    flags, mtime, size = struct.unpack("<III", header[4:16])
    assert flags == 0 and mtime == int(st.st_mtime) & 0xFFFFFFFF and size == st.st_size
