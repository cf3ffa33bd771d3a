"""Class-labeled synthetic videos with controlled complexity per 4-frame block.

Each class has its own motion signature (static, a slow pan over a fine grainy texture, a fast pan
over a smooth scene, one or many moving objects, scene cuts, flicker, bursts of motion), and a per-video seed draws
per-block speed/activity multipliers, so how many tokens a block deserves differs between videos
and between the blocks of one clip. Everything is vectorised numpy over all frames at once.

    frames = make_video("fast_pan", seed=3)          # uint8 [T, H, W, 3]
    write_mp4("x.mp4", frames, fps=12)              # real h264 (PyAV, libx264, yuv420p)
    write_dataset("/tmp/vids", n=64)                # 64 mp4 + manifest.csv (uri,label)
    python -m evatok.synthetic /tmp/vids --n 64

Defaults: 96x80 (non-square, so short-side resize + centre crop are exercised), 72 frames at
12 fps = 6 s: 4 native-rate clips of 16, or 3 at 8 fps (a 1.5 frame-index step, so fps sampling
is exercised too).
"""
from __future__ import annotations

import argparse
import csv
from fractions import Fraction
from pathlib import Path

import numpy as np

CLASSES = (  # 8, so write_dataset(n=8) gives one video of each
    "static", "slow_pan", "fast_pan", "one_object",
    "many_objects", "scene_cuts", "flicker", "bursts",
)
DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH, DEFAULT_FPS = 72, 80, 96, 12
BLOCK = 4  # frames per temporal block (the tokenizer's block)


# ----------------------------------------------------------------------------- building blocks
def _background(rng, hb: int, wb: int, fine: bool = False) -> np.ndarray:
    """A periodic (tileable) colour field [hb, wb, 3] in 0..255: integer frequencies so pans wrap seamlessly."""
    y = np.arange(hb, dtype=np.float32)[:, None, None] / hb
    x = np.arange(wb, dtype=np.float32)[None, :, None] / wb
    lo, hi = (12, 40) if fine else (1, 5)
    k = 10 if fine else 6
    fy = rng.integers(-hi, hi + 1, size=k)
    fx = rng.integers(lo, hi + 1, size=k)
    phase = rng.uniform(0, 2 * np.pi, size=k)
    amp = rng.uniform(0.3, 1.0, size=(k, 3)).astype(np.float32)
    waves = np.sin(2 * np.pi * (fy * y + fx * x) + phase)          # [hb, wb, k]
    field = waves @ amp / np.sqrt(k)                                   # [hb, wb, 3]
    base = rng.uniform(60, 190, size=3).astype(np.float32)
    out = base + (70 if fine else 55) * field
    if fine:  # pixel-level grain: the hardest thing to compress spatially
        out += rng.normal(0, 25, size=(hb, wb, 1)).astype(np.float32)
    return out.astype(np.float32)


def _sample(bg: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear, wrapping lookup of bg at float coords (broadcast to [T, H, W]) -> [T, H, W, 3]."""
    hb, wb = bg.shape[:2]
    flat = bg.reshape(hb * wb, 3)
    ys, xs = np.broadcast_arrays(np.asarray(ys, np.float32), np.asarray(xs, np.float32))
    y0, x0 = np.floor(ys), np.floor(xs)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    y0, x0 = y0.astype(np.int32) % hb, x0.astype(np.int32) % wb
    y1, x1 = (y0 + 1) % hb * wb, (x0 + 1) % wb
    y0 = y0 * wb
    top = flat[y0 + x0] * (1 - wx) + flat[y0 + x1] * wx
    bot = flat[y1 + x0] * (1 - wx) + flat[y1 + x1] * wx
    return top * (1 - wy) + bot * wy


def _block_gain(rng, t: int, lo: float, hi: float) -> np.ndarray:
    """Per-frame multiplier, constant within each 4-frame block: per-block complexity varies."""
    nb = -(-t // BLOCK)
    return np.repeat(rng.uniform(lo, hi, size=nb), BLOCK)[:t]


def _pan(rng, t, h, w, speed, fine=False) -> np.ndarray:
    bg = _background(rng, 2 * h, 2 * w, fine)
    ang = rng.uniform(0, 2 * np.pi)
    v = speed * _block_gain(rng, t, 0.4, 1.6)
    pos = np.cumsum(np.concatenate([[0.0], v[:-1]]))
    oy, ox = pos * np.sin(ang), pos * np.cos(ang)
    ys = np.arange(h)[None, :, None] + oy[:, None, None]
    xs = np.arange(w)[None, None, :] + ox[:, None, None]
    return _sample(bg, ys, xs)


def _bounce(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold free positions into [lo, hi] as if reflecting off the walls."""
    period = 2 * (hi - lo)
    q = np.mod(p - lo, period)
    return lo + np.where(q > hi - lo, period - q, q)


def _objects(rng, frames, k, radius, speed, active=None) -> np.ndarray:
    """Composite k bouncing discs (last one on top) over frames [T, H, W, 3]."""
    t, h, w = frames.shape[:3]
    r = rng.uniform(*radius, size=k) * min(h, w) / DEFAULT_HEIGHT  # radii are given for an 80-pixel frame
    r = np.clip(r, 1.0, min(h, w) / 2 - 1)
    ang = rng.uniform(0, 2 * np.pi, size=k)
    v = speed * (active if active is not None else _block_gain(rng, t, 0.5, 1.5))       # [T]
    steps = np.cumsum(np.concatenate([[0.0], v[:-1]]))[:, None]                          # [T, 1]
    cy = _bounce(rng.uniform(0, h, size=k) + steps * np.sin(ang), r, h - r)              # [T, k]
    cx = _bounce(rng.uniform(0, w, size=k) + steps * np.cos(ang), r, w - r)
    yy = np.arange(h)[None, None, :, None]
    xx = np.arange(w)[None, None, None, :]
    inside = (yy - cy[:, :, None, None]) ** 2 + (xx - cx[:, :, None, None]) ** 2 <= (r ** 2)[None, :, None, None]
    top = k - 1 - np.argmax(inside[:, ::-1], axis=1)                                      # [T, H, W]
    colours = rng.uniform(0, 255, size=(k, 3)).astype(np.float32)
    return np.where(inside.any(axis=1)[..., None], colours[top], frames)


# ----------------------------------------------------------------------------- classes
def _render(name: str, rng, t: int, h: int, w: int) -> np.ndarray:
    still = lambda fine=False: np.broadcast_to(_background(rng, h, w, fine), (t, h, w, 3))  # noqa: E731
    if name == "static":
        return still().copy()
    if name == "fast_pan":
        return _pan(rng, t, h, w, speed=5.0)
    if name == "slow_pan":  # 0.6 px/frame over fine grain: little motion, large pixel differences
        return _pan(rng, t, h, w, speed=0.6, fine=True)
    if name == "one_object":
        return _objects(rng, still(), 1, (9, 13), speed=3.0)
    if name == "many_objects":
        return _objects(rng, still(), int(rng.integers(8, 13)), (3, 6), speed=4.0)
    if name == "bursts":  # still, then fast motion in a few random blocks
        nb = -(-t // BLOCK)
        on = np.zeros(nb)
        on[rng.choice(nb, size=max(2, nb // 4), replace=False)] = 1.0
        return _objects(rng, still(), 2, (8, 12), speed=8.0, active=np.repeat(on, BLOCK)[:t])
    if name == "scene_cuts":  # static shots, cut points anywhere (mid-block or on a boundary)
        cuts = np.cumsum(rng.integers(5, 15, size=t))
        shot = np.searchsorted(cuts, np.arange(t), side="right")
        shots = np.stack([_background(rng, h, w) for _ in range(int(shot.max()) + 1)])
        return shots[shot]
    if name == "flicker":  # brightness jumps frame to frame in most blocks, calm in others
        nb = -(-t // BLOCK)
        on = np.repeat(rng.random(nb) < 0.75, BLOCK)[:t]
        gain = np.where(on, 1 + rng.choice([-0.35, 0.35], size=t) * rng.uniform(0.6, 1.0, size=t), 1.0)
        return still() * gain[:, None, None, None].astype(np.float32)
    raise ValueError(f"unknown class {name!r}; choose from {CLASSES}")


def make_video(label: str | int, seed: int = 0, num_frames: int = DEFAULT_FRAMES,
               height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH) -> np.ndarray:
    """One video of class ``label`` (name or index into CLASSES): uint8 [T, H, W, 3], deterministic in seed."""
    name = CLASSES[label] if isinstance(label, (int, np.integer)) else label
    if name not in CLASSES:
        raise ValueError(f"unknown class {name!r}; choose from {CLASSES}")
    rng = np.random.default_rng([int(seed), CLASSES.index(name)])
    frames = _render(name, rng, num_frames, height, width)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- files
def write_mp4(path, frames: np.ndarray, fps: float = DEFAULT_FPS, crf: int = 18, gop: int | None = None) -> Path:
    """Encode uint8 [T, H, W, 3] frames as h264 (libx264, yuv420p) mp4. H and W must be even (4:2:0).

    ``gop``: keyframe interval, default 2 s, so windows later in a video have a nearer keyframe.
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even height and width, got {h}x{w}")
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "g": str(gop or max(1, round(2 * fps)))}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_dataset(out_dir, n: int, seed: int = 0, num_frames: int = DEFAULT_FRAMES,
                  height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH, fps: float = DEFAULT_FPS,
                  classes: tuple[str, ...] = CLASSES, relative: bool = False) -> Path:
    """Write ``n`` videos (classes round-robin, so n=len(classes) gives one of each) and manifest.csv.

    manifest.csv has columns ``uri,label`` (label = class name). ``uri`` is the absolute local path,
    or with ``relative=True`` the file name relative to the manifest's directory (for a dataset that
    will be copied elsewhere, e.g. to a bucket, as a whole). Returns the manifest path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = classes[i % len(classes)]
        frames = make_video(label, seed=seed * 1_000_003 + i, num_frames=num_frames, height=height, width=width)
        path = write_mp4(out / f"{i:05d}_{label}.mp4", frames, fps=fps)
        rows.append((path.name if relative else str(path.resolve()), label))
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "label"])
        writer.writerows(rows)
    return manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m evatok.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    p.add_argument("--height", type=int, default=DEFAULT_HEIGHT)
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    p.add_argument("--fps", type=float, default=DEFAULT_FPS)
    p.add_argument("--relative", action="store_true", help="write uris relative to the manifest's directory")
    a = p.parse_args(argv)
    manifest = write_dataset(a.out_dir, a.n, a.seed, a.frames, a.height, a.width, a.fps, relative=a.relative)
    print(manifest)


if __name__ == "__main__":
    main()
