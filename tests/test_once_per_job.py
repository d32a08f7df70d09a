"""Checks run once per job (hiera_det.utils.once_per_job): two real processes (gloo, started by
Detectron2's `launch`) check a dataset once, in the main process, and get the same verdict or the
same error; a failing check ends both without waiting for a verdict that never comes."""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import copy_tiny_coco
from detectron2.engine import launch
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from hiera_det.data.datasets import register_coco_format
from hiera_det.data.validation import validate_datasets
from hiera_det.utils.once_per_job import once_per_job

pytestmark = pytest.mark.slow  # starts processes: the full suite, not the fast tier

TIMEOUT = timedelta(seconds=60)  # a collective that waits longer fails the test instead of hanging


class _Parses(logging.Handler):
    """Counts the parses of annotation files `hiera_det.data.validation` logs."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "parsed" in record.getMessage()


def _check_dataset(output: str, json_file: str, image_root: str) -> None:
    """One process of the job: register and validate the dataset as train_net does; write what
    happened to ``<output>/rank<N>.json``."""
    parses = _Parses()
    validation_logger = logging.getLogger("hiera_det.data.validation")
    validation_logger.addHandler(parses)
    validation_logger.setLevel(logging.INFO)
    outcome = {}
    try:
        outcome["classes"] = register_coco_format("job", json_file, image_root)
        reports = once_per_job(validate_datasets, "job", cache_dir=f"{output}/dataset_checks")
        outcome["annotations"] = [r.num_annotations for r in reports]
    except Exception as error:
        outcome["error"] = f"{type(error).__name__}: {error}"
    outcome["parses"] = parses.count
    _write_and_exit(Path(output, f"rank{comm.get_rank()}.json"), outcome)


def _fail_in_main_process(output: str) -> None:
    """The main process's check fails with an error of its own kind; the other waits for it."""

    def check() -> str:
        raise PermissionError(f"{output}/annotations.json: permission denied")

    try:
        outcome = once_per_job(check)
    except PermissionError as error:
        outcome = f"PermissionError: {error}"
    _write_and_exit(Path(output, f"rank{comm.get_rank()}.json"), outcome)


def _write_and_exit(path: Path, outcome) -> None:
    """Write the outcome and end the process at once. With torch 2.14.1, a process that leaves
    the interpreter right after a gloo `all_gather_object` is often aborted by a gloo thread
    (SIGABRT, "terminate called without an active exception"; 4 of 10 two-process runs of a bare
    `all_gather_object`, 0 of 10 ending with `os._exit`): what is tested is written by then."""
    path.write_text(json.dumps(outcome))
    os._exit(0)


def _outcomes(output: Path) -> list:
    return [json.loads((output / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_processes_parse_the_file_once(tiny_coco, tmp_path):
    data = copy_tiny_coco(tiny_coco, tmp_path)
    args = (str(tmp_path), data.json_file, data.image_root)
    launch(_check_dataset, 2, dist_url="auto", args=args, timeout=TIMEOUT)
    main, other = _outcomes(tmp_path)
    assert main["parses"] == 1 and other["parses"] == 0  # registration and check share it
    assert main["classes"] == other["classes"] == 2
    assert (
        main["annotations"]
        == other["annotations"]
        == [len(json.load(open(data.json_file))["annotations"])]
    )


def test_a_broken_file_is_the_same_error_in_every_process(tiny_coco, tmp_path):
    data = copy_tiny_coco(tiny_coco, tmp_path)
    content = json.loads(Path(data.json_file).read_text())
    content["annotations"][1]["category_id"] = 99
    Path(data.json_file).write_text(json.dumps(content))
    launch(
        _check_dataset,
        2,
        dist_url="auto",
        args=(str(tmp_path), data.json_file, data.image_root),
        timeout=TIMEOUT,
    )
    main, other = _outcomes(tmp_path)
    assert "DatasetError" in main["error"] and "category_id 99" in main["error"]
    assert other["error"] == main["error"] and other["parses"] == 0


def test_a_failing_check_ends_every_process(tmp_path):
    launch(_fail_in_main_process, 2, dist_url="auto", args=(str(tmp_path),), timeout=TIMEOUT)
    main, other = _outcomes(tmp_path)
    assert main == other == f"PermissionError: {tmp_path}/annotations.json: permission denied"


def _die_in_main_process() -> None:
    """The main process dies during the check (killed, out of memory); the other waits for it."""
    once_per_job(os._exit, 3)


def test_a_dying_check_ends_every_process():
    with pytest.raises(ProcessExitedException, match="exit code 3"):
        launch(_die_in_main_process, 2, dist_url="auto", timeout=TIMEOUT)


def test_without_a_process_group_it_is_a_plain_call():
    assert once_per_job(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    with pytest.raises(ZeroDivisionError):
        once_per_job(lambda: 1 / 0)
