"""Redemption across hosts (issue 11, spec section 8).

- :mod:`stop.redeem.policy`: ``redeem_allow`` / ``redeem_deny``, and a
  client's identity from its verified certificate.
- :mod:`stop.redeem.tls`: the server's TLS context (mutual TLS, no Python
  callbacks into OpenSSL).
- :mod:`stop.redeem.audit`: the append-only audit trail.
- :mod:`stop.redeem.service`: the HTTPS service on ``twisted.web``.
- :mod:`stop.redeem.client`: the investigator's synchronous client.
- :mod:`stop.redeem.trace`: ``stopctl trace`` and ``stopctl audit``.

See docs/redeem.rst.
"""
