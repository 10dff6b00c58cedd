"""Keys on a PKCS#11 token (<address>.p11): a real SoftHSM2 token made here, its keys
generated inside it (sensitive, not extractable), certificates from the test CA;
signatures checked by OpenSSL, encryption opened by --decrypt and --verify, every mode."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support import engines
from support.harness import ROOT, need, run_tool
from support.pki import pem_cert, write
from support.servers import ApiServer, SmtpServer

PIN = engines.plant_secret("pin-7Qx93-TEST-only")
SO_PIN = engines.plant_secret("so-pin-5Rt18-TEST-only")
LABEL = "smime-token"
RSA_ADDR, EC_ADDR = "hsm-rsa@example.com", "hsm-ec@example.com"
MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")

#: Made in a child process: the test process never loads the module.
KEYGEN = r"""
import sys, pkcs11
from pkcs11 import Attribute, KeyType
from pkcs11.util.ec import encode_named_curve_parameters
lib = pkcs11.lib(sys.argv[1])
private = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}
with lib.get_token(token_label=sys.argv[2]).open(rw=True, user_pin=sys.argv[3]) as s:
    pub, _ = s.generate_keypair(KeyType.RSA, 2048, label="steve-rsa", id=b"\x01", store=True,
                                private_template=private)
    out = [pkcs11.util.rsa.encode_rsa_public_key(pub)]
    params = s.create_domain_parameters(KeyType.EC, {
        Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
    pub, _ = params.generate_keypair(store=True, label="steve-ec", id=b"\x02",
                                     private_template={**private, Attribute.DERIVE: True})
    out.append(pkcs11.util.ec.encode_ec_public_key(pub))
    for key in s.get_objects({Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}):
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
sys.stdout.write(" ".join(o.hex() for o in out))
"""
MSG = (b"From: Steve <%s>\r\nTo: Bob <bob@example.org>\r\nSubject: from the token\r\n"
       b"Date: Mon, 02 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
       b"Content-Type: text/plain; charset=us-ascii\r\n\r\nSigned on a token, %s.\r\n")


class PublicOnly:
    """What the test CA's issue() needs of a key it certifies: its public half."""

    def __init__(self, public):
        self.public = public

    def public_key(self):
        return self.public


class Token:
    """A SoftHSM2 token in its own directory: keys made inside it, a keys dir with a
    .p11 and a .crt per address, the tool's environment."""

    def __init__(self, base, pki):
        need("softhsm2-util")
        self.module = next((m for m in MODULES if os.path.exists(m)), MODULES[0])
        self.base, self.dir = base, os.path.join(base, "tokens")
        os.makedirs(self.dir)
        self.conf = write(os.path.join(base, "softhsm2.conf"), (
            "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n"
            % self.dir).encode())
        env = dict(os.environ, SOFTHSM2_CONF=self.conf)
        engines.run(["softhsm2-util", "--init-token", "--free", "--label", LABEL,
                     "--pin", PIN, "--so-pin", SO_PIN], env=env)
        out = engines.run([sys.executable, "-c", KEYGEN, self.module, LABEL, PIN], env=env)
        rsa_pub, ec_pub = (serialization.load_der_public_key(bytes.fromhex(h))
                           for h in out.stdout.decode().split())
        self.keys = os.path.join(base, "keys")
        os.makedirs(self.keys)
        usage = {RSA_ADDR: x509.KeyUsage(True, True, True, False, False, False, False, False,
                                         False),
                 EC_ADDR: x509.KeyUsage(True, True, False, False, True, False, False, False,
                                        False)}
        for address, public, obj in ((RSA_ADDR, rsa_pub, "steve-rsa"),
                                     (EC_ADDR, ec_pub, "steve-ec")):
            _, cert = pki.inter.issue(address, PublicOnly(public), key_usage=usage[address])
            write(os.path.join(self.keys, address + ".crt"), pem_cert(cert, pki.inter.cert))
            self.uri(address, "pkcs11:token=%s;object=%s;type=private"
                     % (LABEL.replace("-", "%2D"), obj))
        for address in ("bob@example.org", "alice@example.com"):
            shutil.copy(os.path.join(pki.keys, address + ".crt"), self.keys)
        self.env = {"SOFTHSM2_CONF": self.conf, "PKCS11_MODULE": self.module,
                    "PKCS11_PIN": PIN}

    def uri(self, address, text):
        write(os.path.join(self.keys, address + ".p11"), (text + "\n").encode())


@pytest.fixture(scope="module")
def token(pki, tmp_path_factory):
    return Token(str(tmp_path_factory.mktemp("softhsm")), pki)


def tool(token, args, env=None, **kw):
    return run_tool(list(args), env=dict(token.env, **(env or {})), **kw)


def message(tmp_path, sender, text="hello", name="in.eml"):
    path = tmp_path / name
    path.write_bytes(MSG % (sender.encode(), text.encode()))
    return str(path)


@pytest.mark.parametrize("sender", [RSA_ADDR, EC_ADDR])
@pytest.mark.parametrize("mode", ["--sign", "--sign_detached"])
def test_token_key_signs_verified_by_openssl(token, pki, openssl, tmp_path, sender, mode):
    proc = tool(token, [message(tmp_path, sender), "--keys", token.keys, mode])
    assert proc.returncode == 0, proc.stderr
    assert b"Signed on a token, hello." in openssl.verify(proc.stdout, pki.cafile)


@pytest.mark.parametrize("recipient", [RSA_ADDR, EC_ADDR])
def test_encrypted_to_a_token_key_opened_by_decrypt_and_verify(token, pki, tmp_path,
                                                                recipient):
    """RSA key transport (CKM_RSA_PKCS) and ECDH (CKM_ECDH1_DERIVE); with --verify the
    token also signed (From the other token key)."""
    signer = EC_ADDR if recipient == RSA_ADDR else RSA_ADDR
    raw = (MSG % (signer.encode(), b"secret")).replace(b"bob@example.org", recipient.encode())
    (tmp_path / "in.eml").write_bytes(raw)
    built = tool(token, [str(tmp_path / "in.eml"), "--keys", token.keys, "--sign",
                         "--encrypt", "-o", str(tmp_path / "out.eml")])
    assert built.returncode == 0, built.stderr
    assert b"enveloped-data" in (tmp_path / "out.eml").read_bytes()
    for mode in ("--decrypt", "--verify"):
        proc = tool(token, [str(tmp_path / "out.eml"), "--keys", token.keys, "--ca",
                            pki.cafile, mode, "-o", str(tmp_path / "plain.eml")])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode().startswith("OK - ")
        assert ("decrypted for %s" % recipient) in proc.stdout.decode() or mode == "--verify"
        assert ("signed by %s" % signer) in proc.stdout.decode()
        assert b"Signed on a token, secret." in (tmp_path / "plain.eml").read_bytes()


def test_jobs_2_batch_over_smtp(token, pki, openssl, tmp_path):
    """Each forked worker opens its own session (the parent's, opened before the fork
    by the warm-up, is not used); every message arrives signed."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(8):
        message(inbox, (RSA_ADDR, EC_ADDR)[i % 2], "number %d" % i, "m%d.eml" % i)
    with SmtpServer() as srv:
        proc = tool(token, [str(inbox), "--keys", token.keys, "--sign", "--send_smtp",
                            "--jobs", "2"], env={"SMTP_HOST": "127.0.0.1",
                                                 "SMTP_PORT": str(srv.port)})
        assert proc.returncode == 0, proc.stderr
        assert "Summary: 8 sent, 0 failed" in proc.stdout.decode()
        texts = sorted(openssl.verify(data, pki.cafile) for _, _, data in srv.messages)
    assert [t.split(b"number ")[1][:1] for t in texts] == [b"%d" % i for i in range(8)]


def test_send_api(token, pki, openssl, tmp_path):
    with ApiServer() as api:
        proc = tool(token, [message(tmp_path, EC_ADDR), "--keys", token.keys, "--sign",
                            "--send_api"], env={"SPARKPOST_API_KEY": "k" * 40,
                                                "SPARKPOST_HOST": api.url})
        assert proc.returncode == 0, proc.stderr
        body = json.loads(api.requests[0]["body"])
    assert b"Signed on a token" in openssl.verify(body["content"]["email_rfc822"].encode(),
                                                   pki.cafile)


def test_gateway_signs_with_the_token(token, pki, openssl, tmp_path):
    from test_gateway import Gateway, hop_env
    with SmtpServer() as sink:
        gw = Gateway(tmp_path, ["--keys", token.keys, "--send_smtp", "--sign", "--jobs", "2"],
                     dict(token.env, **hop_env(sink)))
        for sender in (RSA_ADDR, EC_ADDR, RSA_ADDR):
            with gw.client() as c:
                assert c.sendmail(sender, ["bob@example.org"],
                                  MSG % (sender.encode(), b"via the gateway")) == {}
        assert gw.stop() == 0
        assert PIN not in gw.stderr() + gw.stdout()
        for _, _, data in sink.messages:
            assert b"via the gateway" in openssl.verify(data, pki.cafile)
        assert len(sink.messages) == 3


def test_wrong_pin_is_77_and_never_retried(token, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(3):
        message(inbox, RSA_ADDR, str(i), "m%d.eml" % i)
    proc = tool(token, [str(inbox), "--keys", token.keys, "--sign", "-o", str(tmp_path),
                        "-v"], env={"PKCS11_PIN": "wrong-pin-0000"})
    err = proc.stderr.decode()
    assert proc.returncode == 77, err
    assert "token %s: the PIN (PKCS11_PIN) was refused" % LABEL in err
    assert "wrong-pin-0000" not in err + proc.stdout.decode()
    one = tool(token, [message(tmp_path, EC_ADDR), "--keys", token.keys, "--sign"],
               env={"PKCS11_PIN": "wrong-pin-0000"})
    assert one.returncode == 77 and len(one.stderr.decode().splitlines()) == 1, one.stderr


@pytest.mark.parametrize("module", ["/nonexistent/libnothing.so", "/bin/true"])
def test_missing_or_foreign_module_is_69(token, tmp_path, module):
    proc = tool(token, [message(tmp_path, RSA_ADDR), "--keys", token.keys, "--sign"],
                env={"PKCS11_MODULE": module})
    err = proc.stderr.decode()
    assert proc.returncode == 69, err
    assert "PKCS11_MODULE=%s" % module in err and len(err.splitlines()) == 1


def test_wrong_uri_is_78_naming_it(token, tmp_path):
    keys = tmp_path / "keys"
    shutil.copytree(token.keys, keys)
    uri = "pkcs11:token=%s;object=nobody;type=private" % LABEL
    write(str(keys / (RSA_ADDR + ".p11")), uri.encode())
    proc = tool(token, [message(tmp_path, RSA_ADDR), "--keys", str(keys), "--sign"])
    assert proc.returncode == 78, proc.stderr
    assert uri in proc.stderr.decode()
    write(str(keys / (RSA_ADDR + ".p11")), b"pkcs11:token=another-token;object=steve-rsa")
    proc = tool(token, [message(tmp_path, RSA_ADDR), "--keys", str(keys), "--sign"])
    assert proc.returncode == 78 and b"no such token" in proc.stderr, proc.stderr
    write(str(keys / (RSA_ADDR + ".p11")), b"pkcs11:object=steve-rsa?pin-value=1234")
    proc = tool(token, [message(tmp_path, RSA_ADDR), "--keys", str(keys), "--sign"])
    assert proc.returncode == 78 and b"set PKCS11_PIN" in proc.stderr, proc.stderr


def test_pin_absent_from_every_output(token, tmp_path):
    """-v, --dry_run, an SMTP transcript, an error: the PIN is never printed (the session
    fixture no_secret_in_any_output checks every run of this file too)."""
    path = message(tmp_path, RSA_ADDR)
    with SmtpServer() as srv:
        smtp = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(srv.port)}
        runs = [tool(token, [path, "--keys", token.keys, "--sign", "-v", "--send_smtp"],
                     env=smtp),
                tool(token, [path, "--keys", token.keys, "--sign", "-v", "--send_smtp",
                             "--dry_run"], env=smtp),
                tool(token, [path, "--keys", token.keys, "--sign", "-v"],
                     env={"PKCS11_MODULE": "/nonexistent.so"})]
    assert [p.returncode for p in runs] == [0, 0, 69]
    for proc in runs:
        assert PIN.encode() not in proc.stdout + proc.stderr


def test_token_removed_mid_batch_fails_temporary_then_resumes(token, pki, tmp_path):
    """The token goes away while a batch runs: the messages that need it then fail as
    temporary (75), every one is in the journal, and --resume sends the rest."""
    saved = tmp_path / "saved-tokens"
    shutil.copytree(token.dir, saved)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(12):
        message(inbox, RSA_ADDR, str(i), "m%02d.eml" % i)
    results = str(tmp_path / "results.jsonl")
    with SmtpServer(pipelining=False) as srv:
        handle = srv.handler.handle_DATA

        async def remove_token(server, session, envelope):
            if os.path.isdir(token.dir):
                shutil.rmtree(token.dir)  # as a smartcard pulled out
                os.makedirs(token.dir)
            return await handle(server, session, envelope)
        srv.handler.handle_DATA = remove_token
        env = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(srv.port)}
        try:
            proc = tool(token, [str(inbox), "--keys", token.keys, "--sign", "--send_smtp",
                                "--results", results], env=env)
        finally:
            shutil.rmtree(token.dir)
            shutil.copytree(saved, token.dir)
        err = proc.stderr.decode()
        assert proc.returncode == 75, err
        rows = [json.loads(line) for line in open(results)]
        assert len(rows) == 12
        failed = [r for r in rows if r["status"] != "sent"]
        assert failed and len(failed) < 12
        assert all(r["exit_code"] == 75 for r in failed), failed
        assert "token %s" % LABEL in err and "Traceback" not in err
        srv.handler.handle_DATA = handle
        again = tool(token, [str(inbox), "--keys", token.keys, "--sign", "--send_smtp",
                             "--results", results, "--resume"], env=env)
        assert again.returncode == 0, again.stderr
        assert len(srv.messages) == 12


def test_binding_imported_only_for_token_keys(pki, tmp_path):
    """Other runs do not import the PKCS#11 binding (they start as fast as before)."""
    path = tmp_path / "in.eml"
    path.write_bytes(MSG % (b"alice@example.com", b"file key"))
    code = ("import sys; sys.path.insert(0, %r); import sparkpostSMIME as s; "
            "rc = s.main([%r, '--keys', %r, '--sign', '-o', %r]); "
            "assert rc == 0 and 'pkcs11' not in sys.modules, rc" % (
                ROOT, str(path), pki.keys, str(tmp_path / "out.eml")))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_uri_parsing_rfc7512():
    import sparkpostSMIME as s
    uri = s.parse_pkcs11_uri("pkcs11:token=My%20token;manufacturer=SoftHSM%20project;"
                             "object=st%3Bve;id=%01%ff;type=private?module-name=x", "f.p11")
    assert (uri.token, uri.manufacturer, uri.object, uri.id) == (
        "My token", "SoftHSM project", "st;ve", b"\x01\xff")
    for bad in ("pkcs11:object=a;object=b", "pkcs11:object=a;type=cert", "pkcs11:token=t",
                "pkcs11:object=a;colour=blue", "file:x", "pkcs11:id=%01?pin-source=/x"):
        with pytest.raises(s.IdentityError):
            s.parse_pkcs11_uri(bad, "f.p11")


def test_certificate_of_another_key_is_78(token, pki, tmp_path):
    """A .crt that is not the token key's certificate: refused, no signature made."""
    keys = tmp_path / "keys"
    shutil.copytree(token.keys, keys)
    _, cert = pki.inter.issue(RSA_ADDR)
    write(str(keys / (RSA_ADDR + ".crt")), pem_cert(cert, pki.inter.cert))
    proc = tool(token, [message(tmp_path, RSA_ADDR), "--keys", str(keys), "--sign"])
    assert proc.returncode == 78, proc.stderr
    assert b"not the one of its certificate" in proc.stderr and not proc.stdout


def test_workers_starting_together_each_find_the_token(token, pki, openssl, tmp_path):
    """--jobs 4 into -o DIR, 200 messages: the workers start at once and each initialises the module
    and logs in (SoftHSM2 misses its token when processes read it at the same moment:
    they take turns); every message is written, signed."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    out.mkdir()
    for i in range(200):
        message(inbox, (RSA_ADDR, EC_ADDR)[i % 2], "number %d" % i, "m%02d.eml" % i)
    proc = tool(token, [str(inbox), "--keys", token.keys, "--sign", "-o", str(out),
                        "--jobs", "4"])
    assert proc.returncode == 0, proc.stderr
    assert len(os.listdir(out)) == 200
    assert b"number 7." in openssl.verify((out / "m07.eml").read_bytes(), pki.cafile)
