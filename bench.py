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
    python bench.py --data                        # clips/s of one data worker on 720p and 240p videos
    python bench.py --memory --sizes giant        # GB per GPU by size, precision, checkpointing (computed)

FLOPs are counted by running the step once on the `meta` device under PyTorch's FLOP counter (2 FLOPs
per multiply-add; exact shapes, no arithmetic typed in by hand; train_pretrain.step_flops). The paper's "FLOPs" are multiply-adds
of the forward pass, i.e. half of the forward figure here.
"""
import argparse
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import engine
import masking
import train_pretrain
import vmae


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["small", "base"], choices=list(vmae.SIZES))
    p.add_argument("--batch_size", type=engine.within("[1, inf)", int), default=2)
    p.add_argument("--num_frames", type=engine.within("[1, 1024]", int), default=16)
    p.add_argument("--input_size", type=engine.within("[1, 4096]", int), default=224)
    p.add_argument("--mask_ratio", type=engine.within("(0, 1)"), default=0.9)
    p.add_argument("--decoder_mask_ratio", type=engine.within("[0, 1)"), default=0.5)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=engine.within("[1, inf)", int), default=5, help="timed steps (the median is "
                   "reported)")
    p.add_argument("--warmup", type=engine.within("[0, inf)", int), default=2)
    p.add_argument("--device", type=engine.device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time our step under torch.compile")
    p.add_argument("--reference", metavar="DIR", help="a checkout of OpenGVLab/VideoMAEv2 to time side by side")
    p.add_argument("--flops", action="store_true", help="print the per-clip token and FLOP table and exit")
    p.add_argument("--data", action="store_true", help="time one data worker on videos the bench writes, and exit")
    p.add_argument("--memory", action="store_true", help="compute the training-memory table for every size, and exit")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------------------------------
# Measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, steps: int, warmup: int, device: torch.device) -> float:
    return round_robin({"fn": fn}, steps, warmup, device)["fn"]


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


def recipe(args, dual: bool) -> masking.MaskConfig:
    """The masks of the timed step: tube and running cell (dual masking) or tube alone (V1)."""
    return masking.MaskConfig("tube", args.mask_ratio, "run_cell", args.decoder_mask_ratio if dual else 0.0)


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
    enc, dec, _, _ = recipe(args, dual).draw(video.shape[0], cfg.grid, video.device)
    pred = model(video, enc, dec)
    with torch.no_grad():
        target = reference_target(video, cfg.patch_size)
    return vmae.pretrain_loss(pred, target, enc, dec)


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


def data_table(args) -> None:
    """Clips/s of one worker (one process, one decoding thread) turning videos into training clips."""
    import tempfile
    import data
    print(f"# one data worker, {args.num_frames}x{args.input_size} clips from 10 s, 30 fps mp4v videos written here")
    print("| video | pretraining clips/s (num_sample 1) | pretraining clips/s (num_sample 4) | fine-tune train clips/s (num_sample 2) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, (w, h) in {"720p": (1280, 720), "240p": (320, 240)}.items():
            path = f"{folder}/{name}.mp4"
            write_video(path, w, h)
            list_file = f"{folder}/{name}.csv"
            with open(list_file, "w") as f:
                f.write(f"{path} 0\n")
            rates = []
            for build, num_sample in ((data.build_pretrain_dataset, 1), (data.build_pretrain_dataset, 4),
                                      (data.build_finetune_dataset, 2)):
                kwargs = dict(num_frames=args.num_frames, sampling_rate=4, input_size=args.input_size, num_sample=num_sample)
                dataset = (build(list_file, **kwargs) if build is data.build_pretrain_dataset
                           else build("train", list_file, nb_classes=1, **kwargs))
                seconds = median_seconds(lambda: dataset[0], args.steps, args.warmup, torch.device("cpu"))
                rates.append(f"{num_sample / seconds:.1f}")
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
        train_pretrain.pretrain_step_loss(model, cfg, video, recipe(args, dual=True))
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
              f"| {states + 32 * per_clip['ckpt'] / gib:.1f} | {states / 64 + 32 * per_clip['ckpt'] / gib:.1f} |", flush=True)


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
        enc, dec, num_visible, num_queries = recipe(args, True).draw(1, cfg.grid)
        loss_tokens = int((enc & ~dec).sum())
        v1 = cfg.num_tokens
        f1, t1 = train_pretrain.step_flops(cfg, 1, recipe(args, dual=False))
        f2, t2 = train_pretrain.step_flops(cfg, 1, recipe(args, dual=True))
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
    device = torch.device(args.device)
    torch.manual_seed(0)
    B = args.batch_size
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}{threads}, torch {torch.__version__}; batch {B}, {args.num_frames}x{args.input_size}, "
          f"tube {args.mask_ratio}, running cell {args.decoder_mask_ratio}; median of {args.steps} steps")
    peaks = {p: matmul_peak(device, torch.float32 if p == "fp32" else torch.bfloat16) for p in args.precision}
    print("# measured matmul peak: " + ", ".join(f"{p} {v / 1e12:.2f} TFLOP/s" for p, v in peaks.items()))
    print("| model | step | masking | precision | ms | clips/s | GFLOP | TFLOP/s | % of peak | peak mem GiB | vs HF | vs reference |")
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
                ours_loss = lambda m, v: train_pretrain.pretrain_step_loss(m, cfg, v, recipe(args, dual))  # noqa: E731
                contenders = {"ours": train_step_fn(ours, ours_loss, video, device, precision)}
                if args.compile:
                    contenders["ours compiled"] = train_step_fn(ours, torch.compile(ours_loss), video, device, precision)
                if hf is not None and not dual:  # Hugging Face has no decoder masking
                    contenders["HF"] = train_step_fn(hf[0], lambda m, v: hf_loss(m, v, args, cfg.grid), video, device, precision)
                if ref is not None:
                    contenders["reference"] = train_step_fn(ref[0], lambda m, v: reference_loss(m, v, args, dual, cfg),
                                                            video, device, precision)
                rows(size, "train", "dual" if dual else "V1", precision, contenders, train_pretrain.step_flops(cfg, B, recipe(args, dual))[1])

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
