"""The pretraining recipe: schedules and optimizer groups against the reference, the CLI end to end on a
micro model, resume, DDP, and bad flags."""
import json
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import engine
import masking
import train_pretrain as tp
import vmae
from conftest import config_from_reference, golden

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
    enc = masking.tube_mask(4, cfg.grid, 0.75)
    dec = masking.running_cell_mask(4, cfg.grid, 0.5) if dual else None
    target = vmae.reconstruction_target(video, cfg.patch_size, cfg.tubelet_size)
    losses = []
    for _ in range(80):
        loss = vmae.pretrain_loss(model(video, enc, dec), target, enc, dec)
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
    assert names == ["checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-last.pth", "log.txt", "loss.png", "recon.png"]
    rows = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all(np.isfinite(r["train_loss"]) for r in rows)
    state = torch.load(tmp_path / "checkpoint-2.pth", weights_only=True)
    assert set(state) >= {"model", "optimizer", "epoch", "scaler", "args", "step"}
    assert state["epoch"] == 2 and state["step"] == 3 * 4
    model = vmae.PretrainVideoMAE(vmae.config_from_checkpoint(vmae.read_checkpoint(tmp_path / "checkpoint-2.pth")))
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


@pytest.mark.parametrize("flags,message", [
    (["--model", "enormous"], "--model enormous"),
    (["--mask_ratio", "1.2"], "--mask_ratio"),
    (["--decoder_mask_ratio", "0.6"], "0.6"),
    (["--input_size", "100"], "--input_size=100"),
    (["--num_frames", "15"], "--num_frames=15"),
    (["--batch_size", "0"], "--batch_size"),
    (["--data_path", "/no/such/list.csv"], "--data_path /no/such/list.csv"),
    (["--precision", "fp8"], "--precision"),
])
def test_bad_flags_name_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit):
        tp.parse_args(flags)
    assert message in capsys.readouterr().err


def test_the_demo_builds_the_laptop_size_with_masks_it_can_make():
    """No flags: the demo size at 32 px, whose 4 x 4 frame a 75 % tube mask leaves 4 cubes of and a 50 %
    running cell halves; the laptop size is not one of the reference's and so has no reference name."""
    args = tp.parse_args([])
    assert args.model == "demo" and args.cfg.grid == (4, 4, 4) and args.cfg.embed_dim == 64
    enc, dec, num_visible, num_queries = tp.mask_config(args).draw(3, args.cfg.grid)
    assert num_visible == 4 * 4 and num_queries == 64 // 2
    assert ((~enc).sum(1) == num_visible).all() and ((~dec).sum(1) == num_queries).all()
    assert "demo" not in vmae.ALIASES.values() and set(vmae.ALIASES.values()) == set(vmae.PAPER_SIZES)


def test_dataset_smaller_than_a_batch_is_an_error(micro, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        engine.run(tp.main, cli(tmp_path, "--batch_size", "32"))
    assert stop.value.code == 2 and "--batch_size 32" in capsys.readouterr().err


# -----------------------------------------------------------------------------------------------------
# Two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(fn, world: int, *args, timeout: float = 300):
    """fn(rank, world, port, *args) in `world` fresh processes; a hang fails the test instead of CI."""
    context = mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=False)
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


def ddp_gradients(rank: int, world: int, port: int, video, enc, dec, result_file: str):
    """Gradients after one backward on this rank's share of a fixed global batch, under DDP."""
    torchrun_env(rank, world, port)
    d = engine.setup_distributed("cpu")
    torch.manual_seed(0)
    model = vmae.PretrainVideoMAE(vmae.config("small", **MICRO, img_size=32, num_frames=8))
    model = engine.wrap_model(model, d, fsdp=False, precision="fp32")
    share = slice(rank * len(video) // world, (rank + 1) * len(video) // world)
    pred = model(video[share], enc[share], dec[share])
    target = vmae.reconstruction_target(video[share], 16, 2)
    vmae.pretrain_loss(pred, target, enc[share], dec[share]).backward()  # DDP averages the gradients
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, result_file)
    del model  # before the group, as main() does (a gloo teardown deadlock otherwise)
    dist.destroy_process_group()


def test_two_process_ddp_gradients_equal_one_process_with_the_same_global_batch(tmp_path):
    """With T' a multiple of 4, tube x running cell leaves every clip the same number of loss cubes, so
    the mean of the two halves' losses is the whole batch's loss, and DDP's averaged gradient must equal
    the one-process gradient (hence the update)."""
    grid = (4, 2, 2)
    video = torch.randn(4, 3, 8, 32, 32)
    enc, dec = masking.tube_mask(4, grid, 0.75), masking.running_cell_mask(4, grid, 0.5)
    assert ((enc & ~dec).sum(dim=1) == 6).all()
    grads = []
    for world in (1, 2):
        out = str(tmp_path / f"world{world}.pt")
        run_processes(ddp_gradients, world, video, enc, dec, out)
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
    losses = [json.loads((tmp_path / run / "log.txt").read_text().splitlines()[0])["train_loss"] for run in ("ddp", "fsdp")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    state = torch.load(tmp_path / "fsdp" / "checkpoint-last.pth", weights_only=True)
    model = vmae.PretrainVideoMAE(vmae.config("small", **MICRO, img_size=32, num_frames=4))
    model.load_state_dict(state["model"], strict=True)
    assert all(type(v) is torch.Tensor for v in state["model"].values())  # gathered: no DTensor shards
