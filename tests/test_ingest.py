"""ingest on real Ray, real mp4 files and the real S3 server (moto, server mode)."""
from __future__ import annotations

import csv
import io
import os
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from evatok import synthetic, video
from workflows import storage
from workflows.clips import frames_from_batch, frames_from_table
from workflows.config import load_config
from workflows.ingest import IngestError, discover, process_shard, run_ingest
from workflows.stage import StageError


def write_audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        for k in range(10):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts, f.time_base = 16000, k * 1024, Fraction(1, 16000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory, tiny_videos) -> dict[str, Path]:
    """One file per bad-input kind, keyed by the reason ingest must report."""
    d = tmp_path_factory.mktemp("bad")
    good = sorted(tiny_videos.glob("*.mp4"))[0].read_bytes()
    files = {
        "empty_file": d / "empty.mp4",
        "not_a_video": d / "random.mp4",
        "truncated": d / "truncated.mp4",
        "no_video_stream": d / "audio_only.mp4",
        "too_short": d / "short.mp4",
    }
    files["empty_file"].write_bytes(b"")
    files["not_a_video"].write_bytes(np.random.default_rng(0).bytes(5000))
    files["truncated"].write_bytes(good[: len(good) // 2])
    write_audio_only(files["no_video_stream"])
    synthetic.write_mp4(files["too_short"], synthetic.make_video("static", 0, num_frames=10), fps=12)
    return files


def cfg_for(source: str, output: str, **ingest):
    over = [f"ingest.source={source}", f"ingest.output={output}", "data.fps=8", "data.size=32"]
    over += [f"ingest.{k}={v}" for k, v in ingest.items()]
    return load_config(None, over)


def upload(local: Path, uri: str) -> None:
    storage.write_bytes_atomic(uri, local.read_bytes())


def object_stamps(prefix: str) -> dict:
    """key -> (etag/size, mtime) for every object under prefix: any rewrite changes the mtime."""
    fs, path = storage.fs_for(prefix)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    out = {}
    for p, d in fs.find(path, detail=True).items():
        out[p] = (d.get("ETag") or d.get("size"), str(d.get("LastModified") or d.get("mtime")))
    return out


def test_discover_ucf_tree_with_split(tmp_path, tiny_videos):
    root = tmp_path / "UCF-101"
    vids = sorted(tiny_videos.glob("*.mp4"))[:3]
    for v, cls in zip(vids, ["ApplyEyeMakeup", "Archery", "Archery"]):
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / f"v_{cls}_{v.stem}.avi").write_bytes(v.read_bytes())
    (tmp_path / "ucfTrainTestlist").mkdir()
    (tmp_path / "ucfTrainTestlist" / "trainlist01.txt").write_text(
        f"Archery/v_Archery_{vids[1].stem}.avi 2\nArchery/v_Archery_gone.avi 2\n")
    refs = discover(str(root))
    assert sorted(r.label for r in refs) == ["ApplyEyeMakeup", "Archery", "Archery"]
    assert refs == sorted(refs, key=lambda r: r.video_id) and refs == discover(str(root))
    split = discover(str(root), "trainlist01")
    assert sorted((r.label, r.error or "") for r in split) == [("Archery", ""), ("Archery", "missing")]
    with pytest.raises(IngestError, match="testlist09"):
        discover(str(root), "testlist09")
    with pytest.raises(IngestError):
        discover(str(tmp_path / "nothing"))


def test_process_shard_reports_every_bad_kind(tmp_path, tiny_videos, bad_videos):
    """The plain (no-Ray) shard function: clips equal a direct decode; each bad file -> its reason."""
    rows = [["uri", "label"], [str(sorted(tiny_videos.glob("*.mp4"))[0]), "x"]]
    rows += [[str(p), ""] for p in bad_videos.values()] + [[str(tmp_path / "missing.mp4"), ""], ["../up.mp4", ""]]
    man = tmp_path / "m.csv"
    with open(man, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    cfg = cfg_for(str(man), str(tmp_path / "out"))
    refs = discover(str(man))
    info = process_shard(0, refs, str(tmp_path / "out"), cfg.data)
    errs = storage.read_table(str(tmp_path / "out" / "errors")).to_pylist()
    reasons = {Path(e["uri"]).name: e["reason"] for e in errs}
    for reason, p in bad_videos.items():
        assert reasons[p.name] == reason, errs
    assert reasons["missing.mp4"] == "missing" and reasons["up.mp4"] == "bad_uri"
    assert info["errors"] == {r: 1 for r in list(bad_videos) + ["missing", "bad_uri"]}
    clips = storage.read_table(str(tmp_path / "out" / "clips"))
    _, direct = video.decode_clips(rows[1][0], clip_len=16, fps=8, size=32)
    assert np.array_equal(frames_from_table(clips), direct)
    assert clips.column("label").to_pylist() == ["x"] * len(direct)
    assert len(set(clips.column("clip_id").to_pylist())) == len(direct) == info["clips"]


@pytest.mark.ray
@pytest.mark.s3
def test_ingest_s3_to_s3_errors_and_idempotent_rerun(ray_local, s3_bucket, tiny_videos, bad_videos, capsys):
    src = f"s3://{s3_bucket}/videos"
    good = sorted(tiny_videos.glob("*.mp4"))[:4]
    lines = ["uri,label"]
    for p in good:
        upload(p, f"{src}/{p.name}")
        lines.append(f"{p.name},{p.stem.split('_', 1)[1]}")
    for p in bad_videos.values():
        upload(p, f"{src}/bad/{p.name}")
        lines.append(f"bad/{p.name},")
    lines.append(f"s3://{s3_bucket}/videos/not-there.mp4,")
    storage.write_bytes_atomic(f"{src}/manifest.csv", ("\n".join(lines) + "\n").encode())
    out = f"s3://{s3_bucket}/ingest"
    cfg = cfg_for(f"{src}/manifest.csv", out, videos_per_task=4)

    s1 = run_ingest(cfg)
    assert s1.videos == 10 and s1.shards == 3 and s1.shards_written == 3
    expected = {p.name: video.decode_clips(str(p), clip_len=16, fps=8, size=32)[1] for p in good}
    assert s1.clips == sum(len(v) for v in expected.values())
    assert s1.errors == {r: 1 for r in bad_videos} | {"missing": 1}
    assert "[ingest] 3/3 shards" in capsys.readouterr().out

    clips = storage.read_table(f"{out}/clips")
    assert clips.num_rows == s1.clips and len(set(clips.column("clip_id").to_pylist())) == s1.clips
    frames = frames_from_table(clips)
    for name, want in expected.items():
        rows = [i for i, u in enumerate(clips.column("source_uri").to_pylist()) if u.endswith("/" + name)]
        order = np.argsort(clips.column("window").to_numpy()[rows])
        assert np.array_equal(frames[np.asarray(rows)[order]], want)
    errs = storage.read_table(f"{out}/errors").to_pylist()
    assert {e["reason"] for e in errs} == set(bad_videos) | {"missing"}
    assert all(e["message"] and e["uri"].startswith("s3://") for e in errs)
    # Ray Data reads the shards too (training does), and the frames helper takes its batches.
    fs, path = storage.to_pyarrow(f"{out}/clips")
    batch = ray_local.data.read_parquet(path, filesystem=fs).take_batch(3, batch_format="numpy")
    assert frames_from_batch(batch).shape == (3, 16, 32, 32, 3)

    before = object_stamps(out)
    time.sleep(1.1)  # S3 LastModified has 1 s resolution: a rewrite would show
    s2 = run_ingest(cfg)
    assert s2.skipped and s2.shards_skipped == 3 and (s2.videos, s2.clips, s2.errors) == (s1.videos, s1.clips, s1.errors)
    assert object_stamps(out) == before

    # Same prefix, different settings: refuse instead of mixing two datasets.
    with pytest.raises(StageError, match="data"):
        run_ingest(cfg_for(f"{src}/manifest.csv", out, videos_per_task=4) if False else
                   load_config(None, [f"ingest.source={src}/manifest.csv", f"ingest.output={out}",
                                      "ingest.videos_per_task=4", "data.fps=8", "data.size=48"]))


@pytest.mark.ray
def test_ingest_resumes_only_missing_shards(ray_local, tmp_path, tiny_videos):
    out = tmp_path / "out"
    cfg = cfg_for(str(tiny_videos), str(out), videos_per_task=3)
    s1 = run_ingest(cfg, quiet=True)
    assert s1.videos == 8 and s1.shards == 3 and not s1.errors
    labels = set(storage.read_table(str(out / "clips")).column("label").to_pylist())
    assert labels == {None}  # flat directory: no class folders
    # Interruption: shard 1 lost its marker (its data may or may not have been published).
    (out / "_shards" / "shard-00001.json").unlink()
    (out / "clips" / "shard-00001.parquet").unlink()
    (out / "_DONE.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    s2 = run_ingest(cfg, quiet=True)
    assert (s2.shards_written, s2.shards_skipped) == (1, 2)
    assert (s2.videos, s2.clips) == (s1.videos, s1.clips)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if "shard-00001" not in p.name)
    assert storage.is_done(str(out)) and storage.read_table(str(out / "clips")).num_rows == s1.clips
