"""Fine-tune VideoMAE V2: a pretrained encoder becomes a video classifier, tested on several views per video.

The recipe is the reference's: vmae.VideoClassifier (mean-pooled tokens, no CLS token), AdamW with layer-wise
learning-rate decay (block k of L at layer_decay^(L - k) times the head's rate, the cube embedding at
layer_decay^(L + 1)), warmup then cosine at --lr x batch_size x accum_iter x processes / 256 (--num_sample not
counted), stochastic depth, data.py's augmentation of two clips per decoded video, mixup/cutmix and label
smoothing. Every epoch scores each validation video's centre view and keeps checkpoint-best.pth. At the end, or
with --eval, the multi-view test averages the softmax of test_num_segment windows x test_num_crop crops
("16x5x3") per video: clip- and video-level accuracy, a per-class table and a confusion matrix.

With no --data_path it fine-tunes on the built-in synthetic clips, labelled by the direction the main shape
moves (8 classes). --finetune takes every public VideoMAE checkpoint (checkpoints.py); the model is the file's,
its input size and frame count the defaults. A file that would leave an encoder weight untrained stops the run.

    python train_finetune.py --finetune output/pretrain/checkpoint-last.pth        # the demo
    python train_finetune.py --eval --finetune output/finetune/checkpoint-best.pth  # multi-view test only
    python train_finetune.py --data_path lists/ --nb_classes 400 --model base --batch_size 16 \\
        --finetune vit_b_hybrid_pt_800e.pth                     # lists/ holds train.csv and val.csv
    python train_finetune.py --linear_probe --finetune ...      # frozen encoder, only the head learns
    torchrun --standalone --nproc_per_node=8 train_finetune.py ...   # one machine, 8 GPUs (DDP; --fsdp shards)
"""
import argparse
import json
import math
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import distributed
from tqdm import tqdm

import checkpoints
import data
import engine
import visualize
import vmae

# The demo without --data_path: the pretraining demo's model on the built-in classes (a --finetune checkpoint's
# size, then explicit flags, win). No mixup, cutmix or RandAugment: labels are directions, the schedule short.
DEMO = dict(**engine.DEMO_CLIPS, nb_classes=8, batch_size=16, epochs=25, warmup_epochs=5, lr=1e-2, aa="none",
            mixup=0.0, cutmix=0.0, synthetic_size=1024, test_num_segment=2, num_workers=2)
# --linear_probe: the usual protocol (MAE's): no stochastic depth, regularisation or heavy augmentation.
LINEAR_PROBE = dict(drop_path=0.0, weight_decay=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, reprob=0.0, aa="none")
# --data_set's choices, by the reference's names (SSV2 is TSN-sampled and never flipped: see its help).
DATA_SETS = ("Kinetics-400", "Kinetics-600", "Kinetics-700", "Kinetics-710", "SSV2", "UCF101", "HMDB51",
             "Diving48", "MIT")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="VideoMAE V2 fine-tuning and multi-view testing", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a, Range = p.add_argument, engine.Range  # Range: each number's valid interval, checked as it is parsed
    a("--nb_classes", type=Range(int, 1, 100000), default=400)
    a("--finetune", default=None, help="initial weights: a pretraining or fine-tuned checkpoint file or Hugging Face "
      "folder (ours, the reference's, Hugging Face V1/V2, mmaction2's)")
    a("--label_map", default=None, help="JSON list: new class i takes row i of the list of the checkpoint's head "
      "(e.g. the reference's misc/label_710to400.json); without it a head of another class count is dropped")
    a("--linear_probe", action="store_true", help="freeze the encoder and train only the head")
    a("--eval", action="store_true", help="only the multi-view test of the --finetune (or --resume) weights")
    a("--batch_size", type=Range(int, 1), default=64, help="videos per process per micro-step (x --num_sample clips)")
    a("--accum_iter", type=Range(int, 1), default=1, help="micro-steps accumulated per optimizer step")
    a("--epochs", type=Range(int, 1, 100000), default=30)
    a("--warmup_epochs", type=Range(int, 0), default=5)
    a("--lr", type=Range(float, 0, open_low=True), default=1e-3, help="base learning rate per 256 videos")
    a("--min_lr", type=Range(float, 0), default=1e-6, help="base LR the cosine decays towards (scaled like --lr)")
    a("--layer_decay", type=Range(float, 0, 1, open_low=True), default=0.75, help="layer-wise LR decay; 1 = none")
    a("--weight_decay", type=Range(float, 0), default=0.05)
    a("--opt_betas", type=Range(float, 0, 1, open_high=True), nargs=2, default=[0.9, 0.999])
    a("--opt_eps", type=Range(float, 0, open_low=True), default=1e-8)
    a("--clip_grad", type=Range(float, 0, open_low=True), default=None, help="max gradient norm")
    a("--drop_path", type=Range(float, 0, 1, open_high=True), default=0.1)
    a("--head_drop_rate", type=Range(float, 0, 1, open_high=True), default=0.0, help="dropout before the head")
    a("--init_scale", type=Range(float, 0), default=0.001, help="the fresh head's initial weights are scaled by this")
    a("--smoothing", type=Range(float, 0, 1, open_high=True), default=0.1, help="label smoothing")
    a("--mixup", type=Range(float, 0), default=0.8, help="mixup alpha; 0 = off")
    a("--cutmix", type=Range(float, 0), default=1.0, help="cutmix alpha; 0 = off")
    a("--mixup_prob", type=Range(float, 0, 1), default=1.0, help="chance that a batch is mixed at all")
    a("--mixup_switch_prob", type=Range(float, 0, 1), default=0.5, help="chance of cutmix, not mixup, when both are on")
    a("--aa", default="rand-m7-n4-mstd0.5-inc1", help="video RandAugment, or none")
    a("--reprob", type=Range(float, 0, 1), default=0.25, help="random erasing probability")
    a("--num_sample", type=Range(int, 1), default=2, help="augmented clips per decoded video (repeated augmentation)")
    a("--short_side_size", type=Range(int, 1, 8192), default=None, help="evaluation: resize the short side to this, "
      "then crop (default: --input_size)")
    a("--test_num_segment", type=Range(int, 1), default=5, help="test windows per video")
    a("--test_num_crop", type=Range(int, 1), default=3, help="test crops per window")
    a("--data_path", default=None, help="folder with train.csv / val.csv (/ test.csv), or with train/ val/ "
      "folders of class sub-folders; omitted: the built-in synthetic clips")
    a("--data_set", default="Kinetics-400", choices=DATA_SETS, help="sets --sparse_sample and --flip: "
      "SSV2 one frame per segment and no flip (left and right are different classes), the others dense windows, flips")
    a("--sparse_sample", action=argparse.BooleanOptionalAction, default=None,
      help="one frame from each of --num_frames equal segments (default: from --data_set)")
    a("--flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips in training "
      "(default: from --data_set; never for the built-in clips, whose labels are directions)")
    a("--synthetic_size", type=Range(int, 1), default=1024, help="built-in training videos (+ a quarter held out)")
    a("--output_dir", default="output/finetune")
    a("--resume", default=None, help="checkpoint to resume from (default: checkpoint-last.pth in --output_dir)")
    engine.add_input_flags(p)
    engine.add_run_flags(p)
    return p


class Setup(NamedTuple):
    """The command line resolved: flags, model, the checkpoint it starts from (read once), --label_map's rows."""
    args: argparse.Namespace
    cfg: vmae.VideoMAEConfig
    start: checkpoints.Checkpoint | None
    label_map: list[int] | None


def parse_args(argv=None) -> Setup:
    """Each flag's value: the command line's, else the starting checkpoint's (model, input and class count), else
    --linear_probe's protocol, else the demo's (without --data_path), else its default."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    start = engine.read_start(parser, args.finetune or args.resume)  # the model; its input and classes
    layer = engine.checkpoint_flags(start)
    if start and "nb_classes" in start.args:
        layer["nb_classes"] = start.args["nb_classes"]
    elif start and args.eval and "head.weight" in start.weights:  # --eval scores the file's own head
        layer["nb_classes"] = len(start.weights["head.weight"])
    given = engine.resolve(parser, argv, args, layer, LINEAR_PROBE if args.linear_probe else {},
                           DEMO if args.data_path is None else {})
    args.short_side_size = args.short_side_size or args.input_size
    if args.sparse_sample is None:
        args.sparse_sample = args.data_set == "SSV2"
    if args.flip is None:  # the built-in clips' labels are directions: never flipped
        args.flip = args.data_set != "SSV2" and args.data_path is not None
    cfg = engine.config_from_flags(parser, args, given, start)
    engine.check_shared_flags(parser, args)
    if args.short_side_size < args.input_size:
        parser.error(f"--short_side_size {args.short_side_size} is smaller than --input_size {args.input_size}")
    try:
        data.parse_rand_augment(args.aa)
    except ValueError as e:
        parser.error(f"--aa: {e}")
    if args.eval and not (args.finetune or args.resume):
        parser.error("--eval tests given weights: pass --finetune CHECKPOINT (or --resume CHECKPOINT)")
    if args.label_map and not (args.finetune or args.eval):
        parser.error("--label_map picks rows of the --finetune checkpoint's head: it needs --finetune")
    label_map = read_label_map(parser, args.label_map, args.nb_classes) if args.label_map else None
    return Setup(args, cfg, start if args.finetune or args.eval else None, label_map)


# -----------------------------------------------------------------------------------------------------
# Model and data


def read_label_map(parser: argparse.ArgumentParser, path: str, nb_classes: int) -> list[int]:
    """--label_map: a JSON list of nb_classes row numbers of the checkpoint's head (else a parser error)."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        parser.error(f"--label_map {path}: cannot be read as JSON ({e})")
    if not (isinstance(rows, list) and len(rows) == nb_classes and all(isinstance(r, int) and r >= 0 for r in rows)):
        parser.error(f"--label_map {path}: expected a JSON list of {nb_classes} row numbers (one per class of "
                     "--nb_classes), like the reference's misc/label_710to400.json")
    return rows


def build_model(setup: Setup, dist: engine.Dist) -> vmae.VideoClassifier:
    args = setup.args
    model = vmae.VideoClassifier(setup.cfg, args.nb_classes, args.head_drop_rate, args.init_scale)
    if setup.start:  # --finetune C, or --eval --resume C: C's weights only
        loaded = checkpoints.load_weights(model, setup.start, setup.label_map)
        setup.start.weights.clear()  # loaded: the file's tensors need not stay in memory for the run
        dist.print(loaded)
        if args.eval and loaded.missing_keys:
            raise engine.RunError(f"--eval: {setup.start.path} has no {checkpoints.listed(loaded.missing_keys)} for "
                                  f"this {args.nb_classes}-class model, so there is nothing to test")
    if args.linear_probe:  # fc_norm stays frozen too: a plain LayerNorm feeding the head normalised features
        model.requires_grad_(False)
        model.head.requires_grad_(True)
    return model


def build_dataset(mode: str, args, dist: engine.Dist) -> data.FinetuneDataset:
    """The 'train', 'validation' or 'test' split (--sparse_sample and --flip as --data_set set them)."""
    return data.build_finetune_dataset(
        mode, args.data_path, args.data_root, nb_classes=args.nb_classes, num_frames=args.num_frames,
        sampling_rate=args.sampling_rate, input_size=args.input_size, short_side_size=args.short_side_size,
        num_sample=args.num_sample, test_num_segment=args.test_num_segment, test_num_crop=args.test_num_crop,
        sparse_sample=args.sparse_sample, flip=args.flip, aa=args.aa, reprob=args.reprob,
        fname_tmpl=args.fname_tmpl, skip_bad_videos=args.skip_bad_videos, max_bad_fraction=args.max_bad_fraction,
        synthetic_videos=args.synthetic_size, share=engine.file_share(dist), num_workers=args.num_workers)


class Shard(torch.utils.data.Dataset):
    """One process's share of an evaluation set, items rank, rank + world, ...: (clip, label, video index, keep).
    Shares are padded to one length (FSDP's forward is collective) by repeats with keep = False, which count nowhere
    (DistributedSampler's count twice), as do the items of a video skipped as unreadable, read from a stand-in."""

    def __init__(self, dataset: data.FinetuneDataset, rank: int, world: int):
        self.dataset = dataset
        self.indices = range(rank, world * math.ceil(len(dataset) / world), world)  # padded to a multiple of world

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        item = index % len(self.dataset)
        clip, label, *video = self.dataset[item]  # test items add (video, view)
        keep = index < len(self.dataset) and not self.dataset.skipped(item // self.dataset.num_views)
        return clip, label, video[0] if video else item, keep


# -----------------------------------------------------------------------------------------------------
# Loss and evaluation


def mix(clips: torch.Tensor, labels: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix on the batch (with probability --mixup_prob) and its soft targets (B, K): one-hots
    smoothed by --smoothing, mixed like the clips. Unmixed, cross-entropy on them is label-smoothing CE."""
    on = random.random() < args.mixup_prob
    return data.mixup_cutmix(clips, labels, args.nb_classes, args.mixup if on else 0.0, args.cutmix if on else 0.0,
                             args.mixup_switch_prob, args.smoothing)


def topk_hits(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(2, B): 1 where the label is the top score / among the five top scores."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]  # (B, 5)
    return torch.stack([top[:, 0], top.any(1)]).float()


@torch.no_grad()
def evaluate(model, dataset: data.FinetuneDataset, args, dist: engine.Dist, precision: str, desc: str) -> dict:
    """Score every item of an evaluation set exactly once, split over the processes, summed per video in tensors on
    the device (docs/reference.md, traps 14 and 18). Returns, the same on every process: probs (V, K), each video's
    softmax summed over its views; views (V,), how many; labels (V,); over single clips, loss, acc1, acc5, clips."""
    batch_size = int(1.5 * args.batch_size)  # no gradients to keep: evaluation takes larger batches
    loader = torch.utils.data.DataLoader(Shard(dataset, dist.rank, dist.world_size), batch_size=batch_size,
                                         num_workers=args.num_workers, pin_memory=dist.device.type == "cuda",
                                         worker_init_fn=data.ignore_stop_signals)
    videos, k, dev = len(dataset.source), args.nb_classes, dist.device
    probs, views = torch.zeros(videos, k, device=dev), torch.zeros(videos, device=dev)
    labels = torch.full((videos,), -1, device=dev)
    sums = torch.zeros(4, device=dev)  # loss, top-1 hits, top-5 hits, clips
    model.eval()
    for clips, label, video, keep in tqdm(loader, desc=desc, disable=not dist.is_main, dynamic_ncols=True, leave=False):
        clips, label, video = (x.to(dev, non_blocking=True) for x in (clips, label, video))
        keep = keep.to(dev).float()  # (B,) 0 for the padding repeats
        with engine.autocast(dev, precision):
            logits = model(clips).float()  # (B, K)
        probs.index_add_(0, video, logits.softmax(1) * keep[:, None])
        views.index_add_(0, video, keep)
        labels[video] = label
        loss = F.cross_entropy(logits, label, reduction="none")
        sums += torch.cat([(loss @ keep)[None], topk_hits(logits, label) @ keep, keep.sum()[None]])
    if dist.world_size > 1:
        for total in (probs, views, sums):
            distributed.all_reduce(total)
        distributed.all_reduce(labels, op=distributed.ReduceOp.MAX)
    loss, top1, top5, clips = sums.tolist()
    return dict(probs=probs.cpu(), views=views.cpu(), labels=labels.cpu(), loss=loss / clips,
                acc1=100 * top1 / clips, acc5=100 * top5 / clips, clips=int(clips))


def video_level(result: dict) -> tuple[dict, torch.Tensor]:
    """Top-1/top-5 of each video's averaged softmax, and the confusion matrix (K, K) (rows: true class, columns:
    predicted). Videos with no views (all skipped as unreadable) are left out."""
    seen = result["views"] > 0
    mean = result["probs"][seen] / result["views"][seen, None]  # (V, K)
    labels, k = result["labels"][seen], mean.shape[1]
    top1, top5 = topk_hits(mean, labels).mean(1).tolist()
    confusion = torch.bincount(labels * k + mean.argmax(1), minlength=k * k).view(k, k)
    return dict(test_video_acc1=100 * top1, test_video_acc5=100 * top5, test_videos=int(seen.sum())), confusion


def multi_view_test(model, test_set: data.FinetuneDataset, args, dist: engine.Dist, precision: str, out: Path) -> dict:
    """The final test: each video's test_num_segment x test_num_crop views (data.py centres a single one:
    docs/reference.md, trap 15), softmax averaged. Rank 0 prints, writes per_class_accuracy.txt, confusion.png."""
    views = f"{args.num_frames}x{args.test_num_segment}x{args.test_num_crop}"
    result = evaluate(model, test_set, args, dist, precision, f"test {views}")
    stats, confusion = video_level(result)
    stats = dict(test_views=views, test_clip_acc1=result["acc1"], test_clip_acc5=result["acc5"],
                 test_clips=result["clips"], **stats)
    if dist.is_main:
        rows = ["class  videos  correct  top-1 %"]  # the per-class table
        for c, (total, right) in enumerate(zip(confusion.sum(1).tolist(), confusion.diag().tolist())):
            rows.append(f"{c:5d}  {total:6d}  {right:7d}  " + (f"{100 * right / total:7.2f}" if total else "      -"))
        table = "\n".join(rows)
        print(f"test ({views}: frames x windows x crops): clip-level (each view alone) "
              f"top-1 {stats['test_clip_acc1']:.2f}% top-5 {stats['test_clip_acc5']:.2f}% over {stats['test_clips']} "
              f"clips; video-level (softmax averaged over its views) top-1 {stats['test_video_acc1']:.2f}% "
              f"top-5 {stats['test_video_acc5']:.2f}% over {stats['test_videos']} videos")
        if args.nb_classes <= 20:
            print(table)
        out.mkdir(parents=True, exist_ok=True)
        engine.atomic_write(out / "per_class_accuracy.txt", lambda tmp: tmp.write_text(table + "\n"))
        visualize.save(visualize.confusion_figure(confusion), out / "confusion.png")
        engine.append_log(out, stats)
        print(f"wrote {out / 'per_class_accuracy.txt'}, {out / 'confusion.png'}")
    return stats


# -----------------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    setup = parse_args(argv)
    dist = engine.setup_distributed(setup.args.device)
    with engine.output_folder(Path(setup.args.output_dir), dist):  # this run's alone, writable, no stale files
        finetune(setup, dist)
    engine.leave_process_group()  # after finetune() freed DDP's reducer (see train_pretrain.main)


def finetune(setup: Setup, dist: engine.Dist) -> None:
    """Train and test, or with --eval only test. Every split's list is read and its files checked (the
    held-out ones opened) before the first step, so a bad validation video cannot cost an epoch."""
    args, cfg = setup.args, setup.cfg
    precision = engine.resolve_precision(args.precision, dist.device)
    sets = [build_dataset(mode, args, dist) for mode in (["test"] if args.eval else ["train", "validation", "test"])]
    engine.seed_everything(args.seed)  # the same initial weights on every process

    model = build_model(setup, dist).to(dist.device)
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = engine.build_trainer(model, dist, precision, Path(args.output_dir), weight_decay=args.weight_decay,
                                   betas=args.opt_betas, eps=args.opt_eps, fsdp=args.fsdp, compile=args.compile,
                                   accum_iter=args.accum_iter, clip_grad=args.clip_grad, log_every=args.log_every,
                                   layer_decay=args.layer_decay, seed=args.seed, save_every_steps=args.save_every_steps)
    dist.print(f"model {args.model}: {n_params / 1e6:.1f}M parameters ({n_trained / 1e6:.2f}M trained), "
               f"{cfg.num_frames}x{cfg.img_size}, {cfg.num_tokens} tokens, {args.nb_classes} classes | {dist.device}, "
               f"{precision}, {dist.world_size} process(es){', FSDP' if args.fsdp else ''}"
               f"{', compiled' if args.compile else ''}")
    if not args.eval:
        train(trainer, args, *sets[:2])
    multi_view_test(trainer.model, sets[-1], args, dist, precision, trainer.out)  # the final weights, as the reference
    if dist.is_main and not args.eval:
        visualize.save(visualize.curves_figure([trainer.out / "log.txt"]), trainer.out / "curves.png")


def train(trainer: engine.Trainer, args, train_set: data.FinetuneDataset, val_set: data.FinetuneDataset) -> None:
    """The epochs: AdamW steps on the training set, then the centre-view validation, log.txt and checkpoints."""
    dist = trainer.dist
    engine.check_space(trainer)
    batches = engine.train_loader(train_set, args.batch_size, trainer, args.num_workers)
    videos_per_step = args.batch_size * args.accum_iter * dist.world_size
    lr_schedule = engine.cosine_schedule(args.lr * videos_per_step / 256, args.min_lr * videos_per_step / 256,
                                         args.epochs, batches.steps_per_epoch, args.warmup_epochs)
    run_args = engine.run_args(args, dist, train_set, val_set)
    state = engine.resume_training(trainer, args.resume, args.auto_resume, run_args, args.allow_resume_changes)
    start_epoch = 0 if state is None else state["epoch"] + 1
    trainer.extra["best_acc1"] = -1.0 if state is None else state.get("best_acc1", 0.0)  # in every checkpoint
    dist.print(f"data: {args.data_path or 'built-in synthetic clips'} ({len(train_set)} training videos, "
               f"{len(val_set)} validation videos) | init: {args.finetune or 'random (no --finetune)'}"
               + (" | linear probe: only the head learns" if args.linear_probe else ""))
    mixing = f"mixup {args.mixup} / cutmix {args.cutmix} (p {args.mixup_prob}), " if args.mixup or args.cutmix else ""
    dist.print(f"effective batch {videos_per_step} videos = {args.batch_size} x accum {args.accum_iter} x "
               f"{dist.world_size} process(es); x num_sample {args.num_sample} = {batches.clips_per_step} clips "
               f"per step\nlr {args.lr:g} x {videos_per_step} / 256 = {args.lr * videos_per_step / 256:.3g}, layer "
               f"decay {args.layer_decay}, {batches.steps_per_epoch} steps per epoch, {args.epochs} epochs | loss: "
               f"{mixing}label smoothing {args.smoothing}")

    def loss_of(batch):  # clips (B, num_sample, 3, T, H, W), labels (B, num_sample)
        clips, labels = (x.to(dist.device, non_blocking=True).flatten(0, 1) for x in batch)
        clips, targets = mix(clips, labels, args)  # targets (B·num_sample, K): smoothed, mixed one-hots
        return F.cross_entropy(trainer.model(clips).float(), targets)

    weight_decay = np.full(len(lr_schedule), args.weight_decay)
    for epoch in range(start_epoch, args.epochs):
        loss, steps, seconds = engine.train_epoch(trainer, batches, loss_of, epoch, lr_schedule, weight_decay)
        val = evaluate(trainer.model, val_set, args, dist, trainer.precision, "validation")
        stats = dict(epoch=epoch, train_loss=loss, train_lr=float(lr_schedule[steps - 1]), val_loss=val["loss"],
                     val_acc1=val["acc1"], val_acc5=val["acc5"], steps=steps, epoch_time_s=round(seconds, 1),
                     skipped_videos=engine.skipped_videos(dist, train_set))
        improved = val["acc1"] > trainer.extra["best_acc1"]
        trainer.extra["best_acc1"] = max(trainer.extra["best_acc1"], val["acc1"])
        engine.end_of_epoch(trainer, stats, keep=False, best=improved)
        dist.print(f"epoch {epoch}: train loss {loss:.4f}, validation (centre view) top-1 {val['acc1']:.2f}% "
                   f"top-5 {val['acc5']:.2f}% (best {trainer.extra['best_acc1']:.2f}%), {seconds:.0f} s")


if __name__ == "__main__":
    engine.run(main, preemptible=True)
