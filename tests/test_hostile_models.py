"""Provenance and hostile model files: embeddings used with another model are refused (unless --allow-mismatch),
NaN/inf never reach an output, hostile checkpoint metadata ends in one line, converted files keep a non-preset
config, a missing optional package says how to install it, --debug shows the traceback. Every case: the exit
code, a message naming the culprit, no traceback, nothing else changed."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from tests._hostile_utils import cli, snapshot, tiny_sam_checkpoint, write_image
from tests.helpers import TINY, randomize_
from safetensors.torch import load_file, save_file

import samvit
from samvit.checkpoints.files import read_checkpoint
from samvit.embeddings.files import load_embedding
from samvit.errors import NonFiniteError, ProvenanceError
from samvit.masks.predictor import Predictor


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two full tiny SAM checkpoints (other weights), a photo, and its embedding made with the first."""
    d = tmp_path_factory.mktemp("models")
    a = tiny_sam_checkpoint(d / "a.safetensors")
    sd = load_file(a)
    sd["image_encoder.patch_embed.proj.weight"] = sd["image_encoder.patch_embed.proj.weight"] * 1.5
    b = str(d / "b.safetensors")
    save_file(sd, b, metadata={"samvit_config": TINY.to_json()})
    img = write_image(d / "photo.png", 50, 70)
    rc = samvit.cli.main(["embed", img, "--checkpoint", a, "--out", str(d / "emb"), "--workers", "0", "--quiet"])
    assert rc == 0
    return d, a, b, img, str(d / "emb" / "photo.safetensors")


def _segment(capsys, img, ckpt, *args):
    return cli(["segment", img, "--point", "10,10", "--checkpoint", ckpt, "--quiet", *args], capsys)


def _edit_embedding(src, dst, tensor=None, **meta):
    emb, m = load_embedding(src)
    from safetensors import safe_open

    with safe_open(src, framework="pt") as f:
        raw = dict(f.metadata())
    raw.update({k: str(v) for k, v in meta.items()})
    save_file({"embedding": emb if tensor is None else tensor}, dst, metadata=raw)
    return dst


# ---- provenance ----

def test_embedding_from_other_weights_is_refused(world, tmp_path, capsys):
    d, a, b, img, emb = world
    before = snapshot(d)
    rc, _, err = _segment(capsys, img, b, "--embedding", emb, "--out", tmp_path / "m.png")
    assert rc == 2 and emb in err and "checkpoint sha256" in err and "--allow-mismatch" in err
    assert not (tmp_path / "m.png").exists() and snapshot(d) == before
    rc, _, err = _segment(capsys, img, b, "--embedding", emb, "--out", tmp_path / "m.png", "--allow-mismatch")
    assert rc == 0, err
    rc, _, err = _segment(capsys, img, a, "--embedding", emb, "--out", tmp_path / "n.png")
    assert rc == 0, err


def test_embedding_from_another_model_is_refused(world, tmp_path, capsys):
    d, a, b, img, emb = world
    other = _edit_embedding(emb, str(tmp_path / "e.safetensors"), model="vit_b")
    rc, _, err = _segment(capsys, img, a, "--embedding", other, "--out", tmp_path / "m.png")
    assert rc == 2 and other in err and "model 'vit_b' vs 'tiny'" in err


def test_store_from_other_weights_is_refused(world, tmp_path, capsys):
    d, a, b, img, emb = world
    rc, _, err = cli(["embed", img, "--checkpoint", a, "--store", tmp_path / "s", "--workers", "0", "--quiet"], capsys)
    assert rc == 0, err
    rc, _, err = _segment(capsys, img, b, "--store", tmp_path / "s", "--out", tmp_path / "m.png")
    assert rc == 2 and "key 'photo.png'" in err and "checkpoint sha256" in err
    assert _segment(capsys, img, b, "--store", tmp_path / "s", "--out", tmp_path / "m.png", "--allow-mismatch")[0] == 0


@pytest.mark.parametrize("edit,message", [
    (dict(tensor=torch.full((32, 16, 16), float("nan"))), "NaN or infinite"),
    (dict(tensor=torch.full((32, 16, 16), float("inf"))), "NaN or infinite"),
    (dict(tensor=torch.zeros(16, 16, 16)), "expected shape (32, 16, 16)"),
    (dict(tensor=torch.zeros(32, 16, 16, dtype=torch.int32)), "expected a float tensor"),
    (dict(input_size="999,999"), "out of bounds" if False else "input_size"),
    (dict(input_size="abc"), "input_size 'abc' is not two integers"),
    (dict(original_size="0,5"), "original_size (0, 5) is out of bounds"),
])
def test_bad_embedding_files_are_refused(world, tmp_path, capsys, edit, message):
    d, a, b, img, emb = world
    bad = _edit_embedding(emb, str(tmp_path / "e.safetensors"), **edit)
    before = snapshot(tmp_path)
    rc, out, err = _segment(capsys, img, a, "--embedding", bad, "--out", tmp_path / "m.png")
    assert rc == 2 and bad in err and message in err
    assert snapshot(tmp_path) == before and "NaN" not in out


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}"])
def test_unreadable_embedding_files(world, tmp_path, capsys, content):
    d, a, b, img, emb = world
    (tmp_path / "e.safetensors").write_bytes(content)
    rc, _, err = _segment(capsys, img, a, "--embedding", tmp_path / "e.safetensors", "--out", tmp_path / "m.png")
    assert rc == 2 and str(tmp_path / "e.safetensors") in err


def test_predictor_api_checks_provenance_and_values(world):
    d, a, b, img, emb = world
    p = Predictor.from_checkpoint(b, with_encoder=False)
    with pytest.raises(ProvenanceError, match="checkpoint sha256"):
        p.set_embedding(emb)
    p.set_embedding(emb, allow_mismatch=True)
    tensor, meta = load_embedding(emb)
    with pytest.raises(ProvenanceError):
        p.set_embedding(tensor, meta["original_size"], metadata=meta)
    with pytest.raises(NonFiniteError):
        p.set_embedding(torch.full_like(tensor, float("nan")), meta["original_size"])


def test_nan_decoder_weights_never_give_nan_output(world, tmp_path, capsys):
    d, a, b, img, emb = world
    sd = load_file(a)
    sd["mask_decoder.iou_token.weight"] = torch.full_like(sd["mask_decoder.iou_token.weight"], float("nan"))
    bad = str(tmp_path / "nan.safetensors")
    save_file(sd, bad, metadata={"samvit_config": TINY.to_json()})
    rc, out, err = _segment(capsys, img, bad, "--embedding", emb, "--out", tmp_path / "m.png", "--allow-mismatch")
    assert rc == 2 and "NaN or infinite" in err and not (tmp_path / "m.png").exists()
    rc, out, err = cli(["segment", img, "--auto", "--checkpoint", bad, "--embedding", emb, "--allow-mismatch",
                        "--points-per-side", "4", "--out", tmp_path / "m.json"], capsys)
    assert rc == 2 and "NaN or infinite" in err and not (tmp_path / "m.json").exists() and "NaN" not in out


def test_nan_encoder_weights_fail_every_item(tmp_path, capsys):
    enc = samvit.ImageEncoder(TINY)
    with torch.no_grad():
        enc.neck[0].weight.fill_(float("nan"))
    samvit.save_encoder(enc, tmp_path / "nan.safetensors")
    img = write_image(tmp_path / "in" / "a.png")
    rc, _, err = cli(["embed", img, "--checkpoint", tmp_path / "nan.safetensors", "--out", tmp_path / "o",
                      "--workers", "0", "--quiet"], capsys)
    assert rc == 1 and "a.png" in err and "NaN or infinite" in err
    assert not os.path.exists(tmp_path / "o" / "a.safetensors")


# ---- hostile checkpoints ----

def _tiny_encoder_sd():
    return randomize_(samvit.ImageEncoder(TINY), seed=2).state_dict()


@pytest.mark.parametrize("config,message", [
    ({"num_heads": 0}, "num_heads 0"),
    ({"depth": 10**9}, "depth 1000000000"),
    ({"embed_dim": "wide"}, "embed_dim 'wide'"),
    ({"mlp_ratio": float("nan")}, "mlp_ratio nan"),
    ({"spin": 1}, "unknown EncoderConfig fields"),
    ("not json", "not a valid encoder config"),
    ([1, 2], "JSON object"),
])
def test_hostile_config_metadata(tmp_path, capsys, config, message):
    path = tmp_path / "c.safetensors"
    text = config if isinstance(config, str) else json.dumps(dict(TINY.to_dict(), **config) if isinstance(config, dict)
                                                             else config)
    save_file({k: v.contiguous() for k, v in _tiny_encoder_sd().items()}, str(path), metadata={"samvit_config": text})
    before = snapshot(tmp_path)
    for argv in (["info", "--checkpoint", path], ["embed", write_image(tmp_path / "i" / "a.png"), "--checkpoint", path,
                                                   "--out", tmp_path / "o", "--quiet"]):
        rc, _, err = cli(argv, capsys)
        assert rc == 2 and str(path) in err and message in err and "samvit_config" in err
    assert not (tmp_path / "o").exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if "/i/" not in k} == before


def _header_file(path, header: bytes, body: bytes = b"") -> str:
    path.write_bytes(len(header).to_bytes(8, "little") + header + body)
    return str(path)


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_text("this is a README, not a checkpoint\n"), "not a checkpoint"),
    (lambda p: p.write_bytes(b"\x00" * 64), "not a checkpoint"),
    (lambda p: _header_file(p, b'{"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8),
     "truncated or corrupt"),
    (lambda p: _header_file(p, b'{"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}'),
     "truncated or corrupt"),
    (lambda p: p.write_bytes((2**60).to_bytes(8, "little") + b"{" + b"\0" * 32), "not a checkpoint"),
    (lambda p: save_file({k: v.to(torch.int32).contiguous() for k, v in _tiny_encoder_sd().items()}, str(p),
                         metadata={"samvit_config": TINY.to_json()}), "not floating point"),
    (lambda p: torch.save({"a": torch.zeros(2)}, p), "cannot infer the model"),
    (lambda p: torch.save([1, 2, 3], p), "expected a dict of tensors"),
    (lambda p: p.write_bytes(open(__file__, "rb").read()[:0] + b"PK\x03\x04" + b"\0" * 100), "truncated or not"),
])
def test_hostile_checkpoint_files(tmp_path, capsys, make, message):
    path = tmp_path / "ck.pth"
    make(path)
    img = write_image(tmp_path / "a.png")
    before = snapshot(tmp_path)
    rc, _, err = cli(["embed", img, "--checkpoint", path, "--out", tmp_path / "o", "--quiet"], capsys)
    assert rc == 2 and str(path) in err and message in err, err
    assert snapshot(tmp_path) == before


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "ck.pth").write_bytes(pickle.dumps(Evil(), protocol=2))
    rc, _, err = cli(["info", "--checkpoint", tmp_path / "ck.pth"], capsys)
    assert rc == 2 and "refused to load" in err and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("layout", ["empty folder", "garbage weights"])
def test_hostile_transformers_folder(tmp_path, capsys, layout):
    folder = tmp_path / "hf"
    folder.mkdir()
    if layout == "garbage weights":
        (folder / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{garbage")
    (folder / "config.json").write_text("{")
    rc, _, err = cli(["info", "--checkpoint", folder], capsys)
    assert rc == 2 and str(folder) in err


# ---- round trips: converted files keep the config of a model no preset describes ----

@pytest.mark.parametrize("to,suffix", [("official", ".pth"), ("transformers", ".safetensors"), ("timm", ".pth"),
                                       ("transformers", ".bin")])
def test_convert_keeps_a_non_preset_config(tmp_path, capsys, to, suffix):
    src = tmp_path / "tiny.safetensors"
    enc = randomize_(samvit.ImageEncoder(TINY), seed=5).eval()
    samvit.save_encoder(enc, src)
    out = tmp_path / f"out{suffix}"
    assert cli(["convert", src, out, "--to", to, "--quiet"], capsys)[0] == 0
    sd, meta = read_checkpoint(out)
    assert samvit.EncoderConfig.from_json(meta["samvit_config"]) == TINY
    again = samvit.load_encoder(None, out)
    assert again.config == TINY
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(again(x), enc(x))
    rc, out_text, err = cli(["info", "--checkpoint", out, "--json"], capsys)
    assert rc == 0 and json.loads(out_text)["depth"] == TINY.depth


# ---- the error boundary: missing extras, --debug, internal errors, OS errors ----

def test_missing_optional_package_says_how_to_install(tmp_path, capsys, monkeypatch):
    samvit.save_encoder(samvit.ImageEncoder(TINY), tmp_path / "t.safetensors")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ModuleNotFoundError
    rc, _, err = cli(["export", "onnx", "--checkpoint", tmp_path / "t.safetensors", "--out", tmp_path / "e.onnx",
                      "--quiet"], capsys)
    assert rc == 2 and "onnx" in err and "pip install" in err and "samvit[onnx]" in err
    assert not (tmp_path / "e.onnx").exists()


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    (tmp_path / "t.pth").write_text("text")
    assert samvit.cli.main(["info", "--checkpoint", str(tmp_path / "t.pth"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert samvit.cli.main(["--debug", "info", "--checkpoint", str(tmp_path / "t.pth")]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("SAMVIT_DEBUG", "1")
    assert samvit.cli.main(["info", "--checkpoint", str(tmp_path / "t.pth")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_is_exit_3_without_a_traceback(capsys, monkeypatch):
    import samvit.cli.info as info

    def buggy(args):
        return None + 1

    monkeypatch.setattr(info, "run", buggy)
    rc, _, err = cli(["info", "--model", "vit_b"], capsys)
    assert rc == 3 and "TypeError" in err and "--debug" in err and "bug" in err


def test_os_errors_name_the_path(tmp_path, capsys):
    samvit.save_encoder(samvit.ImageEncoder(TINY), tmp_path / "t.safetensors")
    (tmp_path / "afile").write_text("x")
    rc, _, err = cli(["convert", tmp_path / "t.safetensors", tmp_path / "afile" / "o.pth", "--to", "official"],
                     capsys)
    assert rc == 2 and str(tmp_path / "afile") in err and "Not a directory" in err


@pytest.mark.parametrize("module,advice", [("onnxruntime", "pip install 'samvit[onnx]'"),
                                           ("cv2", "pip install opencv-python-headless"),
                                           ("samvit.nothing", None)])
def test_missing_module_advice(module, advice):
    from samvit.cli import describe_error

    message, code = describe_error(ModuleNotFoundError(f"No module named {module!r}", name=module))
    if advice is None:  # an import of samvit's own that fails is a bug, not a missing package
        assert code == 3
    else:
        assert code == 2 and advice in message


@pytest.mark.parametrize("decoder,message", [({"num_heads": 0}, "decoder num_heads 0"),
                                             ({"num_heads": 3}, "divisible by num_heads 3"),
                                             ({"depth": "two"}, "decoder depth 'two'")])
def test_hostile_decoder_config_metadata(world, tmp_path, capsys, decoder, message):
    """The decoder config a fine-tuned file records is checked as the encoder's is: one line, exit 2."""
    d, a, b, img, emb = world
    bad = str(tmp_path / "dec.safetensors")
    cfg = json.dumps(dict(samvit.DecoderConfig().to_dict(), **decoder))
    save_file(load_file(a), bad, metadata={"samvit_config": TINY.to_json(), "samvit_decoder_config": cfg})
    rc, out, err = _segment(capsys, img, bad, "--embedding", emb, "--out", tmp_path / "m.png", "--allow-mismatch")
    assert rc == 2 and bad in err and message in err and "samvit_decoder_config" in err
    assert not (tmp_path / "m.png").exists()
