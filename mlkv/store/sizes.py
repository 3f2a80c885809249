"""Byte sizes given as ints or strings such as "512MiB", "4GB", "100k"."""

from __future__ import annotations

import re

from ..errors import InvalidArgumentError, InvalidTypeError

_DECIMAL = {"k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_UNITS = {"": 1, "b": 1}
for _p, _n in _DECIMAL.items():
    _UNITS |= {_p: _n, _p + "b": _n, _p + "ib": 1024 ** "kmgt".index(_p) * 1024}


def parse_bytes(value: int | str, name: str = "cache_bytes") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidTypeError(f"{name} must be an int or a string like '512MiB', got {type(value).__name__}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise InvalidArgumentError(f"{name} must look like '512MiB', '4GB' or an int, got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 0:
        raise InvalidArgumentError(f"{name} must be >= 0, got {value!r}")
    return n
