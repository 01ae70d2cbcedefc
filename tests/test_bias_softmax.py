"""bias_softmax (fused bias + softmax prototype) equals the official arithmetic, float32 and bfloat16."""
import pytest
import torch

from samvit.modeling.bias_softmax import bias_softmax


def reference(scores, rel_h, rel_w, scale):
    G, Nq, N = scores.shape
    s = scores.double().view(G, Nq, rel_h.shape[-1], rel_w.shape[-1]) * scale
    s = s + rel_h.double()[..., None] + rel_w.double()[..., None, :]
    return s.view(G, Nq, N).softmax(-1)


def make(dtype, G=3, Nq=10, Hk=4, Wk=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (4 * torch.randn(G, Nq, Hk * Wk, generator=g)).to(dtype), torch.randn(G, Nq, Hk, generator=g).to(dtype), \
        torch.randn(G, Nq, Wk, generator=g).to(dtype)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_reference(dtype, compiled):
    scores, rel_h, rel_w = make(dtype)
    ref = reference(scores, rel_h, rel_w, 0.125)
    out = bias_softmax(scores, rel_h, rel_w, 0.125, compiled=compiled)
    assert out.dtype == dtype and out.shape == scores.shape
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8  # probabilities <= 1: one bf16 rounding of the result
    assert (out.double() - ref).abs().max() <= tol
    inplace = scores.clone()  # out = scores: in place, as in the blocked kernel's workspace
    assert bias_softmax(inplace, rel_h, rel_w, 0.125, out=inplace, compiled=compiled) is inplace
    assert (inplace.double() - ref).abs().max() <= tol


def test_float32_scores_into_bfloat16_probabilities():
    """The fused kernel's intended use: float32 scores from the GEMM, bfloat16 probabilities for the next GEMM."""
    scores, rel_h, rel_w = make(torch.float32, seed=1)
    out = torch.empty(scores.shape, dtype=torch.bfloat16)
    bias_softmax(scores, rel_h.bfloat16(), rel_w.bfloat16(), 0.5, out=out, compiled=False)
    ref = reference(scores, rel_h.bfloat16(), rel_w.bfloat16(), 0.5)
    assert (out.double() - ref).abs().max() <= 2 ** -8


def test_bad_shapes_raise():
    scores, rel_h, rel_w = make(torch.float32)
    with pytest.raises(ValueError, match="Hk\\*Wk"):
        bias_softmax(scores, rel_h[..., :3], rel_w, compiled=False)
    with pytest.raises(ValueError, match="3-D"):
        bias_softmax(scores[0], rel_h, rel_w, compiled=False)
