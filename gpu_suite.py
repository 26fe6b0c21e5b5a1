"""What bench.py's table leaves out: every GPU measurement in one command (the suite), and the tables of what
a train step costs (its ATen ops, its memory) and of what feeds it (one data worker).

    python gpu_suite.py gpu_out                 # every GPU measurement, tables to gpu_out/summary.md (needs a GPU)
    python gpu_suite.py gpu_out --smoke         # its tiny stand-in on the CPU, every line run in a few minutes
    python gpu_suite.py gpu_out --parts compiled   # rerun one part
    python gpu_suite.py --ops                   # ATen ops per train step, to stdout
    python gpu_suite.py --memory --sizes giant  # GB per GPU by size, precision, checkpointing (computed)
    python gpu_suite.py --data                  # clips/s of one data worker on 240p, 320p and 720p videos

Each part of the suite (SUITE) runs in its own process, stopped at its time limit, all within --budget_s; its
rows go to OUT/summary.md as measured, its exit and errors to suite.log. Steps mask by tube 0.9, running cell 0.5.
"""
import argparse
import functools
import gc
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, namedtuple
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import data
import engine
import masking
import train_pretrain
import vmae

# Datasheet dense bf16 peaks (no sparsity), TFLOP/s: the first entry whose words are all in the GPU's name.
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989}
MODES = {"eager": None, "compiled": "default", "compiled, CUDA graphs": "reduce-overhead"}  # torch.compile's
# The suite on a GPU, or its tiny stand-in on the CPU (--smoke): frames x px clips, `steps` timed steps per row;
# eager, compiled: rows of (size, clips per GPU, activation checkpointing, a MODES key); profile: (size, clips).
Setting = namedtuple("Setting", ["frames", "px", "steps", "eager", "compiled", "profile"])

GPU = Setting(16, 224, 5,
              eager=[(size, clips, size == "giant", "eager") for size in ("small", "base", "large", "huge", "giant")
                     for clips in (32, 128)],
              compiled=[(size, 128, False, "compiled") for size in ("base", "small", "large", "huge")]
              + [("base", 32, False, "compiled"), ("small", 32, False, "compiled"),
                 ("base", 128, False, "compiled, CUDA graphs"), ("giant", 128, True, "compiled")],
              profile=("base", 128))
SMOKE = Setting(8, 32, 2, eager=[("demo", 2, False, "eager"), ("demo", 4, True, "eager")],
                compiled=[("demo", 2, False, "compiled")], profile=("demo", 2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", type=Path, help="the suite's output folder")
    table = p.add_mutually_exclusive_group()
    table.add_argument("--ops", action="store_true", help="count the ATen ops of a train step, instead of the suite")
    table.add_argument("--memory", action="store_true", help="compute the training-memory table, instead of the suite")
    table.add_argument("--data", action="store_true", help="time one data worker, instead of the suite")
    p.add_argument("--parts", nargs="+", default=list(SUITE), choices=list(SUITE), help="the suite's parts")
    p.add_argument("--budget_s", type=engine.Range(float, 0, open_low=True), default=560,
                   help="seconds for all the suite's parts together")
    p.add_argument("--smoke", action="store_true", help="the suite at tiny sizes on the CPU, to check that it runs")
    p.add_argument("--sizes", nargs="+", default=["small", "base"], choices=list(vmae.SIZES), help="--ops, --memory")
    p.add_argument("--num_frames", type=engine.Range(int, 1, 1024), default=16, help="--ops, --memory, --data")
    p.add_argument("--input_size", type=engine.Range(int, 1, 4096), default=224, help="--ops, --memory, --data")
    p.add_argument("--batch_size", type=engine.Range(int, 1), default=2, help="--ops")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"], help="--ops")
    p.add_argument("--steps", type=engine.Range(int, 1), default=5, help="--data: timed items, the median counts")
    p.add_argument("--warmup", type=engine.Range(int, 0), default=2, help="--data")
    args = p.parse_args(argv)
    if (args.out is not None) == (args.ops or args.memory or args.data):
        p.error("give either the suite's output folder or one of --ops, --memory, --data")
    return args


def pretrain_step(cfg: vmae.VideoMAEConfig, clips: int, device: torch.device, precision: str, mode=None):
    """A pretraining step on random clips (masks drawn on the device, forward, target, loss, backward, AdamW)
    as a function to call; mode: None (eager) or a torch.compile mode for the loss (masks to loss)."""
    torch.manual_seed(0)
    with torch.device(device):  # made on the GPU: a billion parameters take long to initialise on the CPU
        model = vmae.PretrainVideoMAE(cfg)
    video = torch.randn(clips, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=device)  # (B, 3, T, H, W)
    masks = masking.MaskConfig(cfg.grid)

    def loss_of(video):
        return train_pretrain.pretrain_step_loss(model, cfg, video, masks)
    if mode is not None:
        torch._dynamo.reset()
        loss_of = torch.compile(loss_of, mode=mode, dynamic=False)
    optimizer = engine.make_optimizer(engine.param_groups(model, 0.05), 1e-4, (0.9, 0.95), 1e-8, device)

    def step():
        with engine.autocast(device, precision):
            loss = loss_of(video)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops a step runs below autograd and autocast (composites as run: F.linear is a transpose and
    an addmm). On a GPU each but a view or allocation launches a kernel at a host cost: it tracks eager host time."""
    KINDS = {**dict.fromkeys(["empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"], "allocation"),
             **dict.fromkeys(["_to_copy", "copy_", "_foreach_copy_"], "cast")}  # the rest compute, or views

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "profiler":  # the optimizer's record_function marks: no work
            kind = "marks"
        elif any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            kind = "view"
        else:
            kind = self.KINDS.get(func.overloadpacket.__name__, "compute")
        self.counts[kind] += 1
        return func(*args, **(kwargs or {}))


def count_ops(step) -> Counter:
    """Ops of one step() by kind, and "profiler": the aten:: events torch.profiler records, at every nesting level."""
    step()  # the first step creates AdamW's state
    with OpCounter() as counter:
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counter.counts["profiler"] = sum(e.name.startswith("aten::") for e in prof.events())
    return counter.counts


def ops_table(sizes: list, precisions: list, batch: int, num_frames: int, input_size: int):
    """ATen ops per train step, counted on the CPU: the same for any resolution and batch from 2 clips on (with 1,
    a reshape needs no copy). A GPU's autocast casts the same weights, and LayerNorm to fp32: 4 more casts each."""
    yield (f"# ATen ops per train step, dual masking, counted on the CPU (torch {torch.__version__}); "
           f"batch {batch}, {num_frames}x{input_size}")
    yield "| model | precision | ops | compute | casts | views | allocations | profiler aten:: events |"
    yield "|---|---|---|---|---|---|---|---|"
    for size in sizes:
        cfg = vmae.config(size, num_frames=num_frames, img_size=input_size)
        for precision in precisions:
            c = count_ops(pretrain_step(cfg, batch, torch.device("cpu"), precision))
            yield (f"| {size} | {precision} | {c['compute'] + c['cast'] + c['view'] + c['allocation']} "
                   f"| {c['compute']} | {c['cast']} | {c['view']} | {c['allocation']} | {c['profiler']} |")


def saved_for_backward(cfg: vmae.VideoMAEConfig, batch: int, precision: str) -> tuple[int, int]:
    """Bytes autograd keeps for backward from a pretraining forward of `batch` clips, recorded on the CPU (flash
    attention keeps what it keeps on a GPU), each storage once, parameters not: (everything, under checkpointing:
    what is kept outside the blocks, each block's input, and the largest block's own while it is recomputed)."""
    torch.manual_seed(0)
    model = vmae.PretrainVideoMAE(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}  # storage -> bytes
    per_block, inputs = [], 0  # bytes first saved inside each block; bytes of the blocks' inputs

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    def enter(block, args):
        nonlocal inputs
        inputs += args[0].numel() * args[0].element_size()
        per_block.append(-sum(saved.values()))

    def leave(*_):
        per_block[-1] += sum(saved.values())

    for block in [m for m in model.modules() if isinstance(m, vmae.Block)]:
        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave)
    video = torch.randn(batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), engine.autocast(torch.device("cpu"), precision):
        train_pretrain.pretrain_step_loss(model, cfg, video, masking.MaskConfig(cfg.grid))
    everything = sum(saved.values())
    return everything, everything - sum(per_block) + inputs + max(per_block)


def memory_table(sizes: list, num_frames: int, input_size: int):
    """GiB a train step needs, lower bounds (no temporaries, no allocator slack): 16 B/param (fp32 weights, grads,
    AdamW's moments, bf16 or not) + activations kept for backward, per clip 2 clips' minus 1's (weight casts cancel)."""
    yield (f"# computed, not measured: dual masking, {num_frames}x{input_size}; activations per clip x clips "
           "per GPU + 16 B/param (divided by the GPU count under --fsdp)")
    yield ("| size | params | weights+grads+AdamW GiB | activations GiB/clip fp32 | bf16 | bf16 + checkpointing "
           "| GiB/GPU at 32 clips, bf16 | + checkpointing | + checkpointing, FSDP over 64 GPUs |")
    yield "|---|---|---|---|---|---|---|---|---|"
    # A process per measurement: a freed billion-parameter model's pages stay in the C allocator's arenas.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as fresh:
        for size in sizes:
            cfg = vmae.config(size, num_frames=num_frames, img_size=input_size)
            with torch.device("meta"):
                params = sum(p.numel() for p in vmae.PretrainVideoMAE(cfg).parameters())
            per_clip = {}  # GiB of activations per clip: (everything, under checkpointing)
            for precision in ("fp32", "bf16"):
                one, two = (fresh.submit(saved_for_backward, cfg, batch, precision).result() for batch in (1, 2))
                per_clip[precision] = [(b - a) / 2 ** 30 for a, b in zip(one, two)]
            (fp32, _), (bf16, ckpt) = per_clip["fp32"], per_clip["bf16"]
            states = 16 * params / 2 ** 30
            yield (f"| {size} | {params / 1e6:.0f}M | {states:.1f} | {fp32:.3f} | {bf16:.3f} | {ckpt:.3f} "
                   f"| {states + 32 * bf16:.1f} | {states + 32 * ckpt:.1f} | {states / 64 + 32 * ckpt:.1f} |")


VIDEOS = {"240p": (320, 240), "320p": (426, 320), "720p": (1280, 720)}  # width, height


def data_table(num_frames: int, input_size: int, steps: int, warmup: int):
    """Clips/s of one worker (one process and decoding thread) turning videos into float clips, or uint8 ones the
    GPU normalises (--normalize_on_device); the datasets take turns item by item, to meet the same machine state."""
    clip = 3 * num_frames * input_size ** 2
    yield (f"# one data worker, {num_frames}x{input_size} clips from 10 s, 30 fps mp4v videos written here; "
           f"torch {torch.__version__}; a clip is {4 * clip / 1e6:.2f} MB as float32, {clip / 1e6:.2f} MB as uint8")
    yield ("| video | pretraining clips/s (num_sample 1) | pretraining clips/s (num_sample 4) "
           "| num_sample 4, uint8 (normalised on the device) | fine-tune train clips/s (num_sample 2) |")
    yield "|---|---|---|---|---|"
    with tempfile.TemporaryDirectory() as folder:
        for name, (width, height) in VIDEOS.items():
            noise = np.random.default_rng(0).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            texture = cv2.resize(noise, (width, height))
            writer = cv2.VideoWriter(f"{folder}/{name}.mp4", cv2.VideoWriter_fourcc(*"mp4v"), 30, (width, height))
            for i in range(300):  # noise blocks moving for 10 s, so that the codec has real work to do
                writer.write(np.roll(texture, 4 * i, axis=1))
            writer.release()
            Path(f"{folder}/{name}.csv").write_text(f"{folder}/{name}.mp4 0\n")
            clips = dict(data_path=f"{folder}/{name}.csv", num_frames=num_frames, sampling_rate=4,
                         input_size=input_size)
            datasets = [data.build_pretrain_dataset(**clips, num_sample=1),
                        data.build_pretrain_dataset(**clips, num_sample=4),
                        data.build_pretrain_dataset(**clips, num_sample=4, uint8=True),
                        data.build_finetune_dataset("train", **clips, nb_classes=1, num_sample=2)]
            times = [[] for _ in datasets]
            for _ in range(warmup + steps):
                for dataset, seconds in zip(datasets, times):
                    seconds.append(engine.timed(functools.partial(dataset.__getitem__, 0), torch.device("cpu")))
            rates = [dataset.num_sample / statistics.median(t[warmup:]) for dataset, t in zip(datasets, times)]
            yield f"| {name} | " + " | ".join(f"{rate:.1f}" for rate in rates) + " |"


def datasheet_peak(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((t * 1e12 for key, t in DATASHEET_BF16_TFLOPS.items() if all(w in name for w in key.split())), None)


def env_part(s: Setting, device: torch.device, out: Path, limit: float):
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor())
    smi = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    gpu = subprocess.run(smi, capture_output=True, text=True).stdout.strip() if device.type == "cuda" else "no GPU"
    yield (f"# gpu_suite.py{' --smoke' if s is SMOKE else ''}, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
           f"nvidia-smi: {gpu}; CPU: {cpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
           f"{os.cpu_count()} CPU cores; Python {platform.python_version()}; datasheet bf16 peak: "
           f"{(datasheet_peak(device) or 0) / 1e12:.0f} TFLOP/s\n")


def steps_part(part: str, s: Setting, device: torch.device, out: Path, limit: float):
    """The part's rows of bf16 train steps, each timed, or OOM where it does not fit."""
    yield (f"\n## Train steps, {part}: dual masking, bf16 autocast, {s.frames}x{s.px}, median of {s.steps} "
           "steps\n\nMFU: model FLOPs (no recompute) / step time / the datasheet's dense bf16 peak. "
           "compile s: the first step's time minus a later step's.\n\n"
           "| model | clips/GPU | mode | ms/step | clips/s | GFLOP/clip | TFLOP/s | MFU % | peak mem GiB "
           "| compile s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    peak = datasheet_peak(device)
    for size, clips, with_checkpoint, mode in getattr(s, part):
        cfg = vmae.config(size, num_frames=s.frames, img_size=s.px, with_checkpoint=with_checkpoint)
        flops = train_pretrain.step_flops(replace(cfg, with_checkpoint=False), clips, masking.MaskConfig(cfg.grid))[1]
        row = f"| {size} | {clips} | {mode}{', checkpointing' if with_checkpoint else ''} | "
        try:
            step = pretrain_step(cfg, clips, device, "bf16", MODES[mode])
            first = engine.timed(step, device)  # compiling, AdamW's state
            for _ in range(2):
                engine.timed(step, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = statistics.median(engine.timed(step, device) for _ in range(s.steps))
            memory = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f}" if device.type == "cuda" else "-"
        except torch.OutOfMemoryError:
            yield row + "OOM | | | | | | |\n"
            continue
        finally:
            step = None  # the model and its optimizer go before the next row's come
            gc.collect()
            torch.cuda.empty_cache()
        mfu = f"{100 * flops / seconds / peak:.1f}" if peak else "-"
        compile_s = f"{first - seconds:.0f}" if MODES[mode] else ""
        yield row + (f"{seconds * 1e3:.0f} | {clips / seconds:.1f} | {flops / clips / 1e9:.1f} "
                     f"| {flops / seconds / 1e12:.1f} | {mfu} | {memory} | {compile_s} |\n")


# Kernel classes by words in a kernel's name, the first match counts (attention first: flash kernels name cutlass).
KERNEL_CLASSES = {"attention": ("flash", "fmha", "attention"), "optimizer": ("adam", "multi_tensor"),
                  "matmul": ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "aten::linear", "aten::mm"),
                  "copy / cast": ("copy", "memcpy", "memset"), "layer norm": ("layer_norm", "layernorm"),
                  "reduction": ("reduce",)}


def profile_part(s: Setting, device: torch.device, out: Path, limit: float):
    """Three eager steps under torch.profiler: kernels per step, GPU busy time, where it goes by kernel
    class; the top kernels in profile.txt. On a CPU the top-level aten:: ops stand in for the kernels."""
    size, clips = s.profile
    step = pretrain_step(vmae.config(size, num_frames=s.frames, img_size=s.px), clips, device, "bf16")
    cuda = device.type == "cuda"

    def three_steps():  # queued back to back, as training runs them
        for _ in range(3):
            step()
    three_steps()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        wall = engine.timed(three_steps, device) / 3e-3  # ms per step
    kernels = [e for e in prof.events() if (e.device_type == torch.autograd.DeviceType.CUDA if cuda
                                            else e.name.startswith("aten::") and e.cpu_parent is None)]
    count, us = Counter(), Counter()  # kernels and microseconds by class, over the 3 steps
    for e in kernels:
        cls = next((c for c, words in KERNEL_CLASSES.items() if any(w in e.name.lower() for w in words)),
                   "elementwise / other")
        count[cls] += 1
        us[cls] += e.device_time_total if cuda else e.cpu_time_total
    busy = us.total() / 3e3  # ms per step
    yield (f"\n## Profile: {size}, {clips} clips, eager bf16, 3 steps after 3 (times under the profiler)\n\n"
           f"wall {wall:.0f} ms/step; {len(kernels) / 3:.0f} kernels and copies/step; GPU busy {busy:.0f} "
           f"ms/step ({100 * busy / wall:.0f} % of the wall time)\n\n"
           "| kernel class | kernels/step | ms/step | share of GPU time |\n|---|---|---|---|\n")
    for cls, total in us.most_common():
        yield f"| {cls} | {count[cls] / 3:.0f} | {total / 3e3:.1f} | {100 * total / 3e3 / busy:.0f} % |\n"
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    (out / "profile.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))


def tests_part(s: Setting, device: torch.device, out: Path, limit: float):
    """tests/test_gpu.py and test_masking.py's GPU test: pytest's tail (-rfE names failures), all in test_gpu.log."""
    command = ["-m", "pytest", "-rfE", "tests/test_gpu.py", "tests/test_masking.py", f"--junitxml={out}/test_gpu.xml"]
    with open(out / "test_gpu.log", "w") as log:
        try:
            run = subprocess.run([sys.executable, *command], stdout=log, stderr=log, timeout=limit - 15)
            status = f"exit {run.returncode}"
        except subprocess.TimeoutExpired:
            status = f"stopped after {limit - 15:.0f} s"
    tail = (out / "test_gpu.log").read_text()[-4000:]
    yield f"\n## `python {' '.join(command)}`: {status}\n\n```\n{tail}\n```\n"


def data_part(s: Setting, device: torch.device, out: Path, limit: float):
    yield f"\n## Data, on this host's CPU ({os.cpu_count()} cores)\n\n"
    yield from (line + "\n" for line in data_table(s.frames, s.px, steps=3, warmup=2))


# The parts in the order they run, with their time limits in seconds (3x under --smoke); each part(setting,
# device, output folder, limit) yields summary.md's text as it is measured.
SUITE = {"env": (env_part, 20), "eager": (functools.partial(steps_part, "eager"), 120),
         "compiled": (functools.partial(steps_part, "compiled"), 180), "profile": (profile_part, 40),
         "tests": (tests_part, 150), "data": (data_part, 60)}


def run_part(part: str, out: Path, smoke: bool, limit: float) -> None:
    """The body of one part's process: its text to summary.md and stdout as it comes, its errors to suite.log."""
    with open(out / "suite.log", "a") as log:
        os.dup2(log.fileno(), 2)  # Python's tracebacks and the CUDA libraries' own messages
    s, device = (SMOKE, torch.device("cpu")) if smoke else (GPU, torch.device("cuda"))
    for text in SUITE[part][0](s, device, out, limit):
        with open(out / "summary.md", "a") as summary:
            summary.write(text)
        print(text, end="", flush=True)


def run_suite(out: Path, parts: list, smoke: bool, budget_s: float) -> None:
    """Each part in a fresh process (spawned, not forked), stopped at its time limit, all within the budget."""
    if not smoke and not torch.cuda.is_available():
        raise engine.RunError("gpu_suite.py: no GPU here; --smoke runs the suite's tiny stand-in on the CPU")
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + budget_s
    for part in parts:
        start, limit = time.time(), min(SUITE[part][1] * (3 if smoke else 1), deadline - time.time())
        status = "skipped, the budget is spent"
        if limit >= 5:
            process = multiprocessing.get_context("spawn").Process(target=run_part, args=(part, out, smoke, limit))
            process.start()
            process.join(limit)
            status = f"exit {process.exitcode}" if process.exitcode is not None else f"stopped after its {limit:.0f} s"
            process.terminate()
            process.join()
            status += f", {time.time() - start:.0f} s"
        with open(out / "suite.log", "a") as log:
            print(f"{part}: {status}", file=log)
        print(f"# {part}: {status}", flush=True)
    print(f"tables: {out / 'summary.md'}; errors: {out / 'suite.log'}")


def main(argv=None):
    args = parse_args(argv)
    if args.out is not None:
        return run_suite(args.out, args.parts, args.smoke, args.budget_s)
    lines = (ops_table(args.sizes, args.precision, args.batch_size, args.num_frames, args.input_size) if args.ops
             else memory_table(args.sizes, args.num_frames, args.input_size) if args.memory
             else data_table(args.num_frames, args.input_size, args.steps, args.warmup))
    for line in lines:
        print(line, flush=True)


if __name__ == "__main__":
    engine.run(main)
