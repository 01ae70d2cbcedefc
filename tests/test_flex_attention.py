"""flex_rel_attention (FlexAttention with a rel-pos score_mod) computes the official decomposed rel-pos attention."""
import warnings

import pytest
import torch

from samvit.modeling.flex_attention import flex_available, flex_rel_attention

pytestmark = [pytest.mark.skipif(not flex_available(), reason="torch.nn.attention.flex_attention unavailable"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # "flex_attention called without torch.compile"


def reference(q, k, v, rel_h, rel_w, scale):
    """The official arithmetic: full scores, bias of (kh, kw) = rel_h[.., kh] + rel_w[.., kw], softmax, @ v."""
    scores = (q * scale) @ k.transpose(-2, -1)
    if rel_h is not None or rel_w is not None:
        hk = rel_h.shape[-1] if rel_h is not None else k.shape[-2] // rel_w.shape[-1]
        wk = k.shape[-2] // hk
        s = scores.unflatten(-1, (hk, wk))
        if rel_h is not None:
            s = s + rel_h[..., :, None]
        if rel_w is not None:
            s = s + rel_w[..., None, :]
        scores = s.flatten(-2)
    return scores.softmax(-1) @ v


def make(lead, nq, hk, wk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*lead, n, d, generator=g) for n in (nq, hk * wk, hk * wk))
    rel_h = 0.5 * torch.randn(*lead, nq, hk, generator=g)
    rel_w = 0.5 * torch.randn(*lead, nq, wk, generator=g)
    return [t.to(dtype) for t in (q, k, v, rel_h, rel_w)]


# window-like (7x7 grid, queries = keys) and global-like (non-square 6x5 grid), head dims 16 and 80 (ViT-H's)
SIZES = [((6,), 7, 7, 16), ((2, 3), 6, 5, 80), ((4,), 4, 4, 32)]


@pytest.mark.parametrize("lead,h,w,d", SIZES)
@pytest.mark.parametrize("terms", ["both", "none", "h_only", "w_only"])
def test_float32_equals_reference(lead, h, w, d, terms):
    q, k, v, rel_h, rel_w = make(lead, h * w, h, w, d, torch.float32)
    rel_h = rel_h if terms in ("both", "h_only") else None
    rel_w = rel_w if terms in ("both", "w_only") else None
    scale = d ** -0.5
    out = flex_rel_attention(q, k, v, rel_h, rel_w, scale)
    ref = reference(q.double(), k.double(), v.double(), None if rel_h is None else rel_h.double(),
                    None if rel_w is None else rel_w.double(), scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_default_scale_and_fewer_queries_than_keys():
    """Nq need not equal Nk (a query grid of 3 rows against a 4x4 key grid); scale=None means d**-0.5."""
    q, k, v, rel_h, rel_w = make((2,), 12, 4, 4, 16, torch.float32, seed=3)
    out = flex_rel_attention(q, k, v, rel_h, rel_w)
    ref = reference(q, k, v, rel_h, rel_w, 16 ** -0.5)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("lead,h,w,d", SIZES[:2])
def test_bfloat16_close_to_float32(lead, h, w, d):
    """bf16 inputs: within bf16 rounding of the float64 result on the same (bf16-rounded) inputs."""
    q, k, v, rel_h, rel_w = make(lead, h * w, h, w, d, torch.bfloat16, seed=1)
    out = flex_rel_attention(q, k, v, rel_h, rel_w, d ** -0.5)
    ref = reference(*(t.double() for t in (q, k, v, rel_h, rel_w)), d ** -0.5)
    assert out.dtype == torch.bfloat16
    # bf16 has 8 significant bits: a few ulps of the values' magnitude (scores, probabilities, output rounded)
    assert (out.double() - ref).abs().max() <= 4 * 2 ** -8 * v.double().abs().max()
    assert torch.nn.functional.cosine_similarity(out.double().flatten(), ref.flatten(), dim=0) > 0.9999


def test_backward_on_cpu_is_refused_clearly():
    """FlexAttention has no CPU backward: a clear error, not a wrong gradient."""
    q, k, v, rel_h, rel_w = make((3,), 20, 5, 4, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="no backward on CPU"):
        flex_rel_attention(q, k, v, rel_h.requires_grad_(), rel_w, 0.25)
    with torch.no_grad():  # no autograd wanted: runs
        flex_rel_attention(q, k, v, rel_h, rel_w, 0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA only")
def test_gradients_equal_reference_cuda():
    """Autograd through q, k, v and both bias terms (training through the kernel), on the GPU."""
    q, k, v, rel_h, rel_w = make((3,), 20, 5, 4, 16, torch.float32, seed=2)
    ins = [t.cuda().requires_grad_() for t in (q, k, v, rel_h, rel_w)]
    flex_rel_attention(*ins, 0.25).pow(2).sum().backward()
    got = [t.grad.clone() for t in ins]
    for t in ins:
        t.grad = None
    reference(*ins, 0.25).pow(2).sum().backward()
    for name, g, t in zip("q k v rel_h rel_w".split(), got, ins):
        assert (g - t.grad).abs().max() <= 1e-4 * t.grad.abs().max(), name


def test_equals_samvit_reference_kernel():
    """Fed the terms samvit computes (rel_pos_terms), it equals the registered "reference" kernel."""
    from samvit.modeling.attention import Attention, rel_pos_terms
    from samvit.modeling.kernels import KERNELS, AttnInputs

    torch.manual_seed(0)
    attn = Attention(32, 2, use_rel_pos=True, input_size=(5, 6))
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    qkv = torch.randn(2, 30, 3, 2, 16)
    with torch.no_grad():
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, hd)
        rel_h, rel_w = rel_pos_terms(q, attn.rel_pos_h, attn.rel_pos_w, (5, 6))  # (B, heads, 5, 6, 5|6)
        rel_h, rel_w = rel_h.flatten(2, 3), rel_w.flatten(2, 3)
        inp = AttnInputs(q.reshape(4, 30, 16), k.reshape(4, 30, 16), v.reshape(4, 30, 16), rel_h.reshape(4, 30, 5),
                         rel_w.reshape(4, 30, 6), (5, 6), attn.scale, heads=2)
        ref = KERNELS["reference"](inp)  # (B, N, heads*hd)
        out = flex_rel_attention(q, k, v, rel_h, rel_w, attn.scale)
    assert (out.transpose(1, 2).reshape(2, 30, 32) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v, h, w: (q[0], k, v, h, w), "must all be"),
    (lambda q, k, v, h, w: (q, k[:, :-1], v[:, :-1], h, w), "does not hold"),
    (lambda q, k, v, h, w: (q, k, v, h[:, :-1], w), "rel_h must be"),
])
def test_bad_shapes_raise(bad, match):
    args = bad(*make((2,), 12, 3, 4, 8, torch.float32))
    with pytest.raises(ValueError, match=match):
        flex_rel_attention(*args)


@pytest.mark.slow
def test_compiled_on_cpu_equals_eager():
    """The compiled kernel (inductor's CPU flex template) on a window-sized problem."""
    q, k, v, rel_h, rel_w = make((1, 2), 49, 7, 7, 16, torch.float32, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_rel_attention(q, k, v, rel_h, rel_w, 0.25, compiled=True)
    ref = reference(q, k, v, rel_h, rel_w, 0.25)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
