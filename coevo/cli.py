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


@app.command("export")
def export(
    source: Annotated[
        Path,
        typer.Argument(
            help="A run folder (its config.yaml is read) or an experiment YAML: it names the "
            "dataset and the device model's size."
        ),
    ],
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            help="safetensors with the device model's parameters (bare names, or a simulation "
            "checkpoint's cloud/ group). Default: the run folder's simulation.safetensors or "
            "model.safetensors when present, else the model is pretrained on cloud-period data "
            "as the finetune strategy does and saved as model.safetensors.",
        ),
    ] = None,
    set_: SetOption = None,
    data_dir: DataDirOption = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", help="Folder to write into (default: the run folder)."),
    ] = None,
) -> None:
    """Export the device model to model.onnx (fp32) and model.int8.onnx; print sizes and parity.

    Parity is the largest absolute score difference against PyTorch on the P1 test requests.
    """
    from coevo.export import ExportError, parity, quantize_int8, to_onnx

    run_folder = source if source.is_dir() else None
    config_path = source / "config.yaml" if run_folder else source
    if not config_path.is_file():
        _fail(f"SOURCE: {config_path} not found; give a run folder or an experiment YAML")
    overrides = list(set_ or []) + ([f"data.data_dir={data_dir}"] if data_dir else [])
    config = _load(config_path, overrides)
    seed = config.seeds[0]
    try:
        from coevo.sim.experiment import build_task, load_log

        task = build_task(load_log(config, seed), config, seed)
    except DatasetError as error:
        _fail(str(error))
    folder = output or run_folder or Path(config.output_dir) / f"{config.name}-export"
    folder.mkdir(parents=True, exist_ok=True)
    model = task.device_model()
    saved = (
        [run_folder / n for n in ("simulation.safetensors", "model.safetensors")]
        if run_folder
        else []
    )
    if weights is None:
        weights = next((path for path in saved if path.is_file()), None)
    params = _device_weights(weights, task, config, seed, folder)
    missing = sorted({name for name, _ in model.named_parameters()} - set(params))
    if missing:
        _fail(f"--weights: {weights} lacks the device model's parameters {missing}")
    try:
        fp32 = to_onnx(model, params)
    except ExportError as error:
        _fail(f"--weights: {error}")
    int8 = quantize_int8(fp32)
    (folder / "model.onnx").write_bytes(fp32)
    (folder / "model.int8.onnx").write_bytes(int8)
    rows = task.split.target_rows("test")[:256]
    history = task.split.history(rows, task.shapes.device_history)
    candidates = task.split.candidates("test")[:256]
    for name, blob in (("model.onnx", fp32), ("model.int8.onnx", int8)):
        diff = parity(model, params, blob, history, candidates)
        console.print(f"{folder / name}: {len(blob):,} bytes, parity max |diff| {diff:.3g}")
    console.print(f"size ratio fp32/int8: {len(fp32) / len(int8):.2f}")


def _device_weights(
    path: Path | None, task: Any, config: RunConfig, seed: int, folder: Path
) -> dict[str, Any]:
    """Device-model weights from a safetensors file, or pretrained as finetune does."""
    import torch
    from safetensors.torch import load_file, save_file

    if path is not None:
        try:
            tensors = load_file(path)
        except Exception as error:
            _fail(f"--weights: {path} is not a readable safetensors file ({error})")
        if any(name.startswith("cloud/") for name in tensors):
            return {k.removeprefix("cloud/"): v for k, v in tensors.items() if k[:6] == "cloud/"}
        return dict(tensors)
    from coevo.strategies.finetune import Finetune, FinetuneConfig

    spec = next((s for s in config.strategies if s["name"] == "finetune"), {"name": "finetune"})
    strategy = Finetune(task, parse(FinetuneConfig, spec))
    console.print("no weights given: pretraining the device model on cloud-period data")
    params = dict(strategy.init(torch.Generator().manual_seed(seed)).tensors)
    save_file({k: v.contiguous() for k, v in params.items()}, folder / "model.safetensors")
    return params


@app.command()
def serve(
    config: Annotated[Path, typer.Argument(help="Serve YAML: a run config plus a serve section.")],
    set_: SetOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Serve CONFIG's strategy to real devices over HTTP (FastAPI, uvicorn, SQLite)."""
    from coevo.serve.launch import run_server
    from coevo.serve.settings import load_serve_config

    try:
        settings = load_serve_config(config, set_)
    except ConfigError as error:
        _fail(f"invalid configuration\n{error}")
        raise
    serve_part = settings.serve
    console.print(
        f"serving {settings.run.strategies[0]['name']} on "
        f"http://{serve_part.host}:{serve_part.port} (database {serve_part.database})"
    )
    try:
        run_server(settings, str(data_dir) if data_dir else None)
    except ValueError as error:
        _fail(str(error))


ServerOption = Annotated[
    str, typer.Option("--server", help="Server URL, e.g. http://127.0.0.1:8000")
]
GiveUpOption = Annotated[
    float, typer.Option("--give-up-s", help="Seconds the server may stay unreachable.")
]
AttackOption = Annotated[
    str | None,
    typer.Option(
        "--attack",
        help="Behave maliciously: an attack of coevo.attacks (sign_flip, scaling, noise, "
        "label_flip, backdoor, free_ride).",
    ),
]
AttackScaleOption = Annotated[
    float | None,
    typer.Option("--attack-scale", help="The attack's magnitude (factor, sigma or boost)."),
]
AttackStartOption = Annotated[
    int, typer.Option("--attack-start-round", help="First round the attack runs in.")
]
AttackSeedOption = Annotated[
    int, typer.Option("--attack-seed", help="Seed of the attack's randomness and of who attacks.")
]
SecAggOption = Annotated[
    bool, typer.Option("--secagg", help="Upload through secure aggregation (serve.secagg).")
]


def _attack_spec(name: str | None, scale: float | None, start_round: int, seed: int) -> Any:
    """The ``AttackSpec`` the --attack options describe, checked (``None`` without --attack)."""
    from coevo.serve.attack import AttackSpec

    if name is None:
        if scale is not None:
            _fail("--attack-scale: needs --attack")
        return None
    spec = AttackSpec(name, scale, start_round, seed)
    try:
        spec.build()
    except ValueError as error:
        _fail(str(error))
    return spec


PolicyOption = Annotated[
    str | None,
    typer.Option(
        "--policy",
        help="After training, serve the device period locally under this request policy "
        "(always, never, periodic, random, intellectreq), asking the cloud when it says so.",
    ),
]
PolicySettingsOption = Annotated[
    str, typer.Option("--policy-settings", help='The policy\'s config as JSON: {"every": 3}')
]
PolicyWeightsOption = Annotated[
    Path | None,
    typer.Option("--policy-weights", help="Safetensors of a learned policy's parameters."),
]
SessionsOption = Annotated[
    int, typer.Option("--sessions", help="Sessions of the device period under --policy.")
]


def _request_policy(policy: str | None, settings: str, weights: Path | None, sessions: int) -> Any:
    """The request policy the options name (None without --policy); errors name the option."""
    if sessions < 1:
        _fail(f"--sessions: {sessions} must be >= 1")
    if policy is None:
        return None
    from coevo.serve.policy import build_policy

    try:
        return build_policy(policy, settings, weights)
    except (KeyError, ValueError) as error:
        _fail(f"--policy: {error}")


@app.command()
def device(
    server: ServerOption,
    index: Annotated[int, typer.Option("--index", help="This device's index in the task.")],
    state: Annotated[Path, typer.Option("--state", help="Local state file (token, weights).")],
    data_dir: DataDirOption = None,
    infer: Annotated[str, typer.Option(help="onnx, torch or none")] = "onnx",
    give_up_s: GiveUpOption = 120.0,
    attack: AttackOption = None,
    attack_scale: AttackScaleOption = None,
    attack_start_round: AttackStartOption = 0,
    attack_seed: AttackSeedOption = 0,
    secagg: SecAggOption = False,
    policy: PolicyOption = None,
    policy_settings: PolicySettingsOption = "",
    policy_weights: PolicyWeightsOption = None,
    sessions: SessionsOption = 5,
) -> None:
    """Run one device: register, train each round it is given, upload, then infer."""
    import asyncio

    import httpx

    from coevo.serve.device import DeviceError, DeviceRuntime

    if infer not in ("onnx", "torch", "none"):
        _fail(f"--infer: unknown mode {infer!r}; choose one of: onnx, torch, none")
    spec = _attack_spec(attack, attack_scale, attack_start_round, attack_seed)
    requester = _request_policy(policy, policy_settings, policy_weights, sessions)
    service, adversary = None, None
    if spec is not None:
        from coevo.serve.launch import _fetch_config
        from coevo.serve.settings import build_service

        service = build_service(
            _fetch_config(server, give_up_s), str(data_dir) if data_dir else None
        )
        adversary = spec.build(service.task.num_items)

    async def main() -> Any:
        async with httpx.AsyncClient(base_url=server, timeout=60.0) as client:
            runtime = DeviceRuntime(
                client,
                index,
                state,
                service=service,
                data_dir=str(data_dir) if data_dir else None,
                give_up_s=give_up_s,
                infer=infer,  # type: ignore[arg-type]
                attack=adversary,
                secagg=secagg,
                policy=requester,
                sessions=sessions,
            )
            return await runtime.run()

    try:
        report = asyncio.run(main())
    except DeviceError as error:
        _fail(str(error))
    console.print(report)


@app.command()
def devices(
    server: ServerOption,
    num_devices: Annotated[int, typer.Option("-n", help="Device processes to start.")],
    first: Annotated[int, typer.Option("--first", help="Index of the first device.")] = 0,
    state_dir: Annotated[Path, typer.Option("--state-dir", help="One state file each.")] = Path(
        "coevo-devices"
    ),
    data_dir: DataDirOption = None,
    infer: Annotated[str, typer.Option(help="onnx, torch or none")] = "onnx",
    give_up_s: GiveUpOption = 120.0,
    attack: AttackOption = None,
    attack_scale: AttackScaleOption = None,
    attack_start_round: AttackStartOption = 0,
    attack_seed: AttackSeedOption = 0,
    malicious_share: Annotated[
        float,
        typer.Option("--malicious-share", help="Share of the N devices that run --attack."),
    ] = 1.0,
    secagg: SecAggOption = False,
    policy: PolicyOption = None,
    policy_settings: PolicySettingsOption = "",
    policy_weights: PolicyWeightsOption = None,
    sessions: SessionsOption = 5,
) -> None:
    """Start N device processes on this machine against SERVER and wait for them all."""
    from coevo.serve.attack import malicious_indices
    from coevo.serve.launch import launch_devices

    if infer not in ("onnx", "torch", "none"):
        _fail(f"--infer: unknown mode {infer!r}; choose one of: onnx, torch, none")
    indices = list(range(first, first + num_devices))
    requester = _request_policy(policy, policy_settings, policy_weights, sessions)
    spec = _attack_spec(attack, attack_scale, attack_start_round, attack_seed)
    malicious = None
    if spec is not None:
        try:
            malicious = malicious_indices(indices, malicious_share, attack_seed)
        except ValueError as error:
            _fail(str(error))
        console.print(f"malicious devices ({attack}): {sorted(malicious or [])}")
    codes = launch_devices(
        server,
        indices,
        state_dir,
        data_dir=str(data_dir) if data_dir else None,
        give_up_s=give_up_s,
        infer=infer,  # type: ignore[arg-type]
        attack=spec,
        malicious=malicious,
        secagg=secagg,
        policy=requester,
        sessions=sessions,
    )
    failed = [first + i for i, code in enumerate(codes) if code != 0]
    if failed:
        _fail(f"{len(failed)} of {num_devices} devices failed: {failed}")
    console.print(f"{num_devices} devices finished")
