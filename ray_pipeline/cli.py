"""The `distill` command: the whole loop, each stage, the teacher simulator, job submission.

The job scripts in ``jobs/`` run exactly these commands (``job``), so a stage behaves the same
from a shell and under ``ray job submit``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
import typer.core

from ray_pipeline.config import ConfigError, DistillConfig, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Distil a teacher LLM into a small student on Ray. Start with: distill run configs/quickstart.yaml",
)

ConfigArg = Annotated[Path, typer.Argument(help="Run config (YAML).", exists=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field: --set train.epochs=2 (repeatable)."),
]
RunIdOpt = Annotated[
    str | None,
    typer.Option(
        help="Run folder to use (default: a new one for `run`/`generate`, else the newest of this config's name)."
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)."),
]

# Exit codes: 2 a config or command-line problem; 3 stopped on purpose (the teacher budget).
EXIT_USAGE, EXIT_STOPPED = 2, 3


def _setup_logging() -> None:
    # Client libraries log every HTTP request at INFO: the progress lines say more, briefer.
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def _load(config: Path, overrides: list[str] | None) -> DistillConfig:
    """The config, its output paths resolved (a relative one under a Ray job is refused)."""
    from ray_pipeline.run_state import resolve_storage

    try:
        return resolve_storage(load_config(config, overrides or []))
    except (ConfigError, ValueError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(EXIT_USAGE) from None


def _run(
    stages: list[str] | None,
    config: Path,
    overrides: list[str] | None,
    run_id: str | None,
    address: str | None,
    retry_failed: bool = False,
    until: str | None = None,
) -> None:
    """The whole loop (`stages` None) or the given stages, in a run folder: a new one for the
    loop and for generate, else (and for --retry-failed) --run-id or the newest of the config's
    name. Prints where the report is."""
    from ray_pipeline.pipeline import RunStopped, run_all, run_stages
    from ray_pipeline.run_state import StorageError, latest_run_id

    _setup_logging()
    cfg = _load(config, overrides)
    continues = stages is not None and (stages != ["generate"] or retry_failed)
    if run_id is None and continues:
        run_id = latest_run_id(cfg)
        if run_id is None:
            typer.echo(
                f"no earlier run of '{cfg.run.name}' in {cfg.run.output_dir}/: run "
                f"`distill generate {config}` (or `distill run {config}`) first",
                err=True,
            )
            raise typer.Exit(EXIT_USAGE)
        typer.echo(f"continuing run {run_id}", err=True)
    try:
        if stages is None:
            result = run_all(cfg, run_id, address, until)
        else:
            options = {"generate": {"retry_failed": retry_failed}}
            result = run_stages(cfg, stages, run_id, address, options)
    except RunStopped as e:
        typer.echo(f"stopped: {e}", err=True)
        raise typer.Exit(EXIT_STOPPED) from None
    except StorageError as e:  # the run folder's URI cannot be reached
        typer.echo(str(e), err=True)
        raise typer.Exit(EXIT_USAGE) from None
    typer.echo(f"report: {result.report_location}")


@app.command()
def run(
    config: ConfigArg,
    set: SetOpt = None,
    run_id: RunIdOpt = None,
    address: AddressOpt = None,
    until: Annotated[
        str | None,
        typer.Option(help="Stop after this stage, e.g. --until curate builds only the dataset."),
    ] = None,
) -> None:
    """Run the whole loop: generate, curate, train, sweep, evaluate, serve."""
    from ray_pipeline.run_state import STAGES

    if until is not None and until not in STAGES:
        typer.echo(f"--until {until!r} is not a stage; stages: {', '.join(STAGES)}", err=True)
        raise typer.Exit(EXIT_USAGE)
    _run(None, config, set, run_id, address, until=until)


@app.command()
def generate(
    config: ConfigArg,
    set: SetOpt = None,
    run_id: RunIdOpt = None,
    address: AddressOpt = None,
    retry_failed: Annotated[
        bool,
        typer.Option(
            help="Re-send only the rows the teacher failed (or the budget refused) in --run-id / "
            "the newest run."
        ),
    ] = False,
) -> None:
    """Run only the generate stage, in a new run folder (or, with --retry-failed, an old one)."""
    _run(["generate"], config, set, run_id, address, retry_failed)


@app.command()
def curate(
    config: ConfigArg, set: SetOpt = None, run_id: RunIdOpt = None, address: AddressOpt = None
) -> None:
    """Run only the curate stage (in --run-id, else the newest run of this config's name)."""
    _run(["curate"], config, set, run_id, address)


@app.command()
def train(
    config: ConfigArg, set: SetOpt = None, run_id: RunIdOpt = None, address: AddressOpt = None
) -> None:
    """Run only the train stage (in --run-id, else the newest run of this config's name)."""
    _run(["train"], config, set, run_id, address)


@app.command()
def sweep(
    config: ConfigArg, set: SetOpt = None, run_id: RunIdOpt = None, address: AddressOpt = None
) -> None:
    """Run only the sweep stage (in --run-id, else the newest run of this config's name)."""
    _run(["sweep"], config, set, run_id, address)


@app.command()
def evaluate(
    target: Annotated[
        Path,
        typer.Argument(
            help="Run config (YAML): the evaluate stage of a run. With --data: a student "
            "checkpoint directory (distill_checkpoint.json inside), scored on that file alone."
        ),
    ],
    data: Annotated[
        Path | None,
        typer.Option(help="CSV/JSONL/Parquet file to score CHECKPOINT on (no run folder)."),
    ] = None,
    text_column: Annotated[str, typer.Option(help="With --data: the input text column.")] = "text",
    label_column: Annotated[
        str,
        typer.Option(
            help="With --data: the gold column: a label task's label, a generative task's "
            "reference answer (a JSON value satisfying the checkpoint's output schema when it "
            "has one, else text)."
        ),
    ] = "label",
    json_output: Annotated[
        bool,
        typer.Option("--json", help="With --data: print the metrics as one JSON object only."),
    ] = False,
    limit: Annotated[int | None, typer.Option(help="With --data: only the first N rows.")] = None,
    batch_size: Annotated[int, typer.Option(help="With --data: rows per forward pass.")] = 32,
    max_new_tokens: Annotated[
        int, typer.Option(help="With --data: longest answer a causal-LM student writes.")
    ] = 32,
    judge: Annotated[
        Path | None,
        typer.Option(
            help="With --data, a generative checkpoint: also score every answer with the LLM "
            "judge of this run config (its evaluate.judge prompt, scale and model, asked of its "
            "teacher: the simulator when enabled, else teacher.base_url with the key from "
            "teacher.api_key_env). Without it the judge is not run (said in the output)."
        ),
    ] = None,
    set: SetOpt = None,
    run_id: RunIdOpt = None,
    address: AddressOpt = None,
) -> None:
    """Run the evaluate stage (in --run-id, else the newest run of this config's name), or
    with --data score any checkpoint on any labelled file (a generative checkpoint: against
    reference answers): distill evaluate CHECKPOINT --data FILE --text-column C
    --label-column L [--json]."""
    if data is None:
        _run(["evaluate"], target, set, run_id, address)
        return
    import json

    from ray_pipeline.evaluate.checkpoint import evaluate_checkpoint

    if not (target / "distill_checkpoint.json").is_file():
        typer.echo(
            f"{target} is not a student checkpoint (no distill_checkpoint.json in it); with "
            "--data give a checkpoint directory, e.g. runs/<id>/train/checkpoint",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    for option, path in (("--data", data), ("--judge", judge)):
        if path is not None and not path.is_file():
            typer.echo(f"{option} {path}: no such file", err=True)
            raise typer.Exit(EXIT_USAGE)
    _setup_logging()  # progress goes to stderr; stdout holds the result alone
    try:
        result = evaluate_checkpoint(
            target, data, text_column, label_column, batch_size=batch_size,
            max_new_tokens=max_new_tokens, limit=limit, judge=judge,
        )  # fmt: skip
    except ValueError as e:  # bad file, column or --judge config (ConfigError is one too)
        typer.echo(str(e), err=True)
        raise typer.Exit(EXIT_USAGE) from None
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    if result.get("task_kind") == "generative":
        _echo_generative(result)
        return
    typer.echo(
        f"{result['rows']} rows: accuracy {result['accuracy']:.4f}, balanced accuracy "
        f"{result['balanced_accuracy']:.4f}"
        + (f", ROC-AUC {result['roc_auc']:.4f}" if result["roc_auc"] is not None else "")
        + f", unparsed {result['unparsed']}"
    )
    for label, m in result["per_class"].items():
        typer.echo(
            f"  {label}: precision {m['precision']:.4f} recall {m['recall']:.4f} "
            f"f1 {m['f1']:.4f} support {m['support']}"
        )


def _echo_generative(result: dict) -> None:
    adherence = result["json_adherence"]
    typer.echo(
        f"{result['rows']} rows: exact match {result['exact_match']:.4f}, ROUGE-L "
        f"{result['rouge_l']:.4f}"
        + (f", schema adherence {adherence:.4f}" if adherence is not None else "")
        + f", unparsed {result['unparsed']}"
    )
    judge = result["judge"]
    if judge["run"]:
        score = result["judge_score"]
        typer.echo(
            f"  judge {judge['model']}: mean score "
            + (f"{score:.2f}" if score is not None else "none")
            + f" on {judge['scale'][0]}-{judge['scale'][1]}, {judge['failed']} failed"
        )
    else:
        typer.echo(f"  judge not run: {judge['reason']}")


class _ServeCommands(typer.core.TyperGroup):
    """`distill serve CONFIG` is `distill serve run CONFIG`: the command it always was."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


serve_app = typer.Typer(
    cls=_ServeCommands,
    no_args_is_help=True,
    help="Serve the run's students: `distill serve run CONFIG` (or `distill serve CONFIG`) "
    "deploys locally until Ctrl-C; `distill serve build CONFIG` writes a Serve config file.",
)
app.add_typer(serve_app, name="serve")


@serve_app.command("run")
def serve_run(
    config: ConfigArg, set: SetOpt = None, run_id: RunIdOpt = None, address: AddressOpt = None
) -> None:
    """Serve the run's students (in --run-id, else the newest run) until Ctrl-C or SIGTERM."""
    overrides = list(set or [])
    if not any(o.startswith("serve.keep_running=") for o in overrides):
        overrides.insert(0, "serve.keep_running=true")  # `distill serve` is a server
    _run(["serve"], config, overrides, run_id, address)


@serve_app.command("build")
def serve_build(
    config: ConfigArg,
    set: SetOpt = None,
    run_id: RunIdOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Where to write it (default: runs/<id>/serve/serve.yaml)."
        ),
    ] = None,
) -> None:
    """Write the Serve config file of the run's app (for `serve deploy` or a KubeRay
    RayService), with the run's student checkpoints resolved."""
    from ray_pipeline.run_state import latest_run_id, open_run
    from ray_pipeline.serving.stage import write_serve_config

    _setup_logging()
    cfg = _load(config, set)
    run_id = run_id or latest_run_id(cfg)
    if run_id is None:
        typer.echo(
            f"no earlier run of '{cfg.run.name}' in {cfg.run.output_dir}/: run "
            f"`distill run {config}` first",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    run = open_run(cfg, run_id)
    path = write_serve_config(run, output or run.paths.serve / "serve.yaml")
    run.push()  # a run on a URI: the file beside its report there too
    typer.echo(f"serve config: {path}")


@app.command()
def validate(config: ConfigArg, set: SetOpt = None) -> None:
    """Check a config and print it resolved (with every default), or list every problem."""
    import yaml

    from ray_pipeline.config import dump_config

    cfg = _load(config, set)
    typer.echo(yaml.safe_dump(dump_config(cfg), sort_keys=False))


@app.command("teacher-sim")
def teacher_sim(
    config: ConfigArg,
    set: SetOpt = None,
    host: Annotated[str | None, typer.Option(help="Default: teacher.simulator.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: teacher.simulator.port.")] = None,
    ready_file: Annotated[
        str | None, typer.Option(help="Write the base URL here once listening.")
    ] = None,
) -> None:
    """Serve the OpenAI-compatible teacher simulator a run config describes (its
    teacher.simulator section, e.g. --set teacher.simulator.rate_429=0.1) until stopped."""
    from ray_pipeline.teacher.sim_server import serve_forever
    from ray_pipeline.teacher.simulator import Simulator

    cfg = _load(config, set)
    sim = cfg.teacher.simulator
    serve_forever(
        Simulator(cfg),
        host if host is not None else sim.host,
        port if port is not None else sim.port,
        ready_file,
    )


@app.command()
def submit(
    config: ConfigArg,
    address: Annotated[
        str,
        typer.Option(
            help="The cluster's Jobs API, e.g. http://head:8265 (default: RAY_ADDRESS).",
            envvar="RAY_ADDRESS",
        ),
    ],
    job: Annotated[
        str, typer.Option(help="distill (the whole loop) or a stage: generate, curate, ...")
    ] = "distill",
    set: SetOpt = None,
    runtime_env: Annotated[
        Path | None,
        typer.Option(help="A runtime_env file to merge (e.g. cluster/runtime_env.yaml)."),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Stream the job's logs until it ends.")] = True,
) -> None:
    """Run `python -m jobs.<job> CONFIG` on a Ray cluster (Ray Jobs SDK) with this folder as
    its working_dir (.gitignore respected, no .venv or runs/); exits with the job's status
    and prints where the report is."""
    from ray_pipeline.submit import load_runtime_env
    from ray_pipeline.submit import submit as submit_job

    _load(config, set)  # fail here, not on the cluster, when the config is wrong
    try:
        extra = load_runtime_env(runtime_env)
        code = submit_job(
            address, job, str(config), set or [], working_dir=Path.cwd(), extra_env=extra,
            follow=wait, echo=typer.echo,
        )  # fmt: skip
    except ValueError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(EXIT_USAGE) from None
    raise typer.Exit(code)


def job(command: str) -> None:
    """A job script's whole body: `python -m jobs.<stage> ARGS` is `distill <stage> ARGS`
    (`jobs.distill` is `distill run`)."""
    app(args=[command, *sys.argv[1:]], prog_name=f"python -m jobs.{Path(sys.argv[0]).stem}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
