"""Features from a trained encoder, one file per video, for retrieval, probes, clustering or heads trained elsewhere.

    python extract_features.py --checkpoint C --data_path videos/ --output_dir features/
    python extract_features.py --checkpoint VideoMAEv2-Base/ --data_path list.txt --data_root /videos \\
        --output_dir features/ --test_num_segment 5 --test_num_crop 3
    torchrun --standalone --nproc_per_node=8 extract_features.py ...   # the videos split over 8 GPUs

Each view of fine-tuning's multi-view test (--test_num_segment windows x --test_num_crop crops; 1 x 1 by
default) goes through the encoder, its tokens mean-pooled and fc_norm-ed (vmae.py:VideoClassifier.forward_features;
a pretraining checkpoint's without a learned scale or shift, as fine-tuning starts), and the views are averaged:
<video>.npy, (D,) float32, under --output_dir at the video's path below the data folder (or --data_root).
--tokens adds <video>.tokens.npy, one view's output tokens as a (T', H', W', D) grid. index.csv lists each video,
its file, views and label (if listed). --data_path is a folder of videos or a list in the pretraining format.

Batched, in bf16 on a GPU that has it; under torchrun each process takes its share of the videos. Files are written
atomically and a rerun skips the videos already written; extraction.json records the weights (by fingerprint) and
settings, and a rerun into the folder with others stops, naming the difference. The folder takes one run at a time.
Unreadable videos stop the run, or with --skip_bad_videos are skipped, counted and listed, as in training.
"""
import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import data
import engine
import vmae

# How each video is cut into views (FinetuneDataset's): a rerun must share them, as well as weights and precision.
SETTINGS = ("num_frames", "sampling_rate", "input_size", "short_side_size", "test_num_segment", "test_num_crop",
            "sparse_sample")


def parse_args(argv=None) -> tuple[argparse.Namespace, vmae.VideoMAEConfig, checkpoints.Checkpoint]:
    """The flags, resolved; the model the checkpoint holds; the checkpoint, read once."""
    p = argparse.ArgumentParser(description="VideoMAE features: one .npy per video (the model, --num_frames and "
                                "--input_size are the checkpoint's unless given)", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a, Range = p.add_argument, engine.Range  # Range: each number's valid interval, checked as it is parsed
    a("--checkpoint", required=True, help="any checkpoint the loader takes: a file or a Hugging Face folder")
    a("--data_path", required=True, help="a folder of videos (searched recursively) or a list file")
    a("--output_dir", required=True)
    a("--tokens", action="store_true", help="also write each video's tokens, (T', H', W', D), from one view")
    a("--batch_size", type=Range(int, 1), default=16, help="clips per forward pass and process")
    a("--test_num_segment", type=Range(int, 1), default=1, help="windows per video")
    a("--test_num_crop", type=Range(int, 1), default=1, help="crops per window")
    a("--sparse_sample", action="store_true", help="one frame from each of --num_frames segments (SSv2's sampling)")
    a("--short_side_size", type=Range(int, 1, 8192), default=None, help="resize the short side to this, then crop "
      "(default: --input_size)")
    engine.add_input_flags(p)
    p.set_defaults(model=None, num_workers=4)  # --model, --num_frames, --input_size: the checkpoint's unless given
    args = p.parse_args(argv)
    if args.tokens and args.test_num_segment * args.test_num_crop > 1:
        p.error("--tokens writes one view's token grid: use it with --test_num_segment 1 --test_num_crop 1")
    if not Path(args.data_path).exists():
        p.error(f"--data_path {args.data_path}: no such file or folder")
    start, cfg = engine.tool_start(p, argv, args)
    args.short_side_size = args.short_side_size or args.input_size
    if args.short_side_size < args.input_size:
        p.error(f"--short_side_size {args.short_side_size} is smaller than --input_size {args.input_size}")
    return args, cfg, start


def feature_name(path: str, base: str) -> str:
    """A video's file under --output_dir, without the suffix: its path below `base` (outside it, its whole
    path), its extension kept, so that a.mp4 and a.avi stay apart."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base or "."))
    return rel if not rel.startswith("..") else os.path.abspath(path).lstrip(os.sep)


def save_npy(path: Path, array: np.ndarray) -> None:
    engine.atomic_write(path, lambda tmp: np.save(tmp, array))  # tmp ends in .npy: np.save adds no suffix


def check_settings(out: Path, settings: dict, started: bool) -> None:
    """extraction.json: what the features in `out` were made from and how. Once any are written (`started`),
    a rerun must use the same weights (by fingerprint) and settings; before that it records this run's."""
    path = out / "extraction.json"
    if started and path.is_file():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise engine.RunError(f"{path}: cannot be read ({e}); it records how the features in {out} were "
                                  "made: restore it, or use another --output_dir") from e
        changed = [f"{k}: {before.get(k)!r} then, {v!r} now" for k, v in settings.items()
                   if k != "checkpoint" and before.get(k) != v]
        if changed:
            raise engine.RunError(f"{out} holds features made from other weights or settings ({'; '.join(changed)}; "
                                  f"the weights then came from {before.get('checkpoint')}): use another "
                                  f"--output_dir, or delete {path} to mix them on purpose")
    else:
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


@torch.no_grad()
def extract(model: vmae.VideoClassifier, dataset: data.FinetuneDataset, names: list[str], out: Path, args,
            dist: engine.Dist, precision: str) -> int:
    """Run every view of the dataset's videos through the model in order and write each video's files as
    soon as its last view is in. Returns how many videos were written."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                         pin_memory=dist.device.type == "cuda")
    views, grid = dataset.num_views, model.cfg.grid
    written, item, pooled_sum = 0, 0, None
    bar = tqdm(total=len(dataset), unit="clip", desc="features", disable=not dist.is_main, dynamic_ncols=True)
    for clips, *_ in loader:
        with engine.autocast(dist.device, precision):
            token_batch, pooled = model.forward_features(clips.to(dist.device, non_blocking=True))  # (B, N, D), (B, D)
        pooled, token_batch = pooled.float().cpu(), token_batch.float().cpu() if args.tokens else None
        for b in range(len(clips)):
            video, view = divmod(item, views)
            pooled_sum = pooled[b] if view == 0 else pooled_sum + pooled[b]
            if view == views - 1 and not dataset.skipped(video):  # the video's last view: write it
                save_npy(out / f"{names[video]}.npy", (pooled_sum / views).numpy())
                if args.tokens:  # (T', H', W', D), of the one view
                    save_npy(out / f"{names[video]}.tokens.npy", token_batch[b].reshape(*grid, -1).numpy())
                written += 1
            item += 1
        bar.update(len(clips))
    bar.close()
    return written


def main(argv=None):
    args, cfg, start = parse_args(argv)
    dist = engine.setup_distributed(args.device)
    model = vmae.VideoClassifier(cfg, num_classes=0)
    dist.print(checkpoints.load_weights(model, start))  # a file that would leave a weight untrained, or NaN, stops
    del start  # loaded: the file's tensors need not stay in memory
    out = Path(args.output_dir)
    with engine.output_folder(out, dist):  # this run's alone, writable, no temporary files of a killed one
        extract_all(args, model, dist, out)


def extract_all(args, model: vmae.VideoClassifier, dist: engine.Dist, out: Path) -> None:
    """Every video not done yet, each process its share (whole videos, split before looking at what is done:
    another process may already be writing its share), then index.csv."""
    precision = engine.resolve_precision(args.precision, dist.device)
    model.to(dist.device).eval()
    samples = list({s.path: s for s in data.read_pretrain_list(args.data_path, args.data_root)}.values())
    base = args.data_path if os.path.isdir(args.data_path) else args.data_root
    names, views = [feature_name(s.path, base) for s in samples], args.test_num_segment * args.test_num_crop
    done = lambda i: ((out / f"{names[i]}.npy").is_file()
                      and (not args.tokens or (out / f"{names[i]}.tokens.npy").is_file()))
    todo = [i for i in range(len(samples)) if not done(i)]
    settings = {k: getattr(args, k) for k in SETTINGS} | {"precision": precision, "checkpoint": args.checkpoint}
    engine.on_main(dist, lambda: check_settings(
        out, settings | {"weights": checkpoints.fingerprint(model.state_dict())}, started=len(todo) < len(samples)))
    mine = [i for i in range(dist.rank, len(samples), dist.world_size) if not done(i)]
    dist.print(f"{len(samples)} videos, {len(samples) - len(todo)} already done; {len(todo)} to go on "
               f"{dist.world_size} process(es) | {args.num_frames}x{args.input_size}, {views} view(s) each "
               f"({args.test_num_segment} windows x {args.test_num_crop} crops) | {dist.device}, {precision}")
    written, skipped, begin = 0, [], time.time()
    if mine:
        dataset = data.FinetuneDataset(data.VideoList([samples[i] for i in mine], args.fname_tmpl), "test",
                                       skip_bad_videos=args.skip_bad_videos, max_bad_fraction=args.max_bad_fraction,
                                       **{k: getattr(args, k) for k in SETTINGS})
        written = extract(model, dataset, [names[i] for i in mine], out, args, dist, precision)
        skipped = dataset.bad_videos()
        seconds = time.time() - begin
        print(f"{'' if dist.world_size == 1 else f'process {dist.rank}: '}{written} video(s) written, "
              f"{len(dataset)} clips in {seconds:.1f} s ({len(dataset) / seconds:.2f} clips/s)")
    if skipped:  # every process lists its own
        print(f"skipped {len(skipped)} unreadable video(s) (--skip_bad_videos): " + ", ".join(skipped))
    engine.leave_process_group()  # every process done: the index sees every file
    if dist.is_main:
        listed = write_index(out, samples, names, views)
        print(f"{out / 'index.csv'} lists the {listed} of {len(samples)} videos with features")


if __name__ == "__main__":
    engine.run(main)
