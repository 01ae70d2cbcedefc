"""HQ-SAM: samvit's HQ mask decoder and Predictor against the official `segment_anything_hq` on the same random
weights (official layout), hq_token_only and multimask_output both ways; embedding files; refusals."""
from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from tests._masks_utils import liven_decoder_
from tests.helpers import randomize_
from PIL import Image
from safetensors.torch import save_file

from samvit import CheckpointError, Predictor, PromptError, preset
from samvit.checkpoints.load import infer_decoder_config, load_decoder
from samvit.errors import ProvenanceError

TOL = 1e-4
H, W = 400, 600  # skimage coffee
CASES = {
    "points": dict(point_coords=np.array([[350.0, 180.0], [120.5, 300.25]]), point_labels=np.array([1, 0])),
    "box": dict(box=np.array([60.0, 40.0, 420.0, 350.0])),
}
SMALL = preset("vit_b", img_size=256)  # vit_b's blocks and HQ decoder, on a 16x16 grid: fast


def official_hq_sam(cfg=SMALL, seed: int = 0, encoder: bool = True):
    """An official segment_anything_hq Sam (vit_b's encoder at cfg.img_size, the released HQ decoder), every
    parameter random, the decoder's weights scaled so that its logits are informative. encoder=False: a stand-in
    encoder without blocks (for decoder tests)."""
    from segment_anything_hq.modeling import ImageEncoderViT, MaskDecoderHQ, PromptEncoder, Sam, TwoWayTransformer

    enc = ImageEncoderViT(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                          depth=cfg.depth if encoder else 0, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                          out_chans=cfg.out_chans, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                          use_rel_pos=True, window_size=cfg.window_size,
                          global_attn_indexes=cfg.global_attn_indexes)
    g = cfg.grid_size
    sam = Sam(enc, PromptEncoder(embed_dim=256, image_embedding_size=(g, g), input_image_size=(cfg.img_size,) * 2,
                                 mask_in_chans=16),
              MaskDecoderHQ(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                                                                                   mlp_dim=2048, num_heads=8),
                            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256, vit_dim=cfg.embed_dim))
    torch.manual_seed(seed)
    return liven_decoder_(randomize_(sam, seed).eval())


def close(a, b, what: str) -> None:
    """Within TOL, scaled to the reference's magnitude (at least 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, what
    scale = max(1.0, float(np.abs(b).max()))
    err = float(np.abs(a - b).max())
    assert err <= TOL * scale, f"{what}: max abs {err:.3g} > {TOL} x {scale:.3g}"


@pytest.fixture(scope="module")
def small(tmp_path_factory, coffee):
    """(official HQ SamPredictor, samvit Predictor.from_checkpoint, checkpoint path), both with the photo set."""
    from segment_anything_hq import SamPredictor

    d = tmp_path_factory.mktemp("hq")
    sam = official_hq_sam()
    path = str(d / "sam_hq_small.safetensors")
    save_file({k: v.contiguous() for k, v in sam.state_dict().items() if not k.startswith("pixel_")}, path,
              metadata={"samvit_config": SMALL.to_json()})
    official = SamPredictor(sam)
    official.set_image(coffee)
    ours = Predictor.from_checkpoint(path, dtype=torch.float32, kernel="reference")
    ours.set_image(coffee)
    return official, ours, path


@pytest.mark.parametrize("hq_token_only", [False, True])
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_predictor_matches_official(small, case, multimask, hq_token_only):
    official, ours, _ = small
    kw = dict(CASES[case], multimask_output=multimask, hq_token_only=hq_token_only)
    m0, i0, l0 = official.predict(**kw)
    f0, _, _ = official.predict(**kw, return_logits=True)
    m1, i1, l1 = ours.predict(**kw)
    assert m1.shape == m0.shape == (1, H, W) and i1.shape == i0.shape == (1,)
    close(l1, l0, "low-res logits")
    close(i1, i0, "IoU")
    assert not ((m0 != m1) & (np.abs(f0) > TOL * max(1.0, np.abs(f0).max()))).any()


def test_comparisons_are_not_vacuous(small):
    """hq_token_only and multimask_output change the official output (the HQ mask alone does not depend on
    multimask_output, its IoU does), and the logits have both signs."""
    official, _, _ = small
    out = {(m, h): official.predict(**CASES["points"], multimask_output=m, hq_token_only=h)
           for m in (True, False) for h in (True, False)}
    differ = lambda a, b: np.abs(a - b).max() > 100 * TOL  # noqa: E731
    for m in (True, False):
        assert differ(out[m, True][2], out[m, False][2])
    assert differ(out[True, False][2], out[False, False][2])
    assert np.array_equal(out[True, True][2], out[False, True][2])
    assert differ(out[True, True][1], out[False, True][1])
    assert (out[True, False][2] > 0).any() and (out[True, False][2] < 0).any()


def test_early_features_are_the_first_global_block(small):
    official, ours, _ = small
    assert ours.is_hq and ours.early_block == 2
    want = official.interm_features[0].permute(0, 3, 1, 2)
    close(ours.early_features.numpy(), want.numpy(), "early features")
    close(ours.features.numpy(), official.features.numpy(), "embedding")


def test_decoder_at_full_size_from_the_tensors():
    """The decoder alone at the released size (64x64 grid, vit_b's 768-wide features), its config inferred from
    the tensors, on random precomputed embeddings: the official MaskDecoderHQ's logits and IoU."""
    sam = official_hq_sam(preset("vit_b"), seed=1, encoder=False)
    sd = {k: v for k, v in sam.state_dict().items() if not k.startswith("image_encoder.")}
    cfg = infer_decoder_config({**sd, "image_encoder.pos_embed": sam.image_encoder.pos_embed,
                                "image_encoder.patch_embed.proj.weight": sam.image_encoder.patch_embed.proj.weight})
    assert cfg.hq_vit_dim == 768 and cfg.image_embedding_size == 64
    ours = load_decoder(sd, cfg)
    assert ours.is_hq
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    early = torch.randn(1, 64, 64, 768, generator=g)  # official layout: channels last
    pts = (torch.tensor([[[300.0, 500.0], [700.0, 200.0]]]), torch.tensor([[1, 0]]))
    box = torch.tensor([[100.0, 150.0, 800.0, 900.0]])
    with torch.no_grad():  # every token's mask (SAM's 4, then the HQ token's) and IoU: the selection is tested above
        sparse, dense = sam.prompt_encoder(points=pts, boxes=box, masks=None)
        md = sam.mask_decoder
        hq = md.embedding_encoder(emb) + md.compress_vit_feat(early.permute(0, 3, 1, 2))
        l0, i0 = md.predict_masks(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, hq)
        s1, d1 = ours.prompt_encoder(pts, box, None)
        early1 = early.permute(0, 3, 1, 2)
        l1, i1 = ours.mask_decoder.predict_masks(emb, ours.dense_pe(), s1, d1,
                                                 ours.mask_decoder.hq_features(emb, early1))
    assert l1.shape == (1, 5, 256, 256) and i1.shape == (1, 4)
    close(l1.numpy(), l0.numpy(), "logits of every token")
    close(i1.numpy(), i0.numpy(), "IoU")


def test_embedding_file_round_trip_and_refusals(small, tmp_path, coffee):
    from samvit.embeddings.files import load_embedding_hq, save_embedding

    official, ours, path = small
    f = str(tmp_path / "coffee.safetensors")
    save_embedding(f, ours.features[0], ours.original_size, ours.input_size,
                   {"model": "vit_b", "img_size": "256", "hq_early_block": str(ours.early_block)},
                   early_features=ours.early_features[0])
    emb, early, meta = load_embedding_hq(f)
    assert early.shape == (768, 16, 16) and meta["hq_early_block"] == "2"
    p = Predictor.from_checkpoint(path, with_encoder=False)
    assert p.is_hq and p.early_block == 2
    p.set_embedding(f)
    l0 = official.predict(**CASES["box"], hq_token_only=True)[2]
    close(p.predict(**CASES["box"], hq_token_only=True)[2], l0, "from the embedding file")
    # an HQ predictor refuses an embedding without early features (made for SAM)
    plain = str(tmp_path / "plain.safetensors")
    save_embedding(plain, ours.features[0], ours.original_size, ours.input_size, {"img_size": "256"})
    with pytest.raises(ProvenanceError, match="no early encoder features"):
        p.set_embedding(plain)
    with pytest.raises(ProvenanceError, match="no early encoder features"):
        p.set_embedding(ours.features, ours.original_size)
    with pytest.raises(ProvenanceError, match="block 5"):
        p.set_embedding(ours.features, ours.original_size, metadata={"hq_early_block": "5"},
                        early_features=ours.early_features)
    with pytest.raises(ProvenanceError, match="early features of shape"):
        p.set_embedding(ours.features, ours.original_size, early_features=ours.early_features[:, :10])


def test_plain_sam_refuses_hq_embeddings(tmp_path, small):
    from tests.helpers import TINY, official_tiny_sam

    from samvit.embeddings.files import save_embedding

    _, ours, _ = small
    sam = official_tiny_sam()
    ckpt = str(tmp_path / "tiny.safetensors")
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, ckpt,
              metadata={"samvit_config": TINY.to_json()})
    p = Predictor.from_checkpoint(ckpt, with_encoder=False)
    assert not p.is_hq
    emb = torch.zeros(TINY.out_chans, TINY.grid_size, TINY.grid_size)
    f = str(tmp_path / "hq.safetensors")
    save_embedding(f, emb, (H, W), None or (171, 256), {"hq_early_block": "1"}, early_features=torch.zeros(64, 16, 16))
    with pytest.raises(ProvenanceError, match="made for HQ-SAM"):
        p.set_embedding(f)
    with pytest.raises(ProvenanceError, match="made for HQ-SAM"):
        p.set_embedding(emb, (H, W), early_features=torch.zeros(64, 16, 16))
    p.set_embedding(emb, (H, W))
    with pytest.raises(PromptError, match="HQ-SAM checkpoints only"):
        p.predict(**CASES["box"], hq_token_only=True)


def test_hq_checkpoint_refusals(small, tmp_path):
    from samvit.checkpoints.load import load_sam
    from samvit.checkpoints.keymaps import from_official
    from samvit.checkpoints.files import read_checkpoint
    from samvit.modeling.sam import Sam

    _, _, path = small
    sd, _ = read_checkpoint(path)
    with pytest.raises(CheckpointError, match="HQ-SAM"):
        from_official(sd, "transformers")
    enc, dec = load_sam(path, dtype=torch.float32)
    with pytest.raises(ValueError, match="HQ-SAM"):
        Sam(enc, dec)
    # an HQ decoder whose early-feature width is not the encoder's
    bad = dict(sd)
    w = bad["mask_decoder.compress_vit_feat.0.weight"]
    bad["mask_decoder.compress_vit_feat.0.weight"] = w[:64]
    with pytest.raises(CheckpointError, match="768 wide"):
        load_sam(bad, model=SMALL, dtype=torch.float32)


def test_segment_cli_refuses_hq_token_only_on_plain_sam(tmp_path, coffee):
    """--hq-token-only on a plain SAM checkpoint: exit 2, one line (the HQ path: test_embed_then_segment...)."""
    from tests.helpers import TINY, official_tiny_sam

    from samvit.cli import main

    image = str(tmp_path / "coffee.png")
    Image.fromarray(coffee).save(image)
    ckpt = str(tmp_path / "tiny.safetensors")
    save_file({k: v.contiguous() for k, v in official_tiny_sam().state_dict().items()}, ckpt,
              metadata={"samvit_config": TINY.to_json()})
    assert main(["segment", image, "--checkpoint", ckpt, "--box", "60,40,420,350", "--out",
                 str(tmp_path / "x.png"), "--quiet", "--hq-token-only"]) == 2
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_vit_b_1024_from_official_pth(tmp_path, coffee):
    """The real vit_b HQ architecture at 1024, saved as the official .pth, its config inferred from the tensors."""
    from segment_anything_hq import SamPredictor, sam_model_registry

    torch.manual_seed(0)
    sam = liven_decoder_(randomize_(sam_model_registry["vit_b"](), 0).eval())
    path = str(tmp_path / "sam_hq_vit_b.pth")
    torch.save(sam.state_dict(), path)
    official = SamPredictor(sam)
    official.set_image(coffee)
    ours = Predictor.from_checkpoint(path, dtype=torch.float32)
    assert ours.model_name == "vit_b" and ours.early_block == 2
    ours.set_image(coffee)
    for multimask in (True, False):
        for hq_only in (True, False):
            kw = dict(CASES["points"], multimask_output=multimask, hq_token_only=hq_only)
            _, i0, l0 = official.predict(**kw)
            _, i1, l1 = ours.predict(**kw)
            close(l1, l0, "low-res logits")
            close(i1, i0, "IoU")
    print(json.dumps({"ok": True}))


def test_registry_names_hq_checkpoints_without_downloading(tmp_path, monkeypatch):
    """No sha256 is published for the HQ-SAM files: a name is resolved from the cache only, never fetched."""
    from samvit.checkpoints.registry import resolve_checkpoint

    monkeypatch.setenv("SAMVIT_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"no sha256 is published.*sam_hq_vit_b\.pth"):
        resolve_checkpoint("sam_hq_vit_b")
    (tmp_path / "sam_hq_vit_l.pth").write_bytes(b"x")
    assert resolve_checkpoint("sam_hq_vit_l") == str(tmp_path / "sam_hq_vit_l.pth")
    assert resolve_checkpoint("sam_hq_vit_l.pth") == str(tmp_path / "sam_hq_vit_l.pth")


def test_embed_then_segment_with_the_embedding_file(small, tmp_path, coffee):
    """`samvit embed` on the HQ checkpoint writes the early features beside the embedding (metadata names the
    block); `samvit segment --embedding` then gives the official HQ mask."""
    from samvit.cli import main
    from samvit.embeddings.files import load_embedding_hq

    official, ours, path = small
    image = str(tmp_path / "coffee.png")
    Image.fromarray(coffee).save(image)
    out = tmp_path / "emb"
    assert main(["embed", image, "--checkpoint", path, "--out", str(out), "--quiet", "--dtype", "float32",
                 "--workers", "0"]) == 0
    (f,) = list(out.glob("*.safetensors"))
    emb, early, meta = load_embedding_hq(str(f))
    assert meta["hq_early_block"] == "2" and early.shape == (768, 16, 16)
    close(early.numpy(), official.interm_features[0][0].permute(2, 0, 1).numpy(), "early features in the file")
    mask = str(tmp_path / "mask.png")
    assert main(["segment", image, "--checkpoint", path, "--embedding", str(f), "--box", "60,40,420,350",
                 "--out", mask, "--quiet", "--hq-token-only"]) == 0
    m0, _, _ = official.predict(**CASES["box"], multimask_output=False, hq_token_only=True)
    f0, _, _ = official.predict(**CASES["box"], multimask_output=False, hq_token_only=True, return_logits=True)
    got = np.asarray(Image.open(mask)) > 0
    assert not ((got != m0[0]) & (np.abs(f0[0]) > 1e-3)).any()
    # from the image itself (the encoder runs in the command), without --hq-token-only
    for flag in ([],):
        mask = str(tmp_path / f"mask_image{len(flag)}.png")
        assert main(["segment", image, "--checkpoint", path, "--box", "60,40,420,350", "--out", mask, "--quiet",
                     "--dtype", "float32"] + flag) == 0
        m0, _, _ = official.predict(**CASES["box"], multimask_output=False, hq_token_only=bool(flag))
        f0, _, _ = official.predict(**CASES["box"], multimask_output=False, hq_token_only=bool(flag),
                                    return_logits=True)
        got = np.asarray(Image.open(mask)) > 0
        assert not ((got != m0[0]) & (np.abs(f0[0]) > 1e-3)).any()
        assert got.any() and not got.all()


def test_serve_segment_matches_official(small, coffee):
    """`samvit serve` on the HQ checkpoint: /v1/segment gives the official HQ-SAM logits and IoU, hq_token_only both
    ways."""
    import base64
    import io

    import httpx
    from tests._serve_utils import running

    from samvit.serve import ServeConfig, create_app

    official, _, path = small
    predictor = Predictor.from_checkpoint(path, dtype=torch.float32, kernel="reference")
    buf = io.BytesIO()
    Image.fromarray(coffee).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    app = create_app(predictor, ServeConfig(model_name="vit_b"))
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        for hq_only in (False, True):
            r = client.post("/v1/segment", json={"image": image, "box": [60, 40, 420, 350], "multimask": True,
                                                 "hq_token_only": hq_only})
            assert r.status_code == 200, r.text
            got = r.json()
            _, i0, l0 = official.predict(**CASES["box"], multimask_output=True, hq_token_only=hq_only)
            low = np.frombuffer(base64.b64decode(got["low_res_logits"]["data"]), np.float32).reshape(1, 64, 64)
            close(low, l0, "service low-res logits")
            close([m["score"] for m in got["masks"]], i0, "service IoU")


def test_download_refuses_hq_names_in_one_line(tmp_path, monkeypatch, capsys):
    from samvit.cli import main

    monkeypatch.setenv("SAMVIT_CACHE", str(tmp_path))
    assert main(["download", "sam_hq_vit_h"]) == 2
    err = capsys.readouterr().err
    assert "no sha256 is published for sam_hq_vit_h.pth" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def tiny_hq(tmp_path_factory, coffee):
    """segment-anything-hq's `vit_tiny` (TinyViT-5M + the HQ decoder fusing TinyViT's layers[1] output, 160 wide),
    random weights saved as the official .pth; the official HQ SamPredictor on the photo."""
    import warnings

    from samvit.bench.weights import randomize_tinyvit_

    with warnings.catch_warnings():  # the reference imports timm's deprecated module paths
        warnings.simplefilter("ignore")
        from segment_anything_hq import SamPredictor, sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_tiny"]()
    randomize_(sam, 0)
    randomize_tinyvit_(sam.image_encoder, 0)
    liven_decoder_(sam)
    sam.eval()  # after the weights: the official TinyViT attention caches its bias table in eval()
    path = str(tmp_path_factory.mktemp("hq_tiny") / "sam_hq_vit_tiny.pth")
    torch.save(sam.state_dict(), path)
    official = SamPredictor(sam)
    official.set_image(coffee)
    ours = Predictor.from_checkpoint(path, dtype=torch.float32)
    ours.set_image(coffee)
    return official, ours, path


@pytest.mark.parametrize("hq_token_only", [False, True])
def test_vit_tiny_matches_official(tiny_hq, hq_token_only):
    """Predictor.from_checkpoint(sam_hq_vit_tiny.pth): TinyViT inferred from the tensors, its stage-1 output as the
    early features; logits and scores as the official HQ SamPredictor's (points and box, multimask both ways)."""
    official, ours, _ = tiny_hq
    assert ours.is_hq and ours.early_block == 1 and ours.model_name == "tinyvit_5m"
    assert ours.decoder.config.hq_vit_dim == 160
    assert ours.early_features.shape == (1, 160, 64, 64)
    close(ours.early_features.numpy(), official.interm_features[0].permute(0, 3, 1, 2).numpy(), "early features")
    close(ours.features.numpy(), official.features.numpy(), "embedding")
    for case in CASES:
        for multimask in (True, False):
            kw = dict(CASES[case], multimask_output=multimask, hq_token_only=hq_token_only)
            f0, i0, l0 = official.predict(**kw, return_logits=True)
            f1, i1, l1 = ours.predict(**kw, return_logits=True)
            close(l1, l0, f"low-res logits ({case}, multimask {multimask})")
            close(f1, f0, f"logits ({case}, multimask {multimask})")
            close(i1, i0, f"IoU ({case}, multimask {multimask})")
    # not vacuous: hq_token_only changes the official logits, which have both signs
    a = official.predict(**CASES["box"], hq_token_only=True)[2]
    b = official.predict(**CASES["box"], hq_token_only=False)[2]
    assert np.abs(a - b).max() > 100 * TOL and (a > 0).any() and (a < 0).any()


def test_info_says_hq_sam(small, tiny_hq, capsys):
    """`samvit info --checkpoint` names HQ-SAM and the early features it fuses (vit_b's block 2, TinyViT's stage 1);
    a plain SAM checkpoint has hq_sam null."""
    from tests.helpers import TINY, official_tiny_sam

    from samvit.cli import main

    for path, block, dim, unit in ((small[2], 2, 768, "block"), (tiny_hq[2], 1, 160, "stage")):
        assert main(["info", "--checkpoint", path]) == 0
        assert f"HQ-SAM (segment-anything-hq): HQ mask decoder fusing the encoder's {unit} {block}" in \
            capsys.readouterr().out
        assert main(["info", "--checkpoint", path, "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["hq_sam"]["early_block"] == block and d["hq_sam"]["early_features"][0] == dim
    plain = str(small[2]).replace("sam_hq_small", "plain")
    save_file({k: v.contiguous() for k, v in official_tiny_sam().state_dict().items()}, plain,
              metadata={"samvit_config": TINY.to_json()})
    assert main(["info", "--checkpoint", plain, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hq_sam"] is None


def test_store_keeps_early_features(small, tmp_path, coffee, capsys):
    """`samvit embed --store` on an HQ-SAM checkpoint: each item keeps the early features beside its embedding
    (equal to the embedding file's, max abs 0), the identity and metadata record the block and shape; Predictor,
    `samvit segment --store`, the service's cache and `store verify` read them; a plain SAM predictor refuses the HQ
    store and the HQ predictor a plain store (typed errors)."""
    from tests.helpers import TINY, official_tiny_sam

    from samvit import EmbeddingStore
    from samvit.cli import main
    from samvit.embeddings.files import load_embedding_hq
    from samvit.embeddings.store import StoreError, StoreMismatchError
    from samvit.serve import ServeConfig, create_app
    from samvit.serve.cache import EmbeddingCache, check_store_fits, open_store, store_hq

    official, ours, path = small
    image = str(tmp_path / "coffee.png")
    Image.fromarray(coffee).save(image)
    common = ["--checkpoint", path, "--quiet", "--workers", "0", "--dtype", "float32"]
    assert main(["embed", image, "--out", str(tmp_path / "files")] + common) == 0
    store_path = str(tmp_path / "store.zarr")
    assert main(["embed", image, "--store", store_path, "--store-dtype", "float32"] + common) == 0
    (f,) = list((tmp_path / "files").glob("*.safetensors"))
    emb_f, early_f, _ = load_embedding_hq(str(f))
    store = EmbeddingStore.open(store_path)
    (key,) = store.keys()
    assert store.identity["hq"] == {"hq_early_block": 2, "early_shape": [768, 16, 16]}
    assert store.metadata(key)["hq_early_block"] == "2"
    assert (store.get(key) - emb_f).abs().max().item() == 0
    assert (store.early_features(key) - early_f).abs().max().item() == 0
    assert store.verify().ok
    # the predictor (no encoder) and `samvit segment --store` from the store: the official HQ-SAM output
    p = Predictor.from_checkpoint(path, with_encoder=False)
    emb, early, meta = store.hq_image_embedding(key)
    p.set_embedding(emb, meta["original_size"], meta.get("input_size"), metadata=meta, early_features=early)
    for hq_only in (True, False):
        close(p.predict(**CASES["box"], hq_token_only=hq_only)[2],
              official.predict(**CASES["box"], hq_token_only=hq_only)[2], "from the store")
    mask = str(tmp_path / "mask.png")
    assert main(["segment", image, "--checkpoint", path, "--store", store_path, "--key", key, "--box",
                 "60,40,420,350", "--out", mask, "--quiet", "--hq-token-only"]) == 0
    m0, _, _ = official.predict(**CASES["box"], multimask_output=False, hq_token_only=True)
    f0, _, _ = official.predict(**CASES["box"], multimask_output=False, hq_token_only=True, return_logits=True)
    got = np.asarray(Image.open(mask)) > 0
    assert not ((got != m0[0]) & (np.abs(f0[0]) > 1e-3)).any()
    # the service's cache reads the early features back from the store (by the file's sha256)
    cache = EmbeddingCache(1 << 30, store)
    hit = cache.get(store.record(key)["sha256"])
    assert hit is not None and torch.equal(hit.early_features, early_f.float())
    # a plain SAM predictor refuses the HQ store; the HQ predictor refuses a plain store
    sam = official_tiny_sam()
    ckpt = str(tmp_path / "tiny.safetensors")
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, ckpt,
              metadata={"samvit_config": TINY.to_json()})
    plain = Predictor.from_checkpoint(ckpt, dtype=torch.float32)
    with pytest.raises(StoreMismatchError, match="HQ-SAM embeddings .* this predictor is plain SAM"):
        check_store_fits(plain, store)
    with pytest.raises(ProvenanceError, match="made for HQ-SAM"):
        plain.set_embedding(torch.zeros(TINY.out_chans, TINY.grid_size, TINY.grid_size), (H, W),
                            metadata=store.metadata(key), allow_mismatch=True)
    plain_store = EmbeddingStore.create(str(tmp_path / "plain.zarr"), model="tiny", config=TINY.to_dict(),
                                        embedding_shape=(256, 16, 16), checkpoint_sha256="ab" * 32, dtype="float32")
    hq_pred = Predictor.from_checkpoint(path, dtype=torch.float32, kernel="reference")
    with pytest.raises(StoreMismatchError, match="plain SAM embeddings, but this predictor is HQ-SAM"):
        create_app(hq_pred, ServeConfig(model_name="vit_b"), store=plain_store)
    with pytest.raises(StoreMismatchError, match="HQ-SAM"):  # an HQ-SAM run refuses a plain store, and vice versa
        open_store(str(tmp_path / "plain.zarr"), ours.encoder.config, "ab" * 32, "float32", hq=store_hq(hq_pred))
    with pytest.raises(StoreMismatchError):
        EmbeddingStore.create(store_path, model=store.identity["model"], config=store.identity["config"],
                              embedding_shape=store.shape, checkpoint_sha256=store.identity["checkpoint_sha256"])
    with pytest.raises(StoreError, match="early features given for a plain SAM store"):
        plain_store.writer(model="tiny", checkpoint_sha256="ab" * 32, samvit_version="t", compute_dtype="float32"
                           ).put("k", torch.zeros(256, 16, 16), sha256="k", original_size=(H, W),
                                 early_features=torch.zeros(768, 16, 16))
    # `store verify` finds a damaged early-feature row
    rec = store.record(key)
    chunk = tmp_path / "store.zarr" / "data" / (rec["array"] + ".early") / f"c.{rec['row']}.0.0.0"
    chunk.write_bytes(bytes(len(chunk.read_bytes())))
    capsys.readouterr()
    assert main(["store", "verify", store_path]) != 0
    assert "early-feature checksum" in capsys.readouterr().out + capsys.readouterr().err


def test_serve_with_an_hq_store(small, coffee, tmp_path):
    """`samvit serve --store` on HQ-SAM: the first server writes each embedding with its early features behind; a
    second server on the same store reads both back (no encoder pass) and gives the official HQ-SAM output."""
    import base64
    import io

    import httpx
    from tests._serve_utils import running

    from samvit import EmbeddingStore
    from samvit.serve import ServeConfig, create_app
    from samvit.serve.cache import open_store, store_hq

    official, _, path = small
    predictor = Predictor.from_checkpoint(path, dtype=torch.float32, kernel="reference")
    buf = io.BytesIO()
    Image.fromarray(coffee).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    store_path = str(tmp_path / "serve.zarr")
    _, i0, l0 = official.predict(**CASES["box"], multimask_output=True, hq_token_only=True)
    for run in range(2):
        store, writer = open_store(store_path, predictor.encoder.config, "ab" * 32, "float32",
                                   hq=store_hq(predictor))
        app = create_app(predictor, ServeConfig(model_name="vit_b"), store, writer)
        with running(app) as url, httpx.Client(base_url=url, timeout=120) as client:
            r = client.post("/v1/segment", json={"image": image, "box": [60, 40, 420, 350], "multimask": True,
                                                 "hq_token_only": True})
            assert r.status_code == 200, r.text
            got = r.json()
            low = np.frombuffer(base64.b64decode(got["low_res_logits"]["data"]), np.float32).reshape(1, 64, 64)
            close(low, l0, f"service low-res logits (run {run})")
            close([m["score"] for m in got["masks"]], i0, f"service IoU (run {run})")
            if run == 1:  # read from the store, not encoded again
                hits = [ln for ln in client.get("/metrics").text.splitlines()
                        if ln.startswith("samvit_cache_hits_total") and 'tier="store"' in ln]
                assert hits and float(hits[0].split()[-1]) == 1.0, hits
        s = EmbeddingStore.open(store_path)
        assert len(s) == 1 and s.identity["hq"]["hq_early_block"] == 2
        close(s.early_features(s.keys()[0]).numpy(), official.interm_features[0][0].permute(2, 0, 1).numpy(),
              "early features in the store")


def test_vit_tiny_embed_store_then_predict(tiny_hq, tmp_path, coffee):
    """`samvit embed --store` on sam_hq_vit_tiny.pth keeps TinyViT's stage-1 features (160x64x64) beside each
    embedding; a Predictor without encoder gives the official HQ-SAM output from them."""
    from samvit import EmbeddingStore
    from samvit.cli import main

    official, _, path = tiny_hq
    image = str(tmp_path / "coffee.png")
    Image.fromarray(coffee).save(image)
    store_path = str(tmp_path / "tiny.zarr")
    assert main(["embed", image, "--checkpoint", path, "--store", store_path, "--store-dtype", "float32", "--quiet",
                 "--workers", "0", "--dtype", "float32"]) == 0
    store = EmbeddingStore.open(store_path)
    assert store.identity["hq"] == {"hq_early_block": 1, "early_shape": [160, 64, 64]}
    emb, early, meta = store.hq_image_embedding(store.keys()[0])
    close(early.numpy(), official.interm_features[0][0].permute(2, 0, 1).numpy(), "stage-1 features in the store")
    p = Predictor.from_checkpoint(path, with_encoder=False)
    p.set_embedding(emb, meta["original_size"], meta.get("input_size"), metadata=meta, early_features=early)
    for hq_only in (True, False):
        _, i0, l0 = official.predict(**CASES["points"], hq_token_only=hq_only)
        _, i1, l1 = p.predict(**CASES["points"], hq_token_only=hq_only)
        close(l1, l0, "low-res logits from the store")
        close(i1, i0, "IoU from the store")
