"""--send_api against a real local HTTP server standing in for SparkPost."""

import json
import re

import pytest

from support import engines
from support.harness import run_tool, send
from support.corpus import CORPUS
from support.servers import ApiServer, free_port

API_KEY = engines.plant_secret("0123456789abcdef0123456789abcdefTESTKEY")
MSG = CORPUS["many-recipients"]  # alice -> Bob <bob>, carol; Cc "Erin E." <erin>; Bcc dave
RCPTS = ["bob@example.org", "carol@example.net", "erin@example.org", "dave@example.com"]
API = ["--send_api"]


@pytest.fixture
def api():
    with ApiServer() as srv:
        yield srv


def api_env(api, **env):
    """Return the environment of a --send_api run against *api* (None: no server),
    *env* added (a None value unsets that variable)."""
    full = {"SPARKPOST_API_KEY": API_KEY, "SPARKPOST_HOST": api.url if api else ""}
    full.update(env)
    return {k: v for k, v in full.items() if v is not None}


def test_transmission_request_shape_and_report(api, pki, tmp_path, openssl):
    proc = send(pki, tmp_path, MSG, API + ["--sign", "--encrypt", "--campaign", "avocado"],
                api_env(api))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode().splitlines()
    assert out[0] == "Opened connection to %s/api/v1" % api.url
    assert out[1].startswith("Sending ") and "\tFrom: alice@example.com\tTo: " in out[1]
    assert re.fullmatch(r"OK - in \d+\.\d{3} seconds, id 70130001, accepted 4, rejected 0",
                        out[2])
    req, = api.requests
    assert req["path"] == "/api/v1/transmissions"
    assert req["headers"]["Authorization"] == API_KEY
    body = json.loads(req["body"])
    assert body["options"] == {"open_tracking": False, "click_tracking": False,
                               "transactional": True, "perform_substitutions": False}
    assert body["campaign_id"] == "avocado"
    addresses = [r["address"] for r in body["recipients"]]
    assert [a["email"] for a in addresses] == RCPTS
    assert {a["header_to"] for a in addresses} == {"Bob <bob@example.org>, carol@example.net"}
    assert addresses[0]["name"] == "Bob" and addresses[2]["name"] == "Erin E."
    assert "name" not in addresses[1]
    rfc822 = body["content"]["email_rfc822"].encode()
    engines.check_transport_safe(rfc822)
    assert not re.search(rb"(?im)^bcc:", rfc822)
    for who in RCPTS:
        signed = openssl.decrypt(rfc822, pki.cert_path(who), pki.key_path(who))
        assert b"Hi all." in openssl.verify(signed, pki.cafile)


def test_tracking_only_unsigned(api, pki, tmp_path):
    assert send(pki, tmp_path, MSG, API + ["--sign", "--track"], api_env(api)).returncode == 64
    proc = send(pki, tmp_path, MSG, API + ["--track"], api_env(api))
    assert proc.returncode == 0
    body = json.loads(api.requests[-1]["body"])
    assert body["options"] == {"open_tracking": True, "click_tracking": True,
                               "transactional": False}
    assert body["campaign_id"] == "sparkpost-SMIME"


@pytest.mark.parametrize("host", ["{url}", "{url}/", "{url}/api/v1", "{url}/api/v1/"])
def test_host_forms_tolerated(api, pki, tmp_path, host):
    proc = send(pki, tmp_path, MSG, API + ["--sign", "--encrypt"],
                api_env(None, SPARKPOST_HOST=host.format(url=api.url)))
    assert proc.returncode == 0, proc.stderr
    assert api.requests[-1]["path"] == "/api/v1/transmissions"


@pytest.mark.parametrize("host,url", [
    (None, "https://api.sparkpost.com/api/v1"),
    ("api.eu.sparkpost.com", "https://api.eu.sparkpost.com/api/v1"),
    ("https://api.eu.sparkpost.com/api/v1/", "https://api.eu.sparkpost.com/api/v1"),
])
def test_default_and_bare_hosts_dry_run(pki, tmp_path, host, url):
    proc = send(pki, tmp_path, MSG, API + ["--sign", "--dry_run"],
                api_env(None, SPARKPOST_HOST=host))
    assert proc.returncode == 0, proc.stderr
    assert "Would open connection to %s (API key ***)" % url in proc.stdout.decode()


@pytest.mark.parametrize("host", ["http://api.sparkpost.com", "http://10.1.2.3:8080",
                                  "ftp://x.example"])
def test_clear_text_hosts_refused(pki, tmp_path, host):
    proc = send(pki, tmp_path, MSG, API + ["--sign", "--encrypt"],
                api_env(None, SPARKPOST_HOST=host))
    assert proc.returncode == 78
    assert "SPARKPOST_HOST" in proc.stderr.decode()


def test_missing_key(pki, tmp_path, api):
    proc = send(pki, tmp_path, MSG, API + ["--sign", "--encrypt"],
                api_env(api, SPARKPOST_API_KEY=None))
    assert proc.returncode == 78 and "SPARKPOST_API_KEY is not set" in proc.stderr.decode()
    assert api.requests == []


def test_401_is_auth_failure(api, pki, tmp_path):
    api.responses = [(401, {}, {"errors": [{"message": "Unauthorized."}]})]
    proc = send(pki, tmp_path, MSG, API + ["--sign", "--encrypt"], api_env(api))
    assert proc.returncode == 77
    err = proc.stderr.decode()
    assert "401" in err and "Unauthorized." in err and "SPARKPOST_API_KEY" in err
    assert len(api.requests) == 1


def test_422_shows_sparkpost_errors(api, pki, tmp_path):
    api.responses = [(422, {}, {"errors": [{"message": "Invalid data",
                                            "description": "email_rfc822 is malformed",
                                            "code": "1300"}]})]
    proc = send(pki, tmp_path, MSG, API + ["--sign", "--encrypt"], api_env(api))
    assert proc.returncode == 69
    assert "Invalid data (email_rfc822 is malformed) [1300]" in proc.stderr.decode()
    assert proc.stdout.decode().splitlines()[-1].startswith("FAILED - in ")
    assert len(api.requests) == 1


def test_429_retry_after_then_success(api, pki, tmp_path):
    api.responses = [(429, {"Retry-After": "1"}, {"errors": [{"message": "Too many"}]})]
    proc = send(pki, tmp_path, MSG, API + ["--sign", "--encrypt"], api_env(api))
    assert proc.returncode == 0, proc.stderr
    assert len(api.requests) == 2
    assert "429" in proc.stderr.decode() and "retrying in 1 s" in proc.stderr.decode()


def test_500_until_retries_run_out(api, pki, tmp_path):
    api.responses = [(500, {}, {})] * 3
    proc = send(pki, tmp_path, MSG, API + ["--sign", "--retries", "1"], api_env(api))
    assert proc.returncode == 75
    assert len(api.requests) == 2


def test_unreachable_api(pki, tmp_path):
    proc = send(pki, tmp_path, MSG, API + ["--sign", "--retries", "0"],
                api_env(None, SPARKPOST_HOST="http://127.0.0.1:%d" % free_port()))
    assert proc.returncode == 75 and "cannot reach" in proc.stderr.decode()


def test_verbose_hides_the_key(api, pki, tmp_path):
    proc = send(pki, tmp_path, MSG, API + ["--sign", "-v"], api_env(api))
    assert proc.returncode == 0
    err = proc.stderr.decode()
    assert "-> POST %s/api/v1/transmissions" % api.url in err and "Authorization: ***" in err
    assert "<- 200" in err and API_KEY not in err
