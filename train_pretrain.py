"""Pretrain VideoMAE V2: tube-masked encoder, running-cell-masked decoder, pixel reconstruction.

Each step draws the two masks on the device, runs the model on a batch of clips, and takes an AdamW step
on the mean squared error of the cubes the encoder did not see and the decoder was asked for (vmae.py
explains the method). With no --data_path it trains a small model on the built-in synthetic clips, sized
to finish in minutes on a laptop CPU; any flag given explicitly wins over those demo settings.

    python train_pretrain.py                                          # the demo: built-in data, CPU or GPU
    python train_pretrain.py --data_path train.csv --data_root /videos --model base --batch_size 32
    torchrun --standalone --nproc_per_node=8 train_pretrain.py ...     # one machine, 8 GPUs (DDP)
    torchrun --nnodes=8 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --rdzv_backend=c10d --rdzv_endpoint=$MASTER_HOST:29500 train_pretrain.py ...   # 8 machines
    torchrun ... train_pretrain.py --model giant --fsdp --with_checkpoint --precision bf16  # shard ViT-g

--batch_size is per process and per micro-step; the learning rate is --lr x batch_size x accum_iter x
processes / 256 (the reference's rule; clips from --num_sample repeats are not counted).

The pieces both recipes need live here once and train_finetune.py imports them: the cosine schedule,
optimizer parameter groups, distributed set-up, checkpoint files and weight loading, the shared flags, and
the training loop itself (train_epoch: accumulation, clipping, loss scaling; each recipe passes its loss).
"""
import argparse
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

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

# -----------------------------------------------------------------------------------------------------
# Schedules and optimizer groups (shared with train_finetune.py)


def cosine_schedule(base_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
                    start_warmup_value: float = 0.0, warmup_steps: int = -1) -> np.ndarray:
    """One value per optimizer step: a linear warmup from start_warmup_value to base_value (both included),
    then a half cosine from base_value towards final_value (reached one step after the end).

    The warmup lasts warmup_steps if > 0, else warmup_epochs · niter_per_ep. (The reference only builds the
    warmup when warmup_epochs > 0, so warmup_steps alone made it fail a length assert; fixed here.)
    """
    total = epochs * niter_per_ep
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

    Decided by the parameter object itself, not by its name, so wrapping the model (DDP, torch.compile's
    `_orig_mod.` prefix) cannot change it: the reference's compiled pretraining gave the mask token weight
    decay that way (spec.md §9 item 10).
    """
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
# Distributed set-up, precision, seeding (shared)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; one process per GPU (NCCL) or per CPU job (gloo)."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is available here; use --device cpu")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun (even with one process, FSDP needs the group)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


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


def grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce on accumulation micro-steps (only the last one syncs)."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)


# -----------------------------------------------------------------------------------------------------
# Checkpoints (shared)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # one plain state_dict, gathered on the CPU


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a temporary file in the same folder, then a rename, so a crash mid-write never
    leaves a truncated checkpoint under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True (no arbitrary code from a file), or a Hugging Face .safetensors file,
    with errors that say what failed."""
    path = Path(path)
    if not path.is_file():
        sys.exit(f"checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # installed with transformers / huggingface_hub
            return load_file(path)
        with torch.serialization.safe_globals([argparse.Namespace]):  # the reference keeps its args as one
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, needs unsafe unpickling, or no safetensors package
        sys.exit(f"checkpoint {path}: cannot be read as a weights-only checkpoint ({type(e).__name__}: {e})")


def training_state(model, optimizer, scaler, epoch: int, step: int, args) -> dict:
    """The reference's layout (model, optimizer, epoch, scaler, args) plus the optimizer step. Model and
    optimizer are gathered into plain, unsharded state dicts with clean names (no `module.` or
    `_orig_mod.` prefixes), so the file loads anywhere. Collective under FSDP: call on every rank."""
    return dict(model=get_model_state_dict(model, options=FULL),
                optimizer=get_optimizer_state_dict(model, optimizer, options=FULL),
                scaler=scaler.state_dict(), epoch=epoch, step=step,
                args={k: v for k, v in vars(args).items() if k != "cfg"})  # plain values only: weights_only loads


def restore_training_state(model, optimizer, scaler, state: dict) -> None:
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    scaler.load_state_dict(state["scaler"])


def saved_args(checkpoint: dict) -> dict:
    """The training arguments a checkpoint stores under `args` (ours a dict, the reference's a Namespace);
    {} when it has none (released weights, Hugging Face files)."""
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    return args if isinstance(args, dict) else {}


def config_from_checkpoint(checkpoint: dict, source: str, **fields) -> vmae.VideoMAEConfig:
    """The model a checkpoint was trained with, from the arguments it stores; `fields` override them."""
    args = saved_args(checkpoint)
    if "model" not in args:
        sys.exit(f"{source}: stores no training arguments, so its model size is unknown; "
                 "pass --model, --input_size and --num_frames")
    sizes = dict(img_size=args.get("input_size", 224), num_frames=args.get("num_frames", 16),
                 tubelet_size=args.get("tubelet_size", 2))
    if "decoder_depth" in args:
        sizes["decoder_depth"] = args["decoder_depth"]
    return vmae.config(args["model"], **{**sizes, **fields})


# Hugging Face VideoMAE names -> the reference's (peers.md §4.7), replaced in this order in every key. Older
# transformers releases store q_bias / v_bias, newer ones query.bias / value.bias; the key has no bias.
HF_NAMES = [("videomae.embeddings.patch_embeddings.projection.", "encoder.patch_embed.proj."),
            ("videomae.encoder.layer.", "encoder.blocks."), ("videomae.layernorm.", "encoder.norm."),
            ("decoder.decoder_layers.", "decoder.blocks."), ("classifier.", "head."),
            ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
            ("attention.attention.q_bias", "attn.q_bias"), ("attention.attention.query.bias", "attn.q_bias"),
            ("attention.attention.v_bias", "attn.v_bias"), ("attention.attention.value.bias", "attn.v_bias"),
            ("attention.output.dense.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."),
            ("output.dense.", "mlp.fc2.")]


def from_hugging_face(weights: dict) -> dict:
    """A Hugging Face VideoMAEForPreTraining / VideoMAEForVideoClassification state dict under the
    reference's names: encoder.* (as in a pretraining checkpoint), decoder.*, encoder_to_decoder, mask_token,
    fc_norm, head. Hugging Face keeps query, key and value as three Linears; they are stacked back into qkv."""
    out, qkv = {}, {}
    for key, value in weights.items():
        for old, new in HF_NAMES:
            key = key.replace(old, new)
        block, found, part = key.rpartition(".attention.attention.")
        if found and part in ("query.weight", "key.weight", "value.weight"):
            qkv.setdefault(block, {})[part] = value
        else:
            out[key] = value
    for block, w in qkv.items():  # (3C, C): the q rows, then k, then v, the order Attention splits them in
        out[f"{block}.attn.qkv.weight"] = torch.cat([w["query.weight"], w["key.weight"], w["value.weight"]])
    return out


def state_dict_of(checkpoint: dict, source: str) -> dict:
    """The weights inside a checkpoint file under the reference's names: ours and the reference's keep them
    under `model`, DeepSpeed runs under `module`, others store the bare dict. Wrapper prefixes are removed
    and Hugging Face names (videomae.*) converted."""
    for key in ("model", "module", "model_state", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        sys.exit(f"{source}: expected a state dict of tensors (optionally under 'model' or 'module')")
    out = {}
    for k, v in checkpoint.items():
        for prefix in ("_orig_mod.", "module."):
            k = k.removeprefix(prefix)
        out[k] = v
    return from_hugging_face(out) if any(k.startswith("videomae.") for k in out) else out


def listed(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(model: torch.nn.Module, path: str | Path, label_map: list[int] | None = None):
    """Initialise `model` from a checkpoint file and say, in words, what did not fit.

    Takes ours, the reference's (V1 or V2, under `model`, `module` or bare, with `_orig_mod.`, `encoder.` or
    `backbone.` prefixes) and Hugging Face VideoMAE state dicts. A pretraining model takes a pretraining
    checkpoint as it is. A classifier takes a classifier's weights, or the encoder of a pretraining
    checkpoint as the reference's fine-tuning does: the decoder, mask token and the encoder's final
    LayerNorm are left out, and fc_norm and the head start fresh. A head for another class count is dropped,
    unless `label_map` picks its rows (new class i = row label_map[i], e.g. the reference's
    misc/label_710to400.json). A weight of another shape is an error naming the key and both shapes.
    Returns load_state_dict's result (missing_keys, unexpected_keys).
    """
    weights = state_dict_of(load_checkpoint(path), str(path))
    classifier = isinstance(model, vmae.VideoClassifier)
    if classifier:
        weights = {k.removeprefix("backbone.").removeprefix("encoder."): v for k, v in weights.items()}
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in weights and label_map is not None:
            if max(label_map) >= len(weights[key]):
                sys.exit(f"{path}: label_map row {max(label_map)} is past the end of its {len(weights[key])}-class head")
            weights[key] = weights[key][label_map]
        if key in weights and key in own and weights[key].shape != own[key].shape:
            print(f"{path}: dropping {key} {tuple(weights.pop(key).shape)}, a head for another class count "
                  f"(the model's is {tuple(own[key].shape)})")
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in weights.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        sys.exit(f"{path}: weights of a different shape (a checkpoint of another model size or input?):\n  "
                 + "\n  ".join(wrong))
    result = model.load_state_dict(weights, strict=False)
    fresh = [k for k in result.missing_keys if k.startswith(("fc_norm.", "head."))]
    missing = [k for k in result.missing_keys if k not in fresh]
    left_out = [k for k in result.unexpected_keys
                if classifier and k.startswith(("decoder.", "encoder_to_decoder.", "mask_token", "norm."))]
    unused = [k for k in result.unexpected_keys if k not in left_out]
    print(f"loaded {len(own) - len(result.missing_keys)} of the model's {len(own)} tensors from {path}")
    if left_out:
        print(f"  left out, as the reference's fine-tuning does: the pretraining decoder, mask token and final "
              f"encoder norm ({len(left_out)} tensors)")
    if fresh:
        print(f"  starting fresh (the file has none for this model): {listed(fresh)}")
    if "fc_norm.weight" in fresh and "head.weight" in weights:
        print("  WARNING: the file has a head but no fc_norm, so its head was trained on other features "
              "(a Hugging Face model with use_mean_pooling=False classifies token 0)")
    if missing:
        print(f"  WARNING: {len(missing)} weights of the model are not in the file and keep their random init: "
              f"{listed(missing)}")
    if unused:
        print(f"  WARNING: {len(unused)} tensors of the file fit nothing in the model: {listed(unused)}")
    return result


# -----------------------------------------------------------------------------------------------------
# Command line (shared)


def add_shared_flags(p: argparse.ArgumentParser) -> None:
    """The flags both recipes take with the same meaning: the clip's shape, the data on disk, the run and
    the machine. Each recipe adds its own (model, schedule, masks or classes, output_dir) around these."""
    a = p.add_argument
    a("--num_frames", type=int, default=16)
    a("--sampling_rate", type=int, default=4, help="take every n-th frame")
    a("--input_size", type=int, default=224)
    a("--tubelet_size", type=int, default=2)
    a("--data_root", default="", help="prefix for relative paths in --data_path's lists")
    a("--fname_tmpl", default="img_{:05}.jpg", help="file names of extracted frames")
    a("--skip_bad_videos", action="store_true", help="skip unreadable videos (logged and counted) instead of stopping")
    a("--max_bad_fraction", type=float, default=0.01, help="with --skip_bad_videos, stop once more than this share "
      "of the dataset was unreadable")
    a("--auto_resume", action=argparse.BooleanOptionalAction, default=True)
    a("--log_every", type=int, default=20, help="optimizer steps between loss read-outs (each is a host sync)")
    a("--num_workers", type=int, default=10)
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPUs that have it, else fp32")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--with_checkpoint", action="store_true", help="activation checkpointing per block (less memory, ~30%% slower)")
    a("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (launch with torchrun)")


def check_shared_flags(parser: argparse.ArgumentParser, args, at_least_one: tuple[str, ...]) -> None:
    """Errors naming the flag for the shared flags, and for the recipe's counts that must be at least 1."""
    for name in ("accum_iter", "num_sample", "log_every", *at_least_one):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.max_bad_fraction <= 1:
        parser.error(f"--max_bad_fraction must be in [0, 1], got {args.max_bad_fraction}")
    if args.data_path is not None and not Path(args.data_path).exists():
        parser.error(f"--data_path {args.data_path}: no such file or folder")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        parser.error("--fsdp needs a process group: launch with torchrun (e.g. torchrun --nproc_per_node=8 ...)")


def set_demo_defaults(parser: argparse.ArgumentParser, argv, demo: dict) -> argparse.Namespace:
    """Without --data_path the demo's values replace the parser's defaults; flags given explicitly still win.
    Returns a first parse of argv, for defaults that depend on other flags."""
    known = parser.parse_known_args(argv)[0]
    if known.data_path is None:
        parser.set_defaults(**demo)
    return known


# -----------------------------------------------------------------------------------------------------
# The training loop (shared)


def prepare_training(model, d: Dist, args, precision: str, layer_decay: float | None = None):
    """Wrap the model for the processes (DDP, or FSDP with --fsdp), compile it if asked, and build AdamW and
    the fp16 loss scaler; returns (model, optimizer, scaler). The optimizer comes last: FSDP replaces the
    parameters with sharded ones, and those are the ones it must hold."""
    model = wrap_model(model, d, args.fsdp, precision)
    raw_model = model.module if isinstance(model, DDP) else model
    if args.compile:
        raw_model.compile()
    groups = param_groups(raw_model, args.weight_decay, layer_decay=layer_decay)
    optimizer = make_optimizer(groups, args.lr, args.opt_betas, args.opt_eps, d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=precision == "fp16")
    return model, optimizer, scaler


def resume_training(model, optimizer, scaler, args, out: Path, log) -> dict | None:
    """Continue from --resume, or else from output_dir/checkpoint-last.pth (with --auto_resume): weights,
    optimizer and scaler restored. Returns the checkpoint, or None when the run starts fresh."""
    last = out / "checkpoint-last.pth"
    path = args.resume or (last if args.auto_resume and last.exists() else None)
    if path is None:
        return None
    state = load_checkpoint(path)
    restore_training_state(model, optimizer, scaler, state)
    log(f"resumed from {path}: epoch {state['epoch']} done, continuing at epoch {state['epoch'] + 1}")
    return state


def train_loader(dataset, args, d: Dist):
    """(sampler, loader, optimizer steps per epoch): each process takes its own shuffled share of the
    dataset, whole batches only."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=d.world_size, rank=d.rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=d.device.type == "cuda")
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        sys.exit(f"--batch_size {args.batch_size} x --accum_iter {args.accum_iter} x {d.world_size} processes is more "
                 f"than the {len(dataset)} videos of the dataset: not one step per epoch")
    return sampler, loader, steps_per_epoch


def train_epoch(model, optimizer, scaler, loader, sampler, loss_of, epoch: int, steps_per_epoch: int, lr_schedule,
                wd_schedule, clips_per_step: int, args, d: Dist, precision: str, out: Path) -> tuple[float, int, float]:
    """One epoch of optimizer steps, the same in both recipes; loss_of(batch) is the recipe: the loss of one
    micro-batch from the loader, computed here under autocast. Each step accumulates --accum_iter micro-batches
    (DDP syncs gradients on the last only), unscales and clips gradients if asked, and steps AdamW at that
    step's learning rate and weight decay. Losses are summed on the device and read every --log_every steps
    (each read is a host sync). Returns (mean loss over all processes, steps done so far, seconds)."""
    seed_everything(args.seed + (epoch + 1) * d.world_size + d.rank)  # augmentations and masks, per epoch
    sampler.set_epoch(epoch)
    model.train()
    loss_sum = torch.zeros((), device=d.device)
    first_bad = torch.full((), -1, device=d.device, dtype=torch.long)  # first step with a non-finite loss
    start = time.time()
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", disable=not d.is_main, dynamic_ncols=True)
    batches = iter(loader)
    for i in range(steps_per_epoch):
        step = epoch * steps_per_epoch + i
        set_schedules(optimizer, lr_schedule[step], wd_schedule[step])
        for micro in range(args.accum_iter):
            batch = next(batches)
            grad_sync(model, micro == args.accum_iter - 1)
            with autocast(d.device, precision):
                loss = loss_of(batch)
            scaler.scale(loss / args.accum_iter).backward()
            loss = loss.detach()
            loss_sum += loss
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        if args.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if (i + 1) % args.log_every == 0 or i + 1 == steps_per_epoch:
            check_finite(first_bad, lr_schedule, out)
            bar.set_postfix(loss=f"{loss_sum.item() / ((i + 1) * args.accum_iter):.4f}", lr=f"{lr_schedule[step]:.2e}",
                            clips_s=f"{(i + 1) * clips_per_step / (time.time() - start):.1f}")
        bar.update(1)
    bar.close()
    del batches  # let this epoch's workers exit
    seconds = time.time() - start
    if d.world_size > 1:
        dist.all_reduce(loss_sum)
    return loss_sum.item() / (steps_per_epoch * args.accum_iter * d.world_size), step + 1, seconds


def check_finite(first_bad: torch.Tensor, lr_schedule, out: Path) -> None:
    bad = int(first_bad)
    if bad >= 0:
        sys.exit(f"loss became non-finite at optimizer step {bad} (lr {lr_schedule[bad]:.3g}); stopping without "
                 f"saving. The last good checkpoint is {out / 'checkpoint-last.pth'} (if an epoch finished). "
                 "Try --precision bf16 or fp32, a lower --lr, or --clip_grad.")


# -----------------------------------------------------------------------------------------------------
# Pretraining


def draw_masks(batch_size: int, grid, args, device) -> tuple:
    """Encoder and decoder masks for a batch, made on the device, and their per-clip token counts."""
    makers = {"tube": masking.tube_mask, "random": masking.random_mask, "run_cell": masking.running_cell_mask}
    n = grid[0] * grid[1] * grid[2]
    enc = makers[args.mask_type](batch_size, grid, args.mask_ratio, device=device)
    num_visible = n - masking.num_hidden(args.mask_type, grid, args.mask_ratio)
    if args.decoder_mask_ratio == 0:  # VideoMAE V1: predict every encoder-hidden cube
        return enc, None, num_visible, n - num_visible
    dec = makers[args.decoder_mask_type](batch_size, grid, args.decoder_mask_ratio, device=device)
    return enc, dec, num_visible, n - masking.num_hidden(args.decoder_mask_type, grid, args.decoder_mask_ratio)


def pretrain_step_loss(model: torch.nn.Module, cfg: vmae.VideoMAEConfig, video: torch.Tensor, args) -> torch.Tensor:
    """Masks, forward, target and loss for one batch of clips (B, 3, T, H, W)."""
    enc, dec, num_visible, num_queries = draw_masks(video.shape[0], cfg.grid, args, video.device)
    pred = model(video, enc, dec, num_visible=num_visible, num_queries=num_queries)  # (B, N_q, 3·t·p²)
    queries = vmae.query_indices(enc, dec, num_queries)  # the target only where the decoder predicts
    target = vmae.reconstruction_target(video, cfg.patch_size, cfg.tubelet_size, args.normalize_target, queries)
    return vmae.pretrain_loss(pred, target, enc, dec)


# The demo that `python train_pretrain.py` runs when no --data_path is given; explicit flags still win.
# The laptop size at 32 px (a 4 x 4 x 4 grid of 64 cubes), so that the fine-tuning demo can then learn the
# clips' labels in minutes. The encoder sees 25 % of the cubes, not 10 %: 90 % of a 4 x 4 frame would
# leave it two. It predicts raw pixels: with per-cube normalised targets (the reference's, the default for
# real data) the loss on these textured clips stays near 1 for far longer than a laptop demo lasts, while
# raw pixels show learning within minutes, and their reconstructions need no true cube statistics to be drawn.
DEMO = dict(model="demo", input_size=32, num_frames=8, mask_ratio=0.75, batch_size=16, epochs=20, warmup_epochs=2,
            lr=0.03, num_sample=1, num_workers=2, save_ckpt_freq=10, normalize_target=False)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="VideoMAE V2 pretraining", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="base", help="small, base, large, huge, giant, demo (the laptop size), or a reference name "
      "(pretrain_videomae_base_patch16_224, ...)")
    a("--batch_size", type=int, default=32, help="clips per process per micro-step (before --num_sample)")
    a("--accum_iter", type=int, default=1, help="micro-steps accumulated per optimizer step")
    a("--epochs", type=int, default=200)
    a("--warmup_epochs", type=int, default=20)
    a("--warmup_steps", type=int, default=-1, help="if > 0, overrides --warmup_epochs")
    a("--lr", type=float, default=1e-3, help="base learning rate per 256 clips")
    a("--min_lr", type=float, default=1e-5, help="base LR the cosine decays towards (scaled like --lr)")
    a("--weight_decay", type=float, default=0.05)
    a("--weight_decay_end", type=float, default=None, help="cosine weight-decay schedule end (default: constant)")
    a("--opt_betas", type=float, nargs=2, default=[0.9, 0.95])
    a("--opt_eps", type=float, default=1e-8)
    a("--clip_grad", type=float, default=None, help="max gradient norm (the giant recipe uses 0.02)")
    a("--mask_type", default="tube", choices=["tube", "random"], help="encoder mask")
    a("--mask_ratio", type=float, default=0.9, help="share of tokens hidden from the encoder")
    a("--decoder_mask_type", default="run_cell", choices=["run_cell", "random"])
    a("--decoder_mask_ratio", type=float, default=0.5, help="share of tokens dropped from the decoder; 0 = VideoMAE V1")
    a("--decoder_depth", type=int, default=4)
    a("--num_sample", type=int, default=4, help="augmented clips per decoded video (repeated augmentation)")
    a("--drop_path", type=float, default=0.0)
    a("--normalize_target", "--normlize_target", action=argparse.BooleanOptionalAction, default=True,
      help="predict per-cube normalised pixels")
    a("--data_path", default=None, help="list file (path start_idx total_frames, or one path per line) or a "
      "folder of videos; omitted: the built-in synthetic clips")
    a("--synthetic_size", type=int, default=1024, help="videos in the built-in dataset (used when no --data_path)")
    a("--output_dir", default="output/pretrain")
    a("--resume", default=None, help="checkpoint to resume from (default: the newest in --output_dir)")
    a("--finetune", default=None, help="initialise the weights from this checkpoint (progressive training)")
    a("--save_ckpt_freq", type=int, default=50, help="keep checkpoint-<epoch>.pth every n epochs")
    add_shared_flags(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = get_args_parser()
    set_demo_defaults(parser, argv, DEMO)
    args = parser.parse_args(argv)
    args.cfg = model_config(parser, args, decoder_depth=args.decoder_depth)
    if not 0 < args.mask_ratio < 1:
        parser.error(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if not 0 <= args.decoder_mask_ratio < 1:
        parser.error(f"--decoder_mask_ratio must be in [0, 1) (0 turns decoder masking off), got {args.decoder_mask_ratio}")
    try:
        draw_masks(1, args.cfg.grid, args, "cpu")
    except ValueError as e:
        parser.error(f"--decoder_mask_ratio/--input_size: {e}")
    check_shared_flags(parser, args, ("batch_size", "epochs", "save_ckpt_freq"))
    return args


# config field -> the flag that sets it, so a bad value is reported under the name the user typed
FLAGS = dict(img_size="--input_size", num_frames="--num_frames", tubelet_size="--tubelet_size",
             decoder_depth="--decoder_depth", drop_path_rate="--drop_path")


def model_config(parser: argparse.ArgumentParser, args, **fields) -> vmae.VideoMAEConfig:
    """The --model preset with the size flags applied (train_finetune.py passes its own extra fields)."""
    if vmae.ALIASES.get(args.model, args.model) not in vmae.SIZES:
        parser.error(f"--model {args.model}: expected one of {', '.join(vmae.SIZES)} or a reference name "
                     "such as pretrain_videomae_base_patch16_224")
    try:
        return vmae.config(args.model, img_size=args.input_size, num_frames=args.num_frames,
                           tubelet_size=args.tubelet_size, drop_path_rate=args.drop_path,
                           with_checkpoint=args.with_checkpoint, **fields)
    except ValueError as e:
        message = str(e)
        for field, flag in FLAGS.items():
            message = message.replace(field, flag)
        parser.error(message)


def main(argv=None):
    args = parse_args(argv)
    cfg = args.cfg
    d = setup_distributed(args.device)
    device = d.device
    precision = resolve_precision(args.precision, device)
    out = Path(args.output_dir)
    log = print if d.is_main else (lambda *a, **k: None)
    seed_everything(args.seed)  # the same initial weights on every process

    dataset = data.build_pretrain_dataset(
        args.data_path, args.data_root, num_frames=args.num_frames, sampling_rate=args.sampling_rate,
        input_size=args.input_size, num_sample=args.num_sample, fname_tmpl=args.fname_tmpl,
        skip_bad_videos=args.skip_bad_videos, max_bad_fraction=args.max_bad_fraction,
        synthetic_videos=args.synthetic_size)
    sampler, loader, steps_per_epoch = train_loader(dataset, args, d)

    model = vmae.PretrainVideoMAE(cfg).to(device)
    if args.finetune:
        load_weights(model, args.finetune)
    n_params = sum(p.numel() for p in model.parameters())
    model, optimizer, scaler = prepare_training(model, d, args, precision)

    scale = args.batch_size * args.accum_iter * d.world_size / 256
    lr_schedule = cosine_schedule(args.lr * scale, args.min_lr * scale, args.epochs, steps_per_epoch,
                                  args.warmup_epochs, warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = cosine_schedule(args.weight_decay, wd_end, args.epochs, steps_per_epoch)

    state = resume_training(model, optimizer, scaler, args, out, log)
    start_epoch = 0 if state is None else state["epoch"] + 1

    enc, dec, num_visible, num_queries = draw_masks(1, cfg.grid, args, "cpu")
    loss_tokens = int((enc & ~dec).sum()) if dec is not None else num_queries
    clips_per_step = args.batch_size * args.num_sample * args.accum_iter * d.world_size
    log(f"model {args.model}: {n_params / 1e6:.1f}M parameters, {cfg.num_frames}x{cfg.img_size}, grid {cfg.grid} = "
        f"{cfg.num_tokens} tokens | {device}, {precision}, {d.world_size} process(es)"
        + (", FSDP" if args.fsdp else "") + (", compiled" if args.compile else ""))
    log(f"data: {'built-in synthetic clips' if args.data_path is None else args.data_path} ({len(dataset)} videos)")
    log(f"target: {'per-cube normalised pixels' if args.normalize_target else 'raw pixels'}; masks per clip: "
        f"encoder sees {num_visible} ({args.mask_type} {args.mask_ratio}), decoder predicts "
        f"{num_queries}" + (f" ({args.decoder_mask_type} {args.decoder_mask_ratio})" if dec is not None else " (V1)")
        + f", loss on {loss_tokens}")
    log(f"effective batch {args.batch_size * args.accum_iter * d.world_size} videos = {args.batch_size} x accum "
        f"{args.accum_iter} x {d.world_size} process(es); x num_sample {args.num_sample} = {clips_per_step} clips per step")
    log(f"lr {args.lr:g} x {args.batch_size * args.accum_iter * d.world_size} / 256 = {args.lr * scale:.3g} (min "
        f"{args.min_lr * scale:.3g}), warmup {int(np.argmax(lr_schedule)) + 1 if args.warmup_epochs or args.warmup_steps > 0 else 0}"
        f" steps; {steps_per_epoch} steps per epoch, {args.epochs} epochs ({args.epochs * args.num_sample} effective)")

    def loss_of(clips):  # (B, num_sample, 3, T, H, W) normalised clips, num_sample augmentations each
        return pretrain_step_loss(model, cfg, clips.to(device, non_blocking=True).flatten(0, 1), args)

    for epoch in range(start_epoch, args.epochs):
        loss, steps, seconds = train_epoch(model, optimizer, scaler, loader, sampler, loss_of, epoch, steps_per_epoch,
                                           lr_schedule, wd_schedule, clips_per_step, args, d, precision, out)
        stats = dict(epoch=epoch, train_loss=loss, train_lr=float(lr_schedule[steps - 1]),
                     train_wd=float(wd_schedule[steps - 1]), steps=steps,
                     epoch_time_s=round(seconds, 1), clips_per_s=round(steps_per_epoch * clips_per_step / seconds, 2),
                     skipped_videos=len(dataset.bad_videos()))
        state = training_state(model, optimizer, scaler, epoch, steps, args)
        if d.is_main:
            save_checkpoint(out / "checkpoint-last.pth", state)
            if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
                save_checkpoint(out / f"checkpoint-{epoch}.pth", state)
            with open(out / "log.txt", "a") as f:
                f.write(json.dumps(stats) + "\n")
            log(f"epoch {epoch}: loss {stats['train_loss']:.4f}, {stats['clips_per_s']} clips/s, {seconds:.0f} s")
    if d.is_main and args.epochs > start_epoch:
        final_figures(state["model"], args, out)
    # Free DDP's reducer while the process group is still registered: if the reducer held the group's last
    # reference, its destructor would join gloo's worker threads while holding the GIL, which can deadlock
    # at exit (pytorch/pytorch#75097).
    del model, optimizer
    leave_process_group()


def leave_process_group() -> None:
    """End of a run: wait until every process is done (rank 0 may still be writing figures), then take
    the process group down, so no process exits while a peer still talks to it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def final_figures(weights: dict, args, out: Path) -> None:
    """The loss curve and a reconstruction of a held-out built-in clip, next to the checkpoints. Drawn on
    the CPU from the gathered weights, so it works the same after DDP, FSDP or torch.compile."""
    import visualize
    visualize.save(visualize.curves_figure([out / "log.txt"]), out / "loss.png")
    model = vmae.PretrainVideoMAE(args.cfg)
    model.load_state_dict(weights)
    clip = visualize.held_out_clip(args.cfg, args.sampling_rate, args.synthetic_size)
    enc, dec, _, _ = draw_masks(1, args.cfg.grid, args, "cpu")
    figure = visualize.recon_figure(model, clip, enc[0], None if dec is None else dec[0], args.normalize_target)
    visualize.save(figure, out / "recon.png", dpi=72)
    print(f"figures: {out / 'loss.png'}, {out / 'recon.png'}")


if __name__ == "__main__":
    main()
