"""Checkpoints from the web: fetch a URL to the local cache, verified, or stop with what to do.

Detectron2 resolves every ``http(s)://``, ``ftp://`` and ``detectron2://`` checkpoint through its
``PathManager`` and iopath's `HTTPURLHandler`, which caches a URL under
``$FVCORE_CACHE`` (default ``~/.torch/iopath_cache``) + the URL's path and downloads it with
`iopath.common.download.download` (to ``<name>.tmp``, renamed when ``urlretrieve`` returns).
`VerifiedHTTPURLHandler` is that handler with what it lacks, and importing this module registers it
in Detectron2's ``PathManager`` (so `HieraCheckpointer`, `load_hiera_checkpoint` and
`DefaultPredictor` all fetch through it):

- a URL that cannot be reached raises `CheckpointUnavailableError` with the URL, the cache path
  where the file is looked for and the two ways on (copy the file there, or give a local file);
  nothing is written to the cache;
- iopath's download runs into a private folder beside the cache file; the file is renamed to its
  cache name only after it is complete (``urlretrieve`` checks Content-Length) and matches
  `KNOWN_CHECKPOINTS` (size, sha256 where known), so an interrupted download never leaves a file
  that a later run takes for a checkpoint;
- a cached file that does not match `KNOWN_CHECKPOINTS` raises `CheckpointVerificationError`
  naming its path, and is not loaded.

`check_checkpoint_file` and `reading_checkpoint` turn a truncated or corrupt local file (any
path) into `CorruptCheckpointError` naming the file, instead of a zip or pickle traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import pickle
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from detectron2.utils.file_io import PathManager
from iopath.common.download import download
from iopath.common.file_io import HTTPURLHandler, file_lock, get_cache_dir

__all__ = [
    "KNOWN_CHECKPOINTS",
    "CheckpointUnavailableError",
    "CheckpointVerificationError",
    "CorruptCheckpointError",
    "KnownCheckpoint",
    "VerifiedHTTPURLHandler",
    "cache_path",
    "check_checkpoint_file",
    "fetch_checkpoint",
    "is_damaged_file_error",
    "reading_checkpoint",
]

logger = logging.getLogger(__name__)

URL_PREFIXES = ("http://", "https://", "ftp://")
DEFAULT_LOCAL_HINT = "train.init_checkpoint=/path/to/file"
PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class KnownCheckpoint:
    """What a published checkpoint must be. None: the publisher does not document it."""

    url: str
    size: int | None = None  # bytes
    sha256: str | None = None  # lower-case hex


_NOT_PUBLISHED = "not published; not verified here"
_HIERA = "https://dl.fbaipublicfiles.com/hiera"
_SAM2 = "https://dl.fbaipublicfiles.com/segment_anything_2"
_HIERA_SIZES = ("tiny", "small", "base", "base_plus", "large", "huge")
_SAM2_SIZES = ("tiny", "small", "base_plus", "large")

# The official files the configs name (configs/common/mask_rcnn_hiera_100ep.py: mae_hiera_*), the
# in1k fine-tuned Hiera files of the same release, and SAM 2 (072824) / SAM 2.1 (092824). Neither
# facebookresearch/hiera nor facebookresearch/sam2 documents byte sizes or sha256 digests (their
# READMEs and download_ckpts.sh give only URLs), and these machines cannot reach the hosts to
# measure them: every size and sha256 is None ("not published; not verified here"). A download is
# still checked against the server's Content-Length. Fill a value in only from the publisher.
KNOWN_CHECKPOINTS: dict[str, KnownCheckpoint] = {
    k.url: k
    for k in [
        *(KnownCheckpoint(f"{_HIERA}/mae_hiera_{s}_224.pth") for s in _HIERA_SIZES),
        *(KnownCheckpoint(f"{_HIERA}/hiera_{s}_224.pth") for s in _HIERA_SIZES),
        *(KnownCheckpoint(f"{_SAM2}/072824/sam2_hiera_{s}.pt") for s in _SAM2_SIZES),
        *(KnownCheckpoint(f"{_SAM2}/092824/sam2.1_hiera_{s}.pt") for s in _SAM2_SIZES),
    ]
}


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


class CheckpointVerificationError(ValueError):
    """A cached or downloaded checkpoint is not the published file (size or sha256)."""


class CorruptCheckpointError(ValueError):
    """A local checkpoint file is truncated or corrupt."""


def cache_path(url: str, cache_dir: str | None = None) -> str:
    """Where iopath's `HTTPURLHandler` caches `url`: cache folder + the URL's path."""
    parsed = urlparse(url)
    filename = url.split("/")[-1]
    if len(filename) > HTTPURLHandler.MAX_FILENAME_LEN:
        raise ValueError(f"checkpoint URL with a file name over 250 characters: {url}")
    folder = os.path.dirname(parsed.path.lstrip("/"))
    return os.path.join(get_cache_dir(cache_dir), folder, filename)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _mismatch(path: str, url: str, expected_size: int | None) -> str | None:
    """Why the file at `path` is not the published `url` (size, then sha256), or None."""
    known = KNOWN_CHECKPOINTS.get(url, KnownCheckpoint(url))
    size = os.path.getsize(path)
    want_size = known.size if known.size is not None else expected_size
    if want_size is not None and size != want_size:
        return f"{size} bytes, expected {want_size}"
    if known.sha256 is not None:
        digest = _sha256(path)
        if digest != known.sha256:
            return f"sha256 {digest}, expected {known.sha256}"
    return None


def _probe(url: str) -> int | None:
    """Check that `url` answers, without writing anything; return its Content-Length if given."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S
        ) as response:
            length = response.headers.get("Content-Length")
    except urllib.error.HTTPError as e:
        if e.code in (405, 501):  # the server does not answer HEAD: let the download try
            return None
        raise
    return int(length) if length and length.isdigit() else None


def _download_verified(url: str, cached: str, expected_size: int | None) -> None:
    """iopath's download into a private folder beside `cached`; rename once verified."""
    folder = os.path.dirname(cached)
    with file_lock(cached):  # one process downloads, the others then find the file
        if os.path.isfile(cached):
            return
        staging = tempfile.mkdtemp(prefix=".downloading-", dir=folder)
        try:
            staged = download(url, staging, filename=os.path.basename(cached))
            problem = _mismatch(staged, url, expected_size)
            if problem:
                raise CheckpointVerificationError(
                    f"the download of {url} is not the published file ({problem}); it was "
                    f"discarded and nothing was written to {cached}. Try again."
                )
            os.replace(staged, cached)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def fetch_checkpoint(
    path: str, *, local_hint: str = DEFAULT_LOCAL_HINT, cache_dir: str | None = None
) -> str:
    """The local file of checkpoint `path` (a file, or a URL: cached, downloading it if needed).

    A query (``?matching_heuristics=True``, which Detectron2's checkpointer reads) is dropped.
    ``detectron2://`` goes through Detectron2's ``PathManager`` (which calls this function for the
    https URL).

    Raises:
        CheckpointUnavailableError: a URL that cannot be fetched and is not cached; `local_hint`
            ends the message (how to give a local file instead, e.g. ``--weights /path/to/file``).
        CheckpointVerificationError: the cached or downloaded file does not match
            `KNOWN_CHECKPOINTS` (or the server's Content-Length).
        FileNotFoundError, CorruptCheckpointError: a local path that is missing / truncated.
    """
    url = path.split("?")[0]
    if "://" in url and not url.startswith(URL_PREFIXES):
        return PathManager.get_local_path(url)  # detectron2://, manifold://, ... -> their handler
    if not url.startswith(URL_PREFIXES):
        if not os.path.isfile(url):
            raise FileNotFoundError(f"checkpoint file not found: {url}")
        check_checkpoint_file(url)
        return url
    cached = cache_path(url, cache_dir)
    if not os.path.isfile(cached):
        try:
            expected_size = _probe(url)
            _download_verified(url, cached, expected_size)
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, IncompleteRead
            if isinstance(e, CheckpointVerificationError):
                raise
            raise CheckpointUnavailableError(url, cached, _reason(e), local_hint) from None
        logger.info(f"downloaded {url} to {cached}")
    problem = _mismatch(cached, url, None)
    if problem:
        raise CheckpointVerificationError(
            f"the cached checkpoint {cached} is not the published {url} ({problem}); it is not "
            f"loaded. Delete it to download it again, or replace it with the right file."
        )
    check_checkpoint_file(cached)
    return cached


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    return f"{type(error).__name__}: {reason if reason is not None else error}"


class VerifiedHTTPURLHandler(HTTPURLHandler):
    """iopath's `HTTPURLHandler` whose downloads are verified (see the module docstring)."""

    def _get_local_path(
        self, path: str, force: bool = False, cache_dir: str | None = None, **kwargs: Any
    ) -> str:
        self._check_kwargs(kwargs)
        if force:  # iopath's meaning: download again
            with contextlib.suppress(FileNotFoundError):
                os.remove(cache_path(path, cache_dir))
        return fetch_checkpoint(path, cache_dir=cache_dir)


# Detectron2's PathManager is its own instance (not iopath's global one): overriding its http(s)
# and ftp handler changes how Detectron2 code in this process fetches URLs, and nothing else.
PathManager.register_handler(VerifiedHTTPURLHandler(), allow_override=True)


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
