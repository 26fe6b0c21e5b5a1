"""Speed and cost figures for vmae.

The pretraining table times one full train step (masks drawn on the device, forward, target, loss,
backward, AdamW) per model size, masking (V2 dual masking vs V1 encoder-only) and precision, and prints
step time, clips/s, the model FLOPs of the step and the achieved FLOP/s as a share of this machine's own
measured matmul peak. The inference rows time the fine-tune classifier's forward. Side by side, where
available: Hugging Face's VideoMAE (`pip install transformers`; V1 only, it has no decoder masking) and the
reference implementation (`--reference /path/to/VideoMAEv2`, a checkout of OpenGVLab/VideoMAEv2 with
timm importable).

    python bench.py                               # small and base, 16x224, batch 2, fp32 and bf16
    python bench.py --sizes base --batch_size 8 --precision bf16 --compile
    python bench.py --flops                       # tokens and GFLOPs per clip for every size, no timing
    python bench.py --data                        # clips/s of one data worker on 240p, 320p and 720p videos
    python bench.py --memory --sizes giant        # GB per GPU by size, precision, checkpointing (computed)
    python bench.py --ops                         # ATen ops per train step (what an eager GPU step launches)
    python bench.py --gpu_suite gpu_out           # every GPU figure of docs/gpu.md, in gpu_out/summary.md

FLOPs are counted by running the step once on the `meta` device under PyTorch's FLOP counter (2 FLOPs
per multiply-add; exact shapes, no arithmetic typed in by hand; train_pretrain.step_flops). The paper's "FLOPs" are
multiply-adds of the forward pass, i.e. half of the forward figure here.
"""
import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import engine
import masking
import train_pretrain
import vmae


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["small", "base"], choices=list(vmae.SIZES))
    p.add_argument("--batch_size", type=engine.Range(int, 1), default=2)
    p.add_argument("--num_frames", type=engine.Range(int, 1, 1024), default=16)
    p.add_argument("--input_size", type=engine.Range(int, 1, 4096), default=224)
    p.add_argument("--mask_ratio", type=engine.Range(float, 0, 1, open_low=True, open_high=True), default=0.9)
    p.add_argument("--decoder_mask_ratio", type=engine.Range(float, 0, 1, open_high=True), default=0.5)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=engine.Range(int, 1), default=5, help="timed steps (the median is "
                   "reported)")
    p.add_argument("--warmup", type=engine.Range(int, 0), default=2)
    p.add_argument("--device", type=engine.device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time our step under torch.compile")
    p.add_argument("--reference", metavar="DIR", help="a checkout of OpenGVLab/VideoMAEv2 to time side by side")
    p.add_argument("--flops", action="store_true", help="print the per-clip token and FLOP table and exit")
    p.add_argument("--data", action="store_true", help="time one data worker on videos the bench writes, and exit")
    p.add_argument("--memory", action="store_true", help="compute the training-memory table for every size, and exit")
    p.add_argument("--ops", action="store_true", help="count the ATen ops of one train step per size and precision, "
                   "and exit")
    p.add_argument("--gpu_suite", metavar="DIR", help="run every GPU measurement of docs/gpu.md, tables to "
                   "DIR/summary.md")
    p.add_argument("--parts", nargs="+", default=list(SUITE_DEFAULT), choices=list(SUITE),
                   help="--gpu_suite: which parts")
    p.add_argument("--budget_s", type=engine.Range(float, 0, open_low=True), default=560, help="--gpu_suite: seconds for all parts "
                   "together")
    p.add_argument("--smoke", action="store_true", help="--gpu_suite: tiny sizes on the CPU, to check it runs")
    p.add_argument("--part", help=argparse.SUPPRESS)  # one part, in the process the suite starts for it
    p.add_argument("--part_limit", type=engine.Range(float, 0, open_low=True), default=600, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------------------------------
# Measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def round_robin(contenders: dict, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each contender, taking turns call by call, so all of them meet the same
    machine state (caches, the allocator's free pages, clocks). On a CPU, timing one implementation after
    the other swings their ratio by 20 % and more between runs; taking turns keeps it within a few %."""
    times = {name: [] for name in contenders}
    for i in range(warmup + steps):
        for name, fn in contenders.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(fn, device: torch.device) -> str:
    """GiB of GPU memory one call needs at its peak ('-' on a CPU)."""
    if device.type != "cuda":
        return "-"
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f}"


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul on this machine, the best of several tries: the ceiling the
    model's share is measured against."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def recipe(args, grid, dual: bool) -> masking.MaskConfig:
    """The masks of the timed step: tube and running cell (dual masking) or tube alone (V1)."""
    return masking.MaskConfig(grid, "tube", args.mask_ratio, "run_cell", args.decoder_mask_ratio if dual else 0.0)


def train_step_fn(model, loss_fn, video, device, precision):
    """One optimizer step of `loss_fn(model, video)` as the training loop runs it."""
    opt = engine.make_optimizer(engine.param_groups(model, 0.05), 1e-4, (0.9, 0.95), 1e-8, device)

    def step():
        with engine.autocast(device, precision):
            loss = loss_fn(model, video)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def infer_flops(cfg, batch: int) -> int:
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        vmae.VideoClassifier(cfg, 400)(torch.empty(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size))
    return counter.get_total_flops()


# -----------------------------------------------------------------------------------------------------
# The peers


def hf_models(cfg, num_classes=400):
    """Hugging Face VideoMAE models of the same size, or None without transformers."""
    try:
        from transformers import VideoMAEConfig as HFConfig, VideoMAEForPreTraining, VideoMAEForVideoClassification
    except ImportError:
        return None
    hf = HFConfig(image_size=cfg.img_size, patch_size=cfg.patch_size, num_frames=cfg.num_frames,
                  tubelet_size=cfg.tubelet_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
                  num_attention_heads=cfg.num_heads, intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
                  decoder_hidden_size=cfg.decoder_embed_dim, decoder_num_hidden_layers=cfg.decoder_depth,
                  decoder_num_attention_heads=cfg.decoder_num_heads,
                  decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio), layer_norm_eps=1e-6,
                  norm_pix_loss=True, use_mean_pooling=True, num_labels=num_classes)
    return VideoMAEForPreTraining(hf), VideoMAEForVideoClassification(hf)


def hf_loss(model, video, args, grid):
    enc = masking.tube_mask(video.shape[0], grid, args.mask_ratio, device=video.device)
    return model(pixel_values=video.transpose(1, 2), bool_masked_pos=enc).loss  # HF wants (B, T, C, H, W)


def reference_models(path: str, size: str, cfg):
    """The reference's pretraining and fine-tune models built by its own registered functions."""
    sys.path.insert(0, path)
    from models import modeling_finetune, modeling_pretrain  # noqa: the reference checkout's package
    name = f"{size}_patch{cfg.patch_size}_224"
    pre = getattr(modeling_pretrain, f"pretrain_videomae_{name}")(
        all_frames=cfg.num_frames, tubelet_size=cfg.tubelet_size, decoder_depth=cfg.decoder_depth,
        drop_path_rate=0.0)
    fine = getattr(modeling_finetune, f"vit_{name}")(all_frames=cfg.num_frames, tubelet_size=cfg.tubelet_size,
                                                     num_classes=400)
    return pre, fine


def reference_target(video, patch_size: int):
    """The target as the reference's training engine computes it: un-normalise the whole clip, cut every
    cube channel-last with a tubelet of 2, normalise each with torch's unbiased std (its formula, written
    out here so that our faster target does not flatter the reference's timing)."""
    B, C, T, H, W = video.shape
    p = patch_size
    mean = video.new_tensor(vmae.IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = video.new_tensor(vmae.IMAGENET_STD).view(1, 3, 1, 1, 1)
    x = (video * std + mean).reshape(B, C, T // 2, 2, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
    x = x.reshape(B, -1, 2 * p * p, C)  # (B, N, 2·p·p, 3)
    x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return x.flatten(2)  # (B, N, F); the loss keeps the decoder's queries


def reference_loss(model, video, args, dual, cfg):
    """The reference model's forward (masks True = hidden / dropped, as ours), its target, the same loss."""
    drawn = recipe(args, cfg.grid, dual).draw(video.shape[0], video.device)
    pred = model(video, drawn.encoder, drawn.decoder)
    with torch.no_grad():
        target = vmae.gather_tokens(reference_target(video, cfg.patch_size), drawn.queries)
    return vmae.pretrain_loss(pred, target, drawn.in_loss)


# -----------------------------------------------------------------------------------------------------
# Data


def write_video(path: str, width: int, height: int, seconds: int = 10, fps: int = 30) -> None:
    """A test video: moving noise blocks, so the codec has real work to do."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(0)
    texture = cv2.resize(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8), (width, height))
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for i in range(seconds * fps):
        writer.write(np.roll(texture, 4 * i, axis=1))
    writer.release()


VIDEOS = {"240p": (320, 240), "320p": (426, 320), "720p": (1280, 720)}  # width, height


def data_table(args) -> None:
    """Clips/s of one worker (one process, one decoding thread) turning videos into training clips: float
    clips normalised by the worker, or uint8 clips that the GPU normalises (--normalize_on_device)."""
    import tempfile
    import data
    clip = 3 * args.num_frames * args.input_size ** 2
    print(f"# one data worker, {args.num_frames}x{args.input_size} clips from 10 s, 30 fps mp4v videos written here; "
          f"torch {torch.__version__}; a clip is {4 * clip / 1e6:.2f} MB as float32, {clip / 1e6:.2f} MB as uint8")
    print("| video | pretraining clips/s (num_sample 1) | pretraining clips/s (num_sample 4) "
          "| num_sample 4, uint8 (normalised on the device) | fine-tune train clips/s (num_sample 2) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, (w, h) in VIDEOS.items():
            path = f"{folder}/{name}.mp4"
            write_video(path, w, h)
            list_file = f"{folder}/{name}.csv"
            with open(list_file, "w") as f:
                f.write(f"{path} 0\n")
            kwargs = dict(num_frames=args.num_frames, sampling_rate=4, input_size=args.input_size)
            columns = [data.build_pretrain_dataset(list_file, **kwargs, num_sample=1),
                       data.build_pretrain_dataset(list_file, **kwargs, num_sample=4),
                       data.build_pretrain_dataset(list_file, **kwargs, num_sample=4, uint8=True),
                       data.build_finetune_dataset("train", list_file, nb_classes=1, **kwargs, num_sample=2)]
            seconds = round_robin({i: (lambda ds=ds: ds[0]) for i, ds in enumerate(columns)}, args.steps, args.warmup,
                                  torch.device("cpu"))  # taking turns, as the train steps do
            rates = [f"{ds.num_sample / seconds[i]:.1f}" for i, ds in enumerate(columns)]
            print(f"| {name} | " + " | ".join(rates) + " |", flush=True)


# -----------------------------------------------------------------------------------------------------
# Memory


def saved_for_backward(cfg, args, batch: int, precision: str) -> tuple[int, int, int, int]:
    """Bytes autograd keeps for backward in one dual-masking pretraining forward of `batch` clips, recorded
    on the CPU (flash attention keeps q, k, v, output and log-sum-exp, as on a GPU): (everything, inside
    the transformer blocks, the largest single block's own, the blocks' inputs). Storages are counted
    once; parameters not at all."""
    torch.manual_seed(0)
    model = vmae.PretrainVideoMAE(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, per_block, inputs, current = {}, {}, [0], [None]

    def enter(block, x):
        current[0] = block
        inputs[0] += x[0].numel() * x[0].element_size()

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in saved:
            saved[key] = storage.nbytes()
            if current[0] is not None:
                per_block[current[0]] = per_block.get(current[0], 0) + storage.nbytes()
        return t

    for block in [m for m in model.modules() if isinstance(m, vmae.Block)]:
        block.register_forward_pre_hook(enter)
        block.register_forward_hook(lambda *_: current.__setitem__(0, None))
    video = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), engine.autocast(torch.device("cpu"), precision):
        train_pretrain.pretrain_step_loss(model, cfg, video, recipe(args, cfg.grid, dual=True))
    return sum(saved.values()), sum(per_block.values()), max(per_block.values()), inputs[0]


def in_fresh_process(fn, *args):
    """fn(*args) in a new process: a billion-parameter model freed in this one would still hold its pages
    (the C allocator keeps them in per-thread arenas), and the next size would not fit."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def memory_table(args) -> None:
    """GB of GPU memory a training step needs, computed: 16 bytes per parameter (fp32 weights, gradients and
    AdamW's two moments, also under bf16 autocast) plus the activations kept for backward, measured per
    clip as the difference between 2 clips and 1 (so autocast's cached weight copies cancel out). With
    activation checkpointing only each block's input is kept, plus one block's activations while it is
    recomputed. Temporaries and allocator slack come on top: read these as lower bounds."""
    gib = 2 ** 30
    print(f"# computed, not measured: dual masking, {args.num_frames}x{args.input_size}; activations per clip x clips "
          "per GPU + 16 B/param (divided by the GPU count under --fsdp)")
    print("| size | params | weights+grads+AdamW GiB | activations GiB/clip fp32 | bf16 | bf16 + checkpointing "
          "| GiB/GPU at 32 clips, bf16 | + checkpointing | + checkpointing, FSDP over 64 GPUs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        cfg = vmae.config(size, num_frames=args.num_frames, img_size=args.input_size)
        with torch.device("meta"):
            n = sum(p.numel() for p in vmae.PretrainVideoMAE(cfg).parameters())
        per_clip = {}
        for precision in ("fp32", "bf16"):
            one, two = (in_fresh_process(saved_for_backward, cfg, args, b, precision) for b in (1, 2))
            total, in_blocks, largest, inputs = (y - x for x, y in zip(one, two))  # per clip
            per_clip[precision] = total
            if precision == "bf16":  # checkpointing keeps what lies outside the blocks, their inputs, one block
                per_clip["ckpt"] = (total - in_blocks) + inputs + largest
        states = 16 * n / gib
        print(f"| {size} | {n / 1e6:.0f}M | {states:.1f} | {per_clip['fp32'] / gib:.3f} | {per_clip['bf16'] / gib:.3f} "
              f"| {per_clip['ckpt'] / gib:.3f} | {states + 32 * per_clip['bf16'] / gib:.1f} "
              f"| {states + 32 * per_clip['ckpt'] / gib:.1f} | {states / 64 + 32 * per_clip['ckpt'] / gib:.1f} |",
              flush=True)


# -----------------------------------------------------------------------------------------------------
# Ops per step


ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
CASTS = {"_to_copy", "copy_", "_foreach_copy_"}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops a step asks for below autograd and autocast: forward, backward (autograd's own
    ops) and the optimizer, with autocast's casts included. Composite ops arrive already split into the
    ops that run (F.linear as a transpose and an addmm). On a GPU every op but a view or an allocation is
    at least one kernel launch, each with its host-side cost, so the count tracks an eager step's host time."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "profiler":  # the optimizer's record_function marks, no work
            kind = "marks"
        elif any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            kind = "view"
        else:
            kind = "allocation" if name in ALLOCATIONS else "cast" if name in CASTS else "compute"
        self.counts[kind] += 1
        return func(*args, **(kwargs or {}))


def count_ops(step) -> Counter:
    """Ops of one call of step(), by kind (compute, cast, view, allocation), and the aten:: events
    torch.profiler records for it (every nesting level, so CPU kernels' inner calls count too)."""
    step()  # the first step creates AdamW's state
    with OpCounter() as counter:
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    counter.counts["profiler"] = sum(e.name.startswith("aten::") for e in prof.events())
    return counter.counts


def ops_table(args) -> None:
    """ATen ops per dual-masking train step (masks, forward, target, loss, backward, AdamW). The count does
    not depend on the resolution, nor on the batch size from 2 clips on (with 1, a reshape needs no copy). bf16
    autocast on the CPU inserts the same weight casts as on a GPU; a GPU's autocast also runs LayerNorm in fp32,
    which adds 4 casts per LayerNorm that the CPU count does not show."""
    device = torch.device("cpu")
    print(f"# ATen ops per train step, dual masking, counted on the CPU (torch {torch.__version__}); "
          f"batch {args.batch_size}, {args.num_frames}x{args.input_size}")
    print("| model | precision | ops | compute | casts | views | allocations | profiler aten:: events |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        cfg = vmae.config(size, num_frames=args.num_frames, img_size=args.input_size)
        torch.manual_seed(0)
        model = vmae.PretrainVideoMAE(cfg)
        video = torch.randn(args.batch_size, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
        loss = lambda m, v: train_pretrain.pretrain_step_loss(m, cfg, v, recipe(args, cfg.grid, dual=True))  # noqa: E731
        for precision in args.precision:
            c = count_ops(train_step_fn(model, loss, video, device, precision))
            total = c["compute"] + c["cast"] + c["view"] + c["allocation"]
            print(f"| {size} | {precision} | {total} | {c['compute']} | {c['cast']} | {c['view']} | {c['allocation']} "
                  f"| {c['profiler']} |", flush=True)


# -----------------------------------------------------------------------------------------------------
# The GPU suite: every GPU measurement docs/gpu.md asks for, in one command, its tables written to files

# Datasheet dense bf16 peaks (no sparsity), TFLOP/s, for MFU = model FLOPs / step time / peak. The first
# entry whose words all appear in the device's name counts ("H100 PCIe" before "H100").
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989}
# The parts in the order they run, with their time limits in seconds. The last two are left out unless
# named with --parts: each alone takes about as long as the rest together.
SUITE = {"env": 20, "eager": 120, "compiled": 180, "profile": 40, "tests": 150, "data": 60,
         "showcase": 660, "study": 1800}
SUITE_DEFAULT = ("env", "eager", "compiled", "profile", "tests", "data")
# The files it writes: summary.md (every table), suite.log (each part's exit and errors), profile.txt,
# test_gpu.log and test_gpu.xml; recon.png, study.md and study.png from the optional parts.


def datasheet_peak(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((t * 1e12 for key, t in DATASHEET_BF16_TFLOPS.items() if all(w in name for w in key.split())), None)


class Setting(NamedTuple):
    """What the suite measures: the real thing on a GPU, or a tiny stand-in (--smoke) that runs every line of
    the suite on a CPU in a few minutes. Rows: (size, clips per GPU, activation checkpointing, mode)."""
    frames: int
    px: int
    steps: int
    eager: list
    compiled: list
    profile: tuple  # (size, clips per GPU)


GPU = Setting(16, 224, 5,
              [(size, b, False, "eager") for size in ("small", "base", "large", "huge") for b in (32, 128)]
              + [("giant", 32, True, "eager"), ("giant", 128, True, "eager"),
                 ("base", 32, False, "fsdp"), ("base", 128, False, "fsdp")],
              [("base", 128, False, "default"), ("small", 128, False, "default"), ("large", 128, False, "default"),
               ("huge", 128, False, "default"), ("base", 32, False, "default"), ("small", 32, False, "default"),
               ("base", 128, False, "reduce-overhead"), ("giant", 128, True, "default")],
              ("base", 128))
SMOKE = Setting(8, 32, 2, [("demo", 2, False, "eager"), ("demo", 4, True, "eager"), ("demo", 2, False, "fsdp")],
                [("demo", 2, False, "default")], ("demo", 2))
MODES = {"eager": "eager", "fsdp": "eager, FSDP2 bf16 weights", "default": "compiled",
         "reduce-overhead": "compiled, CUDA graphs"}


def one_process_group(device: torch.device) -> engine.Dist:
    """A process group of one, as torchrun --nproc_per_node=1 would make, for FSDP on a single device."""
    import os
    import torch.distributed as dist
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    return engine.Dist(0, 1, 0, device)


def step_row(size: str, batch: int, with_checkpoint: bool, mode: str, s: Setting, device: torch.device) -> str:
    """One dual-masking bf16 train step of `batch` clips, timed: a table row (OOM where it does not fit).
    mode: eager; fsdp (eager, the weights cast to bf16 by FSDP2's mixed-precision policy, one process);
    a torch.compile mode."""
    import gc
    from dataclasses import replace
    cfg = vmae.config(size, num_frames=s.frames, img_size=s.px, with_checkpoint=with_checkpoint)
    masks = masking.MaskConfig(cfg.grid, "tube", 0.9, "run_cell", 0.5)
    flops = train_pretrain.step_flops(replace(cfg, with_checkpoint=False), batch, masks)[1]  # no recompute: model FLOPs
    row = f"| {size} | {batch} | {MODES[mode]}{', checkpointing' if with_checkpoint else ''} | "
    try:
        torch.manual_seed(0)
        with torch.device(device):  # weights made on the GPU: a billion parameters take long on the CPU
            model = vmae.PretrainVideoMAE(cfg)
        if mode == "fsdp":
            model = engine.wrap_model(model, one_process_group(device), fsdp=True, precision="bf16")
        video = torch.randn(batch, 3, s.frames, s.px, s.px, device=device)
        loss = lambda m, v: train_pretrain.pretrain_step_loss(m, cfg, v, masks)  # noqa: E731
        if mode not in ("eager", "fsdp"):
            torch._dynamo.reset()
            loss = torch.compile(loss, mode=mode, dynamic=False)
        step = train_step_fn(model, loss, video, device, "bf16")
        sync(device)
        start = time.perf_counter()
        step()  # the first step: compiling, AdamW's state
        sync(device)
        first = time.perf_counter() - start
        seconds = round_robin({"step": step}, s.steps, 2, device)["step"]
        memory = peak_memory(step, device)
    except torch.OutOfMemoryError:
        return row + "OOM | | | | | | |"
    finally:
        model = step = video = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peak = datasheet_peak(device)
    mfu = f"{100 * flops / seconds / peak:.1f}" if peak else "-"
    compile_s = f"{first - seconds:.0f}" if mode not in ("eager", "fsdp") else ""
    return row + (f"{seconds * 1e3:.0f} | {batch / seconds:.1f} | {flops / batch / 1e9:.1f} "
                  f"| {flops / seconds / 1e12:.1f} | {mfu} | {memory} | {compile_s} |")


def suite_steps(part: str, rows: list, s: Setting, device: torch.device, write) -> None:
    write(f"\n## Train steps, {part}: dual masking, bf16 autocast, {s.frames}x{s.px}, median of {s.steps} steps\n\n"
          "MFU: model FLOPs (bench.py's count, no recompute) / step time / the datasheet's dense bf16 peak. "
          "compile s: the first step's time minus a later step's.\n\n"
          "| model | clips/GPU | mode | ms/step | clips/s | GFLOP/clip | TFLOP/s | MFU % | peak mem GiB | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|\n")
    for size, batch, ckpt, mode in rows:
        write(step_row(size, batch, ckpt, mode, s, device) + "\n")


def kernel_class(name: str) -> str:
    n = name.lower()
    # attention first: the flash kernels' names carry cutlass types too
    for cls, words in (("attention", ("flash", "fmha", "attention")), ("optimizer", ("adam", "multi_tensor")),
                       ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "aten::linear", "aten::mm")),
                       ("copy / cast", ("copy", "memcpy", "memset")), ("layer norm", ("layer_norm", "layernorm")),
                       ("reduction", ("reduce",))):
        if any(w in n for w in words):
            return cls
    return "elementwise / other"


def suite_profile(s: Setting, device: torch.device, out: Path, write) -> None:
    """Three eager steps under torch.profiler: kernels per step, GPU busy time, where it goes."""
    from torch.profiler import ProfilerActivity, profile
    size, batch = s.profile
    cfg = vmae.config(size, num_frames=s.frames, img_size=s.px)
    masks = masking.MaskConfig(cfg.grid, "tube", 0.9, "run_cell", 0.5)
    torch.manual_seed(0)
    with torch.device(device):
        model = vmae.PretrainVideoMAE(cfg)
    video = torch.randn(batch, 3, s.frames, s.px, s.px, device=device)
    step = train_step_fn(model, lambda m, v: train_pretrain.pretrain_step_loss(m, cfg, v, masks), video, device, "bf16")
    for _ in range(3):
        step()
    cuda = device.type == "cuda"
    sync(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(3):
            step()
        sync(device)
    wall = (time.perf_counter() - start) / 3
    if cuda:  # the kernels, copies and fills the GPU ran
        kernels, time_of = ([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA],
                            "device_time_total")
    else:  # a CPU runs each top-level op itself: those stand in, so that --smoke runs every line
        kernels, time_of = ([e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None],
                            "cpu_time_total")
    busy = sum(getattr(e, time_of) for e in kernels) / 3e3  # ms per step
    write(f"\n## Profile: {size}, {batch} clips, eager bf16, 3 steps after 3 (times under the profiler)\n\n"
          f"wall {wall * 1e3:.0f} ms/step; {len(kernels) / 3:.0f} kernels and copies/step; GPU busy {busy:.0f} ms/step "
          f"({100 * busy / (wall * 1e3):.0f} % of the wall time)\n\n"
          "| kernel class | kernels/step | ms/step | share of GPU time |\n"
          "|---|---|---|---|\n")
    classes = {}
    for e in kernels:
        count, us = classes.get(kernel_class(e.name), (0, 0.0))
        classes[kernel_class(e.name)] = (count + 1, us + getattr(e, time_of))
    for cls, (count, us) in sorted(classes.items(), key=lambda kv: -kv[1][1]):
        write(f"| {cls} | {count / 3:.0f} | {us / 3e3:.1f} | {100 * us / 3e3 / busy:.0f} % |\n")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    (out / "profile.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))


def suite_tests(out: Path, limit: float, write) -> None:
    """tests/test_gpu.py (and the GPU test of test_masking.py) with every failure named: the full log and a
    JUnit file, not a tail."""
    import subprocess
    import xml.etree.ElementTree as ET
    xml = out / "test_gpu.xml"
    try:
        with open(out / "test_gpu.log", "w") as log:
            subprocess.run([sys.executable, "-m", "pytest", "-rA", "tests/test_gpu.py", "tests/test_masking.py",
                            f"--junitxml={xml}"], stdout=log, stderr=subprocess.STDOUT, timeout=limit)
    except subprocess.TimeoutExpired:
        return write(f"\n## tests/test_gpu.py\n\nstopped after {limit:.0f} s; what ran is in test_gpu.log\n")
    outcome = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        kind = "passed" if bad is None else bad.tag
        why = (bad.get("message") or "").split("\n")[0][:200] if kind in ("failure", "error") else ""
        outcome.setdefault(kind, []).append(f"{case.get('classname')}::{case.get('name')}"
                                            + (f": {why}" if why else ""))
    write("\n## tests/test_gpu.py\n\n" + ", ".join(f"{len(v)} {k}" for k, v in outcome.items()) + "\n\n"
          + "".join(f"- {kind}: {name}\n" for kind in ("failure", "error") for name in outcome.get(kind, [])))


def loader_rate(list_file: str, workers: int, uint8: bool, s: Setting, device: torch.device) -> float:
    """Clips/s delivered by a DataLoader with `workers` processes (pinned, copied to the device and, for uint8,
    normalised there), batches of 8 videos x num_sample 4."""
    import data
    dataset = data.build_pretrain_dataset(list_file, num_frames=s.frames, input_size=s.px, num_sample=4, uint8=uint8)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True, persistent_workers=False)
    batches, start, clips = iter(loader), None, 0
    for i, clips_batch in enumerate(batches):
        video = clips_batch.to(device, non_blocking=True)
        if uint8:
            video = data.normalize(video)
        if i == workers:  # every worker has delivered a first batch: start the clock
            sync(device)
            start = time.perf_counter()
        elif start is not None:
            clips += video.shape[0] * video.shape[1]
    sync(device)
    return clips / (time.perf_counter() - start)


def suite_data(s: Setting, device: torch.device, write) -> None:
    """One worker per video size (the --data table), then the whole host: a loader with a worker per core."""
    import contextlib
    import io
    import os
    import tempfile
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        data_table(parse_args(["--num_frames", str(s.frames), "--input_size", str(s.px), "--steps", "3"]))
    workers = max(1, (os.cpu_count() or 2) - 2)  # the main process and its pinning thread keep a core
    write(f"\n## Data, on this host's CPU ({os.cpu_count()} cores)\n\n{table.getvalue()}\n"
          f"| DataLoader, {workers} workers, 240p, num_sample 4 | clips/s |\n|---|---|\n")
    with tempfile.TemporaryDirectory() as folder:
        write_video(f"{folder}/240p.mp4", *VIDEOS["240p"])
        list_file = f"{folder}/list.csv"
        Path(list_file).write_text(f"{folder}/240p.mp4 0 -1\n" * 8 * (2 * workers + 4))
        for uint8 in (False, True):
            rate = loader_rate(list_file, workers, uint8, s, device)
            how = "uint8, normalised on the device" if uint8 else "float32, normalised by the workers"
            write(f"| {how} | {rate:.0f} |\n")


def suite_command(cmd: list, limit: float, write, then: list | None = None) -> None:
    """A recipe run (showcase, study) in its own process; `then` runs after it even if it ran out of time."""
    import subprocess
    for c, share in ((cmd, 0.9), (then, 0.1)):
        if c is None:
            continue
        try:
            result = subprocess.run([sys.executable, *c], capture_output=True, text=True, timeout=share * limit)
            status, text = f"exit {result.returncode}", result.stdout[-3000:] + result.stderr[-2000:]
        except subprocess.TimeoutExpired as e:
            status, text = f"stopped after {share * limit:.0f} s", str(e.stdout or "")[-3000:]
        write(f"\n## `python {' '.join(c)}`: {status}\n\n```\n{text}\n```\n")


def suite_part(part: str, out: Path, smoke: bool, limit: float) -> None:
    """Run one part of the suite in this process, appending its tables to summary.md."""
    import datetime
    import os
    import platform
    import shutil
    import subprocess
    import tempfile
    s = SMOKE if smoke else GPU
    device = torch.device("cpu" if smoke else "cuda")

    def write(text):
        with open(out / "summary.md", "a") as f:
            f.write(text)
        print(text, end="", flush=True)

    if part == "env":
        cpus = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        cpu = next((line.split(":", 1)[1].strip() for line in cpus.splitlines() if line.startswith("model name")),
                   platform.processor())
        name = (torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU") + f"; CPU: {cpu}"
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip() if device.type == "cuda" else "-"
        write(f"# bench.py --gpu_suite{' --smoke' if smoke else ''}, {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n"
              f"{name}; nvidia-smi: {smi}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
              f"{os.cpu_count()} CPU cores; Python {platform.python_version()}; datasheet bf16 peak: "
              f"{(datasheet_peak(device) or 0) / 1e12:.0f} TFLOP/s\n")
    elif part in ("eager", "compiled"):
        suite_steps(part, s.eager if part == "eager" else s.compiled, s, device, write)
    elif part == "profile":
        suite_profile(s, device, out, write)
    elif part == "tests":
        suite_tests(out, limit - 15, write)
    elif part == "data":
        suite_data(s, device, write)
    elif part == "showcase":  # a ViT-S pretrained on the built-in clips at 224 px: the README's reconstruction
        scratch = Path(tempfile.mkdtemp())
        flags = ["--model", "demo", "--epochs", "1", "--synthetic_size", "8", "--batch_size", "2"] if smoke else \
                ["--model", "small", "--epochs", "100", "--warmup_epochs", "5", "--batch_size", "32",
                 "--num_workers", "12"]
        suite_command(["train_pretrain.py", *flags, "--input_size", str(s.px), "--num_frames", str(s.frames),
                       "--output_dir", str(scratch)], limit, write,
                      then=["visualize.py", "recon", "--checkpoint", str(scratch / "checkpoint-last.pth"),
                            "--slots", "4", "--out", str(scratch / "showcase.png")])
        if (scratch / "showcase.png").exists():  # the PNG only: the GIF beside it would not come back
            shutil.copy(scratch / "showcase.png", out / "recon.png")
    elif part == "study":  # the study's GPU setting; its tables and figure next to the suite's
        scratch = Path(tempfile.mkdtemp())
        suite_command(["study.py", "--out", str(scratch)]
                      + (["--quick", "--seeds", "0", "--arms", "v1"] if smoke else []), limit, write)
        for name in ("study.md", "study.png"):
            if (scratch / name).exists():
                shutil.copy(scratch / name, out / name)


def gpu_suite(args) -> None:
    """Each part in its own process (a crash or an out-of-memory stays in its part) with its own time limit,
    all within --budget_s; every table is appended to summary.md as soon as it is measured, so a part that
    runs out of time keeps the rows it finished. Rerun single parts with --parts."""
    import subprocess
    out = Path(args.gpu_suite)
    out.mkdir(parents=True, exist_ok=True)
    if not args.smoke and not torch.cuda.is_available():
        raise engine.RunError("bench.py --gpu_suite: no GPU here; --smoke runs the suite's tiny stand-in on the CPU")
    deadline = time.time() + args.budget_s
    with open(out / "suite.log", "a") as log:
        for part in args.parts:
            limit = min(SUITE[part] * (3 if args.smoke else 1), deadline - time.time())
            if limit < 5:
                print(f"{part}: skipped, the budget is spent", file=log, flush=True)
                continue
            cmd = [sys.executable, __file__, "--gpu_suite", str(out), "--part", part, "--part_limit", str(int(limit))]
            start = time.time()
            try:
                result = subprocess.run(cmd + (["--smoke"] if args.smoke else []), stdout=subprocess.PIPE,
                                        stderr=log, text=True, timeout=limit)
                status = f"exit {result.returncode}"
                print(result.stdout, end="", flush=True)
            except subprocess.TimeoutExpired:
                status = f"stopped after its {limit:.0f} s"
            print(f"{part}: {status}, {time.time() - start:.0f} s", file=log, flush=True)
            print(f"# {part}: {status}, {time.time() - start:.0f} s", flush=True)
    print(f"tables: {out / 'summary.md'}; errors: {out / 'suite.log'}")


# -----------------------------------------------------------------------------------------------------
# Tables


def flops_table(args) -> None:
    print(f"per clip, {args.num_frames}x{args.input_size}, tube {args.mask_ratio}, running cell "
          f"{args.decoder_mask_ratio}; GMAC = forward multiply-adds (the paper's 'FLOPs')")
    print("| size | encoder tokens | decoder tokens V1 | decoder tokens V2 | loss tokens V2 | GMAC V1 | GMAC V2 "
          "| train-step GFLOP V1 | train-step GFLOP V2 | fine-tune GMAC |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in vmae.PAPER_SIZES:
        cfg = vmae.config(size, num_frames=args.num_frames, img_size=args.input_size)
        masks = recipe(args, cfg.grid, True)
        num_visible, num_queries, loss_tokens = masks.num_visible, masks.num_queries, int(masks.draw(1).in_loss.sum())
        v1 = cfg.num_tokens
        f1, t1 = train_pretrain.step_flops(cfg, 1, recipe(args, cfg.grid, dual=False))
        f2, t2 = train_pretrain.step_flops(cfg, 1, recipe(args, cfg.grid, dual=True))
        print(f"| {size} | {num_visible} | {v1} | {num_visible + num_queries} | {loss_tokens} | {f1 / 2e9:.2f} "
              f"| {f2 / 2e9:.2f} | {t1 / 1e9:.1f} | {t2 / 1e9:.1f} | {infer_flops(cfg, 1) / 2e9:.1f} |")


def main(argv=None):
    args = parse_args(argv)
    if args.flops:
        return flops_table(args)
    if args.data:
        return data_table(args)
    if args.memory:
        return memory_table(args)
    if args.ops:
        return ops_table(args)
    if args.part:
        return suite_part(args.part, Path(args.gpu_suite), args.smoke, args.part_limit)
    if args.gpu_suite:
        return gpu_suite(args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    B = args.batch_size
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}{threads}, torch {torch.__version__}; batch {B}, {args.num_frames}x{args.input_size}, "
          f"tube {args.mask_ratio}, running cell {args.decoder_mask_ratio}; median of {args.steps} steps")
    peaks = {p: matmul_peak(device, torch.float32 if p == "fp32" else torch.bfloat16) for p in args.precision}
    print("# measured matmul peak: " + ", ".join(f"{p} {v / 1e12:.2f} TFLOP/s" for p, v in peaks.items()))
    print("| model | step | masking | precision | ms | clips/s | GFLOP | TFLOP/s | % of peak | peak mem GiB "
          "| vs HF | vs reference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def rows(size, step, kind, precision, contenders, flops):
        """Time the contenders in turns; a row for ours (and ours compiled) with the others as ratios."""
        seconds = round_robin(contenders, args.steps, args.warmup, device)
        for name in [n for n in seconds if n.startswith("ours")]:
            s = seconds[name]
            label = kind + name.removeprefix("ours")
            vs = {peer: f"{seconds[peer] / s:.2f}x" if peer in seconds else "" for peer in ("HF", "reference")}
            print(f"| {size} | {step} | {label} | {precision} | {s * 1e3:.0f} | {B / s:.2f} | {flops / 1e9:.1f} "
                  f"| {flops / s / 1e12:.3f} | {100 * flops / s / peaks[precision]:.0f} "
                  f"| {peak_memory(contenders[name], device)} | {vs['HF']} | {vs['reference']} |", flush=True)

    for size in args.sizes:
        cfg = vmae.config(size, num_frames=args.num_frames, img_size=args.input_size)
        video = torch.randn(B, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=device)
        ours = vmae.PretrainVideoMAE(cfg).to(device)
        classifier = vmae.VideoClassifier(cfg, 400).to(device).eval()
        hf = hf_models(cfg)
        hf = [m.to(device) for m in hf] if hf is not None else None
        ref = [m.to(device) for m in reference_models(args.reference, size, cfg)] if args.reference else None
        for precision in args.precision:
            for dual in (True, False):
                ours_loss = lambda m, v: train_pretrain.pretrain_step_loss(m, cfg, v, recipe(args, cfg.grid, dual))  # noqa: E731
                contenders = {"ours": train_step_fn(ours, ours_loss, video, device, precision)}
                if args.compile:
                    contenders["ours compiled"] = train_step_fn(ours, torch.compile(ours_loss), video, device,
                                                                precision)
                if hf is not None and not dual:  # Hugging Face has no decoder masking
                    contenders["HF"] = train_step_fn(hf[0], lambda m, v: hf_loss(m, v, args, cfg.grid), video, device,
                                                     precision)
                if ref is not None:
                    contenders["reference"] = train_step_fn(ref[0], lambda m, v: reference_loss(m, v, args, dual, cfg),
                                                            video, device, precision)
                rows(size, "train", "dual" if dual else "V1", precision, contenders,
                     train_pretrain.step_flops(cfg, B, recipe(args, cfg.grid, dual))[1])

            def infer(model, **kw):
                def run():
                    with torch.no_grad(), engine.autocast(device, precision):
                        model(**kw)
                return run
            contenders = {"ours": infer(classifier, video=video)}
            if args.compile:
                contenders["ours compiled"] = infer(torch.compile(classifier), video=video)
            if hf is not None:
                contenders["HF"] = infer(hf[1].eval(), pixel_values=video.transpose(1, 2))
            if ref is not None:
                contenders["reference"] = infer(ref[1].eval(), x=video)
            rows(size, "infer", "-", precision, contenders, infer_flops(cfg, B))


if __name__ == "__main__":
    engine.run(main)
