"""Support code of the test suite: servers, engines, PKI, chroots; no tests here.

- harness: the tool as a subprocess (run_tool, build, send), the session PKI, need(),
  batch helpers (inbox, smtp_env, summary, journal).
- pki: a throwaway CA, intermediates and identities made with cryptography.
- corpus: the trap messages every sign/encrypt mode is tried on.
- engines: OpenSSL, NSS cmsutil and GnuPG gpgsm reading what the tool wrote.
- servers: aiosmtpd (STARTTLS, AUTH, faults) and the SparkPost API stand-in on loopback.
- sparkpost_rules: SparkPost's published rules for RFC 822 content, applied by that stand-in.
- openssl_made: messages made by ``openssl cms``, for the receiving side.
- mta: a private Postfix with OpenDKIM.
- debian, trixie, sid: cached Debian chroots (debootstrap) and the engines run in them.
- make_fixtures: regenerates tests/fancy-HTML-to-smt.eml and tests/avocado-577k.eml.
"""
