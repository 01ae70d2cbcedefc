"""Checkpoint registry and verified download cache (served by a local HTTP server), name resolution, and the
refusal of pickles that would run code."""
from __future__ import annotations

import hashlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from samvit.checkpoints import registry as hub
from samvit.cli import main
from samvit.checkpoints.registry import CheckpointEntry, DownloadError, download_checkpoint, resolve_checkpoint
from samvit.checkpoints.files import CheckpointError, read_checkpoint
from samvit.checkpoints.load import load_encoder

from tests.helpers import TINY, official_tiny_sam


class _Server:
    """A local HTTP file server: honours Range (206), can ignore it (200), can drop a response mid-file."""

    def __init__(self, files: dict) -> None:
        self.files, self.requests = files, []  # requests: (path, Range header or None)
        self.drop_after = None  # next response: send this many body bytes, then close the connection
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                if name not in server.files:
                    self.send_error(404)
                    return
                data, start = server.files[name], 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.drop_after is not None:
                    body, server.drop_after = body[:server.drop_after], None
                self.wfile.write(body)
                self.wfile.flush()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/sam"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def ckpt_bytes() -> bytes:
    """A real official-layout checkpoint (tiny random SAM) as the bytes torch.save writes."""
    buf = io.BytesIO()
    torch.save(official_tiny_sam().state_dict(), buf)
    return buf.getvalue()


@pytest.fixture
def entry(ckpt_bytes, monkeypatch) -> CheckpointEntry:
    """A registry entry `tiny` for the test checkpoint (the real registry is left as it is)."""
    e = CheckpointEntry("tiny", "sam_tiny_test.pth", len(ckpt_bytes), hashlib.sha256(ckpt_bytes).hexdigest(), "tiny")
    monkeypatch.setitem(hub.REGISTRY, "tiny", e)
    return e


@pytest.fixture
def server(ckpt_bytes, entry):
    s = _Server({entry.filename: ckpt_bytes})
    yield s
    s.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_registry_matches_the_release():
    assert {n: (e.filename, e.size) for n, e in hub.REGISTRY.items()} == {
        "vit_h": ("sam_vit_h_4b8939.pth", 2564550879), "vit_l": ("sam_vit_l_0b3195.pth", 1249524607),
        "vit_b": ("sam_vit_b_01ec64.pth", 375042383)}
    assert hub.REGISTRY["vit_b"].url() == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert hub.REGISTRY["vit_b"].url("http://mirror/x/") == "http://mirror/x/sam_vit_b_01ec64.pth"
    assert all(len(e.sha256) == 64 for e in hub.REGISTRY.values())


def test_download_then_cache_hit(server, entry, ckpt_bytes, tmp_path):
    path = download_checkpoint("tiny", cache=tmp_path, base_url=server.url, progress=False)
    assert path == tmp_path / entry.filename and path.read_bytes() == ckpt_bytes
    assert server.requests == [(f"/sam/{entry.filename}", None)]
    assert (tmp_path / (entry.filename + ".verified")).exists() and not (tmp_path / (entry.filename + ".part")).exists()
    assert download_checkpoint("tiny", cache=tmp_path, base_url=server.url, progress=False) == path
    assert len(server.requests) == 1  # no second transfer


def test_implicit_download_by_name_via_env(server, entry, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMVIT_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("SAMVIT_BASE_URL", server.url)
    enc = load_encoder(TINY, checkpoint="tiny")
    ref = official_tiny_sam().image_encoder.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in enc.state_dict().items())
    assert resolve_checkpoint("tiny") == str(tmp_path / "c" / entry.filename)
    assert resolve_checkpoint(entry.filename) == str(tmp_path / "c" / entry.filename)
    assert len(server.requests) == 1


def test_cli_embed_and_info_by_name(server, entry, tmp_path, monkeypatch, capsys):
    """`--checkpoint NAME` fetches into the cache; the embedding records the registry sha256 (no re-hash)."""
    from PIL import Image

    from samvit import PRESETS
    from samvit.embeddings.files import load_embedding

    monkeypatch.setitem(PRESETS, "tiny", TINY)
    monkeypatch.setenv("SAMVIT_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("SAMVIT_BASE_URL", server.url)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    rc = main(["embed", str(tmp_path / "red.png"), "--checkpoint", "tiny", "--model", "tiny",
               "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0 and len(server.requests) == 1
    out = list((tmp_path / "out").rglob("*.safetensors"))
    assert len(out) == 1 and load_embedding(str(out[0]))[1]["checkpoint_sha256"] == entry.sha256
    assert main(["info", "--checkpoint", "tiny"]) == 0 and "width 64" in capsys.readouterr().out
    assert len(server.requests) == 1


def test_segment_and_embed_take_a_name_alike(server, entry, tmp_path, monkeypatch, capsys):
    """`samvit segment` and `samvit embed` resolve `--checkpoint NAME` the same way: the same error offline, the
    same verified download online."""
    from PIL import Image

    from samvit import PRESETS

    monkeypatch.setitem(PRESETS, "tiny", TINY)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    embed = ["embed", str(tmp_path / "red.png"), "--checkpoint", "tiny", "--out", str(tmp_path / "out"), "--quiet"]
    segment = ["segment", str(tmp_path / "red.png"), "--point", "20,15", "--checkpoint", "tiny",
               "--out", str(tmp_path / "mask.png"), "--quiet"]
    monkeypatch.setenv("SAMVIT_BASE_URL", f"http://127.0.0.1:{_closed_port()}/sam")
    errors = []
    for argv in (embed, segment):
        monkeypatch.setenv("SAMVIT_CACHE", str(tmp_path / argv[0]))
        assert main(argv) == 2
        errors.append(capsys.readouterr().err.split(": error: ", 1)[1])
    assert "could not reach" in errors[0] and errors[0] == errors[1].replace("/segment/", "/embed/")
    monkeypatch.setenv("SAMVIT_BASE_URL", server.url)
    for n, argv in enumerate((embed, segment), start=1):
        monkeypatch.setenv("SAMVIT_CACHE", str(tmp_path / argv[0]))
        assert main(argv) == 0 and len(server.requests) == n  # one download each, into its own cache
        assert hub.is_verified(tmp_path / argv[0] / entry.filename, entry)
    assert (tmp_path / "mask.png").exists() and len(list((tmp_path / "out").rglob("*.safetensors"))) == 1


def test_resume_after_dropped_connection(server, entry, ckpt_bytes, tmp_path):
    half = len(ckpt_bytes) // 2
    server.drop_after = half
    path = download_checkpoint("tiny", cache=tmp_path, base_url=server.url, progress=False)
    assert path.read_bytes() == ckpt_bytes
    assert [r for _, r in server.requests] == [None, f"bytes={half}-"]


def test_resume_on_the_next_run(server, entry, ckpt_bytes, tmp_path):
    half = len(ckpt_bytes) // 3
    server.drop_after = half
    with pytest.raises(DownloadError, match="run again to resume"):
        download_checkpoint("tiny", cache=tmp_path, base_url=server.url, progress=False, retries=1)
    part = tmp_path / (entry.filename + ".part")
    assert part.stat().st_size == half and not (tmp_path / entry.filename).exists()
    path = download_checkpoint("tiny", cache=tmp_path, base_url=server.url, progress=False)
    assert path.read_bytes() == ckpt_bytes and not part.exists()
    assert server.requests[-1][1] == f"bytes={half}-"


def test_server_ignoring_range_restarts(server, entry, ckpt_bytes, tmp_path):
    server.drop_after, server.ignore_range = 1000, True
    path = download_checkpoint("tiny", cache=tmp_path, base_url=server.url, progress=False)
    assert path.read_bytes() == ckpt_bytes  # the 200 answer was written from the start, not appended
    assert [r for _, r in server.requests] == [None, "bytes=1000-"]


def test_sha256_mismatch_deletes_partial(server, entry, tmp_path, monkeypatch):
    monkeypatch.setitem(hub.REGISTRY, "tiny", CheckpointEntry("tiny", entry.filename, entry.size, "0" * 64, "tiny"))
    with pytest.raises(DownloadError, match=r"expected 0{64}; the partial file .* was deleted"):
        download_checkpoint("tiny", cache=tmp_path, base_url=server.url, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.filename + ".lock"]


def test_unreachable_server_says_where_to_put_the_file(entry, tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/sam"
    with pytest.raises(DownloadError) as err:
        download_checkpoint("tiny", cache=tmp_path, base_url=url, progress=False)
    msg = str(err.value)
    assert "could not reach" in msg and f"place it at {tmp_path / entry.filename}" in msg and entry.sha256 in msg
    rc = main(["download", "tiny", "--cache-dir", str(tmp_path), "--base-url", url, "--quiet"])
    assert rc == 2 and f"place it at {tmp_path / entry.filename}" in capsys.readouterr().err


def test_http_error_is_clear(server, entry, tmp_path, monkeypatch):
    monkeypatch.setitem(hub.REGISTRY, "tiny", CheckpointEntry("tiny", "missing.pth", 10, "0" * 64, "tiny"))
    with pytest.raises(DownloadError, match=r"HTTP 404 .*place it at"):
        download_checkpoint("tiny", cache=tmp_path, base_url=server.url, progress=False)


def test_file_placed_by_hand_is_verified_once(entry, ckpt_bytes, tmp_path):
    dest = tmp_path / entry.filename
    dest.write_bytes(ckpt_bytes)
    url = f"http://127.0.0.1:{_closed_port()}/sam"  # no network needed
    assert download_checkpoint("tiny", cache=tmp_path, base_url=url, progress=False) == dest
    marker = tmp_path / (entry.filename + ".verified")
    assert entry.sha256 in marker.read_text()
    # a changed file (same size, new mtime) is hashed again and refused
    dest.write_bytes(b"x" * len(ckpt_bytes))
    with pytest.raises(DownloadError, match="does not match"):
        download_checkpoint("tiny", cache=tmp_path, base_url=url, progress=False)
    dest.write_bytes(b"short")
    with pytest.raises(DownloadError, match="5 bytes, expected"):
        resolve_checkpoint("tiny", cache=tmp_path, base_url=url)


def test_force_fetches_again(server, entry, ckpt_bytes, tmp_path):
    (tmp_path / entry.filename).write_bytes(b"garbage")
    path = download_checkpoint("tiny", cache=tmp_path, base_url=server.url, progress=False, force=True)
    assert path.read_bytes() == ckpt_bytes


def test_cli_download_and_list(server, entry, tmp_path, capsys):
    assert main(["download", "tiny", "--cache-dir", str(tmp_path), "--base-url", server.url, "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / entry.filename)
    assert main(["download", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "tiny" in listing and "verified" in listing and "vit_h" in listing and "not downloaded" in listing
    assert main(["download", "vit_q", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown checkpoint vit_q" in capsys.readouterr().err


def test_unknown_name_or_missing_file():
    with pytest.raises(CheckpointError, match="not a known checkpoint name"):
        resolve_checkpoint("vit_q")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_encoder(checkpoint="no/such/file.pth")


class _Payload:
    """Unpickling this calls open(marker, 'w'): a stand-in for any code a malicious checkpoint would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zipfile", [True, False])
def test_code_running_pickle_is_refused(tmp_path, zipfile):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    sd = official_tiny_sam().image_encoder.state_dict()
    torch.save({"model": sd, "x": _Payload(str(marker))}, path, _use_new_zipfile_serialization=zipfile)
    for load in (read_checkpoint, lambda p: load_encoder(TINY, checkpoint=p)):
        with pytest.raises(CheckpointError, match="refused to load") as err:
            load(path)
        assert "weights_only" in str(err.value) and "Unsupported global" in str(err.value)
        assert not marker.exists()
    assert main(["info", "--checkpoint", str(path)]) == 2 and not marker.exists()
    # the file is a real exploit: an unrestricted unpickler does create the marker
    torch.load(path, weights_only=False)
    assert marker.exists()
