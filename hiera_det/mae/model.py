"""Masked autoencoder pretraining of Hiera (MAE; He et al. 2022, Ryali et al. 2023 Sec. 4).

`MaskedAutoencoderHiera` wraps our `Hiera` encoder (it does not subclass it). Masking is per mask
unit (32x32 px) and *sparse*: masked units are deleted before the first block, so the encoder
attends only among the visible units (`Hiera.forward_units`). The encoder is built with
``q_pool=2``: the last stage keeps stride 16 and every mask unit ends as 2x2 tokens.

The decoder follows the official ``hiera_mae``:

1. multi-scale fusion: stage-1 and stage-2 outputs of every visible unit are mapped to the last
   stage's width and 2x2 grid by convolutions with kernel = stride (4 and 2), summed with the last
   stage, and normed (`encoder_norm`);
2. the fused tokens are embedded to the decoder width, mask tokens fill the masked units, and the
   16 px grid of the whole image is put back in spatial order;
3. 8 global-attention blocks + a linear layer predict each 16x16 patch's pixels;
4. the loss is the MSE on *masked* patches against per-patch normalised pixels.

Our encoder returns every stage in unit layout ``[B, U_vis, T_s, C_s]`` with the ``T_s`` tokens of a
unit in unrolled order; rerolling each unit on its own (a 1x1 unit grid) gives the official
``[B, U_vis, MUy, MUx, C]`` per-unit spatial layout the fusion convolutions work on.

Non-encoder parameters keep the official names, so an official MAE checkpoint loads through
`hiera_det.checkpoint.HieraCheckpointer` (`convert_mae_checkpoint` only prefixes the encoder keys
with ``encoder.``); our checkpoints load into a detection `Hiera` through the same module (which
strips that prefix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..modeling.hiera import (
    Hiera,
    HieraBlock,
    build_hiera,
    compile_options,
    reroll,
    resize_pos_embed,
)

__all__ = ["MaskedAutoencoderHiera", "build_mae"]


def build_mae(
    size: str,
    *,
    decoder_embed_dim: int = 512,
    decoder_depth: int = 8,
    decoder_num_heads: int = 16,
    mask_ratio: float = 0.6,
    norm_pix_loss: bool = True,
    compile_step: bool | Mapping[str, Any] = False,
    **encoder_overrides,
) -> MaskedAutoencoderHiera:
    """An MAE for a named Hiera size (`HIERA_SIZES`); `encoder_overrides` go to `build_hiera`.

    The encoder gets ``q_pool=2`` (no pooling before the last stage) and SDPA attention unless
    overridden.
    """
    encoder = build_hiera(size, **{"q_pool": 2, "use_sdpa": True, **encoder_overrides})
    return MaskedAutoencoderHiera(
        encoder,
        decoder_embed_dim=decoder_embed_dim,
        decoder_depth=decoder_depth,
        decoder_num_heads=decoder_num_heads,
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix_loss,
        compile_step=compile_step,
    )


class MaskedAutoencoderHiera(nn.Module):
    """Sparse MAE around a `Hiera` encoder, with the official multi-scale fusion decoder.

    Args:
        encoder: a `Hiera` with every stage in `out_features` and ``pos_embed_type="abs"``;
            pretraining uses ``q_pool=2`` (see `build_mae`). Its `pretrain_img_size` sets the image
            size the decoder's position table is for.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the decoder transformer.
        mask_ratio: fraction of mask units hidden by random masking; ``int(units * (1 - ratio))``
            units stay visible (19 of 49 at 224 px and 0.6, as official).
        norm_pix_loss: normalise each target patch by its mean and variance (as the paper).
        mlp_ratio: MLP width of the decoder blocks.
        use_sdpa: decoder attention with `F.scaled_dot_product_attention` (as the official code).
        compile_step: compile the whole training step's forward (`masked_loss`: encoder, decoder
            and loss; its backward is compiled with it) with ``torch.compile(fullgraph=True)``.
            Opt-in; eager is the default and the reference. True for torch.compile's defaults,
            or a dict of its arguments, e.g. ``{"mode": "max-autotune"}``; with
            ``{"mode": "reduce-overhead"}`` (CUDA graphs) the step reads persistent input
            buffers refreshed each step. The masks are drawn outside the compiled step.
    """

    def __init__(
        self,
        encoder: Hiera,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.6,
        norm_pix_loss: bool = True,
        mlp_ratio: float = 4.0,
        use_sdpa: bool = True,
        compile_step: bool | Mapping[str, Any] = False,
    ):
        super().__init__()
        self.compile_kwargs = compile_options(compile_step)  # checked before anything is built
        stages = [f"res{i + 2}" for i in range(encoder.levels + 1)]
        shapes = encoder.output_shape()  # {name: ShapeSpec(channels, stride)}, in output order
        if list(shapes) != stages:
            raise ValueError(
                f"MAE needs every encoder stage as an output: build the Hiera with "
                f"out_features={tuple(stages)}, not {tuple(shapes)}"
            )
        if encoder.pos_embed_type != "abs":
            raise ValueError("MAE pretraining supports pos_embed_type='abs' only")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio} must be in [0, 1)")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss

        self._build_fusion(shapes)
        self._build_decoder(
            decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio, use_sdpa
        )
        self._init_weights()

    def _build_fusion(self, shapes: dict) -> None:
        """The multi-scale fusion heads (official order: the stages before each pooling, then the
        last stage) and the encoder norm; `shapes` is the encoder's `output_shape()`."""
        strides = {name: shape.stride for name, shape in shapes.items()}
        channels = {name: shape.channels for name, shape in shapes.items()}
        last = list(shapes)[-1]
        self.pred_stride = strides[last]  # 16 with q_pool=2: one prediction per last-stage token
        self.unit_side = self.encoder.unit_px // self.pred_stride  # last-stage tokens per side (2)
        self._fusion_sources = [n for n in shapes if strides[n] < self.pred_stride] + [last]
        self.encoder_dim = channels[last]
        self.multi_scale_fusion_heads = nn.ModuleList()
        for name in self._fusion_sources[:-1]:
            k = self.pred_stride // strides[name]  # kernel = stride
            self.multi_scale_fusion_heads.append(nn.Conv2d(channels[name], self.encoder_dim, k, k))
        self.multi_scale_fusion_heads.append(nn.Identity())  # the last stage is already 2x2
        self.encoder_norm = nn.LayerNorm(self.encoder_dim, eps=1e-6)

    def _build_decoder(
        self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, use_sdpa: bool
    ) -> None:
        # The encoder's pretraining token grid (56x56 at 224 px) in prediction patches: 14x14.
        self.decoder_grid = tuple(
            side * self.encoder.patch_stride // self.pred_stride
            for side in self.encoder.pretrain_grid
        )
        self.decoder_embed = nn.Linear(self.encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, math.prod(self.decoder_grid), embed_dim)
        )
        self.decoder_blocks = nn.ModuleList(
            HieraBlock(embed_dim, embed_dim, num_heads, mlp_ratio, window=0, use_sdpa=use_sdpa)
            for _ in range(depth)
        )
        self.decoder_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(embed_dim, self.pred_stride**2 * self.encoder.in_chans)

    def _init_weights(self) -> None:
        """The official MAE initialisation (it replaces the encoder's own for linears and norms)."""
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.encoder.patch_embed.proj.weight.data  # like a linear layer, not a conv
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    @property
    def device(self) -> torch.device:
        return self.mask_token.device

    # ------------------------------------------------------------------------------------------
    # Masking
    # ------------------------------------------------------------------------------------------

    def unit_grid(self, images: Tensor) -> tuple[int, int]:
        """The mask unit grid of `images` (raises for sizes that are not multiples of 32)."""
        return self.encoder.unit_grid(images)

    def random_keep(
        self, batch: int, grid: tuple[int, int], generator: torch.Generator | None = None
    ) -> Tensor:
        """Random kept units ``[B, K]`` (unit indices, increasing; K = ``int(units * (1 -
        mask_ratio))``): the units with the smallest uniform noise, as the official
        ``get_random_mask`` keeps. Static shapes, no host synchronisation."""
        units = grid[0] * grid[1]
        keep = int(units * (1 - self.mask_ratio))
        if keep < 1:
            raise ValueError(f"mask_ratio={self.mask_ratio} keeps no unit of a {grid} unit grid")
        device = generator.device if generator is not None else self.device
        noise = torch.rand(batch, units, device=device, generator=generator)
        return noise.argsort(dim=1)[:, :keep].sort(dim=1).values.to(self.device)

    def random_visible(
        self, batch: int, grid: tuple[int, int], generator: torch.Generator | None = None
    ) -> Tensor:
        """`random_keep` as per-unit masks ``[B, gh*gw]`` bool, True = visible."""
        keep = self.random_keep(batch, grid, generator)
        visible = torch.zeros(batch, grid[0] * grid[1], dtype=torch.bool, device=keep.device)
        return visible.scatter_(1, keep, True)

    def kept_units(self, visible: Tensor, grid: tuple[int, int]) -> Tensor:
        """Unit masks ``[B, gh*gw]`` (True = visible, the same count per image) -> the kept unit
        indices ``[B, K]``, increasing. Checks the masks (and so synchronises with the device):
        call it outside a compiled step."""
        visible = visible.to(self.device).bool()
        counts = visible.sum(dim=1)
        if visible.shape != (visible.shape[0], grid[0] * grid[1]) or (counts != counts[0]).any():
            raise ValueError(
                f"visible must be [B, {grid[0] * grid[1]}] with the same number of visible "
                f"units per image, got shape {tuple(visible.shape)}, counts {counts.tolist()}"
            )
        return visible.nonzero()[:, 1].view(visible.shape[0], -1)

    def unit_weights(self, keep: Tensor, grid: tuple[int, int], value: float = 1.0) -> Tensor:
        """``[B, gh*gw]`` float: `value` at the kept units, 0 elsewhere."""
        weights = keep.new_zeros(keep.shape[0], grid[0] * grid[1], dtype=torch.float32)
        return weights.scatter_(1, keep, value)

    # ------------------------------------------------------------------------------------------
    # Encoder / decoder / loss: kept units by index, static shapes (compilable whole)
    # ------------------------------------------------------------------------------------------

    def forward_encoder(self, images: Tensor, keep: Tensor) -> Tensor:
        """Encode the kept units and fuse the scales.

        Args:
            images: ``[B, C, H, W]``, H and W multiples of 32.
            keep: ``[B, K]`` kept unit indices, increasing (`random_keep`, `kept_units`).
        Returns:
            ``[B, K, m, m, C_enc]``: the fused, normed latent of every kept unit with its
            ``m x m`` last-stage tokens (m = 2) in spatial order, units in row-major order.
        """
        feats = self.encoder.forward_units(images, keep)  # {name: [B, K, T_s, C_s]}
        q_stride = self.encoder.q_stride
        latent = 0.0
        for name, head in zip(self._fusion_sources, self.multi_scale_fusion_heads):
            x = feats[name]
            B, U, T, C = x.shape
            # Reroll each unit alone (a 1x1 unit grid): [B*U, MUy, MUx, C] in spatial order.
            levels = self.encoder.unroll_levels_left(name)
            x = reroll(x.reshape(B * U, 1, T, C), (1, 1), levels, q_stride)
            if not isinstance(head, nn.Identity):
                x = head(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [B*U, m, m, C_enc]
            latent = latent + x
        latent = self.encoder_norm(latent)
        return latent.view(B, U, self.unit_side, self.unit_side, -1)

    def forward_decoder(self, latent: Tensor, keep: Tensor, grid: tuple[int, int]) -> Tensor:
        """Predict the pixels of every 16 px patch of the image.

        Args:
            latent: ``[B, K, m, m, C_enc]`` from `forward_encoder`.
            keep: ``[B, K]`` kept unit indices.
            grid: the unit grid ``(gh, gw)``.
        Returns:
            ``[B, gh*m * gw*m, p*p*C_in]``: per patch (row-major, p = `pred_stride`) its pixels,
            flattened channel-major ``(c, y, x)`` as the official model (normalised per patch when
            `norm_pix_loss`).
        """
        x = self.decoder_embed(latent)  # [B, K, m, m, D]
        B, K, m, _, D = x.shape
        gh, gw = grid
        # Mask tokens everywhere, the kept units' tokens scattered back to their places.
        full = self.mask_token.to(x.dtype).view(1, 1, 1, 1, D).expand(B, gh * gw, m, m, D)
        index = keep.view(B, K, 1, 1, 1).expand(B, K, m, m, D)
        x = full.scatter(1, index, x)  # [B, gh*gw, m, m, D]
        # [B, gh, gw, m, m, D] -> [B, gh, m, gw, m, D]: the whole image's grid in spatial order
        x = x.view(B, gh, gw, m, m, D).permute(0, 1, 3, 2, 4, 5).reshape(B, 1, -1, D)
        pos = resize_pos_embed(self.decoder_pos_embed, (gh * m, gw * m), antialias=False)
        x = x + pos.unsqueeze(1)
        for blk in self.decoder_blocks:  # global attention over [B, 1, N, D]
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x.squeeze(1)))

    def forward_loss(self, images: Tensor, pred: Tensor, keep: Tensor) -> Tensor:
        """Mean squared error on the masked patches (the official ``mean`` over their values,
        as a masked mean: every patch has as many values).

        Args:
            images: ``[B, C, H, W]`` the (normalised) input.
            pred: ``[B, N, p*p*C]`` from `forward_decoder`.
            keep: ``[B, K]`` kept unit indices.
        Returns:
            the scalar loss (fp32).
        """
        grid = self.unit_grid(images)
        masked = self.per_patch(1.0 - self.unit_weights(keep, grid), grid)  # [B, N], 1 = masked
        target = self.patchify(images).float()  # [B, N, p*p*C]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as official
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        return (per_patch * masked).sum() / masked.sum()

    def masked_loss(self, images: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, pred)`` of `images` with the units `keep` kept: the whole training step's
        forward, with static shapes and no host synchronisation (what ``compile`` compiles)."""
        grid = self.unit_grid(images)
        pred = self.forward_decoder(self.forward_encoder(images, keep), keep, grid)
        return self.forward_loss(images, pred, keep), pred

    def reconstruct(
        self, images: Tensor, visible: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the whole MAE: ``(loss, pred [B, N, p*p*C], visible [B, units])``.

        `visible` (True = visible, same count per image) is drawn at random with `mask_ratio`
        when not given.
        """
        images = images.to(self.device, non_blocking=True)
        grid = self.unit_grid(images)
        if visible is None:
            keep = self.random_keep(images.shape[0], grid)
        else:
            keep = self.kept_units(visible, grid)
        loss, pred = self._step(images, keep)
        visible = self.unit_weights(keep, grid).bool()
        return loss, pred, visible

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``[B, C, H, W]`` normalised images -> ``{"loss_mae": loss}`` (random masks).

        Returns the loss dict in train and eval mode alike, so Detectron2's trainers train it;
        use `reconstruct` for predictions.
        """
        images = images.to(self.device, non_blocking=True)
        keep = self.random_keep(images.shape[0], self.unit_grid(images))
        return {"loss_mae": self._step(images, keep)[0]}

    def _step(self, images: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """`masked_loss`, through the compiled step when ``compile`` was given."""
        if self.compile_kwargs is None:
            return self.masked_loss(images, keep)
        compiled = self.__dict__.get("_compiled_step")
        if compiled is None:
            compiled = torch.compile(self.masked_loss, fullgraph=True, **self.compile_kwargs)
            self.__dict__["_compiled_step"] = compiled  # not state: dropped by __getstate__
        if self.compile_kwargs.get("mode") == "reduce-overhead":
            images, keep = self._static_inputs(images, keep)
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        return compiled(images, keep)

    def _static_inputs(self, images: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """Persistent input buffers for CUDA graphs, refreshed in place each step (new buffers
        only when the shapes change)."""
        static = self.__dict__.get("_static_inputs_buffers")
        if static is None or static[0].shape != images.shape or static[1].shape != keep.shape:
            static = (images.clone(), keep.clone())
            self.__dict__["_static_inputs_buffers"] = static
        else:
            static[0].copy_(images)
            static[1].copy_(keep)
        return static

    def __getstate__(self):
        """Pickling and deepcopy leave the compiled step and its buffers out."""
        state = dict(super().__getstate__())
        state.pop("_compiled_step", None)
        state.pop("_static_inputs_buffers", None)
        return state

    # ------------------------------------------------------------------------------------------
    # Patch layout helpers
    # ------------------------------------------------------------------------------------------

    def patchify(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, (H/p)*(W/p), C*p*p]``, channel-major as the official unfold."""
        B, C, H, W = images.shape
        p = self.pred_stride
        x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, patches: Tensor, size: tuple[int, int]) -> Tensor:
        """Inverse of `patchify`: ``[B, N, C*p*p]`` -> ``[B, C, H, W]`` for an image `size`."""
        B = patches.shape[0]
        p = self.pred_stride
        gh, gw = size[0] // p, size[1] // p
        x = patches.reshape(B, gh, gw, -1, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, -1, gh * p, gw * p)

    def per_patch(self, units: Tensor, grid: tuple[int, int]) -> Tensor:
        """A per-unit ``[B, gh*gw]`` tensor -> the same per predicted patch ``[B, gh*m * gw*m]``
        (row-major over the patch grid)."""
        m = self.unit_side
        v = units.view(-1, grid[0], 1, grid[1], 1).expand(-1, -1, m, -1, m)
        return v.reshape(units.shape[0], -1)

    def visible_per_patch(self, visible: Tensor, grid: tuple[int, int]) -> Tensor:
        """Unit mask ``[B, gh*gw]`` -> mask of the predicted patches ``[B, gh*m * gw*m]``."""
        return self.per_patch(visible, grid)
