"""The teacher simulator over HTTP: an aiohttp server around ``simulator.Simulator``, and the
child process that runs it for a run, a test or a benchmark.

``POST /v1/chat/completions`` and ``GET /v1/models`` as an OpenAI-compatible API;
``GET /metrics`` counts what was served and ``POST /metrics/reset`` zeroes the counts;
``GET /health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web

from ray_pipeline.teacher.simulator import Simulator


def _api_key(authorization: str | None) -> str:
    """The key of an ``Authorization: Bearer KEY`` header ('' when there is none)."""
    if not authorization:
        return ""
    scheme, _, key = authorization.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def make_app(sim: Simulator) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        sim.in_flight += 1
        if sim.in_flight > sim.max_in_flight:
            sim.max_in_flight = sim.in_flight
        if sim.first_request_at is None:
            sim.first_request_at = sim.clock()
        try:
            r = sim.reply(await request.read(), _api_key(request.headers.get("Authorization")))
            if r.delay_s > 0:
                await asyncio.sleep(r.delay_s)
            return web.Response(
                body=r.body, status=r.status, headers=r.headers, content_type="application/json"
            )
        finally:
            sim.in_flight -= 1
            sim.last_reply_at = sim.clock()

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": sim.model,
                        "object": "model",
                        "created": 0,
                        "owned_by": "distill-simulator",
                    }
                ],
            }
        )

    async def metrics(_: web.Request) -> web.Response:
        return web.json_response(sim.metrics())

    async def reset_metrics(_: web.Request) -> web.Response:
        sim.reset_metrics()
        return web.json_response(sim.metrics())

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/metrics/reset", reset_metrics)
    app.router.add_get("/health", health)
    return app


def serve_forever(sim: Simulator, host: str, port: int, ready_file: str | None = None) -> None:
    """Run the server until killed; print (and optionally write) its base URL when listening."""

    async def main() -> None:
        runner = web.AppRunner(make_app(sim), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound = runner.addresses[0][1]
        url = f"http://{host}:{bound}/v1"
        print(f"teacher simulator listening on {url}", flush=True)
        if ready_file:
            tmp = Path(ready_file + ".tmp")
            tmp.write_text(url)
            tmp.rename(ready_file)
        await asyncio.Event().wait()

    asyncio.run(main())


@contextlib.contextmanager
def simulator_process(
    config_file: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    timeout_s: float = 60.0,
) -> Iterator[str]:
    """Run `distill teacher-sim CONFIG_FILE --set ...` as a child process; yield its base URL
    once it listens; stop it on exit. Used by runs, tests and benchmarks."""
    with tempfile.TemporaryDirectory(prefix="distill-sim-") as tmp:
        ready = Path(tmp) / "url"
        with open(Path(tmp) / "sim.log", "w+") as log:
            cmd = [sys.executable, "-m", "ray_pipeline.cli", "teacher-sim", str(config_file)]
            cmd += [a for kv in overrides for a in ("--set", kv)]
            cmd += ["--host", host, "--port", str(port), "--ready-file", str(ready)]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + timeout_s
                while not ready.exists():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(
                            f"teacher simulator did not start (exit code {proc.poll()}):\n"
                            f"{log.read()[-3000:]}"
                        )
                    time.sleep(0.05)
                yield ready.read_text()
            finally:
                stop_process(proc)


def stop_process(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL when it has not exited within `timeout_s`; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
