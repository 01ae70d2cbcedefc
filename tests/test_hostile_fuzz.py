"""Fuzz (hypothesis, a bounded number of examples, derandomized for CI) of every reader of untrusted bytes:
checkpoint files (.pth, .safetensors, transformers folders, samvit_config metadata), embedding files, store
metadata (zarr.json) and index lines, list files. The only exceptions allowed out are samvit's own
(SamvitError); anything else (KeyError, TypeError, ZeroDivisionError, a hang...) fails the test."""
from __future__ import annotations

import json
import os
import shutil
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import samvit
from samvit.checkpoints.load import checkpoint_info, load_encoder, read_official
from samvit.data.sources import collect_inputs
from samvit.embeddings.files import load_embedding
from samvit.embeddings.store import EmbeddingStore, decode_line, encode_line
from samvit.errors import SamvitError

FUZZ = settings(max_examples=int(os.environ.get("SAMVIT_FUZZ_EXAMPLES", 40)), deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SMALL = samvit.EncoderConfig(img_size=64, embed_dim=16, depth=1, num_heads=2, window_size=2, global_attn_indexes=(0,),
                             out_chans=8, name="small")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


@st.composite
def mutated(draw, seed: bytes):
    """A seed file with a few bytes changed, cut short, or grown with junk."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 6))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    how = draw(st.sampled_from(["keep", "cut", "grow", "head"]))
    if how == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "grow":
        data += draw(st.binary(max_size=64))
    elif how == "head":  # the safetensors header length field
        data[:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    return bytes(data)


def _only_samvit_errors(fn, *args):
    try:
        return fn(*args)
    except SamvitError:
        return None


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    d = tmp_path_factory.mktemp("seeds")
    enc = samvit.ImageEncoder(SMALL)
    samvit.save_encoder(enc, d / "enc.safetensors")
    torch.save({"image_encoder." + k: v for k, v in enc.state_dict().items()}, d / "enc.pth")
    save_file({"embedding": torch.randn(8, 4, 4)}, str(d / "emb.safetensors"),
              metadata={"original_size": "30,40", "input_size": "48,64", "model": "small", "checkpoint_sha256": "x"})
    return d  # (the test reads the seed files: a failing example then prints a path, not megabytes)


def _checkpoint_readers(path):
    _only_samvit_errors(read_official, path)
    _only_samvit_errors(checkpoint_info, path)


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_files(seeds, data):
    d = seeds
    name = data.draw(st.sampled_from(["enc.safetensors", "enc.pth"]))
    path = d / ("fuzz" + os.path.splitext(name)[1])
    path.write_bytes(data.draw(mutated((d / name).read_bytes())))
    _checkpoint_readers(path)


@FUZZ
@given(data=st.data())
def test_fuzz_transformers_folder(seeds, data):
    d = seeds
    folder = d / "hf"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    name = data.draw(st.sampled_from(["model.safetensors", "pytorch_model.bin", "config.json", None]))
    if name:
        seed = (d / ("enc.safetensors" if name.endswith("safetensors") else "enc.pth")).read_bytes() if name != "config.json" \
            else b"{}"
        (folder / name).write_bytes(data.draw(mutated(seed)))
    _checkpoint_readers(folder)


@FUZZ
@given(config=st.dictionaries(st.sampled_from(list(SMALL.to_dict()) + ["extra"]), json_values, max_size=4),
       raw=st.one_of(st.none(), st.text(max_size=30)))
def test_fuzz_config_metadata(seeds, config, raw):
    d = seeds
    text = raw if raw is not None else json.dumps(dict(SMALL.to_dict(), **config), allow_nan=True)
    sd = samvit.ImageEncoder(SMALL).state_dict()
    path = d / "cfg.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"samvit_config": text})
    _only_samvit_errors(load_encoder, None, str(path))


@FUZZ
@given(data=st.data(), meta=st.dictionaries(st.sampled_from(["original_size", "input_size", "model"]),
                                            st.text(max_size=12), max_size=3))
def test_fuzz_embedding_files(seeds, data, meta):
    d = seeds
    path = d / "e.safetensors"
    if meta:
        save_file({"embedding": torch.randn(8, 4, 4)}, str(path), metadata=meta)
    else:
        path.write_bytes(data.draw(mutated((d / "emb.safetensors").read_bytes())))
    _only_samvit_errors(load_embedding, str(path))


def _store(d):
    path = d / "store"
    shutil.rmtree(path, ignore_errors=True)
    st_ = EmbeddingStore.create(path, model="m", config={}, embedding_shape=(2, 2, 2), checkpoint_sha256="c",
                                dtype="float32")
    with st_.writer(model="m", checkpoint_sha256="c", samvit_version="t", compute_dtype="float32") as w:
        w.put("k", torch.ones(2, 2, 2), sha256="s", original_size=(3, 4))
    return path


def _read_everything(path):
    store = EmbeddingStore.open(path)
    for key in store.keys():
        _only_samvit_errors(store.__getitem__, key)
        store.metadata(key)
    store.verify()
    store.info()


@FUZZ
@given(identity=st.dictionaries(st.sampled_from(["model", "checkpoint_sha256", "dtype", "embedding_shape", "config",
                                                 "tile", "version", "format"]), json_values, max_size=3))
def test_fuzz_store_identity(seeds, identity):
    path = _store(seeds)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["samvit"].update(identity)
    (path / "zarr.json").write_text(json.dumps(meta))
    _only_samvit_errors(_read_everything, path)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["key", "writer", "array", "row", "rows", "data_sha256", "sha256",
                                                "time", "original_size", "input_size", "tiles", "header"]),
                               json_values, max_size=3),
       junk=st.binary(max_size=40), header=st.booleans())
def test_fuzz_index_lines(seeds, changes, junk, header):
    path = _store(seeds)
    log = os.path.join(path, "index", os.listdir(os.path.join(path, "index"))[0])
    lines = open(log, "rb").read().splitlines(keepends=True)
    target = 0 if header else 1
    rec = decode_line(lines[target])
    if header:
        rec["header"] = dict(rec["header"], **changes) if changes else junk.decode("latin-1")
    else:
        rec.update(changes)
    lines[target] = encode_line(rec)
    lines.append(junk + b"\t%08x\n" % zlib.crc32(junk))
    open(log, "wb").write(b"".join(lines))
    assert decode_line(junk) is None or isinstance(decode_line(junk), dict)
    _only_samvit_errors(_read_everything, path)


@FUZZ
@given(content=st.binary(max_size=200) | st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fuzz_list_files(seeds, content):
    path = seeds / "l.txt"
    path.write_bytes(content)
    _only_samvit_errors(collect_inputs, [str(path)])
