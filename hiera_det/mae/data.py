"""Unlabelled images from any folder, for MAE pretraining.

`ImageFolder` holds every image under a folder (`hiera_det.data.images.list_images`: recursive, in
a fixed order; ImageNet's ``train/<class>/<image>.JPEG`` layout works as is), read as detection
reads them (`read_image_any`: any mode, 16-bit scaled, EXIF orientation applied). An image that
cannot be read is skipped as detection skips one (`BadImageSkipper`: a warning naming the file
with a running count, another image drawn from the sample's seed), so an epoch never stops on a
bad file. `build_mae_train_loader` is the training loader: detection's resumable loader
(`hiera_det.data.sampling`) over the folder, an infinite stream sharded over processes (so
`launch` works on many GPUs and machines) that ``--resume`` continues exactly, in batches of
normalised ``[B, 3, S, S]`` tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from detectron2.utils import comm
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate
from torchvision import transforms as T

from ..data.images import BadImageSkipper, list_images, read_image_any
from ..data.sampling import ResumableDataLoader, build_resumable_train_loader

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolder",
    "build_eval_transform",
    "build_mae_train_loader",
    "build_mae_transform",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _read_pil(path: str) -> Image.Image:
    # torchvision's transforms (bicubic resize on PIL) take PIL images.
    return Image.fromarray(read_image_any(path, "RGB"))


class ImageFolder(torch.utils.data.Dataset):
    """The images under a folder, each an RGB `PIL.Image` through `transform`.

    Args:
        root: folder searched recursively for images (`hiera_det.data.images.IMAGE_EXTENSIONS`).
        transform: applied to each RGB `PIL.Image` (None: the image itself).
        max_consecutive_failures: give up (raise) when this many files in a row are unreadable:
            then the folder itself is broken, not a few files.

    ``dataset[i]`` is None when file ``i`` cannot be read (`BadImageSkipper` logs it, naming the
    file): `hiera_det.data.sampling.SeededMapDataset` then draws another index from the sample's
    seed, as for detection.
    """

    def __init__(
        self, root: str, transform: Callable | None = None, max_consecutive_failures: int = 100
    ):
        self.root = root
        self.paths = list_images(root)
        self.transform = transform
        self.skipper = BadImageSkipper(max_consecutive_failures)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor | Image.Image | None:
        image = self.skipper.read(self.paths[index], _read_pil)
        if image is None or self.transform is None:
            return image
        return self.transform(image)


def build_mae_train_loader(
    root: str,
    total_batch_size: int,
    img_size: int = 224,
    scale: Sequence[float] = (0.2, 1.0),
    hflip: bool = True,
    num_workers: int = 8,
    seed: int | None = None,
) -> ResumableDataLoader:
    """The MAE training loader over every image under `root`: batches of ``[B, 3, S, S]``
    normalised tensors, B = `total_batch_size` / processes.

    Args:
        root: image folder (recursive; ImageNet's train folder works).
        total_batch_size: images per step over all processes; split evenly among them.
        img_size, scale, hflip: the augmentation (`build_mae_transform`).
        num_workers: loader processes per training process.
        seed: sampler seed shared by all processes (None: drawn once and shared).
    """
    dataset = ImageFolder(root, build_mae_transform(img_size, scale, hflip))
    # Resumable: batch i and its augmentations are a function of (seed, i) and the same for any
    # number of processes and workers (hiera_det.data.sampling).
    loader = build_resumable_train_loader(
        dataset,
        mapper=None,
        total_batch_size=total_batch_size,
        aspect_ratio_grouping=False,  # every crop is square
        num_workers=num_workers,
        seed=seed,
        collate_fn=default_collate,  # [B, 3, S, S]
        pin_memory=torch.cuda.is_available(),
    )
    world = comm.get_world_size()
    logger.info(
        f"MAE data: {len(dataset)} images under '{root}', {total_batch_size // world} per process"
        f" x {world} processes, {img_size}px crops (scale {tuple(scale)}), hflip={hflip}"
    )
    return loader
