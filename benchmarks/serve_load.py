"""Serving under load, with the tiny student on CPU, measured side by side in one run.

Prints one JSON object:

* ``direct_p50_ms``, ``router_p50_ms``, ``overhead_p50_ms``, ``router_p99_ms``: one client,
  requests sent alternately to the student alone (``serve_apps.student:direct_app``, the same
  validation, no router) and through the router (canary, every request to that student) with
  the student loaded in the router's replica (``serve.student_placement: router``); the
  ``router_deployment_*`` and ``overhead_deployment_p50_ms`` figures: the same router calling
  the student's own deployment (the default placement: one more hop between replicas), all
  three alternating in one phase. ``direct_qps``, ``router_qps`` and
  ``router_deployment_qps``: the same three at ``--clients`` clients.
* ``batching_qps_ratio`` (this and the phases below: student deployments): router
  requests/s with batches of up to 16 over batches of 1, at ``--clients`` clients, for a
  student whose answers are ``--long-tokens`` tokens long (the tiny student's architecture
  with untrained weights: it never stops early), where the model is the bottleneck
  (``batched_qps``, ``unbatched_qps``); ``batching_qps_ratio_short``: the same for the
  trained student's 6-token answers, where on a small machine the HTTP path (proxy, router,
  handle calls) is the bottleneck whatever the batching.
* ``failed_during_reweight``: requests not answered 200 while, under ``--clients`` clients,
  the canary weight of a second student goes 1% -> 10% -> 50% -> 100% (admin endpoint) and
  back to 5% (a Serve config update of the RouterControl's user_config: only that replica is
  reconfigured); ``reweight_shares``: the share that student got at each step.
* ``shadow_overhead_p50_ms``: one client, the router in shadow mode (the student answers, a
  copy goes to the teacher) minus the router with no shadow, requests alternating.

    python benchmarks/serve_load.py                       # a tiny student trained here
    python benchmarks/serve_load.py --checkpoint runs/<id>/train/checkpoint_<step>
    python benchmarks/serve_load.py --no-throughput-optimized   # Serve's default replicas

Every load phase is bounded in requests (``--requests``) and time (``--max-seconds``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from ray_pipeline.data import synthetic  # noqa: E402
from ray_pipeline.data.prompts import Prompt  # noqa: E402

ADMIN_ENV = "DISTILL_BENCH_ADMIN_KEY"
SERVE_SETTINGS: dict[str, Any] = {}  # serve settings of every app (command-line options)
PROMPT = Prompt(synthetic.PROMPT)
MAX_TOKENS = 8


def tiny_student(out: Path, steps: int = 150) -> str:
    """A tiny causal LM (the quickstart's size), fully fine-tuned for a few seconds on the
    synthetic task so that it answers like the quickstart's student: ``{"toxic": 1}`` and
    end-of-sequence (``steps=0``: untrained, it writes until max_tokens)."""
    import torch

    from ray_pipeline.config import TinyModelSection
    from ray_pipeline.train.checkpoint import save_checkpoint
    from ray_pipeline.train.data import Example, encode_examples, pad_batch
    from ray_pipeline.train.model import build_tiny_model
    from ray_pipeline.train.tokenizer import build_tiny_tokenizer, tokenizer_corpus

    texts = synthetic.generate_comments(400, seed=1)
    examples = [
        Example(
            id=str(i),
            messages=PROMPT.messages(t),
            target=json.dumps({"toxic": int(synthetic.true_label(t))}),
        )
        for i, t in enumerate(texts)
    ]
    tok = build_tiny_tokenizer(tokenizer_corpus(examples), 1024)
    model = build_tiny_model(tok, TinyModelSection(), seed=0)
    enc = encode_examples(tok, examples, max_seq_len=96)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(enc), (16,)).tolist()
        batch = pad_batch(
            [enc[i]["input_ids"] for i in idx], [enc[i]["labels"] for i in idx], tok.pad_token_id
        )
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    meta = {
        "base_model": "tiny",
        "kind": "causal_lm",
        "label_key": "toxic",
        "labels": ["0", "1"],
        "prompt": {"template": synthetic.PROMPT, "placeholder": "{input}", "system": None},
        "pad_id": tok.pad_token_id,
    }
    path = save_checkpoint(
        out, model=model, state_dict=model.state_dict(), tokenizer=tok, method="full", meta=meta
    )
    return str(path)


def app_args(checkpoint: str, teacher_url: str, log_dir: Path, **serve: Any) -> dict[str, Any]:
    from ray_pipeline.serving.args import AppArgs

    students = serve.pop("students", {"student": checkpoint})
    section = {
        "students": {n: {"checkpoint": c} for n, c in students.items()},
        "weights": {"student": 1.0},
        "admin_key_env": ADMIN_ENV,
        "max_new_tokens": 16,
        # Replicas share the machine with the load generator: reserve little, use what is free
        # (eight apps, 22 replicas that reserve CPUs: 1.1 of the 2).
        "router": {"num_cpus": 0.05},
        "teacher": {"num_cpus": 0.05},
        "student": {"num_cpus": 0.05, "num_gpus": 0.0, "max_ongoing_requests": 64},
        "request_log": {"dir": str(log_dir), "flush_s": 1.0},
        "seed": 0,
        **SERVE_SETTINGS,
        **serve,
    }
    args = AppArgs(
        serve=section,
        task=synthetic.TASK,
        teacher={"model": "sim-teacher", "simulator": {"enabled": True}},
        teacher_base_url=teacher_url,
        teacher_api_key_env=None,
        students=students,
    )
    return args.model_dump(mode="json")


class Load:
    """An aiohttp client pool sending chat requests; latencies in ms and failures counted."""

    def __init__(self, base: str):
        self.base = base
        self.texts = synthetic.generate_comments(500, seed=7)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def one(
        self, path: str, i: int, max_tokens: int = MAX_TOKENS
    ) -> tuple[float, int, str | None]:
        body = {
            "model": "auto",
            "messages": PROMPT.messages(self.texts[i % len(self.texts)]),
            "max_tokens": max_tokens,
        }
        started = time.perf_counter()
        try:
            async with self.session.post(f"{self.base}{path}/v1/chat/completions", json=body) as r:
                await r.read()
                status, target = r.status, r.headers.get("x-distill-target")
        except aiohttp.ClientError:
            status, target = 0, None
        return (time.perf_counter() - started) * 1000, status, target

    async def alternate(self, paths: list[str], n: int) -> dict[str, list[float]]:
        """One client, `n` requests to each path, interleaved (noise hits all alike)."""
        out: dict[str, list[float]] = {p: [] for p in paths}
        for i in range(n):
            for p in paths:
                ms, status, _ = await self.one(p, i)
                if status != 200:
                    raise RuntimeError(f"{p}: request {i} answered {status}")
                out[p].append(ms)
        return out

    async def closed_loop(
        self,
        path: str,
        clients: int,
        requests: int,
        max_s: float,
        tally: list | None = None,
        max_tokens: int = MAX_TOKENS,
        stop: asyncio.Event | None = None,
    ) -> dict[str, Any]:
        """`clients` clients, each sending its next request when the last is answered, until
        `requests` were sent or `max_s` passed; requests/s and failures."""
        sent = 0
        failed = 0
        deadline = time.monotonic() + max_s

        async def client() -> None:
            nonlocal sent, failed
            while sent < requests and time.monotonic() < deadline and not (stop and stop.is_set()):
                i = sent
                sent += 1
                started = time.monotonic()
                _, status, target = await self.one(path, i, max_tokens)
                failed += status != 200
                if tally is not None:
                    tally.append((started, target, status))  # by when it was sent

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
        return {"qps": sent / elapsed, "requests": sent, "failed": failed, "seconds": elapsed}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def admin(base: str, path: str, weights: dict[str, float]) -> None:
    headers = {"Authorization": f"Bearer {os.environ[ADMIN_ENV]}"}
    async with (
        aiohttp.ClientSession() as s,
        s.put(f"{base}{path}/admin/live", json={"weights": weights}, headers=headers) as r,
    ):
        if r.status != 200:
            raise RuntimeError(f"admin update answered {r.status}: {await r.text()}")


async def reweight_under_load(
    load: Load, base: str, config: dict[str, Any], clients: int, step_s: float
) -> dict[str, Any]:
    """The canary goes 1% -> 10% -> 50% -> 100% by the admin endpoint, back to 5% by a Serve
    config update, while `clients` clients keep sending. (A config update applies when the
    RouterControl's user_config differs from the one deployed before: 1% again would not.)"""
    from ray_pipeline.serving.stage import deploy_config

    tally: list[tuple[float, str | None, int]] = []
    # (change started, change done, canary weight from then on): a change may apply any time
    # in between; the admin endpoint's at once, a config update while it is deployed.
    marks: list[tuple[float, float, float]] = []
    done = asyncio.Event()

    async def change() -> None:
        now = time.monotonic()
        marks.append((now, now, 0.01))
        for w in (0.1, 0.5, 1.0):
            await asyncio.sleep(step_s)
            started = time.monotonic()
            await admin(base, "/canary", {"canary": w, "student": 1 - w})
            marks.append((started, time.monotonic(), w))
        await asyncio.sleep(step_s)
        canary = next(a for a in config["applications"] if a["name"] == "canary")
        canary["deployments"][0]["user_config"]["weights"] = {"canary": 0.05, "student": 0.95}
        started = time.monotonic()
        await asyncio.to_thread(deploy_config, config)
        marks.append((started, time.monotonic(), 0.05))
        await asyncio.sleep(step_s)
        done.set()

    changer = asyncio.create_task(change())
    result = await load.closed_loop("/canary", clients, 10**9, 6 * step_s + 60, tally, stop=done)
    await changer
    shares = []
    ends = [m[0] for m in marks[1:]] + [float("inf")]
    for (_, applied, w), end in zip(marks, ends, strict=True):
        # Requests sent from half a second after a change was done (router replicas poll
        # twice a second) until the next one started.
        window = [tgt for t, tgt, s in tally if applied + 0.5 <= t < end and s == 200]
        share = sum(tgt == "canary" for tgt in window) / len(window) if window else None
        shares.append({"weight": w, "requests": len(window), "share": share})
    return {"failed": result["failed"], "requests": result["requests"], "shares": shares}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="A student checkpoint (default: a tiny one trained here).")
    ap.add_argument("--latency-requests", type=int, default=300, help="One-client requests each.")
    ap.add_argument("--requests", type=int, default=1500, help="Requests per load phase.")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="Longest load phase.")
    ap.add_argument("--step-seconds", type=float, default=3.0, help="Re-weighting step length.")
    ap.add_argument("--long-tokens", type=int, default=32, help="Answer length, batching ratio.")
    ap.add_argument(
        "--throughput-optimized",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve.throughput_optimized of every app (default: the setting's default).",
    )
    args = ap.parse_args()
    if args.throughput_optimized is not None:
        SERVE_SETTINGS["throughput_optimized"] = args.throughput_optimized

    import logging

    import ray
    from ray import serve

    from ray_pipeline.serving.args import AppArgs
    from ray_pipeline.serving.stage import deploy_config, free_port, serve_config
    from ray_pipeline.teacher.sim_server import simulator_process

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault(ADMIN_ENV, "bench-admin")  # before Ray starts: replicas inherit it
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    checkpoint = args.checkpoint or tiny_student(tmp / "student")
    untrained = tiny_student(tmp / "untrained", steps=0)
    sim_cfg = tmp / "sim.yaml"
    sim_cfg.write_text(
        yaml.safe_dump(
            {
                "task": synthetic.TASK,
                "teacher": {
                    "model": "sim-teacher",
                    "simulator": {"enabled": True, "rule": "quickstart", "latency_ms": 20},
                },
                "data": {"logs": [{"path": "unused.jsonl"}]},
            }
        )
    )
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    with simulator_process(sim_cfg) as teacher_url:
        port = free_port("127.0.0.1")
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"

        def app(
            name: str, import_path: str = "serve_apps.router:app", ckpt: str = checkpoint, **kw: Any
        ) -> dict:
            a = app_args(ckpt, teacher_url, tmp / f"log-{name}", **kw)
            return serve_config(a, name, f"/{name}", import_path)["applications"][0]

        canary_students = {"student": checkpoint, "canary": checkpoint}
        apps = [
            app("direct", "serve_apps.student:direct_app"),
            app("router"),
            app("inrouter", student_placement="router"),
            app("unbatched", batching={"max_batch_size": 1}),
            app("long", ckpt=untrained, max_new_tokens=args.long_tokens),
            app(
                "long_unbatched",
                ckpt=untrained,
                max_new_tokens=args.long_tokens,
                batching={"max_batch_size": 1},
            ),
            app("shadow", mode="shadow", shadow={"primary": "student", "target": "teacher"}),
            app("canary", students=canary_students, weights={"canary": 0.01, "student": 0.99}),
        ]
        config = serve_config(app_args(checkpoint, teacher_url, tmp / "log"))
        config["applications"] = apps
        deploy_config(config)

        async def measure() -> dict[str, Any]:
            async with Load(base) as load:
                await load.alternate(["/direct", "/router", "/inrouter", "/shadow"], 20)  # warm up
                lat = await load.alternate(
                    ["/direct", "/inrouter", "/router"], args.latency_requests
                )
                sh = await load.alternate(["/router", "/shadow"], args.latency_requests)
                n, c, m = args.requests, args.clients, args.max_seconds
                direct = await load.closed_loop("/direct", c, n, m)
                routed = await load.closed_loop("/router", c, n, m)
                inrouter = await load.closed_loop("/inrouter", c, n, m)
                unbatched = await load.closed_loop("/unbatched", c, n, m)
                lt = args.long_tokens
                long = await load.closed_loop("/long", c, n, m, max_tokens=lt)
                long_unbatched = await load.closed_loop("/long_unbatched", c, n, m, max_tokens=lt)
                # The config update holds every app (a Serve config is declarative): only the
                # canary's RouterControl user_config differs.
                reweight = await reweight_under_load(load, base, config, c, args.step_seconds)
            d50 = statistics.median(lat["/direct"])
            i50, r50 = statistics.median(lat["/inrouter"]), statistics.median(lat["/router"])
            return {
                "direct_p50_ms": round(d50, 2),
                "router_p50_ms": round(i50, 2),
                "overhead_p50_ms": round(i50 - d50, 2),
                "router_p99_ms": round(pct(lat["/inrouter"], 0.99), 2),
                "router_deployment_p50_ms": round(r50, 2),
                "overhead_deployment_p50_ms": round(r50 - d50, 2),
                "router_deployment_p99_ms": round(pct(lat["/router"], 0.99), 2),
                "direct_p99_ms": round(pct(lat["/direct"], 0.99), 2),
                "direct_qps": round(direct["qps"], 1),
                "router_qps": round(inrouter["qps"], 1),
                "router_deployment_qps": round(routed["qps"], 1),
                "batched_qps": round(long["qps"], 1),
                "unbatched_qps": round(long_unbatched["qps"], 1),
                "batching_qps_ratio": round(long["qps"] / long_unbatched["qps"], 2),
                "batching_answer_tokens": lt,
                "batching_qps_ratio_short": round(routed["qps"] / unbatched["qps"], 2),
                "unbatched_qps_short": round(unbatched["qps"], 1),
                "failed_during_load": sum(
                    x["failed"] for x in (direct, routed, inrouter, unbatched, long, long_unbatched)
                ),
                "failed_during_reweight": reweight["failed"],
                "reweight_requests": reweight["requests"],
                "reweight_shares": reweight["shares"],
                "shadow_p50_ms": round(statistics.median(sh["/shadow"]), 2),
                "shadow_overhead_p50_ms": round(
                    statistics.median(sh["/shadow"]) - statistics.median(sh["/router"]), 2
                ),
                "throughput_optimized": AppArgs.model_validate(
                    config["applications"][0]["args"]
                ).serve.throughput_optimized,
                "clients": c,
                "load_average_1m": round(os.getloadavg()[0], 1),
                "latency_requests": args.latency_requests,
                "max_tokens": MAX_TOKENS,
                "cpus": os.cpu_count(),
            }

        result = asyncio.run(measure())
        serve.shutdown()
    ray.shutdown()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
