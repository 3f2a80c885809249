"""kernel: how mlkv compiles its hot loops (the one place their numba options are set).

Every per-batch loop of the store and the torch layer (hash index, tier, slot file, optimizers' fused
steps, gradient scatter) is a numba function compiled with:

- ``nogil=True``: the GIL is released while it runs, so I/O threads, the write-back thread and the training
  thread run their kernels at the same time;
- ``cache=True``: compiled once per machine (numba's on-disk cache next to the module), not per process;
- ``error_model="numpy"``: a float division by zero gives IEEE inf/nan, as torch's kernels and numpy do,
  instead of raising ZeroDivisionError. Python's error model tests every divisor, and that branch keeps
  LLVM from vectorising the loop: the fused Adagrad step over 10,300 rows took 2.1 ms scalar and 0.9 ms
  vectorised (0.64 -> 0.23 ms with the rows in cache), with bit-identical results (the same IEEE
  operations in the same order; no fast-math, so no contraction into FMAs and no reassociation).

Integer division by zero gives 0 under this model; no kernel here divides by a value that can be zero.

numba's on-disk cache is keyed by a function's bytecode and its source file's timestamp, not by these
options: after changing OPTIONS, delete the `__pycache__/*.nbi`/`*.nbc` files (or touch the modules) so
that every kernel is compiled again.
"""

from __future__ import annotations

import numba

OPTIONS = {"nogil": True, "cache": True, "error_model": "numpy"}

#: decorator for a hot loop: ``@kernel``
kernel = numba.njit(**OPTIONS)

#: decorator for a small helper inlined into the kernels that call it: ``@inline_kernel``
inline_kernel = numba.njit(**OPTIONS, inline="always")
