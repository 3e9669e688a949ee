"""PNG plots of an evaluation: loss curves, P-P plot, posteriors of a few test events."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from ..files import atomic_path  # noqa: E402
from .calibration import pp_curve  # noqa: E402


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def loss_curves(histories, path):
    """Train and test loss of all stages over the running epoch, stage boundaries dashed.

    histories: list of (stage name, pandas DataFrame of history.csv)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for i, (stage, history) in enumerate(histories):
        epochs = history["epoch"] + offset
        ax.plot(epochs, history["train_loss"], color=f"C{i}", label=f"{stage} train")
        ax.plot(epochs, history["test_loss"], color=f"C{i}", linestyle=":", label=f"{stage} test")
        if offset:
            ax.axvline(offset + 0.5, color="gray", linestyle="--", linewidth=1)
        offset += len(history)
    ax.set(xlabel="epoch (all stages)", ylabel="loss (-log q)", title="Loss curves")
    ax.legend(fontsize="small")
    _save(fig, path)


def pp_plot(levels, names, pvalues, path):
    """P-P curves per parameter with the 95 % band of a calibrated posterior."""
    grid = np.linspace(0, 1, 201)
    n = len(levels)
    fig, ax = plt.subplots(figsize=(5, 5))
    lower, upper = stats.binom.ppf(0.025, n, grid) / n, stats.binom.ppf(0.975, n, grid) / n
    ax.fill_between(grid, lower, upper, color="gray", alpha=0.3, label="95 % band")
    for i, (name, curve) in enumerate(zip(names, pp_curve(levels, grid).T)):
        ax.plot(grid, curve, label=f"{name} (KS p = {pvalues[name]:.2f})")
    ax.plot([0, 1], [0, 1], color="black", linewidth=0.8)
    ax.set(xlabel="credible level", ylabel="fraction of injections inside", title=f"P-P plot, {n} injections")
    ax.legend(fontsize="small")
    _save(fig, path)


def posterior_panels(samples, truths, names, path):
    """One row per event, one histogram of posterior samples per parameter, truth marked."""
    rows, cols = samples.shape[0], samples.shape[2]
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.hist(samples[r, :, c], bins=40, color="C0", alpha=0.7)
            ax.axvline(truths[r, c], color="C3", label="truth")
            ax.set_yticks([])
            if r == rows - 1:
                ax.set_xlabel(names[c])
        axes[r, 0].set_ylabel(f"event {r}")
    axes[0, 0].legend(fontsize="small")
    fig.suptitle("Posterior samples of test events")
    _save(fig, path)
