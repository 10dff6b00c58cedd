"""The receiving side under attack (issue 17): messages crafted against --verify, --decrypt
and --harvest, each written so that it got through (or cost seconds and memory) before.

The messages are made here with the tool's own writer (signed_der, enveloped_data) and a
few DER pieces of our own for what no honest writer makes; OpenSSL's verdict is asked for
where it has one (a name-constraint violation), so the tool never stands alone.
"""

import os
import re

import pytest
from cryptography import x509

import engines
import sparkpostSMIME as tool
from conftest import need, run_tool
from pki import CA, pem_cert, pem_key, write

VICTIM = "victim@bank.example"
BOB = "bob@example.org"
TEXT = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nPay the bearer.\r\n"


# -- helpers -----------------------------------------------------------------------------

class Attack:
    """A trusted root, key directory and scratch space for one test."""

    def __init__(self, base, root):
        self.base, self.root = base, root
        self.keys = os.path.join(base, "keys")
        os.makedirs(self.keys, exist_ok=True)
        self.cafile = write(os.path.join(base, "ca.crt"), pem_cert(root.cert))

    def identity(self, ca, address, **kw):
        """Return an unchecked tool.Identity issued by *ca* (its chain travels with it)."""
        key, cert = ca.issue(address, **kw)
        return tool.Identity(address, cert, "-", key, ca.chain)

    def file(self, name, data):
        return write(os.path.join(self.base, name), data)

    def run(self, mode, *paths, extra=()):
        return run_tool(["--" + mode] + [str(p) for p in paths]
                        + ["--keys", self.keys, "--ca", self.cafile] + list(extra))


def message(sender, entity, to=BOB, extra=b""):
    """Return an RFC 5322 message around the S/MIME *entity*."""
    return (b"From: %s\r\nTo: %s\r\nSubject: attack\r\n%sMIME-Version: 1.0\r\n"
            % (sender.encode(), to.encode(), extra)) + entity


def signed(ident, content=TEXT, sender=None, detached=True):
    """A message signed by *ident* with the tool's own writer, From *sender*."""
    sign = tool.sign_detached if detached else tool.sign_opaque
    return message(sender or ident.address, sign(content, ident))


def one_line_refusal(proc, code=65, reason=None):
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, err + proc.stdout.decode(errors="replace")
    assert err.count("\n") == 1 and "Traceback" not in err, err
    if reason:
        assert re.search(reason, err, re.I), err
    return err


@pytest.fixture(scope="module")
def root():
    return CA("Attack Root CA (TEST ONLY)")


@pytest.fixture
def attack(tmp_path, root):
    return Attack(str(tmp_path), root)


# -- High: rfc822Name constraints (RFC 5280 4.2.1.10) ----------------------------------

def constrained(root, permitted=None, excluded=None):
    """A sub-CA under *root* with rfc822Name constraints (lists of strings)."""
    names = [(lambda xs: [x509.RFC822Name(x) for x in xs] if xs is not None else None)(xs)
             for xs in (permitted, excluded)]
    return root.intermediate("Constrained CA (TEST ONLY)",
                             constraints=x509.NameConstraints(*names))


@pytest.fixture(scope="module")
def corp_ca(root):
    """A sub-CA allowed to certify mail addresses in corp.example only."""
    return constrained(root, permitted=["corp.example"])


@pytest.mark.parametrize("san", [False, [x509.DNSName("www.corp.example")]],
                         ids=["no-san", "dns-san-only"])
@pytest.mark.parametrize("detached", [True, False], ids=["detached", "opaque"])
def test_constrained_ca_cannot_vouch_for_a_subject_email_outside(attack, corp_ca, san,
                                                                 detached):
    ident = attack.identity(corp_ca, VICTIM, san=san, subject_email=True)
    path = attack.file("in.eml", signed(ident, detached=detached))
    proc = attack.run("verify", path)
    one_line_refusal(proc, 65, "name constraint|not permitted")
    assert proc.stdout.decode().startswith("FAILED - ")
    need("openssl")  # the independent verdict: OpenSSL refuses it too
    check = engines.run(["openssl", "cms", "-verify", "-in", path, "-CAfile", attack.cafile,
                         "-out", os.devnull], ok=(0, 4))
    assert check.returncode != 0 and b"subtree" in check.stderr, check.stderr


def test_constrained_ca_inside_its_subtree_still_verifies(attack, corp_ca):
    ident = attack.identity(corp_ca, "alice@corp.example", san=False, subject_email=True)
    proc = attack.run("verify", attack.file("in.eml", signed(ident)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"OK - signed by alice@corp.example")


def test_harvest_saves_nothing_from_a_constrained_ca_outside(attack, corp_ca):
    ident = attack.identity(corp_ca, VICTIM, san=False, subject_email=True)
    proc = attack.run("harvest", attack.file("in.eml", signed(ident)))
    one_line_refusal(proc, 65, "name constraint|not permitted")
    assert os.listdir(attack.keys) == []


def test_decrypt_refuses_a_signature_outside_the_constraints(attack, corp_ca):
    ident = attack.identity(corp_ca, VICTIM, san=False, subject_email=True)
    proc = attack.run("decrypt", attack.file("in.eml", signed(ident)))
    one_line_refusal(proc, 65, "name constraint|not permitted")


@pytest.mark.parametrize("permitted,excluded,address,allowed", [
    (["boss@corp.example"], None, "boss@corp.example", True),      # a mailbox
    (["boss@corp.example"], None, "clerk@corp.example", False),
    (["corp.example"], None, "x@corp.example", True),              # a host
    (["corp.example"], None, "x@mail.corp.example", False),
    ([".corp.example"], None, "x@mail.corp.example", True),        # any host in a domain
    ([".corp.example"], None, "x@corp.example", False),
    ([".corp.example"], None, "x@evilcorp.example", False),
    (None, ["bank.example"], VICTIM, False),                       # excluded host
    (None, [".bank.example"], "x@mail.bank.example", False),       # excluded domain
    (None, [".bank.example"], VICTIM, True),
    (None, [VICTIM.upper()], VICTIM, False),                       # case does not help
    (["corp.example"], ["boss@corp.example"], "boss@corp.example", False),
])
def test_rfc822_constraint_forms(attack, root, permitted, excluded, address, allowed):
    ca = constrained(root, permitted, excluded)
    ident = attack.identity(ca, address.lower(), san=False, subject_email=True)
    proc = attack.run("verify", attack.file("in.eml", signed(ident)))
    if allowed:
        assert proc.returncode == 0, proc.stderr
    else:
        one_line_refusal(proc, 65, "name constraint|not permitted|excluded")


def test_constraints_of_every_ca_on_the_path(attack, root):
    """The upper CA excludes the address; the lower one has no constraint."""
    upper = constrained(root, excluded=["bank.example"])
    lower = upper.intermediate("Unconstrained below (TEST ONLY)")
    ident = attack.identity(lower, VICTIM, san=False, subject_email=True)
    one_line_refusal(attack.run("verify", attack.file("in.eml", signed(ident))), 65,
                     "name constraint|excluded")


def test_sending_refuses_a_recipient_certificate_outside_its_issuer(tmp_path, corp_ca):
    """--encrypt to <victim>.crt that carries its constrained issuer: refused (78)."""
    key, cert = corp_ca.issue(VICTIM, san=False, subject_email=True)
    keys = tmp_path / "keys"
    keys.mkdir()
    write(str(keys / (VICTIM + ".crt")), pem_cert(cert, *corp_ca.chain))
    msg = write(str(tmp_path / "m.eml"), b"From: a@corp.example\r\nTo: %s\r\n"
                b"Subject: s\r\n\r\nhi\r\n" % VICTIM.encode())
    proc = run_tool([msg, "--encrypt", "--keys", str(keys)])
    one_line_refusal(proc, 78, "name constraint|not permitted")


def test_sending_refuses_a_signer_certificate_outside_its_issuer(tmp_path, corp_ca):
    key, cert = corp_ca.issue(VICTIM, san=False, subject_email=True)
    keys = tmp_path / "keys"
    keys.mkdir()
    write(str(keys / (VICTIM + ".pem")), pem_key(key) + pem_cert(cert, *corp_ca.chain))
    msg = write(str(tmp_path / "m.eml"), b"From: %s\r\nTo: b@example.org\r\n"
                b"Subject: s\r\n\r\nhi\r\n" % VICTIM.encode())
    proc = run_tool([msg, "--sign", "--keys", str(keys)])
    one_line_refusal(proc, 78, "name constraint|not permitted")
