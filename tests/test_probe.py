"""The frozen-encoder probe: its pooling keeps the order of time, its classifiers read a label that the
features carry and cannot read one they do not, the attentive one is one-query cross-attention and
deterministic, and the pretraining recipe logs it (also under FSDP)."""
import functools
import json

import numpy as np
import pytest
import torch
from torch import nn

import data
import probe
import train_pretrain as tp
import visualize
import vmae
from conftest import export_videos
from test_train_pretrain import cli, ddp_main, micro, run_processes  # noqa: F401 (a fixture)


def test_slot_pooling_is_the_mean_of_each_slot_in_time_order():
    cfg = vmae.config("small", img_size=32, patch_size=16, num_frames=6)  # grid (3, 2, 2)
    tokens = torch.randn(2, cfg.num_tokens, 5)
    pooled = probe.pool(tokens, cfg.grid[0], "slots")
    grid = tokens.numpy().reshape(2, *cfg.grid, 5)
    expected = np.concatenate([grid[:, t].mean(axis=(1, 2)) for t in range(cfg.grid[0])], axis=1)
    np.testing.assert_allclose(pooled.numpy(), expected, rtol=1e-6)
    # reversing time changes the slot-pooled vector but not the mean-pooled one
    reversed_tokens = torch.from_numpy(grid[:, ::-1].reshape(2, cfg.num_tokens, 5).copy())
    assert not torch.allclose(probe.pool(reversed_tokens, 3, "slots"), pooled)
    torch.testing.assert_close(probe.pool(reversed_tokens, 3, "mean"), probe.pool(tokens, 3, "mean"))
    with pytest.raises(ValueError, match="pooling"):
        probe.pool(tokens, 3, "max")


def labelled_features(n=400, classes=8, dim=64, signal=3.0, seed=0):
    """Features = a class's own random direction x signal + unit noise (and a large shared offset, which
    neither classifier may depend on)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=g)
    x = signal * centres[labels] + torch.randn(n, dim, generator=g) + 10
    return x, labels


@pytest.mark.parametrize("predict", [probe.linear_predict, probe.knn_predict])
def test_classifiers_read_a_label_the_features_carry_and_not_one_they_do_not(predict):
    x, y = labelled_features()
    assert probe.cross_validate(predict, x, y) > 99
    shuffled = [probe.cross_validate(predict, x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(s))])
                for s in range(5)]
    assert abs(np.mean(shuffled) - 100 / 8) < 5  # chance is 12.5 %: cross-validation gives no free accuracy


def labelled_tokens(n=400, tokens=6, classes=8, dim=16, signal=3.0, seed=0):
    """Clips of unit-noise tokens; one token per clip, at a random place, also carries its class's direction."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = torch.randn(n, tokens, dim, generator=g) + 10
    centres = torch.randn(classes, dim, generator=g)
    x[torch.arange(n), torch.randint(tokens, (n,), generator=g)] += signal * centres[labels]
    return x, labels


def test_the_attentive_probe_reads_a_label_the_tokens_carry_and_not_one_they_do_not():
    predict = functools.partial(probe.attentive_predict, steps=100)  # fewer steps than a probe takes: a test
    x, y = labelled_tokens()
    assert probe.cross_validate(predict, x, y) > 90
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    assert abs(probe.cross_validate(predict, x, shuffled) - 100 / 8) < 5  # 3 standard errors of 400 guesses


def test_the_attentive_probe_is_deterministic_and_leaves_the_random_state_alone():
    x, y = labelled_tokens(n=64)
    state = torch.random.get_rng_state()
    first = probe.attentive_predict(x[:48], y[:48], x[48:], steps=20)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(123)  # another global state: the same predictions
    assert torch.equal(probe.attentive_predict(x[:48], y[:48], x[48:], steps=20), first)


def test_the_attentive_block_is_one_query_multi_head_cross_attention():
    """With the MLP silenced and the head removed, the probe's output is q + MultiheadAttention(q, x, x) for
    torch's own attention, once its query and key projections are folded into the logits' directions and its
    value and output projections into one map, as the class docstring says."""
    dim, heads, d = 16, 4, 4
    torch.manual_seed(0)
    mha, q, x = nn.MultiheadAttention(dim, heads, batch_first=True), torch.randn(dim), torch.randn(3, 6, dim)
    (wq, wk, wv), (bq, _, bv) = mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)  # the key bias: no effect
    qh = (wq @ q + bq).view(heads, d)
    folded = probe.AttentiveProbe(dim, 5, heads)
    folded.head, folded.mlp = nn.Identity(), nn.Sequential(nn.Linear(dim, dim))
    with torch.no_grad():
        folded.logits.weight.copy_(torch.stack([wk[h * d:(h + 1) * d].T @ qh[h] for h in range(heads)]) / d ** 0.5)
        folded.values.weight.copy_(torch.cat([mha.out_proj.weight[:, h * d:(h + 1) * d] @ wv[h * d:(h + 1) * d]
                                              for h in range(heads)], dim=1))
        folded.values.bias.copy_(mha.out_proj.weight @ bv + mha.out_proj.bias + q)  # the residual query too
        nn.init.zeros_(folded.mlp[0].weight), nn.init.zeros_(folded.mlp[0].bias)
        expected = q + mha(q.expand(3, 1, dim), x, x)[0][:, 0]  # (3, D)
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_the_reading_names_the_probes_that_beat_the_random_start_by_more_than_the_margin():
    start = {"probe_init_acc1": 30.0, "probe_init_knn_acc1": 13.0, "probe_init_attentive_acc1": 30.0}
    now = {"probe_acc1": 31.9, "probe_knn_acc1": 20.0, "probe_attentive_acc1": 45.0}  # linear: within 2 points
    assert probe.reading(now, start).endswith("on k-NN, attentive")
    assert "not above" in probe.reading({**now, "probe_knn_acc1": 10.0, "probe_attentive_acc1": 31.0}, start)


def test_cross_validation_scores_every_item_once_by_a_classifier_that_never_saw_it():
    seen = []

    def predict(train_x, train_y, test_x):
        overlap = set(train_x[:, 0].tolist()) & set(test_x[:, 0].tolist())
        assert not overlap
        seen.extend(test_x[:, 0].tolist())
        return torch.zeros(len(test_x), dtype=torch.long)
    x = torch.arange(10.0)[:, None]
    assert probe.cross_validate(predict, x, torch.zeros(10, dtype=torch.long)) == 100
    assert sorted(seen) == list(range(10))


def test_the_linear_probe_is_ridge_regression_onto_one_hot_labels():
    """Against numpy's least squares on the same standardised, bias-augmented, ridge-stacked system."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)
    test = torch.randn(7, 5, generator=g)
    ridge = 0.3
    mean, std = x.mean(0).numpy(), x.std(0).numpy() + 1e-6
    a = np.hstack([(x.numpy() - mean) / std, np.ones((30, 1))])
    stacked = np.vstack([a, np.hstack([np.sqrt(ridge * 30) * np.eye(5), np.zeros((5, 1))])])
    targets = np.vstack([np.eye(3)[y.numpy()], np.zeros((5, 3))])
    weights = np.linalg.lstsq(stacked, targets, rcond=None)[0]
    expected = (np.hstack([(test.numpy() - mean) / std, np.ones((7, 1))]) @ weights).argmax(1)
    assert probe.linear_predict(x, y, test, ridge=ridge).tolist() == expected.tolist()


def test_probe_scores_a_model_and_caches_its_clips(monkeypatch):
    monkeypatch.setattr(probe, "attentive_predict", functools.partial(probe.attentive_predict, steps=10))  # quicker
    cfg = vmae.config("small", embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=2, img_size=32, patch_size=16, num_frames=4)
    p = probe.build_probe(None, num_frames=4, sampling_rate=2, input_size=32, synthetic_videos=16, batch_size=5)
    model = vmae.PretrainVideoMAE(cfg).train()
    x, y = p.features(model, torch.device("cpu"))
    assert x.shape == (16, cfg.num_tokens, 32) and y.tolist() == [i % 8 for i in range(16)]
    assert model.training  # the probe leaves the model as it found it
    with torch.no_grad():  # by hand: the encoder on every token
        clips = torch.stack([p.dataset[i][0] for i in range(16)])
        torch.testing.assert_close(x, model.encoder.eval()(clips), rtol=1e-4, atol=1e-5)
    assert p._cache is not None and len(p._cache) == 4  # 16 clips in batches of 5
    result = p(model, torch.device("cpu"))
    assert set(result) == {"probe_acc1", "probe_knn_acc1", "probe_attentive_acc1", "probe_time_s"}
    assert all(0 <= result[key] <= 100 for key in result if key.endswith("acc1"))
    pooled = probe.pool(x, cfg.grid[0])  # the linear probe reads the slot means
    assert result["probe_acc1"] == probe.cross_validate(probe.linear_predict, pooled, y)


def test_a_set_too_large_to_keep_is_streamed_with_the_same_features(monkeypatch):
    """Past CACHE_BYTES the probe keeps nothing (a large --probe_data set must not sit in memory) and reads
    the clips again at each probe: the same features as the cached set."""
    cfg = vmae.config("small", embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=2, img_size=32, patch_size=16, num_frames=4)
    model = vmae.PretrainVideoMAE(cfg)
    kept = probe.build_probe(None, num_frames=4, sampling_rate=2, input_size=32, synthetic_videos=16, batch_size=5)
    x, y = kept.features(model, torch.device("cpu"))
    one_batch = 5 * 3 * 4 * 32 * 32 * 4  # bytes of 5 float clips
    monkeypatch.setattr(probe, "CACHE_BYTES", 2 * one_batch)
    streamed = probe.build_probe(None, num_frames=4, sampling_rate=2, input_size=32, synthetic_videos=16, batch_size=5)
    read, seen_by_encoder = [], []
    get = type(streamed.dataset).__getitem__
    monkeypatch.setattr(type(streamed.dataset), "__getitem__", lambda self, i: read.append(i) or get(self, i))
    encoder = probe.encoder_of
    monkeypatch.setattr(probe, "encoder_of", lambda m: lambda clips: seen_by_encoder.append(len(read)) or
                        encoder(m)(clips))
    for _ in range(2):
        read.clear(), seen_by_encoder.clear()
        xs, ys = streamed.features(model, torch.device("cpu"))
        assert streamed._cache is None and torch.equal(xs, x) and torch.equal(ys, y)
        assert seen_by_encoder == [5, 10, 15, 16]  # each batch encoded as it is read, not the set read first


def test_probe_data_reads_a_labelled_list_and_refuses_unlabelled_or_single_class_ones(tmp_path):
    root = tmp_path / "videos"
    list_file = export_videos(data.SyntheticVideos(8, num_classes=2, length=12, height=32, width=40), str(root))
    p = probe.build_probe(list_file, str(root), num_frames=4, sampling_rate=2, input_size=32)
    assert [p.dataset.source.label(i) for i in range(8)] == [0, 1] * 4
    one_class = tmp_path / "one.csv"
    one_class.write_text("".join(f"train/video_{i:05d}.mp4 0\n" for i in range(8)))
    with pytest.raises(data.ListError, match="two classes"):
        probe.build_probe(str(one_class), str(root), num_frames=4, sampling_rate=2, input_size=32)
    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text("".join(f"train/video_{i:05d}.mp4 -1\n" for i in range(8)))
    with pytest.raises(data.ListError, match="a label"):
        probe.build_probe(str(unlabelled), str(root), num_frames=4, sampling_rate=2, input_size=32)


def test_pretraining_logs_the_probe_and_curves_draw_it(micro, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(probe, "attentive_predict", functools.partial(probe.attentive_predict, steps=10))  # quicker
    tp.main(cli(tmp_path, "--probe_every", "2", "--probe_size", "16"))
    rows = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert {"probe_init_acc1", "probe_init_knn_acc1", "probe_init_attentive_acc1"} <= set(rows[0])  # before training
    assert [r["epoch"] for r in rows if "probe_acc1" in r] == [1, 2]  # every 2 epochs, and the last
    assert all(0 <= r["probe_acc1"] <= 100 and r["probe_time_s"] >= 0 for r in rows if "probe_acc1" in r)
    fig = visualize.curves_figure([tmp_path / "log.txt"])
    probe_axis = fig.axes[-1]
    assert "probe" in probe_axis.get_title()
    linear, _, attentive = probe_axis.get_lines()[:3]
    assert list(linear.get_xdata()) == list(attentive.get_xdata()) == [0, 2, 3]
    for line, key in ((linear, "probe_acc1"), (attentive, "probe_attentive_acc1")):
        assert list(line.get_ydata()) == [rows[0][key.replace("probe_", "probe_init_")], rows[1][key], rows[2][key]]


@pytest.mark.parametrize("flags,message", [(["--probe_every", "-1"], "--probe_every"),
                                           (["--probe_every", "1", "--data_path", "."], "--probe_data"),
                                           (["--probe_data", "missing.csv"], "--probe_data"),
                                           (["--probe_size", "3"], "--probe_size"),
                                           (["--probe_pooling", "max"], "--probe_pooling")])
def test_bad_probe_flags_name_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit):
        tp.parse_args(flags)
    assert message in capsys.readouterr().err


def test_two_process_fsdp_probe_equals_ddp(tmp_path):
    """Under FSDP the probe gathers the sharded weights on every process; its scores must be DDP's."""
    flags = ("--epochs", "1", "--probe_every", "1", "--probe_size", "16")
    run_processes(ddp_main, 2, str(tmp_path / "ddp"), *flags)
    run_processes(ddp_main, 2, str(tmp_path / "fsdp"), "--fsdp", *flags)
    ddp, fsdp = ([json.loads(line) for line in (tmp_path / run / "log.txt").read_text().splitlines()]
                 for run in ("ddp", "fsdp"))
    assert len(ddp) == len(fsdp) == 1
    for key in ("probe_init_acc1", "probe_init_knn_acc1", "probe_init_attentive_acc1", "probe_acc1", "probe_knn_acc1",
                "probe_attentive_acc1"):
        assert fsdp[0][key] == pytest.approx(ddp[0][key], abs=1e-9), key
