"""SAM's interactive rounds backpropagated one at a time, and the masks a few at a time (sam_loss: each pass's
graph freed after its backward) give the gradients of the whole session's loss backpropagated at once (the former way), on a tiny SAM: decoder-only
from embeddings, and with the encoder training (the rounds' gradient on the embeddings carried into the encoder)."""
from __future__ import annotations

import torch

from samvit.train.finetune import interactive_rounds, sam_loss
from samvit.train.masks_data import MaskSamples, ShapeMasks

from tests._finetune_utils import tiny_sam


def _batch(n: int = 2, k: int = 3):
    ds = MaskSamples(ShapeMasks(n, size=128, seed=3), img_size=128, low_res=32, masks_per_image=k, seed=0)
    items = [ds[(0, i)] for i in range(n)]
    return {key: torch.stack([it[key] for it in items]) for key in items[0]}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, what):
    """Each tensor within 1e-5 of its own largest entry, plus 1e-6 of the model's largest (tensors whose gradient is
    exactly zero in exact arithmetic, as an attention's key bias, hold only rounding noise)."""
    assert a.keys() == b.keys(), what
    top = max(float(t.abs().max()) for t in a.values())
    for n in a:
        tol = 1e-5 * float(a[n].abs().max()) + 1e-6 * top
        assert (a[n] - b[n]).abs().max() <= tol, (what, n, float((a[n] - b[n]).abs().max()), tol)


def test_rounds_one_at_a_time_give_the_same_gradients(monkeypatch):
    import samvit.train.finetune as ft

    batch = _batch()
    # 1/accum and an fp16 grad scale; the masks in one pass (8) or 2 at a time (3 passes of the 6 masks)
    for train_encoder, scale, per_pass in ((False, 1.0, 8), (False, 0.5, 2), (True, 1024.0, 2)):
        monkeypatch.setattr(ft, "MASKS_PER_PASS", per_pass)
        if True:
            model = tiny_sam(seed=1).train()
            model.image_encoder.requires_grad_(train_encoder)
            with torch.no_grad():
                emb = model.image_encoder(batch["image"])
            inputs = {"images": batch["image"]} if train_encoder else {"image_embeddings": emb}

            def all_at_once():
                model.zero_grad(set_to_none=True)
                torch.manual_seed(0)
                out = model(**inputs, session=lambda e, dec: interactive_rounds(dec, e, batch, 3, 128))
                (out["loss"] * scale).backward()
                return out, _grads(model)

            def one_at_a_time():
                model.zero_grad(set_to_none=True)
                torch.manual_seed(0)
                b = dict(batch)
                if not train_encoder:
                    b["embedding"] = emb
                out = sam_loss(3, 128)(model, b, grad_scale=scale)
                (out["loss"] * scale).backward()
                return out, _grads(model)

            want_out, want = all_at_once()
            got_out, got = one_at_a_time()
            what = f"encoder trains: {train_encoder}, scale {scale}, {per_pass} masks per pass"
            for key in want_out:
                assert torch.allclose(want_out[key], got_out[key], rtol=1e-6, atol=1e-8), (what, key)
            assert any(n.startswith("mask_decoder.") for n in got)
            assert any(n.startswith("image_encoder.") for n in got) == train_encoder, what
            _close(want, got, what)


class _Held:
    """A tensor saved for backward, counted while the graph holds it."""

    live = 0

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.n = t, t.numel() * t.element_size()
        _Held.live += self.n

    def __del__(self) -> None:
        _Held.live -= self.n


def test_graph_memory_does_not_grow_with_the_rounds():
    """Bytes saved for backward that are still held when the session returns: about one round's whatever
    --iterations (backpropagated at once they grow with the rounds, asserted too, so that the count is meaningful)."""
    batch = _batch(2, 4)
    model = tiny_sam(seed=1).train()
    model.image_encoder.requires_grad_(False)
    with torch.no_grad():
        emb = model.image_encoder(batch["image"])
    b = dict(batch, embedding=emb)

    def held(iterations: int, at_once: bool) -> int:
        _Held.live = 0
        with torch.autograd.graph.saved_tensors_hooks(_Held, lambda h: h.t):
            if at_once:
                out = model(image_embeddings=emb, session=lambda e, dec: interactive_rounds(dec, e, b, iterations, 128))
            else:
                out = sam_loss(iterations, 128)(model, b, grad_scale=1.0)
        n = _Held.live
        out["loss"].backward()
        model.zero_grad(set_to_none=True)
        return n

    one, many = held(1, False), held(4, False)
    assert many <= 1.2 * one, (one, many)  # (8 masks: one pass per round)
    assert held(4, True) >= 2 * held(1, True)
