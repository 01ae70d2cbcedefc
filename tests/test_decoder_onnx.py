"""Decoder ONNX export with the official SAM ONNX interface: onnxruntime against samvit's Predictor and against the
official SamOnnxModel on the same weights; the CLI."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

import samvit  # noqa: E402
from samvit.cli import main  # noqa: E402
from samvit.export import DECODER_INPUTS, DECODER_OUTPUTS, export_decoder_onnx, onnx_session  # noqa: E402

from tests._serve_utils import official_tiny_sam_1024, save_full_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(official Sam, checkpoint, samvit decoder, path of the four-mask export, what `--verify` printed)."""
    d = tmp_path_factory.mktemp("decoder_onnx")
    # gain 1: mask logits up to about 6 in size. Two correct float32 implementations differ in proportion to the
    # logits (about 2e-5 of the largest): at gain 2 (logits ~70) samvit's Predictor and the official-arithmetic
    # wrapper already differ by 1e-3 in PyTorch alone, so a 1e-4 bound there would test float32, not the export.
    sam = official_tiny_sam_1024(seed=4, gain=1.0)
    ckpt = save_full_checkpoint(sam, d / "sam.safetensors")
    path = d / "decoder.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", "onnx", "--decoder", "--checkpoint", ckpt, "--out", str(path), "--verify",
                     "--quiet"]) == 0
    return sam, ckpt, samvit.load_decoder(ckpt), str(path), printed.getvalue()


def _feeds(emb, coords, labels, size, mask=None):
    return {"image_embeddings": emb.numpy(), "point_coords": np.asarray(coords, np.float32)[None],
            "point_labels": np.asarray(labels, np.float32)[None],
            "mask_input": (np.zeros((1, 1, 256, 256), np.float32) if mask is None else mask[None].astype(np.float32)),
            "has_mask_input": np.array([0.0 if mask is None else 1.0], np.float32),
            "orig_im_size": np.array(size, np.float32)}


def _official_coords(points, size):
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide(1024).apply_coords(np.asarray(points, np.float64), size)


@torch.no_grad()
def test_matches_predictor(exported):
    _, _, decoder, path, printed = exported
    assert "onnxruntime vs samvit Predictor float32: max abs" in printed
    assert float(printed.split("max abs ")[1].split(",")[0]) <= 1e-4
    sess = onnx_session(path)
    assert [i.name for i in sess.get_inputs()] == list(DECODER_INPUTS)
    assert [o.name for o in sess.get_outputs()] == list(DECODER_OUTPUTS)
    g = torch.Generator().manual_seed(1)
    predictor = samvit.Predictor(None, decoder)
    # one file, several image sizes and numbers of points (both are dynamic), with and without box and mask
    for size, points, labels, box in (((300, 450), [[225, 150]], [1], None),
                                      ((600, 250), [[50, 100], [150, 450], [125, 300]], [1, 0, 1], [25, 50, 200, 500])):
        emb = torch.randn(1, 256, 64, 64, generator=g)
        predictor.set_embedding(emb, size)
        coords = list(points) + ([box[:2], box[2:]] if box else [[0, 0]])  # a box's corners, or one padding point
        labs = list(labels) + ([2, 3] if box else [-1])
        feeds = _feeds(emb, _official_coords(coords, size), labs, size)
        masks, iou, low = sess.run(None, feeds)
        assert masks.shape == (1, 4) + size and iou.shape == (1, 4) and low.shape == (1, 4, 256, 256)
        mask_in = None
        for multimask, sl in ((False, slice(0, 1)), (True, slice(1, 4))):
            ref = predictor.predict(np.array(points), np.array(labels), None if box is None else np.array(box),
                                    multimask_output=multimask, return_logits=True)
            for out, r in zip((masks[0, sl], iou[0, sl], low[0, sl]), ref):
                assert np.abs(out - r).max() <= 1e-4
            mask_in = ref[2][:1]
        # the previous mask as a prompt (has_mask_input = 1)
        masks, iou, low = sess.run(None, _feeds(emb, _official_coords(coords, size), labs, size, mask_in))
        ref = predictor.predict(np.array(points), np.array(labels), None if box is None else np.array(box), mask_in,
                                multimask_output=False, return_logits=True)
        for out, r in zip((masks[0, :1], iou[0, :1], low[0, :1]), ref):
            assert np.abs(out - r).max() <= 1e-4


@torch.no_grad()
def test_matches_official_onnx_model(exported):
    """The official SamOnnxModel (what scripts/export_onnx_model.py exports) in PyTorch, same weights, same inputs."""
    from segment_anything.utils.onnx import SamOnnxModel

    sam, _, _, path, _ = exported
    official = SamOnnxModel(sam, return_single_mask=False)
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(2))
    feeds = _feeds(emb, [[500.0, 400.0], [100.0, 700.0], [0.0, 0.0]], [1, 1, -1], (800, 1200))
    got = onnx_session(path).run(None, feeds)
    ref = official(*(torch.from_numpy(feeds[k]) for k in DECODER_INPUTS))
    for out, r in zip(got, ref):
        assert out.shape == tuple(r.shape) and np.abs(out - r.numpy()).max() <= 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_single_mask(exported, tmp_path):
    """return_single_mask: the official choice of one mask (best of 1..3 for one click, mask 0 for more)."""
    from segment_anything.utils.onnx import SamOnnxModel

    sam, _, decoder, _, _ = exported
    out = export_decoder_onnx(decoder, tmp_path / "single.onnx", return_single_mask=True)
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["return_single_mask"] == "true"
    official = SamOnnxModel(sam, return_single_mask=True)
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(3))
    for coords, labels in (([[300.0, 200.0], [0.0, 0.0]], [1, -1]),
                           ([[300.0, 200.0], [600.0, 100.0], [10.0, 10.0], [0.0, 0.0]], [1, 0, 1, -1])):
        feeds = _feeds(emb, coords, labels, (350, 500))
        got = onnx_session(out).run(None, feeds)
        ref = official(*(torch.from_numpy(feeds[k]) for k in DECODER_INPUTS))
        assert got[0].shape == (1, 1, 350, 500)
        for o, r in zip(got, ref):
            assert np.abs(o - r.numpy()).max() <= 1e-4


def test_cli_errors(exported, tmp_path, capsys):
    _, ckpt, _, _, _ = exported
    for args, words in ((["--int8"], "encoder only"), (["--model", "vit_b"], "encoder only"),
                        (["--return-single-mask", "--verify"], "--verify compares all four")):
        out = str(tmp_path / "x.onnx")
        assert main(["export", "onnx", "--decoder", "--checkpoint", ckpt, "--out", out] + args) == 2
        assert words in capsys.readouterr().err
    assert main(["export", "onnx", "--return-single-mask", "--checkpoint", ckpt]) == 2
    assert "only applies with --decoder" in capsys.readouterr().err
    enc_only = tmp_path / "enc.safetensors"
    samvit.save_encoder(samvit.load_encoder(None, ckpt), enc_only)
    assert main(["export", "onnx", "--decoder", "--checkpoint", str(enc_only), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "prompt_encoder" in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()
