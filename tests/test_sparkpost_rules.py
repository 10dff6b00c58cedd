"""The local emulation of SparkPost's RFC 822 transmission rules (sparkpost_rules), on
hand-made messages; the S/MIME cases are checked by OpenSSL."""

import base64
import re

import pytest

from support import engines
from support.pki import pem_cert
from support import sparkpost_rules as sp
from support.sparkpost_rules import GenerationFailure, NotEmulated, check_transmission, \
    delivered_message


def tx(rfc822, recipients=None, **extra):
    body = {"recipients": recipients if recipients is not None else [
                {"address": {"email": "bob@example.org", "name": "Bob"},
                 "substitution_data": {"name": "Bob"}}],
            "content": {"email_rfc822": rfc822}}
    body.update(extra)
    return body


def deliver(body, n=0):
    return delivered_message(body, body["recipients"][n])


def codes(answer):
    status, doc = answer
    return status, [e["code"] for e in doc["errors"]]


SIMPLE = "From: alice@example.com\r\nSubject: Hi {{name}}\r\n\r\nHello {{name}}.\r\n"

MIXED = ("From: alice@example.com\r\n"
         "Subject: For {{ name }}\r\n"
         "Content-Type: multipart/mixed; boundary=\"b1\"\r\n"
         "\r\n"
         "--b1\r\n"
         "Content-Type: text/plain; charset=us-ascii\r\n"
         "Content-Disposition: attachment; filename=\"a.txt\"\r\n"
         "\r\n"
         "attached {{name}}\r\n"
         "--b1\r\n"
         "Content-Type: multipart/alternative; boundary=b2\r\n"
         "\r\n"
         "--b2\r\n"
         "Content-Type: text/plain\r\n"
         "\r\n"
         "plain {{name}} {{missing}}!\r\n"
         "--b2\r\n"
         "Content-Type: text/html\r\n"
         "\r\n"
         "<p>{{tag}} {{{tag}}}</p>\r\n"
         "--b2\r\n"
         "Content-Type: text/x-amp-html\r\n"
         "\r\n"
         "<p>amp {{name}}</p>\r\n"
         "--b2--\r\n"
         "--b1\r\n"
         "Content-Type: text/plain\r\n"
         "\r\n"
         "second {{name}}\r\n"
         "--b1--\r\n")


# 200 and the substitutions ###################################################################

def test_documented_example_is_accepted_and_rendered():
    # The request body of transmissions.apib "Send RFC822 Content", as published.
    body = {"description": "Christmas Campaign Email",
            "recipients": [{"address": {"email": "wilma@flintstone.com",
                                        "name": "Wilma Flintstone"},
                            "substitution_data": {"first_name": "Wilma",
                                                  "customer_type": "Platinum",
                                                  "year": "Freshman"}}],
            "content": {"email_rfc822": "Content-Type: text/plain\r\nTo: \"{{address.name}}\" "
                        "<{{address.email}}>\r\n\r\n Hi {{first_name}} \nSave big this "
                        "Christmas in your area {{place}}! \nClick http://www.mysite.com and "
                        "get huge discount\n Hurry, this offer is only to {{customer_type}}\n "
                        "{{sender}}\r\n"}}
    status, doc = check_transmission(body)
    assert status == 200
    assert doc["results"]["total_accepted_recipients"] == 1
    assert doc["results"]["total_rejected_recipients"] == 0
    assert re.fullmatch(r"\d+", doc["results"]["id"])
    out = deliver(body)
    assert out.startswith(b'Content-Type: text/plain\r\nTo: "Wilma Flintstone" '
                          b'<wilma@flintstone.com>\r\n\r\n Hi Wilma \r\n')
    assert b"in your area ! \r\n" in out and b"only to Platinum\r\n \r\n" == out[-21:]


def test_headers_and_first_non_attachment_parts_only():
    body = tx(MIXED, substitution_data={"tag": "<b>"})
    assert check_transmission(body)[0] == 200
    out = deliver(body).decode()
    assert "Subject: For Bob\r\n" in out
    assert "attached {{name}}" in out                       # the attachment is left alone
    assert "plain Bob !" in out                             # first text/plain, missing -> ""
    assert "<p>&lt;b&gt; <b></p>" in out                    # first text/html, escaped {{ }}
    assert "<p>amp Bob</p>" in out                          # first text/x-amp-html
    assert "second {{name}}" in out                         # not the first text/plain
    # Nothing else moved: undo the five substitutions and get the input back.
    back = (out.replace("For Bob", "For {{ name }}").replace("plain Bob !",
            "plain {{name}} {{missing}}!").replace("<p>&lt;b&gt; <b></p>",
            "<p>{{tag}} {{{tag}}}</p>").replace("amp Bob", "amp {{name}}"))
    assert back == MIXED


def test_perform_substitutions_false_still_substitutes_headers():
    body = tx(MIXED, options={"perform_substitutions": False})
    out = deliver(body).decode()
    assert "Subject: For Bob\r\n" in out
    assert out.replace("For Bob", "For {{ name }}") == MIXED


def test_single_part_message_is_the_first_text_plain():
    out = deliver(tx(SIMPLE))
    assert out == b"From: alice@example.com\r\nSubject: Hi Bob\r\n\r\nHello Bob.\r\n"


def test_attachment_text_before_inline_text():
    msg = ("From: a@example.com\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n"
           "--x\r\nContent-Disposition: attachment\r\n\r\n{{name}} in attachment\r\n"
           "--x\r\nContent-Disposition: inline\r\n\r\n{{name}} inline\r\n--x--\r\n")
    out = deliver(tx(msg)).decode()
    assert "{{name}} in attachment" in out and "Bob inline" in out


def test_substitution_data_precedence_and_reserved_variables():
    body = tx("From: a@example.com\r\n\r\n{{city}} {{a}} {{b}} {{email}} {{address.name}}"
              " {{ nope or 'dflt' }} {{ list[2] }} {{ opening_double_curly() }}x\r\n",
              recipients=[{"address": {"email": "w@example.com", "name": "Wilma"},
                           "metadata": {"city": "Baltimore", "b": "rcpt-meta"},
                           "substitution_data": {"city": "New York"}}],
              metadata={"city": "San Francisco", "a": "tx-meta", "b": "tx-meta"},
              substitution_data={"city": "Seattle", "list": [1, 2.0]})
    assert deliver(body).endswith(
        b"\r\n\r\nNew York tx-meta rcpt-meta w@example.com Wilma dflt 2 {{x\r\n")


def test_personalized_link_is_url_encoded():
    msg = ("From: a@example.com\r\nContent-Type: text/html\r\n\r\n"
           '<a href="https://x.example/?u={{user}}&o={{offer}}">{{offer}}</a>\r\n')
    body = tx(msg, substitution_data={"user": "john", "offer": "Daily Deal!"})
    assert deliver(body).endswith(
        b'<a href="https://x.example/?u=john&o=Daily%20Deal%21">Daily Deal!</a>\r\n')


def test_quoted_printable_part_is_decoded_then_re_encoded():
    # "{{na=\r\nme}}": the expression is only visible once the soft line break is decoded.
    msg = ("From: a@example.com\r\nContent-Type: text/plain\r\n"
           "Content-Transfer-Encoding: quoted-printable\r\n\r\nHi {{na=\r\nme}} =3D\r\n")
    out = deliver(tx(msg))
    assert out.endswith(b"\r\n\r\nHi Bob =3D\r\n")


def test_base64_part_is_decoded_then_re_encoded():
    text = base64.b64encode(b"Dear {{name}},\r\n").decode()
    msg = ("From: a@example.com\r\nContent-Type: text/plain\r\n"
           "Content-Transfer-Encoding: base64\r\n\r\n" + text + "\r\n")
    body = deliver(tx(msg)).split(b"\r\n\r\n", 1)[1]
    assert base64.b64decode(body) == b"Dear Bob,\r\n"


def test_eight_bit_result_becomes_quoted_printable_utf8():
    msg = ("From: a@example.com\r\nSubject: {{name}}\r\nContent-Type: text/plain\r\n\r\n"
           "Hi {{name}}\r\n")
    body = tx(msg, recipients=[{"address": "j@example.com",
                                "substitution_data": {"name": "J\u00f6rg"}}])
    out = deliver(body)
    assert b"Subject: =?UTF-8?B?SsO2cmc=?=\r\n" in out
    assert b'Content-Type: text/plain; charset="UTF-8"\r\n' in out
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\nHi J=C3=B6rg\r\n" in out


def test_eight_bit_part_is_quoted_printable_after_the_engine_even_without_expression():
    msg = ("From: a@example.com\r\nContent-Type: text/plain; charset=utf-8\r\n"
           "Content-Transfer-Encoding: 8bit\r\n\r\nGr\u00fc\u00dfe\r\n")
    out = deliver(tx(msg))
    assert out.endswith(b'charset="UTF-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n'
                        b"\r\nGr=C3=BC=C3=9Fe\r\n")
    kept = deliver(tx(msg, options={"perform_substitutions": False}))
    assert kept == msg.encode()


def test_encoded_word_header_is_decoded_for_substitution():
    msg = "From: a@example.com\r\nSubject: =?utf-8?q?Hi_{{name}}?=\r\n\r\nx\r\n"
    assert deliver(tx(msg)).startswith(b"From: a@example.com\r\nSubject: Hi Bob\r\n")


def test_untouched_message_is_byte_exact_after_crlf():
    msg = "From: a@example.com\nSubject: plain\r\n\nno expression here\rend\n"
    out = deliver(tx(msg))
    assert out == b"From: a@example.com\r\nSubject: plain\r\n\r\nno expression here\r\nend\r\n"


def test_dot_stuffed_content_arrives_with_doubled_dots():
    assert deliver(tx("From: a@example.com\r\n\r\n..leading\r\n")).endswith(b"\r\n..leading\r\n")


def test_template_errors():
    with pytest.raises(GenerationFailure):
        deliver(tx("From: a@example.com\r\n\r\nHi {{name\r\n"))
    with pytest.raises(GenerationFailure):
        deliver(tx("From: a@example.com\r\n\r\nHi {{ a b }}\r\n"))
    with pytest.raises(NotEmulated):
        deliver(tx("From: a@example.com\r\n\r\n{{ if name }}x{{ end }}\r\n"))
    with pytest.raises(NotEmulated):
        deliver(tx("From: a@example.com\r\n\r\n{{ price - 5 }}\r\n"))


# 4xx #########################################################################################

def test_campaign_id_limit_counts_bytes():
    assert check_transmission(tx(SIMPLE, campaign_id="c" * 64))[0] == 200
    assert codes(check_transmission(tx(SIMPLE, campaign_id="c" * 65))) == (422, ["1300"])
    assert codes(check_transmission(tx(SIMPLE, campaign_id="\u00e9" * 33))) == (422, ["1300"])


def test_content_size_limit():
    head = "From: a@example.com\r\n\r\n"
    at_limit = head + "a" * (sp.CONTENT_MAX - len(head))
    assert check_transmission(tx(at_limit))[0] == 200
    status, doc = check_transmission(tx(at_limit + "a"))
    assert status == 422 and "20 MBs" in doc["errors"][0]["description"]


@pytest.mark.parametrize("rfc822", [
    "From: a@example.com\r\n\r\nline\r\n.\r\nmore\r\n",          # the SMTP terminator
    "From: a@example.com\n\nline\n.\nmore\n",                    # the same after LF -> CRLF
    "From: a@example.com\r\n\r\nend\r\n.\r\n",                   # terminator at the end
    ".\r\nFrom: a@example.com\r\n\r\nx\r\n",                     # terminator right after DATA
])
def test_smtp_terminator_is_refused(rfc822):
    status, doc = check_transmission(tx(rfc822))
    assert status == 422
    assert any("terminator" in e["description"] for e in doc["errors"])


def test_a_dot_inside_a_line_is_fine():
    assert check_transmission(tx("From: a@example.com\r\n\r\n.x\r\n. \r\nx.\r\n"))[0] == 200


@pytest.mark.parametrize("rfc822", [
    "From: a@example.com\r\nContent-Type: multipart/mixed\r\n\r\nno boundary\r\n",
    "From: a@example.com\r\nContent-Type: multipart/mixed; boundary=q\r\n\r\n--z\r\n\r\nx\r\n",
    "From: a@example.com\r\nthis is not a header\r\n\r\nbody\r\n",
    "From: a@example.com\r\nContent-Type: multipart/mixed; boundary=q\r\n\r\n"
    "--q\r\nContent-Type: text/x-amp-html\r\n\r\n<p>amp</p>\r\n--q--\r\n",
])
def test_content_that_is_not_an_acceptable_mime_tree(rfc822):
    assert codes(check_transmission(tx(rfc822))) == (422, ["3020"])


def test_content_errors_can_be_asynchronous():
    bad = tx("From: a@example.com\r\n\r\nline\r\n.\r\nmore\r\n")
    assert check_transmission(bad, sync_content_errors=False)[0] == 200
    with pytest.raises(GenerationFailure):
        deliver(bad)


def test_required_pieces():
    assert codes(check_transmission({"content": {"email_rfc822": SIMPLE}})) == (422, ["1400"])
    assert codes(check_transmission({"recipients": [{"address": "b@example.org"}]})) == \
        (422, ["1400"])
    assert codes(check_transmission(tx(""))) == (422, ["1400"])
    assert codes(check_transmission(tx(SIMPLE, recipients=[]))) == (400, ["5002"])
    assert codes(check_transmission(tx(SIMPLE, recipients=[{"address": "nobody"}]))) == \
        (400, ["5002"])


def test_other_field_rules():
    both = tx(SIMPLE)
    both["content"]["html"] = "<p>x</p>"
    assert codes(check_transmission(both)) == (422, ["1300"])
    assert codes(check_transmission(tx(SIMPLE, description="d" * 1025))) == (422, ["1300"])
    assert codes(check_transmission(tx(SIMPLE, metadata={"k": "v" * 10000}))) == (422, ["1300"])
    assert codes(check_transmission(tx(SIMPLE, substitution_data={"k": "v" * 100000}))) == \
        (422, ["1300"])
    big = [{"address": "b@example.org", "substitution_data": {"k": "v" * 100000}}]
    assert codes(check_transmission(tx(SIMPLE, recipients=big))) == (422, ["1300"])
    assert codes(check_transmission(tx(SIMPLE, options={"click_tracking": "no"}))) == \
        (422, ["1300"])
    assert codes(check_transmission(tx(SIMPLE, options={"sandbox": True}))) == (422, ["1300"])


def test_rejected_recipients_are_counted():
    status, doc = check_transmission(tx(SIMPLE, recipients=[{"address": "b@example.org"},
                                                           {"address": "bad"}]))
    assert status == 200
    assert (doc["results"]["total_accepted_recipients"],
            doc["results"]["total_rejected_recipients"]) == (1, 1)


def test_sending_limit_420():
    body = tx(SIMPLE, recipients=[{"address": "b@example.org"}, {"address": "c@example.org"}])
    assert check_transmission(body, remaining=2)[0] == 200
    status, doc = check_transmission(body, remaining=1, limit_name="hourly")
    assert status == 420
    assert doc == {"errors": [{"message": "Exceed Sending Limit (hourly)", "code": "2101"}]}


def test_sending_domain():
    assert check_transmission(tx(SIMPLE), sending_domains=["example.com"])[0] == 200
    assert codes(check_transmission(tx(SIMPLE), sending_domains=["example.org"])) == \
        (400, ["7001"])


# S/MIME, checked by OpenSSL ##################################################################

def signed(pki, content, tmp_path, opaque=False):
    path = tmp_path / "content"
    path.write_bytes(content)
    alice = "alice@example.com"
    chain = tmp_path / "intermediate.crt"
    chain.write_bytes(pem_cert(pki.inter.cert))
    out = engines.run(["openssl", "cms", "-sign", "-binary", "-in", str(path),
                       "-signer", pki.cert_path(alice), "-inkey", pki.key_path(alice),
                       "-certfile", str(chain)] + (["-nodetach"] if opaque else [])).stdout
    return (b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: For {{name}}\r\n"
            + out.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


def verifies(openssl, pki, message):
    try:
        openssl.verify(message, pki.cafile)
        return True
    except AssertionError:
        return False


INNER_PLAIN = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nHi there.\r\n"
INNER_BRACES = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nHi {{name}}.\r\n"


def test_signed_text_without_expressions_still_verifies(openssl, pki, tmp_path):
    message = signed(pki, INNER_PLAIN, tmp_path)
    body = tx(message.decode())
    assert check_transmission(body)[0] == 200
    out = deliver(body)
    assert b"Subject: For Bob\r\n" in out
    assert verifies(openssl, pki, out)


def test_expression_inside_signed_text_breaks_the_signature(openssl, pki, tmp_path):
    message = signed(pki, INNER_BRACES, tmp_path)
    assert verifies(openssl, pki, message)
    out = deliver(tx(message.decode()))
    assert b"Hi Bob." in out
    assert not verifies(openssl, pki, out)
    kept = deliver(tx(message.decode(), options={"perform_substitutions": False}))
    assert b"Hi {{name}}." in kept and b"Subject: For Bob\r\n" in kept
    assert verifies(openssl, pki, kept)


def test_opaque_signed_body_is_not_a_text_part(openssl, pki, tmp_path):
    message = signed(pki, INNER_BRACES, tmp_path, opaque=True)
    out = deliver(tx(message.decode()))
    assert b"Subject: For Bob\r\n" in out
    assert out.replace(b"For Bob", b"For {{name}}") == message
    assert b"Hi {{name}}." in openssl.verify(out, pki.cafile)
