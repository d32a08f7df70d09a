"""Checkpoints are data, not code: a checkpoint whose pickle would run code (here: create a file)
is refused on every path that reads one, naming the file; the opt-in loads a file one trusts."""

import pathlib
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, shrink_overrides
from detectron2.config import LazyConfig
from detectron2.engine import DefaultPredictor, default_argument_parser
from torch import nn

from hiera_det.checkpoint import (
    TRUST_ENV,
    HieraCheckpointer,
    UnsafeCheckpointError,
    load_hiera_checkpoint,
)
from hiera_det.data.datasets import apply_dataset_config
from hiera_det.modeling import Hiera
from hiera_det.predictor import predictor_cfg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_net  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


class Touch:
    """Unpickling this calls ``pathlib.Path(path).touch()``: code run by loading a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def tiny_hiera() -> Hiera:
    return Hiera(embed_dim=16, stages=(1, 1, 2, 1))


@pytest.fixture
def evil(tmp_path):
    """(a torch checkpoint, a model-zoo .pkl, the file either creates when unpickled)."""
    flag = tmp_path / "code_ran"
    weights = {k: v for k, v in tiny_hiera().state_dict().items()}
    pth = tmp_path / "evil.pth"
    torch.save({"model": weights, "iteration": 3, "payload": Touch(flag)}, pth)
    pkl = tmp_path / "evil.pkl"
    numpy_weights = {k: v.numpy() for k, v in weights.items()}
    with open(pkl, "wb") as f:
        pickle.dump({"model": numpy_weights, "__author__": "x", "payload": Touch(flag)}, f, 2)
    return pth, pkl, flag


def assert_refused(run, path: Path, flag: Path) -> None:
    with pytest.raises(UnsafeCheckpointError) as err:
        run()
    message = str(err.value)
    assert str(path) in message and "getattr" in message, message  # the file and what it needed
    assert TRUST_ENV in str(err.value)
    assert not flag.exists(), "loading the checkpoint ran its code"


def test_the_payload_runs_code_under_plain_pickle(evil):
    pth, pkl, flag = evil
    with open(pkl, "rb") as f:
        pickle.load(f)
    assert flag.exists()  # so the tests below would see it if a path unpickled it


def test_load_hiera_checkpoint_and_checkpointer_refuse_code(evil):
    pth, pkl, flag = evil
    assert_refused(lambda: load_hiera_checkpoint(tiny_hiera(), str(pth)), pth, flag)
    assert_refused(lambda: HieraCheckpointer(tiny_hiera()).load(str(pth)), pth, flag)
    assert_refused(lambda: HieraCheckpointer(tiny_hiera()).load(str(pkl)), pkl, flag)


def test_trusted_file_loads_with_full_pickle(evil, monkeypatch):
    pth, pkl, flag = evil
    monkeypatch.setenv(TRUST_ENV, f"/elsewhere.pth:{pth}")
    load_hiera_checkpoint(tiny_hiera(), str(pth))
    assert flag.exists()
    flag.unlink()
    assert_refused(lambda: HieraCheckpointer(tiny_hiera()).load(str(pkl)), pkl, flag)


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)


def test_model_zoo_pkl_of_numpy_arrays_loads(tmp_path):
    torch.manual_seed(0)
    source = Detector()
    for author, protocol in (("Detectron2 zoo", 2), ("Detectron2 zoo", 4), (None, 2)):
        data = {k: v.numpy() for k, v in source.state_dict().items()}
        data = {"model": data, "__author__": author} if author else {"blobs": data}
        path = tmp_path / f"zoo_{protocol}_{bool(author)}.pkl"
        path.write_bytes(pickle.dumps(data, protocol))
        fresh = Detector()
        HieraCheckpointer(fresh).load(str(path))
        for key, value in source.state_dict().items():
            torch.testing.assert_close(fresh.state_dict()[key], value)
    # numpy scalars and an OrderedDict are data too
    path = tmp_path / "scalars.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "__author__": "x", "lr": np.float32(0.1)}, 2))
    assert HieraCheckpointer(Detector()).load(str(path))["lr"] == np.float32(0.1)


def train_net_args(tiny_coco, out: Path, *extra: str):
    data = f"{tiny_coco.json_file},{tiny_coco.image_root}"
    return default_argument_parser().parse_args(
        [
            *extra[:1],
            "--config-file",
            str(ROOT / "configs/mask_rcnn_hiera_t.py"),
            *shrink_overrides(128),
            f"dataset.train=[tiny_safe,{data}]",
            f"dataset.test=[tiny_safe,{data}]",
            f"train.output_dir={out}",
            "train.max_iter=1",
            *extra[1:],
        ]
    )


def test_train_net_eval_only_and_resume_refuse_code(evil, tiny_coco, tmp_path):
    pth, _, flag = evil
    init = f"train.init_checkpoint={pth}"
    args = train_net_args(tiny_coco, tmp_path / "eval", "--eval-only", init)
    assert_refused(lambda: train_net.main(args), pth, flag)

    out = tmp_path / "resume"
    out.mkdir()
    planted = out / "model_0000009.pth"
    planted.write_bytes(pth.read_bytes())
    (out / "last_checkpoint").write_text(planted.name)
    args = train_net_args(tiny_coco, out, "--resume")
    assert_refused(lambda: train_net.main(args), planted, flag)


def test_default_predictor_refuses_code(evil, tiny_coco, tmp_path):
    pth, pkl, flag = evil
    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(str(ROOT / "configs/mask_rcnn_hiera_t.py")), shrink_overrides(128)
    )
    cfg.dataset = {"test": ["tiny_safe_predictor", tiny_coco.json_file, tiny_coco.image_root]}
    apply_dataset_config(cfg)
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    for weights in (pth, pkl):
        yacs = predictor_cfg(str(tmp_path / "config.yaml"), str(weights))
        assert_refused(lambda yacs=yacs: DefaultPredictor(yacs), weights, flag)


def test_mae_picture_tool_refuses_code(evil, tmp_path):
    pth, _, flag = evil
    tool = load_script("tools/mae_pictures.py", "mae_pictures")
    args = ["--config-file", str(ROOT / "configs/mae/mae_hiera_t.py"), "--checkpoint", str(pth)]
    args += ["--input", str(tmp_path), "--output", str(tmp_path / "p.png"), "--device", "cpu"]
    assert_refused(lambda: tool.main(args), pth, flag)
