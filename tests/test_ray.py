"""Ray Data as the cluster engine: a local Ray cluster (2 worker processes, loopback) started and stopped here.
The Ray job's store equals the one-process store (same keys, max abs 0), also with an encoder actor killed
(SIGKILL) mid-job and retried by Ray; Parquet output holds the same embeddings."""
from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest
from PIL import Image

import samvit
from samvit import EmbeddingStore, load_encoder
from samvit.checkpoints.registry import checkpoint_sha256
from samvit.cli import main
from samvit.data.sources import collect_inputs
from samvit.embeddings.pipeline import StoreSink, embed


ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster: 2 CPUs (2 worker processes), no dashboard, on 127.0.0.1; shut down after."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        h, w = (200 + 37 * i, 300 - 11 * i)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / ("sub" if i % 2 else ".") / f"img{i}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return str(root)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, images, ckpt):
    """The one-process run (batch 1, this process)."""
    out = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    rep = embed(load_encoder(None, ckpt), collect_inputs([images]), StoreSink(out, checkpoint_sha256(ckpt)),
                workers=0, progress=False)
    assert rep.embedded == 8 and len(rep.failed) == 1
    return out


def assert_same_store(a: str, b: str) -> None:
    sa, sb = EmbeddingStore.open(a), EmbeddingStore.open(b)
    assert sa.keys() == sb.keys() and len(sa) == 8
    for k in sa.keys():
        (ea, ma), (eb, mb) = sa[k], sb[k]
        assert (ea.float() - eb.float()).abs().max().item() == 0, k
        for f in ("sha256", "original_size", "input_size", "tiles"):
            assert ma[f] == mb[f], (k, f)
    assert sb.verify().ok


@pytest.mark.slow
def test_cli_engine_ray_equals_one_process(tmp_path, cluster, images, ckpt, reference, capsys):
    out = str(tmp_path / "ray.zarr")
    code = main(["embed", images, "--checkpoint", ckpt, "--store", out, "--engine", "ray", "--actors", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "broken.png" in err and "8 embedded" in err, err
    assert_same_store(reference, out)
    with open(os.path.join(out, "failures.jsonl")) as f:
        assert "broken.png" in f.read()
    # a rerun finds everything stored: nothing is encoded again
    assert main(["embed", images, "--checkpoint", ckpt, "--store", out, "--engine", "ray"]) == 1
    assert "0 embedded, 8 already in the store" in capsys.readouterr().err
    assert_same_store(reference, out)


class KillOnce(samvit.ray.Embedder):
    """An encoder actor that SIGKILLs its own process on the 4th batch of the job (once, by marker files in
    `marks`): Ray restarts the actor and retries the batch; the batches before it went on to be written."""

    def __init__(self, marks: str, **kw) -> None:
        super().__init__(**kw)
        self.marks = marks

    def __call__(self, batch):
        calls = len([n for n in os.listdir(self.marks) if n.startswith("call")])
        open(os.path.join(self.marks, f"call{calls}-{os.getpid()}-{id(batch)}"), "w").close()
        if calls >= 3:
            try:
                os.close(os.open(os.path.join(self.marks, "killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return super().__call__(batch)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_worker_killed_mid_job_is_retried_and_the_store_has_every_image_once(tmp_path, cluster, images, ckpt,
                                                                             reference):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = load_encoder(None, ckpt).config
    sha = checkpoint_sha256(ckpt)
    out = str(tmp_path / "killed.zarr")
    sink = StoreSink(out, sha)
    done = sink.open(load_encoder(None, ckpt), None, 0, 0, 1)
    marks = tmp_path / "marks"
    marks.mkdir()
    items = collect_inputs([images])
    ds = ray.data.from_items([{"path": p, "key": k} for p, k in items], override_num_blocks=4)
    ds = ds.map_batches(samvit.ray.decode, batch_size=2, fn_kwargs={"img_size": cfg.img_size, "done": done})
    ds = ds.map_batches(KillOnce, batch_size=1, concurrency=1,
                        fn_constructor_kwargs={"marks": str(marks), "checkpoint": ckpt, "out_dtype": "float16"})
    datasink = samvit.ray.StoreDatasink(out, sha, cfg)
    ds.write_datasink(datasink)
    assert (marks / "killed").exists()  # the actor was killed mid-job, and its batch retried
    assert datasink.result["embedded"] == 8 and len(datasink.result["failed"]) == 1
    assert_same_store(reference, out)


@pytest.mark.slow
def test_parquet_output_holds_the_same_embeddings(tmp_path, cluster, images, ckpt, reference, capsys):
    out = str(tmp_path / "pq")
    assert main(["embed", images, "--checkpoint", ckpt, "--parquet", out, "--engine", "ray", "--quiet"]) == 1
    capsys.readouterr()
    rows = ray.data.read_parquet(out).take_all()
    ref = EmbeddingStore.open(reference)
    ok = {r["key"]: r for r in rows if r["status"] == "ok"}
    assert sorted(ok) == ref.keys() and sum(r["status"] == "failed" for r in rows) == 1
    for k, r in ok.items():
        emb = samvit.ray.embedding(r, ref.shape)
        assert np.abs(emb[0].astype(np.float32) - ref.get(k).float().numpy()).max() == 0, k


def test_ray_options_are_checked_before_any_work(tmp_path, images, ckpt, capsys):
    for args, msg in ((["--ray-address", "auto", "--store", str(tmp_path / "s")], "--engine ray"),
                      (["--engine", "ray"], "--store PATH or --parquet DIR"),
                      (["--engine", "ray", "--store", str(tmp_path / "s"), "--parquet", str(tmp_path / "p")],
                       "one of them"),
                      (["--engine", "ray", "--parquet", str(tmp_path / "p"), "--tile", "64"], "apply with --store")):
        assert main(["embed", images, "--checkpoint", ckpt, *args]) == 2, args
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "s") and not os.path.exists(tmp_path / "p")


@pytest.mark.slow
def test_ray_from_and_to_s3_equals_one_process(tmp_path, cluster, images, ckpt, reference, capsys):
    """--engine ray with inputs and store on moto's S3 server (on loopback; Ray's workers get its endpoint and
    credentials through the environment they inherit)."""
    pytest.importorskip("s3fs")
    import fsspec
    pytest.importorskip("moto.server")
    from tests.helpers.s3 import moto_s3

    with moto_s3():
        ray.shutdown()  # a cluster whose workers inherit the endpoint
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
                 log_to_driver=False)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("samvit-ray")
        fs.put(images + "/", "samvit-ray/in/", recursive=True)
        url = "s3://samvit-ray/out.zarr"
        assert main(["embed", "s3://samvit-ray/in/", "--checkpoint", ckpt, "--store", url, "--engine", "ray",
                     "--quiet"]) == 1
        assert "broken.png" in capsys.readouterr().err
        assert_same_store(reference, url)


def test_import_samvit_does_not_import_ray():
    import subprocess

    code = ("import sys, samvit, samvit.ray; assert samvit.ray.Embedder and samvit.ray.decode; "
            "print('ray' in sys.modules, 'ray.data' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr[-2000:]
