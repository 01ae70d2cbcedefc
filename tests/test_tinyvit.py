"""TinyViT, MobileSAM's encoder: samvit's TinyViT against the official code (segment-anything-hq's tiny_vit_sam)
on random weights saved in the official layouts (a `mobile_sam.pt`-style full SAM state dict with SAM's own
decoder; HQ-SAM's `vit_tiny`), the Predictor against the official SamPredictor, the CLI, distillation."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

from tests._masks_utils import liven_decoder_
from tests.helpers import TINY, official_tiny_sam, randomize_
from samvit.bench.weights import randomize_tinyvit_
from samvit import Predictor, load_encoder
from samvit.checkpoints.files import CONFIG_METADATA_KEY, CheckpointError, write_tensors
from samvit.checkpoints.load import build_encoder, checkpoint_info, load_sam, save_encoder
from samvit.cli import main
from samvit.config import TinyViTConfig, encoder_config_from_json, preset

with warnings.catch_warnings():  # the reference imports timm's deprecated module paths
    warnings.simplefilter("ignore")
    from segment_anything_hq.modeling.tiny_vit_sam import TinyViT as OfficialTinyViT

# A small TinyViT for the cheap tests: 256 px in, a 32-channel embedding on a 16x16 grid (TINY's decoder shape).
# (The official code keeps the resolution in the last patch merging only for a last width of 320, 448 or 576.)
SMALL = TinyViTConfig(img_size=256, embed_dims=(16, 32, 40, 320), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                      window_sizes=(7, 7, 14, 7), out_chans=32, name="small")


class MobileSAMTinyViT(OfficialTinyViT):
    """The official TinyViT as MobileSAM runs it: forward gives the embedding alone (segment-anything-hq's also
    returns the stage-1 features its HQ decoder fuses)."""

    def forward(self, x):
        return super().forward(x)[0]


def official_tinyvit(cls=OfficialTinyViT):
    """TinyViT-5M as MobileSAM's and segment-anything-hq's build_sam_vit_t make it."""
    return cls(img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
               num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
               drop_path_rate=0.0, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8)


def official_mobile_sam(seed: int = 0):
    """MobileSAM: the official Sam with TinyViT-5M and SAM's own prompt encoder and mask decoder, random weights."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    sam = Sam(image_encoder=official_tinyvit(MobileSAMTinyViT),
              prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                           mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                  depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
                  iou_head_hidden_dim=256))
    randomize_(sam, seed)
    randomize_tinyvit_(sam.image_encoder, seed)
    liven_decoder_(sam)
    return sam.eval()  # eval() after the weights: the official Attention caches its bias table in eval()


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    """|a - b| within rel of b's largest magnitude (scale-aware), elementwise."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert a.shape == b.shape
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rel * max(scale, 1e-6), f"max |diff| {err:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def mobile(tmp_path_factory, coffee):
    """mobile_sam.pt (official layout: every image_encoder.* tensor, the unused classifier head and the BatchNorm
    counters included), the official SamPredictor on the photo, and the official stage-1 features."""
    from segment_anything import SamPredictor

    d = tmp_path_factory.mktemp("tinyvit")
    sam = official_mobile_sam()
    path = str(d / "mobile_sam.pt")
    torch.save(sam.state_dict(), path)
    stage1 = []
    hook = sam.image_encoder.layers[1].register_forward_hook(lambda m, i, o: stage1.append(o.view(1, 64, 64, -1)))
    official = SamPredictor(sam)
    official.set_image(coffee)
    hook.remove()
    return {"dir": d, "path": path, "sam": sam, "official": official, "stage1": stage1[0]}


def test_embedding_and_masks_equal_the_official(mobile, coffee):
    """Predictor.from_checkpoint(mobile_sam.pt): the architecture inferred from the tensors, the embedding, the
    stage-1 features, and the logits and scores of point, box and mask prompts as the official SamPredictor."""
    official = mobile["official"]
    predictor = Predictor.from_checkpoint(mobile["path"], dtype=torch.float32)
    assert predictor.model_name == "tinyvit_5m" and predictor.encoder.config == preset("tinyvit_5m")
    stage1 = []  # the stage-1 features HQ-SAM's decoder fuses: stage 1's patch merging output, (B,C,h,w)
    hook = predictor.encoder.layers[1].downsample.register_forward_hook(lambda m, i, o: stage1.append(o))
    predictor.set_image(coffee)
    hook.remove()
    emb = predictor.features
    assert emb.shape == (1, 256, 64, 64) and official.features.shape == (1, 256, 64, 64)
    close(emb, official.features)
    close(stage1[0].permute(0, 2, 3, 1), mobile["stage1"])
    # the embedding depends on the image (random weights that pass nothing on would make the comparison vacuous)
    assert (official.features - official.features.mean((2, 3), keepdim=True)).abs().mean() > 0.1
    prompts = [dict(point_coords=np.array([[350.0, 180.0], [120.5, 300.0]]), point_labels=np.array([1, 0])),
               dict(box=np.array([60.0, 40.0, 400.0, 300.0]), multimask_output=False)]
    for prompt in prompts:
        ref_logits, ref_scores, ref_low = official.predict(**prompt, return_logits=True)
        logits, scores, low = predictor.predict(**prompt, return_logits=True)
        close(logits, ref_logits)
        close(scores, ref_scores)
        close(low, ref_low)
        ref2 = official.predict(**prompt, mask_input=ref_low[:1], return_logits=True)
        got2 = predictor.predict(**prompt, mask_input=low[:1], return_logits=True)
        close(got2[0], ref2[0])
        close(got2[1], ref2[1])


def test_hq_vit_tiny_checkpoint_loads_the_same_encoder(mobile, tmp_path):
    """segment-anything-hq's `vit_tiny` (TinyViT with the HQ decoder, saved by the official code): load_encoder
    infers TinyViT-5M from the tensors and holds the same weights as the official model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from segment_anything_hq import sam_model_registry

    hq = sam_model_registry["vit_tiny"]()
    sd = hq.state_dict()
    ours = {k: v for k, v in mobile["sam"].state_dict().items() if k.startswith("image_encoder.")}
    assert set(ours) == {k for k in sd if k.startswith("image_encoder.")}
    sd.update(ours)
    path = str(tmp_path / "sam_hq_vit_tiny.pth")
    torch.save(sd, path)
    enc = load_encoder(checkpoint=path, dtype=torch.float32)
    assert type(enc).__name__ == "TinyViT" and enc.config == preset("vit_tiny")
    got = enc.state_dict()
    for k, v in got.items():
        assert torch.equal(v, sd["image_encoder." + k]), k
    assert not any(k.startswith(("head.", "norm_head.")) for k in got)  # the classifier head is not the encoder's
    info = checkpoint_info(path)
    assert info["config"].name == "tinyvit_5m"
    assert info["num_parameters"] == enc.num_parameters()


def test_segment_cli_runs(mobile, coffee, capsys):
    """`samvit segment` on mobile_sam.pt: the mask PNG agrees with the official mask where the logits are clear."""
    from PIL import Image

    d = mobile["dir"]
    image, out = str(d / "coffee.png"), str(d / "mask.png")
    Image.fromarray(coffee).save(image)
    rc = main(["segment", image, "--point", "350,180", "--checkpoint", mobile["path"], "--out", out,
               "--dtype", "float32"])
    assert rc == 0, capsys.readouterr().err
    prompt = dict(point_coords=np.array([[350.0, 180.0]]), point_labels=np.array([1]), multimask_output=False)
    masks, scores, _ = mobile["official"].predict(**prompt)
    logits, _, _ = mobile["official"].predict(**prompt, return_logits=True)
    best = int(np.argmax(scores))
    got = np.asarray(Image.open(out)) == 255
    assert got.shape == masks.shape[1:]
    assert not ((got != masks[best]) & (np.abs(logits[best]) > 1e-3)).any()
    assert 0.01 < masks[best].mean() < 0.99


def test_small_config_json_metadata_dtype_and_errors(tmp_path):
    """A small TinyViT: its config survives save_encoder / load_encoder (metadata) and a JSON round trip; the
    official code on the same weights gives the same features at 256 px (the official neck input is fixed at 64x64,
    so the comparison is of the stage outputs); bfloat16 runs; damaged files are refused by name."""
    assert encoder_config_from_json(SMALL.to_json()) == SMALL
    assert encoder_config_from_json(TINY.to_json()) == TINY  # the ViT's JSON is unchanged (no family field)
    torch.manual_seed(0)
    enc = randomize_tinyvit_(build_encoder(SMALL), 1).eval()
    path = str(tmp_path / "small.safetensors")
    save_encoder(enc, path)
    back = load_encoder(checkpoint=path, dtype=torch.float32)
    assert back.config == SMALL and back.config.name == "small"
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        y = enc(x)
        assert y.shape == (2, 32, 16, 16)
        assert torch.equal(back(x), y)
        ref = OfficialTinyViT(img_size=256, embed_dims=list(SMALL.embed_dims), depths=list(SMALL.depths),
                              num_heads=list(SMALL.num_heads), window_sizes=list(SMALL.window_sizes),
                              drop_path_rate=0.0)
        # the official neck is 256 channels wide: every tensor but the neck's
        missing, unexpected = ref.load_state_dict({k: v for k, v in enc.state_dict().items()
                                                   if not k.startswith("neck.")}, strict=False)
        assert {k.split(".")[0] for k in missing} == {"neck", "norm_head", "head"} and not unexpected
        ref.eval()
        t, stages = ref.patch_embed(x), []
        for layer in ref.layers:
            t = layer(t)
            stages.append(t)
        close(enc.forward_features(x), t.view(2, 16, 16, -1))
        out, inter = enc.forward_intermediates(x, stages=None)
        assert torch.equal(out, y) and [tuple(s.shape) for s in inter] == [(2, 32, 32, 32), (2, 16, 16, 40),
                                                                           (2, 16, 16, 320), (2, 16, 16, 320)]
        for ours, theirs in zip(inter, stages):
            close(ours, theirs.view(ours.shape))
        low = load_encoder(checkpoint=path, dtype=torch.bfloat16)
        yb = low(x)
        assert yb.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(yb.flatten(1), y.flatten(1)).min().item()
        assert cos > 0.99
    # trains after an inference_mode forward (the attention's cached offset index is no inference tensor)
    from samvit.modeling.tinyvit import bias_index

    bias_index.cache_clear()
    with torch.inference_mode():
        enc(x[:1])
    enc.train()
    enc(x[:1]).square().mean().backward()
    assert enc.layers[1].blocks[0].attn.attention_biases.grad.abs().sum() > 0
    enc.eval()
    sd = dict(enc.state_dict())
    del sd["layers.1.blocks.0.attn.qkv.weight"]
    bad = str(tmp_path / "bad.safetensors")
    write_tensors(bad, sd, {CONFIG_METADATA_KEY: SMALL.to_json()})
    with pytest.raises(CheckpointError, match="missing keys: layers.1.blocks.0.attn.qkv.weight"):
        load_encoder(checkpoint=bad)
    with pytest.raises(CheckpointError, match="attn.norm.weight"):  # nor can it be inferred
        load_encoder(checkpoint={k: v for k, v in sd.items() if "attn.norm" not in k})
    with pytest.raises(ValueError, match="one entry per stage"):
        TinyViTConfig(depths=(2, 2, 6))


def test_predictor_on_small_tinyvit_with_decoder(tmp_path):
    """A full SAM checkpoint with a small TinyViT (config in the metadata) and TINY's decoder: load_sam builds
    both, the decoder's grid follows the encoder's, and a TinyViT file without metadata is refused for another
    model by name."""
    sam = official_tiny_sam(TINY)
    enc = randomize_tinyvit_(build_encoder(SMALL), 2).eval()
    sd = {k: v for k, v in sam.state_dict().items() if not k.startswith(("image_encoder.", "pixel_"))}
    sd.update({"image_encoder." + k: v for k, v in enc.state_dict().items()})
    path = str(tmp_path / "small_sam.safetensors")
    write_tensors(path, sd, {CONFIG_METADATA_KEY: SMALL.to_json()})
    encoder, decoder = load_sam(path, dtype=torch.float32)
    assert encoder.config == SMALL and decoder.config.image_embedding_size == 16
    p = Predictor.from_checkpoint(path, dtype=torch.float32, img_size=512)  # TinyViT runs at any multiple of 16
    assert p.encoder.config.img_size == 512 and p.decoder.config.image_embedding_size == 32
    with pytest.raises(CheckpointError, match="does not fit model 'vit_b'"):
        load_encoder("vit_b", checkpoint=path)


def test_info_and_presets(capsys):
    """`samvit info` lists TinyViT-5M and describes it (vit_tiny is its alias; vit_t stays the ViT-Ti student)."""
    assert main(["info"]) == 0
    assert "tinyvit_5m" in capsys.readouterr().out
    assert main(["info", "--model", "vit_tiny", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["family"] == "tinyvit" and d["embedding"] == [256, 64, 64] and d["released_weights"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_official = sum(p.numel() for n, p in official_tinyvit().named_parameters() if "head" not in n)
    assert d["parameters"] == n_official
    assert main(["info", "--model", "tinyvit_5m"]) == 0
    assert "TinyViT stages" in capsys.readouterr().out
    assert preset("vit_t").family == "vit" and preset("vit_t").embed_dim == 192


def test_distill_offers_tinyvit_student(tmp_path):
    """`samvit train distill --student tinyvit`: TinyViT-5M for a 1024 teacher with a 256-channel embedding
    (refused for another embedding shape); a JSON TinyViT student trains a few steps on a small teacher and its
    outputs load as TinyViT (student.safetensors, sam_student.pth with the teacher's decoder)."""
    from samvit.train.distill import student_config

    assert student_config("tinyvit", preset("vit_b")) == preset("tinyvit_5m")
    with pytest.raises(ValueError, match="channels"):
        student_config("tinyvit", TINY)
    sam = liven_decoder_(official_tiny_sam(TINY, seed=3))
    teacher = str(tmp_path / "teacher.safetensors")
    write_tensors(teacher, sam.state_dict(), {CONFIG_METADATA_KEY: TINY.to_json()})
    student_json = str(tmp_path / "student.json")
    with open(student_json, "w") as fh:
        json.dump(SMALL.to_dict(), fh)
    run = str(tmp_path / "run")
    assert main(["train", "distill", "--teacher", teacher, "--student", student_json, "--data", "synthetic",
                 "--synthetic-size", "4", "--batch-size", "2", "--steps", "3", "--lr", "1e-3", "--quiet",
                 "--out", run]) == 0
    student = load_encoder(checkpoint=os.path.join(run, "student.safetensors"), dtype=torch.float32)
    assert student.config == SMALL
    init = build_encoder(SMALL)
    assert not torch.equal(student.state_dict()["layers.1.blocks.0.attn.qkv.weight"],
                           init.state_dict()["layers.1.blocks.0.attn.qkv.weight"])
    # a .pth has no metadata and no TinyViT tensor records the input size: read at 1024 (MobileSAM's) by default
    p = Predictor.from_checkpoint(os.path.join(run, "sam_student.pth"), dtype=torch.float32, img_size=256)
    assert p.encoder.config == SMALL and p.encoder.config.name == "tinyvit"
    assert torch.equal(p.encoder.state_dict()["neck.0.weight"], student.state_dict()["neck.0.weight"])


def test_bench_rows(tmp_path):
    """`samvit bench` takes a TinyViT: samvit's row runs against the yardstick (at a size the official code cannot
    run, the samvit reference path), peers without a TinyViT are skipped with the reason, the official row's model
    builds from the same weights; no timing is asserted."""
    from samvit.bench import report, runner
    from samvit.bench.peers import build, official_tinyvit
    from samvit.bench.weights import random_weights

    rec = runner.run_benchmark(SMALL, impls=["samvit", "official", "timm"], dtypes=["float32"], batch_sizes=[1],
                               allocators=["tuned"], threads=1, warmup=0, repeats=1, timeout=600, peak_size=None,
                               progress=False, label="test")
    rows = {r["impl"]: r for r in rec["runs"]}
    assert rec["reference_impl"] == "samvit-reference" and rec["flops_per_image"] > 0
    assert "error" not in rows["samvit"] and rows["samvit"]["out_shape"] == [1, 32, 16, 16]
    assert rows["samvit"]["max_abs"] <= 1e-5
    skipped = {s["impl"]: s["reason"] for s in rec["skipped"]}
    assert set(rows) == {"samvit"} and set(skipped) == {"official", "timm"}
    assert "1024" in skipped["official"] and "no TinyViT" in skipped["timm"]  # the official's fixed 64x64 grid
    assert "samvit fast path" in report.markdown(rec)
    cfg = preset("tinyvit_5m")
    sd = random_weights(cfg)
    fwd, in_dtype, autocast = build("official", cfg, sd, torch.float32)
    assert type(fwd).__name__ == "MobileSAMTinyViT" and not fwd.training and in_dtype == torch.float32
    attn = fwd.layers[1].blocks[0].attn
    assert torch.equal(attn.attention_biases, sd["layers.1.blocks.0.attn.attention_biases"])
    assert torch.equal(attn.ab, attn.attention_biases[:, attn.attention_bias_idxs])  # its eval() cache: the loaded
    with pytest.raises(ValueError, match="1024"):
        official_tinyvit(SMALL)
    with pytest.raises(ValueError, match="no TinyViT"):
        build("transformers", cfg, sd, torch.float32)


def test_serve_runs_a_tinyvit(tmp_path):
    """`samvit serve`'s app on a (small) TinyViT SAM: an embedding request and a click give the Predictor's masks."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    import base64
    import io

    from PIL import Image

    from tests._serve_utils import object_image, png_bytes, running
    from samvit.serve import ServeConfig, create_app

    sam = liven_decoder_(official_tiny_sam(TINY, seed=4))
    sd = {k: v for k, v in sam.state_dict().items() if not k.startswith(("image_encoder.", "pixel_"))}
    sd.update({"image_encoder." + k: v for k, v in randomize_tinyvit_(build_encoder(SMALL), 4).state_dict().items()})
    path = str(tmp_path / "small_sam.safetensors")
    write_tensors(path, sd, {CONFIG_METADATA_KEY: SMALL.to_json()})
    rgb = object_image()
    reference = Predictor.from_checkpoint(path, dtype=torch.float32)
    reference.set_image(rgb)
    app = create_app(Predictor.from_checkpoint(path, dtype=torch.float32), ServeConfig(model_name="small"))
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/embeddings", files={"image": ("x.png", png_bytes(rgb), "image/png")})
        assert r.status_code == 200, r.text
        click = [160.0, 120.0]
        r = client.post("/v1/segment", json={"image_id": r.json()["id"], "points": [click], "labels": [1],
                                             "multimask": True})
        assert r.status_code == 200, r.text
    masks, scores, _ = reference.predict(np.array([click]), np.array([1]), multimask_output=True)
    got = r.json()
    assert len(got["masks"]) == 3 and got["best"] == int(np.argmax(scores)) and 0 < masks.sum() < masks.size
    for m, ref_mask in zip(got["masks"], masks):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(m["png"])))) > 127, ref_mask)


@pytest.mark.parametrize("what", ["pca", "distance"])
def test_inspect_refuses_a_tinyvit_in_one_line(what, tmp_path, capsys):
    """samvit inspect reads a ViT's attention blocks: on a TinyViT it is a usage error naming the model (exit 2),
    not a crash."""
    from PIL import Image

    path = str(tmp_path / "small.safetensors")
    save_encoder(randomize_tinyvit_(build_encoder(SMALL), 1), path)
    image = str(tmp_path / "a.png")
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(image)
    out = str(tmp_path / ("p.png" if what == "pca" else "d"))
    rc = main(["inspect", what, image, "--checkpoint", path, "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "'small' (TinyViT)" in err and "ViT checkpoint" in err, err
    assert not os.path.exists(out)


def _small_sam_checkpoint(path: str) -> str:
    """A full SAM checkpoint with the SMALL TinyViT (config in the metadata) and TINY's decoder."""
    sam = official_tiny_sam(TINY)
    enc = randomize_tinyvit_(build_encoder(SMALL), 3).eval()
    sd = {k: v for k, v in sam.state_dict().items() if not k.startswith(("image_encoder.", "pixel_"))}
    sd.update({"image_encoder." + k: v for k, v in enc.state_dict().items()})
    write_tensors(path, sd, {CONFIG_METADATA_KEY: SMALL.to_json()})
    return path


def test_train_sam_setup_on_a_tinyvit(tmp_path):
    """The fine-tuning model's encoder hooks work for TinyViT's stages: LoRA on the attention blocks (qkv, proj and
    the MLP's fc1/fc2), layer-wise lr decay over all blocks (a stage's downsampling with its last block, as the
    official set_layer_lr_decay), no weight decay on the attention biases, one FSDP unit per block."""
    from samvit.modeling.lora import LoRALinear
    from samvit.train.finetune import build_sam
    from samvit.train.optim import param_groups

    ck = _small_sam_checkpoint(str(tmp_path / "small_sam.safetensors"))
    sam = build_sam(ck, train_parts="encoder,prompt,decoder", layer_decay=0.5, drop_path=0.1)
    depth = sum(SMALL.depths)
    assert len(sam.fsdp_units()) == depth
    scale = {n: g.get("lr_scale", 1.0) for g in param_groups(sam, 0.05) for n in g["param_names"]}
    assert scale["image_encoder.patch_embed.seq.0.c.weight"] == 0.5 ** (depth + 1)
    assert scale["image_encoder.layers.0.blocks.0.conv1.c.weight"] == 0.5 ** depth  # block 0
    assert scale["image_encoder.layers.2.blocks.1.attn.qkv.weight"] == 0.5 ** (depth - 3)  # block 3 of 5
    assert scale["image_encoder.layers.0.downsample.conv1.c.weight"] == 0.5 ** depth  # with block 0
    assert scale["image_encoder.neck.0.weight"] == 1.0 and scale["mask_decoder.iou_token.weight"] == 1.0
    nd = {n for g in param_groups(sam, 0.05) if g["weight_decay"] == 0 for n in g["param_names"]}
    assert "image_encoder.layers.1.blocks.0.attn.attention_biases" in nd
    assert "image_encoder.layers.1.blocks.0.attn.qkv.weight" not in nd
    blocks = [b for b in sam.image_encoder.block_list() if hasattr(b, "attn")]
    lora = build_sam(ck, train_parts="prompt,decoder", lora_rank=2, lora_targets=("qkv", "proj", "mlp"))
    wrapped = [n for n, m in lora.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 * len(blocks) and any(n.endswith("mlp.fc1") for n in wrapped)


def test_train_sam_runs_on_a_tinyvit_and_its_output_loads(tmp_path):
    """`samvit train sam` on a TinyViT checkpoint (LoRA, layer decay, drop path, checkpointing): it trains, and
    final.pth / final.safetensors load back as a TinyViT SAM (BatchNorm counters kept as integers)."""
    ck = _small_sam_checkpoint(str(tmp_path / "small_sam.safetensors"))
    out = tmp_path / "run"
    assert main(["train", "sam", "--data", "synthetic", "--synthetic-size", "4", "--masks-per-image", "2",
                 "--iterations", "1", "--checkpoint", ck, "--out", str(out), "--batch-size", "1", "--steps", "2",
                 "--train", "prompt,decoder", "--lora-rank", "2", "--lora-targets", "qkv,mlp", "--layer-decay", "0.8",
                 "--drop-path", "0.1", "--checkpointing", "--device", "cpu", "--quiet"]) == 0
    encoder, _ = load_sam(str(out / "final.safetensors"), dtype=torch.float32)  # the config in its metadata
    assert type(encoder).__name__ == "TinyViT" and encoder.config == SMALL
    encoder, _ = load_sam(str(out / "final.pth"), dtype=torch.float32)  # official layout: shapes give the widths
    assert type(encoder).__name__ == "TinyViT" and encoder.config.embed_dims == SMALL.embed_dims
    sd = torch.load(out / "final.pth", weights_only=True)
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    assert counters and all(sd[k].dtype == torch.int64 for k in counters)
