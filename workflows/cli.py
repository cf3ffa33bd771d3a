"""The ``evatok`` command line: one command per stage, all driven by one recipe file.

Every command takes ``-c/--config RECIPE.yaml`` and any number of ``key=value`` overrides::

    evatok synth runs/videos --n 64
    evatok ingest -c configs/tiny.yaml ingest.source=runs/videos ingest.output=runs/tiny
    evatok label  -c configs/tiny.yaml label.clips=runs/tiny/clips label.proxy=runs/tiny/proxy.pt
    evatok relabel -c configs/tiny.yaml label.w_q=1.4 label.w_l=0.6
    evatok train proxy -c configs/tiny.yaml

The same commands run on a cluster through ``evatok submit -c RECIPE STAGE ... --address http://HEAD:8265``
(``workflows/submit.py``): stages connect to the cluster in ``RAY_ADDRESS`` (or start a local Ray when
there is none).
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


def _stage_commands() -> list[str]:
    """Commands ``submit`` may run on a cluster: every command that takes a recipe (-c), except itself and
    ``config`` (which only prints)."""
    import inspect

    names = []
    for c in app.registered_commands:
        name = c.name or c.callback.__name__.replace("_", "-")
        if name not in ("submit", "config") and "config" in inspect.signature(c.callback).parameters:
            names.append(name)
    return names


@app.command()
def submit(
    config: Optional[Path] = ConfigOpt,
    args: Optional[list[str]] = typer.Argument(
        None, show_default=False, help="Stages (ingest, label, relabel, train MODEL, ...) and key=value overrides."),
    address: Optional[str] = typer.Option(None, "--address", "-a", help="Job server, e.g. http://HEAD:8265 "
                                          "(default: $RAY_ADDRESS)."),
    env_name: Optional[list[str]] = typer.Option(
        None, "--env-name", "-e", help="A variable the job needs from the cluster's own environment; "
                                        "its NAME only is sent, never a value (repeatable)."),
    working_dir: Optional[Path] = typer.Option(None, help="Code to upload (default: this checkout)."),
    allow_local_paths: bool = typer.Option(
        False, "--allow-local-paths", help="Remote cluster with one shared filesystem on every node: "
                                           "allow local work_dir/outputs."),
    wait: bool = typer.Option(True, help="Stream the logs and exit with the job's status (--no-wait: print "
                                         "the job id and return)."),
    status: Optional[str] = typer.Option(None, "--status", metavar="JOB_ID", help="Show a job's status."),
    logs: Optional[str] = typer.Option(None, "--logs", metavar="JOB_ID", help="Print (and follow) a job's logs."),
    stop: Optional[str] = typer.Option(None, "--stop", metavar="JOB_ID", help="Stop a job."),
) -> None:
    """Run stages on a Ray cluster (Job Submission SDK): upload this checkout, stream logs, exit 0/1 as the job."""
    from workflows import submit as sub

    try:
        if sum(x is not None for x in (status, logs, stop)) > 1:
            raise sub.SubmitError("give one of --status, --logs, --stop")
        if status:
            code = sub.status(status, address)
        elif logs:
            code = sub.logs(logs, address)
        elif stop:
            code = sub.stop(stop, address)
        else:
            if config is None:
                raise sub.SubmitError("-c/--config RECIPE is required to submit stages")
            code = sub.submit(config, list(args or []), address=address, stage_commands=_stage_commands(),
                              env_names=env_name or [], working_dir=working_dir,
                              allow_local_paths=allow_local_paths, wait=wait)
    except sub.SubmitError as e:
        from rich.markup import escape

        console.print(f"[red]submit:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2)
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
