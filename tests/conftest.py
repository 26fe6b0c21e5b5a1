"""Shared test helpers: the reference figures in tests/golden/ and how to compare against them."""
import functools
import os
import signal
import sys
from pathlib import Path

import cv2
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is a flat set of scripts, not a package
os.environ.setdefault("MPLBACKEND", "Agg")  # figures without a screen

import vmae  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden"


def export_videos(videos, root, split: str = "train", fps: int = 25) -> str:
    """Write built-in videos (a data.SyntheticVideos) as root/split/video_NNNNN.mp4 and the list root/split.csv
    (`path label` lines, relative to root), as real files for the tests that read videos; returns the list."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    lines = []
    for i in range(len(videos)):
        name = f"{split}/video_{videos.first_index + i:05d}.mp4"
        writer = cv2.VideoWriter(os.path.join(root, name), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                 (videos.width, videos.height))
        for frame in videos.render(i, range(videos.length)):
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        lines.append(f"{name} {videos.label(i)}\n")
    Path(root, f"{split}.csv").write_text("".join(lines))
    return os.path.join(root, f"{split}.csv")


@pytest.fixture(autouse=True)
def fail_a_hung_test():
    """A test still running after 10 minutes has hung (the slowest takes about 1.5): it fails with its stack,
    and the suite goes on instead of running into CI's time limit."""
    def hung(number, frame):
        raise TimeoutError("this test ran for 10 minutes: it hung")
    if not hasattr(signal, "SIGALRM"):  # Windows
        yield
        return
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(600)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@functools.cache
def golden(name: str) -> dict:
    return torch.load(GOLDEN / f"{name}.pt", weights_only=True)


def golden_video(entry: dict) -> torch.Tensor:
    return entry["video_int8"].float() * entry["video_scale"]  # (B, 3, T, H, W), exact float32 input


def assert_probe(y: torch.Tensor, ref: dict, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Compare a full (B, n, F) tensor with a stored probe (strided columns, end tokens, token sums)."""
    assert list(y.shape) == ref["shape"]
    s = ref["stride"]
    torch.testing.assert_close(y[:, :, ::s], ref["cols"], atol=atol, rtol=rtol)
    torch.testing.assert_close(y[:, [0, -1], :], ref["ends"], atol=atol, rtol=rtol)
    torch.testing.assert_close(y.sum(-1), ref["tok_sum"], atol=atol * y.shape[-1] ** 0.5, rtol=rtol)


def config_from_reference(kwargs: dict) -> vmae.VideoMAEConfig:
    """Our config for the keyword arguments the reference model classes were built with."""
    pretrain = "encoder_embed_dim" in kwargs
    enc = "encoder_" if pretrain else ""
    extra = dict(decoder_embed_dim=kwargs["decoder_embed_dim"], decoder_depth=kwargs["decoder_depth"],
                 decoder_num_heads=kwargs["decoder_num_heads"]) if pretrain else {}
    return vmae.VideoMAEConfig(
        img_size=kwargs["img_size"], patch_size=kwargs["patch_size"], num_frames=kwargs["all_frames"],
        tubelet_size=kwargs["tubelet_size"], embed_dim=kwargs[f"{enc}embed_dim"], depth=kwargs[f"{enc}depth"],
        num_heads=kwargs[f"{enc}num_heads"], mlp_ratio=kwargs["mlp_ratio"],
        drop_path_rate=kwargs["drop_path_rate"], **extra)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_path(request, monkeypatch):
    """Every test but tests/test_gpu.py's checks the CPU path, also on a machine with a GPU: the scripts'
    `--device` default (cuda when available) is cpu in the test's process, so the suite means the same
    there as in CI. (Processes a test starts get `--device cpu` from its command line.)"""
    if not request.module.__name__.endswith("test_gpu"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
