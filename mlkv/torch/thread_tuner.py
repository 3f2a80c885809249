"""ThreadTuner: torch's intra-op thread count for a training loop whose cores mlkv's threads share.

torch runs each op on all its intra-op threads, and its idle threads spin before they sleep. When the
memory tier churns, mlkv's look-ahead, write-back and prefetch threads need CPU every step; on a machine
with few cores they then take a core from torch's threads in the middle of its ops, and the step slows by
more than the CPU they use. Measured on 2 cores (`mlkv bench train` shape, docs/benchmarks.md): with a
10 % tier, 1 torch thread trained at 277-286K samples/s and 2 at 209-214K; with the tier holding the
table (little background work), 2 threads trained at 306-339K and 1 at 217-268K. Neither count suits every
workload, so the tuner measures the loop itself.

Protocol: the step time is the time between two batches handed to the loop (Prefetcher's `__next__`).
After WARMUP steps, a probe times BLOCKS blocks of BLOCK steps at the loop's own count n interleaved with
as many at n - 1, in the order n, n - 1, n - 1, n, n, ... (so that a run speeding up or slowing down
meanwhile, as a tier filling up does, weighs on both alike), and keeps n - 1 only if its median step is
at least MARGIN faster. The first step of each block is not counted (it pays the switch). It probes again
after RECHECK steps, or sooner when the median step of a WINDOW of steps has moved by more than DRIFT
from the first window after the last probe: a tier that fills up early in a run does less background
work than the same tier evicting later, and the better count changes with it (in the 10 % run above
both counts stepped in 13.6 ms while the tier filled, then 2 threads took 17.5 ms and 1 thread 15.4 ms).
`restore()` sets the count found at the start back; the Prefetcher calls it when its pass ends (end of
the loader, break, close, an error).

Numerics: a torch op may sum in another order on another number of threads, so results can differ in
the last bits from a run at a fixed count; what the code computes is otherwise unchanged. For that
reason it is opt-in (``Prefetcher(..., tune_threads=True)``).

Thread-safety: called from the consuming thread only. With torch's OpenMP backend the thread count is
per thread: the tuner sets (and restores) it on the thread that calls `step`; a `restore()` from another
thread (a `close()` there, garbage collection) cannot reach that thread's count and leaves it alone.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

#: steps before the first probe (compilation, warm caches, the look-ahead and the tier filling up: in the
#: bench's 10 % run the step time settled after 40-60 steps)
WARMUP = 48
#: steps per window of the drift check between probes
WINDOW = 12
#: a probe: BLOCKS blocks of BLOCK timed steps at each count, interleaved n, n - 1, n - 1, n, ...
BLOCKS, BLOCK = 4, 3
#: steps between probes once settled
RECHECK = 400
#: how much faster (median step) the smaller count must be to be kept
MARGIN = 0.03
#: a relative change of the median step (a window against the first after a probe) that calls a new probe
DRIFT = 0.15
#: steps from the first until the first probe has decided
PROBE_STEPS = WARMUP + 2 * BLOCKS * (BLOCK + 1)


class ThreadTuner:
    """Probe n and n - 1 torch intra-op threads on the running loop and keep the faster (module header).

    Attributes:
        threads: the count in use now. choices: the count kept after each probe, in order.
    """

    def __init__(self):
        self.initial = torch.get_num_threads()
        self.threads = self.initial
        self.choices: list[int] = []
        self._last: float | None = None
        self._steps = 0
        self._plan: list[int | None] = []  # counts still to time in this probe, one entry per step
        self._timed: dict[int, list[float]] = {}
        self._next_probe = WARMUP
        self._window: list[float] = []  # step times since the last probe, WINDOW at a time
        self._owner: int | None = None  # the thread whose count is tuned (the first to call step)
        self._ref: float | None = None  # median step of the first window after the last probe

    @property
    def active(self) -> bool:
        return self.initial >= 2

    def step(self) -> None:
        """One more batch handed to the loop: time the step that just ended, move the probe on."""
        if not self.active:
            return
        if self._owner is None:
            self._owner = threading.get_ident()
        now = time.perf_counter()
        if self._last is not None and self._plan:
            n = self._plan.pop(0)
            if n is not None:
                self._timed.setdefault(n, []).append(now - self._last)
            if not self._plan:
                self._decide()
        elif self._last is not None and self.choices:
            self._watch(now - self._last)
        self._last = now
        self._steps += 1
        if not self._plan and self._steps >= self._next_probe:
            self._start_probe()
        if self._plan:
            want = self._plan[0] if self._plan[0] is not None else self._plan[1]
            self._set(want)

    def _watch(self, seconds: float) -> None:
        """A step between probes: every WINDOW of them, compare their median with the first window's and
        call a probe now if it moved by more than DRIFT."""
        self._window.append(seconds)
        if len(self._window) < WINDOW:
            return
        median = statistics.median(self._window)
        self._window = []
        if self._ref is None:
            self._ref = median
        elif abs(median - self._ref) > DRIFT * self._ref:
            self._next_probe = self._steps

    def _start_probe(self) -> None:
        lo, hi = self.initial - 1, self.initial
        # None: a step not counted (the one that pays the switch)
        order = [n for b in range(BLOCKS) for n in ((hi, lo) if b % 2 == 0 else (lo, hi))]  # n, n-1, n-1, n
        self._plan = [x for n in order for x in (None, *[n] * BLOCK)]
        self._timed = {}

    def _decide(self) -> None:
        hi, lo = self.initial, self.initial - 1
        t_hi = statistics.median(self._timed.get(hi, [float("inf")]))
        t_lo = statistics.median(self._timed.get(lo, [float("inf")]))
        keep = lo if t_lo < (1 - MARGIN) * t_hi else hi
        self.choices.append(keep)
        self._set(keep)
        self._next_probe = self._steps + RECHECK
        self._window, self._ref = [], None  # measured afresh at the count kept

    def _set(self, n: int) -> None:
        if n != self.threads:
            torch.set_num_threads(n)
            self.threads = n

    def freeze(self) -> None:
        """Settle on one count and probe no more (for a measurement whose timed steps must all run at one
        count): the last probe's choice, or, mid-probe, the choice from the steps it has timed so far
        (both counts at least one block), else the one before."""
        if self._plan:
            self._plan = []
            timed = [len(self._timed.get(n, ())) for n in (self.initial, self.initial - 1)]
            if min(timed) >= BLOCK:  # a probe under way has timed both counts: decide on what it has
                self._decide()
            else:
                self._set(self.choices[-1] if self.choices else self.initial)
        self._next_probe = float("inf")
        self._window, self._ref = [], None

    def restore(self) -> None:
        """Put the thread count found at the start back (idempotent; on the tuned thread only)."""
        if self._owner is not None and self._owner != threading.get_ident():
            return
        if self.active and self.threads != self.initial:
            torch.set_num_threads(self.initial)
            self.threads = self.initial
        self._plan = []
        self._last = None
