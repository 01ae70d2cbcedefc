"""`samvit serve` against a real uvicorn on loopback: every route, every limit, token on/off, CORS, the store, the CVAT
blob as CVAT decodes it, masks equal to samvit.Predictor's, the CLI."""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

import samvit  # noqa: E402
from samvit.cli import main  # noqa: E402
from samvit.serve import ServeConfig, create_app  # noqa: E402

from tests._serve_utils import (OBJECT, TINY_1024, free_port, object_image, official_tiny_sam_1024, png_bytes,  # noqa: E402
                          running, save_full_checkpoint)

TOKEN = "test-token-0123"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(official Sam, checkpoint path, the test image, its PNG path and bytes)."""
    d = tmp_path_factory.mktemp("serve")
    sam = official_tiny_sam_1024(seed=0)
    ckpt = save_full_checkpoint(sam, d / "tiny_sam.safetensors")
    rgb = object_image()
    data = png_bytes(rgb)
    (d / "object.png").write_bytes(data)
    return {"sam": sam, "ckpt": ckpt, "rgb": rgb, "png": str(d / "object.png"), "data": data, "dir": d}


def _predictor(setup):
    return samvit.Predictor.from_checkpoint(setup["ckpt"])


@pytest.fixture(scope="module")
def server(setup):
    """An open server (no token), default-ish limits; yields (client, app)."""
    app = create_app(_predictor(setup), ServeConfig(model_name="tiny1024", max_body_bytes=2 * 2**20,
                                                    max_pixels=1_000_000))
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, app


@pytest.fixture(scope="module")
def reference(setup):
    """samvit.Predictor with the test image set (the service's answers must equal its answers)."""
    p = _predictor(setup)
    p.set_image(setup["rgb"])
    return p


def _embed(client, data: bytes, **params):
    r = client.post("/v1/embeddings", files={"image": ("x.png", data, "image/png")}, params=params)
    assert r.status_code == 200, r.text
    return r


def _batches(app) -> int:
    return app.state.service.worker.batches


def _detail(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert detail
    return json.dumps(detail)


# ---- routes ----

def test_health_openapi_page(server):
    client, _ = server
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model"] == "tiny1024"
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/embeddings", "/v1/embeddings/{image_id}", "/v1/segment", "/v1/segment/auto", "/healthz", "/metrics"):
        assert p in paths, p
    assert any("cvat" in p for p in paths)
    assert client.get("/docs").status_code == 404  # the Swagger page would load scripts from a CDN: off
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        r = client.get(asset)
        assert r.status_code == 200 and len(r.text) > 100
        assert "http://" not in r.text and "https://" not in r.text  # everything is served from here
    assert "http://" not in page.text and "https://" not in page.text


def test_embedding_cached_by_content_hash(server, setup):
    client, app = server
    data = png_bytes(setup["rgb"], tag="cache")
    before = _batches(app)
    first = _embed(client, data).json()
    assert first["id"] == hashlib.sha256(data).hexdigest()
    assert first["original_size"] == [240, 320] and first["input_size"] == [768, 1024]
    assert first["shape"] == [256, 64, 64] and first["cached"] is False
    assert _batches(app) == before + 1
    raw = client.post("/v1/embeddings", content=data, headers={"content-type": "image/png"})  # raw body, same file
    assert raw.status_code == 200 and raw.json() == dict(first, cached=True)
    got = client.get(f"/v1/embeddings/{first['id']}")
    assert got.status_code == 200 and got.json() == dict(first, cached=True)
    assert _batches(app) == before + 1  # the second and third request never re-encoded


def test_embedding_formats_equal_samvit_embed(server, setup, capsys):
    client, _ = server
    out = setup["dir"] / "embed_out"
    assert main(["embed", setup["png"], "--checkpoint", setup["ckpt"], "--out", str(out), "--quiet"]) == 0
    from safetensors.torch import load_file

    ref = load_file(str(out / "object.safetensors"))["embedding"]
    npy = np.load(io.BytesIO(_embed(client, setup["data"], format="npy").content))
    assert npy.shape == (1, 256, 64, 64) and npy.dtype == np.float32
    np.testing.assert_array_equal(npy[0], ref.numpy())
    r = client.get(f"/v1/embeddings/{hashlib.sha256(setup['data']).hexdigest()}",
                   params={"format": "safetensors", "dtype": "float16"})
    assert r.status_code == 200
    assert json.loads(r.headers["x-samvit-embedding"])["original_size"] == [240, 320]
    path = setup["dir"] / "got.safetensors"
    path.write_bytes(r.content)
    p = samvit.Predictor(None, samvit.load_decoder(setup["ckpt"]))
    p.set_embedding(str(path))  # the file `samvit embed` writes: sizes in its metadata
    assert p.original_size == (240, 320) and p.input_size == (768, 1024)
    assert torch.equal(load_file(str(path))["embedding"], ref.half())


def test_cvat_blob_decoded_as_cvat_does(server, setup):
    client, _ = server
    r = client.post("/v1/cvat/embedding", json={"image": base64.b64encode(setup["data"]).decode()})
    assert r.status_code == 200, r.text
    blob = np.frombuffer(base64.b64decode(r.json()["blob"]), np.float32).reshape(1, 256, 64, 64)
    out = setup["dir"] / "embed_cvat"
    assert main(["embed", setup["png"], "--checkpoint", setup["ckpt"], "--out", str(out), "--quiet"]) == 0
    from safetensors.torch import load_file

    np.testing.assert_array_equal(blob[0], load_file(str(out / "object.safetensors"))["embedding"].numpy())
    # ... and it is what CVAT's own SAM function (the official SamPredictor) computes with the same weights
    from segment_anything import SamPredictor

    official = SamPredictor(setup["sam"])
    official.set_image(setup["rgb"])
    assert np.abs(blob - official.get_image_embedding().numpy()).max() <= 1e-4


def test_segment_equals_predictor(server, setup, reference):
    client, _ = server
    image_id = _embed(client, setup["data"]).json()["id"]
    h, w = setup["rgb"].shape[:2]
    click = [OBJECT[0] * w, OBJECT[1] * h]
    r = client.post("/v1/segment", json={"image_id": image_id, "points": [click], "labels": [1], "multimask": True})
    assert r.status_code == 200, r.text
    got = r.json()
    masks, scores, low = reference.predict(np.array([click]), np.array([1]), multimask_output=True)
    assert len(got["masks"]) == 3 and got["best"] == int(np.argmax(scores))
    for m, ref_mask, s in zip(got["masks"], masks, scores):
        png = np.asarray(Image.open(io.BytesIO(base64.b64decode(m["png"]))))
        np.testing.assert_array_equal(png > 127, ref_mask)
        assert m["area"] == int(ref_mask.sum()) and m["score"] == pytest.approx(float(s), abs=1e-6)
    assert 0 < masks.sum() < masks.size  # the masks say something (neither empty nor everything)
    low_got = np.frombuffer(base64.b64decode(got["low_res_logits"]["data"]), np.float32).reshape(3, 256, 256)
    np.testing.assert_allclose(low_got, low, atol=1e-6, rtol=0)
    # the next click: a background point, a box and the previous mask's logits, as COCO RLE
    best = int(np.argmax(scores))
    body = {"image": base64.b64encode(setup["data"]).decode(), "points": [click, [10, 10]], "labels": [1, 0],
            "box": [100, 50, 300, 200], "mask_input": {"shape": [1, 256, 256], "data": base64.b64encode(
                low[best:best + 1].astype(np.float32).tobytes()).decode()}, "format": "rle", "return_low_res": False}
    r = client.post("/v1/segment", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["low_res_logits"] is None and len(got["masks"]) == 1
    masks, scores, _ = reference.predict(np.array([click, [10, 10]]), np.array([1, 0]), np.array([100, 50, 300, 200]),
                                         low[best:best + 1], multimask_output=False)
    from pycocotools import mask as mask_utils

    rle = got["masks"][0]["rle"]
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), masks[0])
    assert got["masks"][0]["score"] == pytest.approx(float(scores[0]), abs=1e-6)
    ys, xs = np.nonzero(masks[0])
    assert got["masks"][0]["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]


def test_auto_equals_generator(server, setup, reference):
    client, _ = server
    image_id = _embed(client, setup["data"]).json()["id"]
    params = dict(points_per_side=2, pred_iou_thresh=0.5, stability_score_thresh=0.5)
    r = client.post("/v1/segment/auto", json=dict(image_id=image_id, **params))
    assert r.status_code == 200, r.text
    got = r.json()["annotations"]
    ref = samvit.AutomaticMaskGenerator(reference, output_mode="coco_rle", progress=False, **params).generate(None)
    assert len(got) == len(ref) > 0
    assert json.loads(json.dumps(ref)) == got


# ---- bad input: 4xx with a message, never 500 ----

@pytest.mark.parametrize("body, status, words", [
    ({"points": [[10, 10]], "labels": [1]}, 422, "exactly one of image_id"),
    ({"image_id": "ab", "points": [[10, 10]], "labels": [1]}, 422, "pattern"),
    ({"image_id": "0" * 64, "points": [[10, 10]], "labels": [1]}, 404, "no embedding with this id"),
    ({"image": "***", "points": [[10, 10]], "labels": [1]}, 422, "not valid base64"),
    ({"image": base64.b64encode(b"not an image").decode(), "points": [[1, 1]], "labels": [1]}, 422, "cannot decode"),
    ({"points": [[1000, 10]], "labels": [1]}, 422, "outside the image"),
    ({"points": [[10, 10]], "labels": [1, 1]}, 422, "one label per point"),
    ({"points": [[10, 10]], "labels": [7]}, 422, "must be 1 (foreground) or 0"),
    ({"points": [[10, 10]]}, 422, "point_labels must be given"),
    ({}, 422, "no prompt"),
    ({"box": [50, 50, 10, 10]}, 422, "x1 >= x0"),
    ({"box": [1, 2, 3]}, 422, "box"),
    ({"mask_input": {"shape": [1, 64, 64], "data": base64.b64encode(bytes(64 * 64 * 4)).decode()}}, 422,
     "mask_input: expected shape"),
    ({"mask_input": {"shape": [1, 256, 256], "data": "AAAA"}}, 422, "bytes of data"),
])
def test_bad_segment_requests(server, setup, body, status, words):
    client, _ = server
    image_id = hashlib.sha256(setup["data"]).hexdigest()
    _embed(client, setup["data"])
    if not any(k in body for k in ("image", "image_id")) and words != "exactly one of image_id":
        body = dict(body, image_id=image_id)
    assert words in _detail(client.post("/v1/segment", json=body), status)


def test_bad_images_and_bodies(server):
    client, _ = server
    for data, words in ((b"", "empty image"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "cannot decode"),
                        (png_bytes(object_image())[:300], "cannot decode")):
        assert words in _detail(client.post("/v1/embeddings", content=data), 422)
    r = client.post("/v1/embeddings", files={"other": ("x.png", b"123", "image/png")})
    assert "named `image`" in _detail(r, 422)
    r = client.post("/v1/segment", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "not valid base64" in _detail(client.post("/v1/cvat/embedding", json={"image": "!!"}), 422)
    assert client.post("/v1/cvat/embedding", json={}).status_code == 422
    assert client.get("/v1/embeddings/" + "f" * 64).status_code == 404
    assert client.get("/v1/embeddings/" + "f" * 64, params={"format": "zip"}).status_code == 422
    too_big = png_bytes(np.zeros((1001, 1000, 3), np.uint8))  # 1,001,000 pixels > 1,000,000, a small file
    assert "over this server's limit of 1000000 pixels" in _detail(client.post("/v1/embeddings", content=too_big), 413)
    body = os.urandom(2 * 2**20 + 1)
    assert "over this server's limit" in _detail(client.post("/v1/embeddings", content=body), 413)

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(3):
            yield os.urandom(2**20)

    assert "over this server's limit" in _detail(client.post("/v1/embeddings", content=chunks()), 413)


def test_metrics(server, setup):
    client, _ = server
    _embed(client, setup["data"])
    client.get("/v1/embeddings/" + "f" * 64)
    text = client.get("/metrics").text
    assert 'samvit_requests_total{method="POST",route="/v1/embeddings",status="200"}' in text
    assert 'samvit_requests_total{method="GET",route="/v1/embeddings/{image_id}",status="404"}' in text
    assert 'samvit_request_seconds_bucket{le="0.005",route="/v1/embeddings"}' in text
    for name in ("samvit_encoder_batch_size_count", 'samvit_queue_depth{kind="images"}',
                 'samvit_cache_hits_total{tier="memory"}', "samvit_cache_misses_total", "samvit_cache_bytes",
                 "samvit_decoder_seconds_count"):
        assert name in text, name
    hits = float(text.split('samvit_cache_hits_total{tier="memory"} ')[1].split()[0])
    assert hits >= 1


# ---- token, limits that need a busy worker, CORS ----

@pytest.fixture(scope="module")
def strict(setup):
    """A server with a token, a queue of 2 and CORS for one origin; yields (url, app)."""
    app = create_app(_predictor(setup), ServeConfig(model_name="tiny1024", token=TOKEN, max_queue=2,
                                                    cors_origins=("http://allowed.test",)))
    with running(app) as url:
        yield url, app


def test_token(strict, setup):
    url, _ = strict
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/healthz").status_code == 200  # no token needed
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200  # the page is public
        for method, path, kw in (("GET", "/metrics", {}), ("GET", "/openapi.json", {}),
                                 ("POST", "/v1/embeddings", {"content": setup["data"]}),
                                 ("GET", "/v1/embeddings/" + "0" * 64, {}),
                                 ("POST", "/v1/segment", {"json": {}}), ("POST", "/v1/segment/auto", {"json": {}}),
                                 ("POST", "/v1/cvat/embedding", {"json": {}})):
            for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}):
                r = c.request(method, path, headers=headers, **kw)
                assert "bearer token" in _detail(r, 401) and r.headers["www-authenticate"] == "Bearer", path
        assert c.get("/metrics", headers=auth).status_code == 200
        assert c.get("/openapi.json", headers=auth).status_code == 200
        assert c.post("/v1/embeddings", content=setup["data"], headers=auth).status_code == 200


def test_cors(strict, server):
    url, _ = strict
    with httpx.Client(base_url=url) as c:
        pre = c.options("/v1/segment", headers={"Origin": "http://allowed.test",
                                                "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://allowed.test"
        other = c.options("/v1/segment", headers={"Origin": "http://evil.test",
                                                  "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
    client, _ = server  # CORS is off unless configured
    r = client.get("/healthz", headers={"Origin": "http://allowed.test"})
    assert "access-control-allow-origin" not in r.headers


def test_queue_limit_timeout_and_disconnect(strict, setup):
    """With the worker held busy: the third distinct image gets 429 + Retry-After, a waiting request 504 after the
    timeout, a client that leaves costs no encoder time (499 in the metrics)."""
    url, app = strict
    service = app.state.service
    normal = service.config
    service.config = dataclasses.replace(normal, timeout_s=1.0)  # for this test only: see the 504 soon
    auth = {"Authorization": f"Bearer {TOKEN}"}
    gate = threading.Event()
    blocker = service.worker.call(lambda predictor: gate.wait(30))  # the model thread is now busy
    images = [png_bytes(setup["rgb"], tag=f"q{i}") for i in range(3)]
    results = {}

    def post():
        with httpx.Client(base_url=url, timeout=30) as c:
            results[0] = c.post("/v1/embeddings", content=images[0], headers=auth)

    host, port = url.rsplit("//", 1)[1].split(":")
    leaver = socket.create_connection((host, int(port)))  # a client that sends its image, then goes away
    try:
        t0 = time.monotonic()
        waiting = threading.Thread(target=post)
        waiting.start()
        leaver.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                       f"Content-Type: image/png\r\nContent-Length: {len(images[1])}\r\n\r\n".encode() + images[1])
        while service.worker.queued_images < 2:
            assert time.monotonic() - t0 < 20
            time.sleep(0.01)
        leaver.close()
        with httpx.Client(base_url=url, timeout=30) as c:
            full = c.post("/v1/embeddings", content=images[2], headers=auth)
        assert "images are waiting" in _detail(full, 429) and int(full.headers["retry-after"]) >= 1
        waiting.join()
        assert "per-request timeout" in _detail(results[0], 504)
        assert time.monotonic() - t0 < 15
    finally:
        gate.set()
        service.config = normal
        leaver.close()
    blocker.result(30)
    batches = service.worker.batches
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v1/embeddings", content=images[2], headers=auth).status_code == 200
    assert service.worker.batches == batches + 1  # only image 2 was encoded: 0 and 1 were given up
    assert service.worker.queued_images == 0
    text = httpx.get(url + "/metrics", headers=auth).text
    assert 'route="/v1/embeddings",status="499"' in text and 'status="429"' in text and 'status="504"' in text


# ---- the store: a restart keeps the embeddings ----

def test_store_survives_restart(setup):
    from samvit.serve.cache import open_store

    path = str(setup["dir"] / "store")
    sha = hashlib.sha256(open(setup["ckpt"], "rb").read()).hexdigest()
    data = png_bytes(setup["rgb"], tag="store")
    store, writer = open_store(path, TINY_1024, sha, "float32")
    app = create_app(_predictor(setup), ServeConfig(model_name="tiny1024"), store, writer)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        first = np.load(io.BytesIO(_embed(c, data, format="npy").content))
    assert len(samvit.EmbeddingStore.open(path)) == 1  # written behind, committed by the time the app stopped
    store, writer = open_store(path, TINY_1024, sha, "float32")
    app = create_app(_predictor(setup), ServeConfig(model_name="tiny1024"), store, writer)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = _embed(c, data, format="npy")
        assert json.loads(r.headers["x-samvit-embedding"])["cached"] is True
        np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), first)
        assert 'samvit_cache_hits_total{tier="store"} 1.0' in c.get("/metrics").text
    assert app.state.service.worker.batches == 0  # the second server never ran its encoder
    with pytest.raises(ValueError, match="checkpoint"):
        open_store(path, TINY_1024, "0" * 64, "float32")  # another checkpoint's embeddings are not mixed in


def test_store_from_samvit_embed(setup):
    """A store `samvit embed --store` filled (keys are file names, float16) answers by the file's content hash."""
    from samvit.serve.cache import open_store
    from samvit.checkpoints.files import sha256_file as file_sha256

    path = str(setup["dir"] / "embed_store")
    assert main(["embed", setup["png"], "--checkpoint", setup["ckpt"], "--store", path, "--workers", "0",
                 "--quiet"]) == 0
    stored = samvit.EmbeddingStore.open(path)
    assert stored.keys() == ["object.png"] and stored.identity["dtype"] == "float16"
    store, writer = open_store(path, TINY_1024, file_sha256(setup["ckpt"]), "float32")
    app = create_app(_predictor(setup), ServeConfig(model_name="tiny1024"), store, writer)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = _embed(c, setup["data"], format="npy")
        assert json.loads(r.headers["x-samvit-embedding"])["cached"] is True
        np.testing.assert_array_equal(np.load(io.BytesIO(r.content))[0], stored.get("object.png").float().numpy())
    assert app.state.service.worker.batches == 0


# ---- the command ----

def test_cli_serves(setup):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), SAMVIT_TOKEN=TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "samvit", "serve", "--checkpoint", setup["ckpt"], "--port",
                             str(port), "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - t0 < 60
            time.sleep(0.2)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json").status_code == 401
        schema = httpx.get(f"http://127.0.0.1:{port}/openapi.json", headers=auth).json()
        assert any("cvat" in p for p in schema["paths"])
    finally:
        proc.terminate()
        proc.wait(30)


def test_cli_errors(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("SAMVIT_CHECKPOINT", raising=False)
    assert main(["serve"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert "nope.pth" in err and "Traceback" not in err
    assert main(["serve", "--checkpoint", "x", "--workers-batch", "0"]) == 2
    assert "--workers-batch must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "x", "--store-dtype", "float16"]) == 2
    assert "only applies with --store" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "x", "--token", "short"]) == 2
    assert "at least 8 characters" in capsys.readouterr().err
    from samvit.cli import build_parser

    args = build_parser().parse_args(["serve", "--checkpoint", "x"])
    assert args.host == "127.0.0.1" and args.cors_origin == [] and args.workers_batch == 8
