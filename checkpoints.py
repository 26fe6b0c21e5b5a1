"""Checkpoint files in and out: every published layout of VideoMAE weights (LAYOUTS) read under vmae.py's names, the
reference's. `read_checkpoint` reads any of them (a file or a Hugging Face folder) and the model's size the file says;
`config_from_checkpoint` makes that a config; `load_weights` loads it under one policy: all of the encoder, finite, or
an error naming the file. `to_hugging_face` and `hugging_face_config` write transformers' layout (export_hf.py).
"""
import argparse
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

import vmae


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


# The five layouts public VideoMAE weights come in, with the words messages use for them:
#   vmae       {"model": weights, "args": {the run's flags}}, as train_*.py write them
#   reference  weights under "model", "module" (DeepSpeed) or bare, `args` a Namespace, `_orig_mod.` if compiled
#   hf_v1      transformers' VideoMAE* (MCG-NJU/videomae-*): videomae.* names, query/key/value apart
#   hf_v2      OpenGVLab/VideoMAEv2-* folders: the reference's encoder and fc_norm under `model.`; no head, no decoder
#   mmaction2  mmengine files {"state_dict", "meta"}: `backbone.` and mmcv's module names, cls_head.fc_cls
LAYOUTS = {"vmae": "vmae's", "reference": "the reference's", "hf_v1": "Hugging Face V1 (transformers)",
           "hf_v2": "Hugging Face V2 release", "mmaction2": "mmaction2's"}


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file as a dict: torch.load, weights_only=True (a file cannot run code), or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        with torch.serialization.safe_globals([argparse.Namespace]):  # the reference keeps its args as one
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, needs unsafe unpickling, or no safetensors package
        raise CheckpointError(f"checkpoint {path}: cannot be read as a weights-only checkpoint "
                              f"({type(e).__name__}: {e})") from e


def saved_args(checkpoint: dict) -> dict:
    """The training arguments a checkpoint stores under `args` (ours a dict, the reference's a Namespace), or {}."""
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    return args if isinstance(args, dict) else {}


def trained_on_normalized_targets(args: dict) -> bool:
    """Whether a run predicted per-cube normalised pixels (the reference spells it normlize_target; unsaid: True)."""
    return bool(args.get("normalize_target", args.get("normlize_target", True)))


def encoder_weights(weights: dict) -> dict:
    """The weights without an mmaction2 `backbone.` or a pretraining `encoder.` prefix: as a classifier names them."""
    return {k.removeprefix("backbone.").removeprefix("encoder."): v for k, v in weights.items()}


# Hugging Face VideoMAE names -> the reference's, replaced in this order in every key. Older transformers
# releases store q_bias / v_bias, newer ones query.bias / value.bias; the key has no bias.
HF_NAMES = [("videomae.embeddings.patch_embeddings.projection.", "encoder.patch_embed.proj."),
            ("videomae.encoder.layer.", "encoder.blocks."), ("videomae.layernorm.", "encoder.norm."),
            ("decoder.decoder_layers.", "decoder.blocks."), ("classifier.", "head."),
            ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
            ("attention.attention.q_bias", "attn.q_bias"), ("attention.attention.query.bias", "attn.q_bias"),
            ("attention.attention.v_bias", "attn.v_bias"), ("attention.attention.value.bias", "attn.v_bias"),
            ("attention.output.dense.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."),
            ("output.dense.", "mlp.fc2.")]
# Their config.json's names for our config fields (intermediate_size is embed_dim · mlp_ratio).
HF_CONFIG_NAMES = dict(image_size="img_size", patch_size="patch_size", num_frames="num_frames",
                       tubelet_size="tubelet_size", hidden_size="embed_dim", num_hidden_layers="depth",
                       num_attention_heads="num_heads", decoder_hidden_size="decoder_embed_dim",
                       decoder_num_hidden_layers="decoder_depth", decoder_num_attention_heads="decoder_num_heads")


def from_hugging_face(weights: dict) -> dict:
    """A transformers VideoMAE* state dict under the reference's names (encoder.*), query, key and value stacked into
    qkv. A key bias (some transformers 5 files) is dropped: q·b is the same for every key, so softmax takes it out."""
    out, qkv = {}, {}
    for key, value in weights.items():
        if key.startswith(("embeddings.", "encoder.layer.", "layernorm.")):  # VideoMAEModel saved on its own
            key = "videomae." + key
        for old, new in HF_NAMES:
            key = key.replace(old, new)
        block, found, part = key.rpartition(".attention.attention.")
        if found and part in ("query.weight", "key.weight", "value.weight"):
            qkv.setdefault(block, {})[part] = value
        elif not (found and part == "key.bias"):
            out[key] = value
    for block, w in qkv.items():  # (3C, C): the q rows, then k, then v, the order Attention splits them in
        out[f"{block}.attn.qkv.weight"] = torch.cat([w["query.weight"], w["key.weight"], w["value.weight"]])
    return out


# What to_hugging_face writes: HF_NAMES backwards, with the older bias spelling (q_bias, v_bias), which
# transformers 4 reads as it is and transformers 5 renames to query.bias / value.bias as it loads.
HF_WRITTEN = [(ours, hf) for hf, ours in reversed(HF_NAMES)
              if hf not in ("attention.attention.query.bias", "attention.attention.value.bias", "classifier.")]


def to_hugging_face(weights: dict) -> dict:
    """The inverse of from_hugging_face: a pretraining model's or classifier's state dict under transformers' names."""
    out = {}
    for key, value in weights.items():
        if key.startswith(("patch_embed.", "blocks.")):  # a classifier's encoder, named as in pretraining
            key = "encoder." + key
        if key.startswith("head."):  # only the classifier's: the decoder's head keeps its name
            key = "classifier." + key.removeprefix("head.")
        block, found, _ = key.rpartition(".attn.qkv.weight")
        parts = zip(("query", "key", "value"), value.chunk(3)) if found else [(None, value)]
        for name, tensor in parts:
            new = f"{block}.attention.attention.{name}.weight" if name else key
            for ours, hf in HF_WRITTEN:
                new = new.replace(ours, hf)
            out[new] = tensor.clone().contiguous()  # copies, as safetensors wants them
    return out


def hugging_face_config(cfg: vmae.VideoMAEConfig, architecture: str, num_labels: int | None = None,
                        use_mean_pooling: bool = True, norm_pix_loss: bool = True) -> dict:
    """The config.json of a transformers VideoMAE folder for `cfg` (architecture: VideoMAEModel, ...)."""
    hf = {theirs: getattr(cfg, ours) for theirs, ours in HF_CONFIG_NAMES.items()}
    hf.update(model_type="videomae", architectures=[architecture], num_channels=3, hidden_act="gelu",
              intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),  # giant: 48/11 · 1408 = 6144 (decoder 2234)
              decoder_intermediate_size=int(cfg.decoder_embed_dim * cfg.mlp_ratio), layer_norm_eps=1e-6,
              qkv_bias=True, use_mean_pooling=use_mean_pooling, norm_pix_loss=norm_pix_loss,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if num_labels is not None:
        hf.update(id2label={str(i): f"LABEL_{i}" for i in range(num_labels)},
                  label2id={f"LABEL_{i}": i for i in range(num_labels)})
    return hf


# mmaction2's names -> the reference's (mmaction/models/backbones/vit_mae.py): mmcv's PatchEmbed calls its Conv3d
# `projection`, mmcv's FFN keeps fc1 in a Sequential with the activation (layers.0.0) and fc2 after it (layers.1).
MMACTION2_NAMES = [("patch_embed.projection.", "patch_embed.proj."), ("mlp.layers.0.0.", "mlp.fc1."),
                   ("mlp.layers.1.", "mlp.fc2."), ("cls_head.fc_cls.", "head.")]


def from_mmaction2(weights: dict) -> dict:
    """An mmaction2 VideoMAE / V2 state dict under the reference's names, without its position table."""
    out = {}
    for key, value in weights.items():
        key = key.removeprefix("backbone.")
        for old, new in MMACTION2_NAMES:
            key = key.replace(old, new)
        if key != "pos_embed":  # a fixed sin/cos buffer; ours is built for the model's grid
            out[key] = value
    return out


def unwrap(checkpoint: dict) -> dict:
    """The state dict in a checkpoint (model, module, model_state, state_dict or bare), less compile/DDP prefixes."""
    inner = next((checkpoint[k] for k in ("model", "module", "model_state", "state_dict")
                  if isinstance(checkpoint.get(k), dict)), checkpoint)
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in inner.items()}


def layout_of(checkpoint: dict) -> str:
    """Which of the five LAYOUTS a checkpoint's contents are in."""
    if isinstance(checkpoint.get("state_dict"), dict) and "meta" in checkpoint:
        return "mmaction2"
    keys = unwrap(checkpoint)
    if any(k.startswith(("videomae.", "embeddings.patch_embeddings.")) for k in keys):
        return "hf_v1"
    if any(k.startswith("model.patch_embed.") for k in keys):
        return "hf_v2"
    return "vmae" if isinstance(checkpoint.get("args"), dict) else "reference"


def state_dict_of(checkpoint: dict, source: str) -> dict:
    """The weights inside a checkpoint's contents, in any of the five layouts, under the reference's names."""
    weights = unwrap(checkpoint)
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{source}: expected a state dict of tensors (optionally under 'model', 'module' or "
                              "'state_dict')")
    convert = {"hf_v1": from_hugging_face, "mmaction2": from_mmaction2,
               "hf_v2": lambda w: {k.removeprefix("model."): v for k, v in w.items()}}.get(layout_of(checkpoint))
    return convert(weights) if convert else weights


def has_decoder(weights: dict) -> bool:
    return "mask_token" in weights and any(k.startswith("decoder.") for k in weights)


# -----------------------------------------------------------------------------------------------------
# The model a file holds: its size read off the file

MODEL_FIELDS = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio", "decoder_embed_dim",
                "decoder_num_heads")  # what --model (an entry of the size table) decides
DECODER_FIELDS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
ARG_FIELDS = dict(input_size="img_size", num_frames="num_frames", tubelet_size="tubelet_size",
                  decoder_depth="decoder_depth")  # stored training arguments -> config fields


def mlp_ratio_for(hidden: int, dim: int) -> float:
    """A ratio r with int(dim · r) == hidden, which is how Block sizes its MLP (hidden / dim can round down)."""
    r = hidden / dim
    while int(dim * r) < hidden:
        r = math.nextafter(r, math.inf)
    return r


def blocks_in(weights: dict, prefix: str) -> int:
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in weights if k.startswith(prefix)), default=-1)


def sizes_of(weights: dict) -> dict:
    """The config fields the weights' shapes give away: widths, depths, cube size, MLP ratio (not heads or input)."""
    enc = encoder_weights(weights)
    embed = enc.get("patch_embed.proj.weight")  # (D, 3, t, p, p)
    if embed is None or embed.dim() != 5:
        return {}
    dim, _, t, p, _ = embed.shape
    sizes = dict(embed_dim=dim, tubelet_size=t, patch_size=p, depth=blocks_in(enc, "blocks."))
    if "blocks.0.mlp.fc1.weight" in enc:
        sizes["mlp_ratio"] = mlp_ratio_for(enc["blocks.0.mlp.fc1.weight"].shape[0], dim)
    if has_decoder(weights):
        sizes.update(decoder_embed_dim=weights["mask_token"].shape[-1],
                     decoder_depth=blocks_in(weights, "decoder.blocks."))
    return sizes


def table_heads(sizes: dict) -> dict:
    """Head counts for widths the size table has (none for another width: then the file or --model must say)."""
    return {f"{part}num_heads": spec[f"{part}num_heads"] for spec in vmae.SIZES.values() for part in ("", "decoder_")
            if sizes.get(f"{part}embed_dim") == spec[f"{part}embed_dim"]}


def hf_config_sizes(hf: dict) -> dict:
    """The config fields of a config.json: a V2 release's `model_config` or transformers' VideoMAEConfig."""
    if isinstance(hf.get("model_config"), dict):
        return {k: v for k, v in hf["model_config"].items() if k in ("img_size", "patch_size", "num_frames",
                "tubelet_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
    if hf.get("model_type") != "videomae":
        return {}
    sizes = {ours: hf[theirs] for theirs, ours in HF_CONFIG_NAMES.items() if theirs in hf}
    if isinstance(sizes.get("img_size"), (list, tuple)):
        sizes["img_size"] = sizes["img_size"][0]
    if "intermediate_size" in hf and "hidden_size" in hf:
        sizes["mlp_ratio"] = mlp_ratio_for(hf["intermediate_size"], hf["hidden_size"])
    return sizes


def differences(cfg: vmae.VideoMAEConfig, sizes: dict) -> list[tuple[str, int, int]]:
    """Where a config and a file's sizes disagree on what --model decides: (field, config's, file's)."""
    out = []
    for field in [f for f in MODEL_FIELDS if f in sizes]:
        ours, theirs = getattr(cfg, field), sizes[field]
        if field == "mlp_ratio":  # compared as MLP widths, which is what the weights have
            field, ours, theirs = ("MLP width", int(cfg.embed_dim * ours),
                                   int(sizes.get("embed_dim", cfg.embed_dim) * theirs))
        if ours != theirs:
            out.append((field, ours, theirs))
    return out


@dataclass
class Checkpoint:
    """A checkpoint read for loading: weights under the reference's names, and the config fields it states."""
    path: str
    layout: str
    weights: dict
    args: dict
    sizes: dict
    source: str  # "its stored arguments", "its config.json" or "its weight shapes"
    preset: str | None  # the entry of the size table it matches, if any


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint in any of the LAYOUTS (a file or a Hugging Face folder) at the size the file says: widths, depths,
    cube size, MLP ratio from the weights' shapes; heads and input from its arguments, config.json or the size table."""
    path = file = Path(path)
    if path.is_dir():
        file = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if file is None:
            raise CheckpointError(f"{path}: a folder without model.safetensors or pytorch_model.bin (a Hugging Face "
                                  "model folder has one of them next to its config.json)")
    contents = load_checkpoint(file)
    layout, weights, args = layout_of(contents), state_dict_of(contents, str(path)), saved_args(contents)
    hf, info = {}, file.parent / "config.json"
    if layout in ("hf_v1", "hf_v2") and info.is_file():
        try:
            hf = hf_config_sizes(json.loads(info.read_text()))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{info}: cannot be read as JSON ({e})") from e
    name = vmae.ALIASES.get(args.get("model"), args.get("model")) if isinstance(args.get("model"), str) else None
    stated = dict(vmae.SIZES[name]) if name in vmae.SIZES else {}  # the stored arguments' --model and input flags
    stated.update({field: args[flag] for flag, field in ARG_FIELDS.items() if isinstance(args.get(flag), int)})
    measured = sizes_of(weights)
    if "embed_dim" in stated and differences(vmae.config("base", **stated), measured):
        stated = {}  # arguments that do not describe the weights beside them: the weights are what loads
    sizes = {**table_heads(measured), **hf, **stated, **measured}  # later ones win: the shapes above all
    if not has_decoder(weights):  # a config.json lists decoder sizes even for a classifier
        sizes = {k: v for k, v in sizes.items() if k not in DECODER_FIELDS}
    source = "its stored arguments" if stated else "its config.json" if hf else "its weight shapes"
    matching = [n for n in vmae.SIZES if not differences(vmae.config(n), sizes)] if sizes else []
    preset = name if name in vmae.SIZES and stated else matching[0] if matching else None
    return Checkpoint(str(path), layout, weights, args, sizes, source, preset)


def config_from_checkpoint(ckpt: Checkpoint, model: str | None = None, **overrides) -> vmae.VideoMAEConfig:
    """The model a checkpoint holds: its sizes over the table entry they fit (`model` must agree), then `overrides`."""
    sizes = ckpt.sizes
    if model is None:
        needed = ["num_heads"] + (["decoder_num_heads"] if "decoder_embed_dim" in sizes else [])
        if ckpt.preset is None and (not sizes or any(f not in sizes for f in needed)):
            told = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in sizes.items())
            raise CheckpointError(f"{ckpt.path} (read as {LAYOUTS[ckpt.layout]}) does not tell the model's size "
                                  f"({told or 'no weights with known names'}; not an entry of the size table, "
                                  f"and no head count): pass --model ({', '.join(vmae.SIZES)})")
        model = ckpt.preset or "base"  # without a preset every field the table sets comes from the file
    else:
        try:
            clash = differences(vmae.config(model), sizes)
        except ValueError as e:  # an unknown name
            raise CheckpointError(f"--model: {e}") from e
        if clash:
            raise CheckpointError(f"--model {model} does not fit {ckpt.path} (read as {LAYOUTS[ckpt.layout]}): "
                                  f"--model {model} has {', '.join(f'{f} {a}' for f, a, _ in clash)}; the file has "
                                  f"{', '.join(f'{f} {b}' for f, _, b in clash)} (read from {ckpt.source}). Leave "
                                  "--model out to take the file's own size.")
    return vmae.config(model, **{**sizes, **overrides})


# -----------------------------------------------------------------------------------------------------
# Loading: all of the encoder, or stop


class Loaded(NamedTuple):
    """What load_weights did: the model's tensors that start fresh, the file's that fit nothing, and lines to print."""
    missing_keys: list[str]
    unexpected_keys: list[str]
    lines: list[str]

    def __str__(self) -> str:
        return "\n".join(self.lines)


def listed(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def compare(own: dict, weights: dict) -> tuple[list[str], list[str], list[str]]:
    """A model's state dict against a file's weights: (keys the file lacks, keys the model lacks, shape mismatches)."""
    missing, unexpected = [k for k in own if k not in weights], [k for k in weights if k not in own]
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in weights.items()
             if k in own and v.shape != own[k].shape]
    return missing, unexpected, wrong


def fingerprint(weights: dict) -> str:
    """A short hash of a state dict's names, shapes and values: the same weights give the same one anywhere."""
    digest = hashlib.sha1()
    for key in sorted(weights):
        tensor = weights[key].detach().cpu().contiguous()
        digest.update(f"{key} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def nonfinite(tree, name: str = "") -> list[str]:
    """The names of the tensors in a state dict (nested: an optimizer's too) that hold a NaN or an infinity."""
    if isinstance(tree, torch.Tensor):
        return [name] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    if isinstance(tree, dict):
        return [bad for k, v in tree.items() for bad in nonfinite(v, f"{name}.{k}" if name else str(k))]
    return []


def require_decoder(ckpt: Checkpoint) -> None:
    """Stop unless the checkpoint has a decoder (pretraining and reconstructions need one), saying what it holds."""
    if has_decoder(ckpt.weights):
        return
    where = f"{ckpt.path} (read as {LAYOUTS[ckpt.layout]})"
    if "patch_embed.proj.weight" not in encoder_weights(ckpt.weights):
        raise CheckpointError(f"{where} holds no VideoMAE weights under any name the loader knows (no encoder, no "
                              f"decoder): {listed(list(ckpt.weights)) or 'no tensors'}")
    kind = "a fine-tuned classifier (head.*, fc_norm.*)" if "head.weight" in ckpt.weights else "an encoder"
    raise CheckpointError(f"{where} holds {kind} and no decoder, and pretraining and reconstructions need one "
                          "(decoder.*, mask_token). Files with a decoder are the pretraining checkpoints: ours "
                          "(train_pretrain.py's output/pretrain/checkpoint-*.pth), the reference's (e.g. "
                          "vit_g_hybrid_pt_1200e.pth; V1's pretrain checkpoints) and Hugging Face V1's "
                          "pre-trained-only models (MCG-NJU/videomae-base, -large, ...). The Hugging Face V2 "
                          "releases, mmaction2's files and every fine-tuned or distilled file hold the encoder only: "
                          "use them with train_finetune.py --finetune or extract_features.py.")


def load_weights(model: nn.Module, source: "str | Path | Checkpoint", label_map: list[int] | None = None) -> Loaded:
    """Initialise `model` from a checkpoint (a path, or read_checkpoint's result) or raise CheckpointError: nothing of
    the encoder may stay at its random init. A pretraining model takes a pretraining checkpoint whole; a classifier, a
    classifier's weights or a pretraining checkpoint's encoder (fc_norm and head fresh), a head for another class count
    dropped unless `label_map` picks its rows (class i = row label_map[i], e.g. the reference's label_710to400.json)."""
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    path, where = ckpt.path, f"{ckpt.path} (read as {LAYOUTS[ckpt.layout]})"
    classifier, lines = isinstance(model, vmae.VideoClassifier), []
    if not classifier:
        require_decoder(ckpt)
    weights = encoder_weights(ckpt.weights) if classifier else dict(ckpt.weights)
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in weights and label_map is not None:
            if max(label_map) >= len(weights[key]):
                raise CheckpointError(f"{path}: label_map row {max(label_map)} is past the end of its "
                                      f"{len(weights[key])}-class head")
            weights[key] = weights[key][label_map]
        if key in weights and key in own and weights[key].shape != own[key].shape:
            lines.append(f"{path}: dropping {key} {tuple(weights.pop(key).shape)}, a head for another class count "
                         f"(the model's is {tuple(own[key].shape)})")
    absent, extra, wrong = compare(own, weights)
    if wrong:
        raise CheckpointError(f"{where}: weights of a different shape (a checkpoint of another model size or "
                              "input?):\n  " + "\n  ".join(wrong))
    fresh = [k for k in absent if classifier and k.startswith(("fc_norm.", "head."))]
    left_out = [k for k in extra if classifier and k.startswith(("decoder.", "encoder_to_decoder.", "mask_token",
                                                                 "norm."))]
    headless = [k for k in extra if classifier and k.startswith("head.")]  # num_classes=0
    unused = [k for k in extra if k not in left_out + headless]
    missing = [k for k in absent if k not in fresh]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} of the model's {len(own)} weights are not in the file and "
                              f"would keep their random init: {listed(missing)}. The file's tensors that fit "
                              f"nothing: {listed(unused) if unused else 'none'}")
    bad = nonfinite({k: v for k, v in weights.items() if k in own})
    if bad:
        raise CheckpointError(f"{where}: non-finite weights (NaN or infinity) in {listed(bad)}: the run that wrote "
                              "it diverged; use an earlier checkpoint of it")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    lines.insert(0, f"loaded {len(own) - len(absent)} of the model's {len(own)} tensors from {where}")
    if left_out:
        lines.append(f"  left out, as the reference's fine-tuning does: the pretraining decoder, mask token and "
                     f"final encoder norm ({len(left_out)} tensors)")
    if headless:
        lines.append("  left out: the file's head (this model has none)")
    if fresh:
        lines.append(f"  starting fresh (the file has none for this model): {listed(fresh)}")
    if "fc_norm.weight" in fresh and "head.weight" in weights:
        lines.append("  WARNING: the file has a head but no fc_norm, so its head was trained on other features "
                     "(a Hugging Face model with use_mean_pooling=False classifies token 0)")
    if unused:
        lines.append(f"  WARNING: {len(unused)} tensors of the file fit nothing in the model: {listed(unused)}")
    return Loaded(fresh, left_out + headless + unused, lines)
