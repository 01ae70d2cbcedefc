"""Reliability round 3 (issue 20), the commands beyond embed/segment/convert: training fails loudly (a non-finite
loss, a full disk, a second process in the run folder, a data-loader worker's error), `train export-encoder`,
`evaluate` and `inspect` follow the output rule, `evaluate` says when it measured nothing and writes strict JSON,
a store holds only finite values of one compute dtype, one default dtype everywhere, and errors say whose fault
they are. Every case: the exit code, a message naming the culprit, no traceback, nothing else changed."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tests._hostile_utils import cli, small_fs, snapshot, write_image
from tests.helpers import TINY
from PIL import Image

import samvit
from samvit import EmbeddingStore
from samvit.errors import NonFiniteError

MAE = ["train", "mae", "--data", "synthetic", "--model", "mae_tiny", "--synthetic-size", "4", "--batch-size", "2",
       "--quiet"]


def _strict(text: str):
    """json.loads that refuses NaN / Infinity (what a strict JSON parser does)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 1-step mae_tiny run (its ckpt_00000001.pt)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert samvit.cli.main(MAE + ["--steps", "1", "--out", str(out)]) == 0
    return out


# ---- training ----

def test_a_non_finite_loss_stops_the_run_at_its_step(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(MAE + ["--steps", "3", "--ckpt-every", "1", "--lr", "1e30", "--out", out], capsys)
    import re

    m = re.search(r"step (\d+): the loss is nan \(not finite\); the run stopped at this step", err)
    assert rc == 1 and m, err
    step = int(m.group(1))
    kept = sorted(glob.glob(str(out / "ckpt_*.pt")))
    assert kept and len(kept) == step - 1 and f"(newest: ckpt_{step - 1:08d}.pt)" in err  # those before it, kept
    for path in kept:  # every kept checkpoint is finite (the step that diverged was not saved)
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not glob.glob(str(out / "final*"))


def test_export_encoder_refuses_non_finite_weights(run_dir, tmp_path, capsys):
    state = torch.load(run_dir / "ckpt_00000001.pt", weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
    state["model"][name][0] = float("nan")
    torch.save(state, tmp_path / "ckpt_00000001.pt")
    cfg = tmp_path / "enc.json"
    cfg.write_text(json.dumps(dict(embed_dim=64, depth=3, num_heads=2, img_size=224, out_chans=32, window_size=0,
                                   global_attn_indexes=[])))
    rc, _, err = cli(["train", "export-encoder", tmp_path / "ckpt_00000001.pt", "--preset", cfg,
                      "--out", tmp_path / "enc.safetensors"], capsys)
    assert rc == 2 and "NaN or infinite" in err and name in err, err
    assert not (tmp_path / "enc.safetensors").exists()


def test_export_encoder_output_rule(run_dir, tmp_path, capsys):
    cfg = tmp_path / "enc.json"
    cfg.write_text(json.dumps(dict(embed_dim=64, depth=3, num_heads=2, img_size=224, out_chans=32, window_size=0,
                                   global_attn_indexes=[])))
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"someone else's file")
    before = snapshot(run_dir, other)
    rc, _, err = cli(["train", "export-encoder", run_dir, "--preset", cfg, "--out", other], capsys)
    assert rc == 2 and "exists; pass --force" in err
    rc, _, err = cli(["train", "export-encoder", run_dir, "--preset", cfg, "--out", run_dir / "x.safetensors"],
                     capsys)
    assert rc == 2 and "would write into the input" in err
    assert snapshot(run_dir, other) == before
    rc, _, err = cli(["train", "export-encoder", run_dir, "--preset", cfg, "--out", other, "--force"], capsys)
    assert rc == 0, err
    assert samvit.load_encoder(checkpoint=str(other)).config.embed_dim == 64


def test_run_folder_inside_the_data_is_refused(tmp_path, capsys):
    data = tmp_path / "images"
    write_image(data / "a.png", 32, 32)
    before = snapshot(data)
    rc, _, err = cli(["train", "mae", "--data", data, "--model", "mae_tiny", "--batch-size", "1", "--steps", "1",
                      "--out", data / "run", "--quiet"], capsys)
    assert rc == 2 and "inside the input --data" in err
    assert snapshot(data) == before


def test_a_full_disk_while_writing_a_checkpoint(tmp_path, capsys):
    """A real 6 MiB file system: the step-1 checkpoint (4.4 MB) fits, the step-2 one does not."""
    mount = tmp_path / "fs"
    try:
        fs = small_fs(mount, "6m")
        fs.__enter__()
    except OSError as e:
        pytest.skip(str(e))
    try:
        out = mount / "run"
        rc, _, err = cli(MAE + ["--steps", "2", "--ckpt-every", "1", "--out", out], capsys)
        assert rc == 2 and str(out / "ckpt_00000002.pt") in err and "No space left on device" in err, err
        assert "bug" not in err
        assert sorted(os.listdir(out)) == ["ckpt_00000001.pt", "config.json", "log.jsonl", "train.lock"]  # no temp
    finally:
        fs.__exit__(None, None, None)


def test_a_second_process_in_a_run_folder_is_refused(run_dir, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from samvit.train.ckpt import lock_run_dir; "
                               "lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                  [os.path.dirname(os.path.dirname(samvit.__file__))] + sys.path)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run_dir)
        rc, _, err = cli(MAE + ["--steps", "2", "--out", run_dir, "--resume"], capsys)
        assert rc == 2 and f"pid {holder.pid} on " in err and "another process is training" in err, err
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_data_loader_worker_error_is_the_same_one_line(tmp_path, capfd):
    data = tmp_path / "bad"
    data.mkdir()
    for name in ("a.png", "b.png"):
        (data / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    lines = []
    for workers in ("0", "1"):
        rc = samvit.cli.main(["train", "mae", "--data", str(data), "--model", "mae_tiny", "--batch-size", "1",
                              "--steps", "1", "--out", str(tmp_path / f"run{workers}"), "--num-workers", workers,
                              "--quiet"])
        out, err = capfd.readouterr()
        assert rc == 2 and "Traceback" not in err + out and "DataLoader worker" not in err, err
        lines.append([ln.replace(f"run{workers}", "RUN") for ln in err.splitlines() if "error:" in ln])
    assert lines[0] == lines[1] and len(lines[0]) == 1 and "could be decoded" in lines[0][0], lines


# ---- evaluate ----

def _mask_folder(root, mask_shape=(64, 64), square=(10, 50)):
    """images/a.png (64x64) and masks/a.png: one square object (label 1) in a label image of mask_shape."""
    write_image(root / "images" / "a.png", 64, 64)
    labels = np.zeros(mask_shape, np.uint8)
    labels[square[0]:square[1], square[0]:square[1]] = 1
    os.makedirs(root / "masks", exist_ok=True)
    Image.fromarray(labels).save(root / "masks" / "a.png")
    return root


@pytest.fixture(scope="module")
def sam_ckpt(tmp_path_factory):
    from tests._hostile_utils import tiny_sam_checkpoint

    return tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam.safetensors")


def test_evaluate_json_is_strict_when_a_size_group_is_empty(sam_ckpt, tmp_path, capsys):
    data = _mask_folder(tmp_path / "d")  # one 40x40 object: "medium"; no small or large object
    rc, _, err = cli(["evaluate", "--data", data, "--checkpoint", sam_ckpt, "--json", tmp_path / "r.json",
                      "--clicks", "1", "--quiet"], capsys)
    assert rc == 0, err
    r = _strict((tmp_path / "r.json").read_text())
    assert r["n_objects"] == 1 and r["per_size"]["small"] == {"point1_miou": None, "box_miou": None,
                                                             "clicks1_miou": None, "n_objects": 0}
    assert r["skipped_items"] == []


@pytest.mark.parametrize("make,reason", [
    (lambda d: _mask_folder(d, mask_shape=(32, 32)), "mask is 32x32, its image 64x64"),  # wrong mask size
    (lambda d: _mask_folder(d, square=(0, 0)), "no object in the mask"),  # an empty mask
    (None, "cannot read a COCO annotations JSON"),  # a bad COCO file
])
def test_evaluate_exits_1_naming_why_when_it_measured_nothing(sam_ckpt, tmp_path, capsys, make, reason):
    if make is None:
        (tmp_path / "ann.json").write_text("{not json")
        write_image(tmp_path / "imgs" / "a.png")
        data = ["--data", tmp_path / "ann.json", "--images", tmp_path / "imgs"]
    else:
        data = ["--data", make(tmp_path / "d")]
    rc, _, err = cli(["evaluate", *data, "--checkpoint", sam_ckpt, "--json", tmp_path / "r.json", "--quiet"], capsys)
    assert rc == 1 and "measured nothing" in err and reason in err, err
    assert "skipped: " in err  # each skipped item listed
    r = _strict((tmp_path / "r.json").read_text())
    assert r["n_objects"] == 0 and r["point1_miou"] is None and any(reason in i["reason"] for i in r["skipped_items"])


def test_evaluate_output_rule(sam_ckpt, tmp_path, capsys):
    data = _mask_folder(tmp_path / "d")
    theirs = tmp_path / "theirs.json"
    theirs.write_text("keep me")
    base = ["evaluate", "--data", data, "--checkpoint", sam_ckpt, "--clicks", "1", "--quiet"]
    before = snapshot(data, theirs, sam_ckpt)
    for argv, message in [(["--json", theirs], "exists; pass --force"),
                          (["--json", tmp_path / "a.json", "--markdown", tmp_path / "a.json"], "is --json"),
                          (["--json", data / "masks" / "a.png"], "inside the input folder"),
                          (["--json", data / "r.json"], "inside the input folder"),
                          (["--json", sam_ckpt], "would replace one of this run's inputs")]:
        rc, _, err = cli(base + argv, capsys)
        assert rc == 2 and message in err, (argv, err)
    assert snapshot(data, theirs, sam_ckpt) == before
    rc, _, err = cli(base + ["--json", theirs, "--force"], capsys)
    assert rc == 0 and _strict(theirs.read_text())["n_objects"] == 1


# ---- inspect ----

@pytest.fixture(scope="module")
def tiny_encoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "tiny.safetensors"
    torch.manual_seed(0)
    samvit.save_encoder(samvit.ImageEncoder(TINY), path)
    return path


def test_inspect_output_rule(tiny_encoder_file, tmp_path, capsys):
    img = write_image(tmp_path / "img.png", 48, 64)
    theirs = tmp_path / "theirs.png"
    theirs.write_bytes(b"keep me")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "distance.csv").write_text("keep me")
    before = snapshot(tmp_path)
    ck = ["--checkpoint", tiny_encoder_file]
    for argv, message in [(["pca", img, *ck, "--out", theirs], "exists; pass --force"),
                          (["pca", img, *ck, "--out", img], "is one of the inputs"),
                          (["attention", img, *ck, "--block", "0", "--out", theirs], "exists; pass --force"),
                          (["distance", img, *ck, "--out", tmp_path / "d"], "distance.csv exists; pass --force")]:
        rc, _, err = cli(["inspect", *argv], capsys)
        assert rc == 2 and message in err, (argv, err)
    assert snapshot(tmp_path) == before
    pytest.importorskip("matplotlib")
    rc, _, err = cli(["inspect", "pca", img, *ck, "--out", theirs, "--force", "--quiet"], capsys)
    assert rc == 0 and theirs.read_bytes()[:4] == b"\x89PNG"


# ---- store ----

SHAPE = (8, 4, 4)


def _store(path):
    return EmbeddingStore.create(path, model="tiny", config={}, embedding_shape=SHAPE, checkpoint_sha256="ab" * 32,
                                 dtype="float16")


def test_nothing_non_finite_enters_a_store_and_verify_reports_it(tmp_path, capsys, monkeypatch):
    import samvit.embeddings.store as store_module

    st = _store(tmp_path / "s")
    with st.writer(model="tiny", checkpoint_sha256="ab" * 32, samvit_version="t", compute_dtype="float32") as w:
        w.put("ok", torch.ones(SHAPE), sha256="s0", original_size=(8, 8))
        with pytest.raises(NonFiniteError, match="'nan'.*NaN or infinite"):
            w.put("nan", torch.full(SHAPE, float("nan")), sha256="s1", original_size=(8, 8))
        with pytest.raises(NonFiniteError, match="'big'"):  # finite in float32, inf in the float16 store
            w.put("big", torch.full(SHAPE, 1e6), sha256="s2", original_size=(8, 8))
    assert EmbeddingStore.open(tmp_path / "s").keys() == ["ok"]
    # a store written before this check (or by another tool) that holds NaN: `store verify` reports the item
    monkeypatch.setattr(store_module, "nonfinite_problem", lambda rows: None)
    with EmbeddingStore.open(tmp_path / "s").writer(model="tiny", checkpoint_sha256="ab" * 32, samvit_version="old",
                                                    compute_dtype="float32") as w:
        w.put("old", torch.full(SHAPE, float("nan")), sha256="s3", original_size=(8, 8))
    monkeypatch.undo()
    rc, out, err = cli(["store", "verify", tmp_path / "s"], capsys)
    assert rc == 1 and "old: holds 128 NaN or infinite values" in out + err and "ok:" not in out + err
    from samvit.embeddings.files import save_embedding  # ... nor to an embedding file

    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        save_embedding(str(tmp_path / "e.safetensors"), torch.full(SHAPE, float("inf")), (8, 8), (8, 8), {})
    assert not (tmp_path / "e.safetensors").exists()


def test_a_store_refuses_another_compute_dtype_unless_allowed(sam_ckpt, tmp_path, capsys):
    a, b = write_image(tmp_path / "in" / "a.png"), write_image(tmp_path / "in2" / "b.png", seed=1)
    store = tmp_path / "s"
    rc, _, err = cli(["embed", a, "--checkpoint", sam_ckpt, "--store", store, "--dtype", "bfloat16", "--quiet",
                      "--workers", "0"], capsys)
    assert rc == 0, err
    before = snapshot(store)
    rc, _, err = cli(["embed", b, "--checkpoint", sam_ckpt, "--store", store, "--quiet", "--workers", "0"], capsys)
    assert rc == 2 and "computed in bfloat16; this run computes float32" in err, err
    assert "--dtype bfloat16" in err and "--allow-mixed-dtypes" in err  # the library's advice in the CLI's flags
    assert snapshot(store) == before
    rc, _, err = cli(["embed", b, "--checkpoint", sam_ckpt, "--store", store, "--quiet", "--workers", "0",
                      "--allow-mixed-dtypes"], capsys)
    assert rc == 0, err
    st = EmbeddingStore.open(store)
    assert [st.metadata(k)["compute_dtype"] for k in ("a.png", "b.png")] == ["bfloat16", "float32"]


# ---- one dtype policy ----

def test_the_default_dtype_is_float32_everywhere_and_said(sam_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SAMVIT_DTYPE", raising=False)  # the real defaults, not the test suite's
    from safetensors import safe_open

    assert samvit.load_encoder(TINY).dtype == torch.float32
    assert samvit.Predictor.from_checkpoint(sam_ckpt).encoder.dtype == torch.float32
    img = write_image(tmp_path / "a.png")
    rc, _, err = cli(["embed", img, "--checkpoint", sam_ckpt, "--out", tmp_path / "e", "--workers", "0"], capsys)
    assert rc == 0 and "dtype float32 (the default" in err, err
    with safe_open(str(tmp_path / "e" / "a.safetensors"), "pt") as f:
        assert f.metadata()["dtype"] == "float32"
    rc, _, err = cli(["segment", img, "--checkpoint", sam_ckpt, "--point", "10,10", "--out", tmp_path / "m.png"],
                     capsys)
    assert rc == 0 and "dtype float32 (the default" in err, err


def test_embed_and_the_cvat_route_give_the_same_embedding_by_default(tmp_path, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    import base64

    from tests._serve_utils import object_image, official_tiny_sam_1024, png_bytes, running, save_full_checkpoint
    from safetensors.torch import load_file

    monkeypatch.delenv("SAMVIT_DTYPE", raising=False)  # the real defaults of both commands
    ckpt = save_full_checkpoint(official_tiny_sam_1024(seed=0), tmp_path / "sam.safetensors")
    data = png_bytes(object_image())
    (tmp_path / "object.png").write_bytes(data)
    rc, _, err = cli(["embed", tmp_path / "object.png", "--checkpoint", ckpt, "--out", tmp_path / "e", "--quiet",
                      "--workers", "0"], capsys)
    assert rc == 0, err
    apps = []
    # `samvit serve` with its defaults, up to the point where it would start listening
    with monkeypatch.context() as m:
        m.setattr(uvicorn.Server, "run", lambda self, sockets=None: apps.append(self.config.app))
        assert samvit.cli.main(["serve", "--checkpoint", ckpt]) == 0
    with running(apps[0]) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/cvat/embedding", json={"image": base64.b64encode(data).decode()})
    assert r.status_code == 200, r.text
    blob = np.frombuffer(base64.b64decode(r.json()["blob"]), np.float32).reshape(1, 256, 64, 64)
    np.testing.assert_array_equal(blob[0], load_file(str(tmp_path / "e" / "object.safetensors"))["embedding"].numpy())


# ---- whose fault ----

class _Bad(torch.utils.data.Dataset):
    """Item 0: a ValueError from inside torch (a bug); item 1: an argument check of samvit's (the user's)."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i):
        return torch.zeros(2).view(3) if i == 0 else samvit.preset("vit_nope")


def test_a_worker_error_is_described_as_without_workers():
    from samvit.cli import describe_error

    for index, code in ((0, 3), (1, 2)):
        seen = []
        for workers in (0, 1):
            loader = iter(torch.utils.data.DataLoader(torch.utils.data.Subset(_Bad(), [index]), batch_size=None,
                                                      num_workers=workers))
            with pytest.raises(Exception) as e:
                next(loader)
            seen.append(describe_error(e.value))
            del loader
        assert seen[0] == seen[1] and seen[0][1] == code and "Traceback" not in seen[1][0], seen


def test_errors_say_whose_fault(capsys, monkeypatch, tmp_path):
    import errno

    import samvit.cli.info as info
    from samvit.cli import describe_error
    from samvit.errors import ParameterError

    def torch_raises(args):  # a ValueError raised inside torch: a bug of samvit's, not a usage error
        torch.zeros(2).view(3)

    monkeypatch.setattr(info, "run", torch_raises)
    rc, _, err = cli(["info", "--model", "vit_b"], capsys)
    assert rc == 3 and "bug in samvit" in err
    message, code = describe_error(OSError(errno.ENOSPC, "No space left on device", "/x/ckpt.pt"))
    assert code == 2 and message == "/x/ckpt.pt: No space left on device"  # a full disk is never a bug
    assert describe_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))[1] == 2
    message, code = describe_error(ParameterError("batch_size must be at least 1, got 0", "batch_size"))
    assert code == 2 and message == "--batch-size must be at least 1, got 0"
    with pytest.raises(ParameterError, match="device 'tpu' is unknown"):
        samvit.load_encoder(TINY, device="tpu")
    rc, _, err = cli(["embed", write_image(tmp_path / "a.png"), "--model", "vit_b", "--checkpoint", "x",
                      "--device", "tpu"], capsys)
    assert rc == 2 and "--device 'tpu' is unknown" in err, err
