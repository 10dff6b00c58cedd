#!/bin/sh
# This file is both a POSIX shell script and Python.  Run as ./sparkpostSMIME.py, the
# shell runs the next line, which starts python3 on this file through importlib, so the
# compiled copy in __pycache__ is reused and single runs skip recompiling the whole file
# (~25 ms per run).  "python3 sparkpostSMIME.py" runs it as a plain script.
''''exec "${SPARKPOST_SMIME_PYTHON:-python3}" -c "import sys; sys.dont_write_bytecode = False; from importlib.util import spec_from_file_location as f, module_from_spec as m; s = f('sparkpostSMIME', sys.argv[1]); t = m(s); sys.modules[s.name] = t; s.loader.exec_module(t); sys.argv = sys.argv[1:]; t.exit_now(t.main())" "$0" "$@" # '''

# /// script
# requires-python = ">=3.9"
# dependencies = [
#     "cryptography>=45",
#     "requests>=2.28",
#     "python-dotenv>=1.0",
#     "aiosmtpd>=1.4.6",
# ]
# ///

__doc__ = """sparkpostSMIME - S/MIME sign and/or encrypt a finished email, then inject it.

Usage:
    ./sparkpostSMIME.py EMLFILE|DIR [...] [--sign | --sign_detached] [--encrypt]
                        [--keys DIR] [-o FILE|DIR] [--send_smtp | --send_api] [options]
    ./sparkpostSMIME.py --verify | --decrypt EMLFILE|DIR [...] [--keys DIR] [--ca FILE]
                        [-o FILE|DIR] [--require_signed]
    ./sparkpostSMIME.py --harvest EMLFILE|DIR [...] [--keys DIR] [--ca FILE]
    ./sparkpostSMIME.py --serve [HOST:]PORT [--sign | --sign_detached] [--encrypt]
                        [--opportunistic] [--keys DIR] (--send_smtp | --send_api)
                        [--jobs N] [--results FILE] [--archive DIR] [-v]

Reads RFC 5322 messages ("-" is standard input), builds the S/MIME message
(RFC 8551) and writes it to standard output, or sends it over SMTP (RFC 5321)
or through the SparkPost transmissions API, one message or a batch (--jobs,
--repeat, --results, --resume, --archive).  --verify and --decrypt check what
arrives; --harvest saves the certificates of signed mail; --serve is an SMTP
relay that builds what applications send it.  ``--help`` lists
every option.

Keys and certificates are found by the addresses in the message, in each
``--keys DIR``, then each directory of ``$SMIME_KEYS_DIR`` (":"-separated),
then the current directory:
    <from>.pem            sender's private key (may also hold its certificate and chain)
    <from>.crt            sender's certificate (when the .pem holds only the key)
    <from>.p12 / .pfx     sender's key and certificates in one PKCS#12 file
    <from>.p11            a PKCS#11 URI (RFC 7512) of the sender's key on a token
                          (HSM, smartcard), beside <from>.crt
    <recipient>.crt       each recipient's certificate (for --encrypt); it may hold an
                          old one and its renewal: the one valid now that expires last is used

Environment:
    SMIME_KEYS_DIR        extra key directories, ":"-separated
    SMIME_KEY_PASSWORD    passphrase of encrypted .pem keys and PKCS#12 files
    SMIME_CA_FILE         trusted roots for --verify, --decrypt and --harvest
    SMIME_REVOCATION      off, soft (default) or hard: CRL and OCSP checks (--revocation)
    SMIME_CRL_FILES       local CRLs (DER or PEM), ":"-separated, for offline sites
    PKCS11_MODULE, PKCS11_PIN   the PKCS#11 module and its user PIN (.p11 keys)
    SMTP_HOST, SMTP_PORT, SMTP_USER, SMTP_PASSWORD, SMTP_TLS, SMTP_CAFILE,
    SMTP_TLS_VERIFY, SMTP_TIMEOUT, SMTP_SPARKPOST, SMTP_HELO     (--send_smtp)
    SPARKPOST_API_KEY, SPARKPOST_HOST, SPARKPOST_TIMEOUT          (--send_api)
    SMIME_GATEWAY_TLS_CERT, SMIME_GATEWAY_TLS_KEY, SMIME_GATEWAY_USER,
    SMIME_GATEWAY_PASSWORD, SMIME_GATEWAY_TIMEOUT, SMIME_GATEWAY_CONNECTIONS,
    SMIME_GATEWAY_CONNECTIONS_PER_CLIENT                                 (--serve)

Exit codes (sysexits.h):
    0 ok, 64 usage, 65 unusable message, 66 input missing or unreadable,
    69 permanent delivery failure, 70 internal error, 73 an output cannot be
    created, 74 an output could not be written (full disk), 75 temporary failure,
    77 authentication refused, 78 configuration (setting, key or certificate),
    130 interrupted.
"""

import argparse
import base64
import binascii
import calendar
import collections
import functools
import hashlib
import heapq
import itertools
import marshal
import mmap
import os
import re
import select
import signal
import socket
import struct
import sys
import time
import warnings
from datetime import datetime, timezone
from typing import NamedTuple
from urllib.parse import urlsplit

# cryptography, for signing, encrypting and reading S/MIME: a run that needs it and
# cannot load it (not installed, too old, a wheel built for another Python) stops
# with one line naming it (require()), not with a traceback here.
# cryptography.x509 (~30 ms) is imported by the code that reads certificates with it.
try:
    with warnings.catch_warnings():  # a warning of its own is not our output either
        warnings.simplefilter("ignore")
        import cryptography  # noqa: F401 - its version is checked by require()
        from cryptography import exceptions as crypto_errors
        from cryptography.hazmat.primitives import hashes, keywrap, serialization
        from cryptography.hazmat.primitives import ciphers
        from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
        from cryptography.hazmat.primitives.kdf import hkdf, x963kdf
    CRYPTOGRAPHY_PROBLEM = None
except Exception as exc:  # noqa: BLE001 - any failure to load is reported by require()
    CRYPTOGRAPHY_PROBLEM = exc
try:
    from cryptography.hazmat.primitives.asymmetric import mlkem
except ImportError:  # cryptography < 47 has no ML-KEM (FIPS 203)
    mlkem = None


__version__ = "1.0.0"


###############################################################################
# Constants ###################################################################
###############################################################################

EX_OK = 0
EX_USAGE = 64        #: command line usage error
EX_DATAERR = 65      #: the message cannot be used
EX_NOINPUT = 66      #: input file missing or unreadable
EX_UNAVAILABLE = 69  #: permanent delivery failure
EX_SOFTWARE = 70     #: internal error (a bug)
EX_CANTCREAT = 73    #: an output file cannot be created
EX_IOERR = 74        #: an output could not be written (a full disk)
EX_TEMPFAIL = 75     #: temporary failure: try again later
EX_NOPERM = 77       #: authentication refused
EX_CONFIG = 78       #: missing/bad setting, key or certificate
#: SMTP replies that put authentication at fault (RFC 4954 6): required, mechanism too
#: weak, credentials invalid.
AUTH_CODES = (530, 534, 535)

#: RFC 5322 2.1.1: lines must not exceed 998 octets, CRLF excluded.
MAX_LINE = 998
#: RFC 2045 6.8: base64 lines are at most 76 characters.
BASE64_LINE = 76
#: Header fields that carry addresses (RFC 5322 3.6.2, 3.6.3).
ADDRESS_FIELDS = {"from", "sender", "reply-to", "to", "cc", "bcc",
                  "resent-from", "resent-sender", "resent-to", "resent-cc"}
#: Recipient fields, in the order recipients are collected.
RECIPIENT_FIELDS = ("to", "cc", "bcc")
#: Content ciphers offered by --cipher (RFC 8551 2.7: AES-128 CBC MUST, AES-256 CBC SHOULD).
CIPHERS = ("aes256", "aes128")
#: Characters left as they are in RFC 2231 extended parameter values.
RFC2231_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: Messages sent on one SMTP connection before a new one (SparkPost's guidance).
MESSAGES_PER_CONNECTION = 100
#: Messages built ahead at most while the SMTP server has not answered yet.
BUILT_AHEAD = 4
#: Longest wait between two attempts at one message, and all waits for it, in seconds.
MAX_RETRY_WAIT, MAX_TOTAL_WAIT = 30.0, 45.0
#: Messages from which a progress bar replaces per-message lines on a terminal.
PROGRESS_MIN = 50
#: SparkPost's limits for a transmission (API "Transmissions", RFC 822 content).
MAX_CAMPAIGN_ID, MAX_RFC822 = 64, 20_000_000
#: Base64 lines cut by one struct.unpack call (a 3 KB format string).
LINES_PER_CUT = 1024
#: A built message larger than this many octets is kept as Chunks, made again as it is
#: written (memory that does not grow with the message); a smaller one as bytes.
STREAM_ABOVE = 2 << 20
#: Octets a big message is made in at a time (base64, AES-CBC, dot-stuffing): whole
#: base64 groups of 57 octets (one 76-character line) and whole AES blocks of 16.
STREAM_BLOCK = 57 * 16 * 1024
#: A big output file is handed to the disk as it is written, this many octets at a time.
WRITEBACK_EVERY = 8 << 20
#: Private key files tried for a sender, in this order, in each key directory.
KEY_SUFFIXES = (".pem", ".p12", ".pfx", ".p11")
#: When signing, a Date farther than this many seconds from the signing time is replaced.
DATE_SKEW = 300
#: Thunderbird (NSS) calls a signature not valid when its signing-time is more than this
#: many seconds from the message's Date, or when there is no Date it can read.
CLIENT_DATE_SKEW = 3600
#: Limits on what we read: every message is hostile (README "Limits").  A header (of the
#: message or of a MIME part) larger than this, in octets, is refused.
MAX_HEADER_SIZE = 1 << 20
#: MIME entities nested deeper than this (multiparts, message/rfc822) are refused.
MAX_MIME_DEPTH = 50
#: MIME parts in one message, at every level together, at most.
MAX_MIME_PARTS = 10_000
#: A message with more Received fields than this is in a mail loop (RFC 5321 6.3 asks for a
#: limit of at least 100 hops; Postfix's hopcount_limit is 50); SMIME_HOP_LIMIT sets it.
HOP_LIMIT = 50
#: Longest OBJECT IDENTIFIER and INTEGER read from CMS, in contents octets.
MAX_OID_OCTETS, MAX_INTEGER_OCTETS = 128, 128
#: Most ASN.1 elements read from one S/MIME part (OpenSSL writes 4 KB chunks: a 20 MB
#: message is about 5,000 of them).
MAX_BER_ELEMENTS = 250_000
#: Most SignerInfos and certificates in one SignedData, RecipientInfos (recipient keys)
#: in one EnvelopedData.
MAX_SIGNER_INFOS, MAX_CERTIFICATES, MAX_RECIPIENT_INFOS = 32, 64, 1000
#: The smallest RSA key that may sign what we verify (CAs and signers alike).
MIN_RSA_BITS = 2048
#: Output files of a batch made durable together (one sync of their file system): at most
#: this many files or octets, or what is pending after this many seconds (OutputGroup;
#: fewer files under a low RLIMIT_NOFILE: each stays open until its group is named).
GROUP_FILES, GROUP_BYTES, GROUP_SECONDS = 256, 16 << 20, 0.5
#: Journal rows (--results) of a batch made durable together: up to this many, or what is
#: pending after GROUP_SECONDS (see Recorder).
GROUP_ROWS = 64


###############################################################################
# Errors ######################################################################
###############################################################################
# One root carrying its exit code, one subclass per kind of fault.  Outcomes of
# a delivery (a refusal, a 4xx) are values (Outcome), not exceptions.

class SmimeToolError(Exception):
    """Root of every error this tool reports; carries its exit code (and a *hint*)."""
    exit_code = EX_SOFTWARE
    hint = ""


class UsageError(SmimeToolError):
    """Bad or conflicting command-line options."""
    exit_code = EX_USAGE


class InputError(SmimeToolError):
    """An input file is missing or unreadable."""
    exit_code = EX_NOINPUT


class MessageError(SmimeToolError):
    """The message itself cannot be used (not RFC 5322, no From, no recipient)."""
    exit_code = EX_DATAERR


class LoopError(MessageError):
    """The message has passed more hops than the hop limit: a mail loop (RFC 5321 6.3)."""
    reply = "554 5.4.6"


class ConfigError(SmimeToolError):
    """A setting is missing or malformed."""
    exit_code = EX_CONFIG


class IdentityError(ConfigError):
    """A key or certificate is missing, unreadable or unfit for its use."""


class TlsError(ConfigError):
    """The server's TLS certificate is not trusted, or is for another name."""


class ServiceError(SmimeToolError):
    """A fault on our side while the gateway serves, which the operator can mend (a key
    file that opened at start-up and does not now): 451 4.3.0, the client keeps the
    message and tries again."""
    exit_code = EX_TEMPFAIL


class AuthError(SmimeToolError):
    """The server refused our credentials (SMTP 530/535, API 401/403)."""
    exit_code = EX_NOPERM


class DependencyError(SmimeToolError):
    """A package this run needs is not installed (69), or is installed but too old or
    cannot be loaded (78, as a setting would be)."""

    def __init__(self, text, exit_code=EX_UNAVAILABLE):
        super().__init__(text)
        self.exit_code = exit_code


class DeliveryError(SmimeToolError):
    """A session could not be opened or went away (connection, timeout, a 4xx/5xx
    greeting); *exit_code* 75 when trying later may help, 69 when it will not."""

    def __init__(self, text, exit_code=EX_TEMPFAIL):
        super().__init__(text)
        self.exit_code = exit_code


class Finished(Exception):
    """--help or --version has been printed: end with *status* (not an error)."""

    def __init__(self, status=0):
        super().__init__(status)
        self.status = status


class OutputError(SmimeToolError):
    """A fault on our side: an output, journal, archive or certificate file cannot
    be created (73, EX_CANTCREAT) or written (74, EX_IOERR)."""

    def __init__(self, text, exit_code=EX_IOERR, reason=""):
        super().__init__(text)
        self.exit_code = exit_code
        self.reason = reason  #: the system's own words (strerror), for a caller's message


def smtp_exit_code(code):
    """Map an SMTP reply code to an exit code (RFC 5321 4.2.1, RFC 4954 6).

    530/534/535 (authentication) -> 77; 4xx (transient) -> 75; anything else -> 69.
    """
    if code in AUTH_CODES:
        return EX_NOPERM
    return EX_TEMPFAIL if 400 <= code < 500 else EX_UNAVAILABLE


#: Packages some runs need: import name -> (PyPI name, least version, who needs it);
#: requirements.txt asks for the same versions.
DEPENDENCIES = {"cryptography": ("cryptography", (45,), "S/MIME"),
                "requests": ("requests", (2, 28), "--send_api"),
                "dotenv": ("python-dotenv", (1, 0), "--env and .env files"),
                "aiosmtpd": ("aiosmtpd", (1, 4, 6), "--serve"),
                "pkcs11": ("python-pkcs11", (0, 10), "PKCS#11 keys (.p11)")}


def require(name):
    """Return the dependency *name* (a DEPENDENCIES key), imported and checked.

    Raises DependencyError naming the package, the version found and the one
    needed, and the Python that ran: 69 when it is not installed, 78 when it is too
    old or cannot be loaded (a wheel built for another Python).
    """
    package, least, purpose = DEPENDENCIES[name]
    needed = "%s >= %s" % (package, ".".join(map(str, least)))
    where = "for %s, with %s" % (purpose, sys.executable)
    try:
        if name == "cryptography" and CRYPTOGRAPHY_PROBLEM is not None:
            raise CRYPTOGRAPHY_PROBLEM
        module = __import__(name)
    except Exception as exc:  # noqa: BLE001 - whatever stops it from loading
        if isinstance(exc, ModuleNotFoundError) and exc.name == name:
            raise DependencyError("%s is not installed: %s is needed %s: pip install '%s'"
                                  % (package, needed, where, needed)) from None
        raise DependencyError("%s cannot be loaded (%s: %s): %s is needed %s" % (
            package, type(exc).__name__, exc, needed, where), EX_CONFIG) from None
    found = dependency_version(name, module)
    if found < least:
        raise DependencyError("%s %s is too old: %s is needed %s: pip install -U '%s'" % (
            package, ".".join(map(str, found)) or "(unknown version)", needed, where, needed),
            EX_CONFIG)
    return module


def dependency_version(name, module):
    """Return the version of the imported dependency *module* as a tuple of numbers."""
    if name == "dotenv":
        from dotenv.version import __version__ as text
    elif name == "pkcs11":  # it has no __version__
        from importlib.metadata import version
        text = version("python-pkcs11")
    else:
        text = getattr(module, "__version__", "")
    numbers = re.match(r"[\d.]*", text).group().strip(".")
    return tuple(int(n) for n in numbers.split(".") if n)


###############################################################################
# Settings ####################################################################
###############################################################################
# One immutable Settings, built once by load_settings(): defaults < env files
# (--env, ./.env) < the real environment < command line.  Env files are read
# into a mapping, never written into os.environ; secrets come only from the
# environment or an env file and are redacted from everything printed.

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
TLS_MODES = ("auto", "starttls", "tls", "none")
SPARKPOST_SMTP_HOSTS = ("smtp.sparkpostmail.com", "smtp.eu.sparkpostmail.com")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def env_text(env, name, default=""):
    """Return the variable *name* of mapping *env*, stripped, or *default*."""
    return env.get(name, default).strip() or default


def env_path(env, name):
    """Return the path setting *name*, with ~ and $HOME made the home directory (as a
    shell would: env files and service managers leave them as they are)."""
    return home_path(env_text(env, name), env)


def home_path(path, env):
    """Return *path* with a leading ~ (or ~/) and each $HOME or ${HOME} made the home
    directory: *env*'s HOME, else the user's."""
    home = env.get("HOME") or os.path.expanduser("~")
    path = re.sub(r"\$\{HOME\}|\$HOME\b", lambda _: home, path)
    return home + path[1:] if path == "~" or path.startswith("~/") else path


def env_bool(env, name, default):
    """Return an on/off variable.  Raises ConfigError."""
    value = env_text(env, name).lower()
    if not value:
        return default
    if value in TRUE_WORDS or value in FALSE_WORDS:
        return value in TRUE_WORDS
    raise ConfigError("%s=%r: use 1 or 0" % (name, value))


def env_number(env, name, default, kind=int, low=1, high=None):
    """Return a numeric variable within [low, high].  Raises ConfigError."""
    value = env_text(env, name)
    if not value:
        return default
    try:
        number = kind(value)
        if not number == number or number in (float("inf"), float("-inf")):
            raise ValueError  # nan or infinity
        if number < low or (high is not None and number > high):
            raise ValueError
    except ValueError:
        span = "%s-%s" % (low, high) if high else "at least %s" % low
        raise ConfigError("%s=%r is not a valid number (%s)" % (name, value, span))
    return number


class SmtpSettings(NamedTuple):
    """SMTP injection settings (RFC 5321, RFC 3207 STARTTLS, RFC 8314 implicit TLS)."""
    host: str
    port: int
    user: str = ""
    password: str = ""
    tls: str = "auto"
    cafile: str = ""
    verify: bool = True
    timeout: float = 60.0
    sparkpost: bool = False
    helo: str = ""

    @classmethod
    def from_env(cls, env):
        """Build and check the settings from the SMTP_* variables of *env*.

        Raises ConfigError naming the variable at fault.
        """
        host = env_text(env, "SMTP_HOST")
        if not host:
            raise ConfigError("SMTP_HOST is not set: export SMTP_HOST=<your MTA or "
                              "smtp.sparkpostmail.com> (see my_envs.sh.example)")
        tls = env_text(env, "SMTP_TLS", "auto").lower()
        if tls not in TLS_MODES:
            raise ConfigError("SMTP_TLS=%r: use one of %s" % (tls, ", ".join(TLS_MODES)))
        user, password = env_text(env, "SMTP_USER"), env.get("SMTP_PASSWORD", "")
        if bool(user) != bool(password):
            missing = "SMTP_PASSWORD" if user else "SMTP_USER"
            raise ConfigError("%s is not set: SMTP authentication needs both SMTP_USER and "
                              "SMTP_PASSWORD (or neither, for an internal MTA)" % missing)
        if user and tls == "none":  # what login() would refuse: said before any run
            raise ConfigError("SMTP_TLS=none with SMTP_USER/SMTP_PASSWORD: credentials never go "
                              "over an unencrypted connection: use SMTP_TLS=starttls or tls, "
                              "or unset the credentials for an internal MTA")
        cafile = env_path(env, "SMTP_CAFILE")
        if cafile and not os.access(cafile, os.R_OK):
            raise ConfigError("SMTP_CAFILE=%s: cannot read this file" % cafile)
        return cls(host=host, port=env_number(env, "SMTP_PORT", 465 if tls == "tls" else 25,
                                               high=65535),
                   user=user, password=password, tls=tls, cafile=cafile,
                   verify=env_bool(env, "SMTP_TLS_VERIFY", True),
                   timeout=env_number(env, "SMTP_TIMEOUT", 60.0, float, low=0.1),
                   sparkpost=env_bool(env, "SMTP_SPARKPOST", host.lower() in SPARKPOST_SMTP_HOSTS),
                   helo=env_text(env, "SMTP_HELO"))

    def __repr__(self):
        return "SmtpSettings(%s)" % self.describe()

    def describe(self):
        """Return 'host, port N, user="u", password="***"' (never the password)."""
        creds = ', user="%s", password="***"' % self.user if self.user else ""
        return "%s, port %d%s" % (self.host, self.port, creds)

    def secrets(self):
        """Return what must never be printed: the password and the AUTH PLAIN string."""
        return (self.password, "\0%s\0%s" % (self.user, self.password)) if self.password else ()


class ApiSettings(NamedTuple):
    """SparkPost transmissions API settings."""
    key: str
    base_url: str = "https://api.sparkpost.com/api/v1"
    timeout: float = 60.0

    def __repr__(self):
        return "ApiSettings(%s, key=***)" % self.base_url

    @classmethod
    def from_env(cls, env):
        """Build and check the settings from the SPARKPOST_* variables.  Raises ConfigError."""
        key = env.get("SPARKPOST_API_KEY", "").strip()
        if not key:
            raise ConfigError("SPARKPOST_API_KEY is not set: export SPARKPOST_API_KEY=<an API key "
                              "with Transmissions: Read/Write>")
        return cls(key=key, base_url=api_base_url(env_text(env, "SPARKPOST_HOST",
                                                            "https://api.sparkpost.com")),
                   timeout=env_number(env, "SPARKPOST_TIMEOUT", 60.0, float, low=0.1))

    def secrets(self):
        return (self.key,)


class GatewaySettings(NamedTuple):
    """--serve: where the gateway listens, and its SMIME_GATEWAY_* settings (STARTTLS,
    RFC 3207, with our certificate; AUTH, RFC 4954, against one user and password)."""
    host: str
    port: int
    cert: str = ""
    key: str = ""
    user: str = ""
    password: str = ""
    timeout: float = 300.0       #: seconds a client may stay silent (RFC 5321 4.5.3.2.7)
    connections: int = 100       #: clients served at once
    per_client: int = 20         #: connections at once from one client address

    def __repr__(self):
        return "GatewaySettings(%s:%d, password=***)" % (self.host, self.port)

    @classmethod
    def from_env(cls, env, host, port, trusted):
        """Build and check the settings of a gateway listening on *host*:*port*.

        Raises ConfigError: a file that cannot be read, a user without a
        password, AUTH without TLS, or a non-loopback address without STARTTLS
        and AUTH (unless *trusted*: --trusted_network).
        """
        cert, key = env_path(env, "SMIME_GATEWAY_TLS_CERT"), env_path(env, "SMIME_GATEWAY_TLS_KEY")
        if bool(cert) != bool(key):
            raise ConfigError("STARTTLS needs both SMIME_GATEWAY_TLS_CERT and "
                              "SMIME_GATEWAY_TLS_KEY (PEM files)")
        for name, path in (("SMIME_GATEWAY_TLS_CERT", cert), ("SMIME_GATEWAY_TLS_KEY", key)):
            if path and not os.access(path, os.R_OK):
                raise ConfigError("%s=%s: cannot read this file" % (name, path))
        user, password = env_text(env, "SMIME_GATEWAY_USER"), env.get("SMIME_GATEWAY_PASSWORD", "")
        if bool(user) != bool(password):
            raise ConfigError("AUTH needs both SMIME_GATEWAY_USER and SMIME_GATEWAY_PASSWORD")
        if user and not cert:
            raise ConfigError("SMIME_GATEWAY_USER: AUTH is offered only after STARTTLS, so that "
                              "passwords never travel in clear: set SMIME_GATEWAY_TLS_CERT and "
                              "SMIME_GATEWAY_TLS_KEY too")
        if not is_loopback(host) and not (cert and user) and not trusted:
            raise ConfigError("--serve %s:%d listens beyond loopback: set SMIME_GATEWAY_TLS_CERT, "
                              "SMIME_GATEWAY_TLS_KEY, SMIME_GATEWAY_USER and SMIME_GATEWAY_PASSWORD "
                              "(STARTTLS and AUTH), or add --trusted_network if only trusted "
                              "hosts can reach it" % (host, port))
        return cls(host, port, cert, key, user, password,
                   env_number(env, "SMIME_GATEWAY_TIMEOUT", 300.0, float, low=1, high=3600),
                   env_number(env, "SMIME_GATEWAY_CONNECTIONS", 100, high=10000),
                   env_number(env, "SMIME_GATEWAY_CONNECTIONS_PER_CLIENT", 20, high=10000))

    secrets = SmtpSettings.secrets  #: the password and the AUTH PLAIN string


def parse_listen(text):
    """Return (host, port) of --serve [HOST:]PORT ('[::1]:2525' for IPv6; default host
    127.0.0.1).  Raises UsageError."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep:
        host = "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536 or (sep and not host):
        raise UsageError("--serve %r: expected [HOST:]PORT, e.g. 10025 or 127.0.0.1:10025" % text)
    return host, int(port)


def api_base_url(host):
    """Return '<scheme>://<host>/api/v1' from SPARKPOST_HOST.  Raises ConfigError.

    A bare host gets https://; a trailing '/' or '/api/v1' is tolerated;
    http:// is accepted only for loopback, so the API key never travels in clear.
    """
    url = host if "://" in host else "https://" + host
    url = url.rstrip("/")
    if url.endswith("/api/v1"):
        url = url[:-len("/api/v1")].rstrip("/")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:
        hostname = None
    if parts.scheme not in ("https", "http") or not hostname:
        raise ConfigError("SPARKPOST_HOST=%r is not an https:// URL or host name" % host)
    if parts.scheme == "http" and not is_loopback(hostname):
        raise ConfigError("SPARKPOST_HOST=%r: http:// would send the API key in clear; use "
                          "https:// (http:// is allowed only for loopback test servers)" % host)
    return url + "/api/v1"


def is_loopback(host):
    """True for localhost, 127.0.0.0/8 and ::1."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


class Settings(NamedTuple):
    """Everything a run needs, checked once and frozen: the command line's options,
    then what the environment and env files set (the *_dirs*, *key_password*,
    *ca_file*, *cache_dir*, *smtp* and *api* fields)."""
    inputs: tuple
    sign_mode: str = ""          #: "", "opaque" or "detached"
    encrypt: bool = False
    cipher: str = "aes256"
    pq_only: bool = False        #: --pq_only: every copy post-quantum (ML-KEM)
    keys: tuple = ()             #: --keys directories
    output: str = ""
    send: str = ""               #: "", "smtp" or "api"
    track: bool = False
    campaign: str = "sparkpost-SMIME"
    mail_from: str = ""
    headers: tuple = ()          #: extra outer header lines, CRLF-terminated bytes
    env_files: tuple = ()
    dry_run: bool = False
    keep_date: bool = False      #: when signing, leave the input's Date as it is
    verbose: bool = False
    retries: int = 3
    harvest: bool = False
    verify: bool = False
    decrypt: bool = False
    require_signed: bool = False  #: --decrypt refuses content without a valid signature
    ca: str = ""
    jobs: int = 1
    repeat: int = 1
    results: str = ""
    resume: bool = False
    archive: str = ""
    retry_delay: float = 1.0
    key_dirs: tuple = (".",)     #: --keys, then $SMIME_KEYS_DIR, then "."
    key_password: bytes = None   #: $SMIME_KEY_PASSWORD
    ca_file: str = ""            #: --ca, else $SMIME_CA_FILE
    revocation: str = ""         #: --revocation, else $SMIME_REVOCATION, else soft
    crl_files: tuple = ()        #: $SMIME_CRL_FILES: local CRLs (offline sites)
    cache_dir: str = ""          #: $XDG_CACHE_HOME/sparkpostSMIME
    hop_limit: int = HOP_LIMIT   #: $SMIME_HOP_LIMIT: Received fields a sent message may have
    smtp: SmtpSettings = None
    api: ApiSettings = None
    notices: tuple = ()          #: warnings found while loading (exposed env files...)
    serve: tuple = ()            #: --serve (host, port)
    opportunistic: bool = False  #: --serve: encrypt only when every recipient has a certificate
    max_size: int = 20_000_000   #: --serve: the SIZE we announce and enforce (RFC 1870)
    trusted_network: bool = False
    gateway: GatewaySettings = None
    pkcs11_module: str = ""      #: $PKCS11_MODULE: the PKCS#11 module of .p11 keys
    pkcs11_pin: str = ""         #: $PKCS11_PIN: its user PIN (a secret)

    def secrets(self):
        """Return every secret the settings hold, for redaction."""
        found = (self.key_password.decode("utf-8", "replace"),) if self.key_password else ()
        found += (self.pkcs11_pin,) if self.pkcs11_pin else ()
        for part in (self.smtp, self.api, self.gateway):
            found += part.secrets() if part is not None else ()
        return found


def load_settings(argv, environ):
    """Return the Settings of a run: *argv* checked, then env files, then *environ*.

    Raises UsageError for the command line, ConfigError for a setting.
    """
    settings = parse_args(argv)
    env, notices = read_env_files(settings.env_files)
    env.update(environ)  # the real environment wins over the files
    dirs = [home_path(d, env) for d in list(settings.keys)
            + env.get("SMIME_KEYS_DIR", "").split(":") if d]
    cache = env_path(env, "XDG_CACHE_HOME") or home_path("~/.cache", env)
    password = env.get("SMIME_KEY_PASSWORD")
    smtp = SmtpSettings.from_env(env) if settings.send == "smtp" else None
    if smtp is not None and not smtp.verify:
        notices += ("TLS certificate verification is OFF (SMTP_TLS_VERIFY=0): anyone on the "
                    "path can intercept the connection and the credentials",)
    return settings._replace(
        key_dirs=tuple(dirs + ["."]), key_password=password.encode("utf-8") if password else None,
        ca_file=home_path(settings.ca, env) or env_path(env, "SMIME_CA_FILE"),
        revocation=revocation_policy(settings.revocation, env),
        crl_files=tuple(home_path(f, env) for f in env.get("SMIME_CRL_FILES", "").split(":")
                        if f),
        cache_dir=os.path.join(cache, "sparkpostSMIME"), smtp=smtp,
        hop_limit=env_number(env, "SMIME_HOP_LIMIT", HOP_LIMIT, high=1000),
        api=ApiSettings.from_env(env) if settings.send == "api" else None, notices=notices,
        gateway=GatewaySettings.from_env(env, *settings.serve, settings.trusted_network)
        if settings.serve else None, pkcs11_module=env_path(env, "PKCS11_MODULE"),
        pkcs11_pin=env.get("PKCS11_PIN", ""))


def revocation_policy(option, env):
    """Return --revocation, else $SMIME_REVOCATION, else 'soft'.  Raises ConfigError."""
    policy = option or env.get("SMIME_REVOCATION", "").strip().lower() or "soft"
    if policy not in REVOCATION_POLICIES:
        raise ConfigError("SMIME_REVOCATION=%s: use off, soft or hard" % policy)
    return policy


def read_env_files(paths):
    """Return ({name: value} of the env files, (warnings,)): *paths*, then ./.env if any.

    python-dotenv syntax ("export" allowed).  Raises ConfigError for an unreadable file.
    """
    files = list(paths) + ([".env"] if trusted_dot_env() else [])
    values, notices = {}, ()
    if not files:
        return values, notices
    for path in files:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ConfigError("--env %s: cannot read this file" % path)
        notices += exposed(path, "env file")
        values.update((k, v) for k, v in require("dotenv").dotenv_values(path).items()
                      if v is not None and k not in values)
    return values, notices


def trusted_dot_env():
    """True when ./.env exists, belongs to us and only we may change it.

    It is read without being named: a file planted in the current directory must
    not be able to set SMTP_HOST, or SMIME_CA_FILE for --verify.
    """
    try:
        st = os.stat(".env")
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def exposed(path, what):
    """Return (a warning,) when a file holding secrets is readable by group or others."""
    try:
        if os.stat(path).st_mode & 0o077:
            return ("%s %s is readable by group or others: chmod 0600 %s" % (what, path, path),)
    except OSError:
        pass
    return ()


def several_outputs(settings):
    """Check that a run of several messages has somewhere to put them: -o DIR when it
    writes them, a directory for the recovered messages of --verify/--decrypt -o.
    Raises UsageError."""
    if (settings.output or not (settings.send or settings.verify)) and not (
            settings.output and os.path.isdir(settings.output)):
        raise UsageError("several inputs need -o DIR (an existing directory) for the outputs")


###############################################################################
# Output: the one reporter, atomic files ######################################
###############################################################################
# Everything printed goes through a Reporter: report lines on stdout (the
# product when sending), warnings, errors and transcripts on stderr, every
# line redacted.  Files are written unnamed (O_TMPFILE) in their directory, or
# to a temporary name (a Maildir's tmp/, a file system without unnamed files),
# then named once on disk: nothing partial is ever left behind.

class Reporter:
    """Writes every line the tool prints, redacted; warns once per topic.

    Raises OutputError (74) when standard output cannot be written (a full
    device); a closed pipe raises BrokenPipeError, which main() ends quietly.
    """

    def __init__(self, verbose=False):
        self.verbose, self.secrets, self.warned, self.opened = verbose, [], set(), False
        self.closed = False  #: standard output's reader has gone
        self.words = set()  #: secrets that are plain words: masked in transcripts only

    def secret(self, value):
        """Remember a secret and its base64 forms (at every alignment) for redact().

        A secret that is a short plain word ("wrong") is masked in transcripts, where
        it stands as a value, but not in reports and errors, whose own words it
        would otherwise turn into *** ("(*** password or corrupt)"): no report or
        error of ours holds a secret, and a server or library would have to echo it.
        """
        if not value or len(value) < 3:
            return
        raw = value.encode("utf-8")
        if value.isalpha() and len(value) < 8:
            self.words.add(value)
        forms = {value}
        for pad in range(3):  # the secret's base64 at each of the three byte alignments
            text = base64.b64encode(b"\0" * pad + raw).decode()
            skip = (pad * 4 + 2) // 3 if pad else 0
            forms.add(text[skip:len(text) - 4].rstrip("=") if len(raw) > 6 else text[skip:])
        self.secrets.extend(sorted((f for f in forms if len(f) >= 3), key=len, reverse=True))

    def redact(self, text, everywhere=False):
        """Return *text* with every registered secret replaced by ***; a plain-word
        secret only when *everywhere* (transcripts)."""
        for secret in self.secrets:
            if secret in text and (everywhere or secret not in self.words):
                text = text.replace(secret, "***")
        return text

    def say(self, text):
        """Write report lines to stdout, at once (one write: lines of workers never mix)."""
        write_stdout((self.redact(text) + "\n").encode("utf-8", "replace"))

    def warn(self, text, topic=None):
        """Write one diagnostic line to stderr; with *topic*, only the first time."""
        if topic is not None:
            if topic in self.warned:
                return
            self.warned.add(topic)
        try:
            sys.stderr.write("sparkpostSMIME: %s\n" % self.redact(text))
            sys.stderr.flush()
        except OSError:  # stderr is gone or full: the exit code still tells
            pass

    def transcript(self, line):
        """Write one verbose transcript line (swaks-style glyphs) to stderr."""
        sys.stderr.write(self.redact(line, everywhere=True) + "\n")

    def stdout_closed(self):
        """Standard output's reader has gone: send what would follow to /dev/null."""
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        self.closed = True

    def session(self, line):
        """Report an opened session: the 'Opened ...' line, the first time only."""
        if not self.opened and line:
            self.opened = True
            self.say(line)


class Chunks:
    """Bytes made on demand, in order, a chunk at a time: a big message, never held whole.

    len() is known before anything is made; each iteration runs *make* (a function
    returning an iterator of bytes-like chunks) and makes the same bytes again.
    Chunks.joined() puts bytes-like objects and other Chunks one after the other.
    """

    __slots__ = ("size", "make")

    def __init__(self, size, make):
        self.size, self.make = size, make

    @classmethod
    def joined(cls, *parts):
        """Return the Chunks of *parts* (bytes-like objects and Chunks) one after the other."""
        parts = [part for part in parts if len(part)]
        return cls(sum(map(len, parts)), lambda: flatten(parts))

    def __len__(self):
        return self.size

    def __iter__(self):
        return iter(self.make())

    def __radd__(self, head):
        """bytes + Chunks: *head* (a Received field) before them."""
        return Chunks.joined(head, self)

    def __bytes__(self):
        return b"".join(self)


def flatten(parts):
    """Yield the chunks of *parts*: bytes-like objects as they are, Chunks made."""
    for part in parts:
        if isinstance(part, Chunks):
            yield from part
        else:
            yield part


def pieces_of(data):
    """Return *data* (bytes-like, a list or tuple of them, or Chunks) as an iterable of chunks."""
    return data if isinstance(data, (Chunks, list, tuple)) else (data,)


def slices(data):
    """Yield the bytes of *data* (see pieces_of()) as bytes of at most STREAM_BLOCK octets."""
    for chunk in flatten(pieces_of(data)):
        for at in range(0, len(chunk), STREAM_BLOCK):
            yield bytes(chunk[at:at + STREAM_BLOCK])


def blocks(data, size):
    """Yield the bytes of *data* (Chunks or bytes-like) in blocks of exactly *size* octets,
    the last one shorter: slices of a chunk holding whole blocks, a join where one
    straddles chunks (a message is never copied whole; a small one is one join)."""
    if len(data) <= size:
        yield b"".join(pieces_of(data))
        return
    held, count = [], 0
    for chunk in pieces_of(data):
        view = memoryview(chunk)
        if count:
            head, view = view[:size - count], view[size - count:]
            held.append(head)
            count += len(head)
            if count < size:
                continue
            yield b"".join(held)
            held, count = [], 0
        whole = len(view) - len(view) % size
        for at in range(0, whole, size):
            yield view[at:at + size]
        if whole < len(view):
            held, count = [view[whole:]], len(view) - whole
    if held:
        yield b"".join(held)


def write_chunks(fd, data):
    """Write *data* (bytes or Chunks, each chunk as it is made) to the new file *fd*.
    A big file's pages are handed to the disk every WRITEBACK_EVERY octets
    (POSIX_FADV_DONTNEED starts their write-back without waiting for it), so that
    its fsync waits for the last ones only.  Raises OSError."""
    done = sent = 0
    for chunk in pieces_of(data):
        whole = memoryview(chunk)
        for at in range(0, len(whole), WRITEBACK_EVERY):  # a detached body: one chunk
            view = whole[at:at + WRITEBACK_EVERY]
            done += len(view)
            while view:
                view = view[os.write(fd, view):]
            if done - sent >= WRITEBACK_EVERY and hasattr(os, "posix_fadvise"):
                try:
                    os.posix_fadvise(fd, sent, done - sent, os.POSIX_FADV_DONTNEED)
                except OSError:  # advice only: the fsync at commit says what failed
                    pass
                sent = done


# -- Spools: big messages in private temporary files (issue 29) -------------------
#
# A message larger than SPOOL_ABOVE is not held in memory where it can be helped:
# it is read from its file a window at a time (a Spool), and what is made of it is
# written to a private temporary file, unnamed (or unlinked at once, mode 0600),
# that nothing outlives.

#: Received messages larger than this (octets) are read from their file a window at a time.
SPOOL_ABOVE = STREAM_ABOVE
#: Octets read at once for the small reads of a Spool (ASN.1 headers, MIME headers).
SPOOL_WINDOW = 1 << 16


class Spool:
    """The octets *start* to *stop* of a file (descriptor *fd*), read where asked: len(),
    spool[i], spool[a:b] (bytes: meant for small ranges), view(), blocks().

    The descriptor is closed once no Spool of it is left (weakref.finalize).  A file
    that shrinks while it is read raises ValueError (a truncated message).
    """

    __slots__ = ("fd", "start", "stop", "owner", "window", "at", "crlf", "closer",
                 "__weakref__")

    def __init__(self, fd, start, stop, owner=None):
        self.fd, self.start, self.stop, self.window, self.at = fd, start, stop, b"", 0
        self.crlf = None  #: every line break a CRLF (canonical() finds out once)
        self.owner = owner  #: the Spool whose finalizer closes *fd* (None: this one)
        self.closer = None
        if owner is None:
            import weakref
            self.closer = weakref.finalize(self, os.close, fd)

    def close(self):
        """Close the file now, not when no Spool of it is left: a temporary one is gone
        (no Spool of it may be read after)."""
        (self.owner or self).closer()

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("a Spool is read in order")
            return self.read(start, max(start, stop))
        if key < 0:
            key += len(self)
        if not 0 <= key < len(self):
            raise IndexError("beyond the end of the message")
        return self.read(key, key + 1)[0]

    def __bytes__(self):
        return self.read(0, len(self))

    def read(self, start, stop):
        """Return octets *start* to *stop* (from this Spool's start) as bytes."""
        at = self.at
        if at <= start and stop <= at + len(self.window):
            return self.window[start - at:stop - at]
        if stop - start > SPOOL_WINDOW:
            return self.pread(start, stop)
        self.window, self.at = self.pread(start, min(len(self), start + SPOOL_WINDOW)), start
        return self.window[:stop - start]

    def pread(self, start, stop):
        """Return octets *start* to *stop* read from the file.  Raises ValueError when it is
        shorter than that, or closed (close(): its descriptor's number may be another
        file's by now)."""
        if not (self.owner or self).closer.alive:
            raise ValueError("the message's temporary file is closed")
        data = os.pread(self.fd, stop - start, self.start + start)
        while len(data) < stop - start:
            more = os.pread(self.fd, stop - start - len(data), self.start + start + len(data))
            if not more:
                raise ValueError("the message file shrank while it was read")
            data += more
        return data

    def apart(self):
        """Return [the header up to and with its empty line (CRLF CRLF), the rest] read
        apart, as read_apart() reads a file; [all of it, None] without such a line in the
        first MAX_HEADER_SIZE octets."""
        end = self[:MAX_HEADER_SIZE + 4].find(b"\r\n\r\n") + 4
        if end < 4:
            return [bytes(self), None]
        return [self.pread(0, end), self.pread(end, len(self))]

    def view(self, start, stop):
        """Return the Spool of octets *start* to *stop* of this one (no copy)."""
        return Spool(self.fd, self.start + start, self.start + stop, self.owner or self)

    def is_crlf(self):
        """True when every line break is a CRLF (is_crlf(), found out once, a block at a
        time, unless whoever wrote the file said so in *crlf*)."""
        if self.crlf is None:
            crlf = cr = lf = 0
            last = b""
            for block in self.blocks():
                crlf += block.count(b"\r\n") + (last == b"\r" and block[:1] == b"\n")
                cr, lf, last = cr + block.count(b"\r"), lf + block.count(b"\n"), block[-1:]
            self.crlf = crlf == cr == lf
        return self.crlf

    def blocks(self, start=0, stop=None):
        """Yield octets *start* to *stop* in blocks of STREAM_BLOCK octets."""
        stop = len(self) if stop is None else stop
        for at in range(start, stop, STREAM_BLOCK):
            yield self.pread(at, min(at + STREAM_BLOCK, stop))

    def chunks(self):
        """Return the octets as Chunks (to be written to -o)."""
        return Chunks(len(self), self.blocks)


class SpoolWriter:
    """A private temporary file in $TMPDIR being written: mode 0600, unnamed (O_TMPFILE)
    or unlinked at once, so nothing is left behind whatever happens.  write() what comes,
    then spool() gives the Spool of it; close() lets it go (write() and spool() raise
    OutputError (74) when it cannot be written: a full disk)."""

    def __init__(self):
        import tempfile
        self.file = None
        try:
            self.file = tempfile.TemporaryFile(buffering=0)
        except OSError as exc:
            raise self.error(exc)

    @staticmethod
    def error(exc):
        """Return the OutputError for the OSError *exc*."""
        import tempfile
        return OutputError("a temporary file in %s: cannot write: %s" % (
            tempfile.gettempdir(), exc.strerror or exc))

    def write(self, data):
        """Write the bytes-like *data*.  Raises OutputError (the file is gone then)."""
        view = memoryview(data)
        try:
            while view:
                view = view[self.file.write(view):]
        except OSError as exc:
            self.close()
            raise self.error(exc)

    def spool(self):
        """Return the Spool of what was written (the file is the Spool's from now on).
        Raises OutputError."""
        try:
            fd = os.dup(self.file.fileno())
        except OSError as exc:
            raise self.error(exc)
        finally:
            self.close()
        return Spool(fd, 0, os.fstat(fd).st_size)

    def close(self):
        """Let the file go (nothing of it is left)."""
        if self.file is not None:
            self.file.close()
            self.file = None


def temporary_spool(chunks):
    """Return a Spool of the octets of *chunks* (an iterable of bytes-like objects), written
    to a private temporary file (SpoolWriter).  Raises OutputError (74) when it cannot be
    written (a full disk); what *chunks* raises is raised."""
    writer = SpoolWriter()
    try:
        for chunk in chunks:
            writer.write(chunk)
        return writer.spool()
    finally:
        writer.close()


def write_stdout(data):
    """Write *data* (bytes or Chunks) to standard output and flush.  Raises OutputError (74)
    on a full device."""
    try:
        for chunk in pieces_of(data):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError("standard output: cannot write: %s" % (exc.strerror or exc))


def first_line(exc):
    """Return the first line of an exception's text (requests' are long)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def write_atomically(path, data, mode=None, tmp=None):
    """Write *data* to *path* through an unnamed file (or a temporary one), synced,
    then named (and the directory synced): a reader never sees a partial file, a
    failure leaves none behind, and once this returns the file outlives a crash.
    *mode*: the file's permissions (default: as the umask allows, like any new
    file); *tmp*: a temporary file's path, on the same file system, to write
    under and rename from (a Maildir's tmp/; default: see OutputGroup).  Raises
    OutputError: 73 when the file cannot be created, 74 when writing fails (a
    full disk)."""
    group = OutputGroup()
    try:
        group.add(path, data, mode, tmp)
        group.commit()
    finally:
        group.discard()


class OutputGroup:
    """Output files made durable together, as databases commit groups of transactions.

    add() writes each file as an unnamed file of its directory (open(2) with
    O_TMPFILE), kept open, not yet synced; commit() syncs them all (an fsync of
    each: it reports a write-back error on every kernel), then gives each its name (linkat(2) of /proc/self/fd/N, see name_unnamed()) and syncs the
    directories.  A name therefore only ever points at a complete file whose
    content is on disk, whatever moment a crash comes at, and a crash before
    commit() leaves nothing: an unnamed file dies with its last descriptor.
    Where a directory cannot hold unnamed files (decided at its first file, see
    open_unnamed()), and for an explicit *tmp* (a Maildir's tmp/), a file is
    written under a temporary name instead (hidden, beside its own:
    ``.NAME.RANDOM``) and renamed at commit(); a crash before then leaves that
    temporary file.  A name that exists is replaced, atomically, either way.
    Each unnamed file keeps a descriptor open until commit(): full() is true
    before a group holds more than a quarter of the soft RLIMIT_NOFILE.
    discard() drops the files still pending.  The files of a group share one
    file system (FileBackend's are all in -o DIR).  Raises OutputError: 73 when
    a file cannot be created, 74 when writing or syncing fails.
    """

    def __init__(self):
        self.pending, self.size = collections.deque(), 0  #: PendingFiles, their octets
        self.started = 0.0  #: time.monotonic() of the first file pending
        self.most = open_files_budget()  #: files pending at most (GROUP_FILES or fewer)

    def full(self):
        """Return True once GROUP_FILES files (fewer under a low RLIMIT_NOFILE) or
        GROUP_BYTES octets are pending, or the first one has waited GROUP_SECONDS."""
        return bool(self.pending) and (
            len(self.pending) >= self.most or self.size >= GROUP_BYTES
            or time.monotonic() - self.started >= GROUP_SECONDS)

    def add(self, path, data, mode=None, tmp=None):
        """Write *data* (bytes or Chunks) for *path*, unnamed or under a temporary name (see
        write_atomically)."""
        file = PendingFile(path, tmp, mode)
        try:
            if mode is not None:
                os.fchmod(file.fd, mode)  # exactly *mode*, whatever the umask
            write_chunks(file.fd, data)
        except OSError as exc:
            file.drop()
            raise self.fault(path, exc)
        except BaseException:  # Ctrl-C in the middle of a big message: nothing partial
            file.drop()
            raise
        if self.pending:
            previous = self.pending[-1]
            try:
                previous.close_named()  # one temporary name open at a time
            except OSError as exc:
                file.drop()
                raise self.fault(previous.path, exc)
        else:
            self.started = time.monotonic()
        self.pending.append(file)
        self.size += len(data)

    def commit(self):
        """Sync the pending files, name each (or rename it into place), sync their
        directories."""
        if not self.pending:
            return
        file, directories = self.pending[-1], {}
        try:
            for file in self.pending:
                file.sync()
            while self.pending:
                file = self.pending[0]
                directory = os.path.dirname(file.path) or "."
                if directory not in directories:
                    directories[directory] = os.open(
                        directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                file.name(directories[directory])
                self.pending.popleft()
            self.size = 0
            for fd in directories.values():
                sync_directory(fd)
        except OSError as exc:
            raise self.fault(file.path, exc)
        finally:
            for fd in directories.values():
                os.close(fd)

    def discard(self):
        """Drop the files not committed (those named are kept)."""
        for file in self.pending:
            file.drop()
        self.pending.clear()
        self.size = 0

    @staticmethod
    def fault(path, exc):
        """Return the OutputError for *exc* met while writing *path*."""
        # EACCES EISDIR EROFS, ENOENT ENOTDIR: the directory has gone (removed in mid-run)
        code = EX_CANTCREAT if exc.errno in (13, 21, 30, 2, 20) else EX_IOERR
        return OutputError("%s: cannot write: %s" % (path, exc.strerror or exc), code,
                           exc.strerror or str(exc))


def open_files_budget():
    """Return how many files an OutputGroup may keep open: GROUP_FILES, or a quarter
    of the soft RLIMIT_NOFILE when that is lower (sysconf reads it: no import)."""
    limit = os.sysconf("SC_OPEN_MAX")
    return GROUP_FILES if limit <= 0 else max(1, min(GROUP_FILES, limit // 4))


class PendingFile:
    """One file of an OutputGroup, written, not yet named: unnamed (*tmp* None, its
    descriptor open) or under its temporary name *tmp*.

    Raises OutputError (73) when it cannot be created.
    """

    __slots__ = ("path", "tmp", "fd")

    def __init__(self, path, tmp=None, mode=None):
        self.path, self.tmp = path, tmp
        mode = 0o666 if mode is None else mode  # 0o666: the kernel applies the umask
        try:
            self.fd = None if tmp else open_unnamed(os.path.dirname(path) or ".", mode)
            if self.fd is None:
                self.tmp = tmp or hidden_name(path)
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                  | os.O_CLOEXEC, mode)
        except OSError as exc:
            raise OutputError("%s: cannot create: %s" % (path, exc.strerror or exc),
                              EX_CANTCREAT, exc.strerror or str(exc))

    def close_named(self):
        """Sync and close a file under a temporary name (commit() renames it).  Raises
        OSError."""
        if self.tmp and self.fd is not None:
            self.sync()
            os.close(self.fd)
            self.fd = None

    def sync(self):
        """fsync the file while it is open: its content is on disk, or OSError says why
        (a write-back error is reported to this descriptor on every kernel)."""
        if self.fd is not None:
            os.fsync(self.fd)

    def name(self, directory_fd):
        """Give the file its name in its directory (open as *directory_fd*), replacing
        a file of that name; close it.  Raises OSError."""
        if self.tmp:
            os.rename(self.tmp, self.path)
            self.tmp = None
        else:
            name_unnamed(self.fd, os.path.basename(self.path), directory_fd)
        self.close()

    def drop(self):
        """Close the file and remove its temporary name: nothing of it is left."""
        self.close()
        if self.tmp:
            remove_quietly(self.tmp)
            self.tmp = None

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def hidden_name(path):
    """Return a new hidden name beside *path*: .NAME.RANDOM (NAME cut at 40)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, ".%s.%s" % (name[:40], os.urandom(6).hex()))


#: Directories by path: True when they hold unnamed files (decided at their first file).
_UNNAMED = {}


def open_unnamed(directory, mode):
    """Return the descriptor of a new unnamed file in *directory* (O_TMPFILE, write
    only), or None where the directory cannot hold one that name_unnamed() can name:
    its file system (or the kernel) has no O_TMPFILE (EOPNOTSUPP, EISDIR, EINVAL), or
    /proc/self/fd is not there; decided at the directory's first file.  Raises OSError
    (a missing or read-only directory, no space)."""
    if _UNNAMED.get(directory) is False or not hasattr(os, "O_TMPFILE"):
        return None
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno not in (95, 21, 22):  # EOPNOTSUPP EISDIR EINVAL
            raise
        _UNNAMED[directory] = False
        return None
    if directory not in _UNNAMED:
        try:
            os.stat("/proc/self/fd/%d" % fd)
            _UNNAMED[directory] = True
        except OSError:  # no /proc (a chroot, a container without it)
            os.close(fd)
            _UNNAMED[directory] = False
            return None
    return fd


def name_unnamed(fd, name, directory_fd):
    """Give the unnamed file *fd* the name *name* in the directory *directory_fd*.

    linkat(2) with AT_SYMLINK_FOLLOW through /proc/self/fd/N (plain link(2) would
    not follow that link: EXDEV).  A link never replaces a name: when *name* exists
    (EEXIST) the file is linked under a hidden name, then renamed over it, as rename(2)
    replaces any file (a crash between the two leaves that hidden name).  Raises OSError.
    """
    source = "/proc/self/fd/%d" % fd
    try:
        os.link(source, name, dst_dir_fd=directory_fd, follow_symlinks=True)
        return
    except FileExistsError:
        tmp = hidden_name(name)
    os.link(source, tmp, dst_dir_fd=directory_fd, follow_symlinks=True)
    try:
        os.rename(tmp, name, src_dir_fd=directory_fd, dst_dir_fd=directory_fd)
    except OSError:
        os.unlink(tmp, dir_fd=directory_fd)
        raise


def remove_quietly(path):
    """Remove the temporary file *path*, if it is there and can be removed."""
    try:
        os.unlink(path)
    except OSError:
        pass


def sync_data(fd):
    """Flush the content (and size) of the file open as *fd* to disk: fdatasync(2), or
    fsync(2) where there is none (macOS).  Raises OSError."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def sync_directory(fd):
    """fsync the directory open as *fd*, so that the names just given in it outlive a
    crash.  Raises OSError."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != 22:  # EINVAL: a file system that cannot sync a directory
            raise


###############################################################################
# Reading the message #########################################################
###############################################################################

_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_UNFOLD = re.compile(rb"\r\n(?=[ \t])")
_MBOX_FROM = re.compile(rb"From [^\r\n]*(?:\r\n|\n|\r)")


class Field:
    """One header field: its lower-cased name and its raw CRLF-terminated lines."""
    __slots__ = ("name", "raw")

    def __init__(self, name, raw):
        self.name, self.raw = name, raw

    @property
    def value(self):
        """The unfolded value, as bytes, without the name and surrounding space."""
        return _UNFOLD.sub(b"", self.raw.split(b":", 1)[1]).strip()


class Message:
    """An RFC 5322 message split into outer header and MIME entity.

    *outer*: the non-Content-* fields in their original order, MIME-Version
    dropped; *entity_fields*: the Content-* fields; *body*: the CRLF body;
    *sender*, *to*, *cc*, *bcc*: lower-cased addresses (find_addresses()).
    """

    def __init__(self, source, outer, entity_fields, body):
        self.source, self.outer, self.entity_fields, self.body = source, outer, entity_fields, body
        self.sender, self.to, self.cc, self.bcc = "", [], [], []
        self.binary = True  #: a part may be declared binary (see declares_binary())
        self.spans = None  #: the body's unproven_spans() (None: all of it)

    @property
    def recipients(self):
        """Every To, Cc and Bcc address, in that order, without repeats."""
        return list(dict.fromkeys(self.to + self.cc + self.bcc))


def read_input(path):
    """Return the bytes of *path* ("-" = stdin).  Raises InputError."""
    return read_apart(path, apart=False)[0]


def read_apart(path, apart=True):
    """Return the message at *path* ("-" = stdin) as (its bytes, None); or, *apart* and a
    file larger than STREAM_ABOVE whose first MAX_HEADER_SIZE octets hold an empty line
    (CRLF CRLF), as (its header up to and with that line, the rest), read apart: the
    body is then never a copy cut out of the whole (see parse_apart()).  Raises
    InputError.

    Plain os.read calls: no file object per message (a batch reads thousands).
    """
    try:
        if path == "-":
            return sys.stdin.buffer.read(), None
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if apart and size > STREAM_ABOVE:
                first = os.pread(fd, MAX_HEADER_SIZE + 4, 0)
                end = first.find(b"\r\n\r\n") + 4
                if end >= 4:
                    os.lseek(fd, end, os.SEEK_SET)
                    return first[:end], read_rest(fd, size - end)
            return read_rest(fd, size), None
        finally:
            os.close(fd)
    except IsADirectoryError:
        raise InputError("%s: is a directory, expected a message file" % path)
    except OSError as exc:
        raise InputError("%s: cannot read: %s" % (path, exc.strerror or exc))


def read_rest(fd, size):
    """Return what is left of the file *fd*, *size* octets as it was found: one read into
    one object (more is read on, should it have grown).  Raises OSError."""
    chunks = [os.read(fd, size + 1)]
    while chunks[-1]:
        chunks.append(os.read(fd, 1 << 20))
    return chunks[0] if len(chunks) == 2 else b"".join(chunks)


def to_crlf(data, spans=None):
    """Return *data* with every line ending (LF, CR or CRLF) made CRLF (*spans*: see
    is_crlf())."""
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    if is_crlf(data, spans):
        return data  # already canonical: the usual case, no copy
    return _LINE_END.sub(b"\r\n", data)


def is_crlf(data, spans=None):
    """True when every line break of *data* is a CRLF (none is a lone CR or LF).  *spans*:
    only these parts of *data* can hold anything else (unproven_spans())."""
    for start, stop in spans or ((0, len(data)),):
        crlf = data.count(b"\r\n", start, stop)
        if not crlf == data.count(b"\n", start, stop) == data.count(b"\r", start, stop):
            return False
    return True


# -- Big messages: base64 lines proven once, skipped by the checks (issue 29) ------
#
# Nearly all of a big message is an attachment in base64: lines of one width, each
# of the base64 alphabet and a CRLF.  Such lines cannot hold what the checks below
# look for (a lone CR or LF, 8-bit or NUL octets, a long line, a space, a tab, a
# dot, a hyphen, a colon: no "From " line, no "." line, no delimiter, no header
# field).  unproven_spans() proves them a window at a time, at the cost of one pass
# (a translate and two stride slices), and the checks search only the rest: each
# would otherwise make its own pass over the whole message.

#: Messages above this many octets are looked at for runs of base64 lines (a 577 KB
#: message with a picture: its checks 5 x faster).
PROVE_ABOVE = 1 << 16
#: A run of base64 lines is proven this many octets (whole lines) at a time; a window
#: that is not proven whole is halved, down to PROVE_LEAST octets.
PROVE_WINDOW, PROVE_LEAST = 1 << 20, 1 << 14
#: The octets of a base64 line (RFC 4648 4, padding included).
BASE64_OCTETS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def unproven_spans(data):
    """Return the (start, stop) spans of *data* that may hold anything, in order, or None
    for a message no larger than PROVE_ABOVE (all of it).  Left out are the windows
    proven by base64_window(): whole lines, so every span starts and stops at a line
    boundary (after a LF) or at an end of *data*; neighbours are joined."""
    if len(data) <= PROVE_ABOVE:
        return None
    spans, start = [], 0
    while start < len(data):
        stop = line_cut(data, start, PROVE_WINDOW)
        prove(data, start, stop, spans)
        start = stop
    return spans


def line_cut(data, start, size):
    """Return where a window of *data* from *start*, at most *size* octets, ends: after
    its last LF (the end of *data* when it is nearer; *size* on when there is no LF)."""
    if len(data) - start <= size:
        return len(data)
    return data.rfind(b"\n", start, start + size) + 1 or start + size


def prove(data, start, stop, spans):
    """Add to *spans* what of *data*[start:stop] base64_window() does not prove: the whole
    window, or its halves' (the header and the attachment's end are a small part of
    their windows), down to PROVE_LEAST octets."""
    if base64_window(data, start, stop):
        return
    if stop - start > PROVE_LEAST:
        middle = line_cut(data, start, (stop - start) // 2)
        if start < middle < stop:
            prove(data, start, middle, spans)
            prove(data, middle, stop, spans)
            return
    if spans and spans[-1][1] == start:
        spans[-1] = (spans[-1][0], stop)
    else:
        spans.append((start, stop))


def base64_window(data, start, stop):
    """True when *data*[start:stop] is lines of one width, each up to MAX_LINE octets of
    BASE64_OCTETS and a CRLF: the CRs and LFs at every line's end (two stride slices),
    and nothing but base64 octets between them (no space, then one translate)."""
    width = data.find(b"\r\n", start, start + MAX_LINE + 2) - start
    if width <= 0 or start and data[start - 1] != 0x0A:  # whole lines only
        return False
    step = width + 2
    count, extra = divmod(stop - start, step)
    return (not extra and data[start + width:stop:step] == b"\r" * count
            and data[start + width + 1:stop:step] == b"\n" * count
            and data.find(b" ", start, stop) < 0  # text of lines of one width: at once
            and data[start:stop].translate(None, BASE64_OCTETS) == b"\r\n" * count)


def shifted_spans(spans, offset, size):
    """Return *spans* of a text as spans of its part that starts at *offset*, *size* long."""
    if spans is None:
        return None
    return [(max(start - offset, 0), min(stop - offset, size))
            for start, stop in spans if stop > offset and start < offset + size]


def holds_any(data, needles, spans=None):
    """True when *data* holds one of *needles* in its *spans* (None: anywhere).  A needle
    may start in the proven line before a span (its CRLF): each span is searched from
    as many octets before as the needle has, less one."""
    if spans is None:
        return any(needle in data for needle in needles)
    return any(data.find(needle, max(start - len(needle) + 1, 0), stop) >= 0
               for start, stop in spans for needle in needles)


#: A Content-Transfer-Encoding field's value "binary", in any case, matched from
#: "ransfer-encoding".
_BINARY_CTE = re.compile(rb"(?i)ransfer-encoding[ \t]*:[ \t]*binary\b")
#: One raw line and its ending, whatever that ending is (LF, CR or CRLF).
_RAW_LINE = re.compile(rb"([^\r\n]*)(\r\n|\n|\r|\Z)")


def declares_binary(data, spans=None):
    """True when *data* holds a Content-Transfer-Encoding: binary field (RFC 2045 6.2),
    its name and value in any case.  *spans*: only there can a field be (see
    unproven_spans()).

    Works on lower-cased copies of a window at a time (lowered()): "binary" must be
    there (one C-speed search), then each "ransfer-encoding" is looked at closely,
    so the usual message costs microseconds; a false alarm only costs a closer look.
    """
    if not count_any_case(data, (b"binary",), spans):
        return False
    for at, window in lowered(data, len(b"ransfer-encoding") - 1, spans):
        found = window.find(b"ransfer-encoding")
        while found >= 0:
            if _BINARY_CTE.match(data, at + found):
                return True
            found = window.find(b"ransfer-encoding", found + 1)
    return False


def lowered(data, overlap, spans=None):
    """Yield (offset, lower-cased copy) of each window of *data* (of its *spans*, see
    unproven_spans()): STREAM_BLOCK octets and *overlap* more, so that a word of
    *overlap* + 1 octets is whole in one of them (a big message is never copied whole;
    a small one is one window).  Words of whole lines only: a span ends a line."""
    for start, stop in spans or ((0, len(data)),):
        for at in range(start, stop, STREAM_BLOCK):
            yield at, data[at:min(at + STREAM_BLOCK + overlap, stop)].lower()


def count_any_case(data, words, spans=None):
    """Return how many times the lower-case *words* occur in *data* (in its *spans*), in
    any case, together."""
    longest, count = max(map(len, words)), 0
    for _, window in lowered(data, longest - 1, spans):  # counted in its first window
        count += sum(window.count(word, 0, STREAM_BLOCK + len(word) - 1) for word in words)
    return count


def message_to_crlf(data):
    """Return a whole message with CRLF line endings, binary part bodies excepted.

    A part declared "binary" (RFC 2045 6.2, RFC 3030) has no line structure:
    its bytes stay exactly as they are; only the line break before the next
    boundary delimiter belongs to the delimiter (RFC 2046 5.1.1) and becomes CRLF.
    """
    return entity_to_crlf(data) if declares_binary(data) else to_crlf(data)


def check_depth(depth):
    """Raise MessageError when MIME entities are nested deeper than MAX_MIME_DEPTH."""
    if depth > MAX_MIME_DEPTH:
        raise MessageError("MIME parts nested deeper than %d levels" % MAX_MIME_DEPTH)


def check_mime_limits(msg):
    """Raise MessageError when *msg* nests MIME entities deeper than MAX_MIME_DEPTH or
    holds more than MAX_MIME_PARTS parts, whatever their encoding (a MIME bomb).

    Each part starts on a line beginning with "--", and each level of nesting is a
    multipart (whose first part starts on such a line) or a message/rfc822: with few
    such lines and no "822" anywhere, as in nearly all mail, the message cannot
    exceed the limits and nothing more is read; then the counts of "boundary" and
    "rfc822" in any case bound the depth.
    """
    body, spans = msg.body, msg.spans or ((0, len(msg.body)),)
    delimiters = sum(body.count(b"\n--", max(start - 2, 0), stop) for start, stop in spans)
    if delimiters < MAX_MIME_DEPTH and not any(body.find(b"822", start, stop) >= 0
                                               for start, stop in spans):
        return
    if (delimiters < MAX_MIME_PARTS
            and count_any_case(body, (b"boundary", b"rfc822"), msg.spans) < MAX_MIME_DEPTH):
        return
    count_parts(msg.entity_fields, msg.body, 0, [0])


def count_parts(fields, body, depth, parts):
    """Walk the MIME entity (*fields*, CRLF *body*) nested *depth* deep, adding its parts
    to *parts*[0].  Raises MessageError past MAX_MIME_DEPTH or MAX_MIME_PARTS."""
    check_depth(depth)
    ctype, params = parse_content_type(field_value(fields, "content-type") or b"text/plain")
    if ctype.startswith("multipart/") and params.get("boundary"):
        marks = delimiters(body, params["boundary"].encode("ascii", "replace"))
        here = next(marks, None)
        while here is not None and not here.group(1):
            after = next(marks, None)
            parts[0] += 1
            if parts[0] > MAX_MIME_PARTS:
                raise MessageError("more than %d MIME parts" % MAX_MIME_PARTS)
            count_parts(*split_header(body[here.end() + 2:after.start() if after else None]),
                        depth + 1, parts)
            here = after
    elif ctype == "message/rfc822":
        inner = to_crlf(decode_body(body, transfer_encoding(fields)))
        count_parts(*split_header(inner), depth + 1, parts)


def entity_to_crlf(raw, depth=0):
    """Return one raw MIME entity (header, empty line, body) with CRLF line endings
    in its header and in every body but those declared binary.  Raises
    MessageError for entities nested deeper than MAX_MIME_DEPTH."""
    check_depth(depth)
    head, pos = [], 0
    while True:  # header lines end where split_header() ends them
        line = _RAW_LINE.match(raw, pos)
        text = line.group(1)
        if not text or not (text[:1] in (b" ", b"\t") and head or _FIELD_NAME.match(text)):
            break
        head.append(text + b"\r\n")
        pos = line.end()
    if not text and line.group(2):  # the empty line: the body follows it
        separator, rest = b"\r\n", raw[line.end():]
    else:  # the end, or a line that is not a field: the body starts there
        separator, rest = b"", raw[pos:]
    fields = split_header(b"".join(head) + b"\r\n")[0]
    ctype, params = parse_content_type(field_value(fields, "content-type") or b"text/plain")
    cte = transfer_encoding(fields)
    if ctype.startswith("multipart/") and params.get("boundary"):
        body = multipart_to_crlf(rest, params["boundary"].encode("ascii", "replace"), depth)
    elif cte == b"binary":
        body = rest
    elif ctype == "message/rfc822" and cte not in (b"base64", b"quoted-printable"):
        body = entity_to_crlf(rest, depth + 1)
    else:
        body = to_crlf(rest)
    return b"".join(head) + separator + body


def multipart_to_crlf(raw, boundary, depth=0):
    """Return a raw multipart body with CRLF line endings, binary parts kept as they are."""
    delimiter = re.compile(rb"(?:\A|\r\n|\n|\r)--" + re.escape(boundary)
                           + rb"(--)?[ \t]*(?=\r\n|\n|\r|\Z)")
    out, pos, first = [], 0, True
    for mark in delimiter.finditer(raw):
        segment = raw[pos:mark.start()]  # the preamble, then each part
        out.append(to_crlf(segment) if first else entity_to_crlf(segment, depth + 1))
        out.append(to_crlf(mark.group(0)))
        pos, first = mark.end(), False
        if mark.group(1):  # the close delimiter: an epilogue follows
            return b"".join(out) + to_crlf(raw[pos:])
        end = _RAW_LINE.match(raw, pos)  # the rest of the delimiter line
        out.append(to_crlf(end.group(0)))
        pos = end.end()
    out.append(to_crlf(raw[pos:]) if first else entity_to_crlf(raw[pos:], depth + 1))
    return b"".join(out)


def split_header(data):
    """Split CRLF *data* into ([Field, ...], body).

    The header ends at the first empty line or, as in Python's email parser,
    at the first line that is neither a field nor a continuation.  Each field's
    lines are joined once (linear however long it is folded).  Raises
    MessageError for a header larger than MAX_HEADER_SIZE.
    """
    names, firsts, pos, size = [], [], 0, len(data)
    while pos < size:
        end = data.find(b"\r\n", pos)
        end = size if end < 0 else end
        if end > MAX_HEADER_SIZE:
            raise MessageError("a header larger than %d octets (folded over too many lines?)"
                               % MAX_HEADER_SIZE)
        if end == pos:
            return header_fields(names, firsts, data, pos), data[end + 2:]
        if data[pos] not in b" \t" or not names:  # a continuation line belongs to the field
            match = _FIELD_NAME.match(data, pos, end)
            if not match:
                break
            names.append(match.group(1).decode("ascii").lower())
            firsts.append(pos)
        pos = end + 2
    return header_fields(names, firsts, data, min(pos, size)), data[pos:]


def header_fields(names, firsts, data, end):
    """Return the Fields named *names*, each from its first line (*firsts*) up to the next
    field's (or *end*), CRLF-terminated."""
    bounds = firsts + [end]
    fields = [Field(name, data[bounds[n]:bounds[n + 1]]) for n, name in enumerate(names)]
    if fields and not fields[-1].raw.endswith(b"\r\n"):  # the data ended inside the header
        fields[-1].raw += b"\r\n"
    return fields


def parse_message(data, source="-", envelope=None):
    """Parse raw bytes into a Message with its addresses.  Raises MessageError.

    *envelope*: the recipients of a message received over SMTP (--serve, RCPT TO):
    they, not the header, say who gets it.
    """
    if not data or data.isspace():  # (not data.strip(): a copy of a big message)
        raise MessageError("%s: empty input, expected an RFC 5322 message" % source)
    mbox = _MBOX_FROM.match(data)
    if mbox:
        data = data[mbox.end():]
    spans = unproven_spans(data)
    binary = declares_binary(data, spans)
    crlf = entity_to_crlf(data) if binary else to_crlf(data, spans)
    if crlf is not data:  # made again: its lines are not those proven
        data, spans = crlf, unproven_spans(crlf)
    fields, body = split_header(data)
    if not fields or b"\x00" in data[:len(data) - len(body)]:
        raise MessageError("%s: not an RFC 5322 message (no header fields)" % source)
    return message_of(fields, body, binary,
                      shifted_spans(spans, len(data) - len(body), len(body)), source, envelope)


def parse_apart(head, rest, source="-", envelope=None):
    """Return parse_message() of *head* + *rest* (read_apart(): a header up to and with the
    empty line that ends it, and all after), taken as they are, not joined; or None
    when they must be joined first: an mbox From line, a line break that is not a CRLF,
    a part declared binary, or a header that parse_message() ends before that empty
    line.  Raises MessageError."""
    if _MBOX_FROM.match(head) or not is_crlf(head) or declares_binary(head):
        return None
    spans = unproven_spans(rest)
    if not is_crlf(rest, spans) or declares_binary(rest, spans):
        return None
    fields, after = split_header(head)
    if after or not fields or b"\x00" in head:
        return None
    return message_of(fields, rest, False, spans, source, envelope)


def read_message(path, digest=False):
    """Return (the Message of the file at *path* (message_apart() of read_apart()), the
    SHA-256 (hex) of its octets when *digest*, else '').  Raises InputError,
    MessageError."""
    parts = list(read_apart(path))
    sha = ""
    if digest:
        sha = hashlib.sha256(parts[0])
        if parts[1] is not None:
            sha.update(parts[1])
        sha = sha.hexdigest()
    return message_apart(parts, path), sha


def message_apart(parts, source="-", envelope=None):
    """Return the Message of *parts*, [head, rest] from read_apart() (rest None: the whole
    message in head): parse_apart() of them where it can, else parse_message() of them
    joined.  *parts* is emptied, so that the rest is let go before the body is cut out
    of the whole (twice the message at most, for a moment).  Raises MessageError."""
    head, rest = parts
    parts.clear()
    msg = parse_apart(head, rest, source, envelope) if rest is not None else None
    if msg is not None:
        return msg
    if rest is not None:
        head, rest = head + rest, None
    return parse_message(head, source, envelope)


def message_of(fields, body, binary, spans, source, envelope):
    """Return the Message of header *fields* and CRLF *body* (its unproven_spans()), its
    MIME limits checked and its addresses found (parse_message()).  Raises
    MessageError."""
    outer = [f for f in fields if not f.name.startswith("content-") and f.name != "mime-version"]
    entity = [f for f in fields if f.name.startswith("content-")]
    msg = Message(source, outer, entity, body)
    msg.binary, msg.spans = binary, spans
    try:
        check_mime_limits(msg)
    except MessageError as exc:
        raise MessageError("%s: %s" % (source, exc)) from None
    find_addresses(msg, envelope)
    return msg


def find_addresses(msg, envelope=None):
    """Fill msg.sender/to/cc/bcc from the header (msg.to from *envelope* when
    given).  Raises MessageError."""
    values = {}
    for f in msg.outer:  # one pass over the header for the four fields
        if f.name in ("from", "to", "cc", "bcc"):
            values.setdefault(f.name, []).append(f.value.decode("utf-8", "replace"))
    from_ = addresses_of(msg, "from", values.get("from", []))
    if not from_:
        raise MessageError("%s: no From address; the sender's address selects the signing key"
                           % msg.source)
    msg.sender = from_[0]
    if envelope is not None:
        msg.to = list(envelope)
        return
    msg.to, msg.cc, msg.bcc = (addresses_of(msg, name, values.get(name, []))
                               for name in RECIPIENT_FIELDS)
    if not msg.recipients:
        raise MessageError("%s: no recipient: add a To, Cc or Bcc address" % msg.source)


_ATOM = r'[^\s<>()\[\]@,;:\\"]+'
#: One plain address, or one "Name <address>" with a plain name: most headers.
_ONE_ADDRESS = re.compile(r'\s*(?:([\w .\'-]*?)\s*<(%s@%s)>|(%s@%s))\s*\Z' % ((_ATOM,) * 4))


def parse_addresses(values):
    """Return [(display, address)] of header *values* (RFC 5322 3.4).

    A lone simple address skips the full parser (email.utils.getaddresses),
    which handles everything else: groups, quoted names, comments, lists.
    """
    if not values:
        return []
    if len(values) == 1:
        match = _ONE_ADDRESS.match(values[0])
        if match:
            return [((match.group(1) or "").strip(), match.group(2) or match.group(3))]
    from email.utils import getaddresses
    return getaddresses(values)


_SPACE = re.compile(r"\s")
#: Control characters, which no address may hold, quoted or not (RFC 5321 4.1.2).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def addresses_of(msg, name, values=None):
    """Return the lower-cased addresses of every *name* field (their decoded *values*
    when known).  Raises MessageError."""
    if values is None:
        values = [f.value.decode("utf-8", "replace") for f in msg.outer if f.name == name]
    found = []
    for display, address in parse_addresses(values):
        if not address and not display:
            continue  # empty group such as "undisclosed-recipients:;"
        if "@" not in address or _SPACE.search(address) or _CONTROL.search(address):
            raise MessageError("%s: %s address %r is not a valid e-mail address"
                               % (msg.source, name.capitalize(), address or display))
        if not address.isascii():
            raise MessageError("%s: %s address %r is not ASCII (internationalised addresses, "
                               "SMTPUTF8, are not supported)" % (msg.source, name.capitalize(),
                                                                 address))
        found.append(address.lower())
    return list(dict.fromkeys(found))


def display_names(msg, name):
    """Return {address: display name} for the *name* fields, RFC 2047 words decoded."""
    from email.header import decode_header, make_header
    values = [f.value.decode("utf-8", "replace") for f in msg.outer if f.name == name]
    names = {}
    for display, address in parse_addresses(values):
        if display and address:
            try:
                display = str(make_header(decode_header(display)))
            except (ValueError, LookupError):
                pass
            names[address.lower()] = display
    return names


###############################################################################
# Canonical MIME (RFC 8551 3.1) ###############################################
###############################################################################
# Signed bytes must survive every relay unchanged: 7-bit only, CRLF, lines of
# at most 998 octets, no line starting with "From " (mbox quoting) and no
# trailing white space (stripped by some relays), no line that is a lone "."
# (SparkPost's API refuses it).  Content that breaks one of these rules is
# re-encoded; content that does not is left byte for byte.  Parts declared
# "binary" are always re-encoded, as base64 of their exact bytes.

_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def parse_content_type(value):
    """Return (lower-cased 'type/subtype', {param: value}) of a Content-* value."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    main = text.split(";", 1)[0].strip().lower()
    params = {}
    for name, raw in _PARAM.findall(text):
        raw = raw.strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) > 1:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params.setdefault(name.lower(), raw)
    return main, params


def is_transport_safe(data, spans=None):
    """True when *data* (CRLF) is 7-bit, short-lined and free of From/space traps.
    *spans*: only there can a line start with "From ", end with white space or be
    "." (see unproven_spans()).

    Substring tests run in C; this is on the hot path of every message.  A
    one-octet test is a memchr (0.5 us on 19 KB), a longer needle a full scan
    (10-15 us): the tab is looked for alone first, being rare.
    """
    return (data.isascii() and b"\0" not in data and not has_long_line(data, MAX_LINE, spans)
            and not data.startswith(b"From ") and not data.endswith((b" ", b"\t"))
            and not holds_any(data, (b"\nFrom ", b" \r\n"), spans)
            and (b"\t" not in data or not holds_any(data, (b"\t\r\n",), spans))
            and not has_lone_dot(data, spans))


def has_lone_dot(data, spans=None):
    """True when a line of CRLF *data* (in its *spans*) is a single ".": the SMTP end of
    data.

    SMTP dot-stuffs such a line, but SparkPost's API refuses content holding
    CRLF "." CRLF and must not be given dot-stuffed content (its "RFC 822
    Content" rules), so the canonical form never has one: quoted-printable
    writes it "=2E", which decodes to the same text (RFC 2045 6.7).
    """
    return (holds_any(data, (b"\r\n.\r\n",), spans) or data.startswith(b".\r\n")
            or data.endswith(b"\r\n.") or data == b".")


def has_long_line(data, limit=MAX_LINE, spans=None):
    """True when a line of CRLF *data* (in its *spans*: see unproven_spans()) exceeds
    *limit*, 998 octets (RFC 5322 2.1.1).

    Such a line is 1,000 octets without a LF (its text and its CR): the search
    jumps from the last LF of one 1,000-octet window to the next window, with
    memrchr, instead of cutting every line out (4 times faster on 19 KB).
    """
    for start, size in spans or ((0, len(data)),):
        while size - start > limit + 1:
            found = data.rfind(b"\n", start, start + limit + 2)
            if found < 0:
                return True
            start = found + 1
        if (size - start > limit and data.find(b"\n", start, size) < 0
                and data[size - 1:size] != b"\r"):
            return True
    return False


def canonical_entity(fields, body, binary=True, depth=0):
    """Return the canonical bytes (header, empty line, body) of one MIME entity.

    *fields* are the entity's Field objects; *body* is CRLF; *binary*: False when
    the message is known to declare no binary part; *depth*: how deep it is nested.
    Raises MessageError.
    """
    return b"".join(canonical_pieces(fields, body, binary, depth))


def canonical_pieces(fields, body, binary=True, depth=0, spans=None):
    """Return canonical_entity() as [header and empty line, body]: a body that is
    canonical already is not copied.  *spans*: the body's unproven_spans()."""
    check_depth(depth)
    if (not is_transport_safe(body, spans) or transfer_encoding(fields) == b"binary"
            or binary and declares_binary(body, spans)):
        fields, body = canonical_parts(fields, body, depth)
    return [safe_fields(fields) + b"\r\n", body]


def canonical_parts(fields, body, depth=0):
    """Return (fields, body) of an entity whose body needs work, made canonical."""
    ctype, params = parse_content_type(field_value(fields, "content-type") or b"text/plain")
    if ctype.startswith("multipart/"):
        boundary = params.get("boundary")
        if not boundary:
            raise MessageError("a %s part has no boundary parameter" % ctype)
        return fields, canonical_multipart(body, boundary.encode("ascii", "replace"), depth)
    if ctype == "message/rfc822":
        return (replace_field(fields, "content-transfer-encoding", None),
                canonical_embedded(fields, body, depth))
    return reencode_leaf(fields, body, ctype)


def field_value(fields, name):
    """Return the unfolded bytes value of the first field *name*, or None."""
    for f in fields:
        if f.name == name:
            return f.value
    return None


def transfer_encoding(fields):
    """Return the entity's Content-Transfer-Encoding, lower-cased bytes (b"" if none)."""
    return (field_value(fields, "content-transfer-encoding") or b"").strip().lower()


def replace_field(fields, name, raw_value):
    """Return *fields* with field *name* set to *raw_value* (None removes it)."""
    kept = [f for f in fields if f.name != name]
    if raw_value is not None:
        label = "-".join(w.capitalize() for w in name.split("-"))
        kept.append(Field(name, b"%s: %s\r\n" % (label.encode(), raw_value)))
    return kept


def delimiters(body, boundary):
    """Return an iterator over the delimiter lines of a CRLF multipart *body*, as re
    matches; group(1) is "--" on the close delimiter.  The CRLF before each
    delimiter belongs to it, not to the part before (RFC 2046 5.1.1)."""
    return re.finditer(rb"(?:\A|\r\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)",
                       body)


def canonical_multipart(body, boundary, depth=0):
    """Return a multipart body with every part made canonical (RFC 2046 5.1.1)."""
    marks = list(delimiters(body, boundary))
    if not marks:
        return safe_text_block(body)
    out = [safe_text_block(body[:marks[0].start()])]
    for here, after in zip(marks, marks[1:] + [None]):
        if here.group(1):
            break
        end = after.start() if after else len(body)
        fields, part_body = split_header(body[here.end() + 2:end])
        prefix = b"\r\n" if out[0] or len(out) > 1 else b""
        out.append(prefix + b"--" + boundary + b"\r\n"
                   + canonical_entity(fields, part_body, depth=depth + 1))
    epilogue = body[marks[-1].end() + 2:] if marks[-1].group(1) else b""
    out.append(b"\r\n--" + boundary + b"--\r\n" + safe_text_block(epilogue))
    return b"".join(out)


def safe_text_block(data):
    """Return a preamble or epilogue as is when transport-safe, else a neutral one."""
    if is_transport_safe(data):
        return data
    return b"This is a multi-part message in MIME format.\r\n" if data.strip() else b""


def canonical_embedded(fields, body, depth=0):
    """Return an embedded message/rfc822 body made canonical (RFC 2046 5.2.1)."""
    cte = transfer_encoding(fields)
    body = to_crlf(decode_body(body, cte))
    inner_fields, inner_body = split_header(body)
    outer = [f for f in inner_fields if not f.name.startswith("content-")]
    entity = [f for f in inner_fields if f.name.startswith("content-")]
    canonical = canonical_entity(entity, inner_body, depth=depth + 1)
    return safe_fields(outer) + canonical


#: Every octet but the base64 alphabet (RFC 2045 6.8): dropped when decoding.
_NOT_BASE64 = bytes(set(range(256)) - set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                          b"0123456789+/"))


def decode_body(body, cte):
    """Return *body* decoded from Content-Transfer-Encoding *cte* (bytes)."""
    if cte == b"base64":
        text = body.translate(None, _NOT_BASE64)  # lenient, like mail clients: one copy
        text = text[:len(text) - len(text) % 4 if len(text) % 4 == 1 else len(text)]
        return binascii.a2b_base64(text + b"=" * (-len(text) % 4))
    if cte == b"quoted-printable":
        return binascii.a2b_qp(body)
    return body


def reencode_leaf(fields, body, ctype):
    """Re-encode a leaf body: quoted-printable for text, base64 otherwise.

    Returns (fields, body) with Content-Transfer-Encoding updated.
    """
    cte = transfer_encoding(fields)
    data = decode_body(body, cte)
    if ctype.startswith("text/") and cte not in (b"base64", b"binary"):
        encoded, cte = encode_qp(to_crlf(data)), b"quoted-printable"
    else:
        encoded, cte = encode_base64(data), b"base64"
    return replace_field(fields, "content-transfer-encoding", cte), encoded


def encode_qp(data):
    """Return CRLF text *data* as quoted-printable (RFC 2045 6.7), "From " quoted."""
    encoded = binascii.b2a_qp(data, istext=True)  # soft breaks are LF when data has no CRLF
    return to_crlf(re.sub(rb"(?m)^From ", b"=46rom ", encoded))


def encode_base64(data):
    """Return *data* as base64 in CRLF lines of 76 characters (RFC 2045 6.8).

    The lines are cut by struct.unpack calls (C speed), up to LINES_PER_CUT at
    a time, instead of a slice per line: this runs on every message, twice when
    signing and encrypting, and a 577 KB attachment has 10,000 lines.
    """
    text = base64_text(data)
    full = len(text) // BASE64_LINE
    chunks = [b"\r\n".join(line_splitter(min(LINES_PER_CUT, full - n)).unpack_from(
        text, n * BASE64_LINE)) for n in range(0, full, LINES_PER_CUT)]
    if len(text) % BASE64_LINE:
        chunks.append(text[full * BASE64_LINE:])
    del text  # big messages: one copy less at the peak
    chunks.append(b"")  # the final CRLF, without copying the whole result again
    return b"\r\n".join(chunks)


def base64_lines(data):
    """Return *data* (Chunks or bytes-like) as encode_base64() writes it, as Chunks made
    STREAM_BLOCK octets at a time (whole lines: the blocks' lines are the whole's)."""
    chars = (len(data) + 2) // 3 * 4
    size = chars + (chars + BASE64_LINE - 1) // BASE64_LINE * 2
    return Chunks(size, lambda: map(encode_base64, blocks(data, STREAM_BLOCK)))


def base64_text(data):
    """Return *data* in base64 (RFC 4648 4), without line breaks."""
    return binascii.b2a_base64(data, newline=False)


_LINE_SPLITTERS = {}


def line_splitter(count):
    """Return a struct.Struct cutting *count* base64 lines (one per count, cached)."""
    if count not in _LINE_SPLITTERS:
        _LINE_SPLITTERS[count] = struct.Struct("%ds" % BASE64_LINE * count)
    return _LINE_SPLITTERS[count]


###############################################################################
# Header encoding (RFC 2047, RFC 2231) ########################################
###############################################################################

def safe_fields(fields):
    """Return the raw bytes of *fields*, each made 7-bit and folded when it must be.

    Most headers need nothing: they are checked joined, in one pass, and only
    a header that fails is looked at field by field (safe_field()).
    """
    raw = b"".join([f.raw for f in fields])
    if is_7bit_header(raw) and not needs_folding(raw):
        return raw
    return b"".join([safe_field(f) for f in fields])


def safe_field(f):
    """Return the raw bytes of a field, made 7-bit and folded when it must be."""
    raw = f.raw
    if not is_7bit_header(raw):
        raw = encode_field(f)
    elif needs_folding(raw):
        raw = fold_field(f.raw)
    return raw


def is_7bit_header(raw):
    """True when header lines *raw* are ASCII without NUL: nothing to encode."""
    return raw.isascii() and b"\0" not in raw


def needs_folding(raw):
    """True when header lines *raw* hold a line over 998 octets or trailing white space."""
    return has_long_line(raw) or b" \r\n" in raw or b"\t\r\n" in raw


def encode_field(f):
    """Return field *f* with its non-ASCII text encoded for a 7-bit header."""
    from email.header import Header
    name = f.raw.split(b":", 1)[0].decode("ascii")
    value = re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", "", decode_text(f.value))  # no controls
    try:
        if f.name in ADDRESS_FIELDS:
            text = encode_addresses(value)
        elif f.name in ("content-type", "content-disposition"):
            text = encode_params(value)
        else:
            text = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
        raw = ("%s: %s\r\n" % (name, text)).encode("ascii")
    except (UnicodeError, ValueError):  # e.g. a non-ASCII address: keep it readable, 7-bit
        raw = ("%s: %s\r\n" % (name, Header(value, "utf-8", header_name=name).encode(
            linesep="\r\n"))).encode("ascii")
    return fold_field(raw)


def decode_text(raw):
    """Decode raw header bytes as UTF-8, falling back to Windows-1252."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", "replace")


def encode_addresses(value):
    """Return an address list with non-ASCII display names RFC 2047-encoded."""
    from email.utils import formataddr, getaddresses
    return ", ".join(formataddr(pair, charset="utf-8") for pair in getaddresses([value])
                     if pair[1])


def encode_params(value):
    """Return a Content-Type/-Disposition value with non-ASCII params in RFC 2231 form."""
    main, params = parse_content_type(value)
    out = [value.split(";", 1)[0].strip().encode("ascii", "ignore").decode()]
    for name, text in params.items():
        name = name.encode("ascii", "ignore").decode() or "x-param"
        if text.isascii():
            out.append('%s="%s"' % (name, text.replace("\\", "\\\\").replace('"', '\\"')))
        else:
            quoted = "".join(chr(b) if chr(b) in RFC2231_SAFE else "%%%02X" % b
                             for b in text.encode("utf-8"))
            out.append("%s*=utf-8''%s" % (name, quoted))
    return "; ".join(out)


def fold_field(raw):
    """Return a field whose physical lines are at most 998 octets, folded at spaces.

    Trailing white space is dropped from each line (RFC 5322 3.2.2 allows it).
    """
    words = re.split(rb"[ \t]+", _UNFOLD.sub(b"", raw.rstrip(b"\r\n")).rstrip())
    lines, line = [], words[0]
    for word in words[1:]:
        if len(line) + 1 + len(word) > 78:
            lines.append(line)
            line = b" " + word
        else:
            line += b" " + word
    lines.append(line)
    if any(len(x) > MAX_LINE for x in lines):
        raise MessageError("a header line is longer than %d octets and cannot be folded: %s"
                           % (MAX_LINE, raw[:40].decode("ascii", "replace")))
    return b"\r\n".join(lines) + b"\r\n"


###############################################################################
# DER: the few ASN.1 structures of CMS we write and read (X.690, RFC 5652) ####
###############################################################################
# cryptography signs (SignedData) and encrypts to RSA keys, but it cannot
# encrypt to EC keys, verify a signature or decrypt for an EC key.  For those
# we build and read the CMS structures ourselves from its primitives: a short
# DER encoder, and a BER reader (OpenSSL writes indefinite lengths).  Single
# octet tags only: CMS needs no other.

SEQUENCE, SET, INTEGER, BIT_STRING, OCTET_STRING, NULL, OID = 0x30, 0x31, 2, 3, 4, 5, 6


def ctx(number, constructed=True):
    """Return the tag octet of context-specific [number], constructed or primitive."""
    return (0xA0 if constructed else 0x80) | number


def der_header(tag, size):
    """Return the identifier and definite length octets of an element (X.690 8.1.3)."""
    if size < 0x80:
        return bytes((tag, size))
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(octets))) + octets


def der_pieces(tag, *parts):
    """Return one DER element as a list of pieces, its header first.

    A part is bytes (or a memoryview, or Chunks) or such a list: a large payload is
    never copied (Chunks.joined() makes the whole as it is written).
    """
    pieces = []
    for part in parts:
        pieces.extend(part if isinstance(part, list) else [part])
    return [der_header(tag, sum(map(len, pieces)))] + pieces


def der(tag, *parts):
    """Return one DER element (bytes): *tag*, the length, *parts* (bytes) concatenated."""
    body = b"".join(parts)
    if len(body) < 0x80:
        return bytes((tag, len(body))) + body
    return der_header(tag, len(body)) + body


def der_int(number):
    """Return a DER INTEGER (two's complement, shortest form)."""
    return der(INTEGER, number.to_bytes(number.bit_length() // 8 + 1, "big", signed=True))


@functools.lru_cache(maxsize=None)  # ~14 a message, of a few dozen OIDs: 7-10 % of a batch
def der_oid(dotted):
    """Return a DER OBJECT IDENTIFIER from its dotted form (X.690 8.19)."""
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1]] + arcs[2:]:
        group = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            group.append(0x80 | arc & 0x7F)
        body += bytes(reversed(group))
    return der(OID, bytes(body))


def algorithm(oid, parameters=b""):
    """Return an AlgorithmIdentifier (RFC 5280 4.1.1.2); no *parameters* = absent."""
    return der(SEQUENCE, der_oid(oid), parameters)


def der_set(*elements):
    """Return a DER SET OF: its elements sorted by their encodings (X.690 11.6)."""
    return der(SET, *sorted(elements))


class Ber:
    """One BER element of *data* at *pos* (X.690 8.1): tag, contents, whole encoding.

    Reads definite and indefinite lengths.  Slices are taken only when asked
    for, so a large encrypted payload is copied once.  Raises ValueError for
    anything malformed, truncated, nested deeper than MAX_BER_DEPTH or beyond
    the limits of its BerReader.
    """
    __slots__ = ("data", "pos", "depth", "tag", "start", "stop", "end", "reader")

    def __init__(self, data, pos=0, depth=0, reader=None):
        self.data, self.pos, self.depth = data, pos, depth
        self.reader = reader or BerReader(data)
        self.tag, self.start, self.stop, self.end = self.reader.bounds(pos, depth)

    @property
    def raw(self):
        """The whole encoding: identifier, length, contents (and end-of-contents)."""
        return self.data[self.pos:self.end]

    @property
    def body(self):
        """The contents octets."""
        return self.data[self.start:self.stop]

    @property
    def constructed(self):
        return bool(self.tag & 0x20)

    def children(self):
        """Return the elements inside a constructed element."""
        return list(self.each())

    def each(self):
        """Yield the elements inside a constructed element, one at a time.  Raises
        ValueError for one that runs past the end of this one (X.690 8.1.1)."""
        if not self.constructed:
            raise ValueError("a primitive element has no elements inside")
        at = self.start
        while at < self.stop:
            item = Ber(self.data, at, self.depth + 1, self.reader)
            if item.end > self.stop:
                raise ValueError("an ASN.1 element runs past the end of the one holding it")
            yield item
            at = item.end

    def octets(self):
        """Return the value of an OCTET STRING, primitive or constructed (X.690 8.7),
        its pieces joined once."""
        if not self.constructed:
            return self.body
        out = bytearray()
        try:
            view = memoryview(self.data)
        except TypeError:  # a Spool (a big received message): read piece by piece
            view = self.data
        self.collect(out, view)
        return bytes(out)

    def collect(self, out, view):
        """Append the pieces of a constructed string to bytearray *out*."""
        for piece in self.each():
            if piece.constructed:
                piece.collect(out, view)
            else:
                out += view[piece.start:piece.stop]

    def integer(self):
        """Return the value of an INTEGER."""
        if self.tag != INTEGER or self.start == self.stop:
            raise ValueError("expected an INTEGER")
        return int.from_bytes(self.body, "big", signed=True)

    def oid(self):
        """Return the dotted form of an OBJECT IDENTIFIER (X.690 8.19)."""
        if self.tag != OID or self.start == self.stop or self.data[self.stop - 1] & 0x80:
            raise ValueError("expected an OBJECT IDENTIFIER")
        arcs, value = [], 0
        for octet in self.body:
            value = value << 7 | octet & 0x7F
            if not octet & 0x80:
                arcs.append(value)
                value = 0
        first = min(arcs[0] // 40, 2)
        return ".".join(map(str, [first, arcs[0] - 40 * first] + arcs[1:]))


#: Deepest nesting of indefinite-length elements read (CMS needs about 10).
MAX_BER_DEPTH = 40
#: Longest contents of primitive elements whose value is computed, by tag.
MAX_VALUE_OCTETS = {INTEGER: MAX_INTEGER_OCTETS, OID: MAX_OID_OCTETS}
#: The same in a certificate, whose key parameters (DSA's p, q, g) are INTEGERs as long
#: as the key: up to 16,384 bits.
MAX_CERT_VALUE_OCTETS = {INTEGER: 2049, OID: MAX_OID_OCTETS}


class BerReader:
    """The state of reading one encoding: how many elements were read (at most
    MAX_BER_ELEMENTS), and where each indefinite-length element ends, found once:
    nested indefinite lengths are scanned once, not again at every level."""

    def __init__(self, data, der=False):
        self.data, self.count, self.ends, self.der = data, 0, {}, der  #: der: DER only
        self.limits = MAX_CERT_VALUE_OCTETS if der else MAX_VALUE_OCTETS

    def bounds(self, pos, depth):
        """Return (tag, contents start, contents stop, end) of the element at *pos*."""
        data = self.data
        self.count += 1
        if self.count > MAX_BER_ELEMENTS:
            raise ValueError("more than %d ASN.1 elements" % MAX_BER_ELEMENTS)
        if depth > MAX_BER_DEPTH or pos + 2 > len(data):
            raise ValueError("truncated or too deeply nested ASN.1")
        tag, first, start = data[pos], data[pos + 1], pos + 2
        if tag & 0x1F == 0x1F:
            raise ValueError("multi-octet ASN.1 tags are not used by CMS")
        if first == 0x80:  # indefinite length: elements up to the end-of-contents octets
            if not tag & 0x20:
                raise ValueError("indefinite length on a primitive element")
            if pos not in self.ends:
                self.ends[pos] = self.scan(start, depth)
            return (tag, start) + self.ends[pos]
        if first > 0x80:
            count, start = first & 0x7F, start + (first & 0x7F)
            if count > 8:
                raise ValueError("ASN.1 length too large")
            first = int.from_bytes(data[pos + 2:start], "big")
            if self.der and (first < 0x80 or not data[pos + 2]):  # X.690 10.1
                raise ValueError("not DER: a length not in its shortest form")
        if start + first > len(data):
            raise ValueError("truncated ASN.1 element")
        if first > self.limits.get(tag, first):
            raise ValueError("an %s longer than %d octets" % (
                "INTEGER" if tag == INTEGER else "OBJECT IDENTIFIER", self.limits[tag]))
        return tag, start, start + first, start + first

    def scan(self, at, depth):
        """Return (contents stop, end) of an indefinite-length element's contents at *at*."""
        while self.data[at:at + 2] != b"\0\0":
            at = self.bounds(at, depth + 1)[3]
        return at, at + 2


def der_encoding(ber):
    """Return the DER encoding of BER element *ber* (X.690 10): definite lengths in their
    shortest form, a constructed OCTET STRING as one primitive.  For values that are
    hashed or fed to a KDF, which are defined on DER (RFC 9629 5); SET OF order is kept."""
    if ber.tag == OCTET_STRING | 0x20:
        return der(OCTET_STRING, ber.octets())
    if not ber.constructed:
        return der(ber.tag, ber.body)
    return der(ber.tag, *(der_encoding(item) for item in ber.each()))


def der_checked(data):
    """Return the element at the start of *data*, every length inside it checked to be
    in DER's shortest form (X.690 10.1), as certificates must be (RFC 5280 4.1).
    Raises ValueError."""
    top = Ber(data, reader=BerReader(data, der=True))
    inside = [top]
    while inside:
        item = inside.pop()
        if item.constructed:
            inside.extend(item.each())
    return top


class Fields:
    """The elements of a constructed element, read in order: required ones by take(),
    OPTIONAL ones by their tag.  Raises ValueError for a missing or unexpected one."""

    def __init__(self, ber):
        self.items, self.at = ber.children(), 0

    def take(self, tag=None):
        """Return the next element; it must have *tag* when one is given (an OCTET STRING
        may be constructed, as BER allows: read it with octets())."""
        item = self.items[self.at] if self.at < len(self.items) else None
        if item is None or tag is not None and item.tag != tag and not (
                tag == OCTET_STRING and item.tag == OCTET_STRING | 0x20):
            raise ValueError("a CMS structure without a required field")
        self.at += 1
        return item

    def last(self, tag=None):
        """Return the next element (as take()), which must be the last one: the ASN.1
        has no further field."""
        item = self.take(tag)
        self.end()
        return item

    def end(self):
        """Raise ValueError when elements are left: a field the ASN.1 does not have."""
        if self.rest():
            raise ValueError("a CMS structure with a field too many")

    def optional(self, tag):
        """Return the next element when it has *tag*, else None."""
        if self.at < len(self.items) and self.items[self.at].tag == tag:
            return self.take()
        return None

    def rest(self):
        """Return the elements not read yet."""
        return self.items[self.at:]


def bounded(ber, limit, what):
    """Return the elements inside *ber*; more than *limit* raise MessageError."""
    items = []
    for item in ber.each():
        if len(items) == limit:
            raise MessageError("more than %d %s in one S/MIME part" % (limit, what))
        items.append(item)
    return items


def algorithm_oid(ber):
    """Return the algorithm OID of an AlgorithmIdentifier (RFC 5280 4.1.1.2)."""
    return Fields(ber).take(OID).oid()


def issuer_and_serial(cert):
    """Return the DER IssuerAndSerialNumber of *cert* (RFC 5652 10.2.4).

    Both come byte for byte from the certificate's own TBSCertificate
    (RFC 5280 4.1), so a recipient's lookup matches whatever string types its
    issuer name was written with.
    """
    cert = Certificate.of(cert)
    return der(SEQUENCE, cert.issuer_der, cert.serial)


###############################################################################
# Identities: keys and certificates ###########################################
###############################################################################

_SAFE_ADDRESS = re.compile(r"[a-z0-9!#$%&'*+=?^_`{|}~.-]+@[a-z0-9.-]+\.?[a-z0-9-]*\Z")
#: The curves we encrypt to -> the scheme we use, its KDF hash as strong as the curve
#: (RFC 8551 2.7.1.2, RFC 5753 8).
ECDH_SCHEMES = {"secp256r1": "1.3.132.1.11.1", "secp384r1": "1.3.132.1.11.2",
                "secp521r1": "1.3.132.1.11.3"}
#: ML-KEM parameter sets (FIPS 203) by their key's OID (RFC 9935 3); cryptography, and so
#: this tool, has no ML-KEM-512.
ML_KEM = {"2.16.840.1.101.3.4.4.1": "ML-KEM-512", "2.16.840.1.101.3.4.4.2": "ML-KEM-768",
          "2.16.840.1.101.3.4.4.3": "ML-KEM-1024"}


#: Signature algorithms of certificates checked here without cryptography.x509 (RFC 4055
#: 5, RFC 5758 3.2, RFC 8410 3): OID -> (key type, hash name or None); others are
#: checked by cryptography.
CERT_SIGNATURES = {
    "1.2.840.113549.1.1.5": ("rsa", "SHA1"), "1.2.840.113549.1.1.14": ("rsa", "SHA224"),
    "1.2.840.113549.1.1.11": ("rsa", "SHA256"), "1.2.840.113549.1.1.12": ("rsa", "SHA384"),
    "1.2.840.113549.1.1.13": ("rsa", "SHA512"), "1.2.840.10045.4.3.1": ("ec", "SHA224"),
    "1.2.840.10045.4.3.2": ("ec", "SHA256"), "1.2.840.10045.4.3.3": ("ec", "SHA384"),
    "1.2.840.10045.4.3.4": ("ec", "SHA512"), "1.3.101.112": ("ed", None),
    "1.3.101.113": ("ed", None)}
#: Certificate extensions read here (RFC 5280 4.2.1).
EXT_KEY_USAGE, EXT_SUBJECT_ALT_NAME, EXT_NAME_CONSTRAINTS, EXT_EXTENDED_KEY_USAGE = (
    "2.5.29.15", "2.5.29.17", "2.5.29.30", "2.5.29.37")
EXT_BASIC_CONSTRAINTS, EXT_SUBJECT_KEY_ID, EXT_CRL_DISTRIBUTION_POINTS, EXT_AUTHORITY_INFO = (
    "2.5.29.19", "2.5.29.14", "2.5.29.31", "1.3.6.1.5.5.7.1.1")
#: Extensions whose value is read here, checked to be DER when a certificate is read.
READ_EXTENSIONS = {EXT_KEY_USAGE, EXT_SUBJECT_ALT_NAME, EXT_NAME_CONSTRAINTS,
                   EXT_EXTENDED_KEY_USAGE, EXT_BASIC_CONSTRAINTS, EXT_SUBJECT_KEY_ID,
                   EXT_CRL_DISTRIBUTION_POINTS, EXT_AUTHORITY_INFO}
#: Extensions a certificate may mark critical (RFC 5280 4.2): those read here, the
#: authority key identifier, issuerAltName, the certificate policy extensions (4.2.1.4,
#: 4.2.1.5, 4.2.1.11, 4.2.1.14: no policy is required of a path, RFC 5280 6.1.1 (c)
#: initial-policy-set anyPolicy, so they restrict nothing here) and OCSP no-check
#: (RFC 6960 4.2.2.2.1).  A certificate with any other critical extension is refused.
KNOWN_CRITICAL = READ_EXTENSIONS | {"2.5.29.35", "2.5.29.18", "2.5.29.32", "2.5.29.33",
                                    "2.5.29.36", "2.5.29.54", "1.3.6.1.5.5.7.48.1.5"}
#: The attribute types of names read here: emailAddress, commonName (RFC 5280 A.1).
ATTR_EMAIL_ADDRESS, ATTR_COMMON_NAME = "1.2.840.113549.1.9.1", "2.5.4.3"
#: extKeyUsage purposes that allow S/MIME: emailProtection, anyExtendedKeyUsage.
EMAIL_PURPOSES = {"1.3.6.1.5.5.7.3.4", "2.5.29.37.0"}
#: KeyUsage bits (RFC 5280 4.2.1.3), numbered from the first.
KU_DIGITAL_SIGNATURE, KU_CONTENT_COMMITMENT, KU_KEY_ENCIPHERMENT, KU_KEY_AGREEMENT = 0, 1, 2, 4
#: Character string types of names and their Python codecs (X.680 41).
NAME_STRINGS = {0x0C: "utf-8", 0x13: "ascii", 0x14: "latin-1", 0x16: "ascii",
                0x1A: "ascii", 0x1C: "utf-32-be", 0x1E: "utf-16-be"}


class Certificate:
    """An X.509 certificate (RFC 5280 4.1) read with the DER layer: the fields the checks
    of a sending run need, without importing cryptography.x509 (15-20 ms of a
    single run's start-up, much of it compiling regular expressions).

    Certificates compare and hash by their DER, as cryptography's do.  Anything
    else (names as text, PEM) comes from cryptography's own certificate, made on
    first use (see x509()).  Raises ValueError for DER that is not a certificate
    or uses indefinite lengths.
    """

    def __init__(self, data, x509=None):
        self.der, self._x509, self._public = bytes(data), x509, None
        top = der_checked(self.der)
        outer = Fields(top)
        tbs, signature_algorithm, signature = (outer.take(SEQUENCE), outer.take(SEQUENCE),
                                               outer.take(BIT_STRING))
        fields = Fields(tbs)
        version = fields.optional(ctx(0))  # version [0] EXPLICIT, v1 when absent
        self.version = Fields(version).take(INTEGER).integer() + 1 if version else 1
        self.serial = fields.take(INTEGER).raw
        self.inner_algorithm = fields.take(SEQUENCE).raw
        self.issuer_der = fields.take(SEQUENCE).raw
        self.not_valid_before_utc, self.not_valid_after_utc = map(
            der_time, Fields(fields.take(SEQUENCE)).rest())
        self.subject_der, self.spki = fields.take(SEQUENCE).raw, fields.take(SEQUENCE).raw
        self.key_algorithm = algorithm_oid(Fields(Ber(self.spki)).take(SEQUENCE))
        fields.optional(ctx(1, constructed=False))  # issuerUniqueID
        fields.optional(ctx(2, constructed=False))  # subjectUniqueID
        extensions = fields.optional(ctx(3))
        self.extensions_der, self.critical = (read_extensions(extensions) if extensions
                                              else ({}, set()))
        if top.end != len(self.der) or top.reader.ends or fields.rest():
            raise ValueError("not a DER certificate")
        self.tbs = tbs.raw
        self.signature_algorithm = signature_algorithm.raw
        if not signature.body or signature.body[0]:
            raise ValueError("a certificate signature with unused bits")
        self.signature = signature.body[1:]

    @classmethod
    def of(cls, cert):
        """Return *cert* itself if it is one of ours, else ours of cryptography's *cert*."""
        if isinstance(cert, cls):
            return cert
        return cls(cert.public_bytes(serialization.Encoding.DER), cert)

    def __eq__(self, other):
        return isinstance(other, Certificate) and other.der == self.der

    def __hash__(self):
        return hash(self.der)

    def x509(self):
        """Return cryptography's certificate of the same DER (imports cryptography.x509)."""
        from cryptography import x509
        if self._x509 is None:
            self._x509 = x509.load_der_x509_certificate(self.der)
        return self._x509

    def __getattr__(self, name):
        """What this class does not read (issuer and subject as Names, public_bytes,
        fingerprint...): cryptography's certificate's."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.x509(), name)

    def public_key(self):
        """Return the public key (cryptography's object), loaded once.  Raises ValueError
        or UnsupportedAlgorithm for one cryptography cannot load."""
        if self._public is None:
            self._public = serialization.load_der_public_key(self.spki)
        return self._public

    def extension(self, oid):
        """Return the DER value of extension *oid*, or None when there is none."""
        return self.extensions_der.get(oid)

    def emails(self):
        """Return the SAN rfc822Names, lower-cased (None without a SAN).  Raises ValueError."""
        san = self.extension(EXT_SUBJECT_ALT_NAME)
        if san is None:
            return None
        return [name.body.decode("ascii").lower() for name in Ber(san).children()
                if name.tag == ctx(1, constructed=False)]

    def subject_emails(self):
        """Return the subject's emailAddress attributes, lower-cased."""
        return [value.lower() for value in name_values(self.subject_der, ATTR_EMAIL_ADDRESS)]

    def is_issuer_of(self, cert):
        """True when this certificate's subject is *cert*'s issuer and its key signed
        *cert* (RFC 5280 6.1.3 (a)(1) and (a)(4))."""
        if self.subject_der != cert.issuer_der:
            return False
        kind, hash_name = CERT_SIGNATURES.get(algorithm_oid(Ber(cert.signature_algorithm)),
                                              (None, None))
        try:
            if kind is None or cert.inner_algorithm != cert.signature_algorithm:
                cert.x509().verify_directly_issued_by(self.x509())
            else:
                verify_with(self.public_key(), kind, hash_name, cert.signature, cert.tbs)
            return True
        except Exception:  # ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm
            return False


def verify_with(key, kind, hash_name, signature, data):
    """Check *signature* over *data* by public *key*.  Raises InvalidSignature, or
    TypeError for a key of another kind than *kind*."""
    if kind == "rsa" and isinstance(key, rsa.RSAPublicKey):
        return key.verify(signature, data, padding.PKCS1v15(), getattr(hashes, hash_name)())
    if kind == "ec" and isinstance(key, ec.EllipticCurvePublicKey):
        return key.verify(signature, data, ec.ECDSA(getattr(hashes, hash_name)()))
    if kind == "ed" and hasattr(key, "verify") and not isinstance(
            key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        return key.verify(signature, data)
    raise TypeError("a %s signature by another kind of key" % kind)


def read_extensions(ber):
    """Return ({OID: DER value}, {OIDs of the critical ones}) of a certificate's [3]
    Extensions (RFC 5280 4.1.2.9).

    The value of an extension this tool reads (READ_EXTENSIONS) must be one DER
    element; others are kept as they are: an unknown non-critical extension is
    ignored, whatever it holds (RFC 5280 4.2).  Raises ValueError for an extension
    that appears twice or a malformed one this tool reads.
    """
    found, critical = {}, set()
    for item in Fields(ber).take(SEQUENCE).children():
        fields = Fields(item)
        oid = fields.take(OID).oid()
        flag = fields.optional(0x01)  # critical BOOLEAN DEFAULT FALSE
        value = fields.take(OCTET_STRING).body
        if oid in found or fields.rest() or oid in READ_EXTENSIONS and (
                not value or der_checked(value).end != len(value)):
            raise ValueError("extension %s twice or malformed" % oid)
        found[oid] = value
        if flag is not None and flag.body != b"\0":
            critical.add(oid)
    return found, critical


def der_time(ber):
    """Return the UTC datetime of a DER UTCTime or GeneralizedTime (RFC 5280 4.1.2.5)."""
    text = ber.body.decode("ascii")
    if ber.tag == 0x17 and len(text) == 13:  # YYMMDDHHMMSSZ: 1950-2049
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text
    elif ber.tag != 0x18 or len(text) != 15:
        raise ValueError("a certificate validity that is not a DER time")
    if not text.endswith("Z") or not text[:-1].isdigit():
        raise ValueError("a certificate validity that is not a DER time")
    return datetime(*(int(text[a:b]) for a, b in ((0, 4), (4, 6), (6, 8), (8, 10), (10, 12),
                                                   (12, 14))), tzinfo=timezone.utc)


def name_text(value):
    """Return the text of a name's string *value* (a Ber of a NAME_STRINGS type).  A
    T61String is read as UTF-8 where it is that (CAs put UTF-8 in them: so does
    cryptography), else as Latin-1.  Raises ValueError (UnicodeDecodeError)."""
    if value.tag == 0x14:
        try:
            return value.body.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return value.body.decode(NAME_STRINGS[value.tag])


def name_values(name, oid):
    """Return the text values of attribute *oid* in DER Name *name* (RFC 5280 4.1.2.4).
    Raises ValueError for a string type it cannot read."""
    values = []
    for rdn in Ber(name).children():
        for attribute in rdn.children():
            fields = Fields(attribute)
            kind, value = fields.take(OID), fields.take()
            if kind.oid() == oid:
                if value.tag not in NAME_STRINGS:
                    raise ValueError("a name attribute of string type %d" % value.tag)
                values.append(name_text(value))
    return values


class Identity:
    """A certificate (and for the sender, its private key and chain) for an address.

    *path*: the file it came from; *chain*: the intermediates, leaf and root
    excluded; *rid*: the certificate's IssuerAndSerialNumber, as recipients and
    signers are named in CMS (worked out once: it costs a parse).
    """

    def __init__(self, address, cert, path, key=None, chain=()):
        self.address, self.cert, self.path = address, Certificate.of(cert), path
        self.key, self.chain = key, [Certificate.of(c) for c in chain]
        self.rid = issuer_and_serial(cert)
        self.kind, self.digest = key_kind(cert)
        self.renewals = []  #: decryption: other certificates of the same key

    def certificate_set(self):
        """Return the DER [0] CertificateSet of the certificate and its chain (RFC 5652
        10.2.3), sorted as a DER SET OF."""
        return der(ctx(0), *sorted(c.der for c in [self.cert] + self.chain))


def key_kind(cert):
    """Return ("rsa", "ec", "mlkem" or another key type's name, digest name) for *cert*'s key.

    The digest signs with SHA-256, or for EC keys with the hash of the curve's
    strength (P-384: SHA-384, P-521: SHA-512; RFC 5753 7.1.2, RFC 8551 2.1):
    gpgsm refuses a P-384 signature over a 256-bit hash.
    """
    try:
        public = cert.public_key()
    except (crypto_errors.UnsupportedAlgorithm, ValueError):
        return "unknown", "SHA256"
    if isinstance(public, rsa.RSAPublicKey):
        return "rsa", "SHA256"
    if is_ml_kem(public):
        return "mlkem", "SHA256"
    if isinstance(public, ec.EllipticCurvePublicKey):
        return "ec", {"secp384r1": "SHA384", "secp521r1": "SHA512"}.get(public.curve.name,
                                                                        "SHA256")
    return type(public).__name__.replace("PublicKey", "").lstrip("_"), "SHA256"


class Keystore:
    """Where identities are found (key directories, key password) and what was loaded.

    Batches send many messages from one sender to few recipients: each identity
    is read, parsed and checked once per process (a refusal is not kept: it is
    raised again for every message that needs it).  *validated*: the file
    listing key files that passed full validation (see validated_keys());
    *warn*: the reporter's warn(text, topic), for exposed key files; *tokens*: the
    Pkcs11 that opens the keys of .p11 files.
    """

    def __init__(self, dirs, password=None, validated="", warn=None, tokens=None,
                 revocation=None):
        self.dirs, self.password, self.validated = list(dirs), password, validated
        self.tokens = tokens or Pkcs11()
        self.warn = warn or (lambda text, topic=None: None)
        self.loaded, self.known = {}, None
        self.revocation = revocation  #: a Revocation, or None (--revocation off)

    def revoked(self, ident, whose, certs=()):
        """Raise IdentityError (78) when *ident*'s certificate (its issuer among its chain
        and *certs*) is refused by the revocation policy (see Revocation)."""
        issuers = list(ident.chain) + list(certs)
        problem = self.revocation and self.revocation.problem(ident.cert, next(
            (c for c in issuers if c.is_issuer_of(ident.cert)), None))
        if problem:
            raise IdentityError("%s: %s certificate for %s %s" % (ident.path, whose,
                                                                 ident.address, problem))

    def cached(self, load, address, *args):
        """Return load(address, *args), loaded once per process."""
        key = (load.__name__, address) + args
        if key not in self.loaded:
            self.loaded[key] = load(address, *args)
        return self.loaded[key]

    def signer(self, address):
        """Return the sender's Identity with key, certificate and chain.  Raises IdentityError."""
        return self.cached(self.load_signer, address)

    def recipient(self, address):
        """Return a recipient's Identity (certificate only).  Raises IdentityError."""
        return self.cached(self.load_recipient, address)

    def own_copy(self, address, signing):
        """Return the sender's Identity to encrypt its own copy to, or None."""
        return self.cached(self.load_own_copy, address, signing)

    def decryption(self, address):
        """Return our Identity for *address* to decrypt with.  Raises IdentityError."""
        return self.cached(self.load_decryption, address)

    def find(self, address, suffixes):
        """Return the first '<dir>/<address><suffix>' in the key directories, or None."""
        return find_file(address, suffixes, self.dirs)

    def load_signer(self, address):
        path = self.find(address, KEY_SUFFIXES)
        if path is None:
            raise IdentityError("no private key for %s: put %s.pem (or .p12, .p11) in one of: %s"
                                % (address, safe_address(address), ", ".join(self.dirs)))
        for line in exposed(path, "private key file") if not path.endswith(".p11") else ():
            self.warn(line, path)
        key, certs, cert_path = self.key_and_certificates(address, path)
        if path.endswith(".pem") and cert_path == path and not any(same_key(c, key)
                                                                   for c in certs):
            raise IdentityError("no certificate for %s: %s holds only the key; add %s.crt"
                                % (address, path, safe_address(address)))
        signer = make_identity(address, key, certs, cert_path)
        self.revoked(signer, "the own", certs)
        warning = expiry_warning(signer.cert, address, cert_path)
        if warning:
            self.warn(warning, "expiry " + address)
        if self.post_quantum(address):  # published with every signature: see harvest()
            signer.chain.append(self.recipient(address).cert)
        return signer

    def key_and_certificates(self, address, path):
        """Return (private key, certificates, file of the certificate) for a key file:
        a .pem (with <address>.crt beside it when it holds only the key), a .p11 (a
        key on a token, its certificate in <address>.crt) or PKCS#12."""
        if path.endswith(".p11"):
            return self.token_key(address, path)
        if not path.endswith(".pem"):
            key, cert, extra = self.pkcs12(path)
            return key, [cert] + extra, path
        data = read_key_file(path)
        key, certs = self.private_key(data, path), load_certificates(data, path)
        if any(same_key(c, key) for c in certs):
            return key, certs, path
        crt = self.find(address, (".crt",))
        if crt is None:
            return key, certs, path
        return key, certs + load_certificates(read_key_file(crt), crt), crt

    def token_key(self, address, path):
        """Return (TokenKey, certificates, file of the certificate) of a .p11 file: the
        key on a PKCS#11 token its URI names, the certificates of <address>.crt (the
        key's own first: the one naming *address*)."""
        crt = self.find(address, (".crt",))
        if crt is None:
            raise IdentityError("no certificate for %s: %s names a key on a PKCS#11 token; "
                                "add %s.crt" % (address, path, safe_address(address)))
        certs = load_certificates(read_key_file(crt), crt)
        if not certs:
            raise IdentityError("%s: holds no certificate" % crt)
        certs.sort(key=lambda c: address not in cert_emails(c))
        return self.tokens.key(read_uri_file(path), certs[0], crt), certs, crt

    def load_recipient(self, address):
        path = self.find(address, (".crt",))
        if path is None:
            raise IdentityError("no certificate for recipient %s: put %s.crt in one of: %s"
                                % (address, safe_address(address), ", ".join(self.dirs)))
        ident = recipient_from_file(address, path)
        self.revoked(ident, "the recipient's")
        return ident

    def load_own_copy(self, address, signing):
        """A post-quantum (ML-KEM) <from>.crt; else the signing certificate when it allows
        encryption, else <from>.crt when there is one that does (a signing-only
        certificate beside an encryption one is common); None, with a warning, when
        neither does."""
        signer = self.signer(address) if signing else None
        problem = signer and usage_problem(signer.cert, "encrypt")
        if signer is not None and not problem and not self.post_quantum(address):
            return signer
        if self.find(address, (".crt",)) is not None:
            try:
                return self.recipient(address)
            except IdentityError as exc:
                problem = str(exc)
        elif problem:
            problem = "%s: certificate for %s %s" % (signer.path, address, problem)
        if problem:
            self.warn("the message is not encrypted to its sender (the Sent copy will not be "
                      "readable): %s" % problem, "own-copy")
        return None

    def post_quantum(self, address):
        """True when <address>.crt holds a usable ML-KEM certificate for *address*."""
        if self.find(address, (".crt",)) is None:
            return False
        try:
            return self.recipient(address).kind == "mlkem"
        except IdentityError:
            return False

    def certificates(self, address):
        """Return the certificates beside *address*'s private key, read without the key
        (None for a PKCS#12 file: its certificates are behind the password)."""
        path = self.find(address, KEY_SUFFIXES)
        if path is None or not path.endswith((".pem", ".p11")):
            return None
        certs = load_certificates(read_key_file(path), path) if path.endswith(".pem") else []
        crt = self.find(address, (".crt",))
        return certs + (load_certificates(read_key_file(crt), crt) if crt else [])

    def load_decryption(self, address):
        """Our key and its certificate, unchecked: old mail must stay readable after
        its certificate expires."""
        path = self.find(address, KEY_SUFFIXES)
        key, certs, _ = self.key_and_certificates(address, path)
        mine = unique_certs([c for c in certs if same_key(c, key)])
        if not mine:
            raise IdentityError("%s: no certificate matching the private key for %s"
                                % (path, address))
        ident = Identity(address, current_cert(mine), path, key)
        ident.renewals = [c for c in mine if c != ident.cert]  # the same key certified again
        return ident

    def private_key(self, data, path):
        """Return the private key in PEM *data*.  Raises IdentityError.

        RSA key validation (a primality and consistency check, ~30 ms) runs the
        first time a key file's exact bytes are seen; see validated_keys().
        """
        if b"PRIVATE KEY-----" not in data:
            raise IdentityError("%s: holds no PEM private key" % path)
        encrypted = b"ENCRYPTED" in data  # PKCS#8 or legacy PEM encryption
        if encrypted and self.password is None:
            raise IdentityError("%s: the private key is encrypted: set SMIME_KEY_PASSWORD" % path)
        digest = key_digest(data)
        if self.known is None:
            self.known = validated_keys(self.validated)
        known = digest in self.known
        try:
            key = serialization.load_pem_private_key(data, self.password if encrypted else None,
                                                     unsafe_skip_rsa_key_validation=known)
        except (TypeError, ValueError):
            if encrypted:
                raise IdentityError("%s: wrong SMIME_KEY_PASSWORD for this private key (or an "
                                    "encrypted ML-KEM key holding its expanded key, which "
                                    "cannot be read: store it in the seed-only form)" % path)
            key = ml_kem_private_key(data, path)  # OpenSSL's forms cryptography cannot read
            if key is None:
                raise IdentityError("%s: the private key cannot be read (corrupt or "
                                    "unsupported)" % path)
        except Exception as exc:  # UnsupportedAlgorithm and friends
            raise IdentityError("%s: the private key cannot be used: %s" % (path, exc))
        if not known:
            remember_validated(self.validated, digest)
            self.known.add(digest)
        return key

    def pkcs12(self, path):
        """Return (key, cert, extra certs) from a PKCS#12 file.  Raises IdentityError."""
        from cryptography.hazmat.primitives.serialization import pkcs12
        data = read_key_file(path)
        try:
            key, cert, extra = pkcs12.load_key_and_certificates(data, self.password)
        except ValueError:
            hint = "check" if self.password else "set"
            raise IdentityError("%s: cannot open the PKCS#12 file (wrong password or corrupt): "
                                "%s SMIME_KEY_PASSWORD" % (path, hint))
        if key is None or cert is None:
            raise IdentityError("%s: the PKCS#12 file lacks a private key or certificate" % path)
        return key, Certificate.of(cert), [Certificate.of(c) for c in extra]


def keystore_of(settings, reporter):
    """Return the Keystore of a run: its key directories, password and validated-keys list."""
    revocation = None if settings.revocation == "off" else Revocation(
        settings.revocation or "soft", settings.cache_dir, settings.crl_files, reporter.warn)
    return Keystore(settings.key_dirs, settings.key_password,
                    os.path.join(settings.cache_dir, "validated-keys"), reporter.warn,
                    Pkcs11(settings.pkcs11_module, settings.pkcs11_pin,
                           os.path.join(settings.cache_dir, "pkcs11.lock")), revocation)


def ml_kem_private_key(data, path):
    """Return the ML-KEM private key of the unencrypted PEM PKCS#8 in *data*, or None when
    it holds no ML-KEM key.  Raises IdentityError for one that cannot be used.

    RFC 9935 6 gives ML-KEM-PrivateKey three forms: seed [0] (what cryptography
    writes and reads), expandedKey, and both (a SEQUENCE of seed and expanded key,
    what OpenSSL 3.5+ writes by default).  The key is made from its 64-octet seed;
    in the 'both' form the public key inside the expanded key must be the seed's.
    The seed cannot be recovered from an expanded key alone, nor can cryptography
    load one: that form is refused.
    """
    match = re.search(rb"-----BEGIN PRIVATE KEY-----(.*?)-----END PRIVATE KEY-----", data, re.S)
    try:
        info = Ber(base64.b64decode(match.group(1), validate=False)).children()
        oid = info[1].children()[0].oid()
        if oid not in ML_KEM:
            return None
        choice = Ber(info[2].octets())
        seed, expanded = ml_kem_key_parts(choice)
    except (AttributeError, IndexError, ValueError):
        return None
    name = ML_KEM[oid]
    if seed is None:
        raise IdentityError("%s: the %s private key holds only the expanded key, from which "
                            "its seed cannot be recovered and which this tool cannot load: "
                            "write it with its seed (OpenSSL: openssl genpkey -algorithm %s "
                            "writes seed and expanded key)" % (path, name, name))
    key = ml_kem_from_seed(name, seed, path)
    public = key.public_key().public_bytes_raw()
    start = len(public) - 32  # expanded key = dk_PKE (384k) || ek (384k + 32) || H(ek) || z
    if expanded is not None and expanded[start:start + len(public)] != public:
        raise IdentityError("%s: the seed and the expanded key of this %s private key do not "
                            "match (a damaged key file)" % (path, name))
    return key


def ml_kem_key_parts(choice):
    """Return (seed, expanded key) of a DER ML-KEM-PrivateKey (RFC 9935 6), None for a
    part it lacks.  Raises ValueError for anything else."""
    if choice.tag == ctx(0, constructed=False):  # seed [0] IMPLICIT OCTET STRING
        return choice.body, None
    if choice.tag == OCTET_STRING:  # expandedKey
        return None, choice.body
    if choice.tag == SEQUENCE:  # both
        seed, expanded = choice.children()
        return seed.octets(), expanded.octets()
    raise ValueError("not an ML-KEM-PrivateKey")


def ml_kem_from_seed(name, seed, path):
    """Return the ML-KEM private key of parameter set *name* made from its 64-octet *seed*
    (FIPS 203 6.1).  Raises IdentityError for ML-KEM-512 or a seed of another size."""
    make = mlkem and {"ML-KEM-768": mlkem.MLKEM768PrivateKey,
                      "ML-KEM-1024": mlkem.MLKEM1024PrivateKey}.get(name)
    if make is None:
        raise IdentityError("%s: an %s private key, which this tool cannot use (cryptography "
                            "has no %s)" % (path, name, name))
    try:
        return make.from_seed_bytes(bytes(seed))
    except ValueError:
        raise IdentityError("%s: the %s private key's seed is %d octets, not 64 (a damaged "
                            "key file)" % (path, name, len(seed)))


def safe_address(address):
    """Return *address* lower-cased if it is safe as a file name.  Raises MessageError.

    The address comes from an untrusted message: no path separators, no "..",
    no leading dot, nothing but the characters of an ordinary addr-spec.
    """
    addr = address.lower()
    if (not _SAFE_ADDRESS.match(addr) or ".." in addr or addr.startswith(".")
            or len(addr) > 254):
        raise MessageError("address %r cannot name a key file (unexpected characters)" % address)
    return addr


def find_file(address, suffixes, dirs):
    """Return the first existing '<dir>/<address><suffix>', or None."""
    name = safe_address(address)
    for directory in dirs:
        base = os.path.realpath(directory)
        for suffix in suffixes:
            path = os.path.join(directory, name + suffix)
            if os.path.realpath(path).startswith(base + os.sep) and os.path.isfile(path):
                return path
    return None


def read_key_file(path):
    """Return the bytes of a key or certificate file.  Raises IdentityError."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise IdentityError("%s: cannot read: %s" % (path, exc.strerror or exc))


#: A PEM certificate's base64 (RFC 7468 5).
PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n(.*?)-----END CERTIFICATE-----",
                             re.S)


def load_certificates(data, path):
    """Return the certificates in PEM or DER *data*.  Raises IdentityError."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            blocks = PEM_CERTIFICATE.findall(data)
            if not blocks:
                raise ValueError("no whole PEM certificate")
            return [Certificate(base64.b64decode(b"".join(b.split()), validate=True))
                    for b in blocks]
        if b"-----BEGIN" in data:
            return []
        return [Certificate(data)]
    except ValueError:
        raise IdentityError("%s: not a readable PEM or DER certificate" % path)


def key_digest(data):
    """Return the SHA-256 (hex) of a key file's bytes: it identifies, never reveals, the key."""
    return hashlib.sha256(data).hexdigest()


def validated_keys(path):
    """Return the digests of key files that passed full validation before (file *path*).

    Loading the very same bytes again yields the very same key, so skipping
    validation for them is as safe as validating.  The list is trusted only if
    it is ours and not writable by group or others; otherwise it is ignored.
    """
    try:
        st = os.stat(path)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return set()
        with open(path) as fh:
            return set(fh.read().split())
    except OSError:
        return set()


def remember_validated(path, digest):
    """Add *digest* to the validated-keys list *path* (best effort, private permissions)."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(digest + "\n")
    except OSError:
        pass


def make_identity(address, key, certs, path):
    """Pick the certificate of *key* among *certs* (the current one: see current_cert()),
    check it, return the Identity."""
    leaf = current_cert([c for c in certs if same_key(c, key)])
    if leaf is None:
        raise IdentityError("%s: the certificate does not match the private key for %s"
                            % (path, address))
    check_certificate(leaf, address, path, "sign", certs)
    chain = [c for c in certs if c is not leaf and not is_self_signed(c)]
    return Identity(address, leaf, path, key, unique_certs(chain))


def unique_certs(certs):
    """Return *certs* without duplicates, order kept."""
    return list(dict.fromkeys(certs))  # certificates compare and hash by their DER


def same_key(cert, key):
    """True when *cert* carries the public half of private *key*."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def is_self_signed(cert):
    """True when *cert* is a root: issuer equals subject and it signed itself."""
    cert = Certificate.of(cert)
    return cert.issuer_der == cert.subject_der and cert.is_issuer_of(cert)


def recipient_from_file(address, path):
    """Return the checked recipient Identity in certificate file *path*: of the
    certificates for *address* it holds (an old one and its renewal), the current one."""
    certs = load_certificates(read_key_file(path), path)
    if not certs:
        raise IdentityError("%s: holds no certificate" % path)
    mine = current_cert([c for c in certs if address in cert_emails(c)] or certs[:1])
    check_certificate(mine, address, path, "encrypt", certs)
    return Identity(address, mine, path, chain=issuer_path(mine, certs))


def current_cert(certs, now=None):
    """Return the one of *certs* (a person's old and renewed certificates) valid now that
    expires last; when none is valid now, the one that expires last (whose refusal
    names why); None for no certificate."""
    now = now or datetime.now(timezone.utc)
    valid = [c for c in certs if c.not_valid_before_utc <= now <= c.not_valid_after_utc]
    return max(valid or certs, key=lambda c: c.not_valid_after_utc, default=None)


#: An own certificate expiring within this many days is warned about (once per run).
RENEWAL_WARNING_DAYS = 30


def expiry_warning(cert, address, path, now=None):
    """Return a warning when *cert*, our own, expires within RENEWAL_WARNING_DAYS, or ''."""
    left = cert.not_valid_after_utc - (now or datetime.now(timezone.utc))
    if left.days >= RENEWAL_WARNING_DAYS:
        return ""
    return ("%s: the certificate for %s expires on %s (in %s): renew it and put the new one "
            "in %s.crt beside the old one" % (path, address, cert.not_valid_after_utc.date(),
                                             duration(max(left.total_seconds(), 0)),
                                             safe_address(address)))


def cert_emails(cert):
    """Return the lower-cased e-mail addresses of *cert*: SAN rfc822Name, else subject
    ([] for a certificate whose extensions cannot be read)."""
    cert = Certificate.of(cert)
    try:
        return cert.emails() or cert.subject_emails()
    except ValueError:
        return []


def check_certificate(cert, address, path, purpose, certs=()):
    """Refuse a certificate unfit to *purpose* ('sign' or 'encrypt') for *address*.

    Checks validity dates, the e-mail address (RFC 8550 3), key usage and
    extended key usage (RFC 8550 4.4), and the path rules (path_problem()) and
    rfc822Name constraints of the issuers found among *certs* (the file's own
    chain: no trust store is read when sending), as a recipient will check them.
    Raises IdentityError naming the reason.
    """
    issuers = issuer_path(cert, certs)
    reason = (certificate_problem(cert, address, purpose)
              or path_problem([cert] + issuers, bool(issuers) and is_self_signed(issuers[-1]))
              or name_constraint_problem(cert, issuers))
    if reason:
        raise IdentityError("%s: certificate for %s %s" % (path, address, reason))


def certificate_problem(cert, address, purpose, now=None):
    """Return why *cert* cannot serve *address* for *purpose*, or '' when it can."""
    now = now or datetime.now(timezone.utc)
    if now < cert.not_valid_before_utc:
        return "is not valid yet (valid from %s)" % cert.not_valid_before_utc.date()
    if now > cert.not_valid_after_utc:
        return "has expired (on %s)" % cert.not_valid_after_utc.date()
    emails = cert_emails(cert)
    if address.lower() not in emails:
        return "is issued to %s, not to this address" % (", ".join(emails) or "no e-mail address")
    return end_entity_problem(cert) or usage_problem(cert, purpose)


def issuer_path(cert, certs):
    """Return the issuers of *cert* found among *certs*, nearest first, up to a root:
    each one's subject is the issuer name of the one before and its key signed it."""
    path, current, certs = [], Certificate.of(cert), [Certificate.of(c) for c in certs]
    while len(path) < len(certs) and not is_self_signed(current):
        parent = next((c for c in certs if c != current and c not in path
                       and c.is_issuer_of(current)), None)
        if parent is None:
            break
        path.append(parent)
        current = parent
    return path


def issued_by(cert, issuer):
    """True when *issuer* is named *cert*'s issuer and its key signed *cert*."""
    return Certificate.of(issuer).is_issuer_of(Certificate.of(cert))


def certificate_addresses(cert):
    """Return every e-mail address of *cert*, lower-cased: its SAN rfc822Names and its
    subject emailAddress attributes, which name constraints govern alike (RFC 5280
    4.2.1.10).  Raises ValueError for a SAN that cannot be parsed."""
    cert = Certificate.of(cert)
    return (cert.emails() or []) + cert.subject_emails()


def name_constraint_problem(cert, issuers):
    """Return why an e-mail address of *cert* breaks the rfc822Name constraints of a CA
    in *issuers*, or '' (RFC 5280 4.2.1.10: permitted and excluded subtrees).

    cryptography applies them to SAN rfc822Names only; this applies them to the
    subject's emailAddress attributes too, as RFC 5280 requires, and to every CA
    of the path.  A CA with permitted rfc822Name subtrees permits nothing else.
    """
    try:
        addresses = certificate_addresses(cert)
        rules = [(ca, mail_subtrees(Certificate.of(ca))) for ca in issuers]
    except ValueError:
        return "has extensions that cannot be read (a malformed certificate)"
    for ca, (permitted, excluded) in rules:
        for address in addresses:
            if excluded and any(in_mail_subtree(address, tree) for tree in excluded):
                return ("names %s, which the name constraints of its issuer %s exclude"
                        % (address, ca_name(ca)))
            if permitted and not any(in_mail_subtree(address, tree) for tree in permitted):
                return ("names %s, which the name constraints of its issuer %s do not permit "
                        "(only %s)" % (address, ca_name(ca), ", ".join(permitted)))
    return ""


def mail_subtrees(ca):
    """Return (permitted, excluded) rfc822Name subtrees of *ca*'s NameConstraints
    (RFC 5280 4.2.1.10), each a list of strings ([] when it has none).  Raises
    ValueError for a NameConstraints that cannot be read."""
    value = ca.extension(EXT_NAME_CONSTRAINTS)
    trees = {ctx(0): [], ctx(1): []}
    for part in Ber(value).children() if value is not None else ():
        if part.tag not in trees:
            raise ValueError("a NameConstraints field that is not a subtree list")
        for subtree in part.children():
            base = Fields(subtree).take()
            if base.tag == ctx(1, constructed=False):
                trees[part.tag].append(base.body.decode("ascii"))
    return trees[ctx(0)], trees[ctx(1)]


def in_mail_subtree(address, tree):
    """True when *address* is within rfc822Name constraint *tree* (RFC 5280 4.2.1.10): a
    mailbox ("a@example.com"), every mailbox on a host ("example.com") or on any host
    in a domain (".example.com").  Case-insensitive, as addresses are here."""
    tree, host = tree.lower(), address.rpartition("@")[2]
    if "@" in tree:
        return address == tree
    if tree.startswith("."):
        return host.endswith(tree)
    return host == tree


def ca_name(ca):
    """Return the common name of CA certificate *ca* for a message, or a description
    when cryptography cannot read its subject (our DER reading took the rest)."""
    try:
        return common_name(ca.subject)
    except ValueError:
        return "(a CA certificate whose subject cannot be read)"


def common_name(name):
    """Return the common name of an x509 Name, or its whole RFC 4514 form if it has none."""
    from cryptography import x509
    names = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else name.rfc4514_string()


def usage_problem(cert, purpose):
    """Return why the key type, key usage or extended key usage forbid *purpose*, or ''.

    Encryption needs an RSA key allowing keyEncipherment, an EC key on a curve
    of ECDH_SCHEMES allowing keyAgreement (RFC 8550 4.4.2, RFC 5480 3), or an
    ML-KEM-768/1024 key allowing keyEncipherment (RFC 9935 5, RFC 9936 3).
    """
    cert = Certificate.of(cert)
    kind = "sign"
    if purpose == "encrypt":
        kind = encryption_kind(cert)
        if kind not in ("rsa", "ec", "mlkem"):
            return kind
    try:
        ku, eku = key_usage(cert), extended_key_usage(cert)
    except ValueError:
        return "has extensions that cannot be read (a malformed certificate)"
    if ku is not None:
        if kind == "sign" and not ku & {KU_DIGITAL_SIGNATURE, KU_CONTENT_COMMITMENT}:
            return "does not allow digital signatures (key usage)"
        if kind == "rsa" and KU_KEY_ENCIPHERMENT not in ku:
            return "does not allow key encipherment (key usage)"
        if kind == "ec" and KU_KEY_AGREEMENT not in ku:
            return "has an EC key that does not allow key agreement (key usage)"
        if kind == "mlkem" and KU_KEY_ENCIPHERMENT not in ku:
            return "has an ML-KEM key that does not allow key encipherment (key usage)"
    if eku is not None and not EMAIL_PURPOSES & eku:
        return "is not for e-mail protection (extended key usage)"
    return ""


def key_usage(cert):
    """Return the set of KeyUsage bit numbers *cert* asserts, None without the extension
    (RFC 5280 4.2.1.3).  Raises ValueError for one that cannot be read."""
    value = cert.extension(EXT_KEY_USAGE)
    if value is None:
        return None
    bits = Ber(value)
    if bits.tag != BIT_STRING or not bits.body or bits.body[0] > 7:
        raise ValueError("a KeyUsage that is not a BIT STRING")
    return {n for n in range(8 * (len(bits.body) - 1)) if bits.body[1 + n // 8] & 0x80 >> n % 8}


def extended_key_usage(cert):
    """Return the set of extKeyUsage purposes (OIDs) of *cert*, None without the extension
    (RFC 5280 4.2.1.12).  Raises ValueError for one that cannot be read."""
    value = cert.extension(EXT_EXTENDED_KEY_USAGE)
    return None if value is None else {purpose.oid() for purpose in Ber(value).children()}


# -- Path rules (RFC 5280 6.1), one set for sending and receiving -------------------

#: Most CAs between a certificate and its trust anchor, and most issuer candidates whose
#: signature is checked while looking for a path (a message may carry 64 certificates).
MAX_PATH_CAS, MAX_PATH_CANDIDATES = 8, 64
#: KeyUsage keyCertSign (RFC 5280 4.2.1.3).
KU_KEY_CERT_SIGN = 5
#: Certificate signature algorithms with SHA-1, which no longer resists forgery.
SHA1_CERT_SIGNATURES = {"1.2.840.113549.1.1.5", "1.2.840.10045.4.1", "1.2.840.10040.4.3"}
#: Names of extKeyUsage purposes for messages (RFC 5280 4.2.1.12).
EKU_NAMES = {"1.3.6.1.5.5.7.3.1": "TLS server authentication",
             "1.3.6.1.5.5.7.3.2": "TLS client authentication",
             "1.3.6.1.5.5.7.3.3": "code signing", "1.3.6.1.5.5.7.3.4": "e-mail protection",
             "1.3.6.1.5.5.7.3.8": "time stamping", "1.3.6.1.5.5.7.3.9": "OCSP signing"}


def path_problem(path, anchored, now=None):
    """Return why certification path *path* (the certificate first, then each issuer)
    is not valid for mail, or '' when it is (RFC 5280 6.1, with EKU chaining).

    *anchored*: the last one is the trust anchor, whose own extensions and dates
    are not checked (RFC 5280 6.1.1 (d): an anchor is a name and a key).  Every
    other CA must be a v3 CA allowed to sign certificates, valid now, within its
    pathLenConstraint, with no unknown critical extension, no SHA-1 signature and
    no weak key, and its extKeyUsage, if any, must include e-mail protection (as
    NSS, Windows and Apple treat a CA's EKU: a constraint).  The certificate itself
    is checked by certificate_problem().
    """
    below = 0  # CAs below this one, self-issued ones not counted (RFC 5280 6.1.4 (l))
    for ca in path[1:-1] if anchored else path[1:]:
        problem = ca_problem(ca, below, now)
        if problem:
            return problem
        below += ca.subject_der != ca.issuer_der
    return ""


def end_entity_problem(cert):
    """Return why *cert*, a person's certificate, is refused whatever the purpose, or ''."""
    try:
        is_ca = basic_constraints(cert)[0]
    except ValueError:
        return "has extensions that cannot be read (a malformed certificate)"
    if is_ca:
        return ("is a CA certificate (basicConstraints cA=TRUE), not a person's: a CA's key "
                "does not sign or receive mail")
    return certificate_rule_problem(cert)


def certificate_rule_problem(cert):
    """Return why any certificate but a trust anchor is refused, or '': an unknown
    critical extension (RFC 5280 4.2), a SHA-1 signature, a weak key."""
    unknown = sorted(cert.critical - KNOWN_CRITICAL)
    if unknown:
        return ("has a critical extension this tool does not know (%s): refused, as RFC 5280 "
                "4.2 requires" % ", ".join(unknown))
    if algorithm_oid(Ber(cert.signature_algorithm)) in SHA1_CERT_SIGNATURES:
        return "is signed with SHA-1, which no longer protects a certificate against forgery"
    try:
        return signer_key_problem(cert)
    except (crypto_errors.UnsupportedAlgorithm, ValueError):
        return ""  # a key cryptography cannot load: refused where it is used


def ca_problem(ca, below, now=None):
    """Return 'is issued by CA <name>, which ...' when CA certificate *ca*, with *below*
    CAs under it in the path, breaks a rule of RFC 5280 6.1.3-6.1.4 or EKU chaining."""
    now = now or datetime.now(timezone.utc)
    try:
        is_ca, length = basic_constraints(ca)
        ku, eku = key_usage(ca), extended_key_usage(ca)
    except ValueError:
        return "is issued by CA %s, whose extensions cannot be read" % ca_name(ca)
    reason = certificate_rule_problem(ca)
    if reason:
        pass
    elif ca.version < 3:
        reason = "is a version %d certificate: an intermediate CA must be v3" % ca.version
    elif not is_ca:
        reason = "is not a CA certificate (no basicConstraints cA=TRUE)"
    elif length is not None and below > length:
        reason = "allows %d CA%s below it (pathLenConstraint), the path has %d" % (
            length, "" if length == 1 else "s", below)
    elif ku is not None and KU_KEY_CERT_SIGN not in ku:
        reason = "may not sign certificates (its key usage lacks keyCertSign)"
    elif eku is not None and not EMAIL_PURPOSES & eku:
        reason = ("is limited to %s (extended key usage), not e-mail protection: the "
                  "certificates it issues are not valid for mail" % ", ".join(
                      sorted(EKU_NAMES.get(p, p) for p in eku)))
    elif not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        reason = "is not valid now (valid %s to %s)" % (ca.not_valid_before_utc.date(),
                                                       ca.not_valid_after_utc.date())
    return reason and "is issued by CA %s, which %s" % (ca_name(ca), reason)


def signer_key_problem(cert):
    """Return why the key of *cert* (a signer's, a recipient's or a CA's) is too weak,
    or '': RSA keys of fewer than MIN_RSA_BITS, EC keys off the curves we use
    (ECDH_SCHEMES)."""
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return "has a %d-bit RSA key: at least %d bits are needed" % (key.key_size, MIN_RSA_BITS)
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in ECDH_SCHEMES:
        return "has an EC key on curve %s: P-256, P-384 and P-521 are accepted" % key.curve.name
    return ""


def basic_constraints(cert):
    """Return (cA, pathLenConstraint or None) of *cert*, (False, None) without the
    extension (RFC 5280 4.2.1.9).  Raises ValueError for one that cannot be read."""
    value = cert.extension(EXT_BASIC_CONSTRAINTS)
    if value is None:
        return False, None
    fields = Fields(Ber(value))
    flag, length = fields.optional(0x01), fields.optional(INTEGER)
    if fields.rest() or flag is not None and len(flag.body) != 1:
        raise ValueError("a BasicConstraints that cannot be read")
    return flag is not None and flag.body != b"\0", length.integer() if length else None


def encryption_kind(cert):
    """Return "rsa", "ec" or "mlkem" for a key we can encrypt to, else why we cannot."""
    try:
        key = cert.public_key()
    except (crypto_errors.UnsupportedAlgorithm, ValueError):
        return unreadable_key(cert)
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if is_ml_kem(key):
        return "mlkem"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in ECDH_SCHEMES:
            return "ec"
        return ("has an EC key on curve %s: S/MIME encryption to EC keys is done on P-256, "
                "P-384 and P-521 only" % key.curve.name)
    name = type(key).__name__.replace("PublicKey", "").lstrip("_")
    return ("has a %s key, which S/MIME cannot encrypt to here: encryption needs an RSA key, "
            "an EC key on P-256, P-384 or P-521, or an ML-KEM-768/1024 key" % (name or "non-RSA"))


def unreadable_key(cert):
    """Return why we cannot encrypt to *cert*, whose public key cryptography cannot load:
    its algorithm named (ML-KEM-512, which cryptography lacks), else its OID."""
    try:
        oid = Certificate.of(cert).key_algorithm
    except ValueError:
        return "has a malformed public key"
    if oid in ML_KEM:
        return ("has an %s key, which this tool cannot encrypt to (cryptography has no %s): "
                "ask for an ML-KEM-768 or ML-KEM-1024 certificate" % (ML_KEM[oid], ML_KEM[oid]))
    return "has a public key of algorithm %s, which this tool cannot read" % oid


def is_ml_kem(key):
    """True when *key* (public or private) is an ML-KEM-768 or ML-KEM-1024 key (FIPS 203)."""
    return mlkem is not None and isinstance(key, (
        mlkem.MLKEM768PublicKey, mlkem.MLKEM1024PublicKey,
        mlkem.MLKEM768PrivateKey, mlkem.MLKEM1024PrivateKey))


def find_identities(msg, settings, keystore):
    """Return (signer or None, [recipient Identity]) needed to build *msg*.

    With --pq_only, raises IdentityError unless every copy is post-quantum.
    """
    signer = keystore.signer(msg.sender) if settings.sign_mode else None
    recipients = []
    if settings.encrypt:
        recipients = [keystore.recipient(a) for a in msg.recipients]
        own = keystore.own_copy(msg.sender, bool(signer))
        if own is not None:
            recipients.append(own)
    if settings.pq_only:
        classical = classical_copies(recipients, msg.sender)
        if classical:
            raise IdentityError("%s: --pq_only: not post-quantum (ML-KEM): %s"
                                % (msg.source, "; ".join(classical)))
    return signer, recipients


def classical_copies(recipients, sender):
    """Return 'ADDRESS (KIND key, FILE)' for each recipient Identity whose copy is not
    post-quantum (RSA or EC: readable by whoever stores it once a large quantum
    computer exists); the sender's is marked as its own copy."""
    return ["%s (%s%s key, %s)" % (r.address, "own copy, " if r.address == sender else "",
                                   r.kind.upper(), r.path)
            for r in recipients if r.kind != "mlkem"]


def quantum_notes(msg, recipients):
    """Return the (topic, warning) note of a message encrypted to post-quantum and
    classical recipients alike (one per run: topic 'quantum'), else ()."""
    classical = classical_copies(recipients, msg.sender)
    if not classical or len(classical) == len(recipients):
        return ()
    return (("quantum", "%s: encrypted to post-quantum (ML-KEM) and classical recipients: the "
             "copies for %s are not quantum-safe (recorded now, they can be read once a large "
             "quantum computer exists); --pq_only refuses such messages"
             % (msg.source, ", ".join(c.split(" (")[0] for c in classical))),)


###############################################################################
# PKCS#11: keys that never leave their token (RFC 7512 URIs) ##################
###############################################################################
# A <address>.p11 file names a private key on a PKCS#11 token (HSM, smartcard,
# cloud HSM) by an RFC 7512 URI; PKCS11_MODULE is the module that reaches it,
# PKCS11_PIN its user PIN.  A TokenKey is used as cryptography's private keys
# are (sign, decrypt, exchange); its public half is the certificate's.  The
# binding (python-pkcs11) is imported at the first use of a token key.  Each
# process opens its own session and logs in once: a session opened before a
# fork is unusable in the child (PKCS#11 v2.40 6.7.7), so sessions are kept by
# process id.  A refused PIN is never tried again (tokens lock after a few).

#: RFC 7512 2.3 path attributes we match on; the others name what we do not choose by.
P11_ATTRIBUTES = ("token", "serial", "manufacturer", "model", "object", "id", "type")
#: The longest .p11 file read, in octets.
MAX_URI_FILE = 4096


class Pkcs11Uri(NamedTuple):
    """A parsed RFC 7512 URI of a private key: its *text* and the attributes it sets
    (None when absent; *id* as bytes)."""
    text: str
    token: str = None
    serial: str = None
    manufacturer: str = None
    model: str = None
    object: str = None
    id: bytes = None

    def token_name(self):
        """Return how errors name the token: its label, else its serial, else the URI."""
        return self.token or self.serial or self.text


def read_uri_file(path):
    """Return the Pkcs11Uri in the .p11 file *path* (its one non-comment line).
    Raises IdentityError."""
    data = read_key_file(path)
    lines = [line.strip() for line in data[:MAX_URI_FILE + 1].decode("utf-8", "replace")
             .splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(data) > MAX_URI_FILE or len(lines) != 1:
        raise IdentityError("%s: must hold one PKCS#11 URI line (RFC 7512), like "
                            "pkcs11:token=NAME;object=LABEL;type=private" % path)
    return parse_pkcs11_uri(lines[0], path)


def parse_pkcs11_uri(text, path):
    """Return the Pkcs11Uri of *text* (RFC 7512 2.3: "pkcs11:" path attributes joined by
    ";", then an optional "?" query; values percent-encoded).  Raises IdentityError for
    another scheme, an unknown or repeated attribute, a type other than private, or a
    PIN in the URI (the PIN is PKCS11_PIN: a secret is not kept beside a key name)."""
    from urllib.parse import unquote, unquote_to_bytes
    if not text.lower().startswith("pkcs11:"):
        raise IdentityError("%s: %r is not a PKCS#11 URI (RFC 7512: pkcs11:...)" % (path, text))
    body, _, query = text[7:].partition("?")
    found = {}
    for part in filter(None, body.split(";")):
        name, equals, value = part.partition("=")
        name = name.strip().lower()
        if not equals or name in found or (name not in P11_ATTRIBUTES
                                           and not name.startswith(("x-", "library-", "slot-"))):
            raise IdentityError("%s: %s: attribute %r is unknown, repeated or empty (RFC 7512 "
                                "2.3)" % (path, text, name))
        found[name] = unquote_to_bytes(value) if name == "id" else unquote(value)
    if any(q.partition("=")[0].lower() in ("pin-value", "pin-source") for q in query.split("&")):
        raise IdentityError("%s: the URI holds a PIN: remove it and set PKCS11_PIN" % path)
    if found.pop("type", "private") != "private":
        raise IdentityError("%s: %s: type must be private (the key; the certificate is the "
                            ".crt file)" % (path, text))
    if "object" not in found and "id" not in found:
        raise IdentityError("%s: %s names no key: add object=LABEL or id=%%XX" % (path, text))
    return Pkcs11Uri(text, **{k: v for k, v in found.items() if k in Pkcs11Uri._fields})


class Pkcs11:
    """The PKCS#11 module of a run (PKCS11_MODULE), its PIN, and per process its
    logged-in sessions and the key objects found in them.

    Used by one thread per process (the gateway builds in its event loop).
    Errors: DependencyError (69) when the module cannot be loaded, ConfigError (78)
    for a missing setting, IdentityError (78) for a token or key that is not there,
    AuthError (77) for a refused PIN, DeliveryError (75) when a token that worked
    goes away (removed): the next message opens it again.
    """

    def __init__(self, module="", pin="", lock=""):
        self.module, self.pin, self.lock = module, pin, lock  #: lock: see serialised()
        self.binding = self.lib = self.lib_pid = None
        self.sessions, self.objects = {}, {}  #: (pid, token) -> session; (pid, URI) -> key
        self.refused = {}  #: token name -> its AuthError (kept across forks: never retried)
        self.seen = set()  #: URIs whose key was found: missing later means removed

    def key(self, uri, cert, path):
        """Return the TokenKey for *uri* whose certificate is *cert* (from *path*)."""
        public = cert.public_key()
        if not isinstance(public, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
            raise IdentityError("%s: a PKCS#11 key must be RSA or EC" % path)
        kind = TokenRsaKey if isinstance(public, rsa.RSAPublicKey) else TokenEcKey
        return kind(self, uri, public)

    def load(self):
        """Return the module, loaded in this process (initialised again after a fork)."""
        if not self.module:
            raise ConfigError("a .p11 key needs PKCS11_MODULE: the path of the PKCS#11 "
                              "module (e.g. /usr/lib/softhsm/libsofthsm2.so)")
        pid = os.getpid()
        if self.lib_pid != pid:
            self.binding = require("pkcs11")
            try:
                lib = self.binding.lib(self.module)
                if self.lib_pid is not None:  # loaded before the fork: C_Initialize here
                    lib.reinitialize()
            except self.binding.PKCS11Error as exc:
                raise DependencyError("PKCS11_MODULE=%s: cannot be loaded as a PKCS#11 module "
                                      "(%s): set the path of your token's module"
                                      % (self.module, first_line(exc)))
            self.lib, self.lib_pid = lib, pid
        return self.lib

    def object(self, uri):
        """Return the key object *uri* names, in this process's session with its token."""
        pid = os.getpid()
        if (pid, uri.text) not in self.objects:
            with self.serialised():
                self.objects[(pid, uri.text)] = self.find(uri)
            self.seen.add(uri.text)
        return self.objects[(pid, uri.text)]

    def serialised(self):
        """Return a context holding the lock file *lock* (in the cache directory): the
        processes of a run (--jobs) initialise the module and log in one at a time, as
        a module reading its token at C_Initialize (SoftHSM2) may miss a token another
        process is reading.  Nothing is held when the file cannot be made."""
        import contextlib
        import fcntl
        try:
            os.makedirs(os.path.dirname(self.lock), mode=0o700, exist_ok=True)
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def held():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock
        return held()

    def find(self, uri):
        """Return the key object *uri* names, found in a session opened if need be."""
        session = self.session(uri)
        p11 = self.binding
        attrs = {p11.Attribute.CLASS: p11.ObjectClass.PRIVATE_KEY}
        if uri.object is not None:
            attrs[p11.Attribute.LABEL] = uri.object
        if uri.id is not None:
            attrs[p11.Attribute.ID] = uri.id
        keys = self.guarded(uri, lambda: list(session.get_objects(attrs)))
        if len(keys) != 1:
            self.forget(uri)
            raise self.missing(uri, "no such private key on the token" if not keys
                               else "names %d keys: add id= or object=" % len(keys))
        return keys[0]

    def session(self, uri):
        """Return this process's logged-in session with the token of *uri*."""
        name = uri.token_name()
        if name in self.refused:
            raise self.refused[name]
        slot = (os.getpid(), uri.token, uri.serial, uri.manufacturer, uri.model)
        if slot not in self.sessions:
            token = self.token(uri)
            self.sessions[slot] = self.guarded(uri, lambda: self.login(token, uri))
        return self.sessions[slot]

    def token(self, uri):
        """Return the one token of the module that *uri* matches."""
        lib = self.load()
        tokens = [t for t in self.guarded(uri, lambda: list(lib.get_tokens(
                      token_label=uri.token,
                      token_serial=uri.serial.encode() if uri.serial else None)))
                  if uri.manufacturer in (None, t.manufacturer_id)
                  and uri.model in (None, t.model)]
        if len(tokens) != 1:
            raise self.missing(uri, "no such token in PKCS11_MODULE=%s" % self.module
                               if not tokens else "matches %d tokens: add token= or serial="
                               % len(tokens))
        return tokens[0]

    def login(self, token, uri):
        """Open a session with *token* and log in with the PIN (a PIN pad when the token
        has one and PKCS11_PIN is not set).  Raises AuthError, kept for the token."""
        p11 = self.binding
        pin = self.pin or None
        if pin is None and token.flags & p11.TokenFlag.PROTECTED_AUTHENTICATION_PATH:
            pin = p11.PROTECTED_AUTH
        if pin is None:
            raise ConfigError("token %s: set PKCS11_PIN (its user PIN) to use %s"
                              % (uri.token_name(), uri.text))
        try:
            return token.open(user_pin=pin)
        except p11.UserAlreadyLoggedIn:  # by a session of ours the token still has
            return token.open()
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinExpired,
                p11.PinLocked) as exc:
            words = {"PinLocked": "is locked (too many wrong PINs)",
                     "PinExpired": "has expired"}.get(type(exc).__name__, "was refused")
            self.refused[uri.token_name()] = AuthError(
                "token %s: the PIN (PKCS11_PIN) %s; not tried again: check it before the "
                "token locks" % (uri.token_name(), words))
            raise self.refused[uri.token_name()] from None

    def guarded(self, uri, action):
        """Return action(); a PKCS#11 fault becomes our error (see operate())."""
        try:
            return action()
        except self.binding.PKCS11Error as exc:
            raise self.fault(uri, exc) from None

    def operate(self, uri, action):
        """Return action(key object) for the key of *uri*.  Raises ValueError for data the
        key refuses (a ciphertext not for it), IdentityError for an operation the key
        or token does not offer, DeliveryError (75) when the token went away."""
        key = self.object(uri)
        p11 = self.binding
        try:
            return action(key)
        except (p11.DataInvalid, p11.DataLenRange, p11.EncryptedDataInvalid,
                p11.EncryptedDataLenRange) as exc:
            raise ValueError(type(exc).__name__) from None
        except (p11.MechanismInvalid, p11.MechanismParamInvalid, p11.FunctionNotSupported,
                p11.KeyTypeInconsistent, p11.FunctionRejected) as exc:
            raise IdentityError("%s: the token cannot do this with the key (%s)"
                                % (uri.text, type(exc).__name__)) from None
        except p11.PKCS11Error as exc:
            raise self.fault(uri, exc) from None

    def fault(self, uri, exc):
        """Return our error for PKCS#11 error *exc*: the session is forgotten, and the
        next message opens a new one."""
        self.forget(uri)
        if isinstance(exc, self.binding.PKCS11Error) and type(exc).__name__ in (
                "NoSuchToken", "NoSuchKey"):
            return self.missing(uri, "not found")
        return DeliveryError("token %s: %s (removed or failing?): try again later"
                             % (uri.token_name(), type(exc).__name__))

    def missing(self, uri, what):
        """Return the error for a token or key *uri* names that is not there: 75 when it
        was there before in this run (a token removed), else 78 (a wrong URI)."""
        if uri.text in self.seen:
            return DeliveryError("token %s: %s: the token was removed? try again later"
                                 % (uri.token_name(), uri.text))
        return IdentityError("%s: %s" % (uri.text, what))

    def forget(self, uri):
        """Drop this process's session and key objects for the token of *uri*."""
        pid = os.getpid()
        self.sessions.pop((pid, uri.token, uri.serial, uri.manufacturer, uri.model), None)
        for name in [k for k in self.objects if k[0] == pid]:
            del self.objects[name]


def digest_info(name, digest):
    """Return the DER DigestInfo of *digest* made with hash *name* (RFC 8017 9.2)."""
    return der(SEQUENCE, algorithm(HASH_OIDS[name], b"\x05\x00"), der(OCTET_STRING, digest))


class TokenKey:
    """A private key on a PKCS#11 token, its public half the certificate's key."""

    def __init__(self, tokens, uri, public):
        self.tokens, self.uri, self.public = tokens, uri, public
        self.checked = None  #: the process that found the token's key to be the certificate's

    def public_key(self):
        return self.public

    @property
    def key_size(self):
        return self.public.key_size

    def mechanism(self, name):
        self.tokens.object(self.uri)  # loads the binding
        return getattr(self.tokens.binding.Mechanism, name)

    def operate(self, action):
        """Return action(key object) (Pkcs11.operate()), the key checked first."""
        def checked(key):
            if self.checked != os.getpid():
                self.check(key)
                self.checked = os.getpid()
            return action(key)
        return self.tokens.operate(self.uri, checked)

    def check(self, key):
        """Raise IdentityError when the token's *key* is not the certificate's (where
        the token tells)."""


class TokenRsaKey(TokenKey):
    """An RSA key on a token: PKCS#1 v1.5 signatures (CKM_RSA_PKCS over a DigestInfo,
    which every token offers) and decryption (CKM_RSA_PKCS)."""

    def check(self, key):
        modulus = key[self.tokens.binding.Attribute.MODULUS]
        if int.from_bytes(modulus, "big") != self.public.public_numbers().n:
            raise IdentityError("%s: the key on the token is not the one of its certificate "
                                "(.crt)" % self.uri.text)

    def sign(self, data, pad, algorithm):
        """Return the RSASSA-PKCS1-v1_5 signature of *data* (RFC 8017 8.2)."""
        if not isinstance(pad, padding.PKCS1v15):
            raise IdentityError("%s: only PKCS#1 v1.5 signatures are made with token keys"
                                % self.uri.text)
        h = hashes.Hash(algorithm)
        h.update(data)
        info = digest_info(algorithm.name.upper().replace("-", ""), h.finalize())
        mechanism = self.mechanism("RSA_PKCS")
        return self.operate(lambda key: key.sign(info, mechanism=mechanism))

    def decrypt(self, data, pad):
        """Return *data* decrypted (RSAES-PKCS1-v1_5, RFC 8017 7.2).  Raises ValueError
        when it does not decrypt, IdentityError for RSAES-OAEP (not offered here)."""
        if not isinstance(pad, padding.PKCS1v15):
            raise IdentityError("%s: RSAES-OAEP key transport is not offered with token keys "
                                "(PKCS#1 v1.5 is)" % self.uri.text)
        mechanism = self.mechanism("RSA_PKCS")
        return self.operate(lambda key: key.decrypt(data, mechanism=mechanism))


class TokenEcKey(TokenKey):
    """An EC key on a token: ECDSA (hashed here, CKM_ECDSA: SoftHSM has no
    CKM_ECDSA_SHA256) and ECDH (CKM_ECDH1_DERIVE, RFC 5753 3.1.2)."""

    @property
    def curve(self):
        return self.public.curve

    def sign(self, data, scheme):
        """Return the DER ECDSA-Sig-Value of *data* (RFC 5480 2.2, RFC 5753 7.2)."""
        h = hashes.Hash(scheme.algorithm)
        h.update(data)
        digest, mechanism = h.finalize(), self.mechanism("ECDSA")
        raw = self.operate(lambda key: key.sign(digest, mechanism=mechanism))
        half = len(raw) // 2  # PKCS#11 writes r || s, each as long as the order
        return der(SEQUENCE, der_int(int.from_bytes(raw[:half], "big")),
                   der_int(int.from_bytes(raw[half:], "big")))

    def exchange(self, algorithm, peer):
        """Return the ECDH shared secret with public key *peer* (its x coordinate, as
        cryptography's exchange() does)."""
        point = peer.public_bytes(serialization.Encoding.X962,
                                  serialization.PublicFormat.UncompressedPoint)
        size = (self.public.curve.key_size + 7) // 8
        self.mechanism("ECDH1_DERIVE")
        p11 = self.tokens.binding
        template = {p11.Attribute.SENSITIVE: False, p11.Attribute.EXTRACTABLE: True,
                    p11.Attribute.TOKEN: False}
        return self.operate(lambda key: key.derive_key(
            p11.KeyType.GENERIC_SECRET, size * 8, mechanism_param=(p11.KDF.NULL, None, point),
            template=template)[p11.Attribute.VALUE])


###############################################################################
# Revocation: CRLs and OCSP (RFC 5280 5-6.3, RFC 6960) #########################
###############################################################################
# A certificate may be revoked before it expires (a stolen key).  Its issuer says
# so in a CRL (from the certificate's CRL Distribution Points, or a local file for
# offline sites) or through OCSP (the responder in its Authority Information
# Access).  An answer counts only when signed by the issuer (or, for OCSP, by a
# responder it certified for OCSP signing), for this certificate, and fresh.
# Verdicts are cached on disk until the answer's nextUpdate, so a batch, the
# gateway's workers and later runs ask at most once per certificate and source.
# Policy (--revocation, $SMIME_REVOCATION): off (no request), soft (default:
# revoked is refused, no answer is a warning), hard (anything but a fresh good
# answer is refused).  urllib.request (standard library, imported on the first
# fetch) does the fetching: OCSP and CRLs are plain HTTP of signed objects, and
# its public handler API bounds redirects and schemes.

REVOCATION_POLICIES = ("off", "soft", "hard")
#: Seconds one fetch may take (connect, each read and the whole download), and all the
#: fetches of one run together (a gateway: of each FETCH_PERIOD seconds): a dead or slow
#: responder never holds a run longer.
FETCH_TIMEOUT, FETCH_BUDGET, FETCH_PERIOD = 5.0, 20.0, 600
#: Seconds a verdict is kept in memory at most (a gateway notices a revocation this soon).
SEEN_SECONDS = 3600
#: Largest OCSP response and CRL read, in octets; most redirects followed.
MAX_OCSP_RESPONSE, MAX_CRL, MAX_REDIRECTS = 64 << 10, 16 << 20, 3
#: Cached verdicts and CRLs kept at most, in files and in octets (the oldest go first).
MAX_CACHE_ENTRIES, MAX_CACHE_OCTETS = 2000, 256 << 20
#: OCSP (id-ad-ocsp) in an Authority Information Access, id-kp-OCSPSigning (RFC 6960).
ID_AD_OCSP, ID_KP_OCSP_SIGNING = "1.3.6.1.5.5.7.48.1", "1.3.6.1.5.5.7.3.9"
#: KeyUsage cRLSign (RFC 5280 4.2.1.3).
KU_CRL_SIGN = 6


class Status(NamedTuple):
    """What the issuer says of one certificate: *state* 'good', 'revoked' or 'unknown'
    (no answer that counts: *why*), its *source* (a URL or file), and for a revoked one
    the *reason* and *when*; *until*: the epoch second it may be cached until."""
    state: str
    source: str = ""
    why: str = ""
    reason: str = ""
    when: str = ""
    until: float = 0.0


class Revocation:
    """The revocation checks of one run: *policy*, the cache directory, local CRL files,
    the fetch budget, and *warn*(text, topic) for soft failures (once per certificate)."""

    def __init__(self, policy, cache_dir, crl_files=(), warn=None):
        self.policy, self.cache_dir, self.crl_files = policy, cache_dir, list(crl_files)
        self.warn = warn or (lambda text, topic=None: None)
        self.budget, self.crls, self.seen = FETCH_BUDGET, None, {}
        self.refilled = time.monotonic()  #: the budget is whole again each FETCH_PERIOD

    def problem(self, cert, issuer):
        """Return why *cert* (issued by *issuer*, or None when unknown) is refused under
        the policy, or '' (after a warning when soft and there is no answer)."""
        if self.policy == "off":
            return ""
        cert = Certificate.of(cert)
        status, until = self.seen.get(cert.der, (None, 0.0))
        if status is None or until < time.time():  # a gateway runs for months
            status = self.status(cert, issuer and Certificate.of(issuer))
            self.seen[cert.der] = status, min(status.until or 0.0, time.time() + SEEN_SECONDS)
            if len(self.seen) > MAX_CACHE_ENTRIES:
                self.seen.pop(next(iter(self.seen)))
        if status.state == "revoked":
            return "is revoked (%s%s, %s): %s" % (
                status.reason or "no reason given", ", since %s" % status.when
                if status.when else "", status.source, describe_cert(cert))
        if status.state == "good" or status.why == "" and self.policy == "soft":
            return ""
        if self.policy == "hard":
            return ("has no fresh revocation answer (--revocation hard): %s: %s"
                    % (status.why or "no OCSP responder or CRL named", describe_cert(cert)))
        self.warn("no revocation answer for %s: %s; going on (--revocation soft)"
                  % (describe_cert(cert), status.why), "revocation " + cert.der.hex()[-40:])
        return ""

    def chain_problem(self, chain):
        """Return why a certificate of validated *chain* (leaf first, trust anchor last)
        is refused, or ''; the anchor itself is not checked."""
        for cert, issuer in zip(chain, chain[1:]):
            problem = self.problem(cert, issuer)
            if problem:
                return problem
        return ""

    def status(self, cert, issuer):
        """Return the Status of *cert*: a fresh cached one, else from the local CRL files,
        OCSP, then the CRL Distribution Points; the first good or revoked answer wins."""
        try:
            sources = ([("file", path) for path in self.crl_files]
                       + [("ocsp", url) for url in ocsp_urls(cert)]
                       + [("crl", url) for url in crl_urls(cert)])
        except ValueError:
            return Status("unknown", why="its revocation sources cannot be read")
        if not sources:
            return Status("unknown")  # nothing to ask: soft goes on silently
        cached = read_verdict(self.cache_dir, cert)
        if cached is not None:
            return cached
        if issuer is None:
            return Status("unknown", why="its issuer's certificate is not at hand")
        whys = []
        for source in sources:
            try:
                status = self.ask(source, cert, issuer)
            except (OSError, ValueError, TypeError, crypto_errors.UnsupportedAlgorithm,
                    crypto_errors.InvalidSignature) as exc:
                whys.append("%s: %s" % (source[1], first_line(exc) or type(exc).__name__))
                continue
            if status is None:
                continue  # a local CRL of another issuer
            if status.state != "unknown":
                write_verdict(self.cache_dir, cert, status)
                return status
            whys.append("%s: %s" % (status.source, status.why))
        return Status("unknown", why="; ".join(whys))

    def ask(self, source, cert, issuer):
        """Return the Status one source gives (None: a local CRL that is not the issuer's).
        Raises OSError (unreachable), ValueError (unreadable, badly signed, stale)."""
        kind, where = source
        if kind == "ocsp":
            request = ocsp_request(cert, issuer)
            return ocsp_status(self.fetch(where, request, MAX_OCSP_RESPONSE), cert, issuer,
                               where)
        if kind == "file":
            crl = self.local_crls().get(where)
            if crl is None or crl.issuer.public_bytes() != issuer.subject_der:
                return None
            return crl_status(crl, cert, issuer, where)
        data = cached_crl(self.cache_dir, where)
        if data is None:
            data = self.fetch(where, None, MAX_CRL)
        status = crl_status(load_crl(data), cert, issuer, where)
        remember_crl(self.cache_dir, where, data, status.until)
        return status

    def local_crls(self):
        """Return {path: CRL} of the local CRL files, read once.  Raises ConfigError
        for one that cannot be read."""
        if self.crls is None:
            self.crls = {}
            for path in self.crl_files:
                try:
                    with open(path, "rb") as fh:
                        self.crls[path] = load_crl(fh.read(MAX_CRL + 1))
                except (OSError, ValueError) as exc:
                    raise ConfigError("%s: cannot read this CRL file (SMIME_CRL_FILES): %s"
                                      % (path, first_line(exc)))
        return self.crls

    def fetch(self, url, data, limit):
        """Return the body at http(s) *url* (POSTing OCSP request *data*), within the
        run's budget.  Raises OSError or ValueError."""
        if time.monotonic() - self.refilled > FETCH_PERIOD:
            self.budget, self.refilled = FETCH_BUDGET, time.monotonic()
        if self.budget <= 0:
            raise OSError("no time left for revocation fetches (%d s a run, or each %d "
                          "minutes of a gateway)" % (FETCH_BUDGET, FETCH_PERIOD // 60))
        started = time.monotonic()
        try:
            return http_get(url, data, limit, min(FETCH_TIMEOUT, self.budget))
        finally:
            self.budget -= time.monotonic() - started


def describe_cert(cert):
    """Return 'subject ..., serial ...' naming *cert* in a report."""
    try:
        subject = cert.subject.rfc4514_string()
    except ValueError:
        subject = "(a subject that cannot be read)"
    return "subject %s, serial %x" % (subject, cert.serial_number)


def ocsp_urls(cert):
    """Return the http(s) OCSP responder URLs of *cert*'s Authority Information Access
    (RFC 5280 4.2.2.1)."""
    value = cert.extension(EXT_AUTHORITY_INFO)
    urls = []
    for access in Ber(value).children() if value is not None else ():
        fields = Fields(access)
        method, location = fields.take(OID).oid(), fields.take()
        if method == ID_AD_OCSP and location.tag == ctx(6, constructed=False):
            urls.append(location.body.decode("ascii", "replace"))
    return [u for u in urls if is_fetchable(u)][:2]


def crl_urls(cert):
    """Return the http(s) URLs of *cert*'s CRL Distribution Points (RFC 5280 4.2.1.13)
    that give a full CRL of its issuer (no reasons, no cRLIssuer)."""
    value = cert.extension(EXT_CRL_DISTRIBUTION_POINTS)
    urls = []
    for point in Ber(value).children() if value is not None else ():
        parts = point.children()
        if len(parts) != 1 or parts[0].tag != ctx(0):
            continue
        name = parts[0].children()[0]
        if name.tag == ctx(0):  # fullName GeneralNames
            urls += [n.body.decode("ascii", "replace") for n in name.children()
                     if n.tag == ctx(6, constructed=False)]
    return [u for u in urls if is_fetchable(u)][:2]


def is_fetchable(url):
    """True for an http:// or https:// URL (no ldap://, no file://)."""
    return urlsplit(url).scheme in ("http", "https") and bool(urlsplit(url).hostname)


def http_get(url, data, limit, timeout):
    """Return the body of a GET (or, with *data*, an OCSP POST, RFC 6960 A.1) of *url*:
    at most *limit* octets, MAX_REDIRECTS redirects to http(s) only, *timeout* seconds
    in all.  The fetch runs in a thread given up past *timeout* (a server dripping its
    headers, a slow name lookup, redirects: each read has its own socket timeout).
    Raises OSError or ValueError."""
    import threading
    done = {}

    def fetch():
        try:
            done["body"] = http_body(url, data, limit, timeout)
        except (OSError, ValueError) as exc:
            done["error"] = exc
        except Exception as exc:  # noqa: BLE001 - a hostile server's answer, in our words
            done["error"] = OSError("a broken answer: %s: %s" % (type(exc).__name__, exc))
    worker = threading.Thread(target=fetch, name="revocation-fetch", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise OSError("no answer within %d seconds" % timeout)
    if "error" in done:
        raise done["error"]
    return done["body"]


def http_body(url, data, limit, timeout):
    """http_get()'s fetch, in its thread.  Raises OSError, ValueError, or what urllib
    and http.client raise for a malformed answer."""
    import http.client
    import urllib.error
    import urllib.request

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = MAX_REDIRECTS

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if not is_fetchable(newurl):
                raise ValueError("redirected to %s, not an http(s) URL" % newurl)
            return super().redirect_request(req, fp, code, msg, headers, newurl)
    request = urllib.request.Request(url, data, {"Content-Type": "application/ocsp-request"}
                                     if data else {})
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.build_opener(Redirects).open(request, timeout=timeout) as resp:
            body = bytearray()
            while len(body) <= limit:
                if time.monotonic() > deadline:
                    raise OSError("no answer within %d seconds" % timeout)
                piece = resp.read1(16384)
                if not piece:
                    return bytes(body)
                body += piece
    except urllib.error.HTTPError as exc:
        raise OSError("HTTP %d" % exc.code)
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason))
    except http.client.HTTPException as exc:  # a malformed status line, header or body
        raise OSError("a broken HTTP answer: %s: %s" % (type(exc).__name__, exc))
    except (TimeoutError, ConnectionError) as exc:
        raise OSError("no answer within %d seconds" % timeout if isinstance(
            exc, TimeoutError) else str(exc))
    raise ValueError("an answer larger than %d octets" % limit)


def ocsp_request(cert, issuer):
    """Return a DER OCSP request for *cert* (CertID with SHA-1, RFC 6960 4.1.1)."""
    from cryptography.x509 import ocsp
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert.x509(), issuer.x509(),
                                                         hashes.SHA1())
    return builder.build().public_bytes(serialization.Encoding.DER)


def ocsp_status(data, cert, issuer, url):
    """Return the Status an OCSP response gives *cert* (RFC 6960 3.2): its SingleResponse
    for the CertID of *cert*, signed by *issuer* or by a responder *issuer* certified
    with id-kp-OCSPSigning, thisUpdate not in the future, nextUpdate not past.
    Raises ValueError for an answer that does not count."""
    from cryptography.x509 import ocsp
    resp = ocsp.load_der_ocsp_response(data)
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise ValueError("the responder answered %s" % resp.response_status.name.lower())
    check_ocsp_signer(resp, issuer)
    key_bits = spki_key_bits(issuer)
    for single in resp.responses:
        algorithm = single.hash_algorithm
        if single.serial_number != cert.serial_number or \
                single.issuer_key_hash != digest_of(algorithm, key_bits) or \
                single.issuer_name_hash != digest_of(algorithm, issuer.subject_der):
            continue
        until = freshness(single.this_update_utc, single.next_update_utc, "OCSP answer")
        if single.certificate_status == ocsp.OCSPCertStatus.GOOD:
            return Status("good", url, until=until)
        if single.certificate_status == ocsp.OCSPCertStatus.REVOKED:
            return Status("revoked", url, reason=reason_name(single.revocation_reason),
                          when=str(single.revocation_time_utc), until=until)
        return Status("unknown", url, why="the responder does not know the certificate",
                      until=until)
    raise ValueError("the OCSP answer is not about this certificate")


def check_ocsp_signer(resp, issuer):
    """Raise ValueError unless OCSP response *resp* is signed by *issuer* or by a
    responder certificate it carries that *issuer* issued for OCSP signing (RFC 6960
    4.2.2.2), valid now."""
    candidates = [issuer] + [Certificate.of(c) for c in resp.certificates[:4]]
    named = [c for c in candidates if (resp.responder_name is not None and c.subject_der
                                       == resp.responder_name.public_bytes())
             or resp.responder_key_hash == digest_of(hashes.SHA1(), spki_key_bits(c))]
    if not named:
        raise ValueError("the OCSP answer is signed by a responder this tool cannot find")
    signer, now = named[0], datetime.now(timezone.utc)
    if signer != issuer and not (
            issuer.is_issuer_of(signer) and ID_KP_OCSP_SIGNING in (
                extended_key_usage(signer) or ()) and
            signer.not_valid_before_utc <= now <= signer.not_valid_after_utc):
        raise ValueError("the OCSP answer is signed by %s, which the issuer did not "
                         "authorise to answer for it" % describe_cert(signer))
    verify_signed_object(signer.public_key(), resp.signature, resp.tbs_response_bytes,
                         resp.signature_hash_algorithm)


def verify_signed_object(key, signature, data, hash_algorithm):
    """Check the signature of a CRL or OCSP answer by public *key* (RSA PKCS#1 v1.5,
    ECDSA, EdDSA).  Raises InvalidSignature or TypeError."""
    if isinstance(key, rsa.RSAPublicKey):
        return key.verify(signature, data, padding.PKCS1v15(), hash_algorithm)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.verify(signature, data, ec.ECDSA(hash_algorithm))
    return key.verify(signature, data)


def load_crl(data):
    """Return the CRL in DER or PEM *data*.  Raises ValueError."""
    from cryptography import x509
    if len(data) > MAX_CRL:
        raise ValueError("a CRL larger than %d octets" % MAX_CRL)
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def crl_status(crl, cert, issuer, source):
    """Return the Status CRL *crl* gives *cert* (RFC 5280 6.3): the CRL must be issued and
    signed by *issuer* (allowed cRLSign when it has a keyUsage), nextUpdate not past.
    Raises ValueError for a CRL that does not count."""
    if crl.issuer.public_bytes() != issuer.subject_der:
        raise ValueError("the CRL is issued by another CA")
    usage = key_usage(issuer)
    if usage is not None and KU_CRL_SIGN not in usage or \
            not crl.is_signature_valid(issuer.public_key()):
        raise ValueError("the CRL is not signed by the certificate's issuer")
    until = freshness(crl.last_update_utc, crl.next_update_utc, "CRL")
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is None:
        return Status("good", source, until=until)
    from cryptography import x509
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        reason = None
    return Status("revoked", source, reason=reason_name(reason),
                  when=str(entry.revocation_date_utc), until=until)


def freshness(this_update, next_update, what):
    """Return until when an answer made at *this_update*, valid to *next_update* (None:
    newer information is always available), may be used.  Raises ValueError for one
    from the future or past its nextUpdate."""
    now = datetime.now(timezone.utc)
    if this_update.timestamp() > now.timestamp() + 300:
        raise ValueError("the %s is dated in the future (%s)" % (what, this_update))
    if next_update is None:
        return now.timestamp() + 60  # used for this run, not kept
    if next_update < now:
        raise ValueError("the %s is stale (nextUpdate %s)" % (what, next_update))
    return next_update.timestamp()


def reason_name(reason):
    """Return the CRLReason (RFC 5280 5.3.1) of cryptography's ReasonFlags as text."""
    return reason.name if reason is not None else ""


def spki_key_bits(cert):
    """Return the subjectPublicKey bits of *cert* (what OCSP's key hashes cover)."""
    fields = Fields(Ber(cert.spki))
    fields.take(SEQUENCE)
    return fields.take(BIT_STRING).body[1:]


def digest_of(algorithm, data):
    """Return the digest of *data* with cryptography's hash *algorithm*."""
    digest = hashes.Hash(algorithm)
    digest.update(bytes(data))
    return digest.finalize()


# -- The cache: $XDG_CACHE_HOME/sparkpostSMIME/revocation ------------------------------
# One file per verdict (by the certificate's SHA-256) and per CRL (by its URL's): a
# first line 'until-epoch state reason when source', then the CRL's DER.  Written
# atomically; a file that cannot be read as one is ignored and fetched again.

def cache_path(cache_dir, kind, key):
    return os.path.join(cache_dir, "revocation", "%s-%s" % (
        kind, hashlib.sha256(key).hexdigest()[:40]))


def read_cached(path):
    """Return (first line's fields, the rest) of a fresh cache file, else None."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CRL + 4096)
        head, _, rest = data.partition(b"\n")
        fields = head.decode("utf-8").split("\t")
        if len(fields) == 5 and float(fields[0]) > time.time():
            return fields, rest
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    return None


def write_cached(path, fields, rest=b""):
    """Write a cache file atomically (best effort: a cache that cannot be written is
    no fault), keeping at most MAX_CACHE_ENTRIES files and MAX_CACHE_OCTETS octets."""
    try:
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        trim_cache(directory, len(rest) + 4096)
        line = "\t".join(str(f).replace("\t", " ").replace("\n", " ") for f in fields)
        write_atomically(path, line.encode("utf-8") + b"\n" + rest, 0o600)
    except (OSError, SmimeToolError):
        pass


def trim_cache(directory, room):
    """Remove the oldest files of cache *directory* until one more file and *room* more
    octets fit within MAX_CACHE_ENTRIES and MAX_CACHE_OCTETS.  Raises OSError."""
    files = []
    for entry in os.scandir(directory):
        info = entry.stat(follow_symlinks=False)
        files.append((info.st_mtime, info.st_size, entry.path))
    files.sort()
    count, size = len(files), sum(f[1] for f in files)
    for _, octets, name in files:
        if count < MAX_CACHE_ENTRIES and size + room <= MAX_CACHE_OCTETS:
            break
        remove_quietly(name)
        count, size = count - 1, size - octets


def read_verdict(cache_dir, cert):
    """Return the cached Status of *cert* if still fresh, else None."""
    found = read_cached(cache_path(cache_dir, "cert", cert.der))
    if found is None or found[0][1] not in ("good", "revoked"):
        return None
    until, state, reason, when, source = found[0]
    return Status(state, source, "", reason, when, float(until))


def write_verdict(cache_dir, cert, status):
    if status.until > time.time() + 60:
        write_cached(cache_path(cache_dir, "cert", cert.der), (
            status.until, status.state, status.reason, status.when, status.source))


def cached_crl(cache_dir, url):
    """Return the DER/PEM of the CRL fetched from *url* if cached and fresh, else None."""
    found = read_cached(cache_path(cache_dir, "crl", url.encode("utf-8")))
    return found[1] if found is not None else None


def remember_crl(cache_dir, url, data, until):
    if until > time.time() + 60:
        write_cached(cache_path(cache_dir, "crl", url.encode("utf-8")),
                     (until, "crl", "", "", url), data)


def recipient_problem(keystore, address):
    """Return why mail to *address* cannot be encrypted ('' when it can): no usable
    certificate, or a revoked one.  For the gateway's RCPT (550 5.7.1 on a reason)."""
    try:
        keystore.recipient(address)
    except SmimeToolError as exc:
        return str(exc)
    return ""


###############################################################################
# S/MIME (RFC 8551) ###########################################################
###############################################################################

#: Object identifiers (RFC 5652 14, RFC 3565, RFC 5753 7.1.4, RFC 5480 2.1.1, RFC 8017 A.1).
ID_DATA, ID_SIGNED_DATA, ID_ENVELOPED_DATA = ("1.2.840.113549.1.7.1", "1.2.840.113549.1.7.2",
                                              "1.2.840.113549.1.7.3")
RSA_ENCRYPTION, ID_EC_PUBLIC_KEY = "1.2.840.113549.1.1.1", "1.2.840.10045.2.1"
#: rsaEncryption with its NULL parameters: RSA key transport and signature (RFC 3370).
RSA_ALGORITHM = algorithm(RSA_ENCRYPTION, der(NULL))
#: Signed attributes (RFC 5652 11.1-11.3, RFC 8551 2.5.2).
ATTR_CONTENT_TYPE, ATTR_MESSAGE_DIGEST, ATTR_SIGNING_TIME, ATTR_SMIME_CAPABILITIES = (
    "1.2.840.113549.1.9.3", "1.2.840.113549.1.9.4", "1.2.840.113549.1.9.5",
    "1.2.840.113549.1.9.15")
#: Digest algorithms (RFC 3370 2.1, RFC 5754 2) -> cryptography's hash names.
DIGESTS = {"1.3.14.3.2.26": "SHA1", "2.16.840.1.101.3.4.2.4": "SHA224",
           "2.16.840.1.101.3.4.2.1": "SHA256", "2.16.840.1.101.3.4.2.2": "SHA384",
           "2.16.840.1.101.3.4.2.3": "SHA512"}
#: ECDSA signature algorithms by hash (RFC 5753 7.1.3, RFC 5758 3.2).
ECDSA_WITH = {"SHA256": "1.2.840.10045.4.3.2", "SHA384": "1.2.840.10045.4.3.3",
              "SHA512": "1.2.840.10045.4.3.4"}
#: Content ciphers and key wraps by key length (RFC 3565 4.1, 2.3.2).
AES_CBC = {16: "2.16.840.1.101.3.4.1.2", 24: "2.16.840.1.101.3.4.1.22",
           32: "2.16.840.1.101.3.4.1.42"}
AES_WRAP = {16: "2.16.840.1.101.3.4.1.5", 24: "2.16.840.1.101.3.4.1.25",
            32: "2.16.840.1.101.3.4.1.45"}
#: dhSinglePass-stdDH-*kdf-scheme -> the X9.63 KDF's hash (RFC 5753 7.1.4, RFC 3278 8.1).
KDF_HASHES = {"1.3.133.16.840.63.0.2": "SHA1", "1.3.132.1.11.0": "SHA224",
              "1.3.132.1.11.1": "SHA256", "1.3.132.1.11.2": "SHA384",
              "1.3.132.1.11.3": "SHA512",
              # the cofactorDH schemes, received only: the same secret on curves of cofactor 1
              "1.3.133.16.840.63.0.3": "SHA1", "1.3.132.1.14.0": "SHA224",
              "1.3.132.1.14.1": "SHA256", "1.3.132.1.14.2": "SHA384",
              "1.3.132.1.14.3": "SHA512"}
#: OtherRecipientInfo type of a KEMRecipientInfo (RFC 9629 3).
ID_ORI_KEM = "1.2.840.113549.1.9.16.13.3"
#: HKDF KDFs of KEMRecipientInfo (RFC 8619 2) -> hash; we send HKDF-SHA256 with AES-256 key
#: wrap and a 32-octet key-encryption key, as RFC 9936 2.2 requires for ML-KEM-768/1024.
HKDF_HASHES = {"1.2.840.113549.1.9.16.3.28": "SHA256", "1.2.840.113549.1.9.16.3.29": "SHA384",
               "1.2.840.113549.1.9.16.3.30": "SHA512"}
HKDF_SHA256, KEM_KEK_SIZE = "1.2.840.113549.1.9.16.3.28", 32
#: What each KEMRecipientInfo we write holds after kemct (kdf, kekLength, wrap), and the
#: CMSORIforKEMOtherInfo its KDF reads (RFC 9629 5; no ukm), worked out once.
KEM_WRAP = algorithm(AES_WRAP[KEM_KEK_SIZE])
KEM_KDF_WRAP = algorithm(HKDF_SHA256) + der_int(KEM_KEK_SIZE) + KEM_WRAP
KEM_OTHER_INFO = der(SEQUENCE, KEM_WRAP, der_int(KEM_KEK_SIZE))


SIGNED_DATA_HEADER = (b'Content-Type: application/pkcs7-mime; smime-type=signed-data;\r\n'
                      b' name="smime.p7m"\r\n'
                      b'Content-Transfer-Encoding: base64\r\n'
                      b'Content-Disposition: attachment; filename="smime.p7m"\r\n')
ENVELOPED_DATA_HEADER = (b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data;\r\n'
                         b' name="smime.p7m"\r\n'
                         b'Content-Transfer-Encoding: base64\r\n'
                         b'Content-Disposition: attachment; filename="smime.p7m"\r\n')
SIGNATURE_PART_HEADER = (b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
                         b'Content-Transfer-Encoding: base64\r\n'
                         b'Content-Disposition: attachment; filename="smime.p7s"\r\n')


def canonical_content(msg):
    """Return the canonical MIME entity of *msg*, the bytes that get signed, as a list of
    pieces (canonical_pieces(): the body is not copied where it is canonical already).

    A message without Content-Type gets an explicit text/plain one.
    """
    fields = msg.entity_fields
    if field_value(fields, "content-type") is None:
        charset = b"us-ascii"
        if not msg.body.isascii():
            try:
                msg.body.decode("utf-8")
                charset = b"utf-8"
            except UnicodeDecodeError:
                pass
        default = Field("content-type", b"Content-Type: text/plain; charset=%s\r\n" % charset)
        fields = [default] + fields
    return canonical_pieces(fields, msg.body, msg.binary, spans=msg.spans)


def signed_der(content, signer, detached, now=None):
    """Return the DER ContentInfo of a SignedData over *content* (RFC 5652 5, RFC 8551 2).

    One SignerInfo: version 1, the signer by issuerAndSerialNumber, its digest
    (key_kind()), signed attributes content-type, signing-time, message-digest and
    S/MIME capabilities (RFC 8551 2.5), an RSA PKCS#1 v1.5 (rsaEncryption,
    RFC 3370 3.2) or ECDSA signature over their DER; the signer's certificate and
    chain.  *detached*: the content is not encapsulated (multipart/signed); *now*:
    the signing time (time.time(), default the present).  *content*: bytes-like or
    a list of them; returns Chunks (the content is not copied).
    """
    digest_name = signer.digest
    content_type, capabilities, digest_algorithm, digest_set = signed_constants(digest_name)
    content = pieces_of(content)
    digest = hashlib.new(digest_name.lower())
    for piece in content:
        digest.update(piece)
    attrs = der_set(content_type, attribute(ATTR_SIGNING_TIME, signing_time(now)),
                    attribute(ATTR_MESSAGE_DIGEST, der(OCTET_STRING, digest.digest())),
                    capabilities)
    signer_info = der(SEQUENCE, b"\x02\x01\x01" + signer.rid + digest_algorithm,  # version 1
                      bytes((ctx(0),)) + attrs[1:],
                      *sign_attributes(signer, attrs))
    if detached:
        encapsulated = [DETACHED_CONTENT_INFO]
    else:
        encapsulated = der_pieces(SEQUENCE, der_oid(ID_DATA),
                                  der_pieces(ctx(0), der_pieces(OCTET_STRING, list(content))))
    signed = der_pieces(SEQUENCE, b"\x02\x01\x01", digest_set,  # version 1
                        encapsulated, signer.certificate_set(), der(SET, signer_info))
    return Chunks.joined(*der_pieces(SEQUENCE, der_oid(ID_SIGNED_DATA),
                                     der_pieces(ctx(0), signed)))


#: The EncapsulatedContentInfo of a detached signature: id-data, no eContent (RFC 5652 5.2).
DETACHED_CONTENT_INFO = der(SEQUENCE, der_oid(ID_DATA))


#: Digest names -> their algorithm identifiers (RFC 5754 2).
HASH_OIDS = {name: oid for oid, name in DIGESTS.items()}


@functools.lru_cache(maxsize=None)
def signed_constants(digest_name):
    """Return what every SignedData with digest *digest_name* repeats: (the content-type
    attribute, the SMIMECapabilities attribute, the digest AlgorithmIdentifier, the SET
    of it)."""
    digest_algorithm = algorithm(HASH_OIDS[digest_name], der(NULL))
    return (attribute(ATTR_CONTENT_TYPE, der_oid(ID_DATA)), smime_capabilities(),
            digest_algorithm, der_set(digest_algorithm))


def attribute(oid, value):
    """Return an Attribute: its type and a SET holding *value* (RFC 5652 5.3)."""
    return der(SEQUENCE, der_oid(oid), der(SET, value))


def signing_time(now=None):
    """Return the signing-time value: UTCTime up to 2049, GeneralizedTime after (RFC 5652
    11.3)."""
    stamp = time.gmtime(int((time.time() if now is None else now) // 1))
    if stamp.tm_year < 2050:
        return der(0x17, time.strftime("%y%m%d%H%M%SZ", stamp).encode("ascii"))
    return der(0x18, time.strftime("%Y%m%d%H%M%SZ", stamp).encode("ascii"))


def smime_capabilities():
    """Return the SMIMECapabilities attribute: the content ciphers we read, strongest first
    (RFC 8551 2.5.2)."""
    return attribute(ATTR_SMIME_CAPABILITIES, der(SEQUENCE, *(
        der(SEQUENCE, der_oid(AES_CBC[size])) for size in (32, 24, 16))))


def sign_attributes(signer, attrs):
    """Return (signatureAlgorithm, signature OCTET STRING) over the DER signed attributes.

    Raises IdentityError for a key that is neither RSA nor EC.
    """
    digest = getattr(hashes, signer.digest)()
    if signer.kind == "rsa":
        return (RSA_ALGORITHM, der(OCTET_STRING, signer.key.sign(attrs, padding.PKCS1v15(),
                                                                 digest)))
    if signer.kind == "ec":
        return (algorithm(ECDSA_WITH[signer.digest]),
                der(OCTET_STRING, signer.key.sign(attrs, ec.ECDSA(digest))))
    raise IdentityError("%s: a %s key cannot sign S/MIME here: use an RSA or EC key"
                        % (signer.path, signer.kind))


def sign_opaque(content, signer, now=None):
    """Return an application/pkcs7-mime signed-data entity embedding *content* (bytes-like
    or a list of them), as Chunks."""
    return Chunks.joined(SIGNED_DATA_HEADER, b"\r\n",
                         base64_lines(signed_der(content, signer, False, now)))


def sign_detached(content, signer, now=None, spans=None):
    """Return a multipart/signed entity (RFC 8551 3.5.3, RFC 1847) over *content* (bytes-like
    or a list of them), as Chunks.  *spans*: the unproven_spans() of its last piece."""
    content = pieces_of(content)
    boundary = b"----=_smime_" + os.urandom(12).hex().encode()  # as secrets.token_hex(12)
    while holds(content, boundary, spans):
        boundary = b"----=_smime_" + os.urandom(12).hex().encode()
    signature = encode_base64(bytes(signed_der(content, signer, True, now)))
    return Chunks.joined(
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";\r\n'
        b' micalg=' + signer.digest.lower().replace("sha", "sha-").encode()
        + b'; boundary="' + boundary + b'"\r\n\r\n'
        b"This is an S/MIME signed message\r\n\r\n--" + boundary + b"\r\n", *content,
        b"\r\n--" + boundary + b"\r\n" + SIGNATURE_PART_HEADER + b"\r\n" + signature
        + b"\r\n--" + boundary + b"--\r\n")


def holds(pieces, needle, spans=None):
    """True when the bytes of *pieces* (bytes-like objects) hold *needle*, also across two.
    *spans*: the unproven_spans() of the last piece, where alone a needle without base64
    characters (a boundary, with its "-" and "_") can be."""
    tail, last = b"", len(pieces) - 1
    for n, piece in enumerate(pieces):
        if (holds_any(piece, (needle,), spans if n == last else None)
                or needle in tail + bytes(piece[:len(needle)])):
            return True
        tail = (tail + bytes(piece[-len(needle):]))[-len(needle):]
    return False


def encrypt(content, recipients, cipher="aes256"):
    """Return an application/pkcs7-mime enveloped-data entity of *content* (RFC 8551 3.3):
    Chunks, made as they are written (see Chunks)."""
    unique = list({ident.rid: ident for ident in recipients}.values())
    der = enveloped_data(content, unique, 32 if cipher == "aes256" else 16)
    return Chunks.joined(ENVELOPED_DATA_HEADER, b"\r\n", base64_lines(der))


def enveloped_data(content, recipients, key_size=32):
    """Return the DER ContentInfo of an EnvelopedData of *content* (RFC 5652 6.1), as Chunks.

    The content is encrypted with AES-CBC under a fresh key of *key_size* octets,
    and that key is given to each recipient Identity: RSA keys by
    KeyTransRecipientInfo, EC keys by KeyAgreeRecipientInfo, ML-KEM keys by
    KEMRecipientInfo.  Version 3 when there is an OtherRecipientInfo (RFC 9629 3),
    else 0 when every RecipientInfo is a KeyTransRecipientInfo, else 2 (RFC 5652 6.1).
    The lengths are known ahead (CBC padding is deterministic): DER throughout.
    """
    key, iv = os.urandom(key_size), os.urandom(16)
    infos = [recipient_info(ident, key) for ident in recipients]
    version = 3 if any(info[0] == ctx(4) for info in infos) else \
        0 if all(info[0] == SEQUENCE for info in infos) else 2
    encrypted_content_info = der_pieces(
        SEQUENCE, der_oid(ID_DATA), algorithm(AES_CBC[key_size], der(OCTET_STRING, iv)),
        der_pieces(ctx(0, constructed=False), aes_cbc(key, iv, content)))
    enveloped = der_pieces(SEQUENCE, der_int(version), der_set(*infos), encrypted_content_info)
    return Chunks.joined(*der_pieces(SEQUENCE, der_oid(ID_ENVELOPED_DATA),
                                     der_pieces(ctx(0), enveloped)))


def aes_cbc(key, iv, content):
    """Return *content* (Chunks or bytes-like) PKCS#7-padded and AES-CBC encrypted (RFC
    5652 6.3, RFC 3565), as Chunks made STREAM_BLOCK octets at a time."""
    pad = 16 - len(content) % 16

    def make():
        encryptor = ciphers.Cipher(ciphers.algorithms.AES(key),
                                   ciphers.modes.CBC(iv)).encryptor()
        for block in blocks(content, STREAM_BLOCK):
            yield encryptor.update(block)
        yield encryptor.update(bytes((pad,)) * pad)
    return Chunks(len(content) + pad, make)


def recipient_info(ident, key):
    """Return the RecipientInfo giving content-encryption *key* to *ident*."""
    if ident.kind == "rsa":
        return key_trans_recipient_info(ident, key)
    if ident.kind == "mlkem":
        return kem_recipient_info(ident, key)
    return key_agree_recipient_info(ident, key)


def key_trans_recipient_info(ident, key):
    """Return a KeyTransRecipientInfo (RFC 5652 6.2.1): *key* under RSA PKCS#1 v1.5
    (RFC 3370 4.2.1), version 0, the recipient named by issuerAndSerialNumber."""
    encrypted_key = ident.cert.public_key().encrypt(key, padding.PKCS1v15())
    return der(SEQUENCE, b"\x02\x01\x00", ident.rid, RSA_ALGORITHM,  # version 0
               der(OCTET_STRING, encrypted_key))


def key_agree_recipient_info(ident, key):
    """Return a KeyAgreeRecipientInfo (RFC 5652 6.2.2, RFC 5753 3.1.1) for an EC identity.

    Ephemeral-static ECDH on the recipient's curve; the key-encryption key comes
    from the ANSI X9.63 KDF over the shared secret and ECC-CMS-SharedInfo, and
    wraps *key* with AES key wrap of the same size (RFC 3394, RFC 3565 2.3.2).
    The originator is the ephemeral public key (id-ecPublicKey, parameters
    absent: the recipient's curve), the recipient its issuerAndSerialNumber.
    """
    public = ident.cert.public_key()
    scheme, wrap = ECDH_SCHEMES[public.curve.name], AES_WRAP[len(key)]
    ephemeral = ec.generate_private_key(public.curve)
    kek = ecdh_key_encryption_key(ephemeral, public, scheme, wrap, len(key))
    point = ephemeral.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)
    originator_key = der(ctx(1), algorithm(ID_EC_PUBLIC_KEY), der(BIT_STRING, b"\0", point))
    recipient_encrypted_key = der(SEQUENCE, ident.rid,
                                  der(OCTET_STRING, keywrap.aes_key_wrap(kek, key)))
    return der(ctx(1), der_int(3), der(ctx(0), originator_key),
               algorithm(scheme, algorithm(wrap)), der(SEQUENCE, recipient_encrypted_key))


def ecdh_key_encryption_key(private, public, scheme, wrap, size, ukm=None):
    """Return the key-encryption key both ends of ECDH derive (RFC 5753 3.1.1, 7.2).

    X9.63 KDF with the *scheme*'s hash over the shared secret and the DER
    ECC-CMS-SharedInfo: the key wrap algorithm, the optional user keying
    material, and the key size in bits as four big-endian octets.
    """
    digest = getattr(hashes, KDF_HASHES[scheme])()
    shared_info = der(SEQUENCE, algorithm(wrap),
                      der(ctx(0), der(OCTET_STRING, ukm)) if ukm is not None else b"",
                      der(ctx(2), der(OCTET_STRING, (size * 8).to_bytes(4, "big"))))
    secret = private.exchange(ec.ECDH(), public)
    return x963kdf.X963KDF(digest, size, shared_info).derive(secret)


def kem_recipient_info(ident, key):
    """Return an OtherRecipientInfo [4] of type id-ori-kem holding a KEMRecipientInfo
    (RFC 9629 3) for an ML-KEM identity, as RFC 9936 2 specifies it.

    ML-KEM.Encaps to the recipient's key gives a shared secret and the ciphertext
    (kemct); HKDF-SHA256 derives the 32-octet key-encryption key from the secret,
    which wraps *key* with AES-256 key wrap (RFC 3394).  Version 0, the recipient
    named by issuerAndSerialNumber, the KEM by its certificate's key OID, no ukm.
    """
    secret, kemct = ident.cert.public_key().encapsulate()
    kek = kem_key_encryption_key(secret, KEM_OTHER_INFO, KEM_KEK_SIZE)
    kemri = der(SEQUENCE, b"\x02\x01\x00", ident.rid,
                algorithm(ident.cert.key_algorithm),
                der(OCTET_STRING, kemct), KEM_KDF_WRAP,
                der(OCTET_STRING, keywrap.aes_key_wrap(kek, key)))
    return der(ctx(4), der_oid(ID_ORI_KEM), kemri)


def kem_other_info(wrap, size, ukm=None):
    """Return the DER CMSORIforKEMOtherInfo (RFC 9629 5): the *wrap* AlgorithmIdentifier
    (DER), kekLength *size*, and the optional user keying material [0]."""
    return der(SEQUENCE, wrap, der_int(size),
               der(ctx(0), der(OCTET_STRING, ukm)) if ukm is not None else b"")


def kem_key_encryption_key(secret, info, size, hash_name="SHA256"):
    """Return the key-encryption key both ends of a KEMRecipientInfo derive (RFC 9629 5):
    HKDF (RFC 5869) with *hash_name*, an empty salt, the KEM's shared *secret* as input
    keying material, the DER CMSORIforKEMOtherInfo *info*, *size* octets."""
    return hkdf.HKDF(getattr(hashes, hash_name)(), size, salt=b"", info=info).derive(secret)


def build_smime(msg, opts, signer=None, recipients=(), extra=b"", now=None):
    """Return the final message: outer header, MIME-Version, S/MIME entity; bytes, or
    Chunks above STREAM_ABOVE octets (made again as they are written).

    The outer fields keep their order, *extra* header lines follow them (outside
    anything signed); Bcc never appears in the output.  *now*: the signing time
    (see date_at_signing(), which gives the outer Date the same time).
    """
    content = canonical_content(msg)
    entity = Chunks.joined(*content)
    if opts.sign_mode == "opaque":
        entity = sign_opaque(content, signer, now)
    elif opts.sign_mode == "detached":  # the body as it came: its lines proven already
        entity = sign_detached(content, signer, now,
                               msg.spans if content[-1] is msg.body else None)
    if opts.encrypt:
        entity = encrypt(entity, recipients, opts.cipher)
    outer = safe_fields([f for f in msg.outer if f.name != "bcc"])
    last = content[1] or content[0]  # S/MIME entities end with a CRLF; plain content may not
    ending = b"" if opts.sign_mode or opts.encrypt or last.endswith(b"\r\n") else b"\r\n"
    data = Chunks.joined(outer, extra, b"MIME-Version: 1.0\r\n", entity, ending)  # (for DATA)
    return bytes(data) if len(data) <= STREAM_ABOVE else data


def date_at_signing(msg, now, keep=False):
    """Make the outer Date of *msg* agree with the signing time *now*; return what was done.

    Clients compare the two: Thunderbird calls a good signature not valid when
    they are more than CLIENT_DATE_SKEW apart or when there is no Date.  A
    missing Date is added (RFC 5322 3.6 requires one), a Date more than
    DATE_SKEW from *now* or unreadable is replaced, unless *keep*.  Returns
    "replaced", "kept" (kept as asked, though a client will call it not valid),
    or "" (nothing to say).
    """
    found = [n for n, f in enumerate(msg.outer) if f.name == "date"]
    stamp = Field("date", b"Date: %s\r\n" % rfc5322_date(now).encode("ascii"))
    if not found:
        msg.outer.insert(0, stamp)
        return ""
    skew = date_skew(msg.outer[found[0]].value, now)
    if keep:
        return "kept" if skew is None or skew > CLIENT_DATE_SKEW else ""
    if skew is not None and skew <= DATE_SKEW and len(found) == 1:
        return ""
    msg.outer[found[0]] = stamp
    for n in reversed(found[1:]):  # RFC 5322 3.6: one Date only
        del msg.outer[n]
    return "replaced"


MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def rfc5322_date(when):
    """Return the RFC 5322 3.3 date-time of *when* (seconds since the epoch) in local time,
    as email.utils.formatdate(when, localtime=True) writes it (without importing
    email.utils, its socket, urllib and charset modules: ~3 ms of a single run)."""
    stamp = time.localtime(when)
    offset = stamp.tm_gmtoff // 60
    return "%s, %02d %s %04d %02d:%02d:%02d %s%02d%02d" % (
        ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[stamp.tm_wday], stamp.tm_mday,
        MONTHS[stamp.tm_mon - 1], stamp.tm_year, stamp.tm_hour, stamp.tm_min, stamp.tm_sec,
        "-" if offset < 0 else "+", abs(offset) // 60, abs(offset) % 60)


#: A date-time as RFC 5322 3.3 writes it (day name, a year from 1000, seconds, numeric zone
#: other than -0000), read here (1 us) rather than by email.utils (8 us), which
#: reads everything else: obsolete forms, zone names, no seconds, "-0000" (zone unknown).
_PLAIN_DATE = re.compile(rb"(?:[A-Z][a-z][a-z],[ \t]*)?(\d\d?) ([A-Z][a-z][a-z]) ([1-9]\d{3}) "
                         rb"(\d\d):(\d\d):(\d\d) ([+-]\d\d)(\d\d)\Z")
_MONTH_NUMBERS = {name.encode(): n for n, name in enumerate(MONTHS, 1)}


def date_skew(value, when):
    """Return how many seconds the RFC 5322 date-time *value* (bytes) is from *when*, or
    None when it cannot be read."""
    stamp = date_timestamp(value)
    return None if stamp is None else abs(stamp - when)


def date_timestamp(value):
    """Return the RFC 5322 date-time *value* (bytes) in seconds since the epoch, as
    email.utils.parsedate_tz and mktime_tz read it, or None when it cannot be read."""
    try:
        plain = _PLAIN_DATE.match(value)
        if plain and plain.group(2) in _MONTH_NUMBERS and plain.group(7, 8) != (b"-00", b"00"):
            day, month, year, hour, minute, second, zone_hours, zone_minutes = plain.groups()
            offset = int(zone_hours) * 3600 + int(zone_hours[:1] + zone_minutes) * 60
            return calendar.timegm((int(year), _MONTH_NUMBERS[month], int(day), int(hour),
                                    int(minute), int(second))) - offset
        from email.utils import mktime_tz, parsedate_tz
        parsed = parsedate_tz(value.decode("ascii", "replace"))
        return mktime_tz(parsed) if parsed else None
    except (ValueError, OverflowError, TypeError):
        return None


# -- One message, built ----------------------------------------------------------

class Job(NamedTuple):
    """One message ready to go, never changed: a retry to fewer recipients is a new Job.

    *started*: time.perf_counter() when building began; *notes*: (topic, warning)
    pairs, counted by topic and warned once per run (Stats.notices()), or at once
    when the topic is None; *failure*: (exit code, reason) of a message that
    could not be built, which passes through the back end only to be reported;
    *digest*: the input's SHA-256 (hex), for the journal (--results).
    """
    source: str
    copy: int = 0
    data: bytes = b""
    mail_from: str = ""
    recipients: tuple = ()
    msg: object = None
    started: float = 0.0
    notes: tuple = ()
    failure: tuple = ()
    digest: str = ""


def build_job(item, settings, keystore, extra=b"", served=(), msg=None, check=None):
    """Read, check and build the message of work *item* (path, copy); return its Job.

    *extra*: outer header lines for every message (extra_header());
    *served*: recipients that got it already (--resume): not in the envelope;
    *msg*: the Message when it is parsed already (received by --serve);
    *check*: the back end's check of the built message (Backend.check).
    Raises MessageError, InputError or IdentityError.
    """
    path, copy = item
    started, digest = time.perf_counter(), ""
    if msg is None:
        msg, digest = read_message(path, settings.results)
    if settings.send:
        check_hops(msg, settings.hop_limit)
    signer, recipients = find_identities(msg, settings, keystore)
    now, notes = time.time(), ()
    if settings.sign_mode:
        done = date_at_signing(msg, now, settings.keep_date)
        notes = (("date-" + done, ""),) if done else ()
    data = build_smime(msg, settings, signer, recipients, extra, now)
    if check is not None:
        notes += check(msg, data)
    notes += quantum_notes(msg, recipients)
    return Job(path, copy, data, settings.mail_from or msg.sender,
               tuple(r for r in msg.recipients if r not in served), msg, started, notes,
               digest=digest)


def check_hops(msg, limit):
    """Raise LoopError when *msg* has more than *limit* Received fields: it has gone
    round a loop (between two gateways, or a gateway and an MTA), RFC 5321 6.3."""
    hops = sum(f.name == "received" for f in msg.outer)
    if hops > limit:
        raise LoopError("%s: %d Received header fields, more than the hop limit of %d "
                        "(SMIME_HOP_LIMIT): a mail loop, not sent" % (msg.source, hops, limit))


def extra_header(settings, backend):
    """Return the outer header lines added to every message: --header, then the
    back end's own (Backend.outer_header())."""
    return b"".join(settings.headers) + backend.outer_header()



###############################################################################
# Delivery ####################################################################
###############################################################################
# Back ends share one interface, chosen by name from BACKENDS: open() -> the
# 'Opened ...' line, deliver(jobs) -> one Outcome per Job (an iterator, in
# order), close().  They never print: transcripts and the 'Opened' line go
# through *events* (the Reporter), redacted.

class Outcome(NamedTuple):
    """What one attempt at a Job came to: a value, never an exception.

    *status*: "sent" (every recipient accepted), "written" (to a file or stdout),
    "refused" (the server refused some or all recipients: *refused*), "temporary"
    (the same may work later), "permanent" (it will not), "halt" (nothing more
    can be sent in this run: TLS, credentials, configuration, a sending limit,
    an output fault), "failed" (the message could not be built).  *code*: the
    exit code it stands for; *reply*: the server's last reply or the API's report;
    *shown*: what the back end adds to the OK report line (the API's report).
    """
    job: Job
    status: str
    code: int = EX_OK
    reply: str = ""
    accepted: tuple = ()
    refused: tuple = ()          #: ((address, reply code, reply text), ...)
    detail: str = ""
    hint: str = ""
    retry_after: float = 0.0     #: seconds the server asked us to wait (HTTP Retry-After)
    lines: tuple = ()            #: more report lines (a dry run's envelope)
    shown: str = ""              #: the back end's words for the OK line ("" for none)


def failed_build(job):
    """Return the Outcome of a Job that could not be built."""
    return Outcome(job, "failed", job.failure[0], detail=job.failure[1])


def error_outcome(job, error):
    """Return the Outcome of an attempt that raised SmimeToolError *error*.

    TLS, authentication and configuration faults halt the run: every later
    message would meet them too.
    """
    if isinstance(error, (ConfigError, AuthError, OutputError)):
        status = "halt"
    else:
        status = "temporary" if error.exit_code == EX_TEMPFAIL else "permanent"
    return Outcome(job, status, error.exit_code, detail=str(error),
                   hint=getattr(error, "hint", ""))


class Backend:
    """The back end interface, and what is common: a Job that failed to build is
    passed on as its Outcome; every other Job gets one attempt()."""

    def __init__(self, settings, events):
        self.settings, self.events = settings, events

    def describe(self):
        """Return what open() would do, for --dry_run."""
        return ""

    def preload(self):
        """Load now what the first session would load (before forking workers)."""

    def outer_header(self):
        """Return the outer header lines this back end adds to every message."""
        return b""

    def check(self, msg, data):
        """Return (topic, warning) notes on the built message *data* of *msg*.

        Raises MessageError for a message this back end would refuse.
        """
        return ()

    def open(self):
        """Open the session; return the 'Opened ...' line ('' when there is none)."""
        return ""

    def deliver(self, jobs, halted):
        """Yield one Outcome per Job of *jobs*, in order; stop after one that halts.

        *halted()*: true once the run must stop (jobs then stops giving any).
        """
        for job in jobs:
            outcome = failed_build(job) if job.failure else self.attempt(job)
            yield outcome
            if outcome.status == "halt":
                return

    def attempt(self, job):
        raise NotImplementedError

    def close(self):
        """End the session, if any."""


class FileBackend(Backend):
    """No send option: each message to stdout, to -o FILE, or to one file per input in
    -o DIR, written atomically.

    Files are committed in groups (OutputGroup): up to GROUP_FILES files or
    GROUP_BYTES octets, or what is pending after GROUP_SECONDS; a message is
    "written" (reported, journaled) only once its group is on disk.
    """

    def __init__(self, settings, events):
        super().__init__(settings, events)
        #: -o names a directory: looked at once per run, not once per message (if it is
        #: removed in mid-run, the next file cannot be created in it: 73)
        self.into_directory = bool(settings.output) and os.path.isdir(settings.output)

    def deliver(self, jobs, halted):
        group, waiting = OutputGroup(), []
        try:
            for job in jobs:
                outcome = failed_build(job) if job.failure else self.attempt(job, group)
                waiting.append(outcome)
                if outcome.status == "halt" or group.full():
                    waiting = self.commit(group, waiting)
                    yield from waiting
                    if any(o.status == "halt" for o in waiting):
                        return
                    waiting = []
            yield from self.commit(group, waiting)
        finally:
            group.discard()

    def attempt(self, job, group):
        """Write *job* to stdout, or into *group* (not yet committed); return its Outcome."""
        target = (output_in(self.settings, job.source, job.copy) if self.into_directory
                  else self.settings.output)
        try:
            if target:
                group.add(target, job.data)
            else:
                write_stdout(job.data)
        except OutputError as exc:
            return error_outcome(job, exc)
        return Outcome(job, "written")

    @staticmethod
    def commit(group, waiting):
        """Commit *group*; return the *waiting* Outcomes, those written as halts if that
        fails (their files are then removed)."""
        try:
            group.commit()
        except OutputError as exc:
            group.discard()
            return [error_outcome(o.job, exc) if o.status == "written" else o
                    for o in waiting]
        return waiting


def output_path(settings, path, copy=0):
    """Return where the message built from *path* goes ('' = stdout): -o FILE, or its
    file in -o DIR (output_in())."""
    if settings.output and os.path.isdir(settings.output):
        return output_in(settings, path, copy)
    return settings.output


def distinct_outputs(settings, paths):
    """Check that no two of *paths* would be written to the same file of -o DIR: the
    second would replace the first, a message lost.  Raises UsageError naming both."""
    if not (settings.output and os.path.isdir(settings.output)):
        return
    seen = {}
    for path in paths:
        target = output_in(settings, path)
        if target in seen:
            raise UsageError("%s and %s would both be written to %s: give the inputs "
                             "distinct file names, or run them into different -o directories"
                             % (seen[target], path, target))
        seen[target] = path


def output_in(settings, path, copy=0):
    """Return the file in -o DIR of the message built from *path*: DIR/<input name>, or
    DIR/<name>.<copy>.eml for --repeat copies."""
    name = "stdin.eml" if path == "-" else os.path.basename(path)
    if settings.repeat > 1:
        name = "%s.%d.eml" % (name[:-4] if name.endswith(".eml") else name, copy)
    return os.path.join(settings.output, name)


class DryRun(Backend):
    """Wraps a back end: builds everything, then describes what would be sent."""

    def __init__(self, backend):
        super().__init__(backend.settings, backend.events)
        self.backend = backend

    def outer_header(self):
        return self.backend.outer_header()

    def check(self, msg, data):
        return self.backend.check(msg, data)

    def open(self):
        return "Dry run, nothing is sent. " + self.backend.describe()

    def attempt(self, job):
        self.events.session(self.open())
        head = b""
        for chunk in pieces_of(job.data):  # Chunks: only as far as the empty line
            head += bytes(chunk[:MAX_HEADER_SIZE])
            if b"\r\n\r\n" in head:
                break
        head = head.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
        lines = ["  MAIL FROM:<%s>" % job.mail_from]
        lines += ["  RCPT TO:<%s>" % r for r in job.recipients]
        lines.append("  size %d octets; outer header:" % len(job.data))
        lines += ["    " + line for line in head.split("\r\n")]
        return Outcome(job, "sent", accepted=job.recipients, lines=tuple(lines))


# -- SMTP (RFC 5321, 3207, 4954, 2920) ---------------------------------------------

#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
HOST_MISMATCH = (62, 64)


class JobQueue:
    """The Jobs a back end has still to send, in order: those built ahead (a small
    queue, BUILT_AHEAD at most) first, then the rest of *jobs*, built as taken."""

    def __init__(self, jobs):
        self.jobs, self.built = iter(jobs), collections.deque()

    def __len__(self):
        """Return how many Jobs are built ahead."""
        return len(self.built)

    def take(self):
        """Return the next Job, or None when there is none left."""
        return self.built.popleft() if self.built else next(self.jobs, None)

    def put_back(self, job):
        """Make *job* the next one taken again."""
        self.built.appendleft(job)

    def build(self):
        """Build one more Job ahead; return False when *jobs* has none left."""
        job = next(self.jobs, None)
        if job is not None:
            self.built.append(job)
        return job is not None


class SmtpBackend(Backend):
    """Inject over SMTP: connect, EHLO, STARTTLS, EHLO, AUTH; then one mail transaction
    per Job.  Sessions carry MESSAGES_PER_CONNECTION messages, then reconnect."""

    def __init__(self, settings, events):
        super().__init__(settings, events)
        self.smtp, self.mode, self.count = None, "plain", 0  #: count: messages on this session
        self.context = None  #: made once: the CA store costs ~35 ms
        self.pipelining = self.sized = False  #: the session offers PIPELINING, SIZE (EHLO)

    def describe(self):
        s = self.settings.smtp
        how = {"auto": "STARTTLS if offered", "starttls": "STARTTLS", "tls": "TLS",
               "none": "plain"}[s.tls]
        return "Would open SMTP connection (%s) to %s" % (how, s.describe())

    def preload(self):
        """Import smtplib and load the CA store now (before forking workers)."""
        transcript_classes()
        if self.settings.smtp.tls in ("tls", "starttls"):  # "auto" may never need it
            self.tls_context()

    def outer_header(self):
        """SparkPost's X-MSYS-API header over SparkPost SMTP (sparkpost_smtp_header())."""
        if self.settings.smtp is not None and self.settings.smtp.sparkpost:
            return sparkpost_smtp_header(self.settings)
        return b""

    def open(self):
        """Connect, secure and authenticate; return the 'Opened SMTP connection' line.

        Raises DeliveryError (connection 75, a 5xx greeting 69), TlsError (78),
        AuthError (77) or ConfigError (78).
        """
        s = self.settings.smtp
        try:
            self.smtp = self.connect()
            self.secure()
            self.login()
            self.pipelining, self.sized = (self.smtp.has_extn(name)
                                           for name in ("pipelining", "size"))
        except BaseException as exc:
            self.close()
            if isinstance(exc, (SmimeToolError, KeyboardInterrupt)):
                raise
            if getattr(exc, "verify_code", 0) in HOST_MISMATCH:
                raise host_mismatch(s, self.peer_names()) from None
            raise smtp_failure(exc, s) from None
        return "Opened SMTP connection (%s) to %s" % (self.mode, s.describe())

    def connect(self, context=None):
        """Return a connected, greeted smtplib session (implicit TLS for SMTP_TLS=tls)."""
        s = self.settings.smtp
        self.count, self.mode = 0, "plain"  # a new connection is in clear until TLS says not
        plain, secure = transcript_classes()
        helo = s.helo or socket.gethostname()  # getfqdn() can stall on reverse DNS
        log = self.events.transcript if self.settings.verbose else None
        if s.tls == "tls":
            self.mode = "TLS"
            smtp = secure(s.host, s.port, local_hostname=helo, timeout=s.timeout,
                          context=context or self.tls_context(), log=log)
        else:
            smtp = plain(s.host, s.port, local_hostname=helo, timeout=s.timeout, log=log)
        smtp.ehlo()
        return smtp

    def secure(self):
        """STARTTLS (RFC 3207) when asked, or offered in auto mode."""
        s, smtp = self.settings.smtp, self.smtp
        if s.tls not in ("auto", "starttls"):
            return
        if smtp.has_extn("starttls"):
            smtp.starttls(context=self.tls_context())
            smtp.ehlo()
            self.mode = "STARTTLS"
        elif s.tls == "starttls":
            raise ConfigError("%s:%d does not offer STARTTLS but SMTP_TLS=starttls requires it"
                              % (s.host, s.port))

    def login(self):
        """AUTH (RFC 4954), only over TLS: credentials never travel in clear."""
        s, smtp = self.settings.smtp, self.smtp
        if not s.user:
            return
        if self.mode == "plain":
            raise ConfigError("refusing to send SMTP_USER/SMTP_PASSWORD over an unencrypted "
                              "connection to %s:%d (no TLS): use SMTP_TLS=starttls or tls, or "
                              "unset the credentials for an internal MTA" % (s.host, s.port))
        if not smtp.has_extn("auth"):
            raise ConfigError("%s:%d does not offer AUTH: unset SMTP_USER/SMTP_PASSWORD or use "
                              "the submission port (587)" % (s.host, s.port))
        smtp.login(s.user, s.password)

    def tls_context(self):
        """Return the SSLContext verifying certificate and host name (unless
        SMTP_TLS_VERIFY=0), made once for every connection of this back end."""
        import ssl
        if self.context is None:
            s = self.settings.smtp
            self.context = ssl.create_default_context(cafile=s.cafile or None)
            if not s.verify:
                self.context.check_hostname = False
                self.context.verify_mode = ssl.CERT_NONE
        return self.context

    def peer_names(self):
        """Return the names the server's certificate carries, or [] if unknown.

        Read over a second connection that checks the certificate chain but not
        the name, and goes no further than TLS: no credentials, no message.
        """
        import ssl
        s = self.settings.smtp
        context = ssl.create_default_context(cafile=s.cafile or None)
        context.check_hostname = False
        try:
            self.smtp = self.connect(context)
            if s.tls != "tls":
                self.smtp.starttls(context=context)
            cert = self.smtp.sock.getpeercert()
        except Exception:  # noqa: BLE001 - only an explanation is at stake
            return []
        finally:
            self.close()
        names = [value for kind, value in cert.get("subjectAltName", ())
                 if kind in ("DNS", "IP Address")]
        return names or [value for rdn in cert.get("subject", ()) for kind, value in rdn
                         if kind == "commonName"]

    # -- the mail transaction ------------------------------------------------------

    def deliver(self, jobs, halted):
        """Yield one Outcome per Job, in order; stop after one that halts, or at once
        when halted() turns true (messages built ahead are then not sent).

        MAIL, RCPT for each recipient and DATA (RFC 5321 3.3) keeping the
        end-of-DATA reply.  With PIPELINING the envelope goes in one write and,
        as RFC 2920 3.1 allows the message content to open a command group,
        each message's final dot goes out in the same write as the next
        message's envelope; the message after that is built while the server
        answers (more of them, up to BUILT_AHEAD, while it is slow to answer).  Sending
        one message is the same code with one Job.
        """
        queue = JobQueue(jobs)
        job, pipelined = queue.take(), False  # pipelined: its envelope went out behind a dot
        while job is not None:
            if job.failure:
                outcome, following = failed_build(job), None
            else:
                outcome, following = self.transaction(job, pipelined, queue)
            yield outcome
            if outcome.status == "halt" or halted():
                if following is not None:  # its DATA may be open: only a drop cancels it
                    self.drop()
                return
            job, pipelined = (following, True) if following is not None else (queue.take(),
                                                                              False)

    def transaction(self, job, pipelined, queue):
        """Run the mail transaction of *job*; return (its Outcome, the Job whose envelope
        went out behind its dot, or None).

        *pipelined*: the envelope of *job* went out already, behind the last dot.
        """
        following = None
        try:
            if not pipelined:
                self.ready()
                self.send_envelope(job)
            outcome, refused = self.envelope_replies(job)
            if outcome is None:
                following = self.next_to_pipeline(queue)
                then = self.counted_envelope(following) if following is not None else b""
                self.send_data(job.data, then)
                self.build_while_waiting(queue)
                outcome = self.data_reply(job, refused)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an Outcome
            outcome = error_outcome(job, self.failure(exc))
        if following is not None and self.smtp is None:  # its envelope died with the session
            queue.put_back(following)
            following = None
        return outcome, following

    def send_data(self, data, then=b""):
        """Send the message *data* (bytes or Chunks) dot-stuffed, its end of data, then
        *then* (the next envelope): bytes in one write, Chunks as they are made."""
        if isinstance(data, Chunks):
            self.smtp.send_chunks(dot_stuffed(data))
            data, then = b"", b".\r\n" + then  # Chunks of a built message end with CRLF
        self.smtp.send(dot_terminated(data, then) if data else then)

    def build_while_waiting(self, queue):
        """Build the next message, then more (up to BUILT_AHEAD) while the server has not
        answered yet: time spent waiting for a busy server goes into useful work."""
        while len(queue) < BUILT_AHEAD:
            if len(queue) and self.answered():
                return
            if not queue.build():
                return

    def answered(self):
        """Return True when the server's answer is here: decrypted already by TLS, or
        waiting on the socket."""
        sock = self.smtp.sock
        if self.mode != "plain" and sock.pending():
            return True
        return bool(select.select([sock], [], [], 0)[0])

    def ready(self):
        """Open a session if there is none, a new one after MESSAGES_PER_CONNECTION."""
        if self.smtp is not None and self.count >= MESSAGES_PER_CONNECTION:
            self.close()
        if self.smtp is None:
            self.events.session(self.open())

    def next_to_pipeline(self, queue):
        """Return the next good Job to send behind this message's dot, or None."""
        if not self.pipelining or self.count >= MESSAGES_PER_CONNECTION:
            return None
        following = queue.take()
        if following is not None and following.failure:
            queue.put_back(following)
            return None
        return following

    def envelope(self, job):
        """Return MAIL FROM, one RCPT TO per recipient and DATA as one command group."""
        return ("\r\n".join(self.commands(job)) + "\r\n").encode("ascii")

    def commands(self, job):
        """Return the envelope's commands: MAIL FROM (with SIZE, RFC 1870, when the
        server offers it), one RCPT TO per recipient, DATA."""
        size = " SIZE=%d" % len(job.data) if self.sized else ""
        return (["MAIL FROM:<%s>%s" % (job.mail_from, size)]
                + ["RCPT TO:<%s>" % r for r in job.recipients] + ["DATA"])

    def counted_envelope(self, job):
        """Return the envelope of *job* (envelope()), counting its transaction as one
        of this session's MESSAGES_PER_CONNECTION."""
        self.count += 1
        return self.envelope(job)

    def send_envelope(self, job):
        """Send the envelope in one group with PIPELINING (RFC 2920); without it the
        commands go one at a time in envelope_replies()."""
        envelope = self.counted_envelope(job)
        if self.pipelining:
            self.smtp.send(envelope)

    def envelope_replies(self, job):
        """Read the replies to MAIL, RCPT... and DATA; return (Outcome, None) when the
        transaction ends there, else (None, refused recipients)."""
        smtp, count = self.smtp, len(job.recipients) + 2  #: MAIL, RCPT..., DATA
        if self.pipelining:
            replies = [smtp.getreply() for _ in range(count)]
        else:
            replies = []
            for command in self.commands(job):
                smtp.send(command + "\r\n")
                replies.append(smtp.getreply())
                if replies[-1][0] >= 400 and command.startswith(("MAIL", "DATA")):
                    break
        (code, text), rcpt_replies = replies[0], replies[1:1 + len(job.recipients)]
        refused = tuple((r, c, decode_reply(t)) for r, (c, t) in zip(job.recipients,
                                                                     rcpt_replies)
                        if c not in (250, 251))
        data_code, data_text = replies[-1] if len(replies) == count else (503, b"")
        if code != 250:
            self.abort_data(data_code)
            return self.reply_outcome(job, "sender refused", code, text), ()
        if len(refused) == len(job.recipients):
            self.abort_data(data_code)
            return refusal(job, (), refused, "", self.settings.smtp), ()
        if data_code != 354:
            self.abort_data(data_code)
            return self.reply_outcome(job, "DATA refused", data_code, data_text), ()
        return None, refused

    def data_reply(self, job, refused):
        """Read the end-of-DATA reply (RFC 5321 4.1.1.4); return the Outcome.  The
        transaction ends with this reply, whatever it is: nothing to reset."""
        return self.data_outcome(job, refused, *self.smtp.getreply())

    def data_outcome(self, job, refused, code, text):
        """Return the Outcome of the end-of-DATA reply *code* *text*."""
        if code != 250:
            return self.reply_outcome(job, "message refused", code, text)
        reply = "%d %s" % (code, decode_reply(text))
        if refused:
            accepted = tuple(r for r in job.recipients if r not in {a for a, _, _ in refused})
            return refusal(job, accepted, refused, reply, self.settings.smtp)
        return Outcome(job, "sent", reply=reply, accepted=job.recipients)

    def abort_data(self, data_code):
        """After a refused MAIL, RCPT or DATA: end a DATA the server accepted anyway
        (a pipelined group goes on), then RSET."""
        if data_code == 354:
            self.smtp.send(b".\r\n")
            self.smtp.getreply()
        self.smtp.rset()

    def reply_outcome(self, job, stage, code, text):
        """Return the Outcome of a failure reply: 4xx temporary, 5xx permanent; a 421
        closes the session, AUTH_CODES halt the run (credentials)."""
        s = self.settings.smtp
        text = decode_reply(text)
        hint = refusal_hint([(code, text)], s)
        detail = "%s by %s:%d: %d %s" % (stage, s.host, s.port, code, text)
        if code == 421:
            self.close()
        if code in AUTH_CODES:
            return Outcome(job, "halt", EX_NOPERM, detail=detail, hint=hint)
        status = "temporary" if 400 <= code < 500 else "permanent"
        return Outcome(job, status, smtp_exit_code(code), detail=detail, hint=hint)

    def failure(self, exc):
        """Return the SmimeToolError for *exc*; the session is closed: its state is unknown."""
        error = exc if isinstance(exc, SmimeToolError) else smtp_failure(
            exc, self.settings.smtp)
        self.close()
        return error

    def drop(self):
        """Close the connection without QUIT: the server discards an open transaction
        (RFC 5321 3.8), so a message whose content has not gone out is not delivered."""
        smtp, self.smtp = self.smtp, None
        if smtp is not None:
            smtp.close()

    def close(self):
        """QUIT politely; ignore a connection that is already gone."""
        smtp, self.smtp = self.smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except Exception:  # noqa: BLE001 - the connection is being dropped anyway
            try:
                smtp.close()
            except Exception:  # noqa: BLE001
                pass

def sparkpost_smtp_header(settings):
    """Return the X-MSYS-API header for SparkPost SMTP: tracking off for signed mail.

    SparkPost rewrites links and adds an open pixel when tracking is on, which
    would break a signature; the header sits in the outer, unsigned header.
    """
    import json
    track = bool(settings.track and not settings.sign_mode)
    value = json.dumps({"options": {"open_tracking": track, "click_tracking": track,
                                    "transactional": not track},
                        "campaign_id": settings.campaign}, separators=(",", ":"))
    return b"X-MSYS-API: " + value.encode("ascii") + b"\r\n"


def refusal(job, accepted, refused, reply, settings):
    """Return the Outcome of recipients refused at RCPT (all, or some: *accepted* got it)."""
    code = min(smtp_exit_code(c) for _, c, _ in refused)  # any 5xx: 69
    what = "some recipients were refused" if accepted else "every recipient was refused"
    return Outcome(job, "refused", code, reply=reply, accepted=accepted, refused=refused,
                   detail=what, hint=refusal_hint([(c, t) for _, c, t in refused], settings))


def decode_reply(text):
    """Return an SMTP reply's text as str."""
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)



def dot_terminated(data, then=b""):
    """Return the message dot-stuffed where a line starts with "." (RFC 5321 4.5.2),
    with its final <CRLF>.<CRLF>, then *then* (the next envelope), as one bytes
    object (one copy of the message; base64 bodies never need stuffing)."""
    data = bytes(data)  # Chunks: made whole (dot_stuffed() sends them as they are made)
    end = b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"
    if data.startswith(b".") or b"\n." in data:
        data = (b"." if data[:1] == b"." else b"") + data.replace(b"\n.", b"\n..")
    return b"".join((data, end, then))


def dot_stuffed(data):
    """Yield the CRLF message *data* (Chunks) in pieces of at most STREAM_BLOCK octets,
    dot-stuffed where a line starts with "." (RFC 5321 4.5.2), also where a line
    starts a chunk; without the end of data."""
    line_start = True
    for piece in slices(data):
        if line_start and piece.startswith(b"."):
            yield b"."
        yield piece.replace(b"\n.", b"\n..") if b"\n." in piece else piece
        line_start = piece.endswith(b"\n")


#: Lines read of one reply of an SMTP server (RFC 5321 4.2.1 sets no bound: Postfix
#: sends a few dozen at most).
MAX_REPLY_LINES = 1000


class ReplyLines:
    """A server's reply stream (the file smtplib reads replies from) allowing *left*
    more lines: past them readline() raises OSError, which smtplib reports as the
    connection lost (SMTPServerDisconnected) after closing it."""

    def __init__(self, stream):
        self.stream, self.left = stream, MAX_REPLY_LINES

    def readline(self, size=-1):
        if self.left <= 0:
            raise OSError("a reply of more than %d lines" % MAX_REPLY_LINES)
        self.left -= 1
        return self.stream.readline(size)

    def close(self):
        self.stream.close()


def transcript_classes():
    """Return (SMTP, SMTP_SSL) subclasses that write a redacted transcript.

    The transcript is redacted by construction: an AUTH command is logged as
    'AUTH <mechanism> ***', every reply to a 334 challenge as '***', and the
    message data as its size only.  smtplib's set_debuglevel() is never used
    (it prints the base64 credentials).
    """
    import ssl
    import smtplib

    class Transcript:
        _challenged = False

        def __init__(self, *args, log=None, **kwargs):
            self.log = log  # set before connecting, so the banner is logged too
            super().__init__(*args, **kwargs)

        def _glyph(self, outgoing):
            tls = isinstance(getattr(self, "sock", None), ssl.SSLSocket)
            return ("~>" if tls else "->") if outgoing else ("<~" if tls else "<-")

        def send(self, s):
            if self.log:
                self.log("%s %s" % (self._glyph(True), self._shown(s)))
            super().send(s)

        def send_chunks(self, chunks):
            """Send message data made as *chunks*; the transcript shows its size only."""
            size = 0
            for chunk in chunks:
                super().send(chunk)
                size += len(chunk)
            if self.log:
                self.log("%s <%d octets of message data>" % (self._glyph(True), size))

        def _shown(self, s):
            if isinstance(s, bytes) and b"\r\n.\r\n" in s:  # a message, maybe the next envelope
                end = s.rfind(b"\r\n.\r\n") + 2
                then = s[end + 3:].decode("ascii", "replace").splitlines()
                return ("\n%s " % self._glyph(True)).join(
                    ["<%d octets of message data>" % end, "."] + then)
            lines = (s.decode("ascii", "replace") if isinstance(s, bytes) else s).splitlines()
            if self._challenged:
                return "***"
            if lines and lines[0][:5].upper() == "AUTH ":
                words = lines[0].split()
                return " ".join(words[:2]) + (" ***" if len(words) > 2 else "")
            return ("\n%s " % self._glyph(True)).join(lines)

        def getreply(self):
            """Read a reply (smtplib's), of at most MAX_REPLY_LINES lines: smtplib bounds
            their length, not their number (a server sending lines without end would
            be read for ever); beyond, SMTPServerDisconnected and the session closed."""
            if self.file is None and self.sock is not None:  # as smtplib would, counted
                self.file = ReplyLines(self.sock.makefile("rb"))
            if isinstance(self.file, ReplyLines):
                self.file.left = MAX_REPLY_LINES
            code, text = super().getreply()
            self._challenged = code == 334
            if self.log:
                for line in text.decode("utf-8", "replace").split("\n"):
                    self.log("%s %d %s" % (self._glyph(False), code, line))
            return code, text

    class SMTP(Transcript, smtplib.SMTP):
        pass

    class SMTPS(Transcript, smtplib.SMTP_SSL):
        pass

    return SMTP, SMTPS


def refusal_hint(replies, settings):
    """Return a one-line hint for the classic causes of refusal *replies*, or ''."""
    for code, text in replies:
        if code in AUTH_CODES and code != 534:  # 534: a mechanism too weak, not the password
            return "check SMTP_USER and SMTP_PASSWORD"
        if code >= 550 and "relay" in text.lower():
            if settings.port == 25 and not settings.user:
                return ("the server does not relay for you on port 25: set SMTP_PORT=587 and "
                        "SMTP_USER/SMTP_PASSWORD")
            return "the server does not relay for this sender or these recipients"
    return ""


def host_mismatch(settings, names):
    """Return the TlsError (78) for a certificate issued to other *names* (RFC 6125)."""
    where = "%s:%d" % (settings.host, settings.port)
    if not names:
        return TlsError("TLS certificate of %s is for another name than %s; connect by a "
                        "name it carries (SMTP_HOST)" % (where, settings.host))
    return TlsError("TLS certificate of %s is for another name: it carries %s, not %s; set "
                    "SMTP_HOST to one of those" % (where, ", ".join(names), settings.host))


def smtp_failure(exc, settings):
    """Translate an smtplib/socket/ssl exception into the SmimeToolError to report."""
    import ssl
    import smtplib
    where = "%s:%d" % (settings.host, settings.port)
    if isinstance(exc, smtplib.SMTPResponseException):
        text, code = decode_reply(exc.smtp_error), exc.smtp_code
        stage = {smtplib.SMTPAuthenticationError: "authentication refused",
                 smtplib.SMTPConnectError: "connection refused"}.get(type(exc), "refused")
        error = (AuthError if code in AUTH_CODES else DeliveryError)(
            "%s by %s: %d %s" % (stage, where, code, text))
        if isinstance(error, DeliveryError):
            error.exit_code = smtp_exit_code(code)
        error.hint = refusal_hint([(code, text)], settings)
        return error
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TlsError("TLS certificate of %s not trusted: %s; set SMTP_CAFILE to your "
                        "MTA's CA bundle" % (where, exc.verify_message or exc.reason))
    if isinstance(exc, ssl.SSLError):
        return TlsError("TLS with %s failed: %s" % (where, exc.reason or exc))
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return ConfigError("%s: %s" % (where, exc))
    if type(exc) is smtplib.SMTPException:  # "No suitable authentication method found."
        return ConfigError("%s: %s (the server offers no AUTH mechanism smtplib can use: "
                           "PLAIN, LOGIN or CRAM-MD5)" % (where, exc))
    if isinstance(exc, (socket.timeout, TimeoutError)) or (
            isinstance(exc, smtplib.SMTPServerDisconnected)
            and isinstance(exc.__context__, (socket.timeout, TimeoutError))):
        return DeliveryError("no answer from %s within %g seconds (SMTP_TIMEOUT)"
                             % (where, settings.timeout))
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return DeliveryError("%s closed the connection: %s" % (where, exc or "unexpectedly"))
    if isinstance(exc, OSError):
        return DeliveryError("cannot connect to %s: %s" % (where, exc.strerror or exc))
    return DeliveryError("SMTP with %s failed: %s" % (where, exc))


# -- SparkPost transmissions API ---------------------------------------------------

class ApiBackend(Backend):
    """Send through the SparkPost transmissions API (POST /api/v1/transmissions), one
    keep-alive HTTP session; requests is imported here only, so other modes start fast."""

    def __init__(self, settings, events):
        super().__init__(settings, events)
        self.session = None
        self.requests = require("requests")

    def describe(self):
        return "Would open connection to %s (API key ***)" % self.settings.api.base_url

    def check(self, msg, data):
        """SparkPost's API rules (api_rules())."""
        return api_rules(msg, data, self.settings)

    def open(self):
        """Create the keep-alive HTTP session; return the 'Opened connection' line."""
        self.session = self.requests.Session()
        self.session.headers.update({"Authorization": self.settings.api.key,
                                     "Content-Type": "application/json",
                                     "User-Agent": "sparkpostSMIME/" + __version__})
        return "Opened connection to %s" % self.settings.api.base_url

    def attempt(self, job):
        """POST one transmission; return its Outcome (api_outcome())."""
        if self.session is None:
            self.events.session(self.open())
        url = self.settings.api.base_url + "/transmissions"
        body = transmission_body(job, self.settings)
        log = self.events.transcript if self.settings.verbose else None
        if log:
            log("-> POST %s (%d octets, Authorization: ***)" % (url, len(body)))
        try:
            resp = self.session.post(url, data=body, timeout=self.settings.api.timeout)
        except self.requests.exceptions.SSLError as exc:
            return Outcome(job, "halt", EX_CONFIG,
                           detail="TLS with %s failed: %s" % (url, first_line(exc)))
        except self.requests.exceptions.RequestException as exc:
            return Outcome(job, "temporary", EX_TEMPFAIL,
                           detail="cannot reach %s: %s" % (url, first_line(exc)))
        if log:
            log("<- %d %s %s" % (resp.status_code, resp.reason, resp.text[:500]))
        return api_outcome(job, resp)

    def close(self):
        session, self.session = self.session, None
        if session is not None:
            session.close()

def api_rules(msg, data, settings):
    """Refuse a message SparkPost's API would refuse; return (topic, warning) notes.

    Raises MessageError for content over MAX_RFC822 octets.  SparkPost substitutes
    {{...}} in the top-level header whatever perform_substitutions says.
    """
    if len(data) > MAX_RFC822:
        raise MessageError("%s: the built message is %d octets; SparkPost's API accepts at "
                           "most %d (20 MB) of RFC 822 content: send it with --send_smtp"
                           % (msg.source, len(data), MAX_RFC822))
    if not (settings.sign_mode or settings.encrypt):
        return ()
    return tuple(("substitution", "%s: the %s header holds '{{': SparkPost substitutes {{...}} "
                  "in the outer header of every message, signed or not"
                  % (msg.source, f.raw.split(b":", 1)[0].decode("ascii")))
                 for f in msg.outer if b"{{" in f.raw and f.name != "bcc")[:1]



def transmission_body(job, settings):
    """Return the JSON request body (a bytearray) of a transmission for *job*."""
    import json
    msg = job.msg
    names = {}
    for header in RECIPIENT_FIELDS:
        names.update(display_names(msg, header))
    header_to = visible_to(msg)
    recipients = []
    for address in job.recipients:
        entry = {"email": address, "header_to": header_to}
        if names.get(address):
            entry["name"] = names[address]
        recipients.append({"address": entry})
    track = bool(settings.track)
    options = {"open_tracking": track, "click_tracking": track, "transactional": not track}
    if settings.sign_mode or settings.encrypt:  # {{...}} in a signed text part would break it
        options["perform_substitutions"] = False
    body = {"options": options,
            "campaign_id": settings.campaign,
            "recipients": recipients,
            "content": {"email_rfc822": None}}
    text = json.dumps(body)  # ... "email_rfc822": null}}: the message goes in place of null
    out = bytearray(text[:-6].encode("ascii") + b'"')
    for chunk in slices(job.data):  # one copy of the message: JSON-escaped a slice at a time
        out += json.dumps(chunk.decode("ascii"))[1:-1].encode("ascii")
    out += b'"}}'
    return out


def visible_to(msg):
    """Return the message's To header as it appears in the output (7-bit, unfolded)."""
    for f in msg.outer:
        if f.name == "to":
            return Field("to", safe_field(f)).value.decode("ascii")
    return ""


def api_outcome(job, resp):
    """Return the Outcome of SparkPost's answer *resp*: 2xx sent (its id and counts);
    401/403 halt (77); 420 halts (75: the sending limit, no retry in this run);
    429/5xx temporary (Retry-After kept); other 4xx permanent (69)."""
    try:
        data = resp.json()
    except ValueError:
        data = {}
    code = resp.status_code
    if 200 <= code < 300:
        results = data.get("results") if isinstance(data, dict) else None
        results = results if isinstance(results, dict) else {}
        accepted = results.get("total_accepted_recipients", "?")
        rejected = results.get("total_rejected_recipients", 0)
        reply = "id %s, accepted %s, rejected %s" % (results.get("id", "?"), accepted,
                                                     rejected)
        if isinstance(rejected, int) and rejected > 0:  # which ones: SparkPost's events say
            return Outcome(job, "permanent", EX_UNAVAILABLE, reply=reply,
                           accepted=job.recipients if accepted not in (0, "?") else (),
                           detail="SparkPost rejected %d recipient(s) of the transmission "
                                  "(%s); its message events name them" % (rejected, reply))
        return Outcome(job, "sent", reply=reply, accepted=job.recipients, shown=reply)
    text = "SparkPost API answered %d %s%s" % (code, resp.reason or "", api_errors(data))
    if code in (401, 403):
        return Outcome(job, "halt", EX_NOPERM, detail=text,
                       hint="check SPARKPOST_API_KEY and its permissions "
                            "(Transmissions: Read/Write)")
    if code == 420:
        return Outcome(job, "halt", EX_TEMPFAIL, detail=text,
                       hint="SparkPost's sending limit for this account is exceeded (420): "
                            "nothing more is sent in this run; try again once the limit "
                            "resets, or ask SparkPost to raise it")
    if code == 429 or code >= 500:
        return Outcome(job, "temporary", EX_TEMPFAIL, detail=text,
                       retry_after=retry_after(resp.headers.get("Retry-After", "")))
    return Outcome(job, "permanent", EX_UNAVAILABLE, detail=text)


def api_errors(data):
    """Return ': message (description) [code]; ...' from SparkPost's errors array."""
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, list) or not errors:
        return ""
    parts = []
    for e in errors[:5]:
        if isinstance(e, dict):
            text = str(e.get("message", ""))
            if e.get("description"):
                text += " (%s)" % e["description"]
            if e.get("code"):
                text += " [%s]" % e["code"]
            parts.append(text)
    return ": " + "; ".join(parts)


def retry_after(value):
    """Return seconds from a Retry-After header (seconds form only; RFC 9110 10.2.3)."""
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0


#: The back ends by name; a dry run wraps one of them.
BACKENDS = {"smtp": SmtpBackend, "api": ApiBackend, "file": FileBackend}


def make_backend(settings, events):
    """Return the back end the settings ask for (not connected yet)."""
    backend = BACKENDS[settings.send or "file"](settings, events)
    return DryRun(backend) if settings.dry_run else backend


###############################################################################
# Batch: many messages, several sessions, nothing lost ########################
###############################################################################
# One worker loop builds, delivers and retries messages over one back end and
# turns each message's outcomes into one Result; a Recorder archives, journals,
# counts and prints it.  With --jobs N, N forked worker processes run that loop
# side by side (cryptography holds the GIL while it signs and encrypts, so
# threads would not use a second core), each with its own session and Recorder;
# the main process adds up their counts, which come up a Channel.

class Result(NamedTuple):
    """The final word on one message, as printed, journaled and counted."""
    source: str
    copy: int
    status: str                  #: "sent", "written", "partial" or "failed"
    code: int
    mail_from: str = ""
    recipients: tuple = ()
    accepted: tuple = ()
    refused: tuple = ()          #: ((address, reply code, reply text), ...)
    reply: str = ""
    attempts: int = 0
    duration: float = 0.0
    errors: tuple = ()           #: lines for stderr: reasons, refusals, hints
    lines: tuple = ()            #: more report lines (a dry run's envelope)
    halt: bool = False           #: the run must stop taking messages
    shown: str = ""              #: the back end's words for the OK line (Outcome.shown)

    def record(self):
        """Return the journal entry (a JSON-ready dict)."""
        entry = {"input": self.source, "status": self.status, "exit_code": self.code,
                 "recipients": list(self.recipients), "accepted": list(self.accepted),
                 "reply": self.reply,
                 "attempts": self.attempts, "duration": round(self.duration, 4),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.copy:
            entry["copy"] = self.copy
        return entry


def retry_policy(outcome, attempts, waited, retries, first_delay):
    """Return the seconds to wait before trying *outcome*'s message again, or None.

    A temporary failure, or recipients refused with 4xx, is tried again up to
    *retries* times: *first_delay*, doubled each time, or the server's
    Retry-After when longer; at most MAX_RETRY_WAIT per wait and MAX_TOTAL_WAIT
    in all (*waited* so far).  A message the server accepted is never sent again.
    """
    if outcome.status == "refused":
        if not any(400 <= code < 500 for _, code, _ in outcome.refused):
            return None
    elif outcome.status != "temporary":
        return None
    if attempts > retries:
        return None
    delay = min(max(first_delay * 2 ** (attempts - 1), outcome.retry_after), MAX_RETRY_WAIT)
    return delay if waited + delay <= MAX_TOTAL_WAIT else None


class Tally:
    """One message's attempts, added up into its Result."""

    def __init__(self, job):
        self.job, self.accepted, self.refused, self.errors = job, [], {}, []
        self.attempts, self.waited, self.last, self.reply = 0, 0.0, None, ""

    def add(self, outcome):
        self.attempts += 1
        self.last, self.reply = outcome, outcome.reply or self.reply
        self.accepted += [a for a in outcome.accepted if a not in self.accepted]
        for address, code, text in outcome.refused:
            self.refused[address] = (code, text)

    def pending(self):
        """Return the recipients still worth trying: not accepted, not refused with 5xx."""
        return tuple(a for a in self.job.recipients
                     if a not in self.accepted and self.refused.get(a, (400,))[0] < 500)

    def retrying(self, delay, retries):
        """Note a retry in *delay* seconds; return the Job to try (to the recipients left)."""
        self.waited += delay
        self.errors.append("%s; retrying in %g s (attempt %d of %d)" % (
            self.last.detail, delay, self.attempts + 1, retries + 1))
        return self.job._replace(recipients=self.pending())

    def result(self):
        """Return the Result: sent (or written) to all, partial, or failed."""
        job, last = self.job, self.last
        failed = [a for a in job.recipients if a not in self.accepted]
        errors = list(self.errors) + ["refused %s: %d %s" % (a, self.refused[a][0],
                                                            self.refused[a][1])
                                      for a in failed if a in self.refused]
        if last.status not in ("sent", "written", "refused") and last.detail:
            errors.append(last.detail)
        if last.hint:
            errors.append("hint: " + last.hint)
        if last.status == "written" or (last.status == "sent" and not failed):
            status, code = last.status, EX_OK
        else:  # a refusal outlives a later success to the other recipients
            status = "partial" if self.accepted else "failed"
            refusals = [smtp_exit_code(self.refused[a][0]) for a in failed if a in self.refused]
            code = (min(refusals) if refusals and last.status in ("sent", "refused")
                    else last.code or EX_TEMPFAIL)
        return Result(job.source, job.copy, status, code, job.mail_from, job.recipients,
                      tuple(self.accepted),
                      tuple((a,) + self.refused[a] for a in failed if a in self.refused),
                      self.reply, self.attempts, time.perf_counter() - job.started,
                      tuple(errors), last.lines, last.status == "halt", last.shown)


def prefetch(build, items):
    """Yield build(item) for each work item; a message that cannot be built becomes a
    Job carrying its failure (exit code, reason), whatever went wrong: a failure of
    building is never blamed on the delivery of another message."""
    for item in items:
        try:
            yield build(item)
        except Exception as exc:  # noqa: BLE001 - a bug: this message fails, not the batch
            yield failed_job(item, exc)


def failed_job(item, error):
    """Return the Job of work *item* whose building raised *error*: its exit code and
    reason, or for anything but a SmimeToolError (a bug) EX_SOFTWARE."""
    if isinstance(error, SmimeToolError):
        return Job(item[0], item[1], started=time.perf_counter(),
                   failure=(error.exit_code, str(error)))
    return Job(item[0], item[1], started=time.perf_counter(), failure=(
        EX_SOFTWARE, "%s: internal error while building: %s: %s"
        % (item[0], type(error).__name__, error)))


def work(settings, backend, jobs, record, halted):
    """The worker loop: deliver *jobs* (an iterator of Jobs, built as pulled) over
    *backend*, retry by retry_policy(), hand each message's Result to *record* (a
    Recorder: its pending rows are committed before waiting for a retry).

    Retries wait in a queue while other messages go on.  Stops taking messages
    once halted() is true; messages still waiting for a retry then get their
    last outcome as final.
    """
    tallies, waiting, order = {}, [], itertools.count()  #: order: ties in the heap

    def due():  # never waits: the back end may be in the middle of a transaction
        while waiting and not halted() and waiting[0][0] <= time.monotonic():
            yield heapq.heappop(waiting)[2]

    def feed():
        for job in jobs:
            yield from due()
            if halted():
                return
            yield job
        yield from due()

    while True:
        for outcome in backend.deliver(feed(), halted):
            key = (outcome.job.source, outcome.job.copy, outcome.job.started)
            tally = tallies.setdefault(key, Tally(outcome.job))
            tally.add(outcome)
            delay = retry_policy(outcome, tally.attempts, tally.waited, settings.retries,
                                 settings.retry_delay)
            if delay is not None and not halted() and tally.pending():
                retry = tally.retrying(delay, settings.retries)
                heapq.heappush(waiting, (time.monotonic() + delay, next(order), retry))
                continue
            del tallies[key]
            record(tally.result(), outcome.job)
        if not waiting or halted():
            break
        record.commit()  # what is done is reported before waiting for a retry
        while not halted() and waiting[0][0] > time.monotonic():  # between transactions
            time.sleep(max(0.0, min(0.2, waiting[0][0] - time.monotonic())))
    for tally in tallies.values():
        record(tally.result(), tally.job)


class Journal:
    """--results FILE: one JSON object per message, appended and synced.

    write() keeps a row pending; commit() appends the pending rows in one write
    and syncs them (one fdatasync for the group).  A
    last line cut short by a crash is ended before the first new row, so no row
    is ever glued to it.  Raises OutputError: 73 when the file cannot be opened,
    74 when a write fails.
    """

    def __init__(self, path):
        self.path, self.fd = path, None
        self.rows, self.started = [], 0.0  #: pending rows; time.monotonic() of the first
        if not path:
            return
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self.fd).st_size
            if size and os.pread(self.fd, 1, size - 1) != b"\n":
                self.append(b"\n")
        except OutputError:
            raise
        except OSError as exc:
            raise OutputError("--results %s: cannot open: %s" % (path, exc.strerror or exc),
                              EX_CANTCREAT)

    def append(self, data):
        """Write *data* in one write, synced; raise OutputError (74) when it fails,
        after cutting the file back to where it was (no half row is left).

        Forked workers append to the same file: a lock makes each row's write and
        any cut back one step, so that no worker cuts another's row.
        """
        import fcntl
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(self.fd).st_size
                try:
                    if os.write(self.fd, data) != len(data):
                        raise OSError(28, "No space left on device")
                except OSError:
                    os.ftruncate(self.fd, size)
                    raise
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            sync_data(self.fd)
        except OSError as exc:
            raise OutputError("--results %s: cannot write: %s" % (self.path,
                                                                  exc.strerror or exc))

    def write(self, result, digest=""):
        """Keep *result*'s row pending until commit(): Result.record(), with the input's
        resolved path and the *digest* of its content (for --resume)."""
        if self.fd is not None:
            import json
            if not self.rows:
                self.started = time.monotonic()
            entry = result.record()
            if result.source != "-":
                entry["path"] = os.path.realpath(result.source)
            if digest:
                entry["sha256"] = digest
            self.rows.append((json.dumps(entry, sort_keys=True) + "\n").encode())

    def full(self):
        """Return True once GROUP_ROWS rows are pending, or the first has waited
        GROUP_SECONDS; always without a file (no row to wait for)."""
        return self.fd is None or bool(self.rows) and (
            len(self.rows) >= GROUP_ROWS or time.monotonic() - self.started >= GROUP_SECONDS)

    def commit(self):
        """Append and sync the pending rows; none stays pending, even when that fails."""
        rows, self.rows = self.rows, []
        if rows:
            self.append(b"".join(rows))

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def already_sent(path):
    """Return {(resolved input path, copy): (recipients that got it, input digest)} from
    journal *path* (for --resume): recipients None for a message sent to all its
    recipients, the accepted ones of a partial one; the digest "" when the row has none.

    Inputs are known by their resolved path (the row's "path", else its "input"
    resolved here), so that another spelling of the same file matches.  Lines that
    are not JSON (a line torn by a crash) are skipped; a later row of the same
    message wins.
    """
    import json
    done = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(entry, dict) or not isinstance(entry.get("input"), str):
                    continue
                key = (entry.get("path") or os.path.realpath(entry["input"]),
                       entry.get("copy", 0))
                served, _ = done.get(key, ((), ""))
                if entry.get("status") == "sent":
                    served = None
                elif entry.get("status") == "partial" and served is not None:
                    served = frozenset(served) | frozenset(entry.get("accepted") or ())
                else:
                    continue
                done[key] = (served, str(entry.get("sha256") or ""))
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InputError("--results %s: cannot read: %s" % (path, exc.strerror or exc))
    return done


class Archive:
    """A Maildir (tmp/, new/, cur/) keeping the exact bytes of every message sent.

    Raises OutputError: 73 when the Maildir cannot be made, 74 when a message
    cannot be stored (its partial file removed).
    """

    def __init__(self, directory):
        self.directory, self.count = directory, 0
        try:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(directory, sub), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise OutputError("--archive %s: cannot create the Maildir: %s"
                              % (directory, exc.strerror or exc), EX_CANTCREAT)

    def store(self, data):
        """Write *data* to tmp/, then rename it into new/ (the Maildir protocol), with
        write_atomically()."""
        self.count += 1
        name = "%d.P%dQ%d.%s" % (time.time(), os.getpid(), self.count,
                                 socket.gethostname().replace("/", "_"))
        try:
            write_atomically(os.path.join(self.directory, "new", name), data, 0o600,
                             os.path.join(self.directory, "tmp", name))
        except OutputError as exc:
            raise OutputError("--archive %s: cannot store a message: %s"
                              % (self.directory, exc.reason))


#: Warnings of a run made from a count of messages (see date_at_signing()).
RUN_NOTICES = {
    "date-replaced": "Date replaced by the signing time in %%s: it was more than %d minutes "
                     "from it, or unreadable, and Thunderbird calls a signature not valid when "
                     "the two are over an hour apart (--keep_date keeps the input's Date)"
                     % (DATE_SKEW // 60),
    "date-kept": "--keep_date: the Date of %s is more than an hour from the signing time, or "
                 "unreadable: Thunderbird will show their signature as not valid"}


class Stats:
    """Counts and latencies for the summary line."""

    def __init__(self, total, done="sent"):
        self.total, self.sent, self.failed, self.code = total, 0, 0, EX_OK
        self.done = done  #: what a success is called: "sent", or "written" for files
        self.failed_at = 0.0  #: time.monotonic() of the first failure (sets the exit code)
        self.latencies, self.start = [], time.perf_counter()
        self.notes = {}  #: topic -> [messages, the first one's warning]: see notices()
        self.refused = None  #: the gateway: recipients it refused at RCPT (None: not counted)

    def add(self, res):
        if res.status in ("sent", "written"):
            self.sent += 1
            self.latencies.append(res.duration)
        else:
            self.failed += 1
            self.fault(res.code)

    def fault(self, code):
        """Note a failure's exit code: the first one wins, but a fault on our own side
        (73, 74: output, journal, archive) wins over any other."""
        now = time.monotonic()
        if not self.code or rank(code, now) > rank(self.code, self.failed_at):
            self.code, self.failed_at = code, now

    def note(self, topic, text, count=1):
        """Count a message's (topic, warning) note; the first warning of a topic is kept."""
        self.notes.setdefault(topic, [0, text])[0] += count

    def merge(self, sent, failed, code, failed_at, latencies, notes, refused=None):
        """Add a worker process's counts; its exit code wins as fault() says, the earliest
        failure's among equals."""
        self.sent, self.failed = self.sent + sent, self.failed + failed
        if refused is not None:
            self.refused = (self.refused or 0) + refused
        self.latencies += latencies
        for topic, (count, text) in notes.items():
            self.note(topic, text, count)
        if code and (not self.code or rank(code, failed_at) > rank(self.code, self.failed_at)):
            self.code, self.failed_at = code, failed_at

    def counts(self):
        """Return this process's counts, as merge() takes them."""
        return (self.sent, self.failed, self.code, self.failed_at, self.latencies, self.notes,
                self.refused)

    def notices(self):
        """Return the run's warnings, one per topic of the messages' notes: the first
        message's warning and how many more had it (a count for the Date topics)."""
        notices = []
        for topic, (count, text) in self.notes.items():
            if topic in RUN_NOTICES:
                notices.append(RUN_NOTICES[topic] % plural(count))
            else:
                notices.append(text + (" (%s in all)" % plural(count) if count > 1 else ""))
        return notices

    def summary(self):
        """Return 'N sent, M failed[, K not sent][, R recipients refused] in S seconds (R
        msg/s); latency ...'."""
        wall = time.perf_counter() - self.start
        text = "Summary: %d %s, %d failed" % (self.sent, self.done, self.failed)
        left = self.total - self.sent - self.failed
        if left:
            text += ", %d not %s" % (left, self.done)
        if self.refused is not None:
            text += ", %s refused" % plural(self.refused, "recipient")
        text += " in %.3f seconds (%.1f msg/s)" % (wall, self.sent / wall if wall else 0.0)
        if self.latencies:
            lat = sorted(self.latencies)
            pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
            text += "; latency min %.1f ms, median %.1f ms, p95 %.1f ms, max %.1f ms" % (
                lat[0] * 1000, pick(0.5) * 1000, pick(0.95) * 1000, lat[-1] * 1000)
        return text


def plural(count, noun="message"):
    """Return '1 message', '2 messages'."""
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


def rank(code, when):
    """Order exit codes for a batch: faults on our own side (73, 74) first, then the
    earliest failure."""
    return (code in (EX_CANTCREAT, EX_IOERR), -when)


class Recorder:
    """Where every final Result goes, in order: the archive (for a delivered message),
    the journal, the counts, the report (lines or a progress bar).

    An archive or journal write that fails stops the run at once (exit 74): that
    message, and every one delivered after it, is named on stderr as delivered
    but not recorded.  *forward*: a worker's way to pass Results up to the main
    process (which then prints them) instead of printing them itself.

    *grouped* (batches that write files, whose own group commits come first):
    journal rows are committed in groups (Journal.full(), a halt, the end of the
    run), and the Results of a group are counted and reported only once their
    rows are on disk.  A run that delivers (--send_smtp, --send_api, the gateway)
    commits each row before the next message can be delivered: after a crash,
    power loss or a full disk, at most one delivered message per worker is not in
    the journal (and --resume would send it again).
    """

    def __init__(self, settings, reporter, stats, halt, forward=None, grouped=False):
        self.settings, self.reporter, self.stats, self.halt = settings, reporter, stats, halt
        self.journal = Journal("" if settings.dry_run else settings.results)  #: --resume reads it
        self.forward, self.broken = forward, ""
        self.grouped = grouped and not (settings.send and not settings.dry_run)
        self.waiting = []  #: [(Result, delivered)] until committed
        self.archive = Archive(settings.archive) if settings.archive else None
        self.progress = (sys.stderr.isatty() and stats.total >= PROGRESS_MIN
                         and not settings.verbose)
        self.lines = bool(settings.send) and not (self.progress and sys.stdout.isatty())

    def __call__(self, res, job):
        for topic, text in job.notes:
            if topic is None:  # about this message alone: now
                self.reporter.warn(text)
            elif res.status != "failed":  # about what went out: once, for the whole run
                self.stats.note(topic, text)
        delivered = bool(res.accepted) and self.settings.send and not self.settings.dry_run
        if delivered and self.archive and not self.broken:
            self.keep(lambda: self.archive.store(job.data))
        if self.broken:
            self.commit()  # the rows of the messages before the failure are still written
            self.report(res, delivered)
            return
        self.journal.write(res, job.digest)
        self.waiting.append((res, delivered))
        if not self.grouped or res.halt or self.journal.full():
            self.commit()

    def commit(self):
        """Commit the pending journal rows, then report their Results."""
        waiting, self.waiting = self.waiting, []
        recorded = self.keep(self.journal.commit)
        for res, delivered in waiting:
            self.report(res, delivered and not recorded)

    def report(self, res, unrecorded):
        """Hand *res* on (shown, or forwarded to the main process); halt if it says so.
        *unrecorded*: it was delivered but could not be recorded (named on stderr)."""
        if unrecorded:
            self.reporter.warn("delivered but not recorded (%s): %s%s" % (
                self.broken, res.source, " (copy %d)" % res.copy if self.settings.repeat > 1
                else ""))
        if self.forward is not None:
            self.forward(res)
        else:
            self.show(res)
        if res.halt:
            self.halt()

    def keep(self, write):
        """Run an archive or journal *write*; return True, or on failure stop the run,
        remember why and return False."""
        try:
            write()
            return True
        except OutputError as exc:
            self.broken = str(exc)
            self.reporter.warn("%s: stopping; every message delivered from here on is named "
                               "below" % exc)
            self.stats.fault(exc.exit_code)
            self.halt()
            return False

    def show(self, res):
        """Count *res* and print it: report lines (or the progress bar), errors."""
        self.stats.add(res)
        lines = report_lines(res, self.settings) if self.settings.send else []
        if lines and (self.lines or res.status not in ("sent", "written")):
            try:
                self.reporter.say("\n".join(lines))
            except BrokenPipeError:  # nobody reads the report: stop, say so on stderr
                self.reporter.stdout_closed()
                if not self.broken:
                    self.broken = "standard output was closed"
                    self.reporter.warn("standard output was closed: stopping (the messages "
                                       "left are not sent)")
                    self.stats.fault(EX_IOERR)
                    self.halt()
        for line in res.errors:
            self.reporter.warn(line)
        if self.progress:
            self.bar()

    def bar(self):
        done, total = self.stats.sent + self.stats.failed, self.stats.total
        filled = int(30 * done / total) if total else 30
        sys.stderr.write("\r[%s%s] %d/%d, %d failed " % ("#" * filled, "." * (30 - filled),
                                                          done, total, self.stats.failed))
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self):
        """Commit what is pending, then close the journal."""
        self.commit()
        self.journal.close()


def report_lines(res, settings):
    """Return the stdout lines of a Result: 'Sending ...' then OK, PARTIAL or FAILED."""
    lines = ["Sending %s\tFrom: %s\tTo: %s" % (res.source, res.mail_from,
                                               ", ".join(res.recipients))]
    took = "%.3f" % res.duration
    if res.status == "sent" and settings.dry_run:
        lines += ["OK - in %s seconds (dry run: nothing was sent)" % took] + list(res.lines)
    elif res.status == "sent":
        lines.append("OK - in %s seconds%s" % (took, ", " + res.shown if res.shown else ""))
    elif res.status == "partial":
        lines.append("PARTIAL - in %s seconds: accepted %s; refused %s" % (
            took, ", ".join(res.accepted), ", ".join(a for a in res.recipients
                                                     if a not in res.accepted)))
    elif res.refused and len(res.refused) == len(res.recipients):
        lines.append("FAILED - in %s seconds: every recipient was refused" % took)
    else:
        lines.append("FAILED - in %s seconds" % took)
    return lines if res.recipients else []  # a message that could not be built: stderr only


class Stop:
    """Ctrl-C (or SIGTERM): the first one stops new work (in-flight messages finish), the
    second aborts.

    *halt*: the one-byte flag shared with forked workers (non-zero: take no new
    message); *warn*: the reporter's.
    """

    def __init__(self, halt, warn, batch=True):
        self.halt, self.warn, self.requested, self.previous = halt, warn, False, None
        self.batch = batch  #: one message: plain KeyboardInterrupt

    def __enter__(self):
        if self.batch:
            self.previous = signal.signal(signal.SIGINT, self.handler)
            self.terminate = signal.signal(signal.SIGTERM, self.handler)  # kill: as Ctrl-C
        return self

    def handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.halt[0] = 1
        if signum == signal.SIGTERM:
            self.warn("SIGTERM: finishing the messages in flight (SIGTERM or Ctrl-C again "
                      "to abort)")
        else:
            self.warn("interrupted: finishing the messages in flight (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            signal.signal(signal.SIGTERM, self.terminate)


class Channel:
    """The pipe between a forked worker and the main process, used on both ends:
    send() frames plain data (tuples, lists, str, numbers) with marshal behind a
    4-octet length; receive() gives back the frames completed by a chunk read."""

    def __init__(self, fd, pid=0):
        self.fd, self.pid, self.buffer, self.counted = fd, pid, b"", False

    def send(self, message):
        data = marshal.dumps(message)
        data = len(data).to_bytes(4, "big") + data
        while data:
            data = data[os.write(self.fd, data):]

    def receive(self, chunk):
        buf, messages = self.buffer + chunk, []
        while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
            size = int.from_bytes(buf[:4], "big")
            messages.append(marshal.loads(buf[4:4 + size]))
            buf = buf[4 + size:]
        self.buffer = buf
        return messages


def expand_inputs(paths):
    """Return *paths* with each directory replaced by its *.eml files (sorted)."""
    out = []
    for path in paths:
        if path != "-" and os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if n.lower().endswith(".eml") and os.path.isfile(os.path.join(path, n)))
            if not found:
                raise InputError("%s: directory holds no .eml files" % path)
            out.extend(found)
        else:
            out.append(path)
    return out


def work_items(settings, reporter):
    """Return ([(path, copy)], {item: recipients already served}): every input, --repeat
    times, less what --resume skips (a partly sent message goes to the others only).

    Raises InputError for an input that is missing or an empty directory,
    UsageError when several messages would be written and -o is no directory, or
    two inputs to the same file of it.
    """
    paths = expand_inputs(settings.inputs)
    items = [(path, copy) for path in paths for copy in range(settings.repeat)]
    if len(items) > 1:
        several_outputs(settings)
        distinct_outputs(settings, paths)
    if not settings.resume:
        return items, {}
    done = already_sent(settings.results)
    kept, served, changed = [], {}, []
    for item in items:
        entry = done.get((os.path.realpath(item[0]), item[1]))
        if entry is None:
            kept.append(item)
        elif entry[1] and entry[1] != input_digest(item[0]):
            changed.append(item[0])
        elif entry[0] is not None:
            kept.append(item)
            served[item] = entry[0]
    skipped = len(items) - len(kept) - len(changed)
    if skipped:
        reporter.warn("--resume: %d message(s) already sent according to %s, skipped"
                      % (skipped, settings.results))
    for path in dict.fromkeys(changed):
        reporter.warn("--resume: %s has changed since %s recorded it as sent: not sent "
                      "again (send it without --resume if it is a new message)"
                      % (path, settings.results))
    if served:
        reporter.warn("--resume: %d message(s) partly sent, now only to the recipients that "
                      "did not get them" % len(served))
    return kept, served


def input_digest(path):
    """Return the SHA-256 (hex) of input *path*, or "" when it cannot be read (building
    it will say why)."""
    try:
        return hashlib.sha256(read_input(path)).hexdigest()
    except InputError:
        return ""


def run_batch(settings, reporter):
    """Build (and send) every work item; print the report and summary; return the exit code."""
    items, served = work_items(settings, reporter)
    keystore = keystore_of(settings, reporter)
    backend = make_backend(settings, reporter)
    extra = extra_header(settings, backend)
    build = lambda item: build_job(item, settings, keystore, extra,  # noqa: E731
                                   served.get(item, ()), check=backend.check)
    stats = Stats(len(items), "sent" if settings.send else "written")
    halt = mmap.mmap(-1, 1)  # shared with forked workers: non-zero = take no new message
    with Stop(halt, reporter.warn, batch=len(items) > 1) as stop:
        if settings.jobs > 1 and len(items) > 1:
            run_parallel(settings, backend, build, items, reporter, stats, halt)
        else:
            recorder = Recorder(settings, reporter, stats, lambda: halt.__setitem__(0, 1),
                                grouped=True)
            try:
                work(settings, backend, prefetch(build, items), recorder, lambda: halt[0])
            finally:
                backend.close()
                recorder.close()
    for notice in stats.notices():
        reporter.warn(notice)
    if len(items) != 1 or settings.results:
        (reporter.say if settings.send and not reporter.closed else reporter.warn)(
            stats.summary())
    if stop.requested:
        return 130
    if stats.sent + stats.failed < stats.total and not stats.code:
        return EX_TEMPFAIL
    return stats.code


def run_parallel(settings, backend, build, items, reporter, stats, halt):
    """Handle the items in settings.jobs forked worker processes.

    Worker k takes items k, k + jobs, ... (no task queue to lock per message).
    Each worker prints its own report lines and journal rows as it goes, one
    write per message so that lines never mix, and sends its counts up its
    Channel at the end; only a progress bar (drawn here) needs every Result
    sent up.  Imports, keys and the CA store are loaded before forking.
    """
    preload(backend, build, items[0])
    sys.stdout.flush()
    sys.stderr.flush()
    channels, jobs = {}, settings.jobs
    recorder = Recorder(settings, reporter, stats, lambda: halt.__setitem__(0, 1))
    try:
        for k in range(jobs):
            reader, writer = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(reader)
                for fd in channels:
                    os.close(fd)
                os._exit(worker_process(settings, backend, build, items[k::jobs], reporter,
                                        Stats(stats.total, stats.done), Channel(writer), halt))
            os.close(writer)  # the child holds its own copy: EOF means the worker has ended
            channels[reader] = Channel(reader, pid)
        poller = select.poll()
        for fd in channels:
            poller.register(fd, select.POLLIN)
        while channels:
            for fd, _ in poller.poll():
                chunk, channel = os.read(fd, 65536), channels[fd]
                for message in channel.receive(chunk):
                    channel.counted |= collect(message, recorder, stats, halt)
                if not chunk:
                    poller.unregister(fd)
                    os.close(fd)
                    del channels[fd]
                    reap(channel, reporter)
    finally:
        for channel in channels.values():  # a second Ctrl-C: stop the workers too
            os.kill(channel.pid, signal.SIGUSR1)
            os.waitpid(channel.pid, 0)
        recorder.close()


def preload(backend, build, item):
    """Build *item* once here so that forked workers inherit what it loaded.

    The first message of a process pays for lazy imports and for reading and
    checking the keys (~60 ms), the first SMTP session for smtplib, ssl and the
    CA store: paid once before forking instead of once per worker.  Any error is
    left for the worker that meets it to report.
    """
    try:
        build(item)
        backend.preload()
    except Exception:  # noqa: BLE001 - a warm-up only: the worker reports it properly
        pass


def collect(message, recorder, stats, halt):
    """Act on one message from a worker; return True if it carried the worker's counts."""
    kind = message[0]
    if kind == "result":
        res = Result(*message[1])
        recorder.show(res)
        if res.halt:
            halt[0] = 1
    elif kind == "counts":
        stats.merge(*message[1:])
        return True
    return False


def reap(channel, reporter):
    """Wait for an ended worker; warn if its counts never came."""
    os.waitpid(channel.pid, 0)
    if not channel.counted:
        reporter.warn("a worker process (pid %d) ended without reporting its counts: the "
                      "summary misses the messages it handled (--results FILE lists them)"
                      % channel.pid)


def abort_worker(signum, frame):
    """SIGUSR1 in a worker: the parent aborts (a second Ctrl-C); stop at once."""
    raise KeyboardInterrupt


def worker_process(settings, backend, build, items, reporter, stats, channel, halt):
    """Run a forked worker; return its exit status (never return into the parent's code).

    Prints through its own Recorder unless the parent draws a progress bar: then
    each Result goes up *channel* instead.  Its counts go up last, always.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; in-flight work finishes
    # SIGTERM to the process group (kill -- -PGID, a service manager): as the parent's
    # first, no new message, the ones in flight finish; SIGUSR1: the parent aborts.  Both
    # end through the finally below, which commits the journal rows of a group in progress.
    signal.signal(signal.SIGTERM, lambda signum, frame: halt.__setitem__(0, 1))
    signal.signal(signal.SIGUSR1, abort_worker)
    recorder = None
    try:
        recorder = Recorder(settings, reporter, stats, lambda: halt.__setitem__(0, 1),
                            grouped=True)
        if recorder.progress:
            recorder.forward = lambda res: channel.send(("result", tuple(res)))
        work(settings, backend, prefetch(build, items), recorder, lambda: halt[0])
        return EX_OK
    except KeyboardInterrupt:  # abort_worker(): the parent has said so already
        return 130
    except OutputError as exc:  # the journal or archive could not even be opened
        reporter.warn(str(exc))
        stats.fault(exc.exit_code)
        halt[0] = 1
        return exc.exit_code
    except BaseException as exc:  # noqa: BLE001 - a bug: say so, and let the parent count
        reporter.warn("internal error in a worker process: %s: %s" % (type(exc).__name__, exc))
        stats.fault(EX_SOFTWARE)
        return EX_SOFTWARE
    finally:
        backend.close()
        if recorder is not None:
            recorder.close()
        channel.send(("counts",) + stats.counts())
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


###############################################################################
# Gateway: --serve, an SMTP relay that signs and encrypts #####################
###############################################################################
# Applications that can only speak SMTP (RFC 5321) hand us their mail; each
# message is built as a file would be (build_job), on --jobs forked processes
# that keep the keys, and goes to the next hop through a back end above.  With
# an SMTP next hop every client connection has its own session there and each
# RCPT is passed on as it arrives, so the client hears the next hop's own
# refusal (as from Postfix's before-queue proxy); the end of DATA is answered
# once the next hop has answered it.  Nothing is queued here: a client keeps
# every message we have not accepted, and tries again after a 4xx.  aiosmtpd,
# the SMTP server, is imported in this mode only.

#: Recipients taken per message (RFC 5321 4.5.3.1.8: at least 100).
MAX_RECIPIENTS = 1000
#: Commands one client connection may send, and AUTH commands among them.
MAX_COMMANDS, MAX_AUTH = 100_000, 5
#: NOOP, RSET, HELP, VRFY and failed commands a session may send before its first
#: accepted MAIL (and again after each one) unless authenticated: then 421 and closed.
MAX_IDLE_COMMANDS = 20
#: The slowest upload allowed: a command line or message must arrive within
#: max(SMIME_GATEWAY_TIMEOUT, --max_size / MIN_DATA_RATE) seconds (64 KiB/s).
MIN_DATA_RATE = 65536
#: A failed AUTH makes the next AUTH from that client address wait: 1 s, doubled per
#: failure in a row, at most 30 s (one success clears it); addresses remembered.
AUTH_DELAY, MAX_AUTH_DELAY, MAX_AUTH_ADDRESSES = 1.0, 30.0, 10_000
#: The longest address in MAIL or RCPT: a path is at most 256 octets with its "<>"
#: (RFC 5321 4.5.3.1.3).
MAX_PATH = 254
#: A message that cannot be built -> the start of the reply to its DATA (RFC 3463).
BUILD_REPLIES = {EX_CONFIG: "550 5.7.1", EX_DATAERR: "554 5.6.0"}
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\b")


def serve(settings, reporter):
    """--serve: relay until SIGTERM or Ctrl-C; return the exit code (0, or 74 when a
    message could not be recorded in the journal or archive)."""
    return Gateway(settings, reporter).run()


class Gateway:
    """The relay, and aiosmtpd's handler: checks each envelope, builds each message and
    hands it to the next hop, records it as a batch does (report line, --results,
    --archive).  SIGTERM stops it once the messages in flight are done; SIGHUP reads
    the keys and certificates again.

    With --jobs N, N forked processes serve the one listening socket side by side,
    each with its own event loop, keys and next-hop sessions (cryptography holds the
    GIL while it builds, so only processes use a second core); the first process
    forwards SIGTERM and SIGHUP to them, replaces one that dies, and adds up their
    counts for the summary.
    """

    def __init__(self, settings, reporter):
        self.settings, self.reporter, self.gw = settings, reporter, settings.gateway
        self.name = socket.gethostname()  # getfqdn() can stall on reverse DNS
        self.prefix = "%X" % int(time.time())  #: message ids: <prefix>.<n>
        self.options = self.smtp_options()
        self.rules = make_backend(settings, reporter)  #: the next hop's rules; never opened
        self.extra = extra_header(settings, self.rules)
        self.stats, self.stopping, self.spawned = Stats(0), False, 0
        self.stats.refused = 0
        self.keystore = self.recorder = self.threads = self.done = None
        self.clients, self.flights, self.endings, self.uploads = set(), set(), set(), 0
        self.connections = self.messages = 0
        self.by_address = collections.Counter()  #: client address -> its connections
        self.failed_logins = {}  #: client address -> (failures in a row, monotonic until)
        self.channel = None  #: a forked process's Channel to the first one

    def run(self):
        """Listen, serve until SIGTERM or Ctrl-C, print the summary; return the exit code.
        Raises ConfigError (the address, TLS files) or OutputError (journal, archive)."""
        self.keystore = self.checked_keystore()
        sock = self.bind()
        Recorder(self.settings, self.reporter, self.stats, bool).close()  # can they be opened?
        self.reporter.warn("serving on %s port %d (%s%s; %d process%s), next hop: %s" % (
            self.gw.host, self.gw.port, "STARTTLS" if self.gw.cert else "no TLS",
            ", AUTH required" if self.gw.user else "", self.settings.jobs,
            "es" if self.settings.jobs > 1 else "", self.next_hop()))
        code = self.serve_here(sock) if self.settings.jobs == 1 else self.serve_forked(sock)
        self.stats.total = self.stats.sent + self.stats.failed
        for notice in self.stats.notices():
            self.reporter.warn(notice)
        self.reporter.say(self.stats.summary())
        return code

    def checked_keystore(self):
        """Return the Keystore, every identity it can sign with loaded and checked
        (check_signers(): the processes of --jobs inherit them).  Raises
        IdentityError or ConfigError naming the file: no message is taken with a key
        that cannot be used."""
        keystore = keystore_of(self.settings, self.reporter)
        if self.settings.sign_mode:
            try:
                check_signers(keystore)
            except SmimeToolError as exc:
                raise IdentityError("--serve checks every signing key before it listens: %s"
                                    % exc)
        return keystore

    def bind(self):
        """Return the listening socket.  Raises ConfigError when the address cannot be
        used (taken, not ours)."""
        family = socket.AF_INET6 if ":" in self.gw.host else socket.AF_INET
        try:
            return socket.create_server((self.gw.host, self.gw.port), family=family,
                                        backlog=128)
        except OSError as exc:
            raise ConfigError("--serve %s:%d: cannot listen there: %s"
                              % (self.gw.host, self.gw.port, exc.strerror or exc))

    def serve_forked(self, sock):
        """Serve with --jobs forked processes (Supervisor); return the exit code."""
        return Supervisor(self, sock).run()

    def child(self, control, channel):
        """Run a forked gateway process, taking connections from *control*; send its
        counts up; return its exit status (never return into the parent's code)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)  # until its event loop takes them
        self.prefix += "-%d" % self.spawned
        code, self.channel = EX_SOFTWARE, channel
        try:
            code = self.serve_here(control)
        except SmimeToolError as exc:
            self.reporter.warn(str(exc))
            code = exc.exit_code
        except BaseException as exc:  # noqa: BLE001 - a bug: say so; the parent goes on
            self.reporter.warn("internal error in a gateway process: %s: %s"
                               % (type(exc).__name__, exc))
        finally:
            channel.send(("counts",) + self.stats.counts())
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
        return code

    def serve_here(self, sock):
        """Serve in this process until stop(): the connections of the listening *sock*,
        or (a forked process) those handed over on the socket pair *sock*; return the
        exit code."""
        from concurrent import futures
        import asyncio
        self.recorder = Recorder(self.settings, self.reporter, self.stats, self.halt)
        self.threads = futures.ThreadPoolExecutor(self.gw.connections + 2, "next-hop")
        try:
            asyncio.run(self.serve_on(sock))
        finally:
            self.threads.shutdown(wait=True, cancel_futures=True)
            self.recorder.close()
        return EX_IOERR if self.recorder.broken else EX_OK

    async def serve_on(self, sock):
        """The event loop's part: serve the connections of *sock* (see serve_here())
        until stop(), then finish the messages in flight and close every connection."""
        import asyncio
        loop = asyncio.get_running_loop()
        self.done = asyncio.Event()
        self.quiet_library()
        smtp, busy = gateway_protocols()

        def factory():
            if self.stopping:
                return busy()
            self.connections += 1
            return smtp(self, "c%d" % self.connections, **self.options)
        if self.settings.jobs == 1:
            server = await loop.create_server(factory, sock=sock)
        else:
            server = HandedOver(loop, sock, factory)
        for signum, action in ((signal.SIGTERM, self.stop), (signal.SIGINT, self.stop),
                               (signal.SIGHUP, self.reload)):
            loop.add_signal_handler(signum, action)
        await self.done.wait()
        server.close()
        while self.uploads or self.flights:
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.close()
        await asyncio.sleep(0.05)  # connection_lost() hangs up each next-hop session
        if self.endings:
            await asyncio.wait(list(self.endings))

    def next_hop(self):
        """Return where messages go, for the start-up line."""
        if self.settings.send == "smtp":
            return "SMTP %s" % self.settings.smtp.describe()
        return "SparkPost API %s" % self.settings.api.base_url

    def quiet_library(self):
        """Silence aiosmtpd's own log; with -v, copy each client command it logs (AUTH
        data already hidden by it) into our transcript."""
        import logging
        log = logging.getLogger("mail.log")
        log.propagate = False
        log.setLevel(logging.INFO if self.settings.verbose else logging.CRITICAL + 1)
        if not self.settings.verbose:
            return
        gateway = self

        class Commands(logging.Handler):
            def emit(self, record):
                if record.msg == "%r >> %r" and len(record.args) == 2:
                    peer, line = record.args
                    for client in list(gateway.clients):
                        if client.session is not None and client.session.peer == peer:
                            gateway.transcript(client, "<-", line.decode("ascii", "replace"))
        log.addHandler(Commands())

    def smtp_options(self):
        """Return aiosmtpd's options: our limits, STARTTLS and AUTH as the settings say."""
        import ssl
        gw = self.gw
        options = dict(data_size_limit=self.settings.max_size, enable_SMTPUTF8=False,
                       decode_data=False, hostname=self.name, ident="sparkpostSMIME gateway",
                       timeout=self.deadline(),
                       command_call_limit={"AUTH": MAX_AUTH, "*": MAX_COMMANDS})
        if gw.cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(gw.cert, gw.key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("SMIME_GATEWAY_TLS_CERT=%s, SMIME_GATEWAY_TLS_KEY=%s: cannot "
                                  "use them: %s" % (gw.cert, gw.key, exc))
            options["tls_context"] = context
        if gw.user:
            options.update(auth_required=True, auth_require_tls=True,
                           authenticator=self.authenticate)
        return options

    def deadline(self):
        """Return the seconds a command line or a message's upload may take at most:
        SMIME_GATEWAY_TIMEOUT, or longer for --max_size at MIN_DATA_RATE (aiosmtpd's
        timeout, counted from a client's last command; silence is Client.silent()'s)."""
        return max(self.gw.timeout, self.settings.max_size / MIN_DATA_RATE)

    def admit(self, client, transport):
        """Return '' and count the new connection of *client*, or the 421 reply when
        it would pass SMIME_GATEWAY_CONNECTIONS or _PER_CLIENT (RFC 5321 3.8).
        Counted as each connection is made, in order, also in a burst."""
        peer = transport.get_extra_info("peername")
        client.address = peer[0] if isinstance(peer, tuple) else "unknown"
        if len(self.clients) >= self.gw.connections:
            return "421 4.7.0 too many connections, try again later"
        if self.by_address[client.address] >= self.gw.per_client:
            return "421 4.7.0 too many connections from your address, try again later"
        self.clients.add(client)
        self.by_address[client.address] += 1
        return ""

    def release(self, client):
        """A connection admit() counted has ended (the first process hears of it)."""
        self.clients.discard(client)
        self.by_address[client.address] -= 1
        if self.by_address[client.address] <= 0:
            del self.by_address[client.address]
        if self.channel is not None:
            self.channel.send(("ended", client.address))

    async def hold_auth(self, client):
        """Before an AUTH: wait while failures from the client's address say so."""
        import asyncio
        failures, until = self.failed_logins.get(client.address, (0, 0.0))
        wait = until - time.monotonic()
        if wait > 0:
            self.reporter.warn("%s: AUTH from %s held %.1f seconds (%d failed in a row)"
                               % (client.tag, client.address, wait, failures))
            client.pausing = True
            try:
                await asyncio.sleep(wait)
            finally:
                client.pausing = False

    def failed_auth(self, client, mechanism):
        """Count a failed AUTH of *client*'s address: its next AUTH waits AUTH_DELAY
        doubled per failure in a row, at most MAX_AUTH_DELAY; log it."""
        failures = self.failed_logins.pop(client.address, (0, 0.0))[0] + 1
        delay = min(MAX_AUTH_DELAY, AUTH_DELAY * 2 ** min(failures - 1, 16))
        self.failed_logins[client.address] = (failures, time.monotonic() + delay)
        while len(self.failed_logins) > MAX_AUTH_ADDRESSES:  # the oldest go first
            del self.failed_logins[next(iter(self.failed_logins))]
        self.reporter.warn("%s: AUTH %s refused from %s (wrong user or password; %d failed "
                           "in a row: its next AUTH waits %g seconds)"
                           % (client.tag, mechanism, client.address, failures, delay))

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        """aiosmtpd's authenticator: SMIME_GATEWAY_USER and its password (RFC 4954;
        PLAIN and LOGIN, offered only after STARTTLS)."""
        from aiosmtpd import smtp as aiosmtpd_smtp
        import hmac
        gw = self.gw
        good = isinstance(auth_data, aiosmtpd_smtp.LoginPassword) and all([
            hmac.compare_digest(auth_data.login, gw.user.encode("utf-8")),
            hmac.compare_digest(auth_data.password, gw.password.encode("utf-8"))])
        if not good:
            self.failed_auth(server, mechanism)
        else:
            self.failed_logins.pop(server.address, None)
        return aiosmtpd_smtp.AuthResult(success=good, handled=False)

    # -- the SMTP dialogue (aiosmtpd's handler hooks) --------------------------------

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        responses.insert(-1, "250-PIPELINING")  # aiosmtpd reads commands in order (RFC 2920)
        return responses

    async def handle_MAIL(self, server, session, envelope, address, options):
        """MAIL FROM: kept for the next hop (it goes out with the first RCPT); an
        address that breaks RFC 5321 4.1.2 is refused (501 5.1.7)."""
        if self.stopping:
            return "421 4.3.2 %s is shutting down, try again later" % self.name
        problem = address_problem(address)
        if problem:
            self.reporter.warn("%s: MAIL %s refused: %s" % (server.tag, ascii(address), problem))
            return "501 5.1.7 bad sender address syntax: %s (RFC 5321 4.1.2)" % problem
        code, text = self.next_hop_of(server).mail(address, options)
        if code == 250:
            server.idle_commands = 0
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return relayed(code, text)

    async def handle_RCPT(self, server, session, envelope, address, options):
        """RCPT TO: refused here (rcpt()) or by the next hop, whose reply is ours; the
        refused ones are counted for the summary."""
        reply = await self.rcpt(server, envelope, address, options)
        if not reply.startswith("25"):
            self.stats.refused += 1
        return reply

    async def rcpt(self, server, envelope, address, options):
        """Return the reply to RCPT TO: refused here when there are too many, the address
        breaks RFC 5321 4.1.2 (553 5.1.3) or --encrypt has no certificate for it (550
        5.7.1), else passed on to the next hop."""
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 too many recipients (at most %d per message)" % MAX_RECIPIENTS
        problem = address_problem(address)
        if problem:
            self.reporter.warn("%s: RCPT %s refused: %s" % (server.tag, ascii(address), problem))
            return "553 5.1.3 bad recipient address syntax: %s (RFC 5321 4.1.2)" % problem
        if self.settings.encrypt and not self.settings.opportunistic:
            import asyncio  # its certificate may need a revocation fetch: not in the loop
            problem = await asyncio.get_running_loop().run_in_executor(
                self.threads, self.recipient_problem, address)
            if problem:
                self.reporter.warn("%s: RCPT <%s> refused: %s" % (server.tag, address, problem))
                return "550 5.7.1 <%s>: no usable S/MIME certificate, the message cannot be " \
                       "encrypted to it: %s" % (address, self.private(problem))
        code, text = await self.next_hop_of(server).call("rcpt", address)
        if code in (250, 251):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return relayed(code, text)

    async def handle_RSET(self, server, session, envelope):
        if server.hop is not None and server.hop.open:  # no thread for nothing to reset
            await server.hop.call("reset")
        return "250 2.0.0 Ok"

    async def handle_DATA(self, server, session, envelope):
        """The end of DATA: relay the message; a client that goes away meanwhile does not
        stop it (its outcome is recorded, and stop() waits for it)."""
        import asyncio
        flight = asyncio.ensure_future(self.relay(server, session, envelope))
        self.flights.add(flight)
        flight.add_done_callback(self.flights.discard)
        return await asyncio.shield(flight)

    async def handle_exception(self, error):
        self.reporter.warn("internal error in the gateway: %s: %s" % (type(error).__name__,
                                                                       error))
        return "451 4.3.0 internal error, try again later"

    # -- one message -----------------------------------------------------------------

    async def relay(self, server, session, envelope):
        """Build one message, hand it to the next hop, record it; return the reply.  The
        temporary files of a big one (the message received, the message built: Spools)
        are gone when it returns, however it ends."""
        spools = [envelope.original_content]
        try:
            return await self.relay_message(server, session, envelope, spools)
        finally:
            for spool in spools:
                if isinstance(spool, Spool):
                    spool.close()

    async def relay_message(self, server, session, envelope, spools):
        """relay() of the message in *envelope* (bytes, or a Spool); the temporary files
        made for it are added to *spools*."""
        started, data, rcpts = time.perf_counter(), envelope.original_content, envelope.rcpt_tos
        self.messages += 1
        source = "%s.%d" % (self.prefix, self.messages)
        if bare_line_end(data):  # SMTP smuggling hides a second message behind one
            await self.next_hop_of(server).call("reset")
            self.reporter.warn("%s: refused from %s: a bare CR or LF in DATA" % (source,
                                                                                server.tag))
            return BARE_LINE_END
        signed_only = False
        if self.settings.encrypt and self.settings.opportunistic:  # may fetch: not in the loop
            import asyncio
            signed_only = await asyncio.get_running_loop().run_in_executor(
                self.threads, lambda: any(self.recipient_problem(r) for r in rcpts))
        job, refusal = self.build(source, data, rcpts, signed_only, spools)
        job = job._replace(started=started, mail_from=self.settings.mail_from or (
            "" if envelope.mail_from == "<>" else envelope.mail_from))
        if job.failure:
            await self.next_hop_of(server).call("reset")
            outcome = failed_build(job._replace(recipients=tuple(rcpts)))
            reply = "%s %s" % (refusal, one_line(self.private(job.failure[1])))
        else:
            job = job._replace(data=received_header(session, self.name, source, rcpts)
                               + job.data)
            outcome = await self.next_hop_of(server).call("data", job)
            reply = gateway_reply(outcome, server.hop.last)
        tally = Tally(outcome.job)
        tally.add(outcome)
        self.recorder(tally.result(), outcome.job)
        return reply

    def build(self, source, data, rcpts, signed_only=False, spools=None):
        """Return (Job, '') for a received message *data* (bytes, or a Spool: read whole
        here): built as a file would be (build_job), or as it came when it is S/MIME
        already (no double wrapping when a filter loops); or (a Job carrying its
        failure, the start of the reply: build_reply()) for a message that cannot be
        built.  The hop limit applies to both (RFC 5321 6.3).  *signed_only*:
        --opportunistic found a recipient without a usable certificate; *spools*: a
        list the temporary file of a big built message is added to (spooled()).  Runs
        in the event loop, one message at a time: cryptography would hold the GIL in a
        thread as well."""
        recipients = [r.lower() for r in rcpts]
        settings = self.settings
        if signed_only:
            self.reporter.warn("%s: signed only (--opportunistic): not every recipient has a "
                               "usable certificate" % source)
            settings = settings._replace(encrypt=False)

        try:
            msg = message_apart(data.apart() if isinstance(data, Spool) else [data, None],
                                source, recipients)
            check_hops(msg, settings.hop_limit)
            if smime_kind(msg.entity_fields):
                if isinstance(data, Spool):  # sent from its file, as it came
                    data, msg.body = data.chunks(), b""
                return Job(source, 0, data, msg.sender, tuple(recipients), msg, notes=(
                    (None, "%s: already S/MIME, passed on unchanged" % source),)), ""
            if settings.sign_mode:
                self.signer_of(msg.sender)
            job = build_job((source, 0), settings, self.keystore, self.extra, msg=msg,
                            check=self.rules.check)
            return spooled(job, spools if spools is not None else []), ""
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
            return failed_job((source, 0), exc), build_reply(exc)

    def signer_of(self, address):
        """Load the sender's identity (loaded at start-up, or a key file added since).
        Raises ServiceError (451) when its key file is there but cannot be used (not
        readable, a wrong password, a certificate expired): a fault on our side.  A
        From address without a key file is the message's fault: build_job() says so."""
        if self.keystore.find(address, KEY_SUFFIXES) is None:
            return
        try:
            self.keystore.signer(address)
        except IdentityError as exc:
            raise ServiceError("the signing key cannot be used now, try again later: %s"
                               % exc)

    def next_hop_of(self, server):
        """Return the client connection's next-hop session, made at the first use."""
        if server.hop is None:
            server.hop = HOPS[self.settings.send](self.settings,
                                                  HopEvents(self.reporter, server.tag),
                                                  self.threads)
        return server.hop

    def recipient_problem(self, address):
        """Return why *address* cannot get an encrypted message ('' when it can)."""
        return recipient_problem(self.keystore, address.lower())

    def private(self, text):
        """Return *text* without our key directories, for a reply to a client."""
        text = text.split(": put ", 1)[0]
        for directory in self.keystore.dirs:
            text = text.replace(os.path.join(directory, ""), "")
        return text

    # -- the gateway's life ------------------------------------------------------------

    def transcript(self, client, glyph, line):
        """Write a line of the client dialogue (-v); '~' glyphs under TLS."""
        if self.settings.verbose:
            if client.session is not None and client.session.ssl is not None:
                glyph = glyph.replace("-", "~")
            self.reporter.transcript("%s client %s %s" % (client.tag, glyph, line))

    def hang_up(self, client):
        """A client connection has ended: end its next-hop session (once a message still
        being relayed is done: serve_on() waits for these)."""
        import asyncio
        if client.hop is not None:
            ending = asyncio.ensure_future(client.hop.call("close"))
            self.endings.add(ending)
            ending.add_done_callback(self.endings.discard)

    def halt(self):
        """The Recorder's call when a message cannot be recorded (journal or archive):
        stop taking mail.  A next hop refusing our credentials only gets 451s."""
        if self.recorder.broken:
            self.stop()

    def stop(self):
        """SIGTERM, Ctrl-C: stop listening, finish the messages in flight, then end."""
        if not self.stopping:
            self.stopping = True
            self.reporter.warn("stopping: no new connections; finishing the messages in flight")
            self.done.set()

    def reload(self):
        """SIGHUP: read keys and certificates again, the signing keys checked as at
        start-up; with a problem the keys read before stay in use."""
        try:
            self.keystore = self.checked_keystore()
        except SmimeToolError as exc:
            self.reporter.warn("SIGHUP: %s; the keys read before stay in use" % exc)
            return
        self.reporter.warn("SIGHUP: keys and certificates are read again")


class Supervisor:
    """The first process of a gateway with --jobs N: it accepts on the listening socket
    and hands each connection to the N forked processes in turn (SCM_RIGHTS over a
    socket pair each: shared listening sockets let the first process to wake take
    every connection), forwards SIGTERM, Ctrl-C and SIGHUP to them, replaces one that
    dies, and adds their counts up (a Channel each).  It holds the connection limits
    as it accepts: each process tells it when a connection has ended."""

    def __init__(self, gateway, sock):
        self.gateway, self.sock, self.poller = gateway, sock, select.poll()
        self.children, self.code, self.turn = {}, EX_OK, 0  #: children: pipe fd -> process
        self.open = {}  #: pipe fd -> collections.Counter: client address -> connections

    def run(self):
        """Serve until the last process has ended; return the exit code (74 when one could
        not record a message: then all stop)."""
        self.sock.setblocking(False)
        self.poller.register(self.sock, select.POLLIN)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.forward)
        for _ in range(self.gateway.settings.jobs):
            self.spawn()
        while self.children:
            for fd, _ in self.poller.poll():
                if fd in self.children:
                    self.read(fd)
                elif not self.gateway.stopping:
                    self.hand_over()
        return self.code

    def spawn(self):
        """Fork a gateway process (Gateway.child()) with its pipe and socket pair."""
        gateway = self.gateway
        gateway.spawned += 1
        sys.stdout.flush()
        sys.stderr.flush()
        reader, writer = os.pipe()
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            os.close(reader)
            ours.close()
            self.sock.close()
            for fd, (_, _, control) in self.children.items():
                os.close(fd)
                control.close()
            os._exit(gateway.child(theirs, Channel(writer)))
        os.close(writer)
        theirs.close()
        self.children[reader] = (Channel(reader, pid), time.monotonic(), ours)
        self.open[reader] = collections.Counter()
        self.poller.register(reader, select.POLLIN)

    def forward(self, signum, frame=None):
        """Pass SIGHUP on; on SIGTERM or Ctrl-C also stop listening first."""
        if signum != signal.SIGHUP and not self.gateway.stopping:
            self.gateway.stopping = True
            self.poller.unregister(self.sock)
            self.sock.close()  # no longer listening
        for channel, _, _ in list(self.children.values()):
            os.kill(channel.pid, signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)

    def hand_over(self):
        """Accept a connection and pass it to the next process that takes it, or turn it
        away (421) over SMIME_GATEWAY_CONNECTIONS or _PER_CLIENT."""
        try:
            conn, peer = self.sock.accept()
        except OSError:  # gone already, or closed by forward()
            return
        address = peer[0] if isinstance(peer, tuple) else "unknown"
        with conn:
            refusal = self.refusal(address)
            if refusal:
                try:
                    conn.send(refusal.encode("ascii") + b"\r\n")
                except OSError:
                    pass
                return
            for _ in range(len(self.children)):
                self.turn += 1
                fd = list(self.children)[self.turn % len(self.children)]
                try:
                    socket.send_fds(self.children[fd][2], [b"c"], [conn.fileno()])
                    self.open[fd][address] += 1
                    return
                except OSError:  # that process is ending: the next one
                    continue

    def refusal(self, address):
        """Return the 421 reply for a new connection from *address* over a limit, or ''
        (Gateway.admit() for all the processes)."""
        gw = self.gateway.gw
        if sum(sum(c.values()) for c in self.open.values()) >= gw.connections:
            return "421 4.7.0 too many connections, try again later"
        if sum(c[address] for c in self.open.values()) >= gw.per_client:
            return "421 4.7.0 too many connections from your address, try again later"
        return ""

    def read(self, fd):
        """Take a process's counts from its pipe; at its end, ended()."""
        chunk = os.read(fd, 65536)
        for message in self.children[fd][0].receive(chunk):
            if message[0] == "ended":
                self.open[fd][message[1]] -= 1
                if self.open[fd][message[1]] <= 0:
                    del self.open[fd][message[1]]
            else:
                self.gateway.stats.merge(*message[1:])
        if not chunk:
            self.ended(fd)

    def ended(self, fd):
        """A process has ended: all stop if it could not record a message or failed on
        starting; else another one takes its place (unless stopping)."""
        channel, started, control = self.children.pop(fd)
        del self.open[fd]  # its connections have gone with it
        self.poller.unregister(fd)
        os.close(fd)
        control.close()
        status = os.waitstatus_to_exitcode(os.waitpid(channel.pid, 0)[1])
        if status == EX_IOERR or (status > 0 and time.monotonic() - started < 1):
            self.code = EX_IOERR if status == EX_IOERR else EX_SOFTWARE
            self.forward(signal.SIGTERM)
        elif not self.gateway.stopping:
            self.gateway.reporter.warn("a gateway process (pid %d) ended (%d): starting "
                                       "another" % (channel.pid, status))
            self.spawn()


def gateway_protocols():
    """Return (Client, Busy): aiosmtpd's SMTP session with the gateway's additions, and
    the protocol that turns away a connection over the limit (421, RFC 5321 3.8)."""
    from aiosmtpd import smtp as aiosmtpd_smtp
    import asyncio

    class Client(aiosmtpd_smtp.SMTP):
        """One client connection: its tag, its next-hop session, our replies logged, and
        DATA content taken in chunks (data_received()), not line by line as aiosmtpd
        takes it (~2.5 us a line: a third of a 19 KB message's time).  Its limits:
        admitted or not (Gateway.admit()), silence (silent()), idle commands (idle()),
        AUTH held after failures (Gateway.hold_auth())."""

        def __init__(self, gateway, tag, **options):
            super().__init__(gateway, **options)
            self.gateway, self.tag, self.hop = gateway, tag, None
            self.upload = self.taken = None  #: DATA being taken (an Upload), its end
            self.address, self.admitted, self.pausing = "unknown", False, False
            self.idle_commands, self.silence = 0, None

        def connection_made(self, transport):
            if self.transport is None:  # not again after STARTTLS
                refusal = self.gateway.admit(self, transport)
                if refusal:
                    transport.write(refusal.encode("ascii") + b"\r\n")
                    return transport.close()
                self.admitted = True
            super().connection_made(transport)
            self.listen()

        def connection_lost(self, error):
            if self.silence is not None:
                self.silence.cancel()
            if not self.admitted:  # turned away: aiosmtpd never started
                return
            self.gateway.release(self)
            self.gateway.hang_up(self)
            super().connection_lost(error)

        async def push(self, status):
            self.gateway.transcript(self, "->", status)
            await super().push(status)
            self.listen()
            if isinstance(status, str) and status[:1] in "45" and status[:3] != "421":
                await self.idle()

        def listen(self):
            """Start the wait for the client again: it has sent something, or we have
            answered (SMIME_GATEWAY_TIMEOUT: seconds it may stay silent)."""
            if self.silence is not None:
                self.silence.cancel()
            self.silence = self.loop.call_later(self.gateway.gw.timeout, self.silent)

        def silent(self):
            """The client has been silent for SMIME_GATEWAY_TIMEOUT: 421 and close,
            unless the wait is ours (the next hop, a message being relayed, AUTH held)."""
            hop, transport = self.hop, self.transport
            if transport is None or transport.is_closing():
                return
            if self.pausing or (self.upload is not None and self.taken.done()) or (
                    hop is not None and hop.running is not None and not hop.running.done()):
                return self.listen()
            transport.write(b"421 4.4.2 %s: nothing heard for %g seconds, closing\r\n"
                            % (self.gateway.name.encode("ascii", "replace"),
                               self.gateway.gw.timeout))
            transport.close()

        async def idle(self):
            """Count a command that takes no message further (NOOP, RSET, HELP, VRFY, or
            one that failed) before the session's first accepted MAIL (and since its
            last), unless it has authenticated: the MAX_IDLE_COMMANDS-th gets 421 and
            the connection is closed."""
            if self.session is None or self.session.authenticated or (
                    self.envelope.mail_from is not None):
                return
            self.idle_commands += 1
            if self.idle_commands >= MAX_IDLE_COMMANDS and self.transport is not None:
                await self.push("421 4.7.0 %d commands without a message, closing"
                                % self.idle_commands)
                self.transport.close()

        async def smtp_NOOP(self, arg):
            await self.counted(super().smtp_NOOP(arg))

        async def smtp_RSET(self, arg):
            await self.counted(super().smtp_RSET(arg))

        async def smtp_HELP(self, arg):
            await self.counted(super().smtp_HELP(arg))

        async def smtp_VRFY(self, arg):
            await self.counted(super().smtp_VRFY(arg))

        async def counted(self, command):
            """Run aiosmtpd's *command*, counted by idle() once (a failure is already)."""
            before = self.idle_commands
            await command
            if self.idle_commands == before:
                await self.idle()

        async def smtp_AUTH(self, arg):
            """AUTH (RFC 4954), held while failures from this address say so."""
            await self.gateway.hold_auth(self)
            if self.transport is not None:
                await super().smtp_AUTH(arg)

        async def smtp_MAIL(self, arg):
            """MAIL (RFC 5321 4.1.1.2), its argument checked as sent: aiosmtpd's parser
            turns whitespace in an address into a quoted string."""
            if arg and _CONTROL.search(arg):
                return await self.refuse_path("MAIL", "501 5.1.7 bad sender", arg)
            return await super().smtp_MAIL(arg)

        async def smtp_RCPT(self, arg):
            """RCPT (RFC 5321 4.1.1.3), its argument checked as MAIL's."""
            if arg and _CONTROL.search(arg):
                return await self.refuse_path("RCPT", "553 5.1.3 bad recipient", arg)
            return await super().smtp_RCPT(arg)

        async def refuse_path(self, verb, reply, arg):
            self.gateway.reporter.warn("%s: %s %s refused: a control character" % (
                self.tag, verb, ascii(arg)[:200]))
            if verb == "RCPT":
                self.gateway.stats.refused += 1
            await self.push("%s address syntax: a control character in the address or its "
                            "parameters (RFC 5321 4.1.2)" % reply)

        async def smtp_DATA(self, arg):
            """DATA (RFC 5321 4.1.1.4): aiosmtpd's own replies without recipients (HELO
            and AUTH came before those); else the content (an Upload), then our
            handler's reply.  A spooled message is the handler's from then on (relay()
            closes it); anything else of the Upload goes when it ends, however it ends."""
            if not self.envelope.rcpt_tos or arg:
                return await super().smtp_DATA(arg)
            self.gateway.uploads += 1  # a message being received is in flight too
            upload = self.upload = Upload(self.data_size_limit)
            try:
                self.taken = self.loop.create_future()
                await self.push("354 End data with <CR><LF>.<CR><LF>")
                await self.taken
                content, status = upload.result()
                if upload.failure is not None:
                    self.gateway.reporter.warn("%s: a message not taken (451): %s"
                                               % (self.tag, upload.failure))
                if upload.smuggled:
                    self.gateway.reporter.warn("%s: refused: a bare CR or LF in DATA"
                                               % self.tag)
                if content is not None:
                    self.envelope.content = self.envelope.original_content = content
                    status = await self.event_handler.handle_DATA(self, self.session,
                                                                  self.envelope)
                self.envelope = aiosmtpd_smtp.Envelope()
                await self.push(status)
            finally:
                self.gateway.uploads -= 1
                self.upload = None
                upload.close()

        def data_received(self, data):
            """Bytes from the client: DATA content up to its final "." line while it is
            taken (Upload.feed()), else commands for aiosmtpd."""
            self.listen()
            upload = self.upload
            if upload is None or self.taken.done():
                return super().data_received(data)
            rest = upload.feed(data)
            if rest is not None:
                self.taken.set_result(None)
                if rest:  # commands pipelined behind the final dot
                    super().data_received(rest)

    class Busy(asyncio.Protocol):
        def connection_made(self, transport):
            transport.write(b"421 4.7.0 too many connections, try again later\r\n")
            transport.close()

    return Client, Busy


#: The end of a message's data: a line holding only "." (RFC 5321 4.1.1.4).
END_OF_DATA = b"\r\n.\r\n"
#: The longest line taken in DATA: Postfix sends up to 999 octets (smtp_line_length_limit).
MAX_DATA_LINE = 999


#: The replies to a DATA whose content is too big (RFC 1870), has a line too long, or
#: could not be spooled (a full disk: the client keeps the message and tries again).
TOO_BIG = "552 5.3.4 message too big: at most %d octets (SIZE)"
LINE_TOO_LONG = "500 5.5.2 line too long: at most 999 octets and CRLF (RFC 5321 4.5.3.1.6)"
NOT_SPOOLED = "451 4.3.0 the message cannot be stored for now, try again later"
#: The reply to a message with a CR or LF that is not part of a CRLF (SMTP smuggling).
BARE_LINE_END = ("554 5.6.0 bare CR or LF in the message: every line must end with CRLF "
                 "(RFC 5321 2.3.8)")


def data_content(taken, limit):
    """Return (the message, None) from the *taken* DATA content (the DATA line's CRLF
    first, up to the CRLF before the final "."), dot-unstuffed (RFC 5321 4.5.2), or
    (None, the reply) for content over *limit* octets (*taken* None: RFC 1870) or with
    a line over 999 octets."""
    if taken is None:
        return None, TOO_BIG % limit
    content = bytes(taken).replace(b"\r\n.", b"\r\n")[2:]
    if has_long_line(content, MAX_DATA_LINE):
        return None, LINE_TOO_LONG
    return content, None


class Upload:
    """The content of one DATA as it arrives (RFC 5321 4.1.1.4), up to its final "."
    line: held in memory up to SPOOL_ABOVE octets (data_content() takes it then), and
    beyond that written to a private temporary file (SpoolWriter) a piece at a time,
    each piece dot-unstuffed (RFC 5321 4.5.2) and checked (lines of at most 999
    octets, no bare CR or LF) as data_content() and relay() check a whole message.
    Pieces are cut just before a CRLF, so no line, CRLF, "." line or final CRLF.CRLF
    is ever split between two.  Past *limit* octets (RFC 1870), or once a line is too
    long, nothing more is kept but what may begin the final "." line.

    feed() takes each read; result() gives the message or the reply refusing it;
    close() lets go of a file not handed over.
    """

    def __init__(self, limit):
        self.limit = limit
        self.held = bytearray(b"\r\n")  #: not written yet ("\r\n": a first "." line)
        self.passed = 0  #: octets of DATA before *held*: written, or dropped
        self.writer = None  #: the SpoolWriter, from the first piece written
        self.over = self.long = self.bare = False  #: too big, a line too long, a bare CR/LF
        self.smuggled = False  #: no CRLF to cut at, but a bare CR or LF: refused while read
        self.failure = None  #: the OutputError of a file that could not be written

    def feed(self, data):
        """Take *data*, the client's next read; return None until the final "." line
        has come, then the octets that follow it (commands pipelined, RFC 2920)."""
        held = self.held
        seen = max(0, len(held) - 4)  # a final CRLF.CRLF may start in the last read
        held += data
        end = held.find(END_OF_DATA, seen)
        if end >= 0:
            rest = bytes(held[end + 5:])
            self.finish(end)
            return rest
        if self.passed + len(held) > self.limit + 4:
            self.over = True
        if self.over or self.long or self.smuggled:
            self.drop()
        elif len(held) > SPOOL_ABOVE:
            self.spill()
        return None

    def spill(self):
        """Write what is held up to its last CRLF, which is kept: a "." may follow it.
        Without a CRLF in all of it, one line is longer than SPOOL_ABOVE, or its lines
        end with a bare CR or LF (refused as relay() refuses one in memory)."""
        cut = self.held.rfind(b"\r\n")
        if cut <= 0:
            held = bytes(self.held)
            self.long = self.long or has_long_line(held, MAX_DATA_LINE)
            self.smuggled = not self.long and not is_crlf(held)
            return self.drop()
        self.put(self.held[:cut])
        del self.held[:cut]
        self.passed += cut

    def put(self, piece):
        """Unstuff, check and write *piece* (CRLF and whole lines, the first CRLF the
        DATA line's when nothing was written yet)."""
        text = piece.replace(b"\r\n.", b"\r\n")
        self.long = self.long or has_long_line(text, MAX_DATA_LINE)
        self.bare = self.bare or not is_crlf(text)
        if self.long or self.failure is not None:
            return
        try:
            if self.writer is None:
                self.writer = SpoolWriter()
            self.writer.write(memoryview(text)[0 if self.passed else 2:])
        except OutputError as exc:
            self.failure = exc

    def drop(self):
        """Keep only what may begin the final CRLF.CRLF; the file goes (refused)."""
        self.passed += max(0, len(self.held) - 4)
        del self.held[:-4]
        self.close()

    def finish(self, end):
        """The final CRLF.CRLF begins at *end* of what is held: the last piece."""
        self.over = self.over or self.passed + end > self.limit
        del self.held[end + 2:]
        if self.over or self.long or self.smuggled:
            self.close()
        elif self.passed:
            self.put(self.held)

    def result(self):
        """Return (the message, None): bytes, or a Spool when it was written to a file
        (its *crlf* says whether every line ends with CRLF: relay() refuses it else); or
        (None, the reply) for a message over *limit* (552), with a line over 999 octets
        (500), or whose file could not be written (451 4.3.0, *failure* says why)."""
        if self.over:
            return None, TOO_BIG % self.limit
        if not self.passed:
            return data_content(self.held, self.limit)
        if self.long:
            return None, LINE_TOO_LONG
        if self.smuggled:
            return None, BARE_LINE_END
        if self.failure is None:
            try:
                spool = self.writer.spool()
                spool.crlf = not self.bare
                return spool, None
            except OutputError as exc:
                self.failure = exc
        return None, NOT_SPOOLED

    def close(self):
        """Let go of the file being written, if any (a Spool given by result() is not
        this Upload's any more)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def spooled(job, spools):
    """Return *job*, a big built message (Chunks, made again each time they are read)
    made once into a temporary file (temporary_spool(), added to *spools*) and read
    from it as it is sent, its Message's body let go (the back ends read its header
    only): messages waiting for their next hop hold a file each, not their content.
    A small one (bytes) as it is.  Raises OutputError (a full disk)."""
    if not isinstance(job.data, Chunks):
        return job
    spool = temporary_spool(job.data)
    spools.append(spool)
    job.msg.body = b""
    return job._replace(data=spool.chunks())


def bare_line_end(data):
    """True when *data* (bytes or a Spool) holds a CR or LF that is not part of a CRLF:
    the trick of SMTP smuggling, which hides a second message behind one (RFC 5321
    2.3.8)."""
    return not (data.is_crlf() if isinstance(data, Spool) else is_crlf(data))


def received_header(session, name, source, recipients):
    """Return our Received field, prepended to the outer header as trace fields are
    (RFC 5321 4.4; 'with' as RFC 3848 names it: ESMTP, S for TLS, A for AUTH)."""
    peer = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
    helo = re.sub(r"[^\w.:\[\]-]", "", session.host_name or "", flags=re.ASCII)[:64]
    kind = "ESMTP" + ("S" if session.ssl is not None else "") + (
        "A" if session.authenticated else "")
    to = " for <%s>" % recipients[0] if len(recipients) == 1 else ""
    return ("Received: from %s ([%s])\r\n\tby %s (sparkpostSMIME) with %s id %s%s;\r\n\t%s\r\n"
            % (helo or "unknown", peer, name, kind, source, to, rfc5322_date(time.time()))
            ).encode("ascii", "replace")


def check_signers(keystore):
    """Load every identity *keystore* can sign with, as a message from each would load
    it: each key file of the key directories (<address>.pem, .p12, .pfx, .p11 that
    find_file() would pick, with a certificate in it or beside it) opened with
    SMIME_KEY_PASSWORD or PKCS11_PIN, its certificate valid now and not revoked, a
    token's key found and matching it.  Return their addresses.  Raises IdentityError
    or ConfigError naming the file."""
    addresses = []
    for directory in keystore.dirs:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue  # a key directory that is not there holds no key
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix in KEY_SUFFIXES and "@" in stem and _SAFE_ADDRESS.match(stem.lower()):
                addresses.append(stem.lower())
    for address in dict.fromkeys(addresses):
        if keystore.find(address, KEY_SUFFIXES) is None or keystore.certificates(address) == []:
            continue  # not a file, a link out of its directory, a key without certificate
        signer = keystore.signer(address)
        if isinstance(signer.key, TokenKey):
            signer.key.operate(lambda key: None)  # logs in, finds the key, checks it
    return list(dict.fromkeys(addresses))


def address_problem(address):
    """Return why the address of a MAIL or RCPT command cannot go on ('' when it can):
    a control character, quoted or not (RFC 5321 4.1.2: neither atext nor qtextSMTP
    holds one), 8-bit (SMTPUTF8, RFC 6531, is not offered) or a path longer than
    RFC 5321 4.5.3.1.3 allows."""
    if _CONTROL.search(address):
        return "a control character in the address"
    if not address.isascii():
        return "8-bit characters in the address (SMTPUTF8 is not offered)"
    if len(address) > MAX_PATH:
        return "longer than %d characters" % MAX_PATH
    return ""


def build_reply(error):
    """Return the start of the reply to the end of DATA for a message that could not
    be built (RFC 3463): the error's own (a mail loop: 554 5.4.6), 5xx for a fault
    of the message (BUILD_REPLIES), else 451 4.3.0: a fault on our side, the client
    keeps the message and tries again."""
    if isinstance(error, SmimeToolError):
        return getattr(error, "reply", "") or BUILD_REPLIES.get(error.exit_code, "451 4.3.0")
    return "451 4.3.0"


def relayed(code, text):
    """Return the reply to a client for the next hop's reply *code* *text* to MAIL or
    RCPT: the same (a 421 becomes 451: the client's own connection stays)."""
    return "%d %s" % (451 if code == 421 else code, one_line(text))


def gateway_reply(outcome, last):
    """Return the reply to the end of DATA (RFC 5321 4.2.5, RFC 3463) for *outcome*:
    250 once the next hop took the message (for some recipients at least: the others
    are recorded); 451 when trying later may help (the next hop is down or slow,
    answered 4xx, or refused our credentials); else 5xx, the next hop's own code
    when it gave one (*last*: its last reply)."""
    if outcome.accepted:
        return "250 2.0.0 Ok: queued as %s" % outcome.job.source
    text = one_line(outcome.detail or outcome.reply)
    match = _ENHANCED.match(last[1]) if last else None
    if outcome.status in ("temporary", "halt") or outcome.code == EX_TEMPFAIL:
        status = match.group(0) if match and match.group(0)[0] == "4" else "4.4.0"
        return "451 %s not accepted by the next hop, try again later: %s" % (status, text)
    status = match.group(0) if match and match.group(0)[0] == "5" else "5.0.0"
    code = last[0] if last and 500 <= last[0] < 600 else 554
    return "%d %s refused by the next hop: %s" % (code, status, text)


def one_line(text):
    """Return *text* as one ASCII line of at most 400 characters, for an SMTP reply."""
    return re.sub(r"\s+", " ", text).strip().encode("ascii", "replace").decode()[:400]


class HandedOver:
    """A forked gateway process's source of connections: the sockets the first process
    accepted and passed over the socket pair *control* (SCM_RIGHTS); close() as an
    asyncio server's."""

    def __init__(self, loop, control, factory):
        self.loop, self.control, self.factory = loop, control, factory
        control.setblocking(False)
        loop.add_reader(control.fileno(), self.take)

    def take(self):
        try:
            _, fds, _, _ = socket.recv_fds(self.control, 1, 4)
        except BlockingIOError:
            return
        except OSError:
            fds = None
        if not fds:  # the first process has gone
            return self.close()
        for fd in fds:
            self.loop.create_task(self.loop.connect_accepted_socket(
                self.factory, socket.socket(fileno=fd)))

    def close(self):
        if self.control.fileno() >= 0:
            self.loop.remove_reader(self.control.fileno())
            self.control.close()


class HopEvents:
    """The reporter as a next-hop session sees it: transcript lines carry the client
    connection's tag."""

    def __init__(self, reporter, tag):
        self.reporter, self.tag = reporter, tag

    def transcript(self, line):
        for part in line.split("\n"):
            self.reporter.transcript("%s next hop %s" % (self.tag, part))

    def session(self, line):
        self.reporter.session(line)


class Hop:
    """A client connection's session with the next hop: the back end of --send_smtp or
    --send_api, its blocking calls made in the gateway's threads (call()).  *last*:
    the next hop's last reply (code, text); *open*: a transaction is under way there."""

    open = False

    def __init__(self, backend, threads):
        self.backend, self.threads = backend, threads
        self.last, self.running = (0, ""), None  #: running: the last call made

    async def call(self, name, *args):
        """Return what the method *name* returns, run in a thread once the calls made
        before it are done (a client sends one command at a time, but it may hang up
        while one runs)."""
        import asyncio
        self.running = self.threads.submit(self.after, self.running, getattr(self, name), args)
        return await asyncio.wrap_future(self.running)

    @staticmethod
    def after(before, method, args):
        """Return method(*args) once the Future *before* (or None) is done."""
        from concurrent import futures
        if before is not None:
            futures.wait([before])
        return method(*args)

    def close(self):
        """The client has gone: end the session (QUIT, RFC 5321 4.1.1.10)."""
        self.backend.close()


class SmtpHop(Hop):
    """A client connection's session with the SMTP next hop: an SmtpBackend, the client
    of --send_smtp (its connection, TLS, AUTH, transcript and errors).  The client's
    MAIL is kept and goes out with its first RCPT, in one write with PIPELINING
    (RFC 2920); each RCPT gets the next hop's own reply, the end of DATA its Outcome."""

    def __init__(self, settings, events, threads):
        super().__init__(SmtpBackend(settings, events), threads)
        self.open, self.sender, self.refused = False, None, None

    def mail(self, address, options):
        """Keep the client's MAIL FROM for the first RCPT; return 250 (does no I/O)."""
        self.sender, self.refused = (address, options), None
        return 250, "2.1.0 Ok"

    def rcpt(self, address):
        """Send RCPT TO (after MAIL FROM for the first one); return the reply.  A next
        hop that refused MAIL gives that reply to every RCPT; one that cannot be
        reached gives 451."""
        if self.sender is not None:
            return self.begin(address)
        if self.refused is not None:
            return self.refused
        try:
            return self.command("RCPT TO:<%s>" % address)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reply
            return self.down(exc)

    def begin(self, address):
        """Open the transaction: a session that went away while idle is opened again,
        once."""
        (sender, options), self.sender = self.sender, None
        reused = self.backend.smtp is not None
        while True:
            try:
                return self.envelope(sender, options, address)
            except Exception as exc:  # noqa: BLE001
                reply = self.down(exc)
            if not reused:
                return reply
            reused = False

    def envelope(self, sender, options, address):
        """RSET an open transaction, connect if need be (SmtpBackend.ready()), send MAIL
        FROM (with the client's SIZE and BODY=8BITMIME where the next hop knows them:
        RFC 1870, RFC 6152) and the first RCPT TO; return the reply for the client."""
        self.abort()
        backend = self.backend
        backend.ready()
        backend.count += 1
        smtp = backend.smtp
        extra = "".join(" " + o for o in options if o.startswith("SIZE=") and backend.sized
                        or o == "BODY=8BITMIME" and smtp.has_extn("8bitmime"))
        mail = "MAIL FROM:<%s>%s" % ("" if sender == "<>" else sender, extra)
        rcpt = "RCPT TO:<%s>" % address
        if backend.pipelining:
            smtp.send("%s\r\n%s\r\n" % (mail, rcpt))
            first, second = self.reply(), self.reply()
        else:
            first = self.command(mail)
            second = self.command(rcpt) if first[0] == 250 else first
        self.open = first[0] == 250
        if not self.open:
            self.refused = first
            return first
        return second

    def data(self, job):
        """Send DATA and the message (RFC 5321 4.1.1.4; a big one, Chunks, as it is read
        or made: SmtpBackend.send_data()); return its Outcome."""
        backend, self.open = self.backend, False
        try:
            code, text = self.command("DATA")
            if code != 354:
                self.open = True
                self.abort()
                return backend.reply_outcome(job, "DATA refused", code, text)
            backend.send_data(job.data)
            return backend.data_outcome(job, (), *self.reply())
        except Exception as exc:  # noqa: BLE001
            self.last = (451, "")
            return error_outcome(job, backend.failure(exc))

    def reset(self):
        """The client's RSET, or a message that was not built: end the transaction."""
        self.sender = self.refused = None
        self.abort()

    def abort(self):
        """RSET an open transaction (a connection that fails is closed)."""
        if self.open and self.backend.smtp is not None:
            try:
                self.command("RSET")
            except Exception as exc:  # noqa: BLE001
                self.backend.failure(exc)
        self.open = False

    def command(self, line):
        """Send the command *line*; return its reply (reply())."""
        import smtplib
        if self.backend.smtp is None:
            raise smtplib.SMTPServerDisconnected("the session was closed")
        self.backend.smtp.send(line + "\r\n")
        return self.reply()

    def reply(self):
        """Read the next reply; return it as (code, text), kept as the last."""
        code, text = self.backend.smtp.getreply()
        self.last = code, decode_reply(text)
        return self.last

    def down(self, exc):
        """Return the 451 reply for a next hop that failed (its session is closed)."""
        self.open, error = False, self.backend.failure(exc)
        self.last = (451, "")
        return 451, "4.4.1 next hop not available, try again later: %s" % error


class ApiHop(Hop):
    """A client connection's use of the SparkPost API (an ApiBackend): it answers for
    the whole transmission, so the envelope is taken as it comes and recipients it
    rejects are recorded (partial) from the Outcome of the end of DATA."""

    def __init__(self, settings, events, threads):
        super().__init__(ApiBackend(settings, events), threads)

    def mail(self, address, options):
        return 250, "2.1.0 Ok"

    def rcpt(self, address):
        return 250, "2.1.5 Ok"

    def data(self, job):
        return self.backend.attempt(job)

    def reset(self):
        """Nothing is open at the API between messages."""


#: The next-hop sessions by back-end name.
HOPS = {"smtp": SmtpHop, "api": ApiHop}


###############################################################################
# Receiving: decrypt and verify (RFC 5652 5-6, RFC 5083, RFC 8551 3) ##########
###############################################################################
# --verify, --decrypt and --harvest open what others send.  cryptography has no
# CMS verification and cannot decrypt for an EC key, so SignedData is checked
# here and EnvelopedData / AuthEnvelopedData decrypted for our own keys, with
# the DER layer the writer uses.  Layers and signatures are values; only a
# message that is not what it claims to be raises MessageError.

SMIME_TYPES = ("application/pkcs7-mime", "application/x-pkcs7-mime")
ID_AUTH_ENVELOPED_DATA = "1.2.840.113549.1.9.16.1.23"
#: Signature algorithms -> (scheme, hash; None: the SignerInfo's digest algorithm)
#: (RFC 3370 3, RFC 4056, RFC 5753 7.1.3, RFC 5754 3).
SIGNATURE_ALGORITHMS = {
    "1.2.840.113549.1.1.1": ("rsa", None), "1.2.840.113549.1.1.5": ("rsa", "SHA1"),
    "1.2.840.113549.1.1.14": ("rsa", "SHA224"), "1.2.840.113549.1.1.11": ("rsa", "SHA256"),
    "1.2.840.113549.1.1.12": ("rsa", "SHA384"), "1.2.840.113549.1.1.13": ("rsa", "SHA512"),
    "1.2.840.113549.1.1.10": ("pss", None),
    "1.2.840.10045.2.1": ("ecdsa", None), "1.2.840.10045.4.1": ("ecdsa", "SHA1"),
    "1.2.840.10045.4.3.1": ("ecdsa", "SHA224"), "1.2.840.10045.4.3.2": ("ecdsa", "SHA256"),
    "1.2.840.10045.4.3.3": ("ecdsa", "SHA384"), "1.2.840.10045.4.3.4": ("ecdsa", "SHA512")}
#: RSAES-OAEP key transport and its MGF1 (RFC 8017 A.2.1, RFC 3560).
RSAES_OAEP, MGF1 = "1.2.840.113549.1.1.7", "1.2.840.113549.1.1.8"
#: AES-GCM content encryption for AuthEnvelopedData, by key length (RFC 5084 3.2).
AES_GCM = {"2.16.840.1.101.3.4.1.6": 16, "2.16.840.1.101.3.4.1.26": 24,
           "2.16.840.1.101.3.4.1.46": 32}
#: S/MIME layers opened at most: a triple wrap is signed, encrypted, signed (RFC 8551 3.7).
MAX_LAYERS = 3
#: Header fields naming who a received message may be encrypted to.
DELIVERY_FIELDS = ("to", "cc", "bcc", "delivered-to", "x-original-to", "from")


# -- Big messages: read from their file, each layer spooled (issue 29) ---------------
#
# A received message larger than SPOOL_ABOVE is not read into memory: it is read
# from its file a window at a time (a Spool), and what each layer holds (the DER
# decoded from base64, the decrypted content, a constructed eContent) is written
# to a private temporary file, unnamed (or unlinked at once, mode 0600), that
# nothing outlives.  Ber reads a Spool as it reads bytes; the big values (the
# encrypted content, the signed content) go through in STREAM_BLOCK pieces (Spool, temporary_spool(): above).


def read_received(path):
    """Return the message at *path* ("-" = stdin): bytes, or a Spool when it is larger than
    SPOOL_ABOVE (stdin copied to a temporary file first).  Raises InputError."""
    if path == "-":
        blocks = stdin_blocks()
        head = next(blocks, b"")
        if len(head) <= SPOOL_ABOVE:
            return head
        return temporary_spool(itertools.chain((head,), blocks))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        size = os.fstat(fd).st_size
    except OSError:
        return read_input(path)  # its error
    if size <= SPOOL_ABOVE:
        os.close(fd)
        return read_input(path)
    return Spool(fd, 0, size)


def stdin_blocks():
    """Yield standard input: up to SPOOL_ABOVE + 1 octets first, then STREAM_BLOCKs.
    Raises InputError when it cannot be read (an I/O error is the input's, not ours)."""
    size = SPOOL_ABOVE + 1
    while True:
        try:
            block = sys.stdin.buffer.read(size)
        except OSError as exc:
            raise InputError("-: cannot read standard input: %s" % (exc.strerror or exc))
        if not block:
            return
        yield block
        size = STREAM_BLOCK


def entity_parts(data):
    """Return (header fields, body) of CRLF *data* (bytes or a Spool) as split_header() does;
    a Spool's body is a Spool of it.  Raises MessageError for a header larger than
    MAX_HEADER_SIZE."""
    if not isinstance(data, Spool):
        return split_header(data)
    head = data[:MAX_HEADER_SIZE + 4]
    fields, rest = split_header(head)
    start = len(head) - len(rest)
    if start == len(head) < len(data):  # the header goes on past MAX_HEADER_SIZE
        raise MessageError("a header larger than %d octets (folded over too many lines?)"
                           % MAX_HEADER_SIZE)
    return fields, data.view(start, len(data))


def canonical(data):
    """Return message_to_crlf(*data*) as far as its header is concerned (all the MIME
    layers need: a base64 body decodes the same with any line breaks; crlf_body() makes a
    body canonical where it counts): a Spool with a CRLF header as it is, else one whose
    line breaks are all CRLF (checked a block at a time), any other read whole."""
    if not isinstance(data, Spool):
        return message_to_crlf(data)
    head = data[:MAX_HEADER_SIZE + 4]
    end = head.find(b"\r\n\r\n")
    if is_crlf(head[:end + 4] if end >= 0 else head):
        return data
    return whole_crlf(data)


def whole_crlf(data):
    """Return Spool *data* when its line breaks are all CRLF (found out once, a block at a
    time), else message_to_crlf() of it, read whole."""
    return data if data.is_crlf() else message_to_crlf(bytes(data))


def crlf_body(fields, body):
    """Return the *body* of an entity with header *fields* as message_to_crlf() makes it:
    bytes as they are (already made so), a Spool checked (whole_crlf())."""
    if not isinstance(body, Spool) or whole_crlf(body) is body:
        return body
    return split_header(message_to_crlf(b"".join(f.raw for f in fields) + b"\r\n"
                                        + bytes(body)))[1]


def is_entity(data):
    """is_mime_entity() of *data* (bytes or a Spool: its header only)."""
    if not isinstance(data, Spool):
        return is_mime_entity(data)
    return is_mime_entity(data[:MAX_HEADER_SIZE + 4])


def decoded(body, cte):
    """Return decode_body(*body*, *cte*): a Spool's base64 decoded a window at a time into
    a temporary Spool."""
    if not isinstance(body, Spool):
        return decode_body(body, cte)
    if cte == b"base64":
        return temporary_spool(base64_decoded(body))
    return decode_body(bytes(body), cte) if cte == b"quoted-printable" else body


def base64_decoded(body):
    """Yield the octets of base64 Spool *body* as decode_body() decodes it (leniently),
    a block at a time.

    a2b_base64() skips line breaks (and every octet but the alphabet and "=") itself:
    a block's whole lines without "=" whose base64 characters make whole groups of
    four (as an encoder's lines do) are decoded as they are, the rest after the
    translate() that decode_body() makes (a third of the time saved).
    """
    left = b""
    for block in body.blocks():
        cut = block.rfind(b"\n") + 1
        if cut and b"=" not in block:
            first = block.find(b"\n") + 1 if left else 0  # the line *left* is the start of
            try:
                head = binascii.a2b_base64(left + block[:first]) if left else b""
                decoded = binascii.a2b_base64(memoryview(block)[first:cut])
            except binascii.Error:  # not whole groups of four
                pass
            else:
                yield head
                yield decoded
                left, block = b"", block[cut:]
        text = left + block.translate(None, _NOT_BASE64)
        whole = len(text) - len(text) % 4
        yield binascii.a2b_base64(text[:whole])
        left = text[whole:]
    left = left[:len(left) - 1 if len(left) % 4 == 1 else len(left)]
    yield binascii.a2b_base64(left + b"=" * (-len(left) % 4))


def signed_parts(body, boundary):
    """Return the first two of multipart_parts(*body*, *boundary*): the same for a Spool,
    whose delimiter lines are found a block at a time (as Spools; a delimiter line with
    more than MAX_LINE trailing blanks is not one)."""
    if not isinstance(body, Spool):
        return multipart_parts(body, boundary)[:2]
    mark = re.compile(rb"(?:\A|\r\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")
    parts, start = [], None
    for at in delimiter_candidates(body, boundary):
        window = body[at:at + 2 * MAX_LINE]
        found = mark.match(window)
        if not found or found.end() == len(window) < len(body) - at:
            continue
        if start is not None:
            parts.append(body.view(start, at))
        if found.group(1) or len(parts) == 2:
            return parts
        start = at + found.end() + 2
    if start is not None:
        parts.append(body.view(min(start, len(body)), len(body)))
    return parts


def delimiter_candidates(body, boundary):
    """Yield, in order, where a delimiter line of *boundary* may start in Spool *body*: its
    start, and each CRLF followed by "--" and the boundary."""
    needle = b"\r\n--" + boundary
    if body[:len(needle) - 2] == needle[2:]:
        yield 0
    for at in range(0, len(body), STREAM_BLOCK):
        block = body[at:at + STREAM_BLOCK + len(needle) - 1]
        found = block.find(needle)
        while 0 <= found < STREAM_BLOCK:
            yield at + found
            found = block.find(needle, found + 1)


def octet_chunks(ber):
    """Yield the value of OCTET STRING *ber* (primitive or constructed, X.690 8.7) in
    pieces of at most STREAM_BLOCK octets, never joined."""
    if ber.constructed:
        for piece in ber.each():
            yield from octet_chunks(piece)
        return
    for at in range(ber.start, ber.stop, STREAM_BLOCK):
        yield ber.data[at:min(at + STREAM_BLOCK, ber.stop)]


def octet_value(ber):
    """Return the value of OCTET STRING *ber*: bytes, or a Spool when it is in one (a
    primitive one without a copy)."""
    if not isinstance(ber.data, Spool):
        return ber.octets()
    if not ber.constructed:
        return ber.data.view(ber.start, ber.stop)
    return temporary_spool(octet_chunks(ber))


class Signature(NamedTuple):
    """One SignerInfo, checked (RFC 5652 5.3, 5.4, 5.6); built once by check_signer().

    *cert*: the signer's certificate from the message (None if absent); *certs*:
    every certificate the message carries; *broken*: why the signature itself
    fails ('' when it verifies): the content or the signature was altered;
    *digest*: the digest algorithm's name; *hash*: the hash the signature
    algorithm used; *algorithm*: RSA, RSA-PSS or ECDSA; *signing_time*: as the
    signer claims it.
    """
    cert: object
    certs: list
    broken: str
    digest: str = ""
    hash: str = ""
    algorithm: str = ""
    signing_time: str = ""

    @property
    def address(self):
        """The certificate's first e-mail address, or a description when there is none."""
        emails = cert_emails(self.cert) if self.cert is not None else []
        return emails[0] if emails else "an unknown signer"

    @property
    def issuer(self):
        """The common name of the certificate's issuer (its whole name if it has none),
        read with the DER layer: the report of a --verify run needs no cryptography.x509
        (15-20 ms)."""
        try:
            names = name_values(Certificate.of(self.cert).issuer_der, ATTR_COMMON_NAME)
        except ValueError:  # a string type not read here: cryptography's reading
            names = []
        return names[0] if names else common_name(self.cert.issuer)

    def describe(self):
        """Return a detail line for -v."""
        if self.cert is None:
            return "signer: certificate not in the message"
        text = "signer %s, issuer %s, serial %x, %s with %s" % (
            self.address, self.cert.issuer.rfc4514_string(), self.cert.serial_number,
            self.algorithm or "?", self.digest or "?")
        return text + (", signed %s" % self.signing_time if self.signing_time else "")


class Layer:
    """One S/MIME layer opened: "signed" (its Signatures) or "encrypted" (for *address*)."""

    def __init__(self, kind, signatures=(), address="", how=""):
        self.kind, self.signatures, self.address, self.how = kind, list(signatures), address, how

    def describe(self):
        """Return the detail lines for -v."""
        if self.kind == "encrypted":
            return ["encrypted (%s) for %s" % (self.how, self.address)]
        return ["signed (%s)" % self.how] + ["  " + s.describe() for s in self.signatures]


def smime_kind(fields):
    """Return "multipart/signed", "pkcs7" (application/pkcs7-mime, also x-pkcs7 and
    .p7m names: RFC 8551 3.2.1) or "" for the entity with header *fields*."""
    ctype, params = parse_content_type(field_value(fields, "content-type") or b"text/plain")
    if ctype == "multipart/signed":
        return ctype
    name = params.get("name") or parse_content_type(
        field_value(fields, "content-disposition") or b"")[1].get("filename") or ""
    if ctype in SMIME_TYPES or (ctype == "application/octet-stream"
                                and name.lower().endswith(".p7m")):
        return "pkcs7"
    return ""


def multipart_parts(body, boundary):
    """Return the exact bytes of each part of a CRLF multipart body (RFC 2046 5.1.1).

    The CRLF before each delimiter belongs to the delimiter, not to the part.
    """
    parts, start = [], None
    for mark in delimiters(body, boundary):
        if start is not None:
            parts.append(body[start:mark.start()])
        if mark.group(1):
            return parts
        start = mark.end() + 2
    if start is not None:
        parts.append(body[start:])
    return parts


def is_mime_entity(data):
    """True when CRLF *data* is a MIME entity: header fields (or none), then the empty
    line before the body, or only header fields (RFC 2045 3, RFC 5322 2.1)."""
    if data.startswith(b"\r\n"):
        return True
    fields, body = split_header(data)
    return bool(fields) and (not body or data[:len(data) - len(body)].endswith(b"\r\n\r\n"))


def open_layers(fields, body, keyring, depth=0):
    """Return ([Layer], innermost entity or None) of the entity (*fields*, *body*).

    Each S/MIME layer is opened in turn: a signature checked, an envelope
    decrypted for one of our keys.  None: the entity itself is not S/MIME.
    Raises MessageError for a malformed layer, one we cannot decrypt, or more
    than MAX_LAYERS; IdentityError (78) for a key of ours that cannot be read.
    """
    kind = smime_kind(fields)
    if not kind:
        return [], None
    if depth == MAX_LAYERS:
        raise MessageError("more than %d S/MIME layers nested" % MAX_LAYERS)
    try:
        layer, inner = open_layer(kind, fields, body, keyring)
    except (ValueError, LookupError, OverflowError, StopIteration,
            crypto_errors.UnsupportedAlgorithm) as exc:  # not CMS after all
        raise MessageError("the S/MIME part is malformed (%s)" % (
            first_line(exc) if isinstance(exc, ValueError) else type(exc).__name__))
    entity = canonical(inner)
    if not is_entity(entity):
        raise MessageError("the %s content is not a MIME entity (RFC 8551 3.1): nothing "
                           "vouches for what a mail client would make of it" % layer.kind)
    inner_fields, inner_body = entity_parts(entity)
    layers, innermost = open_layers(inner_fields, inner_body, keyring, depth + 1)
    return [layer] + layers, inner if innermost is None else innermost


def open_layer(kind, fields, body, keyring):
    """Return (Layer, the entity inside it) for one S/MIME layer."""
    if kind == "multipart/signed":
        boundary = parse_content_type(field_value(fields, "content-type"))[1].get("boundary")
        parts = signed_parts(crlf_body(fields, body), (boundary or "").encode("ascii",
                                                                                "replace"))
        if not boundary or len(parts) < 2:
            raise MessageError("a multipart/signed entity without its two parts")
        sig_fields, sig_body = entity_parts(parts[1])
        der = decoded(sig_body, transfer_encoding(sig_fields))
        signatures, _ = signed_data(content_info(der, ID_SIGNED_DATA), parts[0])
        return Layer("signed", signatures, how="multipart/signed"), parts[0]
    der = decoded(body, transfer_encoding(fields))
    oid, content = content_info(der)
    if oid == ID_SIGNED_DATA:
        signatures, inner = signed_data(content)
        return Layer("signed", signatures, how="opaque SignedData"), inner
    if oid in (ID_ENVELOPED_DATA, ID_AUTH_ENVELOPED_DATA):
        inner, address, how = keyring.open_envelope(oid, content)
        return Layer("encrypted", address=address, how=how), inner
    raise MessageError("an application/pkcs7-mime part holding neither signed nor enveloped "
                       "data (content type %s)" % oid)


def content_info(der, expected=None):
    """Return (content type, content) of a DER or BER ContentInfo (RFC 5652 3), or only
    the content when *expected* names the type it must have."""
    if not der:
        raise MessageError("an empty S/MIME part")
    fields = Fields(Ber(der))
    oid, content = fields.take(OID).oid(), Fields(fields.take(ctx(0))).take()
    if expected is not None:
        if oid != expected:
            raise MessageError("the signature part holds content type %s, not SignedData" % oid)
        return content
    return oid, content


# -- SignedData (RFC 5652 5) -------------------------------------------------------

class SignedData(NamedTuple):
    """A SignedData (RFC 5652 5.1): *e_content_type* and *e_content* of its
    EncapsulatedContentInfo (its OCTET STRING, a Ber; None when detached), its
    *certificates* (parsed) and *signer_infos*."""
    e_content_type: str
    e_content: object
    certificates: list
    signer_infos: list


class SignerInfo(NamedTuple):
    """A SignerInfo (RFC 5652 5.3).  *sid*: the SignerIdentifier (Ber);
    *digest_algorithm*: its OID; *signed_attrs*: the [0] SignedAttributes (Ber) or
    None; *signature_algorithm*: the AlgorithmIdentifier (Ber)."""
    version: int
    sid: object
    digest_algorithm: str
    signed_attrs: object
    signature_algorithm: object
    signature: bytes


def read_signed_data(ber):
    """Return the SignedData in *ber*.  Raises ValueError when malformed, MessageError
    beyond MAX_CERTIFICATES or MAX_SIGNER_INFOS."""
    fields = Fields(ber)
    fields.take(INTEGER)  # version
    fields.take(SET)  # digestAlgorithms: each SignerInfo names its own
    encap = Fields(fields.take(SEQUENCE))  # EncapsulatedContentInfo
    e_content_type, e_content = encap.take(OID).oid(), encap.optional(ctx(0))
    if e_content is not None:
        e_content = Fields(e_content).take(OCTET_STRING)
    certs = fields.optional(ctx(0))  # certificates [0] IMPLICIT CertificateSet
    certs = [Certificate(c.raw) for c in (
        bounded(certs, MAX_CERTIFICATES, "certificates") if certs is not None else [])
        if c.tag == SEQUENCE]  # other certificate formats are not used by S/MIME
    fields.optional(ctx(1))  # crls
    infos = bounded(fields.take(SET), MAX_SIGNER_INFOS, "SignerInfos")
    return SignedData(e_content_type, e_content, certs, [read_signer_info(i) for i in infos])


def read_signer_info(ber):
    """Return the SignerInfo in *ber* (RFC 5652 5.3)."""
    fields = Fields(ber)
    version, sid = fields.take(INTEGER).integer(), fields.take()
    digest_algorithm = algorithm_oid(fields.take(SEQUENCE))
    signed_attrs = fields.optional(ctx(0))
    signature_algorithm = fields.take(SEQUENCE)
    signature = fields.take(OCTET_STRING).octets()
    return SignerInfo(version, sid, digest_algorithm, signed_attrs, signature_algorithm,
                      signature)


def signed_data(ber, detached=None):
    """Return ([Signature], signed content) of a SignedData, every SignerInfo checked.

    *detached*: the content of a multipart/signed; else the encapsulated one (bytes,
    or a Spool when the message is in one).  The content is hashed once per digest
    algorithm.  Raises MessageError for content
    that is not id-data (RFC 8551 2.4.1) or missing, or no signer at all.
    """
    signed = read_signed_data(ber)
    if signed.e_content_type != ID_DATA:
        raise MessageError("the signed content is of type %s, not id-data: S/MIME signs MIME "
                           "entities (RFC 8551 2.4.1)" % signed.e_content_type)
    if detached is None and signed.e_content is not None:
        detached = octet_value(signed.e_content)
    content = detached
    if content is None:
        raise MessageError("a detached signature outside a multipart/signed")
    if not signed.signer_infos:
        raise MessageError("a SignedData without any signer")
    digests = {}
    return [check_signer(info, signed.certificates, content, digests)
            for info in signed.signer_infos], content


def check_signer(info, certs, content, digests):
    """Return the Signature of SignerInfo *info* over *content* (RFC 5652 5.4, 5.6).

    *certs*: the message's certificates; *digests*: the content's digest by hash
    name, filled in as needed (each computed once per message).
    """
    cert = signer_certificate(info.sid, certs)
    digest = DIGESTS.get(info.digest_algorithm, "")
    if not digest:
        return Signature(cert, certs, "signed with a digest algorithm this tool does not know "
                                      "(%s)" % info.digest_algorithm)
    if digest not in digests:
        digests[digest] = content_digest(digest, content)
    attrs = SignedAttributes(info.signed_attrs) if info.signed_attrs is not None else None
    signing_time = attrs.signing_time if attrs is not None else ""
    problem = attrs.problem(digests[digest], digest) if attrs is not None else ""
    if not problem and cert is None:
        problem = "the signer's certificate is not in the message"
    algorithm = hash_name = ""
    if not problem:  # with attributes, their DER SET OF is what was signed (RFC 5652 5.4)
        signed = bytes(content) if attrs is None else b"\x31" + info.signed_attrs.raw[1:]
        problem, algorithm, hash_name = signature_problem(cert, info, signed, digest)
    return Signature(cert, certs, problem, digest, hash_name, algorithm, signing_time)


def content_digest(name, content):
    """Return the digest *name* (a DIGESTS value) of *content* (bytes, or a Spool hashed a
    block at a time)."""
    digest = hashes.Hash(getattr(hashes, name)())
    for block in content.blocks() if isinstance(content, Spool) else (content,):
        digest.update(block)
    return digest.finalize()


def signer_certificate(sid, certs):
    """Return the certificate SignerIdentifier *sid* names, or None (RFC 5652 5.3)."""
    for cert in certs:
        if sid.tag == SEQUENCE and sid.raw == issuer_and_serial(cert):
            return cert
        if sid.tag == ctx(0, constructed=False) and subject_key_id(cert) == sid.body:
            return cert
    return None


def subject_key_id(cert):
    """Return the certificate's subjectKeyIdentifier (RFC 5280 4.2.1.2), or None."""
    value = Certificate.of(cert).extension(EXT_SUBJECT_KEY_ID)
    return Ber(value).body if value is not None and value[0] == OCTET_STRING else None


class SignedAttributes:
    """The SignedAttributes of a SignerInfo (RFC 5652 5.3, 11): *encoding* (its Ber),
    *values*: each attribute type's OID -> one list of values per occurrence."""

    def __init__(self, encoding):
        self.encoding, self.values = encoding, {}
        for attr in encoding.each():
            fields = Fields(attr)
            kind, values = fields.take(OID).oid(), fields.take(SET)
            self.values.setdefault(kind, []).append(values.children())

    @property
    def signing_time(self):
        """The signing-time attribute (RFC 5652 11.3) as text, or ''."""
        found = self.values.get(ATTR_SIGNING_TIME)
        return asn1_time(found[0][0]) if found and found[0] else ""

    def single(self, oid):
        """Return the one value of attribute *oid*, or None unless it occurs exactly once
        with exactly one value (RFC 5652 11.1, 11.2)."""
        found = self.values.get(oid, [])
        return found[0][0] if [len(values) for values in found] == [1] else None

    def problem(self, digest, digest_name):
        """Return why the attributes do not vouch for content with *digest*, or ''."""
        if not is_der(self.encoding, as_set=True):
            return ("the signed attributes are not DER-encoded, so the signature cannot be "
                    "checked (RFC 5652 5.4)")
        content_type = self.single(ATTR_CONTENT_TYPE)
        message_digest = self.single(ATTR_MESSAGE_DIGEST)
        if content_type is None or message_digest is None:
            return ("the signed attributes must hold exactly one content-type and one "
                    "message-digest, each with one value (RFC 5652 11.1, 11.2)")
        if content_type.oid() != ID_DATA:
            return "the signed content-type attribute does not match the content"
        if message_digest.octets() != digest:
            return ("the content was altered after signing: its %s digest does not match the "
                    "signed message-digest" % digest_name.replace("SHA", "SHA-"))
        return ""


def is_der(item, as_set=False):
    """True when *item* and everything inside it is DER (X.690 10, 11): definite and
    shortest lengths, no constructed strings, shortest INTEGERs, the elements of a
    SET OF (and of *item* itself when *as_set*) sorted by their encodings."""
    size = item.stop - item.start
    if item.end != item.stop or item.data[item.pos:item.start] != der_header(item.tag, size):
        return False
    if not item.constructed:
        body = item.data[item.start:item.start + 2]
        return not (item.tag == INTEGER and len(body) == 2 and (
            body[0] == 0 and body[1] < 0x80 or body[0] == 0xFF and body[1] >= 0x80))
    if item.tag < 0x40 and item.tag not in (SEQUENCE, SET):  # a constructed string
        return False
    children = item.children()
    if (as_set or item.tag == SET) and [c.raw for c in children] != sorted(
            c.raw for c in children):
        return False
    return all(is_der(child) for child in children)


def asn1_time(item):
    """Return a UTCTime or GeneralizedTime (RFC 5280 4.1.2.5) as 'YYYY-MM-DD HH:MM:SS UTC'."""
    text = item.body.decode("ascii", "replace").rstrip("Z")
    if item.tag == 0x17:  # UTCTime: two-digit years, 1950-2049
        text = ("19" if text[:2] >= "50" else "20") + text
    return "%s-%s-%s %s:%s:%s UTC" % (text[:4], text[4:6], text[6:8], text[8:10],
                                       text[10:12], text[12:14] or "00")


def signature_problem(cert, info, signed, digest):
    """Verify SignerInfo *info*'s signature over *signed* with *cert*'s public key.

    Returns (why not or '', "RSA", "RSA-PSS" or "ECDSA", the hash used).
    """
    parts = Fields(info.signature_algorithm)
    oid = parts.take(OID).oid()
    scheme, hash_name = SIGNATURE_ALGORITHMS.get(oid, ("", None))
    hash_name = hash_name or digest
    key = cert.public_key()
    try:
        if scheme in ("rsa", "pss") and isinstance(key, rsa.RSAPublicKey):
            if scheme == "pss":
                params = parts.rest()
                hash_name, mgf_hash, salt = pss_parameters(params[0] if params else None)
                pad = padding.PSS(padding.MGF1(getattr(hashes, mgf_hash)()), salt)
            else:
                pad = padding.PKCS1v15()
            key.verify(info.signature, signed, pad, getattr(hashes, hash_name)())
        elif scheme == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(info.signature, signed, ec.ECDSA(getattr(hashes, hash_name)()))
        else:
            return "signed with an algorithm this tool cannot check (%s)" % oid, "", hash_name
    except crypto_errors.InvalidSignature:
        return ("the signature does not match the content (the signature or the content was "
                "altered)", "", hash_name)
    return "", {"rsa": "RSA", "pss": "RSA-PSS", "ecdsa": "ECDSA"}[scheme], hash_name


def pss_parameters(params):
    """Return (hash, MGF1 hash, salt length) of RSASSA-PSS-params (RFC 4055 3.1)."""
    hash_name, mgf_hash, salt = rsa_parameters(params)
    return hash_name, mgf_hash, salt.integer() if salt is not None else 20


def rsa_parameters(params):
    """Return (hash, MGF1 hash, the [2] element or None) of RSASSA-PSS-params or
    RSAES-OAEP-params (RFC 4055 3.1, 4.1): SHA-1 and MGF1 with SHA-1 by default."""
    if params is None or params.tag != SEQUENCE:
        return "SHA1", "SHA1", None
    fields = Fields(params)
    hash_algorithm, mask_gen_algorithm = fields.optional(ctx(0)), fields.optional(ctx(1))
    third = fields.optional(ctx(2))
    hash_name, mgf_hash = "SHA1", "SHA1"
    if hash_algorithm is not None:
        hash_name = DIGESTS[algorithm_oid(Fields(hash_algorithm).take(SEQUENCE))]
    if mask_gen_algorithm is not None:  # MGF1 and its hash's AlgorithmIdentifier
        mgf = Fields(Fields(mask_gen_algorithm).take(SEQUENCE))
        mgf.take(OID)
        mgf_hash = DIGESTS[algorithm_oid(mgf.take(SEQUENCE))]
    return hash_name, mgf_hash, Fields(third).take() if third is not None else None


class Verdict(NamedTuple):
    """Whether a Signature vouches for a sender: *problem* ('' when it does) and the
    validated *chain* (the signer's certificate first, the trusted root last)."""
    problem: str
    chain: tuple = ()


def signature_verdict(sig, sender, roots):
    """Return the Verdict of *sig* for a message From *sender*.

    It vouches when the signature verifies, its certificate is for *sender*,
    valid now, allowed to sign, chains to a trusted root (roots() loads them
    once), and every address it names is within the rfc822Name constraints of
    every CA on that chain (RFC 5280 4.2.1.10).
    """
    if sig.broken:
        return Verdict(sig.broken)
    emails = cert_emails(sig.cert)
    if sender not in emails:
        return Verdict("the signature carries no certificate for %s (signed by %s): the From "
                       "address is not the signer's" % (sender, ", ".join(emails) or "no address"))
    problem = certificate_problem(sig.cert, sender, "sign") or signer_key_problem(sig.cert)
    chain = []
    if not problem:
        chain, problem = validated_chain(sig.cert, sig.certs, roots())
    problem = problem or name_constraint_problem(sig.cert, chain[1:])
    if not problem and roots().revocation is not None:
        problem = roots().revocation.chain_problem(chain)
    return Verdict("the signer's certificate (%s) %s" % (ca_name(sig.cert), problem)
                   if problem else "", chain)


def validated_chain(cert, certs, roots):
    """Return (the validated path, cert first and a trust anchor of *roots* last, or
    [], why *cert* has no path valid for mail with intermediates from *certs*, or '').

    Paths are built issuer by issuer (name and signature, RFC 5280 6.1.3 (a)), at
    most MAX_PATH_CAS deep and MAX_PATH_CANDIDATES signatures checked, and judged
    by path_problem(); the first valid one is returned, else the first path's fault.
    """
    cert = Certificate.of(cert)
    pool = [Certificate.of(c) for c in certs]
    pool = [c for c in pool if c != cert and c not in roots]
    faults = []
    for path in candidate_paths([cert], pool, roots, [MAX_PATH_CANDIDATES]):
        problem = path_problem(path, anchored=True)
        if not problem:
            return path, ""
        faults.append(problem)
    if faults:
        return [], faults[0]
    if roots.given:
        return [], "does not chain to a trusted root of %s" % roots.path
    return [], ("does not chain to a trusted root of the system's bundle (%s); pass the "
                "issuing CA with --ca" % roots.path)


def candidate_paths(path, pool, roots, budget):
    """Yield each path from path[-1] to a trust anchor in *roots* through CAs of *pool*
    (each issuer named and its key verified), spending *budget* [count] of signature
    checks."""
    current = path[-1]
    if current in roots:  # a certificate trusted as it is: its own anchor
        yield path
        return
    for ca in [r for r in roots if r.subject_der == current.issuer_der] + [
            c for c in pool if c.subject_der == current.issuer_der and c not in path]:
        if budget[0] <= 0 or len(path) > MAX_PATH_CAS + 1:
            return
        budget[0] -= 1
        if ca.is_issuer_of(current):
            yield from candidate_paths(path + [ca], pool, roots, budget)


class TrustAnchors(list):
    """The trusted roots (our Certificates), with the *path* they came from and whether
    it was *given* (--ca or $SMIME_CA_FILE) or the system's bundle, and the run's
    *revocation* checks of the paths they anchor (None: off)."""

    def __init__(self, certs, path, given, revocation=None):
        super().__init__(certs)
        self.path, self.given, self.revocation = path, given, revocation


def trust_store(cafile, revocation=None):
    """Return the TrustAnchors: --ca / $SMIME_CA_FILE, else the system bundle.

    Certificates of a bundle that cannot be read are left out.  Raises ConfigError
    (78) when there is no bundle, it cannot be read or it holds no certificate.
    """
    path = cafile
    if not path:  # the system's, as OpenSSL finds it (ssl only then: 3-6 ms to import)
        import ssl
        paths = ssl.get_default_verify_paths()
        path = paths.cafile or paths.openssl_cafile
    if not path or not os.path.isfile(path):
        raise ConfigError("%s: no trusted CA bundle there: pass --ca FILE or set SMIME_CA_FILE"
                          % (path or "(none)"))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError("%s: cannot read the CA bundle: %s" % (path, exc.strerror or exc))
    roots = []
    for block in PEM_CERTIFICATE.findall(data):
        try:
            roots.append(Certificate(base64.b64decode(b"".join(block.split()), validate=True)))
        except (ValueError, binascii.Error):
            continue  # an old root in an odd encoding: it anchors nothing
    if not roots:
        raise ConfigError("%s: the CA bundle holds no readable PEM certificate" % path)
    return TrustAnchors(unique_certs(roots), path, bool(cafile), revocation)


# -- EnvelopedData and AuthEnvelopedData for our keys (RFC 5652 6, RFC 5083) --------

class Keyring:
    """Our private keys for decryption, found by address in the key directories.

    Candidates are the addresses of the message's header (DELIVERY_FIELDS), then
    every other <address>.pem/.p12/.pfx in the directories (a Bcc copy names
    nobody).  A key is loaded only when a RecipientInfo names its certificate.
    """

    def __init__(self, keystore, addresses=()):
        self.keystore, self.addresses = keystore, list(dict.fromkeys(addresses))

    def candidates(self):
        """Yield the addresses that have a private key file, header ones first."""
        seen = set()
        for address in self.addresses + self.directory_addresses():
            try:
                if address not in seen and self.keystore.find(address, KEY_SUFFIXES):
                    seen.add(address)
                    yield address
            except MessageError:  # not an address that can name a file
                continue

    def directory_addresses(self):
        """Return the addresses named by key files in the key directories."""
        found = []
        for directory in self.keystore.dirs:
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            found += [n.rsplit(".", 1)[0].lower() for n in names
                      if n.lower().endswith(KEY_SUFFIXES) and "@" in n]
        return found

    def open_envelope(self, oid, envelope):
        """Return (content, address, description) of an (Auth)EnvelopedData for one of
        our keys.  Raises MessageError when none of them can open it, and one uniform
        error for any failure once a RecipientInfo naming our certificate was found:
        a padding or tag error must not tell an attacker more (RFC 3218, EFAIL)."""
        env = read_enveloped_data(envelope, oid == ID_AUTH_ENVELOPED_DATA)
        named = [(info, rid, key) for info in env.recipient_infos
                 for rid, key in info.recipients()]
        if len(named) > MAX_RECIPIENT_INFOS:
            raise MessageError("more than %d RecipientInfos (recipient keys) in one S/MIME "
                               "part" % MAX_RECIPIENT_INFOS)
        cipher = content_cipher(env)
        tried = []
        for address in self.candidates():
            certs = self.keystore.certificates(address)
            if certs is not None and not any(names_cert(rid, c) for _, rid, _ in named
                                             for c in certs):
                tried.append(address)
                continue  # not one of the recipients: its private key stays unread
            ident = self.keystore.decryption(address)
            ours = next(((info, key) for info, rid, key in named if names_us(rid, ident)), None)
            if ours is None:
                tried.append(address)
                continue
            content = decrypt_envelope(env, cipher, ours[0].content_key(ident, ours[1]))
            if content is None:
                raise MessageError("the encrypted message is altered or corrupt: it does not "
                                   "decrypt with the key given to %s" % address)
            return content, address, "%s-%d-%s" % (cipher[0], cipher[1] * 8, cipher[2])
        raise MessageError("encrypted to %d recipient(s), none of them an identity whose key "
                           "is in the key directories (tried: %s)"
                           % (len(env.recipient_infos), ", ".join(tried) or "no key found"))


class EnvelopedData(NamedTuple):
    """An EnvelopedData (RFC 5652 6.1) or AuthEnvelopedData (RFC 5083 2.1): its
    *recipient_infos* (read_recipient_info()), the *content_type*, the
    *content_encryption_algorithm* (Ber) and the *encrypted_content* (Ber or None)
    of its (Auth)EncryptedContentInfo; AuthEnvelopedData's *auth_attrs* (Ber or
    None) and *mac*."""
    version: int
    recipient_infos: list
    content_type: str
    content_encryption_algorithm: object
    encrypted_content: object
    auth: bool
    auth_attrs: object = None
    mac: bytes = b""


def read_enveloped_data(ber, auth):
    """Return the EnvelopedData (*auth*: AuthEnvelopedData) in *ber*.  Raises ValueError
    when malformed, MessageError beyond MAX_RECIPIENT_INFOS."""
    fields = Fields(ber)
    version = fields.take(INTEGER).integer()
    fields.optional(ctx(0))  # originatorInfo
    infos = [read_recipient_info(info) for info in bounded(
        fields.take(SET), MAX_RECIPIENT_INFOS, "RecipientInfos (recipient keys)")]
    encrypted = Fields(fields.take(SEQUENCE))  # (Auth)EncryptedContentInfo
    content_type, algorithm = encrypted.take(OID).oid(), encrypted.take(SEQUENCE)
    content = encrypted.optional(ctx(0, constructed=False)) or encrypted.optional(ctx(0))
    if not auth:
        return EnvelopedData(version, infos, content_type, algorithm, content, False)
    auth_attrs, mac = fields.optional(ctx(1)), fields.take(OCTET_STRING).octets()
    return EnvelopedData(version, infos, content_type, algorithm, content, True, auth_attrs,
                         mac)


class KeyTransRecipientInfo(NamedTuple):
    """A KeyTransRecipientInfo (RFC 5652 6.2.1): *rid* (Ber) and the
    *key_encryption_algorithm* (Ber)."""
    version: int
    rid: object
    key_encryption_algorithm: object
    encrypted_key: bytes

    def recipients(self):
        return [(self.rid, self.encrypted_key)]

    def content_key(self, ident, encrypted_key):
        """Return the key under our RSA key: PKCS#1 v1.5, or RSAES-OAEP when received
        (RFC 3560); None when it does not decrypt.  Raises MessageError for another
        algorithm."""
        fields = Fields(self.key_encryption_algorithm)
        oid, params = fields.take(OID).oid(), fields.rest()
        if oid == RSAES_OAEP:
            hash_name, mgf_hash, label = oaep_parameters(params[0] if params else None)
            pad = padding.OAEP(padding.MGF1(getattr(hashes, mgf_hash)()),
                               getattr(hashes, hash_name)(), label or None)
        elif oid == RSA_ENCRYPTION:
            pad = padding.PKCS1v15()
        else:
            raise MessageError("encrypted to us with a key transport this tool does not "
                               "support (%s)" % oid)
        if not isinstance(ident.key, (rsa.RSAPrivateKey, TokenRsaKey)):
            return None
        try:
            return ident.key.decrypt(encrypted_key, pad)
        except ValueError:
            return None


def read_key_trans_recipient_info(ber):
    fields = Fields(ber)
    return KeyTransRecipientInfo(fields.take(INTEGER).integer(), fields.take(),
                                 fields.take(SEQUENCE), fields.last(OCTET_STRING).octets())


class KeyAgreeRecipientInfo(NamedTuple):
    """A KeyAgreeRecipientInfo (RFC 5652 6.2.2): the *originator*
    (OriginatorIdentifierOrKey, Ber), *ukm* (bytes or None), the
    *key_encryption_algorithm* (Ber) and *recipient_encrypted_keys*:
    [(RecipientIdentifier, encrypted key)]."""
    version: int
    originator: object
    ukm: object
    key_encryption_algorithm: object
    recipient_encrypted_keys: list

    def recipients(self):
        return self.recipient_encrypted_keys

    def content_key(self, ident, encrypted_key):
        """Return the key for our EC key (RFC 5753 3.1.2): ephemeral-static ECDH with
        the originator's public key, the X9.63 KDF of the scheme, then AES key unwrap
        (RFC 3394); None when it does not unwrap.  Raises MessageError for static
        originator keys and other schemes."""
        fields = Fields(self.key_encryption_algorithm)
        scheme, wrap = fields.take(OID).oid(), algorithm_oid(fields.take(SEQUENCE))
        sizes = {oid: size for size, oid in AES_WRAP.items()}
        if self.originator.tag != ctx(1) or scheme not in KDF_HASHES or wrap not in sizes:
            raise MessageError("encrypted to us with a key agreement this tool does not "
                               "support (%s)" % scheme)
        if not isinstance(ident.key, (ec.EllipticCurvePrivateKey, TokenEcKey)):
            return None
        originator_key = Fields(self.originator)  # OriginatorPublicKey
        originator_key.take(SEQUENCE)  # its algorithm: our curve
        point = originator_key.take(BIT_STRING).body[1:]  # the unused-bits octet, the ECPoint
        public = ec.EllipticCurvePublicKey.from_encoded_point(ident.key.curve, point)
        kek = ecdh_key_encryption_key(ident.key, public, scheme, wrap, sizes[wrap], self.ukm)
        try:
            return keywrap.aes_key_unwrap(kek, encrypted_key)
        except keywrap.InvalidUnwrap:
            return None


def read_key_agree_recipient_info(ber):
    fields = Fields(ber)
    version = fields.take(INTEGER).integer()
    originator = Fields(fields.take(ctx(0))).last()
    ukm = fields.optional(ctx(1))
    ukm = Fields(ukm).last(OCTET_STRING).octets() if ukm is not None else None
    algorithm = fields.take(SEQUENCE)
    keys = [Fields(entry) for entry in bounded(fields.last(SEQUENCE), MAX_RECIPIENT_INFOS,
                                               "RecipientInfos (recipient keys)")]
    return KeyAgreeRecipientInfo(version, originator, ukm, algorithm,
                                 [(key.take(), key.last(OCTET_STRING).octets()) for key in keys])


class OtherRecipientInfo(NamedTuple):
    """A RecipientInfo for other keys than ours: kekri [2], pwri [3] or ori [4]."""
    tag: int

    def recipients(self):
        return []


class KEMRecipientInfo(NamedTuple):
    """A KEMRecipientInfo (RFC 9629 3), the value of an OtherRecipientInfo of type
    id-ori-kem: *rid* (Ber), the *kem*, *kdf* and *wrap* AlgorithmIdentifiers (Ber),
    *kemct*, *kek_length*, *ukm* (bytes or None) and the *encrypted_key*."""
    version: int
    rid: object
    kem: object
    kemct: bytes
    kdf: object
    kek_length: int
    ukm: object
    wrap: object
    encrypted_key: bytes

    def recipients(self):
        return [(self.rid, self.encrypted_key)]

    def content_key(self, ident, encrypted_key):
        """Return the key for our ML-KEM key (RFC 9629 2, RFC 9936): ML-KEM.Decaps of
        kemct, the HKDF the kdf names over the shared secret and CMSORIforKEMOtherInfo,
        then AES key unwrap (RFC 3394); None when it does not unwrap (an altered kemct
        or key).  Raises MessageError for another KEM, KDF or wrap, or a kekLength that
        is not the wrap's key size (RFC 9936 2.2.1)."""
        kem, kdf, wrap = (algorithm_oid(a) for a in (self.kem, self.kdf, self.wrap))
        sizes = {oid: size for size, oid in AES_WRAP.items()}
        if kem not in ML_KEM or kdf not in HKDF_HASHES or self.kek_length != sizes.get(wrap):
            raise MessageError("encrypted to us with a KEMRecipientInfo this tool does not "
                               "support (%s, KDF %s, wrap %s, kekLength %d)"
                               % (ML_KEM.get(kem, kem), kdf, wrap, self.kek_length))
        if not is_ml_kem(ident.key) or kem != ident.cert.key_algorithm:
            return None
        try:
            secret = ident.key.decapsulate(self.kemct)
        except ValueError:  # a ciphertext of the wrong size
            return None
        info = kem_other_info(der_encoding(self.wrap), self.kek_length, self.ukm)
        kek = kem_key_encryption_key(secret, info, self.kek_length, HKDF_HASHES[kdf])
        try:
            return keywrap.aes_key_unwrap(kek, encrypted_key)
        except keywrap.InvalidUnwrap:
            return None


def read_other_recipient_info(ber):
    """Return the KEMRecipientInfo of an OtherRecipientInfo [4] of type id-ori-kem
    (RFC 9629 3), else an OtherRecipientInfo (another type: not one for our keys)."""
    fields = Fields(ber)
    if fields.take(OID).oid() != ID_ORI_KEM:
        return OtherRecipientInfo(ber.tag)
    kemri = Fields(fields.last(SEQUENCE))
    version, rid, kem = kemri.take(INTEGER).integer(), kemri.take(), kemri.take(SEQUENCE)
    kemct, kdf = kemri.take(OCTET_STRING).octets(), kemri.take(SEQUENCE)
    kek_length, ukm = kemri.take(INTEGER).integer(), kemri.optional(ctx(0))
    ukm = Fields(ukm).last(OCTET_STRING).octets() if ukm is not None else None
    wrap, encrypted_key = kemri.take(SEQUENCE), kemri.take(OCTET_STRING).octets()
    if kemri.rest() or not 1 <= kek_length <= 65535:
        raise ValueError("a KEMRecipientInfo unlike RFC 9629's")
    return KEMRecipientInfo(version, rid, kem, kemct, kdf, kek_length, ukm, wrap, encrypted_key)


#: RecipientInfo readers by the RecipientInfo's tag (RFC 5652 6.2): ktri is a SEQUENCE.
RECIPIENT_INFO_READERS = {SEQUENCE: read_key_trans_recipient_info,
                          ctx(1): read_key_agree_recipient_info,
                          ctx(4): read_other_recipient_info}


def read_recipient_info(ber):
    """Return the RecipientInfo in *ber*, read by the reader for its tag (RFC 5652 6.2):
    a value with recipients() -> [(RecipientIdentifier, encrypted key)] and
    content_key(identity, encrypted key) -> the content-encryption key or None."""
    reader = RECIPIENT_INFO_READERS.get(ber.tag)
    return reader(ber) if reader is not None else OtherRecipientInfo(ber.tag)


def names_us(rid, ident):
    """True when a RecipientIdentifier names *ident*'s certificate, or another certificate
    of its key (mail sent before a renewal) (RFC 5652 6.2.1, 6.2.2)."""
    return names_cert(rid, ident.cert, ident.rid) or any(names_cert(rid, c)
                                                         for c in ident.renewals)


def names_cert(rid, cert, issuer_serial=None):
    """True when a RecipientIdentifier names *cert*: by issuerAndSerialNumber, by
    subjectKeyIdentifier, or by a RecipientKeyIdentifier (KeyAgreeRecipientInfo)."""
    if rid.tag == SEQUENCE:  # issuerAndSerialNumber
        return rid.raw == (issuer_serial or issuer_and_serial(cert))
    if rid.tag == ctx(0, constructed=False):  # subjectKeyIdentifier
        return rid.body == subject_key_id(cert)
    if rid.tag == ctx(0):  # rKeyId RecipientKeyIdentifier (kari)
        return Fields(rid).take(OCTET_STRING).octets() == subject_key_id(cert)
    return False


def oaep_parameters(params):
    """Return (hash, MGF1 hash, label) of RSAES-OAEP-params (RFC 8017 A.2.1, RFC 4055 4.1)."""
    hash_name, mgf_hash, source = rsa_parameters(params)
    if source is None:
        return hash_name, mgf_hash, b""
    source = Fields(source)  # pSourceFunc: id-pSpecified and the label
    source.take(OID)
    return hash_name, mgf_hash, source.take(OCTET_STRING).octets()


def content_cipher(env):
    """Return ("AES", key size, "CBC" or "GCM") of the envelope's content encryption
    (RFC 3565, RFC 5084 3.2).  Raises MessageError for another cipher or a GCM tag
    outside 12-16 octets."""
    oid = algorithm_oid(env.content_encryption_algorithm)
    sizes = AES_GCM if env.auth else {oid: size for size, oid in AES_CBC.items()}
    if oid not in sizes:
        raise MessageError("encrypted with a content cipher this tool does not support (%s); "
                           "AES-CBC and AES-GCM are" % oid)
    if env.auth and not 12 <= len(env.mac) <= 16:  # RFC 5084 3.2: 12 to 16 octets
        raise MessageError("AuthEnvelopedData with a %d-octet authentication tag (12 to 16 "
                           "are allowed)" % len(env.mac))
    return "AES", sizes[oid], "GCM" if env.auth else "CBC"


def decrypt_envelope(env, cipher, key):
    """Return the content of *env* decrypted with content-encryption *key* under *cipher*
    (content_cipher()), or None when anything is wrong: no key, a wrong key length, a
    bad padding or tag, a plaintext that is not a MIME entity (RFC 5652 6.3, RFC 5083).
    Decrypted a block at a time: bytes, or a temporary Spool when the message is in one."""
    if key is None or len(key) != cipher[1] or env.encrypted_content is None:
        return None
    algorithm = Fields(env.content_encryption_algorithm)
    algorithm.take(OID)
    params, data = algorithm.rest(), env.encrypted_content
    try:
        if cipher[2] == "GCM":  # GCMParameters: the nonce, then the tag length
            mode = ciphers.modes.GCM(Fields(params[0]).take(OCTET_STRING).octets(), env.mac,
                             min_tag_length=len(env.mac))
        else:
            mode = ciphers.modes.CBC(params[0].octets())
        decryptor = ciphers.Cipher(ciphers.algorithms.AES(key), mode).decryptor()
        if env.auth_attrs is not None:  # the authenticated attributes, as a DER SET OF
            decryptor.authenticate_additional_data(b"\x31" + env.auth_attrs.raw[1:])
        plain = decrypted(decryptor, octet_chunks(data), cipher[2] == "CBC")
        plain = temporary_spool(plain) if isinstance(data.data, Spool) else b"".join(plain)
    except (ValueError, IndexError, crypto_errors.InvalidTag):
        return None
    return plain if is_entity(canonical(plain)) else None


def decrypted(decryptor, chunks, unpad):
    """Yield the plaintext of ciphertext *chunks* through *decryptor*; with *unpad*, the
    CBC padding (RFC 5652 6.3) checked and removed.  Raises ValueError for a bad padding
    (a wrong key: RSA's implicit rejection gives one; or damage), InvalidTag for GCM."""
    held = b""
    for chunk in chunks:
        out = held + decryptor.update(chunk)
        held = out[-16:]
        if len(out) > 16:
            yield out[:-16]
    last = held + decryptor.finalize()
    if unpad:
        pad = last[-1] if last else 0
        if not 1 <= pad <= 16 or last[-pad:] != bytes((pad,)) * pad:
            raise ValueError("a bad CBC padding")
        last = last[:-pad]
    yield last


# -- Whole messages ----------------------------------------------------------------

class Received:
    """What opening one received message found, judged: the outcome of --verify/--decrypt.

    *problem*: why it fails ('' when it passes); *code*: its exit code; *signer*:
    the Signature that vouches for it; *output*: the recovered message for -o.
    """

    def __init__(self, source):
        self.source, self.layers, self.problem, self.code = source, [], "", EX_OK
        self.signer, self.output, self.senders, self.warnings = None, b"", [], []

    @property
    def decrypted_for(self):
        return next((l.address for l in self.layers if l.kind == "encrypted"), "")

    @property
    def signatures(self):
        return [s for layer in self.layers if layer.kind == "signed" for s in layer.signatures]

    def report(self, mode):
        """Return the report line: OK - ... or FAILED - reason."""
        if self.problem:
            return "FAILED - " + self.problem
        signed = ("signed by %s (%s), verified" % (self.senders[0], self.signer.issuer)
                  if self.signer else "not signed")
        if mode == "verify":
            return "OK - " + signed
        where = ("decrypted for %s" % self.decrypted_for if self.decrypted_for
                 else "not encrypted")
        return "OK - %s, %s" % (where, signed)

    def details(self):
        """Return the -v detail lines: one per layer and signer."""
        lines = []
        for n, layer in enumerate(self.layers, 1):
            first, *rest = layer.describe()
            lines += ["layer %d: %s" % (n, first)] + rest
        return lines or ["no S/MIME layer"]


def receive(data, source, keystore, roots, mode, require_signed=False):
    """Open and judge one received message; return its Received.

    *mode*: "verify" (a valid signature of the From address is required) or
    "decrypt" (an unsigned plaintext passes, with a warning, unless
    *require_signed*; a signature present must be valid).
    Raises IdentityError (78) for a key of ours that cannot be read.
    """
    out = Received(source)
    try:
        fields, body = entity_parts(canonical(data))
        if not fields:
            raise MessageError("not an RFC 5322 message (no header fields)")
        header = Message(source, fields, [], b"")
        out.senders = addresses_of(header, "from")
        keyring = Keyring(keystore, [a for name in DELIVERY_FIELDS
                                 for a in addresses_of(header, name)])
        entity_fields = [f for f in fields if f.name.startswith("content-")]
        out.layers, inner = open_layers(entity_fields, body, keyring)
        out.problem = (judge(out, roots, mode == "verify" or require_signed)
                       or inner_from_problem(out, inner))
    except MessageError as exc:
        out.problem, out.code = str(exc), exc.exit_code
        return out
    except (ValueError, LookupError, OverflowError) as exc:  # a certificate we cannot read
        out.problem, out.code = "malformed: %s" % first_line(exc), EX_DATAERR
        return out
    out.code = EX_DATAERR if out.problem else EX_OK
    if out.signer is not None and not out.problem:
        out.warnings += date_mismatch(fields, out.signer)
    outer = b"".join(f.raw for f in fields if not f.name.startswith("content-"))
    content = inner if inner is not None else crlf_body(entity_fields, body)
    if isinstance(content, Spool):
        content = content.chunks()
    out.output = outer + (content if inner is not None else
                          b"".join(f.raw for f in entity_fields) + b"\r\n" + content)
    return out


def inner_from_problem(received, inner):
    """Return why the recovered entity *inner* would misstate who signed it, or '': a
    From field inside the signed content naming another than the verified signer
    (a mail client may show it instead of the outer one)."""
    if received.signer is None or inner is None:
        return ""
    fields = entity_parts(canonical(inner))[0]
    inside = addresses_of(Message(received.source, fields, [], b""), "from")
    if inside and inside != received.senders:
        return ("the signed content carries its own From: %s, not the verified signer %s; "
                "refused, as a mail client could show it instead"
                % (", ".join(inside), received.senders[0]))
    return ""


def judge(received, roots, signed_only):
    """Return why *received* fails, or '' when it passes; set its signer.

    *signed_only*: a message without a signature fails; else it passes, with a
    warning when it was decrypted (its content is not authenticated).
    """
    signatures = received.signatures
    broken = [s for s in signatures if s.broken]
    if broken:
        return broken[0].broken
    if not signatures and signed_only:
        return "not signed"
    if not signatures:
        if received.decrypted_for:
            received.warnings.append(
                "the content is not signed, so it is not authenticated: anyone can write to "
                "your key, and CBC ciphertext can be altered unnoticed (EFAIL); "
                "--require_signed refuses such messages")
        return ""
    if len(received.senders) != 1:  # RFC 5322 3.6.2: one signer cannot vouch for several
        return ("%s: a signature can vouch for exactly one author" % (
            "no From address" if not received.senders else "From names %d addresses (%s)"
            % (len(received.senders), ", ".join(received.senders))))
    verdicts = [(signature_verdict(s, received.senders[0], roots).problem, s)
                for s in signatures]
    good = [s for problem, s in verdicts if not problem]
    if not good:
        return verdicts[0][0]
    received.signer = good[0]
    if any("SHA1" in (s.digest, s.hash) for s in signatures):
        received.warnings.append("signed with SHA-1, which no longer protects a signature "
                                 "against forgery: ask the sender to use SHA-256")
    return ""


def date_mismatch(fields, signature):
    """Return a warning (in a list) when the message's Date and the *signature*'s
    signing-time are more than CLIENT_DATE_SKEW apart or there is no Date: the
    signature is good, but Thunderbird shows it as not valid.  [] otherwise."""
    try:  # the signer chose the attribute: it may hold anything
        signed = calendar.timegm(time.strptime(signature.signing_time, "%Y-%m-%d %H:%M:%S UTC"))
    except (ValueError, OverflowError):
        return []
    dates = [f.value for f in fields if f.name == "date"]
    if not dates:
        return ["no Date header: Thunderbird shows the signature (signed %s) as not valid"
                % signature.signing_time]
    skew = date_skew(dates[0], signed)
    if skew is not None and skew <= CLIENT_DATE_SKEW:
        return []
    return ["the Date header (%s) is %s the signing time (%s): Thunderbird shows the "
            "signature as not valid" % (
                dates[0].decode("ascii", "replace"),
                "unreadable, unlike" if skew is None else "%s from" % duration(skew),
                signature.signing_time)]


def duration(seconds):
    """Return *seconds* in words: '3 days', '2 hours', '15 minutes'."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return "%d %s%s" % (count, unit, "" if count == 1 else "s")
    return "%d seconds" % seconds


def receive_all(settings, reporter):
    """Run --verify or --decrypt over every input; print one line each; return the exit code.

    With several inputs each line starts with the input's name.  A message that
    passes is written to -o (the outer header, then the recovered entity).
    """
    mode = "verify" if settings.verify else "decrypt"
    keystore, paths = keystore_of(settings, reporter), expand_inputs(settings.inputs)
    if len(paths) > 1 and settings.output:
        several_outputs(settings._replace(verify=True))
        distinct_outputs(settings, paths)
    roots = once(lambda: trust_store(settings.ca_file, keystore.revocation))
    stats = Stats(len(paths), "passed")
    for path in paths:
        try:
            received = receive(read_received(path), path, keystore, roots, mode,
                               settings.require_signed)
        except (InputError, IdentityError, OutputError) as exc:
            received = Received(path)
            received.problem, received.code = str(exc), exc.exit_code
        except SmimeToolError:  # a setting at fault (the CA bundle): every input would fail
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: this input fails, the others go on
            received = Received(path)
            received.problem, received.code = "internal error while reading: %s: %s" % (
                type(exc).__name__, first_line(exc)), EX_SOFTWARE
        reporter.say(("%s: " % path if len(paths) > 1 else "") + received.report(mode))
        if settings.verbose:
            for line in received.details():
                reporter.transcript("  " + line)
        for line in received.warnings:
            reporter.warn("%s: %s" % (path, line))
        if received.problem:
            problem = received.problem
            reporter.warn(problem if problem.startswith(path + ":") else "%s: %s" % (path,
                                                                                    problem))
            stats.fault(received.code)
        elif settings.output:
            try:
                write_atomically(output_path(settings, path), received.output,
                                 0o600 if received.decrypted_for else None)
            except OutputError as exc:
                reporter.warn(str(exc))
                stats.fault(exc.exit_code)
    return stats.code


def once(load):
    """Return a function calling *load* the first time only, then returning its value."""
    value = []

    def get():
        if not value:
            value.append(load())
        return value[0]
    return get


###############################################################################
# Harvest: recipients' certificates from the signed mail they send ###########
###############################################################################
# To encrypt to someone you need their certificate; the usual way to get it is
# a signed message from them.  --harvest finds the signatures (also inside an
# encrypted message addressed to one of our identities, or a forwarded part),
# verifies them as --verify does, and saves the sender's certificate as
# <address>.crt once signature, certificate and chain are good.

class Harvested:
    """What --harvest found in one input, and where it went."""

    def __init__(self, address, cert, chain):
        self.address, self.cert, self.chain = address, cert, chain
        self.path = self.note = ""


def harvest(path, keystore, roots):
    """Return the Harvested certificate of the sender of message *path*: its post-quantum
    encryption certificate when the signature carries one (post_quantum_cert()), else
    the signing certificate when it allows encryption.

    Raises MessageError (65) naming why no usable certificate was found,
    IdentityError (78) for a key of ours that cannot be read.
    """
    fields, body = split_header(message_to_crlf(read_input(path)))
    header = Message(path, fields, [], b"")
    sender = addresses_of(header, "from")
    if len(sender) != 1:
        raise MessageError("%s: %s: a signature can vouch for exactly one author" % (
            path, "no From address" if not sender else "From names %d addresses" % len(sender)))
    address = safe_address(sender[0])
    keyring = Keyring(keystore, [a for name in DELIVERY_FIELDS
                                 for a in addresses_of(header, name)])
    reasons = []
    signatures = list(signatures_within([f for f in fields if f.name.startswith("content-")],
                                        body, keyring, reasons))
    if not signatures:
        raise MessageError("%s: %s" % (path, reasons[0] if reasons else
                                       "no S/MIME signature found (the message is not signed)"))
    for sig in signatures:
        problem, chain = signature_verdict(sig, address, lambda: roots)
        pq = None if problem else post_quantum_cert(sig, address, roots)
        if pq is not None:  # the validated path only, its trusted root left out
            return Harvested(address, pq[0], list(pq[1][1:-1]))
        if not problem:
            problem = certificate_problem(sig.cert, address, "encrypt")
            problem = problem and "the certificate for %s %s" % (address, problem)
        if not problem:  # the validated path only, its trusted root left out
            return Harvested(address, sig.cert, list(chain[1:-1]))
        reasons.append(problem)
    raise MessageError("%s: %s" % (path, reasons[-len(signatures)]))


def post_quantum_cert(sig, address, roots):
    """Return (the ML-KEM certificate for *address* that verified signature *sig* carries
    beside its signing certificate, its validated path), or None; the one valid
    longest if several.

    A KEM key cannot sign (RFC 9935), so a sender's post-quantum encryption
    certificate travels in the certificate bag of its signed mail (RFC 8551 2.4.2,
    as a separate encryption certificate does).  It is taken only when it names the
    address the signature vouches for, allows encryption now, chains to a trusted
    root through the certificates of the message, and is within its CAs' name
    constraints.
    """
    found = []
    for cert in sig.certs:
        if cert is sig.cert or key_kind(cert)[0] != "mlkem" or \
                certificate_problem(cert, address, "encrypt"):
            continue
        chain, problem = validated_chain(cert, sig.certs, roots)
        if not problem and not name_constraint_problem(cert, chain[1:]):
            found.append((cert, chain))
    return max(found, key=lambda pair: pair[0].not_valid_after_utc, default=None)


def signatures_within(fields, body, keyring, reasons, depth=0):
    """Yield every Signature of the S/MIME entities in a MIME tree (forwards included).

    What keeps an S/MIME entity from being opened is appended to *reasons*.
    """
    if smime_kind(fields):
        try:
            layers = open_layers(fields, body, keyring)[0]
        except MessageError as exc:
            reasons.append(str(exc))
            return
        for layer in layers:
            yield from layer.signatures
        return
    ctype, params = parse_content_type(field_value(fields, "content-type") or b"text/plain")
    if depth > 8:
        return
    if ctype.startswith("multipart/") and params.get("boundary"):
        for part in multipart_parts(body, params["boundary"].encode("ascii", "replace")):
            yield from signatures_within(*split_header(part), keyring, reasons, depth + 1)
    elif ctype == "message/rfc822":
        inner_fields, inner_body = split_header(to_crlf(decode_body(
            body, transfer_encoding(fields))))
        yield from signatures_within([f for f in inner_fields if f.name.startswith("content-")],
                                     inner_body, keyring, reasons, depth + 1)


def save_harvested(found, directory):
    """Write found.cert (and its chain) to '<dir>/<address>.crt' unless a better one is there.

    A certificate for the address already saved that is valid and expires later is
    kept, unless the new one is post-quantum (ML-KEM) and it is not: an older one
    never replaces a newer one.  A newer one goes first in the file, and the
    certificates there that are still valid stay beside it (the old one until it
    expires: current_cert() chooses), unless it replaces a classical one by a
    post-quantum one.  Returns found with .path and .note set.
    Raises OutputError (73/74).
    """
    path = os.path.join(directory, found.address + ".crt")
    found.path, found.note = path, "saved"
    kept = []
    if os.path.isfile(path):
        there = load_certificates(read_key_file(path), path)
        old = current_cert([c for c in there if found.address in cert_emails(c)])
        if found.cert in there:
            found.note = "unchanged (already saved)"
            return found
        if old is not None and not certificate_problem(old, found.address, "encrypt") and \
                old.not_valid_after_utc >= found.cert.not_valid_after_utc and \
                (key_kind(found.cert)[0] != "mlkem" or key_kind(old)[0] == "mlkem"):
            found.cert, found.note = old, "kept the existing certificate (valid, expires later)"
            return found
        now = datetime.now(timezone.utc)  # a classical one gives way to a post-quantum one
        kept = [c for c in there if c.not_valid_after_utc > now and c not in found.chain] if (
            old is None or key_kind(old)[0] == key_kind(found.cert)[0]) else []
        found.note = ("saved, the older certificate kept beside it until it expires"
                      if old is not None and old in kept
                      else "replaced an older certificate" if old is not None
                      else "replaced %s" % path)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM)
                   for c in [found.cert] + found.chain + kept)
    write_atomically(path, pem)
    return found


def harvest_all(settings, reporter):
    """Run --harvest over every input; print one line each; return the exit code."""
    keystore = keystore_of(settings, reporter)
    try:
        os.makedirs(keystore.dirs[0], exist_ok=True)
    except OSError as exc:
        raise OutputError("%s: cannot create the key directory: %s"
                          % (keystore.dirs[0], exc.strerror or exc), EX_CANTCREAT)
    roots = trust_store(settings.ca_file, keystore.revocation)
    stats = Stats(0)
    for path in expand_inputs(settings.inputs):
        try:
            found = save_harvested(harvest(path, keystore, roots), keystore.dirs[0])
        except (MessageError, InputError, IdentityError) as exc:
            reporter.say("refused %s: %s" % (path, str(exc).split(": ", 1)[-1]))
            reporter.warn(str(exc))
            stats.fault(exc.exit_code)
            continue
        except OutputError as exc:  # the key directory is full or read-only: stop here
            reporter.warn(str(exc))
            stats.fault(exc.exit_code)
            break
        except SmimeToolError:  # a setting at fault: every input would fail
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: this input fails, the others go on
            reporter.say("refused %s: internal error" % path)
            reporter.warn("%s: internal error while reading: %s: %s" % (
                path, type(exc).__name__, first_line(exc)))
            stats.fault(EX_SOFTWARE)
            continue
        reporter.say("%s %s: issuer %s, valid until %s -> %s" % (
            found.note, found.address, found.cert.issuer.rfc4514_string(),
            found.cert.not_valid_after_utc.strftime("%Y-%m-%d"), found.path))
    return stats.code


###############################################################################
# Command line ################################################################
###############################################################################

class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError (exit 64, never 2) and --help and
    --version written with write_stdout() and ended with Finished."""

    def error(self, message):
        raise UsageError("%s (see --help)" % message)

    def print_help(self, file=None):
        """--help: written with write_stdout() (a full device is 74, not silence)."""
        write_stdout(self.format_help().encode("utf-8", "replace"))

    def exit(self, status=0, message=None):  # after --help or --version
        raise Finished(status)


class Version(argparse.Action):
    """--version: the name and version, written with write_stdout(); then Finished."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        write_stdout(("%s %s\n" % (parser.prog, __version__)).encode("utf-8"))
        raise Finished(0)


def build_parser():
    """Return the argparse parser; its errors raise UsageError (exit 64, never 2)."""
    width = help_width()  # once: argparse makes a formatter for every add_argument()
    p = Parser(prog="sparkpostSMIME.py",
               formatter_class=lambda prog: argparse.HelpFormatter(prog, width=width),
               description="S/MIME sign and/or encrypt an email, then write or inject it.",
               epilog="Exit codes: 0 ok, 64 usage, 65 unusable message, 66 no input, "
                      "69 permanent failure, 70 internal, 73 cannot create an output, "
                      "74 output write failed, 75 temporary failure, 77 authentication "
                      "refused, 78 configuration.  See README.md.")
    p.add_argument("inputs", nargs="*", metavar="EMLFILE",
                   help="RFC 5322 message file; - reads standard input")
    add_smime_options(p.add_argument_group("S/MIME"))
    add_receiving_options(p.add_argument_group("receiving"))
    add_delivery_options(p.add_argument_group("output and delivery"))
    add_batch_options(p.add_argument_group("batch and safety"))
    add_gateway_options(p.add_argument_group("gateway (an SMTP relay that signs and encrypts)"))
    p.add_argument("-v", "--verbose", action="store_true",
                   help="transcript of the SMTP/HTTP dialogue on stderr (secrets hidden)")
    p.add_argument("--debug", action="store_true",
                   help="show a Python traceback on internal errors")
    p.add_argument("--version", action=Version, help="show the version and exit")
    return p


def add_smime_options(smime):
    """Add the signing and encryption options to the argument group *smime*."""
    mode = smime.add_mutually_exclusive_group()
    mode.add_argument("--sign", action="store_true",
                      help="sign, opaque application/pkcs7-mime (survives body-rewriting relays)")
    mode.add_argument("--sign_detached", "--sign-detached", action="store_true",
                      help="sign, multipart/signed (readable without S/MIME)")
    smime.add_argument("--encrypt", action="store_true",
                       help="encrypt to every To/Cc/Bcc recipient and the sender")
    smime.add_argument("--cipher", choices=CIPHERS, default="aes256",
                       help="content cipher for --encrypt (default aes256)")
    smime.add_argument("--pq_only", "--pq-only", action="store_true",
                       help="with --encrypt: refuse a message unless every recipient and the "
                            "sender's own copy are post-quantum (ML-KEM)")
    smime.add_argument("--keys", action="append", default=[], metavar="DIR",
                       help="directory of <address>.pem/.crt/.p12 files (repeatable)")
    smime.add_argument("--keep_date", "--keep-date", action="store_true",
                       help="when signing, keep the input's Date even when it is far from the "
                            "signing time (Thunderbird then shows the signature as not valid)")


def add_receiving_options(receiving):
    """Add --verify, --decrypt, --harvest and their options to the argument group *receiving*."""
    reading = receiving.add_mutually_exclusive_group()
    reading.add_argument("--verify", action="store_true",
                         help="check the signatures of received messages (decrypting first when "
                              "they are encrypted to one of our keys)")
    reading.add_argument("--decrypt", action="store_true",
                         help="decrypt received messages for our keys; check any signature "
                              "inside")
    reading.add_argument("--harvest", action="store_true",
                         help="save the sender's certificate from signed messages as "
                              "<address>.crt in the first key directory")
    receiving.add_argument("--require_signed", "--require-signed", action="store_true",
                           help="with --decrypt: refuse (65) content that is not signed; "
                                "unsigned content is not authenticated")
    receiving.add_argument("--ca", default="", metavar="FILE",
                           help="trusted roots (PEM) for --verify, --decrypt and --harvest "
                                "(default $SMIME_CA_FILE, else the system store)")
    receiving.add_argument("--revocation", choices=REVOCATION_POLICIES, default="",
                           help="CRL and OCSP checks of signers, recipients and our own "
                                "certificate: off, soft (default: revoked is refused, no "
                                "answer warns) or hard (no fresh good answer is refused)")


def add_delivery_options(out):
    """Add the output and sending options to the argument group *out*."""
    out.add_argument("-o", "--output", default="", metavar="FILE|DIR",
                     help="write the message to FILE (or one file per input into DIR)")
    send = out.add_mutually_exclusive_group()
    send.add_argument("--send_smtp", "--send-smtp", action="store_true",
                      help="inject over SMTP (SMTP_* variables)")
    send.add_argument("--send_api", "--send-api", action="store_true",
                      help="send through the SparkPost transmissions API (SPARKPOST_* variables)")
    out.add_argument("--track", action="store_true",
                     help="SparkPost open/click tracking (unsigned mail only)")
    out.add_argument("--campaign", default="sparkpost-SMIME",
                     help="SparkPost campaign id (at most 64 bytes)")
    out.add_argument("--mail_from", "--mail-from", default="", metavar="ADDR",
                     help="envelope sender (MAIL FROM), e.g. a bounce domain (default: From)")
    out.add_argument("--header", action="append", default=[], metavar='"NAME: VALUE"',
                     help="add an outer header, e.g. X-Virtual-MTA or X-Binding (repeatable)")
    out.add_argument("--env", action="append", default=[], metavar="FILE",
                     help="load settings from FILE (KEY=value; 'export' allowed)")
    out.add_argument("--dry_run", "--dry-run", action="store_true",
                     help="build everything, show what would be sent, do not connect")


def add_batch_options(batch):
    """Add the batch options (jobs, retries, journal, archive) to the argument group *batch*."""
    batch.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="N sessions in N processes at once (default 1)")
    batch.add_argument("--repeat", type=int, default=1, metavar="N",
                       help="handle each input N times (timing runs)")
    batch.add_argument("--retries", type=int, default=3, metavar="N",
                       help="retries of temporary failures, exponential backoff (default 3)")
    batch.add_argument("--retry_delay", "--retry-delay", type=float, default=1.0, metavar="S",
                       help="first retry wait in seconds, doubled each time (default 1)")
    batch.add_argument("--results", default="", metavar="FILE",
                       help="append one JSON line per message to FILE")
    batch.add_argument("--resume", action="store_true",
                       help="with --results: skip inputs already recorded as sent")
    batch.add_argument("--archive", default="", metavar="DIR",
                       help="keep the exact bytes of every sent message in Maildir DIR")


def add_gateway_options(gateway):
    """Add the --serve options to the argument group *gateway*."""
    gateway.add_argument("--serve", default="", metavar="[HOST:]PORT",
                         help="receive messages over SMTP (default host 127.0.0.1) and pass "
                              "them on built, with --send_smtp or --send_api")
    gateway.add_argument("--opportunistic", action="store_true",
                         help="with --serve --encrypt and a sign option: encrypt when every "
                              "recipient has a certificate, else sign only")
    gateway.add_argument("--max_size", "--max-size", type=int, default=20_000_000,
                         metavar="OCTETS", help="largest message taken (SIZE; default 20000000)")
    gateway.add_argument("--trusted_network", "--trusted-network", action="store_true",
                         help="allow --serve beyond loopback without STARTTLS and AUTH")


def help_width():
    """Return the terminal width for --help (os, not shutil: shutil costs 3 ms to import)."""
    try:
        return max(40, int(os.environ.get("COLUMNS") or os.get_terminal_size(1).columns) - 2)
    except (OSError, ValueError):
        return 78


_HEADER_NAME = re.compile(r"[!-9;-~]+\Z")


def parse_header_option(text):
    """Return a CRLF header line from --header "Name: value".  Raises UsageError."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if (not sep or not _HEADER_NAME.match(name) or not value or not value.isascii()
            or any(c in value for c in "\r\n\0")):
        raise UsageError('--header %r: expected "Name: value" in ASCII on one line' % text)
    if name.lower().startswith("content-") or name.lower() in ("mime-version", "bcc"):
        raise UsageError("--header %s: this header is set by the tool" % name)
    return ("%s: %s\r\n" % (name, value)).encode("ascii")


def parse_args(argv):
    """Return the Settings the command line *argv* asks for (environment not read yet).

    Raises UsageError (64) for unknown, missing or conflicting options.
    """
    ns = build_parser().parse_args(argv)
    sign_mode = "opaque" if ns.sign else "detached" if ns.sign_detached else ""
    send = "smtp" if ns.send_smtp else "api" if ns.send_api else ""
    serve = gateway_options(ns, sign_mode, send)
    reading = reading_options(ns, sign_mode, send)
    signing_options(ns, sign_mode)
    if len(ns.inputs) > 1 or ns.repeat > 1:
        several_outputs(Settings(tuple(ns.inputs), output=ns.output, send=send,
                                 verify=bool(reading)))
    delivery_options(ns, sign_mode, send)
    batch_options(ns, send)
    return Settings(inputs=tuple(ns.inputs), sign_mode=sign_mode, encrypt=ns.encrypt,
                   cipher=ns.cipher, keys=tuple(ns.keys), output=ns.output, send=send,
                   track=ns.track, campaign=ns.campaign, mail_from=ns.mail_from,
                   headers=tuple(parse_header_option(h) for h in ns.header),
                   env_files=tuple(ns.env), dry_run=ns.dry_run, keep_date=ns.keep_date,
                   verbose=ns.verbose,
                   retries=ns.retries, harvest=ns.harvest, verify=ns.verify,
                   decrypt=ns.decrypt, require_signed=ns.require_signed, ca=ns.ca,
                   revocation=ns.revocation, jobs=ns.jobs,
                   repeat=ns.repeat, results=ns.results, resume=ns.resume, archive=ns.archive,
                   retry_delay=ns.retry_delay, pq_only=ns.pq_only, serve=serve,
                   opportunistic=ns.opportunistic, max_size=ns.max_size,
                   trusted_network=ns.trusted_network)


def reading_options(ns, sign_mode, send):
    """Check the options of --verify, --decrypt and --harvest; return the one given
    ("--verify", ...) or ''.  Raises UsageError."""
    reading = "--verify" if ns.verify else "--decrypt" if ns.decrypt else \
        "--harvest" if ns.harvest else ""
    if reading and (sign_mode or ns.encrypt or send or ns.repeat > 1 or ns.jobs > 1):
        raise UsageError("%s reads received messages: it does not go with sign, encrypt, send, "
                         "--repeat or --jobs options" % reading)
    if ns.harvest and ns.output:
        raise UsageError("--harvest saves certificates in the first key directory, not in -o")
    if ns.require_signed and not ns.decrypt:
        raise UsageError("--require_signed is for --decrypt (--verify always requires a "
                         "signature)")
    if ns.ca and not reading:
        raise UsageError("--ca is for --verify, --decrypt and --harvest")
    return reading


def signing_options(ns, sign_mode):
    """Check the options that go with signing and encrypting.  Raises UsageError."""
    if ns.keep_date and not sign_mode:
        raise UsageError("--keep_date is for --sign and --sign_detached (the Date of a signed "
                         "message is its signing time)")
    if sign_mode and any(h.partition(":")[0].strip().lower() == "date" for h in ns.header):
        raise UsageError("--header Date: a signed message's Date is its signing time (or the "
                         "input's, with --keep_date)")
    if ns.pq_only and not ns.encrypt:
        raise UsageError("--pq_only goes with --encrypt")


def delivery_options(ns, sign_mode, send):
    """Check the output and sending options.  Raises UsageError."""
    if send and ns.output:
        raise UsageError("-o and --send_%s do not go together: the message is sent" % send)
    if ns.track and sign_mode:
        raise UsageError("--track rewrites links and adds an open pixel, which breaks "
                         "signatures: drop --track or the sign option")
    if len(ns.campaign.encode("utf-8")) > MAX_CAMPAIGN_ID:
        raise UsageError("--campaign %r is %d bytes; SparkPost campaign ids are at most %d"
                         % (ns.campaign, len(ns.campaign.encode("utf-8")), MAX_CAMPAIGN_ID))
    if ns.mail_from and ("@" not in ns.mail_from or re.search(r"[\s<>]", ns.mail_from)):
        raise UsageError("--mail_from %r is not an e-mail address" % ns.mail_from)


def batch_options(ns, send):
    """Check the batch options (retries, jobs, journal, archive, dry run).  Raises
    UsageError."""
    if ns.retries < 0 or ns.jobs < 1 or ns.repeat < 1 or not 0 <= ns.retry_delay <= 60:
        raise UsageError("--retries must be 0 or more, --jobs and --repeat 1 or more, "
                         "--retry_delay 0 to 60 seconds")
    if ns.resume and not ns.results:
        raise UsageError("--resume needs --results FILE (the journal of the earlier run)")
    if ns.archive and not send:
        raise UsageError("--archive keeps sent messages: use it with --send_smtp or --send_api")
    if ns.dry_run and (ns.archive or not send):
        raise UsageError("--dry_run goes with a send option, without --archive")


def gateway_options(ns, sign_mode, send):
    """Check the options of --serve (and the inputs without it); return (host, port) or ().
    Raises UsageError."""
    if not ns.serve:
        if not ns.inputs:
            raise UsageError("the following arguments are required: EMLFILE (or --serve "
                             "[HOST:]PORT) (see --help)")
        if ns.opportunistic or ns.trusted_network:
            raise UsageError("--opportunistic and --trusted_network go with --serve")
        return ()
    if ns.inputs or not send:
        raise UsageError("--serve receives messages over SMTP and passes them on: give no "
                         "EMLFILE, and --send_smtp or --send_api for the next hop")
    if (ns.repeat > 1 or ns.resume or ns.dry_run or ns.output or ns.verify or ns.decrypt
            or ns.harvest):
        raise UsageError("--serve does not go with --repeat, --resume, --dry_run, -o, "
                         "--verify, --decrypt or --harvest")
    if ns.opportunistic and not (ns.encrypt and sign_mode):
        raise UsageError("--opportunistic needs --encrypt and --sign or --sign_detached (the "
                         "messages that cannot be encrypted are signed)")
    if not 1000 <= ns.max_size <= 1 << 31:
        raise UsageError("--max_size must be 1000 to %d octets" % (1 << 31))
    return parse_listen(ns.serve)


def check_dependencies(settings):
    """Check the packages this run needs, before it starts (require()).  Raises
    DependencyError."""
    if (settings.sign_mode or settings.encrypt or settings.verify or settings.decrypt
            or settings.harvest or settings.serve):
        require("cryptography")
    if settings.send == "api":
        require("requests")
    if settings.serve:
        require("aiosmtpd")


def run(settings, reporter):
    """Write, send, verify, decrypt or harvest every input; return the exit code."""
    check_dependencies(settings)
    for secret in settings.secrets():
        reporter.secret(secret)
    for notice in settings.notices:
        reporter.warn(notice)
    if settings.harvest:
        return harvest_all(settings, reporter)
    if settings.verify or settings.decrypt:
        return receive_all(settings, reporter)
    if settings.serve:
        return serve(settings, reporter)
    return run_batch(settings, reporter)


def main(argv=None, environ=None):
    """Run the command line; return the exit code (errors are one line on stderr).

    The one place that turns errors into a line and an exit code.
    """
    argv = sys.argv[1:] if argv is None else argv
    reporter = Reporter()
    try:
        with warnings.catch_warnings():
            if "--debug" not in argv:  # a dependency's warnings (deprecations) are not
                warnings.simplefilter("ignore")  # our output: our errors say what is wrong
            return run(load_settings(argv, os.environ if environ is None else environ),
                       reporter)
    except Finished as done:
        return done.status
    except SmimeToolError as exc:
        reporter.warn(str(exc))
        return exc.exit_code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_OK
    except KeyboardInterrupt:
        reporter.warn("interrupted")
        return 130
    except Exception as exc:  # a bug: say so in one line unless --debug
        if "--debug" in argv:
            raise
        reporter.warn("internal error: %s: %s (run with --debug for details)"
                      % (type(exc).__name__, exc))
        return EX_SOFTWARE


def exit_now(code):
    """Flush stdout and stderr, then end the process with *code* at once.

    Tearing the interpreter down frees some 300 imported modules one by one
    (~8 ms per run) for nothing: the OS reclaims the process whole.  Every file
    the tool writes (outputs, --results, --archive) is closed before this.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
