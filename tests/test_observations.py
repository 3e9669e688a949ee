"""Own data of kind "observations": the README's example script, the whole pipeline on its files
against the closed-form posterior, `svd: null`, and one clear error for each kind of bad file."""

import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import yaml

from helpers import REPO, copy_workflow, planned_jobs, snakemake
from stagewise.config import count_settings
from stagewise.events import EventFileError
from stagewise.models.posterior import load_flow_model
from stagewise.steps import count_events_step
from stagewise.trafo import Trafo, fit_trafo, observation_batches

sys.path.insert(0, str(REPO / "examples"))
from linear_gaussian import posterior, simulate, write_event_file  # noqa: E402

EXAMPLE = ["config/config.yaml", "config/observations_example.yaml"]
FAST = {  # the example, smaller: one training file, fewer epochs, a smaller flow
    "data": {"training_data_file": "examples/data/training_00.h5"},
    "model": {"flow": {"num_transforms": 3, "hidden_dim": 48}},
    "training": {"stage_0": {"epochs": 6, "batch_size": 64}, "stage_1": {"epochs": 2, "batch_size": 64}},
    "evaluation": {"num_injections": 100, "num_samples": 300},
}


def run_snakemake(workdir, *args, overrides=None, check=True):
    """snakemake on the observations example (plus overrides) in `workdir`."""
    return snakemake(workdir, *args, overrides=overrides or {}, check=check, configfiles=EXAMPLE)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """A workflow copy with the example's files written by `python examples/linear_gaussian.py examples/data`."""
    workdir = copy_workflow(tmp_path_factory.mktemp("observations"))
    subprocess.run([sys.executable, "examples/linear_gaussian.py", "examples/data"], cwd=workdir, check=True)
    return workdir


@pytest.mark.slow
def test_the_example_script_writes_files_that_count_events_accepts(example, tmp_path):
    config = yaml.safe_load((example / "config/config.yaml").read_text())
    config |= yaml.safe_load((example / "config/observations_example.yaml").read_text())
    files = sorted((example / "examples/data").glob("*.h5"))

    count_events_step(count_settings(config), {"all": [str(f) for f in files]}, tmp_path / "counts.yaml")

    assert yaml.safe_load((tmp_path / "counts.yaml").read_text())["all"]["total"] == 24000


# The README: the short training of FAST gets the posterior means within 15 % of the closed-form posterior
# width (median over test events) and the widths within 6 % (median ratio); the example's full training
# gets 5-7 % and 2 %. Monte Carlo noise of the sample means is 1/sqrt(2000) = 2.2 % of the width per event.
MEAN_TOLERANCE, WIDTH_TOLERANCE = 0.15, 0.06


@pytest.mark.slow
def test_pipeline_on_observations_recovers_the_closed_form_posterior(example):
    run_snakemake(example, overrides=FAST)

    run = example / "results/linear_gaussian"
    metrics = yaml.safe_load((run / "evaluation/metrics.json").read_text())
    assert "no likelihood" in metrics["importance_sampling"]["skipped"]
    with h5py.File(example / "examples/data/test_00.h5") as f:
        inputs, a, b = f["data/inputs"][:1000], f["labels/a"][:1000], f["labels/b"][:1000]
    inputs = inputs[(np.abs(a) < 2.5) & (np.abs(b) < 2.5)][:200]  # posteriors the prior bounds do not cut
    means, covariance = posterior(inputs.astype(np.float64))
    model, _ = load_flow_model(run / "stage_1/model_stage_1.pt")
    trafo = Trafo.load(run / "trafo.h5")
    torch.manual_seed(0)
    with torch.no_grad():
        z, _ = model.sample(trafo.inputs_to_network(torch.as_tensor(inputs)[:, None, :]),
                            torch.zeros(len(inputs), 0), 2000)
    samples = trafo.labels_from_network(z).numpy()

    std = np.sqrt(np.diag(covariance))
    mean_error = np.median(np.abs(samples.mean(axis=1) - means) / std, axis=0)
    width_ratio = np.median(samples.std(axis=1) / std, axis=0)
    print(f"median |mean error| / width: {mean_error}, median width ratio: {width_ratio}")
    assert len(inputs) == 200
    assert (mean_error < MEAN_TOLERANCE).all(), mean_error
    assert (np.abs(width_ratio - 1) < WIDTH_TOLERANCE).all(), width_ratio


@pytest.mark.slow
def test_svd_null_plans_no_svd_step_and_trains_an_ordinary_first_layer(example):
    overrides = {**FAST, "svd": None, "run": "no_svd",
                 "training": {"stage_0": {"epochs": 1, "batch_size": 256, "freeze_svd": False}}}
    planned = planned_jobs(run_snakemake(example, "train_stage_0", "-n", overrides=overrides).output)
    run_snakemake(example, "train_stage_0", overrides=overrides)

    assert planned == {"count_events", "fit_trafo", "train_stage_0"}
    model, _ = load_flow_model(example / "results/no_svd/stage_0/model_stage_0.pt")
    assert model.embedding.svd_weight.shape == (1, 128, 9)  # as wide as the first hidden layer


@pytest.mark.slow
def test_freeze_svd_without_svd_is_a_config_error(example):
    result = run_snakemake(example, "-n", overrides={"svd": None}, check=False)

    assert result.returncode != 0
    assert "training.stage_0.freeze_svd: there is no SVD layer to freeze (svd is null)" in result.output


# Bad input: one clear error naming the file, and no counts.yaml


def write_good(path, num_events=50, seed=0):
    inputs, labels = simulate(num_events, np.random.default_rng(seed))
    write_event_file(path, inputs, labels)
    return path


def count(tmp_path, *paths):
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config |= yaml.safe_load((REPO / "config/observations_example.yaml").read_text())
    count_events_step(count_settings(config), {"training": [str(p) for p in paths]}, tmp_path / "counts.yaml")


def rewrite(path, dataset, values):
    with h5py.File(path, "r+") as f:
        del f[dataset]
        f[dataset] = values


def test_a_file_without_inputs_names_the_missing_dataset(tmp_path):
    path = write_good(tmp_path / "bad.h5")
    with h5py.File(path, "r+") as f:
        del f["data/inputs"]
        f["data/other"] = np.zeros((50, 9))

    with pytest.raises(EventFileError, match=r"bad.h5: missing dataset '/data/inputs'"):
        count(tmp_path, path)
    assert not (tmp_path / "counts.yaml").exists()


def test_a_file_without_a_label_names_the_missing_label(tmp_path):
    path = write_good(tmp_path / "bad.h5")
    with h5py.File(path, "r+") as f:
        del f["labels/b"]

    with pytest.raises(EventFileError, match=r"bad.h5: missing dataset '/labels/b'"):
        count(tmp_path, path)


def test_files_with_different_input_shapes_are_refused(tmp_path):
    good = write_good(tmp_path / "good.h5")
    bad = write_good(tmp_path / "bad.h5")
    rewrite(bad, "data/inputs", np.ones((50, 7), dtype=np.float32))

    with pytest.raises(EventFileError, match=r"bad.h5: data of shape \(7,\) per event, but .*good.h5 has \(9,\)"):
        count(tmp_path, good, bad)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_in_the_inputs_gives_the_count_and_the_first_index(tmp_path, value):
    path = write_good(tmp_path / "bad.h5")
    with h5py.File(path, "r+") as f:
        inputs = f["data/inputs"][()]
        inputs[[7, 30, 31], 2] = value
        f["data/inputs"][...] = inputs

    with pytest.raises(EventFileError, match=r"bad.h5: '/data/inputs' holds NaN or inf in 3 event\(s\), the first at "
                                             r"event 7"):
        count(tmp_path, path)


def test_nan_in_a_label_is_refused(tmp_path):
    path = write_good(tmp_path / "bad.h5")
    with h5py.File(path, "r+") as f:
        f["labels/a"][12] = np.nan

    with pytest.raises(EventFileError, match=r"'/labels/a' holds NaN or inf in 1 event\(s\), the first at event 12"):
        count(tmp_path, path)


def test_a_label_outside_its_prior_names_the_bounds_and_the_event(tmp_path):
    path = write_good(tmp_path / "bad.h5")
    with h5py.File(path, "r+") as f:
        f["labels/b"][20] = 3.5

    with pytest.raises(EventFileError, match=r"'/labels/b' has 1 value\(s\) outside its prior \[-3.0, 3.0\], the "
                                             r"first at event 20 \(3.5\)"):
        count(tmp_path, path)


def test_a_file_that_is_not_hdf5_is_refused(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not an HDF5 file\n")

    with pytest.raises(EventFileError, match=r"notes.h5: not a readable HDF5 file"):
        count(tmp_path, path)


def test_a_non_positive_log_input_stops_fit_trafo_naming_the_feature(tmp_path):
    path = write_good(tmp_path / "events.h5")
    with h5py.File(path, "r+") as f:
        inputs = f["data/inputs"][()]
        inputs[5, 8] = -1.0
        f["data/inputs"][...] = inputs

    with pytest.raises(ValueError, match=r"trafo.log_inputs: input feature\(s\) \[8\] have values <= 0"):
        fit_trafo(observation_batches([str(path)], ["a", "b"], 1, 50), ["a", "b"], [], log_inputs=[8])


@pytest.mark.slow
@pytest.mark.parametrize("pattern, message", [
    ("examples/data/missing.h5", "data.training_data_file: file not found: examples/data/missing.h5"),
    ("examples/data/nothing_*.h5", "data.training_data_file: the pattern 'examples/data/nothing_*.h5' matches no"),
], ids=["missing file", "empty glob"])
def test_a_missing_file_or_an_empty_glob_stops_the_run_naming_the_key(example, pattern, message):
    training = [pattern] if "*" not in pattern else pattern
    result = run_snakemake(example, "-n", overrides={"data": {"training_data_file": training}}, check=False)

    assert result.returncode != 0 and message in result.output


@pytest.mark.slow
def test_bad_values_stop_a_real_run_at_count_events_and_leave_no_counts(example):
    bad = example / "examples/data/bad_00.h5"
    write_good(bad, seed=3)
    with h5py.File(bad, "r+") as f:
        f["labels/a"][4] = np.inf
    overrides = {"run": "bad", "data": {"training_data_file": ["examples/data/training_00.h5", str(bad)]}}

    result = run_snakemake(example, "fit_trafo", overrides=overrides, check=False)

    assert result.returncode != 0 and "results/bad/logs/count_events.log" in result.output
    last_line = (example / "results/bad/logs/count_events.log").read_text().splitlines()[-1]
    assert last_line.endswith("bad_00.h5: '/labels/a' holds NaN or inf in 1 event(s), the first at event 4")
    assert not (example / "results/bad/counts.yaml").exists()
    assert not (example / "results/bad/trafo.h5").exists()
