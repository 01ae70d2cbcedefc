"""`samvit embed --backend openvino`: OpenVINO runs the exported encoder with the torch encoder's outputs (max abs
<= 1e-4), at any batch size, into per-file outputs or a store with the same resume."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("openvino")
pytest.importorskip("onnxscript")

import samvit  # noqa: E402
from samvit.cli import main  # noqa: E402
from samvit.embeddings.store import EmbeddingStore  # noqa: E402
from samvit.export import OpenVINOEncoder  # noqa: E402

from tests._hostile_utils import write_image  # noqa: E402
from tests.helpers import TINY, randomize_  # noqa: E402


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ov") / "tiny.safetensors"
    samvit.save_encoder(randomize_(samvit.ImageEncoder(TINY), seed=5).eval(), str(path))
    return str(path)


def test_outputs_equal_the_torch_encoder_at_any_batch(tiny_ckpt):
    enc = samvit.load_encoder(TINY, tiny_ckpt, dtype=torch.float32)
    ov = OpenVINOEncoder(enc, threads=1)
    assert ov.config == enc.config and ov.dtype == torch.float32 and ov.device.type == "cpu"
    for batch in (1, 3):
        x = torch.randn(batch, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            ref = enc(x)
        out = ov(x)
        assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="precision must be"):
        OpenVINOEncoder(enc, precision="int4")


def test_cli_store_equals_torch_and_resumes(tiny_ckpt, tmp_path, capsys):
    imgs = [write_image(tmp_path / "in" / f"{i}.png", seed=i) for i in range(3)]
    base = ["embed", str(tmp_path / "in"), "--checkpoint", tiny_ckpt, "--store-dtype", "float32", "--workers", "0",
            "--batch-size", "2"]
    assert main(base + ["--quiet", "--store", str(tmp_path / "torch.store")]) == 0
    assert main(base + ["--quiet", "--store", str(tmp_path / "ov.store"), "--backend", "openvino"]) == 0
    a, b = EmbeddingStore(str(tmp_path / "torch.store")), EmbeddingStore(str(tmp_path / "ov.store"))
    assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) == len(imgs)
    for k in a.keys():
        assert (a.get(k) - b.get(k)).abs().max() <= 1e-4
    capsys.readouterr()
    assert main(base + ["--store", str(tmp_path / "ov.store"), "--backend", "openvino"]) == 0  # resumes
    assert "3 already in the store" in capsys.readouterr().err


def test_cli_refuses_other_dtypes_for_openvino(tiny_ckpt, tmp_path, capsys):
    img = write_image(tmp_path / "a.png")
    rc = main(["embed", img, "--checkpoint", tiny_ckpt, "--backend", "openvino",
               "--dtype", "bfloat16", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--backend openvino runs float32" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
