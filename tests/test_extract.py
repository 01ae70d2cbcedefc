"""The collection pipeline: equality with the encoder, resume, SIGKILL, bad files, torchrun, tiles, identity."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import samvit
from samvit import EmbeddingStore, ImageEncoder, load_encoder, preprocess
from samvit.checkpoints.files import sha256_file
from samvit.checkpoints.registry import checkpoint_sha256
from samvit.cli import main
from samvit.data.tiles import tile_grid
from samvit.embeddings.pipeline import EmbedReport, StoreSink, embed
from samvit.data.sources import collect_inputs
from samvit.embeddings.store import StoreMismatchError, _read_log
from samvit.data.preprocess import normalize_and_pad, resize_longest_side

from tests._torchrun_utils import one_thread_env, torchrun
from tests.helpers import TINY, randomize_


def extract(encoder, items, path, *, checkpoint_sha256, store_dtype=None, report_path=None, **kw) -> EmbedReport:
    """The embed loop into a store at `path`."""
    return embed(encoder, items, StoreSink(str(path), checkpoint_sha256, dtype=store_dtype, report_path=report_path),
                 **kw)


PY = sys.executable


pytestmark = pytest.mark.usefixtures("one_thread")  # the arithmetic of the one-thread subprocesses


@pytest.fixture(scope="module")
def encoder(ckpt):
    return load_encoder(None, ckpt)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real photos from skimage plus Pillow-made images of other modes, in a directory tree."""
    from skimage import data

    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    Image.fromarray(data.astronaut()).save(root / "astronaut.png")
    Image.fromarray(data.coffee()).save(root / "sub" / "coffee.jpg", quality=90)
    Image.fromarray(data.camera()).save(root / "camera.png")  # grayscale
    Image.fromarray(data.chelsea()).save(root / "sub" / "chelsea.webp")
    rgba = np.dstack([data.rocket(), np.full(data.rocket().shape[:2], 200, np.uint8)])
    Image.fromarray(rgba).save(root / "rocket_rgba.png")
    Image.fromarray(data.coins()).convert("P").save(root / "coins.gif")
    return str(root)


def run_cli(capsys, *args):
    """`samvit ARGS` in this process: (exit code, stderr)."""
    code = main(list(args))
    return code, capsys.readouterr().err


def assert_same_store(a: str, b: str) -> None:
    sa, sb = EmbeddingStore.open(a), EmbeddingStore.open(b)
    assert sa.keys() == sb.keys()
    for k in sa.keys():
        (ea, ma), (eb, mb) = sa[k], sb[k]
        assert torch.equal(ea, eb), k
        for f in ("sha256", "original_size", "input_size", "tiles"):
            assert ma[f] == mb[f], (k, f)


def test_store_equals_direct_encoding(tmp_path, images, encoder, ckpt):
    items = collect_inputs([images])
    rep = extract(encoder, items, str(tmp_path / "s"), checkpoint_sha256="x", batch_size=2, workers=2,
                  store_dtype="float32", progress=False)
    assert (rep.total, rep.embedded, rep.failed) == (6, 6, [])
    s = EmbeddingStore.open(tmp_path / "s")
    assert s.keys() == sorted(k for _, k in items) and "sub/coffee.jpg" in s
    for path, key in items:
        prep = preprocess(path, TINY.img_size)
        with torch.inference_mode():
            ref = encoder(prep.tensor[None])[0]
        emb, meta = s[key]
        torch.testing.assert_close(emb, ref, rtol=0, atol=1e-5)
        assert meta["original_size"] == prep.original_size and meta["input_size"] == prep.input_size
        assert meta["sha256"] == sha256_file(path) and meta["model"] == "tiny"


def test_file_sink_and_progress_callback(tmp_path, images, encoder):
    """The same loop writes one file per image; progress goes to a callback, ending at (total, total)."""
    from samvit.embeddings.files import load_embedding
    from samvit.embeddings.pipeline import FileSink

    items = collect_inputs([images])
    calls = []
    sink = FileSink(str(tmp_path / "out"), "x")
    rep = embed(encoder, items, sink, batch_size=2, workers=0, progress=lambda done, total, **notes: calls.append(
        (done, total)))
    assert (rep.embedded, rep.failed) == (6, []) and calls[-1] == (6, 6) and len(calls) == 6
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    for path, key in items:
        emb, meta = load_embedding(str(tmp_path / "out" / (os.path.splitext(key)[0] + ".safetensors")))
        prep = preprocess(path, TINY.img_size)
        with torch.inference_mode():
            torch.testing.assert_close(emb, encoder(prep.tensor[None])[0], rtol=0, atol=1e-5)
        assert meta["original_size"] == prep.original_size and meta["source"] == key and meta["model"] == "tiny"
    with pytest.raises(ValueError, match="tiles need an embedding store"):
        embed(encoder, items, sink, tile=100, workers=0)


def test_resume_skips_done_and_never_duplicates(tmp_path, images, encoder):
    src = tmp_path / "in"
    shutil.copytree(images, src)
    out = str(tmp_path / "s")
    kw = dict(checkpoint_sha256="x", workers=0, progress=False)
    assert extract(encoder, collect_inputs([str(src)]), out, **kw).embedded == 6
    rep = extract(encoder, collect_inputs([str(src)]), out, **kw)
    assert (rep.embedded, rep.skipped) == (0, 6)
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(src / "camera.png")  # content changed: re-embedded
    shutil.copy(src / "astronaut.png", src / "astronaut_copy.png")  # same content, new key: reused
    rep = extract(encoder, collect_inputs([str(src)]), out, **kw)
    assert (rep.embedded, rep.skipped, rep.reused) == (1, 5, 1)
    s = EmbeddingStore.open(out)
    assert len(s) == 7 and s.metadata("camera.png")["original_size"] == (50, 70)
    assert torch.equal(s.get("astronaut_copy.png"), s.get("astronaut.png"))
    records = sum(len(_read_log(str(p))[1]) for p in (tmp_path / "s" / "index").iterdir())
    assert records == 8 and s.verify().ok  # 6 + the changed file + the alias; nothing written twice


def _committed(store: str) -> int:
    index = os.path.join(store, "index")
    if not os.path.isdir(index):
        return 0
    return sum(len(_read_log(os.path.join(index, n))[1]) for n in os.listdir(index))


def test_sigkill_at_any_moment_then_resume_equals_uninterrupted_run(tmp_path, ckpt, encoder):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    n = 32
    for i in range(n):  # big enough that decoding keeps the run going for a few seconds
        Image.fromarray(rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8)).save(src / f"img{i:02d}.jpg")
    ref = str(tmp_path / "ref")
    extract(encoder, collect_inputs([str(src)]), ref, checkpoint_sha256=checkpoint_sha256(ckpt),
            workers=0, progress=False)
    out = str(tmp_path / "s")
    cmd = [PY, "-m", "samvit", "embed", str(src), "--checkpoint", ckpt, "--store", out, "--workers", "0",
           "--batch-size", "1", "--quiet"]
    # 1) killed mid-run, once some items are committed
    proc = subprocess.Popen(cmd, env=one_thread_env(), stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while _committed(out) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _committed(out)
    assert 3 <= done < n, f"run was not killed mid-way ({done} of {n} committed)"
    s = EmbeddingStore.open(out)
    assert 3 <= len(s) < n and s.verify().ok
    # 2) resumed runs killed at other moments: right after their writer session opened, and while writing
    for target in ("session", "writing"):
        sessions, before = len(os.listdir(os.path.join(out, "index"))), _committed(out)
        proc = subprocess.Popen(cmd, env=one_thread_env(), stderr=subprocess.DEVNULL)
        while proc.poll() is None and time.time() < deadline:
            if (len(os.listdir(os.path.join(out, "index"))) > sessions if target == "session"
                    else _committed(out) > before + 1):
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        s = EmbeddingStore.open(out)
        assert len(s) < n and s.verify().ok
    # 3) the re-run completes it
    proc = subprocess.run(cmd, env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    s = EmbeddingStore.open(out)
    assert len(s) == n and s.verify().ok
    assert_same_store(out, ref)


def _bomb_png(path, width=30000, height=30000):
    """A small PNG whose header claims width x height pixels (decompression-bomb sized)."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    ihdr = raw[12:29]  # b"IHDR" + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(raw))


def test_bad_files_are_reported_and_the_rest_written(tmp_path, images, ckpt, capsys):
    src = tmp_path / "in"
    shutil.copytree(images, src)
    good = len(collect_inputs([str(src)]))
    full = (src / "astronaut.png").read_bytes()
    (src / "truncated.png").write_bytes(full[: len(full) // 2])
    (src / "notes.jpg").write_text("this is not an image\n")
    (src / "empty.png").write_bytes(b"")
    _bomb_png(src / "bomb.png")
    os.symlink(src / "gone.png", src / "dangling.png")  # unreadable: the file it names does not exist
    lst = tmp_path / "list.txt"
    lst.write_text("in/missing.tif\n")
    report = tmp_path / "report.jsonl"
    code, err = run_cli(capsys, "embed", str(src), str(lst), "--checkpoint", ckpt, "--store", str(tmp_path / "s"),
                        "--report", str(report), "--workers", "2", "--batch-size", "3")
    assert code == 1, err
    failures = {f["key"]: f["reason"] for f in map(json.loads, report.read_text().splitlines())}
    assert set(failures) == {"truncated.png", "notes.jpg", "empty.png", "bomb.png", "dangling.png",
                             "in/missing.tif"}
    assert "cannot decode image" in failures["truncated.png"] and "cannot decode" in failures["notes.jpg"]
    assert "empty file" in failures["empty.png"] and "decompression bomb" in failures["bomb.png"]
    assert "cannot read file" in failures["dangling.png"] and "cannot read file" in failures["in/missing.tif"]
    assert "6 failed" in err and "failed: " in err
    s = EmbeddingStore.open(tmp_path / "s")
    assert len(s) == good and s.verify().ok
    # a lower --max-pixels turns a large photo into a failure too; the default report sits in the store
    code, _ = run_cli(capsys, "embed", str(src / "astronaut.png"), "--checkpoint", ckpt, "--store",
                      str(tmp_path / "s2"), "--max-pixels", "1000", "--workers", "0")
    assert code == 1 and "over the limit of 1000" in (tmp_path / "s2" / "failures.jsonl").read_text()


def test_torchrun_two_processes_equal_one(tmp_path, images, ckpt, encoder):
    one = str(tmp_path / "one")
    extract(encoder, collect_inputs([images]), one, checkpoint_sha256=checkpoint_sha256(ckpt),
            workers=0, progress=False)
    two = str(tmp_path / "two")
    proc = torchrun(["-m", "samvit", "embed", images, "--checkpoint", ckpt, "--store", two, "--workers", "1",
                     "--device", "cpu"])
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]  # a rank's own message, if any
    assert proc.returncode == 0, "\n".join(errors) + "\n" + proc.stderr[-3000:]
    assert "6 embedded" in proc.stderr and "on 2 processes" in proc.stderr
    s = EmbeddingStore.open(two)
    assert s.verify().ok and len(s._headers) == 2  # one writer session per rank
    assert sorted(h["writer"].rsplit("-", 1)[1] for h in s._headers.values()) == ["rank0", "rank1"]
    assert_same_store(one, two)


def test_tile_grid_covers_the_image_with_the_requested_overlap():
    for h, w, size, halo in [(512, 512, 200, 32), (300, 451, 128, 64), (100, 80, 256, 16), (1000, 1000, 250, 0)]:
        grid = tile_grid(h, w, size, halo)
        assert len(grid) == -(-h // size) * -(-w // size)
        cover = np.zeros((h, w), np.int32)
        for core, box in grid:
            cover[core[1]:core[3], core[0]:core[2]] += 1
            assert box == (max(0, core[0] - halo), max(0, core[1] - halo), min(w, core[2] + halo),
                           min(h, core[3] + halo))
            assert core[2] - core[0] <= size and core[3] - core[1] <= size
        assert (cover == 1).all()  # the cores partition the image
        cols = -(-w // size)
        for i, (core, box) in enumerate(grid[:-1]):  # neighbours in a row overlap by 2 x halo, less at the border
            if (i + 1) % cols:
                overlap = box[2] - grid[i + 1][1][0]
                assert overlap == halo + min(halo, w - core[2])
                if w - core[2] >= halo:
                    assert overlap == 2 * halo
    assert tile_grid(100, 80, 256, 16) == [((0, 0, 80, 100), (0, 0, 80, 100))]
    with pytest.raises(ValueError):
        tile_grid(10, 10, 0)


def test_tiled_extraction(tmp_path, images, encoder):
    path = os.path.join(images, "astronaut.png")
    out = str(tmp_path / "s")
    rep = extract(encoder, [(path, "astronaut.png")], out, checkpoint_sha256="x", tile=200, halo=32, batch_size=4,
                  workers=1, store_dtype="float32", progress=False)
    assert rep.embedded == 1 and rep.encoded_rows == 9
    s = EmbeddingStore.open(out)
    tiles = s.tiles("astronaut.png")
    grid = tile_grid(512, 512, 200, 32)
    assert [b for b, _ in tiles] == [b for _, b in grid]
    rgb = samvit.load_image(path)
    for i in (0, 4, 8):
        x0, y0, x1, y1 = grid[i][1]
        resized = resize_longest_side(rgb[y0:y1, x0:x1], TINY.img_size)
        with torch.inference_mode():
            ref = encoder(normalize_and_pad(resized, TINY.img_size)[None])[0]
        emb, meta = s["astronaut.png", i]
        torch.testing.assert_close(emb, ref, rtol=0, atol=1e-5)
        assert meta["core"] == grid[i][0] and meta["input_size"] == tuple(resized.shape[:2])
    with pytest.raises(StoreMismatchError, match="tiling tile 200 halo 32 vs none"):
        extract(encoder, [(path, "astronaut.png")], out, checkpoint_sha256="x", workers=0, progress=False)


def test_changing_model_or_checkpoint_is_refused(tmp_path, images, ckpt, capsys):
    src = os.path.join(images, "camera.png")
    out = str(tmp_path / "s")
    assert run_cli(capsys, "embed", src, "--checkpoint", ckpt, "--store", out, "--workers", "0")[0] == 0
    other = tmp_path / "other.safetensors"
    samvit.save_encoder(randomize_(ImageEncoder(TINY), seed=2), other)
    code, err = run_cli(capsys, "embed", src, "--checkpoint", str(other), "--store", out, "--workers", "0")
    assert code == 2 and "Refusing to mix embeddings" in err and "checkpoint sha256" in err
    small = tmp_path / "small.safetensors"  # another model (config) with the same output shape
    samvit.save_encoder(randomize_(ImageEncoder(dataclasses.replace(TINY, depth=2, global_attn_indexes=(1,)))),
                        small)
    code, err = run_cli(capsys, "embed", src, "--checkpoint", str(small), "--store", out, "--workers", "0")
    assert code == 2 and "model config differs" in err
    assert len(EmbeddingStore.open(out)) == 1


def test_store_options_need_store(tmp_path, ckpt, images, capsys):
    assert main(["embed", images, "--checkpoint", ckpt, "--tile", "256", "--out", str(tmp_path)]) == 2
    assert "--tile only apply with --store" in capsys.readouterr().err
    assert main(["embed", images, "--checkpoint", ckpt, "--store", str(tmp_path / "s"), "--halo", "8"]) == 2
