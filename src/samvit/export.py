"""ONNX export of the image encoder (torch.export-based exporter), and a check of the file in onnxruntime."""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Union

import numpy as np
import torch

from .modeling.encoder import ImageEncoder

DEFAULT_OPSET = MIN_OPSET = 18  # the torch.export-based exporter's own opset; older ones fail its converter
# A protobuf message cannot exceed 2 GiB; weights above this (leaving room for the graph) go to a side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
INPUT_NAME, OUTPUT_NAME = "image", "embedding"


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def needs_external_data(encoder: torch.nn.Module) -> bool:
    """Whether the weights are too big for one protobuf file (True for vit_h, False for vit_b and vit_l)."""
    return parameter_bytes(encoder) > EXTERNAL_DATA_THRESHOLD


def export_onnx(encoder: ImageEncoder, path: Union[str, os.PathLike], opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, external_data: Optional[bool] = None, check: bool = True) -> str:
    """Export a float32 encoder to an ONNX file: input `image` (B,3,S,S), output `embedding`.

    The reference kernel is exported (plain ops; the SDPA kernel does not trace with a dynamic batch), and the
    encoder's own kernel is restored afterwards.

    Args:
        encoder: a float32 ImageEncoder. path: the .onnx file to write. opset: 18 or later.
        dynamic_batch: the batch size as a dynamic axis (else fixed to 1).
        external_data: weights in one side file `<path>.data`; None: only when they exceed ~1.8 GB (vit_h).
        check: run onnx.checker on the written file.
    Returns:
        the path written.
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter's backend)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx and onnxscript packages ({e}); "
                          "install them with `pip install samvit[onnx]`") from None
    if not isinstance(encoder, ImageEncoder):
        raise TypeError(f"export_onnx expects a samvit ImageEncoder, got {type(encoder).__name__}")
    dtypes = {p.dtype for p in encoder.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"export_onnx exports float32 weights; the encoder holds {sorted(map(str, dtypes))} "
                         "(load it with dtype=torch.float32)")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is not supported: the exporter writes opset {MIN_OPSET} or later")
    path = os.fspath(path)
    if external_data is None:
        external_data = needs_external_data(encoder)
    cfg = encoder.config
    device = encoder.device
    # torch.export specialises a dimension whose example size is 1, so a dynamic batch is traced with 2.
    example = torch.zeros(2 if dynamic_batch else 1, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    dynamic_shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    kernel, training = encoder.kernel, encoder.training
    encoder.set_kernel("reference").eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(encoder, (example,), None, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], opset_version=opset, dynamo=True,
                                        dynamic_shapes=dynamic_shapes, verbose=False)
    finally:
        encoder.set_kernel(kernel).train(training)
    got = program.model.opset_imports.get("")
    if got != opset:
        raise ValueError(f"opset {opset} could not be produced (the exporter gave opset {got})")
    program.model.producer_name = "samvit"
    program.model.metadata_props.update({"samvit_config": cfg.to_json(), "model": cfg.name})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data_path = path + ".data"
    if os.path.exists(data_path):
        os.remove(data_path)  # a stale side file from an earlier export would otherwise be left beside the new one
    program.save(path, external_data=external_data)
    if check:
        onnx.checker.check_model(path, full_check=False)  # path-based: follows external data, no 2 GiB limit
    return path


def quantize_onnx_int8(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], weights: str = "uint8") -> str:
    """Dynamic int8 quantisation of an exported file's linear layers with onnxruntime; returns dst.

    Activations are uint8 (per tensor, quantised at run time); weights uint8, or signed int8 with
    weights="int8" (onnxruntime's U8S8 kernels: the fast ones on CPUs with VNNI, whose u8 x s8 products
    saturate int16 on CPUs without it). Attention, norms and convolutions stay float32.
    """
    if weights not in ("uint8", "int8"):
        raise ValueError(f"weights must be 'uint8' or 'int8', got {weights!r}")
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
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8 if weights == "int8" else QuantType.QUInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
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
    import tempfile

    path = os.fspath(path)
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(path + ".data"):
        os.remove(path + ".data")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        fp32 = export_onnx(encoder, os.path.join(tmp, "fp32.onnx"), opset=opset, dynamic_batch=dynamic_batch)
        return quantize_onnx_int8(fp32, path, weights)


def onnx_session(path: Union[str, os.PathLike], threads: Optional[int] = None, arena: bool = True):
    """An onnxruntime CPU InferenceSession for an exported file (threads: intra-op threads, default all).

    arena=False returns activations to malloc after each run instead of keeping them in onnxruntime's own pool.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("running an ONNX file needs onnxruntime; install it with `pip install samvit[onnx]`") from None
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    # Busy-waiting worker threads cost more than they save when the cores are shared.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def verify_onnx(encoder: ImageEncoder, path: Union[str, os.PathLike], batch: int = 1, seed: int = 0,
                threads: Optional[int] = None) -> Dict[str, float]:
    """Run the ONNX file and the PyTorch encoder on one random input; max and mean abs difference, cosine."""
    cfg = encoder.config
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(seed))
    device = next(encoder.parameters()).device
    ref = encoder(x.to(device)).float().cpu().numpy()
    out = onnx_session(path, threads).run(None, {INPUT_NAME: x.numpy()})[0]
    if out.shape != ref.shape:
        raise ValueError(f"{path}: ONNX output shape {out.shape} differs from PyTorch {ref.shape}")
    return compare(out, ref)


def compare(out: np.ndarray, ref: np.ndarray) -> Dict[str, float]:
    """max abs, mean abs and cosine similarity of an output against a reference."""
    out, ref = np.asarray(out, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    d = np.abs(out - ref)
    cos = float(out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref) + 1e-30))
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "cosine": cos}
