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
import torch.nn.functional as F
from torch import nn

from .modeling.encoder import ImageEncoder
from .modeling.sam import SamDecoder
from .errors import ParameterError

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


class DecoderOnnxModel(nn.Module):
    """Prompt encoder + mask decoder + mask resizing with the official SamOnnxModel's inputs, outputs and arithmetic.

    point_coords (1,N,2) are in the model's input frame (the long side resized to 1024, as the official
    ResizeLongestSide.apply_coords gives), point_labels (1,N) float: 1 / 0 foreground / background point, 2 / 3 box
    corners, -1 padding (add one padding point when there is no box); mask_input (1,1,256,256) low-res logits used
    when has_mask_input (1,) is 1; orig_im_size (2,) float (H, W). Outputs: masks (1,M,H,W) logits at the original
    size, iou_predictions (1,M), low_res_masks (1,M,256,256); M = 4 (the single-mask output first, then the three
    multimask outputs), or 1 with return_single_mask (the official choice: mask 0 for more than one point, else the
    best of 1..3).
    """

    def __init__(self, decoder: SamDecoder, return_single_mask: bool = False) -> None:
        super().__init__()
        self.decoder = decoder
        self.img_size = decoder.config.input_image_size
        self.return_single_mask = return_single_mask

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.decoder.prompt_encoder
        emb = pe.pe_layer._pe_encoding((coords + 0.5) / self.img_size)
        labels = labels.unsqueeze(-1).expand_as(emb)
        emb = emb * (labels != -1) + pe.not_a_point_embed.weight * (labels == -1)
        for i, point_embed in enumerate(pe.point_embeddings):
            emb = emb + point_embed.weight * (labels == i)
        return emb

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.decoder.prompt_encoder
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * pe.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Upsample to the input frame, crop the padding, resize to orig_im_size (sizes read from the tensor)."""
        s = self.img_size
        masks = F.interpolate(masks, (s, s), mode="bilinear", align_corners=False)  # x4: exact in any runtime
        size = orig_im_size.to(torch.float32)
        pre = torch.floor(size * (s / size.max()) + 0.5).to(torch.int64)
        ph, pw = pre[0].item(), pre[1].item()
        torch._check(ph >= 1)
        torch._check(ph <= s)
        torch._check(pw >= 1)
        torch._check(pw <= s)
        hw = size.to(torch.int64)
        h, w = hw[0].item(), hw[1].item()
        torch._check(h >= 1)
        torch._check(w >= 1)
        masks = masks[..., :ph, :pw]
        return _resize_bilinear(_resize_bilinear(masks, w, -1), h, -2)

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor,
                mask_input: torch.Tensor, has_mask_input: torch.Tensor, orig_im_size: torch.Tensor):
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        masks, scores = self.decoder.mask_decoder.predict_masks(image_embeddings, self.decoder.prompt_encoder
                                                                .get_dense_pe(), sparse, dense)
        if self.return_single_mask:  # official select_masks: no control flow, mask 0 outweighs for > 2.5 points
            weight = torch.zeros_like(scores[:1])
            weight[:, 0] = 1000.0
            best = torch.argmax(scores + (point_coords.shape[1] - 2.5) * weight, dim=1)
            rows = torch.arange(masks.shape[0])
            masks, scores = masks[rows, best][:, None], scores[rows, best][:, None]
        return self._postprocess(masks, orig_im_size), scores, masks


def _resize_bilinear(x: torch.Tensor, size, dim: int) -> torch.Tensor:
    """F.interpolate(mode="bilinear", align_corners=False) along one axis, with PyTorch's own source coordinates.

    onnxruntime's Resize maps output pixels with (x + 0.5) / (out / in) - 0.5, PyTorch with (x + 0.5) * (in / out)
    - 0.5; in float32 the two differ by an ulp, which moves large logits by more than 1e-4 at the original size.
    Written out in plain ops, the exported graph computes PyTorch's coordinates and weights.
    """
    n_in = x.shape[dim]
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(size, dtype=torch.float32)
    src = ((torch.arange(size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.to(torch.int64).clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = (src - i0.to(torch.float32)).clamp(0, 1)
    shape = [1] * x.ndim
    shape[dim] = -1
    w1 = w1.reshape(shape)
    return x.index_select(dim, i0) * (1 - w1) + x.index_select(dim, i1) * w1


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
    from .masks.predictor import Predictor

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


def quantize_onnx_int8(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], weights: str = "uint8") -> str:
    """Dynamic int8 quantisation of an exported file's linear layers with onnxruntime; returns dst.

    Activations are uint8 (per tensor, quantised at run time); weights uint8, or signed int8 with
    weights="int8" (onnxruntime's U8S8 kernels: the fast ones on CPUs with VNNI, whose u8 x s8 products
    saturate int16 on CPUs without it). Attention, norms and convolutions stay float32.
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
        raise ParameterError(f"{path}: ONNX output shape {out.shape} differs from PyTorch {ref.shape}")
    return compare(out, ref)


def compare(out: np.ndarray, ref: np.ndarray) -> Dict[str, float]:
    """max abs, mean abs and cosine similarity of an output against a reference."""
    out, ref = np.asarray(out, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    d = np.abs(out - ref)
    cos = float(out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref) + 1e-30))
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "cosine": cos}


class OpenVINOEncoder:
    """An encoder's function run by OpenVINO on the CPU (exported through ONNX, the reference arithmetic): called on
    (B,3,S,S) tensors like the ImageEncoder, with its config, and device / dtype for its callers (cpu, float32)."""

    def __init__(self, encoder: ImageEncoder, threads: Optional[int] = None, precision: str = "f32",
                 dynamic_batch: bool = True) -> None:
        """Args: encoder: the ImageEncoder (any dtype; exported in float32). threads: OpenVINO's inference threads
        (None: torch's thread count). precision: "f32" (the encoder's outputs within 1e-4) or "bf16".
        dynamic_batch: any batch size (else batch 1 only)."""
        import tempfile

        try:
            import openvino as ov
        except ImportError:
            raise ImportError("the OpenVINO backend needs the openvino package: pip install openvino") from None
        if precision not in ("f32", "bf16"):
            raise ParameterError(f"precision must be 'f32' or 'bf16', got {precision!r}")
        self.config, self.device, self.dtype = encoder.config, torch.device("cpu"), torch.float32
        self.precision = precision
        src = encoder
        if encoder.dtype != torch.float32 or encoder.device.type != "cpu":  # export a float32 CPU copy
            src = ImageEncoder(encoder.config).eval()
            src.load_state_dict({k: v.float().cpu() for k, v in encoder.state_dict().items()})
        threads = threads or torch.get_num_threads()
        with tempfile.TemporaryDirectory(prefix="samvit-openvino-") as tmp:  # OpenVINO holds the model once compiled
            path = os.path.join(tmp, "encoder.onnx")
            export_onnx(src, path, dynamic_batch=dynamic_batch, check=False)
            self._compiled = ov.Core().compile_model(path, "CPU", {
                "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": precision})
        self._request = self._compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) normalised images -> (B, out_chans, S/16, S/16) float32 embeddings."""
        out = self._request.infer({0: x.detach().float().cpu().contiguous().numpy()})
        return torch.from_numpy(out[self._compiled.output(0)].copy())
