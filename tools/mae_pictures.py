#!/usr/bin/env python
"""Pictures of MAE reconstructions from the shell, for any checkpoint of our MAE trainer or an
official MAE checkpoint::

    python tools/mae_pictures.py --config-file configs/mae/mae_hiera_b.py \
        --checkpoint output/mae_hiera_base/model_final.pth --input DIR --output pictures.png

Writes one PNG grid (`hiera_det.mae.pictures`): a row per image, the columns input / masked input /
reconstruction / reconstruction with the visible units pasted back. Trailing ``key=value``
arguments override the config (checked: an unknown key or a wrong type is an error).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import torch
from detectron2.config import instantiate
from detectron2.utils.logger import setup_logger

from hiera_det.checkpoint import HieraCheckpointer
from hiera_det.checkpoint_download import (
    CheckpointUnavailableError,
    CorruptCheckpointError,
    fetch_checkpoint,
)
from hiera_det.config_check import load_config
from hiera_det.mae.pictures import load_images, render_reconstructions, save_png

logger = logging.getLogger("hiera_det.mae_pictures")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="an MAE config, e.g. configs/mae/...")
    parser.add_argument("--checkpoint", required=True, help="our MAE checkpoint or an official one")
    parser.add_argument("--input", required=True, help="a folder of images (searched recursively)")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    """Write the picture for the arguments `argv` (default: the command line); return its path."""
    args = parse_args(argv)
    setup_logger(name="hiera_det")
    cfg = load_config(args.config_file, args.opts)
    # Before building anything: a URL that cannot be downloaded, a truncated file.
    fetch_checkpoint(args.checkpoint, local_hint="--checkpoint /path/to/file")
    model = instantiate(cfg.model).to(args.device)
    # strict: a checkpoint that leaves part of the MAE at initialisation would draw noise.
    HieraCheckpointer(model, strict=True).load(args.checkpoint)
    img_size = cfg.dataloader.train.get("img_size", 224) if "dataloader" in cfg else 224
    images = load_images(args.input, args.num_images, img_size)
    generator = torch.Generator().manual_seed(args.seed)
    visible = model.random_visible(len(images), model.unit_grid(images), generator)
    path = save_png(render_reconstructions(model, images, visible), args.output)
    logger.info(f"Wrote {path} ({len(images)} images, mask ratio {model.mask_ratio})")
    return path


if __name__ == "__main__":
    try:
        main()
    except (CheckpointUnavailableError, CorruptCheckpointError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(1)
