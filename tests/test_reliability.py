"""Nothing silent, nothing lost: what engine.py guards for both recipes, tried the way bad luck tries it.
Every numeric flag of every script has a stated range; a resume that would mix two runs stops unless told;
a killed run (SIGKILL between an epoch's files) reruns to exactly the uninterrupted run's files; read-only,
small and full disks are found and named; weights gone non-finite stop the run at the real last good
checkpoint; a folder held by one run stops the next, stale locks are taken over; a refusal on rank 0 reaches
every process. (Each recipe's table of bad flags, lines, files and states is in its own test file.)"""
import argparse
import errno
import gc
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import data
import engine
import train_pretrain as tp
import vmae
from conftest import export_videos
from test_train_pretrain import MICRO, cli, micro, refused, run_processes, torchrun_env  # noqa: F401 (micro: a fixture)

ROOT = Path(__file__).resolve().parent.parent


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


# -----------------------------------------------------------------------------------------------------
# Flags


def test_a_range_takes_the_interval_it_states():
    Range = engine.Range
    unit, positive, count = Range(float, 0, 1, open_high=True), Range(float, 0, open_low=True), Range(int, 1, 100)
    assert (str(unit), str(positive), str(count)) == ("[0, 1)", "(0, inf)", "[1, 100]")
    assert unit("0") == 0 and unit("0.999") == 0.999 and positive("1e-30") == 1e-30 and count("100") == 100
    for parse, text in [(unit, "1"), (unit, "-0.0001"), (unit, "nan"), (positive, "0"), (positive, "inf"),
                        (positive, "-inf"), (count, "0"), (count, "101"), (count, "1.5"), (count, "1e2"),
                        (count, str(10 ** 400)), (unit, "x")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def scripts() -> list[str]:
    """The command-line scripts: every top-level module with a parse_args (a new one is covered by itself)."""
    return sorted(p.stem for p in ROOT.glob("*.py") if "\ndef parse_args(" in p.read_text())


@pytest.mark.parametrize("name", scripts())
def test_every_numeric_flag_states_its_valid_range(name, monkeypatch):
    """No flag of any script parses a bare int or float: each takes engine.Range (or another checking type),
    so a value out of range stops at parse time with the flag's name."""
    class Parsed(Exception):
        pass

    def catch(parser, *args, **kwargs):
        raise Parsed(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(Parsed) as parsed:
        importlib.import_module(name).parse_args([])
    actions = parsed.value.args[0]._actions
    bare = [a.option_strings or a.dest for a in actions if a.type in (int, float)]
    assert not bare, f"{name}.py: numeric flags without a range: {bare}"


# -----------------------------------------------------------------------------------------------------
# Resuming: the same run or a refusal


def test_resume_with_a_changed_flag_is_refused_and_allowed_with_the_override(micro, tmp_path, capsys, monkeypatch):
    tp.main(cli(tmp_path, "--epochs", "1"))
    before = (tmp_path / "checkpoint-last.pth").read_bytes()
    err = refused(tp.main, cli(tmp_path, "--epochs", "2", "--log_every", "1", "--num_workers", "1"),
                  capsys, monkeypatch)
    assert "--epochs: 1 in the checkpoint, 2 now" in err and "--log_every" not in err and "--num_workers" not in err
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == before and len(rows(tmp_path)) == 1  # nothing touched

    tp.main(cli(tmp_path, "--epochs", "2", "--allow_resume_changes"))
    assert "--allow_resume_changes: continuing with\n  --epochs: 1 in the checkpoint, 2 now" in capsys.readouterr().out
    first, note, second = rows(tmp_path)
    assert (first["epoch"], second["epoch"]) == (0, 1)
    assert note == dict(resumed_from=str(tmp_path / "checkpoint-last.pth"), at_epoch=1,
                        changes=["--epochs: 1 in the checkpoint, 2 now"])
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["args"]["epochs"] == 2


# -----------------------------------------------------------------------------------------------------
# A kill at any moment: the rerun ends where the uninterrupted run ends

KILLABLE = """
import os, signal, sys
sys.path.insert(0, {root!r})
import engine, train_pretrain, vmae
vmae.SIZES["micro"] = {micro!r}
kill_at, renames, replace = int(os.environ.get("KILL_AT", 0)), [0], os.replace

def replace_or_die(src, dst):  # the n-th file put in place: SIGKILL just before it
    renames[0] += 1
    if renames[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    replace(src, dst)

os.replace = replace_or_die
engine.run(train_pretrain.main, sys.argv[1:], preemptible=True)
"""


def run_killable(out: Path, kill_at: int = 0, *flags: str) -> subprocess.CompletedProcess:
    script = KILLABLE.format(root=str(ROOT), micro=MICRO)
    env = dict(os.environ, KILL_AT=str(kill_at), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    flags = cli(out, "--epochs", "3", "--synthetic_size", "8", "--save_ckpt_freq", "1", *flags)
    return subprocess.run([sys.executable, "-c", script, *flags], env=env, capture_output=True, text=True, timeout=300)


def test_a_sigkill_between_an_epochs_writes_loses_nothing(tmp_path):
    """Each epoch puts three files in place, each by a rename: checkpoint-<epoch>.pth, log.txt, and last
    checkpoint-last.pth, which commits the epoch. Killed before epoch 1's log.txt (its checkpoint-1.pth
    already written), then before epoch 2's checkpoint-last.pth (its log line already written), then rerun:
    the files must be the uninterrupted run's, and no temporary file may be left."""
    assert run_killable(tmp_path / "straight").returncode == 0
    out = tmp_path / "killed"
    assert run_killable(out, kill_at=5).returncode == -signal.SIGKILL
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 0 and len(rows(out)) == 1
    assert list(out.glob(".*.tmp*"))  # what the kill left
    # renames: 1 checkpoint-1, 2 log, 3 last; 4, 5, 6 epoch 2
    assert run_killable(out, kill_at=6).returncode == -signal.SIGKILL
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 1 and len(rows(out)) == 3
    assert run_killable(out).returncode == 0

    timeless = lambda rs: [{k: v for k, v in r.items() if not k.endswith(("time_s", "per_s"))}  # noqa: E731
                           for r in rs]
    assert timeless(rows(out)) == timeless(rows(tmp_path / "straight"))
    assert not list(out.glob(".*.tmp*")) and (out / ".lock").read_text() == ""
    for name in ("checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-last.pth"):
        a, b = (torch.load(run / name, weights_only=True) for run in (tmp_path / "straight", out))
        assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
        assert {**a["args"], "output_dir": None} == {**b["args"], "output_dir": None}
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), f"{name}: {key}"
        for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert all(torch.equal(x[k], y[k]) for k in x), name


def test_a_run_ended_by_an_error_in_a_data_worker_exits(tmp_path):
    """A data worker that meets an unreadable video ends the run with an error, and the worker, whose loader
    the error interrupted, is still running: it ignores SIGTERM, with which multiprocessing ends workers at
    exit, so the run must end it otherwise or wait for it forever."""
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(5000))
    (tmp_path / "corrupt.csv").write_text(f"{tmp_path}/garbage.mp4\n" * 4)
    run = run_killable(tmp_path / "out", 0, "--data_path", str(tmp_path / "corrupt.csv"), "--num_workers", "1")
    assert run.returncode == 2 and "garbage.mp4: OpenCV cannot open it" in run.stderr


# -----------------------------------------------------------------------------------------------------
# The output folder: writable, roomy, one writer


def test_a_read_only_output_folder_fails_before_the_first_step(micro, tmp_path, capsys, monkeypatch):
    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o555)
    if os.access(out, os.W_OK):  # root writes anyway: fail its writes there as a read-only file system does
        real_open = os.open

        def read_only(path, flags, *args, **kwargs):
            if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", read_only)
    err = refused(tp.main, cli(out), capsys, monkeypatch)
    assert f"--output_dir {out}: cannot write there" in err


def test_a_full_disk_is_named_and_replaces_nothing(micro, tmp_path, capsys, monkeypatch):
    tp.main(cli(tmp_path, "--epochs", "1"))
    before = (tmp_path / "checkpoint-last.pth").read_bytes()
    real, full = shutil.disk_usage, []

    def disk_fills_up(state, path, *args, **kwargs):  # what torch.save does when the disk is full
        Path(path).write_bytes(b"\0" * 100)
        full.append(path)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", disk_fills_up)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=0 if full else real(path).free))
    err = refused(tp.main, cli(tmp_path, "--epochs", "2", "--allow_resume_changes"), capsys, monkeypatch,
                  before_first_step=False)
    assert f"cannot write {tmp_path / 'checkpoint-1.pth'}: no space left on the device" in err
    assert "enforce fail" not in err and not list(tmp_path.glob(".*.tmp*"))
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == before
    assert [r["epoch"] for r in rows(tmp_path) if "epoch" in r] == [0]


def test_a_stale_lock_is_taken_over_with_a_note(micro, tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".lock").write_text("pid 99999999 on a-host-that-crashed\n")
    (tmp_path / ".checkpoint-last.pth.99999999.tmp").write_bytes(b"half a checkpoint")
    tp.main(cli(tmp_path, "--epochs", "1"))
    printed = capsys.readouterr().out
    assert "taking over from a run that ended without releasing it (pid 99999999 on a-host-that-crashed)" in printed
    assert "removed 1 temporary file(s)" in printed and (tmp_path / ".lock").read_text() == ""


def held_folder(rank: int, world: int, port: int, out: str, report: str):
    torchrun_env(rank, world, port)
    vmae.SIZES["micro"] = MICRO
    try:
        tp.main(cli(out))
    except engine.RunError as e:
        Path(report.format(rank)).write_text(str(e))
    dist.destroy_process_group()


def test_a_refusal_on_rank_zero_reaches_every_process(tmp_path):
    """Only rank 0 takes the folder; its refusal must stop rank 1 too, not leave it waiting in a collective."""
    lock = engine.take_folder(tmp_path / "out")
    try:
        run_processes(held_folder, 2, str(tmp_path / "out"), str(tmp_path / "rank{}.txt"), timeout=120)
    finally:
        engine.release_folder(lock)
    for rank in (0, 1):
        assert "is in use by another run" in (tmp_path / f"rank{rank}.txt").read_text()


# -----------------------------------------------------------------------------------------------------
# Non-finite numbers


def test_nonfinite_weights_or_loss_stop_at_the_real_last_good_checkpoint(micro, tmp_path, capsys, monkeypatch):
    """Weights that go non-finite on an epoch's last step (the loss still finite) are not saved, and the
    message names the checkpoint that is good: checkpoint-last.pth of epoch 0, not the epoch that failed."""
    real, gathered = engine.get_model_state_dict, []

    def poisoned(model, options):
        state = real(model, options=options)
        gathered.append(1)
        if len(gathered) == 2:  # epoch 1's weights
            state["decoder.head.weight"] = torch.full_like(state["decoder.head.weight"], float("nan"))
        return state
    monkeypatch.setattr(engine, "get_model_state_dict", poisoned)
    err = refused(tp.main, cli(tmp_path), capsys, monkeypatch, before_first_step=False)
    assert "the weights became non-finite in epoch 1 (decoder.head.weight)" in err
    assert f"The last good checkpoint is {tmp_path / 'checkpoint-last.pth'} (epoch 0)" in err
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["epoch"] == 0 and len(rows(tmp_path)) == 1

    monkeypatch.setattr(engine, "get_model_state_dict", real)
    loss = vmae.pretrain_loss
    monkeypatch.setattr(vmae, "pretrain_loss", lambda *a, **k: loss(*a, **k) * float("nan"))
    err = refused(tp.main, cli(tmp_path), capsys, monkeypatch, before_first_step=False)  # resumes at epoch 1
    assert "loss became non-finite at optimizer step 4" in err
    assert f"The last good checkpoint is {tmp_path / 'checkpoint-last.pth'} (epoch 0)" in err


def nan_on_rank_one(rank: int, world: int, port: int, out: str, report: str):
    """Rank 1's loss alone goes non-finite at its third micro-batch; rank 0's stays finite there."""
    torchrun_env(rank, world, port)
    vmae.SIZES["micro"] = MICRO
    calls, loss = [0], vmae.pretrain_loss

    def sometimes_nan(*a, **k):
        calls[0] += 1
        return loss(*a, **k) * (float("nan") if rank == 1 and calls[0] == 3 else 1.0)
    vmae.pretrain_loss = sometimes_nan
    try:
        tp.main(cli(out, "--log_every", "1"))
    except engine.RunError as e:
        Path(report.format(rank)).write_text(str(e))
    gc.collect()  # the stopped run's DDP model before its process group (a gloo teardown race otherwise)
    dist.destroy_process_group()


def test_a_nonfinite_loss_on_one_process_stops_every_process(tmp_path):
    """At the step it is read, the first bad step of any process stops all of them, instead of leaving the
    others waiting in their next gradient all-reduce for the one that stopped."""
    run_processes(nan_on_rank_one, 2, str(tmp_path / "out"), str(tmp_path / "rank{}.txt"), timeout=120)
    for rank in (0, 1):
        assert "loss became non-finite at optimizer step 2" in (tmp_path / f"rank{rank}.txt").read_text()


def test_starting_afresh_sets_the_previous_run_aside(micro, tmp_path, capsys):
    """--no-auto_resume into a folder with another run's files: they move into a sub-folder of their own, and
    the new run's log.txt and checkpoints hold the new run alone."""
    tp.main(cli(tmp_path, "--epochs", "2", "--save_ckpt_freq", "1"))
    before = rows(tmp_path)
    tp.main(cli(tmp_path, "--epochs", "1", "--no-auto_resume", "--lr", "1e-2"))
    aside = list(tmp_path.glob("replaced-*"))
    assert len(aside) == 1 and "the 4 file(s) of the run there before" in capsys.readouterr().out
    assert sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth",
                                                          "log.txt"]
    assert [r["epoch"] for r in rows(tmp_path)] == [0] and rows(aside[0]) == before
    assert not (tmp_path / "checkpoint-1.pth").exists()


def checked_list(rank: int, world: int, port: int, list_file: str, report: str):
    torchrun_env(rank, world, port)
    d = engine.setup_distributed("cpu")
    try:
        data.build_pretrain_dataset(list_file, num_frames=4, input_size=32, share=engine.file_share(d))
    except data.VideoError as e:
        Path(report.format(rank)).write_text(str(e))
    dist.destroy_process_group()


def test_two_processes_split_the_file_checks_and_both_know_every_bad_file(tmp_path):
    """Each process stats every other listed file; after the exchange both refuse with the full list."""
    missing = [str(tmp_path / f"gone{i}.mp4") for i in range(5)]
    (tmp_path / "list.csv").write_text("".join(f"{m} 0 -1\n" for m in missing))
    run_processes(checked_list, 2, str(tmp_path / "list.csv"), str(tmp_path / "rank{}.txt"), timeout=120)
    reports = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert reports[0] == reports[1] and reports[0].startswith("5 problems")
    assert all(m in reports[0] for m in missing)


def sees(rank: int, world: int, port: int, report: str):
    torchrun_env(rank, world, port)
    d = engine.setup_distributed("cpu")
    try:
        engine.same_everywhere(d, ("out/checkpoint-last.pth", 1234 if rank == 0 else "no such file"),
                               "checkpoint to resume from", "a shared folder")
        Path(report.format(rank)).write_text("went on")
    except engine.RunError as e:
        Path(report.format(rank)).write_text(str(e))
    dist.destroy_process_group()


def test_processes_that_see_different_checkpoints_all_stop_instead_of_training_apart(tmp_path):
    """An output folder that is not shared (rank 0 finds checkpoint-last.pth, rank 1 does not): every
    process stops with a message naming what each saw, none resumes alone and waits forever."""
    run_processes(sees, 2, str(tmp_path / "rank{}.txt"), timeout=120)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == (
            "the processes do not see the same checkpoint to resume from: rank 0 ('out/checkpoint-last.pth', 1234), "
            "rank 1 ('out/checkpoint-last.pth', 'no such file'); a shared folder")


def skipping(rank: int, world: int, port: int, folder: str, report: str):
    torchrun_env(rank, world, port)
    d = engine.setup_distributed("cpu")
    samples = [data.Sample(f"{folder}/v{i}.mp4", 0, -1, -1) for i in range(10)]
    dataset = data.PretrainDataset(data.VideoList(samples), skip_bad_videos=True, max_bad_fraction=0.25)
    lines = []
    for skipped_here in ([0], [0, 1 + rank]):  # epoch 1: both skipped v0; epoch 2: one more each, v1 and v2
        for i in skipped_here:
            dataset._bad[i] = 1
        try:
            lines.append(str(engine.skipped_videos(d, dataset)))
        except data.VideoError as e:
            lines.append(str(e))
    Path(report.format(rank)).write_text("\n".join(lines))
    dist.destroy_process_group()


def test_skipped_videos_are_counted_over_every_process_and_limited_there(tmp_path):
    """Each process skips what it met; the log counts the videos any process skipped (once each), and
    max_bad_fraction holds for them together: 3 of 10 is past 0.25, though each process skipped only 2."""
    run_processes(skipping, 2, str(tmp_path), str(tmp_path / "rank{}.txt"), timeout=120)
    for rank in (0, 1):
        first, second = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert first == "1" and second.startswith("3 of 10 videos are unreadable, more than max_bad_fraction=0.25")


# -----------------------------------------------------------------------------------------------------
# The tools keep the recipes' promises: each case of a reliability probe, with what it must do now

def tool_inputs(tmp_path: Path) -> dict:
    """Three tiny videos, a micro classifier's checkpoint, the same with NaN weights, and another one."""
    videos = tmp_path / "videos"
    export_videos(data.SyntheticVideos(3, length=24, height=36, width=48), str(tmp_path), "videos")
    args = {"model": "micro", "input_size": 32, "num_frames": 4}
    model = vmae.VideoClassifier(vmae.config("micro", img_size=32, num_frames=4), 5)
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "ckpt.pth")
    nan = {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"model": nan, "args": args}, tmp_path / "nan.pth")
    other = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"model": other, "args": args}, tmp_path / "other.pth")
    (tmp_path / "a_file").write_text("")
    return dict(videos=str(videos), ckpt=str(tmp_path / "ckpt.pth"), nan=str(tmp_path / "nan.pth"),
                other=str(tmp_path / "other.pth"), a_file=str(tmp_path / "a_file"))


def extract(paths, out, checkpoint="ckpt") -> list[str]:
    return ["--checkpoint", paths[checkpoint], "--data_path", paths["videos"], "--output_dir", str(out),
            "--num_workers", "0", "--device", "cpu"]


def export(paths, out, checkpoint="ckpt", *extra) -> list[str]:
    return ["--checkpoint", paths[checkpoint], "--output_dir", str(out), *extra]


def first(run: list) -> None:
    """Steps before the case: tool runs that must succeed."""
    import export_hf
    import extract_features
    for tool, argv in run:
        engine.run({"extract": extract_features.main, "export": export_hf.main}[tool], argv)


# (case, steps before it, the tool and its argv, what stderr must say, what the output folder must not hold)
TOOL_CASES = [
    ("extraction from NaN weights", [], ("extract", lambda p, o: extract(p, o, "nan")),
     "non-finite weights (NaN or infinity) in", "*.npy"),
    ("export of NaN weights", [], ("export", lambda p, o: export(p, o, "nan")),
     "non-finite weights (NaN or infinity) in", "*.safetensors"),
    ("extraction resumed with other weights under the same path",
     [("extract", lambda p, o: extract(p, o))], ("extract", lambda p, o: extract(p, o, "other")),
     "holds features made from other weights or settings (weights: ", ".*.tmp*"),
    ("export into another model's folder", [], ("export", lambda p, o: export(p, o)),
     "holds other files (preprocessor_config.json, pytorch_model.bin): from_pretrained could read a mix",
     "model.safetensors"),
    ("extraction into a file", [], ("extract", lambda p, o: extract(p, Path(p["a_file"]))),
     "a_file: cannot write there", "*"),
    ("export into a file", [], ("export", lambda p, o: export(p, Path(p["a_file"]))),
     "a_file: cannot write there", "*"),
]


@pytest.mark.parametrize("case, before, tool, message, absent", TOOL_CASES, ids=[c[0] for c in TOOL_CASES])
def test_the_tools_refuse_by_name_and_leave_nothing_wrong(case, before, tool, message, absent, tmp_path, capsys,
                                                          monkeypatch):
    import export_hf
    import extract_features
    monkeypatch.setitem(vmae.SIZES, "micro", MICRO)
    paths, out = tool_inputs(tmp_path), tmp_path / "out"
    if case == "export into another model's folder":
        out.mkdir()
        (out / "pytorch_model.bin").write_bytes(b"someone else's weights")
        (out / "preprocessor_config.json").write_text("{}")
    first([(name, argv(paths, out)) for name, argv in before])
    capsys.readouterr()
    name, argv = tool
    with pytest.raises(SystemExit) as stop:
        engine.run({"extract": extract_features.main, "export": export_hf.main}[name], argv(paths, out))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err, err
    if out.is_dir() and absent != "*":
        assert not (set(out.glob(absent)) - set(out.glob("**/video_*.npy")) if before else list(out.glob(absent)))


def test_an_export_overwrite_removes_what_from_pretrained_would_read(tmp_path, monkeypatch):
    """--overwrite clears another model's weights, config and preprocessor from the folder before writing;
    a rerun into our own earlier export replaces it without being told."""
    import export_hf
    monkeypatch.setitem(vmae.SIZES, "micro", MICRO)
    paths, out = tool_inputs(tmp_path), tmp_path / "hf"
    out.mkdir()
    for name in ("pytorch_model.bin", "preprocessor_config.json", "README.md"):
        (out / name).write_text("another model's")
    export_hf.main(export(paths, out, "ckpt", "--overwrite"))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    (out / "README.md").unlink()
    export_hf.main(export(paths, out, "other"))  # our own export: replaced
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_an_export_on_a_full_disk_is_a_message(tmp_path, capsys, monkeypatch):
    import safetensors.torch
    import export_hf
    monkeypatch.setitem(vmae.SIZES, "micro", MICRO)
    paths = tool_inputs(tmp_path)

    def disk_full(weights, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=0))
    with pytest.raises(SystemExit) as stop:
        engine.run(export_hf.main, export(paths, tmp_path / "hf"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "model.safetensors: no space left on the device" in err and "Traceback" not in err
    assert not list((tmp_path / "hf").iterdir())


def test_a_killed_extraction_leaves_nothing_a_rerun_keeps(tmp_path, capsys, monkeypatch):
    """A temporary .npy a kill left (anywhere below the folder) is removed by the rerun; a start that failed
    before any feature was written does not bind the folder to its settings."""
    import extract_features
    monkeypatch.setitem(vmae.SIZES, "micro", MICRO)
    paths, out = tool_inputs(tmp_path), tmp_path / "features"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / ".video_00000.mp4.12345.tmp.npy").write_bytes(b"half")
    (out / "extraction.json").write_text('{"num_frames": 16, "weights": "from a start that failed"}')
    extract_features.main(extract(paths, out))
    assert not list(out.rglob(".*.tmp*")) and "removed 1 temporary file(s)" in capsys.readouterr().out
    assert len(list(out.glob("*.npy"))) == 3


def test_a_list_line_with_spaces_in_its_path_says_why(tmp_path):
    (tmp_path / "list.csv").write_text("my video.mp4 0 -1\n")
    with pytest.raises(data.ListError, match="'video.mp4' is not a number: if it is part of the path"):
        data.read_pretrain_list(str(tmp_path / "list.csv"))


# -----------------------------------------------------------------------------------------------------
# The recipes' edges

def test_a_kill_before_the_final_figures_is_mended_by_the_rerun(micro, tmp_path):
    tp.main(cli(tmp_path, "--epochs", "1"))
    for name in ("loss.png", "recon.png"):
        (tmp_path / name).unlink()  # as if killed after the last checkpoint
    tp.main(cli(tmp_path, "--epochs", "1"))
    assert (tmp_path / "loss.png").exists() and (tmp_path / "recon.png").exists() and len(rows(tmp_path)) == 1


def test_no_epoch_left_is_said_and_changes_nothing(micro, tmp_path, capsys, monkeypatch):
    tp.main(cli(tmp_path, "--epochs", "2"))
    tp.main(cli(tmp_path, "--epochs", "2"))
    assert "has done all 2 epochs; nothing left to train" in capsys.readouterr().out
    err = refused(tp.main, cli(tmp_path, "--epochs", "1", "--allow_resume_changes"), capsys, monkeypatch)
    assert "has done 2 epochs and --epochs is 1: no epoch is left" in err and len(rows(tmp_path)) == 2


def test_nonfinite_optimizer_state_is_refused_on_resume(micro, tmp_path, capsys, monkeypatch):
    tp.main(cli(tmp_path, "--epochs", "1"))
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    moments = next(iter(state["optimizer"]["state"].values()))
    moments["exp_avg_sq"].fill_(float("nan"))
    torch.save(state, tmp_path / "checkpoint-last.pth")
    err = refused(tp.main, cli(tmp_path, "--epochs", "2"), capsys, monkeypatch)
    assert "non-finite optimizer state in" in err and "exp_avg_sq" in err


def test_a_file_that_fits_nothing_is_not_called_an_encoder(micro, tmp_path, capsys, monkeypatch):
    torch.save({"model": {"something.else": torch.zeros(3)}}, tmp_path / "alien.pth")
    err = refused(tp.main, cli(tmp_path / "out", "--finetune", str(tmp_path / "alien.pth")), capsys, monkeypatch)
    assert "holds no VideoMAE weights under any name the loader knows" in err and "an encoder" not in err


def test_too_little_space_is_said_in_a_unit_that_shows_it(micro, tmp_path, capsys, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=100_000))
    err = refused(tp.main, cli(tmp_path), capsys, monkeypatch)
    assert f"--output_dir {tmp_path}: 0.1 MiB free, but a checkpoint of this model needs about" in err
    assert "about 0.00 GiB" not in err


# -----------------------------------------------------------------------------------------------------
# Preemption: a scheduler's signal costs the step in progress, not the epoch


def at_step(step: int, then):
    """engine.set_schedules, which runs at the start of every optimizer step, doing then() at global `step`."""
    real, calls = engine.set_schedules, [0]

    def schedules(optimizer, lr, weight_decay):
        if calls[0] == step:
            then()
        calls[0] += 1
        return real(optimizer, lr, weight_decay)
    return schedules


def same_run(a: Path, b: Path) -> None:
    """The two runs' final checkpoints hold the same weights and optimizer state, bit for bit, and their logs
    the same epochs and losses."""
    first, second = (torch.load(run / "checkpoint-last.pth", weights_only=True) for run in (a, b))
    assert (first["epoch"], first["step"]) == (second["epoch"], second["step"]) and "resume_at" not in second
    for key in first["model"]:
        assert torch.equal(first["model"][key], second["model"][key]), key
    for x, y in zip(first["optimizer"]["state"].values(), second["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    epochs = lambda run: [(r["epoch"], r["train_loss"]) for r in rows(run) if "epoch" in r]  # noqa: E731
    assert epochs(a) == epochs(b)


def test_sigterm_stops_after_the_step_and_the_rerun_ends_bit_identical(micro, tmp_path, capsys, monkeypatch):
    """16 videos in batches of 4: four steps an epoch. SIGTERM arrives during step 1 of epoch 1: the step
    finishes, checkpoint-last.pth holds it, the exit code is PREEMPTED; the same command again continues at
    step 2 and ends where the uninterrupted run ends."""
    flags = ("--epochs", "2", "--mask_ratio", "0.5")
    tp.main(cli(tmp_path / "straight", *flags))
    monkeypatch.setattr(engine, "set_schedules", at_step(5, lambda: signal.raise_signal(signal.SIGTERM)))
    with pytest.raises(SystemExit) as stop:
        engine.run(tp.main, cli(tmp_path / "stopped", *flags), preemptible=True)
    err = capsys.readouterr().err
    assert stop.value.code == engine.PREEMPTED
    assert "SIGTERM: stopping after this optimizer step" in err and "after optimizer step 2 of 4 of epoch 1" in err
    state = torch.load(tmp_path / "stopped" / "checkpoint-last.pth", weights_only=True)
    assert state["epoch"] == 0 and state["resume_at"]["steps"] == 2 and len(rows(tmp_path / "stopped")) == 1
    monkeypatch.undo()
    monkeypatch.setitem(vmae.SIZES, "micro", MICRO)
    engine.run(tp.main, cli(tmp_path / "stopped", *flags), preemptible=True)
    assert "continuing at step 2 of epoch 1" in capsys.readouterr().out
    same_run(tmp_path / "straight", tmp_path / "stopped")


SIGNALLED_IN_VALIDATION = """
import os, signal, sys
sys.path.insert(0, {root!r})
import data, engine, train_finetune, vmae
vmae.SIZES["micro"] = {micro!r}
item = data.FinetuneDataset.__getitem__

def signal_the_job(self, index):  # a validation worker's first item: a scheduler's SIGTERM to the whole job
    if self.mode == "validation" and not os.environ.get("SIGNALLED"):
        os.environ["SIGNALLED"] = "1"
        os.killpg(0, signal.SIGTERM)
    return item(self, index)

data.FinetuneDataset.__getitem__ = signal_the_job
engine.run(train_finetune.main, sys.argv[1:], preemptible=True)
"""


def test_sigterm_to_every_process_during_validation_stops_at_the_epochs_checkpoint(tmp_path):
    """A scheduler signals every process of the job, data workers too: the validation loader's workers must
    outlive it, so the epoch is validated, saved, and the run exits PREEMPTED (no worker-died traceback)."""
    argv = ["--model", "micro", "--input_size", "32", "--num_frames", "4", "--batch_size", "4", "--epochs", "2",
            "--synthetic_size", "16", "--num_workers", "1", "--device", "cpu", "--output_dir", str(tmp_path)]
    script = SIGNALLED_IN_VALIDATION.format(root=str(ROOT), micro=MICRO)
    run = subprocess.run([sys.executable, "-c", script, *argv], env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300, start_new_session=True)
    assert run.returncode == engine.PREEMPTED, run.stderr[-2000:]
    assert "stopped by SIGTERM at the end of epoch 0" in run.stderr
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["epoch"] == 0
    assert [r["epoch"] for r in rows(tmp_path)] == [0]


def test_only_the_recipes_turn_a_stop_signal_into_a_checkpoint():
    """A tool (bench, study, extraction...) has no step to finish: SIGTERM must end it, not print a promise."""
    seen = []
    for preemptible in (False, True):
        engine.run(lambda argv: seen.append(signal.getsignal(signal.SIGTERM)), [], preemptible=preemptible)
    assert seen == [signal.getsignal(signal.SIGTERM), engine.STOP.handle]


def test_step_checkpoints_every_n_steps_resume_a_crashed_run_exactly(micro, tmp_path, monkeypatch):
    """--save_every_steps 3 writes checkpoint-last.pth after global steps 3 and 6; a crash in step 7 loses
    one step, and the rerun ends where the uninterrupted run ends (fine-tuning: mixup's draws included)."""
    import train_finetune as tf

    def tf_cli(out: Path) -> list[str]:
        return ["--model", "micro", "--input_size", "32", "--num_frames", "4", "--batch_size", "4", "--epochs", "2",
                "--synthetic_size", "16", "--num_workers", "0", "--device", "cpu", "--test_num_segment", "1",
                "--test_num_crop", "1", "--output_dir", str(out), "--save_every_steps", "3", "--mixup", "0.8",
                "--cutmix", "1.0"]
    tf.main(tf_cli(tmp_path / "straight"))

    def crash():
        raise RuntimeError("the machine went away")
    monkeypatch.setattr(engine, "set_schedules", at_step(6, crash))
    with pytest.raises(RuntimeError, match="went away"):
        tf.main(tf_cli(tmp_path / "crashed"))
    state = torch.load(tmp_path / "crashed" / "checkpoint-last.pth", weights_only=True)
    assert (state["epoch"], state["resume_at"]["epoch"], state["resume_at"]["steps"]) == (0, 1, 2)
    monkeypatch.undo()
    monkeypatch.setitem(vmae.SIZES, "micro", MICRO)
    tf.main(tf_cli(tmp_path / "crashed"))
    same_run(tmp_path / "straight", tmp_path / "crashed")


def stopped_on_rank_one(rank: int, world: int, port: int, out: str, stop_at: int):
    """A two-process run in which only rank 1 receives SIGTERM, during global step `stop_at` (-1: never)."""
    torchrun_env(rank, world, port)
    vmae.SIZES["micro"] = MICRO
    if rank == 1 and stop_at >= 0:
        engine.set_schedules = at_step(stop_at, lambda: engine.STOP.handle(signal.SIGTERM, None))
    try:
        tp.main(cli(out, "--epochs", "2", "--mask_ratio", "0.5"))
    except engine.Preempted:
        Path(out, f"preempted{rank}").write_text("")
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_signal_to_one_of_two_processes_stops_both_at_one_step_and_resumes_exactly(tmp_path):
    """Under torchrun a scheduler's signal may reach the processes at different moments: they agree after
    every step, so both stop after the same one, and the rerun ends as the uninterrupted two-process run."""
    run_processes(stopped_on_rank_one, 2, str(tmp_path / "straight"), -1, timeout=300)
    run_processes(stopped_on_rank_one, 2, str(tmp_path / "stopped"), 2, timeout=300)  # 2 steps an epoch: epoch 1
    assert (tmp_path / "stopped" / "preempted0").exists() and (tmp_path / "stopped" / "preempted1").exists()
    state = torch.load(tmp_path / "stopped" / "checkpoint-last.pth", weights_only=True)
    assert state["resume_at"]["steps"] == 1 and len(state["resume_at"]["random"]) == 2
    run_processes(stopped_on_rank_one, 2, str(tmp_path / "stopped"), -1, timeout=300)
    same_run(tmp_path / "straight", tmp_path / "stopped")
