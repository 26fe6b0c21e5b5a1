"""Fine-tune VideoMAE V2: a pretrained encoder becomes a video classifier, tested on several views per video.

The classifier (vmae.VideoClassifier) runs the encoder on all tokens, mean-pools them into a LayerNorm and a
linear head; there is no CLS token. The recipe is the reference's: AdamW with layer-wise
learning-rate decay (block k of L learns at layer_decay^(L - k) times the head's rate, the cube embedding
at layer_decay^(L + 1)), warmup then cosine, stochastic depth, RandAugment, random resized crop, flip and
random erasing per clip, two augmented clips per decoded video, and mixup/cutmix with label smoothing on
the batch. Every epoch scores the centre view of each validation video (top-1/top-5) and keeps
checkpoint-best.pth. At the end, or with --eval, the multi-view test takes test_num_segment windows x
test_num_crop crops of every video ("16x5x3"), averages their softmax per video and reports clip-level
(each view alone) and video-level accuracy, a per-class table and a confusion matrix.

With no --data_path it fine-tunes on the built-in synthetic clips, whose label is the direction the main
shape moves (8 classes). --finetune takes every public VideoMAE checkpoint (ours, the reference's V1/V2,
Hugging Face V1 and V2, mmaction2's: vmae.py's "Checkpoint formats"); the model is the one the file holds,
and its input size and frame count are the defaults. A file that would leave any encoder weight untrained
stops the run.

    python train_finetune.py --finetune output/pretrain/checkpoint-last.pth        # the demo
    python train_finetune.py --eval --finetune output/finetune/checkpoint-best.pth  # multi-view test only
    python train_finetune.py --data_path lists/ --nb_classes 400 --model base --batch_size 16 \\
        --finetune vit_b_hybrid_pt_800e.pth                     # lists/ holds train.csv and val.csv
    python train_finetune.py --linear_probe --finetune ...      # frozen encoder, only the head learns
    torchrun --standalone --nproc_per_node=8 train_finetune.py ...   # one machine, 8 GPUs (DDP; --fsdp shards)

--batch_size is per process and micro-step; the learning rate is --lr x batch_size x accum_iter x processes
/ 256, as in pretraining (the --num_sample repeats are not counted, as in the reference). The optimizer,
processes, checkpoints and the loop are engine.py's, shared with pretraining.
"""
import argparse
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import engine
import visualize
import vmae

# The demo that runs without --data_path: the pretraining demo's model on the built-in classes (a --finetune
# checkpoint's own size wins over these, and explicit flags win over both). No mixup, cutmix or
# RandAugment: the labels are directions of motion, and 25 epochs of 64 steps are a short schedule.
DEMO = dict(**engine.DEMO_CLIPS, nb_classes=8, batch_size=16,
            epochs=25, warmup_epochs=5, lr=1e-2, aa="none", mixup=0.0, cutmix=0.0, synthetic_size=1024,
            test_num_segment=2, num_workers=2)
# --linear_probe: the usual protocol (MAE's): no stochastic depth, regularisation or heavy augmentation.
LINEAR_PROBE = dict(drop_path=0.0, weight_decay=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, reprob=0.0, aa="none")
# What --data_set sets, by the reference's names: Something-Something's classes depend on direction and
# order, so it takes one frame per segment (TSN sampling) and is never flipped; the others take dense
# windows and flip. --sparse_sample and --flip set the same switches directly.
DENSE, SEGMENTS = dict(sparse_sample=False, flip=True), dict(sparse_sample=True, flip=False)
DATA_SETS = {"Kinetics-400": DENSE, "Kinetics-600": DENSE, "Kinetics-700": DENSE, "Kinetics-710": DENSE,
             "SSV2": SEGMENTS, "UCF101": DENSE, "HMDB51": DENSE, "Diving48": DENSE, "MIT": DENSE}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="VideoMAE V2 fine-tuning and multi-view testing",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a, R = p.add_argument, engine.within  # R: each number's valid range, checked as it is parsed
    a("--model", default="base", help="small, base, large, huge, giant, demo (the laptop size), or a reference name "
      "(vit_base_patch16_224, ...); with --finetune the file's own size (given, it must match)")
    a("--nb_classes", type=R("[1, 100000]", int), default=400)
    a("--finetune", default=None, help="initial weights: a pretraining or fine-tuned checkpoint file or Hugging Face "
      "folder (ours, the reference's, Hugging Face V1/V2, mmaction2's)")
    a("--label_map", default=None, help="JSON list: new class i takes row i of the list of the checkpoint's head "
      "(e.g. the reference's misc/label_710to400.json); without it a head of another class count is dropped")
    a("--linear_probe", action="store_true", help="freeze the encoder and train only the head")
    a("--eval", action="store_true", help="only the multi-view test of the --finetune (or --resume) weights")
    a("--batch_size", type=R("[1, inf)", int), default=64, help="videos per process per micro-step (x --num_sample "
      "clips)")
    a("--accum_iter", type=R("[1, inf)", int), default=1, help="micro-steps accumulated per optimizer step")
    a("--epochs", type=R("[1, 100000]", int), default=30)
    a("--warmup_epochs", type=R("[0, inf)", int), default=5)
    a("--lr", type=R("(0, inf)"), default=1e-3, help="base learning rate per 256 videos")
    a("--min_lr", type=R("[0, inf)"), default=1e-6, help="base LR the cosine decays towards (scaled like --lr)")
    a("--layer_decay", type=R("(0, 1]"), default=0.75, help="LR scale per block from the top; 1 = none")
    a("--weight_decay", type=R("[0, inf)"), default=0.05)
    a("--opt_betas", type=R("[0, 1)"), nargs=2, default=[0.9, 0.999])
    a("--opt_eps", type=R("(0, inf)"), default=1e-8)
    a("--clip_grad", type=R("(0, inf)"), default=None, help="max gradient norm")
    a("--drop_path", type=R("[0, 1)"), default=0.1)
    a("--head_drop_rate", type=R("[0, 1)"), default=0.0, help="dropout before the head")
    a("--init_scale", type=R("[0, inf)"), default=0.001, help="the fresh head's initial weights are scaled by this")
    a("--smoothing", type=R("[0, 1)"), default=0.1, help="label smoothing")
    a("--mixup", type=R("[0, inf)"), default=0.8, help="mixup alpha; 0 = off")
    a("--cutmix", type=R("[0, inf)"), default=1.0, help="cutmix alpha; 0 = off")
    a("--mixup_prob", type=R("[0, 1]"), default=1.0, help="chance that a batch is mixed at all")
    a("--mixup_switch_prob", type=R("[0, 1]"), default=0.5, help="chance of cutmix rather than mixup when both are on")
    a("--aa", default="rand-m7-n4-mstd0.5-inc1", help="video RandAugment, or none")
    a("--reprob", type=R("[0, 1]"), default=0.25, help="random erasing probability")
    a("--num_sample", type=R("[1, inf)", int), default=2, help="augmented clips per decoded video (repeated "
      "augmentation)")
    a("--short_side_size", type=R("[1, 8192]", int), default=None, help="evaluation: resize the short side to this, "
      "then crop (default: --input_size)")
    a("--test_num_segment", type=R("[1, inf)", int), default=5, help="test windows per video")
    a("--test_num_crop", type=R("[1, inf)", int), default=3, help="test crops per window")
    a("--data_path", default=None, help="folder with train.csv / val.csv (/ test.csv), or with train/ val/ "
      "folders of class sub-folders; omitted: the built-in synthetic clips")
    a("--data_set", default="Kinetics-400", choices=list(DATA_SETS), help="sets --sparse_sample and --flip: "
      "SSV2 one frame per segment and no flip (left and right are different classes), the others dense windows "
      "and flips")
    a("--sparse_sample", action=argparse.BooleanOptionalAction, default=None,
      help="one frame from each of --num_frames equal segments (default: from --data_set)")
    a("--flip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips in training "
      "(default: from --data_set; never for the built-in clips, whose labels are directions)")
    a("--synthetic_size", type=R("[1, inf)", int), default=1024, help="built-in training videos (a quarter as many "
      "held out)")
    a("--output_dir", default="output/finetune")
    a("--resume", default=None, help="checkpoint to resume from (default: checkpoint-last.pth in --output_dir)")
    engine.add_shared_flags(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = get_args_parser()
    known = engine.set_demo_defaults(parser, argv, DEMO)
    if known.linear_probe:
        parser.set_defaults(**LINEAR_PROBE)
    init = None  # the starting checkpoint, read once: it decides the model; its input and classes are defaults
    if known.finetune or known.resume:
        init = engine.checkpoint_defaults(parser, argv, known.finetune or known.resume)
        if "nb_classes" in init.args:
            parser.set_defaults(nb_classes=init.args["nb_classes"])
        elif known.eval and "head.weight" in init.weights:  # --eval scores the file's own head
            parser.set_defaults(nb_classes=len(init.weights["head.weight"]))
    args = parser.parse_args(argv)
    args._init = init if args.finetune or args.eval else None
    args.short_side_size = args.short_side_size or args.input_size
    if args.sparse_sample is None:
        args.sparse_sample = DATA_SETS[args.data_set]["sparse_sample"]
    if args.flip is None:  # the built-in clips' labels are directions: never flipped
        args.flip = DATA_SETS[args.data_set]["flip"] and args.data_path is not None
    args.cfg = engine.model_config(parser, args, init, engine.flag_given(parser, argv, "model"))
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
    try:
        args._label_map = read_label_map(args.label_map, args.nb_classes) if args.label_map else None
    except engine.RunError as e:
        parser.error(str(e))
    return args


# -----------------------------------------------------------------------------------------------------
# Model and data


def read_label_map(path: str, nb_classes: int) -> list[int]:
    """--label_map: a JSON list of nb_classes row numbers of the checkpoint's head."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise engine.RunError(f"--label_map {path}: cannot be read as JSON ({e})") from e
    if not (isinstance(rows, list) and len(rows) == nb_classes and all(isinstance(r, int) and r >= 0 for r in rows)):
        raise engine.RunError(f"--label_map {path}: expected a JSON list of {nb_classes} row numbers (one per class "
                              "of --nb_classes), like the reference's misc/label_710to400.json")
    return rows


def build_model(args, d: engine.Dist) -> vmae.VideoClassifier:
    model = vmae.VideoClassifier(args.cfg, args.nb_classes, args.head_drop_rate, args.init_scale)
    weights = args.finetune or (args.resume if args.eval else None)  # --eval --resume C: C's weights only
    if weights:
        loaded = vmae.load_weights(model, args._init, args._label_map)
        args._init = None  # loaded: the file's tensors need not stay in memory for the run
        d.print(loaded)
        if args.eval and loaded.missing_keys:
            raise engine.RunError(f"--eval: {weights} has no {vmae.listed(loaded.missing_keys)} for this "
                                  f"{args.nb_classes}-class model, so there is nothing to test")
    if args.linear_probe:  # fc_norm stays frozen too: a plain LayerNorm feeding the head normalised features
        model.requires_grad_(False)
        model.head.requires_grad_(True)
    return model


def build_dataset(mode: str, args, d: engine.Dist) -> data.FinetuneDataset:
    """The 'train', 'validation' or 'test' split (--sparse_sample and --flip as --data_set set them)."""
    return data.build_finetune_dataset(
        mode, args.data_path, args.data_root, nb_classes=args.nb_classes, num_frames=args.num_frames,
        sampling_rate=args.sampling_rate, input_size=args.input_size, short_side_size=args.short_side_size,
        num_sample=args.num_sample, test_num_segment=args.test_num_segment, test_num_crop=args.test_num_crop,
        sparse_sample=args.sparse_sample, flip=args.flip, aa=args.aa, reprob=args.reprob,
        fname_tmpl=args.fname_tmpl, skip_bad_videos=args.skip_bad_videos, max_bad_fraction=args.max_bad_fraction,
        synthetic_videos=args.synthetic_size, share=engine.file_share(d))


class Shard(torch.utils.data.Dataset):
    """One process's share of an evaluation set: items rank, rank + world, ... Every share is padded to the
    same length by repeating items (FSDP's forward is collective, so all processes must run the same number
    of batches); a repeat comes with keep = False and counts nowhere. (DistributedSampler pads the same way
    but cannot say which items are repeats, so they would be counted twice.) With --skip_bad_videos an
    unreadable video's items come from a stand-in video; they get keep = False too, so the stand-in is not
    counted twice and the unreadable video has no views (video-level results leave it out).
    Items: (clip, label, video index, keep)."""

    def __init__(self, dataset: data.FinetuneDataset, rank: int, world: int):
        self.dataset = dataset
        padded = world * math.ceil(len(dataset) / world)
        self.indices = range(rank, padded, world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        item = index % len(self.dataset)
        clip, label, *video = self.dataset[item]  # test items add (video, view)
        # a repeat, or (with --skip_bad_videos) a stand-in for an unreadable video, counts nowhere
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
def evaluate(model, dataset: data.FinetuneDataset, batch_size: int, num_classes: int, num_workers: int,
             d: engine.Dist, precision: str, desc: str) -> dict:
    """Score every item of an evaluation set exactly once, split over the processes, summed on the device
    and read once at the end. Returns, the same on every process: probs (V, K) each video's softmax summed
    over its views, views (V,) how many, labels (V,), and over single clips: loss, top-1 and top-5 hits, clips.
    Views are summed per video in a tensor, in one process or many (docs/reference.md, traps 14 and 18)."""
    loader = torch.utils.data.DataLoader(Shard(dataset, d.rank, d.world_size), batch_size=batch_size,
                                         num_workers=num_workers, pin_memory=d.device.type == "cuda")
    videos, k, dev = len(dataset.source), num_classes, d.device
    probs, views = torch.zeros(videos, k, device=dev), torch.zeros(videos, device=dev)
    labels = torch.full((videos,), -1, device=dev)
    sums = torch.zeros(4, device=dev)  # loss, top-1 hits, top-5 hits, clips
    model.eval()
    for clips, label, video, keep in tqdm(loader, desc=desc, disable=not d.is_main, dynamic_ncols=True, leave=False):
        clips, label, video = (t.to(dev, non_blocking=True) for t in (clips, label, video))
        keep = keep.to(dev).float()  # (B,) 0 for the padding repeats
        with engine.autocast(dev, precision):
            logits = model(clips).float()  # (B, K)
        probs.index_add_(0, video, logits.softmax(1) * keep[:, None])
        views.index_add_(0, video, keep)
        labels[video] = label
        loss = F.cross_entropy(logits, label, reduction="none")
        sums += torch.cat([(loss @ keep)[None], topk_hits(logits, label) @ keep, keep.sum()[None]])
    if d.world_size > 1:
        for t in (probs, views, sums):
            dist.all_reduce(t)
        dist.all_reduce(labels, op=dist.ReduceOp.MAX)
    loss, top1, top5, clips = sums.tolist()
    return dict(probs=probs.cpu(), views=views.cpu(), labels=labels.cpu(), loss=loss / clips,
                acc1=100 * top1 / clips, acc5=100 * top5 / clips, clips=int(clips))


def video_level(result: dict) -> tuple[dict, torch.Tensor]:
    """Top-1/top-5 of each video's averaged softmax, and the confusion matrix (K, K) (rows: true class,
    columns: predicted). Videos with no views (all skipped as unreadable) are left out."""
    seen = result["views"] > 0
    mean = result["probs"][seen] / result["views"][seen, None]  # (V, K)
    labels, k = result["labels"][seen], mean.shape[1]
    top1, top5 = topk_hits(mean, labels).mean(1).tolist()
    confusion = torch.bincount(labels * k + mean.argmax(1), minlength=k * k).view(k, k)
    return dict(test_video_acc1=100 * top1, test_video_acc5=100 * top5, test_videos=int(seen.sum())), confusion


def per_class_table(confusion: torch.Tensor) -> str:
    lines = ["class  videos  correct  top-1 %"]
    for c, (total, right) in enumerate(zip(confusion.sum(1).tolist(), confusion.diag().tolist())):
        lines.append(f"{c:5d}  {total:6d}  {right:7d}  " + (f"{100 * right / total:7.2f}" if total else "      -"))
    return "\n".join(lines)


def multi_view_test(model, test_set: data.FinetuneDataset, args, d: engine.Dist, precision: str, out: Path) -> dict:
    """The final test: every video as test_num_segment x test_num_crop views, their softmax averaged. Rank 0
    prints and writes the results, per_class_accuracy.txt and confusion.png. One window or one crop is fine
    (data.py centres a single view: docs/reference.md, trap 15)."""
    views = f"{args.num_frames}x{args.test_num_segment}x{args.test_num_crop}"
    result = evaluate(model, test_set, eval_batch(args), args.nb_classes, args.num_workers, d, precision,
                      f"test {views}")
    stats, confusion = video_level(result)
    stats = dict(test_views=views, test_clip_acc1=result["acc1"], test_clip_acc5=result["acc5"],
                 test_clips=result["clips"], **stats)
    if d.is_main:
        table = per_class_table(confusion)
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


def eval_batch(args) -> int:
    return int(1.5 * args.batch_size)  # no gradients to keep: evaluation takes larger batches


def main(argv=None):
    args = parse_args(argv)
    d = engine.setup_distributed(args.device)
    with engine.output_folder(Path(args.output_dir), d):  # this run's alone, writable, no stale files
        finetune(args, d)
    engine.leave_process_group()  # after finetune() freed DDP's reducer (see train_pretrain.main)


def finetune(args, d: engine.Dist) -> None:
    """Train and test, or with --eval only test. Every split's list is read and its files checked (the
    held-out ones opened) before the first step, so a bad validation video cannot cost an epoch."""
    cfg = args.cfg
    precision = engine.resolve_precision(args.precision, d.device)
    sets = [build_dataset(mode, args, d) for mode in (["test"] if args.eval else ["train", "validation", "test"])]
    engine.seed_everything(args.seed)  # the same initial weights on every process

    model = build_model(args, d).to(d.device)
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t = engine.build_trainer(model, d, precision, Path(args.output_dir), weight_decay=args.weight_decay,
                             betas=args.opt_betas, eps=args.opt_eps, layer_decay=args.layer_decay, fsdp=args.fsdp,
                             compile=args.compile, seed=args.seed, accum_iter=args.accum_iter,
                             clip_grad=args.clip_grad, log_every=args.log_every)
    d.print(f"model {args.model}: {n_params / 1e6:.1f}M parameters ({n_trained / 1e6:.2f}M trained), {cfg.num_frames}x"
            f"{cfg.img_size}, {cfg.num_tokens} tokens, {args.nb_classes} classes | {d.device}, {precision}, "
            f"{d.world_size} process(es)" + (", FSDP" if args.fsdp else "") + (", compiled" if args.compile else ""))
    if not args.eval:
        train(t, args, *sets[:2])
    multi_view_test(t.model, sets[-1], args, d, precision, t.out)  # the final weights, as the reference tests
    if d.is_main and not args.eval:
        visualize.save(visualize.curves_figure([t.out / "log.txt"]), t.out / "curves.png")


def train(t: engine.Trainer, args, train_set: data.FinetuneDataset, val_set: data.FinetuneDataset) -> None:
    """The epochs: AdamW steps on the training set, then the centre-view validation, log.txt and checkpoints."""
    d = t.d
    engine.check_space(t)
    batches = engine.train_loader(train_set, args.batch_size, t, args.num_workers)
    videos_per_step = args.batch_size * args.accum_iter * d.world_size
    lr_schedule = engine.cosine_schedule(args.lr * videos_per_step / 256, args.min_lr * videos_per_step / 256,
                                         args.epochs, batches.steps_per_epoch, args.warmup_epochs)
    run_args = engine.run_args(vars(args), d, train_set, val_set)
    state = engine.resume_training(t, args.resume, args.auto_resume, run_args, args.allow_resume_changes)
    start_epoch, best = (0, -1.0) if state is None else (state["epoch"] + 1, state.get("best_acc1", 0.0))
    mixing = args.mixup > 0 or args.cutmix > 0
    d.print(f"data: {'built-in synthetic clips' if args.data_path is None else args.data_path} ({len(train_set)} "
            f"training videos, {len(val_set)} validation videos) | init: {args.finetune or 'random (no --finetune)'}"
            + (" | linear probe: only the head learns" if args.linear_probe else ""))
    d.print(f"effective batch {videos_per_step} videos = {args.batch_size} x accum {args.accum_iter} x {d.world_size} "
            f"process(es); x num_sample {args.num_sample} = {batches.clips_per_step} clips per step")
    d.print(f"lr {args.lr:g} x {videos_per_step} / 256 = {args.lr * videos_per_step / 256:.3g}, layer decay "
            f"{args.layer_decay}, {batches.steps_per_epoch} steps per epoch, {args.epochs} epochs | loss: "
            + (f"mixup {args.mixup} / cutmix {args.cutmix} (p {args.mixup_prob}), " if mixing else "")
            + f"label smoothing {args.smoothing}")

    def loss_of(batch):  # clips (B, num_sample, 3, T, H, W), labels (B, num_sample)
        clips, labels = (x.to(d.device, non_blocking=True).flatten(0, 1) for x in batch)
        clips, targets = mix(clips, labels, args)  # targets (B·num_sample, K): smoothed, mixed one-hots
        return F.cross_entropy(t.model(clips).float(), targets)

    weight_decay = np.full(len(lr_schedule), args.weight_decay)
    for epoch in range(start_epoch, args.epochs):
        loss, steps, seconds = engine.train_epoch(t, batches, loss_of, epoch, lr_schedule, weight_decay)
        val = evaluate(t.model, val_set, eval_batch(args), args.nb_classes, args.num_workers, d, t.precision,
                       "validation")
        stats = dict(epoch=epoch, train_loss=loss, train_lr=float(lr_schedule[steps - 1]), val_loss=val["loss"],
                     val_acc1=val["acc1"], val_acc5=val["acc5"], steps=steps, epoch_time_s=round(seconds, 1),
                     skipped_videos=engine.skipped_videos(d, train_set))
        improved = val["acc1"] > best
        best = max(best, val["acc1"])
        engine.end_of_epoch(t, stats, run_args, keep=False, best=improved, best_acc1=best)
        d.print(f"epoch {epoch}: train loss {loss:.4f}, validation (centre view) top-1 {val['acc1']:.2f}% "
                f"top-5 {val['acc5']:.2f}% (best {best:.2f}%), {seconds:.0f} s")


if __name__ == "__main__":
    engine.run(main)
