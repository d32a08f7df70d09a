"""tools/gpu_check.py: the whole GPU check runs end to end on the CPU (--cpu-smoke), and the wheel
installer installs only what is missing."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import load_script

pytestmark = pytest.mark.slow  # end to end: the full suite, not the fast tier

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--cpu-smoke", "--output", str(out)]
        + ["--work", str(tmp_path / "work")],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=2400,  # the script stops itself sooner (its limits sum to 35 min)
    )
    assert run.returncode == 0, run.stdout[-4000:]
    steps = json.loads((out / "results.json").read_text())["steps"]
    names = [s["name"] for s in steps]
    for name in ("tests", "data", "train Hiera-B", "train ViTDet-B", "inference", "mae"):
        assert name in names
    assert all(s["status"].startswith("ok") for s in steps), [
        (s["name"], s["status"]) for s in steps
    ]
    trained = [s for s in steps if s["name"].startswith("train ")]
    for s in trained:  # 4 iterations each through train_net.py: losses logged, the last timed
        assert s["iters_done"] == 4 and s["first_loss"] > 0 and s["s_per_iter"] > 0, s
        assert s["precision"] == "fp32 (CPU)"
    inference = next(s for s in steps if s["name"] == "inference")["results"]
    assert {(r["model"], r["dtype"]) for r in inference} == {
        (m, d)
        for m in ("configs/mask_rcnn_hiera_b.py", "configs/mask_rcnn_hiera_b_plus.py")
        for d in ("fp32", "bf16")
    }
    mae = next(s for s in steps if s["name"] == "mae")["results"]
    assert mae["ours_over_official_throughput"] > 0 and mae["amp"] == "fp32"

    report = (out / "report.md").read_text()
    for title in ("1. CUDA tests", "2. Training with AMP", "3. Inference latency", "4. MAE"):
        assert f"## {title}" in report
    assert "CPU smoke run" in report
    assert "| Hiera-B+ (`configs/mask_rcnn_hiera_b_plus.py`) | B | " in report
    assert "| 192 | 1.11 |" in report  # the paper's B+ time and its ratio to Hiera-B's 173 ms
    assert "ours / official throughput" in report
    assert (out / "gpu_check.log").stat().st_size > 0


def fake_wheel(folder: Path, dist: str, module: str) -> Path:
    """A minimal pure-Python wheel of distribution `dist` holding one module `module`."""
    name = f"{dist}-1.0"
    path = folder / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{module}.py", "VALUE = 42\n")
        whl.writestr(f"{name}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\n"
                     "Version: 1.0\n")  # fmt: skip
        whl.writestr(
            f"{name}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        whl.writestr(f"{name}.dist-info/RECORD", "")
    return path


def test_install_wheels_installs_only_what_is_missing(tmp_path):
    gpu_check = load_script("tools/gpu_check.py", "gpu_check_tool")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "hiera_det_absent_pkg", "hiera_det_absent_module")
    fake_wheel(wheels, "pytest", "not_installed_because_pytest_is_here")
    runner = gpu_check.Runner(tmp_path / "log.txt", dict(os.environ), deadline=1e12)
    site = tmp_path / "site"
    step = gpu_check.install_wheels(wheels, site, runner, limit=300)
    assert step["status"] == "ok", step["tail"]
    assert step["installed"] == ["hiera_det_absent_pkg-1.0-py3-none-any.whl"]
    assert (site / "hiera_det_absent_module.py").is_file()
    assert not (site / "not_installed_because_pytest_is_here.py").exists()


def test_step_limits_change_by_name_and_name_a_bad_one(tmp_path):
    gpu_check = load_script("tools/gpu_check.py", "gpu_check_tool")
    limits = gpu_check.step_limits(gpu_check.STEP_LIMITS, ["mae=120", "train Hiera-B=60.5"])
    assert limits["mae"] == 120 and limits["train Hiera-B"] == 60.5
    assert limits["tests"] == gpu_check.STEP_LIMITS["tests"]
    for bad in ("maee=3", "mae=soon", "mae"):
        with pytest.raises(ValueError, match=f"--limit '{bad}'.*one of"):
            gpu_check.step_limits(gpu_check.STEP_LIMITS, [bad])
