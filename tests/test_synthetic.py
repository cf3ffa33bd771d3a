"""Synthetic class-labeled videos: deterministic, distinguishable by motion, written as real h264 mp4."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evatok import synthetic, video
from evatok.synthetic import CLASSES

REPO = Path(__file__).resolve().parents[1]


def motion_features(v: np.ndarray) -> np.ndarray:
    """Simple motion statistics of uint8 [T, H, W, 3] frames."""
    x = v.astype(np.float32).mean(-1)
    d = np.diff(x, axis=0)
    ad = np.abs(d)
    per_frame = ad.mean((1, 2))
    h, w = x.shape[1:]
    centre = ad[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4].mean()
    return np.array([
        np.log(per_frame.mean() + 1e-2),                             # amount of motion
        per_frame.std() / (per_frame.mean() + 1e-2),                 # burstiness in time (cuts, bursts)
        (ad > 12).mean(),                                           # share of the frame that changes
        np.abs(d.mean((1, 2))).mean() / (per_frame.mean() + 1e-2),  # global brightness change (flicker)
        np.log(np.abs(np.diff(x, axis=2)).mean() + 1e-2),           # spatial detail (texture)
        centre / (ad.mean() + 1e-2),                                # centre vs whole-frame motion (objects)
    ])


def block_energy(v: np.ndarray, block: int = 4) -> np.ndarray:
    """Mean |frame difference| per 4-frame block (the difference into each frame of the block)."""
    x = v.astype(np.float32)
    d = np.abs(np.diff(x, axis=0, prepend=x[:1])).mean((1, 2, 3))
    return d[: len(d) // block * block].reshape(-1, block).mean(-1)


def test_classes_and_shapes():
    assert len(CLASSES) >= 8 and len(set(CLASSES)) == len(CLASSES)
    v = synthetic.make_video(CLASSES[0], seed=0)
    assert v.dtype == np.uint8 and v.shape == (72, 80, 96, 3)  # non-square, several clips long
    assert synthetic.make_video(3, seed=0, num_frames=16, height=32, width=48).shape == (16, 32, 48, 3)
    with pytest.raises(ValueError):
        synthetic.make_video("no_such_class")


@pytest.mark.parametrize("label", CLASSES)
def test_deterministic_from_seed(label):
    a = synthetic.make_video(label, seed=5, num_frames=16)
    assert np.array_equal(a, synthetic.make_video(label, seed=5, num_frames=16))
    assert not np.array_equal(a, synthetic.make_video(label, seed=6, num_frames=16))


def test_classes_are_distinguishable_by_motion_statistics():
    """Nearest class centroid on 6 motion statistics, leave-one-out over 3 videos a class."""
    feats, labels = [], []
    for ci, c in enumerate(CLASSES):
        for seed in range(3):
            feats.append(motion_features(synthetic.make_video(c, seed=100 + seed)))
            labels.append(ci)
    f, y = np.array(feats), np.array(labels)
    z = (f - f.mean(0)) / (f.std(0) + 1e-9)
    correct = 0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        centroids = np.stack([z[keep & (y == k)].mean(0) for k in range(len(CLASSES))])
        correct += int(np.argmin(((centroids - z[i]) ** 2).sum(1)) == y[i])
    assert correct / len(y) >= 0.9, correct / len(y)


def test_complexity_differs_between_videos_and_between_blocks():
    energy = {c: block_energy(synthetic.make_video(c, seed=1)) for c in CLASSES}
    assert energy["static"].max() == 0.0
    assert energy["fast_pan"].mean() > 3 * energy["one_object"].mean()
    # per-block speed multipliers: blocks of one moving video differ
    for c in ("slow_pan", "fast_pan", "one_object", "many_objects"):
        e = energy[c][1:]
        assert e.max() > 1.3 * e.min(), (c, e)
    # bursts and scene cuts: some blocks still, some busy
    for c in ("bursts", "scene_cuts"):
        assert (energy[c] < 0.05).any() and energy[c].max() > 1.0, (c, energy[c])
    # two videos of one class do not share a block profile
    a, b = block_energy(synthetic.make_video("fast_pan", 1)), block_energy(synthetic.make_video("fast_pan", 2))
    assert not np.allclose(a / a.mean(), b / b.mean(), rtol=0.05)


def test_write_mp4_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError):
        synthetic.write_mp4(tmp_path / "x.mp4", np.zeros((4, 81, 96, 3), np.uint8))
    with pytest.raises(ValueError):
        synthetic.write_mp4(tmp_path / "x.mp4", np.zeros((4, 80, 96, 3), np.float32))


def test_write_dataset_manifest_and_real_h264(tmp_path):
    manifest = synthetic.write_dataset(tmp_path / "ds", n=len(CLASSES) + 2, seed=3)
    rows = list(csv.DictReader(open(manifest)))
    assert manifest.name == "manifest.csv" and list(rows[0]) == ["uri", "label"]
    assert [r["label"] for r in rows] == [CLASSES[i % len(CLASSES)] for i in range(len(CLASSES) + 2)]
    for r in rows[:3]:
        info = video.probe(r["uri"])
        assert (info.codec, info.width, info.height, info.num_frames, info.fps) == ("h264", 96, 80, 72, 12.0)
    # the decoded video is the generated one (h264 is lossy: compare loosely)
    _, clips = video.decode_clips(rows[3]["uri"], clip_len=16, fps=None, size=80)
    src = synthetic.make_video(rows[3]["label"], seed=3 * 1_000_003 + 3)[:16, :, 8:88]
    assert np.abs(clips[0].astype(float) - src).mean() < 4.0
    rel = synthetic.write_dataset(tmp_path / "rel", n=2, relative=True)
    assert [r["uri"] for r in csv.DictReader(open(rel))] == ["00000_static.mp4", "00001_slow_pan.mp4"]
    assert (rel.parent / "00001_slow_pan.mp4").stat().st_size > 0


def test_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "evatok.synthetic", str(tmp_path / "cli"), "--n", "3",
                          "--frames", "20"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    manifest = Path(out.stdout.strip())
    assert manifest.is_file() and len(manifest.read_text().splitlines()) == 4
    assert video.probe(tmp_path / "cli" / "00002_fast_pan.mp4").num_frames == 20
