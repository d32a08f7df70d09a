"""Pictures of MAE reconstructions: a PNG grid of input / masked input / reconstruction.

Drawn while training by `hiera_det.mae.hooks.MAEPicturesHook`, and from the shell for any
checkpoint by ``tools/mae_pictures.py``. Each row is one image (short side resized, centre crop);
the columns are the input, the input with its masked units greyed out, the reconstruction of the
whole image, and the reconstruction with the visible units pasted back. With ``norm_pix_loss``
the model predicts each patch normalised by its own mean and variance; the picture undoes that
with the true patch's statistics (as MAE's figures do), so it shows structure, not the model's
guess of a patch's mean colour.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageDraw
from torch import Tensor

from .data import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, build_eval_transform
from .model import MaskedAutoencoderHiera

__all__ = ["load_images", "render_reconstructions", "save_png"]

COLUMNS = ("input", "masked", "prediction", "pred. + visible")
GAP, HEADER = 4, 16  # pixels between tiles / above the first row


def load_images(root: str, num_images: int, img_size: int = 224) -> Tensor:
    """`num_images` images spread evenly over the folder's listing: ``[N, 3, S, S]`` normalised.

    An unreadable file is skipped with a warning naming it, as in training, and the next file of
    the listing is taken instead.
    """
    dataset = ImageFolder(root, build_eval_transform(img_size))
    step = max(1, len(dataset) // num_images)
    starts = range(0, step * min(num_images, len(dataset)), step)
    return torch.stack([_first_readable(dataset, start) for start in starts])


def _first_readable(dataset: ImageFolder, start: int) -> Tensor:
    """The first image of `dataset` that reads, from index `start` on (wrapping around)."""
    for offset in range(len(dataset)):
        image = dataset[(start + offset) % len(dataset)]
        if image is not None:
            return image
    raise RuntimeError(f"none of the {len(dataset)} images under '{dataset.root}' can be read")


@torch.no_grad()
def render_reconstructions(
    model: MaskedAutoencoderHiera, images: Tensor, visible: Tensor | None = None
) -> np.ndarray:
    """Run `model` on normalised `images` ``[N, 3, H, W]`` and draw the grid: ``[h, w, 3]`` uint8.

    `visible` (``[N, units]`` bool, True = visible) is drawn at random when not given.
    """
    was_training = model.training
    model.eval()
    try:
        _, pred, visible = model.reconstruct(images, visible)
    finally:
        model.train(was_training)
    images = images.to(pred.device).float()
    pred = pred.float()
    if model.norm_pix_loss:  # back to pixels with each true patch's mean and variance
        target = model.patchify(images)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    size = tuple(images.shape[-2:])
    recon = model.unpatchify(pred, size)
    grid = model.unit_grid(images)
    unit = size[0] // grid[0]
    keep = visible.view(-1, 1, *grid).float()
    keep = keep.repeat_interleave(unit, dim=2).repeat_interleave(unit, dim=3)  # [N, 1, H, W]
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)

    def to_pixels(x: Tensor) -> Tensor:  # normalised -> [N, H, W, 3] in [0, 1]
        return (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1)

    original, recon = to_pixels(images), to_pixels(recon)
    keep = keep.permute(0, 2, 3, 1)
    masked = original * keep + 0.5 * (1 - keep) * (0.6 + 0.4 * original)  # greyed, still faint
    pasted = original * keep + recon * (1 - keep)
    tiles = torch.stack([original, masked, recon, pasted], dim=1)  # [N, 4, H, W, 3]
    return _layout((tiles * 255).round().byte().cpu().numpy())


def _layout(tiles: np.ndarray) -> np.ndarray:
    """``[rows, cols, H, W, 3]`` tiles -> one white-backed picture with column titles."""
    rows, cols, h, w, _ = tiles.shape
    canvas = np.full((HEADER + rows * (h + GAP), cols * (w + GAP) + GAP, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = HEADER + r * (h + GAP), GAP + c * (w + GAP)
            canvas[y : y + h, x : x + w] = tiles[r, c]
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for c, title in enumerate(COLUMNS[:cols]):
        draw.text((GAP + c * (w + GAP), 2), title, fill=(0, 0, 0))
    return np.asarray(picture)


def save_png(picture: np.ndarray, path: str) -> str:
    """Write an ``[h, w, 3]`` uint8 picture as PNG (folders created); returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with PathManager.open(path, "wb") as f:
        Image.fromarray(picture).save(f, format="PNG")
    return path
