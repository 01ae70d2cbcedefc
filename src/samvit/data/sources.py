"""Gathering image paths from files, directories (recursive), globs and text files that list paths."""
from __future__ import annotations

import glob
import os
import posixpath
from typing import Dict, Iterable, List, Tuple

from ..errors import InputError, open_regular
from .images import IMAGE_EXTENSIONS
from .remote import is_url, list_objects

LIST_EXTENSIONS = (".txt", ".lst", ".list")


def is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def safe_key(path: str) -> str:
    """The key of an input from its path relative to the root it was found under: '/'-separated, normalised,
    always relative and never climbing out. '%' is written '%25', a '..' component '%2E%2E', and an absolute path
    starts with a component '%2F', so two different paths never give the same key. Plain relative names are kept
    as they are ('sub/a.png')."""
    p = path.replace(os.sep, "/")
    absolute = p.startswith("/")
    parts = [c for c in posixpath.normpath(p).split("/") if c not in ("", ".")]
    parts = ["%2E%2E" if c == ".." else c.replace("%", "%25") for c in parts]
    return "/".join((["%2F"] if absolute else []) + parts)


def _glob_root(pattern: str) -> str:
    """The folder a glob's matches are keyed relative to: its leading folders without wildcards."""
    head = []
    for part in pattern.split(os.sep)[:-1]:
        if glob.has_magic(part):
            break
        head.append(part)
    return os.sep.join(head) or (os.sep if pattern.startswith(os.sep) else ".")


def read_list_file(path: str) -> List[str]:
    """The entries of a list file: one path a line, UTF-8 (a byte-order mark is skipped), LF or CRLF line ends,
    blank lines and # comments skipped. Raises InputError naming the file (and line) it cannot read."""
    with open_regular(path, "list file") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: list file is not UTF-8 text (line {line}, byte {e.start})") from None
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\0" in line:
            raise InputError(f"{path}: line {n} holds a NUL character; expected a path")
        entries.append(line)
    return entries


def collect_inputs(inputs: Iterable[str]) -> List[Tuple[str, str]]:
    """Expand inputs into (path, key) pairs, in a stable order, without duplicates.

    A directory gives its image files, recursively, keyed by their path relative to it; a glob gives its
    matches, keyed relative to the glob's leading folder; a .txt/.lst/.list file gives the paths it lists, one a
    line (relative ones taken from its folder, keyed as written), see read_list_file; any other file is taken as
    an image, keyed by its file name. Every key goes through safe_key (never absolute, never climbing out).
    The same file reached twice is kept once. A named input that does not exist raises FileNotFoundError; two
    different files with the same key raise InputError listing every such group (before any work is done).
    Nothing is opened but list files: special files (FIFOs, devices) among the images are reported by the reader.
    An object-storage URL (s3://bucket/prefix/, a glob, or one object; see samvit.data.remote) gives the image
    objects under it, keyed relative to the prefix, and list files may list such URLs (keyed without the scheme).
    """
    found: List[Tuple[str, str]] = []
    seen = set()
    by_key: Dict[str, List[str]] = {}

    def add(path: str, key: str) -> None:
        real = path if is_url(path) else os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            key = safe_key(key)
            by_key.setdefault(key, []).append(path)
            found.append((path, key))

    for item in inputs:
        item = os.fspath(item)
        if "\0" in item:
            raise InputError(f"input {item!r}: holds a NUL character")
        if is_url(item):
            for url, key in list_objects(item, IMAGE_EXTENSIONS):
                add(url, key)
        elif os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                for f in sorted(files):
                    if is_image_path(f):
                        p = os.path.join(root, f)
                        add(p, os.path.relpath(p, item))
        elif item.lower().endswith(LIST_EXTENSIONS) and os.path.exists(item):
            base = os.path.dirname(os.path.abspath(item))
            for line in read_list_file(item):
                if is_url(line):
                    add(line, line.split("://", 1)[1])
                else:
                    add(line if os.path.isabs(line) else os.path.join(base, line), line)
        elif os.path.lexists(item):
            add(item, os.path.basename(item))
        elif glob.has_magic(item):
            root = _glob_root(item)
            for p in sorted(glob.glob(item, recursive=True)):
                if os.path.isfile(p):
                    add(p, os.path.relpath(p, root))
        else:
            raise FileNotFoundError(f"input {item!r}: no such file, directory or matching glob")
    clashes = {k: ps for k, ps in by_key.items() if len(ps) > 1}
    if clashes:
        raise InputError(key_clash_message(clashes, "key", "give each input a distinct name, or embed such "
                                           "folders in runs (and outputs) of their own"))
    return found


def key_clash_message(clashes: Dict[str, List[str]], what: str, hint: str) -> str:
    """One message listing every group of different inputs that would get the same key or output."""
    shown = [f"{', '.join(ps)} -> {k}" for k, ps in sorted(clashes.items())[:10]]
    more = f" (and {len(clashes) - 10} more)" if len(clashes) > 10 else ""
    return (f"{len(clashes)} group(s) of different inputs would get the same {what}: " + "; ".join(shown) + more
            + f". Nothing was done: {hint}")
