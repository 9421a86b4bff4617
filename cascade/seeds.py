"""Seeds derived by hashing: a pure function of their inputs, independent of process and batching.

Every random stream of a trial that must not depend on how the work is split (a sample's pixels, a
training step's stochastic-depth masks) is seeded from sha256 of a namespaced key, so the same
(seed, index) gives the same stream on any rank, in any order, after any resume.
"""

from __future__ import annotations

import hashlib

SEED_BITS = 63  # torch.manual_seed and torch.Generator take seeds below 2**64; 63 stays signed-safe


def derive_seed(namespace: str, *parts: object, shift: int = 0) -> int:
    """A 63-bit seed for `namespace` and `parts`: from sha256 of "<namespace>:<part>:<part>...".

    The digest's first 8 bytes, read little-endian, shifted right by `shift` bits, low 63 bits kept.
    `shift` exists for one historical namespace: the training step seeds ("flaresweep-step") have
    always kept bits 1..63 (shift=1), the sample seeds ("flaresweep") bits 0..62; changing either
    would change the data or the dropout masks, and so every result, by a hair.
    """
    key = ":".join([namespace, *(str(p) for p in parts)])
    value = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return (value >> shift) & ((1 << SEED_BITS) - 1)
