"""Object storage: `samvit embed` from and to a real S3-protocol server (moto's, on loopback, started here):
the same embeddings as from local files, kill -9 + resume equal to a clean run, concurrent writers, verify."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from samvit import EmbeddingStore, load_encoder
from samvit.checkpoints.registry import checkpoint_sha256
from samvit.cli import main
from samvit.data.sources import collect_inputs
from samvit.embeddings.pipeline import StoreSink, embed

from tests._torchrun_utils import one_thread_env
from tests.helpers import TINY
from tests.helpers.tolerance import assert_close_scaled
from tests.helpers.s3 import forget_s3_clients, moto_s3

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

pytestmark = pytest.mark.usefixtures("one_thread")
BUCKET = "samvit-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port), its endpoint and test credentials in the environment."""
    import fsspec

    with moto_s3() as env:
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
        yield env


@pytest.fixture(scope="module")
def images(tmp_path_factory, s3):
    """Photos and odd modes in a local tree, and the same files uploaded under s3://BUCKET/photos/."""
    from skimage import data
    import fsspec

    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    Image.fromarray(data.astronaut()).save(root / "astronaut.png")
    Image.fromarray(data.coffee()).save(root / "sub" / "coffee.jpg", quality=90)
    Image.fromarray(data.camera()).save(root / "camera.png")
    rgba = np.dstack([data.rocket(), np.full(data.rocket().shape[:2], 200, np.uint8)])
    Image.fromarray(rgba).save(root / "rocket_rgba.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(root) + "/", f"{BUCKET}/photos/", recursive=True)
    return str(root)


def assert_same_store(a: str, b: str) -> None:
    sa, sb = EmbeddingStore.open(a), EmbeddingStore.open(b)
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa.keys():
        (ea, ma), (eb, mb) = sa[k], sb[k]
        assert (ea.float() - eb.float()).abs().max().item() == 0, k
        for f in ("sha256", "original_size", "input_size", "tiles"):
            assert ma[f] == mb[f], (k, f)


def test_embed_from_and_to_s3_equals_local(tmp_path, images, ckpt, capsys):
    url = f"s3://{BUCKET}/runs/a.zarr"
    code = main(["embed", f"s3://{BUCKET}/photos/", "--checkpoint", ckpt, "--store", url, "--workers", "0",
                 "--batch-size", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "broken.png" in err  # the bad object is reported, the rest written
    local = str(tmp_path / "local.zarr")
    assert main(["embed", images, "--checkpoint", ckpt, "--store", local, "--workers", "0", "--batch-size", "2",
                 "--quiet"]) == 1
    capsys.readouterr()
    assert_same_store(url, local)
    s = EmbeddingStore.open(url)
    assert s.keys() == ["astronaut.png", "camera.png", "rocket_rgba.png", "sub/coffee.jpg"]
    assert s.verify().ok
    # verify, info and ls through the CLI; a rerun skips everything
    assert main(["store", "verify", url]) == 0
    assert "4 items checked: OK" in capsys.readouterr().out
    assert main(["store", "info", url]) == 0 and "items        4" in capsys.readouterr().out
    assert main(["embed", f"s3://{BUCKET}/photos/", "--checkpoint", ckpt, "--store", url, "--workers", "2"]) == 1
    assert "4 already in the store" in capsys.readouterr().err
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert b"broken.png" in fs.cat_file(f"{BUCKET}/runs/a.zarr/failures.jsonl")
    # per-file outputs from S3 inputs go to a local folder, the same values as the store's (float32 vs float16)
    out = tmp_path / "files"
    assert main(["embed", f"s3://{BUCKET}/photos/", "--checkpoint", ckpt, "--out", str(out), "--workers", "0",
                 "--quiet"]) == 1
    capsys.readouterr()
    from samvit.embeddings.files import load_embedding

    emb, meta = load_embedding(str(out / "sub" / "coffee.safetensors"))
    # the same picture, the same weights: equal but for one float16 rounding of float32 values that the other run's
    # batch (2 here, 1 there) may round differently on some CPUs (seen on an AVX2-only AMD)
    assert_close_scaled(s.get("sub/coffee.jpg").float(), emb, k=2, dtype=torch.float16, msg="s3 store vs files")


def _committed(url: str) -> int:
    try:
        return len(EmbeddingStore.open(url, verify=False))
    except FileNotFoundError:
        return 0
    except ValueError as e:  # being created: the identity object comes last
        assert "not a samvit embedding store" in str(e)
        return 0


def test_sigkill_mid_run_then_resume_equals_clean_run(tmp_path, s3, ckpt):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    n = 16
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(src / f"img{i:02d}.jpg")
    fs.put(str(src) + "/", f"{BUCKET}/kill/in/", recursive=True)
    ref = str(tmp_path / "ref")
    encoder = load_encoder(None, ckpt)
    embed(encoder, collect_inputs([str(src)]), StoreSink(ref, checkpoint_sha256(ckpt)), workers=0, progress=False)
    url = f"s3://{BUCKET}/kill/s.zarr"
    cmd = [sys.executable, "-m", "samvit", "embed", f"s3://{BUCKET}/kill/in/", "--checkpoint", ckpt, "--store", url,
           "--workers", "0", "--batch-size", "1", "--quiet"]
    env = dict(one_thread_env(), SAMVIT_OBJSTORE_COMMIT_SECONDS="0", **s3)  # a segment per commit
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _committed(url) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _committed(url)
    assert 2 <= done < n, (f"run was not killed mid-way ({done} of {n} committed, exit {proc.returncode}): "
                           f"{proc.stderr.read()[-3000:]}")
    s = EmbeddingStore.open(url)
    rep = s.verify()
    assert rep.ok, rep.errors
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    s = EmbeddingStore.open(url)
    assert len(s) == n and s.verify().ok
    assert_same_store(url, ref)


def _identity(**kw):
    cfg = TINY
    base = dict(model="tiny", config=cfg.to_dict(), embedding_shape=(cfg.out_chans, cfg.grid_size, cfg.grid_size),
                checkpoint_sha256="ab" * 32, dtype="float32")
    base.update(kw)
    return base


def _writer(store, name):
    return store.writer(model="tiny", checkpoint_sha256="ab" * 32, samvit_version="t", compute_dtype="float32",
                        name=name)


def test_two_writers_interleaved_lose_nothing_and_creators_agree(s3):
    """Two stores opened on one URL, created 'at once' (the second create finds the first's identity), two writer
    sessions committing interleaved segments with overlapping keys: every item of both is there, the later commit
    of a shared key wins, verify is clean; a creator with another identity is refused."""
    from samvit.embeddings.store import StoreMismatchError

    url = f"s3://{BUCKET}/two.zarr"
    a = EmbeddingStore.create(url, **_identity())
    b = EmbeddingStore.create(url, **_identity())
    with pytest.raises(StoreMismatchError):
        EmbeddingStore.create(url, **_identity(checkpoint_sha256="cd" * 32))
    shape = a.shape
    rng = np.random.default_rng(0)
    wa, wb = _writer(a, "a"), _writer(b, "b")
    wa.commit_seconds = wb.commit_seconds = 0
    expect = {}
    for i in range(6):
        for w, tag in ((wa, "a"), (wb, "b")):
            key = f"{tag}{i}" if i < 5 else "shared"
            emb = rng.standard_normal(shape).astype(np.float32)
            w.put(key, emb, sha256=f"{tag}{i}", original_size=(10, 20), input_size=(8, 16))
            w.commit()
            expect[key] = emb  # b commits "shared" after a: b's wins
    wa.close()
    wb.close()
    s = EmbeddingStore.open(url)
    assert s.keys() == sorted(expect)
    for k, emb in expect.items():
        assert np.array_equal(s.get(k).numpy(), emb), k
    assert s.metadata("shared")["sha256"] == "b5"
    rep = s.verify()
    assert rep.ok and rep.checked == 11, rep.errors
    # a damaged row object is found by verify and by a read
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    rec = s.record("a1")
    chunk = f"{BUCKET}/two.zarr/data/{rec['array']}/c.{rec['row']}.0.0.0"
    fs.pipe_file(chunk, bytes(len(fs.cat_file(chunk))))
    rep = EmbeddingStore.open(url).verify()
    assert not rep.ok and any("a1" in e and "checksum" in e for e in rep.errors)


def test_commit_segments_are_never_overwritten(s3):
    """A conditional create refuses an existing object unless it holds the same bytes (our own retried write)."""
    import fsspec

    from samvit.data.remote import create_object

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    path = f"{BUCKET}/cond/seg"
    create_object(fs, path, b"one")
    create_object(fs, path, b"one")  # a retry that finds its own write
    with pytest.raises(FileExistsError):
        create_object(fs, path, b"two")
    assert fs.cat_file(path) == b"one"


def test_per_file_outputs_stay_local(tmp_path, s3, ckpt, capsys):
    assert main(["embed", f"s3://{BUCKET}/photos/", "--checkpoint", ckpt, "--out", f"s3://{BUCKET}/out/"]) == 2
    assert "--store URL" in capsys.readouterr().err


def test_hq_store_keeps_early_features_on_s3(s3):
    """An HQ-SAM store on object storage: the early features are a second array per writer (data/<writer>.early),
    read back exactly; verify checks them (a damaged early-feature object is an error); a plain store's identity
    is refused for it."""
    from samvit.embeddings.store import StoreError, StoreMismatchError

    url = f"s3://{BUCKET}/hq.zarr"
    hq = {"hq_early_block": 2, "early_shape": [12, TINY.grid_size, TINY.grid_size]}
    store = EmbeddingStore.create(url, **_identity(), hq=hq)
    with pytest.raises(StoreMismatchError, match="plain SAM embeddings vs HQ-SAM|HQ-SAM .* vs plain SAM"):
        EmbeddingStore.create(url, **_identity())
    rng = np.random.default_rng(1)
    w = _writer(store, "hq")
    w.commit_seconds = 0
    emb = rng.standard_normal(store.shape).astype(np.float32)
    early = rng.standard_normal(tuple(hq["early_shape"])).astype(np.float32)
    with pytest.raises(StoreError, match="no early features"):
        w.put("x", emb, sha256="x", original_size=(10, 20), input_size=(8, 16))
    w.put("k", emb, sha256="k", original_size=(10, 20), input_size=(8, 16), early_features=early)
    w.close()
    s = EmbeddingStore.open(url)
    assert s.early_shape == tuple(hq["early_shape"]) and s.metadata("k")["hq_early_block"] == "2"
    assert np.array_equal(s.get("k").numpy(), emb) and np.array_equal(s.early_features("k").numpy(), early)
    assert s.verify().ok
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    rec = s.record("k")
    chunk = f"{BUCKET}/hq.zarr/data/{rec['array']}.early/c.{rec['row']}.0.0.0"
    fs.pipe_file(chunk, bytes(len(fs.cat_file(chunk))))
    rep = EmbeddingStore.open(url).verify()
    assert not rep.ok and any("k" in e and "early-feature checksum" in e for e in rep.errors), rep.errors


def test_unreachable_endpoint_is_a_clear_error_not_a_bug(tmp_path, ckpt, monkeypatch, capsys):
    """An S3 endpoint that does not answer (a closed loopback port), or an option s3fs does not take, ends the
    command with exit 2 and the error in one line, not 'a bug in samvit'; nothing is written."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                 ("AWS_DEFAULT_REGION", "us-east-1"),
                 ("SAMVIT_STORAGE_OPTIONS", '{"config_kwargs": {"retries": {"max_attempts": 1}}}')):  # no retries
        monkeypatch.setenv(k, v)
    forget_s3_clients()
    try:
        code = main(["embed", f"s3://{BUCKET}/photos/", "--checkpoint", ckpt, "--store", str(tmp_path / "s.zarr")])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "object storage: EndpointConnectionError" in err and "bug in samvit" not in err, err
        assert not (tmp_path / "s.zarr").exists()
        # an option s3fs does not take is the user's error too, named as theirs (s3fs would raise a TypeError at
        # its first request)
        for bad in ('{"no_such_option": 1}', '{"client_kwargs": {"bogus": 1}}'):
            monkeypatch.setenv("SAMVIT_STORAGE_OPTIONS", bad)
            assert main(["embed", f"s3://{BUCKET}/photos/", "--checkpoint", ckpt, "--store",
                         str(tmp_path / "s.zarr")]) == 2, bad
            err = capsys.readouterr().err
            assert "SAMVIT_STORAGE_OPTIONS holds an option" in err and "bug in samvit" not in err, err
        from samvit.data.remote import S3_RETRIES  # botocore rewrites the config it is given: never samvit's own
        assert S3_RETRIES == {"retries": {"max_attempts": 10, "mode": "standard"}}
    finally:
        forget_s3_clients()
