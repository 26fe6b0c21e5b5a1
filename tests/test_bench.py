"""bench.py's counters and its GPU suite: what they report follows from the model, and the suite runs."""
import re

import torch
import torch.nn as nn

import bench
import train_pretrain as tp
import vmae
from test_model import tiny


def ops_of_a_step(batch: int, precision: str, model: vmae.PretrainVideoMAE):
    args = bench.parse_args([])
    video = torch.randn(batch, 3, model.cfg.num_frames, model.cfg.img_size, model.cfg.img_size)
    loss = lambda m, v: tp.pretrain_step_loss(m, m.cfg, v, bench.recipe(args, m.cfg.grid, dual=True))  # noqa: E731
    return bench.count_ops(bench.train_step_fn(model, loss, video, torch.device("cpu"), precision))


def test_op_counts_follow_the_graph_and_autocast_adds_casts_only():
    model = vmae.PretrainVideoMAE(tiny())
    one, two = ops_of_a_step(2, "bf16", model), ops_of_a_step(3, "bf16", model)
    kinds = ("compute", "cast", "view", "allocation")
    assert all(one[k] == two[k] for k in kinds), "the count is the step's graph, not its batch size"
    fp32 = ops_of_a_step(2, "fp32", model)
    assert fp32["compute"] == one["compute"] > 0
    # each Linear weight is cast to bf16 in the forward and its gradient back to fp32 in the backward
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert one["cast"] - fp32["cast"] >= 2 * linears
    assert one["profiler"] > one["compute"] + one["cast"]  # the profiler also records the nested calls


def test_gpu_suite_smoke_writes_its_tables(tmp_path):
    """The suite's tiny stand-in on the CPU, two of its parts: each part in its own process, its table kept."""
    bench.main(["--gpu_suite", str(tmp_path), "--smoke", "--parts", "env", "eager"])
    summary = (tmp_path / "summary.md").read_text()
    rows = re.findall(r"^\| demo \| (\d+) \| ([^|]+) \| (\d+) \| ([\d.]+) \|", summary, flags=re.M)
    assert [(batch, mode.strip()) for batch, mode, *_ in rows] == [
        ("2", "eager"), ("4", "eager, checkpointing"), ("2", "eager, FSDP2 bf16 weights")]
    assert all(float(rate) > 0 for *_, rate in rows)
    log = (tmp_path / "suite.log").read_text()
    assert "env: exit 0" in log and "eager: exit 0" in log
