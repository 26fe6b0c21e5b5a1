"""The fine-tuning recipe: the CLI end to end on a micro model (train, resume, eval-only, linear probe, two
processes), the multi-view test against a plain re-computation, overfitting, bad input, and the one weight
loader against the reference's golden weights and Hugging Face's models."""
import contextlib
import functools
import io
import json

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import data
import engine
import masking
import train_finetune as tf
import train_pretrain as tp
import vmae
from conftest import assert_probe, config_from_reference, export_videos, golden, golden_video
from test_train_pretrain import micro, refused  # noqa: F401 (micro is a fixture)
from test_train_pretrain import MICRO, run_processes, torchrun_env
from test_train_pretrain import cli as pretrain_cli


def cli(out, *extra):
    return ["--model", "micro", "--input_size", "32", "--num_frames", "4", "--batch_size", "4", "--epochs", "1",
            "--warmup_epochs", "1", "--lr", "5e-2", "--synthetic_size", "32", "--num_workers", "0",
            "--mixup", "0.8", "--cutmix", "1.0", "--test_num_segment", "2", "--test_num_crop", "3",
            "--device", "cpu", "--output_dir", str(out), *extra]  # the CPU path on any machine (GPU: test_gpu.py)


def run(argv) -> str:
    """main(argv) with the micro size registered; returns what it printed."""
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(printed):
        m.setitem(vmae.SIZES, "micro", MICRO)
        tf.main(argv)
    return printed.getvalue()


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch, then a second run of the same command with --epochs 2, which resumes."""
    out = tmp_path_factory.mktemp("finetune")
    first = run(cli(out))
    files = sorted(p.name for p in out.iterdir())
    second = run(cli(out, "--epochs", "2", "--allow_resume_changes"))  # a longer schedule: a change to the run
    return dict(out=out, first=first, files_after_first=files, second=second)


# -----------------------------------------------------------------------------------------------------
# The command line, end to end


def test_one_epoch_end_to_end(trained):
    assert trained["files_after_first"] == [".lock", "checkpoint-best.pth", "checkpoint-last.pth", "confusion.png",
                                            "curves.png", "log.txt", "per_class_accuracy.txt"]
    printed = trained["first"]
    assert "effective batch 4 videos" in printed and "mixup 0.8 / cutmix 1.0" in printed
    assert "clip-level (each view alone)" in printed and "video-level (softmax averaged" in printed
    epoch, test = rows(trained["out"])[:2]
    assert epoch["epoch"] == 0 and {"train_loss", "train_lr", "val_loss", "val_acc1", "val_acc5"} <= set(epoch)
    assert test["test_views"] == "4x2x3" and test["test_videos"] == 8 and test["test_clips"] == 8 * 6
    state = torch.load(trained["out"] / "checkpoint-last.pth", weights_only=True)
    assert set(state) >= {"model", "optimizer", "epoch", "scaler", "args", "best_acc1"}
    model = vmae.VideoClassifier(vmae.config("small", **MICRO, img_size=32, num_frames=4), 8)
    model.load_state_dict(state["model"], strict=True)  # plain reference keys: patch_embed, blocks, fc_norm, head


def test_rerun_resumes_from_the_last_checkpoint(trained):
    assert "resumed from" in trained["second"] and "continuing at epoch 1" in trained["second"]
    epoch0, test0, note, epoch1, test1 = rows(trained["out"])
    assert (epoch0["epoch"], epoch1["epoch"]) == (0, 1) and "test_views" in test0 and "test_views" in test1
    assert note["changes"] == ["--epochs: 1 in the checkpoint, 2 now"] and note["at_epoch"] == 1  # the override, logged
    assert torch.load(trained["out"] / "checkpoint-last.pth", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("segments,crops", [(1, 1), (2, 3), (5, 3)])
def test_multi_view_test_equals_a_plain_recomputation(trained, tmp_path, segments, crops):
    """--eval only, against the same numbers computed in a plain loop: every view through the model,
    softmax averaged per video."""
    checkpoint = trained["out"] / "checkpoint-best.pth"
    argv = cli(tmp_path, "--eval", "--finetune", str(checkpoint), "--test_num_segment", str(segments),
               "--test_num_crop", str(crops))
    printed = run(argv)
    assert "epoch" not in printed and not (tmp_path / "checkpoint-last.pth").exists()  # no training
    [reported] = rows(tmp_path)

    with pytest.MonkeyPatch.context() as m:
        m.setitem(vmae.SIZES, "micro", MICRO)
        args, cfg, _, _ = tf.parse_args(argv)
    model = vmae.VideoClassifier(cfg, 8).eval()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    test_set = tf.build_dataset("test", args, engine.Dist(0, 1, 0, torch.device("cpu")))
    probs, labels, clip_hits = torch.zeros(8, 8), torch.zeros(8, dtype=torch.long), 0
    with torch.no_grad():
        for i in range(len(test_set)):
            clip, label, video, view = test_set[i]
            assert (video, view) == divmod(i, segments * crops)
            p = model(clip[None]).softmax(1)[0]
            probs[video] += p / (segments * crops)
            labels[video] = label
            clip_hits += int(p.argmax() == label)
    assert reported["test_clips"] == 8 * segments * crops and reported["test_videos"] == 8
    assert reported["test_clip_acc1"] == pytest.approx(100 * clip_hits / len(test_set))
    assert reported["test_video_acc1"] == pytest.approx(100 * (probs.argmax(1) == labels).float().mean().item())
    table = (tmp_path / "per_class_accuracy.txt").read_text().splitlines()
    assert len(table) == 1 + 8
    assert sum(int(line.split()[2]) for line in table[1:]) == round(reported["test_video_acc1"] * 8 / 100)


def test_eval_of_a_resume_checkpoint_tests_its_weights(trained, tmp_path):
    checkpoint = str(trained["out"] / "checkpoint-last.pth")
    printed = run(cli(tmp_path / "resume", "--eval", "--resume", checkpoint, "--test_num_segment", "1"))
    run(cli(tmp_path / "finetune", "--eval", "--finetune", checkpoint, "--test_num_segment", "1"))
    assert "resumed from" not in printed and "epoch" not in printed  # weights only: no training state, no training
    assert rows(tmp_path / "resume") == rows(tmp_path / "finetune")


def test_linear_probe_trains_only_the_head(trained, tmp_path):
    start = torch.load(trained["out"] / "checkpoint-best.pth", weights_only=True)["model"]
    printed = run(cli(tmp_path, "--linear_probe", "--finetune", str(trained["out"] / "checkpoint-best.pth")))
    assert "linear probe" in printed and "0.00M trained" in printed  # 8 x 32 + 8 head parameters
    end = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["model"]
    for key in start:
        same = torch.equal(start[key], end[key])
        assert same != key.startswith("head."), key


def ddp_finetune(rank: int, world: int, port: int, out: str, *flags: str):
    torchrun_env(rank, world, port)
    vmae.SIZES["micro"] = MICRO  # this process's own copy of the table
    tf.main(cli(out, "--synthetic_size", "12", "--batch_size", "2", "--test_num_segment", "1", "--test_num_crop", "1",
                *flags))


@pytest.mark.parametrize("recipe", ["pretrain", "finetune"])
def test_the_starting_checkpoints_tensors_are_freed_once_loaded(recipe, micro, tmp_path, monkeypatch):
    """A ViT-g checkpoint is 4 GB: once the model holds its weights, the run must not keep the file's copy."""
    read, loaded_left = [], []
    read_checkpoint, build_trainer = checkpoints.read_checkpoint, engine.build_trainer
    monkeypatch.setattr(checkpoints, "read_checkpoint", lambda path: read.append(read_checkpoint(path)) or read[-1])
    monkeypatch.setattr(engine, "build_trainer", lambda *a, **k: loaded_left.append(len(read[0].weights))
                        or build_trainer(*a, **k))
    model = vmae.PretrainVideoMAE(vmae.config("micro", img_size=32, num_frames=4))
    torch.save({"model": model.state_dict()}, tmp_path / "pretrained.pth")
    start = ["--finetune", str(tmp_path / "pretrained.pth"), "--epochs", "1"]
    if recipe == "pretrain":
        tp.main(pretrain_cli(tmp_path / "out", *start, "--synthetic_size", "8", "--probe_every", "0"))
    else:
        tf.main(cli(tmp_path / "out", *start, "--synthetic_size", "8", "--test_num_segment", "1",
                    "--test_num_crop", "1"))
    assert loaded_left == [0]


def test_two_processes_count_every_video_once(tmp_path):
    """12 training videos, 3 held-out ones over 2 processes: the evaluation shards are padded to 2 + 2, and
    the repeat must not count. The two-process test must equal a one-process test of the same weights."""
    run_processes(ddp_finetune, 2, str(tmp_path / "ddp"))
    epoch, test = rows(tmp_path / "ddp")
    assert epoch["steps"] == 3  # 12 videos / (2 per process x 2 processes)
    assert test["test_clips"] == 3 and test["test_videos"] == 3
    run(cli(tmp_path / "one", "--synthetic_size", "12", "--test_num_segment", "1", "--test_num_crop", "1", "--eval",
            "--finetune", str(tmp_path / "ddp" / "checkpoint-last.pth")))
    [alone] = rows(tmp_path / "one")
    for key in ("test_clip_acc1", "test_clip_acc5", "test_video_acc1", "test_video_acc5"):
        assert alone[key] == pytest.approx(test[key]), key


def test_two_process_fsdp_trains_the_same_weights_as_ddp(tmp_path):
    """FSDP swaps the parameters for sharded ones; an optimizer holding the old ones would train nothing.
    Same seeds, data and augmentations: the two runs must end with the same weights, and both must move."""
    run_processes(ddp_finetune, 2, str(tmp_path / "ddp"))
    run_processes(ddp_finetune, 2, str(tmp_path / "fsdp"), "--fsdp")
    ddp, fsdp = (torch.load(tmp_path / run / "checkpoint-last.pth", weights_only=True)["model"]
                 for run in ("ddp", "fsdp"))
    assert all(type(v) is torch.Tensor for v in fsdp.values())  # gathered: no DTensor shards
    torch.manual_seed(0)  # the recipe's seed_everything(0) before building the model
    start = vmae.VideoClassifier(vmae.config("small", **MICRO, img_size=32, num_frames=4), 8,
                                 init_scale=0.001).state_dict()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], atol=1e-5, rtol=1e-4, msg=key)
    assert not torch.allclose(fsdp["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"], atol=1e-5)


# -----------------------------------------------------------------------------------------------------
# Learning


def test_overfits_a_fixed_labelled_set():
    """The recipe's pieces (layer-decay groups, soft-target cross-entropy) must fit 8 fixed clips exactly."""
    model = vmae.VideoClassifier(vmae.config("small", **MICRO, img_size=32, num_frames=4), 5)
    optimizer = engine.make_optimizer(engine.param_groups(model, 0.05, layer_decay=0.75), 3e-3, (0.9, 0.999), 1e-8,
                                  torch.device("cpu"))
    clips, labels = torch.randn(8, 3, 4, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    args = tf.parse_args(["--mixup", "0", "--cutmix", "0", "--smoothing", "0.1", "--nb_classes", "5"]).args
    for _ in range(60):
        _, targets = tf.mix(clips, labels, args)
        F.cross_entropy(model(clips), targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (model.eval()(clips).argmax(1) == labels).all()


def test_mixup_prob_decides_whether_a_batch_is_mixed():
    clips = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 3, 4, 8, 8).clone()
    labels = torch.arange(4)
    plain = tf.parse_args(["--mixup_prob", "0", "--nb_classes", "4", "--smoothing", "0.2"]).args
    mixed, targets = tf.mix(clips.clone(), labels, plain)
    assert torch.equal(mixed, clips) and torch.allclose(targets, 0.8 * torch.eye(4) + 0.05)
    always = tf.parse_args(["--mixup_prob", "1", "--mixup", "0", "--cutmix", "1", "--nb_classes", "4"]).args
    mixed, targets = tf.mix(clips.clone(), labels, always)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    from_partner = mixed[0] == 3  # one cutmix box, the same in every frame and channel
    assert from_partner.any() and (from_partner == from_partner[:1, :1]).all()


# -----------------------------------------------------------------------------------------------------
# Defaults and bad input


def test_demo_and_checkpoint_defaults(trained):
    checkpoint = str(trained["out"] / "checkpoint-best.pth")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(vmae.SIZES, "micro", MICRO)
        args = tf.parse_args(["--finetune", checkpoint]).args
        explicit = tf.parse_args(["--finetune", checkpoint, "--num_frames", "8", "--data_path", "."]).args
    assert (args.model, args.input_size, args.num_frames, args.nb_classes) == ("micro", 32, 4, 8)  # from the checkpoint
    assert args.batch_size == tf.DEMO["batch_size"] and args.short_side_size == 32
    assert explicit.num_frames == 8 and explicit.batch_size == 64  # explicit flag; reference default with data
    with pytest.MonkeyPatch.context() as m:
        m.setitem(vmae.SIZES, "micro", MICRO)
        resumed = tf.parse_args(["--eval", "--resume", checkpoint]).args
    assert (resumed.model, resumed.input_size, resumed.num_frames, resumed.nb_classes) == ("micro", 32, 4, 8)
    probe = tf.parse_args(["--linear_probe"]).args
    assert probe.mixup == 0 and probe.drop_path == 0 and probe.aa == "none"


@pytest.fixture(scope="module")
def ft_inputs(trained, tmp_path_factory):
    """Fine-tuning's bad files: split folders whose train or validation list is wrong, a validation video
    that does not open, a frame folder with an empty JPEG, a label map, and checkpoints with one flaw."""
    d = tmp_path_factory.mktemp("ft_inputs")
    good = data.SyntheticVideos(4, length=24, height=32, width=40)
    export_videos(good, str(d / "good"), "train")
    videos = sorted(str(v) for v in (d / "good" / "train").iterdir())
    (d / "garbage.mp4").write_bytes(bytes(range(256)) * 20)
    frames = d / "frames"
    frames.mkdir()
    for i in range(1, 9):
        (frames / f"img_{i:05}.jpg").write_bytes(b"" if i == 1 else b"\xff\xd8")
    train = "".join(f"{v} {i}\n" for i, v in enumerate(videos))
    splits = {"bad_val": (train, f"{videos[0]} 0\n{d}/garbage.mp4 1\n"), "no_val": (train, None),
              "labels": (train + f"{videos[0]} 7\n{videos[1]} 9\n", train), "jpeg": (train, f"{frames} 8 0\n")}
    for name, (train_list, val_list) in splits.items():
        (d / name).mkdir()
        (d / name / "train.csv").write_text(train_list)
        if val_list:
            (d / name / "val.csv").write_text(val_list)
    (d / "map.json").write_text("[0, 1")
    state = torch.load(trained["out"] / "checkpoint-last.pth", weights_only=True)
    torch.save({**state, "model": {k: v for k, v in state["model"].items() if k != "blocks.1.mlp.fc2.bias"}},
               d / "lacking.pth")
    pretraining = vmae.PretrainVideoMAE(vmae.config("small", **MICRO, img_size=32, num_frames=4)).state_dict()
    torch.save({**state, "model": pretraining}, d / "pretraining.pth")  # another recipe's model
    return d


FINETUNE_REFUSALS = [
    (["--layer_decay", "-1"], "argument --layer_decay: must be in (0, 1], got -1"),
    (["--layer_decay", "0"], "argument --layer_decay: must be in (0, 1], got 0"),
    (["--layer_decay", "1.5"], "argument --layer_decay: must be in (0, 1], got 1.5"),
    (["--smoothing", "2"], "argument --smoothing: must be in [0, 1), got 2"),
    (["--smoothing", "-1"], "argument --smoothing: must be in [0, 1), got -1"),
    (["--head_drop_rate", "1.5"], "argument --head_drop_rate: must be in [0, 1), got 1.5"),
    (["--init_scale", "nan"], "argument --init_scale: must be in [0, inf), got nan"),
    (["--nb_classes", "0"], "argument --nb_classes: must be in [1, 100000], got 0"),
    (["--mixup", "-1"], "argument --mixup: must be in [0, inf), got -1"),
    (["--cutmix", "nan"], "argument --cutmix: must be in [0, inf), got nan"),
    (["--mixup_prob", "2"], "argument --mixup_prob: must be in [0, 1], got 2"),
    (["--mixup_switch_prob", "-0.1"], "argument --mixup_switch_prob: must be in [0, 1], got -0.1"),
    (["--reprob", "1.5"], "argument --reprob: must be in [0, 1], got 1.5"),
    (["--test_num_crop", "0"], "argument --test_num_crop: must be in [1, inf), got 0"),
    (["--test_num_segment", "0"], "argument --test_num_segment: must be in [1, inf), got 0"),
    (["--short_side_size", "16"], "--short_side_size 16 is smaller than --input_size 32"),
    (["--clip_grad", "0"], "argument --clip_grad: must be in (0, inf), got 0"),
    (["--weight_decay", "-1"], "argument --weight_decay: must be in [0, inf), got -1"),
    (["--lr", "nan"], "argument --lr: must be in (0, inf), got nan"),
    (["--opt_betas", "1", "0.9"], "argument --opt_betas: must be in [0, 1), got 1"),
    (["--opt_eps", "-1"], "argument --opt_eps: must be in (0, inf), got -1"),
    (["--warmup_epochs", "-1"], "argument --warmup_epochs: must be in [0, inf), got -1"),
    (["--epochs", "1e9"], "argument --epochs: expected an integer in [1, 100000], got '1e9'"),
    (["--sampling_rate", "0"], "argument --sampling_rate: must be in [1, inf), got 0"),
    (["--num_workers", "-1"], "argument --num_workers: must be in [0, inf), got -1"),
    (["--device", "foo"], "argument --device: expected cpu, cuda or cuda:N, got 'foo'"),
    (["--seed", str(10 ** 23)], "argument --seed: must be in [0, 4294967295]"),
    (["--aa", "rand-bogus"], "--aa: aa='rand-bogus': expected 'rand-m<magnitude>-n<ops>-mstd<std>-inc1'"),
    (["--eval"], "--eval tests given weights: pass --finetune CHECKPOINT"),
    (["--label_map", "{d}/map.json"], "--label_map picks rows of the --finetune checkpoint's head: it needs "
     "--finetune"),
    (["--label_map", "{d}/map.json", "--finetune", "{ckpt}"], "--label_map {d}/map.json: cannot be read as JSON"),
    # lists and files: every split read and checked, the held-out ones opened, before the first step
    (["--data_path", "{d}/bad_val"], "{d}/garbage.mp4: OpenCV cannot open it"),
    (["--data_path", "{d}/jpeg"], "img_00001.jpg: OpenCV cannot decode this image (0 bytes)"),
    (["--data_path", "{d}/labels", "--nb_classes", "7"], "2 problems:\n  {d}/labels/train.csv:5: label 7 is out of "
     "range for nb_classes=7\n  {d}/labels/train.csv:6: label 9 is out of range"),
    (["--data_path", "{d}/no_val"], "no val.csv list and no val/ folder"),
    (["--finetune", "/no/such.pth"], "checkpoint /no/such.pth: no such file"),
    (["--finetune", "{ckpt}", "--model", "wide"],
     "--model wide has embed_dim 48, MLP width 192; the file has embed_dim 32, MLP width 128"),
    # states
    (["--resume", "{ckpt}", "--lr", "0.1"], "--lr: 0.05 in the checkpoint, 0.1 now"),
    (["--resume", "{d}/lacking.pth"], "lacking.pth: it does not fit this model (a checkpoint of another model, size "
     "or recipe, or an incomplete file): missing: blocks.1.mlp.fc2.bias"),
    (["--resume", "{d}/pretraining.pth"], "pretraining.pth: it does not fit this model"),
]


@pytest.mark.parametrize("flags,message", FINETUNE_REFUSALS, ids=[" ".join(f) for f, _ in FINETUNE_REFUSALS])
def test_finetuning_refuses_bad_input_by_name(flags, message, ft_inputs, trained, micro, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(vmae.SIZES, "wide", dict(MICRO, embed_dim=48))
    paths = {"{d}": str(ft_inputs), "{ckpt}": str(trained["out"] / "checkpoint-last.pth")}
    fill = lambda text: functools.reduce(lambda t, kv: t.replace(*kv), paths.items(), text)  # noqa: E731
    err = refused(tf.main, cli(tmp_path / "out", *map(fill, flags)), capsys, monkeypatch)
    assert fill(message) in err


# -----------------------------------------------------------------------------------------------------
# One loader for the checkpoints users have


def save(tmp_path, state, name="ckpt.pth"):
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_reference_pretraining_checkpoint_loads_compiled_and_wrapped(tmp_path):
    entry = golden("pretrain_tiny")["p16"]
    model = vmae.PretrainVideoMAE(config_from_reference(entry["official_kwargs"])).eval()
    compiled = {"model": {f"_orig_mod.{k}": v for k, v in entry["state_dict"].items()}}  # the reference's compiled runs
    result = checkpoints.load_weights(model, save(tmp_path, compiled))
    assert not result.missing_keys and not result.unexpected_keys and "WARNING" not in str(result)
    with torch.no_grad():
        masks = masking.from_masks(entry["encoder_mask"], entry["decoder_mask"])
        assert_probe(model(golden_video(entry), masks.visible, masks.queries), entry["outputs_dual"])


def test_reference_pretraining_encoder_into_a_classifier(tmp_path):
    """As the reference's fine-tuning: its encoder in, decoder / mask token / final norm left out, fresh
    fc_norm and head (the key lists are the reference loader's own, stored in the golden file)."""
    pretrained = golden("pretrain_tiny")["p16"]["state_dict"]
    expected = golden("finetune_tiny")["load_pretrain_p16"]
    model = vmae.VideoClassifier(config_from_reference(golden("finetune_tiny")["official_kwargs"]), 5)
    result = checkpoints.load_weights(model, save(tmp_path, {"module": pretrained}))  # DeepSpeed's key
    assert sorted(result.missing_keys) == sorted(expected["missing_keys"])
    assert sorted(result.unexpected_keys) == sorted(expected["unexpected_keys"])
    printed = str(result)
    assert "left out, as the reference's fine-tuning does" in printed and "(34 tensors)" in printed
    assert "starting fresh" in printed and "WARNING" not in printed
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, pretrained["encoder.blocks.1.attn.qkv.weight"].float())


def test_reference_classifier_gives_its_logits(tmp_path):
    entry = golden("finetune_tiny")
    model = vmae.VideoClassifier(config_from_reference(entry["official_kwargs"]), 5).eval()
    checkpoints.load_weights(model,
                             save(tmp_path, {"model": {f"backbone.{k}": v for k, v in entry["state_dict"].items()}}))
    with torch.no_grad():
        torch.testing.assert_close(model(golden_video(entry)), entry["logits"], atol=1e-5, rtol=1e-4)


def test_head_of_another_class_count(tmp_path):
    """Dropped with a message, or re-indexed with a label map (the reference's K710 -> K400 conversion)."""
    entry = golden("finetune_tiny")
    path = save(tmp_path, {"model": entry["state_dict"]})
    cfg = config_from_reference(entry["official_kwargs"])
    model = vmae.VideoClassifier(cfg, 3)
    result = checkpoints.load_weights(model, path)
    assert result.missing_keys == ["head.weight", "head.bias"]
    assert "dropping head.weight (5, 64), a head for another class count" in str(result)
    model = vmae.VideoClassifier(cfg, 3)
    assert checkpoints.load_weights(model, path, label_map=[4, 0, 2]).missing_keys == []
    torch.testing.assert_close(model.head.weight, entry["state_dict"]["head.weight"][[4, 0, 2]].float())
    with pytest.raises(checkpoints.CheckpointError, match="label_map row 7 is past the end of its 5-class head"):
        checkpoints.load_weights(vmae.VideoClassifier(cfg, 3), path, label_map=[7, 0, 2])


def hf_config(**extra):
    """A Hugging Face VideoMAE config equal to MICRO at 32 px, 4 frames; their default LayerNorm eps is 1e-12."""
    transformers = pytest.importorskip("transformers")
    return transformers.VideoMAEConfig(
        image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=128, decoder_hidden_size=16, decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2, decoder_intermediate_size=64, layer_norm_eps=1e-6, hidden_act="gelu",
        attn_implementation="eager", **extra)


def randomised(model):
    """Every parameter moved off its init, so a weight that fails to load shows in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_hugging_face_classifier_gives_its_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = randomised(transformers.VideoMAEForVideoClassification(hf_config(use_mean_pooling=True, num_labels=5)))
    hf.fc_norm.eps = 1e-6  # built with LayerNorm's default 1e-5, whatever the config says
    hf.save_pretrained(tmp_path)  # model.safetensors
    model = vmae.VideoClassifier(vmae.config("small", **MICRO, img_size=32, num_frames=4), 5).eval()
    result = checkpoints.load_weights(model, tmp_path / "model.safetensors")
    assert not result.missing_keys and not result.unexpected_keys
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        theirs = hf(pixel_values=video.transpose(1, 2)).logits  # their layout is (B, T, C, H, W)
        torch.testing.assert_close(model(video), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias_names", ["query.bias", "q_bias"])  # newer transformers / older releases
def test_hugging_face_pretraining_model_gives_its_predictions(tmp_path, bias_names):
    transformers = pytest.importorskip("transformers")
    hf = randomised(transformers.VideoMAEForPreTraining(hf_config(use_mean_pooling=False)))
    hf.decoder.norm.eps = 1e-6
    weights = hf.state_dict()
    if bias_names == "q_bias":
        weights = {k.replace("query.bias", "q_bias").replace("value.bias", "v_bias"): v for k, v in weights.items()}
    cfg = vmae.config("small", **MICRO, img_size=32, num_frames=4, decoder_depth=2)
    model = vmae.PretrainVideoMAE(cfg).eval()
    result = checkpoints.load_weights(model, save(tmp_path, weights, "pytorch_model.bin"))
    assert not result.missing_keys and not result.unexpected_keys
    video, v1 = torch.randn(2, 3, 4, 32, 32), masking.MaskConfig(cfg.grid, "tube", 0.5, decoder_mask_ratio=0).draw(2)
    with torch.no_grad():
        theirs = hf(pixel_values=video.transpose(1, 2), bool_masked_pos=v1.encoder).logits
        torch.testing.assert_close(model(video, v1.visible, v1.queries), theirs, atol=1e-5, rtol=0)  # V1: theirs
