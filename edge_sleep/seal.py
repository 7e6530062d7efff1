"""Encryption at rest for the replay store: AES-GCM with a key the caller supplies.

On a phone the key lives in the platform's keystore (Android Keystore, iOS Keychain) and is handed
to :class:`~edge_sleep.store.ReplayStore` each time the app opens the store; it is never written
to disk by edge-sleep. Each sealed field is ``nonce (12 bytes) || ciphertext || tag (16 bytes)``
with a fresh random nonce, and its associated data binds it to its place (the record's slot, label
and field name), so a ciphertext moved to another row does not open.

Example:
    >>> sealer = Sealer(bytes(range(32)))
    >>> blob = sealer.seal(b"secret", b"slot=3")
    >>> sealer.open(blob, b"slot=3"), len(blob) - len(b"secret")
    (b'secret', 28)
    >>> Sealer(bytes(32)).open(blob, b"slot=3")
    Traceback (most recent call last):
    ...
    edge_sleep.errors.StoreKeyError: a sealed field of the replay store does not open with this key ...
"""

from __future__ import annotations

import os

from edge_sleep.errors import ConfigError, StoreKeyError

__all__ = ["NONCE_BYTES", "TAG_BYTES", "Sealer", "KEY_CHECK"]

NONCE_BYTES = 12
TAG_BYTES = 16
KEY_CHECK = b"edge-sleep replay store key check v1"


class Sealer:
    """AES-GCM sealing of byte strings under one key.

    Args:
        key: 16, 24 or 32 bytes (AES-128/192/256), e.g. ``AESGCM.generate_key(bit_length=256)``.

    Raises:
        ConfigError: the key is not bytes of a valid AES length.
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) not in (16, 24, 32):
            shown = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
            raise ConfigError("store key", [f"key is {shown}; expected 16, 24 or 32 bytes (AES-128/192/256). Fix: "
                                            "generate one with os.urandom(32) and keep it in the platform keystore"])
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(bytes(key))

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """``nonce || AES-GCM(plaintext, aad)``."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """The plaintext of :meth:`seal` output.

        Raises:
            StoreKeyError: a wrong key, or the blob or its associated data was changed.
        """
        from cryptography.exceptions import InvalidTag

        if not isinstance(blob, bytes) or len(blob) < NONCE_BYTES + TAG_BYTES:
            raise StoreKeyError("a sealed field of the replay store is too short to be AES-GCM output; it was "
                                "damaged. Fix: restore the store from a backup.")
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise StoreKeyError("a sealed field of the replay store does not open with this key (a wrong key, "
                                "or the field was changed). Fix: pass the key the store was created with.") from None
