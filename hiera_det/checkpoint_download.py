"""Checkpoints from the web: the local file of a checkpoint URL, or an error that says what to do.

Detectron2's ``PathManager`` fetches ``http(s)://`` and ``ftp://`` URLs with iopath's
`HTTPURLHandler`: it caches a URL under ``$FVCORE_CACHE`` (default ``~/.torch/iopath_cache``) + the
URL's path, takes a file lock so that one process downloads and the others then find the file,
and downloads with `iopath.common.download.download`, which writes ``<name>.tmp`` and renames it
only when ``urlretrieve`` returns (``urlretrieve`` raises ``ContentTooShortError`` when fewer bytes
arrive than the server's Content-Length announced; the ``.tmp`` file is then removed). So an
interrupted download never leaves a file under the cache name. `fetch_checkpoint` adds what
iopath lacks:

- a URL that cannot be fetched raises `CheckpointUnavailableError` with the URL, the cache path
  where the file is looked for and the two ways on (copy the file there, or give a local file);
  nothing is left in the cache;
- a truncated or corrupt file (local, or cached) raises `CorruptCheckpointError` naming it
  (`check_checkpoint_file` before reading, `reading_checkpoint` around a reader) instead of a zip
  or pickle traceback.

The official checkpoints' publishers give no sizes or checksums, so a file is not checked against
any; `hiera_det.checkpoint.HieraCheckpointer` and `load_hiera_checkpoint` resolve every path
through `fetch_checkpoint`.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from urllib.parse import urlparse

from detectron2.utils.file_io import Detectron2Handler, PathManager
from iopath.common.file_io import HTTPURLHandler, get_cache_dir

__all__ = [
    "CheckpointUnavailableError",
    "CorruptCheckpointError",
    "cache_path",
    "check_checkpoint_file",
    "fetch_checkpoint",
    "is_damaged_file_error",
    "reading_checkpoint",
]

URL_PREFIXES = ("http://", "https://", "ftp://")
DEFAULT_LOCAL_HINT = "train.init_checkpoint=/path/to/file"


class CheckpointUnavailableError(FileNotFoundError):
    """A checkpoint URL cannot be fetched and is not in the cache."""

    def __init__(self, url: str, cached: str, reason: str, local_hint: str = DEFAULT_LOCAL_HINT):
        self.url, self.cached, self.reason = url, cached, reason
        super().__init__(
            f"cannot download the checkpoint {url} ({reason}). It is looked for in the local cache "
            f"at {cached} ($FVCORE_CACHE sets the cache folder). Either copy the file there "
            f"(e.g. downloaded on a machine with internet access), or give a local copy: "
            f"{local_hint}"
        )


class CorruptCheckpointError(ValueError):
    """A local checkpoint file is truncated or corrupt."""


def cache_path(url: str, cache_dir: str | None = None) -> str:
    """Where iopath's `HTTPURLHandler` caches `url`: cache folder + the URL's path."""
    filename = url.split("/")[-1]
    if len(filename) > HTTPURLHandler.MAX_FILENAME_LEN:  # iopath would cache it under a random name
        raise ValueError(f"checkpoint URL with a file name over 250 characters: {url}")
    folder = os.path.dirname(urlparse(url).path.lstrip("/"))
    return os.path.join(get_cache_dir(cache_dir), folder, filename)


def fetch_checkpoint(
    path: str, *, local_hint: str = DEFAULT_LOCAL_HINT, cache_dir: str | None = None
) -> str:
    """The local file of checkpoint `path`: a file, or a URL (cached; downloaded if it is not).

    A query (``?matching_heuristics=True``, which Detectron2's checkpointer reads) is dropped;
    ``detectron2://`` names a file of Detectron2's model zoo (its https URL); other schemes go to
    their handler in Detectron2's ``PathManager``.

    Raises:
        CheckpointUnavailableError: a URL that cannot be fetched and is not cached; `local_hint`
            ends the message (how to give a local file instead, e.g. ``--weights /path/to/file``).
        FileNotFoundError, CorruptCheckpointError: a local path that is missing / a local or
            downloaded file that is truncated, empty or a web page.
    """
    url = path.split("?")[0]
    if url.startswith(Detectron2Handler.PREFIX):
        url = Detectron2Handler.S3_DETECTRON2_PREFIX + url[len(Detectron2Handler.PREFIX) :]
    if "://" in url and not url.startswith(URL_PREFIXES):
        return PathManager.get_local_path(url)  # manifold://, ... -> their handler
    if not url.startswith(URL_PREFIXES):
        if not os.path.isfile(url):
            raise FileNotFoundError(f"checkpoint file not found: {url}")
        check_checkpoint_file(url)
        return url
    cached = cache_path(url, cache_dir)
    try:
        local = PathManager.get_local_path(url, cache_dir=cache_dir)
    except (OSError, http.client.HTTPException) as e:  # URLError, ContentTooShortError, ...
        raise CheckpointUnavailableError(url, cached, _reason(e), local_hint) from None
    check_checkpoint_file(local)
    return local


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return f"{type(error).__name__}: {reason if reason is not None else error}"


_ZIP_MAGIC = b"PK\x03\x04"


def check_checkpoint_file(path: str) -> None:
    """Raise `CorruptCheckpointError` naming `path` when it cannot be a complete checkpoint.

    Cheap checks before any reading: an empty file, an HTML page saved under a checkpoint's name,
    and a zip (PyTorch >= 1.6 format) without its central directory (a truncated download or copy).
    Other damage shows when the file is read: see `reading_checkpoint`.
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CorruptCheckpointError(f"checkpoint file {path} is empty")
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml")):
        raise CorruptCheckpointError(
            f"checkpoint file {path} is a web page (HTML/XML), not a checkpoint: an error or "
            "login page was saved under its name; download the file again"
        )
    if head.startswith(_ZIP_MAGIC):
        try:
            zipfile.ZipFile(path).close()
        except zipfile.BadZipFile as e:
            raise CorruptCheckpointError(
                f"checkpoint file {path} ({os.path.getsize(path)} bytes) is truncated or corrupt: "
                f"a PyTorch zip file without a readable end ({e}); download or copy it again"
            ) from None


def is_damaged_file_error(error: BaseException) -> bool:
    """Whether a reader's exception means a damaged file (not e.g. a weights_only refusal)."""
    # struct.error: torch's weights-only unpickler reading past the end of a truncated pickle.
    if isinstance(error, (EOFError, zipfile.BadZipFile, struct.error)):
        return True
    text = str(error)
    if isinstance(error, pickle.UnpicklingError):
        return "truncated" in text or "Ran out of input" in text or "invalid load key" in text
    if isinstance(error, RuntimeError):
        damage = ("PytorchStreamReader", "zip archive", "unexpected EOF", "might be corrupted")
        return any(words in text for words in damage)
    return False


@contextlib.contextmanager
def reading_checkpoint(path: str) -> Iterator[None]:
    """Check `path` (`check_checkpoint_file`), then turn a reader's damaged-file exception
    (EOFError, a truncated pickle, a zip error) raised inside the block into
    `CorruptCheckpointError` naming the file."""
    check_checkpoint_file(path)
    try:
        yield
    except Exception as e:
        if not is_damaged_file_error(e):
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CorruptCheckpointError(
            f"checkpoint file {path} ({os.path.getsize(path)} bytes) is truncated or corrupt "
            f"({type(e).__name__}: {first_line}); download or copy it again"
        ) from None
