"""Gathering image paths from files, directories (recursive), globs and text files that list paths."""
from __future__ import annotations

import glob
import os
from typing import Iterable, List, Tuple

from .images import IMAGE_EXTENSIONS

LIST_EXTENSIONS = (".txt", ".lst", ".list")


def is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def collect_inputs(inputs: Iterable[str]) -> List[Tuple[str, str]]:
    """Expand inputs into (path, key) pairs, in a stable order, without duplicates.

    A directory gives its image files, recursively, keyed by their path relative to it; a glob gives its
    matches; a .txt/.lst/.list file gives the paths it lists, one a line (relative ones taken from its folder,
    blank lines and # comments skipped); any other file is taken as an image, keyed by its file name.
    A named input that does not exist raises FileNotFoundError.
    """
    found: List[Tuple[str, str]] = []
    seen = set()

    def add(path: str, key: str) -> None:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            found.append((path, key.replace(os.sep, "/")))

    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                for f in sorted(files):
                    if is_image_path(f):
                        p = os.path.join(root, f)
                        add(p, os.path.relpath(p, item))
        elif os.path.isfile(item) and item.lower().endswith(LIST_EXTENSIONS):
            base = os.path.dirname(os.path.abspath(item))
            with open(item, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        p = line if os.path.isabs(line) else os.path.join(base, line)
                        add(p, line)
        elif os.path.exists(item):
            add(item, os.path.basename(item))
        elif glob.has_magic(item):
            for p in sorted(glob.glob(item, recursive=True)):
                if os.path.isfile(p):
                    add(p, os.path.basename(p))
        else:
            raise FileNotFoundError(f"input {item!r}: no such file, directory or matching glob")
    return found
