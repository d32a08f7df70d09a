"""Hiera (Ryali et al. 2023) as a Detectron2 backbone.

Hiera is a plain pre-norm ViT whose first block of stages 2-4 doubles the width and 2x2 max-pools
the queries and the skip connection. Stages 1-2 attend only inside *mask units* (32x32 px squares);
stages 3-4 attend globally. With default arguments this module computes exactly what the official
`hiera-transformer` model computes (same parameter names, same numbers), but it

* works for any input whose height and width are multiples of 32 (the token order is derived from
  the input at run time, not fixed at construction);
* returns Detectron2 NCHW feature maps `res2..res5` (strides 4/8/16/32) and owns no parameter that
  forward does not use (no `norm`/`head`), so it is safe under DDP;
* offers what detection at 1024 px needs, all off by default: windowed attention for later stages
  with chosen global blocks (ViTDet/SAM2 style), per-stage output LayerNorms, an "abs_win" position
  embedding, activation checkpointing, and `scaled_dot_product_attention`;
* also computes SAM 2's image-encoder trunk ("HieraDet") and timm's ``hiera_*_abswin_*`` models
  (LayerScale, a stage transition without ``proj``): `SAM2_HIERA_SIZES`,
  `TIMM_ABSWIN_HIERA_SIZES`, and `build_hiera(size, layout=...)` to build one by name.

Token layout. Tokens are kept as ``[B, U, T, C]``: ``U`` mask units in row-major order over the
unit grid, ``T`` tokens per unit in *unrolled* order. Unrolling (the official trick) orders the
tokens of a unit so that the offsets of the first 2x2 pooling come first, then those of the second,
and so on. A 2x2 max-pool is then a max over a leading axis (`pool_units`), mask unit attention is
attention over ``T`` and global attention is attention over ``U*T``, all without copies. Sparse MAE
pretraining simply keeps a subset of units. `unroll` / `reroll` convert from / to spatial order.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from detectron2.modeling import Backbone
from timm.layers import (
    DropPath,
    LayerScale,
    Mlp,
    resample_abs_pos_embed,
    resample_abs_pos_embed_nhwc,
)
from torch import Tensor, nn

__all__ = [
    "HIERA_LAYOUTS",
    "HIERA_SIZES",
    "SAM2_HIERA_SIZES",
    "TIMM_ABSWIN_HIERA_SIZES",
    "Hiera",
    "HieraBlock",
    "MaskUnitAttention",
    "build_hiera",
    "reroll",
    "resize_pos_embed",
    "spread_global_blocks",
    "unroll",
]

# The six image models of the paper (Table 2); every other argument takes its default.
HIERA_SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2)),
    "small": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2)),
    "base": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3)),
    "base_plus": dict(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3)),
    "large": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4)),
    "huge": dict(embed_dim=256, num_heads=4, stages=(2, 6, 36, 4)),
}

# SAM 2's image-encoder trunks (`sam2/modeling/backbones/hieradet.py`; timm's `sam2_hiera_*`):
# the paper's widths and depths, windowed attention in every stage (SAM 2's windows of 8, 4, 14, 7
# tokens are 1, 1, 7, 7 mask units; L: 8, 4, 16, 8 tokens = 1, 1, 8, 8 units), a few global
# blocks, and SAM 2's position embedding (a small background table resized without antialias plus
# an 8x8 window table tiled). The names are those of Meta's checkpoint files.
SAM2_HIERA_SIZES: dict[str, dict] = {
    "tiny": dict(
        **HIERA_SIZES["tiny"], stage_windows=(1, 1, 7, 7), global_blocks=(5, 7, 9),
        pos_embed_type="sam2", pos_embed_global_size=(7, 7),
    ),
    "small": dict(
        **HIERA_SIZES["small"], stage_windows=(1, 1, 7, 7), global_blocks=(7, 10, 13),
        pos_embed_type="sam2", pos_embed_global_size=(7, 7),
    ),
    "base_plus": dict(
        **HIERA_SIZES["base_plus"], stage_windows=(1, 1, 7, 7), global_blocks=(12, 16, 20),
        pos_embed_type="sam2", pos_embed_global_size=(14, 14),
    ),
    "large": dict(
        **HIERA_SIZES["large"], stage_windows=(1, 1, 8, 8), global_blocks=(23, 33, 43),
        pos_embed_type="sam2", pos_embed_global_size=(7, 7),
    ),
}  # fmt: skip

# timm's `hiera_small_abswin_256` / `hiera_base_abswin_256` ("Window Attention is Bugged"): the
# paper's attention layout with an "abs_win" position embedding, LayerScale (1e-5 at init) and, for
# S, a stage transition whose skip concatenates max- and average-pooled tokens instead of `proj`.
TIMM_ABSWIN_HIERA_SIZES: dict[str, dict] = {
    "small": dict(
        **HIERA_SIZES["small"], pos_embed_type="abs_win", pos_embed_global_size=(16, 16),
        layer_scale_init=1e-5, transition_proj=False,
    ),
    "base": dict(
        **HIERA_SIZES["base"], pos_embed_type="abs_win", pos_embed_global_size=(14, 14),
        layer_scale_init=1e-5,
    ),
}  # fmt: skip

# `build_hiera`'s `layout` -> its table of named sizes.
HIERA_LAYOUTS: dict[str, dict[str, dict]] = {
    "official": HIERA_SIZES,
    "sam2": SAM2_HIERA_SIZES,
    "timm_abswin": TIMM_ABSWIN_HIERA_SIZES,
}


def spread_global_blocks(stages: Sequence[int], num: int) -> list[int]:
    """Block indices of `num` global blocks spread over stage 3: the last block of each of `num`
    equal parts of the stage (ViTDet's rule for ViT, applied to the stage that holds most of the
    depth; e.g. base (2, 3, 16, 3) and 4 -> [8, 12, 16, 20])."""
    first, length = sum(stages[:2]), stages[2]
    if not 0 <= num <= length:
        raise ValueError(f"cannot spread {num} global blocks over a stage 3 of {length} blocks")
    return [first + round(length * (k + 1) / num) - 1 for k in range(num)]


def build_hiera(size: str, num_global_blocks: int = 0, layout: str = "official", **kwargs) -> Hiera:
    """Build a Hiera of a named size of a named layout; `kwargs` override anything.

    `layout` picks the table of sizes (`HIERA_LAYOUTS`): "official" (`HIERA_SIZES`, the paper's
    models), "sam2" (`SAM2_HIERA_SIZES`, SAM 2's trunks, e.g. ``build_hiera("large",
    layout="sam2")``) or "timm_abswin" (`TIMM_ABSWIN_HIERA_SIZES`).
    `num_global_blocks` global blocks are spread over stage 3 of the model being built
    (`spread_global_blocks`), unless `global_blocks` names them. They are derived here, when the
    size is known, so that overriding the size (or the stages) moves them with it.
    """
    if layout not in HIERA_LAYOUTS:
        raise KeyError(f"unknown Hiera layout {layout!r}; choose one of {sorted(HIERA_LAYOUTS)}")
    sizes = HIERA_LAYOUTS[layout]
    if size not in sizes:
        raise KeyError(
            f"unknown Hiera size {size!r} for layout {layout!r}; choose one of {sorted(sizes)}"
        )
    args = {**sizes[size], **kwargs}
    if num_global_blocks and "global_blocks" not in kwargs:
        args["global_blocks"] = spread_global_blocks(args["stages"], num_global_blocks)
    return Hiera(**args)


# ----------------------------------------------------------------------------------------------
# Token layout helpers
# ----------------------------------------------------------------------------------------------


def unroll(x: Tensor, levels: int, stride: tuple[int, int]) -> Tensor:
    """Spatial ``[B, H, W, C]`` -> unit layout ``[B, U, T, C]``.

    A mask unit is ``stride**levels`` tokens a side. Inside a unit, the local row is
    ``y = sum_l sy_l * Sy**(l-1)`` (level 1 = the first pooling, least significant); we order the
    unit's tokens as ``(sy_1, sx_1, sy_2, sx_2, ..., sy_L, sx_L)`` so that level 1 is outermost.
    """
    B, H, W, C = x.shape
    sy, sx = stride
    my, mx = sy**levels, sx**levels
    uh, uw = H // my, W // mx
    # [B, uh, sy_L..sy_1, uw, sx_L..sx_1, C]
    x = x.view(B, uh, *([sy] * levels), uw, *([sx] * levels), C)
    L = levels
    perm = [0, 1, L + 2]
    for lvl in range(1, L + 1):
        perm += [2 + L - lvl, L + 3 + L - lvl]
    perm.append(2 * L + 3)
    return x.permute(perm).reshape(B, uh * uw, my * mx, C)


def reroll(x: Tensor, grid: tuple[int, int], levels: int, stride: tuple[int, int]) -> Tensor:
    """Unit layout ``[B, U, T, C]`` with ``levels`` unconsumed unroll levels -> ``[B, H, W, C]``."""
    B, U, T, C = x.shape
    uh, uw = grid
    sy, sx = stride
    k = levels
    # [B, uh, uw, (sy, sx) per remaining level, outermost level first, C]
    x = x.view(B, uh, uw, *([sy, sx] * k), C)
    perm = [0, 1, *[3 + 2 * j for j in reversed(range(k))], 2]
    perm += [4 + 2 * j for j in reversed(range(k))] + [3 + 2 * k]
    return x.permute(perm).reshape(B, uh * sy**k, uw * sx**k, C)


def pool_units(x: Tensor, stride: int) -> Tensor:
    """Max-pool every unit by the flattened stride: ``[B, U, T, C]`` -> ``[B, U, T/stride, C]``."""
    if stride == 1:
        return x
    B, U, T, C = x.shape
    return x.view(B, U, stride, T // stride, C).amax(dim=2)


def resize_pos_embed(table: Tensor, size: tuple[int, int], *, antialias: bool = False) -> Tensor:
    """Resize a position table to a new grid (bicubic, in fp32), keeping its layout.

    Accepts the official layout ``[1, h*w, C]`` (square grid) and timm's ``[1, C, h, w]``
    ("abs_win"); timm's `resample_abs_pos_embed` / `resample_abs_pos_embed_nhwc` do the work.
    `antialias` changes the bicubic kernel even when upsampling: the official ``[1, N, C]`` table
    is resized without it (as ViTDet does), timm's "abs_win" table with it (as timm does), and
    SAM 2's table without it (as SAM 2 does: `Hiera`'s ``pos_embed_type="sam2"``).
    """
    if table.dim() == 3:
        n = table.shape[1]
        if math.isqrt(n) ** 2 != n:
            raise ValueError(f"position table with {n} entries is not a square grid")
        return resample_abs_pos_embed(table, list(size), num_prefix_tokens=0, antialias=antialias)
    if tuple(table.shape[-2:]) == tuple(size):
        return table
    nhwc = resample_abs_pos_embed_nhwc(table.permute(0, 2, 3, 1), list(size), antialias=antialias)
    return nhwc.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class MaskUnitAttention(nn.Module):
    """Multi-head attention over groups of mask units, with optional query pooling.

    Args:
        dim, dim_out: input and output widths.
        heads: number of heads.
        q_stride: flattened query pooling stride (4 for 2x2), 1 for none.
        window: which tokens attend to each other, counted in mask units: 1 = each mask unit alone
            (mask unit attention), k > 1 = k x k units (windowed, zero-padded at the border),
            0 = all tokens of the image (global).
        use_sdpa: compute attention with `F.scaled_dot_product_attention`.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        heads: int,
        q_stride: int = 1,
        window: int = 0,
        use_sdpa: bool = False,
    ):
        super().__init__()
        if dim_out % heads:
            raise ValueError(f"width {dim_out} is not divisible by {heads} heads")
        self.heads, self.head_dim, self.dim_out = heads, dim_out // heads, dim_out
        self.q_stride, self.window, self.use_sdpa = q_stride, window, use_sdpa
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: Tensor, grid: tuple[int, int] | None) -> Tensor:
        """``[B, U, T, C]`` -> ``[B, U, T / q_stride, dim_out]``; `grid` is the unit grid."""
        B, U, T, C = x.shape
        if self.window == 1:  # each unit is a sequence: [B*U, T, C]
            seqs, units = x.reshape(B * U, T, C), 1
        elif self.window == 0:  # the whole image is a sequence: [B, U*T, C]
            seqs, units = x.reshape(B, U * T, C), U
        else:
            seqs, units, pad = self._partition(x, grid)

        n, length, _ = seqs.shape
        qkv = self.qkv(seqs).reshape(n, length, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [n, heads, length, head_dim]
        if self.q_stride > 1:  # tokens of a sequence are (unit, T): pool within each unit
            q = q.reshape(n, self.heads, units, self.q_stride, -1, self.head_dim).amax(dim=3)
            q = q.reshape(n, self.heads, -1, self.head_dim)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = attn @ v
        out = self.proj(out.transpose(1, 2).reshape(n, -1, self.dim_out))

        T_out = T // self.q_stride
        if self.window in (0, 1):
            return out.reshape(B, U, T_out, self.dim_out)
        return self._unpartition(out, B, grid, pad, T_out)

    def _partition(self, x: Tensor, grid: tuple[int, int] | None):
        if grid is None:
            raise ValueError("windowed attention needs the full unit grid (not sparse inputs)")
        B, U, T, C = x.shape
        w = self.window
        uh, uw = grid
        ph, pw = (w - uh % w) % w, (w - uw % w) % w
        x = x.view(B, uh, uw, T, C)
        if ph or pw:  # zero-pad the unit grid to whole windows, as ViTDet/SAM2 do
            x = F.pad(x, (0, 0, 0, 0, 0, pw, 0, ph))
        nh, nw = (uh + ph) // w, (uw + pw) // w
        # [B, nh, w, nw, w, T, C] -> [B*nh*nw, w*w*T, C]
        x = x.view(B, nh, w, nw, w, T, C).permute(0, 1, 3, 2, 4, 5, 6)
        return x.reshape(B * nh * nw, w * w * T, C), w * w, (ph, pw)

    def _unpartition(self, out: Tensor, B: int, grid, pad, T: int) -> Tensor:
        w = self.window
        uh, uw = grid
        nh, nw = (uh + pad[0]) // w, (uw + pad[1]) // w
        out = out.view(B, nh, nw, w, w, T, self.dim_out).permute(0, 1, 3, 2, 4, 5, 6)
        out = out.reshape(B, nh * w, nw * w, T, self.dim_out)[:, :uh, :uw]
        return out.reshape(B, uh * uw, T, self.dim_out)


class HieraBlock(nn.Module):
    """Pre-norm transformer block; a stage's first block also widens and pools (Q and skip)."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        q_stride: int = 1,
        window: int = 0,
        use_sdpa: bool = False,
        layer_scale_init: float | None = None,
        transition_proj: bool = True,
    ):
        super().__init__()
        self.dim, self.dim_out, self.q_stride = dim, dim_out, q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MaskUnitAttention(dim, dim_out, heads, q_stride, window, use_sdpa)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))  # timm's: fc1, GELU, fc2
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # LayerScale (timm's names ls1/ls2) scales each branch before it joins the residual.
        scaled = layer_scale_init is not None
        self.ls1 = LayerScale(dim_out, layer_scale_init) if scaled else nn.Identity()
        self.ls2 = LayerScale(dim_out, layer_scale_init) if scaled else nn.Identity()
        self.proj = None
        if dim != dim_out and transition_proj:
            self.proj = nn.Linear(dim, dim_out)  # skip projection, from the *normed* input
        elif dim != dim_out and dim_out != 2 * dim:
            raise ValueError(
                f"a transition without proj concatenates two pooled copies: width {dim} -> "
                f"{dim_out} must double"
            )

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        x_norm = self.norm1(x)
        if self.proj is not None:
            x = pool_units(self.proj(x_norm), self.q_stride)
        elif self.dim != self.dim_out:  # timm abswin: [max-pool, avg-pool] of the un-normed input
            B, U, T, C = x.shape
            windows = x.view(B, U, self.q_stride, T // self.q_stride, C)
            x = torch.cat([windows.amax(dim=2), windows.mean(dim=2)], dim=-1)
        else:
            x = pool_units(x, self.q_stride)
        x = x + self.drop_path(self.ls1(self.attn(x_norm, grid)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def compile_options(compile: bool | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """`Hiera`'s `compile` argument as `nn.Module.compile` keyword arguments (None: stay eager)."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if not isinstance(compile, Mapping):
        raise ValueError(
            f"compile={compile!r} must be True, False or a dict of torch.compile arguments"
        )
    known = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(set(compile) - known)
    if unknown:
        raise ValueError(
            f"compile={dict(compile)!r}: unknown torch.compile argument(s) {unknown}; "
            f"known: {sorted(known)}"
        )
    # plain dicts all the way down: a LazyConfig hands over omegaconf containers
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in compile.items()}


def _checked_stage_windows(
    stages: tuple[int, ...],
    q_pool: int,
    q_stride: tuple[int, ...],
    mask_unit_size: Sequence[int],
    mask_unit_attn: Sequence[bool],
    patch_stride: Sequence[int],
    stage_windows: Sequence[int] | None,
) -> tuple[int, ...]:
    """Check `Hiera`'s shape arguments; return the attention window of every stage."""
    levels = len(stages) - 1
    if not 0 <= q_pool <= levels:
        raise ValueError(f"q_pool={q_pool} must be in [0, {levels}]")
    if tuple(mask_unit_size) != tuple(s**levels for s in q_stride):
        raise ValueError(
            f"mask_unit_size={tuple(mask_unit_size)} must be q_stride**{levels} = "
            f"{tuple(s**levels for s in q_stride)}"
        )
    if len(set(patch_stride)) != 1 or len(set(q_stride)) != 1:
        raise ValueError("patch_stride and q_stride must be square for detection outputs")
    if stage_windows is None:
        stage_windows = tuple(1 if m else 0 for m in mask_unit_attn)
    if len(stage_windows) != len(stages):
        raise ValueError(f"stage_windows={stage_windows} needs one entry per stage")
    return tuple(stage_windows)


def _check_outputs(stages: tuple[int, ...], out_features: Sequence[str], pos_embed_type: str):
    valid = [f"res{i + 2}" for i in range(len(stages))]
    if not out_features or any(f not in valid for f in out_features):
        raise ValueError(f"out_features={tuple(out_features)} must be a subset of {valid}")
    if pos_embed_type not in ("abs", "abs_win", "sam2"):
        raise ValueError(f"pos_embed_type={pos_embed_type!r} must be 'abs', 'abs_win' or 'sam2'")


def _output_norms(channels: Mapping[str, int]) -> nn.ModuleDict:
    """One LayerNorm per output stage (`Hiera`'s ``out_norm``)."""
    return nn.ModuleDict({name: nn.LayerNorm(c, eps=1e-6) for name, c in channels.items()})


class Hiera(Backbone):
    """Hiera image encoder as a Detectron2 backbone.

    Args:
        embed_dim, num_heads: width and heads of stage 1 (both multiplied at each stage).
        stages: blocks per stage.
        q_pool: number of stage transitions that pool (3 for detection; 2 for MAE pretraining).
        q_stride: pooling stride per spatial dim.
        mask_unit_size: mask unit side in tokens; must equal ``q_stride ** (len(stages) - 1)``.
        mask_unit_attn: per stage, mask unit attention (True) or global attention (False).
        dim_mul, head_mul: width and head multipliers at each stage transition.
        patch_kernel, patch_stride, patch_padding: the patch-embedding convolution.
        mlp_ratio: MLP hidden width / width.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        in_chans: input channels.
        pretrain_img_size: image size the stored position table is for (224: a 56x56 table).
        out_features: which of "res2".."res5" forward returns; later stages are not built.
        stage_windows: per stage, the attention window counted in mask units (1 = mask unit
            attention, k = k x k units, 0 = global); overrides `mask_unit_attn` when given.
            As in the official model, a stage's first block uses the previous stage's window.
        global_blocks: block indices that attend globally whatever their stage says.
        pos_embed_type: "abs" (one table, resized to the input at run time), "abs_win" (a small
            global table interpolated with antialias plus a mask-unit table tiled; timm's Hiera)
            or "sam2" (the same two tables, the global one interpolated *without* antialias, as
            SAM 2's trunk does).
        pos_embed_global_size: grid of the global table for "abs_win" and "sam2".
        layer_scale_init: LayerScale on both branches of every block, initialised to this value
            (timm's ``init_values``); None: no LayerScale.
        transition_proj: a stage transition projects its skip with ``proj`` (the paper's Hiera);
            False: the skip concatenates the max- and the average-pooled un-normed tokens (timm's
            ``use_expand_proj=False``; the width must double).
        out_norm: add a LayerNorm on each returned stage.
        use_act_checkpoint: recompute each block in backward (saves memory in training).
        use_sdpa: use `F.scaled_dot_product_attention`.
        compile: compile every block with `nn.Module.compile` (PyTorch's regional compilation:
            the blocks of a stage share one compiled graph). Opt-in; eager is the default and the
            reference. True for torch.compile's defaults, or a dict of its keyword arguments, e.g.
            ``{"mode": "max-autotune"}``. The stem and the output maps stay eager; compilation
            happens at the first call (a minute or more on a CPU: docs/benchmarks.md) and again
            for a new input shape. Deepcopies and pickles are eager.

    The public view of the encoder's geometry, for wrappers such as the MAE (besides Detectron2's
    `output_shape()`, `forward_units`, `unroll_levels_left` and `unit_grid`):

    Attributes:
        levels: unroll levels, one per stage transition (``len(stages) - 1``).
        q_stride, mask_unit_size: as given, as tuples.
        patch_stride: pixels per token side of the patch embedding (4).
        unit_px: pixels per mask unit side (``patch_stride * mask_unit_size``, 32); inputs must be
            multiples of it.
        in_chans: input channels.
        pretrain_grid: the token grid ``(h, w)`` of `pretrain_img_size` (56x56 at 224 px).
        pos_embed_type: "abs", "abs_win" or "sam2".
        compile_kwargs: the `nn.Module.compile` arguments every block was compiled with, or None.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        num_heads: int = 1,
        stages: Sequence[int] = (2, 3, 16, 3),
        q_pool: int = 3,
        q_stride: Sequence[int] = (2, 2),
        mask_unit_size: Sequence[int] = (8, 8),
        mask_unit_attn: Sequence[bool] = (True, True, False, False),
        dim_mul: float = 2.0,
        head_mul: float = 2.0,
        patch_kernel: Sequence[int] = (7, 7),
        patch_stride: Sequence[int] = (4, 4),
        patch_padding: Sequence[int] = (3, 3),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        pretrain_img_size: int = 224,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        stage_windows: Sequence[int] | None = None,
        global_blocks: Sequence[int] = (),
        pos_embed_type: str = "abs",
        pos_embed_global_size: Sequence[int] = (14, 14),
        layer_scale_init: float | None = None,
        transition_proj: bool = True,
        out_norm: bool = False,
        use_act_checkpoint: bool = False,
        use_sdpa: bool = False,
        compile: bool | Mapping[str, Any] = False,
    ):
        super().__init__()
        windows = _checked_stage_windows(
            stages, q_pool, q_stride, mask_unit_size, mask_unit_attn, patch_stride, stage_windows
        )
        _check_outputs(stages, out_features, pos_embed_type)
        self.compile_kwargs = compile_options(compile)  # checked before anything is built
        self._set_geometry(stages, q_stride, mask_unit_size, patch_stride, pretrain_img_size)
        self.in_chans, self.pos_embed_type = in_chans, pos_embed_type
        self.use_act_checkpoint = use_act_checkpoint
        self._build_stem(patch_kernel, patch_padding, embed_dim, pos_embed_global_size)
        self._build_blocks(
            stages,
            q_pool,
            list(out_features),
            windows,
            global_blocks,
            embed_dim=embed_dim,
            num_heads=num_heads,
            dim_mul=dim_mul,
            head_mul=head_mul,
            drop_path_rate=drop_path_rate,
            mlp_ratio=mlp_ratio,
            use_sdpa=use_sdpa,
            layer_scale_init=layer_scale_init,
            transition_proj=transition_proj,
        )
        self.out_norms = _output_norms(self._out_feature_channels) if out_norm else None
        self._init_weights()
        for block in self.blocks if self.compile_kwargs is not None else ():
            block.compile(**self.compile_kwargs)  # regional compilation: one graph per block kind

    def _set_geometry(
        self,
        stages: Sequence[int],
        q_stride: Sequence[int],
        mask_unit_size: Sequence[int],
        patch_stride: Sequence[int],
        pretrain_img_size: int,
    ) -> None:
        """The public geometry attributes (see the class docstring)."""
        self.levels = len(stages) - 1  # unroll levels: one per possible stage transition
        self.q_stride, self.mask_unit_size = tuple(q_stride), tuple(mask_unit_size)
        self.patch_stride = patch_stride[0]
        self.unit_px = patch_stride[0] * mask_unit_size[0]  # 32: the input must tile into units
        self.pretrain_grid = tuple(pretrain_img_size // s for s in patch_stride)

    def _build_stem(
        self,
        kernel: Sequence[int],
        padding: Sequence[int],
        embed_dim: int,
        global_size: Sequence[int],
    ) -> None:
        """The patch embedding and the position table(s)."""
        self.patch_embed = nn.Module()
        stride = (self.patch_stride, self.patch_stride)
        self.patch_embed.proj = nn.Conv2d(self.in_chans, embed_dim, kernel, stride, padding)
        if self.pos_embed_type == "abs":  # official layout [1, h*w, C]
            self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.pretrain_grid), embed_dim))
        else:  # timm's and SAM 2's layout [1, C, h, w]
            self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *global_size))
            self.pos_embed_win = nn.Parameter(torch.zeros(1, embed_dim, *self.mask_unit_size))

    def _build_blocks(
        self,
        stages: tuple[int, ...],
        q_pool: int,
        out_features: list[str],
        stage_windows: Sequence[int],
        global_blocks: Sequence[int],
        *,
        embed_dim: int,
        num_heads: int,
        dim_mul: float,
        head_mul: float,
        drop_path_rate: float,
        **block_options,
    ) -> None:
        """Build `self.blocks` up to the last stage in `out_features`, and record per output its
        channels, stride and tap (the block it is read after, and its unroll levels left).
        `block_options` (``mlp_ratio``, ``use_sdpa``, ...) go to every `HieraBlock`."""
        self._out_features, stages = out_features, tuple(stages)
        stage_ends = [sum(stages[: i + 1]) - 1 for i in range(len(stages))]
        pool_blocks = {end + 1 for end in stage_ends[:q_pool]}
        last_stage = max(int(f[3:]) - 2 for f in self._out_features)
        depth, built = sum(stages), stage_ends[last_stage] + 1
        if any(not 0 <= b < built for b in global_blocks):
            raise ValueError(
                f"global_blocks={tuple(global_blocks)} must index the {built} blocks this Hiera "
                f"builds (stages={stages}, out_features={tuple(self._out_features)})"
            )
        self._out_feature_channels, self._out_feature_strides = {}, {}
        self._taps: dict[int, tuple[str, int]] = {}  # block index -> (name, unroll levels left)
        self.blocks = nn.ModuleList()
        dim, heads, stage, stride, pools = embed_dim, num_heads, 0, self.patch_stride, 0
        for i in range(built):
            window = stage_windows[stage]  # a transition block keeps the previous stage's kind
            dim_out, q = dim, 1
            if i - 1 in stage_ends:
                dim_out, heads, stage = int(dim * dim_mul), int(heads * head_mul), stage + 1
                if i in pool_blocks:  # the queries and the skip are max-pooled
                    q, pools = math.prod(self.q_stride), pools + 1
                    stride *= self.q_stride[0]
            self.blocks.append(
                HieraBlock(
                    dim=dim,
                    dim_out=dim_out,
                    heads=heads,
                    # stochastic depth rising linearly over all blocks
                    drop_path=drop_path_rate * i / max(depth - 1, 1),
                    q_stride=q,
                    window=0 if i in global_blocks else window,
                    **block_options,
                )
            )
            dim, name = dim_out, f"res{stage + 2}"
            if i == stage_ends[stage] and name in self._out_features:
                self._taps[i] = (name, self.levels - pools)
                self._out_feature_channels[name] = dim
                self._out_feature_strides[name] = stride

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.pos_embed_type != "abs":
            nn.init.trunc_normal_(self.pos_embed_win, std=0.02)
        for m in self.modules():  # the official initialisation (biases 0.02)
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.constant_(m.bias, 0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.02)

    @property
    def size_divisibility(self) -> int:
        return self.unit_px

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self.unit_px, "square_size": 0}

    def get_pos_embed(self, size: tuple[int, int]) -> Tensor:
        """The position embedding for a token grid of `size`, as ``[1, h, w, C]``."""
        h, w = size
        if self.pos_embed_type == "abs":
            return resize_pos_embed(self.pos_embed, (h, w), antialias=False).view(1, h, w, -1)
        my, mx = self.mask_unit_size
        win = self.pos_embed_win.tile(1, 1, h // my, w // mx)
        antialias = self.pos_embed_type == "abs_win"  # as timm's Hiera; SAM 2 resizes without
        glob = resize_pos_embed(self.pos_embed, (h, w), antialias=antialias)
        return (glob + win).permute(0, 2, 3, 1)

    def forward_units(self, images: Tensor, keep: Tensor | None = None) -> dict[str, Tensor]:
        """Run the encoder and return the stages of `out_features` in unit layout.

        Args:
            images: ``[B, C, H, W]`` with H and W multiples of 32.
            keep: optional ``[B, K]`` long, the indices (row-major over the unit grid, in
                increasing order) of the mask units to keep (sparse MAE); static shapes.
        Returns:
            ``{name: [B, U, T_s, C_s]}`` with U the kept units, T_s tokens per unit in unrolled
            order (`reroll` with ``self.unroll_levels_left(name)`` restores spatial order).
        """
        x, grid = self._stem(images, keep)
        return {name: units for name, units, _ in self._tapped_blocks(x, grid)}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``[B, C, H, W]`` -> ``{"res2": [B, C1, H/4, W/4], ..., "res5": [B, C4, H/32, W/32]}``."""
        x, grid = self._stem(images)
        # Each output is rerolled as soon as its block has run, so that no unit-layout copy of
        # an earlier stage is kept alive through the later ones.
        return {
            name: self._to_map(units, grid, name, levels)
            for name, units, levels in self._tapped_blocks(x, grid)
        }

    def _tapped_blocks(self, x: Tensor, grid: tuple[int, int] | None):
        """Run every block in turn; yield ``(name, units [B, U, T, C], unroll levels left)`` after
        each block that ends an output stage."""
        for i, blk in enumerate(self.blocks):
            if self.use_act_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
            if i in self._taps:
                name, levels = self._taps[i]
                yield name, x, levels

    def _to_map(self, x: Tensor, grid: tuple[int, int], name: str, levels: int) -> Tensor:
        y = reroll(x, grid, levels, self.q_stride)  # [B, H_s, W_s, C_s]
        if self.out_norms is not None:
            y = self.out_norms[name](y)
        return y.permute(0, 3, 1, 2).contiguous()

    def unroll_levels_left(self, name: str) -> int:
        """Unroll levels not yet consumed by pooling at the output `name` (for `reroll`)."""
        return next(levels for n, levels in self._taps.values() if n == name)

    def _stem(self, images: Tensor, keep: Tensor | None = None):
        """Patch embedding + position embedding + unroll: ``[B, U, T, C]`` and the unit grid
        (None once units were dropped: kept units no longer form a grid)."""
        grid = self.unit_grid(images)
        if keep is not None:
            # Zero the dropped pixels first so the 7x7 patch conv cannot see across into them.
            kept = images.new_zeros(images.shape[0], grid[0] * grid[1]).scatter(1, keep, 1.0)
            images = images * F.interpolate(kept.view(-1, 1, *grid), size=images.shape[-2:])
        x = self.patch_embed.proj(images).permute(0, 2, 3, 1)  # [B, h, w, C]
        # In the tokens' dtype: under bf16/fp16 autocast the fp32 table would promote the whole
        # residual stream to fp32 (a cast before and after every block's matmuls).
        x = x + self.get_pos_embed(x.shape[1:3]).to(x.dtype)
        x = unroll(x, self.levels, self.q_stride)  # [B, U, T, C]
        if keep is None:
            return x, grid
        B, _, T, C = x.shape
        return x.gather(1, keep.view(B, -1, 1, 1).expand(-1, -1, T, C)), None

    def unit_grid(self, images: Tensor) -> tuple[int, int]:
        """The mask unit grid ``(H / unit_px, W / unit_px)`` of ``[B, C, H, W]`` `images`; raises
        a ValueError naming the size when H or W is not a multiple of `unit_px` (32)."""
        if images.dim() != 4:
            raise ValueError(f"Hiera expects [B, C, H, W] images, got shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.unit_px or W % self.unit_px:
            raise ValueError(
                f"Hiera needs input height and width divisible by {self.unit_px} (its mask unit "
                f"in pixels), got {H}x{W}; pad the input, e.g. with ImageList.from_tensors("
                f"..., size_divisibility={self.unit_px})"
            )
        return H // self.unit_px, W // self.unit_px
