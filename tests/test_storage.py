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
