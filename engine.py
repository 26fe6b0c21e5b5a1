"""What both training recipes share. train_pretrain.py and train_finetune.py each bring a model, a dataset
and a loss; the rest of running them is here, once: AdamW with the reference's parameter groups and
warmup + cosine schedules; one process per GPU under torchrun (DDP, or FSDP2 with --fsdp) and bf16 autocast;
the loop (`train_epoch`: micro-batches accumulated per step, gradients clipped if asked, the loss read only
every --log_every steps, since each read waits for the GPU); checkpoints in the reference's layout with plain
key names and log.txt (`end_of_epoch`); the shared flags; and `run`, the one place that turns a user's
mistake (a bad flag, file, list, checkpoint or state) into `error: ...` and exit code 2.

Nothing silent, nothing lost: every numeric flag has a valid range checked as it is parsed (`within`); the
output folder has one writer (a lock file), is checked writable and roomy enough before the first step,
and an epoch's files are each written to a temporary file and renamed, checkpoint-last.pth last, so a
kill at any moment leaves the previous epoch or the new one. A resume continues the same run or stops:
changed flags, other data, a checkpoint of another model or non-finite weights are named, not absorbed.
"""
import argparse
import errno
import fcntl
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import masking
import vmae


class RunError(RuntimeError):
    """A run that cannot start or go on for a reason the user can act on; the message says which."""


# -----------------------------------------------------------------------------------------------------
# The optimizer and its schedules


MAX_STEPS = 10 ** 7  # optimizer steps in one run (80 MB per schedule); the largest published run has ~2·10^5


def cosine_schedule(base_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
                    start_warmup_value: float = 0.0, warmup_steps: int = -1) -> np.ndarray:
    """One value per optimizer step: a linear warmup from start_warmup_value to base_value (both included),
    then a half cosine from base_value towards final_value (reached one step after the end). The warmup
    lasts warmup_steps if > 0, else warmup_epochs · niter_per_ep."""
    total = epochs * niter_per_ep
    if total > MAX_STEPS:  # the schedule is an array: refuse before allocating gigabytes
        raise RunError(f"--epochs {epochs} x {niter_per_ep} steps per epoch = {total} optimizer steps, more than "
                       f"{MAX_STEPS:.0e}: is --epochs right?")
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    warmup_iters = min(warmup_iters, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    i = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * i / max(len(i), 1)))
    return np.concatenate([warmup, cosine])


def layer_id(name: str, num_layers: int) -> int:
    """Layer-wise LR decay depth of a parameter: embedding and positions 0, block k k+1, the rest the top."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers - 1


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW groups: no weight decay for 1-D parameters (biases, LayerNorm, q/v biases) and the mask token;
    with `layer_decay`, block k's learning rate is scaled by layer_decay^(depth + 1 - (k + 1)).
    Decided by the parameter object, not its name, so wrapping the model (DDP, torch.compile's `_orig_mod.`)
    cannot change it (the reference's compiled runs decay the mask token: docs/reference.md, trap 10)."""
    no_decay = {id(p) for p in (getattr(model, "mask_token", None),) if p is not None}
    depth = len(model.blocks) if layer_decay is not None else 0
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and id(p) not in no_decay
        kind = "decay" if decay else "no_decay"
        if layer_decay is None:
            key, scale = kind, 1.0
        else:
            lid = layer_id(name, depth + 2)
            key, scale = f"layer_{lid}_{kind}", layer_decay ** (depth + 1 - lid)
        group = groups.setdefault(key, dict(name=key, params=[], param_names=[], lr_scale=scale,
                                            weight_decay=weight_decay if decay else 0.0))
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


def make_optimizer(groups: list[dict], lr: float, betas, eps: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where the device has one."""
    fused = device.type in ("cuda", "cpu")
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for g in optimizer.param_groups:  # float(): plain numbers, so checkpoints load with weights_only
        g["lr"] = float(lr) * g["lr_scale"]
        if g["weight_decay"] > 0:
            g["weight_decay"] = float(weight_decay)


# -----------------------------------------------------------------------------------------------------
# Processes, precision and seeds


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        """print on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)


def setup_distributed(device: str) -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; one process per GPU (NCCL) or per CPU job (gloo)."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError("--device cuda: no CUDA device is available here; use --device cpu")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun (even with one process, FSDP needs the group)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def leave_process_group() -> None:
    """End of a run: wait until every process is done (rank 0 may still be writing figures), then take
    the process group down, so no process exits while a peer still talks to it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """bf16 where the device computes in it natively (CUDA with bf16), else fp32; fp16 only when asked."""
    if precision is not None:
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from; re-done at each epoch start from (seed, epoch, rank), so an
    epoch replayed after a resume draws exactly what the uninterrupted run drew."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def wrap_model(model: torch.nn.Module, d: Dist, fsdp: bool, precision: str) -> torch.nn.Module:
    """DDP across processes, or FSDP2 (each transformer block sharded on its own) with --fsdp."""
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in [m for m in model.modules() if isinstance(m, vmae.Block)]:
            fully_shard(block, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    if d.world_size > 1:
        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return model


def skipped_videos(d: Dist, dataset) -> int:
    """How many videos any process has skipped as unreadable so far (for the epoch's log line), with the
    max_bad_fraction limit checked on that count: each process alone sees only its share of the videos."""
    bad = dataset.bad_videos()
    if d.world_size > 1:
        every = [None] * d.world_size
        dist.all_gather_object(every, bad)
        bad = sorted(set().union(*every))
    dataset.check_bad_fraction(bad)
    return len(bad)


def file_share(d: Dist) -> data.Share:
    """The processes split the checks of listed video files (data.Share): each checks every world_size-th
    file, then they exchange what they found, so every process knows every bad file."""
    def gather(found: list) -> list[list]:
        shares = [None] * d.world_size
        dist.all_gather_object(shares, found)
        return shares
    return data.Share(d.rank, d.world_size, gather if d.world_size > 1 else None)


def grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce on accumulation micro-steps (only the last one syncs)."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)


# -----------------------------------------------------------------------------------------------------
# The trainer: a model ready to train, and how its steps run


@dataclass
class Trainer:
    model: torch.nn.Module  # wrapped for the processes (DDP / FSDP) and compiled if asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # active only with fp16
    d: Dist
    precision: str
    out: Path  # the run's output folder
    seed: int = 0
    accum_iter: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = None  # max gradient norm
    log_every: int = 20  # optimizer steps between loss read-outs
    last_good: str = "none: no epoch has finished yet"  # the newest checkpoint of this run, for error messages


def build_trainer(model: torch.nn.Module, d: Dist, precision: str, out: Path, *, weight_decay: float, betas,
                  eps: float, layer_decay: float | None = None, fsdp: bool = False, compile: bool = False,
                  **loop) -> Trainer:
    """Wrap the model for the processes (DDP, or FSDP with --fsdp), compile it if asked, and build AdamW and
    the fp16 loss scaler. The optimizer comes last: FSDP replaces the parameters with sharded ones, and
    those are the ones it must hold. `loop`: Trainer's seed, accum_iter, clip_grad, log_every."""
    model = wrap_model(model, d, fsdp, precision)
    raw_model = model.module if isinstance(model, DDP) else model
    if compile:
        raw_model.compile()
    groups = param_groups(raw_model, weight_decay, layer_decay=layer_decay)
    optimizer = make_optimizer(groups, 0.0, betas, eps, d.device)  # the schedule sets lr every step
    scaler = torch.amp.GradScaler(d.device.type, enabled=precision == "fp16")
    return Trainer(model, optimizer, scaler, d, precision, Path(out), **loop)


class Batches(NamedTuple):
    sampler: torch.utils.data.DistributedSampler
    loader: torch.utils.data.DataLoader
    steps_per_epoch: int  # optimizer steps
    clips_per_step: int  # over all processes and micro-batches, num_sample repeats included


def train_loader(dataset, batch_size: int, t: Trainer, num_workers: int) -> Batches:
    """Each process takes its own shuffled share of the dataset, whole batches only."""
    d = t.d
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=d.world_size, rank=d.rank, shuffle=True,
                                                  seed=t.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                         num_workers=num_workers, pin_memory=d.device.type == "cuda")
    steps_per_epoch = len(loader) // t.accum_iter
    if steps_per_epoch == 0:
        raise RunError(f"--batch_size {batch_size} x --accum_iter {t.accum_iter} x {d.world_size} processes is more "
                       f"than the {len(dataset)} videos of the dataset: not one step per epoch")
    clips = batch_size * t.accum_iter * d.world_size * dataset.num_sample
    return Batches(sampler, loader, steps_per_epoch, clips)


# -----------------------------------------------------------------------------------------------------
# The loop


class Epoch(NamedTuple):
    loss: float  # mean over all processes and micro-batches
    steps: int  # optimizer steps done so far in the run
    seconds: float


def train_epoch(t: Trainer, batches: Batches, loss_of: Callable, epoch: int, lr_schedule: np.ndarray,
                wd_schedule: np.ndarray) -> Epoch:
    """One epoch of optimizer steps, the same in both recipes. loss_of(batch) is the recipe: the loss of one
    micro-batch from the loader, computed here under autocast. Each step accumulates t.accum_iter
    micro-batches (DDP syncs gradients on the last only), unscales and clips gradients if asked, and steps
    AdamW at that step's learning rate and weight decay."""
    d, model, optimizer, scaler = t.d, t.model, t.optimizer, t.scaler
    seed_everything(t.seed + (epoch + 1) * d.world_size + d.rank)  # augmentations and masks, per epoch
    batches.sampler.set_epoch(epoch)
    model.train()
    loss_sum = torch.zeros((), device=d.device)
    first_bad = torch.full((), -1, device=d.device, dtype=torch.long)  # first step with a non-finite loss
    start = time.time()
    bar = tqdm(total=batches.steps_per_epoch, desc=f"epoch {epoch}", disable=not d.is_main, dynamic_ncols=True)
    micro_batches = iter(batches.loader)
    for i in range(batches.steps_per_epoch):
        step = epoch * batches.steps_per_epoch + i
        set_schedules(optimizer, lr_schedule[step], wd_schedule[step])
        for micro in range(t.accum_iter):
            batch = next(micro_batches)
            grad_sync(model, micro == t.accum_iter - 1)
            with autocast(d.device, t.precision):
                loss = loss_of(batch)
            scaler.scale(loss / t.accum_iter).backward()
            loss = loss.detach()
            loss_sum += loss
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        if t.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if (i + 1) % t.log_every == 0 or i + 1 == batches.steps_per_epoch:
            check_finite(first_bad, lr_schedule, t)
            bar.set_postfix(loss=f"{loss_sum.item() / ((i + 1) * t.accum_iter):.4f}", lr=f"{lr_schedule[step]:.2e}",
                            clips_s=f"{(i + 1) * batches.clips_per_step / (time.time() - start):.1f}")
        bar.update(1)
    bar.close()
    del micro_batches  # let this epoch's workers exit
    seconds = time.time() - start
    if d.world_size > 1:
        dist.all_reduce(loss_sum)
    return Epoch(loss_sum.item() / (batches.steps_per_epoch * t.accum_iter * d.world_size), step + 1, seconds)


def check_finite(first_bad: torch.Tensor, lr_schedule, t: Trainer) -> None:
    """Stop at the first optimizer step whose loss was not finite on any process (all stop together: one that
    stopped alone would leave the others waiting in their next gradient all-reduce)."""
    if t.d.world_size > 1:
        never = torch.iinfo(torch.long).max
        first_bad = torch.where(first_bad < 0, never, first_bad)
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        first_bad = torch.where(first_bad == never, -1, first_bad)
    bad = int(first_bad)
    if bad >= 0:
        raise RunError(f"loss became non-finite at optimizer step {bad} (lr {lr_schedule[bad]:.3g}); stopping without "
                       f"saving. The last good checkpoint is {t.last_good}. Try --precision bf16 or fp32, a lower "
                       "--lr, or --clip_grad.")


# -----------------------------------------------------------------------------------------------------
# The output folder: one writer, room for a checkpoint, files that survive a kill

LOCK = ".lock"  # in the output folder: "pid <pid> on <host>" while a run writes there, empty after it


def on_main(d: Dist, fn: Callable, *args):
    """fn(*args) on rank 0 alone (the files are its job); a RunError or OSError there is raised on every
    process as a RunError, so none is left waiting for rank 0 in a collective. Returns fn's result on rank 0,
    None elsewhere."""
    result, error = None, None
    if d.is_main:
        try:
            result = fn(*args)
        except (RunError, OSError) as e:
            error = str(e)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunError(error)
    return result


def same_everywhere(d: Dist, value, what: str, hint: str) -> None:
    """Raise a RunError on every process unless each sees the same `value` (a small picklable summary of
    `what`): processes that disagree about, say, the file they resume from would train different steps and
    then wait for each other forever."""
    if d.world_size == 1:
        return
    values = [None] * d.world_size
    dist.all_gather_object(values, value)
    odd = [rank for rank, v in enumerate(values) if v != values[0]]
    if odd:
        raise RunError(f"the processes do not see the same {what}: rank 0 {values[0]}, "
                       + ", ".join(f"rank {rank} {values[rank]}" for rank in odd) + f"; {hint}")


@contextmanager
def output_folder(out: Path, d: Dist):
    """Hold the output folder for this run: created if needed, checked writable, locked against a second
    run (which stops at once, naming the first), and cleared of temporary files a killed run left."""
    lock = on_main(d, take_folder, Path(out))
    try:
        yield
    finally:
        if lock is not None:
            release_folder(lock)


def take_folder(out: Path) -> int:
    """The lock is a POSIX lock on out/.lock: the system drops it when its process dies, however it dies, and
    processes forked from it (DataLoader workers) do not hold it. The file names the holder for the message.
    Returns the lock's file descriptor."""
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        probe = os.open(out / f".write-test.{os.getpid()}.tmp", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(probe, b"x")
        os.close(probe)
        os.unlink(out / f".write-test.{os.getpid()}.tmp")
    except OSError as e:
        raise RunError(f"--output_dir {out}: cannot write there ({e.strerror})") from None
    holder = os.read(fd, 200).decode(errors="replace").strip()
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise RunError(f"--output_dir {out}: cannot lock {out / LOCK} ({e.strerror})") from None
        raise RunError(f"--output_dir {out} is in use by another run ({holder or 'unknown process'}; lock file "
                       f"{out / LOCK}): two runs in one folder would overwrite each other's checkpoints and log. "
                       "Wait for it to end, or use another --output_dir") from None
    if holder:  # the system let go of the lock, so its holder is gone
        print(f"note: {out / LOCK}: taking over from a run that ended without releasing it ({holder})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{me}\n".encode(), 0)
    stale = list(out.glob(".*.tmp*"))  # half-written files of a killed run: never under a real name
    for path in stale:
        path.unlink()
    if stale:
        print(f"note: removed {len(stale)} temporary file(s) a killed run left in {out}")
    return fd


def release_folder(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # an empty lock file: the last run ended cleanly
        fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def check_space(t: Trainer) -> None:
    """Before the first step: room in the output folder for one more checkpoint (the weights and AdamW's two
    moments, in fp32), since the new one is written beside the old before replacing it."""
    def check():
        need = 3 * 4 * sum(p.numel() for p in t.model.parameters()) + (1 << 20)
        free = shutil.disk_usage(t.out).free
        if free < need:
            raise RunError(f"--output_dir {t.out}: {free / 2 ** 30:.2f} GiB free, but a checkpoint of this model "
                           f"needs about {need / 2 ** 30:.2f} GiB; free some space or pick another folder")
    on_main(t.d, check)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file in the same folder, then rename it to `path`: a crash or a full disk
    mid-write leaves the previous file whole, never a truncated one under the real name (and another process
    never reads one)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # same suffix: writers that go by it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError ("unexpected pos")
        raise RunError(write_failure(path, e)) from e
    finally:
        tmp.unlink(missing_ok=True)


def write_failure(path: Path, e: Exception) -> str:
    try:
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < (1 << 20)
    except OSError:
        full = False
    if full:
        return (f"cannot write {path}: no space left on the device ({path.name} was not replaced). Free some space "
                "and run the same command again: it resumes from the last checkpoint")
    return f"cannot write {path}: {e}"


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def append_log(out: Path, stats: dict) -> None:
    """One JSON line more in out/log.txt (the file is rewritten and renamed: no half line on a full disk)."""
    path = out / "log.txt"
    old = path.read_text() if path.exists() else ""
    atomic_write(path, lambda tmp: tmp.write_text(old + json.dumps(stats) + "\n"))


def trim_log(out: Path, start_epoch: int) -> None:
    """Drop log.txt's lines of epochs from start_epoch on (and any unreadable line): a killed run can have
    written them before its checkpoint-last.pth, and this run does those epochs again."""
    path = out / "log.txt"
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)

    def kept(line: str) -> bool:
        try:
            return json.loads(line).get("epoch", -1) < start_epoch
        except (ValueError, AttributeError):
            return False
    keep = [line for line in lines if kept(line)]
    if len(keep) < len(lines):
        atomic_write(path, lambda tmp: tmp.write_text("".join(keep)))
        print(f"note: {path}: dropped {len(lines) - len(keep)} line(s) of epoch {start_epoch} on, which this run does "
              "(again)")


def set_aside(out: Path) -> None:
    """A run started afresh (--no-auto_resume) in a folder holding another run's log.txt and checkpoints moves
    them into a sub-folder of their own, so the two runs neither mix nor overwrite each other's files."""
    old = [p for p in [out / "log.txt", *out.glob("checkpoint-*.pth")] if p.exists()]
    if old:
        aside = out / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        aside.mkdir()
        for path in old:
            os.replace(path, aside / path.name)
        print(f"note: starting afresh in {out}: the {len(old)} file(s) of the run there before are in {aside}")


# -----------------------------------------------------------------------------------------------------
# Checkpoints: saved whole, resumed exactly or not at all

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # one plain state_dict, gathered on the CPU
# Flags that change how or where a run computes, not what: they may differ when it resumes. Any other flag
# (model, sizes, masks, target, data, batch, schedule, seed, ...) must be the checkpoint's, unless
# --allow_resume_changes; so must the number of processes and the list of videos.
RESUME_FREE = {"output_dir", "resume", "auto_resume", "allow_resume_changes", "finetune", "label_map", "eval",
               "data_path", "data_root", "num_workers", "device", "precision", "compile", "with_checkpoint", "fsdp",
               "log_every", "skip_bad_videos", "max_bad_fraction", "save_ckpt_freq", "normalize_on_device",
               "probe_every", "probe_data", "probe_size", "probe_pooling"}  # the probe only reads the encoder


def training_state(t: Trainer, epoch: int, step: int, run_args: dict, **extra) -> dict:
    """The reference's layout (model, optimizer, epoch, scaler, args) plus the optimizer step. Model and
    optimizer are gathered into plain, unsharded state dicts with clean names (no `module.` or
    `_orig_mod.` prefixes), so the file loads anywhere. Collective under FSDP: call on every rank."""
    return dict(model=get_model_state_dict(t.model, options=FULL),
                optimizer=get_optimizer_state_dict(t.model, t.optimizer, options=FULL),
                scaler=t.scaler.state_dict(), epoch=epoch, step=step, args=run_args, **extra)


def run_args(flags: dict, d: Dist, *datasets) -> dict:
    """What a checkpoint stores under `args`: the command line's flags (vars of the parsed arguments) as plain
    values (the parsed config and anything loaded along the way left out, so the file loads with
    weights_only), the number of processes, and a fingerprint of the videos (so a resume notices other data
    under the same flags)."""
    plain = {k: v for k, v in flags.items() if not k.startswith("_") and k != "cfg"}
    return dict(plain, processes=d.world_size, data=" | ".join(ds.digest() for ds in datasets))


def resume_training(t: Trainer, resume: str | None, auto_resume: bool, args: dict,
                    allow_changes: bool = False) -> dict | None:
    """Continue from `resume`, or else from the output folder's checkpoint-last.pth (with auto_resume):
    weights, optimizer and scaler restored, after checking that the file is a training checkpoint of this
    model (every tensor, every shape), with finite weights, of the same run (`args` against the stored
    ones: each difference outside RESUME_FREE is an error, or with allow_changes a note in the log).
    Returns the checkpoint, or None when the run starts fresh. log.txt keeps the lines of finished epochs."""
    last = t.out / "checkpoint-last.pth"
    path = resume or (last if auto_resume and last.exists() else None)
    seen = None if path is None else Path(path).stat().st_size if Path(path).is_file() else "no such file"
    same_everywhere(t.d, (str(path), seen), "checkpoint to resume from",
                    "--output_dir (and --resume) must be on a filesystem every process sees")
    if path is None:  # a fresh start
        if auto_resume:
            on_main(t.d, trim_log, t.out, 0)  # lines a killed first epoch left
        else:
            on_main(t.d, set_aside, t.out)  # another run's files, by the user's choice to start afresh
        return None
    state = vmae.load_checkpoint(path)
    parts = (("model", dict), ("optimizer", dict), ("epoch", int))
    absent = [k for k, kind in parts if not isinstance(state.get(k), kind)]
    if absent:
        raise RunError(f"cannot resume from {path}: not a training checkpoint (it has no {', '.join(absent)}); to "
                       "start from its weights, pass it as --finetune")
    check_fits(state["model"], t.model, path)
    saved = vmae.saved_args(state)
    unknown = [k for k in args if k not in saved and k not in RESUME_FREE]
    if unknown:
        t.d.print(f"note: {path} predates {', '.join(unknown)}; those are not compared")
    changes = changed_args(saved, args)
    if changes and not allow_changes:
        raise RunError(f"{path} was trained with other settings, and resuming would mix two runs:\n  "
                       + "\n  ".join(changes) + "\nUse the checkpoint's values, another --output_dir (or "
                       "--no-auto_resume) to start afresh, or --allow_resume_changes to continue anyway")
    try:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(t.model, state["model"], options=options)
        set_optimizer_state_dict(t.model, t.optimizer, state["optimizer"], options=options)
        if "scaler" in state:
            t.scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise RunError(f"cannot resume from {path}: its optimizer state does not fit this run ({type(e).__name__}: "
                       f"{e})") from e
    t.last_good = f"{path} (epoch {state['epoch']})"
    start = state["epoch"] + 1
    t.d.print(f"resumed from {path}: epoch {state['epoch']} done, continuing at epoch {start}")
    on_main(t.d, trim_log, t.out, start)
    if changes:
        t.d.print("--allow_resume_changes: continuing with\n  " + "\n  ".join(changes))
        on_main(t.d, append_log, t.out, dict(resumed_from=str(path), at_epoch=start, changes=changes))
    return state


def check_fits(weights: dict, model: torch.nn.Module, path) -> None:
    """A training checkpoint's weights must be this model's, tensor for tensor and shape for shape, and finite."""
    raw = model.module if isinstance(model, DDP) else model
    own = {k: tuple(v.shape) for k, v in raw.state_dict().items()}
    weights = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    missing, unexpected = [k for k in own if k not in weights], [k for k in weights if k not in own]
    wrong = [f"{k} {tuple(weights[k].shape)} vs {shape}" for k, shape in own.items()
             if k in weights and tuple(weights[k].shape) != shape]
    problems = [f"{what}: {vmae.listed(keys)}" for what, keys in (
        ("missing", missing), ("not in this model", unexpected), ("other shapes (file vs model)", wrong)) if keys]
    if problems:
        raise RunError(f"cannot resume from {path}: it does not fit this model (a checkpoint of another model, size "
                       "or recipe, or an incomplete file): " + "; ".join(problems))
    bad = nonfinite(weights)
    if bad:
        raise RunError(f"cannot resume from {path}: non-finite weights in {vmae.listed(bad)}")


def changed_args(saved: dict, now: dict) -> list[str]:
    """'--flag: <checkpoint's> in the checkpoint, <now> now' for each setting of the run that differs."""
    return [f"{'' if k in ('processes', 'data') else '--'}{k}: {saved[k]!r} in the checkpoint, {v!r} now"
            for k, v in now.items() if k in saved and k not in RESUME_FREE and saved[k] != v]


def nonfinite(weights: dict) -> list[str]:
    return [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def end_of_epoch(t: Trainer, stats: dict, args: dict, *, keep: bool, best: bool = False, **extra) -> dict:
    """An epoch's outputs: checkpoint-<epoch>.pth when `keep`, checkpoint-best.pth when `best`, the epoch's
    line of log.txt (stats as JSON), and last checkpoint-last.pth, which commits the epoch: a kill before it
    leaves the previous epoch's checkpoint-last, and the rerun does this epoch again and rewrites the rest.
    The weights are checked finite first. Collective (the state is gathered on every rank); rank 0 writes.
    Returns the state saved; `extra` goes into it (e.g. best_acc1)."""
    state = training_state(t, stats["epoch"], stats["steps"], args, **extra)

    def write():
        bad = nonfinite(state["model"])
        if bad:
            raise RunError(f"the weights became non-finite in epoch {stats['epoch']} ({vmae.listed(bad)}), though the "
                           f"loss was finite; stopping without saving. The last good checkpoint is {t.last_good}. "
                           "Try a lower --lr or --clip_grad.")
        if keep:
            save_checkpoint(t.out / f"checkpoint-{stats['epoch']}.pth", state)
        if best:
            save_checkpoint(t.out / "checkpoint-best.pth", state)
        append_log(t.out, stats)
        save_checkpoint(t.out / "checkpoint-last.pth", state)
    on_main(t.d, write)
    t.last_good = f"{t.out / 'checkpoint-last.pth'} (epoch {stats['epoch']})"
    return state


# -----------------------------------------------------------------------------------------------------
# The command line, shared by both recipes and the other scripts


def within(interval: str, kind: type = float) -> Callable[[str], float]:
    """An argparse `type` for a numeric flag: a `kind` (float or int) in `interval`, written as in maths
    ("[0, 1)", "(0, inf)", "[1, 100000]"); nan and infinities never pass. argparse reports a refusal as
    `argument --flag: must be in [0, 1), got 2`, naming the flag, before anything runs. Every numeric flag of
    every script takes one (tests/test_reliability.py checks), so its valid range is stated where it is made."""
    match = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", interval)
    low, high = float(match[2]), float(match[3])

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} in {interval}, "
                                             f"got {text!r}") from None
        above = low < value if match[1] == "(" else low <= value
        below = value < high if match[4] == ")" else value <= high
        if not (above and below and (kind is int or math.isfinite(value))):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value
    parse.__name__ = parse.interval = interval  # argparse names the type by __name__; tests read .interval
    return parse


def device_name(text: str) -> str:
    """An argparse `type`: cpu, cuda or cuda:N."""
    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def frame_names(text: str) -> str:
    """An argparse `type` for --fname_tmpl: a template that numbers the frames, tried on frames 1 and 2."""
    try:
        names = [text.format(i) for i in (1, 2)]
    except (IndexError, KeyError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text!r} does not format with a frame number ({e}); expected e.g. "
                                         "img_{:05}.jpg") from None
    if names[0] == names[1]:
        raise argparse.ArgumentTypeError(f"{text!r} gives every frame the name {names[0]}; it needs a field for the "
                                         "frame number, e.g. img_{:05}.jpg")
    return text


def add_shared_flags(p: argparse.ArgumentParser) -> None:
    """The flags both recipes take with the same meaning: the clip's shape, the data on disk, the run and
    the machine. Each recipe adds its own (model, schedule, masks or classes, output_dir) around these."""
    a = p.add_argument
    a("--num_frames", type=within("[1, 1024]", int), default=16)
    a("--sampling_rate", type=within("[1, inf)", int), default=4, help="take every n-th frame")
    a("--input_size", type=within("[1, 4096]", int), default=224)
    a("--tubelet_size", type=within("[1, inf)", int), default=2)
    a("--data_root", default="", help="prefix for relative paths in --data_path's lists")
    a("--fname_tmpl", type=frame_names, default="img_{:05}.jpg", help="file names of extracted frames")
    a("--skip_bad_videos", action="store_true", help="skip unreadable videos (logged and counted) instead of stopping")
    a("--max_bad_fraction", type=within("[0, 1]"), default=0.01, help="with --skip_bad_videos, stop once more than "
      "this share of the dataset was unreadable")
    a("--auto_resume", action=argparse.BooleanOptionalAction, default=True)
    a("--allow_resume_changes", action="store_true", help="resume even where flags, data or processes differ from "
      "the checkpoint's (each difference is printed and logged); without it such a resume stops")
    a("--log_every", type=within("[1, inf)", int), default=20, help="optimizer steps between loss read-outs (each is "
      "a host sync)")
    a("--num_workers", type=within("[0, inf)", int), default=10)
    a("--seed", type=within("[0, 4294967295]", int), default=0)
    a("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    a("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPUs that have it, "
      "else fp32")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--with_checkpoint", action="store_true", help="activation checkpointing per block (less memory, ~30%% slower)")
    a("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (launch with torchrun)")


def check_shared_flags(parser: argparse.ArgumentParser, args) -> None:
    """What argparse's types cannot check alone (each flag's range they do)."""
    if args.data_path is not None and not Path(args.data_path).exists():
        parser.error(f"--data_path {args.data_path}: no such file or folder")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        parser.error("--fsdp needs a process group: launch with torchrun (e.g. torchrun --nproc_per_node=8 ...)")


# Both recipes' demos (no --data_path): the laptop size on 8 frames of 32 x 32 built-in clips.
DEMO_CLIPS = dict(model="demo", input_size=32, num_frames=8)


def set_demo_defaults(parser: argparse.ArgumentParser, argv, demo: dict) -> argparse.Namespace:
    """Without --data_path the demo's values replace the parser's defaults; flags given explicitly still win.
    Returns a first parse of argv, for defaults that depend on other flags."""
    known = parser.parse_known_args(argv)[0]
    if known.data_path is None:
        parser.set_defaults(**demo)
    return known


# config field -> the flag that sets it, so a bad value is reported under the name the user typed
FLAGS = dict(img_size="--input_size", num_frames="--num_frames", tubelet_size="--tubelet_size",
             decoder_depth="--decoder_depth", drop_path_rate="--drop_path")


def flag_given(parser: argparse.ArgumentParser, argv, dest: str) -> bool:
    """Whether the command line sets `dest` itself rather than leaving it at its default."""
    default, unset = parser.get_default(dest), object()
    parser.set_defaults(**{dest: unset})
    try:
        return getattr(parser.parse_known_args(argv)[0], dest) is not unset
    finally:
        parser.set_defaults(**{dest: default})


def checkpoint_defaults(parser: argparse.ArgumentParser, argv, path: str) -> vmae.Checkpoint:
    """Read the checkpoint a command starts from (or stop with an error naming it). The input it was trained
    on and its tubelet (and decoder depth) become the defaults of the flags that set them; flags given
    explicitly still win."""
    try:
        checkpoint = vmae.read_checkpoint(path)
    except vmae.CheckpointError as e:
        parser.error(str(e))
    dests = vars(parser.parse_known_args(argv)[0])
    parser.set_defaults(**{flag[2:]: checkpoint.sizes[field] for field, flag in FLAGS.items()
                           if field in checkpoint.sizes and flag[2:] in dests})
    return checkpoint


def model_config(parser: argparse.ArgumentParser, args, checkpoint: vmae.Checkpoint | None = None,
                 model_given: bool = True, **fields) -> vmae.VideoMAEConfig:
    """The --model preset with the size flags applied (each recipe passes its own extra fields). With a
    `checkpoint` to start from, the model it holds instead (args.model becomes its name), which a --model
    given on the command line must agree with."""
    if (model_given or checkpoint is None) and vmae.ALIASES.get(args.model, args.model) not in vmae.SIZES:
        parser.error(f"--model {args.model}: expected one of {', '.join(vmae.SIZES)} or a reference name "
                     "such as pretrain_videomae_base_patch16_224")
    sizes = dict(img_size=args.input_size, num_frames=args.num_frames, tubelet_size=args.tubelet_size,
                 drop_path_rate=args.drop_path, with_checkpoint=args.with_checkpoint, **fields)
    try:
        if checkpoint is None:
            return vmae.config(args.model, **sizes)
        cfg = vmae.config_from_checkpoint(checkpoint, args.model if model_given else None, **sizes)
        args.model = args.model if model_given else checkpoint.preset or "custom"
        return cfg
    except vmae.CheckpointError as e:
        parser.error(str(e))
    except ValueError as e:
        parser.error(as_flags(str(e)))


def as_flags(message: str) -> str:
    """A config error's message with the config fields named by the flags that set them."""
    for field, flag in FLAGS.items():
        message = message.replace(field, flag)
    return message


# Exceptions that mean the user gave something that does not work: a message, not a traceback.
USER_ERRORS = (RunError, vmae.CheckpointError, vmae.ConfigError, masking.MaskError, data.ListError, data.VideoError,
               FileNotFoundError)


def run(main: Callable, argv=None) -> None:
    """Run a command-line `main`, turning a user error into `error: <message>` on stderr and exit code 2.
    Under torchrun the other processes are stopped by torchrun when this one exits."""
    try:
        main(argv)
    except USER_ERRORS as e:
        message = as_flags(str(e)) if isinstance(e, vmae.ConfigError) else str(e)
        if "\nOriginal Traceback" in message:  # raised in a DataLoader worker: keep the worker's own message
            message = message.rstrip().rsplit(f"{type(e).__name__}: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
