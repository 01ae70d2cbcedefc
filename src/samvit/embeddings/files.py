"""One embedding per file: a .safetensors holding `embedding` (C,h,w) and, in its metadata, the image sizes and
provenance (model, checkpoint sha256, samvit version, dtype, source key, source file sha256).

Where the outputs of a run go is planned before any work (plan_outputs): one file per input under the output
folder, never outside it, never over an input, never over a file this model and checkpoint did not write
unless forced."""
from __future__ import annotations

import os
import posixpath
from typing import Collection, Dict, List, Optional, Sequence, Tuple

import torch

from ..checkpoints.files import write_tensors
from ..data.sources import key_clash_message
from ..errors import InputError, MetadataError, NonFiniteError, OutputError, open_regular

MAX_SIDE = 1 << 20  # bound on an image side read from metadata (pixels)
EMBEDDING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def output_path(out_dir: str, key: str) -> str:
    """Where the embedding of the input keyed `key` goes: same relative path, suffix .safetensors. Raises
    OutputError for a key that is absolute or climbs out ('..'): keys from collect_inputs never do."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
        raise OutputError(f"key {key!r}: not a relative path inside the output folder (see "
                          "samvit.data.sources.safe_key)")
    return os.path.join(out_dir, *posixpath.splitext(key)[0].split("/")) + ".safetensors"


def _real_dest(path: str) -> str:
    """The path a write to `path` lands on: its folder resolved, the name itself kept (a file is replaced, never
    the target of a symlink)."""
    return os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def check_not_an_input(path: str, protected: Collection[str], what: str = "output") -> None:
    """Raise OutputError if writing `path` would replace one of the `protected` files (real paths)."""
    if _real_dest(path) in protected or os.path.realpath(path) in protected:
        raise OutputError(f"{path}: {what} would replace one of this run's inputs; choose another {what}")


def plan_outputs(out_dir: str, items: Sequence[Tuple[str, str]], *, model: str, checkpoint_sha256: str,
                 img_size: Optional[int] = None, protected: Collection[str] = (), force: bool = False
                 ) -> Dict[str, str]:
    """Check, before any work, where each (path, key) item's embedding goes; returns what is already done
    (key -> source file sha256: outputs this model and checkpoint wrote, at input side img_size when given,
    skipped unless force).

    Raises OutputError when two items map to one file, an output would land outside out_dir or on an input
    (the items' files and the `protected` real paths), or an output exists that this model and checkpoint did
    not write (unless force) or is a folder.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"--out {out_dir}: exists and is not a folder")
    root = os.path.realpath(out_dir)
    protected = set(protected) | {os.path.realpath(p) for p, _ in items}
    dests: Dict[str, List[str]] = {}
    for path, key in items:
        dests.setdefault(output_path(out_dir, key), []).append(path)
    clashes = {d: ps for d, ps in dests.items() if len(ps) > 1}
    if clashes:
        raise OutputError(key_clash_message(clashes, "output file", "rename one of each group, or embed them "
                                            "into a store (--store PATH), whose keys keep the file extension"))
    done: Dict[str, str] = {}
    foreign: List[str] = []
    for path, key in items:
        dest = output_path(out_dir, key)
        real = _real_dest(dest)
        if os.path.commonpath([root, real]) != root:
            raise OutputError(f"{dest}: would be written outside --out {out_dir} (a symlinked folder inside it?)")
        check_not_an_input(dest, protected, "the output of " + path)
        if os.path.isdir(dest):
            raise OutputError(f"{dest}: the output of {path} is an existing folder")
        if not os.path.lexists(dest):
            continue
        meta = _metadata_or_none(dest)
        if meta and meta.get("model") == model and meta.get("checkpoint_sha256") == checkpoint_sha256 \
                and meta.get("source_sha256") and (img_size is None or meta.get("img_size") == str(img_size)):
            if not force:
                done[key] = meta["source_sha256"]
        elif not force:
            foreign.append(dest)
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" (and {len(foreign) - 10} more)" if len(foreign) > 10 else "")
        raise OutputError(f"{len(foreign)} outputs exist that this model and checkpoint did not write (another "
                          f"model, checkpoint, input size or samvit version, or not an embedding): {shown}. Nothing was done: "
                          "pass --force to overwrite them, or choose another --out")
    return done


def _metadata_or_none(path: str) -> Optional[Dict[str, str]]:
    from safetensors import safe_open

    try:
        with open_regular(path, "embedding file"):
            pass
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # a file we cannot read is not one of ours
        return None


def save_embedding(path: str, embedding: torch.Tensor, original_size: Tuple[int, int],
                   input_size: Tuple[int, int], metadata: Dict[str, str],
                   early_features: Optional[torch.Tensor] = None) -> None:
    """Write one embedding (C,h,w) and its metadata, atomically; for HQ-SAM also the early encoder features
    (C_vit,h,w) as the `early_features` tensor (the metadata's `hq_early_block` names the block). NonFiniteError
    (nothing written) when either holds NaN or infinite values."""
    for t in (embedding, early_features):
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{path}: the embedding holds NaN or infinite values; not written")
    meta = dict(metadata, original_size=f"{original_size[0]},{original_size[1]}",
                input_size=f"{input_size[0]},{input_size[1]}")
    tensors = {"embedding": embedding}
    if early_features is not None:
        tensors["early_features"] = early_features
    write_tensors(path, tensors, meta)


def parse_size(text: object, field: str, source: str) -> Tuple[int, int]:
    """'H,W' (or a pair) from metadata -> (H, W), each 1..2**20, or MetadataError naming the file and field."""
    try:
        parts = text.split(",") if isinstance(text, str) else list(text)  # type: ignore[arg-type]
        if len(parts) != 2 or any(isinstance(p, bool) or (not isinstance(p, (str, int))) for p in parts):
            raise ValueError
        h, w = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise MetadataError(f"{source}: {field} {str(text)[:40]!r} is not two integers H,W") from None
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise MetadataError(f"{source}: {field} {(h, w)} is out of bounds (1..{MAX_SIDE} pixels a side)")
    return h, w


def parse_img_size(value: object, source: str) -> Optional[int]:
    """An `img_size` metadata value (the model input side an embedding was made at) -> int, None when absent
    (files written before it was recorded: the checkpoint's size), or MetadataError naming the source."""
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError
        size = int(value)
    except ValueError:
        raise MetadataError(f"{source}: img_size {str(value)[:40]!r} is not an integer") from None
    if not 1 <= size <= MAX_SIDE:
        raise MetadataError(f"{source}: img_size {size} is out of bounds (1..{MAX_SIDE} pixels)")
    return size


def embedding_img_size(path: str) -> Optional[int]:
    """The model input side an embedding file was made with (its `img_size` metadata), None for older files.
    InputError / MetadataError naming the file when it is not a readable embedding file."""
    return load_embedding(path)[1].get("img_size")


def load_embedding(path: str) -> Tuple[torch.Tensor, Dict[str, object]]:
    """Read an embedding file written by save_embedding: (embedding (C,h,w), metadata with int sizes).

    Raises InputError / MetadataError naming the file when it is not a regular file, not safetensors, has no
    float `embedding` tensor of 3 dimensions, or has sizes in its metadata that are not two positive integers.
    """
    emb, _, meta = load_embedding_hq(path)
    return emb, meta


def load_embedding_hq(path: str) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, object]]:
    """As load_embedding, plus HQ-SAM's early encoder features (C_vit,h,w) when the file holds them, else None."""
    from safetensors import safe_open

    path = os.fspath(path)
    with open_regular(path, "embedding file"):
        pass
    try:
        with safe_open(path, framework="pt") as f:
            meta: Dict[str, object] = dict(f.metadata() or {})
            names = list(f.keys())
            if "embedding" not in names:
                raise MetadataError(f"{path}: no 'embedding' tensor (it holds {names[:5]}); expected a file "
                                    "written by `samvit embed`")
            emb = f.get_tensor("embedding")
            early = f.get_tensor("early_features") if "early_features" in names else None
    except (InputError, MetadataError):
        raise
    except Exception as e:  # safetensors raises its own type, OSError, ValueError... for a damaged file
        raise InputError(f"{path}: not a readable embedding file ({type(e).__name__}: {e})") from None
    if emb.dtype not in EMBEDDING_DTYPES or emb.ndim != 3:
        raise MetadataError(f"{path}: 'embedding' is {emb.dtype} of shape {tuple(emb.shape)}; expected a float "
                            "tensor (C, h, w)")
    if early is not None and (early.dtype not in EMBEDDING_DTYPES or early.ndim != 3):
        raise MetadataError(f"{path}: 'early_features' is {early.dtype} of shape {tuple(early.shape)}; expected a "
                            "float tensor (C, h, w)")
    for k in ("original_size", "input_size"):
        if k in meta:
            meta[k] = parse_size(meta[k], k, path)
    if "img_size" in meta:
        meta["img_size"] = parse_img_size(meta["img_size"], path)
    return emb, early, meta
