"""What both training recipes share: train_pretrain.py and train_finetune.py each bring a model, a dataset and a
loss; the rest is here: AdamW with the reference's parameter groups and warmup + cosine schedules; one process per
GPU under torchrun (DDP, or FSDP2 with --fsdp) and bf16 autocast; the loop (`train_epoch`); checkpoints in the
reference's layout and log.txt; the shared flags, each number's `Range`, and `resolve`, the one order in which a
flag takes its value; and `run`, which turns a user's mistake into `error: ...` and exit code 2.

Nothing silent, nothing lost: the output folder has one writer (a lock file) and room for a checkpoint; every file
is written to a temporary file and renamed, checkpoint-last.pth last, so a kill leaves the old state or the new one;
SIGTERM or SIGUSR1 stops a run after its current step with a checkpoint it resumes from exactly. A resume continues
the same run or stops: changed flags, other data, another model or non-finite numbers are named.
"""
import argparse
import contextlib
import errno
import fcntl
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import distributed
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoints
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
    """One value per optimizer step: a linear warmup (warmup_steps if > 0, else warmup_epochs epochs) from
    start_warmup_value to base_value, then a half cosine towards final_value (reached one step after the end)."""
    total = epochs * niter_per_ep
    if total > MAX_STEPS:  # the schedule is an array: refuse before allocating gigabytes
        raise RunError(f"--epochs {epochs} x {niter_per_ep} steps per epoch = {total} optimizer steps, more than "
                       f"{MAX_STEPS:.0e}: is --epochs right?")
    warmup_iters = min(warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep, total)
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
    """AdamW groups: no weight decay for 1-D parameters and the mask token; with `layer_decay`, block k's lr scaled by
    layer_decay^(depth - k). By the parameter, not its name, which wrapping changes (docs/reference.md, trap 10)."""
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
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=device.type in ("cuda", "cpu"))


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
    cpu_group: object = None  # a gloo group beside NCCL's, for agreeing on host-side flags (None: the default)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:  # on rank 0 only
        if self.is_main:
            print(*args, **kwargs)


def setup_distributed(device: str) -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; one process per GPU (NCCL) or per CPU job (gloo)."""
    world, rank, local = (int(os.environ.get(name, "1" if name == "WORLD_SIZE" else "0"))
                          for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError("--device cuda: no CUDA device is available here; use --device cpu")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    cpu_group = None
    if "WORLD_SIZE" in os.environ:  # launched by torchrun (even with one process, FSDP needs the group)
        distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda" and world > 1:
            cpu_group = distributed.new_group(backend="gloo")
    return Dist(rank, world, local, dev, cpu_group)


def leave_process_group() -> None:
    """End of a run: wait for every process (rank 0 may still be writing), then take the group down."""
    if distributed.is_initialized():
        distributed.barrier()
        distributed.destroy_process_group()
        time.sleep(0.1)  # gloo's worker frees the barrier's tensors with the GIL; at interpreter exit it would abort


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """bf16 where the device computes in it natively (CUDA with bf16), else fp32; fp16 only when asked."""
    if precision is not None:
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call of fn, the GPU's queue drained before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from (train_epoch reseeds them each epoch from seed, epoch and rank)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def wrap_model(model: torch.nn.Module, dist: Dist, fsdp: bool, precision: str) -> torch.nn.Module:
    """DDP across processes, or FSDP2 (each transformer block sharded on its own) with --fsdp."""
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in [m for m in model.modules() if isinstance(m, vmae.Block)]:
            fully_shard(block, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    if dist.world_size > 1:
        return DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    return model


def gathered(dist: Dist, value) -> list:
    """`value` from every process, by rank (a collective under torchrun; [value] in one process)."""
    if dist.world_size == 1:
        return [value]
    values = [None] * dist.world_size
    distributed.all_gather_object(values, value)
    return values


def skipped_videos(dist: Dist, dataset) -> int:
    """How many videos all processes together have skipped as unreadable, max_bad_fraction checked on that."""
    bad = sorted(set().union(*gathered(dist, dataset.bad_videos())))
    dataset.check_bad_fraction(bad)
    return len(bad)


def file_share(dist: Dist) -> data.Share:
    """The processes split the checks of listed files (data.Share) and exchange what they found."""
    return data.Share(dist.rank, dist.world_size, lambda found: gathered(dist, found))


def grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce on accumulation micro-steps (only the last one syncs)."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)


# -----------------------------------------------------------------------------------------------------
# The trainer: a model ready to train, its loop, and how a scheduler's signal stops it with a step checkpoint


@dataclass
class Trainer:
    model: torch.nn.Module  # wrapped for the processes (DDP / FSDP) and compiled if asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # active only with fp16
    dist: Dist
    precision: str
    out: Path  # the run's output folder
    seed: int = 0
    accum_iter: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = None  # max gradient norm
    log_every: int = 20  # optimizer steps between loss read-outs
    save_every_steps: int = 0  # a step checkpoint every n optimizer steps (0: at epoch ends only)
    args: dict = field(default_factory=dict)  # what its checkpoints store under `args` (run_args)
    extra: dict = field(default_factory=dict)  # the recipe's own entries in its checkpoints (best_acc1)
    resume_at: dict | None = None  # where a step checkpoint stopped in its epoch, until the loop is back there
    last_good: str = "none: no epoch has finished yet"  # the newest checkpoint of this run, for error messages


def build_trainer(model: torch.nn.Module, dist: Dist, precision: str, out: Path, *, weight_decay: float, betas,
                  eps: float, layer_decay: float | None = None, fsdp: bool = False, compile: bool = False,
                  **loop) -> Trainer:
    """Wrap (DDP, or FSDP with --fsdp) and compile the model, then AdamW (on what FSDP sharded) and the fp16 scaler."""
    model = wrap_model(model, dist, fsdp, precision)
    raw_model = model.module if isinstance(model, DDP) else model
    if compile:
        raw_model.compile()
    groups = param_groups(raw_model, weight_decay, layer_decay=layer_decay)
    optimizer = make_optimizer(groups, 0.0, betas, eps, dist.device)  # the schedule sets lr every step
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision == "fp16")
    return Trainer(model, optimizer, scaler, dist, precision, Path(out), **loop)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """Each process's shuffled share of an epoch, from item `skip` on: a run resumed inside an epoch skips what it
    took (an item's augmentation depends on the epoch and its index alone, so the rest come out the same)."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


class Batches(NamedTuple):
    sampler: ResumableSampler
    loader: torch.utils.data.DataLoader
    steps_per_epoch: int  # optimizer steps
    clips_per_step: int  # over all processes and micro-batches, num_sample repeats included


def train_loader(dataset, batch_size: int, trainer: Trainer, num_workers: int) -> Batches:
    """Each process takes its own shuffled share of the dataset, whole batches only."""
    dist = trainer.dist
    sampler = ResumableSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=trainer.seed,
                               drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                         num_workers=num_workers, pin_memory=dist.device.type == "cuda",
                                         worker_init_fn=data.ignore_stop_signals)
    steps_per_epoch = len(loader) // trainer.accum_iter
    if steps_per_epoch == 0:
        raise RunError(f"--batch_size {batch_size} x --accum_iter {trainer.accum_iter} x {dist.world_size} processes "
                       f"is more than the {len(dataset)} videos of the dataset: not one step per epoch")
    clips = batch_size * trainer.accum_iter * dist.world_size * dataset.num_sample
    return Batches(sampler, loader, steps_per_epoch, clips)


def train_epoch(trainer: Trainer, batches: Batches, loss_of: Callable, epoch: int, lr_schedule: np.ndarray,
                wd_schedule: np.ndarray) -> tuple[float, int, float]:
    """One epoch of optimizer steps; loss_of(batch), the recipe, is a micro-batch's loss (under autocast). A step
    accumulates trainer.accum_iter micro-batches, clips if asked and steps AdamW; a stop signal or --save_every_steps
    then writes a step checkpoint. Returns (mean loss over processes and micro-batches, the run's steps, seconds)."""
    dist, model, optimizer, scaler = trainer.dist, trainer.model, trainer.optimizer, trainer.scaler
    seed_everything(trainer.seed + (epoch + 1) * dist.world_size + dist.rank)  # augmentations and masks, per epoch
    batches.loader.dataset.seed = (trainer.seed, epoch)  # each item's augmentation: from (these, its index)
    batches.sampler.set_epoch(epoch)
    at = trainer.resume_at if trainer.resume_at and trainer.resume_at["epoch"] == epoch else None
    trainer.resume_at = None
    first = at["steps"] if at else 0  # optimizer steps of this epoch done before a stop
    batches.sampler.skip = first * trainer.accum_iter * batches.loader.batch_size
    model.train()
    micro_batches = iter(batches.loader)  # (draws the workers' seed: before a stopped epoch's state comes back)
    loss_sum = torch.full((), at["loss_sum"][dist.rank] if at else 0.0, device=dist.device)
    first_bad = torch.full((), at["first_bad"][dist.rank] if at else -1, device=dist.device)  # non-finite loss at
    if at:
        set_random_state(at["random"][dist.rank], dist.device)
    start = time.time() - (at["seconds"] if at else 0)
    bar = tqdm(total=batches.steps_per_epoch, initial=first, desc=f"epoch {epoch}", disable=not dist.is_main,
               dynamic_ncols=True)
    for i in range(first, batches.steps_per_epoch):
        step = epoch * batches.steps_per_epoch + i
        set_schedules(optimizer, lr_schedule[step], wd_schedule[step])
        for micro in range(trainer.accum_iter):
            batch = next(micro_batches)
            grad_sync(model, micro == trainer.accum_iter - 1)
            with autocast(dist.device, trainer.precision):
                loss = loss_of(batch)
            scaler.scale(loss / trainer.accum_iter).backward()
            loss_sum += loss.detach()
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        if trainer.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if (i + 1) % trainer.log_every == 0 or i + 1 == batches.steps_per_epoch:
            check_finite(first_bad, lr_schedule, trainer)
            bar.set_postfix(loss=f"{loss_sum.item() / ((i + 1) * trainer.accum_iter):.4f}",
                            lr=f"{lr_schedule[step]:.2e}",
                            clips_s=f"{(i + 1 - first) * batches.clips_per_step / (time.time() - start):.1f}")
        bar.update(1)
        stop = stop_requested(dist)  # a signal to any process: all stop after this same step
        due = trainer.save_every_steps and (step + 1) % trainer.save_every_steps == 0
        if (stop or due) and i + 1 < batches.steps_per_epoch:  # (the epoch's end writes its own checkpoint)
            check_finite(first_bad, lr_schedule, trainer)
            save_step(trainer, step + 1, dict(epoch=epoch, steps=i + 1, seconds=time.time() - start,
                                              random=random_state(dist.device), loss_sum=loss_sum.item(),
                                              first_bad=int(first_bad)))
            if stop:
                raise Preempted(f"stopped by {STOP.signal or 'a signal to another process'} after optimizer step "
                                f"{i + 1} of {batches.steps_per_epoch} of epoch {epoch}; {trainer.out}/"
                                "checkpoint-last.pth holds it. Run the same command again to continue from there")
    bar.close()
    del micro_batches  # let this epoch's workers exit
    seconds = time.time() - start
    if dist.world_size > 1:
        distributed.all_reduce(loss_sum)
    return loss_sum.item() / (batches.steps_per_epoch * trainer.accum_iter * dist.world_size), step + 1, seconds


def check_finite(first_bad: torch.Tensor, lr_schedule, trainer: Trainer) -> None:
    """Stop at the first optimizer step whose loss was not finite on any process, all processes together."""
    if trainer.dist.world_size > 1:
        never = torch.iinfo(torch.long).max
        first_bad = torch.where(first_bad < 0, never, first_bad)
        distributed.all_reduce(first_bad, op=distributed.ReduceOp.MIN)
        first_bad = torch.where(first_bad == never, -1, first_bad)
    bad = int(first_bad)
    if bad >= 0:
        raise RunError(f"loss became non-finite at optimizer step {bad} (lr {lr_schedule[bad]:.3g}); stopping "
                       f"without saving. The last good checkpoint is {trainer.last_good}. Try --precision bf16 or "
                       "fp32, a lower --lr, or --clip_grad.")


PREEMPTED = 3  # the exit code of a run stopped by a signal after writing its step checkpoint


class Preempted(Exception):
    """A run stopped by SIGTERM or SIGUSR1 after an optimizer step, its step checkpoint written."""


class StopFlag:
    """The stop signal this process received (None until one arrives); `run` installs `handle`."""
    signal: str | None = None

    def handle(self, number: int, frame) -> None:
        self.signal = signal.Signals(number).name
        print(f"{self.signal}: stopping after this optimizer step, with a checkpoint", file=sys.stderr, flush=True)


STOP = StopFlag()


def stop_requested(dist: Dist) -> bool:
    """Whether any process has received a stop signal (a host-side all-reduce: no wait for the GPU)."""
    if dist.world_size == 1:
        return STOP.signal is not None
    flag = torch.tensor([STOP.signal is not None], dtype=torch.int32)
    distributed.all_reduce(flag, op=distributed.ReduceOp.MAX, group=dist.cpu_group)
    return bool(flag)


def random_state(device: torch.device) -> dict:
    """This process's generators, as a step checkpoint keeps them (masks, drop path, mixup draw from these)."""
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_random_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_step(trainer: Trainer, step: int, at: dict) -> None:
    """checkpoint-last.pth after this step, with `at` (where in the epoch, each process's state) as its resume_at."""
    at.update({key: gathered(trainer.dist, at[key]) for key in ("random", "loss_sum", "first_bad")})  # by rank
    state = training_state(trainer, at["epoch"] - 1, step, resume_at=at)
    commit(trainer, state, f"step {at['steps']} of epoch {at['epoch']}", [])
    trainer.dist.print(f"wrote {trainer.out / 'checkpoint-last.pth'} at step {at['steps']} of epoch {at['epoch']}")


# -----------------------------------------------------------------------------------------------------
# The output folder: one writer, room for a checkpoint, files that survive a kill

LOCK = ".lock"  # in the output folder: "pid <pid> on <host>" while a run writes there, empty after it


def on_main(dist: Dist, fn: Callable, *args):
    """fn(*args) on rank 0 alone (the files are its job), its result there (None elsewhere); a RunError or
    OSError there is raised on every process, so none is left waiting for rank 0 in a collective."""
    result, error = None, [None]
    if dist.is_main:
        try:
            result = fn(*args)
        except (RunError, OSError) as e:
            error = [str(e)]
    if distributed.is_initialized():
        distributed.broadcast_object_list(error, src=0)
    if error[0]:
        raise RunError(error[0])
    return result


def same_everywhere(dist: Dist, value, what: str, hint: str) -> None:
    """A RunError on every process unless all see the same `value` (of `what`): else they train apart, then hang."""
    values = gathered(dist, value)
    odd = [rank for rank, v in enumerate(values) if v != values[0]]
    if odd:
        raise RunError(f"the processes do not see the same {what}: rank 0 {values[0]}, "
                       + ", ".join(f"rank {rank} {values[rank]}" for rank in odd) + f"; {hint}")


@contextlib.contextmanager
def output_folder(out: Path, dist: Dist):
    """Hold the output folder for this run (take_folder): a second run there stops at once, naming the first."""
    lock = on_main(dist, take_folder, Path(out))
    try:
        yield
    finally:
        if lock is not None:
            release_folder(lock)


def take_folder(out: Path) -> int:
    """Create `out`, check it writable, lock it and clear it of a killed run's temporary files; returns the lock's fd.
    A POSIX lock on out/.lock: the system drops it when its process dies, forked workers do not hold it."""
    writable_folder(out)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
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
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    clear_temporaries(out)
    return fd


def writable_folder(out: Path) -> None:
    """Create --output_dir if needed and check that a file can be written there, or stop naming it."""
    probe = out / f".write-test.{os.getpid()}.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o644))
        probe.unlink()
    except OSError as e:
        raise RunError(f"--output_dir {out}: cannot write there ({e.strerror})") from None


def clear_temporaries(out: Path) -> None:
    """Remove the half-written files a killed run left anywhere in `out` (never under a real name)."""
    stale = list(out.rglob(".*.tmp*"))
    for path in stale:
        path.unlink()
    if stale:
        print(f"note: removed {len(stale)} temporary file(s) a killed run left in {out}")


def release_folder(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # an empty lock file: the last run ended cleanly
        fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def check_space(trainer: Trainer) -> None:
    """Room for one more checkpoint (weights and AdamW's two moments in fp32), written beside the old one."""
    def check():
        need = 3 * 4 * sum(p.numel() for p in trainer.model.parameters()) + (1 << 20)
        free = shutil.disk_usage(trainer.out).free
        if free < need:
            raise RunError(f"--output_dir {trainer.out}: {size(free)} free, but a checkpoint of this model needs about "
                           f"{size(need)}; free some space or pick another folder")
    on_main(trainer.dist, check)


def size(nbytes: int) -> str:
    return f"{nbytes / 2 ** 30:.2f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.1f} MiB"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp), then rename tmp to `path`: a crash or a full disk mid-write leaves the previous file whole."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # same suffix: writers that go by it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:  # whatever the writer raises for a full disk (torch.save: RuntimeError; safetensors its own)
        with contextlib.suppress(OSError):  # (disk_usage of a folder that is not there: not a full disk)
            if getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < (1 << 20):
                raise RunError(f"cannot write {path}: no space left on the device ({path.name} was not replaced). Free "
                               "some space and run the same command again: it resumes from the last checkpoint") from e
        raise RunError(f"cannot write {path}: {e}") from e
    finally:
        with contextlib.suppress(OSError):  # (no folder to clean up: the error above says why)
            tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def append_log(out: Path, stats: dict) -> None:
    """One JSON line more in out/log.txt (rewritten and renamed: no half line on a full disk)."""
    path = out / "log.txt"
    old = path.read_text() if path.exists() else ""
    atomic_write(path, lambda tmp: tmp.write_text(old + json.dumps(stats) + "\n"))


def trim_log(out: Path, start_epoch: int) -> None:
    """Drop log.txt's lines of epochs from start_epoch on, which a killed run can have written and this run redoes."""
    path = out / "log.txt"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []

    def kept(line: str) -> bool:
        with contextlib.suppress(ValueError, AttributeError):
            return json.loads(line).get("epoch", -1) < start_epoch
        return False
    keep = [line for line in lines if kept(line)]
    if len(keep) < len(lines):
        atomic_write(path, lambda tmp: tmp.write_text("".join(keep)))
        print(f"note: {path}: dropped {len(lines) - len(keep)} line(s) of epoch {start_epoch} on, which this run does "
              "(again)")


def set_aside(out: Path) -> None:
    """--no-auto_resume: the folder's earlier log.txt and checkpoints go to a sub-folder, so two runs never mix."""
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
# Flags that change how or where a run computes, not what: they may differ when it resumes. Any other flag, the
# number of processes and the list of videos must be the checkpoint's, unless --allow_resume_changes.
RESUME_FREE = {"output_dir", "resume", "auto_resume", "allow_resume_changes", "finetune", "label_map", "eval",
               "data_path", "data_root", "num_workers", "device", "precision", "compile", "with_checkpoint", "fsdp",
               "log_every", "save_every_steps", "skip_bad_videos", "max_bad_fraction", "save_ckpt_freq",
               "normalize_on_device", "probe_every", "probe_data", "probe_size", "probe_pooling"}  # the probe reads


def training_state(trainer: Trainer, epoch: int, step: int, **more) -> dict:
    """The reference's layout (model, optimizer, epoch, scaler, args), the optimizer step and the recipe's extras,
    as plain state dicts without `module.` or `_orig_mod.`: the file loads anywhere. Collective under FSDP."""
    return dict(model=get_model_state_dict(trainer.model, options=FULL),
                optimizer=get_optimizer_state_dict(trainer.model, trainer.optimizer, options=FULL),
                scaler=trainer.scaler.state_dict(), epoch=epoch, step=step, args=trainer.args, **trainer.extra, **more)


def run_args(args: argparse.Namespace, dist: Dist, *datasets) -> dict:
    """What a checkpoint stores under `args`: the flags, the number of processes and a fingerprint of the videos."""
    return dict(vars(args), processes=dist.world_size, data=" | ".join(ds.digest() for ds in datasets))


def resume_training(trainer: Trainer, resume: str | None, auto_resume: bool, args: dict,
                    allow_changes: bool = False) -> dict | None:
    """Continue from `resume`, or else (auto_resume) the output folder's checkpoint-last.pth, checked to be a finite
    training checkpoint of this model and run: a flag of `args` (what this run's checkpoints store) outside
    RESUME_FREE that differs is an error, or with allow_changes a logged note. Returns it, or None (a fresh start)."""
    dist, last = trainer.dist, trainer.out / "checkpoint-last.pth"
    trainer.args = args
    path = resume or (last if auto_resume and last.exists() else None)
    seen = None if path is None else Path(path).stat().st_size if Path(path).is_file() else "no such file"
    same_everywhere(dist, (str(path), seen), "checkpoint to resume from",
                    "--output_dir (and --resume) must be on a filesystem every process sees")
    if path is None:  # a fresh start
        if auto_resume:
            on_main(dist, trim_log, trainer.out, 0)  # lines a killed first epoch left
        else:
            on_main(dist, set_aside, trainer.out)  # another run's files, by the user's choice to start afresh
        return None
    state = checkpoints.load_checkpoint(path)
    parts = (("model", dict), ("optimizer", dict), ("epoch", int))
    absent = [k for k, kind in parts if not isinstance(state.get(k), kind)]
    if absent:
        raise RunError(f"cannot resume from {path}: not a training checkpoint (it has no {', '.join(absent)}); to "
                       "start from its weights, pass it as --finetune")
    check_fits(state, trainer.model, path)
    saved = checkpoints.saved_args(state)
    unknown = [k for k in args if k not in saved and k not in RESUME_FREE]
    if unknown:
        dist.print(f"note: {path} predates {', '.join(unknown)}; those are not compared")
    changes = [f"{'' if k in ('processes', 'data') else '--'}{k}: {saved[k]!r} in the checkpoint, {v!r} now"
               for k, v in args.items() if k in saved and k not in RESUME_FREE and saved[k] != v]
    if changes and not allow_changes:
        raise RunError(f"{path} was trained with other settings, and resuming would mix two runs:\n  "
                       + "\n  ".join(changes) + "\nUse the checkpoint's values, another --output_dir (or "
                       "--no-auto_resume) to start afresh, or --allow_resume_changes to continue anyway")
    start, at = state["epoch"] + 1, state.get("resume_at")
    if start >= args["epochs"] and at is None and changes:
        raise RunError(f"{path} has done {start} epochs and --epochs is {args['epochs']}: no epoch is left for "
                       "--allow_resume_changes to change; pass a larger --epochs to train on")
    if at is not None and len(at["random"]) != dist.world_size:
        raise RunError(f"{path} stopped inside epoch {at['epoch']} with {len(at['random'])} process(es): resume it "
                       f"with as many (this run has {dist.world_size})")
    try:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(trainer.model, state["model"], options=options)
        set_optimizer_state_dict(trainer.model, trainer.optimizer, state["optimizer"], options=options)
        if "scaler" in state:
            trainer.scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise RunError(f"cannot resume from {path}: its optimizer state does not fit this run ({type(e).__name__}: "
                       f"{e})") from e
    trainer.resume_at = at
    trainer.last_good = f"{path} (epoch {state['epoch']})"
    where = f"at step {at['steps']} of epoch {start}" if at else f"at epoch {start}"
    dist.print(f"resumed from {path}: epoch {state['epoch']} done, continuing {where}" if start < args["epochs"]
               else f"note: {path} has done all {args['epochs']} epochs; nothing left to train")
    on_main(dist, trim_log, trainer.out, start)
    if changes:
        dist.print("--allow_resume_changes: continuing with\n  " + "\n  ".join(changes))
        on_main(dist, append_log, trainer.out, dict(resumed_from=str(path), at_epoch=start, changes=changes))
    return state


def check_fits(state: dict, model: torch.nn.Module, path) -> None:
    """A training checkpoint must be this model's, tensor for tensor and shape for shape, with finite numbers."""
    raw = model.module if isinstance(model, DDP) else model
    weights = {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    missing, unexpected, wrong = checkpoints.compare(raw.state_dict(), weights)
    problems = [f"{what}: {checkpoints.listed(keys)}" for what, keys in (
        ("missing", missing), ("not in this model", unexpected), ("other shapes", wrong)) if keys]
    if problems:
        raise RunError(f"cannot resume from {path}: it does not fit this model (a checkpoint of another model, size "
                       "or recipe, or an incomplete file): " + "; ".join(problems))
    for what, tensors in (("weights", weights), ("optimizer state", state["optimizer"].get("state", {}))):
        bad = checkpoints.nonfinite(tensors)
        if bad:
            raise RunError(f"cannot resume from {path}: non-finite {what} in {checkpoints.listed(bad)} (the run that "
                           "wrote it diverged); resume from an earlier checkpoint-N.pth with --resume")


def commit(trainer: Trainer, state: dict, when: str, files: list[str], log: dict | None = None) -> None:
    """Write finite weights to `files`, `log` to log.txt, then checkpoint-last.pth; collective, rank 0 writes."""
    def write():
        bad = checkpoints.nonfinite(state["model"])
        if bad:
            raise RunError(f"the weights became non-finite in {when} ({checkpoints.listed(bad)}), though the loss was "
                           f"finite; stopping without saving. The last good checkpoint is {trainer.last_good}. Try a "
                           "lower --lr or --clip_grad.")
        for name in files:
            save_checkpoint(trainer.out / name, state)
        if log is not None:
            append_log(trainer.out, log)
        save_checkpoint(trainer.out / "checkpoint-last.pth", state)
    on_main(trainer.dist, write)
    trainer.last_good = f"{trainer.out / 'checkpoint-last.pth'} ({when})"


def end_of_epoch(trainer: Trainer, stats: dict, *, keep: bool, best: bool = False) -> dict:
    """An epoch's checkpoints and log.txt line (commit); then a stop signal received meanwhile stops the run."""
    state = training_state(trainer, stats["epoch"], stats["steps"])
    files = [f"checkpoint-{stats['epoch']}.pth"] * keep + ["checkpoint-best.pth"] * best
    commit(trainer, state, f"epoch {stats['epoch']}", files, log=stats)
    if stop_requested(trainer.dist):
        raise Preempted(f"stopped by {STOP.signal or 'a signal to another process'} at the end of epoch "
                        f"{stats['epoch']}; {trainer.out / 'checkpoint-last.pth'} holds it. Run the same command "
                        "again to continue")
    return state


# -----------------------------------------------------------------------------------------------------
# The command line, shared by both recipes and the other scripts


@dataclass(frozen=True)
class Range:
    """An argparse `type` for a number: a `kind` (int or float) from `low` to `high`, each end included unless
    open (an infinite end always is); nan never passes. Every numeric flag of every script takes one."""
    kind: type
    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __str__(self) -> str:
        closed_high = not self.open_high and self.high != math.inf
        return f"{'(' if self.open_low else '['}{self.low}, {self.high}{']' if closed_high else ')'}"

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if self.kind is int else 'a number'} in {self}, "
                                             f"got {text!r}") from None
        above = self.low < value if self.open_low else self.low <= value
        below = value < self.high if self.open_high else value <= self.high
        if not (above and below and (self.kind is int or math.isfinite(value))):
            raise argparse.ArgumentTypeError(f"must be in {self}, got {text}")
        return value


def device_name(text: str) -> str:
    """An argparse `type`: cpu, cuda or cuda:N."""
    with contextlib.suppress(RuntimeError):  # (not a device name at all)
        if torch.device(text).type in ("cpu", "cuda"):
            return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


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


def add_input_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every script that reads videos with a model: the model, the clip, the data, the machine."""
    a = p.add_argument
    a("--model", default="base", help="small, base, large, huge, giant, demo (the laptop size), or a reference name "
      "(pretrain_videomae_base_patch16_224, vit_base_patch16_224, ...); with a checkpoint to start from, the "
      "file's own size (given, it must match)")
    a("--num_frames", type=Range(int, 1, 1024), default=16)
    a("--sampling_rate", type=Range(int, 1), default=4, help="take every n-th frame")
    a("--input_size", type=Range(int, 1, 4096), default=224)
    a("--data_root", default="", help="prefix for relative paths in --data_path's lists")
    a("--fname_tmpl", type=frame_names, default="img_{:05}.jpg", help="file names of extracted frames")
    a("--skip_bad_videos", action="store_true", help="skip unreadable videos (logged and counted) instead of stopping")
    a("--max_bad_fraction", type=Range(float, 0, 1), default=0.01, help="with --skip_bad_videos, stop once more "
      "than this share of the dataset was unreadable")
    a("--num_workers", type=Range(int, 0), default=10)
    a("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    a("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPUs that have it, "
      "else fp32")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags both recipes take for the run itself: resuming, logging, checkpoints, speed, sharding."""
    a = p.add_argument
    a("--tubelet_size", type=Range(int, 1), default=2)
    a("--auto_resume", action=argparse.BooleanOptionalAction, default=True)
    a("--allow_resume_changes", action="store_true", help="resume even where flags, data or processes differ from "
      "the checkpoint's (each difference is printed and logged); without it such a resume stops")
    a("--log_every", type=Range(int, 1), default=20, help="optimizer steps between loss read-outs (each waits for "
      "the GPU)")
    a("--save_every_steps", type=Range(int, 0), default=0, help="also write checkpoint-last.pth every n optimizer "
      "steps, for long epochs (a rerun continues from the step); 0 = at epoch ends only. SIGTERM or SIGUSR1 "
      "writes one at the next step's end and stops (exit code 3)")
    a("--seed", type=Range(int, 0, 2 ** 32 - 1), default=0)
    a("--compile", action="store_true", help="torch.compile the model")
    a("--with_checkpoint", action="store_true", help="activation checkpointing per block (less memory, ~30%% slower)")
    a("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (launch with torchrun)")


# Both recipes' demos (no --data_path): the laptop size on 8 frames of 32 x 32 built-in clips.
DEMO_CLIPS = dict(model="demo", input_size=32, num_frames=8)
# config field -> the flag that sets it, so that a bad value is reported under the name the user typed
FLAGS = dict(img_size="--input_size", num_frames="--num_frames", tubelet_size="--tubelet_size",
             decoder_depth="--decoder_depth", drop_path_rate="--drop_path")


def resolve(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace,
            *layers: dict) -> set[str]:
    """Give every flag its value in one order: argv's (whole names only: allow_abbrev=False), else the first of
    `layers` (what a checkpoint states, the demo's) that has it, else its default. Returns the flags argv names."""
    argv = sys.argv[1:] if argv is None else argv
    given = {action.dest for action in parser._actions for option in action.option_strings
             if any(word == option or word.startswith(option + "=") for word in argv)}
    for dest in vars(args).keys() - given:
        layer = next((layer for layer in layers if dest in layer), None)
        if layer is not None:
            setattr(args, dest, layer[dest])
    return given


def read_start(parser: argparse.ArgumentParser, path: str | None) -> checkpoints.Checkpoint | None:
    """The checkpoint a command starts from, read once (or a parser error naming it)."""
    try:
        return checkpoints.read_checkpoint(path) if path else None
    except checkpoints.CheckpointError as e:
        parser.error(str(e))


def checkpoint_flags(start: checkpoints.Checkpoint | None) -> dict:
    """What a checkpoint to start from states, as flag values: model, input size, frames, tubelet, decoder depth."""
    if start is None:
        return {}
    flags = {flag[2:]: start.sizes[field] for field, flag in FLAGS.items() if field in start.sizes}
    return dict(flags, model=start.preset or "custom")


def tool_start(parser: argparse.ArgumentParser, argv: list[str] | None,
               args: argparse.Namespace) -> tuple[checkpoints.Checkpoint, vmae.VideoMAEConfig]:
    """--checkpoint, read once, and its model (at the file's input unless the flags say; --model must agree)."""
    start = read_start(parser, args.checkpoint)
    given = resolve(parser, argv, args, checkpoint_flags(start))
    try:
        return start, checkpoints.config_from_checkpoint(start, args.model if "model" in given else None,
                                                         img_size=args.input_size, num_frames=args.num_frames)
    except ValueError as e:  # CheckpointError, ConfigError
        parser.error(as_flags(str(e)))


def config_from_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str],
                      start: checkpoints.Checkpoint | None = None, **fields) -> vmae.VideoMAEConfig:
    """The model the flags ask for: the --model preset with the size flags (and a recipe's `fields`) applied,
    or the model a checkpoint to start from holds, which a --model given must agree with; or a parser error."""
    model_given = "model" in given
    if (model_given or start is None) and vmae.ALIASES.get(args.model, args.model) not in vmae.SIZES:
        parser.error(f"--model {args.model}: expected one of {', '.join(vmae.SIZES)} or a reference name "
                     "such as pretrain_videomae_base_patch16_224")
    sizes = dict(img_size=args.input_size, num_frames=args.num_frames, tubelet_size=args.tubelet_size,
                 drop_path_rate=args.drop_path, with_checkpoint=args.with_checkpoint, **fields)
    try:
        if start is None:
            return vmae.config(args.model, **sizes)
        return checkpoints.config_from_checkpoint(start, args.model if model_given else None, **sizes)
    except checkpoints.CheckpointError as e:
        parser.error(str(e))
    except vmae.ConfigError as e:
        parser.error(as_flags(str(e)))


def as_flags(message: str) -> str:
    """A config error's message with each `field=` named by the flag that sets it."""
    for field, flag in FLAGS.items():
        message = message.replace(f"{field}=", f"{flag}=")
    return message


def mask_config(parser: argparse.ArgumentParser, args: argparse.Namespace, grid: masking.Grid) -> masking.MaskConfig:
    """--mask_type, --mask_ratio and their decoder_ twins on the model's token grid, or a parser error naming them."""
    for side in ("mask", "decoder_mask"):
        kind, ratio = getattr(args, f"{side}_type"), getattr(args, f"{side}_ratio")
        if side == "mask" or ratio > 0:
            try:
                masking.num_hidden(kind, grid, ratio)
            except masking.MaskError as e:
                parser.error(f"--{side}_type {kind} with --{side}_ratio {ratio} on a {grid} token grid: {e}")
    return masking.MaskConfig(grid, args.mask_type, args.mask_ratio, args.decoder_mask_type, args.decoder_mask_ratio)


def check_shared_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What a flag's type cannot check alone."""
    if args.data_path is not None and not Path(args.data_path).exists():
        parser.error(f"--data_path {args.data_path}: no such file or folder")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        parser.error("--fsdp needs a process group: launch with torchrun (e.g. torchrun --nproc_per_node=8 ...)")


# Exceptions that mean the user gave something that does not work: a message, not a traceback.
USER_ERRORS = (RunError, checkpoints.CheckpointError, vmae.ConfigError, masking.MaskError, data.ListError,
               data.VideoError, FileNotFoundError)


def run(main: Callable, argv=None, preemptible: bool = False) -> None:
    """Run a command-line `main`: a user error exits 2 with `error: <message>`. A preemptible one (a recipe) turns
    data.STOP_SIGNALS into a stop after the current step (exit PREEMPTED); a tool dies of them as usual."""
    before = {number: signal.signal(number, STOP.handle) for number in data.STOP_SIGNALS} if preemptible else {}
    STOP.signal = None
    try:
        main(argv)
    except USER_ERRORS as e:
        message = as_flags(str(e)) if isinstance(e, vmae.ConfigError) else str(e)
        if "\nOriginal Traceback" in message:  # raised in a DataLoader worker: keep the worker's own message
            message = message.rstrip().rsplit(f"{type(e).__name__}: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(PREEMPTED)
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
