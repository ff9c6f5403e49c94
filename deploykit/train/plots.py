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


def plot_rlhf(records: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """PPO's two curves against iteration: mean reward-model score (left) and KL to the reference
    per response (right), plus the verified accuracy of the samples when the tasks know answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        ax.plot(its, [r["reward"] for r in records], "o-", ms=3, lw=1.4, color="tab:blue", label="mean reward")
        acc = [(r["iteration"], r["sample_accuracy"]) for r in records if not math.isnan(r["sample_accuracy"])]
        if acc:
            ax.plot(*zip(*acc), "s--", ms=2.5, lw=1.0, color="tab:green", label="sampled answers right (share)")
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel("reward-model score / share right")
        ax.grid(True, alpha=0.3)
        kl_ax = ax.twinx()
        kl_ax.plot(its, [r["kl"] for r in records], "^-", ms=3, lw=1.2, color="tab:red", label="KL to reference")
        kl_ax.set_ylabel("KL (nats per response)")
        lines = ax.get_legend_handles_labels()
        kl_lines = kl_ax.get_legend_handles_labels()
        ax.legend(lines[0] + kl_lines[0], lines[1] + kl_lines[1], loc="best", fontsize=8)
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
