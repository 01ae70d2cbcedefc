"""ONNX export of the image encoder and of the prompt decoder (torch.export-based exporter), and checks of the
files in onnxruntime."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import ParameterError
from ..modeling.encoder import ImageEncoder
from ..modeling.onnx_decoder import DecoderOnnxModel
from ..modeling.sam import SamDecoder

DEFAULT_OPSET = MIN_OPSET = 18  # the torch.export-based exporter's own opset; older ones fail its converter
# A protobuf message cannot exceed 2 GiB; weights above this (leaving room for the graph) go to a side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
INPUT_NAME, OUTPUT_NAME = "image", "embedding"
# The official SAM ONNX decoder's interface (segment_anything/utils/onnx.py, scripts/export_onnx_model.py).
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def needs_external_data(encoder: torch.nn.Module) -> bool:
    """Whether the weights are too big for one protobuf file (True for vit_h, False for vit_b and vit_l)."""
    return parameter_bytes(encoder) > EXTERNAL_DATA_THRESHOLD


def float32_cpu(encoder: ImageEncoder) -> ImageEncoder:
    """The encoder itself when it is float32 on the CPU, else a float32 CPU copy (what the exporters read)."""
    if encoder.dtype == torch.float32 and encoder.device.type == "cpu":
        return encoder
    src = ImageEncoder(encoder.config).eval()
    src.load_state_dict({k: v.float().cpu() for k, v in encoder.state_dict().items()})
    return src


def _require_exporter() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the exporter's backend)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx and onnxscript packages ({e}); "
                          "install them with `pip install samvit[onnx]`") from None


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
    _require_exporter()
    import onnx

    if not isinstance(encoder, ImageEncoder):
        raise TypeError(f"export_onnx expects a samvit ImageEncoder, got {type(encoder).__name__}")
    dtypes = {p.dtype for p in encoder.parameters()}
    if dtypes != {torch.float32}:
        raise ParameterError(f"export_onnx exports float32 weights; the encoder holds {sorted(map(str, dtypes))} "
                             "(load it with dtype=torch.float32)")
    if opset < MIN_OPSET:
        raise ParameterError(f"opset {opset} is not supported: the exporter writes opset {MIN_OPSET} or later")
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
        raise ParameterError(f"opset {opset} could not be produced (the exporter gave opset {got})")
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


def export_decoder_onnx(decoder: SamDecoder, path: Union[str, os.PathLike], opset: int = DEFAULT_OPSET,
                        return_single_mask: bool = False, check: bool = True) -> str:
    """Export a float32 prompt encoder + mask decoder with the official SAM ONNX decoder's interface; returns path.

    Inputs image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size; outputs masks,
    iou_predictions, low_res_masks (see DecoderOnnxModel). The number of points and orig_im_size are dynamic, so
    existing SAM web front-ends (the official demo, CVAT's SAM plugin) can load the file.
    """
    _require_exporter()
    import onnx

    if not isinstance(decoder, SamDecoder):
        raise TypeError(f"export_decoder_onnx expects a samvit SamDecoder (samvit.load_decoder), got "
                        f"{type(decoder).__name__}")
    if decoder.is_hq:
        raise ValueError("export_decoder_onnx exports SAM's mask decoder; HQ-SAM's (which also takes the encoder's "
                         "early features) is not supported")
    dtypes = {p.dtype for p in decoder.parameters()}
    if dtypes != {torch.float32}:
        raise ParameterError("export_decoder_onnx exports float32 weights; the decoder holds "
                             f"{sorted(map(str, dtypes))}")
    if opset < MIN_OPSET:
        raise ParameterError(f"opset {opset} is not supported: the exporter writes opset {MIN_OPSET} or later")
    path = os.fspath(path)
    c = decoder.config
    device = next(decoder.parameters()).device
    g = torch.Generator().manual_seed(0)
    mask_hw = decoder.prompt_encoder.mask_input_size
    # The official script's example inputs: 5 points, labels -1..3, an image of 1500x2250.
    example = (torch.randn(1, c.embed_dim, c.image_embedding_size, c.image_embedding_size, generator=g),
               torch.rand(1, 5, 2, generator=g) * c.input_image_size,
               torch.tensor([[1.0, 0.0, 2.0, 3.0, -1.0]]),
               torch.randn(1, 1, *mask_hw, generator=g),
               torch.tensor([1.0]),
               torch.tensor([1500.0, 2250.0]))
    example = tuple(t.to(device) for t in example)
    points = torch.export.Dim("num_points")
    dynamic_shapes = {"image_embeddings": None, "point_coords": {1: points}, "point_labels": {1: points},
                      "mask_input": None, "has_mask_input": None, "orig_im_size": None}
    training = decoder.training
    model = DecoderOnnxModel(decoder.eval(), return_single_mask)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, example, None, input_names=list(DECODER_INPUTS),
                                        output_names=list(DECODER_OUTPUTS), opset_version=opset, dynamo=True,
                                        dynamic_shapes=dynamic_shapes, verbose=False)
    finally:
        decoder.train(training)
    got = program.model.opset_imports.get("")
    if got != opset:
        raise ParameterError(f"opset {opset} could not be produced (the exporter gave opset {got})")
    program.model.producer_name = "samvit"
    program.model.metadata_props.update({"samvit_decoder_config": json.dumps(dataclasses.asdict(c), sort_keys=True),
                                         "return_single_mask": str(return_single_mask).lower()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    program.save(path, external_data=False)
    if check:
        onnx.checker.check_model(path, full_check=False)
    return path


@torch.no_grad()
def verify_decoder_onnx(decoder: SamDecoder, path: Union[str, os.PathLike], original_size: Tuple[int, int] = (600, 900),
                        seed: int = 0, threads: Optional[int] = None) -> Dict[str, float]:
    """Run the decoder file and samvit's Predictor on a random embedding, two points and a box; the worst max abs
    difference over masks (logits at original_size), IoU predictions and low-res logits, and their cosine."""
    from ..masks.predictor import Predictor

    c = decoder.config
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, c.embed_dim, c.image_embedding_size, c.image_embedding_size, generator=g)
    predictor = Predictor(None, decoder)
    predictor.set_embedding(emb, original_size)
    h, w = original_size
    points = np.array([[0.3 * w, 0.4 * h], [0.7 * w, 0.6 * h]])
    labels = np.array([1, 0])
    box = np.array([0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h])
    scale = np.array([predictor.input_size[1] / w, predictor.input_size[0] / h])
    coords = np.concatenate([points, box.reshape(2, 2)]) * scale  # the official ResizeLongestSide.apply_coords
    feeds = {"image_embeddings": emb.numpy(), "point_coords": coords[None].astype(np.float32),
             "point_labels": np.array([[1, 0, 2, 3]], np.float32),
             "mask_input": np.zeros((1, 1, *decoder.prompt_encoder.mask_input_size), np.float32),
             "has_mask_input": np.zeros(1, np.float32), "orig_im_size": np.array(original_size, np.float32)}
    masks, iou, low = onnx_session(path, threads).run(None, feeds)
    if masks.shape[1] == 1:
        raise ParameterError(f"{path}: a single-mask file (return_single_mask); verify the four-mask export instead")
    worst = {"max_abs": 0.0, "mean_abs": 0.0, "cosine": 1.0}
    for multimask, sl in ((False, slice(0, 1)), (True, slice(1, None))):
        ref = predictor.predict(points, labels, box, multimask_output=multimask, return_logits=True)
        for out, r in zip((masks[0, sl], iou[0, sl], low[0, sl]), ref):
            d = compare(out, r)
            worst = {"max_abs": max(worst["max_abs"], d["max_abs"]), "mean_abs": max(worst["mean_abs"], d["mean_abs"]),
                     "cosine": min(worst["cosine"], d["cosine"])}
    return worst


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
        raise ParameterError(f"{path}: ONNX output shape {out.shape} differs from PyTorch {ref.shape}")
    return compare(out, ref)


def compare(out: np.ndarray, ref: np.ndarray) -> Dict[str, float]:
    """max abs, mean abs and cosine similarity of an output against a reference."""
    out, ref = np.asarray(out, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    d = np.abs(out - ref)
    cos = float(out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref) + 1e-30))
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "cosine": cos}
