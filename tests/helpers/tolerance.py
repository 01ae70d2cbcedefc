"""Tolerances scaled to the tensors' magnitude, so that a comparison holds on AVX2, AVX-512 and AMX CPUs alike.

Two float computations of the same function differ by rounding: about eps(dtype) per operation, relative to the
magnitudes summed, growing like sqrt(n) over a reduction of n terms (random-walk rounding). A fixed absolute
tolerance is too tight where the values are large (a gradient of scale 243: one float32 ulp is 1.5e-5) and too
loose where they are small. Here the allowed error is

    k * eps(dtype) * max|expected| * sqrt(n)

with n the reduction length that produced the values (e.g. the tokens a weight gradient sums over) and k a
safety factor for the operations chained before it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference, in float32."""
    return (a.float() - b.float()).abs().max().item()


def scaled_atol(expected: torch.Tensor, n: int = 1, k: float = 64.0, dtype: Optional[torch.dtype] = None) -> float:
    """k * eps(dtype) * max|expected| * sqrt(n): the error two roundings of a computation may differ by."""
    eps = torch.finfo(dtype or expected.dtype).eps
    return k * eps * expected.detach().abs().max().float().item() * math.sqrt(max(1, n))


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, n: int = 1, k: float = 64.0,
                        dtype: Optional[torch.dtype] = None, msg: str = "") -> None:
    """Assert max|actual - expected| <= scaled_atol(expected, n, k, dtype), same shape, both finite."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{msg}: non-finite values"
    err, tol = max_abs(actual, expected), scaled_atol(expected, n, k, dtype)
    assert err <= tol, f"{msg}: max abs error {err:.3g} > {tol:.3g} (k={k}, n={n}, max|expected|=" \
                       f"{expected.detach().abs().max().item():.3g})"
