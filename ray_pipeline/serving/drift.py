"""Input drift: how the inputs served differ from the inputs the student was trained on.

Two signals, both cheap enough to follow live:

* **length**: the share of inputs in each of 10 length bins (in characters; the bin edges are
  the training inputs' deciles), compared by the population stability index,
  PSI = sum((served - train) * ln(served / train)). Under 0.1 is usually read as stable, over
  0.25 as a shift worth a look.
* **unknown words**: the share of an input's words never seen in training (lower-cased,
  the 50,000 most frequent training words), the training inputs' own rate beside it.

``reference`` summarises the training inputs (a small JSON file the router reads);
``DriftMonitor`` follows served inputs; ``drift_figure`` draws both side by side.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

VOCAB_SIZE = 50_000
BINS = 10
_WORD = re.compile(r"\w+", re.UNICODE)
_EPS = 1e-4  # share given to an empty bin, so that PSI stays finite


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _bin(length: int, edges: list[int]) -> int:
    """Index of the bin holding `length`: bins are (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    lo, hi = 0, len(edges)
    while lo < hi:
        mid = (lo + hi) // 2
        if length <= edges[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


def reference(texts: Iterable[str]) -> dict[str, Any]:
    """The training inputs' length bins and shares, vocabulary and unknown-word rate."""
    texts = list(texts)
    if not texts:
        raise ValueError("no training inputs to build a drift reference from")
    lengths = sorted(len(t) for t in texts)
    # Decile edges, de-duplicated: short, uniform inputs give fewer bins.
    edges = sorted(
        {lengths[min(len(lengths) - 1, (len(lengths) * k) // BINS)] for k in range(1, BINS)}
    )
    counts = Counter(w for t in texts for w in words(t))
    vocab = sorted(w for w, _ in counts.most_common(VOCAB_SIZE))
    shares = [0] * (len(edges) + 1)
    for n in lengths:
        shares[_bin(n, edges)] += 1
    known = set(vocab)
    total_words = sum(counts.values())
    unknown = sum(c for w, c in counts.items() if w not in known)
    return {
        "inputs": len(texts),
        "length_edges": edges,
        "length_shares": [s / len(texts) for s in shares],
        "unknown_word_rate": unknown / total_words if total_words else 0.0,
        "vocabulary": vocab,
    }


def write_reference(ref: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ref))
    return path


def psi(served: list[float], train: list[float]) -> float:
    """Population stability index of two distributions over the same bins."""
    out = 0.0
    for s, t in zip(served, train, strict=True):
        s, t = max(s, _EPS), max(t, _EPS)
        out += (s - t) * math.log(s / t)
    return out


class DriftMonitor:
    """Served inputs against the reference: counts per length bin and unknown words."""

    def __init__(self, ref: dict[str, Any]):
        self.ref = ref
        self.edges = ref["length_edges"]
        self.vocab = frozenset(ref["vocabulary"])
        self.bins = [0] * (len(self.edges) + 1)
        self.inputs = 0
        self.words = 0
        self.unknown = 0

    def observe(self, text: str) -> None:
        self.inputs += 1
        self.bins[_bin(len(text), self.edges)] += 1
        ws = words(text)
        self.words += len(ws)
        self.unknown += sum(1 for w in ws if w not in self.vocab)

    def length_shares(self) -> list[float]:
        return [b / self.inputs for b in self.bins] if self.inputs else [0.0] * len(self.bins)

    def snapshot(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "length_psi": psi(self.length_shares(), self.ref["length_shares"])
            if self.inputs
            else None,
            "unknown_word_rate": self.unknown / self.words if self.words else None,
            "train_unknown_word_rate": self.ref["unknown_word_rate"],
            "length_shares": self.length_shares(),
            "train_length_shares": self.ref["length_shares"],
        }


def drift_figure(monitor: DriftMonitor, path: str | Path) -> Path:
    """Length bins (training against served) and unknown-word rates, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snap = monitor.snapshot()
    edges = monitor.edges
    labels = (
        [f"<={edges[0]}"]
        + [f"{a + 1}-{b}" for a, b in zip(edges, edges[1:], strict=False)]
        + [f">{edges[-1]}"]
        if edges
        else ["all"]
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    x = range(len(labels))
    width = 0.4
    left.bar([i - width / 2 for i in x], snap["train_length_shares"], width, label="training")
    left.bar([i + width / 2 for i in x], snap["length_shares"], width, label="served")
    left.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=8)
    left.set_xlabel("input length (characters)")
    left.set_ylabel("share of inputs")
    psi_text = "n/a" if snap["length_psi"] is None else f"{snap['length_psi']:.3f}"
    left.set_title(f"input length: PSI {psi_text} over {snap['inputs']} served inputs")
    left.legend()
    rates = [snap["train_unknown_word_rate"], snap["unknown_word_rate"] or 0.0]
    right.bar(["training", "served"], rates, color=["C0", "C1"])
    right.set_title("words unseen in training")
    right.set_ylabel("share of words")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
