"""SamDecoder (the prompt encoder and the mask decoder together) and Sam (image encoder + prompt encoder + mask
decoder, the whole trainable model), under the official checkpoint key names."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from ..config import DecoderConfig, EncoderConfig
from .encoder import ImageEncoder
from .mask_decoder import MaskDecoder
from .mask_decoder_hq import MaskDecoderHQ
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer
from ..errors import ParameterError


class SamDecoder(nn.Module):
    """Prompt encoder + mask decoder; state dict keys equal the official `prompt_encoder.*` / `mask_decoder.*`."""

    def __init__(self, config: DecoderConfig = DecoderConfig()) -> None:
        super().__init__()
        c = config
        self.config = c
        self.prompt_encoder = PromptEncoder(c.embed_dim, (c.image_embedding_size,) * 2, (c.input_image_size,) * 2,
                                            c.mask_in_chans)
        transformer = TwoWayTransformer(c.depth, c.embed_dim, c.num_heads, c.mlp_dim)
        if c.hq_vit_dim:  # HQ-SAM
            self.mask_decoder = MaskDecoderHQ(c.embed_dim, transformer, c.num_multimask_outputs, c.iou_head_depth,
                                              c.iou_head_hidden_dim, c.hq_vit_dim)
        else:
            self.mask_decoder = MaskDecoder(c.embed_dim, transformer, c.num_multimask_outputs, c.iou_head_depth,
                                            c.iou_head_hidden_dim)

    @property
    def is_hq(self) -> bool:
        """True for HQ-SAM's mask decoder (it also takes the encoder's early features)."""
        return self.config.hq_vit_dim > 0

    def dense_pe(self) -> Tensor:
        """The image embedding's position encoding (1,C,h,w) in the module's dtype."""
        return self.prompt_encoder.get_dense_pe().to(self.mask_decoder.iou_token.weight.dtype)

    def forward(self, image_embeddings: Tensor, points: Optional[Tuple[Tensor, Tensor]] = None,
                boxes: Optional[Tensor] = None, masks: Optional[Tensor] = None,
                multimask_output: bool = True, early_features: Optional[Tensor] = None,
                hq_token_only: bool = False) -> Tuple[Tensor, Tensor]:
        """One image's embedding (1,C,h,w) and B prompts in the input frame -> (B,M,4h,4w) logits, (B,M) IoU.

        HQ-SAM also takes the early encoder features (1,hq_vit_dim,h,w) and gives M = 1 (see MaskDecoderHQ).
        """
        w = self.mask_decoder.iou_token.weight
        sparse, dense = self.prompt_encoder(points, boxes, masks)
        if self.is_hq:
            if early_features is None:
                raise ParameterError("HQ-SAM's decoder needs the encoder's early features (early_features=...)")
            return self.mask_decoder(image_embeddings.to(w.dtype), self.dense_pe(), sparse, dense, multimask_output,
                                     hq_token_only, early_features.to(w.dtype))
        return self.mask_decoder(image_embeddings.to(w.dtype), self.dense_pe(), sparse, dense, multimask_output)


class Sam(nn.Module):
    """Image encoder + prompt encoder + mask decoder; state_dict keys are exactly the official segment-anything
    `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*` keys.

    A training step runs as one forward (see forward's `session`), so that DDP and FSDP2 see one pass per backward.
    """

    def __init__(self, image_encoder: ImageEncoder, decoder: SamDecoder) -> None:
        super().__init__()
        enc, dec = image_encoder.config, decoder.config
        if decoder.is_hq:
            raise ParameterError("Sam (the trainable model) takes SAM's mask decoder; HQ-SAM's is for inference only "
                             "(samvit.Predictor)")
        if enc.out_chans != dec.embed_dim or enc.grid_size != dec.image_embedding_size or \
                enc.img_size != dec.input_image_size:
            raise ParameterError(f"encoder ({enc.out_chans} channels, {enc.grid_size}x{enc.grid_size} grid, input "
                                 f"{enc.img_size}) does not fit the decoder ({dec.embed_dim} channels, "
                                 f"{dec.image_embedding_size} grid, input {dec.input_image_size})")
        self.image_encoder = image_encoder
        self.prompt_encoder = decoder.prompt_encoder
        self.mask_decoder = decoder.mask_decoder
        self.decoder_config = dec
        self.layer_decay = 1.0  # layer-wise lr decay of the encoder (lr_scales), set by the training task

    @property
    def config(self) -> EncoderConfig:
        """The image encoder's config (what the model is called by: vit_b, vit_l, ...)."""
        return self.image_encoder.config

    @property
    def img_size(self) -> int:
        return self.image_encoder.config.img_size

    @property
    def low_res_size(self) -> int:
        """Side of the low-res mask logits (256 for a 1024 input)."""
        return 4 * self.decoder_config.image_embedding_size

    def forward(self, images: Optional[Tensor] = None, *, image_embeddings: Optional[Tensor] = None,
                points: Optional[Tuple[Tensor, Tensor]] = None, boxes: Optional[Tensor] = None,
                mask_inputs: Optional[Tensor] = None, session: Optional[Callable[[Tensor, Callable], Any]] = None):
        """Three calls:
        - `model(images=x)`: normalised padded images (B,3,S,S) -> embeddings (B,C,h,w);
        - `model(image_embeddings=e, points=..., boxes=..., mask_inputs=...)`: see decode;
        - `model(images=x or image_embeddings=e, session=fn)`: fn(embeddings, self.decode) inside this one call
          (a training step's interactive rounds: DDP and FSDP2 expect one forward per backward) -> what fn returns.
        """
        if session is not None:
            if (images is None) == (image_embeddings is None):
                raise ParameterError("Sam.forward(session=...): give images or image_embeddings")
            return session(self.image_encoder(images) if images is not None else image_embeddings, self.decode)
        if images is not None:
            if image_embeddings is not None or points is not None or boxes is not None or mask_inputs is not None:
                raise ParameterError("Sam.forward: give images alone (to embed them) or image_embeddings with prompts")
            return self.image_encoder(images)
        if image_embeddings is None:
            raise ParameterError("Sam.forward: give images or image_embeddings")
        return self.decode(image_embeddings, points, boxes, mask_inputs)

    def decode(self, image_embeddings: Tensor, points: Optional[Tuple[Tensor, Tensor]] = None,
               boxes: Optional[Tensor] = None, mask_inputs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """N embeddings (N,C,h,w) with N prompts in the input frame (points (N,n,2) + labels (N,n), boxes (N,4),
        low-res logits (N,1,4h,4w)) -> (logits (N,M,4h,4w), IoU predictions (N,M)) of every mask token (M = 4: the
        single-mask output first, then the 3 multimask outputs)."""
        w = self.mask_decoder.iou_token.weight
        sparse, dense = self.prompt_encoder(points, boxes, mask_inputs)
        pe = self.prompt_encoder.get_dense_pe().to(w.dtype)
        masks, iou = self.mask_decoder.predict_masks(image_embeddings.to(w.dtype), pe, sparse, dense)
        if self.training and torch.is_grad_enabled():
            # A call uses some prompt embeddings only (no box corners without boxes, no mask embedding without a
            # mask input); DDP needs a gradient for every trainable parameter in every step, so the rest take
            # part with weight zero (their gradient is exactly 0).
            unused = [p.sum() for p in self.prompt_encoder.parameters() if p.requires_grad]
            if unused:
                iou = iou + 0.0 * torch.stack(unused).sum().to(iou.dtype)
        return masks, iou

    def as_decoder(self) -> SamDecoder:
        """A SamDecoder sharing this model's prompt encoder and mask decoder (the same modules, not copies): with
        image_encoder, what a Predictor takes (validation during training)."""
        dec = SamDecoder.__new__(SamDecoder)
        nn.Module.__init__(dec)
        dec.config, dec.prompt_encoder, dec.mask_decoder = self.decoder_config, self.prompt_encoder, self.mask_decoder
        return dec

    # ---- training hooks (used by samvit.train.loop) ----

    def set_grad_checkpointing(self, enable: bool = True) -> "Sam":
        """Activation checkpointing of the image encoder's blocks."""
        self.image_encoder.set_grad_checkpointing(enable)
        return self

    def fsdp_units(self) -> List[nn.Module]:
        """What FSDP2 shards one by one: each encoder block, then the rest with the root."""
        return self.image_encoder.block_list()

    def no_weight_decay(self) -> Set[str]:
        """Parameters without weight decay besides norms and biases: position tables and learned tokens."""
        names = {"image_encoder.pos_embed", "prompt_encoder.not_a_point_embed.weight",
                 "prompt_encoder.no_mask_embed.weight", "mask_decoder.iou_token.weight",
                 "mask_decoder.mask_tokens.weight"}
        names |= {f"prompt_encoder.point_embeddings.{i}.weight"
                  for i in range(len(self.prompt_encoder.point_embeddings))}
        names |= {n for n, _ in self.named_parameters() if n.endswith(("rel_pos_h", "rel_pos_w", "attention_biases"))}
        return names

    def layer_id(self, name: str) -> int:
        """Depth of a parameter for layer-wise lr decay: the encoder's layer_id for its own (0 the patch embedding,
        i + 1 encoder block i), depth + 1 everything after the encoder (prompt encoder, mask decoder)."""
        if name.startswith("image_encoder."):
            return self.image_encoder.layer_id(name[len("image_encoder."):])
        return len(self.image_encoder.block_list()) + 1

    def lr_scales(self) -> Dict[str, float]:
        """name -> lr multiplier: layer_decay ** (depth + 1 - layer_id), as BEiT/MAE fine-tuning (1: no decay)."""
        top = len(self.image_encoder.block_list()) + 1
        return {n: self.layer_decay ** (top - self.layer_id(n)) for n, _ in self.named_parameters()}
