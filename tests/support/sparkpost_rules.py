"""SparkPost's documented rules for transmissions with RFC 822 content, emulated locally.

A stand-in for SparkPost (tests/support/servers.py) can call:

* ``check_transmission(body)`` -> ``(status, response)``: the answer SparkPost documents
  for a POST /api/v1/transmissions whose JSON body is *body* (a dict);
* ``delivered_message(body, recipient)`` -> ``bytes``: the message one recipient receives
  (after SMTP dot-unstuffing) once SparkPost has applied its substitutions.

Every rule cites the documentation it comes from.  Sources, read from the repositories
(quotes are verbatim; line numbers are those of the named commit):

``DEV``      SparkPost/developers.sparkpost.com @ 88f24dc36139bdf09a801678b26b3e6d5c1a60c7
             content/api/transmissions.apib      ("Send RFC822 Content", "Request Body",
                                                  "Sending Limits", "Create a Transmission")
             content/api/template-language.apib  ("Expressions", "Missing Variables",
                                                  "HTML Escaping", "Personalized Links",
                                                  "Braces Macros", "Advanced")
             content/api/templates.apib          ("Create an RFC 822 Template")
             content/api/recipient-lists.apib    ("Address Object", 400/5002 example)
             content/api/index.apib              ("API Conventions", "Errors")
``SUPPORT``  SparkPost/support-docs @ 2cb4102c88745e0d0f72dcb096dd5fca24a35078
             content/docs/tech-resources/api-error-response-changes.md
             content/docs/tech-resources/transmissions-breaking-changes.md
             content/docs/user-guide/sending-attachments.md

Where the documentation is silent, the choice made here is marked "EMULATION CHOICE" in a
comment; the stand-in then errs on the side that would catch a client relying on luck.
Only the subset of the template language that a raw-MIME sender can meet by accident is
emulated (variables, paths, ``or`` defaults, the braces macros); statements and operators
raise NotEmulated rather than being guessed.
"""

import base64
import binascii
import codecs
import itertools
import json
import re
import urllib.parse

DEV_COMMIT = "88f24dc36139bdf09a801678b26b3e6d5c1a60c7"
SUPPORT_COMMIT = "2cb4102c88745e0d0f72dcb096dd5fca24a35078"

#: DEV transmissions.apib, Request Body: "campaign_id (string) - Name of the campaign.
#: Maximum length - 64 bytes"
CAMPAIGN_ID_MAX = 64
#: DEV transmissions.apib, Request Body: "description (string) - Description of the
#: transmission. Maximum length - 1024 bytes"
DESCRIPTION_MAX = 1024
#: DEV transmissions.apib: metadata "Maximum length - 10KB."; substitution_data "Maximum
#: length - 100KB"; recipient-lists.apib: "The maximum length is 10KB per recipient." /
#: "The maximum length is 100KB per recipient."  EMULATION CHOICE: KB read as 1000 bytes
#: (the stricter reading) of the compact JSON text of the object.
METADATA_MAX = 10 * 1000
SUBSTITUTION_DATA_MAX = 100 * 1000
#: DEV transmissions.apib, Create a Transmission: "The transmission content (text + html +
#: attachments + inline images) is limited to 20 MBs."  EMULATION CHOICE: "MBs" read as
#: 10**6 bytes (the stricter reading; 20 MiB would be 20971520), counted over the UTF-8
#: bytes of content.email_rfc822 (the whole message is the content of such a transmission).
CONTENT_MAX = 20 * 1000 * 1000

#: The three part types that get substitutions (DEV transmissions.apib, Send RFC822 Content).
TEXT_TYPES = ("text/plain", "text/html", "text/x-amp-html")

_ids = itertools.count(1)


class GenerationFailure(Exception):
    """A message SparkPost accepts (200) and then fails to generate for one recipient.

    SUPPORT transmissions-breaking-changes.md: "if there is a problem with template syntax
    or substitution data, these changes mean the Transmissions API will return a 200
    response, and then a subsequent "Generation Failure" webhook event and message event."
    """

    def __init__(self, message, description, code, part=None):
        super().__init__("%s: %s [%s]" % (message, description, code))
        self.message, self.description, self.code, self.part = message, description, code, part


class NotEmulated(Exception):
    """Template language beyond the emulated subset (statements, operators, other macros)."""


# Errors ######################################################################################

def _error(status, message, description, code):
    return status, {"message": message, "description": description, "code": code}


def error_body(errors):
    """Return SparkPost's error document for [(message, description, code), ...].

    DEV index.apib, Errors: "Errors respond with an error code and JSON that contains a more
    precise message, description and API code." with the example
    {"errors": [{"message": "required field is missing", "description": "content object or
    template_id required", "code": "1400"}]}.  (SUPPORT api-error-response-changes.md says
    newer accounts get the description folded into message; both keys are kept here.)
    """
    return {"errors": [dict(e) for e in errors]}


# Request checks ##############################################################################

def _json_size(value):
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _utf8_len(text):
    return len(text.encode("utf-8", "surrogatepass"))


_BOOLEAN_OPTIONS = ("open_tracking", "initial_open", "click_tracking", "transactional",
                    "sandbox", "skip_suppression", "inline_css", "perform_substitutions")
_OTHER_CONTENT = ("from", "subject", "html", "text", "amp_html", "reply_to", "headers",
                  "attachments", "inline_images", "template_id", "use_draft_template",
                  "ab_test_id")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+\Z|[^@\s]+@[^@\s]+\Z")


def recipient_email(recipient):
    """Return the envelope address of a recipient object, or None if it has none.

    DEV recipient-lists.apib, Address Object: "If the `address` attribute is a string, it
    is interpreted as the email address." / "email (string, required) - Valid email address"
    """
    if not isinstance(recipient, dict):
        return None
    address = recipient.get("address")
    if isinstance(address, dict):
        address = address.get("email")
    if isinstance(address, str) and _EMAIL.match(address):
        return address
    return None


def check_transmission(body, remaining=None, limit_name="daily", sending_domains=None,
                       sync_content_errors=True):
    """Return (HTTP status, JSON response) for a POST /api/v1/transmissions of *body*.

    422 {"errors": [...]} when (DEV transmissions.apib unless said otherwise):
      * recipients or content is missing ("recipients (enum, required)", "content (object,
        required)"; code 1400 "required field is missing", index.apib example);
      * campaign_id is over 64 bytes, description over 1024 bytes, metadata over 10KB or
        substitution_data over 100KB, at transmission or recipient level (code 1300
        "invalid data format/type");
      * a boolean option is not a boolean (SUPPORT api-error-response-changes.md message
        format "'%fieldName' must be a %expectedType%");
      * content mixes email_rfc822 with other content attributes (templates.apib:
        "`email_rfc822` is mutually exclusive with all other content attributes.");
      * email_rfc822 is over the 20 MB content limit ("The transmission content (text + html
        + attachments + inline images) is limited to 20 MBs.");
      * options.sandbox is true ("You can only use the sandbox domain with the
        `my-first-email` template.");
      * the RFC 822 content breaks a rule of "Send RFC822 Content" (see content_problems):
        it contains the SMTP terminator, is not a MIME tree, or misplaces text/x-amp-html.
        SUPPORT api-error-response-changes.md: "email_rfc822 validation errors will no
        longer cause synchronous `4XX` errors. They will instead generate asynchronous
        events"; with sync_content_errors=False this function answers 200 instead and
        delivered_message() raises GenerationFailure, as such accounts behave now.
    400 code 5002 "At least one valid recipient is required" (recipient-lists.apib) when no
    recipient has a valid address; invalid ones are otherwise counted as rejected.
    400 code 7001 "Invalid domain" (transmissions.apib, the RFC822 example's 400 response)
    when *sending_domains* is given and the From address of the content is not in it.
    420 code 2101 (transmissions.apib, Sending Limits: "If a transmission will push you over
    the sandbox, daily, or monthly sending limit, an error with the status code `420` is
    returned, along with a message detailing which limit you will exceed. If this happens,
    no messages are sent") when *remaining* is given and the transmission has more accepted
    recipients than that.
    200 {"results": {"total_rejected_recipients": R, "total_accepted_recipients": N,
    "id": "..."}} otherwise (transmissions.apib, Response 200).
    """
    errors = []
    if not isinstance(body, dict):
        return 400, error_body([{"message": "invalid data format/type",
                                 "description": "Request body must be a JSON object",
                                 "code": "1300"}])

    def bad(description, code="1300", message="invalid data format/type", status=422):
        errors.append(_error(status, message, description, code))

    # Required pieces (DEV transmissions.apib, Request Body; index.apib Errors example).
    recipients = body.get("recipients")
    content = body.get("content")
    if recipients is None:
        bad("recipients is required", "1400", "required field is missing")
    if content is None:
        bad("content object or template_id required", "1400", "required field is missing")
    elif not isinstance(content, dict):
        bad("'content' must be a object")
    if not isinstance(content, dict):
        content = None

    # Field lengths.
    campaign = body.get("campaign_id")
    if campaign is not None:
        if not isinstance(campaign, str):
            bad("'campaign_id' must be a string")
        elif _utf8_len(campaign) > CAMPAIGN_ID_MAX:
            bad("campaign_id is %d bytes, maximum length is %d bytes"
                % (_utf8_len(campaign), CAMPAIGN_ID_MAX))
    description = body.get("description")
    if description is not None:
        if not isinstance(description, str):
            bad("'description' must be a string")
        elif _utf8_len(description) > DESCRIPTION_MAX:
            bad("description maximum length is %d bytes" % DESCRIPTION_MAX)
    _check_data(body, "", bad)

    # Options.
    options = body.get("options", {})
    if not isinstance(options, dict):
        bad("'options' must be a object")
        options = {}
    for name in _BOOLEAN_OPTIONS:
        if name in options and not isinstance(options[name], bool):
            bad("'options.%s' must be a boolean" % name)
    if options.get("sandbox") is True:
        bad("You can only use the sandbox domain with the my-first-email template")

    # Content.
    raw = None
    if content is None:
        pass
    elif "email_rfc822" in content:
        others = sorted(k for k in _OTHER_CONTENT if k in content)
        rfc822 = content["email_rfc822"]
        if others:
            bad("email_rfc822 is mutually exclusive with all other content attributes (%s)"
                % ", ".join(others))
        if not isinstance(rfc822, str):
            bad("'content.email_rfc822' must be a string")
        elif not rfc822:
            bad("content.email_rfc822 is required", "1400", "required field is missing")
        else:
            raw = rfc822.encode("utf-8", "surrogatepass")
            if len(raw) > CONTENT_MAX:
                bad("content is %d bytes, the transmission content is limited to 20 MBs"
                    % len(raw))
                raw = None
    elif any(k in content for k in _OTHER_CONTENT):
        bad("only content.email_rfc822 is emulated by this test server", "1300",
            "unsupported content")
    else:
        bad("content object or template_id required", "1400", "required field is missing")
    if raw is not None and sync_content_errors:
        for message, desc, code in content_problems(raw):
            errors.append(_error(422, message, desc, code))

    # Recipients.
    accepted = rejected = 0
    if isinstance(recipients, dict) and "list_id" in recipients:
        bad("stored recipient lists are not emulated by this test server", "1300",
            "unsupported recipients")
    elif recipients is not None and not isinstance(recipients, list):
        bad("'recipients' must be a array")
    elif isinstance(recipients, list):
        for i, r in enumerate(recipients):
            if isinstance(r, dict):
                _check_data(r, "recipients[%d]." % i, bad)
            if recipient_email(r):
                accepted += 1
            else:
                rejected += 1
        if not errors and not accepted:
            bad("At least one valid recipient is required", "5002",
                "At least one valid recipient is required", status=400)

    if errors:
        status = errors[0][0]
        return status, error_body(e for s, e in errors)

    if sending_domains is not None and raw is not None:
        domain = from_domain(raw)
        if domain not in {d.lower() for d in sending_domains}:
            return 400, error_body([{"description": "Unconfigured or unverified sending domain.",
                                     "code": "7001", "message": "Invalid domain"}])

    if remaining is not None and accepted > remaining:
        return 420, {"errors": [{"message": "Exceed Sending Limit (%s)" % limit_name,
                                 "code": "2101"}]}

    return 200, {"results": {"total_rejected_recipients": rejected,
                             "total_accepted_recipients": accepted,
                             "id": str(11668787484950528 + next(_ids))}}


def _check_data(obj, where, bad):
    for key, limit in (("metadata", METADATA_MAX), ("substitution_data", SUBSTITUTION_DATA_MAX)):
        if key not in obj or obj[key] is None:
            continue
        if not isinstance(obj[key], dict):
            bad("'%s%s' must be a object" % (where, key))
        elif _json_size(obj[key]) > limit:
            bad("%s%s is %d bytes, maximum length is %dKB"
                % (where, key, _json_size(obj[key]), limit // 1000))


# RFC 822 content rules #######################################################################

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")


def crlf(raw):
    """Return *raw* with every line ending CRLF.

    DEV transmissions.apib, Send RFC822 Content: "Lone `LF`s and lone `CR`s are allowed.
    SparkPost converts line endings to `CRLF` where necessary."
    """
    return _LINE_ENDINGS.sub(b"\r\n", raw)


def content_problems(raw):
    """Return [(message, description, code)] for RFC 822 content SparkPost will not take.

    DEV transmissions.apib, Send RFC822 Content (same bullets in templates.apib):
      "It should NOT contain the SMTP terminator `\\r\\n.\\r\\n`. SparkPost adds this
       terminator."  Checked on the content as given and after the documented line-ending
       conversion (a lone-LF "\\n.\\n" becomes the terminator).  EMULATION CHOICE: content
       starting with ".\\r\\n" counts too: after the CRLF that ends the DATA command it is the
       terminator (RFC 5321 4.1.1.4); the documentation does not say so.
      "The provided `email_rfc822` in MIME format will be rejected if SparkPost cannot parse
       the contents into a MIME tree."
      "If `text/x-amp-html` is used, it must be a descendant of multipart/alternative,
       alongside at least one other `text/html` or `text/plain` MIME part."
    "It should NOT be dot stuffed." cannot be checked (a line starting ".." may be meant);
    delivered_message() shows its effect instead: the doubled dots reach the recipient.
    Codes: 1300 is SparkPost's "invalid data format/type"; 3020 "template mime parsing
    error" is the code SparkPost answered for an undecodable email_rfc822 text part
    (SparkPost/php-sparkpost issue #94); the documentation lists neither for these cases.
    """
    problems = []
    data = crlf(raw)
    if b"\r\n.\r\n" in raw or b"\r\n.\r\n" in data or data.startswith(b".\r\n"):
        problems.append(("invalid data format/type",
                         "email_rfc822 should NOT contain the SMTP terminator \\r\\n.\\r\\n",
                         "1300"))
    root, errors = parse_mime(data)
    for e in errors:
        problems.append(("template mime parsing error", e, "3020"))
    if not errors:
        for part in root.walk():
            if part.ctype == "text/x-amp-html" and not _amp_placed(part):
                problems.append(("template mime parsing error",
                                 "text/x-amp-html must be a descendant of multipart/alternative"
                                 " alongside a text/html or text/plain part", "3020"))
                break
    return problems


def _amp_placed(part):
    node = part.parent
    while node is not None:
        if node.ctype == "multipart/alternative" and any(
                p is not part and p.ctype in ("text/html", "text/plain") for p in node.walk()):
            return True
        node = node.parent
    return False


def from_domain(raw):
    """Return the lower-case domain of the content's From address, or None."""
    root, _ = parse_mime(crlf(raw))
    for f in root.fields:
        if f.name == "from":
            found = re.findall(r"@([A-Za-z0-9.-]+)", _unfold(f.value(root.data)))
            return found[-1].lower().rstrip(".") if found else None
    return None


# A byte-level MIME parser ####################################################################

_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


class Field:
    """One header field: data[start:end] is its raw bytes, folds and final CRLF included."""

    def __init__(self, name, start, colon, end):
        self.name, self.start, self.colon, self.end = name, start, colon, end

    def value(self, data):
        return data[self.colon + 1:self.end].decode("utf-8", "surrogateescape")


class Entity:
    """A MIME entity of *data*: its fields, its body span, its children."""

    def __init__(self, data, start, end, parent=None, default="text/plain"):
        self.data, self.start, self.end, self.parent = data, start, end, parent
        self.fields, self.children = [], []
        self.header_end = start      # where a new field would be inserted
        self.body_start = self.body_end = end
        self.ctype, self.params, self.cte, self.disposition = default, {}, "7bit", ""
        self.default = default

    def get(self, name):
        for f in self.fields:
            if f.name == name:
                return _unfold(f.value(self.data)).strip()
        return None

    @property
    def attachment(self):
        """DEV: "first non-attachment ... MIME parts".  EMULATION CHOICE: an attachment is
        an entity with Content-Disposition "attachment", or anything inside one."""
        node = self
        while node is not None:
            if node.disposition == "attachment":
                return True
            node = node.parent
        return False

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    @property
    def body(self):
        return self.data[self.body_start:self.body_end]


def _unfold(text):
    return re.sub(r"\r\n(?=[ \t])", "", text)


def _parse_content_type(value, default):
    """RFC 2045 5.2: a missing or syntactically invalid Content-Type means text/plain
    (message/rfc822 inside multipart/digest, RFC 2046 5.1.5)."""
    if value is None:
        return default, {}
    m = re.match(r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*/\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)",
                 value)
    if not m:
        return "text/plain", {}
    params = {}
    for name, val in _PARAM.findall(value[m.end():]):
        if val.startswith('"'):
            val = re.sub(r"\\(.)", r"\1", val[1:-1])
        params.setdefault(name.lower(), val)
    return ("%s/%s" % (m.group(1), m.group(2))).lower(), params


def parse_mime(data, start=0, end=None, parent=None, default="text/plain", errors=None):
    """Return (root Entity, [error descriptions]) for CRLF *data*[start:end].

    EMULATION CHOICE on what "cannot parse the contents into a MIME tree" means: a header
    line that is neither a field nor a continuation, a multipart without a boundary
    parameter, a multipart body where the boundary never appears or that has no body part.
    A missing close delimiter is tolerated (the last part runs to the end).
    """
    if errors is None:
        errors = []
    if end is None:
        end = len(data)
    e = Entity(data, start, end, parent, default)
    pos = start
    while pos < end:
        eol = data.find(b"\r\n", pos, end)
        line_end = end if eol < 0 else eol + 2
        line = data[pos:line_end]
        if line == b"\r\n":                       # the empty line ending the header
            e.header_end, e.body_start = pos, line_end
            break
        if line[:1] in (b" ", b"\t"):
            if not e.fields:
                errors.append("header continuation line without a field at offset %d" % pos)
            else:
                e.fields[-1].end = line_end
        else:
            m = _FIELD.match(line)
            if not m:
                errors.append("header line without a colon at offset %d: %r"
                              % (pos, line[:40]))
                e.header_end, e.body_start = pos, pos
                break
            e.fields.append(Field(m.group(1).decode("ascii").lower(), pos, pos + m.end() - 1,
                                  line_end))
        pos = line_end
        e.header_end = pos
    else:
        e.body_start = end
    e.body_end = end
    e.ctype, e.params = _parse_content_type(e.get("content-type"), default)
    e.cte = (e.get("content-transfer-encoding") or "7bit").lower()
    disposition = e.get("content-disposition")
    e.disposition = disposition.split(";")[0].strip().lower() if disposition else ""
    if e.ctype.startswith("multipart/"):
        _parse_multipart(e, errors)
    elif e.ctype == "message/rfc822" and e.cte in ("7bit", "8bit", "binary"):
        # EMULATION CHOICE: an embedded message is part of the MIME tree (its parts are
        # attachments when it is one).
        child, _ = parse_mime(data, e.body_start, e.body_end, e, "text/plain", errors)
        e.children.append(child)
    return e, errors


def _parse_multipart(e, errors):
    boundary = e.params.get("boundary")
    if not boundary:
        errors.append("%s without a boundary parameter" % e.ctype)
        return
    body = e.data[e.body_start:e.body_end]
    delim = re.compile(rb"(?:\A|\r\n)--" + re.escape(boundary.encode("utf-8", "surrogateescape"))
                       + rb"(--)?[ \t]*(?=\r\n|\Z)")
    marks = list(delim.finditer(body))
    if not marks:
        errors.append("%s boundary %r not found" % (e.ctype, boundary))
        return
    default = "message/rfc822" if e.ctype == "multipart/digest" else "text/plain"
    for m, nxt in zip(marks, marks[1:] + [None]):
        if m.group(1):                            # close delimiter
            break
        part_start = e.body_start + m.end() + 2   # after the delimiter line's CRLF
        part_end = e.body_start + nxt.start() if nxt else e.body_end
        part_start = min(part_start, part_end)
        child, _ = parse_mime(e.data, part_start, part_end, e, default, errors)
        e.children.append(child)
    if not e.children:
        errors.append("%s with no body part" % e.ctype)


def substituted_parts(root):
    """Return {type: Entity} of the parts SparkPost substitutes in.

    DEV transmissions.apib, Send RFC822 Content: "Substitutions will be applied in the
    top-level headers and the first non-attachment `text/plain`, `text/html`, and
    `text/x-amp-html` MIME parts only."  "First" is taken in document order (depth first).
    A part inside multipart/signed is such a part; an application/pkcs7-mime body is not.
    """
    found = {}
    for part in root.walk():
        if part.children or part.ctype.startswith("multipart/") or part.attachment:
            continue
        if part.ctype in TEXT_TYPES and part.ctype not in found:
            found[part.ctype] = part
    return found


# The template language (emulated subset) #####################################################

_MACROS = {"opening_single_curly": "{", "closing_single_curly": "}",
           "opening_double_curly": "{{", "closing_double_curly": "}}",
           "opening_triple_curly": "{{{", "closing_triple_curly": "}}}"}
_STATEMENTS = {"if", "elseif", "else", "end", "each", "for", "while", "do", "then", "until",
               "break", "return", "local", "function"}
_TOKEN = re.compile(r"""\s*(?:(?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")|(?P<num>\d+(?:\.\d+)?)
                    |(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>\(\)|[.\[\]]|\S))""", re.X)


def _syntax_error(expr, part):
    return GenerationFailure("substitution language syntax error in template content",
                             "Error while compiling part %s: syntax error near '%s'"
                             % (part, expr.strip()[:40]), "3000", part)


def _tokens(expr, part):
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            break
        pos = m.end()
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
    if expr[pos:].strip():
        raise _syntax_error(expr, part)
    return out


def evaluate(expr, variables, part="text"):
    """Return the value of the template expression *expr* (the text between the braces).

    DEV template-language.apib: "Any whitespace inside the double curly braces is ignored.";
    "You can reference variables that are nested inside arrays or objects using dot notation
    and square brackets."; "Array indexes start at `1`."; "if `name` does not exist, then
    the expression will evaluate as `Customer`" ({{ name or 'Customer' }}); the six braces
    macros.  Statements, operators and other macros raise NotEmulated.
    """
    toks = _tokens(expr, part)
    if not toks:
        raise _syntax_error(expr, part)
    if toks[0][0] == "name" and toks[0][1] in _STATEMENTS:
        raise NotEmulated("statement {{%s}} is not emulated" % expr.strip())
    pos = 0

    def primary():
        nonlocal pos
        if pos >= len(toks):
            raise _syntax_error(expr, part)
        kind, text = toks[pos]
        pos += 1
        if kind == "str":
            return re.sub(r"\\(.)", r"\1", text[1:-1])
        if kind == "num":
            return float(text) if "." in text else int(text)
        if kind != "name":
            raise NotEmulated("operator %r in {{%s}} is not emulated" % (text, expr.strip()))
        if text in ("nil", "true", "false"):
            return {"nil": None, "true": True, "false": False}[text]
        if pos < len(toks) and toks[pos] == ("op", "()"):
            pos += 1
            if text in _MACROS:
                return _Raw(_MACROS[text])
            raise NotEmulated("macro %s() is not emulated" % text)
        value = variables.get(text)
        while pos < len(toks) and toks[pos] in (("op", "."), ("op", "[")):
            if toks[pos] == ("op", "."):
                if pos + 1 >= len(toks) or toks[pos + 1][0] != "name":
                    raise _syntax_error(expr, part)
                value = _index(value, toks[pos + 1][1])
                pos += 2
            else:
                pos += 1
                key = primary()
                if pos >= len(toks) or toks[pos] != ("op", "]"):
                    raise _syntax_error(expr, part)
                pos += 1
                value = _index(value, key)
        return value

    value = primary()
    while pos < len(toks) and toks[pos] == ("name", "or"):
        pos += 1
        other = primary()
        if value is None or value is False:       # Lua "or": only nil and false are falsy
            value = other
    if pos < len(toks):
        kind, text = toks[pos]
        if kind == "op" or text in ("and", "not", "or"):
            raise NotEmulated("operator %r in {{%s}} is not emulated" % (text, expr.strip()))
        raise _syntax_error(expr, part)
    return value


class _Raw(str):
    """Macro output: never escaped."""


def _index(value, key):
    if isinstance(value, dict):
        return value.get(key) if isinstance(key, str) else None
    if isinstance(value, list) and isinstance(key, int) and not isinstance(key, bool):
        return value[key - 1] if 1 <= key <= len(value) else None
    return None


def render_value(value):
    """DEV template-language.apib, Missing Variables: "An empty string is substituted for
    variables that do not exist or have a value of `null`."  Numbers print as in the doc's
    examples (5.00 renders "5", 39.99 renders "39.99")."""
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else format(value, ".14g")
    if isinstance(value, (int, str)):
        return str(value)
    raise NotEmulated("rendering a %s value is not emulated" % type(value).__name__)


def html_escape(text):
    """DEV template-language.apib, HTML Escaping: "variables in the transmissions `html` and
    `amp_html` content **are** HTML escaped" -- the example turns "<b>Hello, World</b>" into
    "&lt;b&gt;Hello, World&lt;&#x2F;b&gt;" (so "/" too; ' and " as in the same OWASP set)."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#x27;").replace("/", "&#x2F;"))


_LINK_START = re.compile(r"https?://[^\s\"'<>()]*\Z", re.I)
_AMP_TEMPLATE = re.compile(r"<template\b[^>]*\btype\s*=\s*[\"']?amp-mustache[\"']?[^>]*>"
                           r".*?</template\s*>", re.I | re.S)


def render(text, variables, kind):
    """Return *text* with every {{ }} / {{{ }}} expression substituted.

    *kind*: "header", "text/plain", "text/html" or "text/x-amp-html".
      * HTML escaping of {{ }} in html and amp parts, never with {{{ }}} (HTML Escaping:
        "To render a value unescaped in the `html` and `amp_html` content, wrap it in triple
        curly braces").
      * In a link (a run starting "http://" or "https://") in body parts, {{ }} values are
        URL encoded instead (Personalized Links: "Instead of HTML escaping the value,
        expressions will URL encode the value."; "Just as with HTML escaping, you can
        disable URL encoding by using triple curly braces.").
      * In text/x-amp-html, expressions inside <template type="amp-mustache"> are kept
        (Escaping curly braces in amp-mustache templates), except those containing
        "sparkpost" or "loop_var", the curly macros, and else/end.
      * A "{{" without its closing braces is a syntax error (GenerationFailure, code 3000,
        templates.apib's "substitution language syntax error in template content").
    """
    part = {"header": "header", "text/plain": "text", "text/html": "html",
            "text/x-amp-html": "amp_html"}[kind]
    amp_zones = [m.span() for m in _AMP_TEMPLATE.finditer(text)] if part == "amp_html" else []
    out, pos = [], 0
    while True:
        i = text.find("{{", pos)
        if i < 0:
            out.append(text[pos:])
            break
        out.append(text[pos:i])
        triple = text.startswith("{{{", i)
        close = "}}}" if triple else "}}"
        j = text.find(close, i + len(close))
        if j < 0:
            raise _syntax_error(text[i:i + 40], part)
        expr, end = text[i + len(close):j], j + len(close)
        if amp_zones and any(a <= i < b for a, b in amp_zones) and not _sparkpost_expr(expr):
            out.append(text[i:end])
            pos = end
            continue
        value = evaluate(expr, variables, part)
        rendered = render_value(value)
        if not triple and not isinstance(value, _Raw) and part != "header":
            run_start = max(text.rfind(c, 0, i) for c in " \t\r\n\"'<>()") + 1
            if _LINK_START.match(text, run_start, i):
                rendered = urllib.parse.quote(rendered, safe="")
            elif part in ("html", "amp_html"):
                rendered = html_escape(rendered)
        out.append(rendered)
        pos = end
    return "".join(out)


def _sparkpost_expr(expr):
    e = expr.strip()
    return ("sparkpost" in e or "loop_var" in e or e in ("else", "end")
            or any(e.startswith(m + "(") for m in _MACROS))


# Delivery ####################################################################################

def variables_for(body, recipient):
    """Return the substitution variables for *recipient* of transmission *body*.

    DEV template-language.apib, Sources: "If there is a conflict between `substitution_data`
    and `metadata`, the `substitution_data` value takes precedence." / "The recipient-level
    data takes precedence over the transmission-level data." (example order: transmission
    metadata < transmission substitution_data < recipient metadata < recipient
    substitution_data).  Reserved Variables: "`address.name` - Name from the recipient
    details."; "`email`, `email_id`, and `address.email` - Email address from recipient
    details."; "`env_from` - Return-Path address"; "`return_path`".  EMULATION CHOICE: the
    merge is shallow (top-level keys), and env_from is the return_path given, if any.
    """
    merged = {}
    for source in (body.get("metadata"), body.get("substitution_data"),
                   recipient.get("metadata"), recipient.get("substitution_data")):
        if isinstance(source, dict):
            merged.update(source)
    address = recipient.get("address")
    if isinstance(address, str):
        address = {"email": address}
    address = dict(address or {})
    email = address.get("email")
    merged["address"] = {"name": address.get("name"), "email": email}
    merged["email"] = merged["email_id"] = email
    return_path = recipient.get("return_path") or body.get("return_path")
    merged["env_from"] = return_path
    if return_path:
        merged["return_path"] = return_path
    return merged


def delivered_message(body, recipient):
    """Return the bytes SparkPost delivers to *recipient* for RFC 822 transmission *body*.

    What happens, in order (DEV transmissions.apib, Send RFC822 Content, unless said):
      1. Line endings become CRLF ("SparkPost converts line endings to `CRLF` where
         necessary.").  Content breaking a rule of content_problems() raises
         GenerationFailure.
      2. Top-level header fields go through the template engine, even when
         options.perform_substitutions is false ("Headers are still passed to the
         substitution engine when this option is set to `false`. That includes headers
         that are part of `email_rfc822` content parts.").  RFC 2047 encoded words are
         decoded first (template-language.apib, Substitutions in email_rfc822 Headers:
         "Otherwise, the server will not be able to decode the header to look for the
         template language syntax."); a value with 8-bit data afterwards "will be RFC2047
         base64 encoded" (Encoding Rules).
      3. The first non-attachment text/plain, text/html and text/x-amp-html parts go through
         the template engine unless options.perform_substitutions is false ("Setting to
         `false` disables substitutions in the `text`, `html`, `amp`, and `email_rfc822`
         content parts").  Their bodies are decoded (Content-Transfer-Encoding, then
         charset) before substitution: SparkPost re-encodes parts afterwards (Encoding
         Rules: "If after substitution, a text/plain, text/html, or text/x-amp-html part
         contains 8-bit data, then that part will be quoted-printable encoded before being
         placed back into the MIME structure. The Content-Type will be updated
         appropriately."), and answers "Unable to decode the text/plain part into UTF-8"
         (code 3020, SparkPost/php-sparkpost issue #94) for a part it cannot decode.
         EMULATION CHOICE: a part whose decoded text has no expression and whose raw bytes
         are 7-bit is left byte for byte; a changed or 8-bit part is re-encoded: as
         quoted-printable UTF-8 (Content-Transfer-Encoding and charset updated) when the
         result has 8-bit data, else in its own transfer encoding (7bit/8bit/binary as is,
         quoted-printable and base64 re-encoded with 76-character CRLF lines).
      4. Nothing else changes: SparkPost does not add a To header ("The `To` header is not
         built for email_rfc822 content.", recipient-lists.apib), and what it dot-stuffs the
         receiving MTA unstuffs ("It should NOT be dot stuffed. SparkPost dot stuffs before
         sending the email."), so content that was dot-stuffed arrives with doubled dots.
         Not emulated (undocumented for RFC 822 content): the headers SparkPost and the
         relays add on top (DKIM-Signature, Received, ...), open and click tracking.
    """
    raw = body["content"]["email_rfc822"].encode("utf-8", "surrogatepass")
    problems = content_problems(raw)
    if problems:
        raise GenerationFailure(*problems[0])
    data = crlf(raw)
    root, _ = parse_mime(data)
    variables = variables_for(body, recipient)
    options = body.get("options") or {}
    edits = _Edits(data)
    for f in root.fields:
        new = _substitute_field(data[f.start:f.end], variables)
        if new is not None:
            edits.set_field(f, new)
    if options.get("perform_substitutions", True) is not False:
        for ctype, part in substituted_parts(root).items():
            _substitute_part(part, ctype, variables, edits)
    return edits.apply()


class _Edits:
    """Replacements of fields and spans of *data*, and insertions, applied at once."""

    def __init__(self, data):
        self.data, self.fields, self.inserts, self.spans = data, {}, {}, []

    def field(self, f):
        return self.fields[f.start][1] if f.start in self.fields else self.data[f.start:f.end]

    def set_field(self, f, new):
        self.fields[f.start] = (f, new)

    def insert(self, pos, new):
        self.inserts[pos] = self.inserts.get(pos, b"") + new

    def replace(self, start, end, new):
        self.spans.append((start, end, new))

    def apply(self):
        edits = (self.spans + [(f.start, f.end, new) for f, new in self.fields.values()]
                 + [(pos, pos, new) for pos, new in self.inserts.items()])
        out, pos = [], 0
        for start, end, new in sorted(edits, key=lambda e: (e[0], e[1])):
            out.append(self.data[pos:start])
            out.append(new)
            pos = end
        out.append(self.data[pos:])
        return b"".join(out)


_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")


def _decode_word(m):
    charset, enc, text = m.group(1).split("*")[0], m.group(2).upper(), m.group(3)
    try:
        if enc == "B":
            raw = base64.b64decode(text + "=" * (-len(text) % 4))
        else:
            raw = binascii.a2b_qp(text.replace("_", " ").encode("ascii"), header=True)
        return raw.decode(charset, "replace")
    except (LookupError, ValueError, binascii.Error):
        return m.group(0)


def _substitute_field(raw, variables):
    """Return a top-level field's new bytes, or None when it does not change."""
    text = raw.decode("utf-8", "surrogateescape")
    name, value = text.split(":", 1)
    has_words = bool(_ENCODED_WORD.search(value))
    if has_words:
        value_unfolded = _unfold(value)
        decoded = re.sub(r"(\?=)\s+(?==\?)", r"\1", value_unfolded)
        decoded = _ENCODED_WORD.sub(_decode_word, decoded)
    else:
        decoded = value
    eight_bit = any(ord(c) > 127 for c in decoded)
    if "{{" not in decoded and not (eight_bit and not has_words):
        return None
    new = render(decoded, variables, "header") if "{{" in decoded else decoded
    if not any(ord(c) > 127 for c in new):
        if not has_words and new == value:
            return None
        return (name + ":" + new).encode("ascii")
    body = new[:-2] if new.endswith("\r\n") else new
    return (name + ":" + _fold(_encode_words(_unfold(body)), len(name) + 1) + "\r\n"
            ).encode("ascii")


def _encode_words(value):
    """RFC 2047 B-encode (UTF-8) every quoted string or word holding non-ASCII text."""
    def words(text):
        chunks, cur = [], b""
        for ch in text:
            b = ch.encode("utf-8", "surrogateescape")
            if len(cur) + len(b) > 45:
                chunks.append(cur)
                cur = b""
            cur += b
        chunks.append(cur)
        return " ".join("=?UTF-8?B?%s?=" % base64.b64encode(c).decode("ascii")
                        for c in chunks if c)

    def quoted(m):
        inner = re.sub(r"\\(.)", r"\1", m.group(0)[1:-1])
        return words(inner) if any(ord(c) > 127 for c in inner) else m.group(0)

    value = re.sub(r'"(?:[^"\\]|\\.)*"', quoted, value)
    return re.sub(r"[^\s\"]*[^\x00-\x7f][^\s\"]*", lambda m: words(m.group(0)), value)


def _fold(value, used):
    """Fold *value* at spaces so that lines stay within 78 characters where possible."""
    out, line = [], used
    for i, word in enumerate(value.split(" ")):
        if i and line + 1 + len(word) > 78 and line > 1:
            out.append("\r\n " + word)
            line = 1 + len(word)
        else:
            out.append((" " if i else "") + word)
            line += (1 if i else 0) + len(word)
    return "".join(out)


def _decode_cte(body, cte):
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    if cte == "base64":
        return binascii.a2b_base64(body)
    return body


def _charset_decode(raw, charset, part):
    """Return (text, charset used).  EMULATION CHOICE: undeclared or us-ascii text with
    8-bit bytes is tried as UTF-8 before failing."""
    name = (charset or "us-ascii").lower()
    tries = [name] + (["utf-8"] if name in ("us-ascii", "ascii") else [])
    for cs in tries:
        try:
            codecs.lookup(cs)
            return raw.decode(cs), cs
        except (LookupError, UnicodeDecodeError):
            continue
    raise GenerationFailure("template mime parsing error",
                            "Unable to decode the %s part into UTF-8" % part, "3020")


def qp_encode(data):
    """Quoted-printable (RFC 2045 6.7) of CRLF *data*, in CRLF lines of at most 76."""
    lines = []
    for line in data.split(b"\r\n"):
        enc = []
        for i, byte in enumerate(line):
            c = bytes([byte])
            last = i == len(line) - 1
            if (33 <= byte <= 126 and byte != 61) or (byte in (9, 32) and not last):
                enc.append(c.decode("ascii"))
            else:
                enc.append("=%02X" % byte)
        out, cur = [], ""
        for piece in enc:
            if len(cur) + len(piece) > 75:
                out.append(cur + "=")
                cur = ""
            cur += piece
        out.append(cur)
        lines.append("\r\n".join(out))
    return "\r\n".join(lines).encode("ascii")


def b64_encode(data):
    text = base64.b64encode(data)
    return b"\r\n".join(text[i:i + 76] for i in range(0, len(text), 76))


def _substitute_part(part, ctype, variables, edits):
    """Substitute in one of the parts substituted_parts() returns (see delivered_message)."""
    raw = part.body
    eight_bit_raw = any(b > 127 for b in raw)
    kind = {"text/plain": "text", "text/html": "html", "text/x-amp-html": "amp_html"}[ctype]
    text, _ = _charset_decode(_decode_cte(raw, part.cte), part.params.get("charset"), kind)
    new = render(text, variables, ctype) if "{{" in text else text
    if new == text and not eight_bit_raw:
        return                                    # left byte for byte
    if not any(ord(c) > 127 for c in new):
        payload = new.encode("ascii")
        if part.cte == "quoted-printable":
            payload = qp_encode(crlf(payload))
        elif part.cte == "base64":
            payload = b64_encode(crlf(payload))
        edits.replace(part.body_start, part.body_end, payload)
        return
    edits.replace(part.body_start, part.body_end,
                  qp_encode(crlf(new.encode("utf-8", "surrogateescape"))))
    _set_field(part, "content-transfer-encoding",
               b"Content-Transfer-Encoding: quoted-printable\r\n", edits)
    for f in part.fields:
        if f.name == "content-type":
            value = edits.field(f).decode("utf-8", "surrogateescape")
            if re.search(r";\s*charset\s*=", value, re.I):
                value = re.sub(r'(;\s*charset\s*=\s*)("[^"]*"|[^;\s]*)', r'\1"UTF-8"', value,
                               flags=re.I)
            else:
                value = value[:len(value.rstrip("\r\n"))] + '; charset="UTF-8"\r\n'
            edits.set_field(f, value.encode("utf-8", "surrogateescape"))
            break
    else:
        _set_field(part, "content-type", b'Content-Type: text/plain; charset="UTF-8"\r\n', edits)


def _set_field(part, name, line, edits):
    for f in part.fields:
        if f.name == name:
            edits.set_field(f, line)
            return
    edits.insert(part.header_end, line)
