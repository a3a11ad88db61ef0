"""Peak memory and speed of reading a big JSONL log, ours beside Ray Data's own JSON reader.

Writes a JSONL log of ``--gb`` GB (default 1) of comment records, then reads it twice on an
embedded local Ray, each time writing the rows to Parquet (the generate stage's read without
the teacher): once with the generate stage's reader (one streaming read task per file,
records parsed into rows, malformed lines kept as failed rows) and once with
``ray.data.read_json(lines=True)`` (pyarrow's reader, no per-record errors). A sampler polls
the resident memory of the driver and of every Ray worker process every 0.1 s.

Prints one JSON object: ``file_gb``, ``rows``, and per reader ``seconds``, ``rows_per_s``,
``peak_worker_rss_mb`` (the largest single worker process), ``peak_workers_total_rss_mb``
(all worker processes at once) and ``peak_driver_rss_mb``.

    python benchmarks/log_read_memory.py            # 1 GB
    python benchmarks/log_read_memory.py --gb 0.1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ray_pipeline.config import load_config  # noqa: E402
from ray_pipeline.data import synthetic  # noqa: E402
from ray_pipeline.run_state import Run  # noqa: E402

MB = 2**20


def write_log(path: Path, target_bytes: int) -> int:
    """Comment records (with a user field and some padding, like a real log line) until the
    file reaches `target_bytes`; returns the number of lines."""
    comments = synthetic.generate_comments(5000, seed=3)
    lines = 0
    with path.open("w") as f:
        while f.tell() < target_bytes:
            for i, text in enumerate(comments):
                rec = {
                    "input": text,
                    "user": f"user{i % 97}",
                    "meta": {"ts": lines, "pad": "x" * 300},
                }
                f.write(json.dumps(rec) + "\n")
                lines += 1
    return lines


class Sampler:
    """Peak RSS of the driver and of the Ray worker processes, polled every `every_s`."""

    def __init__(self, every_s: float = 0.1):
        self.every_s = every_s
        self.driver = psutil.Process()
        self.peak_driver = self.peak_worker = self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _workers(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if cmd.startswith("ray::") or "default_worker.py" in cmd:
                out.append(p)
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            rss = []
            for p in self._workers():
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    continue  # a worker that ended between listing and reading
            self.peak_worker = max(self.peak_worker, max(rss, default=0))
            self.peak_total = max(self.peak_total, sum(rss))
            self.peak_driver = max(self.peak_driver, self.driver.memory_info().rss)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, float]:
        return {
            "peak_worker_rss_mb": round(self.peak_worker / MB),
            "peak_workers_total_rss_mb": round(self.peak_total / MB),
            "peak_driver_rss_mb": round(self.peak_driver / MB),
        }


def measure(name: str, make_ds, out: Path, rows: int) -> dict:
    time.sleep(2)  # let idle workers settle, so peaks belong to this read
    started = time.perf_counter()
    with Sampler() as sampler:
        make_ds().write_parquet(str(out / name))
    seconds = time.perf_counter() - started
    written = sum(1 for _ in (out / name).glob("*.parquet"))
    return {
        "seconds": round(seconds, 1),
        "rows_per_s": round(rows / seconds),
        "parquet_files": written,
        **sampler.result(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the log to read")
    args = ap.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from ray_pipeline.generate.stage import read_logs

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(prefix="distill-read-") as tmp_s:
        tmp = Path(tmp_s)
        log = tmp / "big.jsonl"
        rows = write_log(log, int(args.gb * 1e9))
        file_gb = round(log.stat().st_size / 1e9, 3)
        cfg = load_config(
            data={
                "task": synthetic.TASK,
                "teacher": {"simulator": {"enabled": True}},
                "data": {"logs": [{"path": str(log)}]},
            }
        )
        run = Run(cfg=cfg, run_id="bench", dir=tmp / "run")
        ours = measure("ours", lambda: read_logs(run), tmp, rows)
        peer = measure("ray_read_json", lambda: ray.data.read_json(str(log), lines=True), tmp, rows)
    ray.shutdown()
    result = {
        "file_gb": file_gb,
        "rows": rows,
        "ours": ours,
        "ray_read_json": peer,
        "worker_rss_ratio": round(ours["peak_worker_rss_mb"] / peer["peak_worker_rss_mb"], 2),
        "speed_ratio": round(ours["rows_per_s"] / peer["rows_per_s"], 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
