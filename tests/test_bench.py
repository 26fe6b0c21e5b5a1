"""gpu_suite.py's op counter and its suite: what they report follows from the model, and the suite runs."""
import re

import torch
import torch.nn as nn

import gpu_suite
import vmae
from test_model import tiny


def ops_of_a_step(batch: int, precision: str):
    return gpu_suite.count_ops(gpu_suite.pretrain_step(tiny(), batch, torch.device("cpu"), precision))


def test_op_counts_follow_the_graph_and_autocast_adds_casts_only():
    one, two = ops_of_a_step(2, "bf16"), ops_of_a_step(3, "bf16")
    kinds = ("compute", "cast", "view", "allocation")
    assert all(one[k] == two[k] for k in kinds), "the count is the step's graph, not its batch size"
    fp32 = ops_of_a_step(2, "fp32")
    assert fp32["compute"] == one["compute"] > 0
    # each Linear weight is cast to bf16 in the forward and its gradient back to fp32 in the backward
    linears = sum(isinstance(m, nn.Linear) for m in vmae.PretrainVideoMAE(tiny()).modules())
    assert one["cast"] - fp32["cast"] >= 2 * linears
    assert one["profiler"] > one["compute"] + one["cast"]  # the profiler also records the nested calls


def test_gpu_suite_smoke_writes_its_tables(tmp_path):
    """The suite's tiny stand-in on the CPU, two of its parts: each part in its own process, its table kept."""
    gpu_suite.main([str(tmp_path), "--smoke", "--parts", "env", "eager"])
    summary = (tmp_path / "summary.md").read_text()
    rows = re.findall(r"^\| demo \| (\d+) \| ([^|]+) \| (\d+) \| ([\d.]+) \|", summary, flags=re.M)
    assert [(batch, mode.strip()) for batch, mode, *_ in rows] == [("2", "eager"), ("4", "eager, checkpointing")]
    assert all(float(rate) > 0 for *_, rate in rows)
    log = (tmp_path / "suite.log").read_text()
    assert re.search(r"^env: exit 0, \d+ s$", log, flags=re.M) and re.search(r"^eager: exit 0, \d+ s$", log, flags=re.M)
