"""The manifest: one small JSON file whose atomic replacement is the commit point of a checkpoint.

Written LevelDB-CURRENT style: write a temp file, fsync it, rename it over the old one, fsync the directory.
A crash leaves either the old or the new manifest, never a mix. The first line carries a magic/version and
a CRC-32 of the body, so a damaged manifest raises CorruptionError instead of being half-believed.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable

from ..durable_files import replace_atomically
from ..errors import CorruptionError
from ..faults import crash_point

MAGIC = "MLKVMANIFEST"
VERSION = 1
FILE_NAME = "MANIFEST"
_TABLE_FILE = re.compile(r"t\d+\.(slab|\d+\.snap|\d+\.log)")  # t<id>.slab, t<id>.<gen>.snap|log


def table_files(directory: str) -> list[str]:
    """The names in `directory` of slab table files (the only names the slab engine ever deletes)."""
    return sorted(f for f in os.listdir(directory) if _TABLE_FILE.fullmatch(f))


def write_manifest(directory: str, body: dict, after_rename: Callable[[], None] | None = None) -> None:
    """Replace the manifest atomically (durable_files.replace_atomically; `after_rename` runs once the new
    one is in place). A failure before the rename (StorageFullError...) leaves the old manifest as it was."""
    data = json.dumps(body, sort_keys=True).encode()
    header = f"{MAGIC} {VERSION} {zlib.crc32(data):08x} {len(data)}\n".encode()
    replace_atomically(
        os.path.join(directory, FILE_NAME),
        lambda f: f.write(header + data),
        before_rename=lambda: crash_point("manifest:before_rename"),
        after_rename=after_rename,
        size=len(header) + len(data),
    )


def read_manifest(directory: str) -> dict | None:
    """The committed manifest, or None when the directory holds none (a new store)."""
    path = os.path.join(directory, FILE_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    line, _, data = raw.partition(b"\n")
    parts = line.decode(errors="replace").split(" ")
    if len(parts) != 4 or parts[0] != MAGIC:
        raise CorruptionError(path, 0, f"bad manifest header {line[:40]!r}")
    if parts[1] != str(VERSION):
        raise CorruptionError(path, 0, f"manifest version {parts[1]}, this mlkv reads version {VERSION}")
    if len(data) != int(parts[3]) or f"{zlib.crc32(data):08x}" != parts[2]:
        raise CorruptionError(path, len(line) + 1, "manifest body fails its length/CRC-32 check")
    return json.loads(data)
