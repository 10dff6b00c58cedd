"""Test messages: the traps S/MIME builders fall into, one message each.

Each value is the raw file content (bytes), with the line endings it is written with.
"""

import base64
import os

SENDER = "alice@example.com"
HEAD = ("From: Alice Example <alice@example.com>\n"
        "To: Bob <bob@example.org>\n"
        "Subject: %s\n"
        "Date: Mon, 02 Nov 2026 10:00:00 +0000\n"
        "Message-ID: <%s@example.com>\n")


def _msg(subject, rest, tag=None):
    return (HEAD % (subject, tag or subject.lower().replace(" ", "-")) + rest)


def lf(text):
    return text.encode("utf-8")


def crlf(text):
    return text.replace("\n", "\r\n").encode("utf-8")


BINARY = bytes(range(256)) * 40 + os.urandom(3000)
LONG = "x" * 1500
CORPUS = {
    "plain-ascii": lf(_msg("plain", "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n"
                            "Hello Bob,\n\nJust text.\n")),
    "crlf-file": crlf(_msg("crlf", "MIME-Version: 1.0\nContent-Type: text/plain\n\nCRLF line one\nline two\n")),
    "eightbit-lf": lf(_msg("eight bit", "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
                            "Content-Transfer-Encoding: 8bit\n\nCafé crème, naïve façade, 日本語.\n"
                            "From the start of a line.\nTrailing spaces   \nTrailing tab\t\n")),
    "long-lines": lf(_msg("long", "MIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n\n"
                           "<html><body>" + LONG + " é " + LONG + "</body></html>\n")),
    "many-recipients": lf(
        "From: Alice <alice@example.com>\n"
        "To: Bob <bob@example.org>, carol@example.net\n"
        "Cc: \"Erin E.\" <erin@example.org>\n"
        "Bcc: dave@example.com\n"
        "Subject: many recipients\nDate: Mon, 02 Nov 2026 10:00:00 +0000\n"
        "Message-ID: <many@example.com>\nMIME-Version: 1.0\nContent-Type: text/plain\n\nHi all.\n"),
    "non-ascii-headers": lf(
        "From: Ålice Exämple <alice@example.com>\n"
        "To: Bøb <bob@example.org>\n"
        "Subject: Réunion demain — ordre du jour ✓\n"
        "X-Note: naïve\n"
        "Date: Mon, 02 Nov 2026 10:00:00 +0000\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n\nBonjour à tous.\n"),
    "attachments": crlf(_msg("attachments",
        "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n"
        "preamble\n--b1\nContent-Type: text/plain; charset=utf-8\n\nSee attached.\n"
        "--b1\nContent-Type: application/pdf; name=\"report.pdf\"\n"
        "Content-Disposition: attachment; filename=\"report.pdf\"\n"
        "Content-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(BINARY).decode() +
        "--b1\nContent-Type: application/octet-stream; name=\"résumé.txt\"\n"
        "Content-Disposition: attachment; filename=\"résumé.txt\"\n"
        "Content-Transfer-Encoding: 8bit\n\nraw 8bit attachment ü\n"
        "--b1--\nepilogue\n")),
    "nested": lf(_msg("nested",
        "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"outer\"\n\n"
        "--outer\nContent-Type: multipart/alternative; boundary=\"outer-alt\"\n\n"
        "--outer-alt\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
        "Plain ü\n--outer-alt\nContent-Type: multipart/related; boundary=\"rel\"\n\n"
        "--rel\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
        "<p>HTML =C3=BC <img src=3D\"cid:img1\"></p>\n--rel\nContent-Type: image/gif\n"
        "Content-ID: <img1>\nContent-Transfer-Encoding: base64\n\n"
        "R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==\n--rel--\n"
        "--outer-alt--\n--outer\nContent-Type: text/csv; name=\"a.csv\"\n"
        "Content-Disposition: attachment; filename=\"a.csv\"\n\na,b\n1,2\n--outer--\n")),
    "forwarded": lf(_msg("forwarded",
        "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"fw\"\n\n"
        "--fw\nContent-Type: text/plain\n\nForwarding this.\n"
        "--fw\nContent-Type: message/rfc822\nContent-Disposition: inline\n\n"
        "From: Zoë <zoe@example.net>\nTo: Alice <alice@example.com>\nSubject: Déjà vu\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n\nInner 8-bit body: ça marche.\n--fw--\n")),
    "empty-body": lf(_msg("empty", "MIME-Version: 1.0\nContent-Type: text/plain\n\n")),
    "no-content-type": lf(_msg("no content type", "\nUTF-8 body without MIME headers: ½ price.\n")),
    "no-trailing-newline": lf(_msg("no newline", "Content-Type: text/plain\n\nlast line has no newline")),
    "mbox-from-line": lf("From alice@example.com Mon Nov  2 10:00:00 2026\n" +
                         _msg("mbox", "Content-Type: text/plain\n\nFrom an mbox file.\n")),
}
