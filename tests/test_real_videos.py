"""Both recipes trained from real video files on disk (the built-in clips written out as .mp4 with their list
files), through the same OpenCV path a user's Kinetics folder takes."""
import json

import pytest
import torch

import data
import train_finetune as tf
import train_pretrain as tp
import vmae
from conftest import export_videos
from test_train_pretrain import MICRO

SMALL = ["--model", "micro", "--input_size", "32", "--num_frames", "4", "--sampling_rate", "2", "--batch_size", "2",
         "--epochs", "1", "--warmup_epochs", "1", "--num_workers", "0"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """root/train/*.mp4 (8 videos, 4 classes) with root/train.csv, root/val/*.mp4 (4) with root/val.csv."""
    root = tmp_path_factory.mktemp("videos")
    export_videos(data.SyntheticVideos(8, 4, length=12, height=32, width=40), str(root), "train")
    export_videos(data.SyntheticVideos(4, 4, length=12, height=32, width=40, first_index=8), str(root), "val")
    return root


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.mark.parametrize("source", ["folder", "list"])
def test_pretraining_from_video_files(videos, source, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(vmae.SIZES, "micro", MICRO)
    if source == "folder":  # scanned recursively: 12 videos
        data_path = videos
    else:  # the reference's format, `path 0 -1` for a video file, relative to --data_root
        data_path = tmp_path / "pretrain.csv"
        data_path.write_text("".join(f"train/video_{i:05d}.mp4 0 -1\n" for i in range(8)))
    out = tmp_path / "out"
    tp.main([*SMALL, "--data_path", str(data_path), "--data_root", str(videos), "--num_sample", "1",
             "--output_dir", str(out)])
    [epoch] = rows(out)
    assert epoch["steps"] == (12 if source == "folder" else 8) // 2
    assert torch.isfinite(torch.tensor(epoch["train_loss"]))
    assert "synthetic" not in capsys.readouterr().out.split("data:")[1].split("\n")[0]


def test_finetuning_from_video_files_with_lists(videos, tmp_path, monkeypatch):
    monkeypatch.setitem(vmae.SIZES, "micro", MICRO)
    out = tmp_path / "out"
    tf.main([*SMALL, "--data_path", str(videos), "--data_root", str(videos), "--nb_classes", "4",
             "--test_num_segment", "2", "--test_num_crop", "1", "--output_dir", str(out)])
    epoch, test = rows(out)
    assert epoch["steps"] == 8 // 2 and test["test_videos"] == 4 and test["test_clips"] == 4 * 2
    assert epoch["skipped_videos"] == 0


def test_evaluation_leaves_out_an_unreadable_video_and_its_stand_in(videos, tmp_path, monkeypatch):
    """With --skip_bad_videos an unreadable test video is replaced by another one when loading; that
    stand-in must not be counted a second time, and the unreadable video must not count at all."""
    monkeypatch.setitem(vmae.SIZES, "micro", MICRO)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.csv").write_text((videos / "train.csv").read_text())
    (lists / "val.csv").write_text((videos / "val.csv").read_text() + f"{tmp_path / 'broken.mp4'} 1\n")
    out = tmp_path / "out"
    weights = tmp_path / "weights.pth"
    torch.save({"model": vmae.VideoClassifier(vmae.config("micro", img_size=32, num_frames=4), 4).state_dict()},
               weights)
    tf.main([*SMALL, "--data_path", str(lists), "--data_root", str(videos), "--nb_classes", "4", "--eval",
             "--finetune", str(weights), "--skip_bad_videos", "--max_bad_fraction", "0.5", "--test_num_segment", "2",
             "--test_num_crop", "1", "--output_dir", str(out)])
    [test] = rows(out)
    assert test["test_videos"] == 4 and test["test_clips"] == 4 * 2  # 5 listed, 1 unreadable
