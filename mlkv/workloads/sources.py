"""Where the real datasets come from: files shipped inside installed wheels, or a Debian package.

Nothing is downloaded or copied into the repository: Nations, Kinships and UMLS ship with `pykeen`, the
MovieLens-100k ratings and its Freebase knowledge graph with `recbole`, WordNet with Debian's
`wordnet-base`. A missing source raises DatasetUnavailable saying how to install it.
"""

from __future__ import annotations

import importlib.metadata
import os

from ..errors import MlkvError

WORDNET_DIR = "/usr/share/wordnet"


class DatasetUnavailable(MlkvError, FileNotFoundError):  # noqa: N818 - reads as what happened
    """The files of a dataset are not installed (the message says how to install them)."""


def wheel_file(distribution: str, relative: str) -> str:
    """Path of `relative` inside the installed `distribution` (e.g. 'pykeen', 'pykeen/datasets/...')."""
    hint = f"install it with `pip install --no-deps {distribution}` (its wheel carries the data)"
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DatasetUnavailable(f"the dataset needs the {distribution!r} package: {hint}") from None
    path = os.fspath(dist.locate_file(relative))
    if not os.path.isfile(path):
        raise DatasetUnavailable(f"{relative} is not in the installed {distribution} {dist.version}: {hint}")
    return path


def wordnet_file(name: str) -> str:
    path = os.path.join(WORDNET_DIR, name)
    if not os.path.isfile(path):
        raise DatasetUnavailable(
            f"WordNet is not installed ({path} is missing): run `apt-get install wordnet-base`"
        )
    return path


__all__ = ["WORDNET_DIR", "DatasetUnavailable", "wheel_file", "wordnet_file"]
