"""Parity with the reference implementation: its weights load, and our numbers equal its numbers."""
import pytest
import torch

import masking
import vmae
from conftest import assert_probe, config_from_reference, golden, golden_video

PRETRAIN = ["p16", "p14_giantlike"]


def pretrain_model(name: str) -> tuple[vmae.PretrainVideoMAE, dict]:
    entry = golden("pretrain_tiny")[name]
    model = vmae.PretrainVideoMAE(config_from_reference(entry["official_kwargs"])).eval()
    model.load_state_dict(entry["state_dict"], strict=True)
    return model, entry


def classifier(num_frames_key: str = "") -> tuple[vmae.VideoClassifier, dict]:
    entry = golden("finetune_tiny")
    kwargs = entry[f"official_kwargs{num_frames_key}"]
    model = vmae.VideoClassifier(config_from_reference(kwargs), kwargs["num_classes"],
                                 init_scale=kwargs["init_scale"]).eval()
    model.load_state_dict(entry["state_dict"], strict=True)
    return model, entry


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretrain_state_dict_has_reference_keys_order_and_shapes(name):
    model, entry = pretrain_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in entry["state_dict"].items()}
    assert list(ours) == list(theirs)  # same names in the same order ...
    assert ours == theirs  # ... and shapes, so loading works both ways with strict=True


def reference_masks(entry: dict, dual: bool = True) -> masking.Masks:
    """The reference's masks of this entry with the positions the model takes, read off them."""
    return masking.from_masks(entry["encoder_mask"], entry["decoder_mask"] if dual else None)


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretrain_outputs_dual_masking(name):
    model, entry = pretrain_model(name)
    masks = reference_masks(entry)
    with torch.no_grad():
        out = model(golden_video(entry), masks.visible, masks.queries)
    assert_probe(out, entry["outputs_dual"])


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretrain_outputs_v1_masking(name):
    model, entry = pretrain_model(name)
    video, v1 = golden_video(entry), reference_masks(entry, dual=False)
    # The reference's data pipeline feeds "not the encoder mask" as decoder mask when decoder masking is off;
    # that must be the same as no decoder mask.
    negated = masking.from_masks(entry["encoder_mask"], ~entry["encoder_mask"])
    assert torch.equal(negated.queries, v1.queries) and torch.equal(negated.visible, v1.visible)
    with torch.no_grad():
        out = model(video, v1.visible, v1.queries)
    assert_probe(out, entry["outputs_v1"])


@pytest.mark.parametrize("name", PRETRAIN)
def test_masks_drawn_by_their_config_give_the_positions_read_off_them(name):
    """MaskConfig knows the counts before it draws (no reading them off a mask in the training step); the
    positions it sorts out of the masks are the ones reading the masks gives."""
    entry = golden("pretrain_tiny")[name]
    config = masking.MaskConfig(tuple(entry["config"]["grid"]), "tube", 0.9, "run_cell", 0.5)
    drawn = config.draw(3)
    read = masking.from_masks(drawn.encoder, drawn.decoder)
    for ours, theirs in zip(drawn[2:], read[2:]):
        assert torch.equal(ours, theirs)
    assert (config.num_visible, config.num_queries) == (read.visible.shape[1], read.queries.shape[1])


@pytest.mark.parametrize("name", PRETRAIN)
def test_targets(name):
    _, entry = pretrain_model(name)
    p = entry["config"]["patch_size"]
    video, dual, v1 = golden_video(entry), reference_masks(entry), reference_masks(entry, dual=False)
    assert_probe(vmae.reconstruction_target(video, dual.queries, p, 2), entry["target_dual"], rtol=1e-3)
    assert_probe(vmae.reconstruction_target(video, v1.queries, p, 2), entry["target_v1"], rtol=1e-3)
    assert_probe(vmae.reconstruction_target(video, dual.queries, p, 2, normalize=False), entry["target_dual_raw"])


@pytest.mark.parametrize("name", PRETRAIN)
def test_losses(name):
    model, entry = pretrain_model(name)
    p = entry["config"]["patch_size"]
    video, dual, v1 = golden_video(entry), reference_masks(entry), reference_masks(entry, dual=False)
    with torch.no_grad():
        out_dual, out_v1 = model(video, dual.visible, dual.queries), model(video, v1.visible, v1.queries)
    target_dual, target_v1 = (vmae.reconstruction_target(video, m.queries, p, 2) for m in (dual, v1))
    raw = vmae.reconstruction_target(video, dual.queries, p, 2, normalize=False)
    assert vmae.pretrain_loss(out_dual, target_dual, dual.in_loss).item() == pytest.approx(entry["loss_dual"], rel=1e-3)
    assert vmae.pretrain_loss(out_v1, target_v1, v1.in_loss).item() == pytest.approx(entry["loss_v1"], rel=1e-3)
    assert vmae.pretrain_loss(out_dual, raw, dual.in_loss).item() == pytest.approx(
        entry["loss_dual_with_raw_target"], rel=1e-5)


@pytest.mark.parametrize("name", PRETRAIN)
def test_loss_mask_and_token_counts(name):
    _, entry = pretrain_model(name)
    dual, v1 = reference_masks(entry), reference_masks(entry, dual=False)
    assert torch.equal(dual.in_loss, entry["loss_mask_dual"])
    counts = entry["token_counts"]
    assert dual.visible.shape[1] == counts["encoder_tokens"]
    assert dual.visible.shape[1] + dual.queries.shape[1] == counts["decoder_input_tokens_dual"]
    assert dual.queries.shape[1] == counts["decoder_predictions_dual"]
    assert int(entry["loss_mask_dual"][0].sum()) == counts["loss_tokens_dual"]
    assert v1.queries.shape[1] == counts["decoder_predictions_v1"] and v1.in_loss.all()


@pytest.mark.parametrize("name", PRETRAIN)
def test_position_tables(name):
    model, entry = pretrain_model(name)
    torch.testing.assert_close(model.encoder.pos_embed, entry["pos_embed_encoder"], atol=1e-6, rtol=0)
    torch.testing.assert_close(model.pos_embed, entry["pos_embed_decoder"], atol=1e-6, rtol=0)


def test_classifier_logits_16_frames():
    model, entry = classifier()
    with torch.no_grad():
        logits = model(golden_video(entry))
    torch.testing.assert_close(logits, entry["logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.pos_embed, entry["pos_embed"], atol=1e-6, rtol=0)


def test_classifier_logits_8_frames_same_weights():
    model, entry = classifier("_8f")
    with torch.no_grad():
        logits = model(golden_video(entry)[:, :, :8])
    torch.testing.assert_close(logits, entry["logits_8f"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.pos_embed, entry["pos_embed_8f"], atol=1e-6, rtol=0)


def test_classifier_keys():
    model, entry = classifier()
    assert list(model.state_dict()) == list(entry["state_dict"])


def test_pretrain_to_finetune_key_lists():
    """Loading the p16 pretraining weights into a fresh classifier, as the reference's fine-tune script
    does (drop the `encoder.` prefix, load non-strictly), leaves the same keys missing and unused."""
    model, entry = classifier()
    pretrained = golden("pretrain_tiny")["p16"]["state_dict"]
    renamed = {k.removeprefix("encoder."): v for k, v in pretrained.items()}
    result = model.load_state_dict(renamed, strict=False)
    expected = entry["load_pretrain_p16"]
    assert sorted(result.missing_keys) == sorted(expected["missing_keys"])
    assert sorted(result.unexpected_keys) == sorted(expected["unexpected_keys"])
