"""Fuzzing the ingest stage with mutations of real mp4 files (issue 14).

Real h264 mp4 files written by the project's synthetic writer (``evatok.synthetic.write_mp4``; one
as written, ``moov`` last, and one remuxed ``moov``-first) are mutated at random, seeded: truncations
at random offsets, bit flips in the header boxes and in the payload, swapped top-level boxes, zeroed
byte ranges, duplicated halves, and wrong extensions (a good or mutated mp4 named ``.avi``/``.mkv``/
``.webm``/``.mov``, random bytes named ``.mp4``). All of them are ingested in one run of the stage
(Ray Data, decode isolation on, as a user runs it). Then:

- every input ends either as clips or as exactly one error row with a known reason and a message;
  none as both, none lost, and no ``decode_failed`` (an unforeseen Python exception);
- the row counts add up: the summary's videos = clip-producing videos + error rows; its clips = the
  rows of ``clips/``; its error counts = the rows of ``errors/``;
- the stage finishes within a fixed bound (each video has a deadline: a hang cannot outlast it).
"""
from __future__ import annotations

import random
import struct
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from evatok import synthetic
from workflows import storage
from workflows.clips import frames_from_table
from workflows.config import load_config
from workflows.ingest import run_ingest

pytestmark = [pytest.mark.ray]  # ~16 s, Ray start included

N_MUTANTS = 216
BOUND_S = 120.0  # the whole stage on a shared 2-core machine (measured 9 s for 226 inputs); a video's deadline
                # is decode_timeout_s=20 + 1 s per second of video, so one hang stays far inside it
KNOWN = {"empty_file", "not_a_video", "corrupt", "truncated", "no_video_stream", "too_short", "too_large",
         "timeout", "decoder_crash", "unreadable"}


def _boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    out, off = [], 0
    while off + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[off:off + 8])
        if n < 8:
            break
        out.append((kind, off, n))
        off += n
    return out


def _faststart(src: Path, dst: Path) -> None:
    """Remux ``src`` with the ``moov`` box first (as streaming-ready files are)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", options={"movflags": "faststart"}) as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        for pkt in inp.demux(s_in):
            if pkt.dts is None:
                continue
            pkt.stream = s_out
            out.mux(pkt)


def _mutate(rng: random.Random, data: bytes, kind: str) -> bytes:
    b = bytearray(data)
    boxes = _boxes(data)
    box = {k: (o, n) for k, o, n in boxes}
    if kind == "truncate":
        return bytes(b[:rng.randrange(1, len(b))])
    if kind in ("flip_header", "flip_payload"):
        o, n = box[b"moov"] if kind == "flip_header" else box[b"mdat"]
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(o, o + n)
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == "swap_boxes":
        parts = [bytes(b[o:o + n]) for _, o, n in boxes]
        i, j = rng.sample(range(len(parts)), 2)
        parts[i], parts[j] = parts[j], parts[i]
        return b"".join(parts)
    if kind == "zero_range":
        i = rng.randrange(len(b))
        n = rng.randint(1, max(1, len(b) // 8))
        b[i:i + n] = bytes(len(b[i:i + n]))
        return bytes(b)
    if kind == "dup_half":
        h = len(b) // 2
        return bytes(b[:h] + b[:h]) if rng.random() < 0.5 else bytes(b[h:] + b[h:])
    raise ValueError(kind)


KINDS = ("truncate", "flip_header", "flip_payload", "swap_boxes", "zero_range", "dup_half")


@pytest.fixture(scope="module")
def mutants(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(source folder, file name -> mutation kind), N_MUTANTS + a few intact files."""
    work = tmp_path_factory.mktemp("fuzz")
    bases = []
    for k, label in enumerate(("one_object", "fast_pan")):
        p = synthetic.write_mp4(work / f"base{k}.mp4", synthetic.make_video(label, seed=k, num_frames=40,
                                                                             height=48, width=64), fps=12)
        bases.append(p.read_bytes())
        _faststart(p, work / f"base{k}-fs.mp4")
        bases.append((work / f"base{k}-fs.mp4").read_bytes())
    assert _boxes(bases[1])[1][0] == b"moov" and _boxes(bases[0])[-1][0] == b"moov"  # both layouts present
    src = work / "src"
    src.mkdir()
    rng = random.Random(20261129)
    kinds: dict[str, str] = {}
    for i in range(N_MUTANTS):
        kind = KINDS[i % len(KINDS)]
        data = _mutate(rng, bases[i % len(bases)], kind)
        ext = ".mp4"
        if i % 7 == 3:  # wrong extensions (every kind gets some): the container is still mp4 (mutated or not)
            ext = rng.choice((".avi", ".mkv", ".webm", ".mov"))
            kind += "+wrong_ext"
        name = f"m{i:03d}-{kind}{ext}"
        (src / name).write_bytes(data)
        kinds[name] = kind
    for j, data in enumerate(bases):  # intact files, also under a wrong extension
        for ext in (".mp4", ".mkv"):
            (src / f"intact{j}{ext}").write_bytes(data)
            kinds[f"intact{j}{ext}"] = "intact" + ("" if ext == ".mp4" else "+wrong_ext")
    (src / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    kinds["noise.mp4"] = "random_bytes"
    (src / "text.avi").write_bytes(b"this is not a video\n" * 50)
    kinds["text.avi"] = "text+wrong_ext"
    return src, kinds


def test_every_mutant_becomes_clips_or_an_error_row_in_bounded_time(ray_local, mutants, tmp_path):
    src, kinds = mutants
    out = tmp_path / "out"
    cfg = load_config(None, [f"ingest.source={src}", f"ingest.output={out}", "ingest.videos_per_task=32",
                             "ingest.decode_timeout_s=20", "data.fps=8", "data.size=32"])
    t0 = time.perf_counter()
    s = run_ingest(cfg, quiet=True)
    elapsed = time.perf_counter() - t0
    assert elapsed < BOUND_S, f"{elapsed:.1f} s"

    clips = storage.read_table(str(out / "clips"))
    errs = storage.read_table(str(out / "errors")).to_pylist()
    name = lambda u: Path(u).name  # noqa: E731
    with_clips = {name(u) for u in clips.column("source_uri").to_pylist()}
    with_error = Counter(name(e["uri"]) for e in errs)
    assert max(with_error.values()) == 1  # one row per failed video
    assert not with_clips & set(with_error)  # never both
    assert with_clips | set(with_error) == set(kinds)  # none lost
    assert s.videos == len(kinds) == len(with_clips) + len(errs)
    assert s.clips == clips.num_rows and sum(s.errors.values()) == len(errs)
    assert Counter(e["reason"] for e in errs) == Counter(s.errors)
    bad = [e for e in errs if e["reason"] not in KNOWN or not e["message"]]
    assert not bad, [(e['uri'].rsplit('/', 1)[-1], e['reason'], e['message'][-300:]) for e in bad]
    assert frames_from_table(clips).shape[1:] == (16, 32, 32, 3)
    for n, k in kinds.items():  # intact files (whatever their extension) decode
        if k.startswith("intact"):
            assert n in with_clips, (n, [e for e in errs if name(e["uri"]) == n])

    table: dict[str, Counter] = {}
    for n, k in kinds.items():
        row = next((e["reason"] for e in errs if name(e["uri"]) == n), "clips")
        table.setdefault(k, Counter())[row] += 1
    print(f"\n{len(kinds)} inputs in {elapsed:.1f} s; kind -> outcome:")
    for k in sorted(table):
        print(f"  {k:28s} {dict(table[k])}")
