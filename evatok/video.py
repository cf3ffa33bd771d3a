"""Video I/O: decode fixed-length clips from a video file, bytes or binary file object.

Pipeline for one video: ``probe`` (PyAV: validates, classifies bad inputs, reads size/fps/length),
``clip_windows`` (which frames each clip takes), then one decord reader that scales inside the
decoder to the short-side-resized size and returns every window in one increasing pass
(``decode_clips``); a centre crop makes the frames square.

Why this shape (measured; docs/ARCHITECTURE.md, "Decoding"): decord's in-decoder scaling (``width``/``height``
with ``num_threads=1``) reaches ~90% of the decode ceiling while resizing after decode reaches
35-70%, and a window costs every frame from the preceding keyframe, so all windows of a video are
read by one reader in increasing order.

Bad inputs. decord, on bytes it cannot open, prints the *entire input buffer* to stderr before
raising a bare RuntimeError. We choose to validate with PyAV first: PyAV raises typed exceptions,
prints nothing, and tells a missing video stream from undecodable data. An mp4-family box walk
tells a truncated file (a box running past the end, or no ``moov``) from a corrupt one. decord is
opened only on input PyAV accepted, and even then fd 2 is redirected around decord's open and
reads (decord bundles FFmpeg 4, PyAV FFmpeg 8: they can disagree), keeping only a short excerpt
of what decord printed for the error message.

Time and orientation. Frames are sampled by time: a variable-frame-rate video (presentation
timestamps that are not evenly spaced; decord's ``get_frame_timestamp``) is sampled by timestamp, the
frame shown at each sampled time, and ``start_s`` is that time; a constant-rate one by index, exactly
as before (``frame_times``). Display rotation (the display matrix: ``VideoInfo.rotation``, read by
PyAV) is honoured: decord 0.6.0 turns the frames itself but scales them to the size it is asked for,
so it is asked for the displayed frame's size (width and height swapped at 90 and 270 degrees). Frame sizes are bounded before the decoder opens
(``check_frame_size``: ``MAX_PIXELS`` per source or resized frame, ``MAX_ASPECT``), so a very large,
very tall or very wide video is a ``TooLargeError`` instead of an unbounded allocation.
"""
from __future__ import annotations

import io
import math
import os
import struct
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Union

import numpy as np
import torch

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


# ----------------------------------------------------------------------------- errors
class VideoError(Exception):
    """A video that cannot be turned into clips. ``reason`` is a short snake_case code."""
    reason = "video_error"

    def __init__(self, message: str, source: str | None = None):
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class EmptyFileError(VideoError):
    reason = "empty_file"


class NotAVideoError(VideoError):
    reason = "not_a_video"


class CorruptVideoError(VideoError):
    reason = "corrupt"


class TruncatedVideoError(VideoError):
    reason = "truncated"


class NoVideoStreamError(VideoError):
    reason = "no_video_stream"


class TooShortError(VideoError):
    reason = "too_short"


class TooLargeError(VideoError):
    """Frames too large (or too elongated) to decode within bounded memory; refused before decoding."""
    reason = "too_large"


# Decoding allocates whole frames: FFmpeg the source frame (plus references), decord the resized one
# (short side -> ``size``, so the long side grows with the aspect ratio) for every wanted frame.
# Both are bounded before anything is decoded. 8192 x 4352 admits DCI 8K (8192 x 4320); 16:1 is far
# beyond any real video shape (ultra-wide 32:9 is 3.6:1) and caps a 64-pixel clip's frame at 64 x 1024.
MAX_PIXELS = 8192 * 4352
MAX_ASPECT = 16.0


# ----------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float            # native average frame rate
    num_frames: int
    duration_s: float
    codec: str
    source: str = ""
    rotation: int = 0     # display rotation, degrees counter-clockwise (0/90/180/270), from the display matrix;
                          # width/height are the coded frame's (swapped on screen at 90/270)


@dataclass(frozen=True)
class ClipWindow:
    index: int                      # position of the window in the video (0, 1, ...)
    start_s: float                  # time of the first sampled frame
    frame_indices: tuple[int, ...]  # native frame indices, clip_len of them (may repeat if fps > native)


# ----------------------------------------------------------------------------- sources
def _describe(src: Source) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    return getattr(src, "name", None) or f"<{type(src).__name__}>"


def _load(src: Source) -> tuple[str | None, bytes | None, int]:
    """(path, data, size): a path stays on disk (decord reads it itself); anything else becomes bytes."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        return path, None, os.path.getsize(path)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif hasattr(src, "read"):
        data = src.read()
    else:
        raise TypeError(f"video source must be a path, bytes or a binary file object, got {type(src).__name__}")
    return None, data, len(data)


def _head_and_boxes(path: str | None, data: bytes | None, size: int) -> tuple[bytes, list[tuple[bytes, int, int]]]:
    """First bytes and the mp4-family top-level boxes (type, offset, size) if it looks like one."""
    f = open(path, "rb") if path else io.BytesIO(data)
    try:
        head = f.read(64)
        boxes: list[tuple[bytes, int, int]] = []
        if len(head) >= 8 and head[4:8] in _MP4_FIRST_BOXES:
            off = 0
            while off + 8 <= size and len(boxes) < 10_000:
                f.seek(off)
                hdr = f.read(16)
                n, kind = struct.unpack(">I4s", hdr[:8])
                if n == 1 and len(hdr) >= 16:
                    n = struct.unpack(">Q", hdr[8:16])[0]
                elif n == 0:          # box extends to end of file
                    n = size - off
                if n < 8:
                    boxes.append((b"bad!", off, n))
                    break
                boxes.append((kind, off, n))
                off += n
        return head, boxes
    finally:
        f.close()


_MP4_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot", b"uuid"}
# Magic numbers of containers that carry video: a failure to parse these is "corrupt", not "not a video".
_VIDEO_MAGIC = [b"\x1a\x45\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"]


def _mp4_corruption(boxes: list[tuple[bytes, int, int]]) -> str | None:
    """A top-level box whose header is garbage (size < 8, or a type that is not 4 ASCII letters/digits)."""
    for kind, off, n in boxes:
        if kind == b"bad!" or not kind.replace(b" ", b"a").isalnum():  # real box types: 4 letters/digits
            return f"invalid box header at byte {off} (type {kind!r}, size {n})"
    return None


def _mp4_problem(size: int, boxes: list[tuple[bytes, int, int]]) -> str | None:
    """Why an mp4-family file is truncated, or None if its box structure is complete."""
    if not boxes:
        return None
    for kind, off, n in boxes:
        if off + n > size:
            return f"'{kind.decode('latin-1')}' box at byte {off} needs {n} bytes, only {size - off} present"
    if not any(k == b"moov" for k, _, _ in boxes):
        return "no 'moov' index box (file cut short or never finalised)"
    return None


# ----------------------------------------------------------------------------- probe
def probe(src: Source) -> VideoInfo:
    """Validate ``src`` and read its video stream's size, frame rate and length (no frames decoded).

    Raises the ``VideoError`` subclass that says what is wrong.
    """
    path, data, size = _load(src)
    return _probe(path, data, size, _describe(src))


def _probe(path: str | None, data: bytes | None, size: int, name: str) -> VideoInfo:
    import av

    if size == 0:
        raise EmptyFileError("file is empty (0 bytes)", name)
    head, boxes = _head_and_boxes(path, data, size)
    bad = _mp4_corruption(boxes)
    if bad:
        raise CorruptVideoError(f"corrupt mp4: {bad}", name)
    problem = _mp4_problem(size, boxes)
    if problem:
        raise TruncatedVideoError(f"truncated mp4: {problem}", name)
    looks_video = bool(boxes) or any(head.startswith(m) for m in _VIDEO_MAGIC) or (
        head[:4] == b"RIFF" and head[8:12] == b"AVI ") or (len(head) > 0 and head[0] == 0x47 and size >= 189)
    try:
        container = av.open(path if path else io.BytesIO(data), mode="r")
    except av.FFmpegError as e:
        if looks_video:
            raise CorruptVideoError(f"container cannot be parsed ({e.__class__.__name__}: {e})", name) from None
        raise NotAVideoError(f"not a recognised video container ({e.__class__.__name__}: {e})", name) from None
    with container:
        streams = list(container.streams.video)
        if not streams:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise NoVideoStreamError(f"no video stream (streams: {', '.join(kinds)})", name)
        s = streams[0]
        cc = s.codec_context
        if cc is None:  # a damaged stream header: FFmpeg found no codec for it
            raise CorruptVideoError("video stream has no usable codec (damaged stream header)", name)
        width, height = int(cc.width or 0), int(cc.height or 0)
        rate = s.average_rate or s.guessed_rate or s.base_rate
        fps = float(rate) if rate else 0.0
        if width <= 0 or height <= 0 or fps <= 0:
            raise CorruptVideoError(f"video stream has no usable size/frame rate ({width}x{height} @ {fps})", name)
        duration = float(s.duration * s.time_base) if s.duration and s.time_base else (
            container.duration / 1e6 if container.duration else 0.0)
        frames = int(s.frames) if s.frames else int(round(duration * fps))
        if frames <= 0:
            raise CorruptVideoError("video stream has no frames", name)
        return VideoInfo(width, height, fps, frames, duration or frames / fps, cc.name or "", name,
                         _rotation(container, s))


def _rotation(container, stream) -> int:
    """The display rotation (degrees counter-clockwise, a multiple of 90) of the first frame: its display
    matrix (``VideoFrame.rotation``), which is where FFmpeg puts the container's matrix (mp4 ``tkhd``,
    the old ``rotate`` tag). 0 if the first frame cannot
    be decoded (decord then decides whether the video is usable) or the angle is not a right angle.
    decord applies the rotation itself; ``_decode`` asks it for the displayed frame's size."""
    import av

    try:
        for frame in container.decode(stream):
            angle = float(frame.rotation or 0.0)
            k = round(angle / 90.0)
            return int(k % 4) * 90 if abs(angle - 90.0 * k) < 1.0 else 0
    except (av.FFmpegError, ValueError, OverflowError, AttributeError):
        pass
    return 0


# ----------------------------------------------------------------------------- windows
# Sampling is by time. A constant-rate video's frame i is shown at i / fps; a variable-frame-rate one's
# at its presentation timestamp (``times``: start of every frame in seconds from the first, increasing,
# from ``frame_times``). Sampled frame k (time k / fps) takes the frame shown at that time: the last one
# that starts at or before it.
def _sampled_index(k: np.ndarray, native_fps: float, fps: float | None, times: np.ndarray | None = None) -> np.ndarray:
    """Native frame shown at sampled frame k (time k / fps). 1e-6 guards float round-off at exact ratios."""
    if fps is None:
        return k.astype(np.int64)
    if times is not None:
        return np.maximum(np.searchsorted(times, k / fps + 1e-6, side="right") - 1, 0).astype(np.int64)
    return np.floor(k * (native_fps / fps) + 1e-6).astype(np.int64)


def _num_sampled(info: VideoInfo, fps: float | None, times: np.ndarray | None = None) -> int:
    if fps is None:
        return info.num_frames
    if times is not None:
        return int(math.floor(times[-1] * fps + 1e-6)) + 1
    return int(math.floor((info.num_frames - 1) * fps / info.fps + 1e-6)) + 1


def frame_times(timestamps, fps: float) -> np.ndarray | None:
    """Start times (s from the first frame) of a variable-frame-rate video's frames, from their
    presentation timestamps; None when the video is constant-rate (every gap within 1% of 1 / fps:
    indexing by rate is then exact) or the timestamps are unusable (not finite, not increasing)."""
    t = np.asarray(timestamps, np.float64).reshape(-1)
    if len(t) < 2 or not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
        return None
    t = t - t[0]
    if fps > 0 and np.max(np.abs(t - np.arange(len(t)) / fps)) <= 0.01 / fps:
        return None
    return t


def clip_windows(info: VideoInfo, clip_len: int = 16, fps: float | None = None,
                 stride: float | None = None, times: np.ndarray | None = None) -> list[ClipWindow]:
    """Every clip window of the video, in increasing order.

    ``fps``: sample frames at this rate (None = native: every frame). ``stride``: seconds between
    window starts (None = back-to-back windows). ``times``: a variable-frame-rate video's frame start
    times (``frame_times``); frames are then sampled by timestamp and ``start_s`` is a real time.
    Raises ``TooShortError`` if not even one window fits.
    """
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if times is not None and len(times) != info.num_frames:
        raise ValueError(f"{len(times)} frame times for {info.num_frames} frames")
    rate = fps if fps is not None else info.fps
    n = _num_sampled(info, fps, times)
    if n < clip_len:
        raise TooShortError(
            f"{info.num_frames} frames at {info.fps:g} fps give {n} frames at {rate:g} fps, "
            f"fewer than one clip of {clip_len}", info.source or None)
    step = clip_len if stride is None else max(1, int(round(stride * rate)))
    starts = range(0, n - clip_len + 1, step)
    offsets = np.arange(clip_len)
    start = (lambda k0: float(times[k0])) if times is not None and fps is None else (lambda k0: k0 / rate)
    return [ClipWindow(i, start(k0), tuple(_sampled_index(k0 + offsets, info.fps, fps, times).tolist()))
            for i, k0 in enumerate(starts)]


# ----------------------------------------------------------------------------- decoding
_STDERR_LOCK = threading.Lock()


@contextmanager
def _quiet_stderr(captured: list[str]):
    """Redirect fd 2 (where decord/FFmpeg's C code writes) to a temp file; keep a short excerpt."""
    with _STDERR_LOCK, tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read(400).decode("utf-8", "replace"))


def scaled_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after resizing the short side to ``size`` (aspect kept, rounded)."""
    if width <= height:
        return size, max(size, int(round(height * size / width)))
    return max(size, int(round(width * size / height))), size


def check_frame_size(info: VideoInfo, size: int, max_pixels: int = MAX_PIXELS,
                     max_aspect: float = MAX_ASPECT) -> None:
    """Raise ``TooLargeError`` if decoding ``info``'s frames at ``size`` would allocate more than
    ``max_pixels`` per frame (the source frame or the resized one), or the aspect ratio exceeds
    ``max_aspect`` (a very tall or very wide video, whose resized long side grows without bound)."""
    w, h = info.width, info.height
    if w * h > max_pixels:
        raise TooLargeError(f"frame {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}", info.source or None)
    if max(w, h) > max_aspect * min(w, h):
        raise TooLargeError(f"frame {w}x{h} has aspect ratio {max(w, h) / min(w, h):.1f}:1, above the limit of "
                            f"{max_aspect:g}:1", info.source or None)
    sw, sh = scaled_size(w, h, size)
    if sw * sh > max_pixels:
        raise TooLargeError(f"frame {w}x{h} resized to {sw}x{sh} exceeds the limit of {max_pixels} pixels",
                            info.source or None)


def decode_clips(src: Source, clip_len: int = 16, fps: float | None = None, size: int = 64,
                 stride: float | None = None, max_clips: int | None = None, max_pixels: int = MAX_PIXELS,
                 max_aspect: float = MAX_ASPECT) -> tuple[list[ClipWindow], np.ndarray]:
    """All clip windows of a video, decoded by one reader in one pass: uint8 ``[N, T, size, size, 3]``.

    Frames larger than ``max_pixels`` or more elongated than ``max_aspect`` raise ``TooLargeError``
    before the decoder is opened (``check_frame_size``)."""
    path, data, nbytes = _load(src)
    name = _describe(src)
    info = _probe(path, data, nbytes, name)
    check_frame_size(info, size, max_pixels, max_aspect)
    return _decode(path, data, info, name, clip_len, fps, size, stride, max_clips, start_s=None)


def decode_clip(src: Source, start_s: float = 0.0, clip_len: int = 16, fps: float | None = None,
                size: int = 64, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> np.ndarray:
    """One clip starting at ``start_s`` seconds: uint8 ``[T, size, size, 3]`` (size limits as ``decode_clips``)."""
    path, data, nbytes = _load(src)
    name = _describe(src)
    info = _probe(path, data, nbytes, name)
    check_frame_size(info, size, max_pixels, max_aspect)
    _, clips = _decode(path, data, info, name, clip_len, fps, size, None, 1, start_s=start_s)
    return clips[0]


def _decode(path, data, info: VideoInfo, name: str, clip_len: int, fps: float | None, size: int,
            stride: float | None, max_clips: int | None, start_s: float | None):
    import decord

    # decord (0.6.0, its FFmpeg 4) applies the display rotation itself and then scales to the size it
    # is asked for: ask for the displayed frame's size (width and height swapped at 90/270 degrees).
    upright = info.rotation in (90, 270)
    w, h = scaled_size(info.height, info.width, size) if upright else scaled_size(info.width, info.height, size)
    msgs: list[str] = []
    try:
        with _quiet_stderr(msgs):
            vr = decord.VideoReader(path if path else io.BytesIO(data), ctx=decord.cpu(0),
                                    width=w, height=h, num_threads=1)
    except (RuntimeError, decord.DECORDError) as e:
        raise CorruptVideoError(f"decoder cannot open the video: {str(e)[:200]} {msgs[0][:200]}", name) from None
    # decord's own frame count is what it can actually deliver; trust it over the container header.
    info = VideoInfo(info.width, info.height, info.fps, len(vr), info.duration_s, info.codec, name, info.rotation)
    times = None
    if len(vr) > 1:
        try:
            with _quiet_stderr(msgs):
                times = frame_times(vr.get_frame_timestamp(np.arange(len(vr)))[:, 0], info.fps)
        except (RuntimeError, decord.DECORDError, IndexError, ValueError):
            times = None  # no usable timestamps: index by rate
    if start_s is None:
        windows = clip_windows(info, clip_len, fps, stride, times)
    else:
        windows = _window_at(info, start_s, clip_len, fps, times)
    if max_clips is not None:
        windows = windows[:max_clips]
    wanted = np.unique(np.concatenate([np.asarray(wd.frame_indices) for wd in windows]))
    y0, x0 = (h - size) // 2, (w - size) // 2
    try:
        with _quiet_stderr(msgs):
            frames = vr.get_batch(wanted.tolist()).asnumpy()  # sorted: one forward pass, seeks only ahead
    except (RuntimeError, decord.DECORDError) as e:
        raise CorruptVideoError(f"frames cannot be decoded: {str(e)[:200]} {msgs[-1][:200]}", name) from None
    if frames.shape[1:3] != (h, w):
        raise CorruptVideoError(f"decoder returned {frames.shape[1:3]}, expected {(h, w)}", name)
    frames = frames[:, y0:y0 + size, x0:x0 + size]
    pos = np.searchsorted(wanted, np.asarray([wd.frame_indices for wd in windows]))
    return windows, np.ascontiguousarray(frames[pos])


def _window_at(info: VideoInfo, start_s: float, clip_len: int, fps: float | None,
               times: np.ndarray | None = None) -> list[ClipWindow]:
    rate = fps if fps is not None else info.fps
    end = info.num_frames / info.fps if times is None else float(times[-1]) + 1e-6
    if start_s < 0 or start_s >= end:
        raise ValueError(f"start_s={start_s} is outside the video (0 .. {end:.3f} s)")
    if times is not None and fps is None:
        k0 = int(np.searchsorted(times, start_s - 1e-6))
    else:
        k0 = int(round(start_s * rate))
    n = _num_sampled(info, fps, times)
    if k0 + clip_len > n:
        raise TooShortError(f"a clip of {clip_len} frames at {rate:g} fps from {start_s} s runs past the end "
                            f"({n} frames at that rate)", info.source or None)
    first = float(times[k0]) if times is not None and fps is None else k0 / rate
    return [ClipWindow(0, first, tuple(_sampled_index(k0 + np.arange(clip_len), info.fps, fps, times).tolist()))]


# ----------------------------------------------------------------------------- tensors
def to_tensor(frames) -> torch.Tensor:
    """uint8 ``[..., T, H, W, 3]`` (numpy or torch) -> float32 ``[..., 3, T, H, W]`` in [-0.5, 0.5]."""
    t = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if t.dtype != torch.uint8:
        raise TypeError(f"to_tensor expects uint8 frames, got {t.dtype}")
    return t.movedim(-1, -4).float().div_(255.0).sub_(0.5)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """float ``[..., 3, T, H, W]`` in [-0.5, 0.5] -> uint8 numpy ``[..., T, H, W, 3]`` (clamped, rounded)."""
    v = video.detach().float().add(0.5).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return v.movedim(-4, -1).contiguous().cpu().numpy()
