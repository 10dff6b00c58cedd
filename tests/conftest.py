"""Every shared fixture of the suite, and the ``system`` marker (see tests/README.md).

Helpers (the tool as a subprocess, the PKI, batch helpers) are in support/harness.py;
servers, engines and chroots in the other support/ modules.  A fixture only one test
file uses sits at the top of that file.
"""

import os
import shutil
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)                  # the support package
sys.path.insert(0, os.path.dirname(TESTS))  # sparkpostSMIME itself

from support import engines  # noqa: E402
from support.harness import PKI, need  # noqa: E402
from support.servers import SmtpServer  # noqa: E402


#: Fixtures that need root, a Debian chroot (debootstrap), Postfix/OpenDKIM or mounts: a
#: test using one (directly or through another fixture) is marked ``system``.
SYSTEM_FIXTURES = {"trixie_tree", "sid_tree", "pythons_tree", "postfix", "postfix_gateway", "tmpfs"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "system: needs root, a Debian chroot (debootstrap), Postfix/OpenDKIM or "
        "mounts; the quick tier is pytest -m 'not system' tests")


def pytest_collection_modifyitems(items):
    """Mark ``system`` every test that uses one of SYSTEM_FIXTURES."""
    for item in items:
        if SYSTEM_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return PKI(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="session")
def nss(pki, tmp_path_factory):
    need("cmsutil")
    return engines.NSS(str(tmp_path_factory.mktemp("nss")), pki)


@pytest.fixture(scope="session")
def gpgsm(pki, tmp_path_factory):
    need("gpgsm")
    home = engines.GpgSM(str(tmp_path_factory.mktemp("gnupg")), pki)
    yield home
    home.close()


@pytest.fixture(scope="session")
def tls_ctx(pki, tmp_path_factory):
    """Server TLS context: a localhost/127.0.0.1 certificate issued by the test CA."""
    from support import servers
    return servers.server_context(pki.inter, str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="session")
def openssl():
    need("openssl")
    return engines.OpenSSL()


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_output():
    """After the whole session: no planted secret appeared in any output of the tool."""
    yield
    for blob in engines.OUTPUTS:
        for secret in engines.SECRETS:
            assert secret not in blob, "a secret leaked into the tool's output"


def debian_tree(suite_module):
    """Return the cached chroot of *suite_module* (support.trixie or support.sid): under
    CI=true a tree that cannot be built fails the test, elsewhere it skips."""
    from support import debian
    need("debootstrap")
    try:
        return suite_module.chroot()
    except (debian.BuildError, PermissionError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail("the Debian %s chroot cannot be built, and CI must run every test: %s"
                        % (suite_module.SUITE.name, exc))
        pytest.skip("the Debian %s chroot cannot be built: %s" % (suite_module.SUITE.name, exc))


@pytest.fixture(scope="session")
def trixie_tree():
    """Debian 13 in a cached chroot (support/trixie.py): NSS 3.110, gpgsm 2.4, python3, pypy3."""
    from support import trixie
    return debian_tree(trixie)


@pytest.fixture(scope="session")
def sid_tree():
    """Debian sid in a cached chroot (support/sid.py): OpenSSL >= 3.6 for ML-KEM."""
    from support import sid
    return debian_tree(sid)


@pytest.fixture(scope="session")
def pythons_tree():
    """Debian 13 with python3 and pypy3 in a cached chroot (support/pythons.py)."""
    from support import pythons
    return debian_tree(pythons)


@pytest.fixture(scope="session")
def nss13(pki, trixie_tree):
    """Debian 13's NSS cmsutil (3.110) in a cached trixie chroot, holding the session PKI.

    Decrypts EC (ECDH) recipients, which Debian 12's NSS cannot; see tests/support/trixie.py.
    """
    from support import trixie
    engine = trixie.TrixieNSS(trixie_tree, pki)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def gpgsm24(pki, trixie_tree):
    """Debian 13's GnuPG gpgsm (2.4) in a cached trixie chroot, holding the session PKI.

    Imports EC PKCS#12 and decrypts EC (ECDH) recipients, which gpgsm 2.2 cannot.
    """
    from support import trixie
    engine = trixie.TrixieGpgSM(trixie_tree, pki)
    yield engine
    engine.close()



@pytest.fixture(params=[True, False], ids=["pipelining", "no-pipelining"])
def smtp(request):
    """aiosmtpd, offering PIPELINING (the tool streams messages back to back) or not."""
    with SmtpServer(pipelining=request.param) as srv:
        yield srv


@pytest.fixture
def keys(pki, tmp_path):
    """A fresh key directory holding copies of alice's and bob's good files."""
    d = tmp_path / "keys"
    d.mkdir()
    for name in ("alice@example.com.pem", "alice@example.com.crt", "bob@example.org.crt"):
        shutil.copy(os.path.join(pki.keys, name), d / name)
    return d
