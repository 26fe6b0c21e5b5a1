"""A small, repeatable version of VideoMAE V2's masking ablation on the built-in synthetic clips, with a verdict
and a 95 % confidence interval for each of the paper's claims.

The claims (the paper's Table 1, and its premise that self-supervised pretraining pays):

(i)   pretraining beats training from scratch at the same fine-tuning budget;
(ii)  a running-cell decoder mask at 50 % costs less than encoder-only masking (VideoMAE V1) and matches it;
(iii) a random decoder mask at 50 % does worse than the running cell at 50 %;
(c)   a running-cell decoder mask at 75 % still matches V1.

So the study pretrains a narrow ViT four ways, (a) V1, (b) running cell 50 %, (c) running cell 75 %, (d) random
decoder mask 50 %, and scores every pretrained encoder with the frozen probe (probe.py: the encoder's pooled
features of held-out labelled clips, a linear classifier and a k-NN, cross-validated), before pretraining
(the random initial encoder), during it and at its end. The probe is cheap and its seed-to-seed spread is
small, so it carries the comparisons between masks. For (i) the running-cell-50 % encoder and (e) a random
encoder are fine-tuned with the same flags, and the validation accuracy after every epoch draws accuracy
against fine-tuning steps for both (the budget is on the x axis, not chosen); the GPU setting fine-tunes
every arm. Every arm runs once per seed, and arms that share a seed share its initial weights, data order
and fine-tuning draws, so each claim is a paired comparison: the per-seed differences, their mean and
Student's t interval (`paired`), and a verdict against a margin of MARGIN points (`verdict`).

It drives the project's own recipes (train_pretrain.main, train_finetune.main) with flag lists, each run in a
fresh process (its peak memory is its own), and reads their log.txt files back.

    python study.py --quick                 # laptop: 2 CPU cores, about 33 minutes
    python study.py                         # the full setting, for one GPU (112 px, 16 frames)
    python study.py --quick --seeds 0 1 2 3 4 5 6 7 --out output/study8

Output in --out: results.json (every run's numbers), study.md (the arms and the claims) and study.png. A run
whose result is already in --out is not run again, so an interrupted study resumes.

The quick setting's model is the table's laptop size, vmae.SIZES["demo"]; the GPU setting's is not in the
table. Either way this script registers it under the name "study" (in every process it starts), so the
recipes' --model flag can build it.
"""
import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
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
    probe_every: int  # pretraining epochs between probes (and one before the first)
    probe_videos: int  # held-out labelled videos the probe scores by cross-validation
    finetune_arms: tuple  # which arms are fine-tuned
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
# Fine-tuning for (i) only, and 40 epochs: with the demo's 25 the from-scratch runs were still on their plateau.
QUICK = Setting(size=dict(vmae.SIZES["demo"]),
                input_size=32, num_frames=8, mask_ratio=0.75, pretrain_videos=1024, pretrain_epochs=20,
                pretrain_batch=16, pretrain_lr=0.03, probe_every=5, probe_videos=2048,
                finetune_arms=("cell50", "scratch"), finetune_videos=1024, finetune_epochs=40, finetune_batch=16,
                finetune_lr=1e-2)

# One GPU: 112 px, 16 frames, patch 8 gives the paper's 8 x 14 x 14 = 1568-token grid; a 6-block 192-wide
# encoder and the paper's 90 % tube mask. Every arm is fine-tuned.
FULL = Setting(size=dict(embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=96, decoder_num_heads=3, patch_size=8),
               input_size=112, num_frames=16, mask_ratio=0.9, pretrain_videos=4096, pretrain_epochs=40,
               pretrain_batch=32, pretrain_lr=0.024, probe_every=10, probe_videos=2048,
               finetune_arms=tuple(ARM_NAMES), finetune_videos=2048, finetune_epochs=40, finetune_batch=32,
               finetune_lr=5e-3, test_num_segment=2, test_num_crop=3)


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
            "--lr", str(setting.pretrain_lr), "--num_sample", "1", "--save_ckpt_freq", str(setting.pretrain_epochs),
            "--probe_every", str(setting.probe_every), "--probe_size", str(setting.probe_videos)]


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
    result = json.dumps(dict(peak_memory_mb=memory, process_s=time.time() - start))
    engine.atomic_write(Path(result_file), lambda tmp: tmp.write_text(result))


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
    return masking.MaskConfig(model_config(setting).grid, "tube", setting.mask_ratio, arm.decoder_mask_type,
                              arm.decoder_mask_ratio)


def model_config(setting: Setting) -> vmae.VideoMAEConfig:
    return vmae.VideoMAEConfig(**{**setting.size, "img_size": setting.input_size, "num_frames": setting.num_frames,
                                  "decoder_depth": setting.decoder_depth})


def pretrain_cost(cfg: vmae.VideoMAEConfig, masks: masking.MaskConfig) -> dict:
    """Per clip: tokens the encoder and the decoder run on, and forward multiply-adds in G (the paper's
    "FLOPs"; PyTorch's counter gives 2 FLOPs per multiply-add), counted on the meta device."""
    forward, _ = train_pretrain.step_flops(cfg, 1, masks)
    return dict(encoder_tokens=masks.num_visible, decoder_tokens=masks.num_visible + masks.num_queries,
                gflops_per_clip=forward / 2e9)


# -----------------------------------------------------------------------------------------------------
# The study


def run_arm(setting: Setting, arm: Arm, seed: int, out: Path, device: str, threads: int, num_workers: int) -> dict:
    """Pretrain (unless from scratch) and fine-tune (if the setting fine-tunes this arm) one arm with one
    seed; the numbers of both. Curves are lists of [x, y]: the probe after each probed pretraining epoch
    (epoch 0: the random initial encoder), the validation top-1 after each fine-tuning epoch by steps."""
    record = dict(arm=arm.name, seed=seed)
    checkpoint = None
    if arm.pretrained:
        pre_dir = out / "runs" / f"{arm.name}-seed{seed}" / "pretrain"
        child_stats = run_recipe("pretrain", pretrain_argv(setting, arm, seed, pre_dir, device, num_workers),
                                 pre_dir, setting.size, threads)
        epochs = visualize.read_log(pre_dir / "log.txt")
        record.update(pretrain_time_s=sum(e["epoch_time_s"] for e in epochs), pretrain_loss=epochs[-1]["train_loss"],
                      peak_memory_mb=child_stats["peak_memory_mb"], probe_acc1=epochs[-1]["probe_acc1"],
                      probe_knn_acc1=epochs[-1]["probe_knn_acc1"], probe_init_acc1=epochs[0]["probe_init_acc1"],
                      probe_init_knn_acc1=epochs[0]["probe_init_knn_acc1"],
                      probe_time_s=sum(e.get("probe_time_s", 0) + e.get("probe_init_time_s", 0) for e in epochs),
                      probe_curve=[list(point) for point in visualize.probe_points(epochs, "probe_acc1")])
        checkpoint = pre_dir / "checkpoint-last.pth"
    if arm.name in setting.finetune_arms:
        ft_dir = out / "runs" / f"{arm.name}-seed{seed}" / "finetune"
        run_recipe("finetune", finetune_argv(setting, checkpoint, seed, ft_dir, device, num_workers), ft_dir,
                   setting.size, threads)
        rows = visualize.read_log(ft_dir / "log.txt")
        test = [row for row in rows if "test_video_acc1" in row][-1]
        record.update(top1=test["test_video_acc1"], test_videos=test["test_videos"],
                      val_curve=[[row["steps"], row["val_acc1"]] for row in rows if "val_acc1" in row])
        for file in ft_dir.glob("checkpoint-*.pth"):  # the study keeps numbers, not weights
            file.unlink()
    if checkpoint is not None:
        for file in checkpoint.parent.glob("checkpoint-*.pth"):
            file.unlink()
    return record


def run_study(setting: Setting, out: Path, seeds: list[int], arms: list[Arm], device: str, threads: int,
              num_workers: int, jobs: int) -> list[dict]:
    """Every arm with every seed, `jobs` runs at a time (each its own process); each finished (arm, seed) is
    saved to results.json at once and skipped when the study is run again."""
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    try:
        saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    except (OSError, ValueError) as e:
        raise engine.RunError(f"{results_file}: cannot be read as the study's results ({e}); move it away to "
                              "start the study afresh") from e
    if saved and saved.get("setting") != json.loads(json.dumps(asdict(setting))):
        raise engine.RunError(f"--out {out}: holds results of another setting; use another --out or delete "
                              f"{results_file}")
    records = {(r["arm"], r["seed"]): r for r in saved.get("runs", [])}
    costs = {arm.name: pretrain_cost(model_config(setting), mask_recipe(setting, arm))
             for arm in arms if arm.pretrained}
    todo = [(arm, seed) for seed in seeds for arm in arms if (arm.name, seed) not in records]
    print(f"{len(seeds) * len(arms) - len(todo)} runs done before, {len(todo)} to go, {jobs} at a time", flush=True)
    start = time.time()
    with ThreadPoolExecutor(jobs) as pool:  # threads only wait: the work is in the processes they start
        running = {pool.submit(run_arm, setting, arm, seed, out, device, threads, num_workers): arm
                   for arm, seed in todo}
        for done in as_completed(running):
            arm, record = running[done], done.result()
            record.update(costs.get(arm.name, {}))
            records[(arm.name, record["seed"])] = record
            print(f"[{len(records)}/{len(seeds) * len(arms)}] {arm.name} seed {record['seed']}:"
                  + (f" probe {record['probe_acc1']:.1f} % (random encoder {record['probe_init_acc1']:.1f} %),"
                     f" pretraining {record['pretrain_time_s']:.0f} s," if arm.pretrained else "")
                  + (f" fine-tuned top-1 {record['top1']:.1f} %," if "top1" in record else "")
                  + f" ({time.time() - start:.0f} s so far)", flush=True)
            results = json.dumps(dict(setting=asdict(setting), runs=list(records.values())), indent=1)
            engine.atomic_write(results_file, lambda tmp: tmp.write_text(results))  # the study's resume file
    return [records[(arm.name, seed)] for seed in seeds for arm in arms]


# -----------------------------------------------------------------------------------------------------
# Statistics


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: the x with P(T <= x) = p for df degrees of freedom. Bisection on the CDF, whose
    density is integrated by Simpson's rule over 2000 intervals (accurate to ~1e-9; no scipy needed)."""
    if p < 0.5:
        return -t_quantile(1 - p, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:  # for x >= 0
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(np.linspace(0, x, 2001) ** 2 / df))
        return 0.5 + x / 6000 * (f[0] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum() + f[-1])
    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2


def interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of independent values (one per seed) and its two-sided Student's t
    interval, mean ± t · s / √n; low and high are nan for fewer than two values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired(a: dict, b: dict, confidence: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the differences a[seed] - b[seed] over the seeds both have: a paired t interval."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return math.nan, math.nan, math.nan, 0
    return (*interval([a[s] - b[s] for s in seeds], confidence), len(seeds))


# A difference smaller than this many points of top-1 counts as "the same". The paper calls masks within 0.6
# points of V1 a match (70.28 V1; 70.15, 69.65, 70.22 running cell 50, 75, 25 %) and a 5.3-point gap worse
# (64.87 random 50 %); 2 points sits between, and was fixed before the study ran.
MARGIN = 2.0


def verdict(kind: str, low: float, high: float, margin: float = MARGIN) -> str:
    """A claim about a difference d, judged by d's interval [low, high]: kind "better" (d > 0) holds when
    low > 0 and did not hold when high < margin (no gain of `margin` or more); "worse" (d < 0) holds when
    high < 0 and did not hold when low > -margin; "same" (|d| < margin) holds when the whole interval lies
    within ±margin and did not hold when it lies wholly outside. Anything else is undecided."""
    if math.isnan(low):
        return "undecided at this scale"
    held, failed = {"better": (low > 0, high < margin), "worse": (high < 0, low > -margin),
                    "same": (-margin < low and high < margin, high < -margin or low > margin)}[kind]
    return "held" if held else "did not hold" if failed else "undecided at this scale"


@dataclass(frozen=True)
class Claim:
    label: str
    a: str  # arm (or "init": the random initial encoder of the pretrained arms) whose metric minus b's ...
    b: str
    kind: str  # ... is "better" (> 0), "worse" (< 0) or "same" (within MARGIN)
    paper: str  # the paper's figures, as reported in its Table 1
    cheaper: bool = False  # the claim includes "at lower cost": a's pretraining time is below b's


CLAIMS = [Claim("(i) pretraining beats training from scratch (same fine-tuning steps)", "cell50", "scratch",
                "better", "(the paper's premise; not in Table 1)"),
          Claim("(ii) running cell 50 % matches encoder-only masking (V1) at lower cost", "cell50", "v1", "same",
                "70.15 vs 70.28 (-0.13)", cheaper=True),
          Claim("(iii) a random decoder mask does worse than running cell, both 50 %", "random50", "cell50", "worse",
                "64.87 vs 70.15 (-5.28)"),
          Claim("(c) running cell 75 % matches V1 at lower cost", "cell75", "v1", "same", "69.65 vs 70.28 (-0.63)",
                cheaper=True),
          Claim("pretraining (running cell 50 %) improves the frozen features over its random initial encoder",
                "cell50", "init", "better", "-")]
METRICS = {"probe_acc1": "frozen probe, linear", "probe_knn_acc1": "frozen probe, k-NN",
           "half": "fine-tuned, validation top-1 at half the steps", "top1": "fine-tuned, test top-1 (all steps)"}


def per_seed(records: list[dict], arm: str, metric: str) -> dict:
    """{seed: value} of one arm's metric; arm "init" is the random initial encoder (the probe before
    pretraining, the same weights for every pretrained arm of a seed); metric "half" is the validation
    top-1 at the fine-tuning epoch closest to half the steps."""
    if arm == "init":
        return {r["seed"]: r[metric.replace("probe_", "probe_init_")] for r in records
                if metric.startswith("probe") and "probe_init_acc1" in r}
    runs = [r for r in records if r["arm"] == arm]
    if metric == "half":
        return {r["seed"]: min(r["val_curve"], key=lambda p: abs(p[0] - r["val_curve"][-1][0] / 2))[1]
                for r in runs if "val_curve" in r}
    return {r["seed"]: r[metric] for r in runs if metric in r}


def claim_rows(records: list[dict], chance: float = 100 / 8) -> list[dict]:
    """Every claim on every metric both of its arms have: the paired difference, its interval, the verdict.
    A score that stays within MARGIN of chance (`chance` %) for both arms tells nothing about either, so such
    a comparison is left undecided whatever its interval."""
    rows = []
    for claim in CLAIMS:
        metrics = [(metric, name, claim.kind, MARGIN) for metric, name in METRICS.items()]
        if claim.cheaper:  # in seconds: any saving counts, so the margin is 0
            metrics.append(("pretrain_time_s", "pretraining time, seconds (the cost)", "worse", 0.0))
        for metric, name, kind, margin in metrics:
            a, b = per_seed(records, claim.a, metric), per_seed(records, claim.b, metric)
            mean, low, high, n = paired(a, b)
            if not n:
                continue
            best = max(statistics.fmean(a.values()), statistics.fmean(b.values()))
            at_chance = metric in METRICS and best < chance + MARGIN
            rows.append(dict(claim=claim.label, metric=name, difference=mean, low=low, high=high, seeds=n,
                             verdict="undecided (both at chance)" if at_chance else verdict(kind, low, high, margin),
                             paper=claim.paper))
    return rows


# -----------------------------------------------------------------------------------------------------
# Tables and figure


def with_interval(values: list[float], digits: int) -> str:
    """'mean [low, high]' (the 95 % t interval over seeds), or the mean alone for one value."""
    mean, low, high = interval(values)
    return f"{mean:.{digits}f}" if math.isnan(low) else f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


COLUMNS = ["arm", "decoder mask", "encoder / decoder tokens", "pretrain GFLOPs/clip", "pretrain time s",
           "peak memory MB", "final pretrain loss", "probe linear %", "probe k-NN %", "fine-tuned top-1 %", "seeds"]


def table(records: list[dict]) -> str:
    """The arms (in ARMS order): cost, loss and downstream scores, each the mean and its 95 % interval over
    seeds; the from-scratch row's probe is the random initial encoder's."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for arm in ARMS:
        runs = [r for r in records if r["arm"] == arm.name]
        if not runs:
            continue

        def stat(key: str, digits: int, rows=runs) -> str:
            values = [r[key] for r in rows if key in r]
            return with_interval(values, digits) if values else "-"
        if arm.pretrained:
            mask = ("none (V1)" if arm.decoder_mask_ratio == 0
                    else f"{arm.decoder_mask_type} {arm.decoder_mask_ratio:.0%}")
            tokens = f"{runs[0]['encoder_tokens']} / {runs[0]['decoder_tokens']}"
            probes = [stat("probe_acc1", 1), stat("probe_knn_acc1", 1)]
            cells = [mask, tokens, f"{runs[0]['gflops_per_clip']:.3f}", stat("pretrain_time_s", 1),
                     stat("peak_memory_mb", 0), stat("pretrain_loss", 4)]
        else:  # its probe: the random initial encoders (one per seed) of the pretrained runs
            inits = list({r["seed"]: r for r in records if "probe_init_acc1" in r}.values())
            probes = [stat("probe_init_acc1", 1, inits), stat("probe_init_knn_acc1", 1, inits)]
            cells = ["-"] * 5 + ["-"]
        lines.append("| " + " | ".join([arm.label, *cells, *probes, stat("top1", 1), str(len(runs))]) + " |")
    return "\n".join(lines) + "\n"


def claims_table(records: list[dict], chance: float = 100 / 8) -> str:
    lines = ["| claim | metric | difference [95 % interval] | seeds | verdict | paper (ViT-B, SSv2 top-1) |",
             "|---|---|---|---|---|---|"]
    for row in claim_rows(records, chance):
        spread = "" if math.isnan(row["low"]) else f" [{row['low']:+.1f}, {row['high']:+.1f}]"
        lines.append(f"| {row['claim']} | {row['metric']} | {row['difference']:+.1f}{spread} | {row['seeds']} | "
                     f"**{row['verdict']}** | {row['paper']} |")
    return "\n".join(lines) + "\n"


def band(ax, curves: list, label: str, color: str) -> None:
    """Mean and 95 % interval over seeds of curves that share their x values ([[x, y], ...] each)."""
    xs = [x for x, _ in curves[0]]
    stats = [interval([curve[i][1] for curve in curves]) for i in range(len(xs))]
    ax.plot(xs, [m for m, _, _ in stats], marker=".", color=color, label=label)
    if len(curves) > 1:
        ax.fill_between(xs, [lo for _, lo, _ in stats], [hi for _, _, hi in stats], color=color, alpha=0.2)


def figure(records: list[dict], nb_classes: int):
    """The probe over pretraining per arm; validation top-1 over fine-tuning steps; every claim's paired
    difference with its interval (shaded: ±MARGIN); pretraining time per arm."""
    import matplotlib.pyplot as plt  # after visualize chose the file backend
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), gridspec_kw=dict(width_ratios=[1, 1, 1.5, 0.8]))
    chance = 100 / nb_classes
    shown = [arm for arm in ARMS if any(r["arm"] == arm.name for r in records)]
    for i, arm in enumerate(shown):
        runs = [r for r in records if r["arm"] == arm.name]
        if arm.pretrained:
            band(axes[0], [r["probe_curve"] for r in runs], arm.name, f"C{i}")
        tuned = [r["val_curve"] for r in runs if "val_curve" in r]
        if tuned:
            band(axes[1], tuned, arm.name, f"C{i}")
    for ax, title, x in ((axes[0], "probe top-1 % (frozen, linear)", "pretraining epoch (0: random encoder)"),
                         (axes[1], "fine-tuning: validation top-1 %", "fine-tuning steps")):
        ax.axhline(chance, color="k", linestyle="--", linewidth=0.8, label="chance")
        ax.set(title=title, xlabel=x)
        ax.legend(fontsize=7)
    rows = [row for row in claim_rows(records, chance) if "seconds" not in row["metric"]]
    ax = axes[2]
    ax.axvspan(-MARGIN, MARGIN, color="0.9")
    ax.axvline(0, color="k", linewidth=0.8)
    for y, row in enumerate(rows):
        color = {"held": "tab:green", "did not hold": "tab:red"}.get(row["verdict"], "tab:gray")
        ax.errorbar(row["difference"], y, xerr=[[row["difference"] - row["low"]], [row["high"] - row["difference"]]]
                    if not math.isnan(row["low"]) else None, fmt="o", color=color, capsize=3)
    ax.set_yticks(range(len(rows)), [f"{r['claim'].split(' ')[0]} {r['metric']}" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(title=f"claims: paired difference, 95 % interval (grey: ±{MARGIN:g})", xlabel="points of top-1")
    pretrained = [arm for arm in shown if arm.pretrained]
    for x, arm in enumerate(pretrained):
        values = [r["pretrain_time_s"] for r in records if r["arm"] == arm.name]
        axes[3].bar(x, statistics.fmean(values), color=f"C{shown.index(arm)}", alpha=0.6)
        axes[3].plot([x] * len(values), values, "k.", markersize=4)
    axes[3].set_xticks(range(len(pretrained)), [arm.name for arm in pretrained], rotation=30, fontsize=8)
    axes[3].set_title("pretraining time s", fontsize=10)
    fig.tight_layout()
    return fig


def write_report(records: list[dict], setting: Setting, out: Path) -> None:
    text = table(records) + "\n" + claims_table(records, 100 / setting.nb_classes)
    engine.atomic_write(out / "study.md", lambda tmp: tmp.write_text(text))
    visualize.save(figure(records, setting.nb_classes), out / "study.png", dpi=80)
    print(f"wrote {out / 'results.json'}, {out / 'study.md'}, {out / 'study.png'}\n\n{text}")


# -----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the laptop setting (2 CPU cores, < 45 min) instead of the "
                   "GPU one")
    p.add_argument("--out", default="output/study", help="folder for results.json, study.md, study.png and the runs")
    p.add_argument("--seeds", type=engine.Range(int, 0, 2 ** 32 - 1), nargs="+", default=[0, 1, 2, 3, 4],
                   help="one run of every arm per seed")
    p.add_argument("--arms", nargs="+", default=ARM_NAMES, help=f"which arms, of {' '.join(ARM_NAMES)}")
    p.add_argument("--device", type=engine.device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=engine.Range(int, 1), default=1, help="torch CPU threads in each run "
                   "(1 keeps CPU timings steady on a shared or 2-core machine; GPU runs need no more)")
    p.add_argument("--jobs", type=engine.Range(int, 1), default=None, help="runs at a time (default: 2 on a "
                   "CPU, each on its own core with --threads 1; 1 on a GPU)")
    p.add_argument("--num_workers", type=engine.Range(int, 0), default=None, help="data-loading processes "
                   "per run (default: 0 on a CPU, where drawing the clips is cheap next to the model; 4 on a GPU)")
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
