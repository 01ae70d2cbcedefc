"""Loading weights: formats, preset inference, strict key checks, clear errors for bad files."""
import pytest
import torch
from tests.helpers import TINY, official_tiny_sam, randomize_

import samvit
from samvit import CheckpointError


@pytest.fixture(scope="module")
def vit_b_state():
    """Encoder-only official-layout tensors of vit_b (random), built on the CPU."""
    enc = randomize_(samvit.ImageEncoder(samvit.preset("vit_b")), seed=7)
    return {k: v.clone() for k, v in enc.state_dict().items()}


def _equal_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_sam_checkpoint_and_encoder_only(tmp_path):
    sam = official_tiny_sam(TINY, seed=3)
    full = tmp_path / "full.pth"
    torch.save(sam.state_dict(), full)
    enc = samvit.load_encoder(TINY, full)
    assert _equal_state(enc.state_dict(), sam.image_encoder.state_dict())
    only = tmp_path / "encoder.pth"
    torch.save(sam.image_encoder.state_dict(), only)
    assert _equal_state(samvit.load_encoder(TINY, only).state_dict(), enc.state_dict())
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": sam.state_dict(), "epoch": 3}, wrapped)
    assert _equal_state(samvit.load_encoder(TINY, wrapped).state_dict(), enc.state_dict())


def test_preset_inferred_from_shapes(tmp_path, vit_b_state):
    path = tmp_path / "b.pth"
    torch.save({f"image_encoder.{k}": v for k, v in vit_b_state.items()}, path)
    enc = samvit.load_encoder(checkpoint=path)
    assert enc.config.name == "vit_b"
    assert _equal_state(enc.state_dict(), vit_b_state)


def test_save_and_load_safetensors_roundtrip(tmp_path):
    enc = randomize_(samvit.ImageEncoder(TINY), seed=2).eval()
    path = tmp_path / "tiny.safetensors"
    samvit.save_encoder(enc, path)
    back = samvit.load_encoder(checkpoint=path)  # config from the metadata
    assert back.config == TINY
    assert _equal_state(back.state_dict(), enc.state_dict())
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        assert torch.equal(back(x), enc(x))


def test_dtype_and_device(tmp_path):
    enc = randomize_(samvit.ImageEncoder(TINY), seed=2)
    path = tmp_path / "tiny.safetensors"
    samvit.save_encoder(enc, path)
    bf = samvit.load_encoder(checkpoint=path, dtype=torch.bfloat16, device="cpu")
    assert bf.dtype == torch.bfloat16
    assert all(m.weight.dtype == torch.bfloat16 for m in bf.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert bf.blocks[0].norm1.weight.dtype == torch.float32  # small tables stay float32 by design (encoder.py)


def test_wrong_preset_names_the_mismatched_keys(tmp_path, vit_b_state):
    path = tmp_path / "b.pth"
    torch.save(vit_b_state, path)
    with pytest.raises(CheckpointError) as e:
        samvit.load_encoder("vit_l", path)
    msg = str(e.value)
    assert "does not fit model 'vit_l'" in msg and "missing keys: blocks.12." in msg
    assert "wrong shapes: blocks.0.attn.proj.bias: checkpoint (768,) vs model (1024,)" in msg


def test_missing_and_unexpected_keys(tmp_path, vit_b_state):
    sd = dict(vit_b_state)
    del sd["blocks.3.mlp.lin1.weight"]
    sd["blocks.3.mlp.extra"] = torch.zeros(3)
    path = tmp_path / "b.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.3\.mlp\.lin1\.weight[\s\S]*unexpected keys: "
                       r"blocks\.3\.mlp\.extra"):
        samvit.load_encoder("vit_b", path)
    with pytest.raises(CheckpointError, match="no preset matches"):
        samvit.load_encoder(checkpoint=path)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'vit_x'; known presets: vit_b, vit_l, vit_h, vit_h_spec, vit_t, vit_s"):
        samvit.preset("vit_x")


def test_truncated_files(tmp_path):
    enc = randomize_(samvit.ImageEncoder(TINY), seed=2)
    pth, st = tmp_path / "t.pth", tmp_path / "t.safetensors"
    torch.save(enc.state_dict(), pth)
    samvit.save_encoder(enc, st)
    for path in (pth, st):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated"):
            samvit.load_encoder(TINY, path)


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "readme.pth"
    text.write_text("not a checkpoint at all\n" * 10)
    with pytest.raises(CheckpointError, match="readme.pth"):
        samvit.load_encoder("vit_b", text)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="not a checkpoint: expected a dict of tensors"):
        samvit.load_encoder("vit_b", tensor)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        samvit.load_encoder("vit_b", empty)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        samvit.load_encoder("vit_b", tmp_path / "missing.pth")
