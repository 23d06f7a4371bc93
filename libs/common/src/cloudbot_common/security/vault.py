"""Encryption of provider API keys at rest, bound to their owner and provider."""

from __future__ import annotations

import uuid

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class VaultError(Exception):
    """A ciphertext could not be decrypted for the row it was read from."""


class Vault:
    """MultiFernet over ENCRYPTION_KEY (comma-separated, newest first).

    Fernet has no associated data, so the row's context (user and provider) is sealed
    inside the token ahead of the key and checked on the way out: a ciphertext copied to
    another user's or provider's row decrypts to the wrong context and is refused.
    """

    def __init__(self, keys: str) -> None:
        fernets = [Fernet(k.strip().encode()) for k in keys.split(",") if k.strip()]
        if not fernets:
            raise ValueError("ENCRYPTION_KEY holds no key")
        self._fernet = MultiFernet(fernets)

    @staticmethod
    def _context(user_id: uuid.UUID, provider: str) -> bytes:
        return b"cloudbot-api-key\x00" + user_id.bytes + provider.encode() + b"\x00"

    def encrypt(self, user_id: uuid.UUID, provider: str, secret: str) -> bytes:
        return self._fernet.encrypt(self._context(user_id, provider) + secret.encode())

    def decrypt(self, user_id: uuid.UUID, provider: str, ciphertext: bytes) -> str:
        try:
            plain = self._fernet.decrypt(ciphertext)
        except InvalidToken as exc:
            raise VaultError("ciphertext does not decrypt under any configured key") from exc
        context = self._context(user_id, provider)
        if not plain.startswith(context):
            raise VaultError("ciphertext belongs to another row")
        return plain[len(context) :].decode()

    def rotate(self, ciphertext: bytes) -> bytes:
        """Re-encrypt under the newest key, keeping the sealed context."""
        return self._fernet.rotate(ciphertext)
