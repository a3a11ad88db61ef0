"""What the manifest and the data card say about a dataset, gathered block by block.

``Stats.add`` reads one batch of rows; ``Stats.merge`` adds up two of them. The stage makes
one ``Stats`` per block on the workers and merges them on the driver: what reaches the driver
is counts, histograms, at most ``samples`` rows per drop reason, and the n-gram hashes of a
bounded sample of rows — never the dataset.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ray_pipeline.data.manifest import digest_hex, digest_part
from ray_pipeline.data.schema import OK
from ray_pipeline.data.subsets import smallest_subset, stable_unit

# Input lengths (characters) are counted in these bins: [edge_i, edge_i+1).
LENGTH_EDGES = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
NGRAM_SIZES = (1, 2, 3)
NGRAM_SAMPLE_ROWS = 20_000  # rows whose n-grams are counted (a hash-chosen sample)
_WORD = re.compile(r"\w+")
_EXCERPT = 300


def reason_head(reason: str | None) -> str:
    """The name of a reason (``too_short: 3 chars < 5`` -> ``too_short``)."""
    return (reason or "unknown").split(":")[0]


def _length_bin(n: int) -> int:
    return int(np.searchsorted(LENGTH_EDGES, n, side="right")) - 1


def _ngram_hashes(text: str) -> dict[int, list[int]]:
    words = _WORD.findall(text.lower())
    out = {}
    for n in NGRAM_SIZES:
        grams = (" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
        out[n] = [
            int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "big", signed=True)
            for g in grams
        ]
    return out


def _cut(text: Any) -> Any:
    if not isinstance(text, str) or len(text) <= _EXCERPT:
        return text
    return text[:_EXCERPT] + f"... ({len(text)} chars)"


@dataclass
class StatsConfig:
    labels: list[str]
    fractions: list[float]
    seed: int
    samples: int = 20  # rows per drop reason
    ngram_rate: float = 1.0  # share of kept rows whose n-grams are counted


@dataclass
class Stats:
    cfg: StatsConfig
    status: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)  # of the ok rows
    teachers: Counter = field(default_factory=Counter)  # who answered the ok rows
    sources: Counter = field(default_factory=Counter)  # ok rows per source
    prompt_hashes: set = field(default_factory=set)
    lengths_kept: Counter = field(default_factory=Counter)  # length bin -> rows
    lengths_dropped: Counter = field(default_factory=Counter)
    samples: dict = field(default_factory=dict)  # reason -> [(draw, row excerpt)]
    ngram_hashes: dict = field(default_factory=dict)  # n -> list of hash arrays
    ngram_totals: Counter = field(default_factory=Counter)
    ngram_rows: int = 0
    gold: Counter = field(default_factory=Counter)  # rows, correct, mixed, relabeled
    gold_teachers: dict = field(default_factory=dict)  # teacher -> Counter(answers, correct)
    confusion: Counter = field(default_factory=Counter)  # "label|gold" -> rows
    agreement: Counter = field(default_factory=Counter)  # rounded agreement -> rows
    vote: Counter = field(default_factory=Counter)  # rows, relabeled
    judge: Counter = field(default_factory=Counter)  # score -> rows
    judge_cost: float = 0.0
    subsets: dict = field(default_factory=dict)  # fraction -> Counter(labels), ok rows
    digest: int = 0  # sum of the ok rows' digest parts (id, label)

    def add(self, rows: list[dict[str, Any]]) -> Stats:
        c = self.cfg
        for row in rows:
            status = row["status"]
            self.status[status] += 1
            n = len(row["input"] or "")
            if status != OK:
                head = reason_head(row["reason"])
                self.reasons[head] += 1
                self.lengths_dropped[_length_bin(n)] += 1
                self._sample(head, row)
            else:
                self.labels[row["label"]] += 1
                self.teachers[row["teacher"]] += 1
                self.sources[row["source"]] += 1
                if row["prompt_hash"]:
                    self.prompt_hashes.add(row["prompt_hash"])
                self.lengths_kept[_length_bin(n)] += 1
                # A generative row (no label) is its answer.
                answer = row["label"] if row["label"] is not None else row["output"]
                self.digest += digest_part(row["id"], answer)
                smallest = smallest_subset(row["id"], c.fractions, c.seed)
                if smallest is not None:
                    self.subsets.setdefault(smallest, Counter())[row["label"]] += 1
                if c.ngram_rate >= 1 or stable_unit("ngrams", row["id"]) < c.ngram_rate:
                    self._ngrams(row["input"] or "")
            if row["scores"]:
                self._scores(json.loads(row["scores"]))
        return self

    def _sample(self, head: str, row: dict[str, Any]) -> None:
        if self.cfg.samples == 0:
            return
        draw = stable_unit("sample", row["id"], row["source"], row["source_line"])
        mine = self.samples.setdefault(head, [])
        if len(mine) >= self.cfg.samples and draw >= mine[-1][0]:
            return
        excerpt = {
            k: _cut(row[k])
            for k in ("id", "source", "source_line", "input", "response", "label", "gold", "reason")
        }
        mine.append((draw, excerpt))
        mine.sort(key=lambda x: x[0])
        del mine[self.cfg.samples :]

    def _ngrams(self, text: str) -> None:
        self.ngram_rows += 1
        for n, hashes in _ngram_hashes(text).items():
            self.ngram_totals[n] += len(hashes)
            self.ngram_hashes.setdefault(n, []).append(np.unique(np.array(hashes, dtype=np.int64)))

    def _scores(self, scores: dict[str, Any]) -> None:
        gold = scores.get("gold")
        if gold is not None:
            if gold.get("mixed"):
                self.gold["mixed"] += 1
            else:
                self.gold["rows"] += 1
                label = gold.get("relabeled_from", gold["label"])
                self.gold["correct"] += label == gold["gold"]
                self.gold["relabeled"] += "relabeled_from" in gold
                self.confusion[f"{label}|{gold['gold']}"] += 1
                for teacher, answer in gold["teachers"]:
                    t = self.gold_teachers.setdefault(teacher, Counter())
                    t["answers"] += 1
                    t["correct"] += answer == gold["gold"]
        vote = scores.get("vote")
        if vote is not None:
            self.vote["rows"] += 1
            self.vote["relabeled"] += "relabeled_from" in vote
            self.agreement[round(vote["agreement"], 2)] += 1
        judge = scores.get("judge")
        if judge is not None:
            self.judge[judge["score"]] += 1
            self.judge_cost += judge.get("cost") or 0.0

    def merge(self, other: Stats) -> Stats:
        for name in (
            "status", "reasons", "labels", "teachers", "sources", "lengths_kept",
            "lengths_dropped", "ngram_totals", "gold", "confusion", "agreement", "vote", "judge",
        ):  # fmt: skip
            getattr(self, name).update(getattr(other, name))
        self.prompt_hashes |= other.prompt_hashes
        for head, rows in other.samples.items():
            mine = sorted(self.samples.get(head, []) + rows, key=lambda x: x[0])
            self.samples[head] = mine[: self.cfg.samples]
        for n, arrays in other.ngram_hashes.items():
            self.ngram_hashes.setdefault(n, []).extend(arrays)
        self.ngram_rows += other.ngram_rows
        for teacher, counts in other.gold_teachers.items():
            self.gold_teachers.setdefault(teacher, Counter()).update(counts)
        for f, counts in other.subsets.items():
            self.subsets.setdefault(f, Counter()).update(counts)
        self.judge_cost += other.judge_cost
        self.digest += other.digest
        return self

    # ------------------------------------------------------------------ results
    def kept(self) -> int:
        return self.status.get(OK, 0)

    def distinct_ngrams(self) -> dict[str, Any]:
        """Distinct word n-grams over all n-grams of the kept rows (of the sample)."""
        out: dict[str, Any] = {"rows": self.ngram_rows}
        for n in NGRAM_SIZES:
            arrays = self.ngram_hashes.get(n, [])
            distinct = len(np.unique(np.concatenate(arrays))) if arrays else 0
            total = self.ngram_totals.get(n, 0)
            out[f"distinct_{n}"] = distinct
            out[f"distinct_{n}_ratio"] = round(distinct / total, 4) if total else None
        return out

    def subset_table(self) -> dict[str, Any]:
        """{fraction: {rows, labels}} of the nested subsets of the kept rows."""
        out = {}
        running: Counter = Counter()
        for f in sorted(self.cfg.fractions):
            running.update(self.subsets.get(f, Counter()))
            out[f"{f:g}"] = {"rows": sum(running.values()), "labels": dict(sorted(running.items()))}
        return out

    def gold_summary(self) -> dict[str, Any] | None:
        g = self.gold
        if not g:
            return None
        teachers = {
            name: {
                "answers": c["answers"],
                "accuracy": round(c["correct"] / c["answers"], 4) if c["answers"] else None,
            }
            for name, c in sorted(self.gold_teachers.items())
        }
        return {
            "rows": g["rows"],
            "accuracy": round(g["correct"] / g["rows"], 4) if g["rows"] else None,
            "disagreements": g["rows"] - g["correct"],
            "relabeled": g["relabeled"],
            "mixed_gold_rows": g["mixed"],
            "teachers": teachers,
            "confusion": {k: v for k, v in sorted(self.confusion.items())},
        }

    def sample_rows(self) -> dict[str, list[dict[str, Any]]]:
        return {head: [r for _, r in rows] for head, rows in sorted(self.samples.items())}

    def content_sha256(self) -> str:
        return digest_hex(self.digest)
