"""TierBudget: the one byte budget (`cache_bytes`) that the memory tiers of all tables share.

A tier grows (doubling) while the budget has room. When it is full, a tier holding less than its fair share
(budget / tables with a tier) takes room back from the largest tier above its share; otherwise it makes
room by evicting its own coldest rows. So one hot table can use the whole budget, and a table opened
later still gets its share.
"""

from __future__ import annotations

from typing import Protocol

from .memory_tier import MemoryTier


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

    def settled(self, owner: TierOwner) -> bool:
        """True when `grow` could not give `owner` a row: the budget is full and the tier holds at least its
        fair share. The common case of a busy tier, checked first because grow is not cheap."""
        tier = owner.tier
        full = self.cache_bytes - self.used_bytes < tier.row_bytes
        return full and tier.nbytes >= self._fair_share()

    def _fair_share(self) -> int:
        return self.cache_bytes // max(len(self.owners), 1)

    def grow(self, owner: TierOwner, rows: int) -> None:
        """Give `owner`'s tier room for `rows` more rows, as far as the budget allows."""
        tier = owner.tier
        want = max(tier.capacity * 2, tier.capacity + rows, 1024)
        room = (self.cache_bytes - self.used_bytes) // tier.row_bytes
        if room < rows:
            self._rebalance(owner, (rows - room) * tier.row_bytes)
            room = (self.cache_bytes - self.used_bytes) // tier.row_bytes
        cap = min(want, tier.capacity + max(room, 0))
        if cap > tier.capacity:
            owner.resize_tier(cap)

    def _rebalance(self, owner: TierOwner, need_bytes: int) -> None:
        fair = self._fair_share()
        if owner.tier.nbytes >= fair:
            return
        need_bytes = min(need_bytes, fair - owner.tier.nbytes)
        donors = sorted((o for o in self.owners if o is not owner), key=lambda o: -o.tier.nbytes)
        for donor in donors:
            spare = donor.tier.nbytes - fair
            if need_bytes <= 0 or spare <= 0:
                break
            give = min(spare, need_bytes)
            rows = -(-give // donor.tier.row_bytes)
            donor.resize_tier(donor.tier.capacity - rows)
            need_bytes -= rows * donor.tier.row_bytes
