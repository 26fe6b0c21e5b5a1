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
state_dict keys and shapes, so its checkpoints load with strict=True and ours load into it (checkpoints.py
reads the other published layouts into these names).
"""
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# The model takes clips normalised per channel with ImageNet's mean and std (data.py); the pixel target undoes it.
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
    # Not the paper's: the laptop demos' size, a 4-block 64-wide ViT on 8-pixel patches (32 px: a 4 x 4 grid).
    # It learns the built-in clips' labels in minutes on a CPU, where a ViT-S stays at chance for far longer.
    "demo": dict(embed_dim=64, depth=4, num_heads=2, decoder_embed_dim=64, decoder_num_heads=2, patch_size=8),
    # Not the paper's either: study.py's GPU setting, a 6-block 192-wide ViT on 8-pixel patches (112 px: 14 x 14).
    "study": dict(embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=96, decoder_num_heads=3, patch_size=8),
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


class CubeEmbed(nn.Module):
    """A Conv3d with kernel = stride = (t, p, p): one D-dim token per cube, computed as one matmul of the
    flattened kernel (D, 3·t·p·p) with the cubes' pixels, so the pretraining encoder embeds only the ~10 %
    of cubes it will see. The parameter stays a Conv3d weight (D, 3, t, p, p), as in the reference."""

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
    """Multi-head self-attention with one fused qkv matmul. Query and value have a bias (q_bias, v_bias, as
    in the reference), the key a zero one: a fixed buffer, not made anew in every forward, and not saved."""

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

    def forward(self, video: Tensor, visible: Tensor | None = None) -> Tensor:
        """video (B, 3, T, H, W), visible (B, N_vis) token indices or None for all -> (B, N_vis, D)."""
        expected = (3, self.cfg.num_frames, self.cfg.img_size, self.cfg.img_size)
        if video.dim() != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(f"video must be (B, {', '.join(map(str, expected))}) for this config "
                             f"(num_frames={self.cfg.num_frames}, img_size={self.cfg.img_size}); "
                             f"got {tuple(video.shape)}")
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
        # The reference's init; encoder_to_decoder keeps PyTorch's default, mask_token is a normal cut at ±1σ.
        init_linear_and_norm(self.encoder, nn.init.xavier_uniform_)
        init_linear_and_norm(self.decoder, nn.init.xavier_uniform_)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(self, video: Tensor, visible: Tensor, queries: Tensor) -> Tensor:
        """video (B, 3, T, H, W), ImageNet-normalised; visible (B, N_vis), the positions the encoder sees;
        queries (B, N_q), those the decoder predicts (masking.Masks has both) -> (B, N_q, 3·t·p²) cube pixels."""
        x = self.encoder(video, visible)  # (B, N_vis, D)
        x = self.encoder_to_decoder(x)  # (B, N_vis, Dd)
        pos = self.pos_embed.to(x.dtype)  # (N, Dd)
        # The encoded tokens first, then a mask token per query, each plus its position: nothing to reorder.
        x = torch.cat([x + pos[visible], self.mask_token.to(x.dtype) + pos[queries]], dim=1)  # (B, N_vis + N_q, Dd)
        return self.decoder(x, queries.shape[1])  # (B, N_q, 3·t·p²)

    def encode(self, video: Tensor) -> Tensor:
        """The encoder on every cube, no mask: (B, 3, T, H, W) -> (B, N, D), e.g. for probe.py's probes."""
        return self.encoder(video)


# -----------------------------------------------------------------------------------------------------
# Target and loss


def imagenet_stats(like: Tensor) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std, (3,) each, on `like`'s device. Filled in from Python numbers: a tensor made
    from a list would be a host-to-device copy, which on a GPU first waits for every queued kernel."""
    stats = like.new_empty(2, 3)  # (mean or std, channel)
    for c in range(3):
        stats[0, c], stats[1, c] = IMAGENET_MEAN[c], IMAGENET_STD[c]
    return stats[0], stats[1]


@torch.no_grad()
def reconstruction_target(video: Tensor, positions: Tensor, patch_size: int, tubelet_size: int,
                          normalize: bool = True) -> Tensor:
    """(B, 3, T, H, W) normalised video, positions (B, M) -> (B, M, 3·t·p²): the pixels of those cubes,
    channel fastest, as the decoder predicts them. The ImageNet normalisation is undone (pixels in [0, 1]);
    with `normalize`, each cube is standardised per colour channel over its t·p·p pixels: (x - mean) /
    (unbiased std + 1e-6), the reference's formula (MAE's norm_pix_loss pools all channels and puts the
    epsilon under the root). The reference hard-codes a tubelet of 2 and normalises all N cubes first."""
    cubes = gather_tokens(patchify(video.float(), patch_size, tubelet_size), positions)  # (B, M, 3, t·p·p)
    mean, std = imagenet_stats(cubes)  # (3,) each
    cubes = cubes * std[:, None] + mean[:, None]  # pixels in [0, 1]
    if normalize:
        cube_std, cube_mean = torch.std_mean(cubes, dim=-1, correction=1, keepdim=True)  # unbiased, as torch.var
        cubes = (cubes - cube_mean) / (cube_std + 1e-6)
    return cubes.transpose(-1, -2).flatten(2)  # (B, M, t·p·p·3), channel fastest like the reference


def pretrain_loss(pred: Tensor, target: Tensor, in_loss: Tensor) -> Tensor:
    """Mean squared error per cube, averaged over the batch's cubes that count (in_loss (B, N_q): hidden from
    the encoder, predicted by the decoder): a token-weighted mean, not a mean of per-clip means."""
    per_cube = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N_q)
    return (per_cube * in_loss).sum() / in_loss.sum().clamp(min=1)


# -----------------------------------------------------------------------------------------------------
# The fine-tune / inference model


class VideoClassifier(Encoder):
    """The encoder on all N tokens, mean-pooled (no CLS token), LayerNorm (`fc_norm`), dropout, linear head.
    (The reference's `use_mean_pooling=False` path reads token 0, an ordinary patch token: not offered.)
    Keys are the reference fine-tune model's: patch_embed.*, blocks.*, fc_norm.*, head.*; the pretraining
    encoder's final LayerNorm has no place here, fine-tuning starts a fresh fc_norm. num_classes=0: no head
    (an identity), as the reference's and the Hugging Face V2 releases' encoders."""

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
