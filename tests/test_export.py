"""ONNX export: onnxruntime output vs PyTorch and the official encoder, dynamic batch, external data, the CLI."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

import samvit  # noqa: E402
from samvit.cli import main  # noqa: E402
from samvit.export import compare, export_onnx, needs_external_data, onnx_session, verify_onnx  # noqa: E402

from tests.helpers import TINY, official_sam, official_tiny_sam  # noqa: E402


def _input(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(official Sam, samvit encoder, samvit checkpoint, ONNX path exported with the default dynamic batch)."""
    d = tmp_path_factory.mktemp("export")
    sam = official_tiny_sam(TINY, seed=3)
    ckpt = d / "tiny_sam.pth"
    torch.save(sam.state_dict(), ckpt)
    enc = samvit.load_encoder(TINY, ckpt)
    samvit.save_encoder(enc, d / "tiny.safetensors")  # carries its config, so the CLI needs no --model
    path = export_onnx(enc, d / "tiny.onnx")
    return sam, enc, d / "tiny.safetensors", path


@torch.no_grad()
def test_onnx_matches_pytorch_and_official(tiny):
    sam, enc, _, path = tiny
    assert enc.attn_impl == "fast"  # restored after exporting the reference path
    assert not os.path.exists(path + ".data")  # small model: weights inside the file
    onnx.checker.check_model(path)
    sess = onnx_session(path)
    for batch in (1, 3):  # the file was traced with batch 2; other batch sizes go through the dynamic axis
        x = _input(batch, TINY.img_size)
        out = sess.run(None, {"image": x.numpy()})[0]
        assert out.shape == (batch, TINY.out_chans, TINY.grid_size, TINY.grid_size)
        assert np.abs(out - enc(x).numpy()).max() <= 1e-4
        assert np.abs(out - sam.image_encoder(x).numpy()).max() <= 1e-4
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    assert samvit.EncoderConfig.from_json(meta["samvit_config"]) == TINY


def test_cli_external_data_static_batch_verify(tiny, tmp_path, capsys):
    _, enc, ckpt, _ = tiny
    out = tmp_path / "sub" / "enc.onnx"
    rc = main(["export", "onnx", "--checkpoint", str(ckpt), "--out", str(out), "--quiet", "--external-data",
               "--no-dynamic-batch", "--verify"])
    assert rc == 0
    data = str(out) + ".data"
    weight_bytes = sum(p.numel() * 4 for p in enc.parameters())
    assert os.path.getsize(data) >= weight_bytes > os.path.getsize(out)  # one side file holds the weights
    assert sorted(os.listdir(out.parent)) == ["enc.onnx", "enc.onnx.data"]
    onnx.checker.check_model(str(out))  # path-based check follows the external data
    printed = capsys.readouterr().out
    assert "onnxruntime vs PyTorch float32: max abs" in printed
    max_abs = float(printed.split("max abs ")[1].split(",")[0])
    assert max_abs <= 1e-4
    sess = onnx_session(out)
    assert sess.get_inputs()[0].shape == [1, 3, TINY.img_size, TINY.img_size]
    x = _input(1, TINY.img_size, seed=2)
    with torch.no_grad():
        assert np.abs(sess.run(None, {"image": x.numpy()})[0] - enc(x).numpy()).max() <= 1e-4


def test_cli_bad_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    assert main(["export", "onnx", "--checkpoint", str(missing), "--out", str(tmp_path / "e.onnx")]) == 2
    assert "nope.pth" in capsys.readouterr().err
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    assert main(["export", "onnx", "--checkpoint", str(junk), "--out", str(tmp_path / "e.onnx")]) == 2
    err = capsys.readouterr().err
    assert "junk.pth" in err and "Traceback" not in err
    assert not (tmp_path / "e.onnx").exists()


def test_cli_no_checkpoint(monkeypatch, capsys):
    monkeypatch.delenv("SAMVIT_CHECKPOINT", raising=False)
    assert main(["export", "onnx"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_bad_requests(tiny, tmp_path):
    _, enc, ckpt, _ = tiny
    with pytest.raises(ValueError, match="opset 17"):
        export_onnx(enc, tmp_path / "a.onnx", opset=17)
    with pytest.raises(ValueError, match="float32"):
        export_onnx(samvit.load_encoder(TINY, ckpt, dtype=torch.bfloat16), tmp_path / "b.onnx")
    assert not os.listdir(tmp_path)


def test_external_data_decided_by_size():
    with torch.device("meta"):
        encoders = {name: samvit.ImageEncoder(samvit.preset(name)) for name in ("vit_b", "vit_l", "vit_h")}
    assert {k: needs_external_data(e) for k, e in encoders.items()} == {"vit_b": False, "vit_l": False, "vit_h": True}


@pytest.mark.slow
def test_vit_b_export_matches_official(tmp_path):
    sam = official_sam("vit_b", seed=5)
    ckpt = tmp_path / "vit_b.pth"
    torch.save(sam.state_dict(), ckpt)
    enc = samvit.load_encoder("vit_b", ckpt)
    path = export_onnx(enc, tmp_path / "vit_b.onnx")
    assert not os.path.exists(path + ".data")
    diff = verify_onnx(enc, path, threads=2)
    assert diff["max_abs"] <= 1e-4 and diff["cosine"] > 0.999999
    x = _input(1, 1024, seed=6)
    with torch.no_grad():
        ref = sam.image_encoder(x).numpy()
    out = onnx_session(path, threads=2).run(None, {"image": x.numpy()})[0]
    assert np.abs(out - ref).max() <= 1e-4


@torch.no_grad()
def test_cli_int8_accuracy(tiny, tmp_path, capsys, astronaut):
    _, enc, ckpt, _ = tiny
    out = tmp_path / "int8.onnx"
    assert main(["export", "onnx", "--checkpoint", str(ckpt), "--out", str(out), "--int8", "--verify", "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["int8.onnx"]  # the float32 intermediate is gone
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops
    assert "cosine" in capsys.readouterr().out
    # A real photo, preprocessed the official way and shrunk to the tiny model's input size, batch 2.
    x = samvit.preprocess(astronaut).tensor[None]
    x = torch.cat([torch.nn.functional.interpolate(x, size=(TINY.img_size,) * 2, mode="bilinear"),
                   _input(1, TINY.img_size, seed=7)])
    out8 = onnx_session(out).run(None, {"image": x.numpy()})[0]
    diff = compare(out8, enc(x).numpy())
    assert diff["cosine"] >= 0.999, diff
    assert diff["max_abs"] > 1e-4  # it is really quantised, not the float32 graph


@pytest.mark.slow
def test_vit_h_external_data(tmp_path):
    from tests.helpers import randomize_

    enc = randomize_(samvit.load_encoder("vit_h"), seed=8)
    path = export_onnx(enc, tmp_path / "vit_h.onnx")  # 2.5 GB of weights: over the protobuf limit
    assert sorted(os.listdir(tmp_path)) == ["vit_h.onnx", "vit_h.onnx.data"]
    assert os.path.getsize(path + ".data") > 2**31 and os.path.getsize(path) < 2**24
    diff = verify_onnx(enc, path, threads=2)  # onnx.checker ran inside export_onnx, path-based
    assert diff["max_abs"] <= 1e-4, diff


def test_int8_weights_option(tiny, tmp_path):
    """--int8-weights int8 writes signed int8 weights (onnxruntime's U8S8 kernels), uint8 otherwise."""
    _, _, ckpt, _ = tiny
    out = tmp_path / "s8.onnx"
    assert main(["export", "onnx", "--checkpoint", str(ckpt), "--out", str(out), "--int8", "--int8-weights", "int8",
                 "--quiet"]) == 0
    types = {init.data_type for init in onnx.load(str(out)).graph.initializer if init.name.endswith("_quantized")}
    assert types == {onnx.TensorProto.INT8}
    with pytest.raises(ValueError, match="'uint8' or 'int8'"):
        samvit.export.quantize_onnx_int8(out, tmp_path / "x.onnx", weights="int4")
