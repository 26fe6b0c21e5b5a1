"""study.py: every arm's code path end to end on a micro model (two optimizer steps per run), the FLOP
count against the paper's ViT-B figures, the table writer, and bad flags."""
import json
import re
import statistics
from dataclasses import replace

import pytest

import study

MICRO = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_num_heads=2)
# 32 px, 4 frames, patch 16: a 2 x 2 x 2 grid. 8 videos at batch 4 = two optimizer steps per run.
TINY = replace(study.QUICK, size=MICRO, input_size=32, num_frames=4, mask_ratio=0.75, decoder_depth=1,
               pretrain_videos=8, pretrain_epochs=1, pretrain_batch=4, finetune_videos=8, finetune_epochs=1,
               finetune_batch=4, test_num_segment=1, test_num_crop=1)


def test_every_arm_runs_and_the_study_resumes(tmp_path, capsys):
    records = study.run_study(TINY, tmp_path, [0], study.ARMS, "cpu", threads=1, num_workers=0, jobs=2)
    assert [r["arm"] for r in records] == study.ARM_NAMES
    for r in records:
        log = [json.loads(line) for line in (tmp_path / "runs" / f"{r['arm']}-seed0" / "finetune" / "log.txt")
               .read_text().splitlines()]
        assert log[0]["steps"] == 2 and r["top1"] == log[-1]["test_video_acc1"]
        pretrained = r["arm"] != "scratch"
        assert (tmp_path / "runs" / f"{r['arm']}-seed0" / "pretrain").exists() == pretrained
        if pretrained:
            epochs = [json.loads(line) for line in (tmp_path / "runs" / f"{r['arm']}-seed0" / "pretrain" / "log.txt")
                      .read_text().splitlines()]
            assert epochs[-1]["steps"] == 2 and r["pretrain_loss"] == epochs[-1]["train_loss"]
            assert r["pretrain_time_s"] == sum(e["epoch_time_s"] for e in epochs) and r["peak_memory_mb"] >= 0
        else:
            assert "pretrain_loss" not in r
    by_arm = {r["arm"]: r for r in records}
    assert by_arm["v1"]["decoder_tokens"] == 8  # V1 decodes every token of the 2 x 2 x 2 grid
    assert by_arm["cell50"]["decoder_tokens"] == by_arm["random50"]["decoder_tokens"] < 8
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 5

    capsys.readouterr()
    again = study.run_study(TINY, tmp_path, [0], study.ARMS, "cpu", threads=1, num_workers=0, jobs=1)
    assert again == records and "5 runs done before, 0 to go" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="another setting"):
        study.run_study(replace(TINY, finetune_epochs=2), tmp_path, [0], study.ARMS, "cpu", 1, 0, 1)


def test_a_failing_run_names_its_folder_and_shows_its_log(tmp_path):
    bad = replace(TINY, pretrain_batch=64)  # more than the 8 videos: the recipe stops with a message
    with pytest.raises(RuntimeError, match=r"(?s)pretrain run in .*v1-seed0.*not one step per epoch"):
        study.run_study(bad, tmp_path, [0], study.ARMS[:1], "cpu", 1, 0, 1)


def test_flops_match_the_papers_vit_b_figures():
    """spec.md §8.2: ViT-B, 16 x 224, tube 90 %: 35.44 GMACs with encoder-only masking, 25.84 with a
    running cell at 50 %, 21.03 at 75 %; the random decoder mask keeps as many tokens as the running cell.
    Those figures embed all 1568 cubes, as the reference does; vmae embeds only the 160 visible ones, so
    (1568 - 160) cubes x 1536 pixels x 768 channels of multiply-adds come off each."""
    base = replace(study.QUICK, size=dict(study.vmae.SIZES["base"]), input_size=224, num_frames=16, mask_ratio=0.9)
    arms = {arm.name: arm for arm in study.ARMS}
    cost = {name: study.pretrain_cost(study.model_config(base), study.mask_recipe(base, arms[name]))
            for name in ("v1", "cell50", "cell75", "random50")}
    embed_saved = (1568 - 160) * 1536 * 768 / 1e9
    assert cost["v1"]["gflops_per_clip"] == pytest.approx(35.44 - embed_saved, abs=0.05)
    assert cost["cell50"]["gflops_per_clip"] == pytest.approx(25.84 - embed_saved, abs=0.05)
    assert cost["cell75"]["gflops_per_clip"] == pytest.approx(21.03 - embed_saved, abs=0.05)
    assert cost["random50"] == cost["cell50"]
    assert (cost["v1"]["encoder_tokens"], cost["v1"]["decoder_tokens"], cost["cell50"]["decoder_tokens"]) == (160, 1568, 944)


def hand_made_records():
    """Two seeds of two pretrained arms and three of the from-scratch arm, numbers typed in by hand."""
    def pre(arm, seed, top1, loss, seconds, memory):
        return dict(arm=arm, seed=seed, top1=top1, pretrain_loss=loss, pretrain_time_s=seconds, peak_memory_mb=memory,
                    encoder_tokens=16, decoder_tokens=64 if arm == "v1" else 40,
                    gflops_per_clip=0.5 if arm == "v1" else 0.3)
    return [pre("v1", 0, 50.0, 0.03, 100.0, 300.0), pre("v1", 1, 60.0, 0.05, 110.0, 320.0),
            pre("cell50", 0, 40.0, 0.02, 80.0, 200.0), pre("cell50", 1, 44.0, 0.04, 70.0, 220.0),
            dict(arm="scratch", seed=0, top1=10.0), dict(arm="scratch", seed=1, top1=20.0),
            dict(arm="scratch", seed=2, top1=30.0)]


def test_the_table_has_every_column_and_the_mean_and_spread_over_seeds():
    text = study.table(hand_made_records())
    lines = text.strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["arm", "decoder mask", "encoder / decoder tokens", "pretrain GFLOPs/clip", "pretrain time s",
                      "peak memory MB", "final pretrain loss", "downstream top-1 %", "seeds"]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert len(rows) == 3 and all(len(cells) == len(header) for cells in rows.values())
    v1, cell, scratch = rows["(a) encoder-only masking (V1)"], rows["(b) running cell 50 %"], \
        rows["(e) no pretraining (from scratch)"]
    assert v1[1] == "none (V1)" and cell[1] == "run_cell 50%"
    assert v1[2] == "16 / 64" and cell[2] == "16 / 40" and v1[3] == "0.500" and cell[3] == "0.300"
    assert v1[4] == f"105.0 ± {statistics.stdev([100, 110]):.1f}" and cell[5] == f"210 ± {statistics.stdev([200, 220]):.0f}"
    assert v1[6] == f"0.0400 ± {statistics.stdev([0.03, 0.05]):.4f}"
    assert v1[7] == "55.0 ± 7.1" and cell[7] == "42.0 ± 2.8" and scratch[7] == "20.0 ± 10.0"
    assert scratch[1:7] == ["-"] * 6 and scratch[8] == "3" and v1[8] == "2"


def test_the_report_writes_table_and_figure(tmp_path):
    records = hand_made_records()
    study.write_report(records, TINY, tmp_path)
    assert (tmp_path / "study.md").read_text() == study.table(records)
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,flag", [(["--arms", "v1", "v3"], "--arms"), (["--seeds", "1", "1"], "--seeds"),
                                       (["--threads", "0"], "--threads"), (["--num_workers", "-1"], "--num_workers")])
def test_bad_flags_are_named(argv, flag, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(argv)
    assert re.search(re.escape(flag), capsys.readouterr().err)
