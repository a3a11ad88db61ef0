"""The loss curve of a training run (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss_curve(
    history: list[dict[str, Any]], step_log: list[dict[str, Any]], path: str | Path, title: str
) -> Path:
    """Training loss at every logged step (the loss over the steps since the one before),
    each epoch's mean training loss, and the validation loss at each epoch's end, against the
    optimizer step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers, CI or servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    logged = [(e["step"], e["loss"]) for e in step_log if e.get("loss") is not None]
    if logged:
        ax.plot(*zip(*logged, strict=True), lw=1, alpha=0.6, label="train (logged steps)")
    epochs = [(h["steps"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    if epochs:
        ax.plot(*zip(*epochs, strict=True), marker="o", label="train (epoch mean)")
    val = [(h["steps"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), marker="s", label="validation (epoch end)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target")
    # Losses fall by orders of magnitude (random init -> near the label-noise floor).
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
