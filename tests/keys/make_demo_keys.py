#!/usr/bin/env python3
"""Regenerate the TEST-ONLY demo keys in this directory.

These keys are public (they are in the repository): never use them for real mail.
Run from the repository root:  python3 tests/keys/make_demo_keys.py
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from support.pki import CA, DAY, NOW, pem_cert, pem_key, write  # noqa: E402


def main():
    root = CA("sparkpostSMIME Demo Root CA (TEST ONLY)", days=11000)
    inter = root.intermediate("sparkpostSMIME Demo Intermediate CA (TEST ONLY)", days=11000)
    write(os.path.join(HERE, "demo-ca.crt"), pem_cert(root.cert), 0o644)
    for address in ("steve@thetucks.com", "steve.tuck@sparkpost.com"):
        key, cert = inter.issue(address, common=address + " (TEST ONLY)",
                               not_after=NOW + 10950 * DAY)
        write(os.path.join(HERE, address + ".pem"), pem_key(key))
        write(os.path.join(HERE, address + ".crt"), pem_cert(cert, inter.cert), 0o644)


if __name__ == "__main__":
    main()
