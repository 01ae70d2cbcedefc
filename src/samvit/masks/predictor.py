"""Predictor: one image's embedding plus point / box / mask prompts -> masks (the official SamPredictor workflow).

Prompts are in original-image pixels (x right, y down; the image covers [0, W] x [0, H]), in predict and
predict_torch alike. (The official predict_torch expects coordinates already resized to the model's input frame.)
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import numpy as np
import torch

from ..checkpoints.load import _load_sam, check_hq_fits, hq_early_block
from ..config import EncoderConfig
from ..errors import NonFiniteError, ProvenanceError
from ..data.images import ImageInput, load_image
from ..data.preprocess import get_preprocess_shape, postprocess_masks, prepare, to_input_frame
from ..modeling.attention import DEFAULT_KERNEL
from ..modeling.encoder import ImageEncoder
from ..modeling.mask_decoder_hq import encode_hq
from ..modeling.sam import SamDecoder
from ..runtime import DtypeArg
from .prompts import ArrayLike, PromptError, as_tensor, check_boxes, check_points


class Predictor:
    """Masks from prompts on one image at a time; set_image (needs an encoder) or set_embedding, then predict."""

    mask_threshold: float = 0.0

    def __init__(self, encoder: Optional[ImageEncoder], decoder: SamDecoder) -> None:
        dc = decoder.config
        if encoder is not None:
            ec = encoder.config
            if ec.out_chans != dc.embed_dim or ec.grid_size != dc.image_embedding_size or ec.img_size != dc.input_image_size:
                raise ValueError(f"encoder ({ec.out_chans} channels, {ec.grid_size}x{ec.grid_size} grid, input "
                                 f"{ec.img_size}) does not fit the decoder ({dc.embed_dim} channels, "
                                 f"{dc.image_embedding_size} grid, input {dc.input_image_size})")
            check_hq_fits(ec, dc, "the encoder")
        self.encoder = encoder
        # HQ-SAM: the encoder block whose output the decoder also takes (None: plain SAM, or not known without an
        # encoder); embeddings for it carry that block's output as `early_features`
        self.early_block: Optional[int] = hq_early_block(encoder.config) if encoder is not None and decoder.is_hq \
            else None
        self.decoder = decoder.eval()
        self.img_size = dc.input_image_size
        self.model_name: Optional[str] = encoder.config.name if encoder is not None else None
        self.checkpoint_path: Optional[str] = None  # set by from_checkpoint: embeddings are checked against it
        self._checkpoint_sha256: Optional[str] = None
        self.reset_image()

    @classmethod
    def from_checkpoint(cls, checkpoint: Union[str, os.PathLike], model: Union[str, EncoderConfig, None] = None,
                        device: Union[str, torch.device, None] = None, dtype: DtypeArg = None,
                        with_encoder: bool = True, kernel: str = DEFAULT_KERNEL, progress: Optional[bool] = None,
                        attn_impl: Optional[str] = None, img_size: Optional[int] = None) -> "Predictor":
        """Encoder and decoder from one full SAM checkpoint, read once (samvit.checkpoints.load.load_sam).

        Args:
            checkpoint: a file (official .pth, transformers SamModel, .safetensors), a transformers folder, or a
                registry name (vit_b, vit_l, vit_h) fetched into the verified cache.
            model: preset name or EncoderConfig; inferred when omitted.
            device: for both models. dtype: the encoder's compute dtype (None: float32, the default; "auto":
                bfloat16 where the device computes it natively, else float32; or a dtype); the decoder is cheap and stays float32.
            with_encoder: False skips the encoder: use set_embedding.
            kernel: the encoder's attention kernel (attn_impl: its former name, wins when given).
            progress: download/verification bar (None: only on a terminal).
            img_size: the model's input side (e.g. 512, 768, 1280); the encoder's position tables and the
                decoder's embedding grid follow it. None: the checkpoint's (1024).
        """
        encoder, decoder, cfg, source = _load_sam(checkpoint, model, device, dtype, with_encoder, attn_impl or kernel,
                                                  progress, img_size)
        predictor = cls(encoder, decoder)
        predictor.model_name = cfg.name if cfg is not None else None
        if cfg is not None and decoder.is_hq:
            predictor.early_block = hq_early_block(cfg)
        predictor.checkpoint_path = source if isinstance(checkpoint, (str, os.PathLike)) else None
        return predictor

    @property
    def checkpoint_sha256(self) -> Optional[str]:
        """sha256 of the checkpoint file this predictor was loaded from (computed once, on first use), or None."""
        if self._checkpoint_sha256 is None and self.checkpoint_path is not None:
            from ..checkpoints.registry import checkpoint_sha256

            self._checkpoint_sha256 = checkpoint_sha256(self.checkpoint_path)
        return self._checkpoint_sha256

    def check_provenance(self, metadata: dict, source: str = "embedding") -> None:
        """Raise ProvenanceError unless an embedding's metadata (model, checkpoint_sha256, as written by `samvit
        embed`) names this predictor's model and checkpoint; a field either side does not know is not compared."""
        diffs = []
        theirs = metadata.get("model")
        if theirs and self.model_name and theirs != self.model_name:
            diffs.append(f"model {theirs!r} vs {self.model_name!r}")
        theirs = metadata.get("checkpoint_sha256")
        if theirs and self.checkpoint_path is not None and theirs != self.checkpoint_sha256:
            diffs.append(f"checkpoint sha256 {str(theirs)[:12]}... vs {self.checkpoint_sha256[:12]}... "
                         f"({self.checkpoint_path})")
        if diffs:
            raise ProvenanceError(f"{source} was made by another model than this one ({'; '.join(diffs)}): its "
                                  "masks would be meaningless. Embed the image again with this checkpoint, or pass "
                                  "--allow-mismatch (allow_mismatch=True) if the weights are known to be the same")

    # ---- image state ----

    @property
    def device(self) -> torch.device:
        return self.decoder.mask_decoder.iou_token.weight.device

    @property
    def is_hq(self) -> bool:
        """True for an HQ-SAM checkpoint: its decoder also takes the encoder's early features (see set_embedding)
        and predict's hq_token_only applies."""
        return self.decoder.is_hq

    def reset_image(self) -> None:
        """Forget the current image."""
        self.features: Optional[torch.Tensor] = None
        self.early_features: Optional[torch.Tensor] = None  # HQ-SAM: (1,C_vit,h,w) output of encoder block early_block
        self.original_size: Optional[Tuple[int, int]] = None
        self.input_size: Optional[Tuple[int, int]] = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    @torch.inference_mode()
    def set_image(self, image: ImageInput, image_format: str = "RGB") -> None:
        """Preprocess an image (path, PIL image or HxWx3 array) as the official code does and embed it."""
        if self.encoder is None:
            raise RuntimeError("this Predictor has no image encoder: use set_embedding(...), or build it with one")
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        rgb = load_image(image)
        if image_format == "BGR":
            rgb = np.ascontiguousarray(rgb[..., ::-1])
        prepared = prepare(rgb, self.img_size)
        x = prepared.tensor[None].to(device=self.encoder.device, dtype=self.encoder.dtype)
        if self.is_hq:
            emb, early = encode_hq(self.encoder, x, self.early_block)
            self.set_embedding(emb[0], prepared.original_size, prepared.input_size, early_features=early)
        else:
            self.set_embedding(self.encoder(x)[0], prepared.original_size, prepared.input_size)

    def set_embedding(self, embedding: Union[torch.Tensor, str, os.PathLike], original_size: Optional[Tuple[int, int]] = None,
                      input_size: Optional[Tuple[int, int]] = None, metadata: Optional[dict] = None,
                      allow_mismatch: bool = False, source: str = "embedding",
                      early_features: Optional[torch.Tensor] = None) -> None:
        """Use a precomputed embedding (C,h,w) or (1,C,h,w), or a file written by samvit.embed.save_embedding.

        original_size is the (H, W) of the image it came from (read from the file when a path is given);
        input_size defaults to the official long-side resize of original_size. The metadata of a file (or the
        `metadata` given, e.g. EmbeddingStore.metadata(key)) must name this predictor's model and checkpoint
        (ProvenanceError otherwise, unless allow_mismatch) and its input size, img_size, when it records one
        (ProvenanceError otherwise, always); NaN or infinite values raise NonFiniteError.
        HQ-SAM also needs `early_features` (C_vit,h,w) or (1,C_vit,h,w), the output of encoder block early_block
        (read from the file when a path is given); a plain SAM predictor refuses them (ProvenanceError).
        """
        if isinstance(embedding, (str, os.PathLike)):
            from ..embeddings.files import load_embedding_hq

            source = os.fspath(embedding)
            embedding, early, meta = load_embedding_hq(source)
            early_features = early if early_features is None else early_features
            original_size = original_size or meta.get("original_size")
            input_size = input_size or meta.get("input_size")
            metadata = meta if metadata is None else metadata
        if not isinstance(embedding, torch.Tensor):
            raise TypeError(f"embedding: expected a torch.Tensor or a path, got {type(embedding).__name__}")
        if metadata is not None:
            from ..embeddings.files import parse_img_size

            made = parse_img_size(metadata.get("img_size"), source)
            if made is not None and made != self.img_size:
                raise ProvenanceError(f"{source} was made at input size {made}, this predictor's model takes "
                                      f"{self.img_size} (pass img_size={made})")
            if not allow_mismatch:
                self.check_provenance(metadata, source)
        c = self.decoder.config
        emb = _one_map(embedding, c.embed_dim, c.image_embedding_size, "embedding", source)
        early = self._check_early(early_features, metadata, source)
        if original_size is None:
            raise ValueError("original_size (H, W) of the embedded image is needed")
        original_size = (int(original_size[0]), int(original_size[1]))
        if min(original_size) < 1:
            raise ValueError(f"original_size must be positive, got {original_size}")
        expected = get_preprocess_shape(*original_size, self.img_size)
        input_size = expected if input_size is None else (int(input_size[0]), int(input_size[1]))
        if input_size != expected:
            raise ProvenanceError(f"{source}: input_size {input_size} does not match original_size {original_size} "
                                  f"(this model's resize to long side {self.img_size} gives {expected}): it was made "
                                  "for another input size")
        w = self.decoder.mask_decoder.iou_token.weight
        self.features = emb.detach().to(device=w.device, dtype=w.dtype)
        self.early_features = None if early is None else early.detach().to(device=w.device, dtype=w.dtype)
        self.original_size, self.input_size = original_size, input_size

    def _check_early(self, early: Optional[torch.Tensor], metadata: Optional[dict], source: str
                     ) -> Optional[torch.Tensor]:
        """The early features as (1,C_vit,h,w) for HQ-SAM, None for SAM; ProvenanceError when an embedding was made
        for the other kind of decoder."""
        block = (metadata or {}).get("hq_early_block")
        if not self.is_hq:
            if early is not None or block is not None:
                raise ProvenanceError(f"{source} was made for HQ-SAM (it holds the encoder's early features); this "
                                      "predictor is plain SAM: use the HQ-SAM checkpoint it was made with")
            return None
        if early is None:
            raise ProvenanceError(f"{source} holds no early encoder features: it was made for plain SAM, but this "
                                  "predictor is HQ-SAM, whose decoder also needs the output of the encoder's first "
                                  "global-attention block; embed the image again with the HQ-SAM checkpoint")
        if block is not None and self.early_block is not None and str(block) != str(self.early_block):
            raise ProvenanceError(f"{source}: its early features are the output of encoder block {block}; this "
                                  f"HQ-SAM model takes block {self.early_block}")
        if not isinstance(early, torch.Tensor):
            raise TypeError(f"early_features: expected a torch.Tensor, got {type(early).__name__}")
        c = self.decoder.config
        return _one_map(early, c.hq_vit_dim, c.image_embedding_size, "early features", source)

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding, (1,C,h,w)."""
        self.require_image()
        return self.features

    def require_image(self) -> None:
        """Raise RuntimeError unless an image or embedding is set."""
        if self.features is None:
            raise RuntimeError("no image set: call set_image(...) or set_embedding(...) before predicting")

    # ---- prompts ----

    def to_input_frame(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) original-image (x, y) of the current image -> the model's input frame, float32, on device."""
        self.require_image()
        return to_input_frame(coords, self.original_size, self.input_size, self.device)

    def _prepare(self, point_coords, point_labels, boxes, mask_input, batched: bool):
        """Validate prompts (original pixels) and map them to the model's input frame."""
        self.require_image()
        if point_coords is None and point_labels is not None:
            raise PromptError("point_labels given without point_coords")
        if point_coords is None and boxes is None and mask_input is None:
            raise PromptError("no prompt: give point_coords and point_labels, a box, or a mask_input")
        lead = "B, " if batched else ""
        sizes = {}
        points = None
        if point_coords is not None:
            if point_labels is None:
                raise PromptError("point_labels must be given with point_coords (1 = foreground, 0 = background)")
            coords = as_tensor(point_coords, "point_coords")
            labels = as_tensor(point_labels, "point_labels")
            nd = 3 if batched else 2
            if coords.ndim != nd or coords.shape[-1] != 2:
                raise PromptError(f"point_coords: expected shape ({lead}N, 2) of (x, y), got {tuple(coords.shape)}")
            if labels.shape != coords.shape[:-1]:
                raise PromptError(f"point_labels: expected shape {tuple(coords.shape[:-1])} (one label per point), "
                                  f"got {tuple(labels.shape)}")
            if labels.is_floating_point() and (labels != labels.round()).any():
                raise PromptError(f"point_labels must be integers 0 or 1, got {labels.flatten()[:5].tolist()}")
            labels = labels.long()
            check_points(coords.reshape(-1, 2), labels.reshape(-1), self.original_size, allow_padding=batched)
            if not batched:
                coords, labels = coords[None], labels[None]
            if coords.shape[1] == 0:
                raise PromptError("point_coords: no points given (shape with N = 0)")
            points = (self.to_input_frame(coords), labels.to(device=self.device, dtype=torch.int32))
            sizes["point_coords"] = coords.shape[0]
        box_t = None
        if boxes is not None:
            box_t = as_tensor(boxes, "box")
            if batched and (box_t.ndim != 2 or box_t.shape[-1] != 4):
                raise PromptError(f"boxes: expected shape (B, 4) of x0, y0, x1, y1, got {tuple(box_t.shape)}")
            if not batched:
                if box_t.shape not in ((4,), (1, 4)):
                    raise PromptError(f"box: expected 4 numbers x0, y0, x1, y1 (shape (4,) or (1, 4)), got shape "
                                      f"{tuple(box_t.shape)}; use predict_torch for many boxes")
                box_t = box_t.reshape(1, 4)
            check_boxes(box_t, self.original_size)
            box_t = self.to_input_frame(box_t.reshape(-1, 2, 2)).reshape(-1, 4)
            sizes["boxes"] = box_t.shape[0]
        mask_t = None
        if mask_input is not None:
            mask_t = as_tensor(mask_input, "mask_input", torch.float32)
            hw = self.decoder.prompt_encoder.mask_input_size
            want = (1, *hw)
            if not batched and mask_t.shape == hw:
                mask_t = mask_t[None]
            if mask_t.ndim != (4 if batched else 3) or tuple(mask_t.shape[-3:]) != want:
                raise PromptError(f"mask_input: expected shape ({lead}1, {hw[0]}, {hw[1]}) of low-res logits (as "
                                  f"returned by predict), got {tuple(mask_t.shape)}")
            mask_t = (mask_t if batched else mask_t[None]).to(self.device)
            sizes["mask_input"] = mask_t.shape[0]
        if len(set(sizes.values())) > 1:
            raise PromptError(f"prompt batch sizes differ: {sizes}")
        return points, box_t, mask_t

    # ---- prediction ----

    @torch.inference_mode()
    def decode(self, points: Optional[Tuple[torch.Tensor, torch.Tensor]], boxes: Optional[torch.Tensor],
               masks: Optional[torch.Tensor], multimask_output: bool, hq_token_only: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts already in the input frame (see to_input_frame), unchecked -> (low-res logits float32
        (B,M,4h,4w), IoU predictions (B,M)) for the current image (HQ-SAM: M = 1, see MaskDecoderHQ)."""
        self._check_hq_token_only(hq_token_only)
        if self.is_hq:
            low, iou = self.decoder(self.features, points, boxes, masks, multimask_output,
                                    early_features=self.early_features, hq_token_only=hq_token_only)
        else:
            low, iou = self.decoder(self.features, points, boxes, masks, multimask_output)
        if not (torch.isfinite(low).all() and torch.isfinite(iou).all()):
            raise NonFiniteError("the mask decoder gave NaN or infinite values (damaged decoder weights?)")
        return low.float(), iou.float()

    @torch.inference_mode()
    def postprocess_masks(self, low_res: torch.Tensor) -> torch.Tensor:
        """(B,M,4h,4w) logits -> (B,M,H,W) logits at the original size: upsample, crop the padding, resize."""
        return postprocess_masks(low_res, self.input_size, self.original_size, self.img_size)

    def predict(self, point_coords: Optional[ArrayLike] = None, point_labels: Optional[ArrayLike] = None,
                box: Optional[ArrayLike] = None, mask_input: Optional[ArrayLike] = None, multimask_output: bool = True,
                return_logits: bool = False, hq_token_only: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt: N points (N,2) with labels (N,), a box (4,), a low-res mask (1,256,256) -> numpy
        (masks (M,H,W) bool or logits, IoU predictions (M,), low-res logits (M,256,256)); M = 3 or 1.

        HQ-SAM (as the official SamPredictor of segment-anything-hq): M = 1, the HQ token's mask alone with
        hq_token_only, else the SAM mask (the best of 3 with multimask_output) plus the HQ mask.
        """
        self._check_hq_token_only(hq_token_only)
        points, boxes, masks = self._prepare(point_coords, point_labels, box, mask_input, batched=False)
        out = self._predict(points, boxes, masks, multimask_output, return_logits, hq_token_only)
        return tuple(t[0].cpu().numpy() for t in out)

    def predict_torch(self, point_coords: Optional[ArrayLike] = None, point_labels: Optional[ArrayLike] = None,
                      boxes: Optional[ArrayLike] = None, mask_input: Optional[ArrayLike] = None,
                      multimask_output: bool = True, return_logits: bool = False, hq_token_only: bool = False
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """B prompts at once: points (B,N,2) with labels (B,N) (-1 = padding), boxes (B,4), masks (B,1,256,256) ->
        (masks (B,M,H,W), IoU (B,M), low-res logits (B,M,256,256)) as tensors on the predictor's device
        (hq_token_only: as predict)."""
        self._check_hq_token_only(hq_token_only)
        points, box_t, mask_t = self._prepare(point_coords, point_labels, boxes, mask_input, batched=True)
        return self._predict(points, box_t, mask_t, multimask_output, return_logits, hq_token_only)

    def _check_hq_token_only(self, hq_token_only: bool) -> None:
        if hq_token_only and not self.is_hq:
            raise PromptError("hq_token_only applies to HQ-SAM checkpoints only; this predictor is plain SAM")

    def _predict(self, points, boxes, masks, multimask_output, return_logits, hq_token_only=False):
        low, iou = self.decode(points, boxes, masks, multimask_output, hq_token_only)
        full = self.postprocess_masks(low)
        return (full if return_logits else full > self.mask_threshold), iou, low


def _one_map(t: torch.Tensor, channels: int, size: int, what: str, source: str) -> torch.Tensor:
    """t as (1, channels, size, size): ProvenanceError for another shape (made for another model), NonFiniteError
    for NaN or infinite values."""
    m = t[None] if t.ndim == 3 else t
    if tuple(m.shape) != (1, channels, size, size):
        raise ProvenanceError(f"{source}: {what} of shape {tuple(t.shape)}; expected shape {(channels, size, size)} "
                              "(or with a leading 1) for this model")
    if not torch.isfinite(m).all():
        raise NonFiniteError(f"{source}: {what}: NaN or infinite values")
    return m
