"""Scratch buffers reused across blocks and calls, so that an inference forward allocates (almost) nothing big.

glibc's default allocator serves every block over 32 MiB with fresh zeroed pages from the kernel and returns it on
free: millions of page faults per ViT-B forward (docs/speed.md). The encoder's inference path writes its large
intermediates (qkv, windows, attention bias chunks and outputs, the MLP's hidden layer) into these buffers instead,
so it runs as fast in a plain `python` process as with the allocator tuned.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch


class Workspace:
    """Named buffers, grown when a larger one is asked for and kept until release(); one per thread and encoder.

    Each user takes its own namespace with scope("user") (the inference runner, each kernel), so that two users
    never share a buffer by choosing the same name.
    """

    def __init__(self, buffers: Dict[str, torch.Tensor] | None = None, prefix: str = "") -> None:
        self.buffers: Dict[str, torch.Tensor] = {} if buffers is None else buffers
        self.prefix = prefix

    def scope(self, name: str) -> "Workspace":
        """A view of the same buffers whose names are prefixed with `name.` (a namespace for one user)."""
        return Workspace(self.buffers, f"{self.prefix}{name}.")

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous tensor of `shape` backed by the buffer `name` (valid until its next get)."""
        n = 1
        for s in shape:
            n *= int(s)
        name = self.prefix + name
        buf = self.buffers.get(name)
        if (buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device
                or buf.is_inference() != torch.is_inference_mode_enabled()):
            buf = torch.empty(n, dtype=dtype, device=device)
            self.buffers[name] = buf
        return buf[:n].view(*shape)

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def release(self) -> None:
        """Free every buffer."""
        self.buffers.clear()
