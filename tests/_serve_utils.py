"""Helpers for the service tests: a tiny full SAM checkpoint at 1024 (256-channel embeddings, as CVAT expects), test
images, and a real uvicorn server on a free loopback port."""
from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from functools import partial
from typing import Iterator

import numpy as np
import torch
from PIL import Image, PngImagePlugin

import samvit
from tests.helpers import randomize_
from tests._masks_utils import liven_decoder_

# 1024 input and a 256-channel neck give the real (1, 256, 64, 64) embedding; width 64 and 2 blocks keep it cheap.
TINY_1024 = samvit.EncoderConfig(img_size=1024, embed_dim=64, depth=2, num_heads=2, window_size=14,
                                 global_attn_indexes=(1,), out_chans=256, name="tiny1024")


def official_tiny_sam_1024(seed: int = 0, gain: float = 2.0):
    """An official segment-anything Sam with TINY_1024's encoder and a small decoder (8 heads, as every released
    model, so samvit infers the same decoder), random weights scaled so masks depend on the prompt (see
    _masks_utils.liven_decoder_; the gain sets the logits' size)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    c = TINY_1024
    enc = ImageEncoderViT(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                          num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, out_chans=c.out_chans, qkv_bias=True,
                          norm_layer=partial(torch.nn.LayerNorm, eps=c.norm_eps), use_abs_pos=True, use_rel_pos=True,
                          window_size=c.window_size, global_attn_indexes=c.global_attn_indexes)
    sam = Sam(image_encoder=enc,
              prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                           mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                  depth=2, embedding_dim=256, mlp_dim=64, num_heads=8), transformer_dim=256, iou_head_depth=3,
                  iou_head_hidden_dim=64))
    torch.manual_seed(seed)
    randomize_(sam, seed)
    return liven_decoder_(sam, gain=gain).eval()


def save_full_checkpoint(sam, path) -> str:
    """The whole Sam as safetensors (official key names) with TINY_1024 in the metadata: no --model needed."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(path),
              metadata={"samvit_config": TINY_1024.to_json()})
    return str(path)


def object_image(h: int = 240, w: int = 320, seed: int = 0) -> np.ndarray:
    """A dark, slightly noisy background with one bright orange disc (the object) right of centre."""
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 60, size=(h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - OBJECT[1] * h) ** 2 + (xx - OBJECT[0] * w) ** 2 <= (OBJECT[2] * min(h, w)) ** 2
    img[disc] = (240, 150, 40)
    return img


OBJECT = (0.6, 0.5, 0.25)  # disc centre (x, y) and radius, as fractions of the width / height / short side


def png_bytes(rgb: np.ndarray, tag: str = "") -> bytes:
    """PNG file bytes; a different tag gives a different file (another content hash) with the same pixels."""
    info = PngImagePlugin.PngInfo()
    if tag:
        info.add_text("tag", tag)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, timeout: float = 30.0) -> Iterator[str]:
    """Serve an app from create_app with uvicorn on 127.0.0.1 in a thread, with the settings `samvit serve` uses
    (its protocol: header timeout, connection cap); yields the base URL; stops it afterwards."""
    import uvicorn

    from samvit.serve.server import uvicorn_config

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
