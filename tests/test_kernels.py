"""Every registered attention kernel against the reference kernel (the official arithmetic), parametrized over the
registry: a new kernel is tested here without editing this file. What each kernel declares is what is tested:
autograd (gradients of q, k, v and both bias terms), out/workspace (written into `out`, buffers reused), devices and
dtypes. And "auto" chooses from the declarations."""
from __future__ import annotations

import pytest
import torch

from samvit.modeling import kernels
from samvit.modeling.attention import attention_inputs
from samvit.modeling.kernels import KERNELS, AttnInputs, attention_probs, choose_kernel, register_kernel
from samvit.modeling.workspace import Workspace
from tests.helpers import assert_close_scaled

NAMES = sorted(KERNELS)
# (batch, heads, head dim, key grid (Hk, Wk), relative-position bias): a global grid at ViT-B's head width, a batch
# of windows, no bias, a token sequence (MAE: grid (1, N))
CASES = {"grid": (2, 3, 64, (9, 7), True), "windows": (6, 2, 16, (5, 5), True), "no_bias": (2, 2, 32, (6, 6), False),
         "sequence": (2, 4, 16, (1, 17), False)}


def _device(kernel) -> torch.device:
    if kernel.devices is None or "cpu" in kernel.devices:
        return torch.device("cpu")
    if "cuda" in kernel.devices and torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip(f"kernel {kernel.name!r} runs on {kernel.devices}, none here")


def _inputs(case: str, dtype=torch.float32, device="cpu", grad: bool = False) -> AttnInputs:
    B, nh, d, hw, bias = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    N = hw[0] * hw[1]
    qkv = torch.randn(B, N, 3 * nh * d, generator=g)
    rel = None
    if bias:
        rel = (0.5 * torch.randn(2 * hw[0] - 1, d, generator=g), 0.5 * torch.randn(2 * hw[1] - 1, d, generator=g))
    inp = attention_inputs(qkv, hw, nh, d ** -0.5, rel)
    fields = [inp.q, inp.k, inp.v, inp.rel_h, inp.rel_w]
    fields = [None if t is None else t.to(device=device, dtype=dtype).detach().requires_grad_(grad) for t in fields]
    return AttnInputs(*fields, hw, inp.scale, nh)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_the_reference(name, case, monkeypatch):
    kernel = KERNELS[name]
    device = _device(kernel)
    if torch.float32 not in kernel.dtypes:
        pytest.skip(f"kernel {name!r} does not declare float32")
    monkeypatch.setattr(kernels, "MASK_CHUNK_ELEMS", 500)  # the built-in kernels: several chunks of each kind
    monkeypatch.setattr(kernels, "MIN_CHUNK_QUERIES", 4)
    inp = _inputs(case, device=device)
    Nk = inp.k.shape[1]
    with torch.no_grad():
        ref = KERNELS["reference"](inp)
        out = kernel(inp)
        assert out.shape == ref.shape == (inp.batch, inp.q.shape[1], inp.heads * inp.q.shape[2])
        assert_close_scaled(out, ref, n=Nk, msg=name)
        if kernel.workspace:  # written into out, scratch from the workspace, buffers reused across calls
            ws = Workspace()
            into = torch.full_like(ref, float("nan"))
            assert kernel(inp, out=into, workspace=ws) is into
            assert_close_scaled(into, ref, n=Nk, msg=f"{name} (out, workspace)")
            again = kernel(inp, out=torch.empty_like(ref), workspace=ws)
            assert torch.equal(again, into)
            assert all(key.startswith(f"kernel.{name}.") for key in ws.buffers)  # its own namespace


@pytest.mark.parametrize("case", ["grid", "sequence"])
@pytest.mark.parametrize("name", [n for n in NAMES if KERNELS[n].autograd])
def test_kernel_gradients_match_the_reference(name, case):
    kernel = KERNELS[name]
    device = _device(kernel)
    grads = []
    for k in (kernel, KERNELS["reference"]):
        inp = _inputs(case, device=device, grad=True)
        out = k(inp)
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        fields = [f for f in ("q", "k", "v", "rel_h", "rel_w") if getattr(inp, f) is not None]
        grads.append({f: getattr(inp, f).grad for f in fields})
    assert grads[0].keys() == grads[1].keys()
    for f in grads[1]:
        assert grads[1][f].abs().sum() > 0
        assert_close_scaled(grads[0][f], grads[1][f], n=_inputs(case).k.shape[1], msg=f"{name}: grad of {f}")


@pytest.mark.parametrize("name", [n for n in NAMES if torch.bfloat16 in KERNELS[n].dtypes])
def test_kernel_in_bfloat16_stays_close_to_float32(name):
    kernel = KERNELS[name]
    device = _device(kernel)
    with torch.no_grad():
        ref = KERNELS["reference"](_inputs("grid", device=device)).float()
        out = kernel(_inputs("grid", torch.bfloat16, device)).float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert out.isfinite().all() and cos >= 0.999, (name, cos.item())


def test_attention_probs_is_the_reference_softmax():
    inp = _inputs("grid")
    p = attention_probs(inp)
    assert_close_scaled(p.sum(-1), torch.ones(p.shape[:2]), n=p.shape[-1])
    B, nh, d, (Hk, Wk), _ = CASES["grid"]
    i, kh, kw = 10, 3, 4  # one entry, by the definition: softmax over keys of q.k * scale + rel_h + rel_w
    logits = (inp.q[:, i:i + 1] @ inp.k.transpose(1, 2))[:, 0] * inp.scale  # (BH, Nk)
    logits = logits + (inp.rel_h[:, i, :, None] + inp.rel_w[:, i, None, :]).reshape(-1, Hk * Wk)
    assert_close_scaled(p[:, i, kh * Wk + kw], logits.softmax(-1)[:, kh * Wk + kw], n=Hk * Wk)


def test_auto_chooses_from_the_declarations(monkeypatch):
    monkeypatch.setattr(kernels, "KERNELS", dict(KERNELS))
    cpu = torch.device("cpu")
    # the built-in rule: the blocked kernel on the CPU without autograd, the memory-efficient one for training on
    # the CPU, SDPA for tracing and on GPUs
    assert choose_kernel("auto", cpu, torch.float32, grad=False, tracing=False).name == "matmul_blocked"
    assert choose_kernel("auto", cpu, torch.float32, grad=True, tracing=False).name == "memeff"
    assert choose_kernel("auto", cpu, torch.bfloat16, grad=False, tracing=True).name == "sdpa_chunked"
    assert choose_kernel("auto", torch.device("cuda"), torch.float32, grad=False, tracing=False).name == "sdpa_chunked"

    @register_kernel("gpu_only", autograd=True, devices=("cuda",), priority=100)
    def gpu_only(inp):
        raise AssertionError("not called")

    assert choose_kernel("auto", torch.device("cuda"), torch.float16, True, False).name == "gpu_only"
    assert choose_kernel("auto", cpu, torch.float32, True, False).name == "memeff"  # not on the CPU
    assert choose_kernel("gpu_only", cpu, torch.float32, True, False).name == "gpu_only"  # named: no questions
    with pytest.raises(ValueError, match="reserved"):
        register_kernel("auto")
    with pytest.raises(ValueError, match="unknown attention kernel"):
        choose_kernel("nope", cpu, torch.float32, False, False)


def test_inputs_record_checks_its_shapes():
    inp = _inputs("grid")
    with pytest.raises(ValueError, match="key grid"):
        AttnInputs(inp.q, inp.k, inp.v, inp.rel_h, inp.rel_w, (7, 9 + 1), inp.scale, inp.heads)
    with pytest.raises(ValueError, match="go together"):
        AttnInputs(inp.q, inp.k, inp.v, inp.rel_h, None, inp.key_hw, inp.scale, inp.heads)
    part = inp.queries(5, 20)
    assert part.q.shape[1] == part.rel_h.shape[1] == 15 and part.k is inp.k
