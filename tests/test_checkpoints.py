"""Every public checkpoint layout in, Hugging Face out: each layout written by hand from one of our micro
models (the key names as the public code that writes them has them, cited per test) and loaded back with
equal outputs; the model size read off the file; a load that would leave an encoder weight untrained stops
with the file, the layout and the keys; and the export to transformers, loaded back by transformers itself.
(The reference's own files are checked against its golden weights in test_train_finetune.py.)"""
import argparse
import json

import pytest
import torch

import checkpoints
import engine
import export_hf
import masking
import train_finetune as tf
import vmae
from test_train_pretrain import MICRO

SMALL_INPUT = dict(img_size=32, num_frames=4)


def randomised(model):
    """Every parameter moved off its init (LayerNorms included), so a weight that fails to load shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def micro(**overrides) -> vmae.VideoMAEConfig:
    return vmae.config("small", **{**MICRO, **SMALL_INPUT, **overrides})


def pooled(model, video):
    with torch.no_grad():
        return model.forward_features(video)[1]


def v2_release(folder, model: vmae.VideoClassifier) -> None:
    """A folder in the layout of the Hugging Face V2 releases. Read from
    https://huggingface.co/OpenGVLab/VideoMAEv2-Base/blob/main/config.json (and the same file of -Large,
    -Huge, -giant): `model_type` VideoMAEv2_Base, `auto_map` AutoModel = modeling_videomaev2.VideoMAEv2, and a
    `model_config` in the reference VisionTransformer's own argument names with num_classes 0 and
    use_mean_pooling true; https://huggingface.co/OpenGVLab/VideoMAEv2-Base/tree/main: config.json and
    model.safetensors, whose wrapper keeps that VisionTransformer as `model` (so every key starts `model.`):
    patch_embed, blocks, fc_norm; an identity head, no decoder."""
    cfg = model.cfg
    folder.mkdir()
    model_config = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=3, num_classes=0,
                        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                        qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                        norm_layer="nn.LayerNorm", layer_norm_eps=1e-6, init_values=0.0, use_learnable_pos_emb=False,
                        tubelet_size=cfg.tubelet_size, use_mean_pooling=True, with_cp=False,
                        num_frames=cfg.num_frames, cos_attn=False)
    (folder / "config.json").write_text(json.dumps(dict(
        _name_or_path="./", model_type="VideoMAEv2_Base", architectures=["VideoMAEv2_Base"],
        auto_map={"AutoModel": "modeling_videomaev2.VideoMAEv2", "AutoConfig": "modeling_config.VideoMAEv2Config"},
        model_config=model_config, transformers_version="4.38.0", use_cache=True)))
    from safetensors.torch import save_file
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


def mmaction2_file(path, model: vmae.VideoClassifier) -> None:
    """A file in mmaction2's layout (the converted VideoMAE / V2 models, e.g. its distilled ViT-S/B K400
    files in configs/recognition/videomaev2). Read from open-mmlab/mmaction2: mmaction/models/backbones/
    vit_mae.py (the backbone: mmcv's PatchEmbed with conv_type Conv3d, whose conv is `projection`; mmcv's FFN
    for the MLP; the sin/cos table registered as a buffer `pos_embed`; fc_norm with use_mean_pooling),
    open-mmlab/mmcv mmcv/cnn/bricks/transformer.py (FFN: layers = [Sequential(Linear, act, Dropout), Linear,
    Dropout], so fc1 is layers.0.0 and fc2 layers.1), mmaction/models/heads/timesformer_head.py (the head's
    Linear is fc_cls) and configs/_base_/models/vit_base.py (Recognizer3D: `backbone` and `cls_head`);
    mmengine saves {"state_dict", "meta"}."""
    names = [("patch_embed.proj.", "patch_embed.projection."), ("mlp.fc1.", "mlp.layers.0.0."),
             ("mlp.fc2.", "mlp.layers.1.")]
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in names:
            key = key.replace(ours, theirs)
        state["cls_head.fc_cls." + key[5:] if key.startswith("head.") else "backbone." + key] = value
    state["backbone.pos_embed"] = vmae.sincos_table(model.cfg.num_tokens, model.cfg.embed_dim)[None]
    torch.save({"meta": {"mmengine_version": "0.7.3", "epoch": 35}, "state_dict": state}, path)


# -----------------------------------------------------------------------------------------------------
# Each layout in, outputs equal


def test_hugging_face_v2_release_folder(tmp_path):
    """An encoder-only folder of a width the size table does not have and a head count (4) no table would
    give: the size comes from its config.json, and a wrong head count would change the features."""
    source = randomised(vmae.VideoClassifier(micro(num_heads=4), 0))
    v2_release(tmp_path / "VideoMAEv2-Micro", source)
    checkpoint = checkpoints.read_checkpoint(tmp_path / "VideoMAEv2-Micro")
    assert checkpoint.layout == "hf_v2" and checkpoint.source == "its config.json"
    cfg = checkpoints.config_from_checkpoint(checkpoint)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size, cfg.num_frames) == (32, 2, 4, 32, 4)
    model = vmae.VideoClassifier(cfg, 0)
    report = checkpoints.load_weights(model, checkpoint)
    assert report.missing_keys == [] and "WARNING" not in str(report)
    video = torch.randn(2, 3, 4, 32, 32)
    torch.testing.assert_close(pooled(model.eval(), video), pooled(source, video), atol=1e-6, rtol=0)
    classifier = vmae.VideoClassifier(cfg, 7)  # fine-tuning from it: a fresh head, said so
    assert ("starting fresh (the file has none for this model): head.weight, head.bias"
            in str(checkpoints.load_weights(classifier, checkpoint)))


def test_hugging_face_v2_release_has_no_decoder(tmp_path):
    v2_release(tmp_path / "v2", vmae.VideoClassifier(micro(num_heads=4), 0))
    checkpoint = checkpoints.read_checkpoint(tmp_path / "v2")
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.load_weights(vmae.PretrainVideoMAE(checkpoints.config_from_checkpoint(checkpoint)), checkpoint)
    message = str(error.value)
    assert str(tmp_path / "v2") in message and "read as Hugging Face V2 release" in message
    assert "no decoder" in message and "MCG-NJU/videomae-base" in message and "vit_g_hybrid_pt_1200e.pth" in message


def test_mmaction2_file(tmp_path):
    """Of a size of the table (demo), so the file's shapes alone give the whole model."""
    source = randomised(vmae.VideoClassifier(vmae.config("demo", **SMALL_INPUT), 5))
    mmaction2_file(tmp_path / "vit-demo_videomaev2_20230510.pth", source)
    checkpoint = checkpoints.read_checkpoint(tmp_path / "vit-demo_videomaev2_20230510.pth")
    assert checkpoint.layout == "mmaction2" and checkpoint.preset == "demo"
    model = vmae.VideoClassifier(checkpoints.config_from_checkpoint(checkpoint, **SMALL_INPUT), 5)
    report = checkpoints.load_weights(model, checkpoint)
    assert report.missing_keys == [] and report.unexpected_keys == []  # its stored position table: dropped
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(video), source(video), atol=1e-6, rtol=0)


def test_the_reference_layouts_and_its_argument_namespace(tmp_path, monkeypatch):
    """The reference's files keep their weights under `model` or `module` (DeepSpeed, as its MODEL_ZOO
    files: MCG-NJU/VideoMAE#119), with `_orig_mod.` from compiled runs, and its training arguments as an
    argparse Namespace (utils.save_model in OpenGVLab/VideoMAEv2) naming its models vit_small_patch16_224 etc.:
    input size and frame count, which no weight shows, come from there."""
    monkeypatch.setitem(vmae.SIZES, "small", dict(MICRO))  # vit_small_patch16_224, at micro size
    source = randomised(vmae.VideoClassifier(micro(), 5))
    args = argparse.Namespace(model="vit_small_patch16_224", input_size=32, num_frames=4, tubelet_size=2)
    for container in ("model", "module"):
        torch.save({container: {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}, "args": args},
                   tmp_path / "ref.pth")
        checkpoint = checkpoints.read_checkpoint(tmp_path / "ref.pth")
        assert checkpoint.layout == "reference" and checkpoint.source == "its stored arguments"
        cfg = checkpoints.config_from_checkpoint(checkpoint)
        assert (cfg.img_size, cfg.num_frames, checkpoint.preset) == (32, 4, "small")
        model = vmae.VideoClassifier(cfg, 5)
        checkpoints.load_weights(model, checkpoint)
        video = torch.randn(2, 3, 4, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(video), source(video), atol=1e-6, rtol=0)


def test_hugging_face_v1_key_bias_changes_nothing_and_is_dropped(tmp_path):
    """transformers 5 refactored VideoMAE's attention into plain query/key/value Linears
    (huggingface/transformers#48675, embeddings-benchmark/mteb#5094), and a key bias can appear in such files;
    the reference has none (a zero k bias, after BEiT: MCG-NJU/VideoMAE#41). Their model with a random key
    bias gives the outputs it gives without one, and ours, loaded from the file with it, gives them too."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.VideoMAEConfig.from_dict(
        checkpoints.hugging_face_config(micro(), "VideoMAEForVideoClassification", 5))
    hf = randomised(transformers.VideoMAEForVideoClassification(hf_cfg))
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        without = hf(pixel_values=video.transpose(1, 2)).logits
        for layer in hf.videomae.encoder.layer:
            key = layer.attention.attention.key
            biased = torch.nn.Linear(key.in_features, key.out_features)
            biased.weight.copy_(key.weight)
            layer.attention.attention.key = biased  # a random bias of about unit size
        with_bias = hf(pixel_values=video.transpose(1, 2)).logits
    torch.testing.assert_close(with_bias, without, atol=1e-5, rtol=0)
    weights = hf.state_dict()
    assert any(k.endswith("attention.attention.key.bias") for k in weights)
    torch.save(weights, tmp_path / "pytorch_model.bin")
    model = vmae.VideoClassifier(micro(), 5)
    report = checkpoints.load_weights(model, tmp_path / "pytorch_model.bin")
    assert not report.missing_keys and not report.unexpected_keys
    hf.fc_norm.eps = 1e-6  # transformers builds it with LayerNorm's default, whatever the config says
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(video), hf(pixel_values=video.transpose(1, 2)).logits,
                                   atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------------------------------
# The size from the file, or stop


def test_a_model_flag_that_contradicts_the_file_names_both(tmp_path):
    mmaction2_file(tmp_path / "demo.pth", vmae.VideoClassifier(vmae.config("demo", **SMALL_INPUT), 5))
    checkpoint = checkpoints.read_checkpoint(tmp_path / "demo.pth")
    assert checkpoints.config_from_checkpoint(checkpoint, "demo").embed_dim == 64  # agreeing is fine
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.config_from_checkpoint(checkpoint, "small")
    message = str(error.value)
    assert "--model small has embed_dim 384, depth 12, num_heads 6, patch_size 16" in message
    assert "the file has embed_dim 64, depth 4, num_heads 2, patch_size 8" in message and "demo.pth" in message


def test_a_width_the_table_lacks_needs_the_model_flag(tmp_path, monkeypatch):
    torch.save({"model": vmae.VideoClassifier(micro(), 5).state_dict()}, tmp_path / "bare.pth")
    checkpoint = checkpoints.read_checkpoint(tmp_path / "bare.pth")
    with pytest.raises(checkpoints.CheckpointError, match=r"bare.pth \(read as the reference's\) does not tell the "
                                                          r"model's size \(embed_dim 32, .*pass --model"):
        checkpoints.config_from_checkpoint(checkpoint)
    monkeypatch.setitem(vmae.SIZES, "micro", dict(MICRO))
    assert checkpoints.config_from_checkpoint(checkpoint, "micro").num_heads == MICRO["num_heads"]


def test_giant_sizes_are_read_off_the_weights(tmp_path, monkeypatch):
    """Patch 14 and an MLP of 48/11 of the width (int(1408 · 48/11) = 6144, decoder 2234): read back exactly,
    at giant's width and depth shrunk to micro (the head counts, from the table)."""
    monkeypatch.setitem(vmae.SIZES, "giant", {**vmae.SIZES["giant"], **MICRO, "embed_dim": 44, "num_heads": 4})
    cfg = vmae.config("giant", img_size=28, num_frames=4, decoder_depth=1)
    torch.save({"model": vmae.PretrainVideoMAE(cfg).state_dict()}, tmp_path / "g.pth")
    checkpoint = checkpoints.read_checkpoint(tmp_path / "g.pth")
    assert checkpoint.preset == "giant"
    read = checkpoints.config_from_checkpoint(checkpoint, **dict(img_size=28, num_frames=4))
    assert read == cfg
    checkpoints.load_weights(vmae.PretrainVideoMAE(read), checkpoint)


# -----------------------------------------------------------------------------------------------------
# A load that would leave anything of the encoder untrained stops


def test_a_file_that_fits_nothing_stops_naming_file_layout_and_keys(tmp_path, monkeypatch):
    monkeypatch.setitem(vmae.SIZES, "micro", dict(MICRO))
    weights = {k.replace("blocks.", "layers."): v for k, v in vmae.VideoClassifier(micro(), 5).state_dict().items()}
    torch.save({"model": weights}, tmp_path / "renamed.pth")
    model = vmae.VideoClassifier(micro(), 5)
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.load_weights(model, tmp_path / "renamed.pth")
    message = str(error.value)
    assert "renamed.pth (read as the reference's)" in message and "would keep their random init" in message
    assert "blocks.0.norm1.weight" in message and "fit nothing: layers.0.norm1.weight" in message


@pytest.mark.parametrize("flag", ["--finetune", "--eval"])
def test_the_recipe_stops_instead_of_training_from_random(flag, tmp_path, monkeypatch, capsys):
    """Issue 15's two ways a run used to go on untrained: --finetune of a file that matches nothing, and
    --eval of weights that have no head."""
    monkeypatch.setitem(vmae.SIZES, "micro", dict(MICRO))
    path = tmp_path / "file.pth"
    if flag == "--finetune":
        torch.save({"model": {"foo.weight": torch.zeros(3)}, "args": {"model": "micro"}}, path)
    else:  # a pretraining file: an encoder, no fc_norm, no head
        torch.save({"model": vmae.PretrainVideoMAE(micro()).state_dict(), "args": {"model": "micro"}}, path)
    argv = ["--finetune", str(path), "--input_size", "32", "--num_frames", "4", "--output_dir", str(tmp_path / "o"),
            "--device", "cpu"] + (["--eval"] if flag == "--eval" else [])
    with pytest.raises(SystemExit) as stop:
        engine.run(tf.main, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and str(path) in err
    expected = ("would keep their random init" if flag == "--finetune"
                else "has no fc_norm.weight, fc_norm.bias, head.weight")
    assert expected in err and not (tmp_path / "o" / "checkpoint-last.pth").exists()


def test_safetensors_load_without_transformers(tmp_path, monkeypatch):
    """The loader reads .safetensors with the safetensors package alone."""
    import sys
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of it fails
    v2_release(tmp_path / "v2", vmae.VideoClassifier(micro(num_heads=4), 0))
    assert checkpoints.read_checkpoint(tmp_path / "v2" / "model.safetensors").layout == "hf_v2"


# -----------------------------------------------------------------------------------------------------
# Hugging Face out


@pytest.mark.parametrize("kind", ["pretraining", "classifier"])
def test_hugging_face_names_round_trip(kind):
    cfg = micro(decoder_depth=2)
    weights = (vmae.PretrainVideoMAE(cfg) if kind == "pretraining" else vmae.VideoClassifier(cfg, 5)).state_dict()
    back = checkpoints.from_hugging_face(checkpoints.to_hugging_face(weights))
    if kind == "classifier":  # read back under the pretraining encoder's names, as from any HF file
        back = {k.removeprefix("encoder."): v for k, v in back.items()}
    assert sorted(back) == sorted(weights) and all(torch.equal(back[k], weights[k]) for k in weights)


def exported(tmp_path, model, *flags):
    torch.save({"model": model.state_dict(), "args": {"model": "micro", "input_size": 32, "num_frames": 4,
                                                      "decoder_depth": 2}}, tmp_path / "ckpt.pth")
    export_hf.main(["--checkpoint", str(tmp_path / "ckpt.pth"), "--output_dir", str(tmp_path / "hf"), *flags])
    return tmp_path / "hf"


def test_export_names_a_size_that_does_not_fit_by_its_flag(tmp_path, monkeypatch, capsys):
    """A user's --input_size that the patch does not divide: a message and exit code 2, no traceback, no folder."""
    monkeypatch.setitem(vmae.SIZES, "micro", dict(MICRO))
    with pytest.raises(SystemExit) as stop:
        engine.run(lambda argv: exported(tmp_path, vmae.PretrainVideoMAE(micro(decoder_depth=2)), *argv),
                   ["--input_size", "20"])
    assert stop.value.code == 2 and "--input_size=20 must be divisible by patch_size" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_an_exported_folder_loads_back_here_too(tmp_path, monkeypatch):
    """Export, then our own loader on the folder: Hugging Face V1 names, the size from its config.json."""
    monkeypatch.setitem(vmae.SIZES, "micro", dict(MICRO))
    source = randomised(vmae.VideoClassifier(micro(), 5))
    folder = exported(tmp_path, source)
    monkeypatch.delitem(vmae.SIZES, "micro")  # nothing but the folder can tell the size now
    checkpoint = checkpoints.read_checkpoint(folder)
    assert checkpoint.layout == "hf_v1" and checkpoint.source == "its config.json"
    model = vmae.VideoClassifier(checkpoints.config_from_checkpoint(checkpoint), 5)
    checkpoints.load_weights(model, checkpoint)
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(video), source(video), atol=1e-6, rtol=0)


def their_outputs_equal_ours(hf, run, ours) -> None:
    """transformers builds the classifier's fc_norm and the decoder's last norm with LayerNorm's default eps
    (1e-5) whatever config.json says, where ours (and the reference's) use 1e-6: as loaded, their outputs
    are ours to 1e-4; with those two eps set as config.json says, to 1e-5."""
    with torch.no_grad():
        torch.testing.assert_close(run(hf), ours, atol=1e-4, rtol=1e-4)
        for norm in (getattr(hf, "fc_norm", None), getattr(getattr(hf, "decoder", None), "norm", None)):
            if norm is not None:
                norm.eps = 1e-6
        torch.testing.assert_close(run(hf), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["classifier", "pretraining", "encoder"])
def test_export_loads_in_transformers_without_remote_code(kind, tmp_path, monkeypatch):
    """from_pretrained with no trust_remote_code, every weight used, and their outputs ours to 1e-5.
    Pretraining with V1 masking: theirs has no decoder mask."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setitem(vmae.SIZES, "micro", dict(MICRO))
    cfg = micro(decoder_depth=2)
    source = randomised(vmae.VideoClassifier(cfg, 5) if kind == "classifier" else vmae.PretrainVideoMAE(cfg))
    folder = exported(tmp_path, source, *(["--as", "encoder"] if kind == "encoder" else []))
    cls = dict(classifier=transformers.VideoMAEForVideoClassification, pretraining=transformers.VideoMAEForPreTraining,
               encoder=transformers.VideoMAEModel)[kind]
    assert json.loads((folder / "config.json").read_text())["architectures"] == [cls.__name__]
    from safetensors.torch import load_file  # the biases under the names transformers 4 has and 5 renames
    biases = [k.rpartition(".")[2] for k in load_file(folder / "model.safetensors") if ".attention.attention." in k
              and not k.endswith("weight")]
    assert biases and set(biases) == {"q_bias", "v_bias"}
    hf, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    video, v1 = torch.randn(2, 3, 4, 32, 32), masking.MaskConfig(cfg.grid, "tube", 0.5, decoder_mask_ratio=0).draw(2)
    frames = video.transpose(1, 2)  # theirs: (B, T, 3, H, W)
    with torch.no_grad():
        if kind == "classifier":
            ours, run = source(video), lambda m: m(pixel_values=frames).logits
        elif kind == "pretraining":
            ours = source(video, v1.visible, v1.queries)
            run = lambda m: m(pixel_values=frames, bool_masked_pos=v1.encoder).logits  # noqa: E731
        else:
            ours, run = source.encoder(video), lambda m: m(pixel_values=frames).last_hidden_state
    their_outputs_equal_ours(hf.eval(), run, ours)


def test_export_of_a_v2_release_gives_its_features(tmp_path):
    """A V2 release (encoder and fc_norm, no head) becomes a VideoMAEForVideoClassification without labels,
    whose logits are the fc_norm-ed clip vector, what the release's own code returns."""
    transformers = pytest.importorskip("transformers")
    source = randomised(vmae.VideoClassifier(micro(num_heads=4), 0))
    v2_release(tmp_path / "v2", source)
    export_hf.main(["--checkpoint", str(tmp_path / "v2"), "--output_dir", str(tmp_path / "hf")])
    hf = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path / "hf").eval()
    video = torch.randn(2, 3, 4, 32, 32)
    their_outputs_equal_ours(hf, lambda m: m(pixel_values=video.transpose(1, 2)).logits, pooled(source, video))
