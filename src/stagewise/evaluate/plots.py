"""PNG plots of an evaluation: loss curves, P-P plot, posteriors of a few test events."""

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import stats  # noqa: E402

from ..files import atomic_path  # noqa: E402
from .calibration import pp_curve  # noqa: E402


def _save(fig: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def loss_curves(histories: Sequence[tuple[str, pd.DataFrame]], path: str | Path) -> None:
    """Training and validation loss of all stages over the running epoch, stage boundaries dashed.

    histories: list of (stage name, pandas DataFrame of history.csv)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for i, (stage, history) in enumerate(histories):
        epochs = history["epoch"] + offset
        ax.plot(epochs, history["train_loss"], color=f"C{i}", label=f"{stage} train")
        ax.plot(epochs, history["validation_loss"], color=f"C{i}", linestyle=":", label=f"{stage} validation")
        if offset:
            ax.axvline(offset + 0.5, color="gray", linestyle="--", linewidth=1)
        offset += len(history)
    ax.set(xlabel="epoch (all stages)", ylabel="loss (-log q)", title="Loss curves")
    ax.legend(fontsize="small")
    _save(fig, path)


def pp_plot(levels: np.ndarray, names: Sequence[str], pvalues: Mapping[str, float], path: str | Path) -> None:
    """P-P curves per parameter with the 95 % band of a calibrated posterior."""
    grid = np.linspace(0, 1, 201)
    n = len(levels)
    fig, ax = plt.subplots(figsize=(5, 5))
    lower, upper = stats.binom.ppf(0.025, n, grid) / n, stats.binom.ppf(0.975, n, grid) / n
    ax.fill_between(grid, lower, upper, color="gray", alpha=0.3, label="95 % band")
    for name, curve in zip(names, pp_curve(levels, grid).T, strict=True):
        ax.plot(grid, curve, label=f"{name} (KS p = {pvalues[name]:.2f})")
    ax.plot([0, 1], [0, 1], color="black", linewidth=0.8)
    ax.set(xlabel="credible level", ylabel="fraction of injections inside", title=f"P-P plot, {n} injections")
    ax.legend(fontsize="small")
    _save(fig, path)


def corner_plots(network: np.ndarray, exact: Sequence[tuple[np.ndarray, np.ndarray]] | None, truths: np.ndarray | None,
                 names: Sequence[str], path: str | Path, titles: Sequence[str] | None = None,
                 labels: tuple[str, str] = ("network", "importance-weighted")) -> None:
    """A corner plot per event, side by side: the network's samples, the importance-weighted ones, truth.

    network (E, S, P); exact: per event samples (n, P) and weights (n,) summing to one, or None without IS;
    truths (E, P) or None when unknown; titles: one per event (default "test event <e>"); labels: the legend's
    names of the two sample sets."""
    events, num_samples, count = network.shape
    if exact is not None:  # a fixed-seed resampling, only to show the weighted samples as points
        rng = np.random.default_rng(0)
        resampled = [s[rng.choice(len(w), num_samples, p=w)] if w.sum() > 0 else s[:0] for s, w in exact]
    fig = plt.figure(figsize=(3.2 * count * events, 3.2 * count))
    for e, subfig in enumerate(np.atleast_1d(fig.subfigures(1, events))):  # type: ignore[arg-type]
        axes = subfig.subplots(count, count, squeeze=False)
        shown = network[e] if exact is None else np.concatenate([network[e], resampled[e]])
        ranges = [np.quantile(shown[:, i], [0.001, 0.999]) for i in range(count)]
        for r in range(count):
            for c in range(count):
                ax = axes[r, c]
                if c > r:
                    ax.set_axis_off()
                    continue
                if r == c:
                    _marginal(ax, network[e, :, c], None if exact is None else (exact[e][0][:, c], exact[e][1]),
                              ranges[c])
                    if truths is not None:
                        ax.axvline(truths[e, c], color="C3")
                    ax.set_yticks([])
                else:
                    ax.scatter(network[e, :, c], network[e, :, r], s=1, color="C0", alpha=0.2, rasterized=True)
                    if exact is not None:
                        ax.scatter(resampled[e][:, c], resampled[e][:, r], s=1, color="C1", alpha=0.2,
                                   rasterized=True)
                    if truths is not None:
                        ax.plot(truths[e, c], truths[e, r], marker="x", color="C3", markersize=8)
                    ax.set_xlim(ranges[c])
                    ax.set_ylim(ranges[r])
                    if c == 0:
                        ax.set_ylabel(names[r])
                if r == count - 1:
                    ax.set_xlabel(names[c])
        subfig.suptitle(f"test event {e}" if titles is None else titles[e])
    handles = [plt.Line2D([], [], color="C0", label=labels[0])]
    if truths is not None:
        handles.append(plt.Line2D([], [], color="C3", label="truth"))
    if exact is not None:
        handles.insert(1, plt.Line2D([], [], color="C1", label=labels[1]))
    fig.legend(handles=handles, loc="upper right")
    _save(fig, path)


def time_posteriors(network: np.ndarray, exact: Sequence[tuple[np.ndarray, np.ndarray]] | None, truths: np.ndarray,
                    path: str | Path) -> None:
    """The arrival time's posterior of a few events, in microseconds from the truth: the network's times
    (E, S), per event the importance-weighted times (n,) with weights (n,) or None, truths (E,)."""
    events = len(network)
    fig, axes = plt.subplots(1, events, figsize=(3.4 * events, 3), squeeze=False)
    for e, ax in enumerate(axes[0]):
        offsets = (network[e] - truths[e]) * 1e6
        weighed = None if exact is None else ((exact[e][0] - truths[e]) * 1e6, exact[e][1])
        _marginal(ax, offsets, weighed, np.quantile(offsets, [0.005, 0.995]))
        ax.axvline(0.0, color="C3")
        ax.set(xlabel="time - true time (us)", title=f"test event {e}")
        ax.set_yticks([])
    _save(fig, path)


def gnpe_iterations(table: pd.DataFrame, path: str | Path) -> None:
    """Importance-sampling efficiency of each injection against the Gibbs iterations it took (a histogram
    of the iterations when nothing was weighed)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if "efficiency" in table:
        ax.scatter(table["iterations"], 100 * table["efficiency"], s=10, alpha=0.6)
        medians = table.groupby("iterations")["efficiency"].median()
        ax.plot(medians.index, 100 * medians.values, "o-", color="C1", label="median")
        ax.set(yscale="log", ylabel="importance-sampling efficiency (%)")
        ax.legend(fontsize="small")
    else:
        ax.hist(table["iterations"], bins=list(np.arange(0.5, table["iterations"].max() + 1.5)), color="C0")
        ax.set(ylabel="injections")
    ax.set(xlabel="Gibbs iterations (chosen per injection)", title="GNPE: iterations and efficiency")
    _save(fig, path)


def network_vs_exact(divergences: Mapping[str, np.ndarray], path: str | Path) -> None:
    """The distribution over injections of each parameter's JSD between the network's and the exact
    marginal (nat), with the levels 0.002 (indistinguishable posteriors) and 0.02."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, values) in enumerate(divergences.items()):
        values = np.sort(values[np.isfinite(values)])
        if len(values):
            ax.step(np.maximum(values, 1e-5), np.arange(1, len(values) + 1) / len(values), where="post",
                    color=f"C{i}", label=f"{name} (median {np.median(values):.3g})")
    for level in (0.002, 0.02):
        ax.axvline(level, color="gray", linestyle="--", linewidth=1)
    count = max((len(v) for v in divergences.values()), default=0)
    ax.set(xscale="log", xlabel="JSD of the marginals, network vs importance-weighted (nat)",
           ylabel="fraction of injections below", title=f"Network vs exact posterior, {count} injections")
    ax.legend(fontsize="small")
    _save(fig, path)


def empty(message: str, path: str | Path) -> None:
    """A plot that says why there is nothing to show."""
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.set_axis_off()
    _save(fig, path)


def _marginal(ax, values, exact, value_range):
    """Histograms of the network's samples and, when `exact` (samples, weights) is given, the weighted ones."""
    bins = np.linspace(*value_range, 41)
    ax.hist(values, bins=bins, density=True, histtype="step", color="C0")
    if exact is not None and exact[1].sum() > 0:
        ax.hist(exact[0], bins=bins, weights=exact[1], density=True, histtype="step", color="C1")
    ax.set_xlim(value_range)


def svd_mismatch(tables: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> None:
    """Mismatch of held-out signals (or observations) against the SVD basis size, per basis.

    tables: {detector or "inputs": mismatch table of svd.mismatch_table}; empty without SVD."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if not tables:
        ax.text(0.5, 0.5, "no SVD basis in this run (svd: null)", ha="center", va="center")
    for i, (detector, table) in enumerate(tables.items()):
        for key, style in (("mean", "-"), ("p99", "--"), ("max", ":")):
            if key in table:
                ax.plot(table["size"], np.maximum(table[key], 1e-12), style, color=f"C{i}",
                        label=f"{detector} {key}")
    ax.set(xscale="log", yscale="log", xlabel="basis size", ylabel="mismatch 1 - |V^T s|",
           title="SVD mismatch of held-out signals")
    ax.legend(fontsize="small")
    _save(fig, path)


def label_distributions(physical: np.ndarray, network: np.ndarray, names: Sequence[str], path: str | Path) -> None:
    """Histograms of the test injections' labels: physical (top) and after the trafo (bottom)."""
    count = len(names)
    fig, axes = plt.subplots(2, count, figsize=(3 * count, 4.4), squeeze=False)
    for i, name in enumerate(names):
        axes[0, i].hist(physical[:, i], bins=30, color="C0")
        axes[0, i].set_xlabel(name)
        axes[1, i].hist(network[:, i], bins=30, color="C2")
        axes[1, i].set_xlabel(f"{name} after trafo")
    axes[0, 0].set_ylabel("injections")
    axes[1, 0].set_ylabel("injections")
    fig.suptitle("Label distributions before and after the trafo")
    fig.tight_layout()
    _save(fig, path)


def pulls(pulls_by_label: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Histogram of the pulls (prediction − truth) / σ of each label, with the unit Gaussian."""
    names = list(pulls_by_label)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    grid = np.linspace(-4, 4, 200)
    for ax, name in zip(axes[0], names, strict=True):
        values = np.clip(pulls_by_label[name], -4, 4)
        ax.hist(values, bins=30, range=(-4, 4), density=True, color="C0", alpha=0.6)
        ax.plot(grid, stats.norm.pdf(grid), color="black", linewidth=1)
        ax.set(title=f"{name}: std {np.std(pulls_by_label[name]):.2f}", xlabel="pull")
    _save(fig, path)


def validation_curves(runs: Sequence[tuple[str, str, Sequence[pd.DataFrame]]], path: str | Path) -> None:
    """The validation loss of every run over its running epoch (all stages), one colour per setting and
    one line style per seed replica; the y range is that of the last stage's losses, whose differences
    matter. runs: (run name, setting, history of each stage)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    settings = list(dict.fromkeys(setting for _, setting, _ in runs))
    replicas: dict[str, int] = {}
    for name, setting, histories in runs:
        losses = pd.concat([history["validation_loss"] for history in histories], ignore_index=True)
        replica = replicas[setting] = replicas.get(setting, -1) + 1
        ax.plot(np.arange(1, len(losses) + 1), losses, color=f"C{settings.index(setting) % 10}",
                linestyle=("-", "--", ":", "-.")[replica % 4], label=name)
    last = pd.concat([histories[-1]["validation_loss"] for _, _, histories in runs])
    low, high = np.nanmin(last), np.nanmax(last)
    ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set(xlabel="epoch (all stages)", ylabel="validation loss (-log q)",
           title="Validation loss of every run (y: the range of the last stage)")
    ax.legend(fontsize="small", ncol=2)
    _save(fig, path)
