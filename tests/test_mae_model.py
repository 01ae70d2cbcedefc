"""The MAE model: parity with transformers' ViTMAEForPreTraining, masking, the loss, the init."""
from __future__ import annotations

import math

import pytest
import torch
from tests.helpers import randomize_

from samvit.config import EncoderConfig, MAEConfig, mae_preset
from samvit.modeling.encoder import Block
from samvit.modeling.mae import MaskedAutoencoder
from samvit.train.mae_weights import load_mae

transformers = pytest.importorskip("transformers")


def hf_mae(cfg: MAEConfig, seed: int = 0):
    """transformers' ViTMAEForPreTraining with the architecture of cfg, every parameter randomised."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hf_cfg = ViTMAEConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), decoder_hidden_size=cfg.decoder_embed_dim,
        decoder_num_hidden_layers=cfg.decoder_depth, decoder_num_attention_heads=cfg.decoder_num_heads,
        decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio), image_size=cfg.img_size,
        patch_size=cfg.patch_size, num_channels=cfg.in_chans, qkv_bias=True, hidden_act="gelu",
        layer_norm_eps=cfg.norm_eps,  # transformers' default is 1e-12; MAE's LayerNorms use 1e-6
        mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss)
    torch.manual_seed(seed)
    return ViTMAEForPreTraining(hf_cfg).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# Base width (768, 12 heads; decoder 512 wide, 16 heads) with fewer blocks than ViT-B's 12 + 8 to stay fast.
BASE_SHALLOW = MAEConfig(embed_dim=768, depth=3, num_heads=12, decoder_embed_dim=512, decoder_depth=2,
                         decoder_num_heads=16)


@pytest.mark.parametrize("norm_pix_loss,mask_ratio", [(True, 0.75), (False, 0.6)])
def test_same_loss_and_reconstruction_as_transformers(norm_pix_loss, mask_ratio):
    cfg = MAEConfig(**{**BASE_SHALLOW.to_dict(), "norm_pix_loss": norm_pix_loss, "mask_ratio": mask_ratio})
    hf = randomize_(hf_mae(cfg))
    ours, report = load_mae(hf.state_dict(), norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio)
    assert report.format == "transformers" and not report.missing
    assert ours.config == cfg  # widths, depths and heads inferred from the tensors
    ours.eval()
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 3, 224, 224, generator=g)
    noise = torch.rand(2, cfg.num_patches, generator=g)
    with torch.no_grad():
        ref = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = ours(imgs, noise=noise)
    assert torch.equal(mask, ref.mask)
    assert rel_err(pred, ref.logits) <= 1e-5
    assert abs(loss.item() - ref.loss.item()) / ref.loss.item() <= 1e-5
    # and the reconstruction differs from the target where it should: the test is not vacuous
    assert 0.1 < loss.item()


def test_masking_keeps_the_lowest_noise_tokens():
    model = MaskedAutoencoder(mae_preset("mae_tiny")).eval()
    L = model.config.num_patches
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(3, 3, 224, 224, generator=g)
    for ratio in (0.75, 0.5, 0.9, 0.0):
        noise = torch.rand(3, L, generator=g)
        with torch.no_grad():
            latent, mask, ids_restore = model.forward_encoder(imgs, ratio, noise)
        keep = int(L * (1 - ratio))  # the official arithmetic (truncation), as transformers does too
        assert latent.shape == (3, 1 + keep, model.config.embed_dim)
        assert (mask.sum(1) == L - keep).all()
        for b in range(3):
            kept = torch.nonzero(mask[b] == 0).flatten()
            assert set(kept.tolist()) == set(noise[b].argsort()[:keep].tolist())
        assert torch.equal(torch.gather(torch.arange(L).expand(3, L), 1, ids_restore).sort(1).values,
                           torch.arange(L).expand(3, L))
    with torch.no_grad():  # masks differ between the samples of a batch (per-sample noise)
        _, _, mask = model(imgs)
    assert not torch.equal(mask[0], mask[1])


def test_loss_counts_the_masked_patches_only():
    model = MaskedAutoencoder(mae_preset("mae_tiny")).eval()
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 224, 224, generator=g)
    with torch.no_grad():
        loss, pred, mask = model(imgs)
    visible = torch.nonzero(mask[0] == 0).flatten()[0].item()
    masked = torch.nonzero(mask[0] == 1).flatten()[0].item()
    grid, p = model.config.grid_size, model.config.patch_size

    def perturb(patch: int) -> torch.Tensor:
        out = imgs.clone()
        r, c = divmod(patch, grid)
        out[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += 5 * torch.randn(3, p, p, generator=g)
        return out

    base = model.forward_loss(imgs, pred, mask)
    assert torch.equal(base, loss)
    assert torch.equal(model.forward_loss(perturb(visible), pred, mask), base)
    assert not torch.equal(model.forward_loss(perturb(masked), pred, mask), base)
    pred = pred.clone().requires_grad_(True)
    model.forward_loss(imgs, pred, mask).backward()
    assert (pred.grad[mask == 0] == 0).all() and (pred.grad[mask == 1] != 0).any()


def test_patchify_round_trip():
    model = MaskedAutoencoder(mae_preset("mae_tiny"))
    imgs = torch.randn(2, 3, 224, 224)
    x = model.patchify(imgs)
    assert x.shape == (2, 196, 16 * 16 * 3)
    assert torch.equal(x[0, 15], imgs[0, :, 16:32, 16:32].permute(1, 2, 0).reshape(-1))  # patch (1, 1)
    assert torch.equal(model.unpatchify(x), imgs)


def test_init_is_the_mae_init():
    cfg = MAEConfig(embed_dim=768, depth=2, num_heads=12, decoder_depth=1)
    torch.manual_seed(0)
    model = MaskedAutoencoder(cfg)
    hf = hf_mae(cfg)  # transformers' own sine-cosine tables, in the layout of the released weights; (5.24 leaves
    hf.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False  # them zero in a model built from
    hf.vit.embeddings.initialize_weights()  # a config, so its init functions are called directly)
    hf.decoder.initialize_weights(cfg.num_patches)
    assert hf.vit.embeddings.position_embeddings.abs().sum() > 0
    assert torch.allclose(model.pos_embed, hf.vit.embeddings.position_embeddings, atol=1e-6)
    assert torch.allclose(model.decoder_pos_embed, hf.decoder.decoder_pos_embed, atol=1e-6)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert (model.pos_embed[0, 0] == 0).all()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert (m.weight == 1).all() and (m.bias == 0).all(), name
        elif isinstance(m, torch.nn.Linear):
            bound = math.sqrt(6 / (m.in_features + m.out_features))  # xavier-uniform
            assert (m.bias == 0).all(), name
            assert m.weight.abs().max() <= bound, name
            assert abs(m.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.05, name
    w = model.patch_embed.proj.weight.flatten(1)  # initialised as a linear (768 -> 768), not as a conv
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    for token in (model.cls_token, model.mask_token):
        assert abs(token.std().item() / 0.02 - 1) < 0.15 and abs(token.mean().item()) < 0.005
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)


def test_the_block_on_a_sequence_is_the_global_block():
    cfg = EncoderConfig(img_size=128, embed_dim=64, depth=1, num_heads=2, use_rel_pos=False, window_size=0,
                        global_attn_indexes=(), out_chans=None)
    blk = randomize_(Block(cfg, 0)).eval()
    x = torch.randn(2, 8, 8, 64)
    with torch.no_grad():
        grid = blk(x)
        seq = blk(x.flatten(1, 2))  # one forward: a (B,N,C) sequence is global attention over N tokens
    assert torch.allclose(seq, grid.flatten(1, 2), atol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients():
    model = randomize_(MaskedAutoencoder(mae_preset("mae_tiny")))
    imgs = torch.randn(2, 3, 224, 224)
    noise = torch.rand(2, 196)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)(imgs, noise=noise)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n, g in grads[0].items():
        assert torch.allclose(grads[1][n], g, rtol=1e-5, atol=1e-7), n


def test_bad_input_is_a_clear_error():
    model = MaskedAutoencoder(mae_preset("mae_tiny"))
    with pytest.raises(ValueError, match=r"MAE input: expected a float tensor \(B,3,224,224\)"):
        model(torch.randn(1, 3, 256, 256))
    with pytest.raises(ValueError, match="noise: expected shape"):
        model(torch.randn(1, 3, 224, 224), noise=torch.rand(1, 10))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(torch.randn(1, 3, 224, 224), mask_ratio=1.0)
    with pytest.raises(ValueError, match="unknown MAE preset"):
        mae_preset("mae_vit_x")
    with pytest.raises(ValueError, match="not divisible"):
        MAEConfig(embed_dim=100, num_heads=12)
