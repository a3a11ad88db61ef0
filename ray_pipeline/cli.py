"""The `distill` command: the whole loop, each stage, the teacher simulator, job submission."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

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


def _setup_logging() -> None:
    # Client libraries log every HTTP request at INFO: the progress lines say more, briefer.
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def _load(config: Path, overrides: list[str] | None) -> DistillConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    config: ConfigArg, set: SetOpt = None, run_id: RunIdOpt = None, address: AddressOpt = None
) -> None:
    """Run the whole loop: generate, curate, train, sweep, evaluate, serve."""
    from ray_pipeline.pipeline import RunStopped, run_all

    _setup_logging()
    cfg = _load(config, set)
    try:
        result = run_all(cfg, run_id, address)
    except RunStopped as e:
        typer.echo(f"stopped: {e}", err=True)
        raise typer.Exit(3) from None
    typer.echo(f"report: {result.dir / 'report.md'}")


def _stage_command(stage: str):
    def command(
        config: ConfigArg,
        set: SetOpt = None,
        run_id: RunIdOpt = None,
        address: AddressOpt = None,
        retry_failed: bool = False,
    ) -> None:
        from ray_pipeline.pipeline import RunStopped, latest_run_id, run_stages

        _setup_logging()
        overrides = list(set or [])
        if stage == "serve" and not any(o.startswith("serve.keep_running=") for o in overrides):
            overrides.insert(0, "serve.keep_running=true")  # `distill serve` is a server
        cfg = _load(config, overrides)
        if run_id is None and (stage != "generate" or retry_failed):
            run_id = latest_run_id(cfg)
            if run_id is None:
                typer.echo(
                    f"no earlier run of '{cfg.run.name}' in {cfg.run.output_dir}/; run `distill generate {config}` first",
                    err=True,
                )
                raise typer.Exit(2)
            typer.echo(f"continuing run {run_id}", err=True)
        try:
            result = run_stages(
                cfg, [stage], run_id, address, {"generate": {"retry_failed": retry_failed}}
            )
        except RunStopped as e:
            typer.echo(f"stopped: {e}", err=True)
            raise typer.Exit(3) from None
        typer.echo(f"report: {result.dir / 'report.md'}")

    if stage != "generate":  # --retry-failed only exists for generate

        def command_without_retry(
            config: ConfigArg,
            set: SetOpt = None,
            run_id: RunIdOpt = None,
            address: AddressOpt = None,
        ) -> None:
            command(config, set, run_id, address)

        command_without_retry.__doc__ = (
            f"Run only the {stage} stage (in --run-id, else the newest run of this config's name)."
        )
        return command_without_retry
    command.__doc__ = (
        "Run only the generate stage in a new run folder; with --retry-failed, re-send only "
        "the rows the teacher failed (or the budget refused) in --run-id / the newest run."
    )
    return command


for _stage in ("generate", "curate", "train", "sweep", "evaluate", "serve"):
    app.command(name=_stage)(_stage_command(_stage))


@app.command()
def validate(config: ConfigArg, set: SetOpt = None) -> None:
    """Check a config and print it resolved (with every default), or list every problem."""
    import yaml

    from ray_pipeline.config import dump_config

    cfg = _load(config, set)
    typer.echo(yaml.safe_dump(dump_config(cfg), sort_keys=False))


@app.command("teacher-sim")
def teacher_sim(
    from_config: Annotated[
        Path | None, typer.Option(help="Build the simulator a run config describes.")
    ] = None,
    replay: Annotated[
        list[Path] | None, typer.Option(help="Recorded responses (CSV/JSONL/Parquet); repeatable.")
    ] = None,
    replay_input_field: str = "comment_text",
    replay_response_field: str = "simple_prompt",
    prompt_file: Annotated[
        Path | None, typer.Option(help="Prompt template used to recover inputs from prompts.")
    ] = None,
    placeholder: str = "%s",
    rule: Annotated[
        str | None, typer.Option(help="'quickstart': answer the synthetic task by its rule.")
    ] = None,
    label_key: str = "toxic",
    error_rate: float = 0.1,
    latency_ms: Annotated[float, typer.Option(help="Mean latency of an answer.")] = 0.0,
    latency_dist: Annotated[
        str, typer.Option(help="Latency distribution: fixed, normal or lognormal.")
    ] = "fixed",
    latency_sigma: Annotated[
        float,
        typer.Option(
            help="Spread: normal: std as a share of the mean; lognormal: std of log-latency."
        ),
    ] = 0.5,
    rate_429: Annotated[
        float, typer.Option("--rate-429", help="Share of requests answered 429 with Retry-After.")
    ] = 0.0,
    retry_after: Annotated[
        float,
        typer.Option(help="Retry-After seconds of an injected 429 (also sent as retry-after-ms)."),
    ] = 1.0,
    rate_500: Annotated[
        float, typer.Option("--rate-500", help="Share of requests answered 500.")
    ] = 0.0,
    rate_503: Annotated[
        float, typer.Option("--rate-503", help="Share of requests answered 503.")
    ] = 0.0,
    rate_hang: Annotated[
        float, typer.Option(help="Share of requests that hang --hang-s seconds before answering.")
    ] = 0.0,
    hang_s: Annotated[
        float, typer.Option(help="How long a hung request waits (past the client's timeout).")
    ] = 120.0,
    rate_malformed: Annotated[
        float, typer.Option(help="Share of 200s whose body is not (complete) JSON.")
    ] = 0.0,
    rate_unparsable: Annotated[
        float, typer.Option(help="Share of 200s whose answer is prose with nothing to parse.")
    ] = 0.0,
    rpm_per_key: Annotated[
        float | None, typer.Option(help="Requests per minute per API key (429 beyond it).")
    ] = None,
    rpm_burst: Annotated[
        int | None,
        typer.Option(help="Requests one key may send at once (default: one second's worth)."),
    ] = None,
    seed: int = 0,
    model: str = "sim-teacher",
    host: str = "127.0.0.1",
    port: int = 8001,
    ready_file: Annotated[
        str | None, typer.Option(help="Write the base URL here once listening.")
    ] = None,
    set: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="With --from-config: override a field, e.g. --set teacher.simulator.rate_429=0.1.",
        ),
    ] = None,
) -> None:
    """Serve the OpenAI-compatible teacher simulator (with optional faults) until stopped."""
    from ray_pipeline.teacher.prompts import Prompt
    from ray_pipeline.teacher.simulator import (
        Simulator,
        SimulatorSpec,
        load_replay,
        serve_forever,
        spec_from_config,
    )

    if from_config is not None:
        spec = spec_from_config(_load(from_config, set))
    else:
        table: dict[str, str] = {}
        for path in replay or []:
            table.update(load_replay(path, replay_input_field, replay_response_field))
        prompts = [Prompt(prompt_file.read_text(), placeholder)] if prompt_file else []
        if rule not in (None, "quickstart"):
            raise typer.BadParameter(
                f"unknown rule {rule!r}; known: quickstart", param_hint="--rule"
            )
        try:
            spec = SimulatorSpec(
                model=model,
                replay=table,
                rule=rule,
                error_rate=error_rate,
                latency_ms=latency_ms,
                seed=seed,
                prompts=prompts,
                label_key=label_key,
                latency_dist=latency_dist,
                latency_sigma=latency_sigma,
                rate_429=rate_429,
                retry_after_s=retry_after,
                rate_500=rate_500,
                rate_503=rate_503,
                rate_hang=rate_hang,
                hang_s=hang_s,
                rate_malformed=rate_malformed,
                rate_unparsable=rate_unparsable,
                rpm_per_key=rpm_per_key,
                rpm_burst=rpm_burst,
            )
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    serve_forever(Simulator(spec), host, port, ready_file)


@app.command()
def submit(
    config: ConfigArg,
    address: Annotated[
        str,
        typer.Option(
            help="Ray dashboard address, e.g. http://head:8265 (or RAY_ADDRESS).",
            envvar="RAY_ADDRESS",
        ),
    ],
    job: Annotated[
        str, typer.Option(help="Job to run: distill (whole loop) or a stage name.")
    ] = "distill",
    set: SetOpt = None,
    wait: Annotated[bool, typer.Option(help="Follow the job's logs until it ends.")] = True,
) -> None:
    """Submit a job to a Ray cluster with this project as its working_dir (`ray job submit`)."""
    import shlex

    from ray.job_submission import JobSubmissionClient

    _load(config, set)  # fail here, not on the cluster, when the config is wrong
    entry = ["python", "-m", f"jobs.{job}", str(config)] + [
        a for kv in (set or []) for a in ("--set", kv)
    ]
    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=shlex.join(entry),
        runtime_env={"working_dir": ".", "excludes": ["runs/", ".git/"]},
    )
    typer.echo(f"submitted {job_id}: {shlex.join(entry)}")
    if wait:
        import asyncio

        async def follow() -> None:
            async for lines in client.tail_job_logs(job_id):
                sys.stdout.write(lines)

        asyncio.run(follow())
        typer.echo(f"{job_id}: {client.get_job_status(job_id)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
