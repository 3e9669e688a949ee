"""`make learning-curve`: what more training buys on the default problem.

Trains the default problem with the epochs of every stage (and with GNPE of the init network) scaled
by each of `--scales` (the cosine schedules then span the new length), as runs
results/learning_curve_x<scale> (scale 1 is the run `default`), evaluates each, and writes
bench/learning_curve.json and docs/learning_curve.png: the median and 90 % quantile over the test
injections of the network-vs-exact JSD per parameter, and the importance-sampling efficiency, against the
training time (history.csv: data, compute and validation of every stage).

    python bench/learning_curve.py [--scales 0.25 0.5 1 2] [--cores 2]

Each run is an ordinary Snakemake run: interrupted, it resumes; run again, it reruns nothing.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from stagewise import config as settings  # noqa: E402
from stagewise.files import atomic_path, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def override(config: dict, scale: float) -> dict:
    """The config override of a run whose stages train `scale` times their epochs."""
    def scaled(stage: dict) -> dict:
        return {"epochs": max(1, round(scale * stage["epochs"]))}

    changes: dict = {"run": "default" if scale == 1 else f"learning_curve_x{scale:g}",
                     "training": {name: scaled(stage) for name, stage in config["training"].items()}}
    if config.get("gnpe") is not None:
        changes["gnpe"] = {"init": {"training": scaled(config["gnpe"]["init"]["training"])}}
    return changes


def training_minutes(run: Path, stages: list[str]) -> float:
    """Minutes of training (data, compute, validation) of every stage of a finished run."""
    seconds = 0.0
    for stage in stages:
        history = pd.read_csv(run / stage / "history.csv")
        seconds += float(history[["time_data", "time_compute", "time_validation"]].to_numpy().sum())
    return seconds / 60


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1, 2])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "learning_curve.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "learning_curve.png"))
    args = parser.parse_args()
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    stages = (["init"] if config.get("gnpe") is not None else []) + settings.stage_names(config)
    names = config["inference_parameters"]
    points = []
    for scale in args.scales:
        changes = override(config, scale)
        run = REPO / "results" / changes["run"]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(changes, f)
        target = f"results/{changes['run']}/evaluation/metrics.json"
        command = [sys.executable, "-m", "snakemake", target, "--cores", str(args.cores), "--configfile",
                   str(REPO / "config" / "config.yaml"), f.name]
        print(" ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True, env=os.environ | {"CONDOR_CONFIG": "/dev/null"})
        Path(f.name).unlink()
        metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
        points.append({
            "scale": scale, "epochs": {name: stage["epochs"] for name, stage in changes["training"].items()},
            "run": changes["run"], "training_minutes": training_minutes(run, stages),
            "test_loss": metrics["test_loss"], "pp_ks_pvalue_combined": metrics["pp_ks_pvalue_combined"],
            "efficiency_median": metrics["importance_sampling"]["efficiency_median"],
            "efficiency_q16": metrics["importance_sampling"]["efficiency_q16"],
            "network_vs_exact": metrics["network_vs_exact"],
        })
    write_json(Path(args.out), {"stages": stages, "points": points, "extrapolation": extrapolate(points, names)})
    plot(points, names, Path(args.plot))
    print(f"{args.out}, {args.plot}")


def extrapolate(points: list[dict], names: list[str], goal: float = 0.02) -> dict:
    """Per parameter a power law jsd_median = a t^b fitted (least squares in log-log) to the points where at
    least half the injections were counted, and the training minutes at which it reaches `goal`: an
    extrapolation, not a measurement."""
    used = [p for p in points if p["network_vs_exact"]["injections_used"] >= 0.5 * (
        p["network_vs_exact"]["injections_used"] + p["network_vs_exact"]["injections_left_out"])]
    if len(used) < 2:
        return {}
    log_t = np.log([p["training_minutes"] for p in used])
    fits = {}
    for name in names:
        slope, intercept = np.polyfit(log_t, np.log([p["network_vs_exact"][name]["jsd_median"] for p in used]), 1)
        minutes = float(np.exp((np.log(goal) - intercept) / slope)) if slope < 0 else None
        fits[name] = {"exponent": float(slope), f"minutes_to_{goal:g}": minutes}
    return {"points_used": [p["scale"] for p in used], "fits": fits}


def plot(points: list[dict], names: list[str], path: Path) -> None:
    minutes = [p["training_minutes"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(names):
        left.plot(minutes, [p["network_vs_exact"][name]["jsd_median"] for p in points], "o-", color=f"C{i}",
                  label=f"{name} median")
        left.plot(minutes, [p["network_vs_exact"][name]["jsd_q90"] for p in points], "x:", color=f"C{i}",
                  label=f"{name} 90 %")
    for p in points:  # how many injections reached evaluation.effective_samples (the others are not counted)
        used = p["network_vs_exact"]["injections_used"]
        left.annotate(f"{used} inj.", (p["training_minutes"], p["network_vs_exact"][names[0]]["jsd_median"] or 1),
                      fontsize=7, textcoords="offset points", xytext=(2, 6))
    left.axhline(0.02, color="gray", linestyle="--", linewidth=1)
    left.axhline(0.002, color="gray", linestyle=":", linewidth=1)
    left.set(xscale="log", yscale="log", xlabel="training time (min, 2 CPU cores)",
             ylabel="JSD network vs exact (nat)", title="Network alone vs the exact posterior")
    left.legend(fontsize="x-small", ncol=2)
    right.plot(minutes, [100 * p["efficiency_median"] for p in points], "o-", label="median")
    right.plot(minutes, [100 * p["efficiency_q16"] for p in points], "x:", label="16 % quantile")
    for p in points:
        right.annotate(f"x{p['scale']:g}", (p["training_minutes"], 100 * p["efficiency_median"]), fontsize=8)
    right.set(xscale="log", yscale="log", xlabel="training time (min, 2 CPU cores)",
              ylabel="importance-sampling efficiency (%)", title="Importance sampling")
    right.legend(fontsize="small")
    for ax in (left, right):
        ax.set_xticks([1, 2, 5, 10, 20], labels=["1", "2", "5", "10", "20"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
