"""Datasets the project makes itself: the synthetic class-labeled videos, at any URI.

``evatok.synthetic`` writes to a local directory (the method layer never touches cloud storage);
this wraps it so ``evatok synth s3://bucket/videos`` works: the files are made in a temporary
directory and each is published atomically under the target prefix, with a manifest whose URIs
point at their final location.
"""
from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

from evatok import synthetic
from workflows import storage


def write_synthetic(out_uri: str, n: int, seed: int = 0, **video_kwargs) -> str:
    """Write ``n`` synthetic mp4s + ``manifest.csv`` (uri,label) under ``out_uri``; return the manifest URI."""
    local = storage.local_path(out_uri)
    if local is not None:
        return str(synthetic.write_dataset(local, n=n, seed=seed, **video_kwargs))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = synthetic.write_dataset(tmp, n=n, seed=seed, relative=True, **video_kwargs)
        rows = list(csv.DictReader(manifest.open()))
        for row in rows:
            uri = storage.join(out_uri, row["uri"])
            storage.write_bytes_atomic(uri, (Path(tmp) / row["uri"]).read_bytes())
            row["uri"] = uri
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["uri", "label"])
        writer.writeheader()
        writer.writerows(rows)
        manifest_uri = storage.join(out_uri, "manifest.csv")
        storage.write_bytes_atomic(manifest_uri, buf.getvalue().encode())
    return manifest_uri
