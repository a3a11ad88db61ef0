"""Serve stage: deploy the student behind the traffic-splitting router, send a smoke batch.

The Serve application is deployed by its import path (``serve_apps.router:app``), exactly as a
Serve config file or ``serve run`` would: the library never imports ``serve_apps``.
"""

from __future__ import annotations

import importlib
import json
import logging
import socket
import statistics
import time
from collections import Counter
from typing import Any

from ray_pipeline.data.test_sets import test_set_rows
from ray_pipeline.run_state import Run
from ray_pipeline.teacher.caller import TeacherEndpoint

log = logging.getLogger("distill.serve")

APP_IMPORT_PATH = "serve_apps.router:app"
APP_NAME = "distill"
TARGET_HEADER = "x-distill-target"


def load_app(import_path: str, args: dict[str, Any]):
    """What `serve run module:builder key=value` does: import the builder, call it with args."""
    from ray import serve

    module, _, attr = import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    app = builder if isinstance(builder, serve.Application) else builder(args)
    if not isinstance(app, serve.Application):
        raise TypeError(f"{import_path} returned {type(app).__name__}, not a Serve Application")
    return app


def deploy(
    app, name: str, route_prefix: str = "/", timeout_s: float = 300.0, poll_s: float = 0.25
) -> None:
    """Deploy and wait until RUNNING; fail (and free the route) on DEPLOY_FAILED, UNHEALTHY
    or timeout: `serve.run` alone would wait forever for a replica that cannot be placed."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    # Replicas log warnings only: the request log is ours (serve/requests.jsonl), not theirs.
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    serve.run_many(
        [serve.RunTarget(target=app, name=name, route_prefix=route_prefix, logging_config=quiet)],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        st = serve.status().applications.get(name)
        if st is not None and st.status == ApplicationStatus.RUNNING:
            return
        failed = st is not None and st.status in (
            ApplicationStatus.DEPLOY_FAILED,
            ApplicationStatus.UNHEALTHY,
        )
        if failed or time.monotonic() > deadline:
            details = (
                {} if st is None else {d: (s.status, s.message) for d, s in st.deployments.items()}
            )
            message = st.message if st is not None else "not created"
            serve.delete(name)  # a failed app keeps its route prefix otherwise
            raise RuntimeError(
                f"serve app {name!r} did not start ({'failed' if failed else f'timeout {timeout_s}s'}): {message} {details}"
            )
        time.sleep(poll_s)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def smoke_batch(
    base_url: str, messages: list[list[dict[str, Any]]], max_tokens: int
) -> list[dict[str, Any]]:
    """Send each conversation through the router with the real openai client; record who
    answered, the latency, and any error."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
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


def run_serve(run: Run, endpoint: TeacherEndpoint) -> dict[str, Any]:
    from ray import serve

    cfg, sc = run.cfg, run.cfg.serve
    checkpoint, checkpoint_from = run.student_checkpoint()
    out = run.stage_dir("serve")
    port = sc.port or free_port(sc.host)
    serve.start(proxy_location="HeadOnly", http_options={"host": sc.host, "port": port})
    request_log = run.paths.request_log
    args = {
        "checkpoint": checkpoint,
        "teacher_base_url": endpoint.base_url,
        "teacher_model": cfg.teacher.model,
        # The key stays in the environment: Serve stores app arguments.
        "teacher_api_key_env": None if cfg.teacher.simulator.enabled else cfg.teacher.api_key_env,
        "weights": dict(sc.weights),
        "request_log": str(request_log),
        "num_cpus": sc.num_cpus_per_replica,
        "student_num_gpus": 1 if cfg.train.use_gpu else 0,
        "max_new_tokens": sc.max_new_tokens,
        "seed": cfg.run.seed,
    }
    started = time.perf_counter()
    deploy(load_app(APP_IMPORT_PATH, args), APP_NAME)
    deploy_s = time.perf_counter() - started
    url = f"http://{sc.host}:{port}/v1"
    log.info("serving %s at %s (weights %s)", checkpoint, url, dict(sc.weights))

    inputs = (
        [json.loads(r["messages"]) for r in test_set_rows(cfg)][: sc.smoke_requests]
        if sc.smoke_requests
        else []
    )
    results = smoke_batch(url, inputs, cfg.evaluate.max_new_tokens) if inputs else []
    smoke_path = out / "smoke.jsonl"
    smoke_path.write_text("".join(json.dumps(r) + "\n" for r in results))
    latencies = sorted(r["latency_ms"] for r in results)
    section = {
        "url": url,
        "app": APP_IMPORT_PATH,
        "checkpoint": checkpoint,
        "checkpoint_from": checkpoint_from,
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
        "request_log": str(request_log),
        "smoke_file": str(smoke_path),
    }
    log.info("smoke batch: %s", section["answered_by"])
    if sc.keep_running:
        run.write_section("serve", section)  # readable while the server runs
        log.info("serving until interrupted (Ctrl-C) at %s", url)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log.info("stopping")
    serve.shutdown()
    return section
