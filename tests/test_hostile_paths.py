"""Hostile and careless paths: outputs stay a bijection of inputs inside --out, nothing replaces an input, no
silent overwrite, special files reported (never a hang), degenerate images, list files, unwritable and full
outputs. Every case: the exit code, a message naming the culprit, no traceback, nothing else changed."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
from tests._hostile_utils import cli, files_under, fill, small_fs, snapshot, time_limit, tiny_sam_checkpoint, write_image
from tests.helpers import TINY, randomize_
from PIL import Image

import samvit
from samvit.embeddings.files import load_embedding

EMBED = ["--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny encoder checkpoint (samvit safetensors with its config)."""
    d = tmp_path_factory.mktemp("ckpt")
    path = d / "tiny.safetensors"
    samvit.save_encoder(randomize_(samvit.ImageEncoder(TINY), seed=3).eval(), path)
    return str(path)


@pytest.fixture(scope="module")
def sam_ckpt(tmp_path_factory):
    """A full tiny SAM checkpoint (encoder and decoder) for segment."""
    return tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam.safetensors")


def _embed(capsys, *args):
    return cli(["embed", *args, *EMBED], capsys)


# ---- list entries that climb out or are absolute: mapped inside --out ----

def test_absolute_list_entry_is_written_inside_out(tmp_path, ckpt, capsys):
    img = write_image(tmp_path / "elsewhere" / "a.png")
    lst = tmp_path / "lists" / "l.txt"
    lst.parent.mkdir()
    lst.write_text(img + "\n")
    before = snapshot(tmp_path / "elsewhere", lst, ckpt)
    rc, _, err = _embed(capsys, lst, "--checkpoint", ckpt, "--out", tmp_path / "out")
    assert rc == 0, err
    got = files_under(tmp_path / "out")
    assert got == [os.path.join("%2F", *img.lstrip("/").split("/")[:-1], "a.safetensors")]
    assert snapshot(tmp_path / "elsewhere", lst, ckpt) == before
    assert not os.path.exists(os.path.splitext(img)[0] + ".safetensors")


def test_dotdot_list_entry_is_written_inside_out(tmp_path, ckpt, capsys):
    write_image(tmp_path / "a.png")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "l.txt").write_text("../a.png\n")
    rc, _, err = _embed(capsys, tmp_path / "lists" / "l.txt", "--checkpoint", ckpt, "--out", tmp_path / "out")
    assert rc == 0, err
    assert files_under(tmp_path / "out") == [os.path.join("%2E%2E", "a.safetensors")]
    assert not (tmp_path / "a.safetensors").exists()


def test_list_entry_named_like_the_checkpoint_never_replaces_it(tmp_path, capsys):
    """The reported case: an absolute list entry next to the checkpoint overwrote the checkpoint."""
    d = tmp_path / "models"
    d.mkdir()
    ck = d / "tiny.safetensors"
    samvit.save_encoder(randomize_(samvit.ImageEncoder(TINY), seed=4).eval(), ck)
    img = write_image(d / "tiny.png")
    (tmp_path / "l.txt").write_text(f"{img}\n")
    before = snapshot(d)
    rc, _, err = _embed(capsys, tmp_path / "l.txt", "--checkpoint", ck, "--out", tmp_path / "out")
    assert rc == 0, err
    assert snapshot(d) == before
    assert len(files_under(tmp_path / "out")) == 1


def test_output_over_the_checkpoint_is_refused(tmp_path, capsys):
    d = tmp_path / "imgs"
    write_image(d / "tiny.png")
    ck = d / "tiny.safetensors"
    samvit.save_encoder(randomize_(samvit.ImageEncoder(TINY), seed=4).eval(), ck)
    before = snapshot(d)
    rc, _, err = _embed(capsys, d, "--checkpoint", ck, "--out", d, "--force")
    assert rc == 2 and str(ck) in err and "replace one of this run's inputs" in err
    assert snapshot(d) == before


def test_output_over_an_input_image_is_refused(tmp_path, ckpt, capsys):
    img = write_image(tmp_path / "x.png")
    os.rename(img, tmp_path / "x.safetensors")  # a PNG named .safetensors, given by name
    before = snapshot(tmp_path)
    rc, _, err = _embed(capsys, tmp_path / "x.safetensors", "--checkpoint", ckpt, "--out", tmp_path, "--force")
    assert rc == 2 and "x.safetensors" in err and "inputs" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("what", ["list", "image"])
def test_failure_report_over_an_input_is_refused(tmp_path, ckpt, capsys, what):
    img = write_image(tmp_path / "a.png")
    lst = tmp_path / "l.txt"
    lst.write_text("a.png\n")
    before = snapshot(tmp_path, ckpt)
    report = lst if what == "list" else img
    rc, _, err = _embed(capsys, lst, "--checkpoint", ckpt, "--store", tmp_path / "s", "--report", report)
    assert rc == 2 and str(report) in err and "failure report" in err
    assert snapshot(tmp_path, ckpt) == before and not (tmp_path / "s").exists()


def test_output_through_a_symlinked_folder_leaving_out_is_refused(tmp_path, ckpt, capsys):
    write_image(tmp_path / "in" / "sub" / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "sub")
    rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "out")
    assert rc == 2 and "outside --out" in err and "sub" in err
    assert os.listdir(tmp_path / "elsewhere") == []


# ---- collisions: refused before any work, listing them ----

def test_same_stem_two_extensions_refused_in_file_mode(tmp_path, ckpt, capsys):
    write_image(tmp_path / "in" / "a.png")
    write_image(tmp_path / "in" / "a.jpg", seed=1)
    write_image(tmp_path / "in" / "b.png", seed=2)
    rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "out")
    assert rc == 2 and "a.png" in err and "a.jpg" in err and "a.safetensors" in err and "--store" in err
    assert not (tmp_path / "out").exists()


def test_same_stem_two_extensions_are_two_keys_in_a_store(tmp_path, ckpt, capsys):
    write_image(tmp_path / "in" / "a.png")
    write_image(tmp_path / "in" / "a.jpg", seed=1)
    rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--store", tmp_path / "s")
    assert rc == 0, err
    assert samvit.EmbeddingStore.open(tmp_path / "s").keys() == ["a.jpg", "a.png"]


@pytest.mark.parametrize("how", ["two folders", "two files", "recursive glob"])
def test_same_name_in_two_folders_is_refused(tmp_path, ckpt, capsys, how):
    a = write_image(tmp_path / "d1" / "x.png")
    b = write_image(tmp_path / "d2" / "x.png", seed=1)
    if how == "two folders":
        args = [tmp_path / "d1", tmp_path / "d2"]
    elif how == "two files":
        args = [a, b]
    else:  # a glob keys relative to its leading folder: no clash there, but the same glob twice from two roots
        args = [str(tmp_path / "d1" / "*.png"), str(tmp_path / "d2" / "*.png")]
    for target in (["--store", tmp_path / "s"], ["--out", tmp_path / "out"]):
        rc, _, err = _embed(capsys, *args, "--checkpoint", ckpt, *target)
        assert rc == 2 and a in err and b in err and "x.png" in err
    assert not (tmp_path / "s").exists() and not (tmp_path / "out").exists()


def test_recursive_glob_keys_relative_to_its_root(tmp_path, ckpt, capsys):
    write_image(tmp_path / "g" / "d1" / "x.png")
    write_image(tmp_path / "g" / "d2" / "x.png", seed=1)
    rc, _, err = _embed(capsys, str(tmp_path / "g" / "**" / "*.png"), "--checkpoint", ckpt, "--out", tmp_path / "o")
    assert rc == 0, err
    assert files_under(tmp_path / "o") == [os.path.join("d1", "x.safetensors"), os.path.join("d2", "x.safetensors")]


def test_the_same_file_twice_or_through_a_symlink_is_embedded_once(tmp_path, ckpt, capsys):
    img = write_image(tmp_path / "in" / "a.png")
    os.symlink(img, tmp_path / "link.png")
    rc, _, err = _embed(capsys, img, img, tmp_path / "link.png", "--checkpoint", ckpt, "--out", tmp_path / "o")
    assert rc == 0, err
    assert files_under(tmp_path / "o") == ["a.safetensors"]


# ---- existing outputs: resume, --force ----

def test_rerun_skips_what_it_wrote_and_reembeds_changed_content(tmp_path, ckpt, capsys):
    write_image(tmp_path / "in" / "a.png")
    write_image(tmp_path / "in" / "b.png", seed=1)
    assert _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o")[0] == 0
    first = snapshot(tmp_path / "o")
    mtimes = {p: os.stat(p).st_mtime_ns for p in first}
    assert _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o")[0] == 0
    assert {p: os.stat(p).st_mtime_ns for p in first} == mtimes  # nothing rewritten
    write_image(tmp_path / "in" / "b.png", seed=7)  # changed content: its output is updated
    assert _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o")[0] == 0
    now = snapshot(tmp_path / "o")
    a, b = (str(tmp_path / "o" / n) for n in ("a.safetensors", "b.safetensors"))
    assert now[a] == first[a] and now[b] != first[b]


@pytest.mark.parametrize("existing", ["foreign file", "other checkpoint"])
def test_existing_output_not_ours_needs_force(tmp_path, ckpt, capsys, existing):
    write_image(tmp_path / "in" / "a.png")
    (tmp_path / "o").mkdir()
    target = tmp_path / "o" / "a.safetensors"
    if existing == "foreign file":
        target.write_bytes(b"my own notes, not an embedding")
    else:
        other = tmp_path / "other.safetensors"
        samvit.save_encoder(randomize_(samvit.ImageEncoder(TINY), seed=9).eval(), other)
        assert _embed(capsys, tmp_path / "in", "--checkpoint", other, "--out", tmp_path / "o")[0] == 0
    before = snapshot(tmp_path)
    rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o")
    assert rc == 2 and str(target) in err and "--force" in err
    assert snapshot(tmp_path) == before
    rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o", "--force")
    assert rc == 0, err
    assert load_embedding(str(target))[1]["checkpoint_sha256"] == samvit.checkpoints.files.sha256_file(ckpt)


@pytest.mark.parametrize("kind", ["output is a folder", "--out is a file"])
def test_unusable_output_paths(tmp_path, ckpt, capsys, kind):
    write_image(tmp_path / "in" / "a.png")
    if kind == "output is a folder":
        (tmp_path / "o" / "a.safetensors").mkdir(parents=True)
        out = tmp_path / "o"
    else:
        out = tmp_path / "o.txt"
        out.write_text("a file")
    before = snapshot(tmp_path)
    rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", out, "--force")
    assert rc == 2 and str(out) in err and ("folder" in err)
    assert snapshot(tmp_path) == before


# ---- special files: reported by kind, never read, never a hang ----

@pytest.mark.parametrize("mode", ["store", "files"])
def test_fifo_among_the_inputs_is_reported_and_the_run_goes_on(tmp_path, ckpt, capsys, mode):
    write_image(tmp_path / "in" / "a.png")
    os.mkfifo(tmp_path / "in" / "pipe.png")
    target = ["--store", tmp_path / "s"] if mode == "store" else ["--out", tmp_path / "o"]
    with time_limit(60):
        rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, *target)
    assert rc == 1 and "pipe.png" in err and "FIFO" in err
    if mode == "store":
        assert samvit.EmbeddingStore.open(tmp_path / "s").keys() == ["a.png"]
    else:
        assert files_under(tmp_path / "o") == ["a.safetensors"]


def test_symlink_to_a_device_is_reported(tmp_path, ckpt, capsys):
    write_image(tmp_path / "in" / "a.png")
    os.symlink("/dev/zero", tmp_path / "in" / "zero.png")  # would hash forever
    with time_limit(60):
        rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--store", tmp_path / "s")
    assert rc == 1 and "zero.png" in err and "character device" in err and "symlink" in err


def test_socket_among_the_inputs_is_reported(tmp_path, ckpt, capsys):
    write_image(tmp_path / "in" / "a.png")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "in" / "s.png"))
        with time_limit(60):
            rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o")
    finally:
        sock.close()
    assert rc == 1 and "s.png" in err and "socket" in err


@pytest.mark.parametrize("role", ["checkpoint", "list file", "segment image", "embedding"])
def test_fifo_given_by_name_is_refused(tmp_path, ckpt, sam_ckpt, capsys, role):
    fifo = tmp_path / ("x.txt" if role == "list file" else "x.png" if role == "segment image" else "x.safetensors")
    os.mkfifo(fifo)
    img = write_image(tmp_path / "a.png")
    with time_limit(60):
        if role == "checkpoint":
            rc, _, err = _embed(capsys, img, "--checkpoint", fifo, "--out", tmp_path / "o")
        elif role == "list file":
            rc, _, err = _embed(capsys, fifo, "--checkpoint", ckpt, "--out", tmp_path / "o")
        elif role == "segment image":
            rc, _, err = cli(["segment", fifo, "--point", "1,1", "--checkpoint", ckpt, "--out",
                              tmp_path / "m.png"], capsys)
        else:
            rc, _, err = cli(["segment", img, "--point", "1,1", "--checkpoint", sam_ckpt, "--embedding", fifo,
                              "--out", tmp_path / "m.png"], capsys)
    assert rc == 2 and str(fifo) in err and "FIFO" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.png").exists()


# ---- degenerate images ----

@pytest.mark.parametrize("hw", [(1, 5000), (5000, 1), (1, 1)])
def test_degenerate_images_are_embedded(tmp_path, ckpt, capsys, hw):
    write_image(tmp_path / "in" / "thin.png", *hw)
    write_image(tmp_path / "in" / "ok.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG garbage")
    rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o", "--batch-size", "2")
    assert rc == 1 and "broken.png" in err and "thin.png" not in err
    emb, meta = load_embedding(str(tmp_path / "o" / "thin.safetensors"))
    assert meta["original_size"] == hw and min(meta["input_size"]) >= 1 and torch.isfinite(emb).all()
    assert files_under(tmp_path / "o") == ["ok.safetensors", "thin.safetensors"]


# ---- list files ----

def test_list_file_with_bom_and_crlf(tmp_path, ckpt, capsys):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png", seed=1)
    (tmp_path / "l.txt").write_bytes("\ufeffa.png\r\n# a comment\r\n\r\nb.png\r\n".encode("utf-8"))
    rc, _, err = _embed(capsys, tmp_path / "l.txt", "--checkpoint", ckpt, "--store", tmp_path / "s")
    assert rc == 0, err
    assert samvit.EmbeddingStore.open(tmp_path / "s").keys() == ["a.png", "b.png"]


@pytest.mark.parametrize("content,message", [(b"a.png\n\xff\xfe\xfa.png\n", "not UTF-8 text (line 2"),
                                             (b"a.png\nb\x00.png\n", "line 2 holds a NUL")])
def test_bad_list_files_are_named(tmp_path, ckpt, capsys, content, message):
    write_image(tmp_path / "a.png")
    (tmp_path / "l.txt").write_bytes(content)
    rc, _, err = _embed(capsys, tmp_path / "l.txt", "--checkpoint", ckpt, "--out", tmp_path / "o")
    assert rc == 2 and str(tmp_path / "l.txt") in err and message in err
    assert not (tmp_path / "o").exists()


# ---- segment and convert outputs ----

@pytest.mark.parametrize("flag", ["--out", "--overlay"])
def test_segment_never_overwrites_its_image(tmp_path, ckpt, capsys, flag):
    img = write_image(tmp_path / "photo.png")
    before = snapshot(tmp_path, ckpt)
    args = ["--out", tmp_path / "m.png", "--overlay", img] if flag == "--overlay" else ["--out", img]
    rc, _, err = cli(["segment", img, "--point", "1,1", "--checkpoint", ckpt, *args, "--force"], capsys)
    assert rc == 2 and img in err and "inputs" in err
    assert snapshot(tmp_path, ckpt) == before


def test_segment_refuses_existing_output_and_same_out_and_overlay(tmp_path, ckpt, capsys):
    img = write_image(tmp_path / "photo.png")
    (tmp_path / "m.png").write_bytes(b"old")
    before = snapshot(tmp_path, ckpt)
    rc, _, err = cli(["segment", img, "--point", "1,1", "--checkpoint", ckpt, "--out", tmp_path / "m.png"], capsys)
    assert rc == 2 and "m.png" in err and "--force" in err
    rc, _, err = cli(["segment", img, "--point", "1,1", "--checkpoint", ckpt, "--out", tmp_path / "n.png",
                      "--overlay", tmp_path / "n.png"], capsys)
    assert rc == 2 and "n.png" in err and "different files" in err
    rc, _, err = cli(["segment", img, "--point", "1,1", "--checkpoint", ckpt, "--out", ckpt, "--force"], capsys)
    assert rc == 2 and ckpt in err
    assert snapshot(tmp_path, ckpt) == before


def test_segment_on_a_degenerate_image(tmp_path, sam_ckpt, capsys):
    img = write_image(tmp_path / "thin.png", 1, 600)
    rc, out, err = cli(["segment", img, "--point", "300,0", "--checkpoint", sam_ckpt, "--out", tmp_path / "m.png"],
                       capsys)
    assert rc == 0, err
    assert json.loads(out)["out"] == str(tmp_path / "m.png")
    assert np.asarray(Image.open(tmp_path / "m.png")).shape == (1, 600)


def test_export_refuses_an_existing_output(tmp_path, ckpt, capsys):
    (tmp_path / "e.onnx").write_bytes(b"old")
    before = snapshot(tmp_path, ckpt)
    rc, _, err = cli(["export", "onnx", "--checkpoint", ckpt, "--out", tmp_path / "e.onnx", "--quiet"], capsys)
    assert rc == 2 and "e.onnx" in err and "--force" in err
    rc, _, err = cli(["export", "onnx", "--checkpoint", ckpt, "--out", ckpt, "--quiet", "--force"], capsys)
    assert rc == 2 and "is the checkpoint" in err
    assert snapshot(tmp_path, ckpt) == before


def test_convert_refuses_an_existing_output(tmp_path, ckpt, capsys):
    out = tmp_path / "o.pth"
    out.write_bytes(b"precious")
    before = snapshot(tmp_path, ckpt)
    rc, _, err = cli(["convert", ckpt, out, "--to", "official", "--quiet"], capsys)
    assert rc == 2 and str(out) in err and "--force" in err
    assert snapshot(tmp_path, ckpt) == before
    rc, _, err = cli(["convert", ckpt, ckpt, "--to", "safetensors", "--force"], capsys)
    assert rc == 2 and "output is the input" in err
    assert snapshot(tmp_path, ckpt) == before
    assert cli(["convert", ckpt, out, "--to", "official", "--quiet", "--force"], capsys)[0] == 0
    assert snapshot(out)[str(out)] != before[str(out)]


# ---- unwritable and full outputs (a real 1 MiB tmpfs, mounted as root; skipped where mounting is refused) ----

@pytest.fixture
def tiny_fs(tmp_path):
    try:
        with small_fs(tmp_path / "fs", "1m") as d:
            yield d
    except OSError as e:
        pytest.skip(str(e))


@pytest.fixture
def ro_fs(tmp_path):
    try:
        with small_fs(tmp_path / "ro", "1m", readonly=True) as d:
            yield d
    except OSError as e:
        pytest.skip(str(e))


def test_full_disk_in_file_mode(tmp_path, ckpt, capsys, tiny_fs):
    write_image(tmp_path / "in" / "a.png")
    filler = fill(tiny_fs, 8 << 10)  # an embedding is 32 KiB
    before = snapshot(filler)
    rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", os.path.join(tiny_fs, "o"))
    assert rc == 2 and "No space left on device" in err and tiny_fs in err
    assert files_under(os.path.join(tiny_fs, "o")) == []  # no partial file left
    assert snapshot(filler) == before


def test_full_disk_for_a_store(tmp_path, ckpt, capsys, tiny_fs):
    write_image(tmp_path / "in" / "a.png")
    fill(tiny_fs, 16 << 10)
    rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--store", os.path.join(tiny_fs, "s"))
    assert rc == 2 and "No space left on device" in err


def test_full_disk_for_segment_output(tmp_path, sam_ckpt, capsys, tiny_fs):
    img = write_image(tmp_path / "photo.png", 300, 400)
    fill(tiny_fs, 4 << 10)
    out = os.path.join(tiny_fs, "overlay.png")  # 300x400 random RGB: far more than the 4 KiB left
    rc, _, err = cli(["segment", img, "--point", "1,1", "--checkpoint", sam_ckpt, "--out", tmp_path / "m.png",
                      "--overlay", out, "--quiet"], capsys)
    assert rc == 2 and "No space left on device" in err and out in err
    assert os.listdir(tiny_fs) == ["filler.bin"]  # no half-written PNG


def test_read_only_output_folder(tmp_path, ckpt, capsys, ro_fs):
    write_image(tmp_path / "in" / "a.png")
    rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", os.path.join(ro_fs, "o"))
    assert rc == 2 and "Read-only file system" in err and ro_fs in err
    rc, _, err = cli(["convert", ckpt, os.path.join(ro_fs, "c.pth"), "--to", "official"], capsys)
    assert rc == 2 and "Read-only file system" in err


def test_unwritable_failure_report_still_lists_the_failures(tmp_path, ckpt, capsys, ro_fs):
    write_image(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--store", tmp_path / "s", "--report",
                        os.path.join(ro_fs, "failures.jsonl"))
    assert rc == 2 and "bad.png" in err and "cannot write the failure report" in err
    assert samvit.EmbeddingStore.open(tmp_path / "s").keys() == ["a.png"]


def test_disk_full_simulated_at_the_write_boundary(tmp_path, ckpt, capsys, monkeypatch):
    """Where mounting a tmpfs is not allowed, the same path of the error in-process: the writer raises ENOSPC."""
    import errno

    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", a[1])

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    write_image(tmp_path / "in" / "a.png")
    rc, _, err = _embed(capsys, tmp_path / "in", "--checkpoint", ckpt, "--out", tmp_path / "o")
    assert rc == 2 and "No space left on device" in err and "a.safetensors" in err
    assert files_under(tmp_path / "o") == []
