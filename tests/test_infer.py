"""The infer step on the tiny run: the simulated observed set through the Snakemake rule, the model file
alone through `stagewise infer`, per-event seeding, the shared likelihood with evaluate, reruns, and
one-line errors for bad observed files and model files."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import in_process, planned_jobs, snakemake, tiny_config
from stagewise.config import Problem, evaluation_settings
from stagewise.evaluate.importance import ImportanceSampler, likelihood_plan
from stagewise.infer import ImportanceWeights, InferenceModel, InferenceSettings, infer
from stagewise.observed import ObservedFile, ObservedFileError, write_observed_file
from stagewise.sources import make_simulator

pytestmark = pytest.mark.slow  # they use the tiny run's model
RUN = "results/tiny"
MODEL = f"{RUN}/stage_1/model_stage_1.pt"
OBSERVED = f"{RUN}/data/observed.h5"
SETTINGS = InferenceSettings(num_samples=200, importance_sampling=True, events_per_batch=64, num_plot_events=2)


def datasets(path):
    """{name: array} of every dataset in an HDF5 file."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: out.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return out


def stagewise(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "stagewise.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)




def errors(result):
    """The lines of a failed command's stderr that are its error messages (beside tqdm's progress bar),
    asserting that the last line is one of them."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and lines and lines[-1].startswith("stagewise "), result.stderr[-2000:]
    return [line for line in lines if line.startswith("stagewise ")]


def observed_events(path):
    """The simulated observed file's contents as write_observed_file takes them."""
    with h5py.File(path, "r") as f:
        detectors = list(f["strain"])
        return {"event_id": f["event_id"][()], "frequencies": f["frequencies"][()],
                "strain": {d: f["strain"][d][()] for d in detectors}, "asds": {d: f["asds"][d][()] for d in detectors},
                "labels": {k: f["labels"][k][()] for k in f["labels"]}}


def subset(events, index):
    return {"event_id": events["event_id"][index], "frequencies": events["frequencies"],
            **{group: {k: v[index] for k, v in events[group].items()} for group in ("strain", "asds", "labels")}}


def test_the_rule_writes_posterior_summary_and_corner_of_the_simulated_set(tiny_run):
    folder = tiny_run[0] / RUN / "inference/simulated"
    posterior = datasets(folder / "posterior.h5")
    names = ["f0", "tau", "snr"]
    assert list(posterior["event_id"]) == [0, 1, 2, 3]
    for name in [*names, "log_prob", "log_prior", "log_likelihood", "weights"]:
        assert posterior[f"samples/{name}"].shape == (4, 200), name
    weights = posterior["samples/weights"]
    assert np.allclose(weights.mean(axis=1), 1.0) and (weights >= 0).all()
    inside = np.isfinite(posterior["samples/log_prior"])
    assert np.isnan(posterior["samples/log_likelihood"][~inside]).all() and (weights[~inside] == 0).all()
    events = {k.split("/")[1]: v for k, v in posterior.items() if k.startswith("events/")}
    assert np.allclose(events["efficiency"] * 200, events["n_eff"])
    assert np.allclose(events["log_bayes_factor"], events["log_evidence"] - events["log_noise_evidence"])
    table = pd.read_csv(folder / "summary.csv")
    assert list(table["event_id"]) == [0, 1, 2, 3]
    assert {f"{n}_{q}" for n in names for q in ("q05", "median", "q95")} <= set(table.columns)
    assert {"f0_true", "log_bayes_factor", "efficiency"} <= set(table.columns)
    assert (table["f0_q05"] <= table["f0_median"]).all() and (table["f0_median"] <= table["f0_q95"]).all()
    assert (folder / "corner.png").stat().st_size > 10_000


def test_the_model_file_alone_gives_the_rules_posterior_h5(tiny_run, tmp_path):
    """The stage model and the observed file copied into an empty folder, with `stagewise infer`:
    every dataset of posterior.h5 equals the rule's, bit for bit, and summary.csv too (events_per_batch
    differs too)."""
    shutil.copy(tiny_run[0] / MODEL, tmp_path / "model.pt")
    shutil.copy(tiny_run[0] / OBSERVED, tmp_path / "events.h5")
    result = stagewise("infer", "model.pt", "events.h5", "--out", "out", "--num-samples", 200,
                       "--num-plot-events", 2, "--events-per-batch", 3, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours = datasets(tmp_path / "out/posterior.h5")
    rules = datasets(tiny_run[0] / RUN / "inference/simulated/posterior.h5")
    assert ours.keys() == rules.keys()
    for name, values in rules.items():
        assert np.array_equal(ours[name], values, equal_nan=True), name
    summary = (tiny_run[0] / RUN / "inference/simulated/summary.csv").read_text()
    assert (tmp_path / "out/summary.csv").read_text() == summary


def test_an_events_draws_depend_on_its_event_id_only(tiny_run, tmp_path):
    """The four events split into two files in another order, read one at a time: each event's samples,
    log q, weights and evidence equal the rule's bit for bit."""
    events = observed_events(tiny_run[0] / OBSERVED)
    write_observed_file(tmp_path / "a.h5", **subset(events, [3, 1]))
    write_observed_file(tmp_path / "b.h5", **subset(events, [2, 0]))
    settings = InferenceSettings(200, True, 1, 1)
    infer(tiny_run[0] / MODEL, [tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "out", settings)
    ours = datasets(tmp_path / "out/posterior.h5")
    rules = datasets(tiny_run[0] / RUN / "inference/simulated/posterior.h5")
    order = [list(rules["event_id"]).index(i) for i in ours["event_id"]]
    assert list(ours["event_id"]) == [3, 1, 2, 0]
    for name, values in rules.items():
        if name != "event_id":
            assert np.array_equal(ours[name], values[order], equal_nan=True), name


def test_batches_until_the_effective_samples_extend_the_rules_posterior(tiny_run, tmp_path):
    """With effective_samples, each event gets batches of num_samples until its n_eff reaches the target or
    max_samples are drawn; its first batch is the rule's samples bit for bit (one batch), the rows are padded
    with NaN and weight 0, and the efficiency, n_eff and network-vs-exact JSD are those of all samples."""
    settings = InferenceSettings(200, True, 64, 2, effective_samples=150, max_samples=700)
    infer(tiny_run[0] / MODEL, [tiny_run[0] / OBSERVED], tmp_path / "out", settings)
    ours = datasets(tmp_path / "out/posterior.h5")
    rules = datasets(tiny_run[0] / RUN / "inference/simulated/posterior.h5")
    drawn = ours["events/num_samples"].astype(int)
    assert set(drawn) <= {200, 400, 600} and drawn.max() > 200  # whole batches, at most 700 // 200
    assert ours["samples/f0"].shape == (4, 600)
    for i, n in enumerate(drawn):
        assert np.array_equal(ours["samples/f0"][i, :200], rules["samples/f0"][i])
        assert np.isfinite(ours["samples/log_prob"][i, :n]).all() and np.isnan(ours["samples/f0"][i, n:]).all()
        assert (ours["samples/weights"][i, n:] == 0).all()
        weights = ours["samples/weights"][i, :n]
        assert weights.mean() == pytest.approx(1.0)
        n_eff = weights.sum() ** 2 / np.square(weights).sum()
        assert ours["events/n_eff"][i] == pytest.approx(n_eff) and ours["events/efficiency"][i] == pytest.approx(
            n_eff / n)
        assert n_eff >= 150 or n == 600
    for name in ("f0", "tau", "snr"):
        assert ((ours[f"events/jsd_{name}"] >= 0) & (ours[f"events/jsd_{name}"] <= math.log(2) + 1e-9)).all()
    table = pd.read_csv(tmp_path / "out/summary.csv")
    assert list(table["num_samples"]) == list(drawn) and {"jsd_f0", "jsd_snr"} <= set(table.columns)


def test_infer_weighs_with_the_log_likelihood_and_prior_of_evaluate(tiny_run):
    """The same samples and data: infer's log prior and log likelihood (from the model file's bundle) give
    evaluate's log weights (from the run's config and files) exactly."""
    workdir = tiny_run[0]
    model = InferenceModel(workdir / MODEL)
    with model.open(workdir / OBSERVED) as observed:
        block = observed.read(0, 2)
    inputs, features, whitened = model.prepare(block)
    batch = next(model.flow_batches(inputs[:1], features[:1], 0, 300, seed=1))
    samples, log_q = batch.samples, batch.log_q
    asd = torch.as_tensor(block["asds"][0])
    weigh, _ = ImportanceWeights.for_model(model)
    log_w = weigh.log_weights(batch, whitened[0], asd)
    per_sample = {name: batch.columns[name].numpy() for name in ("log_prior", "log_likelihood")}

    config = tiny_config()
    problem = Problem.from_settings(evaluation_settings(config))
    simulator = make_simulator(problem, str(workdir / RUN / "data/test_00.h5"),
                               str(workdir / RUN / "data/fiducial_asd.h5"))
    plan, _ = likelihood_plan(problem)
    expected = ImportanceSampler(problem, plan, simulator).log_weights(samples, log_q, whitened[0], asd)
    ours = torch.as_tensor(per_sample["log_likelihood"] + per_sample["log_prior"]) - log_q
    inside = torch.isfinite(expected)
    assert inside.sum() > 0 and torch.equal(torch.isfinite(torch.as_tensor(per_sample["log_prior"])), inside)
    assert torch.equal(ours[inside], expected[inside])
    assert torch.equal(log_w[inside], expected[inside]) and torch.all(log_w[~inside] == -math.inf)


def test_inference_settings_rerun_only_infer_and_a_retrained_model_reruns_it(tiny_run, tmp_path):
    workdir = Path(shutil.copytree(tiny_run[0], tmp_path / "workdir", symlinks=True))
    assert planned_jobs(snakemake(workdir, "-n", "infer").output) == set()
    changed = planned_jobs(snakemake(workdir, "-n", overrides={"inference": {"num_samples": 100}}).output)
    assert changed == {"infer_set", "all"}
    more = planned_jobs(snakemake(workdir, "-n", overrides={"inference": {"simulated_events": 5}}).output)
    assert more == {"simulate_observed", "infer_set", "all"}
    retrained = planned_jobs(snakemake(workdir, "-n", overrides={"training": {"stage_1": {"epochs": 3}}}).output)
    assert {"train_stage_1", "evaluate", "infer_set"} <= retrained and "train_stage_0" not in retrained


def write_bad(tmp_path, events, change):
    """The observed events with `change` applied, written to bad.h5; a change named `in_file` edits the
    written file instead (h5py)."""
    events = {k: (dict(v) if isinstance(v, dict) else v.copy()) for k, v in events.items()}
    for group in ("strain", "asds"):
        events[group] = {d: a.copy() for d, a in events[group].items()}
    if change.__name__ != "in_file":
        change(events)
    write_observed_file(tmp_path / "bad.h5", **events)
    if change.__name__ == "in_file":
        with h5py.File(tmp_path / "bad.h5", "a") as f:
            change(f)
    return tmp_path / "bad.h5"


def _drop_l1_asds():
    def in_file(f):
        del f["asds/L1"]
    return in_file


def _set(group, detector, index, value):
    def change(events):
        events[group][detector][index] = value
    return change


BAD_FILES = {
    "another grid": (lambda e: e.update(frequencies=e["frequencies"] + 0.5),
                     "'/frequencies' (124 bins from 20.5 to 512.5 Hz) differs from the model's grid (124 bins from "
                     "20 to 512 Hz)"),
    "another detector set": (lambda e: [e[g].pop("L1") for g in ("strain", "asds")],
                             "'/strain' holds detectors ['H1'], the model's are ['H1', 'L1']"),
    "a missing ASD": (_drop_l1_asds(), "'/asds' holds detectors ['H1'], the model's are ['H1', 'L1']"),
    "NaN in the strain": (_set("strain", "H1", (3, 5), np.nan),
                          "'/strain/H1' holds NaN or inf in 1 event(s), the first is event 3 (event_id 3)"),
    "an ASD of zero": (_set("asds", "L1", (2, 0), 0.0),
                       "'/asds' holds values <= 0, the first in event 2 (event_id 2): an ASD must be positive"),
    "no events": (lambda e: e.update(subset(e, slice(0, 0))), "holds no events ('/event_id' is empty)"),
    "a repeated event_id": (lambda e: e.update(event_id=np.array([0, 1, 1, 3])),
                            "'/event_id' repeats an id: each event needs its own (it seeds the event's draws)"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_observed_file_stops_with_one_line_and_writes_nothing(tiny_run, tmp_path, case, capsys):
    """The NaN sits in the last event, read in the last batch (one event per batch): posterior.h5 is
    never left half-written."""
    change, message = BAD_FILES[case]
    bad = write_bad(tmp_path, observed_events(tiny_run[0] / OBSERVED), change)
    result = in_process(capsys, "infer", tiny_run[0] / MODEL, bad, "--out", tmp_path / "out", "--events-per-batch", 1)
    assert errors(result) == [f"stagewise infer: {bad}: {message}"]
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_a_file_of_another_kind_and_models_that_cannot_infer_stop_with_one_line(tiny_run, tmp_path, capsys):
    run = tiny_run[0] / RUN
    result = in_process(capsys, "infer", run / "stage_1/model_stage_1.pt", run / "data/test_00.h5", "--out",
                        tmp_path / "a")
    assert errors(result) == [f"stagewise infer: {run / 'data/test_00.h5'}: root attribute "
                                          "'stagewise_layout' must be 'observed/1', found 'events/1' (an event file "
                                          "for training, not observed data)"]
    checkpoint = run / "checkpoints/stage_1/model_latest.pt"
    result = in_process(capsys, "infer", checkpoint, run / "data/observed.h5", "--out", tmp_path / "b")
    assert errors(result) == [f"stagewise infer: {checkpoint}: a checkpoint, not a stage model: infer "
                                          "takes results/<run>/stage_<k>/model_stage_<k>.pt"]
    older = tmp_path / "older.pt"
    state = torch.load(run / "stage_1/model_stage_1.pt", weights_only=True)
    del state["inference"]
    torch.save(state, older)
    result = in_process(capsys, "infer", older, run / "data/observed.h5", "--out", tmp_path / "c")
    (line,) = errors(result)
    assert f"{older}: this model file carries no inference bundle (written before 2026-12)" in line
    result = in_process(capsys, "infer", run / "stage_1/model_stage_1.pt", run / "data/observed.h5", "--out",
                        tmp_path / "d", "--effective-samples", 500, "--max-samples", 100)
    assert errors(result) == ["stagewise infer: --max-samples 100 is below --num-samples 2000"]
    assert not any((tmp_path / name).exists() and any((tmp_path / name).iterdir()) for name in "abcd")


def test_observations_check_the_number_of_inputs_and_their_values(tmp_path):
    path = tmp_path / "observed.h5"
    inputs = np.ones((3, 4))
    inputs[2, 1] = np.inf
    write_observed_file(path, [7, 8, 9], inputs=inputs)
    with pytest.raises(ObservedFileError, match=r"'/data/inputs' is float64 of shape \(3, 4\), expected float of "
                                                r"shape \(3, 5\)"):
        ObservedFile(path, "observations", num_inputs=5)
    with ObservedFile(path, "observations", num_inputs=4) as observed:
        with pytest.raises(ObservedFileError, match=r"'/data/inputs' holds NaN or inf in 1 event\(s\), the first is "
                                                    r"event 2 \(event_id 9\)"):
            observed.read(0, 3)
    with pytest.raises(ObservedFileError, match="'kind' is 'observations', but the model infers signals"):
        ObservedFile(path, "signals", detectors=["H1"], frequencies=np.arange(3.0))
