"""Keys derived from TALLY_SECRET, one per purpose, so that no two uses share a key."""

from __future__ import annotations

import hashlib


def derive_key(secret: str, purpose: str) -> bytes:
    """A 32-byte key for `purpose` (at most 16 bytes, e.g. b"analyst-server"), from TALLY_SECRET."""
    return hashlib.blake2b(secret.encode(), digest_size=32, person=purpose.encode()[:16]).digest()


def internal_token(secret: str) -> str:
    """The bearer token the API presents to the analyst server (both derive it from TALLY_SECRET)."""
    return derive_key(secret, "analyst-server").hex()
