"""Tenants of the Batch API: each API key sees only the files and batches created with it.

What a key creates is stamped with the key's fingerprint, an HMAC-SHA256 of the key under a fixed
label (never the key itself, and not reversible for keys of real length), in the file's record, the
batch's submission record and the tags of the batch's run. A key sees what carries its fingerprint and
nothing else: another tenant's id answers exactly as an unknown id does. An admin key
(VBATCH_ADMIN_API_KEYS) sees every tenant, and so does the command line, which is run by whoever
operates the machine and needs no key. Batches registered without a key (`vllm-batch submit` and
`run`, the inbox, the Dagster UI) belong to no tenant: only admin keys see them through the API.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

_FINGERPRINT_LABEL = b"vllm-batch tenant v1"


def key_fingerprint(key: str) -> str:
    """The owner stamp of what `key` creates: 32 hex digits of an HMAC-SHA256 of the key."""
    return hmac.new(_FINGERPRINT_LABEL, key.encode(), hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class Tenant:
    """Who is asking: the owner stamp of what they create, and whether they see every tenant."""

    owner: str | None
    admin: bool = False

    def sees(self, owner: str | None) -> bool:
        """True when a file or batch stamped `owner` (None: no tenant) is visible to this tenant."""
        if self.admin:
            return True
        return owner is not None and self.owner is not None and hmac.compare_digest(owner, self.owner)


# The command line (and anything else on the machine that needs no key): sees every tenant, owns nothing.
OPERATOR = Tenant(owner=None, admin=True)
