"""OpenVINOEncoder: the image encoder run by OpenVINO on the CPU, from the float32 ONNX export (samvit embed
--backend openvino)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..errors import ParameterError
from ..modeling.encoder import ImageEncoder
from .onnx import export_onnx, float32_cpu


def _require_openvino():
    """The openvino module, or an ImportError that says how to install it."""
    try:
        import openvino
    except ImportError:
        raise ImportError("the OpenVINO backend needs the openvino package: pip install openvino") from None
    return openvino


def openvino_compile(path: str, threads: Optional[int] = None, precision: str = "f32"):
    """An ONNX file compiled by OpenVINO for the CPU, for latency (threads: None gives torch's thread count)."""
    options = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
               "INFERENCE_PRECISION_HINT": precision}
    return _require_openvino().Core().compile_model(path, "CPU", options)


class OpenVINOEncoder:
    """An encoder's function run by OpenVINO on the CPU (exported through ONNX, the reference arithmetic): called on
    (B,3,S,S) tensors like the ImageEncoder, with its config, and device / dtype for its callers (cpu, float32)."""

    def __init__(self, encoder: ImageEncoder, threads: Optional[int] = None, precision: str = "f32",
                 dynamic_batch: bool = True) -> None:
        """Args: encoder: the ImageEncoder (any dtype; exported in float32). threads: OpenVINO's inference threads
        (None: torch's thread count). precision: "f32" (the encoder's outputs within 1e-4) or "bf16".
        dynamic_batch: any batch size (else batch 1 only)."""
        import tempfile

        _require_openvino()  # before the export, which takes minutes for the large models
        if precision not in ("f32", "bf16"):
            raise ParameterError(f"precision must be 'f32' or 'bf16', got {precision!r}")
        self.config, self.device, self.dtype = encoder.config, torch.device("cpu"), torch.float32
        self.precision = precision
        with tempfile.TemporaryDirectory(prefix="samvit-openvino-") as tmp:  # OpenVINO holds the model once compiled
            path = os.path.join(tmp, "encoder.onnx")
            export_onnx(float32_cpu(encoder), path, dynamic_batch=dynamic_batch, check=False)
            self._compiled = openvino_compile(path, threads, precision)
        self._request = self._compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) normalised images -> (B, out_chans, S/16, S/16) float32 embeddings."""
        out = self._request.infer({0: x.detach().float().cpu().contiguous().numpy()})
        return torch.from_numpy(out[self._compiled.output(0)].copy())
