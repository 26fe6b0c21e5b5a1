"""Mask properties over many draws, and the running-cell phases against the reference's."""
import pytest
import torch

import masking
import vmae
from conftest import golden

BASE_GRID = (8, 14, 14)  # ViT-B, 16 frames at 224 px
DRAWS = 256


@pytest.mark.parametrize("key", list(golden("masks")["running_cell"]))
def test_running_cell_phases_equal_the_reference(key):
    ref = golden("masks")["running_cell"][key]
    phases = masking.running_cell_phases(tuple(ref["input_size"]), ref["mask_ratio"])
    assert torch.equal(phases, ref["phase_maps"].reshape(4, -1))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_running_cell_every_position_dropped_k_of_any_four_slots(ratio):
    t, h, w = 12, 6, 8  # more slots than 4 so windows overlap, a non-square grid
    mask = masking.running_cell_mask(DRAWS, (t, h, w), ratio).reshape(DRAWS, t, h * w)
    k = int(4 * ratio)
    for start in range(t - 3):
        assert (mask[:, start:start + 4].sum(dim=1) == k).all()
    assert (mask.sum(dim=2) == h * w * k // 4).all()  # and k of 4 positions per frame


def test_running_cell_uses_all_four_phases_per_clip():
    phases = masking.running_cell_phases(BASE_GRID, 0.5)
    mask = masking.running_cell_mask(DRAWS, BASE_GRID, 0.5)
    which = (mask[:, None, :] == phases[None]).all(dim=2)  # (B, 4): the phase each clip follows
    assert (which.sum(dim=1) == 1).all()
    assert (which.sum(dim=0) > 0).all()


@pytest.mark.parametrize("key", list(golden("masks")["tube"]))
def test_tube_counts_and_same_holes_in_every_slot(key):
    ref = golden("masks")["tube"][key]
    t, h, w = ref["input_size"]
    mask = masking.tube_mask(DRAWS, (t, h, w), ref["mask_ratio"]).reshape(DRAWS, t, h * w)
    assert (mask == mask[:, :1]).all()
    assert (mask.sum(dim=2) == ref["masked_per_frame"]).all()
    assert (mask.sum(dim=(1, 2)) == ref["total_masked"]).all()
    # Over many clips every position gets hidden sometimes and shown sometimes: the pattern is random.
    assert mask[:, 0].any(dim=0).all() and (~mask[:, 0]).any(dim=0).all()


def test_tube_example_has_the_reference_shape():
    ref = golden("masks")["tube_example"]
    assert (ref["mask"] == ref["mask"][:1]).all()  # the reference's own mask: same in all 8 slots
    ours = masking.tube_mask(1, tuple(ref["input_size"]), ref["mask_ratio"]).reshape(ref["mask"].shape)
    assert ours.sum() == ref["mask"].sum()


def test_random_mask_counts():
    mask = masking.random_mask(DRAWS, BASE_GRID, 0.75)
    assert (mask.sum(dim=1) == int(0.75 * 1568)).all()
    per_slot = mask.reshape(DRAWS, 8, 196).sum(dim=2)
    assert (per_slot != per_slot[:, :1]).any()  # unlike tube, slots differ


@pytest.mark.parametrize("key", list(golden("masks")["token_counts"]))
def test_token_counts_per_clip(key):
    ref = golden("masks")["token_counts"][key]
    config = masking.MaskConfig(tuple(ref["input_size"]), "tube", ref["tube_ratio"], "run_cell", ref["cell_ratio"])
    drawn = config.draw(64)  # ratio 0: V1, the decoder is asked for exactly the encoder-hidden positions
    assert drawn.visible.shape[1] == config.num_visible == ref["encoder_tokens"]
    assert drawn.visible.shape[1] + drawn.queries.shape[1] == ref["decoder_input_tokens"]
    assert drawn.queries.shape[1] == config.num_queries == ref["decoder_predictions"]
    assert (drawn.in_loss.sum(dim=1) == ref["loss_tokens"]).all()


@pytest.mark.parametrize("kind,fn,ratio", [("tube", masking.tube_mask, 0.9), ("random", masking.random_mask, 0.9),
                                           ("run_cell", masking.running_cell_mask, 0.75)])
@pytest.mark.parametrize("grid", [BASE_GRID, (8, 16, 16), (4, 8, 6)])
def test_num_hidden_is_what_the_masks_hide(kind, fn, ratio, grid):
    mask = fn(8, grid, ratio)
    assert (mask.sum(dim=1) == masking.num_hidden(kind, grid, ratio)).all()


def test_step_flops_count_on_the_meta_device():
    """The FLOP count runs the step on the meta device, where a mask has no values to count: the counts come
    from the MaskConfig, made (and counted on the CPU) before."""
    import train_pretrain
    cfg = vmae.config("small", depth=1, decoder_depth=1, img_size=64, num_frames=4)
    forward, step = train_pretrain.step_flops(cfg, 1, masking.MaskConfig(cfg.grid, "tube", 0.75, "run_cell", 0.5))
    assert 0 < forward < step


def test_split_returns_sorted_complementary_indices():
    mask = masking.random_mask(16, BASE_GRID, 0.6)
    kept, dropped = masking.split(mask, int((~mask[0]).sum()))  # every row hides as many
    for b in range(16):
        assert torch.equal(kept[b], (~mask[b]).nonzero().squeeze(1))
        assert torch.equal(dropped[b], mask[b].nonzero().squeeze(1))


def test_masks_read_off_rows_with_different_counts_are_refused():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(masking.MaskError, match="same number"):
        masking.from_masks(mask)


def test_generator_makes_masks_reproducible():
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return (masking.tube_mask(4, BASE_GRID, 0.9, generator=g),
                masking.running_cell_mask(4, BASE_GRID, 0.5, generator=g))
    a, b, c = draw(1), draw(1), draw(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("ratio", [0.6, 0.1, 1.0, 0.0])
def test_running_cell_rejects_ratios_a_cell_cannot_make(ratio):
    with pytest.raises(ValueError, match=str(ratio)):
        masking.running_cell_mask(2, BASE_GRID, ratio)


def test_running_cell_rejects_odd_grid():
    with pytest.raises(ValueError, match="H'=7"):
        masking.running_cell_mask(2, (8, 7, 7), 0.5)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_tube_and_random_reject_bad_ratio(ratio):
    for fn in (masking.tube_mask, masking.random_mask):
        with pytest.raises(masking.MaskError, match=r"the ratio must be in \[0, 1\)"):
            fn(2, BASE_GRID, ratio)


def test_a_mask_setting_that_cannot_be_drawn_is_refused_when_made():
    with pytest.raises(masking.MaskError, match="cannot hide a share of 0.3"):
        masking.MaskConfig(BASE_GRID, "run_cell", 0.3, "run_cell", 0.5)
    with pytest.raises(masking.MaskError, match="0.25, 0.5"):
        masking.MaskConfig(BASE_GRID, "tube", 0.9, "run_cell", 0.3)
    masking.MaskConfig(BASE_GRID, "tube", 0.9, "run_cell", 0.3 * 0)  # V1: no decoder mask to draw
    with pytest.raises(masking.MaskError, match="unknown mask kind 'cube'"):
        masking.MaskConfig(BASE_GRID, "cube", 0.9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_masks_are_made_on_the_gpu():
    for mask in (masking.tube_mask(4, BASE_GRID, 0.9, device="cuda"),
                 masking.running_cell_mask(4, BASE_GRID, 0.5, device="cuda"),
                 masking.random_mask(4, BASE_GRID, 0.9, device="cuda")):
        assert mask.is_cuda and mask.shape == (4, 1568)


def test_a_new_mask_kind_is_one_function_and_one_registry_line(monkeypatch):
    """Register a maker in MASKS and the recipes' flags, the counts and the training step take it."""
    import train_pretrain

    def every_other_slot(batch_size, grid, ratio, device=None, generator=None):  # hides slots 0, 2, 4, ...
        t, h, w = grid
        hidden = (torch.arange(t, device=device) % 2 == 0)[:, None].expand(t, h * w).reshape(-1)
        return hidden[None].expand(batch_size, -1)

    monkeypatch.setitem(masking.MASKS, "slots", every_other_slot)
    _, cfg, masks, _ = train_pretrain.parse_args(["--mask_type", "slots", "--decoder_mask_ratio", "0"])
    assert (masks.num_visible, masks.num_queries) == (32, 32)  # demo grid (4, 4, 4): two of four slots hidden
    model = vmae.PretrainVideoMAE(cfg)
    video = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
    loss = train_pretrain.pretrain_step_loss(model, cfg, video, masks)
    assert torch.isfinite(loss)
