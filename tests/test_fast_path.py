"""The fast attention path against the official segment-anything encoder and our reference path (same random
weights): float32 parity over odd sizes, windows and batches, the window/padding shortcuts, bias chunking,
bfloat16 end to end, and the float16 policy."""

import pytest
import torch
from tests.helpers import assert_close_scaled, official_tiny_sam

import samvit
from samvit.modeling.attention import (Attention, attention_inputs, from_windows, to_window_heads, to_windows,
                                      window_partition, window_unpartition)
from samvit.modeling.kernels import _chunking
from samvit.modeling.encoder import check_float16

BASE = dict(embed_dim=64, depth=3, num_heads=4, out_chans=32)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _pair(cfg: samvit.EncoderConfig, seed: int = 0):
    """The official encoder with random weights and a samvit ImageEncoder holding the same weights."""
    official = official_tiny_sam(cfg, seed=seed).image_encoder
    enc = samvit.ImageEncoder(cfg)
    enc.load_state_dict(official.state_dict())
    return official, enc.eval()


@pytest.mark.parametrize("img_size,window,globals_,batch", [
    (256, 4, (1,), 2),     # grid 16, windows divide it
    (320, 6, (1,), 3),     # grid 20: padded to 24
    (512, 14, (2,), 1),    # grid 32: padded to 42 (as vit_* at 512)
    (160, 14, (0,), 1),    # window larger than the grid 10
    (224, 14, (), 2),      # grid 14 == window, no global block
    (208, 5, (0, 1, 2), 1),  # every block global
])
def test_fast_and_reference_match_official(img_size, window, globals_, batch):
    cfg = samvit.EncoderConfig(img_size=img_size, window_size=window, global_attn_indexes=globals_, **BASE)
    official, enc = _pair(cfg, seed=img_size)
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = official(x)
        assert ref.abs().mean() > 0.1
        assert_close_scaled(enc.set_attention("fast")(x), ref, n=cfg.embed_dim)
        assert torch.equal(enc.set_attention("reference")(x), ref)  # the oracle: bit-identical


@pytest.mark.parametrize("change", [dict(use_rel_pos=False), dict(use_abs_pos=False), dict(qkv_bias=False),
                                    dict(num_heads=1), dict(out_chans=None)])
def test_config_variants_match_reference(change):
    cfg = samvit.EncoderConfig(img_size=192, window_size=5, global_attn_indexes=(1,), **dict(BASE, **change))
    torch.manual_seed(3)
    enc = samvit.ImageEncoder(cfg).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 192, 192)
    with torch.inference_mode():
        assert_close_scaled(enc.set_attention("fast")(x), enc.set_attention("reference")(x), n=cfg.embed_dim)


def test_fast_path_batch_equals_one_at_a_time():
    cfg = samvit.EncoderConfig(img_size=256, window_size=6, global_attn_indexes=(1,), **BASE)
    _, enc = _pair(cfg, seed=7)
    x = torch.randn(4, 3, 256, 256)
    with torch.inference_mode():
        batched = enc(x)
        for i in range(4):
            assert_close_scaled(batched[i], enc(x[i:i + 1])[0], n=cfg.embed_dim)


@pytest.mark.parametrize("hw,ws", [((14, 14), 14), ((10, 17), 4), ((3, 5), 7), ((8, 8), 3)])
def test_window_helpers_equal_partition(hw, ws):
    x = torch.randn(2, *hw, 6)
    fill = torch.randn(6)
    padded = torch.cat([x, fill.expand(2, hw[0], -(-hw[1] // ws) * ws - hw[1], 6)], 2)
    padded = torch.cat([padded, fill.expand(2, -(-hw[0] // ws) * ws - hw[0], padded.shape[2], 6)], 1)
    windows, pad_hw = window_partition(padded, ws)
    ours = to_windows(x, ws, fill)
    assert torch.equal(ours.reshape(windows.shape), windows)
    assert torch.equal(from_windows(ours, hw), window_unpartition(windows, ws, pad_hw, hw))
    assert from_windows(ours, hw).is_contiguous()


@pytest.mark.parametrize("hw,ws", [((14, 14), 14), ((10, 17), 4), ((3, 5), 7)])
def test_window_heads_is_windows_then_head_major(hw, ws):
    """to_window_heads (the one copy of the inference path) = to_windows, then attention_inputs' head-major copy."""
    heads, d = 2, 3
    qkv = torch.randn(2, *hw, 3 * heads * d)
    fill = torch.randn(3 * heads * d)
    windows = to_windows(qkv, ws, fill).view(-1, ws * ws, 3 * heads * d)
    two = attention_inputs(windows, (ws, ws), heads, 1.0)
    one = to_window_heads(qkv, ws, heads, fill).view(3, -1, ws * ws, d)
    for a, b in zip((two.q, two.k, two.v), one.unbind(0)):
        assert torch.equal(a, b)


def test_windowed_attention_skips_padding_exactly():
    """qkv of a zero (padded) token is exactly the qkv bias, so qkv before partition gives the same result."""
    torch.manual_seed(0)
    attn = Attention(32, 2, use_rel_pos=True, input_size=(5, 5)).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    windowed = Attention(32, 2, use_rel_pos=True, input_size=(5, 5), window_size=5).eval()
    windowed.load_state_dict(attn.state_dict())
    x = torch.randn(2, 12, 9, 32)
    with torch.inference_mode():
        windows, pad_hw = window_partition(x, 5)  # zero-padded, as the official code
        expected = window_unpartition(attn(windows), 5, pad_hw, (12, 9))
        assert_close_scaled(windowed(x), expected, n=32)
        attn.set_kernel("reference")
        assert_close_scaled(window_unpartition(attn(windows), 5, pad_hw, (12, 9)), expected, n=32)


@pytest.mark.parametrize("args", [(1, 12, 64, 64, 4096, 1 << 23), (25, 12, 14, 14, 196, 1 << 23),
                                  (2, 3, 5, 7, 35, 1), (4, 16, 64, 64, 4096, 1 << 28), (3, 2, 4, 5, 20, 10 ** 6),
                                  (1, 12, 64, 64, 4096, 40 << 20), (1, 16, 64, 64, 4096, 1 << 23),
                                  (2, 12, 100, 100, 10000, 1 << 23)])
def test_chunking_respects_the_budget(args):
    batch, heads, rows, row_len, n_keys, budget = args
    nb, nh, n_chunks = _chunking(batch, heads, rows, row_len, n_keys, budget)
    assert 1 <= nb and 1 <= nh <= heads and 1 <= n_chunks <= rows
    min_rows = min(rows, -(-768 // row_len))  # the kernel's efficient query block count wins over the budget
    smallest, largest = rows // n_chunks, -(-rows // n_chunks)  # rows are spread evenly over the chunks
    assert smallest >= min_rows
    assert nb * nh * largest * row_len * n_keys <= 2 * max(budget, min_rows * row_len * n_keys)


def test_bfloat16_end_to_end(tmp_path):
    """Weights and matmuls in bfloat16; LayerNorm (and its parameters), position tables, softmax and the residual
    stream in float32; close to the float32 official output."""
    cfg = samvit.EncoderConfig(img_size=256, window_size=6, global_attn_indexes=(1,), **BASE)
    official, enc = _pair(cfg, seed=11)
    path = tmp_path / "tiny.safetensors"
    samvit.save_encoder(enc, path)
    enc16 = samvit.load_encoder(checkpoint=path, dtype=torch.bfloat16)
    kept = {n for n, p in enc16.named_parameters() if p.dtype == torch.float32}
    assert kept == {n for n, _ in enc16.named_parameters() if "norm" in n or "pos" in n or n[:6] in ("neck.1", "neck.3")}
    assert enc16.dtype == torch.bfloat16 and enc16.blocks[0].mlp.lin1.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 256, 256)
    with torch.inference_mode():
        ref = official(x)
        out = enc16(x.bfloat16())
        assert out.dtype == torch.float32 and out.shape == ref.shape  # the float32 LayerNorm's output, unrounded
        assert torch.equal(enc16(x), out)  # a float32 input is cast to the weights' dtype
        err = (out.float() - ref).abs()
        assert err.mean() <= 0.01 and _cosine(out, ref) >= 0.9995
        feats = enc16.forward_features(x.bfloat16())
        assert feats.dtype == torch.float32 and feats.shape == (2, 16, 16, 64)
        # the reference path also runs in bfloat16 (all-bfloat16 arithmetic, as the official code would)
        assert _cosine(enc16.set_attention("reference")(x), ref) >= 0.999


def test_float16_policy():
    cfg = samvit.EncoderConfig(img_size=64, window_size=2, global_attn_indexes=(1,), **BASE)
    enc = samvit.ImageEncoder(cfg).half()
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        enc(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="issue 540"):
        check_float16(samvit.preset("vit_h"), torch.device("cuda"))
    check_float16(samvit.preset("vit_b"), torch.device("cuda"))  # allowed on a GPU, output checked for overflow


def test_bad_input_is_refused():
    enc = samvit.ImageEncoder(samvit.EncoderConfig(img_size=64, window_size=2, global_attn_indexes=(1,), **BASE))
    with pytest.raises(ValueError, match=r"expected a float tensor \(B,3,H,W\)"):
        enc(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        enc(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match="unknown attention kernel"):
        enc.set_attention("flash")


@pytest.mark.slow
def test_vit_b_1024_fast_matches_official(official_vit_b):
    official = official_vit_b[0].image_encoder
    enc = samvit.ImageEncoder(samvit.preset("vit_b"))
    enc.load_state_dict(official.state_dict())
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = official(x)
        assert_close_scaled(enc.eval()(x), ref, n=768)
