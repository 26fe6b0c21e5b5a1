"""Figures, checked pixel by pixel: hidden-cube counts in the masks panels, exact visible cubes and an exact
de-normalisation in the reconstruction, for non-default grids."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import engine
import masking
import train_pretrain as tp
import visualize
import vmae

MICRO = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny(**overrides):
    return vmae.config("small", **{**MICRO, "num_frames": 8, "img_size": 112, "patch_size": 14, **overrides})


def hidden_cubes(image: np.ndarray, cfg) -> np.ndarray:
    """(H', W') bool: the cubes of one panel image filled entirely with the HIDDEN colour."""
    p = cfg.patch_size
    h, w = image.shape[0] // p, image.shape[1] // p
    cubes = image[:h * p, :w * p].reshape(h, p, w, p, 3)
    return np.isclose(cubes, visualize.HIDDEN, atol=1e-6).all(axis=(1, 3, 4))


def panel_images(fig, column: int) -> list[np.ndarray]:
    """The images of one column of a figure, top to bottom, as drawn."""
    columns = len(fig.axes) // len([a for a in fig.axes if a.get_ylabel()])
    return [np.asarray(ax.images[0].get_array()) for ax in fig.axes[column::columns]]


@pytest.mark.parametrize("img_size,patch,decoder", [(112, 14, "run_cell"), (112, 16, None), (96, 16, "random")])
def test_masks_figure_shows_exactly_the_hidden_cubes(img_size, patch, decoder):
    """Even grids with a running cell, and an odd 7x7 grid (no running cell there) with V1 masking."""
    cfg = tiny(img_size=img_size, patch_size=patch)
    video = torch.randn(3, cfg.num_frames, img_size, img_size)
    drawn = masking.MaskConfig(cfg.grid, "tube", 0.75, decoder or "run_cell", 0.5 if decoder else 0).draw(1)
    enc, dec = drawn.encoder[0], drawn.decoder[0] if decoder else None
    fig = visualize.masks_figure(visualize.mask_panels(video, drawn, cfg), cfg, dual=decoder is not None)
    t, h, w = cfg.grid
    queried = ~dec if dec is not None else enc
    for column, shown in ((1, ~enc), (2, queried), (3, enc & queried)):
        drawn = np.stack([hidden_cubes(image, cfg) for image in panel_images(fig, column)])  # (T', H', W')
        assert drawn.sum() == int((~shown).sum())
        assert np.array_equal(drawn, (~shown).reshape(t, h, w).numpy())
    assert f"encoder sees {int((~enc).sum())}" in fig.axes[1].get_title()


class Oracle(torch.nn.Module):
    """A 'model' that predicts the exact normalised (or raw) target of the clip it is shown."""

    def __init__(self, cfg, normalize):
        super().__init__()
        self.cfg, self.normalize = cfg, normalize

    def forward(self, video, visible, queries):
        return vmae.reconstruction_target(video, queries, self.cfg.patch_size, self.cfg.tubelet_size, self.normalize)


def dual_masks(cfg, batch: int = 1) -> masking.Masks:
    return masking.MaskConfig(cfg.grid, "tube", 0.75, "run_cell", 0.5).draw(batch)


@pytest.mark.parametrize("normalize", [True, False])
def test_recon_of_a_perfect_prediction_is_the_input(normalize):
    """De-normalising the predictions with the true cube statistics gives back the input exactly; cubes
    nobody predicted carry the checkerboard mark."""
    cfg = tiny()
    video = torch.rand(3, cfg.num_frames, cfg.img_size, cfg.img_size) * 2 - 1
    drawn = dual_masks(cfg)
    panels = visualize.recon_panels(Oracle(cfg, normalize), video, drawn, normalize)
    frames, recon = panels["input"], panels["reconstruction"]
    never = visualize.per_pixel(drawn.encoder[0] & drawn.decoder[0], cfg)  # hidden from both sides
    np.testing.assert_allclose(recon[~never], frames[~never], atol=1e-5)
    assert np.all(recon[never] == visualize.checkerboard(recon.shape)[never])
    assert panels["|error|"].max() < 1e-5


def test_recon_panel_pastes_the_visible_cubes_exactly():
    cfg = tiny()
    model = vmae.PretrainVideoMAE(cfg)
    video = torch.randn(3, cfg.num_frames, cfg.img_size, cfg.img_size)
    drawn = dual_masks(cfg)
    fig = visualize.recon_figure(visualize.recon_panels(model, video, drawn, True), normalize_target=True, dual=True)
    frames = visualize.slot_frames(video, cfg)
    recon = np.stack(panel_images(fig, 2))  # as drawn in the figure
    visible = visualize.per_pixel(~drawn.encoder[0], cfg)
    assert np.array_equal(recon[visible], frames[visible])
    assert not np.allclose(recon[~visible], frames[~visible], atol=1e-3)  # the rest is the model's
    assert "TRUE cube mean and std" in fig.texts[0].get_text()


def test_recon_refuses_a_classifier_checkpoint(tmp_path, capsys):
    cfg = tiny()
    path = tmp_path / "classifier.pth"
    torch.save({"model": vmae.VideoClassifier(cfg, 4).state_dict(), "args": {"model": "small"}}, path)
    with pytest.raises(SystemExit):
        engine.run(visualize.main, ["recon", "--checkpoint", str(path), "--out", str(tmp_path / "r.png")])
    assert "holds a fine-tuned classifier (head.*, fc_norm.*) and no decoder" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["masks", "--model", "foo"], "unknown model 'foo'"),
    (["masks", "--num_frames", "3"], "--num_frames=3 must be divisible by --tubelet_size=2"),
    (["masks", "--mask_type", "run_cell", "--mask_ratio", "0.3"],
     "--mask_type run_cell with --mask_ratio 0.3 on a (8, 14, 14) token grid: a 2x2 running cell cannot hide"),
])
def test_figures_refuse_settings_that_cannot_be_drawn_by_name(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        engine.run(visualize.main, [*flags, "--out", str(tmp_path / "m.png")])
    assert stop.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "m.png").exists()


def test_a_figure_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails halfway (a full disk) leaves the previous image under the name, and no temporary file."""
    path = tmp_path / "fig.png"
    visualize.save(visualize.plt.figure(), path)
    before = path.read_bytes()

    def half_written(self, tmp, **kwargs):
        Path(tmp).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(visualize.plt.Figure, "savefig", half_written)
    with pytest.raises(engine.RunError, match="no space left"):
        visualize.save(visualize.plt.figure(), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["fig.png"]


def test_curves_put_runs_on_an_epoch_axis(tmp_path):
    for name, epochs in (("a", 3), ("b", 5)):
        (tmp_path / name).mkdir()
        rows = [dict(epoch=e, train_loss=1.0 / (e + 1), train_lr=1e-3) for e in range(epochs)]
        (tmp_path / name / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = visualize.curves_figure([tmp_path / "a" / "log.txt", tmp_path / "b" / "log.txt"])
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["a", "b"]
    assert list(lines[1].get_xdata()) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(lines[1].get_ydata(), [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5])


def test_command_line_writes_png_and_gif(tmp_path, monkeypatch):
    monkeypatch.setitem(vmae.SIZES, "micro", {k: v for k, v in MICRO.items() if k != "decoder_depth"})
    out = tmp_path / "masks.png"
    visualize.main(["masks", "--model", "micro", "--input_size", "64", "--num_frames", "8", "--synthetic", "2",
                    "--synthetic_size", "4", "--slots", "2", "--out", str(out)])
    assert out.stat().st_size > 1000 and out.with_suffix(".gif").stat().st_size > 1000
    # and a reconstruction from a checkpoint the way train_pretrain.py writes them
    args, cfg, _, _ = tp.parse_args(["--model", "micro", "--input_size", "64", "--num_frames", "8"])
    checkpoint = tmp_path / "checkpoint.pth"
    torch.save({"model": vmae.PretrainVideoMAE(cfg).state_dict(), "args": vars(args)}, checkpoint)
    visualize.main(["recon", "--checkpoint", str(checkpoint), "--synthetic_size", "4",
                    "--out", str(tmp_path / "r.png")])
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_checkpoint_folders_are_read_in_epoch_order(tmp_path):
    for name in ("checkpoint-10.pth", "checkpoint-9.pth", "checkpoint-last.pth", "checkpoint-best.pth", "log.txt"):
        (tmp_path / name).write_text("")
    files = visualize.checkpoint_files([str(tmp_path)])
    assert [f.name for f in files] == ["checkpoint-9.pth", "checkpoint-10.pth"]
    assert [visualize.checkpoint_label(f) for f in files] == ["10 epochs", "11 epochs"]
    assert visualize.checkpoint_files(["b.pth", "a.pth"]) == [visualize.Path("b.pth"), visualize.Path("a.pth")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        visualize.checkpoint_files([str(tmp_path / "empty")])


def test_training_strip_shows_each_checkpoints_own_reconstruction_under_the_same_masks():
    cfg = tiny()
    video = torch.randn(3, cfg.num_frames, cfg.img_size, cfg.img_size)
    drawn = dual_masks(cfg)
    first, second = vmae.PretrainVideoMAE(cfg), vmae.PretrainVideoMAE(cfg)
    panels = visualize.training_panels({"a": first, "b": second, "c": first}, video, drawn, False)
    assert list(panels) == ["input", "masked input", "a", "b", "c"]
    for name, model in (("a", first), ("b", second)):
        np.testing.assert_array_equal(panels[name],
                                      visualize.recon_panels(model, video, drawn, False)["reconstruction"])
    np.testing.assert_array_equal(panels["a"], panels["c"])
    assert not np.allclose(panels["a"], panels["b"])
    other = vmae.PretrainVideoMAE(tiny(img_size=56))
    with pytest.raises(checkpoints.CheckpointError, match="another model"):
        visualize.training_panels({"a": first, "small": other}, video, drawn, False)


def test_cube_loss_is_each_cubes_mean_error_over_the_masks_that_hide_it():
    cfg = tiny(num_frames=4, img_size=56)  # a 2 x 4 x 4 grid
    video = torch.randn(3, cfg.num_frames, cfg.img_size, cfg.img_size)
    masks = masking.MaskConfig(cfg.grid, "tube", 0.75, "run_cell", 0.5)
    loss = visualize.cube_loss(Oracle(cfg, True), video, masks, True, draws=16)
    assert torch.all(loss[~loss.isnan()] < 1e-10)  # a perfect model fails nowhere
    model = vmae.PretrainVideoMAE(cfg)
    loss = visualize.cube_loss(model, video, masks, False, draws=16, seed=3)
    # by hand, one mask pair at a time, from boolean masks and the prediction of every decoder query
    m = masks.draw(16, generator=torch.Generator().manual_seed(3))
    total, times = torch.zeros(cfg.num_tokens), torch.zeros(cfg.num_tokens)
    every = torch.arange(cfg.num_tokens)[None]
    truth = vmae.reconstruction_target(video[None], every, cfg.patch_size, cfg.tubelet_size, normalize=False)[0]
    with torch.no_grad():
        for i in range(16):
            visible, queries = (~m.encoder[i]).nonzero().flatten(), (~m.decoder[i]).nonzero().flatten()
            pred = model.eval()(video[None], visible[None], queries[None])[0]
            for row, cube in enumerate(queries.tolist()):
                if m.encoder[i, cube]:
                    total[cube] += (pred[row] - truth[cube]).pow(2).mean()
                    times[cube] += 1
    torch.testing.assert_close(loss, total / times, equal_nan=True, rtol=1e-4, atol=1e-7)


class FixedTokens(torch.nn.Module):
    def __init__(self, cfg, tokens):
        super().__init__()
        self.cfg, self.tokens = cfg, tokens

    def encode(self, video):
        return self.tokens[None]


def test_token_colours_give_cubes_the_encoder_represents_alike_one_colour():
    cfg = tiny(num_frames=4, img_size=56)
    group = torch.arange(cfg.num_tokens) % 3  # three kinds of cube, each one token vector
    tokens = torch.randn(3, 16)[group]
    colours = visualize.token_colours(FixedTokens(cfg, tokens), torch.zeros(1))
    assert colours.shape == (cfg.num_tokens, 3) and colours.min() >= 0 and colours.max() <= 1
    for g in range(3):
        assert torch.allclose(colours[group == g], colours[group == g][0].expand(int((group == g).sum()), 3), atol=1e-5)
    assert len({tuple(c.round(decimals=3).tolist()) for c in colours}) == 3


def test_command_line_draws_training_heatmap_and_pca(tmp_path, monkeypatch):
    monkeypatch.setitem(vmae.SIZES, "micro", {k: v for k, v in MICRO.items() if k != "decoder_depth"})
    args, cfg, _, _ = tp.parse_args(["--model", "micro", "--input_size", "64", "--num_frames", "8",
                                     "--mask_ratio", "0.5"])
    run = tmp_path / "run"
    run.mkdir()
    for epoch in (0, 4):
        state = {"model": vmae.PretrainVideoMAE(cfg).state_dict(), "args": vars(args)}
        torch.save(state, run / f"checkpoint-{epoch}.pth")
    common = ["--synthetic_size", "4", "--slots", "2"]
    visualize.main(["recon", "--checkpoints", str(run), *common, "--out", str(tmp_path / "t.png")])
    visualize.main(["heatmap", "--checkpoint", str(run / "checkpoint-4.pth"), "--draws", "4", *common,
                    "--out", str(tmp_path / "h.png")])
    visualize.main(["pca", "--checkpoint", str(run / "checkpoint-4.pth"), *common, "--out", str(tmp_path / "p.png")])
    for name in "thp":
        assert (tmp_path / f"{name}.png").stat().st_size > 1000 and (tmp_path / f"{name}.gif").stat().st_size > 1000
