"""samvit.export.int8: int8 encoders stay close to float32; mask agreement measures what it says."""
import importlib.util

import pytest
import torch

import samvit
from samvit.export import Int8Encoder, cosine, grid_prompts, mask_agreement, summarise, torch_dynamic_int8

TINY = samvit.EncoderConfig(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,),
                            out_chans=16, name="tiny")


@pytest.fixture(scope="module")
def encoder_and_input():
    torch.manual_seed(0)
    enc = samvit.ImageEncoder(TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return enc, x, enc(x)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_onnxruntime_int8_close_to_float32(encoder_and_input):
    enc, x, ref = encoder_and_input
    q = Int8Encoder(enc, "onnxruntime", "int8", threads=1)
    out = q(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert 0.999 < cosine(out, ref) < 1.0  # quantised (not the float32 graph), and close
    with pytest.raises(ValueError, match="backend must be one of"):
        Int8Encoder(enc, "tensorrt")


def test_torch_dynamic_int8_close_to_float32(encoder_and_input):
    enc, x, ref = encoder_and_input
    q = torch_dynamic_int8(enc)
    assert any("quantized" in type(m).__module__ for m in q.modules())
    with torch.no_grad():
        out = q(x)
    assert 0.999 < cosine(out, ref) < 1.0


def test_mask_agreement():
    """Identical embeddings agree fully; a large perturbation lowers the IoU; shapes are checked."""
    torch.manual_seed(0)
    dec = samvit.SamDecoder(samvit.DecoderConfig(image_embedding_size=8, input_image_size=128)).eval()
    emb = torch.randn(1, 256, 8, 8)
    pts = grid_prompts(128, 2)
    assert pts.shape == (4, 1, 2) and pts.min() > 0 and pts.max() < 128
    same = mask_agreement(dec, emb, emb.clone(), pts)
    assert same["masks"] == 12 and same["min_iou"] == 1.0
    other = mask_agreement(dec, emb, torch.randn(1, 256, 8, 8), pts)
    assert other["mean_iou"] < 1.0
    pooled = summarise([same, other])
    assert pooled["masks"] == 24 and pooled["min_iou"] == other["min_iou"]
    with pytest.raises(ValueError, match="embeddings of the same shape"):
        mask_agreement(dec, emb, emb[..., :4], pts)
