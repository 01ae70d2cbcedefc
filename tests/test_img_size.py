"""Other input sizes: the encoder against timm's ViT-SAM run at that size on the same weights; the size follows
through load_encoder, the Predictor, the embedding files and the CLI."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

import samvit
from samvit.checkpoints.keymaps import from_official

from tests.helpers import assert_close_scaled, randomize_

# ViT-B's width, heads, window and rel-pos head dim, two blocks (one windowed, one global) to keep it fast
WIDE = samvit.EncoderConfig(img_size=1024, embed_dim=768, depth=2, num_heads=12, window_size=14,
                            global_attn_indexes=(1,), name="vit_b_depth2")


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    enc = randomize_(samvit.ImageEncoder(WIDE), seed=5).eval()
    path = tmp_path_factory.mktemp("wide") / "wide.safetensors"
    samvit.save_encoder(enc, path)
    return enc, path


@pytest.mark.parametrize("size", [512, 768])
def test_encoder_at_other_sizes_matches_timm(wide_checkpoint, size):
    """timm's VisionTransformerSAM holding the 1024 weights resizes its position embedding (bicubic, antialiased)
    and relative-position tables (linear) itself for a smaller input; samvit resizes them once when loading."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    enc1024, path = wide_checkpoint
    c = WIDE
    timm_model = VisionTransformerSAM(img_size=1024, patch_size=16, embed_dim=c.embed_dim, depth=c.depth,
                                      num_heads=c.num_heads, window_size=c.window_size, use_rel_pos=True,
                                      global_attn_indexes=c.global_attn_indexes, neck_chans=c.out_chans,
                                      num_classes=0, norm_layer=partial(torch.nn.LayerNorm, eps=c.norm_eps)).eval()
    timm_model.load_state_dict(from_official(enc1024.state_dict(), "timm"), strict=True)
    enc = samvit.load_encoder(checkpoint=path, img_size=size, dtype="float32")
    g = size // 16
    assert enc.config.img_size == size and enc.pos_embed.shape == (1, g, g, 768)
    assert enc.blocks[1].attn.rel_pos_h.shape == (2 * g - 1, 64) and enc.blocks[0].attn.rel_pos_h.shape == (27, 64)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.inference_mode():
        want = timm_model.forward_features(x)
        got = enc(x)
        assert got.shape == (1, 256, g, g)
        assert_close_scaled(got, want, n=768)


def test_img_size_is_checked(wide_checkpoint):
    _, path = wide_checkpoint
    with pytest.raises(ValueError, match="multiple of the patch size"):
        samvit.load_encoder(checkpoint=path, img_size=500)


def test_predictor_and_embedding_files_follow_the_size(tiny_sam_checkpoint, tmp_path):
    from samvit.embeddings.files import embedding_img_size
    from samvit.embeddings.pipeline import FileSink, embed

    ckpt, img_path = tiny_sam_checkpoint
    pred = samvit.Predictor.from_checkpoint(ckpt, img_size=128, dtype="float32")
    dc = pred.decoder.config
    assert pred.img_size == 128 and dc.input_image_size == 128 and dc.image_embedding_size == 8
    assert pred.decoder.prompt_encoder.mask_input_size == (32, 32)
    pred.set_image(img_path)
    masks, scores, low = pred.predict(np.array([[20, 30]]), np.array([1]))
    assert masks.shape[1:] == (60, 80) and low.shape == (3, 32, 32)
    # files written at 128 record it; a predictor at another size refuses them
    sink = FileSink(str(tmp_path / "emb"))
    report = embed(pred.encoder, [(str(img_path), "a.png")], sink, workers=0)
    assert report.embedded == 1 and embedding_img_size(sink.written[0]) == 128
    pred.set_embedding(sink.written[0])
    assert_close_scaled(pred.features, samvit.Predictor.from_checkpoint(ckpt, img_size=128, dtype="float32")
                        .encoder(samvit.preprocess(img_path, 128).tensor[None]), k=8)
    other = samvit.Predictor.from_checkpoint(ckpt, with_encoder=False)
    with pytest.raises(ValueError, match="made at input size 128"):
        other.set_embedding(sink.written[0])


def test_cli_img_size_end_to_end(tiny_sam_checkpoint, tmp_path, capsys):
    from samvit.cli import main

    ckpt, img_path = tiny_sam_checkpoint
    out = tmp_path / "emb"
    assert main(["embed", str(img_path), "--checkpoint", str(ckpt), "--out", str(out), "--img-size", "128",
                 "--workers", "0", "--dtype", "auto"]) == 0
    assert "dtype float32 (auto: from SAMVIT_DTYPE)" in capsys.readouterr().err
    emb = next(out.rglob("*.safetensors"))
    # segment with the embedding: the size is taken from it; another size is refused
    args = ["segment", str(img_path), "--checkpoint", str(ckpt), "--embedding", str(emb), "--point", "20,30"]
    assert main(args + ["--out", str(tmp_path / "m.png")]) == 0
    assert main(args + ["--out", str(tmp_path / "m2.png"), "--img-size", "256"]) == 2
    assert "was made at --img-size 128, not 256" in capsys.readouterr().err
    assert main(["embed", str(img_path), "--checkpoint", str(ckpt), "--img-size", "100"]) == 2


@pytest.fixture
def tiny_sam_checkpoint(tmp_path):
    from PIL import Image

    from tests.helpers import official_tiny_sam

    from safetensors.torch import save_file

    from tests.helpers import TINY

    sam = official_tiny_sam()
    path = tmp_path / "tiny_sam.safetensors"
    save_file({k: v.contiguous() for k, v in sam.state_dict().items() if not k.startswith("pixel_")}, str(path),
              metadata={"samvit_config": TINY.to_json()})
    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)).save(img)
    return path, img


def test_resume_does_not_take_outputs_of_another_size(tiny_sam_checkpoint, tmp_path):
    """An output folder embedded at 128 is not 'done' for a run at the checkpoint's size: refused unless --force."""
    from samvit.embeddings.files import plan_outputs
    from samvit.embeddings.pipeline import FileSink, embed
    from samvit.errors import OutputError

    ckpt, img_path = tiny_sam_checkpoint
    enc = samvit.load_encoder(checkpoint=ckpt, img_size=128, dtype="float32")
    sink = FileSink(str(tmp_path / "emb"), "abc")
    assert embed(enc, [(str(img_path), "a.png")], sink, workers=0).embedded == 1
    items = [(str(img_path), "a.png")]
    kw = dict(model=enc.config.name, checkpoint_sha256="abc")
    assert plan_outputs(str(tmp_path / "emb"), items, img_size=128, **kw) != {}
    with pytest.raises(OutputError, match="input size"):
        plan_outputs(str(tmp_path / "emb"), items, img_size=enc.config.img_size * 2, **kw)
    assert plan_outputs(str(tmp_path / "emb"), items, img_size=256, force=True, **kw) == {}
