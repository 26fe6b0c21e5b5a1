"""VideoMAE V2: a masked autoencoder for video, with dual masking.

A clip (B, 3, T, H, W) is cut into cubes of tubelet x patch x patch pixels (2 x 16 x 16 by default), one
token per cube: N = T/2 · H/16 · W/16 tokens (1568 for 16 frames at 224 px), numbered in raster order
(time, row, column). Pretraining hides most of them from the encoder and asks a small decoder to paint
the hidden cubes back:

1. The encoder masks 90 % of the tokens with a tube mask (the same spatial holes in every frame) and runs a
   plain ViT on the ~10 % it can see (160 of 1568).
2. The decoder gets those encoded tokens plus a learned `mask_token` at each position it must predict.
   VideoMAE V1 asks for every hidden position. V2 also masks the decoder ("dual masking"): a running-cell
   mask keeps only half the positions, so the decoder runs on 160 + 784 tokens instead of 1568.
3. The target is each cube's pixels, normalised per cube and per channel; the loss is the mean squared
   error over the cubes that the encoder did not see and the decoder was asked for (704 per clip).

Position is carried by a fixed sin/cos table over the flat token index, added to the encoder's input and
again to the decoder's, so the decoder needs no "unshuffle". The fine-tune model is the same encoder with
the tokens mean-pooled into a LayerNorm and a linear head.

Everything here matches the reference implementation (OpenGVLab/VideoMAEv2) number for number, and its
state_dict keys and shapes, so its checkpoints load with strict=True and ours load into it. Read top to
bottom: config and sizes, building blocks, encoder, decoder, the pretraining model, target and loss, the
classifier; then the checkpoint formats, which read other layouts' key names into these.
"""
import argparse
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------------------------------
# Config and the size table


class ConfigError(ValueError):
    """A model configuration that cannot be built (an unknown size name or field, a size that does not divide)."""


@dataclass
class VideoMAEConfig:
    img_size: int = 224
    patch_size: int = 16
    num_frames: int = 16
    tubelet_size: int = 2
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0  # one ratio for encoder and decoder, as in the reference (giant: 48/11)
    decoder_embed_dim: int = 384
    decoder_depth: int = 4  # the reference scripts' value (its model class defaults to 8)
    decoder_num_heads: int = 6
    drop_path_rate: float = 0.0  # stochastic depth, linear from 0 over the blocks of each stack
    with_checkpoint: bool = False  # recompute each block in backward instead of storing its activations

    def __post_init__(self):
        for name in ("img_size", "patch_size", "num_frames", "tubelet_size", "embed_dim", "depth",
                     "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        for whole, part in (("img_size", "patch_size"), ("num_frames", "tubelet_size"),
                            ("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if getattr(self, whole) % getattr(self, part):
                raise ConfigError(f"config: {whole}={getattr(self, whole)} must be divisible by "
                                 f"{part}={getattr(self, part)}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"config field drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def grid(self) -> tuple[int, int, int]:  # (T', H', W')
        side = self.img_size // self.patch_size
        return (self.num_frames // self.tubelet_size, side, side)

    @property
    def num_tokens(self) -> int:  # N
        t, h, w = self.grid
        return t * h * w

    @property
    def cube_dim(self) -> int:  # pixels per cube, 3·t·p², the decoder's output size
        return 3 * self.tubelet_size * self.patch_size ** 2


# Encoder width/depth/heads and decoder width/heads of the reference's registered models; everything else
# (224 px, 16 frames, tubelet 2, decoder depth 4) is shared.
SIZES = {
    "small": dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=192, decoder_num_heads=3),
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=384, decoder_num_heads=6),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_num_heads=8),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512, decoder_num_heads=8),
    "giant": dict(embed_dim=1408, depth=40, num_heads=16, decoder_embed_dim=512, decoder_num_heads=8,
                  patch_size=14, mlp_ratio=48 / 11),
    # Not the paper's: the laptop demos' size, a 4-block 64-wide ViT on 8-pixel patches (32 px clips give a
    # 4 x 4 grid). It learns the built-in clips' labels within minutes on a CPU; a ViT-S needs far more
    # steps than a laptop run has before it leaves chance on them.
    "demo": dict(embed_dim=64, depth=4, num_heads=2, decoder_embed_dim=64, decoder_num_heads=2, patch_size=8),
}
PAPER_SIZES = ("small", "base", "large", "huge", "giant")
# The reference's model names, e.g. pretrain_videomae_base_patch16_224 and vit_giant_patch14_224.
ALIASES = {f"{prefix}_{size}_patch{SIZES[size].get('patch_size', 16)}_224": size
           for size in PAPER_SIZES for prefix in ("pretrain_videomae", "vit")}


def config(name: str = "base", **overrides) -> VideoMAEConfig:
    """A size preset ('small' ... 'giant', 'demo', or a reference model name) with `overrides` applied."""
    size = ALIASES.get(name, name)
    if size not in SIZES:
        raise ConfigError(f"unknown model {name!r}: expected one of {', '.join(SIZES)} "
                         f"or a reference name such as pretrain_videomae_base_patch16_224")
    known = {f.name for f in fields(VideoMAEConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}")
    return VideoMAEConfig(**{**SIZES[size], **overrides})


# -----------------------------------------------------------------------------------------------------
# Building blocks


def sincos_table(num_tokens: int, dim: int) -> Tensor:
    """(N, dim) fixed position table over the flat token index n: column j holds sin (even j) or cos
    (odd j) of n / 10000^(2·floor(j/2)/dim). Interleaved, not half sin / half cos; built for the actual
    grid, so any frame count or input size works. Computed in float64 like the reference, kept float32."""
    n = torch.arange(num_tokens, dtype=torch.float64)[:, None]  # (N, 1)
    j = torch.arange(dim, dtype=torch.float64)
    angle = n / 10000 ** (2 * (j // 2) / dim)  # (N, dim)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()


def patchify(video: Tensor, patch_size: int, tubelet_size: int) -> Tensor:
    """(B, C, T, H, W) -> (B, N, C, t·p·p): each cube's pixels per channel, in the Conv3d kernel's order
    (channel, then frame, row, column). Runs of p pixels stay contiguous, so the copy is cheap."""
    B, C, T, H, W = video.shape
    t, p = tubelet_size, patch_size
    x = video.reshape(B, C, T // t, t, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, T', H', W', C, t, p, p)
    return x.reshape(B, (T // t) * (H // p) * (W // p), C, t * p * p)


def unpatchify(cubes: Tensor, grid: tuple[int, int, int], patch_size: int, tubelet_size: int) -> Tensor:
    """(B, N, C, t·p·p) -> (B, C, T, H, W), the inverse of patchify."""
    (T, H, W), t, p = grid, tubelet_size, patch_size
    B, C = cubes.shape[0], cubes.shape[2]
    x = cubes.reshape(B, T, H, W, C, t, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, T', t, H', p, W', p)
    return x.reshape(B, C, T * t, H * p, W * p)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, N, ...), idx (B, M) -> (B, M, ...): the tokens at positions idx of each sample."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


def mask_indices(mask: Tensor, num_kept: int | None = None) -> tuple[Tensor, Tensor]:
    """(B, N) bool -> (indices of False (B, num_kept), indices of True (B, N - num_kept)), each ascending.

    `num_kept` (False entries per row) is known to whoever drew the mask (masking.num_hidden); pass it in the
    training loop. Left out, it is read off the mask, which is one host sync and a graph break under
    torch.compile, and the rows are checked to hold the same count.
    """
    if num_kept is None:
        per_row = (~mask).sum(dim=1)
        num_kept = int(per_row[0])
        if not bool((per_row == num_kept).all()):
            raise ValueError(f"every row of a mask must hide the same number of tokens; got per-row kept "
                             f"counts {per_row.tolist()}")
    order = mask.to(torch.uint8).argsort(dim=1, stable=True)  # (B, N): False positions first, both ascending
    return order[:, :num_kept], order[:, num_kept:]


class CubeEmbed(nn.Module):
    """A Conv3d with kernel = stride = (t, p, p): one D-dim token per cube. The forward writes the same
    convolution as one matmul of the flattened kernel (D, 3·t·p·p) with the cubes' pixels, so the
    pretraining encoder embeds only the ~10 % of cubes it will see. The parameter stays a Conv3d weight
    (D, 3, t, p, p), as in the reference."""

    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        self.patch_size, self.tubelet_size = cfg.patch_size, cfg.tubelet_size
        kernel = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(3, cfg.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: Tensor, keep: Tensor | None = None) -> Tensor:
        cubes = patchify(video, self.patch_size, self.tubelet_size).flatten(2)  # (B, N, 3·t·p·p)
        if keep is not None:
            cubes = gather_tokens(cubes, keep)  # (B, N_keep, 3·t·p·p)
        return F.linear(cubes, self.proj.weight.flatten(1), self.proj.bias)  # (B, N_keep, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv matmul. Query and value have a bias, the key has none
    (the reference stores q_bias and v_bias and feeds a zero k bias; here the zeros are a fixed buffer, not
    made anew in every forward, and not saved)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, self.k_bias, self.v_bias])  # (3C,)
        qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, 3C)
        q, k, v = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, h, N, C/h)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, C/h); scale (C/h)^-0.5
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero a residual branch for a random subset of samples, rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.dim() - 1)).bernoulli_(1 - rate)  # (B, 1, 1)
    return x * keep / (1 - rate)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). LayerNorm eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))  # int(): giant's decoder has 512·48/11 -> 2234
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


def make_blocks(dim: int, depth: int, num_heads: int, cfg: VideoMAEConfig) -> nn.ModuleList:
    rates = [cfg.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # each stack its own ramp from 0
    return nn.ModuleList(Block(dim, num_heads, cfg.mlp_ratio, r) for r in rates)


def run_blocks(blocks: nn.ModuleList, x: Tensor, with_checkpoint: bool) -> Tensor:
    for block in blocks:
        if with_checkpoint and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)  # keep only the block's input for backward
        else:
            x = block(x)
    return x


def init_linear_and_norm(module: nn.Module, init_linear) -> None:
    """Re-initialise every Linear weight with `init_linear`, Linear biases to 0, LayerNorms to (1, 0).
    The Conv3d cube embedding keeps PyTorch's default init, as in the reference."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            init_linear(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------------------------------
# Encoder and decoder


class Encoder(nn.Module):
    """Cube embedding + position table + transformer blocks (+ a final LayerNorm when pretraining)."""

    def __init__(self, cfg: VideoMAEConfig, final_norm: bool = True):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = CubeEmbed(cfg)
        self.register_buffer("pos_embed", sincos_table(cfg.num_tokens, cfg.embed_dim), persistent=False)
        self.blocks = make_blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6) if final_norm else nn.Identity()

    def check_input(self, video: Tensor) -> None:
        expected = (3, self.cfg.num_frames, self.cfg.img_size, self.cfg.img_size)
        if video.dim() != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(f"video must be (B, {', '.join(map(str, expected))}) for this config "
                             f"(num_frames={self.cfg.num_frames}, img_size={self.cfg.img_size}); "
                             f"got {tuple(video.shape)}")

    def forward(self, video: Tensor, visible: Tensor | None = None) -> Tensor:
        """video (B, 3, T, H, W), visible (B, N_vis) token indices or None for all -> (B, N_vis, D)."""
        self.check_input(video)
        x = self.patch_embed(video, visible)  # (B, N_vis, D)
        pos = self.pos_embed if visible is None else self.pos_embed[visible]  # (N, D) or (B, N_vis, D)
        x = x + pos.to(x.dtype)
        x = run_blocks(self.blocks, x, self.cfg.with_checkpoint)
        return self.norm(x)


class Decoder(nn.Module):
    """Transformer blocks over [encoded tokens; mask tokens], then LayerNorm and a linear head that
    predicts the cube pixels (3·t·p² values) for the mask tokens only."""

    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        self.with_checkpoint = cfg.with_checkpoint
        self.blocks = make_blocks(cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg)
        self.norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.decoder_embed_dim, cfg.cube_dim)

    def forward(self, x: Tensor, num_queries: int) -> Tensor:
        """x (B, N_vis + N_q, Dd) -> (B, N_q, 3·t·p²), predictions for the last N_q tokens."""
        x = run_blocks(self.blocks, x, self.with_checkpoint)
        return self.head(self.norm(x[:, -num_queries:]))


# -----------------------------------------------------------------------------------------------------
# The pretraining model


class PretrainVideoMAE(nn.Module):
    """Encoder on the visible cubes, a linear map to the decoder's width, and a decoder that predicts the
    pixels of the cubes it is asked for. State-dict keys and shapes are the reference's:
    mask_token, encoder.*, decoder.*, encoder_to_decoder.weight (no position tables: they are fixed)."""

    def __init__(self, cfg: VideoMAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, final_norm=True)
        self.decoder = Decoder(cfg)
        self.encoder_to_decoder = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer("pos_embed", sincos_table(cfg.num_tokens, cfg.decoder_embed_dim), persistent=False)
        # The reference's init: xavier-uniform Linears inside encoder and decoder, LayerNorm (1, 0);
        # encoder_to_decoder and the Conv3d keep PyTorch's default; mask_token is a normal truncated at ±1σ.
        init_linear_and_norm(self.encoder, nn.init.xavier_uniform_)
        init_linear_and_norm(self.decoder, nn.init.xavier_uniform_)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(self, video: Tensor, encoder_mask: Tensor, decoder_mask: Tensor | None = None, *,
                num_visible: int | None = None, num_queries: int | None = None,
                queries: Tensor | None = None) -> Tensor:
        """Predict the pixels of the cubes the decoder is asked for.

        video: (B, 3, T, H, W), ImageNet-normalised. encoder_mask: (B, N) bool, True = hidden from the
        encoder. decoder_mask: (B, N) bool, True = dropped from the decoder (nothing predicted there);
        None = VideoMAE V1, where the decoder is asked for every encoder-hidden cube.
        Returns (B, N_q, 3·t·p²): one row per decoder query in ascending token order. With dual masking
        the queries are all decoder-kept positions, including the few the encoder saw (as in the
        reference; the loss ignores those).
        num_visible / num_queries: tokens per clip the encoder keeps / the decoder predicts. They follow
        from the masks, but reading them off a mask is a host sync and a graph break under
        torch.compile, so the training loop passes them (masking.num_hidden gives them up front).
        queries: query_indices(encoder_mask, decoder_mask), if the caller needs them too (for the target and
        the loss): the masks are then sorted once per step.
        """
        visible, hidden = mask_indices(encoder_mask, num_visible)  # (B, N_vis), (B, N - N_vis)
        if queries is None:
            queries = hidden if decoder_mask is None else query_indices(encoder_mask, decoder_mask, num_queries)

        x = self.encoder(video, visible)  # (B, N_vis, D)
        x = self.encoder_to_decoder(x)  # (B, N_vis, Dd)
        pos = self.pos_embed.to(x.dtype)  # (N, Dd)
        # The decoder sees the encoded tokens first, then a mask token at every query; both carry their
        # position in the table, so no reordering is needed.
        x = torch.cat([x + pos[visible], self.mask_token.to(x.dtype) + pos[queries]], dim=1)  # (B, N_vis + N_q, Dd)
        return self.decoder(x, queries.shape[1])  # (B, N_q, 3·t·p²)

    def encode(self, video: Tensor) -> Tensor:
        """The encoder on every cube of the clips, no mask: (B, 3, T, H, W) -> (B, N, D) tokens, e.g. for a
        probe of what pretraining learned (probe.py)."""
        return self.encoder(video)


# -----------------------------------------------------------------------------------------------------
# Target and loss


def query_indices(encoder_mask: Tensor, decoder_mask: Tensor | None = None, num_queries: int | None = None) -> Tensor:
    """(B, N_q) the positions the decoder predicts, ascending: every decoder-kept position with dual
    masking, every encoder-hidden one without a decoder mask (V1). Pass num_queries to avoid a host sync."""
    if decoder_mask is None:
        n = encoder_mask.shape[1]
        return mask_indices(encoder_mask, None if num_queries is None else n - num_queries)[1]
    return mask_indices(decoder_mask, num_queries)[0]


def imagenet_stats(like: Tensor) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std as (3, 1) tensors on `like`'s device, filled in from Python numbers. Building
    them with new_tensor(list) would copy from host memory, and on a GPU that copy first waits for every
    kernel already queued: one stall per training step, between the forward and the backward."""
    stats = like.new_empty(2, 3, 1)  # (mean or std, channel, 1)
    for c in range(3):
        stats[0, c], stats[1, c] = IMAGENET_MEAN[c], IMAGENET_STD[c]
    return stats[0], stats[1]


@torch.no_grad()
def reconstruction_target(video: Tensor, patch_size: int, tubelet_size: int, normalize: bool = True,
                          tokens: Tensor | None = None) -> Tensor:
    """(B, 3, T, H, W) normalised video -> (B, N, 3·t·p²) pixels per cube, channel fastest.

    Undo the ImageNet normalisation (pixels in [0, 1]); with `normalize`, standardise each cube per colour
    channel over its t·p·p pixels: (x - mean) / (unbiased std + 1e-6). This is the reference's formula
    (MAE's norm_pix_loss instead pools all channels and puts the epsilon under the square root).
    The reference hard-codes a tubelet of 2 here; this uses `tubelet_size`.
    tokens: (B, M) positions to compute, e.g. the decoder's queries -> (B, M, 3·t·p²). The reference
    normalises all N cubes and then keeps the queried ones; computing only those halves the work.
    """
    cubes = patchify(video.float(), patch_size, tubelet_size)  # (B, N, 3, t·p·p), still normalised
    if tokens is not None:
        cubes = gather_tokens(cubes, tokens)  # (B, M, 3, t·p·p)
    mean, std = imagenet_stats(cubes)  # (3, 1) each
    cubes = cubes * std + mean  # pixels in [0, 1]
    if normalize:
        cube_std, cube_mean = torch.std_mean(cubes, dim=-1, correction=1, keepdim=True)  # unbiased, as torch.var
        cubes = (cubes - cube_mean) / (cube_std + 1e-6)
    return cubes.transpose(-1, -2).flatten(2)  # (B, M, t·p·p·3), channel fastest like the reference


def pretrain_loss(pred: Tensor, target: Tensor, encoder_mask: Tensor, decoder_mask: Tensor | None = None,
                  queries: Tensor | None = None) -> Tensor:
    """Mean squared error per cube, averaged over every cube of the batch that the encoder did not see
    and the decoder predicted (a token-weighted mean over the batch, not a mean of per-clip means).

    pred (B, N_q, F) from PretrainVideoMAE with the same masks; target (B, N, F) for every cube, or
    (B, N_q, F) for the queries only (reconstruction_target's `tokens`). queries: the (B, N_q) positions
    from query_indices, if the caller has them (saves sorting the mask again).
    """
    if queries is None:
        queries = query_indices(encoder_mask, decoder_mask, pred.shape[1])  # (B, N_q)
    if target.shape[1] != pred.shape[1]:
        target = gather_tokens(target, queries)
    counted = encoder_mask.gather(1, queries)  # (B, N_q) True where the encoder did not see the cube
    per_cube = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N_q)
    return (per_cube * counted).sum() / counted.sum().clamp(min=1)


# -----------------------------------------------------------------------------------------------------
# The fine-tune / inference model


class VideoClassifier(Encoder):
    """The encoder on all N tokens, mean-pooled, LayerNorm (`fc_norm`), dropout, linear head.

    There is no CLS token: the clip's vector is the mean of all patch tokens, then `fc_norm`. (The
    reference's `use_mean_pooling=False` path reads token 0, which is an ordinary patch token; it is not
    offered here.) Keys are the reference fine-tune model's: patch_embed.*, blocks.*, fc_norm.*, head.*.
    The pretraining encoder's final LayerNorm has no place here; fine-tuning starts a fresh fc_norm.
    num_classes=0: no head (an identity), as the reference's and the Hugging Face V2 releases' encoders.
    """

    def __init__(self, cfg: VideoMAEConfig, num_classes: int, head_drop_rate: float = 0.0, init_scale: float = 0.001):
        super().__init__(cfg, final_norm=False)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head_dropout = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # The reference's fine-tune init: Linears ~ N(0, 0.02) (truncated at ±2, i.e. in effect not at all),
        # then the head shrunk by init_scale so training starts from near-uniform predictions.
        init_linear_and_norm(self, lambda w: nn.init.trunc_normal_(w, std=0.02, a=-2.0, b=2.0))
        with torch.no_grad():
            for p in self.head.parameters():
                p.mul_(init_scale)

    def forward_features(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, T, H, W) -> tokens (B, N, D) and the pooled clip vector fc_norm(mean) (B, D)."""
        tokens = super().forward(video)  # (B, N, D)
        return tokens, self.fc_norm(tokens.mean(dim=1))

    def forward(self, video: Tensor) -> Tensor:
        return self.head(self.head_dropout(self.forward_features(video)[1]))  # (B, num_classes)


# -----------------------------------------------------------------------------------------------------
# Checkpoint formats: files in, weights under the names above
#
# The public VideoMAE checkpoints hold this model in five layouts, each read into the names above:
#   ours             {"model": weights, "args": {the run's flags}}, as train_*.py write them
#   the reference's  weights under "model" or "module" (DeepSpeed) or bare, `args` an argparse Namespace;
#                    a compiled run prefixes every key with `_orig_mod.` (V1 MCG-NJU/VideoMAE and V2 alike)
#   Hugging Face V1  transformers' VideoMAE* (MCG-NJU/videomae-*): videomae.* names, query/key/value apart
#   Hugging Face V2  the OpenGVLab/VideoMAEv2-* folders: config.json (`model_config`) and model.safetensors,
#                    the reference's encoder and fc_norm under `model.`; no head, no decoder
#   mmaction2        mmengine files {"state_dict", "meta"}: `backbone.` and mmcv's module names, cls_head.fc_cls


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


OURS, REFERENCE, HF_V1, HF_V2, MMACTION2 = ("vmae's", "the reference's", "Hugging Face V1 (transformers)",
                                            "Hugging Face V2 release", "mmaction2's")


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file as a dict: torch.load with weights_only=True (a file cannot run code), or a
    .safetensors file (the safetensors package; transformers is not needed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        with torch.serialization.safe_globals([argparse.Namespace]):  # the reference keeps its args as one
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, needs unsafe unpickling, or no safetensors package
        raise CheckpointError(f"checkpoint {path}: cannot be read as a weights-only checkpoint "
                              f"({type(e).__name__}: {e})") from e


def saved_args(checkpoint: dict) -> dict:
    """The training arguments a checkpoint stores under `args` (ours a dict, the reference's a Namespace);
    {} when it has none (released weights, Hugging Face files)."""
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    return args if isinstance(args, dict) else {}


def trained_on_normalized_targets(args: dict) -> bool:
    """Whether a run with these saved arguments predicted per-cube normalised pixels (the reference spells
    the flag normlize_target); True, the recipe's default, when they do not say."""
    return bool(args.get("normalize_target", args.get("normlize_target", True)))


def encoder_names(weights: dict) -> dict:
    """The weights with an mmaction2 `backbone.` or a pretraining model's `encoder.` prefix taken off, so the
    encoder's keys read as the fine-tune model's (patch_embed.*, blocks.*)."""
    return {k.removeprefix("backbone.").removeprefix("encoder."): v for k, v in weights.items()}


# Hugging Face VideoMAE names -> the reference's, replaced in this order in every key. Older transformers
# releases store q_bias / v_bias, newer ones query.bias / value.bias; the key has no bias.
HF_NAMES = [("videomae.embeddings.patch_embeddings.projection.", "encoder.patch_embed.proj."),
            ("videomae.encoder.layer.", "encoder.blocks."), ("videomae.layernorm.", "encoder.norm."),
            ("decoder.decoder_layers.", "decoder.blocks."), ("classifier.", "head."),
            ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
            ("attention.attention.q_bias", "attn.q_bias"), ("attention.attention.query.bias", "attn.q_bias"),
            ("attention.attention.v_bias", "attn.v_bias"), ("attention.attention.value.bias", "attn.v_bias"),
            ("attention.output.dense.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."),
            ("output.dense.", "mlp.fc2.")]
# Their config.json's names for our config fields (intermediate_size is embed_dim · mlp_ratio).
HF_CONFIG_NAMES = dict(image_size="img_size", patch_size="patch_size", num_frames="num_frames",
                       tubelet_size="tubelet_size", hidden_size="embed_dim", num_hidden_layers="depth",
                       num_attention_heads="num_heads", decoder_hidden_size="decoder_embed_dim",
                       decoder_num_hidden_layers="decoder_depth", decoder_num_attention_heads="decoder_num_heads")


def from_hugging_face(weights: dict) -> dict:
    """A Hugging Face VideoMAEForPreTraining / VideoMAEForVideoClassification / VideoMAEModel state dict under
    the reference's names: encoder.* (as in a pretraining checkpoint), decoder.*, encoder_to_decoder,
    mask_token, fc_norm, head. Hugging Face keeps query, key and value as three Linears; they are stacked back
    into qkv. A key bias (some transformers 5 files store one) is dropped: q·(k + b) adds q·b to every score
    of a query, the same for all keys, so the softmax takes it out again."""
    out, qkv = {}, {}
    for key, value in weights.items():
        if key.startswith(("embeddings.", "encoder.layer.", "layernorm.")):  # VideoMAEModel saved on its own
            key = "videomae." + key
        for old, new in HF_NAMES:
            key = key.replace(old, new)
        block, found, part = key.rpartition(".attention.attention.")
        if found and part in ("query.weight", "key.weight", "value.weight"):
            qkv.setdefault(block, {})[part] = value
        elif not (found and part == "key.bias"):
            out[key] = value
    for block, w in qkv.items():  # (3C, C): the q rows, then k, then v, the order Attention splits them in
        out[f"{block}.attn.qkv.weight"] = torch.cat([w["query.weight"], w["key.weight"], w["value.weight"]])
    return out


# What to_hugging_face writes: HF_NAMES backwards, with the older bias spelling (q_bias, v_bias), which
# transformers 4 reads as it is and transformers 5 renames to query.bias / value.bias as it loads.
HF_WRITTEN = [(ours, hf) for hf, ours in reversed(HF_NAMES)
              if hf not in ("attention.attention.query.bias", "attention.attention.value.bias", "classifier.")]


def to_hugging_face(weights: dict) -> dict:
    """The inverse of from_hugging_face: a pretraining model's or a classifier's state dict under transformers'
    VideoMAE names (videomae.*, decoder.decoder_layers.*, fc_norm, classifier), qkv split into query, key and
    value (the key without a bias, as theirs). Tensors are copies, as safetensors wants them."""
    out = {}
    for key, value in weights.items():
        if key.startswith(("patch_embed.", "blocks.")):  # a classifier's encoder, named as in pretraining
            key = "encoder." + key
        if key.startswith("head."):  # only the classifier's: the decoder's head keeps its name
            key = "classifier." + key.removeprefix("head.")
        block, found, _ = key.rpartition(".attn.qkv.weight")
        parts = zip(("query", "key", "value"), value.chunk(3)) if found else [(None, value)]
        for name, tensor in parts:
            new = f"{block}.attention.attention.{name}.weight" if name else key
            for ours, hf in HF_WRITTEN:
                new = new.replace(ours, hf)
            out[new] = tensor.clone().contiguous()
    return out


def hugging_face_config(cfg: VideoMAEConfig, architecture: str, num_labels: int | None = None,
                        use_mean_pooling: bool = True, norm_pix_loss: bool = True) -> dict:
    """The config.json of a transformers VideoMAE folder for `cfg` (architecture: VideoMAEModel,
    VideoMAEForVideoClassification or VideoMAEForPreTraining). Giant is patch_size 14 and an intermediate
    size of 48/11 · 1408 = 6144 (decoder 2234); transformers builds the rest from these."""
    hf = {theirs: getattr(cfg, ours) for theirs, ours in HF_CONFIG_NAMES.items()}
    hf.update(model_type="videomae", architectures=[architecture], num_channels=3, hidden_act="gelu",
              intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
              decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio), layer_norm_eps=1e-6,
              qkv_bias=True, use_mean_pooling=use_mean_pooling, norm_pix_loss=norm_pix_loss,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if num_labels is not None:
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    return hf


def from_v2_release(weights: dict) -> dict:
    """A Hugging Face V2 release (modeling_videomaev2.py): the reference's classifier under `model.`."""
    return {k.removeprefix("model."): v for k, v in weights.items()}


# mmaction2's names -> the reference's (mmaction/models/backbones/vit_mae.py): mmcv's PatchEmbed calls its
# Conv3d `projection`, mmcv's FFN keeps fc1 in a Sequential with the activation (layers.0.0) and fc2 after it
# (layers.1); the head is the recognizer's cls_head.fc_cls.
MMACTION2_NAMES = [("patch_embed.projection.", "patch_embed.proj."), ("mlp.layers.0.0.", "mlp.fc1."),
                   ("mlp.layers.1.", "mlp.fc2."), ("cls_head.fc_cls.", "head.")]


def from_mmaction2(weights: dict) -> dict:
    """An mmaction2 VideoMAE / V2 state dict under the reference's names. It stores its fixed sin/cos
    position table as a buffer (backbone.pos_embed); ours is rebuilt for the model's grid, so it is dropped."""
    out = {}
    for key, value in weights.items():
        key = key.removeprefix("backbone.")
        for old, new in MMACTION2_NAMES:
            key = key.replace(old, new)
        if key != "pos_embed":
            out[key] = value
    return out


def unwrap(checkpoint: dict) -> dict:
    """The state dict inside a checkpoint: under `model` (ours, the reference's), `module` (DeepSpeed),
    `state_dict` (mmengine) or bare, without the `_orig_mod.` / `module.` prefixes of compiled or wrapped runs."""
    for key in ("model", "module", "model_state", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    out = {}
    for k, v in checkpoint.items():
        for prefix in ("_orig_mod.", "module."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def layout_of(checkpoint: dict) -> str:
    """Which of the five layouts (top of this section) a checkpoint's contents are in."""
    if isinstance(checkpoint.get("state_dict"), dict) and "meta" in checkpoint:
        return MMACTION2
    keys = unwrap(checkpoint)
    if any(k.startswith(("videomae.", "embeddings.patch_embeddings.")) for k in keys):
        return HF_V1
    if any(k.startswith("model.patch_embed.") for k in keys):
        return HF_V2
    return OURS if isinstance(checkpoint.get("args"), dict) else REFERENCE


def state_dict_of(checkpoint: dict, source: str) -> dict:
    """The weights inside a checkpoint's contents, in any of the five layouts, under the reference's names."""
    weights = unwrap(checkpoint)
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{source}: expected a state dict of tensors (optionally under 'model', 'module' or "
                              "'state_dict')")
    convert = {HF_V1: from_hugging_face, HF_V2: from_v2_release, MMACTION2: from_mmaction2}.get(layout_of(checkpoint))
    return convert(weights) if convert else weights


def has_decoder(weights: dict) -> bool:
    return "mask_token" in weights and any(k.startswith("decoder.") for k in weights)


# -----------------------------------------------------------------------------------------------------
# The model a file holds: its size read off the file


MODEL_FIELDS = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio", "decoder_embed_dim",
                "decoder_num_heads")  # what --model (an entry of the size table) decides
DECODER_FIELDS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def mlp_ratio_for(hidden: int, dim: int) -> float:
    """A ratio r with int(dim · r) == hidden, which is how Block sizes its MLP (hidden / dim can round down)."""
    r = hidden / dim
    while int(dim * r) < hidden:
        r = math.nextafter(r, math.inf)
    return r


def blocks_in(weights: dict, prefix: str) -> int:
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in weights if k.startswith(prefix)), default=-1)


def sizes_of(weights: dict) -> dict:
    """The config fields a state dict's shapes give away: widths, depths, cube size, MLP ratio. (Head counts
    do not show in any shape; positions are not stored, so input size and frame count do not either.)"""
    enc = encoder_names(weights)
    embed = enc.get("patch_embed.proj.weight")  # (D, 3, t, p, p)
    if embed is None or embed.dim() != 5:
        return {}
    dim, _, t, p, _ = embed.shape
    sizes = dict(embed_dim=dim, tubelet_size=t, patch_size=p, depth=blocks_in(enc, "blocks."))
    if "blocks.0.mlp.fc1.weight" in enc:
        sizes["mlp_ratio"] = mlp_ratio_for(enc["blocks.0.mlp.fc1.weight"].shape[0], dim)
    if has_decoder(weights):
        sizes.update(decoder_embed_dim=weights["mask_token"].shape[-1],
                     decoder_depth=blocks_in(weights, "decoder.blocks."))
    return sizes


def table_heads(sizes: dict) -> dict:
    """Head counts for widths the size table has (none for another width: then the file or --model must say)."""
    heads = {}
    for spec in SIZES.values():
        if sizes.get("embed_dim") == spec["embed_dim"]:
            heads["num_heads"] = spec["num_heads"]
        if sizes.get("decoder_embed_dim") == spec["decoder_embed_dim"]:
            heads["decoder_num_heads"] = spec["decoder_num_heads"]
    return heads


def args_sizes(args: dict) -> dict:
    """The config fields stored training arguments (ours or the reference's) give: the --model entry of the
    size table and the input flags."""
    name = args.get("model")
    name = ALIASES.get(name, name) if isinstance(name, str) else None
    sizes = dict(SIZES[name]) if name in SIZES else {}
    for flag, field in (("input_size", "img_size"), ("num_frames", "num_frames"), ("tubelet_size", "tubelet_size"),
                        ("decoder_depth", "decoder_depth")):
        if isinstance(args.get(flag), int):
            sizes[field] = args[flag]
    return sizes


def hf_config_sizes(hf: dict) -> dict:
    """The config fields of a Hugging Face config.json: a V2 release's `model_config` (the reference's own
    argument names) or transformers' VideoMAEConfig (HF_CONFIG_NAMES)."""
    if isinstance(hf.get("model_config"), dict):
        return {k: v for k, v in hf["model_config"].items() if k in ("img_size", "patch_size", "num_frames",
                "tubelet_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
    if hf.get("model_type") != "videomae":
        return {}
    sizes = {ours: hf[theirs] for theirs, ours in HF_CONFIG_NAMES.items() if theirs in hf}
    if isinstance(sizes.get("img_size"), (list, tuple)):
        sizes["img_size"] = sizes["img_size"][0]
    if "intermediate_size" in hf and "hidden_size" in hf:
        sizes["mlp_ratio"] = mlp_ratio_for(hf["intermediate_size"], hf["hidden_size"])
    return sizes


def differences(cfg: VideoMAEConfig, sizes: dict) -> list[tuple[str, int, int]]:
    """Where a config and a file's sizes disagree on what --model decides: (field, config's, file's)."""
    out = []
    for field in MODEL_FIELDS:
        if field in sizes:
            ours, theirs = getattr(cfg, field), sizes[field]
            if field == "mlp_ratio":  # compared as MLP widths, which is what the weights have
                field, ours, theirs = ("MLP width", int(cfg.embed_dim * ours),
                                       int(sizes.get("embed_dim", cfg.embed_dim) * theirs))
            if ours != theirs:
                out.append((field, ours, theirs))
    return out


@dataclass
class Checkpoint:
    """A checkpoint read for loading: its weights under the reference's names, the layout they came in, the
    training arguments it stores, and the config fields it states (sizes) with where those came from."""
    path: str
    layout: str
    weights: dict
    args: dict
    sizes: dict
    source: str  # "its stored arguments", "its config.json" or "its weight shapes"
    preset: str | None  # the entry of the size table it matches, if any


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Any public VideoMAE checkpoint (the five layouts above): a file, or a Hugging Face model folder
    (config.json and model.safetensors or pytorch_model.bin). Its size comes from what the file says: widths,
    depths, cube size and MLP ratio from the weights' shapes; head counts and input from its stored arguments,
    its config.json, or else the size table."""
    path = Path(path)
    file = path
    if path.is_dir():
        file = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if file is None:
            raise CheckpointError(f"{path}: a folder without model.safetensors or pytorch_model.bin (a Hugging Face "
                                  "model folder has one of them next to its config.json)")
    contents = load_checkpoint(file)
    layout, weights, args = layout_of(contents), state_dict_of(contents, str(path)), saved_args(contents)
    hf, info = {}, file.parent / "config.json"
    if layout in (HF_V1, HF_V2) and info.is_file():
        try:
            hf = hf_config_sizes(json.loads(info.read_text()))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{info}: cannot be read as JSON ({e})") from e
    stated, measured = args_sizes(args), sizes_of(weights)
    if "embed_dim" in stated and differences(config("base", **stated), measured):
        stated = {}  # arguments that do not describe the weights beside them: the weights are what loads
    sizes = {**table_heads(measured), **hf, **stated, **measured}  # later ones win: the shapes above all
    if not has_decoder(weights):  # a config.json lists decoder sizes even for a classifier
        sizes = {k: v for k, v in sizes.items() if k not in DECODER_FIELDS}
    source = "its stored arguments" if stated else "its config.json" if hf else "its weight shapes"
    name = ALIASES.get(args.get("model"), args.get("model")) if isinstance(args.get("model"), str) else None
    matching = [n for n in SIZES if not differences(config(n), sizes)] if sizes else []
    preset = name if name in SIZES and stated else matching[0] if matching else None
    return Checkpoint(str(path), layout, weights, args, sizes, source, preset)


def config_from_checkpoint(ckpt: Checkpoint, model: str | None = None, **overrides) -> VideoMAEConfig:
    """The model a checkpoint holds: the sizes it states over the size-table entry they match. `model`, when
    given (--model), must agree with everything the file states; it is needed only when the file cannot tell
    (a width the table does not have, and no head count in the file). `overrides` (input size, frames, drop
    path, ...) go on top."""
    sizes = ckpt.sizes
    if model is not None:
        try:
            clash = differences(config(model), sizes)
        except ValueError as e:  # an unknown name
            raise CheckpointError(f"--model: {e}") from e
        if clash:
            raise CheckpointError(f"--model {model} does not fit {ckpt.path} (read as {ckpt.layout}): --model {model} "
                                  f"has {', '.join(f'{f} {a}' for f, a, _ in clash)}; the file has "
                                  f"{', '.join(f'{f} {b}' for f, _, b in clash)} (read from {ckpt.source}). Leave "
                                  "--model out to take the file's own size.")
        base = model
    else:
        base = ckpt.preset
        needed = ["num_heads"] + (["decoder_num_heads"] if "decoder_embed_dim" in sizes else [])
        if base is None and (not sizes or any(f not in sizes for f in needed)):
            told = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in sizes.items())
            raise CheckpointError(f"{ckpt.path} (read as {ckpt.layout}) does not tell the model's size "
                                  f"({told or 'no weights with known names'}; not an entry of the size table, "
                                  f"and no head count): pass --model ({', '.join(SIZES)})")
        base = base or "base"  # every field the table sets comes from the file then
    return config(base, **{**sizes, **overrides})


# -----------------------------------------------------------------------------------------------------
# Loading: all of the encoder, or stop


class Loaded(NamedTuple):
    """What load_weights did: the model's tensors that start fresh (only those a load may leave: a
    classifier's new fc_norm and head), the file's tensors the model has no place for, and the lines that
    tell the user (the caller prints them)."""
    missing_keys: list[str]
    unexpected_keys: list[str]
    lines: list[str]

    def __str__(self) -> str:
        return "\n".join(self.lines)


def listed(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# Which public files have a decoder, for the message when a pretraining model is given a file without one.
WITH_DECODER = ("pretraining checkpoints: ours (train_pretrain.py's output/pretrain/checkpoint-*.pth), the "
                "reference's (e.g. vit_g_hybrid_pt_1200e.pth; V1's pretrain checkpoints) and Hugging Face V1's "
                "pre-trained-only models (MCG-NJU/videomae-base, -large, ...). The Hugging Face V2 releases, "
                "mmaction2's files and every fine-tuned or distilled file hold the encoder only: use them with "
                "train_finetune.py --finetune or extract_features.py")


def require_decoder(ckpt: Checkpoint) -> None:
    """Stop unless the checkpoint has a decoder (which pretraining and reconstructions need), saying which
    public files have one."""
    if not has_decoder(ckpt.weights):
        kind = "a fine-tuned classifier (head.*, fc_norm.*)" if "head.weight" in ckpt.weights else "an encoder"
        raise CheckpointError(f"{ckpt.path} (read as {ckpt.layout}) holds {kind} and no decoder, and pretraining "
                              f"and reconstructions need one (decoder.*, mask_token). Files with a decoder are the "
                              f"{WITH_DECODER}.")


def load_weights(model: nn.Module, source: "str | Path | Checkpoint", label_map: list[int] | None = None) -> Loaded:
    """Initialise `model` from a checkpoint (a path, or read_checkpoint's result) in any of the five layouts,
    or raise CheckpointError: nothing of the encoder may stay at its random init.

    A pretraining model takes a pretraining checkpoint whole (decoder included). A classifier takes a
    classifier's weights, or the encoder of a pretraining checkpoint as the reference's fine-tuning does: the
    decoder, mask token and the encoder's final LayerNorm are left out, and fc_norm and the head start fresh
    (reported). A head for another class count is dropped, unless `label_map` picks its rows (new class i =
    row label_map[i], e.g. the reference's misc/label_710to400.json). A weight of another shape is an error
    naming the key and both shapes. Returns what was done, as lines to print.
    """
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    path, where = ckpt.path, f"{ckpt.path} (read as {ckpt.layout})"
    weights, classifier, lines = dict(ckpt.weights), isinstance(model, VideoClassifier), []
    if classifier:
        weights = encoder_names(weights)
    else:
        require_decoder(ckpt)
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in weights and label_map is not None:
            if max(label_map) >= len(weights[key]):
                raise CheckpointError(f"{path}: label_map row {max(label_map)} is past the end of its "
                                      f"{len(weights[key])}-class head")
            weights[key] = weights[key][label_map]
        if key in weights and key in own and weights[key].shape != own[key].shape:
            lines.append(f"{path}: dropping {key} {tuple(weights.pop(key).shape)}, a head for another class count "
                         f"(the model's is {tuple(own[key].shape)})")
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in weights.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{where}: weights of a different shape (a checkpoint of another model size or "
                              "input?):\n  " + "\n  ".join(wrong))
    absent = [k for k in own if k not in weights]
    fresh = [k for k in absent if classifier and k.startswith(("fc_norm.", "head."))]
    left_out = [k for k in weights if k not in own and classifier
                and k.startswith(("decoder.", "encoder_to_decoder.", "mask_token", "norm."))]
    headless = [k for k in weights if k not in own and classifier and k.startswith("head.")]  # num_classes=0
    unused = [k for k in weights if k not in own and k not in left_out + headless]
    missing = [k for k in absent if k not in fresh]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} of the model's {len(own)} weights are not in the file and "
                              f"would keep their random init: {listed(missing)}. The file's tensors that fit "
                              f"nothing: {listed(unused) if unused else 'none'}")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    lines.insert(0, f"loaded {len(own) - len(absent)} of the model's {len(own)} tensors from {where}")
    if left_out:
        lines.append(f"  left out, as the reference's fine-tuning does: the pretraining decoder, mask token and "
                     f"final encoder norm ({len(left_out)} tensors)")
    if headless:
        lines.append("  left out: the file's head (this model has none)")
    if fresh:
        lines.append(f"  starting fresh (the file has none for this model): {listed(fresh)}")
    if "fc_norm.weight" in fresh and "head.weight" in weights:
        lines.append("  WARNING: the file has a head but no fc_norm, so its head was trained on other features "
                     "(a Hugging Face model with use_mean_pooling=False classifies token 0)")
    if unused:
        lines.append(f"  WARNING: {len(unused)} tensors of the file fit nothing in the model: {listed(unused)}")
    return Loaded(fresh, left_out + headless + unused, lines)
