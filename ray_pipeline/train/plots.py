"""The loss curve of a training run (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss_curve(history: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Train and validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers, CI or servers
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    val = [(h["epoch"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per answer token")
    # Losses fall by orders of magnitude (random init -> near the label-noise floor).
    ax.set_yscale("log")
    ax.set_xticks(epochs)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
