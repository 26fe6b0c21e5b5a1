"""extract_features.py on a folder of three tiny videos: the features are forward_features on the same test
views, averaged; the token grid; index.csv; a rerun writes nothing; a corrupt video is named (or skipped and
listed); other settings in the same folder stop."""
import csv

import numpy as np
import pytest
import torch

import data
import engine
import extract_features as ef
import vmae
from conftest import export_videos
from test_train_pretrain import MICRO, run_processes, torchrun_env


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """Three 24-frame videos (and their `path label` list), and a micro classifier's checkpoint."""
    monkeypatch.setitem(vmae.SIZES, "micro", dict(MICRO))
    listed = export_videos(data.SyntheticVideos(3, length=24, height=36, width=48), str(tmp_path), "videos")
    model = vmae.VideoClassifier(vmae.config("micro", img_size=32, num_frames=4), 5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"model": model.state_dict(), "args": {"model": "micro", "input_size": 32, "num_frames": 4}},
               tmp_path / "ckpt.pth")
    return dict(root=tmp_path, folder=tmp_path / "videos", list=listed, model=model.eval(),
                argv=["--checkpoint", str(tmp_path / "ckpt.pth"), "--num_workers", "0", "--batch_size", "4",
                      "--device", "cpu"])


def run(setup, out, *extra) -> str:
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ef.main(setup["argv"] + ["--output_dir", str(out), *extra])
    return printed.getvalue()


def test_features_are_the_mean_of_forward_features_over_the_views(setup, tmp_path):
    out = tmp_path / "features"
    printed = run(setup, out, "--data_path", str(setup["folder"]), "--test_num_segment", "2", "--test_num_crop", "3")
    assert "3 video(s) written, 18 clips" in printed
    videos = data.VideoList(data.read_pretrain_list(str(setup["folder"])))
    views = data.FinetuneDataset(videos, "test", num_frames=4, input_size=32, short_side_size=32, test_num_segment=2,
                                 test_num_crop=3)
    for v in range(3):
        clips = torch.stack([views[v * 6 + i][0] for i in range(6)])  # (6, 3, T, H, W)
        expected = setup["model"].forward_features(clips)[1].mean(0).detach()
        got = np.load(out / f"video_0000{v}.mp4.npy")
        assert got.shape == (MICRO["embed_dim"],) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-5)
    rows = list(csv.reader(open(out / "index.csv")))
    assert rows[0] == ["video", "file", "views"] and [r[1:] for r in rows[1:]] == [
        [f"video_0000{v}.mp4.npy", "6"] for v in range(3)]


def test_tokens_and_labels_from_a_list(setup, tmp_path):
    out = tmp_path / "features"
    run(setup, out, "--data_path", setup["list"], "--data_root", str(setup["root"]), "--tokens")
    videos = data.VideoList(data.read_pretrain_list(setup["list"], str(setup["root"])))
    clip = data.FinetuneDataset(videos, "test", num_frames=4, input_size=32, short_side_size=32, test_num_segment=1,
                                test_num_crop=1)[1][0]  # video 1's one view
    tokens = setup["model"].forward_features(clip[None])[0][0].detach()  # (N, D)
    got = np.load(out / "videos" / "video_00001.mp4.tokens.npy")
    assert got.shape == (2, 2, 2, MICRO["embed_dim"])  # (T', H', W', D)
    np.testing.assert_allclose(got.reshape(-1, MICRO["embed_dim"]), tokens.numpy(), atol=1e-5, rtol=1e-5)
    rows = list(csv.reader(open(out / "index.csv")))
    assert rows[0] == ["video", "file", "views", "label"] and [r[-1] for r in rows[1:]] == ["0", "1", "2"]


def test_a_rerun_writes_nothing_new(setup, tmp_path):
    out = tmp_path / "features"
    run(setup, out, "--data_path", str(setup["folder"]))
    (out / "video_00001.mp4.npy").unlink()  # as if interrupted before the second video
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".npy"}
    printed = run(setup, out, "--data_path", str(setup["folder"]))
    assert "3 videos, 2 already done; 1 to go" in printed and "1 video(s) written, 1 clips" in printed
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".npy"}
    assert set(after) == set(before) | {"video_00001.mp4.npy"}
    assert all(after[name] == before[name] for name in before)
    printed = run(setup, out, "--data_path", str(setup["folder"]))
    assert "3 already done; 0 to go" in printed and not any(".tmp" in p.name for p in out.iterdir())
    with pytest.raises(engine.RunError, match="other weights or settings .*test_num_crop: 1 then, 3 now"):
        run(setup, out, "--data_path", str(setup["folder"]), "--test_num_crop", "3")
    with pytest.raises(engine.RunError, match="other weights or settings .*precision: 'fp32' then, 'bf16' now"):
        run(setup, out, "--data_path", str(setup["folder"]), "--precision", "bf16")


def test_a_corrupt_video_is_named_or_skipped_and_listed(setup, tmp_path, capsys):
    bad = setup["folder"] / "video_00003.mp4"
    bad.write_bytes(b"not a video" * 100)
    argv = setup["argv"] + ["--data_path", str(setup["folder"]), "--output_dir", str(tmp_path / "a")]
    with pytest.raises(SystemExit) as stop:
        engine.run(ef.main, argv)
    assert stop.value.code == 2 and f"{bad}: OpenCV cannot open it" in capsys.readouterr().err
    printed = run(setup, tmp_path / "b", "--data_path", str(setup["folder"]), "--skip_bad_videos",
                  "--max_bad_fraction", "0.5")
    assert f"skipped 1 unreadable video(s) (--skip_bad_videos): {bad}" in printed
    assert sorted(p.name for p in (tmp_path / "b").glob("*.npy")) == [f"video_0000{v}.mp4.npy" for v in range(3)]
    assert str(bad) not in (tmp_path / "b" / "index.csv").read_text()


def two_process_extraction(rank: int, world: int, port: int, argv: list[str]):
    torchrun_env(rank, world, port)
    vmae.SIZES["micro"] = MICRO  # this process's own copy of the table
    ef.main(argv)


def test_two_processes_split_the_videos_and_write_what_one_does(setup, tmp_path):
    """As under torchrun: each process takes whole videos (a video's views are averaged in one place), and
    the files and index are those of a single process."""
    flags = ["--data_path", str(setup["folder"]), "--test_num_segment", "2"]
    run(setup, tmp_path / "one", *flags)
    run_processes(two_process_extraction, 2, setup["argv"] + flags + ["--output_dir", str(tmp_path / "two")])
    for v in range(3):
        np.testing.assert_allclose(np.load(tmp_path / "two" / f"video_0000{v}.mp4.npy"),
                                   np.load(tmp_path / "one" / f"video_0000{v}.mp4.npy"), atol=1e-6, rtol=0)
    assert (tmp_path / "two" / "index.csv").read_text() == (tmp_path / "one" / "index.csv").read_text()
