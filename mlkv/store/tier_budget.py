"""TierBudget: the one byte budget (`cache_bytes`) that the memory tiers of all tables share.

A tier grows (doubling) while the budget has room. When it is full, a tier holding less than its fair share
(budget / tables with a tier, in whole rows of that tier) takes room back from the tiers above their fair
share, largest first; otherwise it makes room by evicting its own coldest rows. So one hot table can use
the whole budget, and a table opened later still gets its share.

Every resize copies a whole tier, so room changes hands in steps, never row by row: a tier below its share
takes what its doubling wants (up to the share) at once, and a donor never gives below its own share. A
tier that reaches its share is settled and no longer asks; each tier therefore resizes O(log(share)) times
while the tables fill the budget, instead of on every batch that misses.

Not thread-safe: called with the store lock held.
"""

from __future__ import annotations

from typing import Protocol

from .memory_tier import MemoryTier

MIN_TIER_ROWS = 1024  # the first allocation of a tier, and the least a doubling asks for


class TierOwner(Protocol):
    tier: MemoryTier

    def resize_tier(self, cap: int) -> None: ...


class TierBudget:
    def __init__(self, cache_bytes: int):
        self.cache_bytes = cache_bytes
        self.owners: list[TierOwner] = []

    @property
    def used_bytes(self) -> int:
        return sum(o.tier.nbytes for o in self.owners)

    def register(self, owner: TierOwner) -> None:
        self.owners.append(owner)

    def unregister(self, owner: TierOwner) -> None:
        self.owners = [o for o in self.owners if o is not owner]

    def _free_rows(self, tier: MemoryTier) -> int:
        return max(self.cache_bytes - self.used_bytes, 0) // tier.row_bytes

    def fair_rows(self, tier: MemoryTier) -> int:
        """The tier's fair share of the budget, in whole rows; at least one, so that a table whose share
        is smaller than a row still gets a row while the budget can hold one."""
        return max(self.cache_bytes // max(len(self.owners), 1) // tier.row_bytes, 1)

    def settled(self, owner: TierOwner) -> bool:
        """True when `grow` could not give `owner` a row: the budget is full and the tier holds at least its
        fair share. The common case of a busy tier, checked first because grow is not cheap."""
        tier = owner.tier
        return self._free_rows(tier) == 0 and tier.capacity >= self.fair_rows(tier)

    def grow(self, owner: TierOwner, rows: int) -> None:
        """Give `owner`'s tier room for `rows` more rows, as far as the budget allows."""
        tier = owner.tier
        want = max(tier.capacity * 2, tier.capacity + rows, MIN_TIER_ROWS) - tier.capacity
        if self._free_rows(tier) < want:
            self._rebalance(owner, want - self._free_rows(tier))
        cap = tier.capacity + min(want, self._free_rows(tier))
        if cap > tier.capacity:
            owner.resize_tier(cap)

    def _rebalance(self, owner: TierOwner, need_rows: int) -> None:
        """Shrink tiers above their fair share so that `owner` (below its own) can grow by up to
        `need_rows` rows, never past its fair share."""
        tier = owner.tier
        need_rows = min(need_rows, self.fair_rows(tier) - tier.capacity)
        if need_rows <= 0:
            return
        need_bytes = need_rows * tier.row_bytes
        for donor in sorted((o for o in self.owners if o is not owner), key=lambda o: -o.tier.nbytes):
            if need_bytes <= 0:
                break
            spare_rows = donor.tier.capacity - self.fair_rows(donor.tier)
            if spare_rows > 0:
                give = min(spare_rows, -(-need_bytes // donor.tier.row_bytes))
                donor.resize_tier(donor.tier.capacity - give)
                need_bytes -= give * donor.tier.row_bytes
