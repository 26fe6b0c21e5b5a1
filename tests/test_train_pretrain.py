"""The pretraining recipe: schedules and optimizer groups against the reference, the CLI end to end on a
micro model, resume, DDP, and bad flags."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp

import checkpoints
import engine
import masking
import train_pretrain as tp
import vmae
from conftest import config_from_reference, export_videos, golden

MICRO = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_num_heads=2)


@pytest.fixture
def micro(monkeypatch):
    """A 'micro' entry in the size table, so the command line can build a model that trains in seconds."""
    monkeypatch.setitem(vmae.SIZES, "micro", MICRO)


def cli(out, *extra):
    return ["--model", "micro", "--input_size", "32", "--num_frames", "4", "--batch_size", "4", "--epochs", "3",
            "--warmup_epochs", "1", "--lr", "5e-2", "--synthetic_size", "16", "--num_workers", "0",
            "--device", "cpu", "--output_dir", str(out), *extra]  # the CPU path on any machine (GPU: test_gpu.py)


# -----------------------------------------------------------------------------------------------------
# Against the reference's schedules and parameter groups


@pytest.mark.parametrize("name", list(golden("schedules")["cosine"]))
def test_cosine_schedule_equals_the_reference(name):
    ref = golden("schedules")["cosine"][name]
    ours = engine.cosine_schedule(**ref["args"])
    np.testing.assert_allclose(ours, ref["values"].numpy(), rtol=1e-12, atol=0)


def test_warmup_steps_without_warmup_epochs_works():
    """The reference fails an assert here; a warmup given in steps must not need warmup epochs."""
    args = golden("schedules")["cosine_warmup_steps_without_warmup_epochs"]["args"]
    values = engine.cosine_schedule(**args)
    assert len(values) == args["epochs"] * args["niter_per_ep"]
    np.testing.assert_allclose(values[:5], np.linspace(0, args["base_value"], 5))
    assert values[5] == args["base_value"] and values[-1] > args["final_value"]


def test_layer_ids_equal_the_reference():
    ref = golden("schedules")["layer_id_examples"]
    assert [engine.layer_id(n, ref["num_max_layer"]) for n in ref["names"]] == ref["layer_id"]


def flat(groups):
    """Per-parameter view of optimizer groups: name -> (group name, weight decay, lr scale)."""
    return {n: (g["name"], g["weight_decay"], g["lr_scale"]) for g in groups for n in g["param_names"]}


def test_pretrain_groups_equal_the_reference():
    ref = golden("schedules")["pretrain_param_groups"]
    entry = golden("pretrain_tiny")["p16"]
    model = vmae.PretrainVideoMAE(config_from_reference(entry["official_kwargs"]))
    ours = flat(engine.param_groups(model, 0.05))
    assert sorted(ours) == sorted(ref["names"])
    assert [ours[n][1] for n in ref["names"]] == ref["weight_decay"]
    assert [ours[n][0] for n in ref["names"]] == ref["group_name"]


def test_compiling_does_not_give_the_mask_token_weight_decay():
    """The reference's compiled run decays `_orig_mod.mask_token`; ours decides by the parameter."""
    buggy = golden("schedules")["pretrain_param_groups_compiled"]
    assert dict(zip(buggy["names"], buggy["group"]))["_orig_mod.mask_token"] == "decay"  # the reference's bug
    model = vmae.PretrainVideoMAE(vmae.config("small", depth=1, decoder_depth=1))
    model.compile()
    groups = {n: g["weight_decay"] for g in engine.param_groups(model, 0.05) for n in g["param_names"]}
    assert groups["mask_token"] == 0.0 and groups["encoder.blocks.0.attn.qkv.weight"] == 0.05


@pytest.mark.parametrize("name,depth", [("finetune_depth12", 12), ("finetune_depth2", 2)])
def test_finetune_groups_with_layer_decay_equal_the_reference(name, depth):
    ref = golden("schedules")["param_groups"][name]
    model = vmae.VideoClassifier(vmae.config("small", embed_dim=16, num_heads=2, depth=depth, img_size=32), 5)
    ours = flat(engine.param_groups(model, 0.05, layer_decay=0.75))
    assert sorted(ours) == sorted(ref["names"])
    assert [ours[n][0] for n in ref["names"]] == ref["group_name"]
    assert [ours[n][1] for n in ref["names"]] == ref["weight_decay"]
    np.testing.assert_allclose([ours[n][2] for n in ref["names"]], ref["lr_scale"], rtol=1e-6)


# -----------------------------------------------------------------------------------------------------
# Learning


@pytest.mark.parametrize("dual", [True, False])
def test_loss_falls_on_a_fixed_batch(dual):
    """Overfit check: the same clips and masks every step; the model must learn to paint them back."""
    cfg = vmae.config("small", **MICRO, img_size=32, num_frames=4)
    model = vmae.PretrainVideoMAE(cfg)
    opt = engine.make_optimizer(engine.param_groups(model, 0.0), 1e-2, (0.9, 0.95), 1e-8, torch.device("cpu"))
    video = torch.randn(4, 3, 4, 32, 32)
    masks = masking.MaskConfig(cfg.grid, "tube", 0.75, "run_cell", 0.5 if dual else 0).draw(4)
    target = vmae.reconstruction_target(video, masks.queries, cfg.patch_size, cfg.tubelet_size)
    losses = []
    for _ in range(80):
        loss = vmae.pretrain_loss(model(video, masks.visible, masks.queries), target, masks.in_loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


# -----------------------------------------------------------------------------------------------------
# The command line, end to end


def test_one_run_writes_loadable_checkpoints_and_logs(micro, tmp_path, capsys):
    tp.main(cli(tmp_path, "--save_ckpt_freq", "2"))
    printed = capsys.readouterr().out
    assert "effective batch 4 videos" in printed and "lr 0.05 x 4 / 256" in printed
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".lock", "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-last.pth", "log.txt", "loss.png",
                     "recon.png"]
    assert (tmp_path / ".lock").read_text() == ""  # released: the run ended cleanly
    rows = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all(np.isfinite(r["train_loss"]) for r in rows)
    state = torch.load(tmp_path / "checkpoint-2.pth", weights_only=True)
    assert set(state) >= {"model", "optimizer", "epoch", "scaler", "args", "step"}
    assert state["epoch"] == 2 and state["step"] == 3 * 4
    model = vmae.PretrainVideoMAE(
        checkpoints.config_from_checkpoint(checkpoints.read_checkpoint(tmp_path / "checkpoint-2.pth")))
    model.load_state_dict(state["model"], strict=True)  # plain keys, no module. / _orig_mod.


class Interrupt(Exception):
    pass


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(micro, tmp_path, monkeypatch):
    tp.main(cli(tmp_path / "straight"))

    calls = {"n": 0}
    original = vmae.pretrain_loss

    def dies_in_epoch_two(*a, **k):  # a crash in the middle of the second epoch
        calls["n"] += 1
        if calls["n"] == 6:
            raise Interrupt
        return original(*a, **k)
    monkeypatch.setattr(vmae, "pretrain_loss", dies_in_epoch_two)
    with pytest.raises(Interrupt):
        tp.main(cli(tmp_path / "resumed"))
    monkeypatch.setattr(vmae, "pretrain_loss", original)
    tp.main(cli(tmp_path / "resumed"))  # resumes from checkpoint-last.pth (epoch 0) on its own

    a = torch.load(tmp_path / "straight" / "checkpoint-last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint-last.pth", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_normalising_on_the_device_trains_exactly_as_the_workers_normalising(micro, tmp_path):
    """--normalize_on_device ships uint8 crops and normalises after the copy: the same clips, bit for bit."""
    for run, flags in (("workers", ()), ("device", ("--normalize_on_device",))):
        tp.main(cli(tmp_path / run, "--epochs", "1", *flags))
    a, b = (torch.load(tmp_path / run / "checkpoint-last.pth", weights_only=True)["model"]
            for run in ("workers", "device"))
    assert all(torch.equal(a[key], b[key]) for key in a)


# -----------------------------------------------------------------------------------------------------
# Bad input: every bad flag, list line, file and state is a row; each stops with exit code 2, a message
# naming the culprit and no traceback, before the first optimizer step (unless only decoding can tell)


def refused(main, argv, capsys, monkeypatch, before_first_step: bool = True) -> str:
    """Run a recipe's command line that must refuse: exit code 2, no traceback, no epoch started (unless
    the flaw shows only in decoding). Returns what it printed on stderr."""
    real, epochs = engine.train_epoch, []
    monkeypatch.setattr(engine, "train_epoch", lambda *a, **k: epochs.append(a[3]) or real(*a, **k))
    with pytest.raises(SystemExit) as stop:
        engine.run(main, argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and "Traceback" not in out + err, out + err
    assert not epochs or not before_first_step, f"refused only after starting epoch {epochs}: {err}"
    return err


def training_checkpoint_variants(folder, checkpoint, cfg) -> None:
    """Bad states made from a real training checkpoint: each file is the good one with one thing wrong."""
    state = torch.load(checkpoint, weights_only=True)
    variants = dict(
        weights_only=dict(model=state["model"]),  # released weights: no optimizer, no epoch
        lacking={**state, "model": {k: v for k, v in state["model"].items() if k != "encoder.blocks.1.mlp.fc2.bias"}},
        nonfinite={**state, "model": {**state["model"], "encoder.blocks.0.attn.qkv.weight": torch.full(
            state["model"]["encoder.blocks.0.attn.qkv.weight"].shape, float("nan"))}},
        classifier={**state, "model": vmae.VideoClassifier(cfg, 8).state_dict()},  # another model's
        other_data={**state, "args": {**state["args"], "data": "1000 videos, 0123456789ab"}},
        two_processes={**state, "args": {**state["args"], "processes": 2}},
    )
    for name, variant in variants.items():
        torch.save(variant, folder / f"{name}.pth")
    (folder / "garbage.pth").write_bytes(os.urandom(3000))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files for the rows below: lists with bad lines, missing, empty and corrupt videos, a short frame
    folder, a finished one-epoch run and bad variants of its checkpoint, a folder another run holds."""
    import data
    d = tmp_path_factory.mktemp("bad_inputs")
    good = export_videos(data.SyntheticVideos(2, length=24, height=32, width=40), str(d), "good")  # 2 real .mp4
    video = d / "good" / "video_00000.mp4"
    (d / "empty.mp4").write_bytes(b"")
    (d / "garbage.mp4").write_bytes(os.urandom(5000))
    frames = d / "frames"
    frames.mkdir()
    for i in range(1, 4):
        (frames / f"img_{i:05}.jpg").write_bytes(b"\xff\xd8")
    lists = {"minus5": f"{video} 1 -5\n", "many": f"{video} x\n{video} 0 -1\n{video} 0 0\n{video} 1 2 3 4\n",
             "missing": f"{d}/gone1.mp4\n{video}\n{d}/gone2.mp4\n", "empty": f"{d}/empty.mp4 0 -1\n",
             "short": f"{frames} 1 16\n", "corrupt": f"{d}/garbage.mp4\n" * 4, "blank": "\n\n"}
    for name, text in lists.items():
        (d / f"{name}.csv").write_text(text)
    assert good
    (d / "a_file").write_text("not a folder")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(vmae.SIZES, "micro", MICRO)
        tp.main(cli(d / "run", "--epochs", "1"))
        cfg = vmae.config("micro", img_size=32, num_frames=4)
    training_checkpoint_variants(d, d / "run" / "checkpoint-last.pth", cfg)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(d / "locked")], stdout=subprocess.PIPE,
                              text=True)  # a live run's lock, from another process
    assert holder.stdout.readline() == "held\n"
    yield d
    holder.kill()
    holder.wait()


HOLDER = """import sys
import time
from pathlib import Path
sys.path.insert(0, %r)
import engine
engine.take_folder(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(3600)
""" % str(Path(__file__).resolve().parent.parent)


PRETRAIN_REFUSALS = [
    # flags, each with its valid range
    (["--clip_grad", "-1"], "argument --clip_grad: must be in (0, inf), got -1"),
    (["--clip_grad", "0"], "argument --clip_grad: must be in (0, inf), got 0"),
    (["--weight_decay", "-0.05"], "argument --weight_decay: must be in [0, inf), got -0.05"),
    (["--weight_decay_end", "-1"], "argument --weight_decay_end: must be in [0, inf)"),
    (["--lr", "-1"], "argument --lr: must be in (0, inf), got -1"),
    (["--lr", "nan"], "argument --lr: must be in (0, inf), got nan"),
    (["--min_lr", "inf"], "argument --min_lr: must be in [0, inf), got inf"),
    (["--opt_betas", "0.9", "1.5"], "argument --opt_betas: must be in [0, 1), got 1.5"),
    (["--opt_betas", "0.9"], "argument --opt_betas: expected 2 arguments"),
    (["--opt_eps", "-1"], "argument --opt_eps: must be in (0, inf), got -1"),
    (["--opt_eps", "0"], "argument --opt_eps: must be in (0, inf), got 0"),
    (["--warmup_epochs", "-1"], "argument --warmup_epochs: must be in [0, inf), got -1"),
    (["--warmup_steps", "-2"], "argument --warmup_steps: must be in [-1, inf), got -2"),
    (["--sampling_rate", "0"], "argument --sampling_rate: must be in [1, inf), got 0"),
    (["--num_workers", "-1"], "argument --num_workers: must be in [0, inf), got -1"),
    (["--device", "foo"], "argument --device: expected cpu, cuda or cuda:N, got 'foo'"),
    (["--seed", str(10 ** 23)], "argument --seed: must be in [0, 4294967295], got 1000000000000000000000"),
    (["--epochs", "1e9"], "argument --epochs: expected an integer in [1, 100000], got '1e9'"),
    (["--epochs", "1000000000"], "argument --epochs: must be in [1, 100000], got 1000000000"),
    (["--epochs", "100000", "--synthetic_size", "2000", "--batch_size", "1"],
     "= 200000000 optimizer steps, more than 1e+07"),
    (["--batch_size", "0"], "argument --batch_size: must be in [1, inf), got 0"),
    (["--batch_size", "32"], "--batch_size 32 x --accum_iter 1 x 1 processes is more than the 16 videos"),
    (["--accum_iter", "0"], "argument --accum_iter: must be in [1, inf), got 0"),
    (["--num_sample", "0"], "argument --num_sample: must be in [1, inf), got 0"),
    (["--log_every", "0"], "argument --log_every: must be in [1, inf), got 0"),
    (["--save_ckpt_freq", "0"], "argument --save_ckpt_freq: must be in [1, inf), got 0"),
    (["--synthetic_size", "0"], "argument --synthetic_size: must be in [1, inf), got 0"),
    (["--mask_ratio", "1.2"], "argument --mask_ratio: must be in (0, 1), got 1.2"),
    (["--decoder_mask_ratio", "1"], "argument --decoder_mask_ratio: must be in [0, 1), got 1"),
    (["--decoder_mask_ratio", "0.6"], "--decoder_mask_type run_cell with --decoder_mask_ratio 0.6 on a (2, 2, 2) "
                                      "token grid: a 2x2 running cell cannot hide a share of 0.6"),
    (["--mask_type", "run_cell", "--mask_ratio", "0.3"], "--mask_type run_cell with --mask_ratio 0.3"),
    (["--decoder_depth", "0"], "argument --decoder_depth: must be in [1, inf), got 0"),
    (["--drop_path", "1"], "argument --drop_path: must be in [0, 1), got 1"),
    (["--max_bad_fraction", "1.5"], "argument --max_bad_fraction: must be in [0, 1], got 1.5"),
    (["--num_frames", "0"], "argument --num_frames: must be in [1, 1024], got 0"),
    (["--num_frames", "15"], "--num_frames=15"),
    (["--input_size", "100"], "--input_size=100"),
    (["--input_size", "5000"], "argument --input_size: must be in [1, 4096], got 5000"),
    (["--tubelet_size", "0"], "argument --tubelet_size: must be in [1, inf), got 0"),
    (["--fname_tmpl", "img_{}_{}.jpg"], "argument --fname_tmpl: 'img_{}_{}.jpg' does not format with a frame number"),
    (["--fname_tmpl", "img_{:05d"], "argument --fname_tmpl: 'img_{:05d' does not format"),
    (["--fname_tmpl", "img.jpg"], "argument --fname_tmpl: 'img.jpg' gives every frame the name img.jpg"),
    (["--model", "enormous"], "--model enormous"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--data_path", "/no/such/list.csv"], "--data_path /no/such/list.csv: no such file"),
    (["--fsdp"], "--fsdp needs a process group"),
    # list lines and files: all bad lines at once, every listed path checked before the first step
    (["--data_path", "{d}/minus5.csv"], "minus5.csv:1: expected total_frames > 0 (a folder of frames) or -1 (a video "
     "file) and start_idx >= 0, got start_idx 1, total_frames -5"),
    (["--data_path", "{d}/many.csv"], "3 problems:\n  {d}/many.csv:1: expected 'path', 'path label'"),
    (["--data_path", "{d}/many.csv"], "many.csv:3: total_frames is 0 (use -1 for a video file)\n  {d}/many.csv:4: "),
    (["--data_path", "{d}/blank.csv"], "blank.csv: no clips found"),
    (["--data_path", "{d}/missing.csv"], "2 problems:\n  {d}/gone1.mp4: no such file\n  {d}/gone2.mp4: no such file"),
    (["--data_path", "{d}/missing.csv", "--skip_bad_videos", "--max_bad_fraction", "0.5"],
     "2 of 3 videos are unreadable, more than max_bad_fraction=0.5"),
    (["--data_path", "{d}/empty.csv"], "empty.mp4: empty file"),
    (["--data_path", "{d}/short.csv"], "img_00016.jpg: missing, so {d}/frames has fewer frames than its list line"),
    (["--data_path", "{d}/corrupt.csv", "--num_workers", "1"], "garbage.mp4: OpenCV cannot open"),  # found in epoch 0
    (["--finetune", "{d}/garbage.pth"], "garbage.pth: cannot be read as a weights-only checkpoint"),
    # states: checkpoints to resume from, the output folder
    (["--resume", "{d}/weights_only.pth"], "weights_only.pth: not a training checkpoint (it has no optimizer, epoch); "
     "to start from its weights, pass it as --finetune"),
    (["--resume", "{d}/garbage.pth"], "garbage.pth: cannot be read as a weights-only checkpoint"),
    (["--resume", "{d}/lacking.pth"], "lacking.pth: it does not fit this model (a checkpoint of another model, size or "
     "recipe, or an incomplete file): missing: encoder.blocks.1.mlp.fc2.bias"),
    (["--resume", "{d}/classifier.pth"], "cannot resume from {d}/classifier.pth: it does not fit this model"),
    (["--resume", "{d}/nonfinite.pth"], "cannot resume from {d}/nonfinite.pth: non-finite weights in "
     "encoder.blocks.0.attn.qkv.weight"),
    (["--resume", "{d}/run/checkpoint-last.pth", "--batch_size", "2", "--mask_ratio", "0.5"],
     "resuming would mix two runs:\n  --batch_size: 4 in the checkpoint, 2 now\n  --epochs: 1 in the checkpoint, 3 now"
     "\n  --mask_ratio: 0.75 in the checkpoint, 0.5 now\nUse the checkpoint's values"),
    (["--resume", "{d}/run/checkpoint-last.pth", "--seed", "1", "--no-normalize_target", "--lr", "0.1"], "--seed: 0 in "
     "the checkpoint, 1 now"),
    (["--resume", "{d}/other_data.pth"], "data: '1000 videos, 0123456789ab' in the checkpoint, '16 videos, "),
    (["--resume", "{d}/two_processes.pth"], "processes: 2 in the checkpoint, 1 now"),
    (["--output_dir", "{d}/locked"], "--output_dir {d}/locked is in use by another run (pid "),
    (["--output_dir", "{d}/a_file/out"], "--output_dir {d}/a_file/out: cannot write there"),
]


@pytest.mark.parametrize("flags,message", PRETRAIN_REFUSALS, ids=[" ".join(f) for f, _ in PRETRAIN_REFUSALS])
def test_pretraining_refuses_bad_input_by_name(flags, message, bad_inputs, micro, tmp_path, capsys, monkeypatch):
    flags = [f.replace("{d}", str(bad_inputs)) for f in flags]
    err = refused(tp.main, cli(tmp_path / "out", *flags), capsys, monkeypatch,
                  before_first_step="corrupt.csv" not in " ".join(flags))
    assert message.replace("{d}", str(bad_inputs)) in err


def test_the_demo_builds_the_laptop_size_with_masks_it_can_make():
    """No flags: the demo size at 32 px, whose 4 x 4 frame a 75 % tube mask leaves 4 cubes of and a 50 %
    running cell halves; the laptop size is not one of the reference's and so has no reference name."""
    args, cfg, masks, _ = tp.parse_args([])
    assert args.model == "demo" and cfg.grid == (4, 4, 4) and cfg.embed_dim == 64
    drawn = masks.draw(3)
    assert masks.num_visible == 4 * 4 and masks.num_queries == 64 // 2
    assert ((~drawn.encoder).sum(1) == masks.num_visible).all() and ((~drawn.decoder).sum(1) == masks.num_queries).all()
    assert "demo" not in vmae.ALIASES.values() and set(vmae.ALIASES.values()) == set(vmae.PAPER_SIZES)


# -----------------------------------------------------------------------------------------------------
# Two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_when_done(rank: int, fn, *args) -> None:
    """fn, then exit at once: at interpreter exit gloo's worker thread can abort the process after the work is
    done ("terminate called without an active exception"); helpers that destroy the group themselves lack
    engine.leave_process_group's pause against it."""
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_processes(fn, world: int, *args, timeout: float = 300):
    """fn(rank, world, port, *args) in `world` fresh processes; a hang fails the test instead of CI."""
    context = mp.spawn(exit_when_done, args=(fn, world, free_port(), *args), nprocs=world, join=False)
    deadline = time.time() + timeout
    while not context.join(timeout=5):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish in {timeout} s")


def torchrun_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def ddp_gradients(rank: int, world: int, port: int, video, masks, result_file: str):
    """Gradients after one backward on this rank's share of a fixed global batch, under DDP."""
    torchrun_env(rank, world, port)
    dist = engine.setup_distributed("cpu")
    torch.manual_seed(0)
    model = vmae.PretrainVideoMAE(vmae.config("small", **MICRO, img_size=32, num_frames=8))
    model = engine.wrap_model(model, dist, fsdp=False, precision="fp32")
    share = slice(rank * len(video) // world, (rank + 1) * len(video) // world)
    pred = model(video[share], masks.visible[share], masks.queries[share])
    target = vmae.reconstruction_target(video[share], masks.queries[share], 16, 2)
    vmae.pretrain_loss(pred, target, masks.in_loss[share]).backward()  # DDP averages the gradients
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, result_file)
    del model  # before the group, as main() does (a gloo teardown deadlock otherwise)
    torch.distributed.destroy_process_group()


def test_two_process_ddp_gradients_equal_one_process_with_the_same_global_batch(tmp_path):
    """With T' a multiple of 4, tube x running cell leaves every clip the same number of loss cubes, so
    the mean of the two halves' losses is the whole batch's loss, and DDP's averaged gradient must equal
    the one-process gradient (hence the update)."""
    grid = (4, 2, 2)
    video = torch.randn(4, 3, 8, 32, 32)
    masks = masking.MaskConfig(grid, "tube", 0.75, "run_cell", 0.5).draw(4)
    assert (masks.in_loss.sum(dim=1) == 6).all()
    grads = []
    for world in (1, 2):
        out = str(tmp_path / f"world{world}.pt")
        run_processes(ddp_gradients, world, video, masks, out)
        grads.append({k.removeprefix("module."): v for k, v in torch.load(out, weights_only=True).items()})
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-7, rtol=1e-5, msg=lambda m: f"{key}: {m}")


def ddp_main(rank: int, world: int, port: int, out: str, *flags: str):
    torchrun_env(rank, world, port)
    vmae.SIZES["micro"] = MICRO  # this process's own copy of the table
    tp.main(cli(out, "--epochs", "2", *flags))


def test_two_process_run_end_to_end_writes_once(tmp_path):
    run_processes(ddp_main, 2, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # one line per epoch: only rank 0 writes
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert state["args"]["batch_size"] == 4 and state["step"] == 2 * 2  # 16 videos / (4 x 2 processes) per epoch


def test_two_process_fsdp_matches_ddp_and_saves_a_plain_checkpoint(tmp_path):
    """FSDP shards parameters, gradients and optimizer state; the first epoch's losses must be DDP's (same
    initial weights, data and masks), and the checkpoint one ordinary state dict."""
    run_processes(ddp_main, 2, str(tmp_path / "ddp"))
    run_processes(ddp_main, 2, str(tmp_path / "fsdp"), "--fsdp")
    losses = [json.loads((tmp_path / run / "log.txt").read_text().splitlines()[0])["train_loss"]
              for run in ("ddp", "fsdp")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    state = torch.load(tmp_path / "fsdp" / "checkpoint-last.pth", weights_only=True)
    model = vmae.PretrainVideoMAE(vmae.config("small", **MICRO, img_size=32, num_frames=4))
    model.load_state_dict(state["model"], strict=True)
    assert all(type(v) is torch.Tensor for v in state["model"].values())  # gathered: no DTensor shards
