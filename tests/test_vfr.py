"""Variable frame rate and rotation (issue 14), on files this test writes with PyAV.

- VFR: 24 frames 1/24 s apart, then 24 frames 1/8 s apart (an average of 12.8 fps). Frame k is a flat
  grey of level 10 + 4k, so every decoded frame says which source frame it is. Sampling at 8 fps must
  take, at each time j / 8, the frame shown then (by presentation timestamp); indexing as if the
  average rate were constant takes other frames (frame 6 at 0.5 s instead of frame 12).
- Rotation: a frame with a bright block in one corner, written with a display matrix (PyAV's
  ``set_display_rotation``; what phones write) of 90, 180 and 270 degrees. The decoded clip must be
  the unrotated file's clip turned the same way (the bitstreams are identical; only the matrix differs).
  decord 0.6.0 turns the frames itself but then scales them to the size it is asked for, so a 90/270
  degree video asked for at its coded size came out squeezed: the displayed size must be asked for.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from evatok import video

SIZE = 32
VFR_TIMES = [k / 24 for k in range(24)] + [1 + k / 8 for k in range(24)]


def level(k: int) -> int:
    return 10 + 4 * k


def write_vfr(path: Path) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.time_base = s.codec_context.time_base = Fraction(1, 1200)
        s.options = {"crf": "10"}
        for k, t in enumerate(VFR_TIMES):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), level(k), np.uint8), format="rgb24")
            f.pts, f.time_base = int(round(t * 1200)), Fraction(1, 1200)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_rotated(path: Path, degrees: int) -> Path:
    import av

    frames = np.full((20, 48, 64, 3), 40, np.uint8)
    frames[:, 8:24, 8:24] = 230  # a bright block towards the top left: every rotation looks different
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=12)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        if degrees:
            s.set_display_rotation(degrees)
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def source_frame(decoded: np.ndarray) -> np.ndarray:
    """Which source frame each decoded frame is, from its grey level."""
    return np.rint((decoded.reshape(*decoded.shape[:-3], -1).mean(-1) - 10) / 4).astype(int)


def test_vfr_frames_are_sampled_by_presentation_time(tmp_path):
    p = write_vfr(tmp_path / "vfr.mp4")
    info = video.probe(p)
    assert info.num_frames == 48 and abs(info.fps - 12.8) < 0.1  # the container's average rate
    windows, clips = video.decode_clips(p, clip_len=8, fps=8, size=SIZE)
    times = np.asarray(VFR_TIMES)
    want = [[int(np.searchsorted(times, j / 8 + 1e-9, side="right") - 1) for j in range(8 * w, 8 * w + 8)]
            for w in range(len(windows))]
    assert len(windows) == 4  # frames start up to 3.875 s: 32 sampled at 8 fps, 4 clips of 8
    assert [list(w.frame_indices) for w in windows] == want
    assert source_frame(clips).tolist() == want  # the pixels are those frames
    assert [w.start_s for w in windows] == [0.0, 1.0, 2.0, 3.0]
    assert want[0][4] == 12  # at 0.5 s: frame 12 (constant-rate indexing at 12.8 fps would take frame 6)

    # Native rate (every frame): a window's start is its first frame's timestamp, not index / average fps.
    windows, clips = video.decode_clips(p, clip_len=16, size=SIZE)
    assert [w.start_s for w in windows] == pytest.approx([0.0, 16 / 24, 1 + 8 / 8])
    assert source_frame(clips).tolist() == [list(range(16 * w, 16 * w + 16)) for w in range(3)]
    one = video.decode_clip(p, start_s=2.0, clip_len=4, size=SIZE)
    assert source_frame(one).tolist() == [32, 33, 34, 35]  # frame 32 starts at 2.0 s


def test_constant_rate_files_index_exactly_as_before():
    t = np.arange(72) / 12.0
    assert video.frame_times(t, 12.0) is None  # constant rate: indexing by rate
    assert video.frame_times(t + 0.5, 12.0) is None  # a start offset alone is not VFR
    assert video.frame_times(np.r_[t[:10], t[11:]], 12.0) is not None  # a dropped frame is


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_metadata_is_honoured(tmp_path, degrees):
    plain = write_rotated(tmp_path / "plain.mp4", 0)
    turned = write_rotated(tmp_path / f"rot{degrees}.mp4", degrees)
    assert video.probe(plain).rotation == 0 and video.probe(turned).rotation == degrees
    _, want = video.decode_clips(plain, clip_len=8, size=SIZE)
    _, got = video.decode_clips(turned, clip_len=8, size=SIZE)
    assert got.shape == want.shape
    err = [np.abs(got.astype(int) - np.rot90(want, k=k, axes=(2, 3))).mean() for k in range(4)]
    # Turned the way the matrix says (counter-clockwise) and not squeezed: only the centre crop's odd
    # pixel (a 64x48 frame is 43x32 before the crop) differs; any other orientation is far off.
    assert err[degrees // 90] < 6 and all(e > 30 for k, e in enumerate(err) if k != degrees // 90), err
    if degrees == 90:  # as displayed: the block that was top left is bottom left
        q = SIZE // 2
        assert got[0, 0, q:, :q].mean() > got[0, 0, :q, :q].mean() + 20


def test_ingest_keeps_vfr_times_and_rotation(tmp_path):
    """Through the ingest shard function (decode isolated in the child, as the stage runs)."""
    from workflows import storage
    from workflows.clips import frames_from_table
    from workflows.config import load_config
    from workflows.ingest import discover, process_shard

    src = tmp_path / "src"
    src.mkdir()
    write_vfr(src / "a-vfr.mp4")
    write_rotated(src / "b-rot.mp4", 90)
    cfg = load_config(None, ["data.fps=8", "data.size=32", "data.clip_len=8"])
    process_shard(0, discover(str(src)), str(tmp_path / "out"), cfg.data)
    t = storage.read_table(str(tmp_path / "out" / "clips"))
    rows = t.to_pylist()
    vfr = [k for k, r in enumerate(rows) if r["source_uri"].endswith("a-vfr.mp4")]
    rot = [k for k, r in enumerate(rows) if r["source_uri"].endswith("b-rot.mp4")]
    assert [rows[k]["start_s"] for k in vfr] == [0.0, 1.0, 2.0, 3.0]
    frames = frames_from_table(t)
    assert source_frame(frames[vfr[0]])[4] == 12
    _, want = video.decode_clips(src / "b-rot.mp4", clip_len=8, fps=8, size=32)
    assert np.array_equal(frames[rot], want) and video.probe(src / "b-rot.mp4").rotation == 90
    q = 16
    assert frames[rot][0, 0, q:, :q].mean() > frames[rot][0, 0, :q, :q].mean() + 20
