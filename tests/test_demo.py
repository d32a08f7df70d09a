"""demo.py: draws predictions for image files and folders; names bad inputs."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import load_script
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

from hiera_det.data.synthetic import SyntheticSpec, draw_image
from hiera_det.engine.visualize import drawing_scale

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "quickstart.py")


def load_demo():
    return load_script("demo.py", "demo")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A checkpoint of the (untrained) quickstart model, as train_net.py would write one."""
    out = tmp_path_factory.mktemp("weights")
    model = instantiate(LazyConfig.load(CONFIG).model)
    DetectionCheckpointer(model, save_dir=str(out)).save("model")
    return str(out / "model.pth")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """``one.png`` (128 px) and a folder ``folder/sub/two.jpg`` (96x160) of synthetic shapes."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "folder" / "sub").mkdir(parents=True)
    for name, size, seed in [("one.png", (128, 128), 0), ("folder/sub/two.jpg", (96, 160), 1)]:
        image, _, _ = draw_image(SyntheticSpec(image_size=size), np.random.default_rng(seed))
        cv2.imwrite(str(root / name), image[:, :, ::-1])
    return root


def test_demo_draws_files_and_folders(weights, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    demo = load_demo()
    out = tmp_path / "out"
    written = demo.main(
        [
            "--config-file", CONFIG,
            "--input", str(inputs / "one.png"), str(inputs / "folder"),
            "--output", str(out),
            "--confidence-threshold", "0.0",
            "--opts", f"train.init_checkpoint={weights}",
        ]
    )  # fmt: skip
    assert written == [out / "one.png", out / "sub" / "two.jpg"]
    for path, (h, w) in zip(written, [(128, 128), (96, 160)]):
        drawing = cv2.imread(str(path))
        scale = drawing_scale(h, w)
        assert drawing.shape == (round(h * scale), round(w * scale), 3)
    assert not (tmp_path / "datasets").exists()  # class names need no dataset on disk


def test_demo_names_bad_inputs(weights, inputs, tmp_path):
    demo = load_demo()

    def run(*input_paths, opts=(f"train.init_checkpoint={weights}",)):
        argv = ["--config-file", CONFIG, "--output", str(tmp_path / "out"), "--input"]
        return demo.main([*argv, *map(str, input_paths), "--opts", *opts])

    missing = inputs / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        run(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(demo.DemoError, match="no images .* in folder .*empty"):
        run(empty)
    with pytest.raises(demo.DemoError, match="no weights"):
        run(inputs / "one.png", opts=())
    # A damaged file in a folder is named; the readable images are still drawn.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (mixed / "good.png").write_bytes((inputs / "one.png").read_bytes())
    with pytest.raises(demo.DemoError, match="1 of 2 inputs could not be read: .*broken.jpg"):
        run(mixed)
    assert (tmp_path / "out" / "good.png").is_file()


def _write_video(path: Path, frames: int, size: tuple[int, int]) -> None:
    """A video of `frames` synthetic-shape frames of `size` (width, height), 5 frames/s."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, size)
    assert writer.isOpened()
    for seed in range(frames):
        spec = SyntheticSpec(image_size=(size[1], size[0]))
        image, _, _ = draw_image(spec, np.random.default_rng(seed))
        writer.write(np.ascontiguousarray(image[:, :, ::-1]))
    writer.release()


def _frames(path: Path) -> list[np.ndarray]:
    video, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = video.read()
        if not ok:
            return frames
        frames.append(frame)


def test_demo_video_in_video_out(weights, tmp_path):
    clip = tmp_path / "clip.avi"
    _write_video(clip, frames=7, size=(160, 96))
    out = tmp_path / "out"
    demo = load_demo()
    written = demo.main(
        [
            "--config-file", CONFIG, "--video-input", str(clip), "--output", str(out),
            "--confidence-threshold", "0.0", "--opts", f"train.init_checkpoint={weights}",
        ]
    )  # fmt: skip
    assert written == [out / "clip.mp4"]
    frames = _frames(out / "clip.mp4")
    assert len(frames) == len(_frames(clip)) == 7
    assert all(frame.shape == (96, 160, 3) for frame in frames)
    with pytest.raises(demo.DemoError, match="cannot read the video .*nope.mp4"):
        demo.main(["--config-file", CONFIG, "--video-input", str(tmp_path / "nope.mp4"),
                   "--output", str(out), "--opts", f"train.init_checkpoint={weights}"])  # fmt: skip


def test_demo_output_json_is_coco_results(weights, inputs, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.mask import decode

    out, json_file = tmp_path / "out", tmp_path / "predictions.json"
    load_demo().main(
        [
            "--config-file", CONFIG, "--input", str(inputs / "one.png"), str(inputs / "folder"),
            "--output", str(out), "--output-json", str(json_file),
            "--confidence-threshold", "0.0", "--opts", f"train.init_checkpoint={weights}",
        ]
    )  # fmt: skip
    results = json.loads(json_file.read_text())
    assert results and {r["image_id"] for r in results} == {1, 2}
    assert {r["file_name"] for r in results} == {
        str(inputs / "one.png"),
        str(inputs / "folder/sub/two.jpg"),
    }
    spec = SyntheticSpec()
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 128, "height": 128}, {"id": 2, "width": 160, "height": 96}],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(spec.shapes)],
        "annotations": [],
    }
    gt.createIndex()
    loaded = gt.loadRes(str(json_file))  # the dataset's category ids (from 1), not 0-based
    assert len(loaded.getAnnIds()) == len(results)
    assert {r["category_id"] for r in results} <= set(range(1, len(spec.shapes) + 1))
    for r in results:
        h, w = (128, 128) if r["image_id"] == 1 else (96, 160)
        assert decode(r["segmentation"]).shape == (h, w) and len(r["bbox"]) == 4
        x, y, bw, bh = r["bbox"]
        assert 0 <= x <= x + bw <= w + 1 and 0 <= y <= y + bh <= h + 1 and 0 <= r["score"] <= 1
