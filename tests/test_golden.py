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


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretrain_outputs_dual_masking(name):
    model, entry = pretrain_model(name)
    with torch.no_grad():
        out = model(golden_video(entry), entry["encoder_mask"], entry["decoder_mask"])
    assert_probe(out, entry["outputs_dual"])


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretrain_outputs_v1_masking(name):
    model, entry = pretrain_model(name)
    video, enc = golden_video(entry), entry["encoder_mask"]
    with torch.no_grad():
        out = model(video, enc)
        # The reference's data pipeline feeds "not the encoder mask" as decoder mask when decoder masking
        # is off; that must be the same as no decoder mask.
        out_negated = model(video, enc, ~enc)
    assert_probe(out, entry["outputs_v1"])
    torch.testing.assert_close(out_negated, out, atol=0, rtol=0)


@pytest.mark.parametrize("name", PRETRAIN)
def test_counts_passed_up_front_give_the_same_outputs(name):
    model, entry = pretrain_model(name)
    video, enc, dec = golden_video(entry), entry["encoder_mask"], entry["decoder_mask"]
    grid = tuple(entry["config"]["grid"])
    n = entry["config"]["num_tokens"]
    num_visible = n - masking.num_hidden("tube", grid, 0.9)
    num_queries = n - masking.num_hidden("run_cell", grid, 0.5)
    with torch.no_grad():
        out = model(video, enc, dec, num_visible=num_visible, num_queries=num_queries)
    assert_probe(out, entry["outputs_dual"])


@pytest.mark.parametrize("name", PRETRAIN)
def test_targets(name):
    _, entry = pretrain_model(name)
    p = entry["config"]["patch_size"]
    video = golden_video(entry)
    kept = vmae.mask_indices(entry["decoder_mask"])[0]
    hidden = vmae.mask_indices(entry["encoder_mask"])[1]
    target = vmae.reconstruction_target(video, p, 2)
    raw = vmae.reconstruction_target(video, p, 2, normalize=False)
    assert_probe(vmae.gather_tokens(target, kept), entry["target_dual"], rtol=1e-3)
    assert_probe(vmae.gather_tokens(target, hidden), entry["target_v1"], rtol=1e-3)
    assert_probe(vmae.gather_tokens(raw, kept), entry["target_dual_raw"])


@pytest.mark.parametrize("name", PRETRAIN)
def test_losses(name):
    model, entry = pretrain_model(name)
    p = entry["config"]["patch_size"]
    video, enc, dec = golden_video(entry), entry["encoder_mask"], entry["decoder_mask"]
    target = vmae.reconstruction_target(video, p, 2)
    raw = vmae.reconstruction_target(video, p, 2, normalize=False)
    with torch.no_grad():
        out_dual, out_v1 = model(video, enc, dec), model(video, enc)
    assert vmae.pretrain_loss(out_dual, target, enc, dec).item() == pytest.approx(entry["loss_dual"], rel=1e-3)
    assert vmae.pretrain_loss(out_v1, target, enc).item() == pytest.approx(entry["loss_v1"], rel=1e-3)
    assert vmae.pretrain_loss(out_dual, raw, enc, dec).item() == pytest.approx(
        entry["loss_dual_with_raw_target"], rel=1e-5)


@pytest.mark.parametrize("name", PRETRAIN)
def test_loss_mask_and_token_counts(name):
    _, entry = pretrain_model(name)
    enc, dec = entry["encoder_mask"], entry["decoder_mask"]
    kept, _ = vmae.mask_indices(dec)
    assert torch.equal(enc.gather(1, kept), entry["loss_mask_dual"])
    counts = entry["token_counts"]
    visible, hidden = vmae.mask_indices(enc)
    assert visible.shape[1] == counts["encoder_tokens"]
    assert visible.shape[1] + kept.shape[1] == counts["decoder_input_tokens_dual"]
    assert kept.shape[1] == counts["decoder_predictions_dual"]
    assert int(entry["loss_mask_dual"][0].sum()) == counts["loss_tokens_dual"]
    assert hidden.shape[1] == counts["decoder_predictions_v1"]


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
