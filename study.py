"""A small, repeatable version of VideoMAE V2's masking ablation, on the built-in synthetic clips.

The paper claims two things this script lets anyone check on one GPU or a laptop:

1. Dual masking is cheaper and loses nothing: dropping half of the decoder's tokens with a running-cell mask
   cuts the pretraining cost (FLOPs, memory, time) while the pretrained encoder is about as good downstream as
   with encoder-only masking (VideoMAE V1); a random decoder mask of the same size does worse.
2. Self-supervised pretraining helps: the same downstream training from a random encoder does worse.

So it pretrains a narrow ViT four ways: (a) encoder-only masking (V1), (b) running cell 50 %, (c) running
cell 75 %, (d) random decoder mask 50 %; then fine-tunes each encoder on the labelled synthetic
clips (the label is the direction the main shape moves: a single frame cannot tell it), plus (e) the same
fine-tuning from a random encoder. Every arm runs once per seed. It drives the project's own recipes
(train_pretrain.main, train_finetune.main) with flag lists, each run in a fresh process so its peak memory
is its own, and reads their log.txt files back.

    python study.py --quick                 # laptop: 2 CPU cores, under 20 minutes
    python study.py                         # the full setting, for one GPU (112 px, 16 frames)
    python study.py --quick --seeds 0 1 2 3 4 --out output/study5

Output in --out: results.json (every run's numbers), study.md (the table: mean ± std over seeds) and
study.png. A run whose result is already in --out is not run again, so an interrupted study resumes.

Columns, per arm: the decoder mask; the tokens the encoder and the decoder run on per clip; pretraining
GFLOPs per clip in the paper's sense (multiply-adds of the forward pass, counted by PyTorch's FLOP counter
on the meta device); pretraining wall time (the recipe's epoch times: training steps only, no start-up,
checkpoints or figures); peak memory of the pretraining process (GPU: torch.cuda.max_memory_allocated; CPU:
growth of the process's peak resident memory over what it held before training); the last epoch's mean
pretraining loss; and the downstream top-1 of the final multi-view test.

The quick setting's model is the table's laptop size, vmae.SIZES["demo"]; the GPU setting's is not in the
table. Either way this script registers it under the name "study" (in every process it starts), so the
recipes' --model flag can build it.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import engine
import masking
import train_finetune
import train_pretrain
import visualize
import vmae

SIZE_NAME = "study"  # the --model name the recipes are given; registered in vmae.SIZES per process


@dataclass(frozen=True)
class Arm:
    """One row of the table: how the pretraining masks the decoder, or no pretraining at all."""
    name: str
    label: str
    decoder_mask_type: str | None  # None: no pretraining (from scratch)
    decoder_mask_ratio: float = 0.0  # 0: encoder-only masking (V1)

    @property
    def pretrained(self) -> bool:
        return self.decoder_mask_type is not None


ARMS = [Arm("v1", "(a) encoder-only masking (V1)", "run_cell", 0.0),
        Arm("cell50", "(b) running cell 50 %", "run_cell", 0.5),
        Arm("cell75", "(c) running cell 75 %", "run_cell", 0.75),
        Arm("random50", "(d) random decoder mask 50 %", "random", 0.5),
        Arm("scratch", "(e) no pretraining (from scratch)", None)]
ARM_NAMES = [arm.name for arm in ARMS]


@dataclass(frozen=True)
class Setting:
    """Model, data and budget of one study; the same for every arm."""
    size: dict  # vmae.SIZES entry for the narrow ViT (patch size included)
    input_size: int
    num_frames: int
    mask_ratio: float  # the encoder's tube mask
    pretrain_videos: int
    pretrain_epochs: int
    pretrain_batch: int
    pretrain_lr: float  # per 256 clips, as the recipe takes it
    finetune_videos: int  # training videos; the recipe holds out a quarter as many for validation and test
    finetune_epochs: int
    finetune_batch: int
    finetune_lr: float
    nb_classes: int = 8
    decoder_depth: int = 4
    test_num_segment: int = 2
    test_num_crop: int = 1


# Laptop: the demos' size and clips: 32 px, 8 frames, patch 8 (4 x 4 x 4 = 64 tokens), a 4-block 64-wide
# encoder. Encoder mask 75 %, not the paper's 90 %: on a 4 x 4 frame 90 % leaves two patches visible per frame.
QUICK = Setting(size=dict(vmae.SIZES["demo"]),
                input_size=32, num_frames=8, mask_ratio=0.75, pretrain_videos=1024, pretrain_epochs=20,
                pretrain_batch=16, pretrain_lr=0.03, finetune_videos=1024, finetune_epochs=15, finetune_batch=16,
                finetune_lr=1e-2)

# One GPU: 112 px, 16 frames, patch 8 gives the paper's 8 x 14 x 14 = 1568-token grid; a 6-block 192-wide
# encoder and the paper's 90 % tube mask.
FULL = Setting(size=dict(embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=96, decoder_num_heads=3, patch_size=8),
               input_size=112, num_frames=16, mask_ratio=0.9, pretrain_videos=4096, pretrain_epochs=40,
               pretrain_batch=32, pretrain_lr=0.024, finetune_videos=2048, finetune_epochs=30,
               finetune_batch=32, finetune_lr=5e-3, test_num_segment=2, test_num_crop=3)


# -----------------------------------------------------------------------------------------------------
# The recipes' command lines


def common_flags(setting: Setting, seed: int, out: Path, device: str, num_workers: int) -> list[str]:
    return ["--model", SIZE_NAME, "--input_size", str(setting.input_size), "--num_frames", str(setting.num_frames),
            "--seed", str(seed), "--output_dir", str(out), "--device", device, "--num_workers", str(num_workers),
            "--no-auto_resume"]


def pretrain_argv(setting: Setting, arm: Arm, seed: int, out: Path, device: str, num_workers: int) -> list[str]:
    """train_pretrain.py's flags for one pretraining arm. Raw-pixel targets, as the recipe's own demo on
    these clips: with per-cube normalised targets the loss barely moves within a short budget."""
    return [*common_flags(setting, seed, out, device, num_workers),
            "--mask_type", "tube", "--mask_ratio", str(setting.mask_ratio),
            "--decoder_mask_type", arm.decoder_mask_type, "--decoder_mask_ratio", str(arm.decoder_mask_ratio),
            "--decoder_depth", str(setting.decoder_depth), "--no-normalize_target",
            "--synthetic_size", str(setting.pretrain_videos), "--epochs", str(setting.pretrain_epochs),
            "--warmup_epochs", str(max(1, setting.pretrain_epochs // 10)), "--batch_size", str(setting.pretrain_batch),
            "--lr", str(setting.pretrain_lr), "--num_sample", "1", "--save_ckpt_freq", str(setting.pretrain_epochs)]


def finetune_argv(setting: Setting, checkpoint: Path | None, seed: int, out: Path, device: str,
                  num_workers: int) -> list[str]:
    """train_finetune.py's flags for one downstream run: the same for every arm, only the initial weights
    differ (a pretraining checkpoint, or none for the from-scratch arm). No mixup, cutmix or RandAugment, as
    in the recipe's own demo on these clips."""
    init = ["--finetune", str(checkpoint)] if checkpoint is not None else []
    return [*common_flags(setting, seed, out, device, num_workers), *init,
            "--nb_classes", str(setting.nb_classes), "--synthetic_size", str(setting.finetune_videos),
            "--epochs", str(setting.finetune_epochs), "--warmup_epochs", str(max(1, setting.finetune_epochs // 5)),
            "--batch_size", str(setting.finetune_batch), "--lr", str(setting.finetune_lr),
            "--mixup", "0", "--cutmix", "0", "--aa", "none",
            "--test_num_segment", str(setting.test_num_segment), "--test_num_crop", str(setting.test_num_crop)]


# -----------------------------------------------------------------------------------------------------
# One run in its own process


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def child(recipe: str, argv: list[str], size: dict, threads: int, log_file: str, result_file: str) -> None:
    """In a fresh process: register the study size, run one recipe, write its peak memory and seconds."""
    with open(log_file, "w") as log:  # the recipe's prints and progress bars go to the run's own file
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    vmae.SIZES[SIZE_NAME] = size
    torch.set_num_threads(threads)
    main = {"pretrain": train_pretrain.main, "finetune": train_finetune.main}[recipe]
    cuda = "--device" in argv and argv[argv.index("--device") + 1].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = peak_rss_mb()
    start = time.time()
    main(argv)
    memory = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_rss_mb() - before
    Path(result_file).write_text(json.dumps(dict(peak_memory_mb=memory, process_s=time.time() - start)))


def run_recipe(recipe: str, argv: list[str], out: Path, size: dict, threads: int) -> dict:
    """Run a recipe in a spawned process (a clean peak-memory count and the study size registered there);
    returns the child's measurements. A failed run stops the study with the end of its log."""
    if out.exists():  # a run that did not finish before: start it again from nothing (log.txt appends)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log_file, result_file = out / "stdout.txt", out / "child.json"
    process = multiprocessing.get_context("spawn").Process(
        target=child, args=(recipe, argv, size, threads, str(log_file), str(result_file)))
    process.start()
    process.join()
    if process.exitcode != 0 or not result_file.exists():
        tail = "".join(log_file.read_text(errors="replace").replace("\r", "\n").splitlines(True)[-15:])
        raise RuntimeError(f"{recipe} run in {out} failed (exit code {process.exitcode}); the end of "
                           f"{log_file}:\n{tail}")
    return json.loads(result_file.read_text())


# -----------------------------------------------------------------------------------------------------
# Cost per clip


def mask_recipe(setting: Setting, arm: Arm) -> masking.MaskConfig:
    """The masks of one arm's pretraining."""
    return masking.MaskConfig("tube", setting.mask_ratio, arm.decoder_mask_type, arm.decoder_mask_ratio)


def model_config(setting: Setting) -> vmae.VideoMAEConfig:
    return vmae.VideoMAEConfig(**{**setting.size, "img_size": setting.input_size, "num_frames": setting.num_frames,
                                  "decoder_depth": setting.decoder_depth})


def pretrain_cost(cfg: vmae.VideoMAEConfig, masks: masking.MaskConfig) -> dict:
    """Per clip: tokens the encoder and the decoder run on, and forward multiply-adds in G (the paper's
    "FLOPs"; PyTorch's counter gives 2 FLOPs per multiply-add), counted on the meta device."""
    num_visible, num_queries = masks.counts(cfg.grid)
    forward, _ = train_pretrain.step_flops(cfg, 1, masks)
    return dict(encoder_tokens=num_visible, decoder_tokens=num_visible + num_queries, gflops_per_clip=forward / 2e9)


# -----------------------------------------------------------------------------------------------------
# The study


def run_arm(setting: Setting, arm: Arm, seed: int, out: Path, device: str, threads: int, num_workers: int) -> dict:
    """Pretrain (unless from scratch) and fine-tune one arm with one seed; the numbers of both."""
    record = dict(arm=arm.name, seed=seed)
    checkpoint = None
    if arm.pretrained:
        pre_dir = out / "runs" / f"{arm.name}-seed{seed}" / "pretrain"
        child_stats = run_recipe("pretrain", pretrain_argv(setting, arm, seed, pre_dir, device, num_workers),
                                 pre_dir, setting.size, threads)
        epochs = visualize.read_log(pre_dir / "log.txt")
        record.update(pretrain_time_s=sum(e["epoch_time_s"] for e in epochs), pretrain_loss=epochs[-1]["train_loss"],
                      peak_memory_mb=child_stats["peak_memory_mb"])
        checkpoint = pre_dir / "checkpoint-last.pth"
    ft_dir = out / "runs" / f"{arm.name}-seed{seed}" / "finetune"
    run_recipe("finetune", finetune_argv(setting, checkpoint, seed, ft_dir, device, num_workers), ft_dir,
               setting.size, threads)
    test = [row for row in visualize.read_log(ft_dir / "log.txt") if "test_video_acc1" in row][-1]
    record.update(top1=test["test_video_acc1"], test_videos=test["test_videos"])
    if checkpoint is not None:  # the study keeps numbers, not weights
        for file in checkpoint.parent.glob("checkpoint-*.pth"):
            file.unlink()
    for file in ft_dir.glob("checkpoint-*.pth"):
        file.unlink()
    return record


def run_study(setting: Setting, out: Path, seeds: list[int], arms: list[Arm], device: str, threads: int,
              num_workers: int, jobs: int) -> list[dict]:
    """Every arm with every seed, `jobs` runs at a time (each its own process); each finished (arm, seed) is
    saved to results.json at once and skipped when the study is run again."""
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    if saved and saved.get("setting") != json.loads(json.dumps(asdict(setting))):
        sys.exit(f"--out {out}: holds results of another setting; use another --out or delete {results_file}")
    records = {(r["arm"], r["seed"]): r for r in saved.get("runs", [])}
    costs = {arm.name: pretrain_cost(model_config(setting), mask_recipe(setting, arm)) for arm in arms if arm.pretrained}
    todo = [(arm, seed) for seed in seeds for arm in arms if (arm.name, seed) not in records]
    print(f"{len(seeds) * len(arms) - len(todo)} runs done before, {len(todo)} to go, {jobs} at a time", flush=True)
    start = time.time()
    with ThreadPoolExecutor(jobs) as pool:  # threads only wait: the work is in the processes they start
        running = {pool.submit(run_arm, setting, arm, seed, out, device, threads, num_workers): arm for arm, seed in todo}
        for done in as_completed(running):
            arm, record = running[done], done.result()
            record.update(costs.get(arm.name, {}))
            records[(arm.name, record["seed"])] = record
            print(f"[{len(records)}/{len(seeds) * len(arms)}] {arm.name} seed {record['seed']}: top-1 {record['top1']:.1f} %"
                  + (f", pretraining {record['pretrain_time_s']:.0f} s, loss {record['pretrain_loss']:.4f}"
                     if arm.pretrained else "") + f" ({time.time() - start:.0f} s so far)", flush=True)
            results_file.write_text(json.dumps(dict(setting=asdict(setting), runs=list(records.values())), indent=1))
    return [records[(arm.name, seed)] for seed in seeds for arm in arms]


# -----------------------------------------------------------------------------------------------------
# Table and figure


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


COLUMNS = ["arm", "decoder mask", "encoder / decoder tokens", "pretrain GFLOPs/clip", "pretrain time s",
           "peak memory MB", "final pretrain loss", "downstream top-1 %", "seeds"]


def table(records: list[dict]) -> str:
    """The Markdown table: one row per arm (in ARMS order), mean ± std over its seeds."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for arm in ARMS:
        runs = [r for r in records if r["arm"] == arm.name]
        if not runs:
            continue

        def stat(key: str, digits: int) -> str:
            if not arm.pretrained:
                return "-"
            mean, std = mean_std([r[key] for r in runs])
            return f"{mean:.{digits}f} ± {std:.{digits}f}"
        if not arm.pretrained:
            mask, tokens, gflops = "-", "-", "-"
        else:
            mask = "none (V1)" if arm.decoder_mask_ratio == 0 else f"{arm.decoder_mask_type} {arm.decoder_mask_ratio:.0%}"
            tokens = f"{runs[0]['encoder_tokens']} / {runs[0]['decoder_tokens']}"
            gflops = f"{runs[0]['gflops_per_clip']:.3f}"
        top1, top1_std = mean_std([r["top1"] for r in runs])
        cells = [arm.label, mask, tokens, gflops, stat("pretrain_time_s", 1), stat("peak_memory_mb", 0),
                 stat("pretrain_loss", 4), f"{top1:.1f} ± {top1_std:.1f}", str(len(runs))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(records: list[dict], nb_classes: int):
    """Downstream top-1 per arm (bars: mean, dots: seeds, dashed: chance) and the pretraining costs."""
    import matplotlib.pyplot as plt  # after visualize chose the file backend
    arms = [arm for arm in ARMS if any(r["arm"] == arm.name for r in records)]
    pretrained = [arm for arm in arms if arm.pretrained]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), gridspec_kw=dict(width_ratios=[1.4, 1, 1, 1]))
    panels = [("top1", "downstream top-1 %", arms), ("gflops_per_clip", "pretrain GFLOPs / clip", pretrained),
              ("pretrain_time_s", "pretrain time s", pretrained), ("peak_memory_mb", "peak memory MB", pretrained)]
    for ax, (key, title, shown) in zip(axes, panels):
        for x, arm in enumerate(shown):
            values = [r[key] for r in records if r["arm"] == arm.name]
            ax.bar(x, statistics.fmean(values), color="tab:gray" if not arm.pretrained else f"C{x}", alpha=0.6)
            ax.plot([x] * len(values), values, "k.", markersize=5)
        ax.set_xticks(range(len(shown)), [arm.name for arm in shown], rotation=30, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].axhline(100 / nb_classes, color="k", linestyle="--", linewidth=0.8, label="chance")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def write_report(records: list[dict], setting: Setting, out: Path) -> None:
    (out / "study.md").write_text(table(records))
    visualize.save(figure(records, setting.nb_classes), out / "study.png", dpi=80)
    print(f"wrote {out / 'results.json'}, {out / 'study.md'}, {out / 'study.png'}\n\n{table(records)}")


# -----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the laptop setting (2 CPU cores, < 20 min) instead of the GPU one")
    p.add_argument("--out", default="output/study", help="folder for results.json, study.md, study.png and the runs")
    p.add_argument("--seeds", type=engine.within("[0, 4294967295]", int), nargs="+", default=[0, 1, 2], help="one run "
                   "of every arm per seed")
    p.add_argument("--arms", nargs="+", default=ARM_NAMES, help=f"which arms, of {' '.join(ARM_NAMES)}")
    p.add_argument("--device", type=engine.device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=engine.within("[1, inf)", int), default=1, help="torch CPU threads in each run (1 keeps CPU timings "
                   "steady on a shared or 2-core machine; GPU runs need no more)")
    p.add_argument("--jobs", type=engine.within("[1, inf)", int), default=None, help="runs at a time (default: 2 on a CPU, each on its own "
                   "core with --threads 1; 1 on a GPU)")
    p.add_argument("--num_workers", type=engine.within("[0, inf)", int), default=None, help="data-loading processes per run (default: 0 on "
                   "a CPU, where drawing the clips is cheap next to the model; 4 on a GPU)")
    args = p.parse_args(argv)
    unknown = [name for name in args.arms if name not in ARM_NAMES]
    if unknown:
        p.error(f"--arms: unknown {', '.join(unknown)}; expected some of {', '.join(ARM_NAMES)}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: each seed once, got {args.seeds}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here; use --device cpu")
    if args.num_workers is None:
        args.num_workers = 4 if args.device.startswith("cuda") else 0
    if args.jobs is None:
        args.jobs = 1 if args.device.startswith("cuda") else 2
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    setting = QUICK if args.quick else FULL
    arms = [arm for arm in ARMS if arm.name in args.arms]
    out = Path(args.out)
    print(f"study: {'quick' if args.quick else 'full'} setting, {len(arms)} arms x {len(args.seeds)} seeds on "
          f"{args.device}; runs under {out / 'runs'}")
    records = run_study(setting, out, args.seeds, arms, args.device, args.threads, args.num_workers, args.jobs)
    write_report(records, setting, out)
    return records


if __name__ == "__main__":
    engine.run(main)
