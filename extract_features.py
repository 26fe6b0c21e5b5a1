"""Features from a trained encoder, one file per video, for retrieval, linear probes, clustering or heads
trained elsewhere.

    python extract_features.py --checkpoint C --data_path videos/ --output_dir features/
    python extract_features.py --checkpoint VideoMAEv2-Base/ --data_path list.txt --data_root /videos \\
        --output_dir features/ --test_num_segment 5 --test_num_crop 3
    torchrun --standalone --nproc_per_node=8 extract_features.py ...   # the videos split over 8 GPUs

Each video is cut into the views of fine-tuning's multi-view test (--test_num_segment windows x
--test_num_crop crops; 1 x 1 by default: the centre clip). Each view goes through the encoder, its tokens
are mean-pooled and fc_norm-ed (the classifier's input: vmae.py:VideoClassifier.forward_features), and the
views are averaged: <video>.npy, (D,) float32. With --tokens also <video>.tokens.npy, the encoder's output
tokens as a (T', H', W', D) grid, from one view (grids of other windows and crops do not line up).
index.csv lists each video, its file, its views and its label (when the list has labels). Files go under
--output_dir at the video's path below the data folder (or --data_root), so equal names stay apart.

--checkpoint is any checkpoint the loader takes (a file or a Hugging Face V2 folder); the model's size and
its input (frames, size) come from the file. A pretraining checkpoint's encoder has no fc_norm: its clip
vector is a LayerNorm of the mean token without a learned scale or shift, as fine-tuning starts.
--data_path is a folder (searched for videos) or a list in the pretraining format (`path`, `path label`,
`path start_idx total_frames [label]`).

Batched, in bf16 on a GPU that has it; under torchrun every process takes its share of the videos. Every
file is written atomically and a rerun skips the videos already written, so an interrupted run resumes;
extraction.json in --output_dir records the settings, and a rerun with other settings stops. Unreadable
videos stop the run with an error naming the file, or with --skip_bad_videos are skipped, counted and
listed, as in training.
"""
import argparse
import csv
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import data
import engine
import vmae

# What a rerun must share with the run that wrote the files it skips (and the precision it computes in).
SETTINGS = ("checkpoint", "num_frames", "sampling_rate", "input_size", "short_side_size", "test_num_segment",
            "test_num_crop", "sparse_sample")


class Setup(NamedTuple):
    """The flags, resolved; the model the checkpoint holds; the checkpoint, read once."""
    args: argparse.Namespace
    cfg: vmae.VideoMAEConfig
    start: checkpoints.Checkpoint


def parse_args(argv=None) -> Setup:
    p = argparse.ArgumentParser(description="VideoMAE features: one .npy per video", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a, Range = p.add_argument, engine.Range  # Range: each number's valid interval, checked as it is parsed
    a("--checkpoint", required=True, help="any checkpoint the loader takes: a file or a Hugging Face folder")
    a("--data_path", required=True, help="a folder of videos (searched recursively) or a list file")
    a("--output_dir", required=True)
    a("--tokens", action="store_true", help="also write each video's tokens, (T', H', W', D), from one view")
    a("--model", default=None, help="only when the file cannot tell its size (it must match it)")
    a("--batch_size", type=Range(int, 1), default=16, help="clips per forward pass and process")
    a("--test_num_segment", type=Range(int, 1), default=1, help="windows per video")
    a("--test_num_crop", type=Range(int, 1), default=1, help="crops per window")
    a("--sparse_sample", action="store_true", help="one frame from each of --num_frames segments (SSv2's sampling)")
    a("--num_frames", type=Range(int, 1, 1024), default=16, help="default: the checkpoint's, else this")
    a("--input_size", type=Range(int, 1, 4096), default=224, help="default: the checkpoint's, else this")
    a("--short_side_size", type=Range(int, 1, 8192), default=None, help="resize the short side to this, then crop "
      "(default: --input_size)")
    a("--sampling_rate", type=Range(int, 1), default=4, help="take every n-th frame")
    a("--data_root", default="", help="prefix for relative paths in --data_path's list")
    a("--fname_tmpl", type=engine.frame_names, default="img_{:05}.jpg", help="file names of extracted frames")
    a("--skip_bad_videos", action="store_true", help="skip unreadable videos (listed and counted) instead of stopping")
    a("--max_bad_fraction", type=Range(float, 0, 1), default=0.01, help="with --skip_bad_videos, stop once more than this "
      "share of the videos was unreadable")
    a("--num_workers", type=Range(int, 0), default=4)
    a("--device", type=engine.device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    a("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPUs that have it, "
      "else fp32")
    args = p.parse_args(argv)
    if args.tokens and args.test_num_segment * args.test_num_crop > 1:
        p.error("--tokens writes one view's token grid: use it with --test_num_segment 1 --test_num_crop 1")
    if not Path(args.data_path).exists():
        p.error(f"--data_path {args.data_path}: no such file or folder")
    start = engine.read_start(p, args.checkpoint)
    given = engine.resolve(p, argv, args, engine.checkpoint_flags(start))  # the file's input, unless given
    try:
        cfg = checkpoints.config_from_checkpoint(start, args.model if "model" in given else None,
                                                 img_size=args.input_size, num_frames=args.num_frames)
    except ValueError as e:  # CheckpointError, ConfigError
        p.error(engine.as_flags(str(e)))
    args.short_side_size = args.short_side_size or args.input_size
    if args.short_side_size < args.input_size:
        p.error(f"--short_side_size {args.short_side_size} is smaller than --input_size {args.input_size}")
    return Setup(args, cfg, start)


# -----------------------------------------------------------------------------------------------------
# Where features go


def feature_name(path: str, base: str) -> str:
    """A video's file under --output_dir, without the suffix: its path below `base` (outside it, its whole
    path), its extension kept, so that a.mp4 and a.avi stay apart."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base or "."))
    return rel if not rel.startswith("..") else os.path.abspath(path).lstrip(os.sep)


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add .npy to a name
            np.save(f, array)
    engine.atomic_write(path, write)


def check_settings(out: Path, settings: dict, write: bool) -> None:
    """extraction.json: the settings the files in `out` were made with; a rerun must use the same."""
    path = out / "extraction.json"
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise engine.RunError(f"{path}: cannot be read ({e}); it records how the features in {out} were "
                                  "made: restore it, or use another --output_dir") from e
        changed = [f"{k}: {before.get(k)!r} then, {v!r} now" for k, v in settings.items() if before.get(k) != v]
        if changed:
            raise engine.RunError(f"{out} holds features made with other settings ({'; '.join(changed)}): use "
                                  f"another --output_dir, or delete {path} to mix them on purpose")
    elif write:
        engine.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(settings, indent=2) + "\n"))


def write_index(out: Path, samples: list[data.Sample], names: list[str], views: int) -> int:
    """index.csv: video, file, views (and label, when the list has labels) of every video written so far."""
    labelled = any(s.label >= 0 for s in samples)
    rows = [[s.path, f"{name}.npy", views] + ([s.label] if labelled else [])
            for s, name in zip(samples, names) if (out / f"{name}.npy").is_file()]
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([["video", "file", "views"] + (["label"] if labelled else [])] + rows)
    engine.atomic_write(out / "index.csv", write)
    return len(rows)


# -----------------------------------------------------------------------------------------------------
# The run


@torch.no_grad()
def extract(model: vmae.VideoClassifier, dataset: data.FinetuneDataset, names: list[str], out: Path, args,
            dist: engine.Dist, precision: str) -> int:
    """Run every view of the dataset's videos through the model in order and write each video's files as
    soon as its last view is in. Returns how many videos were written."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                         pin_memory=dist.device.type == "cuda")
    views, grid, written = dataset.num_views, model.cfg.grid, 0
    pooled_sum, tokens, item = None, None, 0
    bar = tqdm(total=len(dataset), unit="clip", desc="features", disable=not dist.is_main, dynamic_ncols=True)
    for clips, *_ in loader:
        with engine.autocast(dist.device, precision):
            token_batch, pooled = model.forward_features(clips.to(dist.device, non_blocking=True))  # (B, N, D), (B, D)
        pooled, token_batch = pooled.float().cpu(), token_batch.float().cpu() if args.tokens else None
        for b in range(len(clips)):
            video, view = divmod(item, views)
            pooled_sum = pooled[b] if view == 0 else pooled_sum + pooled[b]
            if args.tokens:
                tokens = token_batch[b].reshape(*grid, -1)  # (T', H', W', D); one view
            if view == views - 1 and not dataset.skipped(video):  # the video's last view: write it
                save_npy(out / f"{names[video]}.npy", (pooled_sum / views).numpy())
                if args.tokens:
                    save_npy(out / f"{names[video]}.tokens.npy", tokens.numpy())
                written += 1
            item += 1
        bar.update(len(clips))
    bar.close()
    return written


def main(argv=None):
    args, cfg, start = parse_args(argv)
    dist = engine.setup_distributed(args.device)
    precision = engine.resolve_precision(args.precision, dist.device)
    out = Path(args.output_dir)
    settings = ({k: getattr(args, k) for k in SETTINGS}
                | {"checkpoint": os.path.abspath(args.checkpoint), "precision": precision})
    check_settings(out, settings, write=dist.is_main)

    samples = list({s.path: s for s in data.read_pretrain_list(args.data_path, args.data_root)}.values())
    base = args.data_path if os.path.isdir(args.data_path) else args.data_root
    names = [feature_name(s.path, base) for s in samples]
    done = lambda i: ((out / f"{names[i]}.npy").is_file()
                      and (not args.tokens or (out / f"{names[i]}.tokens.npy").is_file()))
    todo = [i for i in range(len(samples)) if not done(i)]
    # Whole videos per process (a video's views are averaged in one place), split before looking at what is
    # done: another process may already be writing its share, and every process must see the same split.
    mine = [i for i in range(dist.rank, len(samples), dist.world_size) if not done(i)]

    model = vmae.VideoClassifier(cfg, num_classes=0)
    dist.print(checkpoints.load_weights(model, start))
    del start  # loaded: the file's tensors need not stay in memory
    model.to(dist.device).eval()
    views = args.test_num_segment * args.test_num_crop
    dist.print(f"{len(samples)} videos, {len(samples) - len(todo)} already done; {len(todo)} to go on {dist.world_size} "
            f"process(es) | {args.num_frames}x{args.input_size}, {views} view(s) each "
            f"({args.test_num_segment} windows x {args.test_num_crop} crops) | {dist.device}, {precision}")
    written, skipped, start = 0, [], time.time()
    if mine:
        dataset = data.FinetuneDataset(
            data.VideoList([samples[i] for i in mine], args.fname_tmpl), "test", num_frames=args.num_frames,
            sampling_rate=args.sampling_rate, input_size=args.input_size, short_side_size=args.short_side_size,
            test_num_segment=args.test_num_segment, test_num_crop=args.test_num_crop,
            sparse_sample=args.sparse_sample, skip_bad_videos=args.skip_bad_videos,
            max_bad_fraction=args.max_bad_fraction)
        written = extract(model, dataset, [names[i] for i in mine], out, args, dist, precision)
        skipped = dataset.bad_videos()
        seconds = time.time() - start
        print(f"{'' if dist.world_size == 1 else f'process {dist.rank}: '}{written} video(s) written, {len(dataset)} clips "
              f"in {seconds:.1f} s ({len(dataset) / seconds:.2f} clips/s)")
    if skipped:  # every process lists its own
        print(f"skipped {len(skipped)} unreadable video(s) (--skip_bad_videos): " + ", ".join(skipped))
    del model
    engine.leave_process_group()  # all processes done: the index sees every file
    if dist.is_main:
        listed = write_index(out, samples, names, views)
        print(f"{out / 'index.csv'} lists the {listed} of {len(samples)} videos with features")


if __name__ == "__main__":
    engine.run(main)
