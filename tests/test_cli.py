"""The `samvit` command: info, per-file embed, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from tests.helpers import TINY, randomize_
from PIL import Image

import samvit
from samvit.cli import main
from samvit.embeddings.files import load_embedding
from samvit.checkpoints.registry import checkpoint_sha256


def test_help_lists_commands(capsys):
    out = subprocess.run([sys.executable, "-m", "samvit", "--help"], capture_output=True, text=True, check=True).stdout
    assert "embed" in out and "info" in out


def test_info_presets_and_checkpoint(capsys, tmp_path):
    assert main(["info", "--model", "vit_h"]) == 0
    out = capsys.readouterr().out
    assert "637.0M" in out and "global at blocks [7, 15, 23, 31]" in out
    assert main(["info", "--model", "vit_h_spec", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["window_size"] == 8 and d["global_attn_indexes"] == list(range(16, 32)) and d["embedding"] is None
    enc = samvit.ImageEncoder(TINY)
    samvit.save_encoder(enc, tmp_path / "t.safetensors")
    assert main(["info", "--checkpoint", str(tmp_path / "t.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == enc.num_parameters()
    assert main(["info", "--model", "vit_q"]) == 2
    assert "unknown model preset 'vit_q'" in capsys.readouterr().err


def test_embed_per_file_with_a_bad_image(tmp_path, astronaut, coffee, capsys):
    enc = randomize_(samvit.ImageEncoder(TINY), seed=1).eval()
    ckpt = tmp_path / "tiny.safetensors"
    samvit.save_encoder(enc, ckpt)
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(astronaut).save(src / "astronaut.png")
    Image.fromarray(coffee).save(src / "sub" / "coffee.jpg")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (src / "notes.md").write_text("ignored: not an image extension")
    out = tmp_path / "out"
    rc = main(["embed", str(src), "--checkpoint", str(ckpt), "--out", str(out), "--batch-size", "2", "--quiet"])
    assert rc == 1  # something failed
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "cannot decode" in err
    files = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs)
    assert files == ["astronaut.safetensors", os.path.join("sub", "coffee.safetensors")]
    emb, meta = load_embedding(str(out / "sub" / "coffee.safetensors"))
    assert emb.shape == (32, 16, 16)
    assert meta["original_size"] == (400, 600) and meta["input_size"] == (171, 256)
    assert meta["model"] == "tiny" and meta["checkpoint_sha256"] == checkpoint_sha256(ckpt)
    assert meta["samvit_version"] == samvit.__version__
    with torch.inference_mode():
        direct = enc(samvit.preprocess(src / "sub" / "coffee.jpg", img_size=256).tensor[None])[0]
    assert (emb - direct).abs().max() <= 1e-5


def test_embed_errors(tmp_path, capsys):
    assert main(["embed", str(tmp_path / "nothing"), "--checkpoint", "x.pth"]) == 2
    assert "no such file, directory or matching glob" in capsys.readouterr().err
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    env = {k: v for k, v in os.environ.items() if k != "SAMVIT_CHECKPOINT"}
    r = subprocess.run([sys.executable, "-m", "samvit", "embed", str(img)], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "no checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_preset_lists_in_the_help_come_from_the_config(capsys):
    from samvit.config import NO_RELEASED_WEIGHTS, PRESET_ALIASES, PRESETS, TINYVIT_PRESETS

    every = [*PRESETS, *TINYVIT_PRESETS, *PRESET_ALIASES]
    for argv, names in ((["embed", "--help"], every), (["info", "--help"], every),
                        (["train", "distill", "--help"], every), (["export", "onnx", "--help"], list(PRESETS)),
                        (["download", "--help"], [n for n in PRESETS if n not in NO_RELEASED_WEIGHTS])):
        try:
            main(argv)
        except SystemExit:
            pass
        out = " ".join(capsys.readouterr().out.split())
        assert all(name in out for name in names), (argv, [n for n in names if n not in out])
    assert "vit_h_spec" not in out  # download lists only the released checkpoints
