"""Activation checkpointing: the same gradients as without it, and less memory kept for the backward pass."""
from __future__ import annotations

import torch

from samvit.config import mae_preset
from samvit.modeling.mae import MaskedAutoencoder


def activation_bytes(model: torch.nn.Module, images: torch.Tensor, noise: torch.Tensor):
    """Loss, and the bytes of the distinct tensors autograd keeps for the backward pass, parameters excluded.
    (Inside a checkpointed block torch.utils.checkpoint's own hooks take over, so what it drops is not counted.)"""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = model(images, noise=noise)
    return loss, sum(kept.values())


def test_checkpointing_same_gradients_less_memory():
    torch.manual_seed(0)
    model = MaskedAutoencoder(mae_preset("mae_tiny", depth=4))
    images, noise = torch.randn(4, 3, 224, 224), torch.rand(4, 196)
    runs = {}
    for on in (False, True):
        model.set_grad_checkpointing(on)
        model.zero_grad(set_to_none=True)
        loss, kept = activation_bytes(model, images, noise)
        loss.backward()
        runs[on] = (loss.detach(), kept, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    (loss0, kept0, g0), (loss1, kept1, g1) = runs[False], runs[True]
    assert torch.equal(loss0, loss1)
    for name in g0:  # the recomputed forward is the same arithmetic: equal to float32 rounding (measured: bitwise)
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-9, msg=name)
    # kept for backward: every block's activations (attention, MLP) vs only each block's input; what is left
    # (input images, patch targets, predictions: ~7 MB here) is outside the blocks (measured 15.9 vs 6.5 MiB)
    assert kept1 < 0.5 * kept0, (kept1, kept0)
