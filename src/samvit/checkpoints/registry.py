"""The official SAM checkpoints: registry, verified download cache (resumable, sha256-checked), and the one
resolution of a checkpoint argument (registry name, file, or transformers model folder) to a file."""
from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .._version import __version__
from ..runtime import progress_callback
from .files import CheckpointError, PathLike, sha256_file

DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything"
CHUNK = 1 << 20
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the weights file in a transformers model folder


@dataclass(frozen=True)
class CheckpointEntry:
    """One released checkpoint: the preset it fits, its file name, byte size and sha256."""

    name: str
    filename: str
    size: int
    sha256: str
    model: str

    def url(self, base_url: Optional[str] = None) -> str:
        """Download URL under base_url (default: $SAMVIT_BASE_URL or the public release host)."""
        base = base_url or os.environ.get("SAMVIT_BASE_URL") or DEFAULT_BASE_URL
        return f"{base.rstrip('/')}/{self.filename}"


REGISTRY = {
    "vit_h": CheckpointEntry("vit_h", "sam_vit_h_4b8939.pth", 2_564_550_879,
                             "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", "vit_h"),
    "vit_l": CheckpointEntry("vit_l", "sam_vit_l_0b3195.pth", 1_249_524_607,
                             "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", "vit_l"),
    "vit_b": CheckpointEntry("vit_b", "sam_vit_b_01ec64.pth", 375_042_383,
                             "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", "vit_b"),
}


@dataclass(frozen=True)
class UnverifiedEntry:
    """A released checkpoint whose sha256 is not published: samvit names it but does not download it."""

    name: str
    filename: str
    url: str
    model: str


# HQ-SAM (segment-anything-hq): the files its README links to. No sha256 (nor byte size) is published for them, so
# they are not fetched unverified: a copy placed in the cache by hand is used as is.
HQ_BASE_URL = "https://huggingface.co/lkeab/hq-sam/resolve/main"
UNVERIFIED = {f"sam_hq_{m}": UnverifiedEntry(f"sam_hq_{m}", f"sam_hq_{m}.pth", f"{HQ_BASE_URL}/sam_hq_{m}.pth", m)
              for m in ("vit_b", "vit_l", "vit_h")}


def resolve_unverified(name: str, cache: Union[str, os.PathLike, None] = None) -> Optional[str]:
    """The cached file of an UNVERIFIED name (or file name); None when `name` is not one. CheckpointError, saying
    where to put it, when it is not in the cache."""
    entry = next((e for e in UNVERIFIED.values() if name in (e.name, e.filename)), None)
    if entry is None:
        return None
    dest = cache_dir(cache) / entry.filename
    if dest.is_file():
        return os.fspath(dest)
    raise CheckpointError(f"{entry.name}: no sha256 is published for {entry.filename}, so samvit does not download "
                          f"it unverified; fetch {entry.url} yourself and pass its path, or place it at {dest}")


class DownloadError(CheckpointError):
    """A registry checkpoint that could not be fetched, or whose bytes do not match the registry."""


def cache_dir(path: Union[str, os.PathLike, None] = None) -> Path:
    """The checkpoint cache folder: `path`, else $SAMVIT_CACHE, else ~/.cache/samvit."""
    return Path(path or os.environ.get("SAMVIT_CACHE") or Path.home() / ".cache" / "samvit").expanduser()


def _entry(name: str) -> CheckpointEntry:
    if name in REGISTRY:
        return REGISTRY[name]
    for e in REGISTRY.values():
        if name == e.filename:
            return e
    for u in UNVERIFIED.values():
        if name in (u.name, u.filename):
            raise DownloadError(f"{name}: no sha256 is published for {u.filename}, so samvit does not download it "
                                f"unverified; fetch {u.url} yourself and pass its path, or place it in the cache "
                                f"folder ({cache_dir()})")
    raise DownloadError(f"unknown checkpoint {name!r}; known: {', '.join(REGISTRY)}")


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def is_verified(path: Path, entry: CheckpointEntry) -> bool:
    """True when a marker written after a successful sha256 check still matches the file's size and mtime."""
    try:
        st, mark = path.stat(), json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        return False
    return mark == {"sha256": entry.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_marker(path: Path, entry: CheckpointEntry) -> None:
    st = path.stat()
    try:
        _marker(path).write_text(json.dumps({"sha256": entry.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    except OSError:  # a read-only cache: the file is simply hashed again next time
        pass


def _manual_hint(entry: CheckpointEntry, dest: Path, base_url: Optional[str]) -> str:
    return (f"To install it by hand, fetch {entry.url(DEFAULT_BASE_URL)} on a machine with access and place it at "
            f"{dest} (it is checked against sha256 {entry.sha256} on first use), or point $SAMVIT_BASE_URL / "
            f"--base-url at a mirror that has {entry.filename}.")


def verify_cached(entry: CheckpointEntry, path: Path, progress: Optional[bool] = None) -> None:
    """Check a file in the cache: size always, sha256 once (then remembered in a `.verified` marker)."""
    size = path.stat().st_size
    if size != entry.size:
        raise DownloadError(f"{path}: {size} bytes, expected {entry.size} for {entry.name}; delete it or run "
                            f"`samvit download {entry.name} --force` to fetch it again")
    if is_verified(path, entry):
        return
    digest = _sha256(path, entry, progress)
    if digest != entry.sha256:
        raise DownloadError(f"{path}: sha256 {digest} does not match {entry.sha256} for {entry.name}; the file is "
                            f"corrupt or a different checkpoint; delete it or run "
                            f"`samvit download {entry.name} --force`")
    _write_marker(path, entry)


def _sha256(path: Path, entry: CheckpointEntry, progress: Optional[bool]) -> str:
    with progress_callback(progress, f"verifying {entry.filename}", "B", total=entry.size, leave=False) as bar:
        return sha256_file(path, bar)


class _Lock:
    """An exclusive advisory lock on a file beside the download, so concurrent processes fetch it once."""

    def __init__(self, path: Path) -> None:
        self.path, self.f = path, None

    def __enter__(self) -> "_Lock":
        self.f = open(self.path, "a+b")
        try:
            import fcntl

            fcntl.flock(self.f, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no lock
            pass
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def download_checkpoint(name: str, cache: Union[str, os.PathLike, None] = None, base_url: Optional[str] = None,
                        progress: Optional[bool] = None, force: bool = False, retries: int = 5,
                        timeout: float = 60.0) -> Path:
    """Path of a registry checkpoint in the cache, downloading (resumable) and verifying it first if needed.

    Args:
        name: vit_b, vit_l, vit_h (or the release file name).
        cache: the cache folder (default $SAMVIT_CACHE, else ~/.cache/samvit).
        base_url: a mirror to fetch from (default $SAMVIT_BASE_URL, else the public release host).
        progress: download/verification bar (None: only on a terminal). force: delete and fetch again.
        retries: attempts after a dropped connection (each resumes). timeout: seconds per network read.
    Returns:
        the cached file, its size and sha256 checked against the registry.
    """
    entry = _entry(name)
    folder = cache_dir(cache)
    dest = folder / entry.filename
    if dest.exists() and not force:  # reading only: no lock, so a read-only shared cache works
        verify_cached(entry, dest, progress)
        return dest
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the checkpoint cache {folder}: {e}; set $SAMVIT_CACHE or pass "
                            f"--cache-dir") from None
    with _Lock(folder / (entry.filename + ".lock")):
        if force:
            for p in (dest, _marker(dest)):
                p.unlink(missing_ok=True)
        if dest.exists():
            verify_cached(entry, dest, progress)
            return dest
        part = dest.with_name(dest.name + ".part")
        for attempt in range(1, retries + 1):
            try:
                _fetch(entry, dest, part, base_url, progress, timeout)
                break
            except urllib.error.URLError as e:  # could not connect at all: retrying will not help
                have = part.stat().st_size if part.exists() else 0
                kept = f" {have} bytes are kept in {part}; run again to resume." if have else ""
                raise DownloadError(f"could not reach {entry.url(base_url)}: {e.reason}.{kept} "
                                    f"{_manual_hint(entry, dest, base_url)}") from None
            except (http.client.HTTPException, OSError) as e:  # dropped mid-transfer: resume from the partial file
                if attempt == retries:
                    have = part.stat().st_size if part.exists() else 0
                    raise DownloadError(f"download of {entry.name} from {entry.url(base_url)} failed {retries} "
                                        f"times (last: {e!r}); {have} bytes are kept in {part}, run again to resume. "
                                        f"{_manual_hint(entry, dest, base_url)}") from None
        digest = _sha256(part, entry, progress)
        if digest != entry.sha256:
            part.unlink()
            raise DownloadError(f"downloaded {entry.filename} from {entry.url(base_url)} has sha256 {digest}, "
                                f"expected {entry.sha256}; the partial file {part} was deleted. Run again to retry, "
                                f"or check the mirror (--base-url / $SAMVIT_BASE_URL).")
        os.replace(part, dest)
        _write_marker(dest, entry)
    return dest


def _fetch(entry: CheckpointEntry, dest: Path, part: Path, base_url: Optional[str], progress: Optional[bool],
           timeout: float) -> None:
    """Stream the file into `part`, continuing from its current length with an HTTP Range request."""
    have = part.stat().st_size if part.exists() else 0
    if have > entry.size:
        part.unlink()
        have = 0
    if have == entry.size:
        return
    req = urllib.request.Request(entry.url(base_url), headers={"User-Agent": f"samvit/{__version__}"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our partial file does not fit the server's: start over
            part.unlink()
            raise ConnectionError("server refused to resume (HTTP 416); starting over") from None
        raise DownloadError(f"could not download {entry.name} from {e.url}: HTTP {e.code} {e.reason}. "
                            f"{_manual_hint(entry, dest, base_url)}") from None
    with resp:
        status = getattr(resp, "status", None) or 200
        if have and status != 206:  # the server ignored Range: take the whole file again
            have = 0
        elif have:
            start = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
            if start != str(have):
                part.unlink()
                raise ConnectionError(f"server answered a resume with an unexpected Content-Range {start!r}")
        with open(part, "r+b" if have else "wb") as f, \
                progress_callback(progress, entry.filename, "B", total=entry.size, initial=have, leave=False) as bar:
            f.seek(have)
            f.truncate()
            while True:
                block = resp.read(CHUNK)
                if not block:
                    break
                f.write(block)
                bar(f.tell(), entry.size)
            got = f.tell()
    if got != entry.size:
        raise ConnectionError(f"connection closed after {got} of {entry.size} bytes")


def resolve_checkpoint(name_or_path: PathLike, cache: Union[str, os.PathLike, None] = None,
                       base_url: Optional[str] = None, progress: Optional[bool] = None) -> str:
    """The file a checkpoint argument names; every loader and command resolves its argument here.

    Args:
        name_or_path: an existing file (returned as is), a transformers model folder (its model.safetensors or
            pytorch_model.bin), or a registry name (vit_b, vit_l, vit_h, or their file names) fetched into the
            verified cache (downloading it if needed, from base_url / $SAMVIT_BASE_URL).
        cache, base_url, progress: as for download_checkpoint.
    Returns:
        the path of the checkpoint file.
    """
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        for name in HF_WEIGHTS:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise CheckpointError(f"{path}: a folder without {' or '.join(HF_WEIGHTS)} (sharded checkpoints are not "
                              f"supported: merge the shards into one file)")
    if os.path.exists(path) or os.sep in path or (os.altsep and os.altsep in path):
        return path
    if path in REGISTRY or any(path == e.filename for e in REGISTRY.values()):
        return os.fspath(download_checkpoint(path, cache=cache, base_url=base_url, progress=progress))
    found = resolve_unverified(path, cache)
    if found is not None:
        return found
    raise CheckpointError(f"{path}: no such checkpoint file, and not a known checkpoint name "
                          f"({', '.join(list(REGISTRY) + list(UNVERIFIED))})")


def known_sha256(path: PathLike) -> Optional[str]:
    """The sha256 of a verified cached registry file without re-reading it, else None."""
    p = Path(path)
    for e in REGISTRY.values():
        if p.name == e.filename and is_verified(p, e):
            return e.sha256
    return None


def checkpoint_sha256(path: PathLike) -> str:
    """Hex sha256 of a checkpoint file: from the cache's marker for a verified registry file, else by reading it."""
    return known_sha256(path) or sha256_file(path)
