"""Serve stage: deploy the students and the teacher behind the router, send a smoke batch.

The Serve application is deployed by its import path (``serve_apps.router:app``) with the
arguments ``app_args`` resolves from the run, exactly as a Serve config file
(``serve_config``, written by ``distill serve build``) or ``serve deploy`` would: the library
never imports ``serve_apps``.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ray_pipeline import storage
from ray_pipeline.config import ServeSection
from ray_pipeline.data.prompts import Prompt, last_user_content
from ray_pipeline.data.test_sets import test_set_rows
from ray_pipeline.run_state import Run
from ray_pipeline.serving.args import AppArgs, app_runtime_env
from ray_pipeline.teacher.caller import TeacherEndpoint

log = logging.getLogger("distill.serve")

APP_IMPORT_PATH = "serve_apps.router:app"
APP_NAME = "distill"
TARGET_HEADER = "x-distill-target"
SIMULATOR_PORT = 8001  # where `distill serve build` expects a simulator teacher


def deploy_config(config: dict[str, Any], timeout_s: float = 300.0, poll_s: float = 0.25) -> None:
    """What ``serve deploy FILE`` does, on the Serve instance this process is connected to:
    hand the config's applications to the Serve controller (declaratively: an app whose
    arguments are unchanged keeps its replicas, one whose live settings alone changed is only
    reconfigured), then wait until each is RUNNING. An app that fails (DEPLOY_FAILED,
    UNHEALTHY) or times out is an error naming each deployment's state: Serve alone would
    wait forever for a replica that cannot be placed."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    # The controller call the dashboard's REST API makes for `serve deploy` (no dashboard
    # is needed locally, nor the HTTP round trip).
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + timeout_s
    for name in [a["name"] for a in config["applications"]]:
        while True:
            st = serve.status().applications.get(name)
            if st is not None and st.status == ApplicationStatus.RUNNING:
                break
            failed = st is not None and st.status in (
                ApplicationStatus.DEPLOY_FAILED,
                ApplicationStatus.UNHEALTHY,
            )
            if failed or time.monotonic() > deadline:
                details = (
                    {}
                    if st is None
                    else {d: (s.status, s.message) for d, s in st.deployments.items()}
                )
                message = st.message if st is not None else "not created"
                raise RuntimeError(
                    f"serve app {name!r} did not start "
                    f"({'failed' if failed else f'timeout {timeout_s}s'}): {message} {details}"
                )
            time.sleep(poll_s)


def stop_serve(timeout_s: float) -> None:
    """Shut Serve down, waiting at most `timeout_s` for its controller. `serve.shutdown()`
    waits 30 s for a controller that is already gone, which it is when a SIGTERM reached the
    whole process group (systemd, `kill -- -PGID`): Ray's own processes got it too."""
    from ray import serve
    from ray.serve.context import _get_global_client

    _get_global_client().shutdown(timeout_s=timeout_s)
    serve.shutdown()  # forgets the client (the controller is stopped already)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------- arguments
def students_of(run: Run) -> tuple[dict[str, str], str]:
    """Student name -> checkpoint (a null checkpoint is this run's student), and where this
    run's student came from ('sweep.best' or 'train'; '' when none is used)."""
    out, origin = {}, ""
    for name, s in run.cfg.serve.students.items():
        if s.checkpoint is not None:
            out[name] = (
                s.checkpoint if storage.is_uri(s.checkpoint) else str(Path(s.checkpoint).absolute())
            )
        else:
            out[name], origin = run.student_checkpoint()
    return out, origin


def drift_reference(run: Run, checkpoint: str) -> Path | None:
    """The training inputs' drift summary (serving.drift), written into the run's serve
    folder; from the dataset the checkpoint was trained on. None when that is gone."""
    import pyarrow.parquet as pq

    from ray_pipeline.serving.drift import reference, write_reference
    from ray_pipeline.train.checkpoint import read_meta

    dataset = read_meta(storage.local_copy(checkpoint)).get("dataset")
    if dataset is None or not Path(dataset).exists():
        log.warning("no training data beside %s: no drift reference", checkpoint)
        return None
    texts = pq.read_table(dataset, columns=["input"]).column("input").to_pylist()
    path = run.stage_dir("serve") / "drift_reference.json"
    return write_reference(reference(t for t in texts if t), path)


def resolved_serve(run: Run) -> ServeSection:
    """The serve section with what it leaves open filled in from the run."""
    cfg = run.cfg
    sc = cfg.serve
    data = sc.model_dump()
    if sc.student.num_gpus is None:
        data["student"]["num_gpus"] = 1.0 if cfg.train.use_gpu else 0.0
    if sc.seed is None:
        data["seed"] = cfg.run.seed
    if sc.request_log.dir is None:
        # Replicas on any node write it: under the run's URI when the run has one.
        data["request_log"]["dir"] = run.shared(run.paths.request_log)
    elif not storage.is_uri(sc.request_log.dir):
        data["request_log"]["dir"] = str(Path(sc.request_log.dir).absolute())
    return ServeSection.model_validate(data)


def app_args(run: Run, teacher_base_url: str, teacher_key_env: str | None) -> dict[str, Any]:
    """The app builder's arguments (``AppArgs``, as JSON-ready data) for this run."""
    cfg = run.cfg
    students, _ = students_of(run)
    task = cfg.task.model_dump(mode="json")
    # The prompt inline: a replica on another node need not see the prompt file.
    task["prompt"] = {
        "template": cfg.task.prompt.text(),
        "placeholder": cfg.task.prompt.placeholder,
        "system": cfg.task.prompt.system,
    }
    ref = drift_reference(run, next(iter(students.values())))
    # What the replicas (on any node) read: a mirrored run's copies under its URI.
    run.push()
    args = AppArgs(
        serve=resolved_serve(run),
        task=task,
        teacher=cfg.teacher,
        teacher_base_url=teacher_base_url,
        teacher_api_key_env=teacher_key_env,
        students={name: run.shared_if_inside(path) for name, path in students.items()},
        drift_reference=None if ref is None else run.shared(ref),
    )
    data = args.model_dump(mode="json", exclude_defaults=True)
    # The serve section whole: it is what an operator reads and edits in the config file.
    data["serve"] = args.serve.model_dump(mode="json")
    return data


def serve_config(
    args: dict[str, Any],
    name: str = APP_NAME,
    route_prefix: str = "/",
    import_path: str = APP_IMPORT_PATH,
) -> dict[str, Any]:
    """A Serve config file (``serve deploy``, a KubeRay RayService's serveConfigV2) deploying
    the app with `args`. The live settings (weights, hybrid threshold, shadow sample rate)
    are also its RouterControl deployment's ``user_config``: changed there and deployed
    again, they apply without a restart (a change of ``args`` restarts every replica)."""
    from ray.serve.schema import ServeDeploySchema

    from ray_pipeline.serving.live import live_settings

    sc = AppArgs.model_validate(args).serve
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": sc.host, "port": sc.port},
        # Replicas log warnings only: the request log is ours (serve/requests/), not theirs.
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
        "applications": [
            {
                "name": name,
                "route_prefix": route_prefix,
                "import_path": import_path,
                "runtime_env": app_runtime_env(sc),
                "args": args,
            }
        ],
    }
    if import_path == APP_IMPORT_PATH:
        live = [{"name": "RouterControl", "user_config": live_settings(sc)}]
        config["applications"][0]["deployments"] = live
    ServeDeploySchema.model_validate(config)
    return config


def write_serve_config(run: Run, path: Path) -> Path:
    """`distill serve build`: the Serve config of this run's app, as YAML with a header."""
    import yaml

    cfg = run.cfg
    t = cfg.teacher
    if t.simulator.enabled:
        port = t.simulator.port or SIMULATOR_PORT
        base_url, key_env = f"http://{t.simulator.host}:{port}/v1", None
        note = (
            f"# The teacher is the simulator: start it first with\n"
            f"#   distill teacher-sim {run.paths.config} --port {port}\n"
        )
    else:
        base_url, key_env, note = t.base_url, t.api_key_env, ""
    config = serve_config(app_args(run, base_url, key_env))
    header = (
        f"# Serve config of run {run.run_id}, written by `distill serve build`.\n"
        f"#   serve deploy {path}          (a running Ray cluster; or a KubeRay RayService's\n"
        f"#                                 serveConfigV2; `distill serve run` deploys locally)\n"
        f"# Live settings: edit the RouterControl user_config at the end and deploy again; only\n"
        f"# that replica is reconfigured. (Editing args redeploys every replica; the args'\n"
        f"# serve.weights etc. are only the starting values the user_config overrides.)\n"
        f"{note}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(config, sort_keys=False, width=100))
    return path


# ---------------------------------------------------------------------------------- the stage
def smoke_batch(
    base_url: str, messages: list[list[dict[str, Any]]], max_tokens: int, api_key: str = "none"
) -> list[dict[str, Any]]:
    """Send each conversation through the router with the real openai client; record who
    answered, the latency, and any error."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)
    results = []
    for msgs in messages:
        started = time.perf_counter()
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=msgs, max_tokens=max_tokens
            )
            completion = raw.parse()
            results.append(
                {
                    "target": raw.headers.get(TARGET_HEADER),
                    "model": completion.model,
                    "answer": completion.choices[0].message.content,
                    "latency_ms": (time.perf_counter() - started) * 1000,
                    "error": None,
                }
            )
        except openai.APIStatusError as e:
            results.append(
                {
                    "target": e.response.headers.get(TARGET_HEADER),
                    "answer": None,
                    "latency_ms": (time.perf_counter() - started) * 1000,
                    "error": f"{e.status_code}: {e.message}",
                }
            )
    client.close()
    return results


def served_inputs(files: list[Path] | list[str], prompt: Prompt, limit: int = 100_000) -> list[str]:
    """The inputs of the newest `limit` answered requests in the request log files (paths or
    URIs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts: list[str] = []
    for f in reversed(files):
        data = storage.read_bytes(str(f))
        if str(f).endswith(".parquet"):
            table = pq.read_table(pa.BufferReader(data), columns=["request", "status"])
            records = table.to_pylist()
        else:
            records = [json.loads(x) for x in data.decode("utf-8").split("\n") if x]
        for r in reversed(records):
            if r["status"] == 200 and r["request"] is not None:
                user = last_user_content(r["request"]["messages"]) or ""
                extracted = prompt.extract(user)
                texts.append(extracted if extracted is not None else user)
                if len(texts) >= limit:
                    return texts
    return texts


def drift_section(run: Run, ref_path: str | None, files: list[Path] | list[str]) -> dict[str, Any]:
    """Drift of what was served against the training inputs, and its figure."""
    from ray_pipeline.serving.drift import DriftMonitor, drift_figure

    if ref_path is None:
        return {}
    monitor = DriftMonitor(json.loads(storage.read_bytes(ref_path)))
    for text in served_inputs(files, Prompt.from_task(run.cfg.task)):
        monitor.observe(text)
    snap = monitor.snapshot()
    figure = drift_figure(monitor, run.stage_dir("serve") / "drift.png")
    return {
        "inputs": snap["inputs"],
        "length_psi": snap["length_psi"],
        "unknown_word_rate": snap["unknown_word_rate"],
        "train_unknown_word_rate": snap["train_unknown_word_rate"],
        "figure": str(figure),
    }


def _serve_until_stopped(url: str) -> str:
    """Block until Ctrl-C or SIGTERM; returns the signal's name. The handlers only set an
    event (an exception raised wherever the main thread happens to be could escape the
    clean shutdown); a second signal, once the first is being handled, interrupts as usual."""
    stop = threading.Event()
    got: list[str] = []

    def handler(signum: int, frame: Any) -> None:
        got.append(signal.Signals(signum).name)
        stop.set()

    # Both set here: a process started in the background inherits SIGINT ignored.
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        log.info("serving until interrupted (Ctrl-C or SIGTERM) at %s", url)
        while not stop.wait(1.0):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    log.info("stopping (%s)", got[0])
    return got[0]


def run_serve(run: Run, endpoint: TeacherEndpoint) -> dict[str, Any]:
    import os

    from ray import serve

    cfg = run.cfg
    sc = cfg.serve
    out = run.stage_dir("serve")
    port = sc.port or free_port(sc.host)
    serve.start(proxy_location="HeadOnly", http_options={"host": sc.host, "port": port})
    # The key stays in the environment: Serve stores app arguments.
    key_env = None if cfg.teacher.simulator.enabled else cfg.teacher.api_key_env
    args = app_args(run, endpoint.base_url, key_env)
    students, origin = students_of(run)
    url = f"http://{sc.host}:{port}/v1"
    stopped_by = None
    try:
        started = time.perf_counter()
        deploy_config(serve_config(args))  # what `serve deploy` of `serve build`'s file does
        deploy_s = time.perf_counter() - started
        log.info("serving %s at %s (mode %s)", students, url, sc.mode)
        inputs = (
            [json.loads(r["messages"]) for r in test_set_rows(cfg)][: sc.smoke_requests]
            if sc.smoke_requests
            else []
        )
        api_key = os.environ[sc.api_key_env] if sc.api_key_env else "none"
        max_tokens = min(cfg.evaluate.max_new_tokens, sc.max_new_tokens)
        results = smoke_batch(url, inputs, max_tokens, api_key) if inputs else []
        if sc.keep_running:
            run.write_section(
                "serve", _section(run, args, students, origin, url, deploy_s, results, out)
            )
            stopped_by = _serve_until_stopped(url)
    finally:
        stop_serve(sc.shutdown_timeout_s + 3.0)
    section = _section(run, args, students, origin, url, deploy_s, results, out)
    section["stopped_by"] = stopped_by  # SIGINT (Ctrl-C) or SIGTERM; None: not kept running
    return section


def _section(
    run: Run,
    args: dict[str, Any],
    students: dict[str, str],
    origin: str,
    url: str,
    deploy_s: float,
    results: list[dict[str, Any]],
    out: Path,
) -> dict[str, Any]:
    from ray_pipeline.serving.request_log import log_files

    sc = AppArgs.model_validate(args).serve
    smoke_path = out / "smoke.jsonl"
    smoke_path.write_text("".join(json.dumps(r) + "\n" for r in results))
    latencies = sorted(r["latency_ms"] for r in results)
    files = log_files(sc.request_log.dir) if sc.request_log.enabled else []
    return {
        "url": url,
        "app": APP_IMPORT_PATH,
        "mode": sc.mode,
        "students": students,
        "checkpoint": next(iter(students.values())),
        "checkpoint_from": origin,
        "weights": dict(sc.weights),
        "requests": len(results),
        "answered_by": dict(Counter(r["target"] for r in results if r["error"] is None)),
        "errors": sum(1 for r in results if r["error"] is not None),
        "latency_ms": {
            "p50": round(statistics.median(latencies), 2),
            "max": round(latencies[-1], 2),
        }
        if latencies
        else {},
        "deploy_seconds": round(deploy_s, 2),
        "request_log": str(sc.request_log.dir) if sc.request_log.enabled else None,
        "request_log_files": [str(f) for f in files],
        "drift": drift_section(run, args.get("drift_reference"), files),
        "smoke_file": str(smoke_path),
    }
