"""Settings and start-up: env files (my_envs.sh.example), paths with ~ and $HOME, the
dependencies checked before a run starts, --dry_run's checks."""

import os
import re
import shutil
import socket
import sys

import pytest

from support.corpus import CORPUS
from support.harness import ROOT, run_tool
from support.servers import SmtpServer

EXAMPLE = os.path.join(ROOT, "my_envs.sh.example")


def uncommented_example(tmp_path, **values):
    """my_envs.sh.example with every commented assignment switched on, then *values*
    replacing those settings; return the file's path."""
    lines = []
    for line in open(EXAMPLE).read().splitlines():
        match = re.match(r"#\s*((?:export\s+)?[A-Z_]+=.*)$", line)
        lines.append(match.group(1) if match else line)
    text = "\n".join(lines) + "\n"
    for name, value in values.items():
        text = re.sub(r"(?m)^((?:export\s+)?%s=).*$" % name, r"\g<1>%s" % value, text)
    path = tmp_path / "my_envs.sh"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def test_the_example_env_file_loads_with_env(pki, tmp_path):
    """--env my_envs.sh.example, every block switched on: it loads (no parse error), and
    what it sets is what a shell that sources it would set."""
    path = uncommented_example(tmp_path, SMTP_CAFILE=pki.cafile)  # a placeholder there
    msg = tmp_path / "m.eml"
    msg.write_bytes(CORPUS["plain-ascii"])
    proc = run_tool([str(msg), "--keys", pki.keys, "--sign", "--send_smtp", "--dry_run",
                     "--env", str(path)], env={"HOME": str(tmp_path)})
    assert b"could not parse" not in proc.stderr, proc.stderr
    shell = os.popen("env -i HOME=%s bash -c '. %s; env'" % (tmp_path, path)).read()
    smtp_host = re.search(r"(?m)^SMTP_HOST=(.*)$", shell).group(1)
    assert proc.returncode == 0, proc.stderr
    assert ("to %s, port" % smtp_host).encode() in proc.stdout, proc.stdout


def test_home_in_key_directories(pki, tmp_path):
    """SMIME_KEYS_DIR=~/smime and $HOME/smime (as an env file or a service manager leaves
    them, unexpanded) find the keys in the home directory."""
    home = tmp_path / "home"
    os.makedirs(home / "smime")
    for name in os.listdir(pki.keys):
        shutil.copy(os.path.join(pki.keys, name), home / "smime" / name)
    msg = tmp_path / "m.eml"
    msg.write_bytes(CORPUS["plain-ascii"])
    for spelling in ("~/smime", "$HOME/smime", "${HOME}/smime"):
        proc = run_tool([str(msg), "--sign"], cwd=str(tmp_path),
                        env={"HOME": str(home), "SMIME_KEYS_DIR": spelling})
        assert proc.returncode == 0, (spelling, proc.stderr)
        assert b"application/pkcs7-mime" in proc.stdout or b"pkcs7-signature" in proc.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stub(tmp_path, name, code):
    """A directory holding a module *name* (a package) whose __init__ is *code*; return
    the PYTHONPATH that puts it before the real one."""
    pkg = tmp_path / "stubs" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(code)
    return {"PYTHONPATH": str(tmp_path / "stubs")}


def test_a_cryptography_too_old_is_named(pki, tmp_path):
    """cryptography 38 (Debian 12's, outside the venv) under the tool: one line naming the
    package, the version found, the one needed and the Python that ran; 78."""
    import cryptography
    real = os.path.dirname(cryptography.__file__)
    env = stub(tmp_path, "cryptography", "__path__ = [%r]\n__version__ = '38.0.4'\n" % real)
    msg = tmp_path / "m.eml"
    msg.write_bytes(CORPUS["plain-ascii"])
    proc = run_tool([str(msg), "--keys", pki.keys, "--sign"], env=env)
    assert proc.returncode == 78, proc.stderr
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "cryptography 38.0.4 is too old" in err, err
    assert "cryptography >= 45" in err and sys.executable in err, err


def test_a_cryptography_that_cannot_load_is_named(pki, tmp_path):
    """A cryptography whose binary part does not load (a wheel for another Python): 78,
    naming it, not an internal error."""
    env = stub(tmp_path, "cryptography",
               "raise ImportError('cannot import name _rust (wrong ABI)')\n")
    msg = tmp_path / "m.eml"
    msg.write_bytes(CORPUS["plain-ascii"])
    proc = run_tool([str(msg), "--keys", pki.keys, "--encrypt"], env=env)
    assert proc.returncode == 78, proc.stderr
    err = proc.stderr.decode()
    assert "cryptography cannot be loaded" in err and "wrong ABI" in err, err
    assert "internal error" not in err


@pytest.mark.parametrize("name, package, flags", [
    ("requests", "requests", ["--send_api"]),
    ("aiosmtpd", "aiosmtpd", ["--serve", "127.0.0.1:{port}", "--send_smtp"]),
    ("dotenv", "python-dotenv", ["--env", "{envfile}", "--send_smtp"]),
])
def test_a_missing_dependency_is_69_with_the_pip_command(pki, tmp_path, name, package, flags):
    """A dependency that is not installed: 69, 'pip install NAME', before anything starts
    (the gateway does not say it is serving)."""
    env = stub(tmp_path, name, "raise ModuleNotFoundError(%r, name=%r)\n"
               % ("No module named " + name, name))
    env.update(SPARKPOST_API_KEY="k" * 40, SMTP_HOST="127.0.0.1", SMTP_PORT="9")
    envfile = tmp_path / "settings.env"
    envfile.write_text("SMTP_TIMEOUT=5\n")
    msg = tmp_path / "m.eml"
    msg.write_bytes(CORPUS["plain-ascii"])
    args = [a.format(envfile=envfile, port=free_port()) for a in flags]
    args = args if "--serve" in args else [str(msg)] + args
    proc = run_tool(args + ["--keys", pki.keys], env=env)
    assert proc.returncode == 69, proc.stderr
    err = proc.stderr.decode()
    assert "%s is not installed" % package in err and "pip install '%s" % package in err, err
    assert "serving on" not in err and err.count("\n") == 1, err


def test_no_warning_of_a_dependency_is_printed(pki, tmp_path):
    """A dependency's warning (here a DeprecationWarning raised when cryptography loads)
    never reaches the tool's stderr: its one line is its own."""
    import cryptography
    real = os.path.dirname(cryptography.__file__)
    code = ("__path__ = [%r]\nwith open(%r) as fh:\n    exec(fh.read())\nimport warnings\n"
            "warnings.warn('this API is deprecated', DeprecationWarning)\n"
            % (real, os.path.join(real, "__init__.py")))
    env = stub(tmp_path, "cryptography", code)
    env["PYTHONWARNINGS"] = "always"
    proc = run_tool([str(tmp_path / "missing.eml"), "--keys", pki.keys, "--sign"], env=env)
    assert proc.returncode == 66, proc.stderr
    assert b"deprecated" not in proc.stderr and proc.stderr.count(b"\n") == 1, proc.stderr


def test_dry_run_refuses_credentials_in_clear(pki, tmp_path):
    """SMTP_TLS=none with SMTP_USER/SMTP_PASSWORD: refused (78) by --dry_run too, as the
    real run would refuse them, before anything is sent."""
    msg = tmp_path / "m.eml"
    msg.write_bytes(CORPUS["plain-ascii"])
    env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": "25", "SMTP_TLS": "none",
           "SMTP_USER": "someone", "SMTP_PASSWORD": "not-for-a-clear-line"}
    for extra in (["--dry_run"], []):
        proc = run_tool([str(msg), "--keys", pki.keys, "--send_smtp"] + extra, env=env)
        assert proc.returncode == 78, proc.stderr
        assert b"SMTP_TLS=none" in proc.stderr and b"SMTP_USER" in proc.stderr, proc.stderr


def test_dry_run_with_results_previews_a_resume(pki, tmp_path):
    """--dry_run --results --resume: says what a resume would send, writes no row."""
    msgs = tmp_path / "in"
    msgs.mkdir()
    for n in range(3):
        (msgs / ("m%d.eml" % n)).write_bytes(CORPUS["plain-ascii"].replace(
            b"Just text.", b"Message %d." % n))
    results = tmp_path / "results.jsonl"
    with SmtpServer() as srv:
        env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(srv.port)}
        first = run_tool([str(msgs / "m0.eml"), "--keys", pki.keys, "--send_smtp",
                          "--results", str(results)], env=env)
        assert first.returncode == 0, first.stderr
        before = results.read_bytes()
        proc = run_tool([str(msgs), "--keys", pki.keys, "--send_smtp", "--results",
                         str(results), "--resume", "--dry_run"], env=env)
        assert proc.returncode == 0, proc.stderr
        assert len(srv.messages) == 1  # the dry run sent nothing
    assert results.read_bytes() == before  # and wrote nothing
    assert b"1 message(s) already sent" in proc.stderr
    out = proc.stdout.decode()
    assert "m1.eml" in out and "m2.eml" in out and "m0.eml" not in out, out


def test_a_password_that_is_a_common_word_leaves_errors_readable(pki, tmp_path):
    """SMIME_KEY_PASSWORD=wrong, a key encrypted under another passphrase: the error keeps
    its own words ("wrong SMIME_KEY_PASSWORD", not "*** SMIME_KEY_PASSWORD")."""
    from cryptography.hazmat.primitives import serialization
    keys = tmp_path / "keys"
    shutil.copytree(pki.keys, keys)
    key = pki.ids["alice@example.com"][0]
    (keys / "alice@example.com.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"the-right-one")))
    msg = tmp_path / "m.eml"
    msg.write_bytes(CORPUS["plain-ascii"])
    proc = run_tool([str(msg), "--keys", str(keys), "--sign"],
                    env={"SMIME_KEY_PASSWORD": "wrong"})
    assert proc.returncode == 78, proc.stderr
    assert b"wrong SMIME_KEY_PASSWORD for this private key" in proc.stderr, proc.stderr
    assert b"***" not in proc.stderr


def test_a_token_key_without_its_binding_is_69(pki, tmp_path):
    """A .p11 key on a machine without python-pkcs11: 69 with the pip command, at the first
    use of the key, one line."""
    env = stub(tmp_path, "pkcs11", "raise ModuleNotFoundError(%r, name='pkcs11')\n"
               % "No module named pkcs11")
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(os.path.join(pki.keys, "alice@example.com.crt"), keys)
    (keys / "alice@example.com.p11").write_text("pkcs11:token=smime-token;object=alice;"
                                                "type=private\n")
    env.update(PKCS11_MODULE="/usr/lib/softhsm/libsofthsm2.so", PKCS11_PIN="0000-not-used")
    msg = tmp_path / "m.eml"
    msg.write_bytes(CORPUS["plain-ascii"])
    proc = run_tool([str(msg), "--keys", str(keys), "--sign"], env=env)
    assert proc.returncode == 69, proc.stderr
    err = proc.stderr.decode()
    assert "python-pkcs11 is not installed" in err and "pip install 'python-pkcs11" in err, err
    assert err.count("\n") == 1, err
