"""Helpers for the mask tests: decoder weights whose random outputs are informative, weight transfer to samvit."""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def liven_decoder_(sam: nn.Module, gain: float = 2.0, iou_offset: float = 4.0) -> nn.Module:
    """Rescale an (already randomised) official Sam's prompt encoder and mask decoder weights in place.

    conftest.randomize_ draws weights with std 0.02, so every layer of the small decoder shrinks its input about
    tenfold: the mask logits come out ~1e-2, nearly constant, and nearly the same for every prompt, which makes
    threshold and filter comparisons vacuous. Scaling each weight to std gain/sqrt(fan_in) gives logits of a few
    units that depend on the prompt; iou_offset moves the predicted IoUs (about -3 +- 1) into a range where an
    IoU threshold keeps some masks and drops others.
    """
    for mod in list(sam.mask_decoder.modules()) + list(sam.prompt_encoder.modules()):
        if isinstance(mod, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            fan_in = mod.weight.shape[0] if isinstance(mod, nn.ConvTranspose2d) else mod.weight[0].numel()
            mod.weight.mul_(gain / (mod.weight.std().item() * math.sqrt(fan_in)))
    sam.mask_decoder.iou_prediction_head.layers[-1].bias.add_(iou_offset)
    return sam


def samvit_models(sam: nn.Module, cfg, num_heads: int = 8, attn_impl: str = "reference"):
    """samvit ImageEncoder (config cfg) and SamDecoder holding the same weights as an official Sam.

    The encoder uses the reference attention (bit-identical to the official) so that mask comparisons test the
    prompt path alone; the fast path is compared separately.
    """
    from samvit.checkpoints.load import infer_decoder_config, load_decoder
    from samvit.modeling.encoder import ImageEncoder

    sd = sam.state_dict()
    encoder = ImageEncoder(cfg, attn_impl=attn_impl).eval()
    encoder.load_state_dict({k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")})
    decoder = load_decoder(sd, infer_decoder_config(sd).replace(num_heads=num_heads))
    return encoder, decoder
