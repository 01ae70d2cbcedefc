"""Helpers of the hostile-input tests: the CLI in-process, file-tree snapshots, tiny checkpoints, small file
systems."""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
from typing import Dict, Iterator, List, Tuple

import numpy as np
from PIL import Image

from samvit.cli import main


def cli(argv: List[str], capsys) -> Tuple[int, str, str]:
    """Run `samvit ARGV` in this process: (exit code, stdout, stderr); never a traceback."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    return rc, out, err


def snapshot(*roots) -> Dict[str, str]:
    """{path: sha256 (or the kind of a special file)} of every file under the roots (files themselves allowed)."""
    found = {}
    for root in roots:
        root = str(root)
        paths = [root] if not os.path.isdir(root) else [os.path.join(r, f) for r, ds, fs in os.walk(root)
                                                          for f in fs + [d for d in ds if os.path.islink(
                                                              os.path.join(r, d))]]
        for p in paths:
            if os.path.islink(p) or not os.path.isfile(p):
                found[p] = "link:" + os.readlink(p) if os.path.islink(p) else "special"
            else:
                with open(p, "rb") as f:
                    found[p] = hashlib.sha256(f.read()).hexdigest()
    return found


def tiny_sam_checkpoint(path) -> str:
    """A full tiny SAM checkpoint (encoder + decoder, .safetensors with the encoder config) at path."""
    from tests.helpers import TINY
    from safetensors.torch import save_file
    from tests.test_segment_cli import _official_tiny_sam_8_heads

    sam = _official_tiny_sam_8_heads()
    save_file({k: v.contiguous() for k, v in sam.state_dict().items() if not k.startswith("pixel_")}, str(path),
              metadata={"samvit_config": TINY.to_json()})
    return str(path)


def write_image(path, h: int = 40, w: int = 60, seed: int = 0) -> str:
    """A small random RGB PNG (or whatever the suffix says) at path."""
    os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(str(path))
    return str(path)


def files_under(root) -> List[str]:
    """Sorted relative paths of the regular files under root."""
    root = str(root)
    return sorted(os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs)


@contextlib.contextmanager
def small_fs(path, size: str = "1m", readonly: bool = False) -> Iterator[str]:
    """A tmpfs of `size` mounted at path (root only); yields the path, unmounts after. Raises OSError when this
    machine does not allow mounting (the caller skips)."""
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder, leave: int) -> str:
    """Fill the file system of `folder` with one file until about `leave` bytes are free; returns its path."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    path = os.path.join(folder, "filler.bin")
    with open(path, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return path


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the block takes longer than `seconds`."""
    def handler(signum, frame):
        raise TimeoutError(f"hung for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
