"""The loss-curve PNG written next to every training checkpoint."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_loss(records: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Train loss (every logged step) and val loss (every eval) against step; val perplexity on a
    secondary axis, which is the same curve as val loss on a log scale (ppl = e^loss), labelled so
    a reader can read perplexity directly."""
    import matplotlib

    matplotlib.use("Agg")  # no display here, and training must never open a window
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        if train:
            ax.plot(*zip(*train), lw=1.0, color="tab:blue", alpha=0.8, label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", lw=1.6, ms=3.5, color="tab:orange", label="val loss")
            last_step, last_loss = val[-1]
            ax.annotate(f"val ppl {math.exp(last_loss):.2f}", (last_step, last_loss),
                        textcoords="offset points", xytext=(-10, 12), ha="right", fontsize=8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(True, alpha=0.3)
        if train or val:
            ax.legend(loc="upper right")
            # Perplexity axis: ppl = exp(loss); monotone, so the transform pair is exact.
            sec = ax.secondary_yaxis("right", functions=(lambda x: _exp(x), lambda p: _log(p)))
            sec.set_ylabel("perplexity")
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _exp(x):
    import numpy as np

    return np.exp(np.clip(x, -50, 50))


def _log(p):
    import numpy as np

    return np.log(np.clip(p, 1e-30, None))
