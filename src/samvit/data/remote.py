"""Object storage through fsspec: URLs (s3://, gs://, az://, ...) as inputs and as store locations.

Credentials and endpoints come from each backend's standard environment (for S3: AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION / AWS_DEFAULT_REGION, AWS_PROFILE, ...); extra fsspec
options can be given as JSON in SAMVIT_STORAGE_OPTIONS. Transient errors are retried by the backend's client
(S3: botocore's "standard" retry mode with up to 10 attempts); a conditional create that already succeeded on a
lost response is recognised (create_object).
"""
from __future__ import annotations

import copy
import json
import os
import posixpath
import re
from typing import Any, Dict, List, Tuple

from ..errors import InputError

URL = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
S3_RETRIES = {"retries": {"max_attempts": 10, "mode": "standard"}}


def is_url(path: object) -> bool:
    """True for an object-storage URL ('s3://bucket/key'); False for local paths, including 'file://'."""
    if not isinstance(path, str):
        return False
    m = URL.match(path)
    return bool(m) and m.group(1).lower() not in ("file", "local")


def storage_options(url: str) -> Dict[str, Any]:
    """fsspec options for a URL: retries for S3, plus the JSON object in SAMVIT_STORAGE_OPTIONS when set."""
    opts: Dict[str, Any] = {}
    scheme = URL.match(url).group(1).lower() if URL.match(url) else ""
    if scheme in ("s3", "s3a"):
        opts["config_kwargs"] = copy.deepcopy(S3_RETRIES)  # botocore rewrites the retries dict it is given
    extra = os.environ.get("SAMVIT_STORAGE_OPTIONS")
    if extra:
        try:
            parsed = json.loads(extra)
            if not isinstance(parsed, dict):
                raise ValueError
        except ValueError:
            raise InputError("SAMVIT_STORAGE_OPTIONS: expected a JSON object of fsspec options") from None
        opts.update(parsed)
    return opts


def filesystem(url: str) -> Tuple[Any, str]:
    """(fsspec filesystem, path without the scheme) of a URL. InputError naming the URL when its backend is not
    installed (s3:// needs s3fs: pip install samvit[s3])."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise InputError(f"{url}: object storage needs fsspec (pip install samvit[s3])") from None
    try:
        fs, path = url_to_fs(url, **storage_options(url))
    except ImportError as e:
        raise InputError(f"{url}: no fsspec backend for this scheme is installed ({e}); for s3:// install "
                         "samvit[s3]") from None
    except ValueError as e:
        raise InputError(f"{url}: not a usable object-storage URL ({e})") from None
    if os.environ.get("SAMVIT_STORAGE_OPTIONS") and "s3" in _protocols(fs):
        try:  # s3fs makes its client at the first request: check the user's options now (no request is made)
            fs.connect()
        except TypeError as e:
            raise InputError(f"{url}: SAMVIT_STORAGE_OPTIONS holds an option that s3fs does not take ({e})") from None
    return fs, path.rstrip("/")


def _protocols(fs: Any) -> Tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def join(url: str, *parts: str) -> str:
    """url/part/part (object keys always use '/')."""
    return "/".join([url.rstrip("/"), *parts])


def read_bytes(url: str, limit: int = 1 << 34) -> bytes:
    """The whole object at a URL; InputError naming it when it is missing, not readable or over `limit` bytes."""
    fs, path = filesystem(url)
    try:
        size = fs.size(path)
        if size is not None and size > limit:
            raise InputError(f"{url}: {size} bytes is over the limit of {limit}")
        return fs.cat_file(path)
    except FileNotFoundError:
        raise InputError(f"{url}: no such object") from None
    except (OSError, PermissionError) as e:
        raise InputError(f"{url}: cannot read ({type(e).__name__}: {e})") from None


def create_object(fs: Any, path: str, data: bytes) -> None:
    """Write a new object that must not exist yet: a conditional create (S3 If-None-Match: *) where the backend
    offers one, else an existence check then a write (safe for names that only one writer ever uses).

    Raises FileExistsError when another writer created it first. A create whose first attempt succeeded but whose
    answer was lost (the retry then sees the object) counts as success when the object holds exactly `data`."""
    try:
        fs.pipe_file(path, data, mode="create")
        return
    except FileExistsError:
        try:
            if fs.cat_file(path) == data:
                return  # our own earlier attempt
        except OSError:
            pass
        raise
    except TypeError:  # this backend's pipe_file takes no mode: no conditional create
        pass
    if fs.exists(path):
        raise FileExistsError(path)
    fs.pipe_file(path, data)


def list_objects(url: str, extensions: Tuple[str, ...]) -> List[Tuple[str, str]]:
    """(url, key) of the objects under a URL prefix ('s3://bucket/photos/') or matching a glob, whose names end
    with one of `extensions`; keys are relative to the prefix (a glob: to its part before the first wildcard).
    A URL naming one object gives it, keyed by its name. FileNotFoundError when nothing is there."""
    fs, path = filesystem(url)
    scheme = URL.match(url).group(0)
    fs.invalidate_cache()
    if any(c in path for c in "*?["):
        root = re.split(r"[*?\[]", path, 1)[0].rpartition("/")[0]
        found = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isfile(path) and not url.endswith("/"):
        return [(url, posixpath.basename(path))]
    else:
        root = path
        found = fs.find(path)
    out = []
    for p in sorted(found):
        if p.lower().endswith(extensions):
            out.append((scheme + p, posixpath.relpath(p, root) if root else p))
    if not out and not found and not fs.exists(path):
        raise FileNotFoundError(f"input {url!r}: no such object, prefix or matching glob")
    return out
