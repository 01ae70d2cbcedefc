"""Checkpoint layouts: official <-> transformers (SamModel / SamVisionModel) <-> timm (samvit_*) <-> samvit.

Round trips are tensor-equal; loading the same random weights into transformers and timm gives samvit's
embedding (fp32, 1024 input, max abs <= 1e-4)."""
from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch

from samvit import ImageEncoder, load_encoder, preset
from samvit.cli import main
from samvit.checkpoints.convert import convert_checkpoint
from samvit.checkpoints.keymaps import detect_format, from_official, to_official
from samvit.checkpoints.files import CheckpointError, read_checkpoint
from samvit.checkpoints.keymaps import encoder_state_dict

from tests.helpers import TINY, official_sam, official_tiny_sam

TOL = 1e-4


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _hf_tiny_config():
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    c = TINY
    vision = SamVisionConfig(hidden_size=c.embed_dim, output_channels=c.out_chans, num_hidden_layers=c.depth,
                             num_attention_heads=c.num_heads, image_size=c.img_size, patch_size=c.patch_size,
                             window_size=c.window_size, global_attn_indexes=list(c.global_attn_indexes),
                             num_pos_feats=c.out_chans // 2)
    prompt = SamPromptEncoderConfig(hidden_size=c.out_chans, image_size=c.img_size, patch_size=c.patch_size)
    decoder = SamMaskDecoderConfig(hidden_size=c.out_chans, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                   iou_head_hidden_dim=64)
    return SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                     mask_decoder_config=decoder.to_dict())


@pytest.fixture(scope="module")
def tiny_sam():
    return official_tiny_sam()


@pytest.mark.parametrize("fmt", ["official", "transformers", "timm"])
def test_round_trip_in_memory(tiny_sam, fmt):
    full, enc = tiny_sam.state_dict(), tiny_sam.image_encoder.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm: "the prompt encoder and mask decoder are not written"
        for sd in (full, enc):
            out = from_official(sd, fmt)
            assert detect_format(out) == fmt
            assert _equal(encoder_state_dict(to_official(out)), enc)
    if fmt != "timm":  # timm holds the encoder only; the others keep the prompt encoder and mask decoder
        assert _equal(to_official(from_official(full, fmt)), full)
    if fmt == "transformers":  # a bare SamVisionEncoder state dict (no `vision_encoder.` prefix) is read too
        bare = {k[len("vision_encoder."):]: v for k, v in from_official(enc, fmt).items()}
        assert detect_format(bare) == "transformers" and _equal(to_official(bare), enc)


@pytest.mark.parametrize("fmt,suffix", [("safetensors", ".safetensors"), ("official", ".pth"),
                                        ("official", ".safetensors"), ("transformers", ".safetensors"),
                                        ("transformers", ".bin"), ("timm", ".safetensors"), ("timm", ".pth")])
def test_convert_files_there_and_back(tiny_sam, tmp_path, fmt, suffix):
    src = tmp_path / "sam_tiny.pth"
    torch.save(tiny_sam.state_dict(), src)
    mid, back = tmp_path / f"mid{suffix}", tmp_path / f"back{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert convert_checkpoint(src, mid, to=fmt, model=TINY) == "official"
        detected = convert_checkpoint(mid, back, to="official", model=TINY)
    assert detected == ("official" if fmt == "safetensors" else fmt)
    full, enc = tiny_sam.state_dict(), tiny_sam.image_encoder.state_dict()
    out, _ = read_checkpoint(back)
    if fmt in ("official", "transformers"):
        assert _equal(out, full)  # the whole SAM model survives
    else:
        assert _equal(out, {"image_encoder." + k: v for k, v in enc.items()})
    # samvit loads the intermediate file of every layout to the same weights
    assert _equal(load_encoder(TINY, checkpoint=mid).state_dict(), enc)


def test_transformers_file_loads_in_transformers(tiny_sam, tmp_path):
    """The transformers output is exactly SamModel's state dict (strict load), and gives the official masks."""
    from transformers import SamModel

    torch.save(tiny_sam.state_dict(), tmp_path / "sam.pth")
    convert_checkpoint(tmp_path / "sam.pth", tmp_path / "model.safetensors", to="transformers", model=TINY)
    hf_sd, _ = read_checkpoint(tmp_path / "model.safetensors")
    hf = SamModel(_hf_tiny_config()).eval()
    hf.load_state_dict(hf_sd, strict=True)

    x = torch.randn(2, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(1))
    coords = torch.tensor([[[40.0, 70.0], [200.0, 31.0]], [[128.0, 128.0], [5.0, 250.0]]])
    labels = torch.tensor([[1, 0], [1, 1]])
    with torch.no_grad():
        emb = tiny_sam.image_encoder(x)
        masks, iou = [], []
        for i in range(len(x)):  # the official decoder takes one image (and its prompts) per call
            sparse, dense = tiny_sam.prompt_encoder(points=(coords[i:i + 1], labels[i:i + 1]), boxes=None, masks=None)
            m, q = tiny_sam.mask_decoder(image_embeddings=emb[i:i + 1], image_pe=tiny_sam.prompt_encoder.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=True)
            masks.append(m)
            iou.append(q)
        masks, iou = torch.cat(masks), torch.cat(iou)
        hf_emb = hf.get_image_embeddings(x)
        out = hf(image_embeddings=hf_emb, input_points=coords[:, None], input_labels=labels[:, None],
                 multimask_output=True)
    assert (hf_emb - emb).abs().max() <= TOL
    assert (out.pred_masks[:, 0] - masks).abs().max() <= TOL
    assert (out.iou_scores[:, 0] - iou).abs().max() <= TOL


def test_transformers_model_folder(tiny_sam, tmp_path):
    """A transformers model folder (model.safetensors inside) is taken as the checkpoint."""
    (tmp_path / "hf").mkdir()
    torch.save(tiny_sam.state_dict(), tmp_path / "sam.pth")
    convert_checkpoint(tmp_path / "sam.pth", tmp_path / "hf" / "model.safetensors", to="transformers", model=TINY)
    assert _equal(load_encoder(TINY, checkpoint=tmp_path / "hf").state_dict(), tiny_sam.image_encoder.state_dict())
    with pytest.raises(CheckpointError, match="a folder without model.safetensors"):
        load_encoder(TINY, checkpoint=tmp_path)


def test_timm_tiny_parity(tiny_sam):
    """timm's VisionTransformerSAM of the tiny config, loaded from the timm layout, gives the official embedding."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    c = TINY
    model = VisionTransformerSAM(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                                 num_heads=c.num_heads, window_size=c.window_size, use_rel_pos=True,
                                 global_attn_indexes=c.global_attn_indexes, neck_chans=c.out_chans, num_classes=0,
                                 norm_layer=partial(torch.nn.LayerNorm, eps=c.norm_eps)).eval()
    model.load_state_dict(from_official(tiny_sam.image_encoder.state_dict(), "timm"), strict=True)
    x = torch.randn(2, 3, c.img_size, c.img_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model.forward_features(x) - tiny_sam.image_encoder(x)).abs().max() <= TOL


def test_unknown_keys_and_layouts_are_refused(tiny_sam, tmp_path):
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "foo.pth")
    with pytest.raises(CheckpointError, match="(?s)missing keys.*unexpected keys: foo.weight"):
        load_encoder(TINY, checkpoint=tmp_path / "foo.pth")
    with pytest.raises(ValueError, match="expected one of"):
        from_official(tiny_sam.state_dict(), "onnx")
    with pytest.raises(ValueError, match="expected one of"):
        convert_checkpoint(tmp_path / "foo.pth", tmp_path / "x.pth", to="onnx")


def test_timm_classifier_head_is_dropped(tiny_sam):
    sd = from_official(tiny_sam.image_encoder.state_dict(), "timm")
    sd["head.fc.weight"] = torch.zeros(10, TINY.out_chans)
    with pytest.warns(UserWarning, match="classifier head"):
        assert _equal(encoder_state_dict(sd), tiny_sam.image_encoder.state_dict())


def test_cli_convert(tiny_sam, tmp_path, capsys):
    torch.save(tiny_sam.image_encoder.state_dict(), tmp_path / "enc.pth")
    rc = main(["convert", str(tmp_path / "enc.pth"), str(tmp_path / "enc_timm.safetensors"), "--to", "timm",
               "--model", "tiny_does_not_exist"])
    assert rc == 2 and "unknown model preset" in capsys.readouterr().err
    # official output of an encoder-only input gets the image_encoder. prefix
    sd = from_official(tiny_sam.image_encoder.state_dict(), "timm")
    torch.save(sd, tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match="no preset matches"):
        convert_checkpoint(tmp_path / "t.pth", tmp_path / "o.pth", to="official")
    assert convert_checkpoint(tmp_path / "t.pth", tmp_path / "o.pth", to="official", model=TINY) == "timm"
    out, _ = read_checkpoint(tmp_path / "o.pth")
    assert all(k.startswith("image_encoder.") for k in out)
    assert main(["convert", str(tmp_path / "o.pth"), str(tmp_path / "o.pth"), "--to", "official"]) == 2
    assert "output is the input" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "o.pth"), str(tmp_path / "x.pth"), "--to", "safetensors"]) == 2


# ---- parity on vit_b: the same random weights in samvit, transformers and timm, fp32, 1024 input ----

@pytest.fixture(scope="module")
def vit_b():
    """Randomised official vit_b state dict, a 1024 input, and samvit's embedding of it."""
    from samvit import tune_allocator

    tune_allocator()
    sd = official_sam("vit_b").state_dict()
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    enc = ImageEncoder(preset("vit_b")).eval()
    enc.load_state_dict(encoder_state_dict(sd), strict=True)
    with torch.no_grad():
        ref = enc(x)
    assert ref.std() > 1e-2  # a real embedding, not a constant two implementations could trivially agree on
    return sd, x, ref


def test_parity_transformers_sam_model(vit_b):
    """Official vit_b -> transformers layout -> SamModel (strict) and SamVisionModel (strict): same embedding.

    Both hold the same SamVisionEncoder class; the forward runs once, through SamModel, after checking that
    SamVisionModel received the identical tensors."""
    from transformers import SamConfig, SamModel, SamVisionConfig, SamVisionModel

    sd, x, ref = vit_b
    hf_full = from_official(sd, "transformers")
    enc_only = {k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")}
    hf_vision = from_official(enc_only, "transformers")
    assert _equal(encoder_state_dict(hf_full), enc_only) and _equal(encoder_state_dict(hf_vision), enc_only)
    with torch.device("meta"):
        model, vision = SamModel(SamConfig()), SamVisionModel(SamVisionConfig())
    model.load_state_dict(hf_full, strict=True, assign=True)
    vision.load_state_dict(hf_vision, strict=True, assign=True)
    model.eval()
    assert _equal(vision.vision_encoder.state_dict(), model.vision_encoder.state_dict())
    with torch.no_grad():
        out = model.get_image_embeddings(x)
    err = (out - ref).abs().max().item()
    print(f"max abs {err:.2e}")
    assert out.shape == (1, 256, 64, 64) and err <= TOL, err


def test_parity_timm(vit_b):
    """Official vit_b -> timm layout -> timm samvit_base_patch16 (strict): same embedding.

    timm builds its block LayerNorms with nn.LayerNorm's default eps 1e-5; SAM uses 1e-6. The model is built with
    norm_layer=LayerNorm(eps=1e-6), which timm's API accepts, so the comparison is exact arithmetic. timm's own
    `samvit_*` models (and its pretrained SAM weights) run with eps 1e-5, a small deviation from SAM."""
    import timm

    sd, x, ref = vit_b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tsd = from_official(sd, "timm")
    model = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    assert model.blocks[0].norm1.eps == 1e-6
    model.load_state_dict(tsd, strict=True)
    with torch.no_grad():
        out = model.forward_features(x)
    err = (out - ref).abs().max().item()
    print(f"max abs {err:.2e}")
    assert out.shape == (1, 256, 64, 64) and err <= TOL, err
