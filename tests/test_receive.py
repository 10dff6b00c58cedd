"""--verify and --decrypt: S/MIME mail made by OpenSSL 3.0, received and checked by the tool.

Every message comes from tests/support/openssl_made.py, which makes it with ``openssl cms`` (or
``openssl smime``) and proves with OpenSSL what it is before any test sees it: good
signatures verify there and yield the exact content, spoilt ones are refused for the
fault they claim and for no other, envelopes decrypt to the exact plaintext with the
recipient's key only.  So when the tool disagrees with a test, the tool is wrong.

The module has its own PKI (openssl_made.World): EC identities (P-256, P-384) live in it,
never in the session ``pki``, whose identities must stay RSA for gpgsm 2.2 (see
test_trixie_engines.py).  ``--ca`` gets its root only; the intermediates travel in the
messages.  Our key directory holds bob (RSA), pat (P-256) and quinn (P-384).

What is asserted, from the interface:

- one input: exactly ``OK - signed by ADDR (ISSUER CN), verified`` for a plain signed
  message; ``OK - decrypted for ADDR, ...`` fragments for --decrypt; ``FAILED - reason``;
- several inputs: every line is ``PATH: `` + the line;
- exit 0 all good, 65 refused, 66 unreadable input, 78 missing CA bundle or unreadable key;
- a refusal is one line on stderr naming the file and the reason, nothing else on stderr
  (a SHA-1 warning aside); a success says nothing on stderr unless -v;
- ``-o`` writes the outer header fields followed by the innermost entity, byte for byte.
"""

import email.parser
import email.policy
import os
import re
import shutil
import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import engines
from support import openssl_made as om
from support.harness import need, run_tool
from support.openssl_made import BOB, DEPT, FIONA, FRANK, KINDS, MALLORY, SIGNED

#: Loose reasons (case-insensitive), from the interface.
TAMPERED = r"digest|does not match|altered|tampered"
UNTRUSTED = r"trusted|chain|root"
EXPIRED = r"expired"
UNSIGNED = r"not signed|unsigned|no signature"
NOT_FOR_US = r"no key|not encrypted to|none of"
SHA1_WARNING = r"SHA-?1"

#: The signature kinds every spoilt case is made of (sha1 warns: see test_sha1_*).
SIGNED_KINDS = [k for k in KINDS if k != "sha1"]


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The module PKI on disk (openssl_made.World)."""
    need("openssl")
    return om.World(str(tmp_path_factory.mktemp("receive-pki")))


@pytest.fixture(scope="module")
def made(world, tmp_path_factory):
    """The OpenSSL-made messages, each built and proven once, on first use."""
    return om.Catalogue(world, str(tmp_path_factory.mktemp("receive-mail")))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A module directory for outputs and copies (hypothesis cannot take tmp_path)."""
    return tmp_path_factory.mktemp("receive-out")


# -- helpers -----------------------------------------------------------------------------

def receive(mode, world, *inputs, keys=None, ca=None, extra=()):
    """Run ``--verify``/``--decrypt`` on *inputs* with our keys and the trusted root."""
    args = ["--" + mode] + [str(p) for p in inputs]
    args += ["--keys", str(keys or world.keys)]
    if ca is not False:
        args += ["--ca", str(ca or world.cafile)]
    return run_tool(args + [str(x) for x in extra])


def lines(proc):
    return proc.stdout.decode(errors="replace").splitlines()


def err_lines(proc):
    return proc.stderr.decode(errors="replace").splitlines()


def show(proc):
    return "exit %d\nstdout: %s\nstderr: %s" % (proc.returncode, proc.stdout.decode(
        errors="replace"), proc.stderr.decode(errors="replace"))


def assert_ok(proc, line):
    """Exit 0, exactly *line* on stdout, nothing on stderr."""
    assert proc.returncode == 0, show(proc)
    assert lines(proc) == [line], show(proc)
    assert proc.stderr == b"", show(proc)


def assert_passes(proc, *fragments):
    """Exit 0 and one stdout line holding every regex of *fragments*."""
    assert proc.returncode == 0, show(proc)
    out = lines(proc)
    assert len(out) == 1, show(proc)
    for fragment in fragments:
        assert re.search(fragment, out[0]), "%r not in %r" % (fragment, out[0])


def assert_failed(proc, path, reason=None, code=65, allow=None):
    """Exit *code*, one ``FAILED - `` line on stdout, one stderr line naming *path*, both
    matching *reason* (a case-insensitive regex) when given; return (stdout, stderr line).

    Nothing else on stderr, but for one warning matching *allow* (SHA-1 messages).
    """
    assert proc.returncode == code, show(proc)
    out = lines(proc)
    assert len(out) == 1 and out[0].startswith("FAILED - "), show(proc)
    err = err_lines(proc)
    name = os.path.basename(str(path))
    said = out[0][len("FAILED - "):]
    naming = sorted((line for line in err
                     if name in line and (not reason or re.search(reason, line, re.I))),
                    key=lambda line: (said not in line, bool(allow and re.search(
                        allow, line.replace(name, ""), re.I))))  # the error, not a warning
    assert naming, show(proc)
    others = list(err)
    others.remove(naming[0])
    if allow:
        assert len(others) <= 1 and all(re.search(allow, x, re.I) for x in others), show(proc)
    else:
        assert others == [], show(proc)
    if reason:
        assert re.search(reason, out[0], re.I), show(proc)
    return out[0], naming[0]


def signed_by(ident):
    """The regex of the fragment 'signed by ADDR (ISSUER CN), verified'."""
    return r"signed by %s \(%s\), verified" % (re.escape(ident.address),
                                               re.escape(ident.issuer))


def assert_recovered(path, message, content):
    """*path* is the outer header fields of *message*, then *content* byte for byte."""
    with open(path, "rb") as fh:
        out = fh.read()
    assert out.endswith(content), "the recovered entity is not the exact content:\n%r" % (
        out[-400:],)
    head = out[:len(out) - len(content)]
    assert head.endswith(b"\n") and not re.search(rb"\n\r?\n", head), (
        "only header fields may come before the entity: %r" % head)
    fields = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    original = engines.parse(message)
    for name in ("From", "To", "Subject"):
        assert fields[name] == original[name], (name, fields[name], original[name])
    assert not re.search(rb"(?im)^content-type:[ \t]*application/(x-)?pkcs7", out)


# == signatures that verify ===============================================================

#: Good signatures: each kind, and each variant (types, names, line ends), detached and opaque.
GOOD = (["%s/%s" % (k, f) for k in SIGNED_KINDS for f in om.FORMS]
        + ["%s/%s" % (v, f) for v in om.VARIANTS for f in om.FORMS])


@pytest.mark.parametrize("name", GOOD)
def test_good_signature_verifies(world, made, scratch, name):
    """RSA PKCS#1 v1.5, RSA-PSS, ECDSA P-256 and P-384 (SHA-384), detached and opaque; and
    x-pkcs7 types (made by openssl smime, or rewritten), no .p7m/.p7s names at all,
    all-CRLF and all-LF files, a From with a display name: exit 0, the exact OK line
    naming the issuing CA, a silent stderr, and -o writes the outer fields then exactly
    the canonical (CRLF) content that was signed."""
    m = made[name]
    out = scratch / ("good-%s.eml" % name.replace("/", "-"))
    proc = receive("verify", world, m.path, extra=["-o", out])
    assert_ok(proc, m.ok_line)
    assert_recovered(out, m.data, SIGNED)


@pytest.mark.parametrize("form", om.FORMS)
def test_sha1_signature_passes_with_a_warning(world, made, form):
    """A SHA-1 signature still verifies (exit 0, the OK line), with a warning naming SHA-1
    on stderr."""
    m = made["sha1/%s" % form]
    proc = receive("verify", world, m.path)
    assert proc.returncode == 0, show(proc)
    assert lines(proc) == [m.ok_line], show(proc)
    assert re.search(SHA1_WARNING, proc.stderr.decode(), re.I), show(proc)


@pytest.mark.parametrize("form", om.FORMS)
def test_intermediates_carried_in_the_message(world, made, form):
    """Deb's certificate is two CAs below the root; both intermediates travel in the
    message (-certfile) and --ca holds the root only: verified, and the issuer named is
    the department CA (the signer certificate's issuer, not the root's or the top
    intermediate's)."""
    m = made["deep/%s" % form]
    proc = receive("verify", world, m.path)
    assert_ok(proc, m.ok_line)
    assert "(%s)" % DEPT in m.ok_line


@pytest.mark.parametrize("name", ["two/frank+fiona/from-frank", "two/frank+fiona/from-fiona",
                                  "two/frank+stranger/from-frank"])
def test_two_signers_the_from_address_counts(world, made, name):
    """Two SignerInfos in one SignedData (RSA and ECDSA): the message passes on the
    signature for its From address and names that signer.  The other signer may even
    chain to a root we do not trust (frank+stranger): it is not the sender."""
    m = made[name]
    proc = receive("verify", world, m.path)
    assert_ok(proc, m.ok_line)


# == signatures that must not verify ======================================================

@pytest.mark.parametrize("form", om.FORMS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_tampered_content_is_refused(world, made, kind, form):
    """One byte of the signed content flipped (detached: in the first part's text; opaque:
    inside the DER's eContent): 65, and the reason says the content was altered."""
    m = made["tampered/%s/%s" % (kind, form)]
    proc = receive("verify", world, m.path)
    assert_failed(proc, m.path, TAMPERED, allow=SHA1_WARNING if kind == "sha1" else None)


@pytest.mark.parametrize("form", om.FORMS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_corrupted_signature_value_is_refused(world, made, kind, form):
    """One byte of the signature value flipped: 65; a bad signature is not reported as a
    missing one."""
    m = made["badsig/%s/%s" % (kind, form)]
    proc = receive("verify", world, m.path)
    out, _ = assert_failed(proc, m.path, allow=SHA1_WARNING if kind == "sha1" else None)
    assert not re.search(UNSIGNED, out, re.I), out


@pytest.mark.parametrize("form", om.FORMS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_forged_sender_is_refused(world, made, kind, form):
    """A valid signature by frank/fiona/fred under From: mallory: 65, and the reason names
    both the From address and the signer's."""
    m = made["forged/%s/%s" % (kind, form)]
    proc = receive("verify", world, m.path)
    out, err = assert_failed(proc, m.path, allow=SHA1_WARNING if kind == "sha1" else None)
    for text in (out, err):
        assert MALLORY in text and m.signer.address in text, text


@pytest.mark.parametrize("form", om.FORMS)
@pytest.mark.parametrize("kind", ["rsa", "p256"])
def test_untrusted_root_is_refused(world, made, kind, form):
    """The whole chain (rogue intermediate and root) is in the message; only trust is
    missing: 65, the reason about trust / the chain / the root."""
    m = made["untrusted/%s/%s" % (kind, form)]
    proc = receive("verify", world, m.path)
    assert_failed(proc, m.path, UNTRUSTED)


@pytest.mark.parametrize("form", om.FORMS)
@pytest.mark.parametrize("kind", ["rsa", "p256"])
def test_expired_signer_certificate_is_refused(world, made, kind, form):
    """The signer's certificate expired yesterday (chain and signature otherwise good):
    65, the reason says expired."""
    m = made["expired/%s/%s" % (kind, form)]
    proc = receive("verify", world, m.path)
    assert_failed(proc, m.path, EXPIRED)


@pytest.mark.parametrize("form", om.FORMS)
def test_missing_intermediates_are_refused(world, made, form):
    """Deb's signature without its two intermediates (found nowhere else either): no
    path to the root, 65."""
    m = made["chainless/%s" % form]
    proc = receive("verify", world, m.path)
    assert_failed(proc, m.path, UNTRUSTED + "|issuer|intermediate")


def test_two_signers_neither_is_the_sender(world, made):
    """frank and fiona both signed, From is mallory: forged, 65, mallory named."""
    m = made["two/frank+fiona/from-mallory"]
    proc = receive("verify", world, m.path)
    out, err = assert_failed(proc, m.path)
    for text in (out, err):
        assert MALLORY in text and (FRANK in text or FIONA in text), text


def test_two_signers_the_sender_is_untrusted(world, made):
    """frank (trusted) and stranger (rogue root) signed, From is stranger: 65, untrusted."""
    m = made["two/frank+stranger/from-stranger"]
    proc = receive("verify", world, m.path)
    assert_failed(proc, m.path, UNTRUSTED)


@pytest.mark.parametrize("name", ["unsigned/plain", "unsigned/multipart"])
def test_unsigned_mail_fails_verify(world, made, name):
    """No S/MIME at all: --verify says not signed, 65."""
    m = made[name]
    proc = receive("verify", world, m.path)
    assert_failed(proc, m.path, UNSIGNED)


@pytest.mark.parametrize("mode", ["verify", "decrypt"])
@pytest.mark.parametrize("name", om.GARBAGE)
def test_garbage_is_refused(world, made, mode, name):
    """Random octets, an empty file, a signed-data part that is not base64 / not DER /
    cut in half, a signature part of random octets, an enveloped-data part of random
    octets: 65 and one FAILED line, in both modes, never a traceback."""
    m = made[name]
    proc = receive(mode, world, m.path)
    assert_failed(proc, m.path)


# == encrypted mail ===============================================================

FOR_US = [n for n in om.ENCRYPTED if n.startswith("enc/")]


@pytest.mark.parametrize("name", FOR_US)
def test_decrypts_for_our_identities(world, made, scratch, name):
    """AES-128/192/256-CBC, RSA-OAEP, recipient by subjectKeyIdentifier (RSA and EC),
    ECDH on P-256 and P-384 (sha1/sha256/sha384 KDFs), AES-256-GCM AuthEnvelopedData
    (RSA and EC), x-pkcs7-mime from openssl smime, several recipients with ours last:
    'decrypted for' our identity, 'not signed', exit 0; -o gives the exact plaintext.
    One warning on stderr: unsigned content is not authenticated (issue 17)."""
    m = made[name]
    out = scratch / ("dec-%s.eml" % name.replace("/", "-"))
    proc = receive("decrypt", world, m.path, extra=["-o", out])
    assert_passes(proc, r"^OK - decrypted for %s, not signed$" % re.escape(m.recipient.address))
    warning = err_lines(proc)
    assert len(warning) == 1 and str(m.path) in warning[0], show(proc)
    assert "not authenticated" in warning[0] and "--require_signed" in warning[0], show(proc)
    assert_recovered(out, m.data, om.PLAIN)


@pytest.mark.parametrize("name", ["enc/rsa-aes256", "enc/p256", "enc/rsa-gcm"])
def test_verify_refuses_encrypted_but_unsigned(world, made, name):
    """--verify decrypts, then finds no signature: 65, not signed."""
    m = made[name]
    proc = receive("verify", world, m.path)
    assert_failed(proc, m.path, UNSIGNED)


@pytest.mark.parametrize("mode", ["verify", "decrypt"])
@pytest.mark.parametrize("name", ["notforus/to-bob", "notforus/to-olga",
                                  "nest/sign-encrypt/not-for-us"])
def test_not_encrypted_for_us(world, made, mode, name):
    """Envelopes for olga/otto only (To: bob, whose key we hold but who is no recipient;
    or To: olga, whose key we do not have): 65, nobody to decrypt for."""
    m = made[name]
    proc = receive(mode, world, m.path)
    assert_failed(proc, m.path, NOT_FOR_US)


def test_unreadable_key_is_a_configuration_error(world, made, scratch):
    """bob's key file in --keys is not a key: 78, one line naming bob's key."""
    keys = scratch / "broken-keys"
    shutil.copytree(world.keys, keys)
    (keys / (BOB + ".pem")).write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    m = made["enc/rsa-aes256"]
    for mode in ("decrypt", "verify"):
        proc = receive(mode, world, m.path, keys=keys)
        assert proc.returncode == 78, show(proc)
        err = err_lines(proc)
        assert len(err) == 1 and BOB in err[0], show(proc)
        assert not any(line.startswith("OK") for line in lines(proc)), show(proc)


# == layers =======================================================================

NESTED_GOOD = ["nest/sign-encrypt/rsa-detached", "nest/sign-encrypt/rsa-opaque",
               "nest/sign-encrypt/p384-to-quinn", "nest/sign-encrypt/p256-gcm-to-pat",
               "nest/sign-encrypt/rsa-to-pat", "nest/encrypt-sign", "nest/triple"]


@pytest.mark.parametrize("name", NESTED_GOOD)
def test_nested_layers_verify(world, made, scratch, name):
    """Signed then encrypted (RSA, ECDH P-256 with GCM, P-384), encrypted then signed,
    and triple-wrapped (signed, encrypted, signed): --verify decrypts with our key,
    verifies every signature, names the sender's; -o gives the innermost content."""
    m = made[name]
    out = scratch / ("nest-v-%s.eml" % name.replace("/", "-"))
    proc = receive("verify", world, m.path, extra=["-o", out])
    assert_passes(proc, r"^OK - ", signed_by(m.signer))
    assert proc.stderr == b"", show(proc)
    assert_recovered(out, m.data, m.content)


@pytest.mark.parametrize("name", NESTED_GOOD)
def test_nested_layers_decrypt(world, made, scratch, name):
    """--decrypt on the same: 'decrypted for' our identity, and the signature inside
    reported as verified; -o gives the innermost content."""
    m = made[name]
    out = scratch / ("nest-d-%s.eml" % name.replace("/", "-"))
    proc = receive("decrypt", world, m.path, extra=["-o", out])
    assert_passes(proc, r"^OK - decrypted for %s\b" % re.escape(m.recipient.address),
                  signed_by(m.signer))
    assert_recovered(out, m.data, m.content)


@pytest.mark.parametrize("mode", ["verify", "decrypt"])
def test_tampered_inside_an_envelope(world, made, mode):
    """The signed content was altered before it was encrypted: decryption works, the
    signature inside does not verify: 65 in both modes."""
    m = made["nest/sign-encrypt/tampered"]
    proc = receive(mode, world, m.path)
    assert_failed(proc, m.path, TAMPERED)


@pytest.mark.parametrize("mode", ["verify", "decrypt"])
def test_forged_inside_an_envelope(world, made, mode):
    """frank's good signature inside an envelope sent From: mallory: 65, both named."""
    m = made["nest/sign-encrypt/forged"]
    proc = receive(mode, world, m.path)
    out, err = assert_failed(proc, m.path)
    for text in (out, err):
        assert MALLORY in text and FRANK in text, text


# == the command line =============================================================

@pytest.mark.parametrize("mode", ["verify", "decrypt"])
def test_missing_input_is_66(world, scratch, mode):
    """A file that is not there: 66, one stderr line naming it."""
    missing = scratch / "no-such-message.eml"
    proc = receive(mode, world, missing)
    assert proc.returncode == 66, show(proc)
    err = err_lines(proc)
    assert len(err) == 1 and "no-such-message.eml" in err[0], show(proc)


def test_missing_ca_bundle_is_78(world, made):
    """--ca /nonexistent/ca.pem: 78, one stderr line about the CA bundle."""
    m = made["rsa/detached"]
    proc = receive("verify", world, m.path, ca="/nonexistent/ca.pem")
    assert proc.returncode == 78, show(proc)
    err = err_lines(proc)
    assert len(err) == 1 and re.search(r"/nonexistent/ca\.pem|--ca|\bCA\b", err[0]), show(proc)


def test_several_inputs_one_prefixed_line_each(world, made):
    """Three files, one tampered: a 'PATH: ' line for each, 65 overall."""
    good1, good2 = made["rsa/detached"], made["p256/opaque"]
    bad = made["tampered/rsa/opaque"]
    proc = receive("verify", world, good1.path, good2.path, bad.path)
    assert proc.returncode == 65, show(proc)
    out = sorted(lines(proc))
    expected = sorted(["%s: %s" % (good1.path, good1.ok_line),
                       "%s: %s" % (good2.path, good2.ok_line)])
    assert [line for line in out if ": OK - " in line] == expected, show(proc)
    failed = [line for line in out if line.startswith(bad.path + ": FAILED - ")]
    assert len(out) == 3 and len(failed) == 1, show(proc)
    assert re.search(TAMPERED, failed[0], re.I), failed


def test_directory_input_and_output_directory(world, made, scratch):
    """A directory of .eml files (a note beside them is not mail), -o DIR: one prefixed
    OK line per message, exit 0, DIR/<name> holding each recovered message."""
    inbox, outdir = scratch / "inbox", scratch / "recovered"
    inbox.mkdir()
    outdir.mkdir()
    picks = {"a.eml": made["rsa/detached"], "b.eml": made["nest/sign-encrypt/rsa-opaque"],
             "c.eml": made["p384/opaque"]}
    for name, m in picks.items():
        shutil.copyfile(m.path, inbox / name)
    (inbox / "notes.txt").write_text("not a message")
    proc = receive("verify", world, inbox, extra=["-o", outdir])
    assert proc.returncode == 0, show(proc)
    out = lines(proc)
    assert len(out) == 3, show(proc)
    for name, m in picks.items():
        mine = [line for line in out if re.match(r".*\b%s: OK - " % re.escape(name), line)]
        assert len(mine) == 1 and re.search(signed_by(m.signer), mine[0]), show(proc)
        assert os.path.samefile(mine[0].split(": OK - ")[0], inbox / name)
        assert_recovered(outdir / name, m.data, m.content)


def test_ca_from_the_environment(world, made):
    """No --ca: $SMIME_CA_FILE is the trusted bundle."""
    m = made["rsa/opaque"]
    proc = run_tool(["--verify", m.path, "--keys", world.keys],
                    env={"SMIME_CA_FILE": world.cafile})
    assert_ok(proc, m.ok_line)


@pytest.mark.parametrize("name", ["rsa/detached", "untrusted/rsa/opaque",
                                  "untrusted/p256/detached"])
def test_every_root_of_a_bundle_is_trusted(world, made, name):
    """--ca with two roots (the rogue one first): signatures under either verify."""
    m = made[name]
    proc = receive("verify", world, m.path, ca=world.bundle)
    assert_ok(proc, m.ok_line)


def test_system_store_by_default(world, made):
    """Neither --ca nor $SMIME_CA_FILE: the system store, which does not hold the test
    root: 65, untrusted."""
    paths = ssl.get_default_verify_paths()
    if not any(p and os.path.isfile(p) for p in (paths.cafile, paths.openssl_cafile)):
        pytest.skip("no system CA bundle")
    m = made["rsa/opaque"]
    proc = receive("verify", world, m.path, ca=False)
    assert_failed(proc, m.path, UNTRUSTED)


def test_verbose_details_go_to_stderr(world, made):
    """-v: the same one OK line on stdout, details on stderr."""
    m = made["nest/sign-encrypt/rsa-detached"]
    proc = receive("verify", world, m.path, extra=["-v"])
    assert_passes(proc, r"^OK - ", signed_by(m.signer))
    assert proc.stderr.strip(), show(proc)


# == round trips: the tool's own mail, received ===================================

ROUND_TRIPS = {"rsa-sign": ("alice", "bob", "--sign"),
               "rsa-sign_detached": ("alice", "bob", "--sign_detached"),
               "ec-sign_detached": ("ann", "quinn", "--sign_detached"),
               "ec-sign": ("ann", "quinn", "--sign")}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_round_trip_of_our_own_mail(world, scratch, case):
    """The tool signs and encrypts (RSA alice -> bob; EC P-256 ann -> P-384 quinn); OpenSSL
    decrypts it and verifies it (the content it yields is the reference); then --verify
    and --decrypt with the recipient's keys only (no file of the sender's) pass, and -o
    recovers exactly the content OpenSSL verified."""
    sender_label, recipient_label, sign = ROUND_TRIPS[case]
    sender, recipient = world[sender_label], world[recipient_label]
    source = scratch / ("round-%s-in.eml" % case)
    source.write_bytes(("From: %s\r\nTo: %s\r\nSubject: round trip %s\r\n\r\n"
                        "Hello %s, a round trip.\r\n" % (sender.address, recipient.address,
                                                         case, recipient.address)).encode())
    proc = run_tool([str(source), "--keys", world.sender_keys, sign, "--encrypt"])
    assert proc.returncode == 0, show(proc)
    sent = proc.stdout
    inner = om.decrypt(sent, recipient).stdout
    content = engines.OpenSSL().verify(inner, world.cafile)
    assert b"a round trip." in content
    path = scratch / ("round-%s.eml" % case)
    path.write_bytes(sent)
    out = scratch / ("round-%s-out.eml" % case)
    proc = receive("verify", world, path, extra=["-o", out])
    assert_passes(proc, r"^OK - ", signed_by(sender))
    assert_recovered(out, sent, content)
    proc = receive("decrypt", world, path)
    assert_passes(proc, r"^OK - decrypted for %s\b" % re.escape(recipient.address),
                  signed_by(sender))


# == --harvest uses the same verifier =============================================

def harvest(world, path, keys):
    return run_tool(["--harvest", str(path), "--keys", str(keys), "--keys", world.keys,
                     "--ca", world.cafile])


@pytest.mark.parametrize("form", om.FORMS)
def test_harvest_refuses_a_tampered_signature(world, made, scratch, form):
    """frank's signed mail, one content byte flipped: 65, refused, no certificate saved."""
    m = made["tampered/rsa/%s" % form]
    keys = scratch / ("harvest-tampered-%s" % form)
    proc = harvest(world, m.path, keys)
    assert proc.returncode == 65, show(proc)
    assert lines(proc)[0].startswith("refused "), show(proc)
    assert not (keys / (FRANK + ".crt")).exists()


def test_harvest_through_an_ec_envelope(world, made, scratch):
    """frank's signed mail encrypted (ECDH) to pat, our P-256 identity: decrypted with
    pat's key, verified, frank's certificate saved."""
    m = made["nest/sign-encrypt/rsa-to-pat"]
    keys = scratch / "harvest-ec"
    proc = harvest(world, m.path, keys)
    assert proc.returncode == 0, show(proc)
    assert lines(proc)[0].startswith("saved %s: " % FRANK), show(proc)
    saved = (keys / (FRANK + ".crt")).read_bytes()
    assert om.pem_cert(world["frank"].cert) in saved


# == property: no single flipped byte of signed content verifies ===================

@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_flipped_byte_of_detached_content_verifies(world, made, scratch, data):
    """crlf/detached (its signed part on disk is exactly the signed bytes): flip any one
    byte of that part to any other value; OpenSSL refuses it, and so does --verify (65,
    one FAILED line)."""
    m = made["crlf/detached"]
    assert m.data.count(SIGNED) == 1
    start = m.data.index(SIGNED)
    at = data.draw(st.integers(start, start + len(SIGNED) - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    spoilt = om.flip(m.data, at, mask)
    proc, _ = om.openssl_verify(spoilt, "-CAfile", world.cafile)
    assert proc.returncode != 0, "OpenSSL verified a flipped byte at %d" % (at - start)
    path = scratch / "flipped.eml"
    path.write_bytes(spoilt)
    proc = receive("verify", world, path)
    assert proc.returncode == 65, show(proc)
    assert lines(proc)[0].startswith("FAILED - "), show(proc)


# == --decrypt of what is not encrypted; -o of what fails ==================================

@pytest.mark.parametrize("form", om.FORMS)
def test_decrypt_of_a_signed_message_says_not_encrypted(world, made, form):
    """--decrypt on a signed, unencrypted message: it passes, says so, and names the signer."""
    m = made["rsa/%s" % form]
    proc = receive("decrypt", world, m.path)
    assert_passes(proc, r"^OK - not encrypted, " + signed_by(world["frank"]))


def test_decrypt_of_plain_mail_passes(world, made):
    m = made["unsigned/plain"]
    assert_ok(receive("decrypt", world, m.path), "OK - not encrypted, not signed")


@pytest.mark.parametrize("mode", ["verify", "decrypt"])
def test_nothing_is_written_for_a_failing_message(world, made, scratch, mode):
    m = made["tampered/rsa/detached"]
    out = scratch / ("failed-%s.eml" % mode)
    proc = receive(mode, world, m.path, extra=["-o", out])
    assert_failed(proc, m.path, TAMPERED)
    assert not out.exists()
