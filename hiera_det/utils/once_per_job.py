"""Work done once per job instead of once per process: `once_per_job` runs a function in the main
process only and gives every process of the job its result, or raises its error in every process.

Used for the checks before training (`hiera_det.data.validation`): on a machine of 8 GPUs, one
parse of a COCO-sized annotation file instead of eight at once, and one decode of every test image.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TypeVar

from detectron2.utils import comm

__all__ = ["once_per_job"]

T = TypeVar("T")


def _shareable(error: BaseException) -> BaseException:
    """`error` if it survives pickling (to be raised in the other processes), else a RuntimeError
    with its message."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def once_per_job(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` in the main process; the other processes wait for it and get its
    return value (pickled) or raise its exception (the same type and message).

    Every process of the job must call it at the same point (it is a collective of Detectron2's
    process group, over gloo). Without a process group it is a plain call.
    """
    if comm.get_world_size() == 1:
        return fn(*args, **kwargs)
    if not comm.is_main_process():
        succeeded, value = comm.all_gather(None)[0]
        if succeeded:
            return value
        raise value
    try:
        value = fn(*args, **kwargs)
    except BaseException as error:  # the others must not wait for a verdict that never comes
        comm.all_gather((False, _shareable(error)))
        raise
    comm.all_gather((True, value))
    return value
