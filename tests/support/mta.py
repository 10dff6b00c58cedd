"""A private Postfix instance with OpenDKIM as a milter, all under one temp directory.

Listens on 127.0.0.1:<free port> (never port 25, never /etc/postfix's configuration),
offers STARTTLS with a test certificate, forbids bare newlines where Postfix supports
it, delivers the test domains into Maildirs, and has OpenDKIM sign mail from
thetucks.com with a test key.  stop() ends everything.
"""

import base64
import glob
import os
import pwd
import re
import shutil
import subprocess
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .servers import free_port

DKIM_DOMAIN = "thetucks.com"
DKIM_SELECTOR = "smimetest"


def postconf_default(name):
    """Return Postfix's built-in default for *name*, or None if it does not know it."""
    proc = subprocess.run(["postconf", "-d", name], capture_output=True, text=True)
    if proc.returncode != 0 or "unknown parameter" in proc.stderr:
        return None
    return proc.stdout.split("=", 1)[1].strip()


class Postfix:
    def __init__(self, base, addresses, certfile, keyfile, main_extra=None, master_extra=()):
        self.base = base
        self.conf = os.path.join(base, "conf")
        self.queue = os.path.join(base, "queue")
        self.data = os.path.join(base, "data")
        self.mail = os.path.join(base, "mail")
        self.logfile = os.path.join(base, "log", "postfix.log")
        for d in (self.conf, self.queue, self.data, self.mail, os.path.dirname(self.logfile)):
            os.makedirs(d, exist_ok=True)
        os.chmod(base, 0o755)
        self.port = free_port()
        self.milter_port = free_port()
        self.addresses = addresses
        self.vmail = pwd.getpwnam("nobody")
        self.dkim_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.opendkim = None
        self.started = False
        self.main_extra, self.master_extra = dict(main_extra or {}), list(master_extra)
        self._write_config(certfile, keyfile)

    # -- DKIM ----------------------------------------------------------------

    def dns_txt(self, name, timeout=5):
        """dkimpy's dnsfunc: the test key's TXT record instead of a DNS lookup."""
        if isinstance(name, bytes):
            name = name.decode()
        if name.rstrip(".") != "%s._domainkey.%s" % (DKIM_SELECTOR, DKIM_DOMAIN):
            return None
        spki = self.dkim_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return ("v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()).encode()

    # -- configuration -----------------------------------------------------

    def _write_config(self, certfile, keyfile):
        domains = sorted({a.split("@")[1] for a in self.addresses})
        with open(os.path.join(self.conf, "vmailbox"), "w") as fh:
            for a in self.addresses:
                fh.write("%s %s/%s/\n" % (a, a.split("@")[1], a.split("@")[0]))
        os.makedirs(self.mail, exist_ok=True)
        os.chown(self.mail, self.vmail.pw_uid, self.vmail.pw_gid)
        postfix = pwd.getpwnam("postfix")
        os.chown(self.data, postfix.pw_uid, postfix.pw_gid)
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": self.data,
            "mail_owner": "postfix",
            "myhostname": "mta.smime.test",
            "mydomain": "smime.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "alias_maps": "", "alias_database": "",
            "relayhost": "",
            "local_transport": "error:no local delivery",
            "virtual_mailbox_domains": " ".join(domains),
            "virtual_mailbox_base": self.mail,
            "virtual_mailbox_maps": "texthash:" + os.path.join(self.conf, "vmailbox"),
            "virtual_uid_maps": "static:%d" % self.vmail.pw_uid,
            "virtual_gid_maps": "static:%d" % self.vmail.pw_gid,
            "virtual_minimum_uid": "1",
            "smtpd_tls_cert_file": certfile,
            "smtpd_tls_key_file": keyfile,
            "smtpd_tls_security_level": "may",
            "smtpd_milters": "inet:127.0.0.1:%d" % self.milter_port,
            "non_smtpd_milters": "",
            "milter_default_action": "tempfail",
            "maillog_file": self.logfile,
            "maillog_file_prefixes": self.base,
            "message_size_limit": "52428800",
            "virtual_mailbox_limit": "0",
            "smtputf8_enable": "no",
        }
        if postconf_default("smtpd_forbid_bare_newline") is not None:
            main["smtpd_forbid_bare_newline"] = "yes"
        self.forbids_bare_newline = "smtpd_forbid_bare_newline" in main
        main.update(self.main_extra)
        with open(os.path.join(self.conf, "main.cf"), "w") as fh:
            for k, v in main.items():
                fh.write("%s = %s\n" % (k, v))
        with open("/etc/postfix/master.cf") as fh:
            master = fh.read()
        lines = []
        for line in master.splitlines():
            cols = line.split()
            if line and not line[0].isspace() and not line.startswith("#") and len(cols) >= 8:
                cols[4] = "n"  # no chroot: everything lives under the temp dir
                if cols[0] == "smtp" and cols[1] == "inet":
                    cols[0] = "127.0.0.1:%d" % self.port
                line = "  ".join(cols)
            lines.append(line)
        with open(os.path.join(self.conf, "master.cf"), "w") as fh:
            fh.write("\n".join(lines + self.master_extra) + "\n")
        self._write_opendkim()

    def _write_opendkim(self):
        d = os.path.join(self.base, "opendkim")
        os.makedirs(d, exist_ok=True)
        key = os.path.join(d, "test.private")
        with open(key, "wb") as fh:
            fh.write(self.dkim_key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                                 serialization.NoEncryption()))
        os.chmod(key, 0o600)
        self.opendkim_conf = os.path.join(d, "opendkim.conf")
        with open(self.opendkim_conf, "w") as fh:
            fh.write("\n".join([
                "Socket inet:%d@127.0.0.1" % self.milter_port,
                "Domain %s" % DKIM_DOMAIN,
                "Selector %s" % DKIM_SELECTOR,
                "KeyFile %s" % key,
                "Mode s",
                "Canonicalization relaxed/simple",
                "SignatureAlgorithm rsa-sha256",
                "OversignHeaders From",
                "InternalHosts 127.0.0.1",
                "RequireSafeKeys false",
                "Syslog false",
                "PidFile %s" % os.path.join(d, "opendkim.pid"),
                "UMask 002",
                ""]))

    # -- life cycle ----------------------------------------------------------

    def start(self):
        self.opendkim = subprocess.Popen(["opendkim", "-f", "-x", self.opendkim_conf],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_port(self.milter_port, self.opendkim)
        run = subprocess.run(["postfix", "-c", self.conf, "start"], capture_output=True,
                             text=True, timeout=60)
        if run.returncode != 0:
            raise RuntimeError("postfix start failed: %s %s\n%s" % (run.stdout, run.stderr,
                                                                  self.log()))
        self.started = True
        wait_port(self.port)

    def stop(self):
        if self.started:
            subprocess.run(["postfix", "-c", self.conf, "stop"], capture_output=True, timeout=60)
            self.started = False
        if self.opendkim is not None:
            self.opendkim.terminate()
            try:
                self.opendkim.wait(10)
            except subprocess.TimeoutExpired:
                self.opendkim.kill()
            self.opendkim = None

    def log(self):
        try:
            with open(self.logfile, errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def maildir(self, address):
        local, domain = address.split("@")
        return os.path.join(self.mail, domain, local)

    def wait_for(self, address, count, timeout=60):
        """Return the bytes of the first *count* messages delivered to *address*."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            files = sorted(glob.glob(os.path.join(self.maildir(address), "new", "*")),
                           key=os.path.getmtime)
            if len(files) >= count:
                out = []
                for f in files[:count]:
                    with open(f, "rb") as fh:
                        out.append(fh.read())
                return out
            time.sleep(0.2)
        raise AssertionError("%s got fewer than %d messages\n%s" % (address, count, self.log()))

    def clear(self):
        for path in glob.glob(os.path.join(self.mail, "*", "*", "new", "*")):
            os.remove(path)


def wait_port(port, proc=None, timeout=30):
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited: %s" % proc.stdout.read().decode(errors="replace"))
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("nothing listens on 127.0.0.1:%d" % port)


def tools_present():
    return all(shutil.which(t) for t in ("postfix", "opendkim", "postconf"))


def unfold_headers(data):
    head = data.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in data else data.split(b"\n\n", 1)[0]
    return re.sub(rb"\r?\n[ \t]", b" ", head)
