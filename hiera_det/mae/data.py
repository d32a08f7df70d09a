"""Unlabelled images from any folder, for MAE pretraining.

`list_images` finds every .jpg/.jpeg/.png/.webp file under a folder, recursively and in a fixed
order (ImageNet's ``train/<class>/<image>.JPEG`` layout works as is). `ImageFolder` reads them; an
image that cannot be read or decoded is *reported by path* and replaced by the next readable one in
the list, so an epoch never stops on a bad file. `build_mae_train_loader` is the Detectron2-style
training loader: an infinite stream sharded over processes (so `launch` works on many GPUs and
machines) that ``--resume`` continues exactly (`hiera_det.data.sampling`), batches of normalised
``[B, 3, S, S]`` tensors, and a running count of skipped files in the log.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence

import torch
from detectron2.data.build import worker_init_reset_seed
from detectron2.utils import comm
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from ..data.sampling import ResumableTrainingSampler, SeededMapDataset, preserved_rngs

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "MAETrainLoader",
    "build_mae_train_loader",
    "build_eval_transform",
    "build_mae_transform",
    "count_images",
    "list_images",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # matched case-insensitively
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_images(root: str) -> list[str]:
    """Every image file under `root` (recursive, symlinks followed), sorted by path.

    Raises:
        FileNotFoundError: `root` is not a folder, or holds no image file.
    """
    return list(_list_images_cached(os.path.abspath(os.path.expanduser(root)), root))


def count_images(root: str) -> int:
    """The number of images `list_images` finds (the listing is cached per process)."""
    return len(list_images(root))


@functools.lru_cache(maxsize=8)
def _list_images_cached(root: str, shown: str) -> tuple[str, ...]:
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"image folder '{shown}' does not exist: point the config at a folder of images "
            "(dataloader.train.root=... or the HIERA_DET_IMAGES environment variable)"
        )
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        paths += [
            os.path.join(dirpath, f)
            for f in filenames
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
    if not paths:
        raise FileNotFoundError(
            f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under '{shown}'"
        )
    return tuple(sorted(paths))


def build_mae_transform(
    img_size: int = 224, scale: Sequence[float] = (0.2, 1.0), hflip: bool = True
) -> Callable:
    """The MAE augmentation (Table 14a): random resized crop (bicubic) + horizontal flip."""
    steps = [
        T.RandomResizedCrop(img_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC)
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def build_eval_transform(img_size: int = 224) -> Callable:
    """Deterministic view of an image: short side resized to `img_size`, centre crop."""
    return T.Compose(
        [
            T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageFolder(torch.utils.data.Dataset):
    """Images under a folder; unreadable files are skipped and reported, never fatal.

    Args:
        root: folder searched recursively for .jpg/.jpeg/.png/.webp files.
        transform: applied to each RGB `PIL.Image`.
        max_consecutive_failures: give up (raise) when this many files in a row are unreadable:
            then the folder itself is broken, not a few files.

    ``dataset[i]`` is ``(image, skipped)``: the transformed image and, for every file that had to
    be skipped to find it, ``"path: error"``. When file ``i`` is unreadable the next files in the
    list are tried, so each index always yields an image.
    """

    def __init__(
        self, root: str, transform: Callable | None = None, max_consecutive_failures: int = 100
    ):
        self.root = root
        self.paths = list_images(root)
        self.transform = transform
        self.max_consecutive_failures = max_consecutive_failures

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, list[str]]:
        skipped = []
        for attempt in range(min(self.max_consecutive_failures, len(self.paths))):
            path = self.paths[(index + attempt) % len(self.paths)]
            try:
                with open(path, "rb") as f:
                    image = Image.open(f).convert("RGB")  # convert() decodes the whole file
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... by format
                skipped.append(f"{path}: {type(e).__name__}: {e}")
                continue
            return (self.transform(image) if self.transform else image), skipped
        raise RuntimeError(
            f"{len(skipped)} consecutive images under '{self.root}' are unreadable, e.g. "
            + "; ".join(skipped[:3])
        )


def _collate(samples: list[tuple[Tensor, list[str]]]) -> tuple[Tensor, list[str]]:
    return torch.stack([s[0] for s in samples]), [p for s in samples for p in s[1]]


class MAETrainLoader:
    """Infinite stream of ``[B, 3, S, S]`` normalised image batches for this process.

    Wraps a `torch.utils.data.DataLoader` over an `ImageFolder` with Detectron2's `TrainingSampler`.
    Files the dataset had to skip are logged here, in the main process, each with its path and the
    running count `num_skipped`.
    """

    def __init__(self, dataset: ImageFolder, batch_size: int, num_workers: int, seed=None):
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_skipped = 0
        # Resumable: batch i and its augmentations are a function of (seed, i) and the same for
        # any number of processes and workers (hiera_det.data.sampling).
        total_batch_size = batch_size * comm.get_world_size()
        self.sampler = ResumableTrainingSampler(len(dataset), total_batch_size, seed)
        self.loader = torch.utils.data.DataLoader(
            SeededMapDataset(dataset),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            worker_init_fn=worker_init_reset_seed,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
            persistent_workers=num_workers > 0,
        )

    def set_position(self, seed: int, start_iter: int) -> None:
        """Produce the batches of iterations ``start_iter, ...`` of `seed`'s stream (`--resume`)."""
        self.sampler.set_position(seed, start_iter)

    def __iter__(self):
        # Creating the iterator draws from torch's RNG (see hiera_det.data.sampling).
        with preserved_rngs():
            batches = iter(self.loader)
        for images, skipped in batches:
            for what in skipped:
                self.num_skipped += 1
                logger.warning(
                    f"Skipped unreadable image {what} "
                    f"({self.num_skipped} skipped so far by this process)"
                )
            yield images


def build_mae_train_loader(
    root: str,
    total_batch_size: int,
    img_size: int = 224,
    scale: Sequence[float] = (0.2, 1.0),
    hflip: bool = True,
    num_workers: int = 8,
    seed: int | None = None,
) -> MAETrainLoader:
    """The MAE training loader over every image under `root`.

    Args:
        root: image folder (recursive; ImageNet's train folder works).
        total_batch_size: images per step over all processes; split evenly among them.
        img_size, scale, hflip: the augmentation (`build_mae_transform`).
        num_workers: loader processes per training process.
        seed: sampler seed shared by all processes (None: drawn once and shared).
    """
    world = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world:
        raise ValueError(
            f"total_batch_size={total_batch_size} must be a positive multiple of the number of "
            f"processes ({world})"
        )
    dataset = ImageFolder(root, build_mae_transform(img_size, scale, hflip))
    logger.info(
        f"MAE data: {len(dataset)} images under '{root}', {total_batch_size // world} per process"
        f" x {world} processes, {img_size}px crops (scale {tuple(scale)}), hflip={hflip}"
    )
    return MAETrainLoader(dataset, total_batch_size // world, num_workers, seed)
