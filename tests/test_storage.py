"""workflows.storage against real local disks and a real S3 server (moto, server mode)."""
from __future__ import annotations

import io
import os

import pyarrow as pa
import pytest
import torch

from workflows import storage as st


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/root"


def test_split_and_join_never_escape():
    assert st.split_uri("s3://b/k/x") == ("s3", "b/k/x")
    assert st.split_uri("file:///a/b") == ("file", "/a/b")
    assert st.split_uri("rel/x")[1] == os.path.abspath("rel/x")
    assert st.join("s3://b/out", "clips", "shard-00001.parquet") == "s3://b/out/clips/shard-00001.parquet"
    assert st.join("/tmp/o", "a/b") == "/tmp/o/a/b"
    for bad in ["..", "../x", "a/../../x", "/etc/passwd", "a//b", "", "s3://other/x", "a\\..\\b", "."]:
        with pytest.raises(st.UnsafePathError):
            st.join("s3://b/out", bad)
    with pytest.raises(st.StorageError):
        st.split_uri("ftp://host/x")


def test_gs_without_gcsfs_is_a_clear_error():
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs installed")
    except ImportError:
        pass
    with pytest.raises(st.StorageError, match="gcsfs"):
        st.fs_for("gs://bucket/x")


def test_bytes_parquet_torch_markers_roundtrip(root):
    u = st.join(root, "a", "x.bin")
    assert not st.exists(u)
    assert st.write_bytes_atomic(u, b"hello")
    assert st.read_bytes(u) == b"hello"
    size, etag = st.info(u)
    assert size == 5
    if root.startswith("s3://"):
        assert etag  # S3 etags feed deterministic video ids
    # exclusive create: refuses to replace an existing object
    assert st.write_bytes_atomic(u, b"other", exclusive=True) is False
    assert st.read_bytes(u) == b"hello"
    st.write_bytes_atomic(st.join(root, "a", "y.MP4"), b"v")
    st.write_bytes_atomic(st.join(root, "b", "z.mp4"), b"vv")
    files = st.list_files(root, (".mp4",))
    assert [os.path.basename(f[0]) for f in files] == ["y.MP4", "z.mp4"]
    assert [f[1] for f in files] == [1, 2]
    assert all(f[0].startswith(root if root.startswith("s3") else st.canonical(root)) for f in files)
    assert st.list_files(st.join(root, "missing")) == []

    t = pa.table({"id": ["a", "b"], "v": [1.0, 2.0]})
    pu = st.join(root, "t", "part-0.parquet")
    st.write_parquet(t, pu)
    st.write_parquet(t, st.join(root, "t", "part-1.parquet"))
    assert st.read_table(pu).equals(t)
    assert st.read_table(st.join(root, "t")).num_rows == 4
    pa_fs, path = st.to_pyarrow(pu)
    import pyarrow.parquet as pq

    assert pq.read_table(path, filesystem=pa_fs).equals(t)

    obj = {"w": torch.arange(4.0), "meta": {"k": 1}}
    tu = st.join(root, "m.pt")
    st.torch_save(obj, tu)
    back = st.torch_load(tu)
    assert torch.equal(back["w"], obj["w"]) and back["meta"] == {"k": 1}

    out = st.join(root, "stage")
    assert not st.is_done(out) and st.read_done(out) is None
    st.mark_done(out, {"n": 3})
    assert st.is_done(out) and st.read_done(out) == {"n": 3}


def test_torch_load_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    u = str(tmp_path / "evil.pt")
    st.write_bytes_atomic(u, buf.getvalue())
    with pytest.raises(Exception):
        st.torch_load(u)


def test_failed_write_publishes_nothing(root, monkeypatch):
    """A table that fails to serialise half-way must not leave an object under the key."""
    u = st.join(root, "bad.parquet")

    class Boom(Exception):
        pass

    def failing_write_table(table, where, **kw):
        where.write(b"PAR1 partial bytes")
        raise Boom()

    monkeypatch.setattr(st.pq, "write_table", failing_write_table)
    with pytest.raises(Boom):
        st.write_parquet(pa.table({"a": [1]}), u)
    assert not st.exists(u)
    assert st.list_files(root) == []


def test_missing_object_is_not_found(root):
    with pytest.raises(st.StorageNotFound):
        st.read_bytes(st.join(root, "nope.bin"))
    with pytest.raises(st.StorageNotFound):
        st.read_table(st.join(root, "nope"))


def test_redact_strips_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sUpErSeCrEt123")
    msg = ("s3://AKIAXX:pw@bucket/k failed aws_secret_access_key=abc "
           "https://h/x?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA/2024 and sUpErSeCrEt123")
    out = st.redact(msg)
    for secret in ("AKIAXX", "pw@", "abc", "deadbeef", "AKIA/2024", "sUpErSeCrEt123"):
        assert secret not in out
    assert "bucket/k" in out


def test_s3_errors_never_show_secrets(s3_bucket):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    with pytest.raises(st.StorageError) as ei:
        st.read_bytes(f"s3://{s3_bucket}/missing/{secret}")
    assert secret not in str(ei.value)


def test_redact_knows_every_secret_source(monkeypatch, tmp_path):
    """Secrets from every place a credential lives: MLflow's variables, any *SECRET*/*TOKEN*/*PASSWORD*
    variable, a password inside a URI-valued variable, URL userinfo in the text itself, HTTP auth
    values, and the AWS config/credentials files (every profile; re-read when a file changes)."""
    creds, config = tmp_path / "credentials", tmp_path / "config"
    creds.write_text("[default]\naws_access_key_id = AKIADEFAULT01\naws_secret_access_key = profDefaultSecret1\n"
                     "[research]\naws_access_key_id = AKIARESEARCH2\naws_secret_access_key = profResearchSecret2\n"
                     "aws_session_token = profResearchToken3\n")
    config.write_text("[profile ops]\naws_secret_access_key = cfgOpsSecret4\nregion = eu-west-1\n")
    for k, v in {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_CONFIG_FILE": str(config), "AWS_PROFILE": "research",
                 "MLFLOW_TRACKING_PASSWORD": "mlflowPw123", "MLFLOW_TRACKING_TOKEN": "mlflowTok456",
                 "BILLING_SERVICE_SECRET": "svcSecret789", "HF_TOKEN": "hfTokenAbc",
                 "MLFLOW_TRACKING_URI": "https://bob:uriPw999@tracking.example/",
                 "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(k, v)
    secrets = ["profDefaultSecret1", "profResearchSecret2", "profResearchToken3", "cfgOpsSecret4", "mlflowPw123",
               "mlflowTok456", "svcSecret789", "hfTokenAbc", "uriPw999", "alice", "p@ss", "eyJhbGciOiJIUzI1NiJ9"]
    text = (" ".join(secrets[:9]) + " https://alice:p@ss@host.example/x Authorization: Bearer eyJhbGciOiJIUzI1NiJ9"
            " total_tokens: 5 mean false")
    out = st.redact(text)
    for s in secrets:
        assert s not in out, (s, out)
    assert "host.example/x" in out and "total_tokens: 5" in out and "false" in out  # no collateral damage
    creds.write_text("[default]\naws_secret_access_key = rotatedSecret5\n")  # a rotated key is picked up
    assert "rotatedSecret5" not in st.redact("key rotatedSecret5")


def test_credentials_in_a_uri_are_refused_without_echoing_them():
    for uri in ("s3://AKIAUSER:pa55w0rd@bucket/k", "gs://user:pa55w0rd@bucket/k"):
        with pytest.raises(st.StorageError, match="credentials in a URI") as ei:
            st.split_uri(uri)
        assert "pa55w0rd" not in str(ei.value)
    assert st.split_uri("s3://bucket/user@example.com/v.mp4") == ("s3", "bucket/user@example.com/v.mp4")


# ----------------------------------------------------------------------------- transient errors (issue 14)
class FaultyS3Proxy:
    """A loopback HTTP proxy in front of the moto server. It answers a seeded ``fraction`` of requests
    itself with a 503 ``SlowDown`` or a 500 ``InternalError`` (the request never reaches moto), every
    request whose path holds one of ``forbidden`` with a 403 ``AccessDenied``, and every GET whose
    path holds one of ``down`` with a 503; the rest is forwarded unchanged (but for ``If-None-Match``
    with ``ignore_if_none_match``: a store that does not support create-if-absent)."""

    def __init__(self, upstream: str, fraction: float, seed: int = 0):
        import http.client
        import http.server
        import random
        import threading
        from urllib.parse import urlparse

        self.fraction, self.rng, self.lock = fraction, random.Random(seed), threading.Lock()
        self.forbidden: set[str] = set()
        self.down: set[str] = set()
        self.faults = self.requests = 0
        self.burst = 0  # fail this many next requests, whatever the roll
        self.ignore_if_none_match = False  # forward PUTs without it: a store with no create-if-absent
        up = urlparse(upstream)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _reply(self, status: int, code: str, body: bool = True) -> None:
                data = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f'<Message>injected by the test proxy</Message></Error>').encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                with proxy.lock:
                    proxy.requests += 1
                    roll = proxy.rng.random()
                    if proxy.burst > 0:
                        proxy.burst, roll = proxy.burst - 1, 0.0
                if any(k in self.path for k in proxy.forbidden):
                    return self._reply(403, "AccessDenied")
                if self.command == "GET" and any(k in self.path for k in proxy.down):
                    with proxy.lock:
                        proxy.faults += 1
                    return self._reply(503, "SlowDown")
                if roll < proxy.fraction:
                    with proxy.lock:
                        proxy.faults += 1
                    return self._reply(*((503, "SlowDown") if roll < proxy.fraction / 2 else (500, "InternalError")))
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                drop = ("connection", "expect") + (("if-none-match",) if proxy.ignore_if_none_match else ())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # HEAD: the object's length, as the server said it (no body follows)
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty_s3(s3_server, monkeypatch):
    proxy = FaultyS3Proxy(s3_server, fraction=0.0, seed=14)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # s3fs, Arrow and the decode child all go through it
    yield proxy
    proxy.close()


@pytest.mark.slow  # ~25 s: botocore's own backoff (standard mode) between the retried requests
@pytest.mark.s3
def test_transient_s3_errors_are_retried_and_never_recorded(s3_bucket, s3_server, faulty_s3, tiny_videos,
                                                           tmp_path, monkeypatch):
    """Through a proxy that fails 25% of all S3 requests (500/503, seeded): discovery gives the same
    videos with the same ids as without faults, the shard gives every good video's clips and only the
    permanent failures as rows (a truncated file; a 403 object as ``unreadable``). A read that keeps
    failing transiently fails the shard, unmarked and with no row, and the next run lands it."""
    from evatok import video
    from workflows.config import load_config
    from workflows.ingest import IngestError, discover, process_shard

    src = f"s3://{s3_bucket}/videos"
    good = sorted(tiny_videos.glob("*.mp4"))[:4]
    faulty_s3.fraction = 0.0
    for p in good:
        st.write_bytes_atomic(f"{src}/{p.name}", p.read_bytes())
    st.write_bytes_atomic(f"{src}/cut.mp4", good[0].read_bytes()[:3000])
    st.write_bytes_atomic(f"{src}/forbidden.mp4", good[1].read_bytes())
    names = [p.name for p in good] + ["cut.mp4", "forbidden.mp4"]
    st.write_bytes_atomic(f"{src}/manifest.csv", ("uri\n" + "\n".join(names) + "\n").encode())
    clean = {source: discover(source) for source in (src, f"{src}/manifest.csv")}
    assert all(len(c) == 6 and all(r.error is None for r in c) for c in clean.values())

    faulty_s3.forbidden = {"forbidden.mp4"}
    faulty_s3.fraction = 0.25
    for source in (src, f"{src}/manifest.csv"):  # a listing; a HEAD per video
        before = faulty_s3.faults
        faulty_s3.burst = 2  # the first requests fail for sure, the rest by the roll
        refs = discover(source)
        assert faulty_s3.faults >= before + 2, "the proxy injected nothing: the test would prove nothing"
        by_name = {r.uri.rsplit("/", 1)[-1]: r for r in refs}
        if source.endswith(".csv"):  # its HEAD is refused (403, permanent): a row; the rest as without faults
            assert by_name.pop("forbidden.mp4").error == "unreadable"
        assert {n: (r.video_id, r.error) for n, r in by_name.items()} == {
            r.uri.rsplit("/", 1)[-1]: (r.video_id, None) for r in clean[source] if r.uri.rsplit("/", 1)[-1] in by_name}
    faults_listing = faulty_s3.faults

    cfg = load_config(None, ["data.fps=8", "data.size=32", "data.max_clips_per_video=2"])
    out = f"s3://{s3_bucket}/out"
    info = process_shard(0, refs, out, cfg.data)
    assert faulty_s3.faults > faults_listing
    faulty_s3.fraction = 0.0
    errs = {e["uri"].rsplit("/", 1)[-1]: e["reason"] for e in st.read_table(f"{out}/errors").to_pylist()}
    assert errs == {"cut.mp4": "truncated", "forbidden.mp4": "unreadable"}, errs
    want = sum(len(video.decode_clips(str(p), clip_len=16, fps=8, size=32, max_clips=2)[0]) for p in good)
    assert info["clips"] == want == st.read_table(f"{out}/clips").num_rows

    # A read that keeps failing: the shard fails, leaves no marker and no row; once it reads, it lands.
    monkeypatch.setenv(st.RETRIES_ENV, "2")
    faulty_s3.down = {good[2].name}
    with pytest.raises(IngestError, match="transiently"):
        process_shard(1, refs, out, cfg.data)
    assert not st.exists(f"{out}/_shards/shard-00001.json") and not st.exists(f"{out}/errors/shard-00001.parquet")
    faulty_s3.down = set()
    assert process_shard(1, refs, out, cfg.data)["clips"] == want


def test_local_publish_fsyncs_the_file_then_the_directory_after_the_rename(tmp_path, monkeypatch):
    """The order that makes a publish survive a power loss: the data's bytes (fsync of the temp
    file), the rename, then the directory holding the new name (fsync of the folder), for a plain
    and an exclusive publish; a folder created on the way is fsynced into its parent."""
    events = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", "dir" if os.path.isdir(target) else "file", target))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", b)), real_replace(a, b))[1])
    monkeypatch.setattr(os, "link", lambda a, b: (events.append(("rename", b)), real_link(a, b))[1])
    new_dir = tmp_path / "a" / "b"
    for name, exclusive in (("x.bin", False), ("y.json", True)):
        events.clear()
        assert st.write_bytes_atomic(str(new_dir / name), b"payload", exclusive=exclusive)
        published = str(new_dir / name)
        k = events.index(("rename", published))
        assert [e[:2] for e in events[k - 1:k]] == [("fsync", "file")], events  # bytes before the name
        assert ("fsync", "dir", str(new_dir)) in events[k + 1:], events  # the name after the rename
        if name == "x.bin":  # a and a/b were created: each made durable in its parent
            assert ("fsync", "dir", str(tmp_path)) in events and ("fsync", "dir", str(tmp_path / "a")) in events
    assert (new_dir / "x.bin").read_bytes() == b"payload"
