"""Damaged and hostile embedding stores: every read is checked (missing or altered chunks name the key), metadata
and index lines are validated against bounds before use, `store verify` reports the real damage past stray files.
Every case: the exit code or error type, a message naming the culprit, no traceback, nothing else changed."""
from __future__ import annotations

import json
import os

import pytest
import torch
from tests._hostile_utils import cli, snapshot, time_limit, tiny_sam_checkpoint, write_image

from samvit import EmbeddingStore
from samvit.embeddings.store import StoreCorruptError, StoreError, encode_line

SHAPE = (8, 4, 4)
SHA = "ab" * 32


def make(path, n: int = 3, tile=None):
    """A store of n items a0.. (float32, so the data is exact) written by one writer; returns it reopened."""
    st = EmbeddingStore.create(path, model="tiny", config={"embed_dim": 64}, embedding_shape=SHAPE,
                               checkpoint_sha256=SHA, dtype="float32", tile=tile)
    with st.writer(model="tiny", checkpoint_sha256=SHA, samvit_version="t", compute_dtype="float32") as w:
        for i in range(n):
            w.put(f"a{i}", torch.full(SHAPE, float(i + 1)), sha256=f"s{i}", original_size=(30, 40),
                  input_size=(12, 16))
    return EmbeddingStore.open(path)


def chunk(st, key, i=0):
    rec = st.record(key)
    return st._chunk_path(rec["array"], rec["row"] + i)


def log_path(st):
    d = os.path.join(st.path, "index")
    return os.path.join(d, sorted(os.listdir(d))[0])


def append_line(st, record):
    with open(log_path(st), "ab") as f:
        f.write(encode_line(record))


# ---- damaged data: reads check it ----

@pytest.mark.parametrize("damage,message", [("delete", "missing"), ("flip", "checksum mismatch"),
                                            ("truncate", "")])
def test_damaged_chunk_read_names_the_key(tmp_path, capsys, damage, message):
    st = make(tmp_path / "s")
    p = chunk(st, "a1")
    if damage == "delete":
        os.remove(p)
    elif damage == "flip":
        data = bytearray(open(p, "rb").read())
        data[5] ^= 0xFF
        open(p, "wb").write(bytes(data))
    else:
        open(p, "r+b").truncate(7)
    with pytest.raises(StoreCorruptError, match=f"'a1' is damaged: .*{message}"):
        st["a1"]
    with pytest.raises(StoreCorruptError, match="'a1'"):
        list(st.batches(2))
    assert torch.equal(st.get("a0"), torch.full(SHAPE, 1.0)) and torch.equal(st.get("a2"), torch.full(SHAPE, 3.0))
    before = snapshot(tmp_path)
    rc, out, _ = cli(["store", "verify", tmp_path / "s"], capsys)
    assert rc == 1 and "a1:" in out and "a0:" not in out and "a2:" not in out
    assert snapshot(tmp_path) == before


def test_damaged_tile_read_names_the_key(tmp_path):
    st = EmbeddingStore.create(tmp_path / "s", model="tiny", config={}, embedding_shape=SHAPE, checkpoint_sha256=SHA,
                               dtype="float32", tile={"size": 8, "halo": 0})
    with st.writer(model="tiny", checkpoint_sha256=SHA, samvit_version="t", compute_dtype="float32") as w:
        t = {"box": [0, 0, 8, 8], "core": [0, 0, 8, 8], "input_size": [8, 8]}
        w.put("big", torch.randn(2, *SHAPE), sha256="x", original_size=(8, 16), tiles=[t, t])
    st = EmbeddingStore.open(tmp_path / "s")
    os.remove(chunk(st, "big", 1))
    with pytest.raises(StoreCorruptError, match="'big' is damaged: data rows"):
        st.tile("big", 0)  # the checksum covers the whole item


def test_verify_false_skips_the_check(tmp_path):
    st = make(tmp_path / "s")
    p = chunk(st, "a0")
    data = bytearray(open(p, "rb").read())
    data[0] ^= 1
    open(p, "wb").write(bytes(data))
    assert EmbeddingStore.open(tmp_path / "s", verify=False).get("a0").shape == SHAPE
    with pytest.raises(StoreCorruptError):
        EmbeddingStore.open(tmp_path / "s").get("a0")


def test_foreign_data_array_metadata(tmp_path, capsys):
    st = make(tmp_path / "s")
    meta_path = os.path.join(os.path.dirname(chunk(st, "a0")), "zarr.json")
    meta = json.load(open(meta_path))
    meta["data_type"] = "int8"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(StoreCorruptError, match="'a0'.*expected"):
        EmbeddingStore.open(tmp_path / "s")["a0"]
    rc, out, _ = cli(["store", "verify", tmp_path / "s"], capsys)
    assert rc == 1 and "a0: cannot read its data" in out


# ---- hostile index lines: validated before use ----

def _valid_record(st, **changes):
    rec = dict(st.record("a0"), key="evil")
    rec.update(changes)
    return rec


@pytest.mark.parametrize("changes,why", [
    ({"rows": 2**31}, "out of bounds"),
    ({"row": -1}, "out of bounds"),
    ({"rows": 0}, "out of bounds"),
    ({"array": "../../etc"}, "not a writer name"),
    ({"writer": "someone-else"}, "not this log's"),
    ({"original_size": [0, 5]}, "original_size"),
    ({"original_size": "big"}, "original_size"),
    ({"data_sha256": "zz"}, "64 hex"),
    ({"key": ""}, "key missing"),
    ({"tiles": [{"box": "x"}]}, "tile entry"),
])
def test_hostile_index_line_is_ignored_and_reported(tmp_path, capsys, changes, why):
    st = make(tmp_path / "s")
    append_line(st, _valid_record(st, **changes))
    with time_limit(30):  # 2**31 rows must not be materialised
        st = EmbeddingStore.open(tmp_path / "s")
        assert st.keys() == ["a0", "a1", "a2"]
        rc, out, _ = cli(["store", "verify", tmp_path / "s"], capsys)
    assert rc == 1 and "line 5 is corrupt" in out and why in out and "3 items checked" in out


def test_deeply_nested_index_line_is_ignored(tmp_path, capsys):
    st = make(tmp_path / "s")
    body = b"[" * 100000 + b"]" * 100000
    import zlib

    with open(log_path(st), "ab") as f:
        f.write(body + b"\t%08x\n" % zlib.crc32(body))
    append_line(st, dict(st.record("a0"), key="later"))  # a valid line after it: line 5 is not a torn last line
    rc, out, _ = cli(["store", "verify", tmp_path / "s"], capsys)
    assert rc == 1 and "line 5 is corrupt" in out and "4 items checked" in out


# ---- stray files and special files ----

def test_stray_files_do_not_hide_real_damage(tmp_path, capsys):
    st = make(tmp_path / "s")
    data_dir = os.path.dirname(chunk(st, "a0"))
    open(os.path.join(st.path, "data", "README"), "w").write("stray")
    open(os.path.join(data_dir, "c.x.0"), "w").write("stray")
    open(os.path.join(data_dir, "c."), "w").write("stray")
    open(os.path.join(st.path, "index", "notes.txt"), "w").write("stray")
    os.mkdir(os.path.join(st.path, "index", "dir.jsonl"))
    os.remove(chunk(st, "a2"))
    before = snapshot(tmp_path)
    rc, out, _ = cli(["store", "verify", tmp_path / "s"], capsys)
    assert rc == 1 and "a2: data rows" in out and "missing" in out
    assert "data/README: stray file" in out and "2 stray files" in out and "index/dir.jsonl: " in out
    assert snapshot(tmp_path) == before
    assert cli(["store", "ls", tmp_path / "s"], capsys)[0] == 0


def test_fifo_in_the_index_does_not_hang(tmp_path, capsys):
    st = make(tmp_path / "s")
    os.mkfifo(os.path.join(st.path, "index", "pipe.jsonl"))
    with time_limit(30):
        assert EmbeddingStore.open(tmp_path / "s").keys() == ["a0", "a1", "a2"]
        rc, out, _ = cli(["store", "verify", tmp_path / "s"], capsys)
    assert rc == 1 and "pipe.jsonl" in out and "FIFO" in out


# ---- hostile store identity (zarr.json) ----

@pytest.mark.parametrize("edit,message", [
    (lambda i: i.update(dtype="int4"), "dtype 'int4'"),
    (lambda i: i.pop("model"), "'model' missing"),
    (lambda i: i.update(embedding_shape=[0, 4, 4]), "embedding_shape"),
    (lambda i: i.update(embedding_shape=[2**20, 2**20, 2**20]), "embedding_shape"),
    (lambda i: i.update(tile={"size": 0, "halo": 0}), "tile"),
    (lambda i: i.update(version="1"), "version"),
    (lambda i: i.update(config=[]), "config"),
])
def test_hostile_identity_is_refused(tmp_path, capsys, edit, message):
    make(tmp_path / "s")
    meta_path = tmp_path / "s" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["attributes"]["samvit"])
    meta_path.write_text(json.dumps(meta))
    before = snapshot(tmp_path)
    for action in ("info", "ls", "verify"):
        rc, _, err = cli(["store", action, tmp_path / "s"], capsys)
        assert rc == 2 and "zarr.json" in err and message in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content", [b"not json", b"[]", b'{"attributes": 5}', b"\xff\xfe", b"[" * 100000])
def test_not_a_store(tmp_path, capsys, content):
    make(tmp_path / "s")
    (tmp_path / "s" / "zarr.json").write_bytes(content)
    rc, _, err = cli(["store", "info", tmp_path / "s"], capsys)
    assert rc == 2 and "not a samvit embedding store" in err


def test_identity_fifo_does_not_hang(tmp_path, capsys):
    make(tmp_path / "s")
    os.remove(tmp_path / "s" / "zarr.json")
    os.mkfifo(tmp_path / "s" / "zarr.json")
    with time_limit(30):
        rc, _, err = cli(["store", "info", tmp_path / "s"], capsys)
    assert rc == 2 and "not a samvit embedding store" in err


def test_store_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc, _, err = cli(["store", "info", tmp_path / "f"], capsys)
    assert rc == 2 and str(tmp_path / "f") in err


# ---- segment on a damaged store ----

def test_segment_on_a_damaged_store_names_the_key(tmp_path, capsys):
    ckpt = tiny_sam_checkpoint(tmp_path / "sam.safetensors")
    img = write_image(tmp_path / "photo.png", 50, 70)
    rc, _, err = cli(["embed", img, "--checkpoint", ckpt, "--store", tmp_path / "s", "--workers", "0", "--quiet"],
                     capsys)
    assert rc == 0, err
    st = EmbeddingStore.open(tmp_path / "s")
    os.remove(chunk(st, "photo.png"))
    before = snapshot(tmp_path)
    rc, _, err = cli(["segment", img, "--point", "5,5", "--checkpoint", ckpt, "--store", tmp_path / "s",
                      "--out", tmp_path / "m.png"], capsys)
    assert rc == 2 and "'photo.png' is damaged" in err and "missing" in err
    assert snapshot(tmp_path) == before
