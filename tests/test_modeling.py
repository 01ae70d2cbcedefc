"""Modeling seams: the kernel registry (one selection point), gradients through both paths, gradient
checkpointing, forward_intermediates, and the encoder's device/dtype."""
from __future__ import annotations

import pytest
import torch

import samvit
from samvit.modeling import attention, kernels
from samvit.modeling.attention import Attention, window_partition
from samvit.modeling.kernels import register_kernel
from samvit.modeling.encoder import ImageEncoder

from tests.helpers import assert_close_scaled, randomize_

CFG = samvit.EncoderConfig(img_size=96, embed_dim=32, depth=3, num_heads=2, window_size=4, global_attn_indexes=(1,),
                           out_chans=16, name="micro")  # 6x6 grid: 4x4 windows with padding


def _encoder(**kw) -> ImageEncoder:
    return randomize_(ImageEncoder(CFG, **kw), seed=3).train()


def _grads(enc: ImageEncoder, x: torch.Tensor):
    enc.zero_grad(set_to_none=True)
    out = enc(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}


def test_kernel_names_and_aliases():
    enc = ImageEncoder(CFG)
    assert enc.kernel == "auto" and enc.attn_impl == "fast"
    assert ImageEncoder(CFG, "reference").kernel == "reference"
    assert ImageEncoder(CFG, attn_impl="reference").kernel == "reference"
    assert enc.set_attention("reference").kernel == "reference" and enc.attn_impl == "reference"
    assert all(b.attn.kernel == "reference" for b in enc.blocks)
    assert enc.set_kernel("fast").kernel == "auto"
    with pytest.raises(ValueError, match="unknown attention kernel 'nope'"):
        ImageEncoder(CFG, kernel="nope")


def test_a_registered_kernel_is_used_by_every_block(monkeypatch):
    calls = []

    def counting(inp):
        calls.append(inp.key_hw)
        return kernels.reference_attention(inp)

    monkeypatch.setattr(kernels, "KERNELS", dict(kernels.KERNELS))
    register_kernel("counting")(counting)
    assert not kernels.KERNELS["counting"].workspace  # no out=/workspace=: the inference path copies its result
    enc = randomize_(ImageEncoder(CFG, kernel="counting"), seed=1).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():  # the inference path (workspace buffers)
        torch.testing.assert_close(enc(x), enc.set_kernel("sdpa_chunked")(x))
    assert sorted(set(calls)) == [(4, 4), (6, 6)] and len(calls) == CFG.depth


def test_fast_path_gradients_equal_the_reference_path():
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    out_f, g_fast = _grads(_encoder(kernel="sdpa_chunked"), x)
    out_r, g_ref = _grads(_encoder(kernel="reference"), x)
    tokens = x.shape[0] * CFG.grid_size ** 2  # a weight's gradient sums over every token of the batch
    assert_close_scaled(out_f, out_r, n=CFG.embed_dim, msg="output")
    assert g_fast.keys() == g_ref.keys() and len(g_fast) == len(list(ImageEncoder(CFG).parameters()))
    for name in g_fast:
        # scaled to the gradient's magnitude: float32 rounding differs between CPUs (AVX2, AVX-512, AMX)
        assert_close_scaled(g_fast[name], g_ref[name], n=tokens, msg=name)
        assert g_fast[name].abs().sum() > 0, name


@pytest.mark.parametrize("kernel", ["sdpa_chunked", "reference"])
def test_grad_checkpointing_gives_the_same_gradients(kernel, monkeypatch):
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    enc = _encoder(kernel=kernel)
    out, plain = _grads(enc, x)
    calls = []
    enc.blocks[0].attn.qkv.register_forward_pre_hook(lambda *a: calls.append(1))  # called by every runner
    out_c, ckpt = _grads(enc.set_grad_checkpointing(), x)
    assert len(calls) == 2  # the block ran again in the backward pass
    assert torch.equal(out, out_c)
    for name in plain:  # the same kernels recomputed: equal up to the order of the gradient's accumulation
        assert_close_scaled(ckpt[name], plain[name], k=4, msg=name)
    from samvit.modeling import encoder as encoder_module

    checkpointed = []
    monkeypatch.setattr(encoder_module, "checkpoint", lambda *a, **k: checkpointed.append(1))
    with torch.no_grad():  # without grad, no checkpoint
        enc(x)
    assert not checkpointed


def test_forward_intermediates():
    enc = randomize_(ImageEncoder(CFG), seed=2).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, inter = enc.forward_intermediates(x)
        assert torch.equal(out, enc(x)) and len(inter) == CFG.depth
        assert torch.equal(inter[-1], enc.forward_features(x))
        out2, inter2, probs = enc.forward_intermediates(x, blocks=[-1, 1], return_attention=True)
        assert torch.equal(out2, out) and [t.shape for t in inter2] == [(2, 6, 6, 32)] * 2
        assert torch.equal(inter2[0], inter[1]) and torch.equal(inter2[1], inter[2])
        # block 1 is global: (B, heads, 36, 36); block 2 windowed: 4 padded 4x4 windows per image
        assert probs[0].shape == (2, 2, 36, 36) and probs[1].shape == (8, 2, 16, 16)
        torch.testing.assert_close(probs[0].sum(-1), torch.ones(2, 2, 36))
        # the probabilities are those of the official arithmetic on block 1's input
        blk = enc.blocks[1]
        y = blk.norm1(inter[0])
        B, H, W, C = y.shape
        qkv = blk.attn.qkv(y).reshape(B, H * W, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        scores = (q * blk.attn.scale) @ k.transpose(-2, -1)
        rel_h, rel_w = attention.rel_pos_terms(q, blk.attn.rel_pos_h, blk.attn.rel_pos_w, (H, W))
        scores = (scores.view(B, 2, H, W, H, W) + rel_h[..., None] + rel_w[..., None, :]).view(B, 2, H * W, H * W)
        assert_close_scaled(probs[0], scores.softmax(-1), n=C, msg="probabilities")
        windows = window_partition(enc.blocks[2].norm1(inter[1]), 4)[0]  # zero-padded, as the official code
        global_attn = Attention(32, 2, use_rel_pos=True, input_size=(4, 4))
        global_attn.load_state_dict(enc.blocks[2].attn.state_dict())
        assert_close_scaled(probs[1], global_attn.attention_probs(windows), n=C)
    with pytest.raises(ValueError, match="block index 3 is outside the 3 blocks"):
        enc.forward_intermediates(x, blocks=[3])


def test_attention_probs_rows_are_the_reference_output():
    attn = randomize_(Attention(32, 2, use_rel_pos=True, input_size=(5, 5)), seed=4).eval()
    x = torch.randn(1, 5, 5, 32)
    with torch.no_grad():
        p = attn.attention_probs(x)
        v = attn.qkv(x).reshape(1, 25, 3, 2, 16)[:, :, 2].transpose(1, 2)  # (B, heads, N, hd)
        out = attn.proj((p @ v).transpose(1, 2).reshape(1, 5, 5, 32))
        assert_close_scaled(out, attn.set_kernel("reference")(x), n=25, msg="output")


def test_device_and_dtype():
    enc = ImageEncoder(CFG)
    assert enc.device == torch.device("cpu") and enc.dtype == torch.float32
    enc.to(torch.bfloat16)
    assert enc.dtype == torch.bfloat16 and enc.pos_embed.dtype == torch.float32


def test_one_forward_per_module():
    """timm's shape: Block, Attention and the shared layers have one forward (the kernel and the runner are
    choices, not code paths); the encoder's forward_* are timm's hooks."""
    from samvit.modeling import common, encoder

    def forwards(cls):
        return sorted(n for n in vars(cls) if n.startswith("forward"))

    for cls in (encoder.Block, Attention, encoder.PatchEmbed, common.MLPBlock, common.DropPath, common.LayerNorm):
        assert forwards(cls) == ["forward"], cls.__name__
    assert forwards(ImageEncoder) == ["forward", "forward_embed", "forward_features", "forward_head",
                                      "forward_intermediates"]


def test_block_seams_and_drop_path_module():
    """norm_layer / mlp_layer / block_fn build a variant without touching the forward; a variant the in-place
    runner does not know runs through the modules (same result); drop path is a module, Identity when off."""
    from samvit.modeling.common import DropPath, MLPBlock
    from samvit.modeling.encoder import Block

    class ReluMLP(MLPBlock):
        def __init__(self, dim, hidden):
            super().__init__(dim, hidden, act=torch.nn.ReLU)

    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    enc = randomize_(ImageEncoder(CFG, mlp_layer=ReluMLP), seed=6).eval()
    assert all(isinstance(b.mlp.act, torch.nn.ReLU) for b in enc.blocks)
    with torch.no_grad():
        assert type(enc.runner()).__name__ == "ModuleRunner"  # the runner knows GELU MLPs only
        out = enc(x)
        assert_close_scaled(out, enc.set_kernel("reference")(x), n=CFG.embed_dim)
    built = []
    ImageEncoder(CFG, block_fn=lambda *a, **k: built.append(a[1]) or Block(*a, **k))
    assert built == [CFG.block_window_size(i) for i in range(CFG.depth)]
    enc.set_drop_path(0.2)
    assert isinstance(enc.blocks[0].drop_path, torch.nn.Identity) and isinstance(enc.blocks[-1].drop_path, DropPath)
    enc.set_drop_path(0.0)
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in enc.blocks)
