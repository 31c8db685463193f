"""Seeds derived from names: `derive_seed(run_seed, "rollout", step)` is the same in every process, on every
rank and Python version (blake2b of the parts joined by "/"; Python's `hash` is salted per process)."""
from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit generator seed from `parts` (ints, strings)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
