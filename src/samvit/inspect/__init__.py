"""Inspection of the encoder: attention maps per head, mean attention distance and entropy, feature PCA, and
their pictures (matplotlib, only when a plot_* function is used: `pip install 'samvit[inspect]'`).

Attention is recomputed outside the model, block by block and chunk by chunk (see capture.py): the encoder's
normal forward path is untouched.
"""
from __future__ import annotations

import importlib

from .capture import AttentionResult, BlockAttention, attention, pixel_to_token
from .distance import CSV_COLUMNS, DistanceResult, attention_distance, window_diameter_px
from .pca import PCAResult, feature_pca

_PLOTS = ("plot_attention", "plot_distance", "plot_pca", "uniform_mean_distance")

__all__ = ["attention", "attention_distance", "feature_pca", "pixel_to_token", "window_diameter_px",
           "AttentionResult", "BlockAttention", "DistanceResult", "PCAResult", "CSV_COLUMNS", *_PLOTS]


def __getattr__(name: str):
    if name in _PLOTS:
        return getattr(importlib.import_module(".plots", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
