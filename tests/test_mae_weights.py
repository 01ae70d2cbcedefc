"""MAE checkpoints in: official files (timm-style keys; timm's VisionTransformer is the oracle for the encoder,
as the official MAE encoder is one) and transformers' ViTMAE files and state dicts (transformers is the oracle)."""
from __future__ import annotations

import argparse

import pytest
import torch
from tests.helpers import randomize_

from samvit.config import MAEConfig, mae_preset
from samvit.train.mae_weights import infer_mae_config, load_mae
from samvit.checkpoints.files import CheckpointError

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TINY = mae_preset("mae_tiny")  # 224/16, width 64, depth 3, 2 heads; decoder 64 wide, depth 2, 2 heads


def timm_vit(cfg: MAEConfig, width: int, depth: int, heads: int, seed: int):
    """A timm VisionTransformer with the official MAE encoder's layout (class token, pos_embed incl. its entry,
    pre-norm blocks, final norm, no head), every parameter randomised."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=width, depth=depth,
                            num_heads=heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=0,
                            global_pool="token")
    return randomize_(vit, seed).eval()


def official_state(cfg: MAEConfig = TINY, decoder: bool = False, seed: int = 0):
    """(timm encoder, timm decoder-block stack or None, state dict with the official models_mae key names)."""
    enc = timm_vit(cfg, cfg.embed_dim, cfg.depth, cfg.num_heads, seed)
    sd = dict(enc.state_dict())
    if not decoder:
        return enc, None, sd
    dec = timm_vit(cfg, cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, seed + 1)
    sd.update({f"decoder_{k}": v for k, v in dec.state_dict().items() if k.startswith("blocks.")})
    g = torch.Generator().manual_seed(seed + 2)
    D, p = cfg.decoder_embed_dim, cfg.patch_size
    sd.update({"decoder_embed.weight": 0.02 * torch.randn(D, cfg.embed_dim, generator=g),
               "decoder_embed.bias": 0.02 * torch.randn(D, generator=g),
               "mask_token": 0.02 * torch.randn(1, 1, D, generator=g),
               "decoder_pos_embed": 0.1 * torch.randn(1, cfg.num_patches + 1, D, generator=g),
               "decoder_norm.weight": 1 + 0.1 * torch.randn(D, generator=g),
               "decoder_norm.bias": 0.05 * torch.randn(D, generator=g),
               "decoder_pred.weight": 0.02 * torch.randn(p * p * 3, D, generator=g),
               "decoder_pred.bias": 0.05 * torch.randn(p * p * 3, generator=g)})
    return enc, dec, sd


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def in_order_noise(batch: int, L: int) -> torch.Tensor:
    return torch.arange(L, dtype=torch.float32).expand(batch, L)  # argsort = identity: tokens keep their order


def test_official_pretrain_checkpoint_is_encoder_only(tmp_path):
    enc, _, sd = official_state()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": sd}, path)
    model, report = load_mae(path)
    assert model.config == TINY  # sizes from the tensors, heads and decoder from the preset of that width
    assert report.format == "official"
    expected_missing = sorted(k for k in model.state_dict() if k.startswith(("decoder_", "mask_token")))
    assert report.missing == expected_missing and len(report.loaded) == len(sd)
    assert "the decoder is not in it" in str(report) and "decoder_blocks.0-1" in str(report)
    assert torch.equal(model.blocks[2].mlp.lin1.weight, sd["blocks.2.mlp.fc1.weight"])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        latent, mask, _ = model.eval().forward_encoder(x, 0.0, in_order_noise(2, 196))
        ref = enc.forward_features(x)
    assert (mask == 0).all() and rel_err(latent, ref) <= 1e-5


def test_official_full_checkpoint_and_training_script_args(tmp_path):
    _, dec, sd = official_state(decoder=True)
    path = tmp_path / "checkpoint-799.pth"  # what main_pretrain.py writes: the model with its args and epoch
    torch.save({"model": sd, "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75), "epoch": 799}, path)
    model, report = load_mae(path)
    assert not report.missing and len(report.loaded) == len(sd)
    assert model.config == TINY
    assert torch.equal(model.decoder_pred.weight, sd["decoder_pred.weight"])
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        for ours, ref in zip(model.decoder_blocks, dec.blocks):
            assert rel_err(ours(x), ref(x)) <= 1e-5


def test_official_checkpoint_loads_strictly(tmp_path):
    _, _, sd = official_state(decoder=True)
    with pytest.raises(CheckpointError, match=r"unexpected keys: head.weight"):
        load_mae({**sd, "head.weight": torch.zeros(10, 64)})
    with pytest.raises(CheckpointError, match=r"wrong shapes: blocks.1.attn.qkv.weight"):
        load_mae({**sd, "blocks.1.attn.qkv.weight": torch.zeros(10, 64)})
    partial = {k: v for k, v in sd.items() if k != "decoder_norm.weight"}  # a decoder, but not all of it
    with pytest.raises(CheckpointError, match=r"missing keys: decoder_norm.weight"):
        load_mae(partial)
    no_norm = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    with pytest.raises(CheckpointError, match=r"missing keys: norm.bias, norm.weight"):
        load_mae(no_norm)
    with pytest.raises(CheckpointError, match="cannot infer the number of encoder heads for width 96"):
        load_mae(official_state(MAEConfig(embed_dim=96, depth=1, num_heads=3))[2])
    model, _ = load_mae(official_state(MAEConfig(embed_dim=96, depth=1, num_heads=3))[2],
                        config=MAEConfig(embed_dim=96, depth=1, num_heads=3))
    assert model.config.num_heads == 3
    path = tmp_path / "evil.pth"
    torch.save({"model": sd, "hook": torch.nn.Identity()}, path)  # needs code to unpickle
    with pytest.raises(CheckpointError, match="weights_only"):
        load_mae(path)


def hf_tiny(seed: int = 0):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    cfg = ViTMAEConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=256,
                       decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
                       decoder_intermediate_size=256, layer_norm_eps=1e-6, norm_pix_loss=True)
    torch.manual_seed(seed)
    return randomize_(ViTMAEForPreTraining(cfg), seed).eval()


def test_transformers_files(tmp_path):
    hf = hf_tiny()
    hf.save_pretrained(tmp_path / "hf")  # the file layout: vit.encoder.layer.N.attention.attention.query, ...
    from safetensors.torch import load_file, save_file

    file_sd = load_file(tmp_path / "hf" / "model.safetensors")
    assert any(".attention.attention.query." in k for k in file_sd)
    model, report = load_mae(tmp_path / "hf")
    assert model.config == TINY and not report.missing and report.format == "transformers"
    x = torch.randn(2, 3, 224, 224)
    noise = torch.rand(2, 196)
    with torch.no_grad():
        ref = hf(pixel_values=x, noise=noise)
        loss, pred, mask = model.eval()(x, noise=noise)
    assert torch.equal(mask, ref.mask) and rel_err(pred, ref.logits) <= 1e-5
    assert abs(loss.item() - ref.loss.item()) <= 1e-5 * ref.loss.item()
    # transformers 4.x wrote the decoder's layers as decoder.decoder_layers.N (5.x writes decoder_encoder.layer.N)
    legacy = {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v for k, v in file_sd.items()}
    assert legacy != file_sd
    save_file(legacy, tmp_path / "legacy.safetensors")
    legacy_model, _ = load_mae(tmp_path / "legacy.safetensors")
    for (k, a), b in zip(model.state_dict().items(), legacy_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_transformers_encoder_only_model():
    from transformers import ViTMAEModel

    hf = hf_tiny()
    enc = ViTMAEModel(hf.config).eval()
    enc.load_state_dict(hf.vit.state_dict())
    model, report = load_mae(enc.state_dict())  # ViTMAEModel keys: embeddings.*, layers.N.*, layernorm.*
    assert report.missing and all(k.startswith(("decoder_", "mask_token")) for k in report.missing)
    x = torch.randn(2, 3, 224, 224)
    noise = torch.rand(2, 196)
    with torch.no_grad():
        ref = enc(pixel_values=x, noise=noise).last_hidden_state
        latent, _, _ = model.eval().forward_encoder(x, 0.75, noise)
    assert rel_err(latent, ref) <= 1e-5


def test_official_vit_h_is_patch_14():
    meta = {"patch_embed.proj.weight": torch.empty(1280, 3, 14, 14, device="meta"),
            "pos_embed": torch.empty(1, 257, 1280, device="meta")}
    meta.update({f"blocks.{i}.mlp.lin1.weight": torch.empty(5120, 1280, device="meta") for i in range(32)})
    cfg = infer_mae_config(meta)
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (224, 14, 1280, 32, 16)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 8, 16)
