"""The ``evatok`` command line: one command per stage, all driven by one recipe file.

Every command takes ``-c/--config RECIPE.yaml`` and any number of ``key=value`` overrides::

    evatok synth runs/videos --n 64
    evatok ingest -c configs/tiny.yaml ingest.source=runs/videos ingest.output=runs/tiny
    evatok label  -c configs/tiny.yaml label.clips=runs/tiny/clips label.proxy=runs/tiny/proxy.pt
    evatok relabel -c configs/tiny.yaml label.w_q=1.4 label.w_l=0.6
    evatok train proxy -c configs/tiny.yaml

The same commands run on a cluster through ``ray job submit -- evatok ...``: stages connect to
the cluster in ``RAY_ADDRESS`` (or start a local Ray when there is none).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from workflows.config import Config, ConfigError, load_config, to_dict

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
console = Console(stderr=True)

ConfigOpt = typer.Option(None, "--config", "-c", exists=True, dir_okay=False, help="Recipe YAML.")
OverridesArg = typer.Argument(None, help="key=value overrides, e.g. label.w_q=1.4", show_default=False)


def _load(config: Optional[Path], overrides: Optional[list[str]]) -> Config:
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2)


def _show(title: str, summary: Any) -> None:
    data = dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else dict(summary)
    table = Table(title=title, show_header=False)
    for k, v in data.items():
        table.add_row(str(k), str(v))
    Console().print(table)


@app.command()
def config(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Print the resolved recipe (defaults + YAML + overrides) as YAML."""
    typer.echo(yaml.safe_dump(to_dict(_load(config, overrides)), sort_keys=False))


@app.command()
def synth(
    out: str = typer.Argument(..., help="Directory or URI prefix to write the videos and manifest.csv to."),
    n: int = typer.Option(64, help="Number of videos (classes round-robin)."),
    seed: int = typer.Option(0, help="Dataset seed: the same seed writes the same videos."),
) -> None:
    """Write a synthetic, class-labeled dataset of real h264 mp4 files (for demos and tests)."""
    from workflows.datasets import write_synthetic

    manifest = write_synthetic(out, n=n, seed=seed)
    console.print(f"wrote {n} videos; manifest: {manifest}")


@app.command()
def ingest(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Decode videos (any URI, UCF-101 tree, or manifest) into Parquet shards of fixed clips."""
    from workflows.ingest import run_ingest

    _show("ingest", run_ingest(_load(config, overrides)))


@app.command()
def label(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Score all 625 assignments of every clip with the proxy tokenizer; write scores/, stats, labels/."""
    from workflows.label import run_label

    _show("label", run_label(_load(config, overrides)))


@app.command()
def relabel(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """New reward weights or metric -> new labels from scores/ alone (no model, no Ray)."""
    from workflows.label import run_relabel

    _show("relabel", run_relabel(_load(config, overrides)))


@app.command()
def train(
    model: str = typer.Argument(..., help="proxy | router | final | ar"),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = OverridesArg,
) -> None:
    """Train one model with the shared Ray Train + DeepSpeed loop; resumes a run of the same name."""
    from workflows.train import run_training

    cfg = _load(config, [f"train.model={model}", *(overrides or [])])
    _show(f"train {model}", run_training(cfg))


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
