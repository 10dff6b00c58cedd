"""--send_smtp against real aiosmtpd servers on loopback: TLS, AUTH, refusals, reports."""

import json
import os
import re
from email.utils import formatdate

import pytest

from support import engines
from support.harness import run_tool, send
from support.corpus import CORPUS
from support.servers import SilentServer, SmtpServer, free_port

USER = "SMTP_Injection"
PASSWORD = engines.plant_secret("s3cret-SMTP-pw-TEST-only")
MSG = CORPUS["many-recipients"]  # alice -> bob, carol; Cc erin; Bcc dave
RCPTS = ["bob@example.org", "carol@example.net", "erin@example.org", "dave@example.com"]
SMTP = ["--send_smtp", "--retry_delay", "0.01"]


@pytest.fixture
def server(tls_ctx):
    with SmtpServer(tls_ctx, users={USER: PASSWORD}) as srv:
        yield srv


def env_for(srv, pki, **extra):
    env = {"SMTP_HOST": "localhost", "SMTP_PORT": str(srv.port), "SMTP_USER": USER,
           "SMTP_PASSWORD": PASSWORD, "SMTP_CAFILE": pki.cafile, "SMTP_TIMEOUT": "10"}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def lines(proc):
    return proc.stdout.decode().splitlines()


def test_starttls_auth_send_report_and_envelope(server, pki, tmp_path, openssl):
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"], env_for(server, pki))
    assert proc.returncode == 0, proc.stderr
    out = lines(proc)
    assert out[0] == ('Opened SMTP connection (STARTTLS) to localhost, port %d, '
                      'user="SMTP_Injection", password="***"' % server.port)
    assert out[1] == "Sending %s\tFrom: alice@example.com\tTo: %s" % (tmp_path / "msg.eml",
                                                                      ", ".join(RCPTS))
    assert re.fullmatch(r"OK - in \d+\.\d{3} seconds", out[2])
    assert len(out) == 3
    # the corpus Date (2 November) is stale: the only line on stderr says it was replaced
    assert proc.stderr.startswith(b"sparkpostSMIME: Date replaced by the signing time in 1 "
                                  b"message:") and proc.stderr.count(b"\n") == 1, proc.stderr
    (mail_from, rcpts, data), = server.messages
    assert mail_from == "alice@example.com" and sorted(rcpts) == sorted(RCPTS)
    assert server.handler.auth_seen and server.handler.auth_seen[0][1] == USER
    engines.check_transport_safe(data)
    assert not re.search(rb"(?im)^bcc:", data)
    for who in RCPTS + ["alice@example.com"]:
        signed = openssl.decrypt(data, pki.cert_path(who), pki.key_path(who))
        assert b"Hi all." in openssl.verify(signed, pki.cafile)


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
def test_auth_mechanisms_and_redacted_transcript(tls_ctx, pki, tmp_path, mechanism):
    other = {"LOGIN": ["PLAIN"], "PLAIN": ["LOGIN"]}[mechanism]
    with SmtpServer(tls_ctx, users={USER: PASSWORD}, exclude_mechanisms=other) as srv:
        proc = send(pki, tmp_path, MSG, SMTP + ["--sign_detached", "-v"], env_for(srv, pki))
    assert proc.returncode == 0, proc.stderr
    assert srv.handler.auth_seen == [(mechanism, USER)]
    err = proc.stderr.decode()
    assert "-> ehlo" in err.lower() and "~> STARTTLS" not in err  # STARTTLS is sent in clear
    assert "-> STARTTLS" in err and "<~ 250" in err
    assert "~> AUTH %s" % mechanism in err
    assert "<~ 235" in err and "octets of message data" in err
    assert PASSWORD not in err  # the session-wide scan also checks base64 forms
    assert proc.stdout.decode().startswith("Opened SMTP connection (STARTTLS)")


def test_implicit_tls(tls_ctx, pki, tmp_path):
    # aiosmtpd only counts STARTTLS as TLS for AUTH; this connection is TLS from the start
    with SmtpServer(tls_ctx, implicit_tls=True, users={USER: PASSWORD},
                    auth_require_tls=False) as srv:
        proc = send(pki, tmp_path, MSG, SMTP + ["--encrypt"], env_for(srv, pki, SMTP_TLS="tls"))
    assert proc.returncode == 0, proc.stderr
    assert "Opened SMTP connection (TLS) to localhost" in proc.stdout.decode()
    assert len(srv.messages) == 1


def test_plain_internal_mta_without_credentials(pki, tmp_path):
    with SmtpServer() as srv:
        proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"],
                    env_for(srv, pki, SMTP_USER=None, SMTP_PASSWORD=None, SMTP_HOST="127.0.0.1"))
    assert proc.returncode == 0, proc.stderr
    assert lines(proc)[0] == "Opened SMTP connection (plain) to 127.0.0.1, port %d" % srv.port
    assert len(srv.messages) == 1


def test_credentials_never_sent_in_clear(pki, tmp_path):
    with SmtpServer(users={USER: PASSWORD}, auth_require_tls=False) as srv:  # offers AUTH in clear
        proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"], env_for(srv, pki))
    assert proc.returncode == 78
    assert "refusing to send SMTP_USER/SMTP_PASSWORD over an unencrypted" in proc.stderr.decode()
    assert srv.handler.auth_seen == [] and srv.messages == []


def test_untrusted_certificate_refused_then_verify_off(server, pki, tmp_path):
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"],
                env_for(server, pki, SMTP_CAFILE=None))
    assert proc.returncode == 78
    assert "TLS certificate of localhost:%d not trusted" % server.port in proc.stderr.decode()
    assert server.messages == [] and server.handler.auth_seen == []
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"],
                env_for(server, pki, SMTP_CAFILE=None, SMTP_TLS_VERIFY="0"))
    assert proc.returncode == 0
    assert "verification is OFF" in proc.stderr.decode()


def test_partial_refusal_names_each_side(server, pki, tmp_path):
    server.handler.refuse = {"carol@example.net": "550 5.7.1 relaying denied"}
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"], env_for(server, pki))
    assert proc.returncode == 69
    err = proc.stderr.decode()
    assert "refused carol@example.net: 550 5.7.1 relaying denied" in err
    assert "hint: " in err
    out = lines(proc)[-1]
    assert out.startswith("PARTIAL - in ")
    assert "accepted bob@example.org, erin@example.org, dave@example.com" in out
    assert out.endswith("refused carol@example.net")
    assert len(server.messages) == 1


def test_all_refused_temporary_and_permanent(server, pki, tmp_path):
    server.handler.refuse = {a: "451 4.3.0 try again later" for a in RCPTS}
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"], env_for(server, pki))
    assert proc.returncode == 75
    assert proc.stderr.decode().count("451 4.3.0 try again later") == 4
    assert lines(proc)[-1].startswith("FAILED - in ")
    server.handler.refuse = {a: "550 5.7.1 relaying denied" for a in RCPTS}
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"], env_for(server, pki))
    assert proc.returncode == 69 and server.messages == []


def test_bad_password_exit_77(server, pki, tmp_path):
    engines.plant_secret("wrong-password-TEST")
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"],
                env_for(server, pki, SMTP_PASSWORD="wrong-password-TEST"))
    assert proc.returncode == 77
    err = proc.stderr.decode()
    assert "authentication refused by localhost:%d: 535" % server.port in err
    assert "hint: check SMTP_USER and SMTP_PASSWORD" in err
    assert server.messages == []


def test_starttls_required_but_not_offered(pki, tmp_path):
    with SmtpServer() as srv:
        proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"],
                    env_for(srv, pki, SMTP_USER=None, SMTP_PASSWORD=None, SMTP_TLS="starttls"))
    assert proc.returncode == 78 and "does not offer STARTTLS" in proc.stderr.decode()


def test_connection_refused_and_silent_server(pki, tmp_path):
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"],
                {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(free_port())})
    assert proc.returncode == 75 and "cannot connect to 127.0.0.1" in proc.stderr.decode()
    with SilentServer() as silent:
        proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"],
                    {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(silent.port), "SMTP_TIMEOUT": "1"})
    assert proc.returncode == 75
    assert "no answer from 127.0.0.1:%d within 1 seconds" % silent.port in proc.stderr.decode()


@pytest.mark.parametrize("env,words", [
    ({"SMTP_HOST": None}, "SMTP_HOST is not set"),
    ({"SMTP_PORT": "abc"}, "SMTP_PORT='abc' is not a valid number"),
    ({"SMTP_PORT": "70000"}, "SMTP_PORT='70000'"),
    ({"SMTP_TLS": "maybe"}, "SMTP_TLS='maybe'"),
    ({"SMTP_PASSWORD": None}, "SMTP_PASSWORD is not set"),
    ({"SMTP_TLS_VERIFY": "perhaps"}, "SMTP_TLS_VERIFY"),
    ({"SMTP_TIMEOUT": "-1"}, "SMTP_TIMEOUT"),
    ({"SMTP_CAFILE": "/nonexistent/ca.pem"}, "SMTP_CAFILE=/nonexistent/ca.pem"),
])
def test_bad_settings_exit_78(server, pki, tmp_path, env, words):
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt"], env_for(server, pki, **env))
    assert proc.returncode == 78, proc.stderr
    assert words in proc.stderr.decode() and proc.stderr.decode().count("\n") == 1
    assert server.messages == []


def test_sparkpost_header_outside_the_signature(server, pki, tmp_path, openssl):
    env = env_for(server, pki, SMTP_SPARKPOST="1")
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign_detached", "--campaign", "spring"], env)
    assert proc.returncode == 0, proc.stderr
    data = server.messages[-1][2]
    head, _ = data.split(b"\r\n\r\n", 1)
    value = re.search(rb"(?m)^X-MSYS-API: (.*)\r$", head).group(1)
    assert json.loads(value) == {"options": {"open_tracking": False, "click_tracking": False,
                                             "transactional": True}, "campaign_id": "spring"}
    content = openssl.verify(data, pki.cafile)
    assert b"X-MSYS-API" not in content
    proc = send(pki, tmp_path, MSG, SMTP + ["--track"], env)
    assert proc.returncode == 0
    head = server.messages[-1][2].split(b"\r\n\r\n", 1)[0]
    assert b'"open_tracking":true,"click_tracking":true,"transactional":false' in head
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign"],
                env_for(server, pki))  # not a SparkPost host
    assert b"X-MSYS-API" not in server.messages[-1][2]


def test_track_with_signing_is_a_usage_error(server, pki, tmp_path):
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--track"], env_for(server, pki))
    assert proc.returncode == 64 and "breaks signatures" in proc.stderr.decode()


def test_extra_headers_and_mail_from(server, pki, tmp_path, openssl):
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--header", "X-Virtual-MTA: vmta-pool-1",
                                            "--header", "X-Binding: bulk",
                                            "--mail_from", "bounces@bounce.example.com"],
                env_for(server, pki))
    assert proc.returncode == 0, proc.stderr
    mail_from, _, data = server.messages[-1]
    assert mail_from == "bounces@bounce.example.com"
    head = data.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nX-Virtual-MTA: vmta-pool-1\r\nX-Binding: bulk\r\nMIME-Version: 1.0\r\n" in head
    assert b"X-Virtual-MTA" not in openssl.verify(data, pki.cafile)
    bad = send(pki, tmp_path, MSG, SMTP + ["--header", "no colon here"], env_for(server, pki))
    assert bad.returncode == 64


def test_dry_run_connects_to_nothing(server, pki, tmp_path):
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "--encrypt", "--dry_run"],
                env_for(server, pki))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "Dry run, nothing is sent" in out
    assert 'user="SMTP_Injection", password="***"' in out
    for rcpt in RCPTS:
        assert "RCPT TO:<%s>" % rcpt in out
    assert "MAIL FROM:<alice@example.com>" in out and "octets" in out
    assert server.messages == [] and server.handler.auth_seen == []


def test_env_file_and_real_environment_wins(server, pki, tmp_path):
    envfile = tmp_path / "my_envs.sh"
    envfile.write_text("# settings\nexport SMTP_HOST=localhost\nexport SMTP_PORT=%d\n"
                       "export SMTP_USER=%s\nexport SMTP_PASSWORD='%s'\nSMTP_CAFILE=%s\n"
                       % (server.port, USER, PASSWORD, pki.cafile))
    os.chmod(envfile, 0o644)
    path = tmp_path / "msg.eml"
    path.write_bytes(MSG)
    args = [str(path), "--keys", pki.keys, "--send_smtp", "--retries", "0", "--env", str(envfile)]
    proc = run_tool(args)
    assert proc.returncode == 0, proc.stderr
    assert "readable by group or others: chmod 0600" in proc.stderr.decode()
    os.chmod(envfile, 0o600)
    proc = run_tool(args, env={"SMTP_PORT": str(free_port())})  # the environment wins
    assert proc.returncode == 75 and proc.stderr.decode().count("readable") == 0
    proc = run_tool(args[:-1] + [str(tmp_path / "missing.sh")])
    assert proc.returncode == 78 and "missing.sh" in proc.stderr.decode()
    proc = run_tool([str(path), "--keys", pki.keys, "--send_smtp"], cwd=str(tmp_path),
                    env={"SMTP_PORT": str(server.port)})
    assert proc.returncode == 78  # no .env there yet
    (tmp_path / ".env").write_bytes(envfile.read_bytes())
    os.chmod(tmp_path / ".env", 0o600)
    proc = run_tool([str(path), "--keys", pki.keys, "--send_smtp"], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr


def test_several_messages_one_connection(server, pki, tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / ("m%d.eml" % i)
        p.write_bytes(MSG)
        paths.append(str(p))
    proc = run_tool(paths + ["--keys", pki.keys, "--send_smtp", "--sign"],
                    env=env_for(server, pki))
    assert proc.returncode == 0, proc.stderr
    out = lines(proc)
    assert sum(line.startswith("Opened SMTP connection") for line in out) == 1
    assert sum(line.startswith("OK - in") for line in out) == 3
    assert out[-1].startswith("Summary: 3 sent, 0 failed in ")
    assert len(server.messages) == 3 and len(server.handler.auth_seen) == 1


def test_no_secret_in_output_journal_or_archive(server, pki, tmp_path):
    """Password, its base64 forms and the AUTH PLAIN blob appear nowhere we write."""
    import base64
    blob = base64.b64encode(("\0%s\0%s" % (USER, PASSWORD)).encode()).decode()
    engines.plant_secret(blob)
    results, archive = tmp_path / "results.jsonl", tmp_path / "archive"
    proc = send(pki, tmp_path, MSG, SMTP + ["--sign", "-v", "--results", str(results),
                                            "--archive", str(archive)], env_for(server, pki))
    assert proc.returncode == 0, proc.stderr
    written = [proc.stdout, proc.stderr, results.read_bytes()]
    written += [(archive / "new" / n).read_bytes() for n in os.listdir(archive / "new")]
    assert len(written) == 4
    for data in written:
        for secret in engines.SECRETS:
            assert secret not in data


def test_exposed_private_key_warns(server, pki, tmp_path):
    import shutil
    keys = tmp_path / "keys"
    shutil.copytree(pki.keys, keys)
    os.chmod(keys / "alice@example.com.pem", 0o644)
    path = tmp_path / "m.eml"  # dated now: no Date note on stderr either
    path.write_bytes(MSG.replace(b"Mon, 02 Nov 2026 10:00:00 +0000",
                                 formatdate(localtime=True).encode()))
    proc = run_tool([str(path), "--keys", str(keys), "--sign"])
    assert proc.returncode == 0
    assert b"private key file" in proc.stderr and b"chmod 0600" in proc.stderr
    os.chmod(keys / "alice@example.com.pem", 0o600)
    proc = run_tool([str(path), "--keys", str(keys), "--sign"])
    assert proc.stderr == b""


def test_reconnect_never_inherits_tls_state(server, pki):
    """A session renewed on a connection without STARTTLS must not send credentials."""
    import sparkpostSMIME as tool
    with SmtpServer(users={USER: PASSWORD}, auth_require_tls=False) as plain:
        smtp = tool.SmtpSettings("localhost", server.port, USER, PASSWORD,
                                 cafile=pki.cafile, timeout=10)
        settings = tool.Settings(inputs=("x.eml",), send="smtp", smtp=smtp)
        backend = tool.SmtpBackend(settings, tool.Reporter())
        assert backend.open().startswith("Opened SMTP connection (STARTTLS)")
        backend.close()
        backend.settings = settings._replace(smtp=smtp._replace(port=plain.port))
        with pytest.raises(tool.ConfigError, match="unencrypted"):
            backend.open()
        assert plain.handler.auth_seen == []
