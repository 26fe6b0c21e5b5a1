"""Pictures of dual masking: which cubes the encoder sees, which the decoder is asked for, which count in
the loss, and what a pretrained model paints back.

    python visualize.py masks --synthetic 0 --out masks.png                     # and masks.gif
    python visualize.py recon --checkpoint output/pretrain/checkpoint-last.pth --synthetic 3 --out recon.png
    python visualize.py recon --checkpoint C --video clip.mp4                   # or --frames a_frame_folder/
    python visualize.py recon --checkpoints output/pretrain/                   # across training (every checkpoint-N)
    python visualize.py heatmap --checkpoint C     # each cube's loss when hidden, over the clip: where it fails
    python visualize.py pca --checkpoint C         # the encoder's tokens as colours: what its features separate
    python visualize.py curves output/pretrain/log.txt other_run/log.txt --out curves.png

Each figure has a row per temporal slot (one tubelet; the row shows its first frame) and, but for curves, a GIF
over the slots (recon --checkpoints: over the checkpoints). The *_panels functions make a figure's panels once
for the PNG and the GIF; the matching *_figure functions draw them as a matplotlib Figure.

A model trained on normalised targets predicts each cube's pixels up to its own mean and spread: drawing them
takes the true cube's mean and standard deviation, which flatters the model; the recon figure's title says so.
"""
import argparse
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import matplotlib

if "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")  # files, not windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.animation import FuncAnimation, PillowWriter  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

import checkpoints  # noqa: E402
import data  # noqa: E402
import engine  # noqa: E402
import masking  # noqa: E402
import vmae  # noqa: E402

# The fill for cubes a panel does not show; not a multiple of 1/255, so no decoded pixel equals it.
HIDDEN = np.array([0.11, 0.11, 0.13])  # not seen by the encoder / not asked of the decoder
CHECKS = 0.45  # the light squares of the checkerboard marking cubes hidden from both sides
OVERLAY = {"encoder sees": (0.1, 0.8, 0.2), "in the loss": (0.95, 0.3, 0.1),
           "decoder query the encoder saw (not in the loss)": (0.2, 0.6, 1.0)}


def pixels(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) ImageNet-normalised -> (T, H, W, 3) floats in [0, 1]."""
    video = video.detach().float().cpu()
    mean, std = vmae.imagenet_stats(video)  # (3,) each
    return (video * std[:, None, None, None] + mean[:, None, None, None]).clamp(0, 1).permute(1, 2, 3, 0).numpy()


def per_pixel(token_values: torch.Tensor, cfg: vmae.VideoMAEConfig) -> np.ndarray:
    """(N,) per-token values -> (T', H, W): each value spread over its cube's pixels (one frame per slot)."""
    slots, h, w = cfg.grid
    grid = token_values.detach().cpu().reshape(slots, h, w)
    return grid.repeat_interleave(cfg.patch_size, 1).repeat_interleave(cfg.patch_size, 2).numpy()


def slot_frames(video: torch.Tensor, cfg: vmae.VideoMAEConfig) -> np.ndarray:
    return pixels(video)[::cfg.tubelet_size]  # (T', H, W, 3): the first frame of each tubelet


def fill(images: np.ndarray, where: np.ndarray, colour: np.ndarray) -> np.ndarray:
    out = images.copy()
    out[where] = colour
    return out


def checkerboard(shape: tuple, square: int = 4) -> np.ndarray:
    """(T', H, W, 3): HIDDEN and light grey squares, the mark for cubes nobody saw or predicted."""
    _, h, w = shape[:3]
    light = ((np.arange(h)[:, None] // square + np.arange(w) // square) % 2).astype(bool)  # (H, W)
    return np.broadcast_to(np.where(light[..., None], CHECKS, HIDDEN), shape)


def grid_figure(panels: dict[str, np.ndarray], title: str, cmap_last: str | None = None,
                slots: int | None = None, vmax_last: float = 0.5) -> plt.Figure:
    """Panels side by side, a row per temporal slot (the first `slots` of them); with cmap_last, the last
    panel is one value per pixel, drawn in that colour map from 0 to vmax_last."""
    panels = {name: images[:slots] for name, images in panels.items()}
    names = list(panels)
    rows = len(panels[names[0]])
    fig, axes = plt.subplots(rows, len(names), figsize=(2.1 * len(names), 2.1 * rows + 0.8), squeeze=False)
    for col, name in enumerate(names):
        for row in range(rows):
            ax = axes[row, col]
            last = cmap_last is not None and col == len(names) - 1
            ax.imshow(panels[name][row], cmap=cmap_last if last else None, vmin=0, vmax=vmax_last if last else None,
                      interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"slot {row}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1 - 0.1 / rows))
    return fig


def mask_panels(video: torch.Tensor, drawn: masking.Masks, cfg: vmae.VideoMAEConfig) -> dict[str, np.ndarray]:
    """The masks figure's columns, each (T', H, W, 3), for one clip (3, T, H, W) and its masks (a batch of one)."""
    frames = slot_frames(video, cfg)
    hidden = drawn.encoder[0]
    queried = torch.zeros_like(hidden).index_fill_(0, drawn.queries[0], True)
    loss = hidden & queried
    overlay = frames * 0.35
    for name, where in (("encoder sees", ~hidden), ("in the loss", loss),
                        ("decoder query the encoder saw (not in the loss)", ~hidden & queried)):
        px = per_pixel(where, cfg)
        overlay[px] = 0.35 * frames[px] + 0.65 * np.array(OVERLAY[name])
    return {"input": frames,
            f"encoder sees {int((~hidden).sum())}": fill(frames, per_pixel(hidden, cfg), HIDDEN),
            f"decoder queries {int(queried.sum())}": fill(frames, per_pixel(~queried, cfg), HIDDEN),
            f"in the loss {int(loss.sum())}": fill(frames, per_pixel(~loss, cfg), HIDDEN),
            "all three": overlay}


def masks_figure(panels: dict, cfg: vmae.VideoMAEConfig, dual: bool, slots: int | None = None) -> plt.Figure:
    decoder = "running-cell decoder mask" if dual else "no decoder mask (V1)"
    fig = grid_figure(panels, f"one clip: {cfg.num_tokens} cubes of {cfg.tubelet_size}x{cfg.patch_size}x"
                              f"{cfg.patch_size} px\ntube encoder mask, {decoder}", slots=slots)
    fig.legend(handles=[Patch(color=c, label=n) for n, c in OVERLAY.items()], loc="lower center", ncol=3, fontsize=8)
    return fig


@torch.no_grad()
def reconstruct(model: vmae.PretrainVideoMAE, video: torch.Tensor, drawn: masking.Masks,
                normalize_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One clip (3, T, H, W) under its masks (a batch of one) -> every cube's pixels (N, t·p·p·3), predicted
    where the loss counts and the input elsewhere, and which cubes were predicted (N,) bool."""
    cfg = model.cfg
    pred = model.eval()(video[None], drawn.visible, drawn.queries)[0].float()  # (N_q, F)
    every = torch.arange(cfg.num_tokens)[None]
    truth = vmae.reconstruction_target(video[None], every, cfg.patch_size, cfg.tubelet_size, normalize=False)[0]
    queries, counted = drawn.queries[0], drawn.in_loss[0]  # the encoder's own cubes are shown as they are
    if normalize_target:  # undo the per-cube, per-channel normalisation with the true cube's statistics
        cubes = truth[queries].unflatten(-1, (-1, 3))  # (N_q, t·p·p, 3)
        pred = (pred.unflatten(-1, (-1, 3)) * (cubes.std(dim=1, keepdim=True) + 1e-6)
                + cubes.mean(dim=1, keepdim=True)).flatten(1)
    out = truth.clone()
    out[queries[counted]] = pred[counted]
    return out, torch.zeros(cfg.num_tokens, dtype=torch.bool).index_fill_(0, queries[counted], True)


def recon_panels(model: vmae.PretrainVideoMAE, video: torch.Tensor, drawn: masking.Masks,
                 normalize_target: bool) -> dict[str, np.ndarray]:
    """input | masked input | reconstruction | error, each (T', H, W, 3) ((T', H, W) for the error)."""
    cfg = model.cfg
    cubes, predicted = reconstruct(model, video, drawn, normalize_target)
    per_channel = cubes.unflatten(-1, (-1, 3)).transpose(-1, -2)  # (N, 3, t·p·p): the target layout -> patchify's
    rebuilt = vmae.unpatchify(per_channel[None], cfg.grid, cfg.patch_size, cfg.tubelet_size)[0]  # (3, T, H, W)
    frames = slot_frames(video, cfg)
    recon = rebuilt.clamp(0, 1).permute(1, 2, 3, 0).numpy()[::cfg.tubelet_size]
    hidden, painted = per_pixel(drawn.encoder[0], cfg), per_pixel(predicted, cfg)
    error = np.abs(recon - frames).mean(axis=-1) * painted
    recon = np.where((hidden & ~painted)[..., None], checkerboard(recon.shape), recon)  # nobody saw or predicted
    return {"input": frames, "masked input": fill(frames, hidden, HIDDEN), "reconstruction": recon, "|error|": error}


def recon_figure(panels: dict, normalize_target: bool, dual: bool, slots: int | None = None) -> plt.Figure:
    how = ("predicted cubes drawn with the TRUE cube mean and std\n(the model predicts per-cube normalised pixels)"
           if normalize_target else "predicted pixels drawn as they are (a raw-pixel model)")
    note = "\nchecks: hidden from the encoder and not predicted (dropped by the decoder)" if dual else ""
    return grid_figure(panels, f"visible cubes pasted back; {how}{note}", cmap_last="magma", slots=slots)


def training_panels(models: dict[str, vmae.PretrainVideoMAE], video: torch.Tensor, drawn: masking.Masks,
                    normalize_target: bool) -> dict[str, np.ndarray]:
    """input | masked input | the reconstruction by each model (checkpoints of one run, by label), the same
    clip and masks for all, so only what the model learned changes from column to column."""
    cfg = next(iter(models.values())).cfg
    panels = {"input": slot_frames(video, cfg), "masked input": None}
    for label, model in models.items():
        if model.cfg.grid != cfg.grid or model.cfg.patch_size != cfg.patch_size:
            raise checkpoints.CheckpointError(f"{label}: another model or input ({model.cfg.grid}) than the first "
                                              f"checkpoint's ({cfg.grid}); compare checkpoints of one run")
        recon = recon_panels(model, video, drawn, normalize_target)
        panels["masked input"] = recon["masked input"]
        panels[label] = recon["reconstruction"]
    return panels


def training_figure(panels: dict, normalize_target: bool, slots: int | None = None) -> plt.Figure:
    how = "true cube mean and std put back" if normalize_target else "raw-pixel predictions as they are"
    return grid_figure(panels, f"one held-out clip under the same masks, reconstructed by checkpoints of one run\n"
                               f"({how})", slots=slots)


@torch.no_grad()
def cube_loss(model: vmae.PretrainVideoMAE, video: torch.Tensor, masks: masking.MaskConfig, normalize_target: bool,
              draws: int = 32, seed: int = 0) -> torch.Tensor:
    """(N,) each cube's squared error, averaged over `draws` random mask pairs in which the cube was hidden
    from the encoder and predicted by the decoder (the cubes the loss counts); nan for a cube never counted."""
    cfg = model.cfg
    drawn = masks.draw(draws, generator=torch.Generator().manual_seed(seed))
    clips = video[None].expand(draws, -1, -1, -1, -1)  # (draws, 3, T, H, W): one clip under many masks
    pred = model.eval()(clips, drawn.visible, drawn.queries).float()  # (draws, N_q, F)
    target = vmae.reconstruction_target(clips, drawn.queries, cfg.patch_size, cfg.tubelet_size, normalize_target)
    counted = drawn.in_loss.float()  # (draws, N_q)
    error = (pred - target).pow(2).mean(-1) * counted  # (draws, N_q)
    total = torch.zeros(cfg.num_tokens).index_add_(0, drawn.queries.flatten(), error.flatten())
    times = torch.zeros(cfg.num_tokens).index_add_(0, drawn.queries.flatten(), counted.flatten())
    return total / times  # 0 / 0 = nan where never counted


def heatmap_panels(model: vmae.PretrainVideoMAE, video: torch.Tensor, masks: masking.MaskConfig,
                   normalize_target: bool, draws: int = 32) -> dict[str, np.ndarray]:
    """input | the per-cube loss (cube_loss) over the clip | the loss alone (T', H, W), a share of the largest."""
    loss = cube_loss(model, video, masks, normalize_target, draws).nan_to_num(0.0)
    top = float(loss.max()) or 1.0
    heat = per_pixel(loss / top, model.cfg)
    frames = slot_frames(video, model.cfg)
    overlay = 0.4 * frames + 0.6 * plt.get_cmap("magma")(heat)[..., :3]
    return {"input": frames, "heat map over the clip": overlay, f"loss per cube (white: {top:.3g})": heat}


def heatmap_figure(panels: dict, normalize_target: bool, draws: int, slots: int | None = None) -> plt.Figure:
    """Where the model fails: each cube's loss when it is hidden, over the clip."""
    target = "per-cube normalised" if normalize_target else "raw-pixel"
    return grid_figure(panels, f"{target} squared error of each cube when hidden,\nmean over {draws} random masks "
                               "(black 0, white the largest)", cmap_last="magma", slots=slots, vmax_last=1.0)


@torch.no_grad()
def token_colours(model: vmae.PretrainVideoMAE, video: torch.Tensor) -> torch.Tensor:
    """(N, 3) colours in [0, 1]: the encoder's tokens of the clip (every cube visible) projected on their
    first three principal components, each stretched to [0, 1] between its 1st and 99th percentile."""
    tokens = model.eval().encode(video[None])[0].float()  # (N, D)
    centred = tokens - tokens.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)  # rows of v: principal directions
    projected = centred @ v[:3].T  # (N, 3)
    low, high = projected.quantile(0.01, dim=0), projected.quantile(0.99, dim=0)
    return ((projected - low) / (high - low + 1e-8)).clamp(0, 1)


def pca_panels(model: vmae.PretrainVideoMAE, video: torch.Tensor) -> dict[str, np.ndarray]:
    """input | the encoder's tokens as colours (token_colours), one per cube | the two blended."""
    colours = token_colours(model, video)  # (N, 3)
    image = np.stack([per_pixel(colours[:, c], model.cfg) for c in range(3)], axis=-1)  # (T', H, W, 3)
    frames = slot_frames(video, model.cfg)
    return {"input": frames, "encoder tokens as colours": image, "blended": 0.5 * frames + 0.5 * image}


def pca_figure(panels: dict, slots: int | None = None) -> plt.Figure:
    """What the features separate: cubes the encoder represents alike share a colour."""
    title = "the encoder's tokens of one clip (no mask):\nthe first three principal components as red, green, blue"
    return grid_figure(panels, title, slots=slots)


def read_log(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def probe_points(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(epochs trained, value) of a probe key: the score before training (probe_init_*) at 0, if logged."""
    init_key = key.replace("probe_", "probe_init_")
    start = [(0, rows[0][init_key])] if rows and init_key in rows[0] else []
    return start + [(r["epoch"] + 1, r[key]) for r in rows if key in r]


def curves_figure(paths: list) -> plt.Figure:
    """Loss, learning rate (and validation accuracy, and the frozen-encoder probe, if logged) per epoch, so runs of
    any batch size share the x axis, a line per log.txt. The probe: linear solid, k-NN dashed, attentive dotted,
    from the random encoder (epoch 0) on; where a line rises above epoch 0, pretraining taught what that probe reads."""
    logs = {str(Path(p).parent.name or p): read_log(p) for p in paths}
    keys = ["train_loss", "train_lr"] + [k for k in ("val_acc1", "probe_acc1")
                                         if any(k in r for rs in logs.values() for r in rs)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (name, rows) in enumerate(logs.items()):
            probes = (("probe_acc1", "-", "linear"), ("probe_knn_acc1", "--", "k-NN"),
                      ("probe_attentive_acc1", ":", "attentive"))
            lines = ([(probe_points(rows, k), style, None if i else kind) for k, style, kind in probes]
                     if key == "probe_acc1" else [([(r["epoch"] + 1, r[key]) for r in rows if key in r], "-", name)])
            for points, style, label in lines:
                if points:
                    ax.plot(*zip(*points), style, marker=".", color=f"C{i}", label=label)
        if key in ("train_loss", "probe_acc1"):  # the runs' colours are named in the loss panel
            ax.legend(fontsize=8)
        ax.set(xlabel="epoch", title="probe top-1 % (frozen encoder)" if key == "probe_acc1" else key)
        if key == "train_lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if key == "train_loss":  # a log axis keeps the slow part of the fall visible after the first drop
            ax.set_yscale("log")
    fig.tight_layout()
    return fig


def confusion_figure(confusion) -> plt.Figure:
    """A (K, K) confusion matrix of video counts (rows: true class, columns: predicted), each row shaded as
    shares of its class, so the diagonal reads as per-class accuracy; counts are written in up to 30 classes."""
    counts = np.asarray(confusion, dtype=float)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    k = len(counts)
    fig, ax = plt.subplots(figsize=(min(3 + 0.4 * k, 12), min(2.5 + 0.4 * k, 11.5)))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set(xticks=range(k), yticks=range(k))
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(j, i, int(n), ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(f"video-level confusion ({int(counts.sum())} videos)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    return fig


# -----------------------------------------------------------------------------------------------------
# Command line


def save(fig: plt.Figure, path, dpi: int = 100) -> None:
    """Write a figure atomically (never half an image under its name) and free it (pyplot keeps it until closed)."""
    engine.atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi))
    plt.close(fig)


def save_gif(panels: dict[str, np.ndarray], path: Path, cmap_last: str | None = None, vmax_last: float = 0.5,
             titles: list[str] | None = None) -> None:
    """An animation over the panels' first axis (slots, or a run's checkpoints), titles[i] above frame i if given."""
    names = list(panels)
    fig, axes = plt.subplots(1, len(names), figsize=(2.1 * len(names), 2.5 + 0.3 * bool(titles)), squeeze=False)
    images = []
    for ax, name in zip(axes[0], names):
        last = cmap_last is not None and name == names[-1]
        images.append(ax.imshow(panels[name][0], cmap=cmap_last if last else None, vmin=0,
                                vmax=vmax_last if last else None))
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    title = fig.suptitle(titles[0] if titles else "", fontsize=9)

    def show(i):
        for image, name in zip(images, names):
            image.set_data(panels[name][i])
        title.set_text(titles[i] if titles else "")
        return images
    animation = FuncAnimation(fig, show, frames=len(panels[names[0]]))
    engine.atomic_write(Path(path), lambda tmp: animation.save(tmp, writer=PillowWriter(fps=2)))
    plt.close(fig)


def load_clip(args) -> torch.Tensor:
    """One (3, T, H, W) clip: the centre window of --video or --frames, else a held-out built-in clip."""
    if args.video or args.frames:
        return data.one_clip(args.video or args.frames, args.num_frames, args.input_size, args.sampling_rate,
                             args.fname_tmpl)
    return data.held_out_clip(args.num_frames, args.input_size, args.sampling_rate, args.synthetic_size,
                              args.synthetic)


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pth")  # checkpoint-<epoch>.pth, epoch counted from 0


def checkpoint_files(paths: list[str]) -> list[Path]:
    """--checkpoints: the files as given, or for one folder its checkpoint-<epoch>.pth files by epoch."""
    if len(paths) == 1 and Path(paths[0]).is_dir():
        found = sorted((int(m.group(1)), p) for p in Path(paths[0]).iterdir()
                       if (m := CHECKPOINT_NAME.fullmatch(p.name)))
        if not found:
            raise FileNotFoundError(f"--checkpoints {paths[0]}: no checkpoint-<epoch>.pth files in the folder")
        return [p for _, p in found]
    return [Path(p) for p in paths]


def checkpoint_label(path: Path) -> str:
    m = CHECKPOINT_NAME.fullmatch(path.name)
    return f"{int(m.group(1)) + 1} epochs" if m else path.stem


class Setup(NamedTuple):
    """The flags, the checkpoints to draw (read, by label), the model's config and the masks on its grid."""
    args: argparse.Namespace
    starts: dict
    cfg: vmae.VideoMAEConfig | None
    masks: masking.MaskConfig | None


def parse_args(argv=None) -> Setup:
    """Each flag takes its value from the command line, else from the (first) checkpoint's training arguments
    (masks, target), else its default; the model and its input come from the checkpoint."""
    p = argparse.ArgumentParser(description="masks, reconstructions, per-cube loss, token PCA and training curves "
                                            "as PNG (+ GIF)", allow_abbrev=False)
    a, Range = p.add_argument, engine.Range
    a("figure", choices=["masks", "recon", "heatmap", "pca", "curves"])
    a("logs", nargs="*", help="curves: the log.txt files to plot")
    a("--checkpoint", help="recon, heatmap, pca: a pretraining checkpoint with its decoder (ours, the reference's or "
      "Hugging Face V1's)")
    a("--checkpoints", nargs="+", help="recon across training: checkpoints of one run, oldest first, or the run's "
      "folder (its checkpoint-<epoch>.pth files)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--video", help="a video file")
    source.add_argument("--frames", help="a folder of extracted frames (named by --fname_tmpl, from 1)")
    source.add_argument("--synthetic", type=Range(int, 0), default=0, help="index of a held-out built-in clip")
    a("--out", help="output PNG (a GIF is written beside it, but for curves)")
    a("--model", default="base", help="masks: the size whose grid to show; with a checkpoint: read from it (given, "
      "it must match)")
    a("--input_size", type=Range(int, 1, 4096), default=224)
    a("--num_frames", type=Range(int, 1, 1024), default=16)
    a("--sampling_rate", type=Range(int, 1), default=4)
    a("--fname_tmpl", type=engine.frame_names, default="img_{:05}.jpg")
    a("--synthetic_size", type=Range(int, 1), default=1024, help="the --synthetic_size pretraining used")
    theirs = "default: the checkpoint's, else this"
    a("--mask_type", default="tube", choices=list(masking.MASKS), help=theirs)
    a("--mask_ratio", type=Range(float, 0, 1, open_low=True, open_high=True), default=0.9, help=theirs)
    a("--decoder_mask_type", default="run_cell", choices=list(masking.MASKS), help=theirs)
    a("--decoder_mask_ratio", type=Range(float, 0, 1, open_high=True), default=0.5,
      help=f"{theirs} (0: no decoder mask, V1)")
    a("--normalize_target", action=argparse.BooleanOptionalAction, default=True, help="recon, heatmap: what the "
      "model predicts (default: what the checkpoint was trained on)")
    a("--draws", type=Range(int, 1, 100000), default=32, help="heatmap: random masks to average each cube's loss over")
    a("--slots", type=Range(int, 1), default=None, help="show only the first n temporal slots")
    a("--seed", type=Range(int, 0, 2 ** 32 - 1), default=0, help="for the masks")
    args = p.parse_args(argv)
    if args.figure in ("recon", "heatmap", "pca") and not (args.checkpoint or args.checkpoints):
        p.error(f"{args.figure} needs --checkpoint (a pretraining checkpoint with its decoder)")
    if args.checkpoints and (args.figure != "recon" or args.checkpoint):
        p.error("--checkpoints is for recon across training, instead of --checkpoint")
    if args.figure == "curves":
        if not args.logs:
            p.error("curves needs one or more log.txt files")
        return Setup(args, {}, None, None)
    paths = checkpoint_files(args.checkpoints) if args.checkpoints else [args.checkpoint] if args.checkpoint else []
    starts = {checkpoint_label(Path(path)): engine.read_start(p, path) for path in paths}
    for start in starts.values():
        checkpoints.require_decoder(start)  # what these figures need, before the size the file states
    trained_with = next(iter(starts.values())).args if starts else {}
    layer = {k: trained_with[k] for k in ("mask_type", "mask_ratio", "decoder_mask_type", "decoder_mask_ratio")
             if k in trained_with}
    layer["normalize_target"] = checkpoints.trained_on_normalized_targets(trained_with)  # either spelling
    given = engine.resolve(p, argv, args, layer if starts else {})
    if "model" not in given:
        args.model = None  # the checkpoint's own size
    try:
        if starts:
            cfg = checkpoints.config_from_checkpoint(next(iter(starts.values())), args.model)
            args.num_frames, args.input_size = cfg.num_frames, cfg.img_size  # the clip the model takes
        else:
            cfg = vmae.config(args.model or "base", img_size=args.input_size, num_frames=args.num_frames)
    except ValueError as e:  # CheckpointError, ConfigError
        p.error(engine.as_flags(str(e)))
    return Setup(args, starts, cfg, engine.mask_config(p, args, cfg.grid))


def load_model(start: checkpoints.Checkpoint, model: str | None = None) -> vmae.PretrainVideoMAE:
    """A pretraining model (decoder included) from a checkpoint, in eval mode."""
    net = vmae.PretrainVideoMAE(checkpoints.config_from_checkpoint(start, model)).eval()
    print(checkpoints.load_weights(net, start))
    return net


def main(argv=None):
    args, starts, cfg, masks = parse_args(argv)
    out = Path(args.out or f"{args.figure}.png")
    if args.figure == "curves":
        save(curves_figure(args.logs), out)
        print(f"wrote {out}")
        return
    models = {label: load_model(start, args.model) for label, start in starts.items()}
    model = next(iter(models.values()), None)
    video = load_clip(args)
    torch.manual_seed(args.seed)
    drawn = masks.draw(1)
    normalize, gif = args.normalize_target, {}  # gif: how the GIF draws its last panel, or titles its frames
    if args.figure == "masks":
        panels = mask_panels(video, drawn, cfg)
        fig = masks_figure(panels, cfg, masks.dual, args.slots)
    elif args.figure == "recon" and args.checkpoints:  # the GIF: one frame per checkpoint, the slots in a row
        panels = training_panels(models, video, drawn, normalize)
        fig = training_figure(panels, normalize, args.slots)
        rows = [np.concatenate(list(images[:args.slots]), axis=1) for images in panels.values()]
        panels = {"input, masked input, reconstruction":
                  np.stack([np.concatenate([*rows[:2], row]) for row in rows[2:]])}
        gif = dict(titles=list(models))
    elif args.figure == "recon":
        panels, gif = recon_panels(model, video, drawn, normalize), dict(cmap_last="magma")
        fig = recon_figure(panels, normalize, masks.dual, args.slots)
    elif args.figure == "heatmap":
        panels, gif = heatmap_panels(model, video, masks, normalize, args.draws), dict(cmap_last="magma", vmax_last=1)
        fig = heatmap_figure(panels, normalize, args.draws, args.slots)
    else:
        panels = pca_panels(model, video)
        fig = pca_figure(panels, args.slots)
    save(fig, out, dpi=60)
    save_gif(panels, out.with_suffix(".gif"), **gif)
    print(f"wrote {out} and {out.with_suffix('.gif')}")


if __name__ == "__main__":
    engine.run(main)
