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
# ]
# ///

__doc__ = """sparkpostSMIME - S/MIME sign and/or encrypt a finished email, then inject it.

Usage:
    ./sparkpostSMIME.py EMLFILE|DIR [...] [--sign | --sign_detached] [--encrypt]
                        [--keys DIR] [-o FILE|DIR] [--send_smtp | --send_api] [options]
    ./sparkpostSMIME.py --verify | --decrypt EMLFILE|DIR [...] [--keys DIR] [--ca FILE]
                        [-o FILE|DIR]
    ./sparkpostSMIME.py --harvest EMLFILE|DIR [...] [--keys DIR] [--ca FILE]

Reads RFC 5322 messages ("-" is standard input), builds the S/MIME message
(RFC 8551) and writes it to standard output, or sends it over SMTP (RFC 5321)
or through the SparkPost transmissions API, one message or a batch (--jobs,
--repeat, --results, --resume, --archive).  --verify and --decrypt check what
arrives; --harvest saves the certificates of signed mail.  ``--help`` lists
every option.

Keys and certificates are found by the addresses in the message, in each
``--keys DIR``, then each directory of ``$SMIME_KEYS_DIR`` (":"-separated),
then the current directory:
    <from>.pem            sender's private key (may also hold its certificate and chain)
    <from>.crt            sender's certificate (when the .pem holds only the key)
    <from>.p12 / .pfx     sender's key and certificates in one PKCS#12 file
    <recipient>.crt       each recipient's certificate (for --encrypt)

Environment:
    SMIME_KEYS_DIR        extra key directories, ":"-separated
    SMIME_KEY_PASSWORD    passphrase of encrypted .pem keys and PKCS#12 files
    SMIME_CA_FILE         trusted roots for --verify, --decrypt and --harvest
    SMTP_HOST, SMTP_PORT, SMTP_USER, SMTP_PASSWORD, SMTP_TLS, SMTP_CAFILE,
    SMTP_TLS_VERIFY, SMTP_TIMEOUT, SMTP_SPARKPOST, SMTP_HELO     (--send_smtp)
    SPARKPOST_API_KEY, SPARKPOST_HOST, SPARKPOST_TIMEOUT          (--send_api)

Exit codes (sysexits.h):
    0 ok, 64 usage, 65 unusable message, 66 input missing or unreadable,
    69 permanent delivery failure, 70 internal error, 75 temporary failure,
    77 authentication refused, 78 configuration (setting, key or certificate),
    130 interrupted.
"""

import os
import re
import sys
import time
from typing import NamedTuple

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
EX_TEMPFAIL = 75     #: temporary failure: try again later
EX_NOPERM = 77       #: authentication refused
EX_CONFIG = 78       #: missing/bad setting, key or certificate

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
#: Longest wait between two attempts at one message, and all waits for it, in seconds.
MAX_RETRY_WAIT, MAX_TOTAL_WAIT = 30.0, 45.0
#: Messages from which a progress bar replaces per-message lines on a terminal.
PROGRESS_MIN = 50
#: SparkPost's limits for a transmission (API "Transmissions", RFC 822 content).
MAX_CAMPAIGN_ID, MAX_RFC822 = 64, 20_000_000
#: Base64 lines cut by one struct.unpack call (a 3 KB format string).
LINES_PER_CUT = 1024
#: Private key files tried for a sender, in this order, in each key directory.
KEY_SUFFIXES = (".pem", ".p12", ".pfx")


###############################################################################
# Errors ######################################################################
###############################################################################

class SmimeToolError(Exception):
    """Root of every error this tool reports; carries its exit code."""
    exit_code = EX_SOFTWARE


class UsageError(SmimeToolError):
    """Bad or conflicting command-line options."""
    exit_code = EX_USAGE


class InputError(SmimeToolError):
    """An input file is missing or unreadable."""
    exit_code = EX_NOINPUT


class MessageError(SmimeToolError):
    """The message itself cannot be used (not RFC 5322, no From, no recipient)."""
    exit_code = EX_DATAERR


class ConfigError(SmimeToolError):
    """A setting is missing or malformed."""
    exit_code = EX_CONFIG


class IdentityError(ConfigError):
    """A key or certificate is missing, unreadable or unfit for its use."""


class DeliveryError(SmimeToolError):
    """Sending failed.  *session*: the connection is unusable (reconnect, or for a TLS,
    configuration or authentication failure, stop the batch)."""

    def __init__(self, text, exit_code=EX_TEMPFAIL, session=False, hint="", halt=False):
        super().__init__(text)
        self.exit_code, self.session, self.hint = exit_code, session, hint
        self.retry_after = 0.0  #: seconds the server asked us to wait (HTTP Retry-After)
        self.halt = halt  #: later messages would meet the same: no retry, stop the batch


class RecipientsRefused(DeliveryError):
    """Some or all recipients were refused; *refused* maps address -> (code, text)."""

    def __init__(self, refused, accepted=(), hint="", reply=""):
        self.refused, self.accepted, self.reply = refused, list(accepted), reply
        worst = min(smtp_exit_code(code) for code, _ in refused.values())  # any 5xx: 69
        what = "some recipients were refused" if accepted else "every recipient was refused"
        super().__init__(what, worst, hint=hint)


def smtp_exit_code(code):
    """Map an SMTP reply code to an exit code (RFC 5321 4.2.1, RFC 4954 6).

    530/534/535 (authentication) -> 77; 4xx (transient) -> 75; anything else -> 69.
    """
    if code in (530, 534, 535):
        return EX_NOPERM
    return EX_TEMPFAIL if 400 <= code < 500 else EX_UNAVAILABLE


###############################################################################
# Settings ####################################################################
###############################################################################
# Defaults < env files (--env, ./.env) < the real environment < command line.
# Secrets come only from the environment and are registered for redaction.

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
TLS_MODES = ("auto", "starttls", "tls", "none")
SPARKPOST_SMTP_HOSTS = ("smtp.sparkpostmail.com", "smtp.eu.sparkpostmail.com")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def load_env_files(paths):
    """Load KEY=value files (python-dotenv syntax, "export" allowed) into os.environ.

    Variables already in the environment win.  ./.env is loaded when present.
    Raises ConfigError for an unreadable file.
    """
    files = list(paths) + ([".env"] if os.path.isfile(".env") else [])
    if not files:
        return
    from dotenv import dotenv_values
    for path in files:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ConfigError("--env %s: cannot read this file" % path)
        warn_if_exposed(path, "env file")
        for key, value in dotenv_values(path).items():
            if value is not None and key not in os.environ:
                os.environ[key] = value


def warn_if_exposed(path, what):
    """Warn when a file holding secrets is readable by group or others."""
    try:
        if os.stat(path).st_mode & 0o077:
            warn("%s %s is readable by group or others: chmod 0600 %s" % (what, path, path))
    except OSError:
        pass


def env_text(name, default=""):
    """Return the environment variable *name*, stripped, or *default*."""
    return os.environ.get(name, default).strip() or default


def env_bool(name, default):
    """Return an on/off environment variable.  Raises ConfigError."""
    value = env_text(name).lower()
    if not value:
        return default
    if value in TRUE_WORDS or value in FALSE_WORDS:
        return value in TRUE_WORDS
    raise ConfigError("%s=%r: use 1 or 0" % (name, value))


def env_number(name, default, kind=int, low=1, high=None):
    """Return a numeric environment variable within [low, high].  Raises ConfigError."""
    value = env_text(name)
    if not value:
        return default
    try:
        number = kind(value)
        if number < low or (high is not None and number > high):
            raise ValueError
    except ValueError:
        span = "%s-%s" % (low, high) if high else "at least %s" % low
        raise ConfigError("%s=%r is not a valid number (%s)" % (name, value, span))
    return number


def env_secret(name):
    """Return a secret environment variable and register it for redaction."""
    value = os.environ.get(name, "")
    register_secret(value)
    return value


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
    def from_env(cls):
        """Build and check the settings from SMTP_* variables.  Raises ConfigError."""
        host = env_text("SMTP_HOST")
        if not host:
            raise ConfigError("SMTP_HOST is not set: export SMTP_HOST=<your MTA or "
                              "smtp.sparkpostmail.com> (see my_envs.sh.example)")
        tls = env_text("SMTP_TLS", "auto").lower()
        if tls not in TLS_MODES:
            raise ConfigError("SMTP_TLS=%r: use one of %s" % (tls, ", ".join(TLS_MODES)))
        user, password = env_text("SMTP_USER"), env_secret("SMTP_PASSWORD")
        if bool(user) != bool(password):
            missing = "SMTP_PASSWORD" if user else "SMTP_USER"
            raise ConfigError("%s is not set: SMTP authentication needs both SMTP_USER and "
                              "SMTP_PASSWORD (or neither, for an internal MTA)" % missing)
        register_secret("\0%s\0%s" % (user, password) if password else "")
        cafile = env_text("SMTP_CAFILE")
        if cafile and not os.access(cafile, os.R_OK):
            raise ConfigError("SMTP_CAFILE=%s: cannot read this file" % cafile)
        return cls(host=host, port=env_number("SMTP_PORT", 465 if tls == "tls" else 25,
                                               high=65535),
                   user=user, password=password, tls=tls, cafile=cafile,
                   verify=env_bool("SMTP_TLS_VERIFY", True),
                   timeout=env_number("SMTP_TIMEOUT", 60.0, float, low=0.1),
                   sparkpost=env_bool("SMTP_SPARKPOST", host.lower() in SPARKPOST_SMTP_HOSTS),
                   helo=env_text("SMTP_HELO"))

    def __repr__(self):
        return "SmtpSettings(%s)" % self.describe()

    def describe(self):
        """Return 'host, port N, user="u", password="***"' (never the password)."""
        creds = ', user="%s", password="***"' % self.user if self.user else ""
        return "%s, port %d%s" % (self.host, self.port, creds)


class ApiSettings(NamedTuple):
    """SparkPost transmissions API settings."""
    key: str
    base_url: str = "https://api.sparkpost.com/api/v1"
    timeout: float = 60.0

    def __repr__(self):
        return "ApiSettings(%s, key=***)" % self.base_url

    @classmethod
    def from_env(cls):
        """Build and check the settings from SPARKPOST_* variables.  Raises ConfigError."""
        key = env_secret("SPARKPOST_API_KEY").strip()
        if not key:
            raise ConfigError("SPARKPOST_API_KEY is not set: export SPARKPOST_API_KEY=<an API key "
                              "with Transmissions: Read/Write>")
        return cls(key=key, base_url=api_base_url(env_text("SPARKPOST_HOST",
                                                            "https://api.sparkpost.com")),
                   timeout=env_number("SPARKPOST_TIMEOUT", 60.0, float, low=0.1))


def api_base_url(host):
    """Return '<scheme>://<host>/api/v1' from SPARKPOST_HOST.  Raises ConfigError.

    A bare host gets https://; a trailing '/' or '/api/v1' is tolerated;
    http:// is accepted only for loopback, so the API key never travels in clear.
    """
    from urllib.parse import urlsplit
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


###############################################################################
# Output helpers ##############################################################
###############################################################################

_SECRETS = []


def register_secret(value):
    """Remember a secret and its base64 forms (at every alignment) for redact()."""
    if not value or len(value) < 3:
        return
    import base64
    raw = value.encode("utf-8")
    forms = {value}
    for pad in range(3):  # the secret's base64 at each of the three byte alignments
        text = base64.b64encode(b"\0" * pad + raw).decode()
        skip = (pad * 4 + 2) // 3 if pad else 0
        forms.add(text[skip:len(text) - 4].rstrip("=") if len(raw) > 6 else text[skip:])
    _SECRETS.extend(sorted((f for f in forms if len(f) >= 3), key=len, reverse=True))


def redact(text):
    """Return *text* with every registered secret replaced by ***."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def warn(text):
    """Write one diagnostic line to stderr (never stdout: stdout is the product)."""
    sys.stderr.write("sparkpostSMIME: %s\n" % redact(text))
    sys.stderr.flush()


_WARNED = set()


def warn_once(topic, text):
    """warn() *text* the first time *topic* comes up in this process."""
    if topic not in _WARNED:
        _WARNED.add(topic)
        warn(text)


def say(text):
    """Write one report line to stdout (the product when sending)."""
    sys.stdout.write(redact(text) + "\n")
    sys.stdout.flush()


def transcript(line):
    """Write one verbose transcript line (swaks-style glyphs) to stderr."""
    sys.stderr.write(redact(line) + "\n")


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

    @property
    def recipients(self):
        """Every To, Cc and Bcc address, in that order, without repeats."""
        return list(dict.fromkeys(self.to + self.cc + self.bcc))


def read_input(path):
    """Return the bytes of *path* ("-" = stdin).  Raises InputError."""
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as fh:
            return fh.read()
    except IsADirectoryError:
        raise InputError("%s: is a directory, expected a message file" % path)
    except OSError as exc:
        raise InputError("%s: cannot read: %s" % (path, exc.strerror or exc))


def to_crlf(data):
    """Return *data* with every line ending (LF, CR or CRLF) made CRLF."""
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    crlf = data.count(b"\r\n")
    if crlf == data.count(b"\n") == data.count(b"\r"):
        return data  # already canonical: the usual case, no copy
    return _LINE_END.sub(b"\r\n", data)


#: A Content-Transfer-Encoding field's value "binary", matched from "ransfer-encoding".
_BINARY_CTE = re.compile(rb"(?i)ransfer-encoding[ \t]*:[ \t]*binary\b")
#: One raw line and its ending, whatever that ending is (LF, CR or CRLF).
_RAW_LINE = re.compile(rb"([^\r\n]*)(\r\n|\n|\r|\Z)")


def declares_binary(data):
    """True when *data* holds a Content-Transfer-Encoding: binary field (RFC 2045 6.2).

    Finds "ransfer-" with C-speed substring searches first (it is rare), so the
    usual message costs microseconds; a false alarm only costs a closer look.
    """
    for marker in (b"ransfer-", b"RANSFER-"):
        at = data.find(marker)
        while at >= 0:
            if _BINARY_CTE.match(data, at):
                return True
            at = data.find(marker, at + 1)
    return False


def message_to_crlf(data):
    """Return a whole message with CRLF line endings, binary part bodies excepted.

    A part declared "binary" (RFC 2045 6.2, RFC 3030) has no line structure:
    its bytes stay exactly as they are; only the line break before the next
    boundary delimiter belongs to the delimiter (RFC 2046 5.1.1) and becomes CRLF.
    """
    return entity_to_crlf(data) if declares_binary(data) else to_crlf(data)


def entity_to_crlf(raw):
    """Return one raw MIME entity (header, empty line, body) with CRLF line endings
    in its header and in every body but those declared binary."""
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
        body = multipart_to_crlf(rest, params["boundary"].encode("ascii", "replace"))
    elif cte == b"binary":
        body = rest
    elif ctype == "message/rfc822" and cte not in (b"base64", b"quoted-printable"):
        body = entity_to_crlf(rest)
    else:
        body = to_crlf(rest)
    return b"".join(head) + separator + body


def multipart_to_crlf(raw, boundary):
    """Return a raw multipart body with CRLF line endings, binary parts kept as they are."""
    delimiter = re.compile(rb"(?:\A|\r\n|\n|\r)--" + re.escape(boundary)
                           + rb"(--)?[ \t]*(?=\r\n|\n|\r|\Z)")
    out, pos, first = [], 0, True
    for mark in delimiter.finditer(raw):
        segment = raw[pos:mark.start()]  # the preamble, then each part
        out.append(to_crlf(segment) if first else entity_to_crlf(segment))
        out.append(to_crlf(mark.group(0)))
        pos, first = mark.end(), False
        if mark.group(1):  # the close delimiter: an epilogue follows
            return b"".join(out) + to_crlf(raw[pos:])
        end = _RAW_LINE.match(raw, pos)  # the rest of the delimiter line
        out.append(to_crlf(end.group(0)))
        pos = end.end()
    out.append(to_crlf(raw[pos:]) if first else entity_to_crlf(raw[pos:]))
    return b"".join(out)


def split_header(data):
    """Split CRLF *data* into ([Field, ...], body).

    The header ends at the first empty line or, as in Python's email parser,
    at the first line that is neither a field nor a continuation.
    """
    fields, pos, size = [], 0, len(data)
    while pos < size:
        end = data.find(b"\r\n", pos)
        end = size if end < 0 else end
        line = data[pos:end]
        if not line:
            return fields, data[end + 2:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].raw += line + b"\r\n"
        else:
            match = _FIELD_NAME.match(line)
            if not match:
                break
            fields.append(Field(match.group(1).decode("ascii").lower(), line + b"\r\n"))
        pos = end + 2
    return fields, data[pos:]


def parse_message(data, source="-"):
    """Parse raw bytes into a Message with its addresses.  Raises MessageError."""
    if not data.strip():
        raise MessageError("%s: empty input, expected an RFC 5322 message" % source)
    mbox = _MBOX_FROM.match(data)
    if mbox:
        data = data[mbox.end():]
    data = message_to_crlf(data)
    fields, body = split_header(data)
    if not fields or b"\x00" in data[:len(data) - len(body)]:
        raise MessageError("%s: not an RFC 5322 message (no header fields)" % source)
    outer = [f for f in fields if not f.name.startswith("content-") and f.name != "mime-version"]
    entity = [f for f in fields if f.name.startswith("content-")]
    msg = Message(source, outer, entity, body)
    find_addresses(msg)
    return msg


def find_addresses(msg):
    """Fill msg.sender/to/cc/bcc from the header.  Raises MessageError."""
    from_ = addresses_of(msg, "from")
    if not from_:
        raise MessageError("%s: no From address; the sender's address selects the signing key"
                           % msg.source)
    msg.sender = from_[0]
    msg.to, msg.cc, msg.bcc = (addresses_of(msg, name) for name in RECIPIENT_FIELDS)
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
    if len(values) == 1:
        match = _ONE_ADDRESS.match(values[0])
        if match:
            return [((match.group(1) or "").strip(), match.group(2) or match.group(3))]
    from email.utils import getaddresses
    return getaddresses(values)


def addresses_of(msg, name):
    """Return the lower-cased addresses of every *name* field.  Raises MessageError."""
    values = [f.value.decode("utf-8", "replace") for f in msg.outer if f.name == name]
    found = []
    for display, address in parse_addresses(values):
        if not address and not display:
            continue  # empty group such as "undisclosed-recipients:;"
        if "@" not in address or any(c.isspace() for c in address):
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
    from email.utils import getaddresses
    values = [f.value.decode("utf-8", "replace") for f in msg.outer if f.name == name]
    names = {}
    for display, address in getaddresses(values):
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


def is_transport_safe(data):
    """True when *data* (CRLF) is 7-bit, short-lined and free of From/space traps.

    Substring tests run in C; this is on the hot path of every message.
    """
    return (data.isascii() and b"\0" not in data and not has_long_line(data)
            and b"\nFrom " not in data and not data.startswith(b"From ")
            and b" \r\n" not in data and b"\t\r\n" not in data
            and not data.endswith((b" ", b"\t")) and not has_lone_dot(data))


def has_lone_dot(data):
    """True when a line of CRLF *data* is a single ".": the SMTP end of data.

    SMTP dot-stuffs such a line, but SparkPost's API refuses content holding
    CRLF "." CRLF and must not be given dot-stuffed content (its "RFC 822
    Content" rules), so the canonical form never has one: quoted-printable
    writes it "=2E", which decodes to the same text (RFC 2045 6.7).
    """
    return (b"\r\n.\r\n" in data or data.startswith(b".\r\n") or data.endswith(b"\r\n.")
            or data == b".")


def has_long_line(data):
    """True when a line of CRLF *data* exceeds 998 octets (RFC 5322 2.1.1)."""
    return len(data) > MAX_LINE and max(map(len, data.split(b"\r\n"))) > MAX_LINE


def canonical_entity(fields, body):
    """Return the canonical bytes (header, empty line, body) of one MIME entity.

    *fields* are the entity's Field objects; *body* is CRLF.  Raises MessageError.
    """
    if (not is_transport_safe(body) or transfer_encoding(fields) == b"binary"
            or declares_binary(body)):
        fields, body = canonical_parts(fields, body)
    return b"".join([b"".join(safe_field(f) for f in fields), b"\r\n", body])


def canonical_parts(fields, body):
    """Return (fields, body) of an entity whose body needs work, made canonical."""
    ctype, params = parse_content_type(field_value(fields, "content-type") or b"text/plain")
    if ctype.startswith("multipart/"):
        boundary = params.get("boundary")
        if not boundary:
            raise MessageError("a %s part has no boundary parameter" % ctype)
        return fields, canonical_multipart(body, boundary.encode("ascii", "replace"))
    if ctype == "message/rfc822":
        return (replace_field(fields, "content-transfer-encoding", None),
                canonical_embedded(fields, body))
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


def canonical_multipart(body, boundary):
    """Return a multipart body with every part made canonical (RFC 2046 5.1.1)."""
    delimiter = re.compile(rb"(?:\A|\r\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")
    marks = list(delimiter.finditer(body))
    if not marks:
        return safe_text_block(body)
    out = [safe_text_block(body[:marks[0].start()])]
    for here, after in zip(marks, marks[1:] + [None]):
        if here.group(1):
            break
        end = after.start() if after else len(body)
        fields, part_body = split_header(body[here.end() + 2:end])
        prefix = b"\r\n" if out[0] or len(out) > 1 else b""
        out.append(prefix + b"--" + boundary + b"\r\n" + canonical_entity(fields, part_body))
    epilogue = body[marks[-1].end() + 2:] if marks[-1].group(1) else b""
    out.append(b"\r\n--" + boundary + b"--\r\n" + safe_text_block(epilogue))
    return b"".join(out)


def safe_text_block(data):
    """Return a preamble or epilogue as is when transport-safe, else a neutral one."""
    if is_transport_safe(data):
        return data
    return b"This is a multi-part message in MIME format.\r\n" if data.strip() else b""


def canonical_embedded(fields, body):
    """Return an embedded message/rfc822 body made canonical (RFC 2046 5.2.1)."""
    cte = transfer_encoding(fields)
    body = to_crlf(decode_body(body, cte))
    inner_fields, inner_body = split_header(body)
    outer = [f for f in inner_fields if not f.name.startswith("content-")]
    entity = [f for f in inner_fields if f.name.startswith("content-")]
    canonical = canonical_entity(entity, inner_body)
    return b"".join(safe_field(f) for f in outer) + canonical


def decode_body(body, cte):
    """Return *body* decoded from Content-Transfer-Encoding *cte* (bytes)."""
    import binascii
    if cte == b"base64":
        text = re.sub(rb"[^A-Za-z0-9+/]", b"", body)  # lenient, like mail clients
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
    import binascii
    encoded = binascii.b2a_qp(data, istext=True)  # soft breaks are LF when data has no CRLF
    return to_crlf(re.sub(rb"(?m)^From ", b"=46rom ", encoded))


def encode_base64(data):
    """Return *data* as base64 in CRLF lines of 76 characters (RFC 2045 6.8).

    The lines are cut by struct.unpack calls (C speed), up to LINES_PER_CUT at
    a time, instead of a slice per line: this runs on every message, twice when
    signing and encrypting, and a 577 KB attachment has 10,000 lines.
    """
    import binascii
    text = binascii.b2a_base64(data, newline=False)
    full = len(text) // BASE64_LINE
    chunks = [b"\r\n".join(line_splitter(min(LINES_PER_CUT, full - n)).unpack_from(
        text, n * BASE64_LINE)) for n in range(0, full, LINES_PER_CUT)]
    if len(text) % BASE64_LINE:
        chunks.append(text[full * BASE64_LINE:])
    del text  # big messages: one copy less at the peak
    chunks.append(b"")  # the final CRLF, without copying the whole result again
    return b"\r\n".join(chunks)


def line_splitter(count):
    """Return a struct.Struct cutting *count* base64 lines (one per count, cached)."""
    if count not in _LINE_SPLITTERS:
        import struct
        _LINE_SPLITTERS[count] = struct.Struct("%ds" % BASE64_LINE * count)
    return _LINE_SPLITTERS[count]


_LINE_SPLITTERS = {}


###############################################################################
# Header encoding (RFC 2047, RFC 2231) ########################################
###############################################################################

def safe_field(f):
    """Return the raw bytes of a field, made 7-bit and folded when it must be."""
    raw = f.raw
    if not raw.isascii() or b"\0" in raw:
        raw = encode_field(f)
    elif has_long_line(raw) or b" \r\n" in raw or b"\t\r\n" in raw:
        raw = fold_field(f.raw)
    return raw


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
    pairs = getaddresses([value])
    return ", ".join(formataddr(pair, charset="utf-8") for pair in pairs if pair[1])


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
# Identities: keys and certificates ###########################################
###############################################################################

_SAFE_ADDRESS = re.compile(r"[a-z0-9!#$%&'*+=?^_`{|}~.-]+@[a-z0-9.-]+\.?[a-z0-9-]*\Z")


class Identity:
    """A certificate (and for the sender, its private key and chain) for an address.

    *chain* holds the intermediates, leaf and root excluded.
    """

    def __init__(self, address, cert, path, key=None, chain=()):
        self.address, self.cert, self.path = address, cert, path
        self.key, self.chain = key, list(chain)


def key_dirs(option_dirs=()):
    """Return the key directories in search order: --keys, $SMIME_KEYS_DIR, '.'."""
    env = [d for d in os.environ.get("SMIME_KEYS_DIR", "").split(":") if d]
    return list(option_dirs) + env + ["."]


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


def load_certificates(data, path):
    """Return the certificates in PEM or DER *data*.  Raises IdentityError."""
    from cryptography import x509
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificates(data)
        if b"-----BEGIN" in data:
            return []
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise IdentityError("%s: not a readable PEM or DER certificate" % path)


def password():
    """Return $SMIME_KEY_PASSWORD as bytes, or None."""
    value = os.environ.get("SMIME_KEY_PASSWORD")
    return value.encode("utf-8") if value else None


def load_private_key(data, path):
    """Return the private key in PEM *data*.  Raises IdentityError.

    RSA key validation (a primality and consistency check, ~30 ms) runs the first
    time a key file's exact bytes are seen; see validated_keys().
    """
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    if b"PRIVATE KEY-----" not in data:
        raise IdentityError("%s: holds no PEM private key" % path)
    secret = password() if b"ENCRYPTED" in data else None  # PKCS#8 or legacy PEM encryption
    if b"ENCRYPTED" in data and secret is None:
        raise IdentityError("%s: the private key is encrypted: set SMIME_KEY_PASSWORD" % path)
    digest = key_digest(data)
    known = digest in validated_keys()
    try:
        key = load_pem_private_key(data, secret, unsafe_skip_rsa_key_validation=known)
    except (TypeError, ValueError):
        if secret is not None:
            raise IdentityError("%s: wrong SMIME_KEY_PASSWORD for this private key" % path)
        raise IdentityError("%s: the private key cannot be read (corrupt or unsupported)" % path)
    except Exception as exc:  # UnsupportedAlgorithm and friends
        raise IdentityError("%s: the private key cannot be used: %s" % (path, exc))
    if not known:
        remember_validated(digest)
    return key


def key_cache_path():
    """Return the file listing validated key files: $XDG_CACHE_HOME/sparkpostSMIME/..."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sparkpostSMIME", "validated-keys")


def key_digest(data):
    """Return the SHA-256 (hex) of a key file's bytes: it identifies, never reveals, the key."""
    import hashlib
    return hashlib.sha256(data).hexdigest()


def validated_keys():
    """Return the digests of key files that passed full validation before.

    Loading the very same bytes again yields the very same key, so skipping
    validation for them is as safe as validating.  The list is trusted only if
    it is ours and not writable by group or others; otherwise it is ignored.
    """
    path = key_cache_path()
    try:
        st = os.stat(path)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return set()
        with open(path) as fh:
            return set(fh.read().split())
    except OSError:
        return set()


def remember_validated(digest):
    """Add *digest* to the validated-keys list (best effort, private permissions)."""
    path = key_cache_path()
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(digest + "\n")
    except OSError:
        pass


def load_pkcs12(path):
    """Return (key, cert, extra certs) from a PKCS#12 file.  Raises IdentityError."""
    from cryptography.hazmat.primitives.serialization import pkcs12
    data = read_key_file(path)
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password())
    except ValueError:
        hint = "set SMIME_KEY_PASSWORD" if password() is None else "check SMIME_KEY_PASSWORD"
        raise IdentityError("%s: cannot open the PKCS#12 file (wrong password or corrupt): %s"
                            % (path, hint))
    if key is None or cert is None:
        raise IdentityError("%s: the PKCS#12 file lacks a private key or certificate" % path)
    return key, cert, list(extra)


def load_signer(address, dirs):
    """Return the sender's Identity with key, certificate and chain.

    Raises IdentityError when no usable key or certificate is found.
    """
    path = find_file(address, KEY_SUFFIXES, dirs)
    if path is None:
        raise IdentityError("no private key for %s: put %s.pem (or .p12) in one of: %s"
                            % (address, safe_address(address), ", ".join(dirs)))
    warn_if_exposed(path, "private key file")
    if path.endswith(".pem"):
        data = read_key_file(path)
        key, certs = load_private_key(data, path), load_certificates(data, path)
        cert_path = path
        if not any(same_key(c, key) for c in certs):
            cert_path = find_file(address, (".crt",), dirs)
            if cert_path is None:
                raise IdentityError("no certificate for %s: %s holds only the key; add %s.crt"
                                    % (address, path, safe_address(address)))
            certs += load_certificates(read_key_file(cert_path), cert_path)
    else:
        key, cert, extra = load_pkcs12(path)
        certs, cert_path = [cert] + extra, path
    return make_identity(address, key, certs, cert_path)


def make_identity(address, key, certs, path):
    """Pick the certificate of *key* among *certs*, check it, return the Identity."""
    leaf = next((c for c in certs if same_key(c, key)), None)
    if leaf is None:
        raise IdentityError("%s: the certificate does not match the private key for %s"
                            % (path, address))
    check_certificate(leaf, address, path, "sign")
    chain = [c for c in certs if c is not leaf and not is_self_signed(c)]
    return Identity(address, leaf, path, key, unique_certs(chain))


def unique_certs(certs):
    """Return *certs* without duplicates, order kept."""
    return list(dict.fromkeys(certs))  # certificates compare and hash by their DER


def cert_digest(cert):
    """Return the SHA-256 fingerprint of *cert*."""
    from cryptography.hazmat.primitives import hashes
    return cert.fingerprint(hashes.SHA256())


def same_key(cert, key):
    """True when *cert* carries the public half of private *key*."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def is_self_signed(cert):
    """True when *cert* is a root: issuer equals subject and it signed itself."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
        return True
    except Exception:
        return False


def load_recipient(address, dirs):
    """Return the Identity (certificate only) of a recipient.  Raises IdentityError."""
    path = find_file(address, (".crt",), dirs)
    if path is None:
        raise IdentityError("no certificate for recipient %s: put %s.crt in one of: %s"
                            % (address, safe_address(address), ", ".join(dirs)))
    return recipient_from_file(address, path)


def recipient_from_file(address, path):
    """Return the checked recipient Identity in certificate file *path*."""
    certs = load_certificates(read_key_file(path), path)
    if not certs:
        raise IdentityError("%s: holds no certificate" % path)
    mine = [c for c in certs if address in cert_emails(c)] or certs[:1]
    check_certificate(mine[0], address, path, "encrypt")
    return Identity(address, mine[0], path)


def cert_emails(cert):
    """Return the lower-cased e-mail addresses of *cert*: SAN rfc822Name, else subject."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        emails = san.get_values_for_type(x509.RFC822Name)
    except x509.ExtensionNotFound:
        emails = []
    if not emails:
        emails = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)]
    return [str(e).lower() for e in emails]


def check_certificate(cert, address, path, purpose):
    """Refuse a certificate unfit to *purpose* ('sign' or 'encrypt') for *address*.

    Checks validity dates, the e-mail address (RFC 8550 3), key usage and
    extended key usage (RFC 8550 4.4).  Raises IdentityError naming the reason.
    """
    reason = certificate_problem(cert, address, purpose)
    if reason:
        raise IdentityError("%s: certificate for %s %s" % (path, address, reason))


def certificate_problem(cert, address, purpose, now=None):
    """Return why *cert* cannot serve *address* for *purpose*, or '' when it can."""
    from datetime import datetime, timezone
    now = now or datetime.now(timezone.utc)
    if now < cert.not_valid_before_utc:
        return "is not valid yet (valid from %s)" % cert.not_valid_before_utc.date()
    if now > cert.not_valid_after_utc:
        return "has expired (on %s)" % cert.not_valid_after_utc.date()
    emails = cert_emails(cert)
    if address.lower() not in emails:
        return "is issued to %s, not to this address" % (", ".join(emails) or "no e-mail address")
    return usage_problem(cert, purpose)


def usage_problem(cert, purpose):
    """Return why the key type, key usage or extended key usage forbid *purpose*, or ''.

    Encryption needs an RSA key allowing keyEncipherment or an EC key on a curve
    of ECDH_SCHEMES allowing keyAgreement (RFC 8550 4.4.2, RFC 5480 3).
    """
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    kind = "sign"
    if purpose == "encrypt":
        kind = encryption_kind(cert)
        if kind not in ("rsa", "ec"):
            return kind
    exts = cert.extensions
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
        if kind == "sign" and not (ku.digital_signature or ku.content_commitment):
            return "does not allow digital signatures (key usage)"
        if kind == "rsa" and not ku.key_encipherment:
            return "does not allow key encipherment (key usage)"
        if kind == "ec" and not ku.key_agreement:
            return "has an EC key that does not allow key agreement (key usage)"
    except x509.ExtensionNotFound:
        pass
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
        allowed = {ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
        if not allowed & set(eku):
            return "is not for e-mail protection (extended key usage)"
    except x509.ExtensionNotFound:
        pass
    return ""


def encryption_kind(cert):
    """Return "rsa" or "ec" for a key we can encrypt to, else why we cannot."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    try:
        key = cert.public_key()
    except (UnsupportedAlgorithm, ValueError):
        return "has a public key of a type this tool cannot read"
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in ECDH_SCHEMES:
            return "ec"
        return ("has an EC key on curve %s: S/MIME encryption to EC keys is done on P-256, "
                "P-384 and P-521 only" % key.curve.name)
    name = type(key).__name__.replace("PublicKey", "").lstrip("_")
    return ("has a %s key, which S/MIME cannot encrypt to here: encryption needs an RSA key or "
            "an EC key on P-256, P-384 or P-521" % (name or "non-RSA"))


_IDENTITIES = {}


def cached(loader, address, dirs, *args):
    """Return loader(address, dirs, *args), loading each identity once per process.

    Batches send many messages from one sender to few recipients; keys and
    certificates are read, parsed and checked the first time only.  (A refusal
    is not cached: the error is raised again for every message that needs it.)
    """
    key = (loader.__name__, address, tuple(dirs)) + args
    if key not in _IDENTITIES:
        _IDENTITIES[key] = loader(address, dirs, *args)
    return _IDENTITIES[key]


def own_copy(address, dirs, signing=False):
    """Return the sender's Identity to encrypt the sender's own copy to, or None.

    The signing certificate when it allows encryption, else <from>.crt when
    there is one that does (a signing-only certificate beside an encryption
    one is common); None, with a warning, when neither does.
    """
    signer = cached(load_signer, address, dirs) if signing else None
    problem = signer and usage_problem(signer.cert, "encrypt")
    if signer is not None and not problem:
        return signer
    if find_file(address, (".crt",), dirs) is not None:
        try:
            return load_recipient(address, dirs)
        except IdentityError as exc:
            problem = str(exc)
    elif problem:
        problem = "%s: certificate for %s %s" % (signer.path, address, problem)
    if problem:
        warn_once("own-copy", "the message is not encrypted to its sender (the Sent copy "
                  "will not be readable): %s" % problem)
    return None


def find_identities(msg, opts):
    """Return (signer or None, [recipient Identity]) needed to build *msg*."""
    dirs = key_dirs(opts.keys)
    signer = cached(load_signer, msg.sender, dirs) if opts.sign_mode else None
    recipients = []
    if opts.encrypt:
        recipients = [cached(load_recipient, a, dirs) for a in msg.recipients]
        own = cached(own_copy, msg.sender, dirs, bool(signer))
        if own is not None:
            recipients.append(own)
    return signer, recipients


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

    A part is bytes (or a memoryview) or such a list: a large payload is never
    copied until the whole structure is joined once, at the end.
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


_OIDS = {}


def der_oid(dotted):
    """Return a DER OBJECT IDENTIFIER from its dotted form (X.690 8.19)."""
    if dotted not in _OIDS:
        arcs = [int(a) for a in dotted.split(".")]
        body = bytearray()
        for arc in [arcs[0] * 40 + arcs[1]] + arcs[2:]:
            group = [arc & 0x7F]
            while arc > 0x7F:
                arc >>= 7
                group.append(0x80 | arc & 0x7F)
            body += bytes(reversed(group))
        _OIDS[dotted] = der(OID, bytes(body))
    return _OIDS[dotted]


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
    anything malformed, truncated or nested deeper than MAX_BER_DEPTH.
    """
    __slots__ = ("data", "pos", "depth", "tag", "start", "stop", "end")

    def __init__(self, data, pos=0, depth=0):
        self.data, self.pos, self.depth = data, pos, depth
        self.tag, self.start, self.stop, self.end = ber_bounds(data, pos, depth)

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
        if not self.constructed:
            raise ValueError("a primitive element has no elements inside")
        items, at = [], self.start
        while at < self.stop:
            items.append(Ber(self.data, at, self.depth + 1))
            at = items[-1].end
        return items

    def octets(self):
        """Return the value of an OCTET STRING, primitive or constructed (X.690 8.7)."""
        if not self.constructed:
            return self.body
        return b"".join(child.octets() for child in self.children())

    def integer(self):
        """Return the value of an INTEGER."""
        if self.tag != INTEGER or self.start == self.stop:
            raise ValueError("expected an INTEGER")
        return int.from_bytes(self.body, "big", signed=True)

    def oid(self):
        """Return the dotted form of an OBJECT IDENTIFIER (X.690 8.19)."""
        if self.tag != OID or self.start == self.stop:
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


def ber_bounds(data, pos, depth=0):
    """Return (tag, contents start, contents stop, end) of the element at *pos*."""
    if depth > MAX_BER_DEPTH or pos + 2 > len(data):
        raise ValueError("truncated or too deeply nested ASN.1")
    tag, first, start = data[pos], data[pos + 1], pos + 2
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-octet ASN.1 tags are not used by CMS")
    if first == 0x80:  # indefinite length: elements up to the end-of-contents octets
        if not tag & 0x20:
            raise ValueError("indefinite length on a primitive element")
        at = start
        while data[at:at + 2] != b"\0\0":
            at = ber_bounds(data, at, depth + 1)[3]
        return tag, start, at, at + 2
    if first > 0x80:
        count, start = first & 0x7F, start + (first & 0x7F)
        if count > 8:
            raise ValueError("ASN.1 length too large")
        first = int.from_bytes(data[pos + 2:start], "big")
    if start + first > len(data):
        raise ValueError("truncated ASN.1 element")
    return tag, start, start + first, start + first


_RECIPIENT_IDS = {}


def recipient_id(cert):
    """Return issuer_and_serial(*cert*), worked out once per certificate object.

    Keyed by id(): hashing a certificate costs 5 us, parsing it 11 us, and a
    batch encrypts to the same few (cached) certificate objects every time.
    """
    entry = _RECIPIENT_IDS.get(id(cert))
    if entry is None or entry[0] is not cert:
        entry = _RECIPIENT_IDS[id(cert)] = (cert, issuer_and_serial(cert))
    return entry[1]


def issuer_and_serial(cert):
    """Return the DER IssuerAndSerialNumber of *cert* (RFC 5652 10.2.4).

    Both come byte for byte from the certificate's own TBSCertificate
    (RFC 5280 4.1), so a recipient's lookup matches whatever string types its
    issuer name was written with.
    """
    fields = Ber(cert.tbs_certificate_bytes).children()
    if fields[0].tag == ctx(0):  # version [0] EXPLICIT
        fields = fields[1:]
    return der(SEQUENCE, fields[2].raw, fields[0].raw)


###############################################################################
# S/MIME (RFC 8551) ###########################################################
###############################################################################

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
    """Return the canonical MIME entity of *msg*: the bytes that get signed.

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
    return canonical_entity(fields, msg.body)


def signature_hash(key):
    """Return the digest name for signing with *key*: SHA-256, or for EC keys the hash
    of the curve's strength (P-384: SHA-384, P-521: SHA-512; RFC 5753 7.1.2, RFC 8551
    2.1).  gpgsm refuses a P-384 signature over a 256-bit hash."""
    from cryptography.hazmat.primitives.asymmetric import ec
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp384r1": "SHA384", "secp521r1": "SHA512"}.get(key.curve.name, "SHA256")
    return "SHA256"


def signed_der(content, signer, detached):
    """Return the DER SignedData over *content*, certificates included (signature_hash())."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import pkcs7
    options = [pkcs7.PKCS7Options.Binary]
    if detached:
        options.append(pkcs7.PKCS7Options.DetachedSignature)
    builder = pkcs7.PKCS7SignatureBuilder().set_data(content)
    digest = getattr(hashes, signature_hash(signer.key))()
    builder = builder.add_signer(signer.cert, signer.key, digest)
    for cert in signer.chain:  # after add_signer, or they are dropped
        builder = builder.add_certificate(cert)
    return builder.sign(serialization.Encoding.DER, options)


def sign_opaque(content, signer):
    """Return an application/pkcs7-mime signed-data entity embedding *content*."""
    return b"".join([SIGNED_DATA_HEADER, b"\r\n",
                     encode_base64(signed_der(content, signer, False))])


def sign_detached(content, signer):
    """Return a multipart/signed entity (RFC 8551 3.5.3, RFC 1847) over *content*."""
    import secrets
    boundary = b"----=_smime_" + secrets.token_hex(12).encode()
    while boundary in content:
        boundary = b"----=_smime_" + secrets.token_hex(12).encode()
    signature = encode_base64(signed_der(content, signer, True))
    return b"".join([  # one copy of the (possibly large) content, not one per "+"
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";\r\n'
        b' micalg=', signature_hash(signer.key).lower().replace("sha", "sha-").encode(),
        b'; boundary="', boundary, b'"\r\n\r\n'
        b"This is an S/MIME signed message\r\n\r\n--", boundary, b"\r\n", content,
        b"\r\n--", boundary, b"\r\n", SIGNATURE_PART_HEADER, b"\r\n", signature,
        b"\r\n--", boundary, b"--\r\n"])


def encrypt(content, recipients, cipher="aes256"):
    """Return an application/pkcs7-mime enveloped-data entity of *content* (RFC 8551 3.3)."""
    certs = list({recipient_id(ident.cert): ident.cert for ident in recipients}.values())
    der = b"".join(enveloped_data(content, certs, 32 if cipher == "aes256" else 16))
    # (the pieces, a copy of the content, are gone before base64 needs as much again)
    return b"".join([ENVELOPED_DATA_HEADER, b"\r\n", encode_base64(der)])


#: Object identifiers (RFC 5652 14, RFC 3565, RFC 5753 7.1.4, RFC 5480 2.1.1, RFC 8017 A.1).
ID_DATA, ID_SIGNED_DATA, ID_ENVELOPED_DATA = ("1.2.840.113549.1.7.1", "1.2.840.113549.1.7.2",
                                              "1.2.840.113549.1.7.3")
RSA_ENCRYPTION, ID_EC_PUBLIC_KEY = "1.2.840.113549.1.1.1", "1.2.840.10045.2.1"
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
#: The curves we encrypt to -> the scheme we use, its KDF hash as strong as the curve
#: (RFC 8551 2.7.1.2, RFC 5753 8).
ECDH_SCHEMES = {"secp256r1": "1.3.132.1.11.1", "secp384r1": "1.3.132.1.11.2",
                "secp521r1": "1.3.132.1.11.3"}


def enveloped_data(content, certs, key_size=32):
    """Return the DER ContentInfo of an EnvelopedData of *content* (RFC 5652 6.1), as pieces.

    The content is encrypted with AES-CBC under a fresh key of *key_size* octets,
    and that key is given to each certificate in *certs*: RSA keys by
    KeyTransRecipientInfo, EC keys by KeyAgreeRecipientInfo.  Version 0 when
    every RecipientInfo is a KeyTransRecipientInfo, else 2 (RFC 5652 6.1).
    """
    key, iv = os.urandom(key_size), os.urandom(16)
    infos = [recipient_info(cert, key) for cert in certs]
    version = 0 if all(info[0] == SEQUENCE for info in infos) else 2
    encrypted_content_info = der_pieces(
        SEQUENCE, der_oid(ID_DATA), algorithm(AES_CBC[key_size], der(OCTET_STRING, iv)),
        der_pieces(ctx(0, constructed=False), aes_cbc(key, iv, content)))
    enveloped = der_pieces(SEQUENCE, der_int(version), der_set(*infos), encrypted_content_info)
    return der_pieces(SEQUENCE, der_oid(ID_ENVELOPED_DATA), der_pieces(ctx(0), enveloped))


def aes_cbc(key, iv, content):
    """Return *content* PKCS#7-padded and AES-CBC encrypted (RFC 5652 6.3, RFC 3565)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    pad = 16 - len(content) % 16
    out = bytearray(len(content) + 31)  # update_into wants room for one more block
    size = encryptor.update_into(content, out)
    size += encryptor.update_into(bytes((pad,)) * pad, memoryview(out)[size:])
    return memoryview(out)[:size]


def recipient_info(cert, key):
    """Return the RecipientInfo giving content-encryption *key* to *cert*'s owner."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    if isinstance(cert.public_key(), rsa.RSAPublicKey):
        return key_trans_recipient_info(cert, key)
    return key_agree_recipient_info(cert, key)


def key_trans_recipient_info(cert, key):
    """Return a KeyTransRecipientInfo (RFC 5652 6.2.1): *key* under RSA PKCS#1 v1.5
    (RFC 3370 4.2.1), version 0, the recipient named by issuerAndSerialNumber."""
    from cryptography.hazmat.primitives.asymmetric import padding
    encrypted_key = cert.public_key().encrypt(key, padding.PKCS1v15())
    return der(SEQUENCE, der_int(0), recipient_id(cert),
               algorithm(RSA_ENCRYPTION, der(NULL)), der(OCTET_STRING, encrypted_key))


def key_agree_recipient_info(cert, key):
    """Return a KeyAgreeRecipientInfo (RFC 5652 6.2.2, RFC 5753 3.1.1) for an EC *cert*.

    Ephemeral-static ECDH on the recipient's curve; the key-encryption key comes
    from the ANSI X9.63 KDF over the shared secret and ECC-CMS-SharedInfo, and
    wraps *key* with AES key wrap of the same size (RFC 3394, RFC 3565 2.3.2).
    The originator is the ephemeral public key (id-ecPublicKey, parameters
    absent: the recipient's curve), the recipient its issuerAndSerialNumber.
    """
    from cryptography.hazmat.primitives import keywrap, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    public = cert.public_key()
    scheme, wrap = ECDH_SCHEMES[public.curve.name], AES_WRAP[len(key)]
    ephemeral = ec.generate_private_key(public.curve)
    kek = ecdh_key_encryption_key(ephemeral, public, scheme, wrap, len(key))
    point = ephemeral.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)
    originator_key = der(ctx(1), algorithm(ID_EC_PUBLIC_KEY), der(BIT_STRING, b"\0", point))
    recipient_encrypted_key = der(SEQUENCE, recipient_id(cert),
                                  der(OCTET_STRING, keywrap.aes_key_wrap(kek, key)))
    return der(ctx(1), der_int(3), der(ctx(0), originator_key),
               algorithm(scheme, algorithm(wrap)), der(SEQUENCE, recipient_encrypted_key))


def ecdh_key_encryption_key(private, public, scheme, wrap, size, ukm=None):
    """Return the key-encryption key both ends of ECDH derive (RFC 5753 3.1.1, 7.2).

    X9.63 KDF with the *scheme*'s hash over the shared secret and the DER
    ECC-CMS-SharedInfo: the key wrap algorithm, the optional user keying
    material, and the key size in bits as four big-endian octets.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
    digest = getattr(hashes, KDF_HASHES[scheme])()
    shared_info = der(SEQUENCE, algorithm(wrap),
                      der(ctx(0), der(OCTET_STRING, ukm)) if ukm is not None else b"",
                      der(ctx(2), der(OCTET_STRING, (size * 8).to_bytes(4, "big"))))
    secret = private.exchange(ec.ECDH(), public)
    return X963KDF(digest, size, shared_info).derive(secret)


def build_smime(msg, opts, signer=None, recipients=(), extra=b""):
    """Return the final message bytes: outer header, MIME-Version, S/MIME entity.

    The outer fields keep their order, *extra* header lines follow them (outside
    anything signed); Bcc never appears in the output.
    """
    entity = canonical_content(msg)
    if opts.sign_mode == "opaque":
        entity = sign_opaque(entity, signer)
    elif opts.sign_mode == "detached":
        entity = sign_detached(entity, signer)
    if opts.encrypt:
        entity = encrypt(entity, recipients, opts.cipher)
    outer = b"".join(safe_field(f) for f in msg.outer if f.name != "bcc")
    ending = b"" if entity.endswith(b"\r\n") else b"\r\n"  # SMTP DATA ends with CRLF
    return b"".join([outer, extra, b"MIME-Version: 1.0\r\n", entity, ending])


###############################################################################
# Receiving: decrypt and verify (RFC 5652 5-6, RFC 5083, RFC 8551 3) ##########
###############################################################################
# --verify, --decrypt and --harvest open what others send.  cryptography has no
# CMS verification and cannot decrypt for an EC key, so SignedData is checked
# here and EnvelopedData / AuthEnvelopedData decrypted for our own keys, with
# the DER layer the writer uses.  Layers and signatures are values; only a
# message that is not what it claims to be raises MessageError.

SIGNATURE_TYPES = ("application/pkcs7-signature", "application/x-pkcs7-signature")
SMIME_TYPES = ("application/pkcs7-mime", "application/x-pkcs7-mime")
ID_AUTH_ENVELOPED_DATA = "1.2.840.113549.1.9.16.1.23"
#: Signed attributes we check (RFC 5652 11.1-11.3).
ATTR_CONTENT_TYPE, ATTR_MESSAGE_DIGEST, ATTR_SIGNING_TIME = (
    "1.2.840.113549.1.9.3", "1.2.840.113549.1.9.4", "1.2.840.113549.1.9.5")
#: Digest algorithms (RFC 3370 2.1, RFC 5754 2) -> cryptography's hash names.
DIGESTS = {"1.3.14.3.2.26": "SHA1", "2.16.840.1.101.3.4.2.4": "SHA224",
           "2.16.840.1.101.3.4.2.1": "SHA256", "2.16.840.1.101.3.4.2.2": "SHA384",
           "2.16.840.1.101.3.4.2.3": "SHA512"}
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


class Signature:
    """One SignerInfo, checked (RFC 5652 5.3, 5.4, 5.6).

    *cert*: the signer's certificate from the message (None if absent); *certs*:
    every certificate the message carries; *broken*: why the signature itself
    fails ('' when it verifies): the content or the signature was altered.
    """

    def __init__(self, cert, certs):
        self.cert, self.certs, self.broken = cert, certs, ""
        self.digest = self.algorithm = self.signing_time = ""

    @property
    def address(self):
        """The signer's e-mail address, or a description when there is none."""
        emails = cert_emails(self.cert) if self.cert is not None else []
        return emails[0] if emails else "an unknown signer"

    @property
    def issuer(self):
        """The common name of the certificate's issuer (its whole name if it has none)."""
        from cryptography.x509.oid import NameOID
        names = self.cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else self.cert.issuer.rfc4514_string()

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
    delimiter = re.compile(rb"(?:\A|\r\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|\Z)")
    parts, start = [], None
    for mark in delimiter.finditer(body):
        if start is not None:
            parts.append(body[start:mark.start()])
        if mark.group(1):
            return parts
        start = mark.end() + 2
    if start is not None:
        parts.append(body[start:])
    return parts


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
    from cryptography.exceptions import UnsupportedAlgorithm
    try:
        layer, inner = open_layer(kind, fields, body, keyring)
    except (ValueError, LookupError, UnsupportedAlgorithm) as exc:  # not CMS after all
        raise MessageError("the S/MIME part is malformed (%s)" % (
            first_line(exc) if isinstance(exc, ValueError) else type(exc).__name__))
    inner_fields, inner_body = split_header(message_to_crlf(inner))
    layers, innermost = open_layers(inner_fields, inner_body, keyring, depth + 1)
    return [layer] + layers, inner if innermost is None else innermost


def open_layer(kind, fields, body, keyring):
    """Return (Layer, the entity inside it) for one S/MIME layer."""
    if kind == "multipart/signed":
        boundary = parse_content_type(field_value(fields, "content-type"))[1].get("boundary")
        parts = multipart_parts(body, (boundary or "").encode("ascii", "replace"))
        if not boundary or len(parts) < 2:
            raise MessageError("a multipart/signed entity without its two parts")
        sig_fields, sig_body = split_header(parts[1])
        der = decode_body(sig_body, transfer_encoding(sig_fields))
        signatures, _ = signed_data(content_info(der, ID_SIGNED_DATA), parts[0])
        return Layer("signed", signatures, how="multipart/signed"), parts[0]
    der = decode_body(body, transfer_encoding(fields))
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
    fields = Ber(der).children()
    oid, content = fields[0].oid(), fields[1]
    if content.tag != ctx(0):
        raise ValueError("ContentInfo without its [0] content")
    if expected is not None:
        if oid != expected:
            raise MessageError("the signature part holds content type %s, not SignedData" % oid)
        return content.children()[0]
    return oid, content.children()[0]


# -- SignedData (RFC 5652 5) -------------------------------------------------------

def signed_data(sd, detached=None):
    """Return ([Signature], signed content) of a SignedData, every SignerInfo checked.

    *detached*: the content of a multipart/signed; else the encapsulated one.
    """
    from cryptography import x509
    fields = sd.children()
    encap = fields[2].children()  # EncapsulatedContentInfo
    content_type = encap[0].oid()
    content = detached
    if content is None:
        if len(encap) < 2:
            raise MessageError("a detached signature outside a multipart/signed")
        content = encap[1].children()[0].octets()
    certs = []
    for item in fields[3:-1]:
        if item.tag == ctx(0):  # certificates [0] IMPLICIT CertificateSet
            certs += [x509.load_der_x509_certificate(c.raw) for c in item.children()
                      if c.tag == SEQUENCE]
    infos = fields[-1].children()
    if fields[-1].tag != SET or not infos:
        raise MessageError("a SignedData without any signer")
    return [signer_info(si, content, content_type, certs) for si in infos], content


def signer_info(si, content, content_type, certs):
    """Return the Signature of one SignerInfo over *content* (RFC 5652 5.4, 5.6)."""
    from cryptography.hazmat.primitives import hashes
    fields = si.children()
    attrs = fields[3] if fields[3].tag == ctx(0) else None
    algorithm, value = fields[4:6] if attrs is not None else fields[3:5]
    sig = Signature(signer_certificate(fields[1], certs), certs)
    sig.digest = DIGESTS.get(fields[2].children()[0].oid(), "")
    if not sig.digest:
        sig.broken = "signed with a digest algorithm this tool does not know (%s)" % (
            fields[2].children()[0].oid())
        return sig
    digest = hashes.Hash(getattr(hashes, sig.digest)())
    digest.update(content)
    digest = digest.finalize()
    signed = content
    if attrs is not None:
        sig.broken = attributes_problem(attrs, content_type, digest, sig)
        signed = b"\x31" + attrs.raw[1:]  # the DER SET OF Attribute is what was signed
    elif content_type != ID_DATA:
        sig.broken = "no signed attributes over content that is not plain data"
    if sig.cert is None:
        sig.broken = sig.broken or "the signer's certificate is not in the message"
    if not sig.broken:
        sig.broken = signature_problem(sig, algorithm, value.octets(), signed)
    return sig


def signer_certificate(sid, certs):
    """Return the certificate SignerIdentifier *sid* names, or None (RFC 5652 5.3)."""
    from cryptography import x509
    for cert in certs:
        if sid.tag == SEQUENCE and sid.raw == recipient_id(cert):
            return cert
        if sid.tag == ctx(0, constructed=False) and subject_key_id(cert) == sid.body:
            return cert
    return None


def subject_key_id(cert):
    """Return the certificate's subjectKeyIdentifier, or None."""
    from cryptography import x509
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def attributes_problem(attrs, content_type, digest, sig):
    """Check the signed attributes (RFC 5652 5.3, 11); note the signing time on *sig*.

    Returns why they do not match the content, or ''.
    """
    found = {}
    for attr in attrs.children():
        kind, values = attr.children()
        found.setdefault(kind.oid(), values.children())
    if ATTR_SIGNING_TIME in found:
        sig.signing_time = asn1_time(found[ATTR_SIGNING_TIME][0])
    types, digests = found.get(ATTR_CONTENT_TYPE), found.get(ATTR_MESSAGE_DIGEST)
    if not types or types[0].oid() != content_type:
        return "the signed content-type attribute does not match the content"
    if not digests or digests[0].octets() != digest:
        return ("the content was altered after signing: its %s digest does not match the "
                "signed message-digest" % sig.digest.replace("SHA", "SHA-"))
    return ""


def asn1_time(item):
    """Return a UTCTime or GeneralizedTime (RFC 5280 4.1.2.5) as 'YYYY-MM-DD HH:MM:SS UTC'."""
    text = item.body.decode("ascii", "replace").rstrip("Z")
    if item.tag == 0x17:  # UTCTime: two-digit years, 1950-2049
        text = ("19" if text[:2] >= "50" else "20") + text
    return "%s-%s-%s %s:%s:%s UTC" % (text[:4], text[4:6], text[6:8], text[8:10],
                                       text[10:12], text[12:14] or "00")


def signature_problem(sig, algorithm, value, signed):
    """Verify *value* over *signed* with the signer's public key; return '' or why not."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    parts = algorithm.children()
    scheme, hash_name = SIGNATURE_ALGORITHMS.get(parts[0].oid(), ("", None))
    hash_name = hash_name or sig.digest
    key = sig.cert.public_key()
    try:
        if scheme in ("rsa", "pss") and isinstance(key, rsa.RSAPublicKey):
            if scheme == "pss":
                hash_name, mgf_hash, salt = pss_parameters(parts[1] if len(parts) > 1 else None)
                pad = padding.PSS(padding.MGF1(getattr(hashes, mgf_hash)()), salt)
            else:
                pad = padding.PKCS1v15()
            key.verify(value, signed, pad, getattr(hashes, hash_name)())
        elif scheme == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(value, signed, ec.ECDSA(getattr(hashes, hash_name)()))
        else:
            return "signed with an algorithm this tool cannot check (%s)" % parts[0].oid()
    except InvalidSignature:
        return "the signature does not match the content (the signature or the content was " \
               "altered)"
    sig.algorithm = {"rsa": "RSA", "pss": "RSA-PSS", "ecdsa": "ECDSA"}[scheme]
    return ""


def pss_parameters(params):
    """Return (hash, MGF1 hash, salt length) of RSASSA-PSS-params (RFC 4055 3.1)."""
    hash_name, mgf_hash, salt = "SHA1", "SHA1", 20  # the defaults
    for item in (params.children() if params is not None and params.tag == SEQUENCE else []):
        inner = item.children()[0]
        if item.tag == ctx(0):
            hash_name = DIGESTS[inner.children()[0].oid()]
        elif item.tag == ctx(1):
            mgf_hash = DIGESTS[inner.children()[1].children()[0].oid()]
        elif item.tag == ctx(2):
            salt = inner.integer()
    return hash_name, mgf_hash, salt


def signature_verdict(sig, sender, roots):
    """Return why *sig* does not vouch for a message From *sender*, or '' when it does.

    The signature verifies, its certificate is for *sender*, valid now, allowed
    to sign, and chains to a trusted root (roots() loads them once).
    """
    if sig.broken:
        return sig.broken
    emails = cert_emails(sig.cert)
    if sender not in emails:
        return ("the signature carries no certificate for %s (signed by %s): the From "
                "address is not the signer's" % (sender, ", ".join(emails) or "no address"))
    problem = certificate_problem(sig.cert, sender, "sign")
    if problem:
        return "the signer's certificate %s" % problem
    problem = chain_problem(sig.cert, sig.certs, roots())
    return "the signer's certificate %s" % problem if problem else ""


def chain_problem(cert, certs, roots):
    """Return why *cert* does not chain to a trusted root (intermediates from *certs*), or ''."""
    from datetime import datetime, timezone
    from cryptography.x509 import verification as v
    builder = (v.PolicyBuilder().store(v.Store(roots)).time(datetime.now(timezone.utc))
               .extension_policies(ca_policy=v.ExtensionPolicy.webpki_defaults_ca(),
                                   ee_policy=v.ExtensionPolicy.permit_all()))
    try:
        builder.build_client_verifier().verify(cert, [c for c in certs if c is not cert])
    except v.VerificationError as exc:
        return "does not chain to a trusted root (%s); pass the issuing CA with --ca" % exc
    return ""


def trust_store(cafile):
    """Return the trusted roots: --ca / $SMIME_CA_FILE, else the system bundle.

    Raises ConfigError (78) when there is none or it cannot be read.
    """
    import ssl
    from cryptography import x509
    paths = ssl.get_default_verify_paths()
    path = cafile or paths.cafile or paths.openssl_cafile
    if not path or not os.path.isfile(path):
        raise ConfigError("%s: no trusted CA bundle there: pass --ca FILE or set SMIME_CA_FILE"
                          % (path or "(none)"))
    import warnings
    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # system bundles hold old roots with odd serials
            roots = x509.load_pem_x509_certificates(fh.read())
    except (OSError, ValueError) as exc:
        raise ConfigError("%s: cannot read the CA bundle: %s" % (path, exc))
    return roots


# -- EnvelopedData and AuthEnvelopedData for our keys (RFC 5652 6, RFC 5083) --------

class Keyring:
    """Our private keys for decryption, found by address in the key directories.

    Candidates are the addresses of the message's header (DELIVERY_FIELDS), then
    every other <address>.pem/.p12/.pfx in the directories (a Bcc copy names
    nobody).  A key is loaded only when a RecipientInfo names its certificate.
    """

    def __init__(self, dirs, addresses=()):
        self.dirs, self.addresses = dirs, list(dict.fromkeys(addresses))

    def candidates(self):
        """Yield the addresses that have a private key file, header ones first."""
        seen = set()
        for address in self.addresses + self.directory_addresses():
            try:
                if address not in seen and find_file(address, KEY_SUFFIXES, self.dirs):
                    seen.add(address)
                    yield address
            except MessageError:  # not an address that can name a file
                continue

    def directory_addresses(self):
        """Return the addresses named by key files in the key directories."""
        found = []
        for directory in self.dirs:
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            found += [n.rsplit(".", 1)[0].lower() for n in names
                      if n.lower().endswith(KEY_SUFFIXES) and "@" in n]
        return found

    def open_envelope(self, oid, envelope):
        """Return (content, address, description) of an (Auth)EnvelopedData for one of
        our keys.  Raises MessageError when none of them can open it."""
        fields = envelope.children()
        at = 2 if fields[1].tag == ctx(0) else 1  # originatorInfo [0] is optional
        infos, encrypted = fields[at].children(), fields[at + 1]
        tried = []
        for address in self.candidates():
            ident = cached(load_decryption_identity, address, self.dirs)
            for info in infos:
                key = unwrap_content_key(info, ident)
                if key is None:
                    continue
                if oid == ID_AUTH_ENVELOPED_DATA:
                    content, how = decrypt_auth_content(encrypted, key, fields[at + 2:])
                else:
                    content, how = decrypt_content(encrypted, key)
                if content is not None:
                    return content, address, how
            tried.append(address)
        raise MessageError("encrypted to %d recipient(s), none of them an identity whose key "
                           "is in the key directories (tried: %s)"
                           % (len(infos), ", ".join(tried) or "no key found"))


def load_decryption_identity(address, dirs):
    """Return our Identity for *address*: private key and its certificate, unchecked
    (old mail must stay readable after its certificate expires).  Raises IdentityError."""
    path = find_file(address, KEY_SUFFIXES, dirs)
    if path.endswith(".pem"):
        data = read_key_file(path)
        key, certs = load_private_key(data, path), load_certificates(data, path)
        crt = find_file(address, (".crt",), dirs)
        if crt is not None:
            certs += load_certificates(read_key_file(crt), crt)
    else:
        key, cert, extra = load_pkcs12(path)
        certs = [cert] + extra
    leaf = next((c for c in certs if same_key(c, key)), None)
    if leaf is None:
        raise IdentityError("%s: no certificate matching the private key for %s" % (path, address))
    return Identity(address, leaf, path, key)


def unwrap_content_key(info, ident):
    """Return the content-encryption key RecipientInfo *info* holds for *ident*, or None."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    if info.tag == SEQUENCE and isinstance(ident.key, rsa.RSAPrivateKey):
        return key_transport_key(info, ident)
    if info.tag == ctx(1) and isinstance(ident.key, ec.EllipticCurvePrivateKey):
        return key_agreement_key(info, ident)
    return None  # kekri, pwri, ori, or a key of the other type


def names_us(rid, ident):
    """True when a RecipientIdentifier names *ident*'s certificate (RFC 5652 6.2.1, 6.2.2)."""
    if rid.tag == SEQUENCE:  # issuerAndSerialNumber
        return rid.raw == recipient_id(ident.cert)
    if rid.tag == ctx(0, constructed=False):  # subjectKeyIdentifier
        return rid.body == subject_key_id(ident.cert)
    if rid.tag == ctx(0):  # rKeyId RecipientKeyIdentifier (kari)
        return rid.children()[0].octets() == subject_key_id(ident.cert)
    return False


def key_transport_key(info, ident):
    """Return the key of a KeyTransRecipientInfo for our RSA key: PKCS#1 v1.5, or
    RSAES-OAEP when received (RFC 3560); None when it is not ours or not readable."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    fields = info.children()
    if not names_us(fields[1], ident):
        return None
    algorithm = fields[2].children()
    if algorithm[0].oid() == RSAES_OAEP:
        hash_name, mgf_hash, label = oaep_parameters(algorithm[1] if len(algorithm) > 1
                                                     else None)
        pad = padding.OAEP(padding.MGF1(getattr(hashes, mgf_hash)()),
                           getattr(hashes, hash_name)(), label or None)
    elif algorithm[0].oid() == RSA_ENCRYPTION:
        pad = padding.PKCS1v15()
    else:
        return None
    try:
        return ident.key.decrypt(fields[3].octets(), pad)
    except ValueError:
        return None


def oaep_parameters(params):
    """Return (hash, MGF1 hash, label) of RSAES-OAEP-params (RFC 8017 A.2.1, RFC 4055 4.1)."""
    hash_name, mgf_hash, label = "SHA1", "SHA1", b""
    for item in (params.children() if params is not None and params.tag == SEQUENCE else []):
        inner = item.children()[0]
        if item.tag == ctx(0):
            hash_name = DIGESTS[inner.children()[0].oid()]
        elif item.tag == ctx(1):
            mgf_hash = DIGESTS[inner.children()[1].children()[0].oid()]
        elif item.tag == ctx(2):
            label = inner.children()[1].octets()
    return hash_name, mgf_hash, label


def key_agreement_key(info, ident):
    """Return the key of a KeyAgreeRecipientInfo for our EC key (RFC 5753 3.1.2), or None.

    Ephemeral-static ECDH with the originator's public key, the X9.63 KDF of
    the scheme, then AES key unwrap (RFC 3394) of our RecipientEncryptedKey.
    """
    from cryptography.hazmat.primitives import keywrap
    from cryptography.hazmat.primitives.asymmetric import ec
    fields = info.children()
    originator = fields[1].children()[0]
    ukm = fields[2].children()[0].octets() if fields[2].tag == ctx(1) else None
    algorithm = fields[-2].children()
    scheme, wrap = algorithm[0].oid(), algorithm[1].children()[0].oid()
    sizes = {oid: size for size, oid in AES_WRAP.items()}
    if originator.tag != ctx(1) or scheme not in KDF_HASHES or wrap not in sizes:
        return None  # static originator keys and other schemes: not supported
    point = originator.children()[1].body[1:]  # BIT STRING: unused-bits octet, then ECPoint
    for entry in fields[-1].children():
        rid, encrypted_key = entry.children()
        if not names_us(rid, ident):
            continue
        public = ec.EllipticCurvePublicKey.from_encoded_point(ident.key.curve, point)
        kek = ecdh_key_encryption_key(ident.key, public, scheme, wrap, sizes[wrap], ukm)
        try:
            return keywrap.aes_key_unwrap(kek, encrypted_key.octets())
        except keywrap.InvalidUnwrap:
            return None
    return None


def decrypt_content(encrypted, key):
    """Return (content, description) of an EncryptedContentInfo (RFC 5652 6.1) under
    AES-CBC (RFC 3565), or (None, '') when *key* does not fit it."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    fields = encrypted.children()
    algorithm = fields[1].children()
    sizes = {oid: size for size, oid in AES_CBC.items()}
    if algorithm[0].oid() not in sizes:
        raise MessageError("encrypted with a content cipher this tool does not support (%s); "
                           "AES-CBC and AES-GCM are" % algorithm[0].oid())
    if len(key) != sizes[algorithm[0].oid()] or len(fields) < 3:
        return None, ""
    decryptor = Cipher(algorithms.AES(key), modes.CBC(algorithm[1].octets())).decryptor()
    data = fields[2].octets()
    if not data or len(data) % 16:
        raise MessageError("the encrypted content is truncated")
    plain = decryptor.update(data) + decryptor.finalize()
    pad = plain[-1]
    if not 1 <= pad <= 16 or plain[-pad:] != bytes((pad,)) * pad:
        return None, ""  # a wrong key (RSA's implicit rejection gives one) or damage
    return plain[:-pad], "AES-%d-CBC" % (len(key) * 8)


def decrypt_auth_content(encrypted, key, rest):
    """Return (content, description) of AuthEnvelopedData content under AES-GCM
    (RFC 5083 2.1, RFC 5084 3.2): the authenticated attributes, if any, are the
    additional data; a wrong tag means altered content (MessageError)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    fields = encrypted.children()
    algorithm = fields[1].children()
    if algorithm[0].oid() not in AES_GCM:
        raise MessageError("AuthEnvelopedData with a cipher this tool does not support (%s)"
                           % algorithm[0].oid())
    if len(key) != AES_GCM[algorithm[0].oid()]:
        return None, ""
    nonce = algorithm[1].children()[0].octets()
    auth_attrs = next((r for r in rest if r.tag == ctx(1)), None)
    mac = next(r for r in rest if r.tag == OCTET_STRING).octets()
    decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce, mac, min_tag_length=len(mac))
                       ).decryptor()
    if auth_attrs is not None:
        decryptor.authenticate_additional_data(b"\x31" + auth_attrs.raw[1:])
    try:
        plain = decryptor.update(fields[2].octets()) + decryptor.finalize()
    except InvalidTag:
        raise MessageError("the encrypted content was altered: its AES-GCM authentication tag "
                           "does not match")
    return plain, "AES-%d-GCM" % (len(key) * 8)


# -- Whole messages ----------------------------------------------------------------

class Received:
    """What opening one received message found, judged: the outcome of --verify/--decrypt.

    *problem*: why it fails ('' when it passes); *code*: its exit code; *signer*:
    the Signature that vouches for it; *output*: the recovered message for -o.
    """

    def __init__(self, source):
        self.source, self.layers, self.problem, self.code = source, [], "", EX_OK
        self.signer, self.output, self.sender, self.warnings = None, b"", "", []

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
        signed = ("signed by %s (%s), verified" % (self.signer.address, self.signer.issuer)
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


def receive(data, source, dirs, roots, mode):
    """Open and judge one received message; return its Received.

    *mode*: "verify" (a valid signature of the From address is required) or
    "decrypt" (an unsigned plaintext passes; a signature present must be valid).
    Raises IdentityError (78) for a key of ours that cannot be read.
    """
    out = Received(source)
    try:
        fields, body = split_header(message_to_crlf(data))
        if not fields:
            raise MessageError("not an RFC 5322 message (no header fields)")
        header = Message(source, fields, [], b"")
        senders = addresses_of(header, "from")
        out.sender = senders[0] if senders else ""
        keyring = Keyring(dirs, [a for name in DELIVERY_FIELDS
                                 for a in addresses_of(header, name)])
        entity_fields = [f for f in fields if f.name.startswith("content-")]
        out.layers, inner = open_layers(entity_fields, body, keyring)
    except MessageError as exc:
        out.problem, out.code = str(exc), exc.exit_code
        return out
    out.problem = judge(out, roots, mode)
    out.code = EX_DATAERR if out.problem else EX_OK
    outer = b"".join(f.raw for f in fields if not f.name.startswith("content-"))
    out.output = outer + (inner if inner is not None else
                          b"".join(f.raw for f in entity_fields) + b"\r\n" + body)
    return out


def judge(received, roots, mode):
    """Return why *received* fails in *mode*, or '' when it passes; set its signer."""
    signatures = received.signatures
    broken = [s for s in signatures if s.broken]
    if broken:
        return broken[0].broken
    if not signatures:
        return "not signed" if mode == "verify" else ""
    if not received.sender:
        return "no From address to check the signature against"
    verdicts = [(signature_verdict(s, received.sender, roots), s) for s in signatures]
    good = [s for problem, s in verdicts if not problem]
    if not good:
        return verdicts[0][0]
    received.signer = good[0]
    if any(s.digest == "SHA1" for s in signatures):
        received.warnings.append("signed with SHA-1, which no longer protects a signature "
                                 "against forgery: ask the sender to use SHA-256")
    return ""


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


def harvest(path, dirs, roots):
    """Return the Harvested certificate of the sender of message *path*.

    Raises MessageError (65) naming why no usable certificate was found,
    IdentityError (78) for a key of ours that cannot be read.
    """
    fields, body = split_header(message_to_crlf(read_input(path)))
    header = Message(path, fields, [], b"")
    sender = addresses_of(header, "from")
    if not sender:
        raise MessageError("%s: no From address" % path)
    address = safe_address(sender[0])
    keyring = Keyring(dirs, [a for name in DELIVERY_FIELDS for a in addresses_of(header, name)])
    reasons = []
    signatures = list(signatures_within([f for f in fields if f.name.startswith("content-")],
                                        body, keyring, reasons))
    if not signatures:
        raise MessageError("%s: %s" % (path, reasons[0] if reasons else
                                       "no S/MIME signature found (the message is not signed)"))
    for sig in signatures:
        problem = signature_verdict(sig, address, lambda: roots)
        if not problem:
            problem = certificate_problem(sig.cert, address, "encrypt")
            problem = problem and "the certificate for %s %s" % (address, problem)
        if not problem:
            chain = [c for c in sig.certs if c is not sig.cert and not is_self_signed(c)]
            return Harvested(address, sig.cert, unique_certs(chain))
        reasons.append(problem)
    raise MessageError("%s: %s" % (path, reasons[-len(signatures)]))


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

    A different certificate already saved is kept when it is valid and expires
    later; returns found with .path and .note set.
    """
    from cryptography.hazmat.primitives.serialization import Encoding
    path = os.path.join(directory, found.address + ".crt")
    found.path, found.note = path, "saved"
    if os.path.isfile(path):
        old = [c for c in load_certificates(read_key_file(path), path)
               if found.address in cert_emails(c)]
        if old and cert_digest(old[0]) == cert_digest(found.cert):
            found.note = "unchanged (already saved)"
            return found
        if old and not certificate_problem(old[0], found.address, "encrypt") and \
                old[0].not_valid_after_utc >= found.cert.not_valid_after_utc:
            found.cert, found.note = old[0], "kept the existing certificate (valid, expires later)"
            return found
        found.note = "replaced an older certificate" if old else "replaced %s" % path
    pem = b"".join(c.public_bytes(Encoding.PEM) for c in [found.cert] + found.chain)
    tmp = path + ".tmp%d" % os.getpid()
    try:
        with open(tmp, "wb") as fh:
            fh.write(pem)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError("%s: cannot save the certificate: %s" % (path, exc.strerror or exc))
    return found


###############################################################################
# Delivery ####################################################################
###############################################################################
# Back ends share one interface: open() -> report line, send(job) -> report
# detail, close(); they raise DeliveryError and never print (transcripts go
# through the *log* callable, which redacts).

class Job:
    """One message ready to go: its source, final bytes, envelope and parsed Message."""

    def __init__(self, source, data, mail_from, recipients, msg=None, copy=0):
        self.source, self.data, self.mail_from = source, data, mail_from
        self.recipients, self.msg, self.copy = recipients, msg, copy

    def describe(self):
        """Return the seed's 'Sending FILE<TAB>From: a<TAB>To: b, c' line."""
        return "Sending %s\tFrom: %s\tTo: %s" % (self.source, self.mail_from,
                                                  ", ".join(self.recipients))


_TLS_CONTEXTS = {}


def tls_context(cafile="", verify=True):
    """Return an ssl.SSLContext verifying certificate and host name (unless *verify* is off).

    One per process and setting: loading the CA store costs milliseconds, and a
    batch reconnects every MESSAGES_PER_CONNECTION messages.
    """
    import ssl
    if (cafile, verify) not in _TLS_CONTEXTS:
        ctx = ssl.create_default_context(cafile=cafile or None)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        _TLS_CONTEXTS[cafile, verify] = ctx
    return _TLS_CONTEXTS[cafile, verify]


_SMTP_CLASSES = []


def _smtp_classes():
    """Return (SMTP, SMTP_SSL) subclasses that write a redacted transcript (made once).

    The transcript is redacted by construction: an AUTH command is logged as
    'AUTH <mechanism> ***', every reply to a 334 challenge as '***', and the
    message data as its size only.  smtplib's set_debuglevel() is never used
    (it prints the base64 credentials).
    """
    if _SMTP_CLASSES:
        return tuple(_SMTP_CLASSES)
    import smtplib
    import ssl

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

        def _shown(self, s):
            if isinstance(s, bytes) and len(s) > 5:  # the message, maybe the next envelope
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

    _SMTP_CLASSES[:] = [SMTP, SMTPS]
    return SMTP, SMTPS


def starts_a_line(data, char, probes=16):
    """Return True if a line of *data* starts with the byte *char*.

    Finds *char* with memchr and looks behind it: base64 bodies hold no "." at
    all, so an encrypted message is scanned in ~1 us instead of ~30 us for
    b"\\n." in data; text full of dots falls back to that search after *probes*.
    """
    at = data.find(char)
    for _ in range(probes):
        if at < 0:
            return False
        if at == 0 or data[at - 1] == 10:  # after b"\n"
            return True
        at = data.find(char, at + 1)
    return at == 0 or at > 0 and b"\n" + char in data[at - 1:]


class SmtpDelivery:
    """Inject over SMTP: connect, EHLO, STARTTLS, EHLO, AUTH; then MAIL/RCPT/DATA."""

    name = "smtp"

    def __init__(self, settings, log=None):
        self.settings, self.log, self.smtp, self.mode = settings, log, None, "plain"
        self.count = 0  #: messages on the current connection

    def describe(self):
        """Return what open() would do, for --dry_run."""
        s = self.settings
        how = {"auto": "STARTTLS if offered", "starttls": "STARTTLS", "tls": "TLS",
               "none": "plain"}[s.tls]
        return "Would open SMTP connection (%s) to %s" % (how, s.describe())

    def open(self):
        """Connect and authenticate; return the 'Opened SMTP connection' line.

        Raises DeliveryError (connect/timeout 75, TLS 78, auth 77) or ConfigError.
        """
        s = self.settings
        try:
            self.smtp = self._connect()
            self._secure()
            self._login()
        except BaseException as exc:
            self.close()
            if isinstance(exc, (SmimeToolError, KeyboardInterrupt)):
                raise
            if getattr(exc, "verify_code", 0) in HOST_MISMATCH:
                raise host_mismatch(s, self._peer_names()) from None
            raise smtp_failure(exc, s, session=True)
        return "Opened SMTP connection (%s) to %s" % (self.mode, s.describe())

    def _peer_names(self):
        """Return the names the server's certificate carries, or [] if unknown.

        Read over a second connection that checks the certificate chain but not
        the name, and goes no further than TLS: no credentials, no message.
        """
        import ssl
        s = self.settings
        context = ssl.create_default_context(cafile=s.cafile or None)
        context.check_hostname = False
        try:
            self.smtp = self._connect(context)
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

    def _connect(self, context=None):
        import socket
        s = self.settings
        self.count, self.mode = 0, "plain"  # a new connection is in clear until TLS says not
        plain, secure = _smtp_classes()
        helo = s.helo or socket.gethostname()  # getfqdn() can stall on reverse DNS
        if s.tls == "tls":
            self.mode = "TLS"
            smtp = secure(s.host, s.port, local_hostname=helo, timeout=s.timeout,
                          context=context or tls_context(s.cafile, s.verify), log=self.log)
        else:
            smtp = plain(s.host, s.port, local_hostname=helo, timeout=s.timeout, log=self.log)
        # Commands go out in whole groups already: do not let Nagle hold the last segment
        smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        smtp.ehlo()
        return smtp

    def _secure(self):
        """STARTTLS (RFC 3207) when asked, or offered in auto mode."""
        s, smtp = self.settings, self.smtp
        if s.tls not in ("auto", "starttls"):
            return
        if smtp.has_extn("starttls"):
            smtp.starttls(context=tls_context(s.cafile, s.verify))
            smtp.ehlo()
            self.mode = "STARTTLS"
        elif s.tls == "starttls":
            raise ConfigError("%s:%d does not offer STARTTLS but SMTP_TLS=starttls requires it"
                              % (s.host, s.port))

    def _login(self):
        """AUTH (RFC 4954), only over TLS: credentials never travel in clear."""
        s, smtp = self.settings, self.smtp
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

    def send(self, job):
        """Send *job*'s exact bytes to every recipient; return the server's final reply.

        MAIL, RCPT for each recipient, DATA (RFC 5321 3.3), as smtplib.sendmail()
        does, but keeping the end-of-DATA reply ("250 2.0.0 Ok: queued as ...").
        The connection is renewed after MESSAGES_PER_CONNECTION messages.
        Raises RecipientsRefused (with the accepted ones, if any) or DeliveryError.
        """
        try:
            self._renew()
            self._send_envelope(job)
            refused = self._envelope_replies(job)
            self.smtp.send(self._content(job))
            return self._data_reply(job, refused, reset=True)
        except BaseException as exc:
            raise self._failed(exc) from None

    def stream(self, entries, halted):
        """Send a worker's messages back to back; yield (entry, outcome) in order.

        *entries* yields (Result, Job or None, start) and builds each message as it
        is pulled; outcome is the end-of-DATA reply, the SmimeToolError of a failed
        attempt, or None for an entry without a Job.  With PIPELINING, RFC 2920 3.1
        lets a message's content open a command group: its final dot goes out with
        the next message's MAIL, RCPT and DATA, and the message after that is built
        while the server answers, so the worker seldom waits.  A failure is yielded
        only when nothing is in flight, so that the caller may retry it with send().
        Stops pulling entries once halted() is true.
        """
        held, built = [], []  # (entry, outcome) to yield; entries built, not sent

        def prefetch():
            """Pull (and so build) entries until one is ready to send."""
            while not built and not halted():
                entry = next(entries, None)
                if entry is None:
                    return
                if entry[1] is None:  # could not be built: nothing to send
                    held.append((entry, None))
                else:
                    built.append(entry)

        def take():
            prefetch()
            return built.pop(0) if built and not halted() else None

        current, ahead = take(), False  # ahead: its envelope went out behind the last dot
        while current is not None or held:
            failing = any(isinstance(outcome, BaseException) for _, outcome in held)
            while held and not (ahead and failing):
                yield held.pop(0)
            if current is None:
                break
            job, follow = current[1], None
            try:
                if not ahead:
                    self._renew()
                    self._send_envelope(job)
                refused = self._envelope_replies(job)
            except BaseException as exc:
                held.append((current, self._failed(exc)))
                current, ahead = take(), False
                continue
            if (not failing and self.count < MESSAGES_PER_CONNECTION
                    and self.smtp.has_extn("pipelining")):
                follow = take()
            payload = self._content(job)
            if follow is not None:
                payload += self._envelope(follow[1]).encode()
            try:
                self.count += follow is not None
                self.smtp.send(payload)
                error = None
            except BaseException as exc:
                error = self._failed(exc)
            if error is None:
                prefetch()  # build the next message while the server answers
                try:
                    held.append((current, self._data_reply(job, refused, reset=False)))
                except BaseException as exc:
                    error = self._failed(exc)
            if error is not None:
                held.append((current, error))
                if follow is not None and self.smtp is None:  # gone with the session
                    held.append((follow, error))
                    follow = None
            current, ahead = (follow, True) if follow is not None else (take(), False)

    def _failed(self, exc):
        """Return the SmimeToolError for *exc* (re-raising KeyboardInterrupt).

        The session is kept after a server's reply that leaves it usable (the
        transaction was reset or ended), closed otherwise: its state is unknown.
        """
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        error = exc if isinstance(exc, SmimeToolError) else smtp_failure(exc, self.settings)
        if getattr(error, "session", True) and not isinstance(error, RecipientsRefused):
            self.close()
        return error

    def _renew(self):
        """Open the connection if needed, a new one after MESSAGES_PER_CONNECTION."""
        if self.smtp is not None and self.count >= MESSAGES_PER_CONNECTION:
            self.close()
        if self.smtp is None:
            self.open()

    def _envelope(self, job):
        """Return MAIL FROM, one RCPT TO per recipient and DATA as one string."""
        size = " SIZE=%d" % len(job.data) if self.smtp.has_extn("size") else ""
        return "MAIL FROM:<%s>%s\r\n%sDATA\r\n" % (
            job.mail_from, size, "".join("RCPT TO:<%s>\r\n" % r for r in job.recipients))

    def _send_envelope(self, job):
        """Send the envelope: in one group with PIPELINING (RFC 2920), else line by line."""
        self.count += 1
        if self.smtp.has_extn("pipelining"):
            self.smtp.send(self._envelope(job))

    def _envelope_replies(self, job):
        """Read the replies to MAIL, RCPT... and DATA; return {refused recipient: reply}.

        Without PIPELINING the commands are sent here, one at a time.  Raises
        SMTPSenderRefused, SMTPDataError or RecipientsRefused (every recipient
        refused), leaving the session ready for the next transaction.
        """
        import smtplib
        smtp = self.smtp
        commands = self._envelope(job).split("\r\n")[:-1]
        if smtp.has_extn("pipelining"):
            replies = [smtp.getreply() for _ in commands]
        else:
            replies = []
            for command in commands:
                smtp.send(command + "\r\n")
                replies.append(smtp.getreply())
                if replies[-1][0] >= 400 and command.startswith(("MAIL", "DATA")):
                    break
        (code, text), rcpt_replies = replies[0], replies[1:1 + len(job.recipients)]
        refused = {r: reply for r, reply in zip(job.recipients, rcpt_replies)
                   if reply[0] not in (250, 251)}
        data_code, data_text = replies[-1] if len(replies) == len(commands) else (503, b"")
        if code != 250:
            self._abort_data(data_code)
            raise smtplib.SMTPSenderRefused(code, text, job.mail_from)
        if len(refused) == len(job.recipients):
            self._abort_data(data_code)
            raise RecipientsRefused(smtp_refusals(refused), (),
                                    refusal_hint(refused, self.settings))
        if data_code != 354:
            smtp.rset()
            raise smtplib.SMTPDataError(data_code, data_text)
        return refused

    @staticmethod
    def _content(job):
        """Return the message dot-stuffed where a line starts with "." (RFC 5321 4.5.2),
        with its final <CRLF>.<CRLF> (base64 bodies never need stuffing)."""
        data = job.data
        if starts_a_line(data, b"."):
            data = re.sub(rb"(?m)^\.", b"..", data)
        return data + (b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n")

    def _data_reply(self, job, refused, reset):
        """Read the end-of-DATA reply; return it as text.

        Raises SMTPDataError (after RSET when *reset*: a pipelined next
        transaction must not be reset) or RecipientsRefused for a partial refusal.
        """
        import smtplib
        code, text = self.smtp.getreply()
        if code != 250:
            if reset:
                self.smtp.rset()
            raise smtplib.SMTPDataError(code, text)
        reply = "%d %s" % (code, text.decode("utf-8", "replace"))
        if refused:
            accepted = [r for r in job.recipients if r not in refused]
            raise RecipientsRefused(smtp_refusals(refused), accepted,
                                    refusal_hint(refused, self.settings), reply)
        return reply

    def _abort_data(self, data_code):
        """After a refused MAIL or RCPT: end a DATA the server accepted anyway, then RSET."""
        if data_code == 354:
            self.smtp.send(b".\r\n")
            self.smtp.getreply()
        self.smtp.rset()

    def close(self):
        """QUIT politely; ignore a connection that is already gone."""
        smtp, self.smtp = self.smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except Exception:
            try:
                smtp.close()
            except Exception:
                pass


def smtp_refusals(refused):
    """Return {address: (code, text)} from smtplib's {address: (code, bytes)}."""
    return {a: (code, text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text))
            for a, (code, text) in refused.items()}


def refusal_hint(refused, settings):
    """Return a one-line hint for the classic causes of a refusal, or ''."""
    for code, text in refused.values():
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        if code in (530, 535):
            return "check SMTP_USER and SMTP_PASSWORD"
        if code >= 550 and "relay" in text.lower():
            if settings.port == 25 and not settings.user:
                return ("the server does not relay for you on port 25: set SMTP_PORT=587 and "
                        "SMTP_USER/SMTP_PASSWORD")
            return "the server does not relay for this sender or these recipients"
    return ""


#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
HOST_MISMATCH = (62, 64)


def host_mismatch(settings, names):
    """Return the ConfigError (78) for a certificate issued to other *names* (RFC 6125)."""
    where = "%s:%d" % (settings.host, settings.port)
    if not names:
        return ConfigError("TLS certificate of %s is for another name than %s; connect by a "
                           "name it carries (SMTP_HOST)" % (where, settings.host))
    return ConfigError("TLS certificate of %s is for another name: it carries %s, not %s; set "
                       "SMTP_HOST to one of those" % (where, ", ".join(names), settings.host))


def smtp_failure(exc, settings, session=False):
    """Translate an smtplib/socket/ssl exception into a DeliveryError or ConfigError."""
    import smtplib
    import socket
    import ssl
    where = "%s:%d" % (settings.host, settings.port)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        refused = smtp_refusals(exc.recipients)
        return RecipientsRefused(refused, (), refusal_hint(exc.recipients, settings))
    if isinstance(exc, smtplib.SMTPResponseException):
        text = exc.smtp_error.decode("utf-8", "replace") if isinstance(
            exc.smtp_error, bytes) else str(exc.smtp_error)
        code = exc.smtp_code
        stage = {smtplib.SMTPAuthenticationError: "authentication refused",
                 smtplib.SMTPSenderRefused: "sender refused",
                 smtplib.SMTPDataError: "message refused",
                 smtplib.SMTPConnectError: "connection refused"}.get(type(exc), "refused")
        hint = refusal_hint({"": (code, text)}, settings)
        return DeliveryError("%s by %s: %d %s" % (stage, where, code, text),
                             smtp_exit_code(code), session or code in (421, 530, 535), hint)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return DeliveryError("TLS certificate of %s not trusted: %s; set SMTP_CAFILE to your "
                             "MTA's CA bundle" % (where, exc.verify_message or exc.reason),
                             EX_CONFIG, True)
    if isinstance(exc, ssl.SSLError):
        return DeliveryError("TLS with %s failed: %s" % (where, exc.reason or exc), EX_CONFIG, True)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return ConfigError("%s: %s" % (where, exc))
    if isinstance(exc, (socket.timeout, TimeoutError)) or (
            isinstance(exc, smtplib.SMTPServerDisconnected)
            and isinstance(exc.__context__, (socket.timeout, TimeoutError))):
        return DeliveryError("no answer from %s within %g seconds (SMTP_TIMEOUT)"
                             % (where, settings.timeout), EX_TEMPFAIL, True)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return DeliveryError("%s closed the connection: %s" % (where, exc or "unexpectedly"),
                             EX_TEMPFAIL, True)
    if isinstance(exc, OSError):
        return DeliveryError("cannot connect to %s: %s" % (where, exc.strerror or exc),
                             EX_TEMPFAIL, True)
    return DeliveryError("SMTP with %s failed: %s" % (where, exc), EX_TEMPFAIL, True)


def sparkpost_smtp_header(opts, signed):
    """Return the X-MSYS-API header for SparkPost SMTP: tracking off for signed mail.

    SparkPost rewrites links and adds an open pixel when tracking is on, which
    would break a signature; the header sits in the outer, unsigned header.
    """
    import json
    track = bool(opts.track and not signed)
    value = json.dumps({"options": {"open_tracking": track, "click_tracking": track,
                                    "transactional": not track},
                        "campaign_id": opts.campaign}, separators=(",", ":"))
    return b"X-MSYS-API: " + value.encode("ascii") + b"\r\n"


class ApiDelivery:
    """Send through the SparkPost transmissions API (POST /api/v1/transmissions)."""

    name = "api"

    def __init__(self, settings, opts, log=None):
        self.settings, self.opts, self.log, self.session = settings, opts, log, None

    def describe(self):
        return "Would open connection to %s (API key ***)" % self.settings.base_url

    def open(self):
        """Create the keep-alive HTTP session; return the 'Opened connection' line."""
        import requests
        self.session = requests.Session()
        self.session.headers.update({"Authorization": self.settings.key,
                                     "Content-Type": "application/json",
                                     "User-Agent": "sparkpostSMIME/" + __version__})
        return "Opened connection to %s" % self.settings.base_url

    def send(self, job):
        """POST one transmission; return the report detail (id, accepted, rejected).

        Raises DeliveryError: 401/403 -> 77, other 4xx -> 69, 429/5xx/network -> 75
        (with .retry_after from the Retry-After header); the batch layer retries.
        """
        if self.session is None:
            self.open()
        outcome = self._post(transmission_body(job, self.opts))
        if isinstance(outcome, DeliveryError):
            raise outcome
        return outcome

    def _post(self, body):
        """One POST; return the report detail, or a DeliveryError (not raised)."""
        import requests
        url = self.settings.base_url + "/transmissions"
        if self.log:
            self.log("-> POST %s (%d octets, Authorization: ***)" % (url, len(body)))
        try:
            resp = self.session.post(url, data=body, timeout=self.settings.timeout)
        except requests.exceptions.SSLError as exc:
            return DeliveryError("TLS with %s failed: %s" % (url, first_line(exc)), EX_CONFIG, True)
        except requests.exceptions.RequestException as exc:
            return DeliveryError("cannot reach %s: %s" % (url, first_line(exc)), EX_TEMPFAIL)
        if self.log:
            self.log("<- %d %s %s" % (resp.status_code, resp.reason, resp.text[:500]))
        return api_outcome(resp)


    def close(self):
        """Close the keep-alive connection."""
        session, self.session = self.session, None
        if session is not None:
            session.close()


def first_line(exc):
    """Return the first line of an exception's text (requests' are long)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def transmission_body(job, opts):
    """Return the JSON request body (bytes) of a transmission for *job*."""
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
    track = bool(opts.track)
    options = {"open_tracking": track, "click_tracking": track, "transactional": not track}
    if opts.sign_mode or opts.encrypt:  # {{...}} in a signed text part would break it
        options["perform_substitutions"] = False
    body = {"options": options,
            "campaign_id": opts.campaign,
            "recipients": recipients,
            "content": {"email_rfc822": job.data.decode("ascii")}}
    return json.dumps(body).encode("ascii")


def visible_to(msg):
    """Return the message's To header as it appears in the output (7-bit, unfolded)."""
    for f in msg.outer:
        if f.name == "to":
            return Field("to", safe_field(f)).value.decode("ascii")
    return ""


def api_outcome(resp):
    """Return the report detail of a 2xx answer, or the DeliveryError of another."""
    try:
        data = resp.json()
    except ValueError:
        data = {}
    if 200 <= resp.status_code < 300:
        results = data.get("results", {}) if isinstance(data, dict) else {}
        return "id %s, accepted %s, rejected %s" % (
            results.get("id", "?"), results.get("total_accepted_recipients", "?"),
            results.get("total_rejected_recipients", "?"))
    text = "SparkPost API answered %d %s%s" % (resp.status_code, resp.reason or "",
                                               api_errors(data))
    code = resp.status_code
    if code in (401, 403):
        err = DeliveryError(text, EX_NOPERM, True, "check SPARKPOST_API_KEY and its permissions "
                                                   "(Transmissions: Read/Write)")
    elif code == 420:
        err = DeliveryError(text, EX_TEMPFAIL, hint="SparkPost's sending limit for this account "
                            "is exceeded (420): nothing more is sent in this run; try again "
                            "once the limit resets, or ask SparkPost to raise it", halt=True)
    elif code == 429 or code >= 500:
        err = DeliveryError(text, EX_TEMPFAIL)
        err.retry_after = retry_after(resp.headers.get("Retry-After", ""))
    else:
        err = DeliveryError(text, EX_UNAVAILABLE)
    return err


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


class DryRun:
    """Build everything, then describe what would be sent instead of connecting."""

    name = "dry_run"

    def __init__(self, backend):
        self.backend = backend

    def open(self):
        return "Dry run, nothing is sent. " + self.backend.describe()

    def send(self, job):
        head = job.data.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
        lines = ["  MAIL FROM:<%s>" % job.mail_from]
        lines += ["  RCPT TO:<%s>" % r for r in job.recipients]
        lines.append("  size %d octets; outer header:" % len(job.data))
        lines += ["    " + line for line in head.split("\r\n")]
        return "\n".join(lines)

    def close(self):
        pass


###############################################################################
# Batch: many messages, several sessions, nothing lost ########################
###############################################################################
# A Worker owns one delivery session and turns work items into Results; a Printer
# prints, journals and counts them.  With --jobs N, N forked worker processes run
# side by side (cryptography holds the GIL while it signs and encrypts, so threads
# would not use a second core), each with its own Printer; the main process adds
# up their counts for the summary (and draws the progress bar, if any).

class Result:
    """The outcome of one work item, as printed, journaled and counted."""

    def __init__(self, source, copy):
        self.source, self.copy = source, copy
        self.status, self.code, self.attempts, self.duration = "failed", EX_SOFTWARE, 0, 0.0
        self.recipients, self.reply, self.abort = [], "", False
        self.report, self.errors = [], []  #: stdout lines, stderr lines

    def record(self):
        """Return the journal entry (a JSON-ready dict)."""
        entry = {"input": self.source, "status": self.status, "exit_code": self.code,
                 "recipients": self.recipients, "reply": self.reply,
                 "attempts": self.attempts, "duration": round(self.duration, 4),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.copy:
            entry["copy"] = self.copy
        return entry


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


def work_items(opts):
    """Return [(path, copy)]: every input (directories expanded), --repeat times."""
    paths = expand_inputs(opts.inputs)
    return [(path, copy) for path in paths for copy in range(opts.repeat)]


class FileOutput:
    """The 'back end' without a send option: stdout, -o FILE or one file per input in -o DIR."""

    name = "file"

    def __init__(self, opts):
        self.opts = opts

    def open(self):
        return ""

    def send(self, job):
        write_output(job.data, output_path(self.opts, job.source, job.copy))
        return ""

    def close(self):
        pass


class Archive:
    """A Maildir (tmp/, new/, cur/) keeping the exact bytes of every message sent."""

    def __init__(self, directory):
        self.directory, self.count = directory, 0
        try:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(directory, sub), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ConfigError("--archive %s: cannot create the Maildir: %s"
                              % (directory, exc.strerror or exc))

    def store(self, data):
        """Write *data* to tmp/, then rename it into new/ (the Maildir protocol)."""
        import socket
        self.count += 1
        name = "%d.P%dQ%d.%s" % (time.time(), os.getpid(), self.count,
                                 socket.gethostname().replace("/", "_"))
        tmp = os.path.join(self.directory, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, os.path.join(self.directory, "new", name))


class Worker:
    """Owns one delivery session; turns work items into Results (never prints)."""

    def __init__(self, opts, backend):
        self.opts, self.backend = opts, backend  # not connected yet: each worker connects
        self.archive = Archive(opts.archive) if opts.archive else None
        self.is_open = False

    def build(self, item):
        """Return (Result, Job or None when the message cannot be built, start time)."""
        path, copy = item
        res, start = Result(path, copy), time.perf_counter()
        try:
            job = make_job(path, self.opts, self.backend)
            job.copy = copy
        except (MessageError, InputError, IdentityError) as exc:
            res.code, res.errors = exc.exit_code, [str(exc)]
            return res, None, start
        res.recipients = list(job.recipients)
        return res, job, start

    def finish(self, res, job, start, outcome=None):
        """Deliver a built job (if any); return its completed Result.

        *outcome*: the first attempt's outcome when it was already sent (stream()).
        """
        if job is not None:
            if self.opts.send:
                res.report.append(job.describe())
            self.deliver(job, res, outcome)
        res.duration = time.perf_counter() - start
        return res

    def run(self, items, emit, stopped):
        """Handle *items* in order, building the next message while this one is sent.

        Over SMTP with PIPELINING, SmtpDelivery.stream() overlaps the two itself.
        Otherwise a builder thread does when sending with one worker: signing and
        encrypting hold the GIL while sending mostly waits on the socket (with
        several workers, the processes overlap and a thread would only contend).
        Stops when the items end, stopped() is true or a Result asks to abort.
        """
        items = iter(items)
        if isinstance(self.backend, SmtpDelivery):
            if not self.run_each(items, emit, stopped, lambda: self.backend.smtp is not None):
                return
            if self.backend.smtp is not None and self.backend.smtp.has_extn("pipelining"):
                self.run_stream(items, emit, stopped)
                return
        if not self.opts.send or self.opts.jobs > 1:  # nothing to overlap with a thread:
            self.run_each(items, emit, stopped)  # or other workers already fill the cores
            return
        import queue
        import threading
        built, halt = queue.Queue(maxsize=2), threading.Event()

        def builder():
            try:
                for item in items:
                    if halt.is_set():
                        break
                    built.put(self.build(item))
            except BaseException as exc:  # hand any bug to the consumer, never hang it
                built.put(exc)
            built.put(None)

        thread = threading.Thread(target=builder, daemon=True)
        thread.start()
        try:
            while True:
                entry = built.get()
                if entry is None:
                    break
                if isinstance(entry, BaseException):
                    raise entry
                res = self.finish(*entry)
                emit(res)
                if res.abort or stopped():
                    break
        finally:
            halt.set()
            while thread.is_alive():  # let a blocked builder put its last entry and end
                try:
                    built.get(timeout=0.05)
                except queue.Empty:
                    pass

    def run_each(self, items, emit, stopped, until=lambda: False):
        """Build and deliver *items* one at a time, or until until() is true after one.

        Returns False when stopped() or a Result asked to abort, else True.
        """
        for item in items:
            res = self.finish(*self.build(item))
            emit(res)
            if res.abort or stopped():
                return False
            if until():
                break
        return True

    def run_stream(self, items, emit, stopped):
        """run() over SmtpDelivery.stream(): one command group per message."""
        aborted = []
        entries = (self.build(item) for item in items)
        for entry, outcome in self.backend.stream(entries, lambda: aborted or stopped()):
            res = self.finish(*entry, outcome)
            emit(res)
            if res.abort:
                aborted.append(res)

    def deliver(self, job, res, first=None):
        """Send with up to --retries retries of temporary failures (exponential backoff).

        A message the server accepted is never sent again: only a failure before
        the end-of-DATA reply (or an API error/timeout) is retried, and after a
        partial refusal only the recipients refused with 4xx are tried again.
        """
        accepted, refused, pending, error, hint = [], {}, list(job.recipients), None, ""
        waited = 0.0
        for attempt in range(self.opts.retries + 1):
            res.attempts, job.recipients, error = attempt + 1, pending, None
            try:
                if first is not None:  # the first attempt already went out: its outcome
                    outcome, first = first, None
                    if isinstance(outcome, BaseException):
                        raise outcome
                    res.reply = outcome
                else:
                    self.open_session(res)
                    res.reply = self.backend.send(job)
                accepted += pending
            except RecipientsRefused as exc:
                accepted += exc.accepted
                res.reply, hint = exc.reply or res.reply, exc.hint or hint
                refused.update(exc.refused)
                error = exc
            except DeliveryError as exc:
                error, hint = exc, exc.hint or hint
            except ConfigError as exc:  # e.g. credentials without TLS: the batch must stop
                error = DeliveryError(str(exc), exc.exit_code, session=True)
            pending = [a for a in pending
                       if a not in accepted and refused.get(a, (400, ""))[0] < 500]
            if (not pending or error.exit_code != EX_TEMPFAIL or error.halt
                    or attempt == self.opts.retries):
                break
            delay = min(max(self.opts.retry_delay * 2 ** attempt, error.retry_after),
                        MAX_RETRY_WAIT)
            if waited + delay > MAX_TOTAL_WAIT:
                break
            waited += delay
            res.errors.append("%s; retrying in %g s (attempt %d of %d)"
                              % (error, delay, attempt + 2, self.opts.retries + 1))
            if error.session:
                self.close()
            time.sleep(delay)
        job.recipients = res.recipients
        failed = [a for a in res.recipients if a not in accepted]
        if accepted and self.archive is not None:
            self.archive.store(job.data)
        if failed:
            self.report_failure(res, accepted, failed, refused, error, hint)
        else:
            self.report_success(res)

    def open_session(self, res):
        if not self.is_open:
            line = self.backend.open()
            self.is_open = True
            if line:
                res.report.insert(0, line)

    def report_success(self, res):
        res.status, res.code = "sent", EX_OK
        if self.opts.dry_run:
            res.report += ["OK - in {elapsed} seconds (dry run: nothing was sent)"]
            res.report += res.reply.splitlines()
        else:
            api = self.opts.send == "api"
            res.report.append("OK - in {elapsed} seconds" + (", " + res.reply if api else ""))

    def report_failure(self, res, accepted, failed, refused, error, hint):
        """Fill the Result of a message some or all recipients did not get."""
        res.errors += ["refused %s: %d %s" % (a, refused[a][0], refused[a][1])
                       for a in failed if a in refused]
        if error is not None and not isinstance(error, RecipientsRefused):
            res.errors.append(str(error))
            res.code = error.exit_code
            res.abort = error.halt or (error.session
                                       and error.exit_code in (EX_CONFIG, EX_NOPERM))
        else:
            res.code = min(smtp_exit_code(refused[a][0]) for a in failed if a in refused)
        if hint:
            res.errors.append("hint: " + hint)
        if accepted:
            res.status = "partial"
            res.report.append("PARTIAL - in {elapsed} seconds: accepted %s; refused %s"
                              % (", ".join(accepted), ", ".join(failed)))
        elif error is None or isinstance(error, RecipientsRefused):
            res.report.append("FAILED - in {elapsed} seconds: every recipient was refused")
        else:
            res.report.append("FAILED - in {elapsed} seconds")

    def close(self):
        self.is_open = False
        self.backend.close()


class Journal:
    """--results FILE: one JSON object per message, appended as each one finishes."""

    def __init__(self, path):
        self.path, self.fh = path, None
        if path:
            try:
                self.fh = open(path, "a", encoding="utf-8")
            except OSError as exc:
                raise ConfigError("--results %s: cannot open: %s" % (path, exc.strerror or exc))

    def write(self, res):
        if self.fh is not None:
            import json
            self.fh.write(json.dumps(res.record(), sort_keys=True) + "\n")
            self.fh.flush()
            os.fsync(self.fh.fileno())

    def close(self):
        if self.fh is not None:
            self.fh.close()


def already_sent(path):
    """Return {(input, copy)} recorded as sent in journal *path* (for --resume)."""
    import json
    done = set()
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                if isinstance(entry, dict) and entry.get("status") == "sent":
                    done.add((entry.get("input"), entry.get("copy", 0)))
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError("--results %s: cannot read: %s" % (path, exc.strerror or exc))
    return done


class Stats:
    """Counts and latencies for the summary line."""

    def __init__(self, total, done="sent"):
        self.total, self.sent, self.failed, self.code = total, 0, 0, EX_OK
        self.done = done  #: what a success is called: "sent", or "written" for files
        self.failed_at = 0.0  #: time.monotonic() of the first failure (sets the exit code)
        self.latencies, self.start = [], time.perf_counter()

    def add(self, res):
        if res.status == "sent":
            self.sent += 1
            self.latencies.append(res.duration)
        else:
            self.failed += 1
            if not self.code:
                self.code, self.failed_at = res.code, time.monotonic()

    def merge(self, sent, failed, code, failed_at, latencies):
        """Add a worker process's counts; the exit code is the earliest failure's."""
        self.sent, self.failed = self.sent + sent, self.failed + failed
        self.latencies += latencies
        if code and (not self.code or failed_at < self.failed_at):
            self.code, self.failed_at = code, failed_at

    def summary(self):
        """Return 'N sent, M failed[, K not sent] in S seconds (R msg/s); latency ...'."""
        wall = time.perf_counter() - self.start
        text = "Summary: %d %s, %d failed" % (self.sent, self.done, self.failed)
        left = self.total - self.sent - self.failed
        if left:
            text += ", %d not %s" % (left, self.done)
        text += " in %.3f seconds (%.1f msg/s)" % (wall, self.sent / wall if wall else 0.0)
        if self.latencies:
            lat = sorted(self.latencies)
            pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
            text += "; latency min %.1f ms, median %.1f ms, p95 %.1f ms, max %.1f ms" % (
                lat[0] * 1000, pick(0.5) * 1000, pick(0.95) * 1000, lat[-1] * 1000)
        return text


class Stop:
    """Ctrl-C: the first one stops new work (in-flight messages finish), the second aborts."""

    def __init__(self, batch=True):
        self.halt, self.requested, self.previous = None, False, None
        self.batch = batch  #: one message: plain KeyboardInterrupt (and no signal import)

    def __enter__(self):
        if self.batch:
            import signal
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.halt is not None:  # the workers' shared flag
            self.halt[0] = 1
        warn("interrupted: finishing the messages in flight (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self.previous is not None:
            import signal
            signal.signal(signal.SIGINT, self.previous)


def run_sequential(opts, backend, items, emit, stop):
    """Handle every item in this process with one Worker."""
    worker = Worker(opts, backend)
    try:
        worker.run(items, emit, lambda: stop.requested)
    finally:
        worker.close()


def run_parallel(opts, backend, items, printer, stop, jobs):
    """Handle the items in *jobs* forked worker processes.

    Worker k takes items k, k + jobs, k + 2 jobs, ... (no task queue to lock per
    message).  Each worker prints its own report lines and journal rows as it
    goes, one write per message so that lines never mix, and at the end sends
    its counts up a pipe for the summary; only a progress bar (drawn here) needs
    every Result sent up.  A worker asking to abort sets a shared halt flag.
    """
    import gc
    import mmap
    import select
    import signal
    preload(opts, backend, items[0])
    halt = mmap.mmap(-1, 1)  # shared with the workers: non-zero = take no new message
    stop.halt = halt
    gc.freeze()  # the workers inherit these objects: keep their pages shared, unscanned
    sys.stdout.flush()
    sys.stderr.flush()
    channels = {}  # read end -> Channel
    try:
        for k in range(jobs):
            reader, writer = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(reader)
                for fd in channels:
                    os.close(fd)
                os._exit(worker_process(opts, backend, items[k::jobs], printer, writer, halt))
            os.close(writer)  # the child holds its own copy: EOF means the worker has ended
            channels[reader] = Channel(pid)
        poller = select.poll()
        for fd in channels:
            poller.register(fd, select.POLLIN)
        while channels:
            for fd, _ in poller.poll():
                chunk, channel = os.read(fd, 65536), channels[fd]
                for message in channel.receive(chunk):
                    channel.counted |= collect(message, printer, halt)
                if not chunk:
                    poller.unregister(fd)
                    os.close(fd)
                    del channels[fd]
                    channel.reap()
    finally:
        for channel in channels.values():  # a second Ctrl-C: stop the workers too
            os.kill(channel.pid, signal.SIGTERM)
            os.waitpid(channel.pid, 0)


def preload(opts, backend, item):
    """Build *item* once here so that forked workers inherit what it loaded.

    The first message of a process pays for lazy imports and for reading and
    checking the keys (~60 ms), the first SMTP session for smtplib, ssl and the
    CA store: paid once before forking instead of once per worker.  Any error
    is left for the worker that meets it to report.
    """
    try:
        make_job(item[0], opts, backend)
        if isinstance(backend, SmtpDelivery):
            _smtp_classes()
            if backend.settings.tls in ("tls", "starttls"):  # not "auto": maybe unused
                tls_context(backend.settings.cafile, backend.settings.verify)  # ~35 ms
    except Exception:  # noqa: BLE001 - a warm-up only: the worker reports it properly
        pass


class Channel:
    """The parent's end of one worker's pipe: length-prefixed marshal frames."""

    def __init__(self, pid):
        self.pid, self.buffer, self.counted = pid, b"", False

    def receive(self, chunk):
        """Add *chunk*; return the messages now complete (plain data: tuples, str...)."""
        import marshal
        buf, messages = self.buffer + chunk, []
        while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
            size = int.from_bytes(buf[:4], "big")
            messages.append(marshal.loads(buf[4:4 + size]))
            buf = buf[4 + size:]
        self.buffer = buf
        return messages

    def reap(self):
        """Wait for the ended worker; warn if its counts never came."""
        os.waitpid(self.pid, 0)
        if not self.counted:
            warn("a worker process (pid %d) ended without reporting its counts: the summary "
                 "misses the messages it handled (--results FILE lists them)" % self.pid)


def frame(message):
    """Return *message* (plain data: tuples, lists, str, numbers) as a length-prefixed frame."""
    import marshal
    data = marshal.dumps(message)
    return len(data).to_bytes(4, "big") + data


def collect(message, printer, halt):
    """Act on one message from a worker; return True if it carried the worker's counts."""
    kind = message[0]
    if kind == "result":
        res = Result.__new__(Result)
        res.__dict__.update(message[1])
        printer(res)
        if res.abort:
            halt[0] = 1
    elif kind == "abort":
        halt[0] = 1
    elif kind == "counts":
        printer.stats.merge(*message[1:])
        return True
    return False


def worker_process(opts, backend, items, printer, pipe, halt):
    """Run a forked worker; return its exit status (never return into the parent's code)."""
    try:
        worker_main(opts, backend, items, printer, pipe, halt)
        return EX_OK
    except BaseException as exc:  # noqa: BLE001 - a bug: say so, and let the parent count
        warn("internal error in a worker process: %s: %s" % (type(exc).__name__, exc))
        return EX_SOFTWARE
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def worker_main(opts, backend, items, printer, pipe, halt):
    """A worker process: its own session, its share of the items, its counts up *pipe*.

    Prints through *printer* itself unless the parent draws a progress bar: then
    each Result goes up *pipe* instead.
    """
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; in-flight work finishes
    stats, worker = printer.stats, None

    def send(message):
        data = frame(message)
        while data:
            data = data[os.write(pipe, data):]

    def emit(res):
        if printer.progress:
            send(("result", dict(vars(res))))
            return
        printer(res)
        if res.abort:
            send(("abort",))

    try:
        worker = Worker(opts, backend)
        worker.run(items, emit, lambda: halt[0])
    except SmimeToolError as exc:  # the session could not be set up at all
        res = Result("", 0)
        res.code, res.errors, res.abort = exc.exit_code, [str(exc)], True
        emit(res)
    finally:
        if worker is not None:
            worker.close()
    # the last word, even when Results went up one by one (then these counts are zeros)
    send(("counts", stats.sent, stats.failed, stats.code, stats.failed_at, stats.latencies))


class Printer:
    """Prints Results as they arrive: report lines (or a progress bar), errors, journal."""

    def __init__(self, opts, total, journal, stats):
        self.opts, self.total, self.journal, self.stats = opts, total, journal, stats
        self.progress = sys.stderr.isatty() and total >= PROGRESS_MIN and not opts.verbose
        self.lines = bool(opts.send) and not (self.progress and sys.stdout.isatty())

    def __call__(self, res):
        self.stats.add(res)
        self.journal.write(res)
        if res.report and (self.lines or (res.status != "sent" and self.opts.send)):
            say("\n".join(res.report).replace("{elapsed}", "%.3f" % res.duration))
        for line in res.errors:
            warn(line)
        if self.progress:
            self.bar()

    def bar(self):
        done = self.stats.sent + self.stats.failed
        width = 30
        filled = int(width * done / self.total) if self.total else width
        sys.stderr.write("\r[%s%s] %d/%d, %d failed " % ("#" * filled, "." * (width - filled),
                                                          done, self.total, self.stats.failed))
        if done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run_batch(opts):
    """Build (and send) every work item; print the report and summary; return the exit code."""
    items = work_items(opts)
    if opts.resume:
        done = already_sent(opts.results)
        skipped = [i for i in items if i in done]
        items = [i for i in items if i not in done]
        if skipped:
            warn("--resume: %d message(s) already sent according to %s, skipped"
                 % (len(skipped), opts.results))
    backend = make_backend(opts) or FileOutput(opts)  # settings checked once, before forking
    journal, stats = Journal(opts.results), Stats(len(items), "sent" if opts.send else "written")
    emit = Printer(opts, len(items), journal, stats)
    single = len(items) == 1 and not opts.results
    try:
        with Stop(batch=len(items) > 1) as stop:
            if opts.jobs > 1 and len(items) > 1:
                run_parallel(opts, backend, items, emit, stop, opts.jobs)
            else:
                run_sequential(opts, backend, items, emit, stop)
    finally:
        journal.close()
    if not single:
        (say if opts.send else warn)(stats.summary())
    if stop.requested:
        return 130
    if stats.sent + stats.failed < stats.total and not stats.code:
        return EX_TEMPFAIL
    return stats.code


###############################################################################
# Command line ################################################################
###############################################################################

class Options(NamedTuple):
    """What the command line asked for, checked and frozen."""
    inputs: tuple
    sign_mode: str = ""          #: "", "opaque" or "detached"
    encrypt: bool = False
    cipher: str = "aes256"
    keys: tuple = ()
    output: str = ""
    send: str = ""               #: "", "smtp" or "api"
    track: bool = False
    campaign: str = "sparkpost-SMIME"
    mail_from: str = ""
    headers: tuple = ()          #: extra outer header lines, CRLF-terminated bytes
    env_files: tuple = ()
    dry_run: bool = False
    verbose: bool = False
    retries: int = 3
    harvest: bool = False
    verify: bool = False
    decrypt: bool = False
    ca: str = ""
    jobs: int = 1
    repeat: int = 1
    results: str = ""
    resume: bool = False
    archive: str = ""
    retry_delay: float = 1.0
    debug: bool = False


def build_parser():
    """Return the argparse parser; its errors raise UsageError (exit 64, never 2)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError("%s (see --help)" % message)

    width = help_width()  # once: argparse makes a formatter for every add_argument()
    p = Parser(prog="sparkpostSMIME.py",
               formatter_class=lambda prog: argparse.HelpFormatter(prog, width=width),
               description="S/MIME sign and/or encrypt an email, then write or inject it.",
               epilog="Exit codes: 0 ok, 64 usage, 65 unusable message, 66 no input, "
                      "69 permanent failure, 70 internal, 75 temporary failure, "
                      "77 authentication refused, 78 configuration.  See README.md.")
    p.add_argument("inputs", nargs="+", metavar="EMLFILE",
                   help="RFC 5322 message file; - reads standard input")
    smime = p.add_argument_group("S/MIME")
    mode = smime.add_mutually_exclusive_group()
    mode.add_argument("--sign", action="store_true",
                      help="sign, opaque application/pkcs7-mime (survives body-rewriting relays)")
    mode.add_argument("--sign_detached", "--sign-detached", action="store_true",
                      help="sign, multipart/signed (readable without S/MIME)")
    smime.add_argument("--encrypt", action="store_true",
                       help="encrypt to every To/Cc/Bcc recipient and the sender")
    smime.add_argument("--cipher", choices=CIPHERS, default="aes256",
                       help="content cipher for --encrypt (default aes256)")
    smime.add_argument("--keys", action="append", default=[], metavar="DIR",
                       help="directory of <address>.pem/.crt/.p12 files (repeatable)")
    receiving = p.add_argument_group("receiving")
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
    receiving.add_argument("--ca", default="", metavar="FILE",
                           help="trusted roots (PEM) for --verify, --decrypt and --harvest "
                                "(default $SMIME_CA_FILE, else the system store)")
    out = p.add_argument_group("output and delivery")
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
    batch = p.add_argument_group("batch and safety")
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
    p.add_argument("-v", "--verbose", action="store_true",
                   help="transcript of the SMTP/HTTP dialogue on stderr (secrets hidden)")
    p.add_argument("--debug", action="store_true",
                   help="show a Python traceback on internal errors")
    p.add_argument("--version", action="version", version="%(prog)s " + __version__)
    return p


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
    """Return frozen Options from *argv*.  Raises UsageError."""
    ns = build_parser().parse_args(argv)
    sign_mode = "opaque" if ns.sign else "detached" if ns.sign_detached else ""
    send = "smtp" if ns.send_smtp else "api" if ns.send_api else ""
    reading = "--verify" if ns.verify else "--decrypt" if ns.decrypt else \
        "--harvest" if ns.harvest else ""
    if reading and (sign_mode or ns.encrypt or send or ns.repeat > 1 or ns.jobs > 1):
        raise UsageError("%s reads received messages: it does not go with sign, encrypt, send, "
                         "--repeat or --jobs options" % reading)
    if ns.harvest and ns.output:
        raise UsageError("--harvest saves certificates in the first key directory, not in -o")
    if ns.ca and not reading:
        raise UsageError("--ca is for --verify, --decrypt and --harvest")
    several = len(ns.inputs) > 1 or ns.repeat > 1 or os.path.isdir(ns.inputs[0])
    if several and (ns.output or not (send or reading)) and not (
            ns.output and os.path.isdir(ns.output)):
        raise UsageError("several inputs need -o DIR (an existing directory) for the outputs")
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
    if ns.retries < 0 or ns.jobs < 1 or ns.repeat < 1 or not 0 <= ns.retry_delay <= 60:
        raise UsageError("--retries must be 0 or more, --jobs and --repeat 1 or more, "
                         "--retry_delay 0 to 60 seconds")
    if ns.resume and not ns.results:
        raise UsageError("--resume needs --results FILE (the journal of the earlier run)")
    if ns.archive and not send:
        raise UsageError("--archive keeps sent messages: use it with --send_smtp or --send_api")
    if ns.dry_run and (ns.results or ns.archive or not send):
        raise UsageError("--dry_run goes with a send option, without --results or --archive")
    return Options(inputs=tuple(ns.inputs), sign_mode=sign_mode, encrypt=ns.encrypt,
                   cipher=ns.cipher, keys=tuple(ns.keys), output=ns.output, send=send,
                   track=ns.track, campaign=ns.campaign, mail_from=ns.mail_from,
                   headers=tuple(parse_header_option(h) for h in ns.header),
                   env_files=tuple(ns.env), dry_run=ns.dry_run, verbose=ns.verbose,
                   retries=ns.retries, harvest=ns.harvest, verify=ns.verify,
                   decrypt=ns.decrypt, ca=ns.ca, jobs=ns.jobs,
                   repeat=ns.repeat, results=ns.results, resume=ns.resume, archive=ns.archive,
                   retry_delay=ns.retry_delay, debug=ns.debug)


def make_backend(opts):
    """Return the delivery back end the options ask for, or None (write files)."""
    if not opts.send:
        return None
    log = transcript if opts.verbose else None
    if opts.send == "smtp":
        settings = SmtpSettings.from_env()
        if not settings.verify:
            warn("TLS certificate verification is OFF (SMTP_TLS_VERIFY=0): anyone on the path "
                 "can intercept the connection and the credentials")
        backend = SmtpDelivery(settings, log)
    else:
        backend = ApiDelivery(ApiSettings.from_env(), opts, log)
    return DryRun(backend) if opts.dry_run else backend


def make_job(path, opts, backend=None):
    """Read, check and build one message; return its Job."""
    msg = parse_message(read_input(path), path)
    signer, recipients = find_identities(msg, opts)
    extra = b"".join(opts.headers)
    smtp = getattr(backend, "backend", backend)
    if isinstance(smtp, SmtpDelivery) and smtp.settings.sparkpost:
        extra += sparkpost_smtp_header(opts, bool(opts.sign_mode))
    data = build_smime(msg, opts, signer, recipients, extra)
    if opts.send == "api":
        check_for_api(msg, data, opts)
    return Job(path, data, opts.mail_from or msg.sender, msg.recipients, msg)


def check_for_api(msg, data, opts):
    """Refuse a message SparkPost's API would refuse; warn about headers it would change.

    Raises MessageError for content over MAX_RFC822 octets.  SparkPost substitutes
    {{...}} in the top-level header whatever perform_substitutions says.
    """
    if len(data) > MAX_RFC822:
        raise MessageError("%s: the built message is %d octets; SparkPost's API accepts at "
                           "most %d (20 MB) of RFC 822 content: send it with --send_smtp"
                           % (msg.source, len(data), MAX_RFC822))
    if opts.sign_mode or opts.encrypt:
        for f in msg.outer:
            if b"{{" in f.raw and f.name != "bcc":
                warn_once("substitution", "%s: the %s header holds '{{': SparkPost "
                          "substitutes {{...}} in the outer header of every message, signed "
                          "or not (warned once)"
                          % (msg.source, f.raw.split(b":", 1)[0].decode("ascii")))


def output_path(opts, path, copy=0):
    """Return where the message built from *path* goes ('' = stdout).

    With -o DIR: DIR/<input name>, or DIR/<name>.<copy>.eml for --repeat copies.
    """
    if opts.output and os.path.isdir(opts.output):
        name = "stdin.eml" if path == "-" else os.path.basename(path)
        if opts.repeat > 1:
            name = "%s.%d.eml" % (name[:-4] if name.endswith(".eml") else name, copy)
        return os.path.join(opts.output, name)
    return opts.output


def write_output(data, target):
    """Write *data* to file *target*, or to stdout when it is ''."""
    if not target:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        with open(target, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise ConfigError("%s: cannot write output: %s" % (target, exc.strerror or exc))


def receive_all(opts):
    """Run --verify or --decrypt over every input; print one line each; return the exit code.

    With several inputs each line starts with the input's name.  A message that
    passes is written to -o (the outer header, then the recovered entity).
    """
    mode = "verify" if opts.verify else "decrypt"
    dirs, paths = key_dirs(opts.keys), expand_inputs(opts.inputs)
    roots = once(lambda: trust_store(opts.ca or env_text("SMIME_CA_FILE")))
    code = EX_OK
    for path in paths:
        try:
            received = receive(read_input(path), path, dirs, roots, mode)
        except (InputError, IdentityError) as exc:
            received = Received(path)
            received.problem, received.code = str(exc), exc.exit_code
        say(("%s: " % path if len(paths) > 1 else "") + received.report(mode))
        if opts.verbose:
            for line in received.details():
                transcript("  " + line)
        for line in received.warnings:
            warn("%s: %s" % (path, line))
        if received.problem:
            problem = received.problem
            warn(problem if problem.startswith(path + ":") else "%s: %s" % (path, problem))
        elif opts.output:
            write_output(received.output, output_path(opts, path))
        code = code or received.code
    return code


def once(load):
    """Return a function calling *load* the first time only, then returning its value."""
    value = []

    def get():
        if not value:
            value.append(load())
        return value[0]
    return get


def harvest_all(opts):
    """Run --harvest over every input; print one line each; return the exit code."""
    dirs = key_dirs(opts.keys)
    os.makedirs(dirs[0], exist_ok=True)
    roots = trust_store(opts.ca or env_text("SMIME_CA_FILE"))
    code = EX_OK
    for path in expand_inputs(opts.inputs):
        try:
            found = save_harvested(harvest(path, dirs, roots), dirs[0])
        except (MessageError, InputError, IdentityError) as exc:
            say("refused %s: %s" % (path, str(exc).split(": ", 1)[-1]))
            warn(str(exc))
            code = code or exc.exit_code
            continue
        say("%s %s: issuer %s, valid until %s -> %s" % (
            found.note, found.address, found.cert.issuer.rfc4514_string(),
            found.cert.not_valid_after_utc.strftime("%Y-%m-%d"), found.path))
    return code


def run(opts):
    """Load settings, then write or send every input; return the exit code."""
    load_env_files(opts.env_files)
    if opts.harvest:
        return harvest_all(opts)
    if opts.verify or opts.decrypt:
        return receive_all(opts)
    return run_batch(opts)


def main(argv=None):
    """Run the command line; return the exit code (errors are one line on stderr)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(parse_args(argv))
    except SmimeToolError as exc:
        warn(str(exc))
        return exc.exit_code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_OK
    except KeyboardInterrupt:
        warn("interrupted")
        return 130
    except Exception as exc:  # a bug: say so in one line unless --debug
        if "--debug" in argv:
            raise
        warn("internal error: %s: %s (run with --debug for details)" % (type(exc).__name__, exc))
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
