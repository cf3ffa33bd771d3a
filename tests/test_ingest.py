"""ingest on real Ray, real mp4 files and the real S3 server (moto, server mode)."""
from __future__ import annotations

import csv
import io
import json
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
    # Secrets where a careless pipeline would copy them into errors/: the environment's AWS secret in a
    # key name, passwords in a listed URI's userinfo (an S3 client echoes such a "bucket name").
    aws_secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    lines += [f"s3://{s3_bucket}/videos/missing-{aws_secret}.mp4,",
              f"s3://AKIAUSER:pa55w0rd-in-uri@{s3_bucket}/videos/{good[0].name},",
              "https://user:tok3n-in-uri@host.example/v.mp4,"]
    storage.write_bytes_atomic(f"{src}/manifest.csv", ("\n".join(lines) + "\n").encode())
    out = f"s3://{s3_bucket}/ingest"
    cfg = cfg_for(f"{src}/manifest.csv", out, videos_per_task=4)

    s1 = run_ingest(cfg)
    assert s1.videos == 13 and s1.shards == 4 and s1.shards_written == 4
    expected = {p.name: video.decode_clips(str(p), clip_len=16, fps=8, size=32)[1] for p in good}
    assert s1.clips == sum(len(v) for v in expected.values())
    assert s1.errors == {r: 1 for r in bad_videos} | {"missing": 2, "bad_uri": 2}
    assert "[ingest] 4/4 shards" in capsys.readouterr().out

    clips = storage.read_table(f"{out}/clips")
    assert clips.num_rows == s1.clips and len(set(clips.column("clip_id").to_pylist())) == s1.clips
    frames = frames_from_table(clips)
    for name, want in expected.items():
        rows = [i for i, u in enumerate(clips.column("source_uri").to_pylist()) if u.endswith("/" + name)]
        order = np.argsort(clips.column("window").to_numpy()[rows])
        assert np.array_equal(frames[np.asarray(rows)[order]], want)
    errs = storage.read_table(f"{out}/errors").to_pylist()
    assert {e["reason"] for e in errs} == set(bad_videos) | {"missing", "bad_uri"}
    assert all(e["message"] and (e["uri"].startswith("s3://") or e["reason"] == "bad_uri") for e in errs)
    for secret in (aws_secret, "pa55w0rd-in-uri", "tok3n-in-uri"):  # in no column of any error row
        assert not [e for e in errs if secret in json.dumps(e)], (secret, errs)
    # Ray Data reads the shards too (training does), and the frames helper takes its batches.
    fs, path = storage.to_pyarrow(f"{out}/clips")
    batch = ray_local.data.read_parquet(path, filesystem=fs).take_batch(3, batch_format="numpy")
    assert frames_from_batch(batch).shape == (3, 16, 32, 32, 3)

    before = object_stamps(out)
    time.sleep(1.1)  # S3 LastModified has 1 s resolution: a rewrite would show
    s2 = run_ingest(cfg)
    assert s2.skipped and s2.shards_skipped == 4 and (s2.videos, s2.clips, s2.errors) == (s1.videos, s1.clips, s1.errors)
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


# ----------------------------------------------------------------------------- odd listings (issue 14)
def test_odd_tree_entries_become_error_rows_not_crashes(tmp_path, tiny_videos):
    """A non-UTF-8 file name, symlinks out of the tree (file and folder), a dangling link and a very
    wide video: each ends as one error row with its reason; a link that stays inside is read."""
    good = sorted(tiny_videos.glob("*.mp4"))[0]
    root, outside = tmp_path / "src", tmp_path / "outside"
    (root / "A").mkdir(parents=True)
    (outside / "B").mkdir(parents=True)
    (root / "A" / "good.mp4").write_bytes(good.read_bytes())
    (outside / "x.mp4").write_bytes(good.read_bytes())
    (outside / "B" / "y.mp4").write_bytes(good.read_bytes())
    with open(os.fsencode(root / "A") + b"/caf\xe9.mp4", "wb") as f:  # Latin-1 byte in the name
        f.write(good.read_bytes())
    (root / "A" / "link_in.mp4").symlink_to("good.mp4")
    (root / "A" / "link_out.mp4").symlink_to(outside / "x.mp4")
    (root / "A" / "dangling.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (root / "B").symlink_to(outside / "B", target_is_directory=True)
    wide = synthetic.make_video("static", 0, num_frames=24, height=16, width=512)  # 32:1
    synthetic.write_mp4(root / "A" / "wide.mp4", wide, fps=8)

    refs = discover(str(root))
    by_name = {Path(r.uri).name: r for r in refs}
    assert by_name["caf\\udce9.mp4"].error == "bad_uri" and "UTF-8" in by_name["caf\\udce9.mp4"].message
    assert by_name["link_out.mp4"].error == "unsafe_path"
    assert by_name["B"].error == "unsafe_path" and "y.mp4" not in by_name
    assert by_name["dangling.mp4"].error == "missing"
    assert by_name["link_in.mp4"].error is None and by_name["link_in.mp4"].size == good.stat().st_size
    assert by_name["good.mp4"].error is None and by_name["wide.mp4"].error is None
    assert len(refs) == 7 and refs == discover(str(root))  # stable ids, nothing dropped

    out = tmp_path / "out"
    info = process_shard(0, refs, str(out), cfg_for(str(root), str(out)).data)
    errs = {Path(e["uri"]).name: e["reason"] for e in storage.read_table(str(out / "errors")).to_pylist()}
    assert errs == {"caf\\udce9.mp4": "bad_uri", "link_out.mp4": "unsafe_path", "B": "unsafe_path",
                    "dangling.mp4": "missing", "wide.mp4": "too_large"}
    clips = storage.read_table(str(out / "clips"))
    assert {Path(u).name for u in clips.column("source_uri").to_pylist()} == {"good.mp4", "link_in.mp4"}
    assert info["videos"] == 7 and sum(info["errors"].values()) == 5


def test_split_list_lines_that_leave_the_tree_become_rows(tmp_path, tiny_videos):
    root = tmp_path / "UCF-101"
    (root / "Archery").mkdir(parents=True)
    (root / "Archery" / "v1.avi").write_bytes(sorted(tiny_videos.glob("*.mp4"))[0].read_bytes())
    (tmp_path / "ucfTrainTestlist").mkdir()
    (tmp_path / "ucfTrainTestlist" / "trainlist01.txt").write_text(
        "Archery/v1.avi 1\n../secrets/v2.avi 1\nArchery\\..\\..\\v3.avi 1\n")
    refs = discover(str(root), "trainlist01")
    assert sorted((r.error or "", r.uri.rsplit("/", 1)[-1]) for r in refs) == [
        ("", "v1.avi"), ("unsafe_path", "Archery\\..\\..\\v3.avi"), ("unsafe_path", "v2.avi")]
    assert all("leave the source tree" in r.message for r in refs if r.error)


def test_text_that_is_not_utf8_is_refused_clearly(tmp_path, tiny_videos):
    """A Latin-1 manifest or split list: a clear IngestError, not a UnicodeDecodeError."""
    man = tmp_path / "m.csv"
    man.write_bytes("uri,label\ncafé.mp4,crème\n".encode("latin-1"))
    with pytest.raises(IngestError, match=r"m\.csv is not UTF-8 text \(byte 0xe9"):
        discover(str(man))
    root = tmp_path / "UCF-101"
    (root / "A").mkdir(parents=True)
    (root / "A" / "v.avi").write_bytes(sorted(tiny_videos.glob("*.mp4"))[0].read_bytes())
    (tmp_path / "ucfTrainTestlist").mkdir()
    (tmp_path / "ucfTrainTestlist" / "trainlist01.txt").write_bytes("A/vidéo.avi 1\n".encode("latin-1"))
    with pytest.raises(IngestError, match="split list .* is not UTF-8 text"):
        discover(str(root), "trainlist01")
    man.write_bytes("\ufeffuri,label\nv.mp4,crème\n".encode("utf-8"))  # UTF-8 with a BOM still reads
    assert [r.label for r in discover(str(man))] == ["crème"]


def test_duplicate_manifest_rows_with_different_labels_become_an_error_row(tmp_path, tiny_videos):
    vids = sorted(tiny_videos.glob("*.mp4"))[:2]
    man = tmp_path / "m.csv"
    man.write_text(f"uri,label\n{vids[0]},cat\n{vids[0]},dog\n{vids[1]},cat\n{vids[1]},cat\n")
    refs = {Path(r.uri).name: r for r in discover(str(man))}
    assert len(refs) == 2
    conflict = refs[vids[0].name]
    assert conflict.error == "conflicting_labels" and "'cat'" in conflict.message and "'dog'" in conflict.message
    assert refs[vids[1].name].error is None and refs[vids[1].name].label == "cat"  # exact duplicate: once


def test_a_hanging_or_crashing_decoder_costs_one_row_and_the_shard_lands(tmp_path, tiny_videos, monkeypatch):
    """Decoding runs in a killable child: a decoder stuck in C (holding the GIL) is killed at its
    duration-scaled deadline (``timeout``), a segfaulting one is a ``decoder_crash``; the other videos
    of the shard decode exactly as in-process and the shard is published. The faults come from the
    ``EVATOK_TEST_DECODE_FAULT`` hook, which acts inside the decode child only."""
    src = tmp_path / "src"
    src.mkdir()
    good = sorted(tiny_videos.glob("*.mp4"))[0]
    for name in ("a.mp4", "hang.mp4", "crash.mp4", "z.mp4"):
        (src / name).write_bytes(good.read_bytes())
    monkeypatch.setenv("EVATOK_TEST_DECODE_FAULT", "hang:hang.mp4,crash:crash.mp4")
    cfg = cfg_for(str(src), str(tmp_path / "out"), decode_timeout_s=2, decode_timeout_per_s=0.25)
    from workflows.ingest import decode_limits

    refs = discover(str(src))
    duration = video.probe(good).duration_s
    t0 = time.perf_counter()
    info = process_shard(0, refs, str(tmp_path / "out"), cfg.data, decode_limits(cfg.ingest))
    elapsed = time.perf_counter() - t0
    assert elapsed < 2 + 0.25 * duration + 20  # one deadline, not a hang
    errs = {Path(e["uri"]).name: e for e in storage.read_table(str(tmp_path / "out" / "errors")).to_pylist()}
    assert {k: e["reason"] for k, e in errs.items()} == {"hang.mp4": "timeout", "crash.mp4": "decoder_crash"}
    assert "killed" in errs["hang.mp4"]["message"] and "SIGSEGV" in errs["crash.mp4"]["message"]
    assert f"(limit {2 + 0.25 * duration:.1f} s from its own budget)" in errs["hang.mp4"]["message"]  # scaled
    clips = storage.read_table(str(tmp_path / "out" / "clips"))
    _, direct = video.decode_clips(str(good), clip_len=16, fps=8, size=32)
    assert info["clips"] == 2 * len(direct)
    for name in ("a.mp4", "z.mp4"):
        rows = [k for k, u in enumerate(clips.column("source_uri").to_pylist()) if u.endswith("/" + name)]
        assert np.array_equal(frames_from_table(clips.take(rows)), direct)
    assert (tmp_path / "out" / "_shards" / "shard-00000.json").exists()
