"""Write stagewise event files of kind "observations" from numpy arrays: a linear-Gaussian toy
whose posterior is known in closed form.

Each event has two labels a, b drawn from U(-3, 3) and K = 9 input features: eight are
x = M (a, b) + sigma * noise, with a fixed 8 x 2 matrix M, and the ninth is exp(x_0), a
positive feature for `trafo.log_inputs`. With a flat prior the posterior of (a, b) is
Gaussian with covariance C = (M^T M / sigma^2)^-1 and mean C M^T x / sigma^2 (the prior's
bounds cut it only for truths within a few sigma of +-3).

    python examples/linear_gaussian.py examples/data

writes training_00.h5, training_01.h5, validation_00.h5 and test_00.h5 into the folder;
config/observations_example.yaml trains on them.
"""

import sys
from pathlib import Path

import h5py
import numpy as np

SIGMA = 0.5
MATRIX = np.random.default_rng(1).normal(size=(8, 2))
FILES = {"training_00": 10000, "training_01": 10000, "validation_00": 2000, "test_00": 2000}


def write_event_file(path, inputs, labels):
    """One event file of kind "observations": inputs (N, K) and labels {name: (N,)}."""
    with h5py.File(path, "w") as f:
        f.attrs["stagewise_layout"] = "events/1"
        f.attrs["kind"] = "observations"
        f.create_dataset("data/inputs", data=np.asarray(inputs, dtype=np.float32))
        for name, values in labels.items():
            f.create_dataset(f"labels/{name}", data=np.asarray(values, dtype=np.float64))


def simulate(num_events, rng):
    """(inputs (N, 9), labels {"a": (N,), "b": (N,)})."""
    theta = rng.uniform(-3.0, 3.0, size=(num_events, 2))
    linear = theta @ MATRIX.T + SIGMA * rng.normal(size=(num_events, len(MATRIX)))
    inputs = np.concatenate([linear, np.exp(linear[:, :1])], axis=1)
    return inputs, {"a": theta[:, 0], "b": theta[:, 1]}


def posterior(inputs):
    """Closed-form posterior under a flat prior: means (N, 2) and the covariance (2, 2)."""
    covariance = np.linalg.inv(MATRIX.T @ MATRIX / SIGMA**2)
    means = inputs[:, : len(MATRIX)] @ MATRIX / SIGMA**2 @ covariance
    return means, covariance


def main(folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    for name, num_events in FILES.items():
        inputs, labels = simulate(num_events, rng)
        write_event_file(folder / f"{name}.h5", inputs, labels)
    print(f"wrote {', '.join(FILES)} (.h5) to {folder}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/data")
