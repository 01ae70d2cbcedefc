"""MAE ViT -> SAM ImageEncoder: what is copied, the resized position embedding, the exported file."""
from __future__ import annotations

import pytest
import torch
from tests.helpers import randomize_

import samvit
from samvit.config import EncoderConfig, mae_preset, preset
from samvit.modeling.mae import MaskedAutoencoder
from samvit.train.transfer import mae_to_sam_encoder

timm = pytest.importorskip("timm")

# mae_tiny's encoder (width 64, depth 3, 2 heads, patch 16) as a SAM encoder at 1024: 14x14 windows, block 2 global.
SMALL_SAM = EncoderConfig(embed_dim=64, depth=3, num_heads=2, window_size=14, global_attn_indexes=(2,), out_chans=32,
                          name="small_sam")


@pytest.fixture(scope="module")
def mae():
    return randomize_(MaskedAutoencoder(mae_preset("mae_tiny")), seed=3)


def test_copied_tensors_equal_the_mae_ones(mae):
    from timm.layers import resample_abs_pos_embed

    enc = mae_to_sam_encoder(mae, SMALL_SAM)
    assert torch.equal(enc.patch_embed.proj.weight, mae.patch_embed.proj.weight)
    assert torch.equal(enc.patch_embed.proj.bias, mae.patch_embed.proj.bias)
    for i, (b, m) in enumerate(zip(enc.blocks, mae.blocks)):
        assert b.window_size == (0 if i == 2 else 14)
        for name, p in m.named_parameters():
            assert torch.equal(b.get_parameter(name), p), f"blocks.{i}.{name}"
        assert (b.attn.rel_pos_h == 0).all() and (b.attn.rel_pos_w == 0).all()
        assert b.attn.rel_pos_h.requires_grad and b.attn.rel_pos_h.shape == ((2 * 14 - 1) if i != 2 else 127, 32)
    # the class token's entry dropped, 14x14 -> 64x64 bicubic: timm's resampler (ViTDet's arithmetic) as the oracle
    ref = resample_abs_pos_embed(mae.pos_embed.detach(), (64, 64), num_prefix_tokens=1, interpolation="bicubic",
                                 antialias=False)
    assert torch.allclose(enc.pos_embed.reshape(1, -1, 64), ref[:, 1:], atol=1e-6)
    assert not torch.allclose(enc.pos_embed[0, :14, :14], mae.pos_embed[0, 1:].reshape(14, 14, 64))  # resized
    assert enc.neck is not None and enc.neck[1].weight.eq(1).all()  # fresh neck


def test_exported_encoder_loads_and_runs_at_1024(mae, tmp_path):
    out = tmp_path / "enc.safetensors"
    enc = mae_to_sam_encoder(mae, SMALL_SAM).eval()
    samvit.save_encoder(enc, out)
    loaded = samvit.load_encoder(checkpoint=out)
    assert loaded.config == SMALL_SAM
    for (k, a), b in zip(enc.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        y = loaded(x)
        assert y.shape == (1, 32, 64, 64) and torch.isfinite(y).all()
        assert torch.equal(y, enc(x))


def test_from_an_official_file_and_the_spec_arrangement(mae, tmp_path):
    sd = {k.replace(".mlp.lin", ".mlp.fc"): v for k, v in mae.state_dict().items()}  # official key names
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}}, path)
    spec = preset("vit_h_spec", embed_dim=64, depth=3, num_heads=2, global_attn_indexes=(2,))
    enc = mae_to_sam_encoder(path, spec)
    assert [b.window_size for b in enc.blocks] == [8, 8, 0] and enc.neck is None
    assert not any("rel_pos" in k for k in enc.state_dict())
    assert torch.equal(enc.blocks[1].mlp.lin2.weight, mae.blocks[1].mlp.lin2.weight)


def test_mismatch_is_a_clear_error(mae):
    with pytest.raises(ValueError, match=r"does not fit encoder 'vit_b': width: MAE 64 vs encoder 768; "
                                         r"depth: MAE 3 vs encoder 12"):
        mae_to_sam_encoder(mae, "vit_b")
    with pytest.raises(ValueError, match=r"heads: MAE 2 vs encoder 4"):
        mae_to_sam_encoder(mae, EncoderConfig(embed_dim=64, depth=3, num_heads=4, global_attn_indexes=(2,)))
    with pytest.raises(ValueError, match="unknown model preset"):
        mae_to_sam_encoder(mae, "vit_x")


def test_the_export_is_reproducible(mae):
    """The same MAE gives the same encoder bytes every time (the new neck is seeded), and the caller's random
    stream is left as it was."""
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = mae_to_sam_encoder(mae, SMALL_SAM).state_dict()
    after = torch.rand(3)
    b = mae_to_sam_encoder(mae, SMALL_SAM).state_dict()
    assert torch.equal(before, after)
    assert all(torch.equal(a[k], b[k]) for k in a)
