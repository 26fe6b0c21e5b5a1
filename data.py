"""Data for VideoMAE V2: videos on disk (or a built-in synthetic set) in, normalised clips out.

A clip is T frames (16) of a longer video, sampled and augmented formula for formula as in the reference
(OpenGVLab/VideoMAEv2), each spatial transform the same on every frame. Pretraining: frames `sampling_rate`
(4) apart from a random start, one multi-scale crop, no flip or colour change (the masks are drawn on the
device: masking.py). Fine-tuning: a random 64-frame window (train), the centre one (validation) or windows x
crops of each video (test, "16x5x3"), or with `sparse_sample` one frame per segment (TSN, for
Something-Something, with `flip=False`); training clips get RandAugment, a random resized crop, a flip and
random erasing, then mixup/cutmix on the batch (`mixup_cutmix`). `num_sample` K > 1: one decode, K clips.
Decoding is OpenCV's, not decord's: one seek, then sequential grabs (frame-accurate), single-threaded: the
DataLoader workers are the parallelism, and OpenCV's thread pool would not survive their fork.

Sources (lists: space separated, no header, as the reference reads them; `data_root` prefixes every path):
  pretraining  `data_path` is a folder of videos (scanned recursively) or a list of `path`, `path label`,
               `path start_idx total_frames` or `path start_idx total_frames label`: total_frames -1 (the
               reference's `path 0 -1`) is a video file, else a folder of images fname_tmpl.format(i + start_idx).
  fine-tuning  `data_path` holds train.csv / val.csv / test.csv (test falls back to val.csv) of `path label`
               or `frame_dir total_frames label` lines; or train/ val/ test/ folders with one sub-folder of
               videos per class (labels: the sorted class names); or it is one such list file.
  neither      the built-in `SyntheticVideos`, drawn on the fly (nothing downloaded).

Bad input is never silent: bad list lines are named in one ListError, an unreadable video in a VideoError, and
every listed file is checked before training (a stat; evaluation sets decode every frame they will read). With
skip_bad_videos an unreadable video is logged, counted and replaced by another, up to max_bad_fraction of the
dataset, past which the run stops and lists the bad files.
"""
import atexit
import hashlib
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
from functools import partial
from typing import Callable, NamedTuple, Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

import vmae

log = logging.getLogger(__name__)
cv2.setNumThreads(1)  # a DataLoader worker forked after a parallel OpenCV call hangs

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")


class VideoError(RuntimeError):
    """A video or frame folder that cannot be read; the message names the file and the reason."""


class ListError(ValueError):
    """A list file line that does not parse or has a label out of range; the message names file and line."""


# -----------------------------------------------------------------------------------------------------
# Decoding


def _open(path: str) -> cv2.VideoCapture:
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])  # one decoding thread
    if not cap.isOpened():
        raise VideoError(f"{path}: OpenCV cannot open it (not a video, truncated, or an unsupported codec)")
    return cap


def _decode(cap: cv2.VideoCapture, start: int, stop: int, keep: set[int]) -> tuple[dict, int]:
    """Decode frames start..stop-1 after one seek to `start` (grab() skips the colour conversion of the others);
    returns those in `keep` (BGR) and one past the last frame decoded (below `stop` if the stream ended)."""
    if start > 0:
        cap.set(cv2.CAP_PROP_POS_FRAMES, start)
    kept = {}
    for i in range(start, stop):
        if not cap.grab():
            return kept, i
        if i in keep:
            ok, frame = cap.retrieve()
            if not ok:
                return kept, i
            kept[i] = frame
    return kept, stop


_RESIZED: set[str] = set()  # videos warned about, once per process


def _stack(frames: list[np.ndarray], path: str) -> np.ndarray:
    """(T, H, W, 3) from frames (H, W, 3); any of another size than the first are resized to it."""
    h, w = frames[0].shape[:2]
    if path not in _RESIZED and any(f.shape[:2] != (h, w) for f in frames):
        _RESIZED.add(path)
        log.warning("%s: frames of different sizes (%s); resizing them to the first one's, %dx%d", path,
                    ", ".join(sorted({f"{f.shape[1]}x{f.shape[0]}" for f in frames})), w, h)
    return np.stack([f if f.shape[:2] == (h, w) else cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA)
                     for f in frames])


def read_video(path: str, choose: Callable[[int], Sequence[int]]) -> np.ndarray:
    """Frames `choose(num_frames)` of a video file, (T, H, W, 3) uint8 RGB; past the real end the last real frame
    repeats. One seek, not one per frame: that is several times slower, and lands wrong on some AVI/MPEG-4 files."""
    cap = _open(path)
    num_frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    if num_frames <= 0:  # no count in the header: count by decoding
        _, num_frames = _decode(_open(path), 0, sys.maxsize, set())
    if num_frames == 0:
        raise VideoError(f"{path}: no frames")
    indices = [int(i) for i in choose(num_frames)]
    first, last = min(indices), max(indices)
    slack = max(2, int(0.05 * num_frames))  # the header's count can be a little high: allow ending this early
    keep = set(indices) | set(range(num_frames - slack - 1, last + 1))  # the last few stand in for missing ones
    frames, end = _decode(cap, first, last + 1, keep)
    if end == first > 0:  # the seek went past the real end: find the last frame from the start
        frames, end = _decode(_open(path), 0, last + 1, keep)
    if end <= last and (end == 0 or end < num_frames - slack):
        raise VideoError(f"{path}: the stream ends after {end} frames but the file claims {num_frames} "
                         "(truncated or corrupt)")
    return _stack([frames[min(i, end - 1)][..., ::-1] for i in indices], path)  # BGR -> RGB


def read_frames(frame_dir: str, indices: Sequence[int], fname_tmpl: str = "img_{:05}.jpg",
                start_idx: int = 1) -> np.ndarray:
    """Frames of a folder of images, frame i in fname_tmpl.format(i + start_idx): (T, H, W, 3) uint8 RGB."""
    if not os.path.isdir(frame_dir):
        raise VideoError(f"{frame_dir}: no such folder of frames")
    images = {}
    for i in set(indices):
        path = os.path.join(frame_dir, fname_tmpl.format(i + start_idx))
        if not os.path.isfile(path):
            raise VideoError(f"{path}: missing, so {frame_dir} has fewer frames than its list line claims")
        encoded = np.fromfile(path, np.uint8)
        images[i] = cv2.imdecode(encoded, cv2.IMREAD_COLOR) if encoded.size else None  # (H, W, 3) BGR
        if images[i] is None:
            raise VideoError(f"{path}: OpenCV cannot decode this image ({encoded.size} bytes)")
    return _stack([images[i][..., ::-1] for i in indices], frame_dir)  # BGR -> RGB


# -----------------------------------------------------------------------------------------------------
# Lists of clips


class Sample(NamedTuple):
    path: str  # a video file, or a folder of frames
    start_idx: int  # file number of a folder's first frame
    total_frames: int  # < 0: a video file (its length comes from the file)
    label: int  # -1: unlabelled


def scan_videos(folder: str) -> list[str]:
    """Every video file under `folder`, recursively, in sorted order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(VIDEO_EXTENSIONS)]
    return found


def _raise_problems(problems: list[str], error: type = ListError, limit: int = 20) -> None:
    """One error listing every problem found (the first `limit` of them), rather than one per run."""
    if problems:
        lines = problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])
        message = lines[0] if len(problems) == 1 else f"{len(problems)} problems:\n  " + "\n  ".join(lines)
        raise error(message)


def _read_list(list_file: str, counts: tuple[int, ...], expected: str,
               sample: Callable[[str, str, list[int]], Sample]) -> list[Sample]:
    """The clips of a list file: each non-blank line has a path and integers (len(fields) in `counts`), and
    sample(where, path, integers) makes its Sample or raises ListError. All bad lines raise one ListError."""
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"list file {list_file} does not exist")
    samples, problems = [], []
    with open(list_file) as f:
        for number, line in enumerate(f, 1):
            fields, where = line.split(), f"{list_file}:{number}"
            if not fields:
                continue
            words = [w for w in fields[1:] if not re.fullmatch(r"[+-]?\d+", w)]
            try:
                if len(fields) not in counts or words:
                    hint = (f" ({words[0]!r} is not a number: if it is part of the path, rename or link the file "
                            "under a name without spaces, since spaces separate the fields)") if words else ""
                    raise ListError(f"{where}: expected {expected} separated by spaces, got {' '.join(fields)!r}{hint}")
                samples.append(sample(where, fields[0], [int(w) for w in fields[1:]]))
            except ListError as e:
                problems.append(str(e))
    _raise_problems(problems)
    if not samples:
        raise ListError(f"{list_file}: no clips found")
    return samples


def read_pretrain_list(data_path: str, data_root: str = "") -> list[Sample]:
    """Pretraining clips from a folder of videos or a list file (formats in the module docstring)."""
    def sample(where: str, path: str, numbers: list[int]) -> Sample:
        start_idx, total_frames = numbers[:2] if len(numbers) >= 2 else (0, -1)
        label = numbers[-1] if len(numbers) in (1, 3) else -1  # pretraining ignores it; features list it
        if total_frames == 0:
            raise ListError(f"{where}: total_frames is 0 (use -1 for a video file)")
        if total_frames < -1 or start_idx < 0:
            raise ListError(f"{where}: expected total_frames > 0 (a folder of frames) or -1 (a video file) and "
                            f"start_idx >= 0, got start_idx {start_idx}, total_frames {total_frames}")
        return Sample(os.path.join(data_root, path), start_idx, total_frames, label)
    if not os.path.isdir(data_path):
        return _read_list(data_path, (1, 2, 3, 4), "'path', 'path label', 'path start_idx total_frames' or "
                          "'path start_idx total_frames label'", sample)
    samples = [Sample(path, 0, -1, -1) for path in scan_videos(data_path)]
    if not samples:
        raise ListError(f"{data_path}: no clips found")
    return samples


def read_finetune_list(list_file: str, data_root: str = "", nb_classes: int | None = None,
                       start_idx: int = 1) -> list[Sample]:
    """Labelled clips from a list file: `path label` (videos) or `frame_dir total_frames label` (frames)."""
    def sample(where: str, path: str, numbers: list[int]) -> Sample:
        *total, label = numbers
        if total and total[0] <= 0:
            raise ListError(f"{where}: total_frames must be positive, got {total[0]}")
        if nb_classes is not None and not 0 <= label < nb_classes:
            raise ListError(f"{where}: label {label} is out of range for nb_classes={nb_classes}")
        path = os.path.join(data_root, path)
        return Sample(path, start_idx, total[0], label) if total else Sample(path, 0, -1, label)
    return _read_list(list_file, (2, 3), "'path label' or 'frame_dir total_frames label'", sample)


def _class_folder_samples(data_path: str, split_dir: str, nb_classes: int | None) -> list[Sample]:
    """Videos in split_dir/<class>/...; classes are the sorted sub-folder names of all splits together."""
    splits = [os.path.join(data_path, s) for s in ("train", "val", "test")]
    classes = sorted({c for s in splits if os.path.isdir(s) for c in os.listdir(s)
                      if os.path.isdir(os.path.join(s, c))})
    if nb_classes is not None and len(classes) > nb_classes:
        raise ListError(f"{data_path}: {len(classes)} class folders but nb_classes={nb_classes}")
    samples = [Sample(path, 0, -1, label) for label, c in enumerate(classes)
               for path in scan_videos(os.path.join(split_dir, c))]
    if not samples:
        raise ListError(f"{split_dir}: no videos in its class folders")
    return samples


def _check_mode(mode: str) -> None:
    if mode not in ("train", "validation", "test"):
        raise ValueError(f"mode must be 'train', 'validation' or 'test', got {mode!r}")


def read_finetune_split(data_path: str, mode: str, data_root: str = "", nb_classes: int | None = None,
                        start_idx: int = 1) -> list[Sample]:
    """The clips of one split ('train', 'validation' or 'test') of a fine-tuning data_path."""
    _check_mode(mode)
    if os.path.isfile(data_path):
        return read_finetune_list(data_path, data_root, nb_classes, start_idx)
    names = {"train": ["train"], "validation": ["val"], "test": ["test", "val"]}[mode]
    for name in names:
        list_file, folder = os.path.join(data_path, name + ".csv"), os.path.join(data_path, name)
        if os.path.isfile(list_file):
            return read_finetune_list(list_file, data_root, nb_classes, start_idx)
        if os.path.isdir(folder):
            return _class_folder_samples(data_path, folder, nb_classes)
    raise FileNotFoundError(f"{data_path}: no {' or '.join(n + '.csv' for n in names)} list and no "
                            f"{' or '.join(n + '/' for n in names)} folder of class sub-folders")


class VideoList:
    """Clips on disk (video files and folders of frames): a source for the datasets below."""

    def __init__(self, samples: list[Sample], fname_tmpl: str = "img_{:05}.jpg"):
        self.samples, self.fname_tmpl = samples, fname_tmpl

    def __len__(self) -> int:
        return len(self.samples)

    def label(self, i: int) -> int:
        return self.samples[i].label

    def name(self, i: int) -> str:
        return self.samples[i].path

    def clip(self, i: int, choose: Callable[[int], Sequence[int]]) -> np.ndarray:
        """Frames choose(length) of clip i, (T, H, W, 3) uint8 RGB."""
        path, start_idx, total_frames, _ = self.samples[i]
        try:
            if total_frames < 0:
                return read_video(path, choose)
            return read_frames(path, choose(total_frames), self.fname_tmpl, start_idx)
        except (cv2.error, OSError) as e:  # any other failure to read or decode: the same VideoError path
            raise VideoError(f"{path}: {type(e).__name__}: {e}") from e

    def problem(self, i: int) -> str | None:
        """Why clip i cannot be read as a stat tells (missing, empty, lacking its first or last frame), or None."""
        path, start_idx, total_frames, _ = self.samples[i]
        if total_frames < 0:
            if not os.path.isfile(path):
                return f"{path}: no such file"
            return f"{path}: empty file" if os.path.getsize(path) == 0 else None
        if not os.path.isdir(path):
            return f"{path}: no such folder of frames"
        for k in (0, total_frames - 1):
            name = os.path.join(path, self.fname_tmpl.format(k + start_idx))
            if not os.path.isfile(name):
                return f"{name}: missing, so {path} has fewer frames than its list line claims ({total_frames})"
        return None


# -----------------------------------------------------------------------------------------------------
# The built-in synthetic dataset


class _Shape(NamedTuple):
    polygon: np.ndarray  # (n, 2) vertices around (0, 0), in pixels
    colour: tuple
    start: np.ndarray  # (2,) centre (x, y) at frame 0
    velocity: np.ndarray  # (2,) pixels per frame
    angle: float  # radians at frame 0
    spin: float  # radians per frame


def _polygon(corners: int, inner: float = 1.0) -> np.ndarray:
    """(corners, 2) unit polygon; with inner < 1 every other corner is pulled in to that radius (a star)."""
    angles = np.arange(corners) * 2 * np.pi / corners
    radii = np.where(np.arange(corners) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


_POLYGONS = (_polygon(3), _polygon(4), _polygon(5), _polygon(8, 0.45), _polygon(10, 0.45))  # spin is visible


class SyntheticVideos:
    """Coloured shapes drifting and spinning over textured backgrounds; video i is a pure function of (seed,
    first_index + i). The main shape (the largest, on top; three small distractors move at random) heads
    2π·(label + u)/num_classes, u uniform in ±0.25, label = index mod num_classes, across about the short side,
    path centred: only motion tells the classes apart. Fast, for a laptop-sized run; only asked-for frames drawn."""

    def __init__(self, num_videos: int = 1024, num_classes: int = 8, length: int = 80, height: int = 128,
                 width: int = 160, seed: int = 0, first_index: int = 0):
        self.num_videos, self.num_classes, self.length = num_videos, num_classes, length
        self.height, self.width, self.seed, self.first_index = height, width, seed, first_index

    def __len__(self) -> int:
        return self.num_videos

    def label(self, i: int) -> int:
        return (self.first_index + i) % self.num_classes

    def name(self, i: int) -> str:
        return f"synthetic video {self.first_index + i}"

    def clip(self, i: int, choose: Callable[[int], Sequence[int]]) -> np.ndarray:
        return self.render(i, choose(self.length))

    def render(self, i: int, indices: Sequence[int]) -> np.ndarray:
        """Frames `indices` of video i, (T, H, W, 3) uint8 RGB."""
        background, shapes = self._scene(i)
        return np.stack([self._draw(background, shapes, t) for t in indices])

    def _scene(self, i: int) -> tuple[np.ndarray, list[_Shape]]:
        rng = np.random.default_rng([self.seed, self.first_index + i])
        h, w, side = self.height, self.width, min(self.height, self.width)
        colours = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
        blobs = cv2.resize(colours, (w, h), interpolation=cv2.INTER_CUBIC)  # (H, W, 3) smooth colour
        direction, period, phase = rng.uniform(0, np.pi), rng.uniform(4, 16), rng.uniform(0, 2 * np.pi)
        x, y = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)[:, None]
        along = math.cos(direction) * x + math.sin(direction) * y  # (H, W) float32
        stripes = 25 * np.sin(along * (2 * math.pi / period) + phase)
        background = np.clip(np.float32(0.6) * blobs + (stripes + 30)[..., None], 0, 255).astype(np.uint8)
        shapes = []
        for main in (False, False, False, True):
            heading = (2 * np.pi * (self.label(i) + rng.uniform(-0.25, 0.25)) / self.num_classes if main
                       else rng.uniform(0, 2 * np.pi))
            radius = (0.2 if main else rng.uniform(0.06, 0.12)) * side
            speed = (1.0 if main else rng.uniform(0, 0.2)) * side / self.length  # pixels per frame
            middle = (rng.uniform(0.4, 0.6, 2) if main else rng.uniform(0, 1, 2)) * (w, h)
            velocity = speed * np.array([np.cos(heading), np.sin(heading)])
            polygon = _POLYGONS[rng.integers(len(_POLYGONS))] * radius
            colour = tuple(int(c) for c in rng.integers(64, 256, 3))
            spin = rng.uniform(0.03, 0.12) * rng.choice((-1, 1))
            start = middle - velocity * (self.length - 1) / 2  # the path is centred on `middle`
            shapes.append(_Shape(polygon, colour, start, velocity, rng.uniform(0, 2 * np.pi), spin))
        return background, shapes

    @staticmethod
    def _draw(background: np.ndarray, shapes: list[_Shape], t: int) -> np.ndarray:
        frame = background.copy()  # (H, W, 3) uint8
        for s in shapes:
            a = s.angle + s.spin * t
            rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            points = s.polygon @ rotation.T + s.start + s.velocity * t  # (n, 2) pixels
            cv2.fillPoly(frame, [np.round(points * 16).astype(np.int32)], s.colour, cv2.LINE_AA, shift=4)
        return frame


# -----------------------------------------------------------------------------------------------------
# Which frames: temporal sampling. Each takes the video's length n and returns int frame indices.


def pretrain_indices(n: int, num_frames: int, sampling_rate: int, rng: np.random.Generator) -> np.ndarray:
    """num_frames frames, sampling_rate apart, from a random start; short videos repeat the last reachable one.
    As in the reference, a step is taken only while it lands before the video's last frame (index ≤ n-2)."""
    room = n - num_frames * sampling_rate + 1
    start = int(rng.integers(room)) if room > 0 else 0
    steps = max(0, (n - 2 - start) // sampling_rate)  # the reference stops stepping here
    return start + sampling_rate * np.minimum(np.arange(num_frames), steps)


def dense_indices(n: int, num_frames: int, sampling_rate: int, rng: np.random.Generator | None) -> np.ndarray:
    """num_frames frames evenly over a num_frames·sampling_rate window: at random (rng), or the centre one.
    A video no longer than the window is read every sampling_rate frames and padded with its last frame."""
    window = num_frames * sampling_rate
    if n <= window:
        index = np.linspace(0, n, num=n // sampling_rate)
        index = np.concatenate([index, np.full(num_frames - n // sampling_rate, n)])
        return np.clip(index, 0, n - 1).astype(np.int64)
    end = int(rng.integers(window, n)) if rng is not None else (window + n) // 2
    return np.clip(np.linspace(end - window, end, num=num_frames), end - window, end - 1).astype(np.int64)


def _view_start(extent: int, view: int, num_views: int) -> int:
    """Offset of view `view` of num_views spread evenly over [0, extent]; a single view is centred."""
    return int(view * extent / (num_views - 1)) if num_views > 1 else extent // 2


def dense_test_indices(n: int, num_frames: int, sampling_rate: int, view: int, num_views: int) -> np.ndarray:
    """Test window `view` of num_views: the video read every sampling_rate frames (padded to num_frames),
    and num_frames consecutive of those, the windows spread evenly from start to end."""
    every = np.arange(0, n, sampling_rate)
    every = np.concatenate([every, np.full(max(0, num_frames - len(every)), every[-1])])
    start = _view_start(len(every) - num_frames, view, num_views)
    return every[start:start + num_frames]


def segment_indices(n: int, num_segments: int, rng: np.random.Generator | None) -> np.ndarray:
    """TSN sampling: one frame from each of num_segments equal segments, at random (rng) or in the middle.
    A video shorter than num_segments repeats its first frame in front."""
    length = n // num_segments
    if length == 0:
        return np.concatenate([np.zeros(num_segments - n, np.int64), np.arange(n)])
    offsets = rng.integers(length, size=num_segments) if rng is not None else length // 2
    return np.arange(num_segments) * length + offsets


def segment_test_indices(n: int, num_segments: int, view: int, num_views: int) -> np.ndarray:
    """TSN test view `view` of num_views: each segment's frame shifted by view/num_views of a segment."""
    tick = n / num_segments
    return (view * tick / num_views + tick * np.arange(num_segments)).astype(np.int64)


# -----------------------------------------------------------------------------------------------------
# Augmentation: on (T, H, W, 3) uint8 frames, every frame transformed the same way


def _resize(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in frames])


_MULTI_SCALE_OFFSETS = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2),  # corners and centre
                        (0, 2), (4, 2), (2, 4), (2, 0),  # edge middles
                        (1, 1), (3, 1), (1, 3), (3, 3))  # quarter points, in quarters of the free space


def multi_scale_crop(frames: np.ndarray, size: int, rng: np.random.Generator,
                     scales: Sequence[float] = (1, .875, .75, .66), max_distort: int = 1) -> np.ndarray:
    """The pretraining crop: width and height each a scale of the short side (at most max_distort scales
    apart; within 3 px of `size` snaps to it), at one of 13 fixed places, resized to size x size."""
    _, h, w, _ = frames.shape
    sides = [size if abs(int(min(h, w) * s) - size) < 3 else int(min(h, w) * s) for s in scales]
    pairs = [(cw, ch) for i, ch in enumerate(sides) for j, cw in enumerate(sides) if abs(i - j) <= max_distort]
    cw, ch = pairs[rng.integers(len(pairs))]
    x, y = _MULTI_SCALE_OFFSETS[rng.integers(len(_MULTI_SCALE_OFFSETS))]
    left, top = x * ((w - cw) // 4), y * ((h - ch) // 4)
    return _resize(frames[:, top:top + ch, left:left + cw], size, size)


def random_resized_crop(frames: np.ndarray, size: int, rng: np.random.Generator, scale: tuple = (0.08, 1.0),
                        ratio: tuple = (3 / 4, 4 / 3)) -> np.ndarray:
    """The fine-tuning crop: area a `scale` fraction of the frame, aspect log-uniform in `ratio` (10 tries,
    then the centre crop at the nearest allowed aspect), resized to size x size."""
    _, h, w, _ = frames.shape
    for _ in range(10):
        area = rng.uniform(*scale) * h * w
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
            break
    else:
        aspect = min(max(w / h, ratio[0]), ratio[1])
        cw, ch = min(w, round(h * aspect)), min(h, round(w / aspect))
        top, left = (h - ch) // 2, (w - cw) // 2
    return _resize(frames[:, top:top + ch, left:left + cw], size, size)


def resize_short_side(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is `size`, keeping the aspect ratio."""
    _, h, w, _ = frames.shape
    if min(h, w) == size:
        return frames
    return _resize(frames, size, int(size * h / w)) if w < h else _resize(frames, int(size * w / h), size)


def spatial_crop(frames: np.ndarray, size: int, view: int = 0, num_views: int = 1) -> np.ndarray:
    """A size x size crop, view `view` of num_views spread evenly along the longer side (left, centre,
    right for 3) and centred along the shorter; one view is the centre crop."""
    _, h, w, _ = frames.shape
    if h >= w:  # portrait (or square): the views go top to bottom
        top, left = _view_start(h - size, view, num_views), (w - size) // 2
    else:
        top, left = (h - size) // 2, _view_start(w - size, view, num_views)
    return frames[:, top:top + size, left:left + size]


# uint8 value -> normalised float, per channel (3, 256): the model's input (vmae.IMAGENET_MEAN and _STD)
_NORMALISE = ((np.arange(256, dtype=np.float32)[None] / 255 - np.float32(vmae.IMAGENET_MEAN)[:, None])
              / np.float32(vmae.IMAGENET_STD)[:, None]).astype(np.float32)


def to_tensor(frames: np.ndarray, out: Tensor | None = None) -> Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float32: /255, then the ImageNet mean and std; written into `out` if
    given (contiguous), and a uint8 `out` gets the pixels as they are, for `normalize` to finish on the device."""
    t, h, w, _ = frames.shape
    clip = torch.empty(3, t, h, w) if out is None else out
    planes = clip.numpy().reshape(3, t * h, w)  # a view: OpenCV writes straight into the tensor
    if clip.dtype == torch.uint8:
        cv2.split(np.ascontiguousarray(frames).reshape(t * h, w, 3), list(planes))
        return clip
    for c in range(3):  # a table lookup, several times faster than the arithmetic
        cv2.LUT(np.ascontiguousarray(frames[..., c]).reshape(t * h, w), _NORMALISE[c], dst=planes[c])
    return clip


def normalize(clips: Tensor) -> Tensor:
    """uint8 clips (..., 3, T, H, W) (PretrainDataset's with uint8=True: a quarter of the bytes to move) on the
    device -> float32, equal to to_tensor's on the CPU (the same float32 steps)."""
    clips = clips.float().div_(255)
    mean, std = vmae.imagenet_stats(clips)  # (3,) each
    return clips.sub_(mean[:, None, None, None]).div_(std[:, None, None, None])


def random_erase(clip: Tensor, rng: np.random.Generator, prob: float = 0.25,
                 area: tuple[float, float] = (0.02, 1 / 3), min_aspect: float = 0.3) -> Tensor:
    """With probability `prob`, fill one box of a normalised (3, T, H, W) clip with fresh N(0, 1) noise, in place,
    the same box on every frame (area a fraction in `area`, aspect log-uniform in [min_aspect, 1/min_aspect])."""
    if rng.random() > prob:
        return clip
    _, t, h, w = clip.shape
    for _ in range(100):
        target = rng.uniform(*area) * h * w
        aspect = math.exp(rng.uniform(math.log(min_aspect), -math.log(min_aspect)))
        bh, bw = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if bh < h and bw < w:
            top, left = int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1))
            noise = rng.standard_normal((3, t, bh, bw), np.float32)
            clip[:, :, top:top + bh, left:left + bw] = torch.from_numpy(noise)
            break
    return clip


# RandAugment's ops, the "increasing" set (a larger magnitude is a stronger change): each mirrors PIL's, takes
# (frames, level = magnitude/10 in [0, 1], rng) and does the same to every frame.


def _signed(value: float, rng: np.random.Generator) -> float:
    return value if rng.random() < 0.5 else -value


def _lut(frames: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Map every pixel value through a table: (256,) for all channels, or (256, 3) one per channel."""
    t, h, w, _ = frames.shape
    table = np.clip(table, 0, 255).astype(np.uint8).reshape(256, 1, -1)
    return cv2.LUT(frames.reshape(t * h, w, 3), table).reshape(frames.shape)


def _affine(frames: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Warp by a 2x3 matrix mapping output pixels to input pixels (as PIL's), bicubic, grey outside."""
    h, w = frames.shape[1:3]
    return np.stack([cv2.warpAffine(f, matrix, (w, h), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                                    borderValue=(128, 128, 128)) for f in frames])


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # PIL's SMOOTH filter
# What each enhancement blends a frame (H, W, 3) with: its grey, its mean grey, black, a smoothed copy.
_DEGENERATE = dict(color=lambda f: cv2.cvtColor(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB),
                   contrast=lambda f: np.full_like(f, int(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).mean() + 0.5)),
                   brightness=np.zeros_like,
                   sharpness=lambda f: cv2.filter2D(f, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE))


def _enhance(frames: np.ndarray, level: float, rng: np.random.Generator, degenerate: Callable) -> np.ndarray:
    """PIL's ImageEnhance: blend from degenerate(frame) (factor 0) through the frame (factor 1) and on,
    factor 1 ± 0.9·level, saturating at 0 and 255."""
    factor = 1 + _signed(0.9 * level, rng)
    return np.stack([cv2.addWeighted(f, factor, degenerate(f), 1 - factor, 0) for f in frames])


def _auto_contrast(frames: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Stretch each channel of each frame to span 0..255 (a flat channel stays as it is)."""
    values = np.arange(256)[:, None]  # (256, 1)
    out = []
    for frame in frames:
        low, high = np.array([cv2.minMaxLoc(c)[:2] for c in cv2.split(frame)]).T  # (3,) each, per channel
        table = np.where(high > low, (values - low) * (255 / np.maximum(high - low, 1)), values)  # (256, 3)
        out.append(_lut(frame[None], table)[0])
    return np.stack(out)


def _equalize(frames: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    return np.stack([cv2.merge([cv2.equalizeHist(c) for c in cv2.split(f)]) for f in frames])


def _table_op(table: Callable[[np.ndarray, float], np.ndarray]) -> Callable:
    """An op that maps every pixel value v through table(v = 0..255, level)."""
    return lambda frames, level, rng: _lut(frames, table(np.arange(256), level))


_invert = _table_op(lambda v, level: 255 - v)
_posterize = _table_op(lambda v, level: v & (0xFF << (4 + int(level * 4))))  # keep 4 down to 0 high bits
_solarize = _table_op(lambda v, level: np.where(v >= 256 - int(level * 256), 255 - v, v))
_solarize_add = _table_op(lambda v, level: np.where(v < 128, v + int(level * 110), v))


def _affine_op(strength: float, matrix: Callable[[float, int, int], np.ndarray]) -> Callable:
    """An op that warps every frame by matrix(v, h, w), v = ±strength·level."""
    def op(frames: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
        h, w = frames.shape[1:3]
        return _affine(frames, np.array(matrix(_signed(strength * level, rng), h, w), np.float64))
    return op


_rotate = _affine_op(30, lambda v, h, w: cv2.getRotationMatrix2D((w / 2, h / 2), v, 1.0))  # v degrees
_shear_x = _affine_op(0.3, lambda v, h, w: [[1, v, 0], [0, 1, 0]])
_shear_y = _affine_op(0.3, lambda v, h, w: [[1, 0, 0], [v, 1, 0]])
_translate_x = _affine_op(0.45, lambda v, h, w: [[1, 0, v * w], [0, 1, 0]])  # v: a fraction of the width
_translate_y = _affine_op(0.45, lambda v, h, w: [[1, 0, 0], [0, 1, v * h]])

_RAND_OPS = (_auto_contrast, _equalize, _invert, _rotate, _posterize, _solarize, _solarize_add,
             *(partial(_enhance, degenerate=d) for d in _DEGENERATE.values()),
             _shear_x, _shear_y, _translate_x, _translate_y)


def parse_rand_augment(aa: str) -> tuple[float, int, float] | None:
    """'rand-m7-n4-mstd0.5-inc1' -> (magnitude, num_ops, magnitude_std); '' or 'none' -> None (off)."""
    if aa.lower() in ("", "none"):
        return None
    match = re.fullmatch(r"rand-m(\d+(?:\.\d+)?)-n(\d+)-mstd(\d+(?:\.\d+)?)-inc1", aa)
    if match is None:
        raise ValueError(f"aa={aa!r}: expected 'rand-m<magnitude>-n<ops>-mstd<std>-inc1', e.g. "
                         "'rand-m7-n4-mstd0.5-inc1', or 'none' (only the increasing op set is implemented)")
    return float(match[1]), int(match[2]), float(match[3])


def rand_augment(frames: np.ndarray, rng: np.random.Generator, magnitude: float = 7, num_ops: int = 4,
                 magnitude_std: float = 0.5) -> np.ndarray:
    """Video RandAugment: num_ops ops (with replacement), each applied at p 0.5, the same on every frame."""
    for op in rng.choice(len(_RAND_OPS), num_ops):
        if rng.random() < 0.5:
            level = min(10.0, max(0.0, rng.normal(magnitude, magnitude_std))) / 10
            frames = _RAND_OPS[op](frames, level, rng)
    return frames


# -----------------------------------------------------------------------------------------------------
# Datasets

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what a scheduler sends before a kill, or ahead of a time limit


def ignore_stop_signals(worker_id: int) -> None:
    """Every loader's worker_init_fn in a run: the scheduler signals them too; the main process stops the run."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)


@atexit.register
def end_data_workers() -> None:
    """At exit multiprocessing SIGTERMs, then joins, leftover workers, which ignore SIGTERM: SIGKILL them first."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


class Share(NamedTuple):
    """A check split over processes (engine.file_share): this one takes items rank, rank + world, ..., and
    gather(found), a collective, returns every process's findings, one list each. Default: one process."""
    rank: int = 0
    world: int = 1
    gather: Callable[[list], list[list]] | None = None


class _Clips(torch.utils.data.Dataset):
    """Loading for both datasets, with the bad-video policy: raise, or skip (logged, counted, limited). Item i draws
    from a generator seeded by (seed, i), seed = (run seed, epoch) in training: a resumed run draws as the first did."""
    seed: tuple = (0,)
    num_views = 1  # items per video
    evaluated = False  # an evaluation set: check_files decodes what its evaluation reads (unreadable)

    def __init__(self, source: VideoList | SyntheticVideos, skip_bad_videos: bool, max_bad_fraction: float):
        self.source, self.skip_bad_videos, self.max_bad_fraction = source, skip_bad_videos, max_bad_fraction
        # one flag per video in shared memory, so DataLoader workers and the main process see the same set
        self._bad = multiprocessing.RawArray("b", len(source)) if skip_bad_videos else None

    def __len__(self) -> int:
        return len(self.source) * self.num_views

    def bad_videos(self) -> list[str]:
        """The unreadable videos skipped so far, by all workers together (for an epoch summary)."""
        flags = np.frombuffer(self._bad, np.int8) if self._bad is not None else []
        return [self.source.name(int(i)) for i in np.flatnonzero(flags)]

    def check_files(self, share: Share = Share(), num_workers: int = 0) -> None:
        """Before training: each listed video stat-checked (VideoList.problem), an evaluation set's frames decoded
        (num_workers processes), each process its `share`. Problems: one VideoError, or with skip_bad_videos skipped."""
        if not isinstance(self.source, VideoList):
            return
        mine = range(share.rank, len(self.source), share.world)
        bad = [(i, why) for i in mine if (why := self.source.problem(i))]
        if self.evaluated:  # the loader's collate_fn runs in its workers: they decode
            readable = [i for i in mine if i not in dict(bad)]
            decoded = torch.utils.data.DataLoader(readable, batch_size=None, num_workers=num_workers,
                                                  collate_fn=self.unreadable, worker_init_fn=ignore_stop_signals)
            bad += [(i, why) for i, why in zip(readable, decoded) if why]
        if share.world > 1:
            bad = sorted(sum(share.gather(bad), []))
        if not self.skip_bad_videos:
            _raise_problems([why for _, why in bad], VideoError)
        for i, why in bad:
            self._skip(i, VideoError(why))

    def digest(self) -> str:
        """'<n> videos, <hash>': which videos in which order, with their frame ranges and labels (paths relative
        to their common folder, so the data may move), for a resumed run to tell whether its data changed."""
        src = self.source
        if isinstance(src, VideoList):
            try:
                common = os.path.commonpath([os.path.dirname(s.path) for s in src.samples])
            except ValueError:  # absolute and relative paths mixed
                common = ""
            lines = [f"{os.path.relpath(s.path, common) if common else s.path} {s.start_idx} {s.total_frames} "
                     f"{s.label}" for s in src.samples]
        else:
            lines = [f"{src.name(i)} {src.label(i)}" for i in range(len(src))]
        return f"{len(lines)} videos, {hashlib.sha1(chr(10).join(lines).encode()).hexdigest()[:12]}"

    def skipped(self, index: int) -> bool:
        """Whether video `index` was found unreadable (so its items came from a stand-in video)."""
        return self._bad is not None and bool(self._bad[index])

    def _load(self, index: int, choose: Callable[[int], Sequence[int]], rng: np.random.Generator):
        """(frames (T, H, W, 3) uint8, their video): video `index`, or with skip_bad_videos a stand-in if unreadable."""
        while True:
            if not self.skipped(index):
                try:
                    return self.source.clip(index, choose), index
                except VideoError as error:
                    if not self.skip_bad_videos:
                        raise
                    self._skip(index, error)
            index = int(rng.integers(len(self.source)))

    def _skip(self, index: int, error: VideoError) -> None:
        self._bad[index] = 1
        bad = self.bad_videos()
        log.warning("skipping an unreadable video (%d so far): %s", len(bad), error)
        self.check_bad_fraction(bad)

    def check_bad_fraction(self, bad: list[str]) -> None:
        """VideoError when the unreadable videos `bad` (this process's, or at an epoch's end every process's
        together) are more than max_bad_fraction of the dataset, or all of it."""
        if bad and (len(bad) > self.max_bad_fraction * len(self.source) or len(bad) == len(self.source)):
            raise VideoError(f"{len(bad)} of {len(self.source)} videos are unreadable, more than "
                             f"max_bad_fraction={self.max_bad_fraction}: " + ", ".join(bad))


class PretrainDataset(_Clips):
    """Pretraining clips. Item: (num_sample, 3, T, input_size, input_size) float, num_sample multi-scale crops of
    one strided window (decoded once); with uint8=True as uint8 pixels, normalised on the device (`normalize`)."""

    def __init__(self, source: VideoList | SyntheticVideos, num_frames: int = 16, sampling_rate: int = 4,
                 input_size: int = 224, num_sample: int = 1, skip_bad_videos: bool = False,
                 max_bad_fraction: float = 0.01, uint8: bool = False):
        super().__init__(source, skip_bad_videos, max_bad_fraction)
        self.num_frames, self.sampling_rate = num_frames, sampling_rate
        self.input_size, self.num_sample, self.uint8 = input_size, num_sample, uint8

    def __getitem__(self, index: int) -> Tensor:
        rng = np.random.default_rng([*self.seed, index])
        choose = lambda n: pretrain_indices(n, self.num_frames, self.sampling_rate, rng)
        frames, _ = self._load(index, choose, rng)  # (T, H, W, 3) uint8
        size = self.input_size
        clips = torch.empty(self.num_sample, 3, self.num_frames, size, size,
                            dtype=torch.uint8 if self.uint8 else torch.float32)
        for clip in clips:  # each crop written straight into the batch item
            to_tensor(multi_scale_crop(frames, size, rng), out=clip)
        return clips


class FinetuneDataset(_Clips):
    """Labelled clips for fine-tuning. Items: in mode 'train' (clips (num_sample, 3, T, H, W), labels (num_sample,));
    'validation', (clip (3, T, H, W), label); 'test', (clip, label, video, view) for num_views views a video."""

    def __init__(self, source: VideoList | SyntheticVideos, mode: str, num_frames: int = 16,
                 sampling_rate: int = 4, input_size: int = 224, short_side_size: int = 224, num_sample: int = 2,
                 test_num_segment: int = 5, test_num_crop: int = 3, sparse_sample: bool = False,
                 flip: bool = True, aa: str = "rand-m7-n4-mstd0.5-inc1", reprob: float = 0.25,
                 skip_bad_videos: bool = False, max_bad_fraction: float = 0.01):
        super().__init__(source, skip_bad_videos, max_bad_fraction)
        _check_mode(mode)
        if mode != "train" and short_side_size < input_size:
            raise ValueError(f"short_side_size={short_side_size} is smaller than input_size={input_size}: "
                             "the evaluation crop would not fit")
        self.mode, self.num_frames, self.sampling_rate = mode, num_frames, sampling_rate
        self.input_size, self.short_side_size, self.num_sample = input_size, short_side_size, num_sample
        self.test_num_segment, self.test_num_crop = test_num_segment, test_num_crop
        self.sparse_sample, self.flip, self.reprob = sparse_sample, flip, reprob
        self.rand_augment = parse_rand_augment(aa)
        self.num_views = test_num_segment * test_num_crop if mode == "test" else 1
        self.evaluated = mode != "train"

    def unreadable(self, video: int) -> str | None:
        """Why this video cannot be read for evaluation (every frame it reads decoded), or None."""
        try:
            for segment in range(self.test_num_segment if self.mode == "test" else 1):
                self.source.clip(video, lambda n: self._frame_indices(n, segment, None))
        except VideoError as e:
            return str(e)
        return None

    def _frame_indices(self, n: int, segment: int, rng: np.random.Generator) -> np.ndarray:
        if self.mode == "test" and self.sparse_sample:
            return segment_test_indices(n, self.num_frames, segment, self.test_num_segment)
        if self.mode == "test":
            return dense_test_indices(n, self.num_frames, self.sampling_rate, segment, self.test_num_segment)
        random = rng if self.mode == "train" else None  # validation: the middle of each segment / the centre
        if self.sparse_sample:
            return segment_indices(n, self.num_frames, random)
        return dense_indices(n, self.num_frames, self.sampling_rate, random)

    def _augment(self, frames: np.ndarray, rng: np.random.Generator) -> Tensor:
        """One training clip (3, T, H, W): RandAugment, random resized crop, flip, normalise, erase. (The
        reference normalises before cropping; cropping the uint8 frames first is the same up to rounding.)"""
        if self.rand_augment is not None:
            frames = rand_augment(frames, rng, *self.rand_augment)
        clip = to_tensor(random_resized_crop(frames, self.input_size, rng))
        if self.flip and rng.random() < 0.5:
            clip = clip.flip(-1)
        if self.reprob > 0:
            random_erase(clip, rng, self.reprob)
        return clip

    def __getitem__(self, index: int):
        rng = np.random.default_rng([*self.seed, index])
        video, view = divmod(index, self.num_views)
        segment, crop = divmod(view, self.test_num_crop)
        frames, video = self._load(video, lambda n: self._frame_indices(n, segment, rng), rng)  # (T, H, W, 3)
        label = self.source.label(video)
        if self.mode == "train":
            clips = torch.stack([self._augment(frames, rng) for _ in range(self.num_sample)])
            return clips, torch.full((self.num_sample,), label)
        frames = resize_short_side(frames, self.short_side_size)
        if self.mode == "validation":
            return to_tensor(spatial_crop(frames, self.input_size)), label
        return to_tensor(spatial_crop(frames, self.input_size, crop, self.test_num_crop)), label, video, view


def build_pretrain_dataset(data_path: str | None = None, data_root: str = "", *, fname_tmpl: str = "img_{:05}.jpg",
                           synthetic_videos: int = 1024, share: Share = Share(), **options) -> PretrainDataset:
    """The pretraining dataset of data_path (a list file or a folder of videos), or of synthetic_videos built-in
    videos, its files stat-checked; `options` are PretrainDataset's."""
    source = (VideoList(read_pretrain_list(data_path, data_root), fname_tmpl) if data_path else
              _synthetic(synthetic_videos, 8, 0, **options))
    dataset = PretrainDataset(source, **options)
    dataset.check_files(share)
    return dataset


def build_finetune_dataset(mode: str, data_path: str | None = None, data_root: str = "", *, nb_classes: int,
                           fname_tmpl: str = "img_{:05}.jpg", start_idx: int = 1, synthetic_videos: int = 1024,
                           share: Share = Share(), num_workers: int = 0, **options) -> FinetuneDataset:
    """The split `mode` of data_path, or of the synthetic set (synthetic_videos to train; validation and test share
    synthetic_videos // 4 others), its files checked; `options` are FinetuneDataset's."""
    if data_path:
        source = VideoList(read_finetune_split(data_path, mode, data_root, nb_classes, start_idx), fname_tmpl)
    elif mode == "train":
        source = _synthetic(synthetic_videos, nb_classes, 0, **options)
    else:
        source = _synthetic(max(1, synthetic_videos // 4), nb_classes, synthetic_videos, **options)
    dataset = FinetuneDataset(source, mode, **options)
    dataset.check_files(share, num_workers)
    return dataset


def held_out_clip(num_frames: int, input_size: int, sampling_rate: int, synthetic_size: int, index: int = 0) -> Tensor:
    """A (3, T, H, W) built-in clip pretraining never saw (after the first synthetic_size): centre window and crop."""
    held_out = labelled_clips(None, num_frames=num_frames, sampling_rate=sampling_rate, input_size=input_size,
                              first_index=synthetic_size)
    return held_out[index][0]


def labelled_clips(list_file: str | None, data_root: str = "", *, num_frames: int, sampling_rate: int,
                   input_size: int, fname_tmpl: str = "img_{:05}.jpg", synthetic_videos: int = 512,
                   first_index: int = 0, share: Share = Share(), num_workers: int = 0) -> FinetuneDataset:
    """A labelled set read (and checked) as validation clips, e.g. for a probe: the lines of list_file (`path
    label` or `frame_dir total_frames label`), or synthetic_videos built-in videos from first_index on."""
    source = (VideoList(read_finetune_list(list_file, data_root), fname_tmpl) if list_file else
              _synthetic(synthetic_videos, 8, first_index, num_frames, sampling_rate, input_size))
    dataset = FinetuneDataset(source, "validation", num_frames, sampling_rate, input_size, short_side_size=input_size)
    dataset.check_files(share, num_workers)
    return dataset


def one_clip(path: str, num_frames: int, input_size: int, sampling_rate: int,
             fname_tmpl: str = "img_{:05}.jpg") -> Tensor:
    """The centre window of a video file, or of a folder of frames, as one (3, T, H, W) clip."""
    count = len([f for f in os.listdir(path) if not f.startswith(".")]) if os.path.isdir(path) else -1
    source = VideoList([Sample(path, 1, count, -1)], fname_tmpl)
    clips = FinetuneDataset(source, "validation", num_frames, sampling_rate, input_size, short_side_size=input_size)
    return clips[0][0]


def _synthetic(num_videos: int, num_classes: int, first_index: int, num_frames: int = 16, sampling_rate: int = 4,
               input_size: int = 224, **dataset_options) -> SyntheticVideos:
    """Synthetic videos long enough for a full window, input_size tall, 4:3 (the other options are the dataset's)."""
    return SyntheticVideos(num_videos, num_classes, length=num_frames * (sampling_rate + 1), height=input_size,
                           width=input_size * 4 // 3, first_index=first_index)


# -----------------------------------------------------------------------------------------------------
# Mixup / CutMix, on a batch


def mixup_cutmix(clips: Tensor, labels: Tensor, num_classes: int, mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0, switch_prob: float = 0.5, smoothing: float = 0.1,
                 rng: np.random.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Mix clips (B, 3, T, H, W) in place with the batch reversed (timm's 'batch' mode), one λ ~ Beta(α, α): CutMix
    (p switch_prob when both are on) pastes a box, about 1 - λ of each frame, from the partner (λ then the exact
    share left); Mixup blends whole clips. Returns (clips, targets (B, K)): smoothed one-hots mixed by λ."""
    rng = rng if rng is not None else np.random.default_rng(int(torch.randint(2 ** 62, ())))  # from torch's seed
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    lam = 1.0
    if use_cutmix:
        h, w = clips.shape[-2:]
        ratio = math.sqrt(1 - rng.beta(cutmix_alpha, cutmix_alpha))
        cy, cx, ch, cw = int(rng.integers(h)), int(rng.integers(w)), int(h * ratio), int(w * ratio)
        top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        clips[..., top:bottom, left:right] = clips[..., top:bottom, left:right].flip(0)  # flip() copies
        lam = 1 - (bottom - top) * (right - left) / (h * w)
    elif mixup_alpha > 0:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        partner = clips.flip(0)  # a copy, taken before clips changes
        clips.mul_(lam).add_(partner, alpha=1 - lam)
    off = smoothing / num_classes
    targets = torch.full((len(labels), num_classes), off, device=labels.device)
    targets.scatter_(1, labels[:, None], 1 - smoothing + off)
    return clips, lam * targets + (1 - lam) * targets.flip(0)
