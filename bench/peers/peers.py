"""`make bench-peers`: stagewise measured against the real peers, Dingo's own data pipeline (vs_dingo.py: the
arrival time fixed, and free with GNPE) and bilby with dynesty on stagewise's exact likelihood (vs_nested.py);
writes bench/peers.json and docs/peers_corner.png. Needs .venv-peers (`make peers-env`) and a finished
`make run`; nothing here asserts a figure: the goals are in the README's table.

    .venv-peers/bin/python bench/peers/peers.py [--events 8] [--nlive 250] [--repeats 3]
"""

import argparse
import datetime
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "bench/peers")]

import vs_dingo  # noqa: E402
import vs_nested  # noqa: E402
from bench import machine, spread  # noqa: E402

from stagewise.evaluate import plots  # noqa: E402
from stagewise.files import write_json  # noqa: E402

INDISTINGUISHABLE = 0.002  # nat: the gravitational-wave literature's threshold for indistinguishable posteriors
log = logging.getLogger("peers")


def nested_figures(names, events):
    """The posterior figures over events (and parameters) of vs_nested.compare's rows."""
    jsd = [row[f"jsd_{name}"] for row in events for name in names]
    floor = [row[f"floor_{name}"] for row in events for name in names]
    within = [j < INDISTINGUISHABLE or j <= 2 * f for j, f in zip(jsd, floor, strict=True)]
    # against the mean of the two dynesty runs, whose error is that of one run over sqrt(2)
    difference = [row["stagewise_log_evidence"] - (row["dynesty_log_evidence"] + row["dynesty_log_evidence_seed2"]) / 2
                  for row in events]
    error = [math.hypot(row["stagewise_log_evidence_std"], row["dynesty_log_evidence_err"] / math.sqrt(2))
             for row in events]
    return {
        "jsd_stagewise_vs_dynesty": spread(jsd),
        "jsd_dynesty_vs_dynesty": spread(floor),
        "jsd_within_goal": {"median": float(np.mean(within)), "min": float(np.mean(within)),
                            "max": float(np.mean(within))},
        "log_evidence_difference": spread(difference),
        "log_evidence_pull": spread([d / e for d, e in zip(difference, error, strict=True)]),
        "time_vs_nested": spread([row["dynesty_seconds"] / row["stagewise_seconds"] for row in events]),
        "time_vs_nested_default_infer": spread([row["dynesty_seconds"] / row["stagewise_default_seconds"]
                                                for row in events]),
        "dynesty_seconds_per_event": spread([row["dynesty_seconds"] for row in events]),
    }


def corner(names, ours, runs, path):
    """stagewise's importance-weighted samples over dynesty's of the first event."""
    first = runs[0, vs_nested.SEEDS[0]]["samples"]
    plots.corner_plots(first[None], [(ours[0]["samples"], ours[0]["weights"] / ours[0]["weights"].sum())],
                       ours[0]["truths"][None], names, path, titles=["observed event 0"],
                       labels=("dynesty (bilby)", "stagewise, importance-weighted"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=8, help="observed events of the default problem (8)")
    parser.add_argument("--nlive", type=int, default=250, help="dynesty's live points (250)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the pipeline timing (3)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/peers.json")
    parser.add_argument("--folder", type=Path, default=REPO / "results/peers", help="observed events, posteriors")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not vs_nested.MODEL.exists():
        sys.exit(f"peers.py: {vs_nested.MODEL} is missing: run `make run` first")
    started = time.perf_counter()
    results = {"machine": machine(), "date": datetime.date.today().isoformat()}
    torch.set_num_threads(os.cpu_count())  # as make bench; stagewise infer and dynesty then run on one thread each
    dingo = {}
    for name, gnpe in vs_dingo.FIGURES.items():  # vs_dingo (the arrival time fixed), vs_dingo_gnpe (free, GNPE)
        results[name], dingo[name] = vs_dingo.vs_dingo_figure(args.repeats, gnpe)
        log.info("Dingo's pipeline (%s): %s", name, results[name])
    args.folder.mkdir(parents=True, exist_ok=True)
    names, events, ours, runs = vs_nested.compare(args.events, args.nlive, args.folder)
    results.update(nested_figures(names, events))
    corner(names, ours, runs, REPO / "docs/peers_corner.png")
    results["details"] = {**dingo, "nested": {"names": names, "nlive": args.nlive, "events": events},
                          "seconds": time.perf_counter() - started}
    write_json(args.out, results)
    print(json.dumps({key: value for key, value in results.items() if key != "details"}, indent=1))


if __name__ == "__main__":
    main()
