"""The generate stage's log reader on local Ray: a file streams through as many blocks, every
record once, with its own line number (nothing holds the whole file)."""

from __future__ import annotations

import json

import pytest

from ray_pipeline.config import load_config
from ray_pipeline.data import synthetic
from ray_pipeline.data.schema import FAILED, OK
from ray_pipeline.generate.stage import read_logs
from ray_pipeline.run_state import Run

pytestmark = pytest.mark.integration


def test_a_log_streams_through_many_blocks_with_every_record_once(ray_local, tmp_path):
    import ray

    texts = synthetic.generate_comments(3000, seed=2)
    lines = [json.dumps({"input": t}, ensure_ascii=False) for t in texts]
    lines[10] = json.dumps({"input": "a line\u2028separator inside"}, ensure_ascii=False)
    lines[2000] = '{"input": "cut off'
    log = tmp_path / "log.jsonl"
    log.write_bytes(("\n".join(lines) + "\n").encode() + b'{"input": "\xff"}\n')
    cfg = load_config(
        data={
            "task": synthetic.TASK,
            "teacher": {"simulator": {"enabled": True}},
            "data": {"logs": [{"path": str(log)}]},
        }
    )
    ctx = ray.data.DataContext.get_current()
    previous = ctx.target_max_block_size
    ctx.target_max_block_size = 64 * 1024  # small blocks: a big file in miniature
    try:
        ds = read_logs(Run(cfg=cfg, run_id="t", dir=tmp_path / "run")).materialize()
    finally:
        ctx.target_max_block_size = previous
    assert ds.num_blocks() >= 10
    rows = sorted(ds.take_all(), key=lambda r: r["source_line"])
    assert [r["source_line"] for r in rows] == list(range(1, 3002))
    assert rows[10]["input"] == "a line\u2028separator inside" and rows[10]["status"] == OK
    assert rows[2000]["status"] == FAILED and rows[2000]["reason"].startswith("malformed_record")
    assert rows[3000]["status"] == FAILED and rows[3000]["reason"].startswith("invalid_utf8")
    assert sum(r["status"] == OK for r in rows) == 2999
