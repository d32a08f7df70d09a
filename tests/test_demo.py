"""demo.py: draws predictions for image files and folders; names bad inputs."""

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
