"""The CUDA path: the same numbers as the reference on a GPU, bf16 autocast on the flash-attention kernel,
a train step without one host sync, torch.compile, and both recipes (FSDP too) end to end. Skipped on a
machine without a GPU (CI); run them where there is one: `python -m pytest -q tests/test_gpu.py`."""
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import masking
import engine
import train_pretrain as tp
import vmae
from conftest import assert_probe, golden_video
from test_golden import classifier, pretrain_model
from test_model import pretrain_step
from test_train_pretrain import MICRO, ddp_main, micro, run_processes  # noqa: F401 (micro is a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
CUDA = torch.device("cuda")


@pytest.fixture
def no_tf32():
    """Full fp32 matmuls and convolutions, so the GPU is held to the CPU's tolerance class."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def small_on_gpu(**overrides):
    """ViT-S widths (head dim 64, as every size but giant) at a small input, on the GPU."""
    cfg = vmae.config("small", img_size=64, num_frames=8, **overrides)
    return cfg, vmae.PretrainVideoMAE(cfg).to(CUDA)


def step_loss(model, cfg, video):
    """The training loop's loss (masks drawn on the device): tube 0.75, running cell 0.5."""
    return tp.pretrain_step_loss(model, cfg, video, masking.MaskConfig(mask_ratio=0.75))


# -----------------------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize("name", ["p16", "p14_giantlike"])
def test_reference_outputs_on_the_gpu(name, no_tf32):
    model, entry = pretrain_model(name)
    model.to(CUDA)
    video, enc, dec = (golden_video(entry).to(CUDA), entry["encoder_mask"].to(CUDA), entry["decoder_mask"].to(CUDA))
    with torch.no_grad():
        assert_probe(model(video, enc, dec).cpu(), entry["outputs_dual"], atol=1e-4)
        assert_probe(model(video, enc).cpu(), entry["outputs_v1"], atol=1e-4)


def test_reference_logits_on_the_gpu(no_tf32):
    model, entry = classifier()
    with torch.no_grad():
        logits = model.to(CUDA)(golden_video(entry).to(CUDA)).cpu()
    torch.testing.assert_close(logits, entry["logits"], atol=1e-4, rtol=1e-3)


def test_bf16_training_runs_on_flash_attention_and_stays_near_fp32():
    """Only the flash kernel is allowed: if our q, k, v did not qualify (layout, dtype, head dim), the
    forward would raise instead of quietly falling back to the slow path."""
    torch.manual_seed(0)
    cfg, model = small_on_gpu()
    video = torch.randn(4, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=CUDA)
    enc, dec = (masking.tube_mask(4, cfg.grid, 0.75, device=CUDA),
                masking.running_cell_mask(4, cfg.grid, 0.5, device=CUDA))
    with torch.no_grad():
        full = model(video, enc, dec)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(video, enc, dec)
        half.float().square().mean().backward()
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.05 * full.abs().max()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad)


def test_a_train_step_makes_no_host_sync():
    """Masks drawn on the device, forward, target, loss, backward, fused AdamW: no call may wait for the
    GPU (no .item(), no data-dependent shape, no copy to the host)."""
    torch.manual_seed(0)
    cfg, model = small_on_gpu()
    optimizer = engine.make_optimizer(engine.param_groups(model, 0.05), 1e-4, (0.9, 0.95), 1e-8, CUDA)
    video = torch.randn(4, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=CUDA)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_loss(model, cfg, video)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step()  # the first step allocates AdamW's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.stack(losses).isfinite().all()


def test_compiled_step_is_one_graph_and_matches_eager_on_the_gpu(no_tf32):
    torch.manual_seed(0)
    cfg, model = small_on_gpu(depth=2, decoder_depth=1)
    video = torch.randn(2, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=CUDA)
    enc, dec = (masking.tube_mask(2, cfg.grid, 0.75, device=CUDA),
                masking.running_cell_mask(2, cfg.grid, 0.5, device=CUDA))
    eager = pretrain_step(model, video, enc, dec)  # mask counts from the settings, as in the loop
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(pretrain_step, fullgraph=True)(model, video, enc, dec)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for (name, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")


# -----------------------------------------------------------------------------------------------------
# The recipes


def test_pretraining_on_the_gpu_with_bf16_compile_and_checkpointing(tmp_path, micro):
    from test_train_pretrain import cli
    tp.main(cli(tmp_path, "--device", "cuda", "--precision", "bf16", "--compile", "--with_checkpoint"))
    rows = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert len(rows) == 3 and all(r["train_loss"] == r["train_loss"] for r in rows)  # three epochs, no NaN
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in state["model"])  # the compiled wrapper is not saved
    vmae.PretrainVideoMAE(vmae.config("small", **MICRO, img_size=32, num_frames=4)).load_state_dict(state["model"])


def test_fine_tuning_on_the_gpu(tmp_path):
    from test_train_finetune import cli, rows, run
    printed = run(cli(tmp_path, "--device", "cuda", "--precision", "bf16", "--compile"))
    assert "cuda" in printed
    test = [r for r in rows(tmp_path) if "test_video_acc1" in r]
    assert test and 0 <= test[0]["test_video_acc1"] <= 100


def test_fsdp_on_one_gpu_equals_plain_training(tmp_path):
    """One process under torchrun's variables with NCCL: FSDP's first-epoch loss is the unwrapped model's."""
    losses = []
    for run, flags in (("plain", ()), ("fsdp", ("--fsdp",))):
        run_processes(ddp_main, 1, str(tmp_path / run), "--device", "cuda", "--precision", "fp32", *flags)
        losses.append(json.loads((tmp_path / run / "log.txt").read_text().splitlines()[0])["train_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
