"""Figures (a) pipeline efficiency and (c) matmul fraction at a production-like size on one
NVIDIA GPU, in one go under a time limit: `python bench/gpu.py OUT.json [--minutes 8]`.

The size: 4096 frequency bins, 20,000 training events, batch 4096, a wider embedding
and flow. CI has no GPU; run it by hand where one is (see the README's Performance).
"""

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from snakemake.utils import update_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Training, default_config, machine, prepare, training_figures  # noqa: E402

from stagewise import config as settings  # noqa: E402
from stagewise.files import write_json  # noqa: E402

PRODUCTION = {
    "simulation": {"frequencies": {"f_min": 20.0, "f_max": 1043.75, "delta_f": 0.25}, "events_per_file": 2500,
                   "num_files": {"training": 8, "validation": 1, "test": 1}},
    "svd": {"size": 200, "num_training_samples": 4000, "num_validation_samples": 1000},
    "model": {"embedding": {"hidden_dims": [1024, 1024, 512, 256], "output_dim": 128},
              "flow": {"num_transforms": 10, "hidden_dim": 512, "num_blocks": 2, "num_bins": 8, "tail_bound": 4.0}},
    "training": {"stage_0": {"batch_size": 4096}},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cpu runs the same script slowly (to check it)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device")
    signal.alarm(int(args.minutes * 60))  # the time limit: SIGALRM ends the run
    started = time.perf_counter()
    config = default_config(device=args.device)
    update_config(config, PRODUCTION)
    settings.validate(config)
    with tempfile.TemporaryDirectory() as folder:
        training = Training(config, prepare(Path(folder), config), args.device)
        efficiency, fraction, details = training_figures(training, args.repeats)
    results = {"machine": machine(), "pipeline_efficiency": efficiency, "matmul_fraction": fraction,
               "details": {**details, "seconds": time.perf_counter() - started, "size": PRODUCTION}}
    write_json(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
