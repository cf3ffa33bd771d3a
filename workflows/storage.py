"""The only module that opens files: every stage addresses storage by URI.

Supported URIs: local paths (``/data/x``, ``runs/x``), ``file:///data/x``, ``s3://bucket/key`` (s3fs
for fsspec, ``pyarrow.fs.S3FileSystem`` for Arrow/Ray Data) and ``gs://bucket/key`` when gcsfs is
installed. S3 endpoint, region and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``/``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ...) and config
files; this module never logs them, and ``redact`` strips them from any text we print.

Publishing is atomic: ``write_bytes_atomic`` never leaves a partial object under the final key.
- local: write ``.<name>.tmp-<uuid>`` in the same directory, fsync, ``os.replace`` (atomic rename),
  then fsync the directory (the rename itself is durable before anything published after it, such as
  a shard marker; folders created on the way are fsynced into their parents too).
- object stores: the whole payload is in memory and sent with one ``put_object`` (or a multipart
  upload, which becomes visible only on completion). We deliberately never stream through an fsspec
  file object: its ``__exit__`` calls ``close()`` (which commits) even when the ``with`` body raised,
  publishing a truncated object (engineering-anchors B8).
- ``exclusive=True`` asks for create-if-absent: ``O_EXCL``-style link on local disks and
  ``IfNoneMatch: *`` on S3 (AWS S3 honours it; stores that ignore it fall back to overwrite, which is
  still safe for our deterministic outputs because every writer of a key writes the same content).

"Is this output complete" is a marker: ``mark_done(prefix, info)`` publishes ``<prefix>/_DONE.json``
last, after everything under ``prefix``; ``is_done(prefix)`` checks it; ``read_done`` returns the info.

Public API (stable; training and the CLI use it):
``split_uri, join, absolute, fs_for, to_pyarrow, exists, info, list_files, read_bytes, open_read,
sha256, write_bytes_atomic, write_parquet, read_table, list_parquet, torch_save, torch_load, mark_done,
is_done, read_done, remove, redact``.

Relative local paths mean "relative to the user's working directory", which only the driver knows:
a Ray worker runs in its own directory (Ray Train: the run's artifacts folder), so ``absolute`` is
applied to every URI of the config on the driver (``workflows.config.absolute_uris``) before any of
it is handed to Ray.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import threading
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

DONE_MARKER = "_DONE.json"


class StorageError(RuntimeError):
    """A storage operation failed; the message is already redacted."""


class StorageNotFound(StorageError, FileNotFoundError):
    pass


class UnsafePathError(StorageError, ValueError):
    """A path part would escape its output prefix (``..``, absolute part, scheme)."""


class TransientStorageError(StorageError):
    """A failure that may pass on its own (HTTP 5xx, throttling, a dropped connection, a timeout) and
    was still failing after every retry. Never a fact about the object: callers must not record it
    as one (ingest fails the shard, unmarked, instead of writing an ``unreadable`` row)."""


# ----------------------------------------------------------------------------- URIs
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
_REMOTE = {"s3", "s3a", "gs", "gcs"}


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme, path)``: scheme is ``"file"``, ``"s3"`` or ``"gs"``; a local path is made absolute.

    ``s3://b/k`` -> ``("s3", "b/k")``; ``/x`` and ``file:///x`` -> ``("file", "/x")``.
    """
    uri = str(uri)
    m = _SCHEME.match(uri)
    if not m:
        return "file", os.path.abspath(os.path.expanduser(uri))
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme != "file" and "@" in rest.split("/", 1)[0]:
        # s3://user:secret@bucket/... is no bucket at all, and the client would echo the "bucket name"
        # (secret included) in its error. Credentials come from the environment or a profile.
        raise StorageError(f"credentials in a URI are not supported ({redact(uri)}); use the AWS/GCS "
                           f"environment variables or a profile")
    if scheme == "file":
        return "file", os.path.abspath(rest or "/")
    if scheme in ("s3", "s3a"):
        return "s3", rest.strip("/")
    if scheme in ("gs", "gcs"):
        return "gs", rest.strip("/")
    raise StorageError(f"unsupported URI scheme {scheme!r} in {redact(uri)} (use a path, file://, s3:// or gs://)")


def _uri(scheme: str, path: str) -> str:
    return path if scheme == "file" else f"{scheme}://{path}"


def canonical(uri: str) -> str:
    """One spelling per object: local URIs become absolute paths, ``s3a://`` becomes ``s3://``."""
    return _uri(*split_uri(uri))


def absolute(uri: str) -> str:
    """A relative local path (``runs/x``, ``~/x``, ``file://runs/x``) made absolute against the current
    working directory; remote URIs and empty strings are returned unchanged. Call it on the driver:
    ``split_uri`` would resolve a relative path against whichever process's directory it runs in."""
    if not uri:
        return uri
    return canonical(uri) if split_uri(uri)[0] == "file" else str(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts under ``uri``. Parts may contain ``/`` but never escape the prefix:
    ``..``, ``.``, empty segments, absolute parts, backslashes and schemes raise ``UnsafePathError``
    (ids that come from user input must stay inside their output prefix)."""
    scheme, base = split_uri(uri)
    segs: list[str] = []
    for part in parts:
        part = str(part)
        if not part or part.startswith("/") or "\\" in part or "://" in part or "\x00" in part:
            raise UnsafePathError(f"unsafe path part {part!r}")
        for seg in part.split("/"):
            if seg in ("", ".", ".."):
                raise UnsafePathError(f"unsafe path part {part!r}")
            segs.append(seg)
    path = "/".join([base.rstrip("/")] + segs) if segs else base
    return _uri(scheme, path)


# ----------------------------------------------------------------------------- filesystems
_FS_CACHE: dict[tuple, Any] = {}
_FS_LOCK = threading.Lock()


def _env_key() -> tuple:
    # A new endpoint/credential set (e.g. a test's moto server) must give a new client; the key
    # holds only a hash so secrets never sit in plain sight in a repr.
    names = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
             "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", RETRIES_ENV)
    return (os.getpid(), hash(tuple(os.environ.get(n) for n in names)))


# ----------------------------------------------------------------------------- transient errors
# Object stores fail a small fraction of requests (500/503, SlowDown, a reset connection). The
# libraries' own retries come first: botocore's "standard" mode (exponential backoff with jitter on
# 5xx, throttling and connection errors; ``AWS_MAX_ATTEMPTS``/``AWS_RETRY_MODE`` win when set), s3fs's
# ``retries`` and Arrow's ``AwsStandardS3RetryStrategy``, all with ``retry_attempts()`` attempts. Each
# operation of this module then retries, with backoff, what still fails transiently; what fails
# after that is a ``TransientStorageError``, never a "not found" or "unreadable" fact.
RETRIES_ENV = "EVATOK_STORAGE_RETRIES"
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
                    "RequestTimeout", "RequestTimeoutException", "TooManyRequestsException",
                    "RequestLimitExceeded", "BandwidthLimitExceeded", "EC2ThrottledException"}
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ResponseStreamingError", "IncompleteRead", "HTTPClientError", "ClientPayloadError",
                    "ServerDisconnectedError", "ClientConnectorError", "ClientOSError", "FSTimeoutError",
                    "ResponseParserError", "ProtocolError"}


_TRANSIENT_ERRNOS = {errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EAGAIN}


def retry_attempts() -> int:
    """Attempts per request (the libraries') and per operation (this module's): ``EVATOK_STORAGE_RETRIES``,
    default 5; 1 turns retrying off."""
    try:
        return max(1, int(os.environ.get(RETRIES_ENV, "5")))
    except ValueError:
        return 5


def is_transient(e: BaseException) -> bool:
    """True if ``e`` (or what caused it) is a failure that may pass: HTTP 5xx/429, throttling, a timeout,
    a dropped or refused connection. Not found, access denied, bad requests are permanent."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, TransientStorageError):
            return True
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                          FileExistsError, UnsafePathError)):
            return False
        if isinstance(e, (TimeoutError, ConnectionError)) or type(e).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            code = (resp.get("Error") or {}).get("Code")
            status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
            if code in _TRANSIENT_CODES or int(status) >= 500 or int(status) == 429:
                return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _retrying(fn, what: str, uri: str, remote: bool):
    """``fn()``, retried with exponential backoff and jitter while it fails transiently (remote stores
    only: a local disk's errors are facts). Raises the wrapped error (``_wrap``)."""
    import random
    import time

    attempts = retry_attempts() if remote else 1
    for k in range(attempts):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001
            if k + 1 < attempts and is_transient(e):
                time.sleep(min(5.0, 0.1 * 2 ** k) * (0.5 + random.random()))
                continue
            raise _wrap(e, what, uri) from None


def _fsspec_fs(scheme: str):
    key = ("fsspec", scheme) + _env_key()
    with _FS_LOCK:
        if key in _FS_CACHE:
            return _FS_CACHE[key]
        if scheme == "file":
            import fsspec

            fs = fsspec.filesystem("file")
        elif scheme == "s3":
            import s3fs

            # No listings cache: other processes (Ray workers) write the same prefixes. Retries: see
            # "transient errors" above (botocore reads AWS_MAX_ATTEMPTS / AWS_RETRY_MODE itself).
            kw: dict[str, Any] = {}
            if not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
                kw["config_kwargs"] = {"retries": {"max_attempts": retry_attempts(), "mode": "standard"}}
            fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True, **kw)
            fs.retries = retry_attempts()  # s3fs's own (timeouts, dropped connections); a class default
        else:
            try:
                import gcsfs
            except ImportError as e:
                raise StorageError("gs:// URIs need gcsfs: pip install gcsfs") from e
            fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
        _FS_CACHE[key] = fs
        return fs


def fs_for(uri: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path within it)`` for a URI."""
    scheme, path = split_uri(uri)
    return _fsspec_fs(scheme), path


def to_pyarrow(uri: str) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path)``: pass both to ``pq.read_table`` / ``ray.data.read_parquet``."""
    import pyarrow.fs as pafs

    scheme, path = split_uri(uri)
    key = ("arrow", scheme) + _env_key()
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            if scheme == "file":
                fs = pafs.LocalFileSystem()
            elif scheme == "s3":
                endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                kw: dict[str, Any] = {}
                region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                if region:
                    kw["region"] = region
                if endpoint:
                    m = re.match(r"^(https?)://(.*)$", endpoint)
                    kw["scheme"], kw["endpoint_override"] = (m.group(1), m.group(2)) if m else ("https", endpoint)
                # Credentials: arrow's default AWS chain (env vars, config files, instance role).
                fs = pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=retry_attempts()),
                                       **kw)
            else:
                try:
                    import gcsfs  # noqa: F401
                except ImportError as e:
                    raise StorageError("gs:// URIs need gcsfs: pip install gcsfs") from e
                fs = pafs.PyFileSystem(pafs.FSSpecHandler(_fsspec_fs("gs")))
            _FS_CACHE[key] = fs
    return fs, path


def _wrap(e: Exception, what: str, uri: str) -> StorageError:
    msg = redact(f"{what} {uri}: {type(e).__name__}: {e}")
    if isinstance(e, FileNotFoundError):
        return StorageNotFound(msg)
    if is_transient(e):
        return TransientStorageError(f"{msg} (still failing after {retry_attempts()} attempts)")
    return StorageError(msg)


# ----------------------------------------------------------------------------- reading
def exists(uri: str) -> bool:
    fs, path = fs_for(uri)
    return bool(_retrying(lambda: _exists(fs, path), "exists", uri, is_remote(uri)))


def _exists(fs, path: str) -> bool:
    """``fs.exists`` that lets errors through: fsspec's own ``exists`` answers False on *any* error
    (a 503 included), which would turn a transient failure into "no such object"."""
    try:
        fs.info(path)
        return True
    except FileNotFoundError:
        return False


def _etag(d: dict) -> str | None:
    tag = d.get("ETag") or d.get("etag") or d.get("md5Hash")
    return str(tag).strip('"') if tag else None


def info(uri: str) -> tuple[int, str | None]:
    """``(size, etag)``; etag is None on local disks (ids then rest on URI + size)."""
    fs, path = fs_for(uri)
    d = _retrying(lambda: fs.info(path), "stat", uri, is_remote(uri))
    if d.get("type") == "directory":
        raise StorageError(f"{redact(uri)} is a directory")
    return int(d.get("size") or 0), _etag(d)


def list_files(uri: str, suffixes: Iterable[str] | None = None) -> list[tuple[str, int, str | None]]:
    """Every file under ``uri`` (recursive; or ``uri`` itself if it is a file), sorted by URI,
    as ``(uri, size, etag)``. ``suffixes`` filters case-insensitively (e.g. ``(".mp4", ".avi")``).
    A missing prefix lists as empty."""
    scheme, _ = split_uri(uri)
    fs, path = fs_for(uri)
    sfx = tuple(s.lower() for s in suffixes) if suffixes else None

    def listing():
        try:
            d = fs.info(path)
        except FileNotFoundError:
            return {}
        return {path: d} if d.get("type") != "directory" else fs.find(path, detail=True)

    found = _retrying(listing, "list", uri, is_remote(uri))
    out = []
    for p, d in found.items():
        if d.get("type") == "directory" or p.endswith("/"):
            continue
        if sfx and not p.lower().endswith(sfx):
            continue
        if scheme == "file" and not p.startswith("/"):
            p = "/" + p
        out.append((_uri(scheme, p), int(d.get("size") or 0), _etag(d)))
    out.sort()
    return out


def local_symlinks(uri: str) -> list[tuple[str, str | None, bool, bool]]:
    """Every symbolic link under a local directory, never followed, as ``(uri, target, is_dir,
    inside)``: ``target`` is the fully resolved path (None if the link dangles), ``inside`` tells
    whether it lies within ``uri``'s own resolved tree. Object stores have no links: ``[]``.

    ``list_files`` lists a linked *file* like any file and never descends a linked *folder*; this is
    what a caller needs to decide which links it may follow (ingest: only those that stay inside)."""
    scheme, root = split_uri(uri)
    if scheme != "file" or not os.path.isdir(root):
        return []
    real_root = os.path.realpath(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: a linked folder is not entered
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                continue
            try:
                target = os.path.realpath(p, strict=True)
            except OSError:  # dangling, or a loop
                out.append((p, None, False, False))
                continue
            inside = os.path.commonpath([target, real_root]) == real_root
            out.append((p, target, os.path.isdir(target), inside))
    out.sort()
    return out


def read_bytes(uri: str) -> bytes:
    fs, path = fs_for(uri)
    return _retrying(lambda: fs.cat_file(path), "read", uri, is_remote(uri))


def open_read(uri: str):
    """A binary file object for streaming reads (reading cannot publish anything, so this is safe)."""
    fs, path = fs_for(uri)
    try:
        return fs.open(path, "rb")
    except Exception as e:  # noqa: BLE001
        raise _wrap(e, "open", uri) from None


_SHA_CACHE: dict[tuple, str] = {}


def sha256(uri: str, chunk: int = 8 << 20) -> str:
    """Hex SHA-256 of an object's bytes, streamed (a content digest: unlike size or etag it changes
    whenever the bytes do). Local files are cached per process by (path, size, mtime)."""
    import hashlib

    local = local_path(uri)
    key = None
    if local is not None:
        try:
            st = os.stat(local)
        except OSError as e:
            raise _wrap(e, "stat", uri) from None
        key = (str(local), st.st_size, st.st_mtime_ns)
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    h = hashlib.sha256()
    try:
        with open_read(uri) as f:
            while True:
                block = f.read(chunk)
                if not block:
                    break
                h.update(block)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _wrap(e, "read", uri) from None
    out = h.hexdigest()
    if key is not None:
        _SHA_CACHE[key] = out
    return out


# ----------------------------------------------------------------------------- writing
def write_bytes_atomic(uri: str, data: bytes, exclusive: bool = False) -> bool:
    """Publish ``data`` under ``uri`` all at once, or not at all.

    Returns True if written, False if ``exclusive`` and the object already existed."""
    scheme, path = split_uri(uri)
    data = bytes(data)
    if scheme == "file":
        d = os.path.dirname(path)
        try:
            _makedirs_durable(d)
        except OSError as e:
            raise _wrap(e, "write", uri) from None
        tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)  # fails if path exists: create-if-absent, atomically
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
            # The rename lives in the directory: without this a power loss can keep a marker written
            # later while losing this rename (the data's bytes are durable, its name is not).
            _fsync_dir(d)
            return True
        except OSError as e:
            raise _wrap(e, "write", uri) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    fs = _fsspec_fs(scheme)

    def put() -> bool:
        if exclusive:
            if _exists(fs, path):
                return False
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            except Exception as e:  # noqa: BLE001
                if "PreconditionFailed" in str(e) or "412" in str(e):
                    return False
                raise
        else:
            fs.pipe_file(path, data)
        return True

    return _retrying(put, "write", uri, True)


def _fsync_dir(d: str) -> None:
    """Make a directory's entries (a rename, a new file or folder in it) durable."""
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(d: str) -> None:
    """``os.makedirs(d, exist_ok=True)``, then fsync the parent of every folder it created, so a
    published file's folder cannot vanish after a power loss either."""
    missing = []
    p = os.path.abspath(d)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if not missing:
        return
    os.makedirs(d, exist_ok=True)
    for p in reversed(missing):
        _fsync_dir(os.path.dirname(p))


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = fs_for(uri)

    def rm() -> None:
        if _exists(fs, path):
            fs.rm(path, recursive=recursive)

    _retrying(rm, "remove", uri, is_remote(uri))


def write_parquet(table: pa.Table, uri: str, exclusive: bool = False, compression: str = "zstd") -> bool:
    """Serialise ``table`` in memory, then publish it atomically (never a partial Parquet file)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    return write_bytes_atomic(uri, buf.getvalue(), exclusive=exclusive)


def list_parquet(uri: str) -> list[str]:
    """Sorted ``.parquet`` files under ``uri`` (hidden/temp names excluded)."""
    return [u for u, _, _ in list_files(uri, (".parquet",))
            if not PurePosixPath(split_uri(u)[1]).name.startswith((".", "_"))]


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, or every Parquet file under a prefix (sorted, concatenated)."""
    fs, path = to_pyarrow(uri)
    files = list_parquet(uri)
    if not files:
        raise StorageNotFound(f"no parquet data at {redact(uri)}")
    try:
        tables = [pq.read_table(split_uri(f)[1], filesystem=fs, columns=columns) for f in files]
    except Exception as e:  # noqa: BLE001
        raise _wrap(e, "read parquet", uri) from None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def torch_save(obj: Any, uri: str) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(uri, buf.getvalue())


def torch_load(uri: str, map_location: str = "cpu") -> Any:
    """``torch.load(weights_only=True)``: a checkpoint from storage can never run code."""
    import torch

    return torch.load(io.BytesIO(read_bytes(uri)), map_location=map_location, weights_only=True)


# ----------------------------------------------------------------------------- completion markers
def mark_done(uri: str, info: dict | None = None) -> None:
    """Publish ``<uri>/_DONE.json`` (write it LAST, after every output under ``uri``)."""
    write_bytes_atomic(join(uri, DONE_MARKER), json.dumps(info or {}, sort_keys=True, default=str).encode())


def is_done(uri: str) -> bool:
    return exists(join(uri, DONE_MARKER))


def read_done(uri: str) -> dict | None:
    try:
        return json.loads(read_bytes(join(uri, DONE_MARKER)))
    except StorageNotFound:
        return None


# ----------------------------------------------------------------------------- secrets and redaction
# Environment variables that hold credentials, by exact name, and by a word in the name (the
# ``*SECRET*`` / ``*TOKEN*`` / ``*PASSWORD*`` families and friends). ``is_secret_env`` decides both
# what ``redact`` strips and what is never copied into Ray metadata (``workflows/train/loop.py``).
SECRET_ENV_NAMES = frozenset({
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
})
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|API_KEY|PRIVATE_KEY", re.I)
# Values of name-matched variables shorter than this are not treated as secrets: a name match such as
# TOKENIZERS_PARALLELISM=false must not turn every "false" in a message into "***".
_MIN_PATTERN_SECRET = 6
_PROFILE_SECRET_KEYS = ("aws_secret_access_key", "aws_session_token", "aws_security_token", "aws_access_key_id")

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s?#]*)@")
_REDACTIONS = [
    # user:password@ in any URI (up to the last '@' before the path, so a password holding '@' goes too)
    (_USERINFO, r"\1***@"),
    # key=value / key: value where the key ends in a credential word (aws_secret_access_key=..., X-Amz-
    # Signature=..., token: ..., MLFLOW_TRACKING_PASSWORD=...); "total_tokens: 5" is left alone.
    (re.compile(r"(?i)\b([a-z0-9_.-]*(?:secret|token|password|passwd|signature|credential|access_key|"
                r"secret_key|key_id))(\s*[=:]\s*)(['\"]?)[^\s&'\",;]+"), r"\1\2\3***"),
    # HTTP authorization values that end up in exception texts
    (re.compile(r"(?i)\b(bearer|basic)\s+[a-z0-9._~+/=-]{8,}"), r"\1 ***"),
]


def is_secret_env(name: str) -> bool:
    """True for an environment variable that holds a credential (by exact name or by a word in it)."""
    return name.upper() in SECRET_ENV_NAMES or bool(_SECRET_NAME.search(name))


def has_userinfo(value: str) -> bool:
    """True if ``value`` holds a URI with ``user[:password]@`` (e.g. an MLflow URI with basic auth)."""
    return bool(_USERINFO.search(str(value)))


_PROFILE_CACHE: dict[str, Any] = {"key": None, "values": frozenset()}


def _aws_profile_secrets() -> frozenset[str]:
    """Secret values of every profile in the AWS config and shared-credentials files.

    Read through botocore's own session (``full_config`` merges both files, honouring
    ``AWS_CONFIG_FILE`` / ``AWS_SHARED_CREDENTIALS_FILE``), which only parses the files: no network,
    no credential-provider chain. Every profile, not only the active one: ``source_profile`` and role
    chains read others, and a secret is a secret whichever profile holds it. Cached until either
    file's size or mtime changes (redact runs once per error row)."""
    paths = [os.path.expanduser(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")),
             os.path.expanduser(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"))]
    key = []
    for p in paths:
        try:
            st = os.stat(p)
            key.append((p, st.st_mtime_ns, st.st_size))
        except OSError:
            key.append((p, None, None))
    key = tuple(key)
    if _PROFILE_CACHE["key"] == key:
        return _PROFILE_CACHE["values"]
    values: set[str] = set()
    if any(k[1] is not None for k in key):
        try:
            import botocore.session

            profiles = botocore.session.Session().full_config.get("profiles", {})
        except Exception:  # noqa: BLE001 - no botocore, or an unparsable file: nothing to add
            profiles = {}
        for prof in profiles.values():
            for name in _PROFILE_SECRET_KEYS:
                v = prof.get(name) if isinstance(prof, dict) else None
                if isinstance(v, str) and len(v) >= 4:
                    values.add(v)
    _PROFILE_CACHE.update(key=key, values=frozenset(values))
    return _PROFILE_CACHE["values"]


def secret_values() -> list[str]:
    """Every secret this process knows, longest first: values of secret environment variables,
    passwords inside URIs held by any environment variable, and AWS profile secrets."""
    vals: set[str] = set(_aws_profile_secrets())
    for k, v in os.environ.items():
        if not v:
            continue
        if k.upper() in SECRET_ENV_NAMES and len(v) >= 4:
            vals.add(v)
        elif _SECRET_NAME.search(k) and len(v) >= _MIN_PATTERN_SECRET:
            vals.add(v)
        for m in _USERINFO.finditer(v):
            user, _, pw = m.group(2).partition(":")
            if len(pw) >= 4:
                vals.add(pw)
    return sorted(vals, key=len, reverse=True)


def redact(text: Any) -> str:
    """Strip credentials from text: the value of every secret this process knows (``secret_values``:
    secret env vars such as AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD/TOKEN, any *SECRET*/
    *TOKEN*/*PASSWORD* variable, AWS profile secrets), ``user:pass@`` in URIs, ``key=value`` secrets
    and signed-URL query parameters, and HTTP ``Bearer``/``Basic`` credentials."""
    s = str(text)
    for v in secret_values():
        s = s.replace(v, "***")
    for pat, rep in _REDACTIONS:
        s = pat.sub(rep, s)
    return s


def is_remote(uri: str) -> bool:
    return split_uri(uri)[0] in _REMOTE


def local_path(uri: str) -> Path | None:
    """The local ``Path`` of a local URI, else None."""
    scheme, path = split_uri(uri)
    return Path(path) if scheme == "file" else None
