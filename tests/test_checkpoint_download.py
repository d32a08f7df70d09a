"""Checkpoints from the web, without a network: a file server on 127.0.0.1 in a thread.

Unreachable URL -> one message (URL, cache path, the two ways on), nothing in the cache, train_net
stops before building anything; an interrupted download leaves no file under the final name; a
truncated checkpoint (zip, legacy, pickle), an empty file or a web page is an error naming it.
"""

import http.server
import os
import pickle
import socket
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import shrink_overrides

from hiera_det import checkpoint_download
from hiera_det.checkpoint import HieraCheckpointer, load_hiera_checkpoint
from hiera_det.checkpoint_download import (
    CheckpointUnavailableError,
    CorruptCheckpointError,
    cache_path,
    fetch_checkpoint,
)
from hiera_det.modeling.hiera import build_hiera

ROOT = Path(__file__).resolve().parents[1]


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves `files` (URL path -> bytes); a path in `cut` sends its full Content-Length but only
    the first half of the bytes, then closes the connection (an interrupted download)."""

    files: dict[str, bytes] = {}
    cut: set[str] = set()

    def do_HEAD(self):  # noqa: N802 -- http.server's name
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data[: len(data) // 2] if self.path in self.cut else data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Files.files, _Files.cut = {}, set()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _Files, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("FVCORE_CACHE", str(folder))
    return folder


def closed_port_url(name: str = "hiera/mae_hiera_tiny_224.pth") -> str:
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def small_hiera():
    return build_hiera("tiny", embed_dim=8, stages=(1, 1, 1, 1))  # 88k parameters: a 350 kB file


def tiny_checkpoint(path: Path, **save_kwargs) -> bytes:
    model = small_hiera()
    torch.save({"model_state": model.state_dict()}, path, **save_kwargs)
    return path.read_bytes()


def test_unreachable_url_says_where_and_how_and_writes_nothing(cache):
    url = closed_port_url()
    with pytest.raises(CheckpointUnavailableError) as info:
        fetch_checkpoint(url)
    message = str(info.value)
    assert url in message and cache_path(url) in message
    assert str(cache / "hiera/mae_hiera_tiny_224.pth") == cache_path(url)
    assert "copy the file there" in message and "train.init_checkpoint=/path/to/file" in message
    assert "Connection refused" in message  # the reason urllib gave
    assert files_under(cache) == []
    # Loading the URL directly gives the same message.
    model = small_hiera()
    for load in (HieraCheckpointer(model).load, lambda u: load_hiera_checkpoint(model, u)):
        with pytest.raises(CheckpointUnavailableError, match="copy the file there") as info:
            load(url)
        assert cache_path(url) in str(info.value)
    with pytest.raises(CheckpointUnavailableError, match="--weights /path/to/file"):
        fetch_checkpoint(url, local_hint="--weights /path/to/file")
    assert files_under(cache) == []


def test_download_is_cached_and_loads(server, cache, tmp_path):
    files, base = server
    data = tiny_checkpoint(tmp_path / "weights.pth")
    files.files["/hiera/tiny.pth"] = data
    url = f"{base}/hiera/tiny.pth"
    local = fetch_checkpoint(url)
    assert local == cache_path(url) and Path(local).read_bytes() == data
    assert files_under(cache) == [Path(local)]  # no temporary file left beside it
    del files.files["/hiera/tiny.pth"]  # from now on only the cache has it
    report = load_hiera_checkpoint(small_hiera(), url)
    assert report.loaded and not report.missing
    model = small_hiera()
    HieraCheckpointer(model).load(url)
    saved = torch.load(tmp_path / "weights.pth", weights_only=True)["model_state"]
    torch.testing.assert_close(model.state_dict(), saved)


def test_interrupted_download_leaves_no_file_under_the_final_name(server, cache, tmp_path):
    files, base = server
    files.files["/hiera/cut.pth"] = tiny_checkpoint(tmp_path / "weights.pth")
    files.cut.add("/hiera/cut.pth")
    url = f"{base}/hiera/cut.pth"
    with pytest.raises(CheckpointUnavailableError, match="ContentTooShortError") as info:
        fetch_checkpoint(url)
    assert cache_path(url) in str(info.value)
    assert not os.path.exists(cache_path(url))
    assert files_under(cache) == []  # no partial file anywhere in the cache either


def truncated_files(tmp_path: Path) -> list[Path]:
    zip_data = tiny_checkpoint(tmp_path / "zip.pth")
    legacy = tiny_checkpoint(tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    pkl = pickle.dumps({"model": {"w": torch.zeros(64, 64).numpy()}})
    out = []
    for name, data in [("zip.pth", zip_data), ("legacy.pt", legacy), ("d2.pkl", pkl)]:
        for fraction in (0.5, 0.01):
            path = tmp_path / f"cut{fraction}_{name}"
            path.write_bytes(data[: int(len(data) * fraction)])
            out.append(path)
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "page.pth").write_bytes(b"<!DOCTYPE html><html>Access denied</html>")
    return [*out, tmp_path / "empty.pth", tmp_path / "page.pth"]


def test_truncated_or_corrupt_files_name_the_file(tmp_path):
    model = small_hiera()
    for path in truncated_files(tmp_path):
        for load in (
            lambda p: HieraCheckpointer(model).load(p),
            lambda p: load_hiera_checkpoint(model, p),
        ):
            with pytest.raises(CorruptCheckpointError, match=f"checkpoint file {path} "):
                load(str(path))
        # Before reading: what the file's first and last bytes show (a zip without its end).
        if path.suffix == ".pth" and "legacy" not in path.name:
            with pytest.raises(CorruptCheckpointError, match=f"checkpoint file {path} "):
                fetch_checkpoint(str(path))


def test_intact_local_files_pass_and_other_errors_are_left_alone(tmp_path):
    path = tmp_path / "ok.pth"
    tiny_checkpoint(path)
    assert fetch_checkpoint(str(path)) == str(path)
    assert fetch_checkpoint(f"{path}?matching_heuristics=True") == str(path)  # Detectron2's query
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        fetch_checkpoint(str(tmp_path / "missing.pth"))
    with pytest.raises(KeyError):
        with checkpoint_download.reading_checkpoint(str(path)):
            raise KeyError("not about the file")


def run_train_net(tiny_coco, tmp_path, init_checkpoint: str) -> subprocess.CompletedProcess:
    data = f"{tiny_coco.json_file},{tiny_coco.image_root}"
    command = [
        sys.executable,
        "train_net.py",
        "--config-file",
        "configs/mask_rcnn_hiera_t.py",
        *shrink_overrides(128),
        f"dataset.train=[tiny_download,{data}]",
        f"dataset.test=[tiny_download,{data}]",
        f"train.output_dir={tmp_path / 'out'}",
        f"train.init_checkpoint={init_checkpoint}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FVCORE_CACHE": str(tmp_path / "cache")}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_train_net_unreachable_url_is_one_message_before_anything_is_built(tiny_coco, tmp_path):
    url = closed_port_url()
    run = run_train_net(tiny_coco, tmp_path, url)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith("train_net.py: error: cannot download the checkpoint " + url)
    assert str(tmp_path / "cache/hiera/mae_hiera_tiny_224.pth") in message
    assert "train.init_checkpoint=/path/to/file" in message
    assert "Model:" not in run.stderr + run.stdout  # stopped before the model and the loaders
    assert files_under(tmp_path / "cache") == []


def test_train_net_truncated_init_checkpoint_names_the_file(tiny_coco, tmp_path):
    path = tmp_path / "cut.pth"
    path.write_bytes(tiny_checkpoint(tmp_path / "full.pth")[:5000])
    run = run_train_net(tiny_coco, tmp_path, str(path))
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith(f"train_net.py: error: checkpoint file {path} (5000 bytes) is trunc")
    assert "Model:" not in run.stderr + run.stdout


def test_predictor_cfg_and_demo_say_how_to_give_a_local_file(cache, tmp_path):
    from conftest import load_script

    from hiera_det.predictor import predictor_cfg

    url = closed_port_url()
    with pytest.raises(CheckpointUnavailableError, match=r"copy the file there.*predictor_cfg"):
        predictor_cfg(str(ROOT / "configs/quickstart.py"), url)
    demo = load_script("demo.py", "demo")
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    argv = ["--config-file", str(ROOT / "configs/quickstart.py"), "--input", str(image)]
    argv += ["--output", str(tmp_path / "drawn")]
    with pytest.raises(CheckpointUnavailableError, match="--weights /path/to/file") as info:
        demo.main([*argv, "--weights", url])
    assert cache_path(url) in str(info.value)
    with pytest.raises(CheckpointUnavailableError, match="--opts train.init_checkpoint=/path/to"):
        demo.main([*argv, "--opts", f"train.init_checkpoint={url}"])
    assert files_under(cache) == []
