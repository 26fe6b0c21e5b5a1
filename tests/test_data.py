"""Tests for data.py: real files written here (mp4v .mp4, MJPG .avi, JPEG frame folders, broken files, bad
lists), decoded and sampled, with every expected index recomputed from the reference's formulas (its loaders'
frame sampling, written out again below), never copied from a run of data.py.

Frames carry their own index as a flat colour (red = 16 + 28·(i // 16), green = 16 + 14·(i % 16), blue = 128):
it survives lossy codecs, crops and resizes, and a red/blue swap would read back wrong.
"""
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import data
from conftest import export_videos
from vmae import IMAGENET_MEAN, IMAGENET_STD

H, W = 48, 64


def colour(i: int) -> tuple[int, int, int]:
    return 16 + 28 * (i // 16), 16 + 14 * (i % 16), 128  # RGB, i < 128


def index_of(rgb: np.ndarray) -> int:
    """The index painted into an RGB frame (or any crop of it), from its mean colour."""
    r, g, b = rgb.reshape(-1, 3).mean(0)
    assert abs(b - 128) < 8, "blue is off: channels swapped?"
    return int(round((r - 16) / 28)) * 16 + int(round((g - 16) / 14))


def write_video(path: str, n: int, fourcc: str = "mp4v") -> str:
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), 25, (W, H))
    assert writer.isOpened(), f"this OpenCV cannot write {fourcc}"
    for i in range(n):
        writer.write(np.full((H, W, 3), colour(i)[::-1], np.uint8))  # BGR
    writer.release()
    return path


def write_frames(folder: str, n: int, tmpl: str = "img_{:05}.jpg", start_idx: int = 1) -> str:
    os.makedirs(folder)
    for i in range(n):
        image = np.full((H, W, 3), colour(i)[::-1], np.uint8)  # BGR
        cv2.imwrite(os.path.join(folder, tmpl.format(i + start_idx)), image)
    return folder


def test_clips_are_normalised_the_way_the_model_undoes_it():
    """to_tensor normalises the frames for the model; the model's raw-pixel target undoes it to x / 255."""
    import vmae
    frames = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)  # one 2 x 16 x 16 cube
    target = vmae.reconstruction_target(data.to_tensor(frames)[None], torch.zeros(1, 1, dtype=torch.long), 16, 2,
                                        normalize=False)  # (1, 1, 2·16·16·3): frame, row, column, channel
    torch.testing.assert_close(target.flatten(), torch.from_numpy(frames).float().flatten() / 255, atol=1e-6, rtol=0)


def clip_indices(clip: torch.Tensor) -> list[int]:
    """Indices painted into a normalised (3, T, H, W) clip."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    frames = ((clip * std + mean) * 255).permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
    return [index_of(f) for f in frames]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    return {
        "mp4": write_video(str(root / "a.mp4"), 100, "mp4v"),
        "avi": write_video(str(root / "b.avi"), 100, "MJPG"),
        "frames": write_frames(str(root / "frames"), 40),
        "root": str(root),
    }


# -----------------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize("kind", ["mp4", "avi"])
@pytest.mark.parametrize("indices", [[0, 1, 2], [37, 41, 45, 49], [99, 3, 50, 50, 7], list(range(100))])
def test_read_video_is_frame_accurate(files, kind, indices):
    frames = data.read_video(files[kind], lambda n: indices)
    assert frames.shape == (len(indices), H, W, 3) and frames.dtype == np.uint8
    assert [index_of(f) for f in frames] == indices


class CountingCapture:
    """Wraps a cv2.VideoCapture and records every seek."""

    def __init__(self, cap, seeks):
        self.cap, self.seeks = cap, seeks

    def set(self, prop, value):
        self.seeks.append((prop, value))
        return self.cap.set(prop, value)

    def __getattr__(self, name):
        return getattr(self.cap, name)


def test_read_video_seeks_at_most_once(files, monkeypatch):
    seeks = []
    real_open = data._open
    monkeypatch.setattr(data, "_open", lambda path: CountingCapture(real_open(path), seeks))
    frames = data.read_video(files["mp4"], lambda n: list(range(20, 84, 4)))
    assert [index_of(f) for f in frames] == list(range(20, 84, 4))
    assert seeks == [(cv2.CAP_PROP_POS_FRAMES, 20)]


def test_read_video_passes_length_to_choose(files):
    seen = []
    data.read_video(files["mp4"], lambda n: seen.append(n) or [0])
    assert seen == [100]


def test_read_video_past_the_end_repeats_last_frame(files):
    # a header that over-claims by a frame or two: asking past the real end gives the last real frame
    frames = data.read_video(files["avi"], lambda n: [98, 100, 101])  # the file has frames 0..99
    assert [index_of(f) for f in frames] == [98, 99, 99]
    frames = data.read_video(files["avi"], lambda n: [101])  # a seek past the end, then a fallback
    assert [index_of(f) for f in frames] == [99]


def truncated_avi(path: str, n: int, keep_real: tuple[int, int]) -> str:
    """An MJPG .avi whose header claims n frames but that decodes to a count in keep_real."""
    write_video(path + ".full.avi", n, "MJPG")
    with open(path + ".full.avi", "rb") as f:
        raw = f.read()
    for cut in range(len(raw) - 1, 0, -max(1, len(raw) // 400)):
        with open(path, "wb") as f:
            f.write(raw[:cut])
        cap = cv2.VideoCapture(path)
        real = 0
        while cap.isOpened() and cap.grab():
            real += 1
        if keep_real[0] <= real <= keep_real[1] and cap.get(cv2.CAP_PROP_FRAME_COUNT) == n:
            return path
    pytest.skip("could not make a truncated AVI with this OpenCV build")


def test_read_video_tolerates_an_off_by_one_header(tmp_path):
    path = truncated_avi(str(tmp_path / "short.avi"), 40, (38, 39))
    frames = data.read_video(path, lambda n: [n - 3, n - 1])
    real_last = index_of(frames[1])
    assert real_last in (37, 38) and index_of(frames[0]) == 37


def test_read_video_errors_name_file_and_reason(tmp_path):
    with pytest.raises(data.VideoError, match=r"nope\.mp4: no such file"):
        data.read_video(str(tmp_path / "nope.mp4"), lambda n: [0])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(4000))
    with pytest.raises(data.VideoError, match=r"garbage\.mp4: OpenCV cannot open"):
        data.read_video(str(garbage), lambda n: [0])
    half = truncated_avi(str(tmp_path / "half.avi"), 40, (5, 25))
    with pytest.raises(data.VideoError,
                       match=r"half\.avi: the stream ends after \d+ frames but the file claims 40"):
        data.read_video(half, lambda n: [n - 1])


def test_read_frames(files, tmp_path):
    frames = data.read_frames(files["frames"], [0, 5, 5, 39])
    assert frames.shape == (4, H, W, 3) and [index_of(f) for f in frames] == [0, 5, 5, 39]
    other = write_frames(str(tmp_path / "png"), 6, "frame_{:03d}.png", start_idx=0)
    assert [index_of(f) for f in data.read_frames(other, [5, 0], "frame_{:03d}.png", 0)] == [5, 0]
    with pytest.raises(data.VideoError, match=r"img_00041\.jpg: missing"):
        data.read_frames(files["frames"], [40])  # frame 40 is file 41 with start_idx 1
    (tmp_path / "png" / "frame_002.png").write_bytes(b"not an image")
    with pytest.raises(data.VideoError, match=r"frame_002\.png: OpenCV cannot decode"):
        data.read_frames(other, [2], "frame_{:03d}.png", 0)
    with pytest.raises(data.VideoError, match="no such folder"):
        data.read_frames(str(tmp_path / "missing"), [0])


def test_every_decoding_failure_of_a_frame_folder_is_a_video_error(tmp_path, caplog):
    """A zero-byte JPEG (cv2.error inside OpenCV) and an unreadable file take the VideoError path, so that
    --skip_bad_videos covers them; frames of two sizes are resized to the first one's, with a warning."""
    folder = write_frames(str(tmp_path / "f"), 6)
    (tmp_path / "f" / "img_00003.jpg").write_bytes(b"")
    with pytest.raises(data.VideoError, match=r"img_00003\.jpg: OpenCV cannot decode this image \(0 bytes\)"):
        data.read_frames(folder, [0, 2])
    small = np.full((H // 2, W // 2, 3), colour(4)[::-1], np.uint8)
    cv2.imwrite(str(tmp_path / "f" / "img_00005.jpg"), small)
    with caplog.at_level(logging.WARNING, logger="data"):
        frames = data.read_frames(folder, [0, 4, 1])
    assert frames.shape == (3, H, W, 3) and [index_of(f) for f in frames] == [0, 4, 1]
    assert "frames of different sizes (32x24, 64x48); resizing them to the first one's, 64x48" in caplog.text
    (tmp_path / "f" / "img_00001.jpg").chmod(0)
    source = data.VideoList([data.Sample(folder, 1, 6, 0)])
    if os.geteuid() != 0:  # root reads it anyway
        with pytest.raises(data.VideoError, match="img_00001.jpg"):
            source.clip(0, lambda n: [0])


def test_files_are_checked_before_training_all_problems_at_once(files, tmp_path):
    empty, garbage = tmp_path / "empty.mp4", tmp_path / "garbage.mp4"
    empty.write_bytes(b"")
    garbage.write_bytes(os.urandom(4000))
    short = write_frames(str(tmp_path / "short"), 5)
    lst = tmp_path / "list.csv"
    lst.write_text(f"{files['mp4']} 0 -1\n{tmp_path}/gone.mp4 0 -1\n{empty} 0 -1\n{short} 1 9\n{garbage} 0 -1\n")
    with pytest.raises(data.VideoError) as error:  # a stat finds three; the garbage file passes a stat
        data.build_pretrain_dataset(str(lst), num_frames=4, sampling_rate=1, input_size=32)
    message = str(error.value)
    assert message.startswith("3 problems") and "gone.mp4: no such file" in message
    assert "empty.mp4: empty file" in message
    assert "img_00009.jpg: missing, so" in message and "garbage" not in message
    val = tmp_path / "val.csv"
    val.write_text(f"{files['mp4']} 0\n{garbage} 1\n")
    with pytest.raises(data.VideoError, match="garbage.mp4: OpenCV cannot open"):  # held-out sets: decoded too
        data.build_finetune_dataset("validation", str(val), nb_classes=2, num_frames=4, input_size=32,
                                    short_side_size=32)
    ds = data.build_pretrain_dataset(str(lst), num_frames=4, sampling_rate=1, input_size=32, skip_bad_videos=True,
                                     max_bad_fraction=0.7)
    assert ds.bad_videos() == [f"{tmp_path}/gone.mp4", str(empty), short]  # skipped from the start, counted
    with pytest.raises(data.VideoError, match="3 of 5 videos are unreadable, more than max_bad_fraction=0.5"):
        data.build_pretrain_dataset(str(lst), num_frames=4, input_size=32, skip_bad_videos=True, max_bad_fraction=0.5)
    # split over two processes, their exchange stood in by functions: each checks every other file, and the
    # second, given the first's findings, reports exactly what the single process did
    single, found = str(error.value), {}
    checked = []
    problem = data.VideoList.problem
    with pytest.MonkeyPatch.context() as m:
        m.setattr(data.VideoList, "problem", lambda self, i: checked.append(i) or problem(self, i))
        with pytest.raises(data.VideoError):
            data.build_pretrain_dataset(str(lst), num_frames=4, sampling_rate=1, input_size=32,
                                        share=data.Share(0, 2, lambda mine: [found.setdefault(0, mine), []]))
        with pytest.raises(data.VideoError) as error:
            data.build_pretrain_dataset(str(lst), num_frames=4, sampling_rate=1, input_size=32,
                                        share=data.Share(1, 2, lambda mine: [found[0], mine]))
    assert checked == [0, 2, 4, 1, 3] and str(error.value) == single


def test_digest_follows_the_videos_not_their_folder(files, tmp_path):
    lines = "a/x.mp4 0\na/y.mp4 1\n"
    digest = lambda root: data.FinetuneDataset(data.VideoList(data.read_finetune_list(str(lst), root)),  # noqa: E731
                                               "train").digest()
    lst = tmp_path / "list.csv"
    lst.write_text(lines)
    here, moved = digest("/data"), digest("/mnt/elsewhere")
    lst.write_text(lines.replace("y.mp4 1", "y.mp4 0"))
    relabelled = digest("/data")
    lst.write_text(lines + "a/z.mp4 1\n")
    assert here == moved and relabelled != here and digest("/data").startswith("3 videos, ")


def reference_pretrain(n, num_frames, rate, start):
    """HybridVideoMAE: 1-based offset, a step taken only while offset + step < duration."""
    offset, out = start + 1, []
    for _ in range(num_frames):
        out.append(offset - 1)
        if offset + rate < n:
            offset += rate
    return out


@pytest.mark.parametrize("n", [1, 9, 10, 13, 61, 63, 64, 65, 66, 100, 300])
def test_pretrain_indices(n):
    starts = set()
    for seed in range(60):
        got = data.pretrain_indices(n, 16, 4, np.random.default_rng(seed))
        start = int(got[0])
        assert 0 <= start <= max(0, n - 64)
        assert list(got) == reference_pretrain(n, 16, 4, start)
        starts.add(start)
    if n <= 66:  # every possible start shows up
        assert starts == set(range(max(1, n - 63)))
    else:
        assert len(starts) > 20


def reference_dense(n, clip_len, rate, end):
    converted = clip_len * rate
    if n <= converted:
        index = np.linspace(0, n, num=n // rate)
        index = np.concatenate((index, np.ones(clip_len - n // rate) * n))
        return list(np.clip(index, 0, n - 1).astype(np.int64))
    index = np.linspace(end - converted, end, num=clip_len)
    return list(np.clip(index, end - converted, end - 1).astype(np.int64))


@pytest.mark.parametrize("n", [3, 40, 64, 65, 200])
def test_dense_indices(n):
    assert list(data.dense_indices(n, 16, 4, None)) == reference_dense(n, 16, 4, (64 + n) // 2)
    ends = set()
    for seed in range(40):
        got = list(data.dense_indices(n, 16, 4, np.random.default_rng(seed)))
        matches = [end for end in range(64, max(65, n)) if reference_dense(n, 16, 4, end) == got]
        assert matches, got
        ends.add(matches[0])
    assert n < 200 or len(ends) > 10


@pytest.mark.parametrize("n", [10, 64, 150])
@pytest.mark.parametrize("num_views", [1, 2, 5])
def test_dense_test_indices(n, num_views):
    buffer = list(range(0, n, 4))
    buffer += [buffer[-1]] * (16 - len(buffer))
    for view in range(num_views):
        got = list(data.dense_test_indices(n, 16, 4, view, num_views))
        if num_views == 1:  # the reference divides by zero here; ours takes the centre window
            start = (len(buffer) - 16) // 2
        else:
            start = int(view * max((len(buffer) - 16) / (num_views - 1), 0))
        assert got == buffer[start:start + 16]


@pytest.mark.parametrize("n", [5, 16, 50, 170])
def test_segment_indices(n):
    s = 16
    if n < s:
        expected = [0] * (s - n) + list(range(n))
        assert list(data.segment_indices(n, s, None)) == expected
        assert list(data.segment_indices(n, s, np.random.default_rng(0))) == expected
        return
    avg = n // s
    assert list(data.segment_indices(n, s, None)) == [k * avg + avg // 2 for k in range(s)]
    for seed in range(20):
        got = data.segment_indices(n, s, np.random.default_rng(seed))
        assert all(k * avg <= i < (k + 1) * avg for k, i in enumerate(got))


@pytest.mark.parametrize("n", [8, 16, 50, 101])
@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_segment_test_indices(n, num_views):
    # the reference builds every view, sorts them all and takes view k as buffer[k::num_views]
    tick = n / 16
    everything = sorted(int(k * tick / num_views + tick * x) for k in range(num_views) for x in range(16))
    for view in range(num_views):
        assert list(data.segment_test_indices(n, 16, view, num_views)) == everything[view::num_views]


@pytest.mark.parametrize("shape", [(40, 64), (64, 40), (32, 32)])
@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_spatial_crop_views(shape, num_views):
    h, w = shape
    frames = np.zeros((2, h, w, 3), np.uint8)
    frames[..., 0] = np.arange(h)[:, None]  # each pixel knows its row and column
    frames[..., 1] = np.arange(w)[None, :]
    for view in range(num_views):
        crop = data.spatial_crop(frames, 24, view, num_views)
        assert crop.shape == (2, 24, 24, 3)
        long_side = max(h, w)
        along = int(view * (long_side - 24) / (num_views - 1)) if num_views > 1 else (long_side - 24) // 2
        top, left = (along, (w - 24) // 2) if h >= w else ((h - 24) // 2, along)
        assert (crop[0, 0, 0, 0], crop[0, 0, 0, 1]) == (top, left)
        assert (crop[0] == crop[1]).all()


# -----------------------------------------------------------------------------------------------------
# Augmentation


def test_multi_scale_crop_is_one_of_the_reference_crops():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    frames = np.stack([image] * 4)
    sides = [int(60 * s) for s in (1, .875, .75, .66)]  # 60, 52, 45, 39
    sides = [40 if abs(x - 40) < 3 else x for x in sides]  # 39 snaps to the output size
    candidates = []
    for i, ch in enumerate(sides):
        for j, cw in enumerate(sides):
            if abs(i - j) > 1:
                continue
            sx, sy = (80 - cw) // 4, (60 - ch) // 4
            for ox, oy in [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
                           (1, 1), (3, 1), (1, 3), (3, 3)]:
                patch = image[oy * sy:oy * sy + ch, ox * sx:ox * sx + cw]
                candidates.append(cv2.resize(patch, (40, 40), interpolation=cv2.INTER_LINEAR))
    seen = set()
    for seed in range(30):
        out = data.multi_scale_crop(frames, 40, np.random.default_rng(seed))
        assert out.shape == (4, 40, 40, 3)
        assert all((f == out[0]).all() for f in out)  # one crop for every frame
        hits = [k for k, c in enumerate(candidates) if (c == out[0]).all()]
        assert hits
        seen.add(hits[0])
    assert len(seen) > 10


def test_random_resized_crop_same_for_all_frames():
    rng = np.random.default_rng(1)
    frames = np.stack([rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)] * 3)
    for seed in range(20):
        out = data.random_resized_crop(frames, 24, np.random.default_rng(seed))
        assert out.shape == (3, 24, 24, 3) and all((f == out[0]).all() for f in out)


def test_to_tensor_normalises_and_round_trips():
    frames = np.random.default_rng(2).integers(0, 256, (4, 10, 12, 3), dtype=np.uint8)
    clip = data.to_tensor(frames[:, 1:9, 2:11])  # a strided view, as crops are
    assert clip.shape == (3, 4, 8, 9) and clip.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    back = (clip * std + mean) * 255  # (3, T, H, W)
    assert torch.allclose(back, torch.from_numpy(frames[:, 1:9, 2:11]).permute(3, 0, 1, 2).float(), atol=1e-3)


def test_uint8_clips_normalised_on_the_device_equal_the_float_clips():
    """normalize() after a uint8 to_tensor gives to_tensor's float clip bit for bit, for every pixel value."""
    frames = np.random.default_rng(3).integers(0, 256, (4, 10, 12, 3), dtype=np.uint8)
    frames[0, 0, :, 0] = frames[0, 1, :, 1] = frames[0, 2, :, 2] = np.arange(12) * 23  # 0..253
    frames[1, :2, :2] = 255
    crop = frames[:, 1:9, 2:11]  # a strided view, as crops are
    pixels = data.to_tensor(crop, out=torch.empty(3, 4, 8, 9, dtype=torch.uint8))
    assert torch.equal(pixels, torch.from_numpy(crop).permute(3, 0, 1, 2))  # channel first, unchanged
    assert torch.equal(data.normalize(pixels[None]), data.to_tensor(crop)[None])
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    pixels = data.to_tensor(every_value, out=torch.empty(3, 1, 16, 16, dtype=torch.uint8))
    assert torch.equal(data.normalize(pixels), data.to_tensor(every_value))


def test_uint8_pretraining_items_are_the_float_items_unnormalised():
    kwargs = dict(num_frames=4, sampling_rate=2, input_size=24, num_sample=3, synthetic_videos=4)
    floats, pixels = data.build_pretrain_dataset(**kwargs), data.build_pretrain_dataset(**kwargs, uint8=True)
    for i in range(2):
        torch.manual_seed(i)
        expected = floats[i]
        torch.manual_seed(i)
        item = pixels[i]  # the same draws: the same window and crops
        assert item.dtype == torch.uint8 and item.shape == expected.shape == (3, 3, 4, 24, 24)
        assert torch.equal(data.normalize(item), expected)


def test_random_erase_shares_the_box_across_frames():
    boxes = 0
    for seed in range(40):
        clip = torch.zeros(3, 5, 40, 50)
        data.random_erase(clip, np.random.default_rng(seed), prob=1.0)
        erased = clip != 0  # (3, T, H, W)
        assert (erased == erased[:1, :1]).all(), "same box in every frame and channel"
        rows, cols = erased[0, 0].any(1).nonzero(), erased[0, 0].any(0).nonzero()
        h, w = len(rows), len(cols)
        assert erased[0, 0].sum() == h * w and 0.02 * 2000 * 0.8 <= h * w <= 2000 / 3 * 1.2  # one rectangle
        assert not torch.equal(clip[:, 0], clip[:, 1]), "fresh noise per frame"
        boxes += 1
    assert boxes == 40
    untouched = sum(data.random_erase(torch.zeros(3, 2, 8, 8), np.random.default_rng(s)).abs().sum() == 0
                    for s in range(400))  # the default prob is the reference's 0.25
    assert 250 < untouched < 350  # erased about a quarter of the time


def test_rand_augment_same_ops_on_every_frame():
    image = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    frames = np.stack([image] * 3)
    changed = 0
    for seed in range(30):
        out = data.rand_augment(frames, np.random.default_rng(seed), 7, 4, 0.5)
        assert out.shape == frames.shape and out.dtype == np.uint8
        assert all((f == out[0]).all() for f in out)
        changed += not (out == frames).all()
    assert changed > 20
    for op in data._RAND_OPS:
        out = op(frames, 0.7, np.random.default_rng(0))
        assert out.shape == frames.shape and out.dtype == np.uint8 and all((f == out[0]).all() for f in out)


def test_rand_augment_point_ops_match_pil_formulas():
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    rng = np.random.default_rng(0)
    assert (data._invert(values, 0.7, rng) == 255 - values).all()
    assert (data._posterize(values, 0.7, rng) == (values & 0b11000000)).all()  # 4 - int(2.8) = 2 bits kept
    threshold = 256 - int(0.7 * 256)
    assert (data._solarize(values, 0.7, rng) == np.where(values >= threshold, 255 - values, values)).all()
    added = np.minimum(values.astype(int) + int(0.7 * 110), 255)
    assert (data._solarize_add(values, 0.7, rng) == np.where(values < 128, added, values)).all()
    frames = np.random.default_rng(1).integers(10, 200, (2, 16, 16, 3), dtype=np.uint8)
    frames[1, ..., 2] = 77  # a flat channel stays as it is
    stretched = data._auto_contrast(frames, 0.7, rng)
    pixels = stretched[0].reshape(-1, 3)
    assert pixels.min(0).tolist() == [0, 0, 0] and pixels.max(0).tolist() == [255, 255, 255]
    assert (stretched[1, ..., 2] == 77).all() and stretched[1, ..., :2].max() == 255
    brighter = data._enhance(frames, 0.7, rng, degenerate=data._DEGENERATE["brightness"]).astype(int)
    assert any(np.abs(brighter - np.clip(frames * factor, 0, 255)).max() <= 1 for factor in (1.63, 0.37))


def test_parse_rand_augment():
    assert data.parse_rand_augment("rand-m7-n4-mstd0.5-inc1") == (7.0, 4, 0.5)
    assert data.parse_rand_augment("none") is None
    with pytest.raises(ValueError, match="rand-m9-n2-mstd0.5"):
        data.parse_rand_augment("rand-m9-n2-mstd0.5")


def test_flip_is_shared_and_switchable():
    gradient = np.repeat(np.linspace(0, 255, 80).astype(np.uint8)[None, None, :, None], 60, 1)  # red, rising
    frames = np.concatenate([gradient, np.zeros((1, 60, 80, 2), np.uint8)], -1).repeat(4, 0)
    source = data.SyntheticVideos(1)
    for flip in (False, True):
        ds = data.FinetuneDataset(source, "train", input_size=32, flip=flip, aa="none", reprob=0)
        directions = []
        for seed in range(40):
            clip = ds._augment(frames, np.random.default_rng(seed))  # (3, T, H, W)
            assert all(torch.equal(clip[:, t], clip[:, 0]) for t in range(4))
            red = clip[0, 0].mean(0)
            directions.append(bool(red[-1] > red[0]))
        assert all(directions) if not flip else 5 < sum(directions) < 35


def test_mixup_cutmix():
    b, k = 6, 10
    labels = torch.arange(b)
    for seed in range(10):
        clips = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, 3, 4, 16, 20).clone()
        mixed, targets = data.mixup_cutmix(clips, labels, k, mixup_alpha=0, cutmix_alpha=1.0, smoothing=0.1,
                                           rng=np.random.default_rng(seed))
        assert torch.allclose(targets.sum(1), torch.ones(b))
        for i in range(b):
            partner = b - 1 - i
            from_partner = mixed[i] == partner
            assert ((mixed[i] == i) | from_partner).all()
            assert (from_partner == from_partner[:1, :1]).all(), "one box for every frame and channel"
            share = from_partner.float().mean().item() if partner != i else 0.0
            expected = (1 - share) * (0.9 + 0.01) + share * 0.01
            assert targets[i, i].item() == pytest.approx(expected, abs=1e-6)
    clips = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).expand(b, 3, 2, 4, 4).clone()
    mixed, targets = data.mixup_cutmix(clips, labels, k, mixup_alpha=0.8, cutmix_alpha=0,
                                       rng=np.random.default_rng(0))
    lam = (targets[0, 0].item() - 0.01) / 0.9
    assert torch.allclose(mixed[0], torch.full_like(mixed[0], 0 * lam + 5 * (1 - lam)), atol=1e-5)
    assert torch.allclose(targets.sum(1), torch.ones(b))
    _, plain = data.mixup_cutmix(clips.clone(), labels, k, mixup_alpha=0, cutmix_alpha=0)
    assert torch.allclose(plain, torch.full((b, k), 0.01) + 0.9 * torch.eye(b, k))


# -----------------------------------------------------------------------------------------------------
# The synthetic dataset


def test_synthetic_is_deterministic_balanced_and_moves_by_label():
    a = data.SyntheticVideos(12, 4, length=20, height=32, width=40)
    b = data.SyntheticVideos(12, 4, length=20, height=32, width=40)
    assert np.array_equal(a.render(5, [0, 7, 19]), b.render(5, [0, 7, 19]))
    assert not np.array_equal(a.render(5, [0]), a.render(6, [0]))
    assert not np.array_equal(a.render(5, [0]), a.render(5, [19])), "it moves"
    assert np.bincount([a.label(i) for i in range(12)]).tolist() == [3, 3, 3, 3]
    for i in range(12):
        heading = np.arctan2(*a._scene(i)[1][-1].velocity[::-1]) % (2 * np.pi)  # the main shape is drawn last
        bin_centre = 2 * np.pi * a.label(i) / 4
        assert abs((heading - bin_centre + np.pi) % (2 * np.pi) - np.pi) <= 2 * np.pi * 0.25 / 4 + 1e-9


def test_synthetic_export_round_trips_through_the_file_path(tmp_path):
    train = data.SyntheticVideos(4, 2, length=24, height=32, width=40)
    list_file = export_videos(train, str(tmp_path), "train")
    export_videos(data.SyntheticVideos(2, 2, length=24, height=32, width=40, first_index=4), str(tmp_path), "val")
    with open(list_file) as f:
        lines = f.read().split("\n")
    assert lines[:2] == ["train/video_00000.mp4 0", "train/video_00001.mp4 1"]
    frames = data.read_video(str(tmp_path / "train" / "video_00001.mp4"), lambda n: range(n))
    assert frames.shape == (24, 32, 40, 3)
    assert np.abs(frames.astype(int) - train.render(1, range(24))).mean() < 12  # lossy, but the same video
    kwargs = dict(data_root=str(tmp_path), nb_classes=2, num_frames=4, sampling_rate=2, input_size=24,
                  short_side_size=32)
    ds = data.build_finetune_dataset("train", str(tmp_path), **kwargs)
    clips, labels = ds[1]
    assert clips.shape == (2, 3, 4, 24, 24) and labels.tolist() == [1, 1]
    test = data.build_finetune_dataset("test", str(tmp_path), test_num_segment=2, test_num_crop=3, **kwargs)
    assert len(test) == 2 * 6
    clip, label, video, view = test[7]
    assert clip.shape == (3, 4, 24, 24) and (label, video, view) == (1, 1, 1)


# -----------------------------------------------------------------------------------------------------
# List files


def test_pretrain_list_formats(tmp_path):
    lst = tmp_path / "pretrain.csv"
    lst.write_text("a.mp4\nb.mp4 3\n\nc.mp4 0 -1\nframes/d 1 120\nframes/e 0 30 7\n")
    samples = data.read_pretrain_list(str(lst), "/data")
    assert samples == [("/data/a.mp4", 0, -1, -1), ("/data/b.mp4", 0, -1, 3), ("/data/c.mp4", 0, -1, -1),
                       ("/data/frames/d", 1, 120, -1), ("/data/frames/e", 0, 30, 7)]  # labels kept for features
    for bad, lineno in [("a.mp4 x\n", 1), ("a.mp4 0 -1\nb.mp4 0 1 2 3\n", 2), ("a.mp4 0 1.5\n", 1)]:
        lst.write_text(bad)
        with pytest.raises(data.ListError, match=rf"pretrain\.csv:{lineno}: expected 'path'"):
            data.read_pretrain_list(str(lst))
    lst.write_text("frames/d 1 0\n")
    with pytest.raises(data.ListError, match=r"pretrain\.csv:1: total_frames is 0"):
        data.read_pretrain_list(str(lst))
    lst.write_text("a.mp4 1 -5\n")  # not a video file (-1) and not a frame count: said so, not "no such file"
    expected = r"pretrain\.csv:1: expected total_frames > 0 .* got start_idx 1, total_frames -5"
    with pytest.raises(data.ListError, match=expected):
        data.read_pretrain_list(str(lst))
    lst.write_text("a.mp4 x\nb.mp4 0 -1\nc 0 0\n" + "d.mp4 1 2 3 4 5\n" * 25)  # every bad line, in one error
    expected = r"^27 problems:\n  .*pretrain\.csv:1: .*\n  .*pretrain\.csv:3: total_frames is 0"
    with pytest.raises(data.ListError, match=expected) as error:
        data.read_pretrain_list(str(lst))
    assert "pretrain.csv:2:" not in str(error.value) and str(error.value).endswith("... and 7 more")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        data.read_pretrain_list(str(tmp_path / "missing.csv"))


def test_pretrain_folder_is_scanned_recursively(tmp_path):
    for name in ["x/b.mp4", "x/y/c.AVI", "a.mkv", "notes.txt", "x/frame.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    paths = [s.path for s in data.read_pretrain_list(str(tmp_path))]
    assert paths == [str(tmp_path / p) for p in ["a.mkv", "x/b.mp4", "x/y/c.AVI"]]


def test_finetune_lists(tmp_path):
    (tmp_path / "train.csv").write_text("v/a.mp4 0\nframes/b 30 2\n")
    (tmp_path / "val.csv").write_text("v/c.mp4 1\n")
    train = data.read_finetune_split(str(tmp_path), "train", "/r", nb_classes=3, start_idx=0)
    assert train == [("/r/v/a.mp4", 0, -1, 0), ("/r/frames/b", 0, 30, 2)]
    test = data.read_finetune_split(str(tmp_path), "test", "/r", 3)  # no test.csv: falls back to val.csv
    assert test == [("/r/v/c.mp4", 0, -1, 1)]
    with pytest.raises(data.ListError, match=r"train\.csv:2: label 2 is out of range for nb_classes=2"):
        data.read_finetune_split(str(tmp_path), "train", nb_classes=2)
    for bad in ["a.mp4\n", "a.mp4 1 2 3\n", "a.mp4 cat\n"]:
        (tmp_path / "val.csv").write_text("v/c.mp4 1\n" + bad)
        expected = r"val\.csv:2: expected 'path label' or 'frame_dir total_frames label'"
        with pytest.raises(data.ListError, match=expected):
            data.read_finetune_split(str(tmp_path), "validation")
    (tmp_path / "val.csv").write_text("frames/b 0 1\n")
    with pytest.raises(data.ListError, match=r"val\.csv:1: total_frames must be positive"):
        data.read_finetune_split(str(tmp_path), "validation")
    with pytest.raises(FileNotFoundError, match=r"no train\.csv list and no train/ folder"):
        data.read_finetune_split(str(tmp_path / "empty"), "train")


def test_class_folders(tmp_path):
    for name in ["train/dog/1.mp4", "train/cat/2.mp4", "train/cat/sub/3.avi", "val/dog/4.mp4", "val/eel/5.mp4"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    train = data.read_finetune_split(str(tmp_path), "train", nb_classes=3)
    assert [(os.path.relpath(s.path, tmp_path), s.label) for s in train] == [
        ("train/cat/2.mp4", 0), ("train/cat/sub/3.avi", 0), ("train/dog/1.mp4", 1)]
    val = data.read_finetune_split(str(tmp_path), "validation")
    assert [(os.path.relpath(s.path, tmp_path), s.label) for s in val] == [
        ("val/dog/4.mp4", 1), ("val/eel/5.mp4", 2)]
    with pytest.raises(data.ListError, match="3 class folders but nb_classes=2"):
        data.read_finetune_split(str(tmp_path), "train", nb_classes=2)


# -----------------------------------------------------------------------------------------------------
# Datasets end to end


def test_finetune_validation_picks_the_reference_frames(files, tmp_path):
    # dense centre window from a video; segment middles from a frame folder (SSv2 style)
    lst = tmp_path / "val.csv"
    lst.write_text(f"{files['avi']} 3\n{files['frames']} 40 1\n")
    dense = data.build_finetune_dataset("validation", str(lst), nb_classes=5, num_frames=8, sampling_rate=4,
                                        input_size=32, short_side_size=40)
    clip, label = dense[0]
    assert clip.shape == (3, 8, 32, 32) and label == 3
    assert clip_indices(clip) == reference_dense(100, 8, 4, (32 + 100) // 2)
    sparse = data.build_finetune_dataset("validation", str(lst), nb_classes=5, num_frames=8, input_size=32,
                                         short_side_size=32, sparse_sample=True)
    clip, label = sparse[1]
    assert label == 1 and clip_indices(clip) == [k * 5 + 5 // 2 for k in range(8)]


def test_finetune_test_views(files, tmp_path):
    lst = tmp_path / "test.csv"
    lst.write_text(f"{files['mp4']} 0\n{files['avi']} 1\n")
    for segments, crops in [(1, 1), (2, 3), (5, 1)]:
        ds = data.build_finetune_dataset("test", str(lst), nb_classes=2, num_frames=8, sampling_rate=4,
                                         input_size=32, short_side_size=32, test_num_segment=segments,
                                         test_num_crop=crops)
        assert len(ds) == 2 * segments * crops
        for i in range(len(ds)):
            clip, label, video, view = ds[i]
            assert (label, video, view) == (i // (segments * crops),) * 2 + (i % (segments * crops),)
            segment = view // crops
            assert clip_indices(clip) == list(data.dense_test_indices(100, 8, 4, segment, segments))


def test_pretrain_dataset_from_files(files, tmp_path):
    lst = tmp_path / "pretrain.csv"
    lst.write_text(f"{files['mp4']} 0 -1\n{files['frames']} 1 40\n")
    ds = data.build_pretrain_dataset(str(lst), num_frames=8, sampling_rate=4, input_size=32, num_sample=3)
    for i in range(2):
        clips = ds[i]
        assert clips.shape == (3, 3, 8, 32, 32) and torch.isfinite(clips).all()
        for clip in clips:
            indices = clip_indices(clip)
            assert indices == reference_pretrain((100, 40)[i], 8, 4, indices[0])


def test_bad_videos_raise_by_default(files, tmp_path):
    missing = str(tmp_path / "gone.mp4")
    ds = data.PretrainDataset(data.VideoList([data.Sample(missing, 0, -1, -1)]), 4, 2, 16)
    with pytest.raises(data.VideoError, match=r"gone\.mp4: no such file"):
        ds[0]
    assert ds.bad_videos() == []


def test_skip_bad_videos_logs_once_and_counts(files, tmp_path, caplog):
    bad = str(tmp_path / "gone.mp4")
    samples = [data.Sample(files["mp4"], 0, -1, 0), data.Sample(bad, 0, -1, 1),
               data.Sample(files["avi"], 0, -1, 0)]
    ds = data.FinetuneDataset(data.VideoList(samples), "validation", num_frames=4, sampling_rate=2,
                              input_size=32, short_side_size=32, skip_bad_videos=True, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="data"):
        for _ in range(3):
            clip, label = ds[1]
            assert clip.shape == (3, 4, 32, 32) and label == 0  # another video, with its own label
    assert ds.bad_videos() == [bad]
    assert [r.getMessage().count("gone.mp4") for r in caplog.records] == [1]


def test_skip_bad_videos_stops_past_the_limit(files, tmp_path):
    bad = [str(tmp_path / f"gone{i}.mp4") for i in range(2)]
    samples = [data.Sample(p, 0, -1, -1) for p in [files["mp4"], bad[0], files["avi"], bad[1]]]
    ds = data.PretrainDataset(data.VideoList(samples), 4, 2, 16, skip_bad_videos=True, max_bad_fraction=0.3)
    expected = r"2 of 4 videos are unreadable, more than max_bad_fraction=0\.3"
    with pytest.raises(data.VideoError, match=expected) as err:
        for i in range(4):
            ds[i]
    assert all(p in str(err.value) for p in bad)


def test_skip_counts_are_shared_with_workers(files, tmp_path):
    bad = [str(tmp_path / f"gone{i}.mp4") for i in range(2)]
    samples = [data.Sample(p, 0, -1, -1) for p in [bad[0], files["mp4"], files["avi"], bad[1]]]
    ds = data.PretrainDataset(data.VideoList(samples), 4, 2, 16, skip_bad_videos=True, max_bad_fraction=0.6)
    batches = list(DataLoader(ds, batch_size=1, num_workers=2))
    assert len(batches) == 4 and ds.bad_videos() == bad


def test_runs_repeat_under_a_seed():
    ds = data.build_finetune_dataset("train", nb_classes=4, num_frames=4, sampling_rate=2, input_size=32,
                                     synthetic_videos=8)

    def first_batch(seed):
        torch.manual_seed(seed)
        loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2)
        return next(iter(loader))

    (a, la), (b, lb), (c, _) = first_batch(0), first_batch(0), first_batch(1)
    assert a.shape == (4, 2, 3, 4, 32, 32) and la.shape == (4, 2)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
