"""Random ids in OpenAI's shapes (`file-…`, `ftjob-…`) and API key plaintexts and hashes.

Ids carry 24 hex characters (96 random bits) after their prefix; they are unique in practice and
the primary keys still refuse a repeat. Not here: storing anything.
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "sk-shoal-"


def new_id(prefix: str, hex_chars: int = 24) -> str:
    """`prefix` followed by `hex_chars` random hex characters, e.g. `new_id("file-")`."""
    return prefix + secrets.token_hex(hex_chars // 2)


def new_key() -> str:
    """A fresh API key plaintext: `sk-shoal-` and 40 URL-safe random characters (240 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(30)


def hash_key(plaintext: str) -> str:
    """The sha256 hex digest under which a key is stored and looked up."""
    return hashlib.sha256(plaintext.encode()).hexdigest()
