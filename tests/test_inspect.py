"""samvit.inspect: captured attention equals transformers' output_attentions; mean attention distance and entropy
on cases with a closed-form answer; PCA against numpy's SVD; the CLI's PNGs and CSV; its errors."""
from __future__ import annotations

import csv
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import samvit
from samvit import EncoderConfig, ImageEncoder
from samvit.cli import main
from samvit.inspect import attention, attention_distance, feature_pca, pixel_to_token, window_diameter_px
from samvit.inspect.capture import Prepared, walk
from samvit.inspect.pca import principal_components

from tests.helpers import randomize_

PATCH = 16


def tiny(window: int, heads: int = 2, **changes) -> EncoderConfig:
    """16x16 tokens; block 1 global; window 6 pads the grid to 18x18, window 4 does not pad."""
    fields = dict(img_size=256, embed_dim=64, depth=3, num_heads=heads, window_size=window, global_attn_indexes=(1,),
                  out_chans=32, name=f"tiny_w{window}")
    return EncoderConfig(**{**fields, **changes})


def image_tensor(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- faithful maps: transformers as the oracle


@pytest.mark.parametrize("window, rel_pos", [(6, True), (4, True), (6, False)])
def test_maps_equal_transformers_output_attentions(window, rel_pos):
    """Every query's row in every block equals SamVisionModel(output_attentions=True) on the same weights.

    transformers returns (windows * heads, ws*ws, ws*ws) for a windowed block (padded slots as queries and keys)
    and (heads, N, N) for a global one; each real query's row is looked up there by its window and local index."""
    from transformers import SamVisionConfig, SamVisionModel

    from samvit.checkpoints.keymaps import from_official

    cfg = tiny(window, use_rel_pos=rel_pos)
    enc = randomize_(ImageEncoder(cfg).eval(), seed=3)
    vc = SamVisionConfig(hidden_size=cfg.embed_dim, output_channels=cfg.out_chans, num_hidden_layers=cfg.depth,
                         num_attention_heads=cfg.num_heads, image_size=cfg.img_size, patch_size=PATCH,
                         window_size=window, global_attn_indexes=list(cfg.global_attn_indexes),
                         mlp_dim=4 * cfg.embed_dim, use_rel_pos=rel_pos)
    vc._attn_implementation = "eager"  # the sdpa class returns no weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = SamVisionModel(vc).eval()
    hf.load_state_dict(from_official(enc.state_dict(), "transformers"), strict=True)
    x = image_tensor()
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True).attentions
    res = attention(enc, x, queries="all")
    nh, g = cfg.num_heads, cfg.grid_size
    rows = torch.tensor([q[0] for q in res.blocks[0].queries])
    cols = torch.tensor([q[1] for q in res.blocks[0].queries])
    assert len(rows) == g * g
    for b in range(cfg.depth):
        ba = res.blocks[b]
        if ba.window_size:
            ws = ba.window_size
            w = (rows // ws) * math.ceil(g / ws) + cols // ws
            q = (rows % ws) * ws + cols % ws
            assert ref[b].shape == (math.ceil(g / ws) ** 2 * nh, ws * ws, ws * ws)
        else:
            w, q = torch.zeros_like(rows), rows * g + cols
            assert ref[b].shape == (nh, g * g, g * g)
        expected = torch.stack([ref[b][w * nh + h, q] for h in range(nh)], dim=1)  # (queries, heads, keys)
        err = (ba.probs - expected).abs().max().item()
        assert err <= 1e-5, (b, err)
        assert (ba.probs.sum(-1) - 1).abs().max() <= 1e-5
        # on the image grid: real keys + padded window slots hold all the mass
        total = torch.stack([ba.grid_map(i).sum((1, 2)) for i in range(0, g * g, 37)]) + ba.padding_mass()[::37]
        assert (total - 1).abs().max() <= 1e-5
    # window 6 pads 16 -> 18: the last window row/column's queries put mass on padded slots; window 4 has none
    pad = res.blocks[0].padding_mass()
    assert (pad.max() > 1e-3) if window == 6 else (pad.abs().max() == 0)


def test_walk_is_the_normal_forward():
    """The capture walks the blocks' own forward: its pre-neck features are the encoder's, bit for bit."""
    enc = randomize_(ImageEncoder(tiny(6)).eval())
    x = image_tensor()
    with torch.no_grad():
        ref = enc.forward_features(x)
    seen = []
    assert torch.equal(walk(enc, x, [0, 1, 2], [lambda c: seen.append(c.block)]), ref)
    assert sorted(set(seen)) == [0, 1, 2]


def test_chunking_does_not_change_the_maps():
    """Small chunks (a few query rows of one window at a time) give the same rows as one chunk per block."""
    enc = randomize_(ImageEncoder(tiny(6)).eval())
    x = image_tensor()
    queries = [(0, 0), (5, 11), (15, 15), (8, 3)]
    a = attention(enc, x, queries=queries)
    b = attention(enc, x, queries=queries, chunk_elems=3000)
    for blk in range(3):
        assert torch.allclose(a.blocks[blk].probs, b.blocks[blk].probs, atol=1e-6)


# ---------------------------------------------------------------- distances with a closed-form answer


def controlled_encoder(window: int) -> ImageEncoder:
    """Head 0 attends uniformly (q = 0: every score 0); head 1 attends only to itself (q = constant c, k = 0, and the
    relative-position tables give c.c = 100 to offset 0 along each axis, 0 elsewhere: self 200, same row or column
    100, others 0, so p(self) = 1 - O(e^-100))."""
    enc = randomize_(ImageEncoder(tiny(window)).eval())
    C, hd = 64, 32
    with torch.no_grad():
        for blk in enc.blocks:
            w, bias = blk.attn.qkv.weight, blk.attn.qkv.bias
            w[: 2 * C].zero_()  # q and k projections of both heads: no dependence on the input
            bias[: 2 * C].zero_()
            bias[hd] = 10.0  # q of head 1 = 10 e_0
            for table in (blk.attn.rel_pos_h, blk.attn.rel_pos_w):
                table.zero_()
                table[table.shape[0] // 2, 0] = 10.0  # offset 0
    return enc


def closed_form(window: int, grid: int, rows: int = None):
    """Uniform attention, by brute force in numpy: the mean over real query tokens (rows < `rows`) of the mean
    distance (px) to every key slot of the query's window (padded slots at their place), and the mean fraction of
    padded slots."""
    rows = grid if rows is None else rows
    dists, pads = [], []
    for r in range(rows):
        for c in range(grid):
            if window:
                r0, c0, n = r // window * window, c // window * window, window
            else:
                r0, c0, n = 0, 0, grid
            kr, kc = np.meshgrid(np.arange(r0, r0 + n), np.arange(c0, c0 + n), indexing="ij")
            dists.append(PATCH * np.sqrt((kr - r) ** 2 + (kc - c) ** 2).mean())
            pads.append(((kr >= grid) | (kc >= grid)).mean())
    return float(np.mean(dists)), float(np.mean(pads))


@pytest.mark.parametrize("window", [6, 4])
def test_distance_closed_form(window):
    enc = controlled_encoder(window)
    res = attention_distance(enc, [image_tensor(1), image_tensor(2)])
    assert res.blocks == [0, 1, 2] and res.windows == [window, 0, window]
    for i, ws in enumerate(res.windows):
        d_uniform, pad_uniform = closed_form(ws, 16)
        n_keys = ws * ws if ws else 256
        assert res.mean_distance[i, 0] == pytest.approx(d_uniform, rel=1e-5)
        assert res.entropy[i, 0] == pytest.approx(math.log(n_keys), rel=1e-5)
        assert res.padding_mass[i, 0] == pytest.approx(pad_uniform, abs=1e-6)
        assert abs(res.mean_distance[i, 1]) < 1e-4 and abs(res.entropy[i, 1]) < 1e-4  # only itself
    assert len(res.rows()) == 3 * 2


def test_distance_excludes_the_canvas_padding():
    """An image covering the top 10 token rows of the canvas: only those rows are queries (image_only)."""
    enc = controlled_encoder(6)
    img = samvit.PreparedImage(image_tensor()[0], (160, 256), (160, 256))
    res = attention_distance(enc, img)
    everything = attention_distance(enc, img, image_only=False)
    for i, ws in enumerate(res.windows):
        assert res.mean_distance[i, 0] == pytest.approx(closed_form(ws, 16, rows=10)[0], rel=1e-5)
        assert everything.mean_distance[i, 0] == pytest.approx(closed_form(ws, 16)[0], rel=1e-5)
    mask = Prepared(image_tensor(), (150, 256), (150, 256)).image_tokens(PATCH)
    assert mask[:10].all() and not mask[10:].any()  # row 9 holds pixels 144..159: partly image


def test_windowed_distances_within_the_window(astronaut):
    enc = randomize_(ImageEncoder(tiny(6, heads=4)).eval(), seed=5)
    res = attention_distance(enc, [astronaut])
    limit = window_diameter_px(6, PATCH)
    win = np.asarray(res.windows) > 0
    assert (res.mean_distance[win] <= limit).all() and (res.mean_distance[win] > 0).all()
    assert (res.mean_distance[~win] > 0).all()


def test_pixel_to_token():
    """An image of 400x600 pixels on a 256 canvas: resized to 171x256 (scale 256/600)."""
    p = Prepared(torch.zeros(1, 3, 256, 256), (171, 256), (400, 600))
    assert pixel_to_token(0, 0, p, PATCH) == (0, 0)
    assert pixel_to_token(599.9, 399.9, p, PATCH) == (10, 15)
    assert pixel_to_token(300, 200, p, PATCH) == (int(200 * 171 / 400 // 16), int(300 * 256 / 600 // 16))
    with pytest.raises(ValueError, match="outside the image"):
        pixel_to_token(600, 10, p, PATCH)


def test_attention_refuses_huge_captures():
    enc = ImageEncoder(tiny(6)).eval()
    with pytest.raises(ValueError, match="block 3 does not exist"):
        attention(enc, image_tensor(), blocks=[3], queries=[(0, 0)])
    with pytest.raises(ValueError, match="outside the 16x16 token grid"):
        attention(enc, image_tensor(), blocks=[0], queries=[(16, 0)])
    import samvit.inspect.capture as capture

    old = capture.MAX_KEPT_BYTES
    capture.MAX_KEPT_BYTES = 1000
    try:
        with pytest.raises(ValueError, match="choose fewer"):
            attention(enc, image_tensor(), queries="all")
    finally:
        capture.MAX_KEPT_BYTES = old


# ---------------------------------------------------------------- PCA


def test_principal_components_match_numpy_svd():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(8, 8, 20, generator=g) @ torch.randn(20, 20, generator=g)  # correlated channels
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:6] = True  # fit on the first 6 rows only
    proj, comps, ratio = principal_components(feats, mask, k=3)
    x = feats.reshape(64, 20).double().numpy()
    fit = x[mask.reshape(-1).numpy()]
    u, s, vt = np.linalg.svd(fit - fit.mean(0), full_matrices=False)
    for j in range(3):
        sign = np.sign(comps[j] @ vt[j])
        assert abs(sign) == 1
        assert np.allclose(comps[j], sign * vt[j], atol=1e-8)
        assert np.allclose(proj.reshape(64, 3)[:, j], sign * (x - fit.mean(0)) @ vt[j], atol=1e-8)
    assert np.allclose(ratio, (s ** 2 / (s ** 2).sum())[:3])


def test_feature_pca_shapes(coffee):
    enc = randomize_(ImageEncoder(tiny(6)).eval())
    res = feature_pca(enc, coffee)
    assert res.pre_neck.shape == res.post_neck.shape == (16, 16, 3)
    assert res.image_tokens[:11].all() and not res.image_tokens[11:].any()  # 171 of 256 rows are image
    for rgb in (res.pre_neck, res.post_neck):
        assert rgb.min() >= 0 and rgb.max() <= 1 and rgb[res.image_tokens].std() > 0.1
    assert (np.diff(res.explained_pre) <= 0).all() and 0 < res.explained_pre.sum() <= 1


def test_no_neck_no_relative_position_bfloat16(coffee):
    """vit_h_spec's arrangement (no relative position, no neck) and bfloat16 weights: maps still sum to 1 and match
    the float32 model's closely; PCA has no post-neck picture."""
    cfg = tiny(4, use_rel_pos=False, out_chans=None)
    enc = randomize_(ImageEncoder(cfg).eval())
    res = feature_pca(enc, coffee)
    assert res.post_neck is None and res.pre_neck.shape == (16, 16, 3)
    x = image_tensor()
    a32 = attention(enc, x, queries=[(3, 3), (9, 14)])
    a16 = attention(enc.to(torch.bfloat16), x, queries=[(3, 3), (9, 14)])
    for b in range(3):
        assert (a16.blocks[b].probs.sum(-1) - 1).abs().max() <= 1e-5
        assert (a16.blocks[b].probs - a32.blocks[b].probs).abs().max() < 0.05
    assert attention_distance(enc, x).mean_distance.shape == (3, 2)


# ---------------------------------------------------------------- the CLI: PNGs, CSV, errors


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("inspect")
    enc = randomize_(ImageEncoder(tiny(6, heads=4)).eval(), seed=2)
    samvit.save_encoder(enc, d / "tiny.safetensors")
    Image.fromarray(data.coffee()).save(d / "coffee.png")  # 400x600
    Image.fromarray(data.astronaut()).save(d / "astronaut.png")  # 512x512
    (d / "broken.png").write_bytes(b"not a png")
    return d


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def test_cli_attention_png(files, tmp_path):
    from samvit.inspect.plots import DPI, PANEL_IN, TITLE_IN

    out = tmp_path / "att.png"
    assert main(["inspect", "attention", str(files / "coffee.png"), "--checkpoint", str(files / "tiny.safetensors"),
                 "--block", "0", "--query", "300,200", "--out", str(out), "--quiet"]) == 0
    a = _png(out)
    # 4 heads: 2x2 panels, each 3 in wide and 3 * 400/600 + 0.25 in high, + 0.75 in of title, at 100 dpi
    assert a.shape[:2] == (round((2 * (PANEL_IN * 400 / 600 + 0.25) + TITLE_IN) * DPI), 2 * PANEL_IN * DPI)
    assert a.std() > 20
    one = tmp_path / "one.png"
    assert main(["inspect", "attention", str(files / "astronaut.png"), "--checkpoint", str(files / "tiny.safetensors"),
                 "--block", "1", "--head", "3", "--out", str(one), "--quiet", "--dpi", "50"]) == 0
    b = _png(one)
    assert b.shape[:2] == (round((PANEL_IN + 0.25 + TITLE_IN) * 50), PANEL_IN * 50) and b.std() > 20
    three = tmp_path / "three.png"
    assert main(["inspect", "attention", str(files / "astronaut.png"), "--checkpoint", str(files / "tiny.safetensors"),
                 "--block", "2", "--head", "0,2,3", "--out", str(three), "--quiet"]) == 0
    assert _png(three).shape[:2] == (round((2 * (PANEL_IN + 0.25) + TITLE_IN) * DPI), 2 * PANEL_IN * DPI)


def test_cli_distance_csv_png(files, tmp_path, capsys):
    out = tmp_path / "dist"
    rc = main(["inspect", "distance", str(files / "coffee.png"), str(files / "broken.png"),
               str(files / "astronaut.png"), "--checkpoint", str(files / "tiny.safetensors"), "--out", str(out)])
    assert rc == 1  # one bad image: reported, skipped, the others done
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err
    with open(out / "distance.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["block", "head", "window", "mean_distance_px", "entropy"]
    assert len(rows) == 3 * 4
    assert [int(r["window"]) for r in rows] == [6] * 4 + [0] * 4 + [6] * 4
    assert all(float(r["mean_distance_px"]) > 0 and float(r["entropy"]) > 0 for r in rows)
    png = _png(out / "distance.png")
    assert png.shape[:2] == (500, 900) and png.std() > 10


def test_cli_pca_png(files, tmp_path):
    out = tmp_path / "sub" / "pca.png"
    assert main(["inspect", "pca", str(files / "astronaut.png"), "--checkpoint", str(files / "tiny.safetensors"),
                 "--out", str(out), "--quiet"]) == 0
    a = _png(out)
    assert a.shape[:2] == (round((3.0 + 0.25 + 0.75) * 100), 900) and a.std() > 20
    # the two PCA panels are not blank: many distinct colours
    assert len(np.unique(a[:, 300:].reshape(-1, 3), axis=0)) > 50


def test_cli_random_weights_are_labelled():
    """--random-weights builds the preset with seeded random weights; the title it gets says so."""
    import argparse

    from samvit.cli.inspect import _encoder

    args = argparse.Namespace(random_weights=True, model="vit_b", checkpoint=None, seed=0, device="cpu")
    enc, label = _encoder(args)
    assert enc.config.name == "vit_b" and "RANDOM WEIGHTS" in label
    enc2, _ = _encoder(args)
    assert torch.equal(enc.blocks[0].attn.qkv.weight, enc2.blocks[0].attn.qkv.weight)  # seeded


@pytest.mark.parametrize("argv, message", [
    (["attention", "{img}", "--block", "0", "--out", "{tmp}/a.png"], "no weights"),
    (["attention", "{img}", "--model", "vit_b", "--block", "0", "--out", "{tmp}/a.png"], "no weights"),
    (["attention", "{img}", "--checkpoint", "{ck}", "--block", "7", "--out", "{tmp}/a.png"], "has blocks 0..2"),
    (["attention", "{img}", "--checkpoint", "{ck}", "--block", "0", "--head", "9", "--out", "{tmp}/a.png"],
     "has heads 0..3"),
    (["attention", "{img}", "--checkpoint", "{ck}", "--block", "0", "--query", "700,10", "--out", "{tmp}/a.png"],
     "outside the image"),
    (["attention", "{img}", "--checkpoint", "{ck}", "--block", "0", "--query", "x", "--out", "{tmp}/a.png"],
     "expected X,Y"),
    (["attention", "{img}", "--checkpoint", "{ck}", "--block", "0", "--out", "{img}"], "refusing to overwrite"),
    (["pca", "{img}", "--checkpoint", "{ck}", "--out", "{tmp}/a.jpg"], "expected a .png"),
    (["pca", "{img}", "--checkpoint", "{ck}", "--out", "{tmp}/a.png", "--dpi", "5"], "expected 30..600"),
    (["attention", "{img}", "--checkpoint", "{ck}", "--block", "0", "--head", "1,x", "--out", "{tmp}/a.png"],
     "separated by commas"),
    (["pca", "{tmp}/missing.png", "--checkpoint", "{ck}", "--out", "{tmp}/a.png"], "no such file"),
    (["distance", "{img}", "--checkpoint", "{ck}", "--blocks", "5", "--out", "{tmp}/d"], "block 5 does not exist"),
    (["distance", "{tmp}/missing.png", "--checkpoint", "{ck}", "--out", "{tmp}/d"], "no image could be read"),
    (["pca", "{img}", "--model", "vit_b", "--random-weights", "--checkpoint", "{ck}", "--out", "{tmp}/a.png"],
     "exclude each other"),
])
def test_cli_errors(files, tmp_path, capsys, argv, message):
    fill = dict(img=str(files / "coffee.png"), ck=str(files / "tiny.safetensors"), tmp=str(tmp_path))
    rc = main(["inspect"] + [a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("samvit inspect: error: ")  # one line per item and error
    assert (files / "coffee.png").stat().st_size > 1000  # the input is untouched
