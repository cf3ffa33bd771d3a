"""The ``evatok`` command line: one command per stage, all driven by one recipe file.

Every command takes ``-c/--config RECIPE.yaml`` and any number of ``key=value`` overrides::

    evatok run -c configs/tiny.yaml          # the whole pipeline (workflows/run.py); rerun = no work
    evatok status -c configs/tiny.yaml       # what is done / partial / missing / stale
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
import sys
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


ForceOpt = typer.Option(False, "--force", help="Replace outputs made from other settings or inputs (stale) "
                                               "with a fresh run, instead of refusing.")
DebugOpt = typer.Option(False, "--debug", help="Show the full traceback of a failure.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show Ray's own logs (worker output, progress bars).")


def _load(config: Optional[Path], overrides: Optional[list[str]]) -> Config:
    from workflows.config import absolute_uris

    try:
        return absolute_uris(load_config(config, overrides or []))
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {e}", markup=True, highlight=False)
        raise typer.Exit(2)


def _fail(prefix: str, e: BaseException, code: int, debug: bool) -> None:
    """One line with the cause (the traceback too with --debug), then exit ``code``."""
    from rich.markup import escape

    from workflows.run import one_line

    if debug:
        import traceback

        traceback.print_exception(e, file=sys.stderr)
    hint = "" if debug else " (--debug for the traceback)"
    console.print(f"[red]{escape(prefix)}:[/red] {escape(one_line(e))}{hint}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _guarded(fn, debug: bool):
    """Run ``fn``; config/usage errors and refusals exit 2, stage failures 1, Ctrl-C 130."""
    from workflows.fingerprint import StaleOutputError
    from workflows.run import StageFailed

    try:
        return fn()
    except typer.Exit:
        raise
    except ConfigError as e:
        _fail("config error", e, 2, debug)
    except StaleOutputError as e:
        _fail("refused", e, 2, debug)
    except StageFailed as e:
        _fail(f"stage {e.stage} failed", e, 1, debug)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]; rerun the same command to resume")
        raise typer.Exit(130)
    except Exception as e:  # noqa: BLE001 - any other failure: one line, exit 1
        _fail("failed", e, 1, debug)


def _stages(config: Optional[Path], overrides: Optional[list[str]], names: Optional[list[str]], *, force: bool,
            debug: bool, verbose: bool, parent: bool, target: Optional[str] = None):
    """Resolve the plan and run stages (all when ``names`` is None) through ``workflows.run.Runner``.
    A recipe's pretrained files (``pretrained:``) are checked first, before any Ray work."""
    from workflows.config import check_pretrained
    from workflows.run import Runner, resolve

    def go():
        plan = resolve(config, overrides or [], target=target)
        check_pretrained([plan.base, *(c for m, c in plan.models.items() if names is None or m in names)],
                         recipe=str(config) if config else None)
        runner = Runner(plan, force=force, verbose=verbose, parent=parent)
        return runner, runner.run(names)
    return _guarded(go, debug)


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
def run(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg, force: bool = ForceOpt,
        debug: bool = DebugOpt, verbose: bool = VerboseOpt) -> None:
    """The whole pipeline: ingest, train proxy, label, train router, final, tokenize, AR, evaluate; what is up
    to date is skipped.

    Outputs default to work_dir/{videos,data,proxy,label,router,final,codes,ar,eval}; with no ingest.source a synthetic
    dataset is written first. Each stage is one MLflow run under one parent run."""
    import time

    from workflows.run import mlflow_hint, stage_names

    t0 = time.perf_counter()
    runner, outcomes = _stages(config, overrides, None, force=force, debug=debug, verbose=verbose, parent=True)
    ran = [o.stage for o in outcomes if o.action == "ran"]
    out = Console(highlight=False)
    if ran:
        out.print(f"pipeline finished in {time.perf_counter() - t0:.1f}s: ran {', '.join(ran)}; "
                  f"up to date: {', '.join(o.stage for o in outcomes if o.action != 'ran') or 'none'}"
                  + (f"; MLflow parent run {runner.parent_run_id}" if runner.parent_run_id else ""), soft_wrap=True)
    else:
        out.print(f"nothing to do: all {len(stage_names())} stages are up to date", soft_wrap=True)
    recipe = f" -c {config}" if config else ""
    out.print(f"stage table: evatok status{recipe}\nMLflow UI:   {mlflow_hint(runner.tracking_uri)}",
              soft_wrap=True, markup=False)


@app.command()
def status(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
           debug: bool = DebugOpt) -> None:
    """The pipeline's stages: done / partial (how much) / missing / stale, outputs, MLflow runs, durations."""
    from workflows.run import Runner, mlflow_hint, resolve, status_table

    def go():
        runner = Runner(resolve(config, overrides or []))
        return runner, runner.status()
    runner, rows = _guarded(go, debug)
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=200)
    out.print(status_table(rows, title=f"evatok pipeline: {runner.plan.base.name} in {runner.plan.work_dir}"))
    out.print(f"MLflow UI: {mlflow_hint(runner.tracking_uri)}", soft_wrap=True, markup=False)


@app.command()
def ingest(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
           force: bool = ForceOpt, debug: bool = DebugOpt, verbose: bool = VerboseOpt) -> None:
    """Decode videos (any URI, UCF-101 tree, or manifest) into Parquet shards of fixed clips."""
    _stages(config, overrides, ["ingest"], force=force, debug=debug, verbose=verbose, parent=False)


@app.command()
def label(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
          force: bool = ForceOpt, debug: bool = DebugOpt, verbose: bool = VerboseOpt) -> None:
    """Score all 625 assignments of every clip with the proxy tokenizer; write scores/, stats, labels/."""
    _stages(config, overrides, ["label"], force=force, debug=debug, verbose=verbose, parent=False)


@app.command()
def relabel(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """New reward weights or metric -> new labels from scores/ alone (no model, no Ray)."""
    from workflows.relabel import run_relabel

    from workflows.run import LabelStage, resolve

    def go():
        plan = resolve(config, overrides or [])
        summary = run_relabel(plan.base)
        try:  # so that `evatok run` with these weights finds them done
            LabelStage().adopt(plan.base, plan)
        except Exception:  # noqa: BLE001 - the labels are written; a missing proxy only costs the record
            pass
        return summary
    _show("relabel", _guarded(go, False))


@app.command()
def train(
    model: str = typer.Argument(..., help="proxy | router | final | ar | classifier"),
    config: Optional[Path] = ConfigOpt,
    overrides: Optional[list[str]] = OverridesArg,
    force: bool = ForceOpt, debug: bool = DebugOpt, verbose: bool = VerboseOpt,
) -> None:
    """Train one model with the shared Ray Train + DeepSpeed loop; skips a finished run made from the same
    config and inputs, resumes an interrupted one."""
    from workflows.config import MODELS

    if model not in MODELS:
        console.print(f"[red]config error:[/red] unknown model {model!r}; choose from {', '.join(MODELS)}")
        raise typer.Exit(2)
    _stages(config, overrides, [model], force=force, debug=debug, verbose=verbose, parent=False, target=model)


@app.command()
def tokenize(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
             force: bool = ForceOpt, debug: bool = DebugOpt, verbose: bool = VerboseOpt) -> None:
    """Each clip's assignment (tokenize.mode: router | uniform:<count> | labels | budget:<mean tokens>)
    encoded by the final tokenizer into codes/, which `train ar` reads (docs/evaluate.md)."""
    _stages(config, overrides, ["tokenize"], force=force, debug=debug, verbose=verbose, parent=False)


@app.command()
def evaluate(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
             force: bool = ForceOpt, debug: bool = DebugOpt, verbose: bool = VerboseOpt) -> None:
    """Held-out reconstruction quality against mean tokens: uniform, router, budgets, labels (oracle),
    threshold baseline; the table, plots and MLflow run (docs/evaluate.md)."""
    _stages(config, overrides, ["evaluate"], force=force, debug=debug, verbose=verbose, parent=False)


@app.command()
def generate(config: Optional[Path] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg,
             debug: bool = DebugOpt) -> None:
    """Class-conditional samples of the AR model, decoded by the final tokenizer: mp4 files, an image grid,
    the tokens each sample used, and the generation metrics (docs/generate.md)."""
    from workflows.generate import PROTOCOL, run_generate

    cfg = _load(config, overrides)
    r = _guarded(lambda: run_generate(cfg), debug)
    table = Table(title=f"generate: {r.well_formed}/{r.samples} well-formed samples -> {r.output}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in r.metrics.items():
        if not k.startswith(PROTOCOL):
            table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)
    Console(highlight=False).print(f"grid: {r.grid}\ntokens: {r.tokens}\nMLflow run: {r.mlflow_run_id or '-'}",
                                   soft_wrap=True, markup=False)


@app.command()
def compare(
    targets: Optional[list[str]] = typer.Argument(
        None, show_default=False, help="Run ids, experiment names or parent (pipeline) run ids; key=value "
                                       "overrides too. None: the runs of the recipe's experiment."),
    config: Optional[Path] = ConfigOpt,
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Directory/URI for compare.csv and curves.png."),
    metric: str = typer.Option("psnr", help="Quality metric of the curves (psnr, ssim, mse, lpips)."),
    debug: bool = DebugOpt,
) -> None:
    """Side-by-side key figures of runs from MLflow and their quality-cost curves in one PNG (docs/compare.md)."""
    from workflows.compare import run_compare

    items = list(targets or [])
    cfg = _load(config, [t for t in items if "=" in t])
    r = _guarded(lambda: run_compare(cfg, [t for t in items if "=" not in t], out=out, metric=metric), debug)
    Console().print(r.table())
    if r.left_out:
        Console(highlight=False).print(f"left out (none of the figures): {', '.join(r.left_out)}", soft_wrap=True,
                                       markup=False)
    Console(highlight=False).print(f"curves: {r.png or '-'}\ntable: {r.csv or '-'}\n"
                                   f"MLflow run: {r.mlflow_run_id or '-'}", soft_wrap=True, markup=False)


def _stage_commands() -> list[str]:
    """Commands ``submit`` may run on a cluster: every command that takes a recipe (-c), except itself and
    ``config`` (which only prints)."""
    import inspect

    names = []
    for c in app.registered_commands:
        name = c.name or c.callback.__name__.replace("_", "-")
        if name not in ("submit", "config", "status") and "config" in inspect.signature(c.callback).parameters:
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
