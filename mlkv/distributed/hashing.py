"""Which rank owns a key: a stable, documented 64-bit hash, so shards can be located and read offline.

    owner(key, N) = splitmix64_finaliser(uint64(key) XOR SALT) mod N

with SALT = 0x6D6C6B762D736864 (the ASCII bytes "mlkv-shd") and the splitmix64 finaliser (wrapping uint64):

    z ^= z >> 30;  z *= 0xBF58476D1CE4E5B9
    z ^= z >> 27;  z *= 0x94D049BB133111EB
    z ^= z >> 31

An int64 key is reinterpreted bit for bit as uint64 (hashed ids may be negative). The function is part of
the on-disk format (HASH_NAME is written into every shard's record): it never changes for a given name; a
different placement would get a new name. The salt keeps the placement independent of the key index's own
hashing, so a shard's keys still spread evenly over its index. Pure numpy, thread-safe.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError
from ..store.validate import as_keys

HASH_NAME = "splitmix64-xor-6d6c6b762d736864-mod-n"
SALT = np.uint64(0x6D6C6B762D736864)


def mix64(keys: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64(keys) XOR SALT, as uint64 (a bijection on 64-bit values)."""
    with np.errstate(over="ignore"):
        z = np.ascontiguousarray(keys).view(np.uint64) ^ SALT
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def owner_of(keys, world_size: int) -> np.ndarray:
    """The rank that owns each key.

    Args:
        keys: 1-D int64 (or uint64) keys.
        world_size: number of shards, >= 1.

    Returns:
        int64 array of ranks in ``[0, world_size)``, one per key.

    Raises:
        InvalidArgumentError: world_size is not a positive int, or keys are not 1-D integers.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise InvalidArgumentError(f"world_size must be an int >= 1, got {world_size!r}")
    k = as_keys(keys)
    return (mix64(k) % np.uint64(world_size)).astype(np.int64)


__all__ = ["HASH_NAME", "SALT", "mix64", "owner_of"]
