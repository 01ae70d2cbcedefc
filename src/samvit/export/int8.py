"""int8 encoders for the CPU (VNNI / AMX-INT8) and the measures that decide whether int8 may be offered: the
embedding's cosine to float32 and the agreement of the masks a decoder makes from int8 and float32 embeddings.

- quantize_onnx_int8 / export_onnx_int8: an exported file's linear layers dynamically quantised by onnxruntime
  (`samvit export onnx --int8`).
- Int8Encoder: the encoder exported to ONNX, its linear layers quantised by quantize_onnx_int8 (activations uint8
  per tensor at run time, weights int8 or uint8; attention, norms and convolutions stay float32), run by
  onnxruntime or by OpenVINO reading the same file.
- torch_dynamic_int8: torch.ao's quantize_dynamic of every nn.Linear (x86 engine), on the reference path.
- mask_agreement: IoU of the decoder's masks from two embeddings of the same image with the same prompts.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import ParameterError
from ..runtime import cpu_features
from ..masks.automatic import mask_iou
from ..modeling.encoder import ImageEncoder
from ..modeling.sam import SamDecoder
from .onnx import DEFAULT_OPSET, export_onnx, float32_cpu, onnx_session
from .openvino import openvino_compile

BACKENDS = ("onnxruntime", "openvino")


def quantize_onnx_int8(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], weights: str = "uint8",
                       reduce_range: Optional[bool] = None) -> str:
    """Dynamic int8 quantisation of an exported file's linear layers with onnxruntime; returns dst.

    Activations are uint8 (per tensor, quantised at run time); weights uint8, or signed int8 with
    weights="int8" (onnxruntime's U8S8 kernels: the fast ones on CPUs with VNNI, whose u8 x s8 products
    saturate int16 on CPUs without it). reduce_range (default: on where this CPU has no VNNI) quantises the
    weights to 7 bits, onnxruntime's advice against that saturation: on an AVX2-only CPU a random ViT's embedding
    had cosine 0.990 to float32 without it. Attention, norms and convolutions stay float32.
    """
    if weights not in ("uint8", "int8"):
        raise ParameterError(f"weights must be 'uint8' or 'int8', got {weights!r}")
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ImportError("int8 export needs onnxruntime; install it with `pip install samvit[onnx]`") from None
    import logging

    src, dst = os.fspath(src), os.fspath(dst)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs advice about pre-processing on the root logger
    try:
        if reduce_range is None:
            reduce_range = not cpu_features()["avx512_vnni"]
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8 if weights == "int8" else QuantType.QUInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], reduce_range=reduce_range)
    finally:
        root.setLevel(level)
    return dst


def export_onnx_int8(encoder: ImageEncoder, path: Union[str, os.PathLike], opset: int = DEFAULT_OPSET,
                     dynamic_batch: bool = True, weights: str = "uint8") -> str:
    """Export the encoder and quantise its linear layers to int8 (quantize_onnx_int8) into one file; returns it.

    The float32 export goes to a temporary folder beside `path` (it may be large) and is removed afterwards; an
    int8 file is always written whole (vit_h: about 0.65 GB), so a side file left by an earlier float32 export
    to the same name is removed. weights: "uint8" or "int8" (see quantize_onnx_int8).
    """
    path = os.fspath(path)
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(path + ".data"):
        os.remove(path + ".data")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        fp32 = export_onnx(encoder, os.path.join(tmp, "fp32.onnx"), opset=opset, dynamic_batch=dynamic_batch)
        return quantize_onnx_int8(fp32, path, weights)


class Int8Encoder:
    """An encoder's function with int8 linear layers on the CPU: called on (B,3,S,S) float images like the
    ImageEncoder, returns float32 embeddings; `config`, `device`, `dtype` (cpu, float32) for its callers."""

    def __init__(self, encoder: ImageEncoder, backend: str = "onnxruntime", weights: str = "int8",
                 threads: Optional[int] = None) -> None:
        """Args: encoder: the ImageEncoder (exported in float32). backend: "onnxruntime" or "openvino" (both run
        the same quantised ONNX file). weights: "int8" (the U8S8 kernels that use VNNI / AMX) or "uint8".
        threads: inference threads (None: torch's thread count)."""
        if backend not in BACKENDS:
            raise ValueError(f"Int8Encoder: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.config, self.device, self.dtype = encoder.config, torch.device("cpu"), torch.float32
        self.backend, self.weights = backend, weights
        threads = threads or torch.get_num_threads()
        with tempfile.TemporaryDirectory(prefix="samvit-int8-") as tmp:  # the runtimes hold the model once loaded
            fp32 = export_onnx(float32_cpu(encoder), os.path.join(tmp, "fp32.onnx"), dynamic_batch=False, check=False)
            path = quantize_onnx_int8(fp32, os.path.join(tmp, "int8.onnx"), weights)
            if backend == "onnxruntime":
                sess = onnx_session(path, threads)
                name = sess.get_inputs()[0].name
                self._run = lambda x: sess.run(None, {name: x})[0]
            else:
                compiled = openvino_compile(path, threads)
                request = compiled.create_infer_request()
                self._run = lambda x: request.infer({0: x})[compiled.output(0)].copy()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) normalised images -> (B, out_chans, S/16, S/16) float32 embeddings (one image at a time)."""
        x = x.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(np.concatenate([self._run(x[i:i + 1]) for i in range(x.shape[0])]))


def torch_dynamic_int8(encoder: ImageEncoder) -> torch.nn.Module:
    """A float32 copy of the encoder with every nn.Linear dynamically quantised by torch.ao (qint8 weights; the
    x86 engine's VNNI kernels), on the reference path (the fast path reads float weights)."""
    from torch.ao.quantization import quantize_dynamic

    src = ImageEncoder(encoder.config, kernel="reference").eval()
    src.load_state_dict({k: v.float().cpu() for k, v in encoder.state_dict().items()})
    return quantize_dynamic(src, {torch.nn.Linear}, dtype=torch.qint8)


def grid_prompts(img_size: int, n: int = 4) -> torch.Tensor:
    """n x n single foreground points on a regular grid over the encoder's input frame: (n*n, 1, 2) (x, y)."""
    c = (torch.arange(n, dtype=torch.float32) + 0.5) * img_size / n
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], -1)[:, None, :]


@torch.no_grad()
def mask_agreement(decoder: SamDecoder, emb: torch.Tensor, emb_ref: torch.Tensor,
                   points: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """IoU of the low-resolution masks (logits > 0) the decoder makes from `emb` and from `emb_ref` (1,C,h,w), one
    single-point prompt per row of `points` (P,1,2), the 3 multimask outputs: per-mask IoU (list), their mean and min,
    and the number of masks empty in both (IoU 1)."""
    if emb.shape != emb_ref.shape or emb.dim() != 4 or emb.shape[0] != 1:
        raise ValueError(f"mask_agreement: two (1,C,h,w) embeddings of the same shape expected; got "
                         f"{tuple(emb.shape)} and {tuple(emb_ref.shape)}")
    if points is None:
        points = grid_prompts(decoder.config.input_image_size)
    labels = torch.ones(points.shape[:2], dtype=torch.int64)
    masks = []
    for e in (emb, emb_ref):
        logits, _ = decoder(e.float(), (points, labels))  # (P, M, 4h, 4w)
        masks.append(logits > 0)
    a, b = masks
    ious = mask_iou(a, b).flatten().tolist()
    empty = ~(a | b).flatten(2).any(-1)
    return {"iou": ious, "mean_iou": float(np.mean(ious)), "min_iou": float(np.min(ious)),
            "both_empty": int(empty.sum()), "masks": len(ious),
            "fraction_ge_0.98": float(np.mean([i >= 0.98 for i in ious]))}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def summarise(ious: Sequence[Dict[str, object]]) -> Dict[str, float]:
    """Pool mask_agreement results (e.g. over images): mean and min IoU, fraction of masks with IoU >= 0.98."""
    allv: List[float] = [v for r in ious for v in r["iou"]]  # type: ignore[union-attr]
    return {"mean_iou": float(np.mean(allv)), "min_iou": float(np.min(allv)),
            "fraction_ge_0.98": float(np.mean([v >= 0.98 for v in allv])), "masks": len(allv)}
