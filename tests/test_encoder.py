"""The encoder against the official segment-anything ImageEncoderViT on the same random weights."""
import numpy as np
import pytest
import torch
from tests.helpers import TINY, assert_close_scaled, official_sam, official_tiny_sam

import samvit
from samvit.embeddings.pipeline import encode_batch


@pytest.fixture(scope="module")
def vit_b(official_vit_b):
    return official_vit_b


@torch.inference_mode()
def _parity(model_type: str, tmp_path, seed: int) -> None:
    sam = official_sam(model_type, seed=seed)
    path = tmp_path / f"sam_{model_type}.pth"
    torch.save(sam.state_dict(), path)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(seed))
    ref = sam.image_encoder(x)
    del sam
    enc = samvit.load_encoder(checkpoint=path)  # preset inferred from the shapes
    assert enc.config.name == model_type
    out = enc(x)
    assert out.shape == (1, 256, 64, 64)
    assert ref.abs().mean() > 0.1  # a real signal, not a zeroed network
    assert_close_scaled(out, ref, n=enc.config.embed_dim)


def test_vit_b_parity_fast_and_reference(vit_b):
    sam, path = vit_b
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = sam.image_encoder(x)
        enc = samvit.load_encoder("vit_b", path)
        assert enc.kernel == "auto" and enc.attn_impl == "fast"
        assert_close_scaled(enc(x), ref, n=768)
        enc.set_attention("reference")
        assert_close_scaled(enc(x), ref, k=8)  # the reference path mirrors the official arithmetic


@pytest.mark.slow  # run by .ci/run after the default suite
def test_vit_l_parity(tmp_path):
    _parity("vit_l", tmp_path, seed=2)


@pytest.mark.slow  # run by .ci/run after the default suite
def test_vit_h_parity(tmp_path):
    _parity("vit_h", tmp_path, seed=3)


def test_end_to_end_from_image_file(vit_b, coffee, tmp_path):
    """Image file -> samvit.preprocess -> encoder equals SamPredictor.set_image -> get_image_embedding."""
    from PIL import Image
    from segment_anything import SamPredictor

    sam, path = vit_b
    img_path = tmp_path / "coffee.jpg"
    Image.fromarray(coffee).save(img_path, quality=92)
    predictor = SamPredictor(sam)
    predictor.set_image(np.asarray(Image.open(img_path).convert("RGB")))
    ref = predictor.get_image_embedding()

    enc = samvit.load_encoder("vit_b", path)
    prepared = samvit.preprocess(img_path)
    assert prepared.original_size == tuple(predictor.original_size) == (400, 600)
    assert prepared.input_size == tuple(predictor.input_size) == (683, 1024)
    out = encode_batch(enc, [prepared])
    assert_close_scaled(out, ref, n=768)


def test_batch_of_mixed_sizes_equals_one_at_a_time(astronaut, coffee):
    enc = samvit.ImageEncoder(TINY)
    official = official_tiny_sam(TINY, seed=4)
    enc.load_state_dict({k[len("image_encoder."):]: v for k, v in official.state_dict().items()
                         if k.startswith("image_encoder.")})
    tall = np.ascontiguousarray(coffee.transpose(1, 0, 2)[:, :300])
    items = [samvit.preprocess(im, img_size=TINY.img_size) for im in (astronaut, coffee, tall)]
    assert len({it.input_size for it in items}) == 3
    batched = encode_batch(enc.eval(), items)
    for i, it in enumerate(items):
        single = encode_batch(enc, [it])[0]
        assert_close_scaled(batched[i], single, n=TINY.embed_dim)
        with torch.inference_mode():
            assert_close_scaled(single, official.image_encoder(it.tensor[None])[0], n=TINY.embed_dim)


@pytest.mark.parametrize("img_size", [256, 320])
def test_tiny_configs_match_official(img_size):
    """Odd grids (not a multiple of the window) and several batch sizes, fast and reference paths."""
    cfg = samvit.EncoderConfig(img_size=img_size, embed_dim=64, depth=3, num_heads=4, window_size=6,
                               global_attn_indexes=(1,), out_chans=32)
    official = official_tiny_sam(cfg, seed=5)
    enc = samvit.ImageEncoder(cfg)
    enc.load_state_dict({k[len("image_encoder."):]: v for k, v in official.state_dict().items()
                         if k.startswith("image_encoder.")})
    x = torch.randn(3, 3, img_size, img_size)
    with torch.inference_mode():
        ref = official.image_encoder(x)
        for impl in ("fast", "reference"):
            assert_close_scaled(enc.set_attention(impl)(x), ref, n=cfg.embed_dim, msg=impl)


def test_vit_h_spec_arrangement():
    cfg = samvit.preset("vit_h_spec")
    with torch.device("meta"):
        enc = samvit.ImageEncoder(cfg)
    windows = [blk.window_size for blk in enc.blocks]
    assert windows == [8] * 16 + [0] * 16  # blocks 1-16 windowed 8x8, blocks 17-32 global
    assert enc.neck is None
    assert not any("rel_pos" in n for n, _ in enc.named_parameters())
    assert enc.pos_embed.shape == (1, 64, 64, 1280)
    assert len(enc.blocks) == 32 and enc.blocks[0].attn.num_heads == 16


@pytest.mark.slow  # run by .ci/run after the default suite
def test_vit_h_spec_forward_at_1024():
    torch.manual_seed(0)
    enc = samvit.ImageEncoder(samvit.preset("vit_h_spec")).eval()
    with torch.inference_mode():
        feats = enc(torch.randn(1, 3, 1024, 1024))
    assert feats.shape == (1, 64, 64, 1280)
    assert torch.isfinite(feats).all() and feats.abs().mean() > 0


def test_spec_arrangement_is_local_then_global():
    """Same arrangement on a small grid: a patch reaches beyond its window only through the global blocks."""
    import dataclasses

    cfg = dataclasses.replace(samvit.preset("vit_h_spec"), img_size=256, embed_dim=64, num_heads=4)
    torch.manual_seed(0)
    enc = samvit.ImageEncoder(cfg).eval()
    x = torch.randn(1, 3, 256, 256)
    x2 = x.clone()
    x2[:, :, :16, :16] += 1.0  # change the top-left patch only
    with torch.inference_mode():
        tokens = [enc.patch_embed(v) + enc.pos_embed for v in (x, x2)]
        for blk in enc.blocks[:16]:
            tokens = [blk(t) for t in tokens]
        diff = (tokens[0] - tokens[1]).abs().amax(-1)[0]
        assert diff[:8, :8].max() > 0 and diff[8:, :].max() == 0 and diff[:, 8:].max() == 0  # stayed in its 8x8 window
        for blk in enc.blocks[16:]:
            tokens = [blk(t) for t in tokens]
        diff = (tokens[0] - tokens[1]).abs().amax(-1)[0]
        assert diff[-1, -1] > 0  # the far corner sees it after the global blocks


def test_parameter_counts():
    counts = {}
    for name in ("vit_b", "vit_l", "vit_h"):
        with torch.device("meta"):
            counts[name] = samvit.ImageEncoder(samvit.preset(name)).num_parameters()
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        official = sam_model_registry["vit_h"]().image_encoder
    assert counts["vit_h"] == sum(p.numel() for p in official.parameters())
    assert round(counts["vit_h"] / 1e6, 1) == 637.0
