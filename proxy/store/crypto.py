"""Sealing what a credential stores in Redis: AES-256-GCM under a key that HKDF derives from
the client secret and binds to the credential's identity, so a dump of Redis, or a replica
with another secret, can read nothing and forge nothing.

HKDF (not a password hash) fits because client secrets are long random strings issued by the
authorization server; the key is derived once per credential, so a slow KDF would buy little
against a secret that is guessable anyway. Each value carries its own random 96-bit nonce
(its first bytes after the format byte), which also names that publication: the Redis
scripts compare it to drop "the token upstream rejected" and no other."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.store.base import CredentialIdentity

FORMAT = b"\x01"
NONCE_BYTES = 12
_SALT = b"token-proxy store v1"


class Sealer:
    """Encrypts and authenticates one credential's stored values."""

    __slots__ = ("_aad", "_aead")

    def __init__(self, identity: CredentialIdentity, secret: str) -> None:
        digest = identity.digest.encode()
        key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=_SALT,
            info=b"token-proxy credential key|" + digest,
        ).derive(secret.encode())
        self._aead = AESGCM(key)
        self._aad = b"token-proxy|" + digest + b"|"

    def __repr__(self) -> str:
        return "Sealer(<key hidden>)"

    def seal(self, purpose: str, plaintext: bytes) -> bytes:
        """FORMAT + nonce + ciphertext and tag; `purpose` (token, failure) is authenticated
        too, so that one kind of value cannot be passed off as another."""
        nonce = os.urandom(NONCE_BYTES)
        return FORMAT + nonce + self._aead.encrypt(nonce, plaintext, self._aad + purpose.encode())

    def open(self, purpose: str, blob: bytes) -> bytes | None:
        """The plaintext, or None when `blob` was sealed with another key or purpose, was
        changed, or is not a sealed value at all."""
        if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != FORMAT:
            return None
        nonce = blob[1 : 1 + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[1 + NONCE_BYTES :], self._aad + purpose.encode())
        except InvalidTag:
            return None


def version_of(blob: bytes) -> str:
    """The name of one sealed publication: its nonce, in hex."""
    return blob[1 : 1 + NONCE_BYTES].hex()
