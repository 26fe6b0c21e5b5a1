"""Export to Hugging Face transformers: any checkpoint the loader takes (ours, the reference's V1/V2, the Hugging
Face V2 releases, mmaction2's) becomes a folder that from_pretrained loads without trust_remote_code: the V2
encoder is the V1 architecture (dual masking changes only its pretraining), so transformers' VideoMAE classes hold it.

    python export_hf.py --checkpoint output/finetune/checkpoint-best.pth --output_dir hf/classifier
    python export_hf.py --checkpoint output/pretrain/checkpoint-last.pth --output_dir hf/pretrained
    python export_hf.py --checkpoint VideoMAEv2-Base/ --output_dir hf/videomaev2-base --as encoder

What the file holds picks the class: a decoder, VideoMAEForPreTraining; an fc_norm (a classifier, or a V2
release's encoder), VideoMAEForVideoClassification, whose logits without a head are the fc_norm-ed clip vector
(as the V2 release's own code returns); a bare encoder, or --as encoder, VideoMAEModel (its output: the tokens).

The folder must be empty or hold an earlier export (replaced); other files stop the export unless --overwrite,
which first removes every file from_pretrained would read there, so the folder never holds a mix of two models.

Two things differ on their side: transformers takes (B, T, 3, H, W) (our video.transpose(1, 2)), and its classifier's
fc_norm and decoder's last LayerNorm use eps 1e-5 whatever config.json says (ours 1e-6): outputs move by about 1e-6.
"""
import argparse
import json
from pathlib import Path

import checkpoints
import engine
import vmae


def parse_args(argv=None) -> tuple[argparse.Namespace, checkpoints.Checkpoint, vmae.VideoMAEConfig]:
    """The flags; the checkpoint, read once; the model it holds (its input size and frames unless given)."""
    p = argparse.ArgumentParser(description="write a checkpoint as a Hugging Face transformers VideoMAE folder "
                                "(--input_size, --num_frames: the checkpoint's unless given)", allow_abbrev=False)
    a, Range = p.add_argument, engine.Range  # Range: each number's valid interval, checked as it is parsed
    a("--checkpoint", required=True, help="a checkpoint file or Hugging Face folder in any layout the loader takes")
    a("--output_dir", required=True, help="the folder to write config.json and model.safetensors to")
    a("--as", dest="kind", choices=["encoder"], default=None, help="encoder: the encoder alone, as a VideoMAEModel "
      "(default: what the file holds)")
    a("--model", default=None, help="only when the file cannot tell its size (it must match it)")
    a("--overwrite", action="store_true", help="export into a folder that holds other files: the files "
      "from_pretrained would read there are removed first")
    a("--input_size", type=Range(int, 1, 4096), default=224, help="the input the exported position table is for")
    a("--num_frames", type=Range(int, 1, 1024), default=16)
    args = p.parse_args(argv)
    return args, *engine.tool_start(p, argv, args)


def export(checkpoint: checkpoints.Checkpoint, cfg: vmae.VideoMAEConfig, encoder_only: bool = False):
    """(transformers class name, config.json, weights under transformers' names, the loader's report) for a
    checkpoint. Loaded through our model first, so a file that would leave any weight untrained stops here."""
    keys = checkpoints.encoder_weights(checkpoint.weights)
    decoder, fc_norm = checkpoints.has_decoder(checkpoint.weights), "fc_norm.weight" in keys
    head = next((v for k, v in checkpoint.weights.items() if k.removeprefix("backbone.") == "head.weight"), None)
    num_labels = len(head) if head is not None and fc_norm and not encoder_only else 0
    model = vmae.PretrainVideoMAE(cfg) if decoder else vmae.VideoClassifier(cfg, num_labels)
    loaded = checkpoints.load_weights(model, checkpoint)
    weights = checkpoints.to_hugging_face(model.state_dict())
    if encoder_only or not (decoder or fc_norm):  # use_mean_pooling: a pretraining encoder's norm is not fc_norm
        name, options = "VideoMAEModel", dict(use_mean_pooling=not decoder)
        weights = {k.removeprefix("videomae."): v for k, v in weights.items() if k.startswith("videomae.")}
    elif decoder:
        norm_pix_loss = checkpoints.trained_on_normalized_targets(checkpoint.args)
        name, options = "VideoMAEForPreTraining", dict(use_mean_pooling=False, norm_pix_loss=norm_pix_loss)
    else:
        name, options = "VideoMAEForVideoClassification", dict(num_labels=num_labels)
    return name, checkpoints.hugging_face_config(cfg, name, **options), weights, loaded


EXPORTED = {"config.json", "model.safetensors"}  # what an export writes
# What transformers' from_pretrained (and its image processor) reads in a folder: weights, configs, shards.
READ_BY_HUGGING_FACE = ("config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json",
                        "*.bin", "*.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def prepare_folder(out: Path, overwrite: bool) -> None:
    """The output folder, writable and without a temporary file a killed export left; empty or holding an
    earlier export, or else, with `overwrite`, cleared of every file from_pretrained would read."""
    engine.writable_folder(out)
    engine.clear_temporaries(out)
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORTED and not p.name.startswith("."))
    if others and not overwrite:
        raise engine.RunError(f"--output_dir {out} holds other files ({', '.join(others[:6])}"
                              f"{' ...' if len(others) > 6 else ''}): from_pretrained could read a mix of two models "
                              "there. Use an empty folder, or --overwrite to remove the files it would read first")
    removed = sorted({p for pattern in READ_BY_HUGGING_FACE for p in out.glob(pattern)} - {out / n for n in EXPORTED})
    if overwrite and removed:
        for path in removed:
            path.unlink()
        print(f"--overwrite: removed {', '.join(p.name for p in removed)} from {out}")


def main(argv=None):
    args, checkpoint, cfg = parse_args(argv)
    name, hf, weights, loaded = export(checkpoint, cfg, args.kind == "encoder")
    print(loaded)
    from safetensors.torch import save_file  # a runtime requirement for .safetensors files (requirements.txt)
    out = Path(args.output_dir)
    prepare_folder(out, args.overwrite)
    engine.atomic_write(out / "model.safetensors", lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    engine.atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(hf, indent=2) + "\n"))
    print(f"wrote {out}/config.json and model.safetensors ({len(weights)} tensors, {cfg.num_frames}x{cfg.img_size}): "
          f"transformers.{name}.from_pretrained('{out}') loads it; its input is (B, T, 3, H, W)")


if __name__ == "__main__":
    engine.run(main)
