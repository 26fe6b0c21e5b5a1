"""study.py: every arm's code path end to end on the demo model at 16 px (two optimizer steps per run), the
FLOP count against the paper's ViT-B figures, the statistics against scipy, the verdicts, the tables, and bad
flags."""
import json
import math
import re
import statistics
from dataclasses import replace

import numpy as np
import pytest

import engine
import study

# The demo size at 16 px, 4 frames, patch 8: a 2 x 2 x 2 grid. 8 videos at batch 4 = two optimizer steps per run.
TINY = replace(study.QUICK, model="demo", input_size=16, num_frames=4, mask_ratio=0.75, decoder_depth=1,
               pretrain_videos=8, pretrain_epochs=2, pretrain_batch=4, probe_every=1, probe_videos=16,
               finetune_videos=8, finetune_epochs=2, finetune_batch=4, test_num_segment=1, test_num_crop=1)


def test_every_arm_runs_and_the_study_resumes(tmp_path, capsys):
    records = study.run_study(TINY, tmp_path, [0], study.ARMS, "cpu", threads=1, num_workers=0, jobs=2)
    assert [r["arm"] for r in records] == study.ARM_NAMES
    for r in records:
        run = tmp_path / "runs" / f"{r['arm']}-seed0"
        pretrained = r["arm"] != "scratch"
        assert (run / "pretrain").exists() == pretrained and not list(run.glob("*/checkpoint-*.pth"))
        log = [json.loads(line) for line in (run / "finetune" / "log.txt").read_text().splitlines()]
        assert [e["steps"] for e in log[:2]] == [2, 4] and r["top1"] == log[-1]["test_video_acc1"]
        assert r["val_curve"] == [[2, log[0]["val_acc1"]], [4, log[1]["val_acc1"]]]
        if pretrained:
            epochs = [json.loads(line) for line in (run / "pretrain" / "log.txt").read_text().splitlines()]
            assert epochs[-1]["steps"] == 4 and r["pretrain_loss"] == epochs[-1]["train_loss"]
            assert r["pretrain_time_s"] == sum(e["epoch_time_s"] for e in epochs) and r["peak_memory_mb"] >= 0
            assert all(r[k] == epochs[-1][k] for k in study.PROBES)
            assert r["probe_init_attentive_acc1"] == epochs[0]["probe_init_attentive_acc1"]
            assert [x for x, _ in r["probe_curve"]] == [0, 1, 2]
        else:
            assert "pretrain_loss" not in r and "probe_acc1" not in r
    by_arm = {r["arm"]: r for r in records}
    assert by_arm["v1"]["decoder_tokens"] == 8  # V1 decodes every token of the 2 x 2 x 2 grid
    assert by_arm["cell50"]["decoder_tokens"] == by_arm["random50"]["decoder_tokens"] < 8
    # one seed, one initial encoder: every pretrained arm probes the same random weights before training
    assert len({r["probe_init_acc1"] for r in records if "probe_init_acc1" in r}) == 1
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 5

    capsys.readouterr()
    again = study.run_study(TINY, tmp_path, [0], study.ARMS, "cpu", threads=1, num_workers=0, jobs=1)
    assert again == records and "5 runs done before, 0 to go" in capsys.readouterr().out
    with pytest.raises(engine.RunError, match="another setting"):
        study.run_study(replace(TINY, finetune_epochs=3), tmp_path, [0], study.ARMS, "cpu", 1, 0, 1)
    (tmp_path / "results.json").write_text('{"setting": {"nb_cl')  # cut short by hand, say
    with pytest.raises(engine.RunError, match="results.json: cannot be read as the study's results"):
        study.run_study(TINY, tmp_path, [0], study.ARMS, "cpu", 1, 0, 1)


def test_a_failing_run_names_its_folder_and_shows_its_log(tmp_path):
    bad = replace(TINY, pretrain_batch=64)  # more than the 8 videos: the recipe stops with a message
    with pytest.raises(RuntimeError, match=r"(?s)train_pretrain.py in .*v1-seed0.*not one step per epoch"):
        study.run_study(bad, tmp_path, [0], study.ARMS[:1], "cpu", 1, 0, 1)


def test_flops_match_the_papers_vit_b_figures():
    """The paper's Table 1 (as reported there): ViT-B, 16 x 224, tube 90 %: 35.44 GMACs with encoder-only
    masking, 25.84 with a running cell at 50 %, 21.03 at 75 %; the random decoder mask keeps as many tokens
    as the running cell.
    Those figures embed all 1568 cubes, as the reference does; vmae embeds only the 160 visible ones, so
    (1568 - 160) cubes x 1536 pixels x 768 channels of multiply-adds come off each."""
    base = replace(study.QUICK, model="base", input_size=224, num_frames=16, mask_ratio=0.9)
    arms = {arm.name: arm for arm in study.ARMS}
    cost = {name: study.pretrain_cost(base, arms[name]) for name in ("v1", "cell50", "cell75", "random50")}
    embed_saved = (1568 - 160) * 1536 * 768 / 1e9
    assert cost["v1"]["gflops_per_clip"] == pytest.approx(35.44 - embed_saved, abs=0.05)
    assert cost["cell50"]["gflops_per_clip"] == pytest.approx(25.84 - embed_saved, abs=0.05)
    assert cost["cell75"]["gflops_per_clip"] == pytest.approx(21.03 - embed_saved, abs=0.05)
    assert cost["random50"] == cost["cell50"]
    v1, cell = cost["v1"], cost["cell50"]
    assert (v1["encoder_tokens"], v1["decoder_tokens"], cell["decoder_tokens"]) == (160, 1568, 944)


# -----------------------------------------------------------------------------------------------------
# Statistics


def student_t_cdf(x: float, df: int) -> float:
    """P(T <= x) for x >= 0: 1/2 plus the density integrated from 0 to x by Simpson's rule (4000 intervals)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    t = np.linspace(0, x, 4001)
    f = np.exp(log_c - (df + 1) / 2 * np.log1p(t ** 2 / df))
    return 0.5 + x / 12000 * (f[0] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum() + f[-1])


def test_the_t_table_is_the_student_t_quantile():
    """Each entry is where the t distribution's CDF reaches 0.975 (to its 4 decimals), by an independent
    integration, and, where scipy is installed, scipy's quantile."""
    assert len(study.T975) == study.MAX_SEEDS - 1
    for df, t in enumerate(study.T975, start=1):
        assert student_t_cdf(t - 5e-5, df) < 0.975 < student_t_cdf(t + 5e-5, df), df
    stats = pytest.importorskip("scipy.stats")
    for df, t in enumerate(study.T975, start=1):
        assert t == pytest.approx(stats.t.ppf(0.975, df), abs=5e-5)


def test_interval_is_mean_plus_minus_t_times_the_standard_error():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, s = sqrt(2.5), t(0.975, 4) = 2.7764451... (the textbook value)
    mean, low, high = study.interval(values)
    half = 2.7764451051977987 * math.sqrt(2.5 / 5)
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), abs=1e-4)  # the table's 4 decimals
    mean, low, high = study.interval([4.0])
    assert mean == 4.0 and math.isnan(low) and math.isnan(high)


def test_paired_interval_equals_scipys_paired_t_test():
    stats = pytest.importorskip("scipy.stats")
    a = {0: 50.1, 1: 47.3, 2: 55.0, 3: 49.2, 4: 51.8, 9: 1.0}  # seed 9 has no partner: left out
    b = {0: 48.0, 1: 47.9, 2: 51.2, 3: 45.1, 4: 50.0, 7: 2.0}
    mean, low, high, n = study.paired(a, b)
    x, y = [a[s] for s in range(5)], [b[s] for s in range(5)]
    ci = stats.ttest_rel(x, y).confidence_interval(0.95)
    assert n == 5 and mean == pytest.approx(np.mean(np.subtract(x, y)))
    assert (low, high) == pytest.approx((ci.low, ci.high), abs=1e-4)
    assert study.paired({0: 1.0}, {1: 2.0})[3] == 0


@pytest.mark.parametrize("kind,low,high,expected", [
    ("better", 0.5, 3.0, "held"), ("better", -1.0, 1.5, "did not hold"),
    ("better", -1.0, 3.0, "undecided at this scale"),
    ("worse", -4.0, -0.1, "held"), ("worse", -1.5, 1.0, "did not hold"),
    ("worse", -3.0, 1.0, "undecided at this scale"),
    ("same", -1.5, 1.9, "held"), ("same", -5.0, -2.5, "did not hold"), ("same", 2.5, 4.0, "did not hold"),
    ("same", -3.0, 1.0, "undecided at this scale"), ("same", math.nan, math.nan, "undecided at this scale")])
def test_verdicts_follow_the_interval_and_the_margin(kind, low, high, expected):
    assert study.verdict(kind, low, high, margin=2.0) == expected


def hand_made_records():
    """Five seeds of three pretrained arms and the from-scratch arm, numbers typed in by hand: cell50 matches
    v1 to within 0.2 points on the probe, random50 is 5 points below cell50, and only cell50 and scratch
    are fine-tuned (cell50 10 points ahead)."""
    def pre(arm, seed, probe, **more):
        return dict(arm=arm, seed=seed, probe_acc1=probe, probe_knn_acc1=probe - 10, probe_init_acc1=20.0 + seed,
                    probe_init_knn_acc1=12.0, pretrain_loss=0.03, pretrain_time_s=100.0 - 10 * (arm != "v1") + seed,
                    peak_memory_mb=300.0, encoder_tokens=16, decoder_tokens=64 if arm == "v1" else 40,
                    gflops_per_clip=0.5 if arm == "v1" else 0.3, probe_curve=[[0, 20.0 + seed], [1, probe]], **more)
    records = []
    for seed in range(5):
        wobble = [0.3, -0.2, 0.1, 0.0, -0.1][seed]
        records += [pre("v1", seed, 40.0 + seed), pre("cell50", seed, 40.0 + seed + wobble, top1=60.0 + seed,
                                                      val_curve=[[10, 30.0 + seed], [20, 60.0 + seed]]),
                    pre("random50", seed, 35.0 + seed + wobble),
                    dict(arm="scratch", seed=seed, top1=50.0 + seed + wobble,
                         val_curve=[[10, 20.0], [20, 50.0 + seed]])]
    return records


def test_claims_get_the_paired_difference_its_interval_and_a_verdict():
    rows = {(r["claim"][:5], r["metric"]): r for r in study.claim_rows(hand_made_records())}
    same = rows[("(ii) ", "frozen probe, linear")]
    assert same["difference"] == pytest.approx(0.02) and same["seeds"] == 5 and same["verdict"] == "held"
    worse = rows[("(iii)", "frozen probe, linear")]
    assert worse["difference"] == pytest.approx(-5.0) and worse["low"] == pytest.approx(-5.0)
    assert worse["verdict"] == "held"
    scratch = rows[("(i) p", "fine-tuned, test top-1 (all steps)")]
    assert scratch["difference"] == pytest.approx(10 - 0.02) and scratch["verdict"] == "held"
    assert rows[("(i) p", "fine-tuned, validation top-1 at half the steps")]["difference"] == pytest.approx(12.0)
    features = rows[("pretr", "frozen probe, linear")]  # cell50 against its own random initial encoder
    assert features["difference"] == pytest.approx(statistics.fmean(40.0 + s + w - 20.0 - s for s, w in
                                                                    enumerate([0.3, -0.2, 0.1, 0.0, -0.1])))
    assert ("(ii) ", "fine-tuned, test top-1 (all steps)") not in rows  # v1 was not fine-tuned
    assert ("(c) r", "frozen probe, linear") not in rows  # no cell75 runs
    cost = rows[("(ii) ", "pretraining time, seconds (the cost)")]  # 10 s less per seed: cheaper, margin 0
    assert cost["difference"] == pytest.approx(-10.0) and cost["verdict"] == "held"
    assert not any(claim == "(iii)" and "seconds" in metric for claim, metric in rows)
    assert rows[("pretr", "frozen probe, k-NN")]["verdict"] == "held"  # 30 against 12: one of them is above chance
    at_chance = study.claim_rows(hand_made_records(), chance=41.0)  # now every probe mean is below chance + 2
    assert {r["verdict"] for r in at_chance if "probe" in r["metric"]} == {"undecided (both at chance)"}


def test_the_tables_have_every_column_and_claim():
    records = hand_made_records()
    lines = study.table(records).strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == study.COLUMNS
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert len(rows) == 4 and all(len(cells) == len(header) for cells in rows.values())
    v1, cell, scratch = rows["(a) encoder-only masking (V1)"], rows["(b) running cell 50 %"], \
        rows["(e) no pretraining (from scratch)"]
    assert v1[1] == "none (V1)" and cell[1] == "run_cell 50%" and v1[2] == "16 / 64" and cell[3] == "0.300"
    mean, low, high = study.interval([40.0, 41.0, 42.0, 43.0, 44.0])
    assert v1[7] == f"{mean:.1f} [{low:.1f}, {high:.1f}]" and v1[9] == "-" and cell[9].startswith("62.0 [")
    assert scratch[1:7] == ["-"] * 6 and scratch[7].startswith("22.0 [") and scratch[10] == "5"  # the initial encoders
    claims = study.claims_table(records)
    assert "**held**" in claims and "70.15 vs 70.28" in claims
    assert claims.count("\n") == 2 + len(study.claim_rows(records))


def test_the_report_writes_tables_and_figure(tmp_path):
    records = hand_made_records()
    study.write_report(records, TINY, tmp_path)
    assert (tmp_path / "study.md").read_text() == study.table(records) + "\n" + study.claims_table(records, 100 / 8)
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,flag", [(["--arms", "v1", "v3"], "--arms"), (["--seeds", "1", "1"], "--seeds"),
                                       (["--threads", "0"], "--threads"), (["--num_workers", "-1"], "--num_workers"),
                                       (["--seeds", *map(str, range(study.MAX_SEEDS + 1))], "--seeds")])
def test_bad_flags_are_named(argv, flag, capsys):
    with pytest.raises(SystemExit):
        study.parse_args(argv)
    assert re.search(re.escape(flag), capsys.readouterr().err)
