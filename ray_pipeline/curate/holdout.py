"""Test sets a training set must never overlap: the configured evaluation sets, the frozen
sets of earlier runs, and the sets built here from gold-labelled rows.

A built test set is *frozen*: written as JSONL (``input``, ``label`` = the gold label, and
where the row came from) with its file's sha256 and a content hash in
``dataset/test_sets/frozen.json``. A later run lists that file in
``curate.test_sets.frozen``: its sets are checked for overlap, and refused if a file
changed since it was frozen (a test set edited after the fact is no test set).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray_pipeline.config import BuildTestSetSection, DistillConfig
from ray_pipeline.data.manifest import file_sha256, row_digest
from ray_pipeline.data.sources import read_texts
from ray_pipeline.data.subsets import stable_unit

FROZEN = "frozen.json"
Record = tuple[str, int, str]  # (test set name, record number from 1, input text)


def read_frozen(path: str | Path) -> list[dict[str, Any]]:
    """The test sets of a frozen.json, each checked unchanged; a ValueError names the set
    and the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"curate.test_sets.frozen: {path} does not exist")
    sets = json.loads(path.read_text())["test_sets"]
    for s in sets:
        file = path.parent / s["file"]
        if not file.is_file():
            raise ValueError(f"curate.test_sets.frozen: test set '{s['name']}' ({file}) is missing")
        digest = file_sha256(file)
        if digest != s["sha256"]:
            raise ValueError(
                f"curate.test_sets.frozen: test set '{s['name']}' ({file}) changed since it was "
                f"frozen (sha256 {digest[:12]}..., frozen as {s['sha256'][:12]}...)"
            )
        s["path"] = str(file)
    return sets


def test_records(cfg: DistillConfig) -> tuple[list[Record], list[dict[str, Any]]]:
    """(every input of the evaluation and frozen test sets, what they are: name, path,
    sha256, rows) — small files, read on the driver."""
    records: list[Record] = []
    described = []
    for ts in cfg.evaluate.test_sets:
        texts = read_texts(ts.path, ts.input_field, ts.limit)
        records += [(ts.name, i, rec[ts.input_field]) for i, rec in enumerate(texts, 1)]
        described.append(
            {
                "name": ts.name,
                "from": "evaluate",
                "path": str(ts.path),
                "rows": len(texts),
                "sha256": file_sha256(ts.path),
            }  # fmt: skip
        )
    for frozen in cfg.curate.test_sets.frozen:
        for s in read_frozen(frozen):
            texts = read_texts(s["path"], "input")
            records += [(s["name"], i, rec["input"]) for i, rec in enumerate(texts, 1)]
            described.append(
                {
                    "name": s["name"],
                    "from": f"frozen:{frozen}",
                    "path": s["path"],
                    "rows": len(texts),
                    "sha256": s["sha256"],
                }  # fmt: skip
            )
    return records, described


def test_unit(spec: BuildTestSetSection, seed: int, row_id: str, order: int) -> float:
    """The row's draw for a built test set: the rows of smallest draw are chosen."""
    return stable_unit("test_set", seed, spec.name, row_id, order)


def wanted(spec: BuildTestSetSection, labels: list[str], counts: dict[str, int]) -> dict[str, int]:
    """Rows the test set takes of each gold label (None key: any label)."""
    if spec.kind == "balanced":
        return {lab: spec.rows // len(labels) for lab in labels}
    return {"*": spec.rows}


def candidate_bounds(
    spec: BuildTestSetSection, labels: list[str], counts: dict[str, int], widen: float = 1.0
) -> dict[str, float]:
    """{gold label: draws below this are candidates}, about twice what is needed (times
    `widen` after a short draw), so the driver sorts a small candidate set, never all rows."""
    need = wanted(spec, labels, counts)
    total = sum(counts.values())
    if "*" in need:
        bound = min(1.0, widen * (2 * need["*"] + 64) / max(total, 1))
        return dict.fromkeys(labels, bound)
    return {
        lab: min(1.0, widen * (2 * need[lab] + 64) / max(counts.get(lab, 0), 1)) for lab in labels
    }


def choose(
    candidates: list[dict[str, Any]],
    spec: BuildTestSetSection,
    labels: list[str],
    counts: dict[str, int],
) -> list[dict[str, Any]] | None:
    """The test set's rows among `candidates` (dicts with order, gold, u), smallest draw
    first; None when the candidates are too few (widen the bounds and try again)."""
    need = wanted(spec, labels, counts)
    ranked = sorted(candidates, key=lambda c: (c["u"], c["order"]))
    if "*" in need:
        available = sum(counts.values())
        if need["*"] > available:
            raise ValueError(
                f"curate.test_sets.build '{spec.name}': wants {need['*']} rows, only {available} "
                f"gold-labelled rows are left"
            )
        return ranked[: need["*"]] if len(ranked) >= need["*"] else None
    chosen = []
    for lab in labels:
        if need[lab] > counts.get(lab, 0):
            raise ValueError(
                f"curate.test_sets.build '{spec.name}': wants {need[lab]} rows of gold label "
                f"{lab}, only {counts.get(lab, 0)} are left"
            )
        mine = [c for c in ranked if c["gold"] == lab][: need[lab]]
        if len(mine) < need[lab]:
            return None
        chosen += mine
    return chosen


def write_test_sets(
    sets: dict[str, list[dict[str, Any]]], kinds: dict[str, str], out_dir: Path
) -> dict[str, Any]:
    """Write each test set (rows with id, source, source_line, input, gold) as NAME.jsonl in
    `out_dir` and freeze them all in frozen.json; returns its content."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, rows in sets.items():
        rows = sorted(rows, key=lambda r: (r["source"] or "", r["source_line"] or 0))
        file = out_dir / f"{name}.jsonl"
        with open(file, "w", encoding="utf-8") as f:
            for r in rows:
                record = {"input": r["input"], "label": r["gold"], "id": r["id"],
                          "source": r["source"], "source_line": r["source_line"]}  # fmt: skip
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        labels: dict[str, int] = {}
        for r in rows:
            labels[r["gold"]] = labels.get(r["gold"], 0) + 1
        entries.append(
            {
                "name": name,
                "kind": kinds[name],
                "file": file.name,
                "rows": len(rows),
                "labels": labels,
                "sha256": file_sha256(file),
                "content_sha256": row_digest((r["input"], r["gold"]) for r in rows),
            }
        )
    frozen = {"test_sets": entries}
    (out_dir / FROZEN).write_text(json.dumps(frozen, indent=2))
    return frozen
