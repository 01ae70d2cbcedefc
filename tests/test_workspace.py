"""The inference path with reused workspace buffers, and the attention kernels, against the reference arithmetic."""
from __future__ import annotations

import pytest
import torch

import samvit
from samvit.modeling import kernels
from samvit.modeling.attention import Attention
from samvit.modeling.inference import InferenceRunner

from tests.helpers import assert_close_scaled, randomize_

# every registered kernel that runs on this CPU in float32, and the automatic choice (the reference is the oracle)
CPU_KERNELS = [n for n, k in kernels.KERNELS.items() if n != "reference"
               and k.supports(torch.device("cpu"), torch.float32)] + ["auto"]
CFG = samvit.EncoderConfig(img_size=80, embed_dim=48, depth=3, num_heads=3, window_size=3, global_attn_indexes=(1,),
                           out_chans=16, name="small")


def _encoder(kernel: str, seed: int = 3) -> samvit.ImageEncoder:
    return randomize_(samvit.ImageEncoder(CFG, kernel=kernel), seed=seed).eval()


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_inference_path_matches_the_reference_and_the_autograd_path(kernel):
    enc = _encoder(kernel)
    ref = _encoder("reference")
    x = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
    with torch.inference_mode():
        first = enc(x)
        held = enc.release_workspace()
        assert held > 0 and enc.release_workspace() == 0  # released, then nothing left
        again, third = enc(x), enc(x)
    assert_close_scaled(first, expected, n=CFG.embed_dim)
    assert torch.equal(first, again) and torch.equal(first, third)  # buffers reused across calls: same results
    if kernel == "auto" or kernels.KERNELS[kernel].autograd:
        grad_out = enc(x)  # autograd path: no workspace, plain tensors
        assert grad_out.requires_grad
        assert_close_scaled(grad_out.detach(), expected, n=CFG.embed_dim)
    with torch.no_grad():  # no_grad after inference_mode: buffers made under inference mode are replaced
        assert_close_scaled(enc(x), expected, n=CFG.embed_dim)
    with torch.inference_mode():  # the result is the caller's tensor, not a workspace buffer
        out = enc.forward_features(x[:1])
        kept = out.clone()
        enc.forward_features(x[1:])
    assert torch.equal(out, kept)


def test_the_workspace_is_per_thread_and_other_sizes_work():
    import threading

    enc = _encoder("sdpa_chunked")
    xs = [torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(s)) for s in (80, 64, 80)]
    with torch.no_grad():
        expected = [enc(x) for x in xs]
    enc.release_workspace()
    results = {}

    def run(i):
        with torch.inference_mode():
            results[i] = [enc(x) for x in xs]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(enc.inference.workspaces) == 2
    for i in range(2):
        for got, want in zip(results[i], expected):
            assert torch.equal(got, want)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("budget,min_queries", [(1, 1), (300, 1), (3000, 14), (1 << 22, 1), (1 << 30, 768)])
def test_kernels_match_the_reference_kernel_at_any_chunking(monkeypatch, kernel, budget, min_queries):
    """ViT-B's head width (64) on a small global grid and on windows; every chunking gives the reference result."""
    torch.manual_seed(0)
    attn = Attention(192, 3, use_rel_pos=True, input_size=(9, 7)).eval()
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    x = torch.randn(2, 9, 7, 192)
    monkeypatch.setattr(kernels, "MASK_CHUNK_ELEMS", budget)
    monkeypatch.setattr(kernels, "MIN_CHUNK_QUERIES", min_queries)
    with torch.inference_mode():
        ref = attn.set_kernel("reference")(x)
        attn.set_kernel(kernel)
        assert_close_scaled(attn(x), ref, n=63)
        resid = torch.zeros_like(x)  # the inference runner's in-place arithmetic: resid += attn(x)
        InferenceRunner()._attention(attn, x, resid, InferenceRunner().workspace())
        assert_close_scaled(resid, ref, n=63)


def test_bfloat16_kernels_stay_close_to_float32():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        ref = _encoder("reference")(x)
    for kernel in ("sdpa_chunked", "matmul_blocked"):
        enc = _encoder(kernel).to(torch.bfloat16)
        with torch.inference_mode():
            out = enc(x)
        cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
        assert out.dtype == torch.float32 and cos >= 0.999, kernel


def test_inference_path_keeps_lora_adapters_and_training_drop_path():
    """Merged with main's fine-tuning: a LoRA-wrapped Linear is not read as a plain one on the inference path, and
    drop path in training mode takes the plain path even without autograd."""
    from samvit.modeling.lora import add_lora, merge_lora

    enc = _encoder("sdpa_chunked")
    x = torch.randn(1, 3, 80, 80, generator=torch.Generator().manual_seed(2))
    add_lora(enc.blocks, rank=2, targets=("qkv", "proj", "mlp"))
    for m in enc.modules():
        if hasattr(m, "lora_b"):
            torch.nn.init.normal_(m.lora_b.weight, std=0.2)
    with torch.no_grad():
        plain = enc.forward_features(x)  # autograd disabled: the workspace path
    merge_lora(enc)
    with torch.no_grad():
        merged = enc.forward_features(x)
    assert_close_scaled(plain, merged, n=CFG.embed_dim)
    assert (plain - _encoder("sdpa_chunked").forward_features(x)).abs().max() > 1e-2
    enc.set_drop_path(0.5).train()
    with torch.no_grad():
        assert enc.workspace() is None
        torch.manual_seed(0)
        a = enc.forward_features(x)
        torch.manual_seed(1)
        b = enc.forward_features(x)
    assert not torch.equal(a, b)  # branches dropped at random
    enc.eval()
    with torch.no_grad():
        assert enc.workspace() is not None
