"""The CLI end to end on what needs no cluster: config printing, errors, synthetic data to S3."""
import csv
import io

import pytest
import yaml
from typer.testing import CliRunner

from workflows import storage
from workflows.cli import app

runner = CliRunner()


def test_config_prints_resolved_recipe():
    r = runner.invoke(app, ["config", "-c", "configs/tiny.yaml", "label.w_q=1.5"])
    assert r.exit_code == 0, r.output
    tree = yaml.safe_load(r.stdout)
    assert tree["label"]["w_q"] == 1.5 and tree["data"]["size"] == 64


def test_bad_override_is_a_clear_error_not_a_traceback():
    r = runner.invoke(app, ["config", "label.nope=1"])
    assert r.exit_code == 2
    assert "unknown key" in r.output and "Traceback" not in r.output


@pytest.mark.s3
def test_synth_writes_videos_and_manifest_to_s3(s3_bucket):
    out = f"s3://{s3_bucket}/videos"
    r = runner.invoke(app, ["synth", out, "--n", "3", "--seed", "1"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{out}/manifest.csv").decode())))
    assert len(rows) == 3
    for row in rows:
        assert row["uri"].startswith(out + "/")
        assert storage.read_bytes(row["uri"])[4:8] == b"ftyp"  # a real mp4
