"""Export to Hugging Face transformers: any checkpoint the loader takes (ours, the reference's V1/V2, the
Hugging Face V2 releases, mmaction2's) becomes a folder that transformers loads with from_pretrained and no
trust_remote_code. The V2 encoder is the V1 architecture (dual masking changes only how it is pretrained),
so transformers' own VideoMAE classes hold it.

    python export_hf.py --checkpoint output/finetune/checkpoint-best.pth --output_dir hf/classifier
    python export_hf.py --checkpoint output/pretrain/checkpoint-last.pth --output_dir hf/pretrained
    python export_hf.py --checkpoint VideoMAEv2-Base/ --output_dir hf/videomaev2-base --as encoder

What the file holds picks the class: a decoder makes a VideoMAEForPreTraining; an fc_norm (a classifier, or
a V2 release's encoder) a VideoMAEForVideoClassification, whose logits are the fc_norm-ed clip vector when
the file has no head (what the V2 release's own code returns); a bare encoder a VideoMAEModel. --as encoder
writes the encoder alone as a VideoMAEModel (its output: the tokens). The folder holds config.json and
model.safetensors; the names are mapped by checkpoints.py:to_hugging_face.

Two things differ on their side: transformers takes (B, T, 3, H, W) (our video.transpose(1, 2)), and it
builds the classifier's fc_norm and the decoder's last LayerNorm with eps 1e-5 whatever config.json says
(ours 1e-6, as the reference), which moves their outputs by about 1e-6.
"""
import argparse
import json
from pathlib import Path

import checkpoints
import engine
import vmae


def parse_args(argv=None) -> tuple[argparse.Namespace, checkpoints.Checkpoint, vmae.VideoMAEConfig]:
    """The flags; the checkpoint, read once; the model it holds (its input size and frames unless given)."""
    p = argparse.ArgumentParser(description="write a checkpoint as a Hugging Face transformers VideoMAE folder",
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True, help="a checkpoint file or Hugging Face folder in any layout "
                   "the loader takes")
    p.add_argument("--output_dir", required=True, help="the folder to write config.json and model.safetensors to")
    p.add_argument("--as", dest="kind", choices=["encoder"], default=None,
                   help="encoder: the encoder alone, as a VideoMAEModel (default: what the file holds)")
    p.add_argument("--model", default=None, help="only when the file cannot tell its size (it must match it)")
    p.add_argument("--input_size", type=engine.Range(int, 1, 4096), default=224, help="the input the exported "
                   "position table is for (default: the checkpoint's, else this)")
    p.add_argument("--num_frames", type=engine.Range(int, 1, 1024), default=16, help="(default: the checkpoint's, "
                   "else this)")
    args = p.parse_args(argv)
    start = engine.read_start(p, args.checkpoint)
    given = engine.resolve(p, argv, args, engine.checkpoint_flags(start))
    try:
        cfg = checkpoints.config_from_checkpoint(start, args.model if "model" in given else None,
                                                 img_size=args.input_size, num_frames=args.num_frames)
    except ValueError as e:  # CheckpointError, ConfigError
        p.error(engine.as_flags(str(e)))
    return args, start, cfg


def export(checkpoint: checkpoints.Checkpoint, cfg: vmae.VideoMAEConfig, encoder_only: bool = False):
    """(transformers class name, config.json, weights under transformers' names, the loader's report) for a
    checkpoint. Loaded through our model first, so a file that would leave any weight untrained stops here."""
    keys = checkpoints.encoder_weights(checkpoint.weights)
    decoder, fc_norm = checkpoints.has_decoder(checkpoint.weights), "fc_norm.weight" in keys
    head = next((v for k, v in checkpoint.weights.items() if k.removeprefix("backbone.") == "head.weight"), None)
    if decoder:
        model = vmae.PretrainVideoMAE(cfg)
    else:
        model = vmae.VideoClassifier(cfg, len(head) if head is not None and fc_norm and not encoder_only else 0)
    loaded = checkpoints.load_weights(model, checkpoint)
    weights = checkpoints.to_hugging_face(model.state_dict())
    norm_pix_loss = checkpoints.trained_on_normalized_targets(checkpoint.args)
    if encoder_only or not (decoder or fc_norm):
        name = "VideoMAEModel"
        weights = {k.removeprefix("videomae."): v for k, v in weights.items() if k.startswith("videomae.")}
        hf = checkpoints.hugging_face_config(cfg, name, use_mean_pooling=not decoder)  # a pretraining encoder's norm
    elif decoder:
        name = "VideoMAEForPreTraining"
        hf = checkpoints.hugging_face_config(cfg, name, use_mean_pooling=False, norm_pix_loss=norm_pix_loss)
    else:
        name = "VideoMAEForVideoClassification"
        hf = checkpoints.hugging_face_config(cfg, name, num_labels=0 if head is None else len(head))
    return name, hf, weights, loaded


def main(argv=None):
    args, checkpoint, cfg = parse_args(argv)
    name, hf, weights, loaded = export(checkpoint, cfg, args.kind == "encoder")
    print(loaded)
    from safetensors.torch import save_file  # a runtime requirement for .safetensors files (requirements.txt)
    out = Path(args.output_dir)
    engine.atomic_write(out / "model.safetensors", lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    engine.atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(hf, indent=2) + "\n"))
    print(f"wrote {out}/config.json and model.safetensors ({len(weights)} tensors, {cfg.num_frames}x{cfg.img_size}): "
          f"transformers.{name}.from_pretrained('{out}') loads it; its input is (B, T, 3, H, W)")


if __name__ == "__main__":
    engine.run(main)
