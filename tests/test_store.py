"""EmbeddingStore: round trip, commit protocol, torn and corrupted data, identity checks, tiles, CLI."""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from samvit import EmbeddingStore
from samvit.cli import main
from samvit.embeddings.store import StoreError, StoreMismatchError, decode_line, encode_line

SHAPE = (8, 4, 4)
SHA = "ab" * 32


def make_store(path, **overrides):
    kw = dict(model="tiny", config={"embed_dim": 64}, embedding_shape=SHAPE, checkpoint_sha256=SHA)
    kw.update(overrides)
    return EmbeddingStore.create(path, **kw)


def writer(store, **kw):
    return store.writer(model="tiny", checkpoint_sha256=SHA, samvit_version="test", compute_dtype="float32", **kw)


def put(w, key, emb, **kw):
    meta = dict(sha256=f"sha-{key}", original_size=(30, 40), input_size=(12, 16))
    meta.update(kw)
    w.put(key, emb, **meta)


def test_round_trip_metadata_and_batches(tmp_path):
    store = make_store(tmp_path / "s")
    embs = {f"dir/img{i}.png": torch.randn(SHAPE) for i in range(5)}
    with writer(store) as w:
        for k, e in embs.items():
            put(w, k, e)
    s = EmbeddingStore.open(tmp_path / "s")
    assert len(s) == 5 and s.keys() == sorted(embs) and "dir/img3.png" in s
    emb, meta = s["dir/img3.png"]
    assert emb.dtype == torch.float16 and emb.shape == SHAPE
    assert torch.equal(emb, embs["dir/img3.png"].half())
    assert meta["original_size"] == (30, 40) and meta["input_size"] == (12, 16)
    assert meta["sha256"] == "sha-dir/img3.png" and meta["model"] == "tiny" and meta["checkpoint_sha256"] == SHA
    assert meta["samvit_version"] == "test" and meta["time"].endswith("Z") and meta["tiles"] is None
    seen = []
    for keys, batch, metas in s.batches(2):
        assert batch.shape == (len(keys),) + SHAPE and [m["key"] for m in metas] == keys
        seen += keys
    assert seen == sorted(embs)
    with pytest.raises(KeyError, match="not in the store"):
        s["missing.png"]


def test_float32_store_is_exact(tmp_path):
    store = make_store(tmp_path / "s", dtype="float32")
    e = torch.randn(SHAPE)
    with writer(store) as w:
        put(w, "a.png", e)
    got, _ = EmbeddingStore.open(tmp_path / "s")["a.png"]
    assert got.dtype == torch.float32 and torch.equal(got, e)


def test_items_are_invisible_until_committed(tmp_path):
    store = make_store(tmp_path / "s")
    w = writer(store)
    put(w, "a.png", torch.randn(SHAPE))
    assert len(EmbeddingStore.open(tmp_path / "s")) == 0  # data written, index line not yet
    w.commit()
    assert EmbeddingStore.open(tmp_path / "s").keys() == ["a.png"]
    w.close()


def test_latest_commit_wins_and_writers_share_a_store(tmp_path):
    store = make_store(tmp_path / "s")
    first, second = torch.randn(SHAPE), torch.randn(SHAPE)
    w1, w2 = writer(store), writer(store)
    put(w1, "a.png", first, sha256="old")
    put(w2, "b.png", torch.randn(SHAPE))
    w1.commit(), w2.commit()
    put(w2, "a.png", second, sha256="new")
    w2.close(), w1.close()
    s = EmbeddingStore.open(tmp_path / "s")
    assert s.keys() == ["a.png", "b.png"]
    emb, meta = s["a.png"]
    assert meta["sha256"] == "new" and torch.equal(emb, second.half())
    assert len(os.listdir(tmp_path / "s" / "index")) == 2 and s.verify().ok


def test_concurrent_creation_agrees_on_one_store(tmp_path):
    errors, stores = [], []

    def create():
        try:
            stores.append(make_store(tmp_path / "s"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(stores) == 8
    assert len({s.identity["created"] for s in stores}) == 1
    assert not [n for n in os.listdir(tmp_path) if n != "s"]  # no temporary directories left


def test_creation_that_loses_the_race_after_looking_opens_the_winner(tmp_path, monkeypatch):
    """The window torchrun ranks hit: a rank sees no store, another rank renames its store into place, then the
    first rank goes on to create one. It must open the winner's store, not call it "not a store"."""
    import samvit.embeddings.store as store_mod

    first = make_store(tmp_path / "s")
    real, calls = store_mod._is_store, []

    def stale_once(path):
        calls.append(path)
        return False if len(calls) == 1 else real(path)

    monkeypatch.setattr(store_mod, "_is_store", stale_once)
    second = make_store(tmp_path / "s")
    assert second.identity["created"] == first.identity["created"] and len(calls) >= 2


def test_changed_model_checkpoint_dtype_or_tiling_is_refused(tmp_path):
    make_store(tmp_path / "s")
    for change, pattern in [({"checkpoint_sha256": "cd" * 32}, "checkpoint sha256"),
                            ({"model": "other"}, "model 'tiny' vs 'other'"),
                            ({"config": {"embed_dim": 65}}, "model config differs"),
                            ({"dtype": "float32"}, "dtype float16 vs float32"),
                            ({"tile": {"size": 512, "halo": 64}}, "tiling none vs tile 512 halo 64")]:
        with pytest.raises(StoreMismatchError, match=pattern):
            make_store(tmp_path / "s", **change)
    make_store(tmp_path / "s", dtype=None)  # None means: whatever the store holds


def test_not_a_store(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("hello")
    with pytest.raises(StoreError, match="not a samvit embedding store"):
        EmbeddingStore.open(tmp_path / "junk")
    with pytest.raises(StoreError, match="exists and is not an embedding store"):
        make_store(tmp_path / "junk")
    with pytest.raises(FileNotFoundError):
        EmbeddingStore.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    assert len(make_store(tmp_path / "empty")) == 0  # an empty directory becomes a store


def test_log_lines_carry_a_checksum():
    line = encode_line({"key": "a", "n": 1})
    assert decode_line(line) == {"key": "a", "n": 1}
    assert decode_line(line[:-1]) is None  # no newline: torn
    assert decode_line(line.replace(b'"n":1', b'"n":2')) is None  # bad crc


def _one_item_store(tmp_path):
    store = make_store(tmp_path / "s")
    with writer(store) as w:
        put(w, "a.png", torch.randn(SHAPE))
        put(w, "b.png", torch.randn(SHAPE))
    return EmbeddingStore.open(tmp_path / "s")


def test_torn_last_line_is_ignored_and_verify_passes(tmp_path):
    s = _one_item_store(tmp_path)
    (log,) = (tmp_path / "s" / "index").iterdir()
    with open(log, "ab") as f:
        f.write(encode_line({"key": "c.png", "array": "x", "row": 0, "rows": 1})[:25])  # a write cut short
    s = EmbeddingStore.open(tmp_path / "s")
    assert s.keys() == ["a.png", "b.png"]
    rep = s.verify()
    assert rep.ok and rep.checked == 2 and any("incomplete" in n for n in rep.notes)


def test_verify_detects_corruption(tmp_path, capsys):
    s = _one_item_store(tmp_path)
    rec = s.record("b.png")
    chunk = s._chunk_path(rec["array"], rec["row"])
    raw = bytearray(open(chunk, "rb").read())
    raw[10] ^= 0xFF
    open(chunk, "wb").write(bytes(raw))
    rep = EmbeddingStore.open(tmp_path / "s").verify()
    assert not rep.ok and len(rep.errors) == 1 and "b.png: data checksum mismatch" in rep.errors[0]
    assert main(["store", "verify", str(tmp_path / "s")]) == 1
    assert "b.png: data checksum mismatch" in capsys.readouterr().out
    os.remove(chunk)
    rep = EmbeddingStore.open(tmp_path / "s").verify()
    assert "b.png: data rows [1]" in rep.errors[0]


def test_verify_detects_a_corrupt_index_line(tmp_path):
    _one_item_store(tmp_path)
    (log,) = (tmp_path / "s" / "index").iterdir()
    lines = open(log, "rb").read().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"a.png"', b'"z.png"')  # a committed line altered: crc no longer matches
    open(log, "wb").write(b"".join(lines))
    s = EmbeddingStore.open(tmp_path / "s")
    assert s.keys() == ["b.png"]
    rep = s.verify()
    assert not rep.ok and "line 2 is corrupt" in rep.errors[0]


def test_tiled_store_returns_tiles(tmp_path):
    store = make_store(tmp_path / "s", tile={"size": 10, "halo": 2})
    tiles = [{"box": [0, 0, 12, 12], "core": [0, 0, 10, 10], "input_size": [16, 16]},
             {"box": [8, 0, 15, 12], "core": [10, 0, 15, 10], "input_size": [16, 11]}]
    e = torch.randn((2,) + SHAPE)
    with writer(store) as w:
        with pytest.raises(StoreError, match="tiles given False"):
            put(w, "a.png", e[0])
        put(w, "a.png", e, tiles=tiles, input_size=None, original_size=(10, 15))
    s = EmbeddingStore.open(tmp_path / "s")
    emb, meta = s["a.png"]
    assert emb.shape == (2,) + SHAPE and meta["tiles"] == tiles and meta["original_size"] == (10, 15)
    (b0, t0), (b1, t1) = s.tiles("a.png")
    assert b1 == (8, 0, 15, 12) and torch.equal(t1, e[1].half())
    t, m = s["a.png", 1]
    assert torch.equal(t, e[1].half()) and m["box"] == (8, 0, 15, 12) and m["tile_index"] == 1
    with pytest.raises(IndexError):
        s["a.png", 2]
    keys, batch, _ = next(s.batches(4))
    assert keys == ["a.png"] and isinstance(batch, list) and batch[0].shape == (2,) + SHAPE


def test_vit_h_embedding_size_on_disk(tmp_path):
    store = make_store(tmp_path / "s", embedding_shape=(256, 64, 64))
    with writer(store) as w:
        put(w, "a.png", torch.randn(256, 64, 64))
    s = EmbeddingStore.open(tmp_path / "s")
    rec = s.record("a.png")
    assert os.path.getsize(s._chunk_path(rec["array"], rec["row"])) == 256 * 64 * 64 * 2  # raw float16, 2 MiB


def test_store_cli_info_and_ls(tmp_path, capsys):
    _one_item_store(tmp_path)
    path = str(tmp_path / "s")
    assert main(["store", "info", path]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "2 (2 embeddings" in out and "float16" in out
    assert main(["store", "ls", path, "--json"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["key"] for r in rows] == ["a.png", "b.png"] and rows[0]["original_size"] == [30, 40]
    assert main(["store", "verify", path]) == 0
    assert "2 items checked: OK" in capsys.readouterr().out
    assert main(["store", "info", str(tmp_path)]) == 2  # not a store: clean error
