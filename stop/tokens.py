"""Tokens: random ones (ID, errors under ``errors = token``) and record
hashes (SV). Every token of one daemon has the same length and alphabet,
lowercase hex, so no one can tell an ID token from an SV token (spec 2.2).
"""

from __future__ import annotations

import hashlib
import secrets

from stop.errors import ConfigError


class Tokens:
    """Makes tokens for one hash algorithm (``sha1``: 40 hex, ``sha256``: 64)."""

    def __init__(self, hash_name: str = "sha1"):
        try:
            self._size = hashlib.new(hash_name).digest_size
        except ValueError:
            raise ConfigError(f"hash: unknown algorithm {hash_name!r}") from None
        self.hash_name = hash_name
        #: Length of every token, in characters.
        self.length = 2 * self._size

    def random(self) -> str:
        """A fresh token from the OS CSPRNG; carries nothing of the request."""
        return secrets.token_hex(self._size)

    def of_record(self, data: bytes) -> str:
        """The token of an SV record: the hash of its exact stored bytes."""
        return hashlib.new(self.hash_name, data).hexdigest()
