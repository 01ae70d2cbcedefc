"""memeff_attention (modeling/attention_memeff.py): outputs and gradients (q, k, v, rel_h, rel_w) equal the plain
arithmetic (full score matrix + bias, softmax, weighted sum) in float32 and bfloat16, with several chunks of query
rows, with and without bias; and its backward keeps no (Nq, Nk) matrix."""
from __future__ import annotations

import pytest
import torch

from samvit.modeling.attention_memeff import memeff_attention


def plain(q, k, v, rel_h, rel_w, scale, hw):
    s = (q @ k.transpose(1, 2)) * scale
    bh, nq, nk = s.shape
    if rel_h is not None or rel_w is not None:
        s = s.view(bh, nq, *hw)
        if rel_h is not None:
            s = s + rel_h[..., :, None]
        if rel_w is not None:
            s = s + rel_w[..., None, :]
        s = s.reshape(bh, nq, nk)
    return s.softmax(-1) @ v


def _inputs(dtype, bias=True, bh=6, hq=5, wq=7, hw=(6, 4), d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    nq, nk = hq * wq, hw[0] * hw[1]
    q, k, v = (torch.randn(bh, n, d, generator=g) for n in (nq, nk, nk))
    rel_h = torch.randn(bh, nq, hw[0], generator=g) if bias else None
    rel_w = torch.randn(bh, nq, hw[1], generator=g) if bias else None
    return [t.to(dtype) if t is not None else None for t in (q, k, v, rel_h, rel_w)]


def _run(fn, inputs, grad_out, scale, hw):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves, scale, hw)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_plain_arithmetic(dtype, bias):
    hw = (6, 4)
    inputs = _inputs(dtype, bias, hw=hw)
    scale = inputs[0].shape[-1] ** -0.5
    grad_out = torch.randn(inputs[0].shape[0], inputs[0].shape[1], inputs[2].shape[2],
                           generator=torch.Generator().manual_seed(1))
    # the oracle: the plain arithmetic in float64 on the same (rounded) inputs
    exact = _run(plain, [t.double() if t is not None else None for t in inputs], grad_out.double(), scale, hw)
    ours = _run(lambda *a: memeff_attention(*a[:6], chunk_rows=4), inputs, grad_out, scale, hw)  # 9 chunks
    names = ["out", "dq", "dk", "dv", "drel_h", "drel_w"][:len(exact)]
    if dtype == torch.float32:
        for name, a, b in zip(names, exact, ours):
            assert (a - b.double()).abs().max() <= 1e-5 * a.abs().max() + 1e-7, name
    else:  # bf16: no further from the exact result than the plain arithmetic run in bf16 (x2, + 1% of the scale)
        plain_bf16 = _run(plain, inputs, grad_out, scale, hw)
        for name, a, b, c in zip(names, exact, ours, plain_bf16):
            err, ref_err = (a - b.double()).abs().max(), (a - c.double()).abs().max()
            assert err <= 2 * ref_err + 1e-2 * a.abs().max(), (name, float(err), float(ref_err))
            assert b.dtype == torch.bfloat16


def test_one_chunk_or_many_and_errors():
    inputs = _inputs(torch.float32)
    a = memeff_attention(*inputs, 0.25)
    b = memeff_attention(*inputs, 0.25, chunk_rows=1)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="rel_h"):
        memeff_attention(inputs[0], inputs[1], inputs[2], inputs[3][:, :3], inputs[4], 0.25)
    with pytest.raises(ValueError, match="key grid"):
        memeff_attention(inputs[0], inputs[1][:, :5], inputs[2][:, :5], inputs[3], inputs[4], 0.25)


def test_backward_keeps_no_score_matrix():
    """Saved for backward: the inputs, the output and one float per query; never a (BH, Nq, Nk) tensor (here 16x larger than q)."""
    q, k, v, rel_h, rel_w = (t.requires_grad_(True) for t in _inputs(torch.float32, hq=16, wq=16, hw=(16, 16)))
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        memeff_attention(q, k, v, rel_h, rel_w, 0.25)
    assert max(sizes) <= q.numel() and sum(sizes) <= 7 * q.numel()  # q, k, v, out, rel_h, rel_w (d = Hk = Wk = 16 here), lse
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        plain(q, k, v, rel_h, rel_w, 0.25, (16, 16))
    assert max(sizes) >= q.shape[0] * 256 * 256  # the plain arithmetic does keep it
