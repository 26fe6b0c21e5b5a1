"""How fast vmae trains and infers, beside Hugging Face's VideoMAE and the reference implementation.

A row per model size, masking (V2's dual or V1's encoder-only) and precision times one pretraining step (masks drawn
on the device, forward, target, loss, backward, AdamW), then the classifier's forward: clips/s, model FLOPs (PyTorch's
meta-device counter, 2 per multiply-add; the paper's "FLOPs", the GMAC of --flops, are forward multiply-adds) and
their share of the measured matmul peak. Hugging Face's VideoMAE (if installed; V1 only) and the reference
(--reference: an OpenGVLab/VideoMAEv2 checkout, timm importable) take turns with ours; "vs": their time over ours.

    python bench.py                               # small and base, 16x224, batch 2, fp32 and bf16
    python bench.py --sizes base --batch_size 8 --precision bf16 --compile
    python bench.py --reference /path/to/VideoMAEv2 --precision fp32
    python bench.py --flops                       # tokens and GFLOPs per clip for every size, no timing
"""
import argparse
import functools
import statistics
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import checkpoints
import engine
import masking
import train_pretrain
import vmae


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["small", "base"], choices=list(vmae.SIZES))
    p.add_argument("--batch_size", type=engine.Range(int, 1), default=2)
    p.add_argument("--num_frames", type=engine.Range(int, 1, 1024), default=16)
    p.add_argument("--input_size", type=engine.Range(int, 1, 4096), default=224)
    p.add_argument("--mask_ratio", type=engine.Range(float, 0, 1, open_low=True, open_high=True), default=0.9)
    p.add_argument("--decoder_mask_ratio", type=engine.Range(float, 0, 1, open_high=True), default=0.5)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=engine.Range(int, 1), default=5, help="timed steps; the median is reported")
    p.add_argument("--warmup", type=engine.Range(int, 0), default=2)
    p.add_argument("--device", type=engine.device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time our step under torch.compile")
    p.add_argument("--reference", metavar="DIR", help="a checkout of OpenGVLab/VideoMAEv2 to time side by side")
    p.add_argument("--flops", action="store_true", help="print the per-clip token and FLOP table and exit")
    return p.parse_args(argv)


def round_robin(contenders: dict, steps: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per call of each contender, taking turns call by call to meet the same machine state (caches,
    allocator, clocks): timed one after another on a CPU, their ratio swings by 20 % and more between runs."""
    times = {name: [] for name in contenders}
    for _ in range(warmup + steps):
        for name, fn in contenders.items():
            times[name].append(engine.timed(fn, device))
    return {name: statistics.median(t[warmup:]) for name, t in times.items()}


def peak_memory(fn, device: torch.device) -> str:
    """GiB of GPU memory one call of fn needs at its peak ('-' on a CPU)."""
    if device.type != "cuda":
        return "-"
    torch.cuda.reset_peak_memory_stats(device)
    engine.timed(fn, device)
    return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f}"


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul, the best of ten: the ceiling each row's share is measured against."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / min(engine.timed(functools.partial(torch.mm, a, b), device) for _ in range(10))


def infer_flops(cfg: vmae.VideoMAEConfig, batch: int) -> int:
    """FLOPs of the classifier's forward on `batch` clips, counted on the meta device."""
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        vmae.VideoClassifier(cfg, 400)(torch.empty(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size))
    return counter.get_total_flops()


def mask_configs(grid, mask_ratio: float, decoder_mask_ratio: float) -> dict[str, masking.MaskConfig]:
    """The masks of a timed step by the table's name: tube and running cell (dual), or the tube alone (V1)."""
    return {"dual": masking.MaskConfig(grid, "tube", mask_ratio, "run_cell", decoder_mask_ratio),
            "V1": masking.MaskConfig(grid, "tube", mask_ratio, "run_cell", 0.0)}


def train_step(model, optimizer, loss_fn, video, precision: str) -> None:
    """One optimizer step on loss_fn(model, video), as the training loop takes it."""
    with engine.autocast(video.device, precision):
        loss = loss_fn(model, video)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def hf_loss(model, video, masks: masking.MaskConfig):
    hidden = masking.tube_mask(video.shape[0], masks.grid, masks.mask_ratio, device=video.device)
    return model(pixel_values=video.transpose(1, 2), bool_masked_pos=hidden).loss  # HF wants (B, T, C, H, W)


def reference_models(path: str, size: str, cfg: vmae.VideoMAEConfig):
    """The reference's pretraining model and classifier, built by its own registered functions."""
    sys.path.insert(0, path)
    from models import modeling_finetune, modeling_pretrain  # noqa: the reference checkout's package
    name, clips = f"{size}_patch{cfg.patch_size}_224", dict(all_frames=cfg.num_frames, tubelet_size=cfg.tubelet_size)
    pretrain = getattr(modeling_pretrain, f"pretrain_videomae_{name}")
    classifier = getattr(modeling_finetune, f"vit_{name}")
    return pretrain(**clips, decoder_depth=cfg.decoder_depth, drop_path_rate=0.0), classifier(**clips, num_classes=400)


def reference_loss(model, video, masks: masking.MaskConfig, patch_size: int):
    """The reference's forward on boolean masks (True = hidden / dropped, as ours), our loss, and the target as its
    training engine computes it (written out: our faster target must not flatter its timing): un-normalise the clip,
    cut every cube channel-last with a tubelet of 2, normalise each by torch's unbiased std."""
    drawn = masks.draw(video.shape[0], video.device)
    pred = model(video, drawn.encoder, drawn.decoder)  # (B, N_q, F)
    B, C, T, H, W = video.shape
    p = patch_size
    mean, std = (stat.view(1, 3, 1, 1, 1) for stat in vmae.imagenet_stats(video))
    with torch.no_grad():
        x = (video * std + mean).reshape(B, C, T // 2, 2, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
        x = x.reshape(B, -1, 2 * p * p, C)  # (B, N, 2·p·p, 3)
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
        target = vmae.gather_tokens(x.flatten(2), drawn.queries)  # (B, N_q, 2·p·p·3)
    return vmae.pretrain_loss(pred, target, drawn.in_loss)


def build_models(size: str, cfg: vmae.VideoMAEConfig, device: torch.device, reference: str | None) -> dict:
    """(pretraining model, classifier) of each implementation by name: ours, HF's if installed, the reference's."""
    models = {"ours": (vmae.PretrainVideoMAE(cfg), vmae.VideoClassifier(cfg, 400))}
    try:
        import transformers
        hf = transformers.VideoMAEConfig(**checkpoints.hugging_face_config(cfg, "VideoMAEForPreTraining", 400))
        models["HF"] = transformers.VideoMAEForPreTraining(hf), transformers.VideoMAEForVideoClassification(hf)
    except ImportError:
        pass
    if reference:
        models["reference"] = reference_models(reference, size, cfg)
    return {name: (pretrain.to(device), classifier.to(device).eval()) for name, (pretrain, classifier)
            in models.items()}


def train_contenders(models: dict, cfg, masks: masking.MaskConfig, video, precision: str, compile: bool) -> dict:
    """A train step, with an AdamW of its own, of each implementation that has this masking (HF: V1's alone)."""
    losses = {"ours": lambda model, video: train_pretrain.pretrain_step_loss(model, cfg, video, masks),
              "HF": functools.partial(hf_loss, masks=masks),
              "reference": functools.partial(reference_loss, masks=masks, patch_size=cfg.patch_size)}
    runs = [(name, models[name][0], losses[name]) for name in models if not (name == "HF" and masks.dual)]
    if compile:
        runs.append(("ours compiled", models["ours"][0], torch.compile(losses["ours"])))
    steps = {}
    for name, model, loss in runs:
        optimizer = engine.make_optimizer(engine.param_groups(model, 0.05), 1e-4, (0.9, 0.95), 1e-8, video.device)
        steps[name] = functools.partial(train_step, model, optimizer, loss, video, precision)
    return steps


def infer_contenders(models: dict, video, compile: bool) -> dict:
    """The classifier's forward of each implementation, by name (timed without grad, under autocast)."""
    inputs = {"ours": dict(video=video), "HF": dict(pixel_values=video.transpose(1, 2)), "reference": dict(x=video)}
    runs = {name: functools.partial(classifier, **inputs[name]) for name, (_, classifier) in models.items()}
    if compile:
        runs["ours compiled"] = functools.partial(torch.compile(models["ours"][1]), **inputs["ours"])
    return runs


def print_rows(cells: tuple, contenders: dict, flops: int, peak: float, args, device: torch.device) -> None:
    """Time the contenders in turns; rows (`cells`: model, step, masking, precision) for ours, peers as ratios."""
    seconds, batch = round_robin(contenders, args.steps, args.warmup, device), args.batch_size
    size, step, masking_name, precision = cells
    for ours in [name for name in seconds if name.startswith("ours")]:
        s = seconds[ours]
        vs = [f"{seconds[peer] / s:.2f}x" if peer in seconds else "" for peer in ("HF", "reference")]
        print(f"| {size} | {step} | {masking_name}{ours.removeprefix('ours')} | {precision} | {s * 1e3:.0f} "
              f"| {batch / s:.2f} | {flops / 1e9:.1f} | {flops / s / 1e12:.3f} | {100 * flops / s / peak:.0f} "
              f"| {peak_memory(contenders[ours], device)} | {vs[0]} | {vs[1]} |", flush=True)


def flops_table(num_frames: int, input_size: int, mask_ratio: float, decoder_mask_ratio: float) -> None:
    print(f"per clip, {num_frames}x{input_size}, tube {mask_ratio}, running cell {decoder_mask_ratio}; "
          "GMAC = forward multiply-adds (the paper's 'FLOPs')")
    print("| size | encoder tokens | decoder tokens V1 | decoder tokens V2 | loss tokens V2 | GMAC V1 | GMAC V2 "
          "| train-step GFLOP V1 | train-step GFLOP V2 | fine-tune GMAC |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in vmae.PAPER_SIZES:
        cfg = vmae.config(size, num_frames=num_frames, img_size=input_size)
        masks = mask_configs(cfg.grid, mask_ratio, decoder_mask_ratio)
        dual = masks["dual"]
        (f1, t1), (f2, t2) = (train_pretrain.step_flops(cfg, 1, masks[kind]) for kind in ("V1", "dual"))
        print(f"| {size} | {dual.num_visible} | {cfg.num_tokens} | {dual.num_visible + dual.num_queries} "
              f"| {int(dual.draw(1).in_loss.sum())} | {f1 / 2e9:.2f} | {f2 / 2e9:.2f} | {t1 / 1e9:.1f} "
              f"| {t2 / 1e9:.1f} | {infer_flops(cfg, 1) / 2e9:.1f} |")


def main(argv=None):
    args = parse_args(argv)
    if args.flops:
        return flops_table(args.num_frames, args.input_size, args.mask_ratio, args.decoder_mask_ratio)
    device, batch = torch.device(args.device), args.batch_size
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}; batch {batch}, {args.num_frames}x{args.input_size}, "
          f"tube {args.mask_ratio}, running cell {args.decoder_mask_ratio}; median of {args.steps} steps")
    peaks = {p: matmul_peak(device, torch.float32 if p == "fp32" else torch.bfloat16) for p in args.precision}
    print("# measured matmul peak: " + ", ".join(f"{p} {v / 1e12:.2f} TFLOP/s" for p, v in peaks.items()))
    print("| model | step | masking | precision | ms | clips/s | GFLOP | TFLOP/s | % of peak | peak mem GiB "
          "| vs HF | vs reference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        cfg = vmae.config(size, num_frames=args.num_frames, img_size=args.input_size)
        video = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=device)  # (B, 3, T, H, W)
        models = build_models(size, cfg, device, args.reference)
        for precision in args.precision:
            for masking_name, masks in mask_configs(cfg.grid, args.mask_ratio, args.decoder_mask_ratio).items():
                print_rows((size, "train", masking_name, precision),
                           train_contenders(models, cfg, masks, video, precision, args.compile),
                           train_pretrain.step_flops(cfg, batch, masks)[1], peaks[precision], args, device)
            with torch.no_grad(), engine.autocast(device, precision):
                print_rows((size, "infer", "-", precision), infer_contenders(models, video, args.compile),
                           infer_flops(cfg, batch), peaks[precision], args, device)


if __name__ == "__main__":
    engine.run(main)
