"""The TensorFlow backend, `model.type: gaussian_regression`: its loss, a real Snakemake run of the
tiny problem through the same stages (a SIGTERM mid-epoch and a resume give the uninterrupted model
bit for bit), its evaluation beside the flow's, and that a torch run never imports TensorFlow."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from helpers import REPO, planned_jobs, snakemake, training_process, wait_for
from stagewise import cli

# No simulated observed set of its own: the inference test reads the flow run's (tiny_run).
REGRESSION = {"run": "tiny_regression", "model": {"type": "gaussian_regression", "label_weight_dict": {"snr": 0.5}},
              "evaluation": {"compare_runs": ["tiny"]}, "inference": {"simulated_events": 0},
              "training": {"stage_0": {"epochs": 4, "batch_size": 10}}}
RUN = "results/tiny_regression"


def test_gaussian_nll_is_the_weighted_formula_and_zero_weights_cannot_give_nan():
    import tensorflow as tf

    from stagewise.models.regression import gaussian_nll

    theta = tf.constant([[0.5, 1.0, 3.0]])
    mean = tf.constant([[0.0, 1.0, np.inf]])
    log_sigma = tf.Variable([[np.log(2.0), 0.0, -1e4]], dtype=tf.float32)
    weights = tf.constant([1.0, 2.0, 0.0])
    with tf.GradientTape() as tape:
        loss = gaussian_nll(theta, mean, log_sigma, weights)
    gradient = tape.gradient(loss, log_sigma)
    assert float(loss) == pytest.approx(2 * np.log(2.0) + (0.5 / 2.0) ** 2)
    assert np.isfinite(gradient.numpy()).all() and gradient.numpy()[0, 2] == 0.0


def keras_weights(path):
    """{HDF5 path: array} of the weights in a .keras file, read without TensorFlow."""
    with zipfile.ZipFile(path) as archive:
        data = io.BytesIO(archive.read("model.weights.h5"))
    arrays = {}
    with h5py.File(data, "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


@pytest.fixture(scope="module")
def regression_run(tiny_run, tmp_path_factory):
    """A copy of the tiny flow run with the regression run beside it: preprocessing done, then a
    copy of that state for the interruption test, then the whole regression run."""
    workdir = Path(shutil.copytree(tiny_run[0], tmp_path_factory.mktemp("regression") / "w", symlinks=True))
    snakemake(workdir, "build_svd", overrides=REGRESSION)
    before_training = Path(shutil.copytree(workdir, tmp_path_factory.mktemp("regression") / "b", symlinks=True))
    jobs = planned_jobs(snakemake(workdir, overrides=REGRESSION).output)
    return workdir, before_training, jobs


@pytest.mark.slow
def test_regression_runs_through_the_same_stages_and_writes_keras_models(regression_run):
    workdir, _, jobs = regression_run
    assert jobs == {"train_stage_0", "train_stage_1", "evaluate", "all"}
    run = workdir / RUN
    for stage in ("stage_0", "stage_1"):
        assert (run / stage / f"model_{stage}.keras").exists()
        history = (run / stage / "history.csv").read_text().splitlines()
        assert history[0] == ("epoch,train_loss,validation_loss,learning_rate,grad_norm,time_data,time_compute,"
                              "time_validation")
    assert len((run / "stage_0" / "history.csv").read_text().splitlines()) == 5
    svd = np.concatenate([h5py.File(run / f"svd_{d}.h5")["basis"][()].T[None] for d in ("H1", "L1")])
    stage_0, stage_1 = (keras_weights(run / s / f"model_{s}.keras") for s in ("stage_0", "stage_1"))
    first_layer = next(name for name in stage_0 if name.endswith("vars/0") and stage_0[name].ndim == 3)
    assert np.allclose(stage_0[first_layer], svd, atol=1e-6)  # frozen in stage 0
    assert not np.allclose(stage_1[first_layer], svd, atol=1e-6)  # trained in stage 1
    assert not (workdir / "results/tiny/stage_0/model_stage_0.keras").exists()


@pytest.mark.slow
def test_regression_infers_a_mean_and_an_uncertainty_per_label_of_each_observed_event(regression_run, tmp_path,
                                                                                     capsys):
    """dnn_reco's apply step: `<label>` and `<label>_uncertainty` per event, in physical units, no samples;
    the regression's weights in a .pt file are refused with one line."""
    workdir, _, _ = regression_run
    folder, observed = tmp_path / "inference", workdir / "results/tiny/data/observed.h5"
    assert cli.main(["infer", str(workdir / RUN / "stage_1/model_stage_1.keras"), str(observed), "--out",
                     str(folder)]) == 0
    with h5py.File(folder / "posterior.h5") as f:
        assert f.attrs["model_type"] == "gaussian_regression" and "samples" not in f
        assert f.attrs["importance_sampling_skipped"] == "gaussian_regression has no samples"
        predictions = {name: f["predictions"][name][()] for name in f["predictions"]}
        truths = {name: f["labels"][name][()] for name in f["labels"]}
    assert sorted(predictions) == sorted(f"{n}{s}" for n in ("f0", "tau", "snr") for s in ("", "_uncertainty"))
    for name in ("f0", "tau", "snr"):
        assert predictions[name].shape == (4,) and (predictions[f"{name}_uncertainty"] > 0).all()
    assert (np.abs(predictions["f0"] - truths["f0"]) < 200).all()  # inside the prior's width: physical units
    table = pd.read_csv(folder / "summary.csv")
    assert list(table.columns[:3]) == ["event_id", "f0", "f0_uncertainty"] and "f0_true" in table.columns
    assert not (folder / "corner.png").exists()

    best = workdir / RUN / "checkpoints/stage_1/model_best.pt"  # the regression's weights in a .pt file
    code = cli.main(["infer", str(best), str(observed), "--out", str(tmp_path / "out")])
    assert code == 2 and capsys.readouterr().err.splitlines()[-1] == (
        f"stagewise infer: {best}: not a flow model (a gaussian_regression stage model is a .keras file)")


@pytest.mark.slow
def test_regression_evaluation_reports_pulls_coverage_and_the_flow_beside_it(regression_run):
    workdir, _, _ = regression_run
    evaluation = workdir / RUN / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    flow = json.loads((workdir / "results/tiny/evaluation/metrics.json").read_text())
    assert metrics["model_type"] == "gaussian_regression" and flow["model_type"] == "flow"
    assert metrics["test_data_digest"] == flow["test_data_digest"]
    assert np.isfinite(metrics["test_loss"])
    for name in ("f0", "tau", "snr"):
        summary = metrics["per_label"][name]
        assert 0 < summary["pull_std"] < 20 and 0 <= summary["coverage_68"] <= summary["coverage_95"] <= 1
    table = (evaluation / "metrics.html").read_text()
    assert "Side by side (same test injections)" in table and "tiny (flow)" in table
    for plot in ("loss_curves", "pulls", "svd_mismatch", "label_distributions"):
        assert (evaluation / f"{plot}.png").stat().st_size > 1000
    assert not (evaluation / "pp_plot.png").exists()


@pytest.mark.slow
def test_a_sigterm_mid_epoch_and_a_resume_give_the_uninterrupted_keras_model(regression_run):
    workdir, before_training, _ = regression_run
    (before_training / "overrides.yaml").write_text(yaml.safe_dump(REGRESSION))
    command = [sys.executable, "-m", "snakemake", "train_stage_0", "--cores", "2", "--configfile",
               "config/config.yaml", "tiny.yaml", "overrides.yaml"]
    process = subprocess.Popen(command, cwd=before_training, env=dict(os.environ, CONDOR_CONFIG="/dev/null"),
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = before_training / RUN / "logs" / "train_stage_0.log"
    # epoch 1 (its first step traces the Keras graph) lasts far longer than the poll: the stop lands inside it
    assert wait_for(lambda: log.exists() and "epoch 1/4" in log.read_text(), process, timeout=120)
    os.kill(training_process(before_training), signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert "returned non-zero exit status 75" in output and "received SIGTERM" in log.read_text()
    stop = re.search(r"stopping in epoch (\d)/4 at step (\d+) of (\d+): received SIGTERM", log.read_text())
    assert stop and 0 < int(stop[2]) < int(stop[3]), log.read_text()[-2000:]  # inside an epoch, not at its end
    epoch, step = int(stop[1]), int(stop[2])
    print(f"SIGTERM stopped epoch {epoch} at step {step} of {stop[3]}")
    checkpoint = torch.load(before_training / RUN / "checkpoints/stage_0/model_latest.pt", weights_only=True)
    assert checkpoint["epoch"] == epoch - 1 and checkpoint["partial_epoch"]["batches"]["step"] == step
    snakemake(before_training, "train_stage_0", overrides=REGRESSION)
    assert f"resuming epoch {epoch} at step {step}" in log.read_text()
    resumed = keras_weights(before_training / RUN / "stage_0" / "model_stage_0.keras")
    reference = keras_weights(workdir / RUN / "stage_0" / "model_stage_0.keras")
    assert resumed.keys() == reference.keys()
    for name, values in reference.items():
        assert np.array_equal(values, resumed[name]), name


FLOW_RUN_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import tiny_config
import stagewise.cli, stagewise.artefacts
from stagewise.config import evaluation_settings, stage_settings, validate
from stagewise.evaluate.run import EvaluationInputs, evaluate
from stagewise.training.monitor import Monitor
from stagewise.training.stage import StageInputs, StageOutputs, train_stage

run, out = Path({run!r}), Path({out!r})
config = tiny_config()
config["training"]["stage_1"]["epochs"] = 1
validate(config)  # and fill in the defaults, as the Snakefile does
detectors = ("H1", "L1")
inputs = StageInputs(
    training_files=[str(run / f"data/training_{{i:02d}}.h5") for i in range(2)],
    validation_files=[str(run / "data/validation_00.h5")], trafo=str(run / "trafo.h5"),
    svd={{d: str(run / f"svd_{{d}}.h5") for d in detectors}}, fiducial_asd=str(run / "data/fiducial_asd.h5"),
    asd_set=str(run / "data/asd_set.h5"), previous_model=str(run / "stage_0/model_stage_0.pt"))
outputs = StageOutputs(model=str(out / "model_stage_1.pt"), history=str(out / "history.csv"))
train_stage(stage_settings(config, "stage_1"), config["local"], "stage_1", inputs, outputs, out / "checkpoints",
            threads=2, monitor=Monitor(out / "tensorboard", "stage_1"))
evaluation = EvaluationInputs(
    model=out / "model_stage_1.pt",
    histories={{"stage_0": run / "stage_0/history.csv", "stage_1": out / "history.csv"}},
    trafo=run / "trafo.h5", test_files=[run / "data/test_00.h5"], fiducial_asd=run / "data/fiducial_asd.h5",
    asd_set=run / "data/asd_set.h5", svd={{d: run / f"svd_{{d}}.h5" for d in detectors}}, compare={{}})
(out / "evaluation").mkdir()
evaluate(evaluation_settings(config), config["local"], evaluation, out / "evaluation", 2)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))))
"""


@pytest.mark.slow
def test_a_flow_training_and_evaluation_never_import_tensorflow(tiny_run, tmp_path):
    """The flow's own path, in a fresh process: train_stage (stage 1 of the tiny run, with TensorBoard
    logs) and evaluate of the model it wrote; TensorFlow and Keras are installed, and never imported."""
    script = FLOW_RUN_SCRIPT.format(tests=str(REPO / "tests"), run=str(tiny_run[0] / "results/tiny"),
                                    out=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 2  # header + the one epoch trained
    assert json.loads((tmp_path / "evaluation/metrics.json").read_text())["model_type"] == "flow"
    assert list((tmp_path / "tensorboard").iterdir())  # the TensorBoard file was written
