"""The ``coevo`` command line: run | demo | validate | data."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from coevo.config import ConfigError, RunConfig, apply_overrides, dump_config, load_yaml, parse
from coevo.report import (
    MAIN_METRICS,
    CallbackList,
    RichProgress,
    RunWriter,
    aggregate,
    rich_table,
)
from coevo.tasks.log import DatasetError, describe

app = typer.Typer(help="coevo: device-cloud collaborative learning.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: facts and downloads.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# A pipe or a CI log has no width of its own; tables need about 140 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
DATASETS = ("movielens-100k", "synthetic")

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: --set strategies.3.mode=head"),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Folder with one sub-folder per dataset (else $COEVO_DATA)."),
]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


def _load(
    path: Path | None, overrides: list[str] | None, base: dict[str, Any] | None = None
) -> RunConfig:
    try:
        data = load_yaml(path) if path is not None else dict(base or {})
        data = apply_overrides(data, overrides or [])
        source = str(path) if path else "config"
        config = parse(RunConfig, data, source=source)
        from coevo.sim.experiment import model_shapes, strategy_configs

        strategy_configs(config, source)
        model_shapes(config)
        return config
    except ConfigError as error:
        _fail(f"invalid configuration\n{error}")
        raise


def _execute(config: RunConfig, output: Path | None) -> Path:
    from coevo.sim.experiment import run, run_dir_for

    run_dir = output if output is not None else run_dir_for(config)
    writer = RunWriter(title=config.name)
    progress = RichProgress(console=console)
    try:
        results = run(config, run_dir, CallbackList([writer, progress]))
    except (DatasetError, FileExistsError) as error:
        _fail(str(error))
    except ConfigError as error:
        _fail(f"invalid configuration\n{error}")
    rows = aggregate(results)
    console.print(rich_table(rows, ["note", *MAIN_METRICS], title=f"{config.name} (test, P1)"))
    console.print(f"run folder: [bold]{run_dir}[/] (report.md, rounds.jsonl, devices.csv)")
    return run_dir


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Experiment YAML.")],
    set_: SetOption = None,
    output: Annotated[Path | None, typer.Option("--output", help="Run folder to create.")] = None,
) -> None:
    """Run the experiment CONFIG describes and write a run folder with its report."""
    _execute(_load(config, set_), output)


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="Experiment YAML.")],
    set_: SetOption = None,
) -> None:
    """Check CONFIG (and overrides) without running it; print the resolved config."""
    console.print(dump_config(_load(config, set_)), end="", markup=False, highlight=False)


DEMO: dict[str, Any] = {
    "name": "demo",
    "data": {
        "name": "synthetic",
        "synthetic": {
            "num_devices": 600,
            "num_items": 400,
            "mean_interactions": 45,
            "max_interactions": 250,
            "popularity_weight": 0.5,
            "drift_scale": 1.0,
        },
    },
    "models": {"cloud": {"dim": 48}},
    "strategies": [
        {"name": "popularity"},
        {"name": "device_only"},
        {"name": "cloud_only", "train": {"epochs": 40}},
        {"name": "finetune", "pretrain": {"epochs": 40}},
        {"name": "central_oracle", "train": {"epochs": 40}},
    ],
}


@app.command()
def demo(
    dataset: Annotated[str, typer.Option(help="synthetic or movielens-100k")] = "synthetic",
    data_dir: DataDirOption = None,
    set_: SetOption = None,
    output: Annotated[Path | None, typer.Option("--output", help="Run folder to create.")] = None,
) -> None:
    """Compare the baselines (popularity, device-only, cloud-only, fine-tune, oracle)."""
    if dataset not in DATASETS:
        _fail(f"--dataset: unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    base = {**DEMO, "data": {"name": dataset, "data_dir": str(data_dir) if data_dir else None}}
    if dataset == "synthetic":
        base["data"] = DEMO["data"]
    _execute(_load(None, set_, base), output)


@data_app.command("info")
def data_info(
    dataset: Annotated[str, typer.Argument(help="movielens-100k or synthetic")],
    data_dir: DataDirOption = None,
) -> None:
    """Print users, items, interactions and the per-device size distribution."""
    from coevo.tasks.movielens import load_movielens_100k
    from coevo.tasks.synthetic import SyntheticConfig, make_world

    if dataset not in DATASETS:
        _fail(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    try:
        log = (
            load_movielens_100k(data_dir)
            if dataset == "movielens-100k"
            else make_world(SyntheticConfig(), 0)
        )
    except DatasetError as error:
        _fail(str(error))
    from rich.table import Table

    table = Table(title=dataset)
    table.add_column("fact")
    table.add_column("value", justify="right")
    for key, value in describe(log).items():
        table.add_row(
            key,
            f"{value:,.1f}"
            if isinstance(value, float)
            else f"{value:,}"
            if isinstance(value, int)
            else str(value),
        )
    console.print(table)


@data_app.command("download")
def data_download(
    dataset: Annotated[str, typer.Argument(help="movielens-100k")],
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="Where to keep it.")] = None,
    url: Annotated[str | None, typer.Option(help="Mirror URL of ml-100k.zip.")] = None,
) -> None:
    """Download MovieLens-100K from GroupLens, verify it, and keep it in a cache folder."""
    from coevo.tasks.movielens import GROUPLENS_URL, default_cache_dir, download_movielens_100k

    if dataset != "movielens-100k":
        _fail(f"only movielens-100k is downloadable (got {dataset!r})")
    target = cache_dir or default_cache_dir()
    try:
        folder = download_movielens_100k(target, url=url or GROUPLENS_URL)
    except DatasetError as error:
        _fail(str(error))
    console.print(
        f"MovieLens-100K verified in {folder}; use --data-dir {folder} or COEVO_DATA={folder}"
    )
