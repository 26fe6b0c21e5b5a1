"""A small, repeatable version of VideoMAE V2's masking ablation on the built-in synthetic clips, with a verdict
and a 95 % confidence interval for each of the paper's claims.

The claims (the paper's Table 1, and its premise that self-supervised pretraining pays):

(i)   pretraining beats training from scratch at the same fine-tuning budget;
(ii)  a running-cell decoder mask at 50 % costs less than encoder-only masking (VideoMAE V1) and matches it;
(iii) a random decoder mask at 50 % does worse than the running cell at 50 %;
(c)   a running-cell decoder mask at 75 % still matches V1.

So the study pretrains a narrow ViT four ways, (a) V1, (b) running cell 50 %, (c) running cell 75 %, (d) random
decoder mask 50 %, and fine-tunes each and (e) a random encoder alike (each recipe a child process), judging
each claim at half the fine-tuning steps (validation top-1) and at all of them (the multi-view test); the frozen
probe (probe.py) scores each encoder before, during and after pretraining. Arms of one seed share initial weights,
data order and fine-tuning draws: each claim's per-seed differences get a t interval (`paired`) and a `verdict`.

    python study.py --quick                 # laptop: 2 CPU cores, under an hour
    python study.py                         # the full setting, for one GPU (112 px, 16 frames)
    python study.py --quick --seeds 0 1 2 3 4 5 6 7 --out output/study8

Output in --out: results.json (every run's numbers; an interrupted study resumes from it), study.md, study.png.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import engine
import masking
import probe
import train_pretrain
import visualize
import vmae


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
    model: str  # vmae.SIZES name of the narrow ViT (patch size included)
    input_size: int
    num_frames: int
    mask_ratio: float  # the encoder's tube mask
    pretrain_videos: int
    pretrain_epochs: int
    pretrain_batch: int
    pretrain_lr: float  # per 256 clips, as the recipe takes it
    probe_every: int  # pretraining epochs between probes (and one before the first)
    probe_videos: int  # held-out labelled videos the probe scores by cross-validation
    finetune_videos: int  # training videos; the recipe holds out a quarter as many for validation and test
    finetune_epochs: int
    finetune_batch: int
    finetune_lr: float
    nb_classes: int = 8
    decoder_depth: int = 4
    test_num_segment: int = 2
    test_num_crop: int = 1


# Laptop: the demos' clips (32 px, 8 frames, patch 8: 64 tokens), a 4-block 64-wide encoder; encoder mask 75 % (90 %
# leaves 2 patches per 4 x 4 frame); fine-tuning 20 epochs (1280 steps), where pretraining leads most (docs/study.md).
QUICK = Setting(model="demo", input_size=32, num_frames=8, mask_ratio=0.75, pretrain_videos=1024, pretrain_epochs=20,
                pretrain_batch=16, pretrain_lr=0.03, probe_every=10, probe_videos=2048, finetune_videos=1024,
                finetune_epochs=20, finetune_batch=16, finetune_lr=1e-2)

# One GPU: 112 px, 16 frames, patch 8: the paper's 8 x 14 x 14 = 1568-token grid and 90 % tube; vmae.SIZES["study"].
FULL = Setting(model="study", input_size=112, num_frames=16, mask_ratio=0.9, pretrain_videos=4096, pretrain_epochs=40,
               pretrain_batch=32, pretrain_lr=0.024, probe_every=10, probe_videos=2048, finetune_videos=2048,
               finetune_epochs=40, finetune_batch=32, finetune_lr=5e-3, test_num_segment=2, test_num_crop=3)


def common_flags(setting: Setting, seed: int, out: Path, device: str, num_workers: int) -> list[str]:
    return ["--model", setting.model, "--input_size", str(setting.input_size), "--num_frames", str(setting.num_frames),
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
    """train_finetune.py's flags, the same for every arm but the initial weights (a pretraining checkpoint, or
    none: from scratch); no mixup, cutmix or RandAugment, as in the recipe's own demo on these clips."""
    init = ["--finetune", str(checkpoint)] if checkpoint is not None else []
    return [*common_flags(setting, seed, out, device, num_workers), *init,
            "--nb_classes", str(setting.nb_classes), "--synthetic_size", str(setting.finetune_videos),
            "--epochs", str(setting.finetune_epochs), "--warmup_epochs", str(max(1, setting.finetune_epochs // 5)),
            "--batch_size", str(setting.finetune_batch), "--lr", str(setting.finetune_lr),
            "--mixup", "0", "--cutmix", "0", "--aa", "none",
            "--test_num_segment", str(setting.test_num_segment), "--test_num_crop", str(setting.test_num_crop)]


def run_recipe(script: str, argv: list[str], out: Path, threads: int) -> float:
    """Run a recipe as a child process with `threads` torch threads, its output to out/stdout.txt; returns its own
    peak resident memory in MB (ru_maxrss). A failed run stops the study with the end of its log."""
    shutil.rmtree(out, ignore_errors=True)  # a run that did not finish before: start it again (log.txt appends)
    out.mkdir(parents=True)
    log_file = out / "stdout.txt"
    with open(log_file, "w") as log:
        child = subprocess.Popen([sys.executable, str(Path(__file__).with_name(script)), *argv], stdout=log,
                                 stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        tail = "".join(log_file.read_text(errors="replace").replace("\r", "\n").splitlines(True)[-15:])
        raise RuntimeError(f"{script} in {out} failed (exit code {child.returncode}); the end of {log_file}:\n{tail}")
    return usage.ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)  # bytes on macOS, KiB on Linux


def pretrain_cost(setting: Setting, arm: Arm) -> dict:
    """Per clip of one arm's pretraining: tokens the encoder and the decoder run on, and forward multiply-adds
    in G (the paper's "FLOPs"; PyTorch's counter gives 2 FLOPs per multiply-add), counted on the meta device."""
    cfg = vmae.config(setting.model, img_size=setting.input_size, num_frames=setting.num_frames,
                      decoder_depth=setting.decoder_depth)
    masks = masking.MaskConfig(cfg.grid, "tube", setting.mask_ratio, arm.decoder_mask_type, arm.decoder_mask_ratio)
    return dict(encoder_tokens=masks.num_visible, decoder_tokens=masks.num_visible + masks.num_queries,
                gflops_per_clip=train_pretrain.step_flops(cfg, 1, masks)[0] / 2e9)


def run_arm(setting: Setting, arm: Arm, seed: int, out: Path, device: str, threads: int, num_workers: int) -> dict:
    """Pretrain (unless from scratch) and fine-tune one arm with one seed; the numbers of both. Curves are [x, y]
    lists: the probe per probed pretraining epoch (0: the random encoder), validation top-1 by fine-tuning steps."""
    record = dict(arm=arm.name, seed=seed)
    checkpoint = None
    if arm.pretrained:
        pre_dir = out / "runs" / f"{arm.name}-seed{seed}" / "pretrain"
        peak_memory = run_recipe("train_pretrain.py", pretrain_argv(setting, arm, seed, pre_dir, device, num_workers),
                                 pre_dir, threads)
        epochs = visualize.read_log(pre_dir / "log.txt")
        record.update(pretrain_time_s=sum(e["epoch_time_s"] for e in epochs), pretrain_loss=epochs[-1]["train_loss"],
                      peak_memory_mb=peak_memory, **{key: epochs[-1][key] for key in PROBES},
                      **{probe.at_start(key): epochs[0][probe.at_start(key)] for key in PROBES},
                      probe_time_s=sum(e.get("probe_time_s", 0) + e.get("probe_init_time_s", 0) for e in epochs),
                      probe_curve=[list(point) for point in visualize.probe_points(epochs, "probe_acc1")])
        checkpoint = pre_dir / "checkpoint-last.pth"
    ft_dir = out / "runs" / f"{arm.name}-seed{seed}" / "finetune"
    run_recipe("train_finetune.py", finetune_argv(setting, checkpoint, seed, ft_dir, device, num_workers), ft_dir,
               threads)
    rows = visualize.read_log(ft_dir / "log.txt")
    test = [row for row in rows if "test_video_acc1" in row][-1]
    record.update(top1=test["test_video_acc1"], test_videos=test["test_videos"],
                  val_curve=[[row["steps"], row["val_acc1"]] for row in rows if "val_acc1" in row])
    for file in (out / "runs" / f"{arm.name}-seed{seed}").glob("*/checkpoint-*.pth"):  # numbers kept, not weights
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
    costs = {arm.name: pretrain_cost(setting, arm) for arm in arms if arm.pretrained}
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
                  + f" fine-tuned top-1 {record['top1']:.1f} % ({time.time() - start:.0f} s so far)", flush=True)
            results = json.dumps(dict(setting=asdict(setting), runs=list(records.values())), indent=1)
            engine.atomic_write(results_file, lambda tmp: tmp.write_text(results))  # the study's resume file
    return [records[(arm.name, seed)] for seed in seeds for arm in arms]


# -----------------------------------------------------------------------------------------------------
# Statistics


# Student's t 0.975 quantiles for 1 to 19 degrees of freedom: the 95 % two-sided intervals of 2 to 20 seeds.
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
        2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930)
MAX_SEEDS = len(T975) + 1


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of independent values (one per seed, at most MAX_SEEDS) and its two-sided
    95 % Student's t interval, mean ± t · s / √n; low and high are nan for fewer than two values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = T975[len(values) - 2] * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired(a: dict, b: dict) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the differences a[seed] - b[seed] over the seeds both have: a paired t interval."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return math.nan, math.nan, math.nan, 0
    return (*interval([a[s] - b[s] for s in seeds]), len(seeds))


# Points of top-1 within which a difference counts as "the same": the paper calls 0.6 from V1 a match (70.28 V1;
# 70.15, 69.65, 70.22 running cell 50, 75, 25 %), 5.3 worse (64.87 random 50 %); 2, between, was fixed in advance.
MARGIN = 2.0


def verdict(kind: str, low: float, high: float, margin: float = MARGIN) -> str:
    """A claim about a difference d, judged by its interval [low, high]: "better" (d > 0) holds when low > 0, did
    not when high < margin; "worse" (d < 0) holds when high < 0, did not when low > -margin; "same" (|d| < margin)
    holds when the interval lies within ±margin, did not when wholly outside it. Anything else is undecided."""
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
# What the pretraining recipe's probe logs, all kept in results.json. The attentive probe is no metric of the
# claims: in a one-seed pilot of the quick setting every mask scored 19-21 % on it (their random start 48 %).
PROBES = ("probe_acc1", "probe_knn_acc1", "probe_attentive_acc1")


def per_seed(records: list[dict], arm: str, metric: str) -> dict:
    """{seed: value} of one arm's metric; arm "init": the random initial encoder (the same for every pretrained arm
    of a seed); metric "half": the validation top-1 at the fine-tuning epoch closest to half the steps."""
    if arm == "init":
        return {r["seed"]: r[probe.at_start(metric)] for r in records
                if metric.startswith("probe") and "probe_init_acc1" in r}
    runs = [r for r in records if r["arm"] == arm]
    if metric == "half":
        return {r["seed"]: min(r["val_curve"], key=lambda p: abs(p[0] - r["val_curve"][-1][0] / 2))[1]
                for r in runs if "val_curve" in r}
    return {r["seed"]: r[metric] for r in runs if metric in r}


def claim_rows(records: list[dict], chance: float = 100 / 8) -> list[dict]:
    """Every claim on every metric both of its arms have: the paired difference, its interval, the verdict. Scores
    within MARGIN of chance (`chance` %) for both arms tell nothing, so such a comparison is left undecided."""
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
           "pretrain peak RSS MB", "final pretrain loss", "probe linear %", "probe k-NN %", "fine-tuned top-1 %",
           "seeds"]


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
            mask = f"{arm.decoder_mask_type} {arm.decoder_mask_ratio:.0%}" if arm.decoder_mask_ratio else "none (V1)"
            tokens = f"{runs[0]['encoder_tokens']} / {runs[0]['decoder_tokens']}"
            probes = [stat("probe_acc1", 1), stat("probe_knn_acc1", 1)]
            cells = [mask, tokens, f"{runs[0]['gflops_per_clip']:.3f}", stat("pretrain_time_s", 1),
                     stat("peak_memory_mb", 0), stat("pretrain_loss", 4)]
        else:  # its probe: the random initial encoders (one per seed) of the pretrained runs
            inits = list({r["seed"]: r for r in records if "probe_init_acc1" in r}.values())
            probes = [stat("probe_init_acc1", 1, inits), stat("probe_init_knn_acc1", 1, inits)]
            cells = ["-"] * 6
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
    difference with its interval (shaded: ±MARGIN). Pretraining time is in the tables."""
    fig, axes = visualize.plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw=dict(width_ratios=[1, 1, 1.5]))
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
    fig.tight_layout()
    return fig


def write_report(records: list[dict], setting: Setting, out: Path) -> None:
    text = table(records) + "\n" + claims_table(records, 100 / setting.nb_classes)
    engine.atomic_write(out / "study.md", lambda tmp: tmp.write_text(text))
    visualize.save(figure(records, setting.nb_classes), out / "study.png", dpi=80)
    print(f"wrote {out / 'results.json'}, {out / 'study.md'}, {out / 'study.png'}\n\n{text}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the laptop setting (2 CPU cores, under an hour) instead "
                   "of the GPU one")
    p.add_argument("--out", default="output/study", help="folder for results.json, study.md, study.png and the runs")
    p.add_argument("--seeds", type=engine.Range(int, 0, 2 ** 32 - 1), nargs="+", default=[0, 1, 2, 3, 4],
                   help="one run of every arm per seed")
    p.add_argument("--arms", nargs="+", default=ARM_NAMES, choices=ARM_NAMES, help="which arms")
    p.add_argument("--device", type=engine.device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=engine.Range(int, 1), default=1, help="torch CPU threads in each run "
                   "(1 keeps CPU timings steady on a shared or 2-core machine; GPU runs need no more)")
    p.add_argument("--jobs", type=engine.Range(int, 1), default=None, help="runs at a time (default: 2 on a "
                   "CPU, each on its own core with --threads 1; 1 on a GPU)")
    p.add_argument("--num_workers", type=engine.Range(int, 0), default=None, help="data-loading processes "
                   "per run (default: 0 on a CPU, where drawing the clips is cheap next to the model; 4 on a GPU)")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or len(args.seeds) > MAX_SEEDS:
        p.error(f"--seeds: each seed once, at most {MAX_SEEDS} (the t table's reach), got {args.seeds}")
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
