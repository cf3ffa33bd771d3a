"""Video I/O on real h264 mp4 files written by the synthetic generator, and on real bad inputs."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evatok import synthetic, video
from evatok.video import (
    CorruptVideoError, EmptyFileError, NotAVideoError, NoVideoStreamError, TooShortError,
    TruncatedVideoError, VideoError,
)

T, H, W, FPS = 72, 80, 96, 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vid")
    # frame i is flat grey 20 + 3 i: its mean tells which native frame was decoded
    ramp = np.broadcast_to((20 + 3 * np.arange(T, dtype=np.uint8))[:, None, None, None], (T, H, W, 3)).copy()
    # smooth but position-dependent content: a wrong resize or crop offset shows up
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.stack([127 + 100 * np.sin(xx / 7.0), 127 + 100 * np.cos(yy / 9.0), 2.5 * xx], -1)
    spatial = np.broadcast_to(np.clip(img, 0, 255).astype(np.uint8), (20, H, W, 3)).copy()
    out = {
        "ramp": synthetic.write_mp4(d / "ramp.mp4", ramp, FPS, crf=0),
        "spatial": synthetic.write_mp4(d / "spatial.mp4", spatial, FPS, crf=0),
        "pan": synthetic.write_mp4(d / "pan.mp4", synthetic.make_video("fast_pan", seed=1), FPS),
        "short": synthetic.write_mp4(d / "short.mp4", synthetic.make_video("one_object", 0, num_frames=10), FPS),
    }
    return out, spatial


def test_probe_reads_stream_info(files):
    info = video.probe(files[0]["pan"])
    assert (info.width, info.height, info.num_frames, info.codec) == (W, H, T, "h264")
    assert info.fps == pytest.approx(FPS) and info.duration_s == pytest.approx(T / FPS)


@pytest.mark.parametrize("fps,stride,expected", [(None, None, 4), (8, None, 3), (8, 0.5, 9), (24, None, 8)])
def test_clip_windows_count_and_indices(files, fps, stride, expected):
    info = video.probe(files[0]["pan"])
    wins = video.clip_windows(info, 16, fps=fps, stride=stride)
    assert len(wins) == expected
    for w in wins:
        assert len(w.frame_indices) == 16 and max(w.frame_indices) < T
        assert list(w.frame_indices) == sorted(w.frame_indices)
    assert [w.start_s for w in wins] == sorted(w.start_s for w in wins)


def test_fps_sampling_picks_the_right_native_frames(files):
    wins, clips = video.decode_clips(files[0]["ramp"], clip_len=16, fps=8, size=64)
    assert clips.shape == (3, 16, 64, 64, 3) and clips.dtype == np.uint8
    # 12 -> 8 fps: sampled frame k shows native frame floor(1.5 k)
    expected = np.floor(1.5 * np.arange(48)).astype(int).reshape(3, 16)
    assert np.array_equal(np.array([w.frame_indices for w in wins]), expected)
    grey = clips.reshape(3, 16, -1).mean(-1)
    assert np.abs(grey - (20 + 3 * expected)).max() < 2.0
    # above the native rate frames repeat (12 -> 24 fps: floor(k / 2))
    wins, clips = video.decode_clips(files[0]["ramp"], clip_len=16, fps=24, size=64, max_clips=2)
    expected = (np.arange(32) // 2).reshape(2, 16)
    assert np.array_equal(np.array([w.frame_indices for w in wins]), expected)
    assert np.abs(clips.reshape(2, 16, -1).mean(-1) - (20 + 3 * expected)).max() < 2.0
    # native rate: every frame, back to back
    wins, clips = video.decode_clips(files[0]["ramp"], clip_len=16, fps=None, size=64)
    assert clips.shape[0] == 4
    assert np.abs(clips.reshape(4, 16, -1).mean(-1) - (20 + 3 * np.arange(64).reshape(4, 16))).max() < 2.0


def test_short_side_resize_and_centre_crop(files):
    paths, spatial = files
    clip = video.decode_clip(paths["spatial"], start_s=0.0, clip_len=16, size=64)
    assert clip.shape == (16, 64, 64, 3)
    # reference: resize 80x96 -> 64x77 (short side 64), take the centre 64 columns
    ref = F.interpolate(torch.from_numpy(spatial[:1]).permute(0, 3, 1, 2).float(), size=(64, 77),
                        mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    err = lambda x0: np.abs(clip[0].astype(np.float32) - ref[:, x0:x0 + 64]).mean()  # noqa: E731
    centre = err((77 - 64) // 2)
    assert centre < 2.0
    assert min(err(5), err(7)) > 2 * centre  # even a crop one pixel off is clearly worse


def test_paper_preset_size_and_window_stride(files):
    wins, clips = video.decode_clips(files[0]["pan"], fps=8, size=128, stride=0.5, max_clips=5)
    assert clips.shape == (5, 16, 128, 128, 3)
    assert [w.start_s for w in wins] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_sources_path_bytes_fileobj_agree_and_decode_clip_matches_window(files):
    p = files[0]["pan"]
    _, a = video.decode_clips(p, fps=8)
    _, b = video.decode_clips(p.read_bytes(), fps=8)
    with open(p, "rb") as f:
        _, c = video.decode_clips(f, fps=8)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    one = video.decode_clip(io.BytesIO(p.read_bytes()), start_s=2.0, fps=8)  # window 1 starts at 16 / 8 fps
    assert np.array_equal(one, a[1])
    assert a[0].std() > 10  # real content, not a blank frame


def test_decode_clip_past_the_end(files):
    with pytest.raises(TooShortError):
        video.decode_clip(files[0]["pan"], start_s=5.0, fps=8)
    with pytest.raises(ValueError):
        video.decode_clip(files[0]["pan"], start_s=60.0)


def test_to_tensor_and_back():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(2, 16, 8, 10, 3), dtype=np.uint8)
    x = video.to_tensor(frames)
    assert x.shape == (2, 3, 16, 8, 10) and x.dtype == torch.float32
    assert x.min() >= -0.5 and x.max() <= 0.5
    assert torch.allclose(x[1, 2, 5], torch.from_numpy(frames[1, 5, :, :, 2]).float() / 255 - 0.5)
    assert np.array_equal(video.to_uint8(x), frames)
    assert np.array_equal(video.to_uint8(torch.full((3, 1, 2, 2), 0.9)), np.full((1, 2, 2, 3), 255, np.uint8))
    with pytest.raises(TypeError):
        video.to_tensor(frames.astype(np.float32))


# ----------------------------------------------------------------------------- bad inputs
MARKER = b"EVATOK-PAYLOAD-MARKER-"


def _audio_only(path, codec):
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=16000)
        s.layout = "mono"
        fmt = "fltp" if codec == "aac" else "s16"
        for i in range(12):
            a = (0.3 * np.sin(np.arange(1152) / 5.0))[None].astype(np.float32)
            if fmt == "s16":
                a = (a * 20000).astype(np.int16)
            fr = av.AudioFrame.from_ndarray(a, format=fmt, layout="mono")
            fr.sample_rate, fr.pts = 16000, i * 1152
            c.mux(s.encode(fr))
        c.mux(s.encode())
    return path


@pytest.fixture(scope="module")
def bad_inputs(files, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = files[0]["pan"].read_bytes()
    rng = np.random.default_rng(0)
    raw = {
        "zero_bytes": (b"", EmptyFileError),
        "random_bytes": (MARKER * 50 + rng.bytes(20000), NotAVideoError),
        "text_file": (b"just some text, definitely not a video\n" * 100, NotAVideoError),
        "truncated_mp4": (good[: len(good) // 2], TruncatedVideoError),
        "truncated_tail": (good[:-7], TruncatedVideoError),
        "garbage_after_header": (good[:40] + MARKER * 400, CorruptVideoError),
        "zeroed_frames": (good[:3000] + bytes(2000) + good[5000:], CorruptVideoError),
        "too_short": (files[0]["short"].read_bytes(), TooShortError),
    }
    out = {k: (d / f"{k}.bin", err) for k, (b, err) in raw.items()}
    for k, (b, _) in raw.items():
        out[k][0].write_bytes(b)
    out["audio_only_aac_m4a"] = (_audio_only(d / "a.m4a", "aac"), NoVideoStreamError)
    out["audio_only_mp2_mp4"] = (_audio_only(d / "a.mp4", "mp2"), NoVideoStreamError)
    return out


CASES = ["zero_bytes", "random_bytes", "text_file", "truncated_mp4", "truncated_tail", "garbage_after_header",
         "zeroed_frames", "too_short", "audio_only_aac_m4a", "audio_only_mp2_mp4"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("as_bytes", [False, True])
def test_bad_input_raises_its_typed_error_quietly(bad_inputs, case, as_bytes, capfd):
    path, err = bad_inputs[case]
    src = path.read_bytes() if as_bytes else path
    with pytest.raises(err) as info:
        video.decode_clips(src, fps=8)
    e = info.value
    assert isinstance(e, VideoError) and e.reason == err.reason and len(str(e)) < 1000
    out, errtext = capfd.readouterr()
    assert MARKER.decode() not in out + errtext and len(errtext) < 200, errtext[:300]
    # the error is also raised by probe() alone for everything but a decode-time failure
    if case not in ("zeroed_frames", "too_short"):
        with pytest.raises(err):
            video.probe(src)


def test_reasons_are_distinct_codes():
    codes = [c.reason for c in (EmptyFileError, NotAVideoError, CorruptVideoError, TruncatedVideoError,
                                NoVideoStreamError, TooShortError)]
    assert codes == ["empty_file", "not_a_video", "corrupt", "truncated", "no_video_stream", "too_short"]


def test_stderr_guard_silences_decords_buffer_dump(capfd):
    """decord itself prints the whole buffer on undecodable bytes; the guard keeps fd 2 clean."""
    import decord

    msgs: list[str] = []
    with pytest.raises(Exception):
        with video._quiet_stderr(msgs):
            decord.VideoReader(io.BytesIO(MARKER * 100), ctx=decord.cpu(0))
    _, err = capfd.readouterr()
    assert MARKER.decode() not in err
    assert msgs and len(msgs[0]) <= 400  # only a short excerpt is kept


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        video.decode_clips(tmp_path / "nope.mp4")


def test_too_large_or_too_elongated_frames_are_refused_before_decoding(tmp_path, files):
    """``TooLargeError`` (reason ``too_large``) from the probed size alone: a 16x512 (1:32) video, and any
    video above ``max_pixels``; the same files decode when the limits allow them."""
    tall = synthetic.write_mp4(tmp_path / "tall.mp4", synthetic.make_video("static", 0, num_frames=24,
                                                                          height=512, width=16), 8)
    with pytest.raises(video.TooLargeError, match="aspect ratio 32.0:1") as ei:
        video.decode_clips(tall, clip_len=16, size=32)
    assert ei.value.reason == "too_large"
    assert video.decode_clips(tall, clip_len=16, size=32, max_aspect=64)[1].shape == (1, 16, 32, 32, 3)
    pan = files[0]["pan"]  # 96x80
    with pytest.raises(video.TooLargeError, match="exceeds the limit of 5000"):
        video.decode_clip(pan, clip_len=16, size=32, max_pixels=5000)
    with pytest.raises(video.TooLargeError, match="resized to 154x128"):  # the resized frame counts too
        video.decode_clips(pan, clip_len=16, size=128, max_pixels=96 * 80)
    assert video.decode_clip(pan, clip_len=16, size=32).shape == (16, 32, 32, 3)
