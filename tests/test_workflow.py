"""The Snakemake side, with real Snakemake runs of the tiny config in temporary folders."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch
import yaml

from helpers import REPO, copy_workflow, planned_jobs, snakemake

ALL_RULES = {"simulate", "count_events", "fit_trafo", "build_svd", "train_stage_0", "train_stage_1", "evaluate",
             "simulate_observed", "infer_set", "all"}
INFERENCE = {"simulate_observed", "infer_set"}
PLOTS = ("loss_curves", "pp_plot", "corner", "svd_mismatch", "label_distributions", "network_vs_exact",
         "network_vs_exact_worst")


def test_dry_run_lists_every_step_of_the_dag(tmp_path):
    result = snakemake(copy_workflow(tmp_path), "-n")
    assert planned_jobs(result.output) == ALL_RULES


def test_the_production_config_is_valid_and_plans_the_whole_dag(tmp_path):
    """config/production.yaml layered over the default passes every check and plans every rule."""
    result = snakemake(copy_workflow(tmp_path), "-n", configfiles=("config/config.yaml", "config/production.yaml"))
    assert planned_jobs(result.output) == ALL_RULES | {"train_init"}
    assert "results/production/stage_1/model_stage_1.pt" in result.output


def test_dag_renders_as_svg(tmp_path):
    if shutil.which("dot") is None:
        pytest.skip("graphviz 'dot' is not installed (apt-get install graphviz)")
    dag = snakemake(copy_workflow(tmp_path), "--dag").stdout
    svg = subprocess.run(["dot", "-Tsvg"], input=dag, capture_output=True, text=True, check=True).stdout
    for rule in ALL_RULES - {"all"}:
        assert rule in svg


@pytest.mark.slow
def test_partial_target_builds_only_what_stage_1_needs(tiny_run):
    _, first, second, evaluation_after_first = tiny_run
    assert first == ALL_RULES - {"evaluate", "all"} - INFERENCE
    assert not evaluation_after_first
    assert second == {"evaluate", "all"} | INFERENCE


@pytest.mark.slow
def test_full_run_writes_every_documented_output(tiny_run):
    workdir = tiny_run[0]
    run = workdir / "results" / "tiny"
    evaluation = ["metrics.json", "metrics.html", "importance_sampling.csv", *(f"{plot}.png" for plot in PLOTS)]
    for path in ["counts.yaml", "trafo.h5", "svd_H1.h5", "svd_L1.h5", *(f"evaluation/{e}" for e in evaluation)]:
        assert (run / path).stat().st_size > 0, path
    for stage in ("stage_0", "stage_1"):
        assert (run / stage / f"model_{stage}.pt").exists()
        assert (run / stage / "history.csv").read_text().count("\n") == 3  # header + 2 epochs
        assert (run / "checkpoints" / stage / "model_latest.pt").exists()
        assert (run / "checkpoints" / stage / "model_2.pt").exists()
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert set(metrics["pp_ks_pvalue"]) == {"f0", "tau", "snr"}
    assert all(0 <= p <= 1 for p in metrics["pp_ks_pvalue"].values())
    assert 0 <= metrics["pp_ks_pvalue_combined"] <= 1
    sampling = metrics["importance_sampling"]
    assert 0 < sampling["efficiency_q16"] <= sampling["efficiency_median"] <= sampling["efficiency_q84"] <= 1
    assert sampling["phase"] == "marginalised" and set(sampling["pp_ks_pvalue"]) == {"f0", "tau", "snr"}
    table = pd.read_csv(run / "evaluation" / "importance_sampling.csv")
    assert len(table) == 50 and table["log_evidence"].notna().all()
    assert table["efficiency"].median() == pytest.approx(sampling["efficiency_median"])
    # batches of 200 until 50 effective samples, at most 600 (tests/configs/tiny.yaml)
    assert set(table["num_samples"]) <= {200, 400, 600} and (table["num_samples"] > 200).any()
    assert ((table["n_eff"] >= 50) | (table["num_samples"] == 600)).all()
    assert table["efficiency"].to_numpy() == pytest.approx((table["n_eff"] / table["num_samples"]).to_numpy())
    # the tiny network is far from exact: every injection has its divergences, few or none are counted
    divergence = metrics["network_vs_exact"]
    used = table[table["n_eff"] >= 50]
    assert divergence["injections_used"] == len(used) and divergence["injections_left_out"] == 50 - len(used)
    for name in ("f0", "tau", "snr"):
        assert table[f"jsd_{name}"].between(0, math.log(2) + 1e-9).all()
        assert divergence[name]["jsd_median"] == (used[f"jsd_{name}"].median() if len(used) else None)
    for log in [*(f"{rule}.log" for rule in ALL_RULES - {"all", "infer_set"}), "infer_simulated.log"]:
        assert (run / "logs" / log).stat().st_size > 0, log


@pytest.mark.slow
def test_nothing_is_planned_after_a_full_run(tiny_run):
    assert planned_jobs(snakemake(tiny_run[0], "-n").output) == set()


AFTER_SVD = {"train_stage_0", "train_stage_1", "evaluate", "infer_set"}
EVERY_STEP = ALL_RULES - {"all"}
FROM_TRAFO = {"fit_trafo", "build_svd"} | AFTER_SVD
# The README's table "What reruns after a config change", row by row: its first column, then the
# cases that check that row (id, config overrides, the steps a dry run must plan).
RERUN_TABLE = {
    "`training.stage_1.*` (learning rate, epochs, ...)": [
        ("stage_1 lr", {"training": {"stage_1": {"optimizer": {"learning_rate": 0.005}}}},
         {"train_stage_1", "evaluate", "infer_set"}),
    ],
    "`training.stage_0.*`": [
        ("stage_0 epochs", {"training": {"stage_0": {"epochs": 3}}}, AFTER_SVD),
    ],
    "`svd.*`": [
        ("svd size", {"svd": {"size": 8}}, {"build_svd"} | AFTER_SVD),
    ],
    "`trafo.*`": [
        ("trafo log", {"trafo": {"log_labels": []}}, FROM_TRAFO),
    ],
    "`seed`, priors, detectors, `inference_parameters`": [
        # simulated data: the seed, the intrinsic prior and the detectors make new event files
        ("seed", {"seed": 43}, EVERY_STEP),
        ("intrinsic prior", {"intrinsic_prior": {"f0": {"high": 240.0}}}, EVERY_STEP),
        ("detectors", {"detectors": {"L1": {"time_offset": 0.008}}}, EVERY_STEP),
        # count_events checks only the labels read from the files (f0, tau) against their priors: not snr's
        # prior, nor an inferred phase
        ("extrinsic prior", {"extrinsic_prior": {"snr": {"low": 12.0}}}, FROM_TRAFO | {"simulate_observed"}),
        ("inference parameters", {"inference_parameters": ["f0", "tau", "snr", "phase"]}, FROM_TRAFO),
    ],
    "`evaluation.*`": [
        ("evaluation", {"evaluation": {"num_samples": 100}}, {"evaluate"}),
    ],
    "`inference.*`": [
        ("inference samples", {"inference": {"num_samples": 100}}, {"infer_set"}),
        ("simulated events", {"inference": {"simulated_events": 5}}, INFERENCE),
    ],
    "`local.*` (device, threads, checkpoints, runtime limits)": [
        ("device", {"local": {"device": "cuda"}}, set()),
        ("threads", {"local": {"threads": 1}}, set()),
        ("checkpoints", {"local": {"checkpoint_epochs": 7}}, set()),
        ("memory limit", {"local": {"memory_limit_mb": 4096}}, set()),
        ("runtime limits", {"local": {"runtime_limits": {"max_time_per_run": 60.0, "max_epochs_per_run": 1}}},
         set()),
        ("wandb", {"local": {"wandb": {"project": "elsewhere", "mode": "offline"}}}, set()),
        ("training job", {"local": {"training_job": {"gpus": 0, "mem_mb": 4000, "runtime": 60, "stop_margin": 30}}},
         set()),
    ],
}
# Not in the README's table, but in config/README.md's: the training order.
OTHER_CASES = [("shuffle blocks", {"data": {"shuffle": {"block_events": 100}}}, AFTER_SVD)]
RERUN_CASES = [case for cases in RERUN_TABLE.values() for case in cases] + OTHER_CASES


def readme_rerun_table():
    """{first column: second column} of the README's table under "What reruns after a config change"."""
    section = (REPO / "README.md").read_text().split("## What reruns after a config change")[1].split("\n## ")[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].removeprefix("| "): cells[1].removesuffix(" |") for cells in rows}


PIPELINE = ["simulate", "count_events", "fit_trafo", "build_svd", "train_stage_0", "train_stage_1", "evaluate",
            "infer_set"]


def steps_named(text):
    """The steps a cell of the README's table names: "nothing", "`step` and everything after it", or a
    list of steps; None for other words."""
    if text == "nothing":
        return set()
    if match := re.fullmatch(r"`(\w+)` and everything after it", text):
        return set(PIPELINE[PIPELINE.index(match[1]):])
    if re.fullmatch(r"`\w+`(, `\w+`)*", text):
        return set(re.findall(r"`(\w+)`", text))
    return None


def test_every_row_of_the_readme_rerun_table_has_dry_run_cases_that_expect_what_it_says():
    table = readme_rerun_table()
    assert set(table) == set(RERUN_TABLE)
    for row, text in table.items():
        for name, _, expected in RERUN_TABLE[row]:
            if (named := steps_named(text)) is not None:
                assert expected == named, (row, name)
            for step in re.findall(r"`(\w+)` never", text):
                assert step not in expected, (row, name, step)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, expected", [case[1:] for case in RERUN_CASES],
                         ids=[case[0] for case in RERUN_CASES])
def test_a_config_change_plans_exactly_the_steps_it_touches(tiny_run, overrides, expected):
    planned = planned_jobs(snakemake(tiny_run[0], "-n", overrides=overrides).output)
    assert planned == (expected | {"all"} if expected else set())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"svd": {"sise": 8}}, "config key svd: Additional properties are not allowed ('sise' was unexpected)"),
        ({"training": {"stage_1": {"optimiser": {}}}}, "config key training.stage_1: Additional properties"),
        ({"svd": {"size": "big"}}, "config key svd.size: 'big' is not of type 'integer'"),
        ({"extrinsic_prior": {"snr": {"distribution": "gaussian"}}}, "config key extrinsic_prior.snr.distribution"),
        ({"inference_parameters": ["f0", "mass"]}, "inference_parameters: 'mass' is in neither"),
        ({"data": {"simulate": False, "training_data_file": "nowhere/*.h5"}},
         "data.training_data_file: the pattern 'nowhere/*.h5' matches no file"),
        ({"data": {"simulate": False, "training_data_file": "config/config.yaml", "fiducial_asd_file": "x.h5"}},
         "data.fiducial_asd_file: file not found: x.h5"),
        ({"simulation": {"asd": {"levels": [1.0]}}}, "simulation.asd.levels: 1 level(s) for 2 detectors"),
        ({"intrinsic_prior": {"f0": {"low": 300.0}}}, "prior f0: low (300.0) must be below high (250.0)"),
        ({"local": {"memory_limit_mb": 1000}}, "data.shuffle.buffer_mb: 1024 MB must be at most half of "
         "local.memory_limit_mb (1000 MB)"),
        ({"model": {"type": "gaussian_regression", "label_weight_dict": {"mass": 1.0}}},
         "model.label_weight_dict: 'mass' is not an inference parameter"),
        ({"model": {"type": "gaussian_regression"}, "training": {"stage_1": {"ema_decay": 0.99}}},
         "training.stage_1.ema_decay: not available for model.type gaussian_regression"),
        ({"evaluation": {"compare_runs": ["tiny"]}}, "evaluation.compare_runs: 'tiny' is this run"),
        ({"training": {"stage_1": {"warm_start": "x.pt"}}}, "training.stage_1.warm_start: only stage_0"),
        ({"trafo": {"log_labels": ["tau", "phase"]}}, "trafo.log_labels: 'phase' is not an inference parameter"),
        ({"model": {"type": "gaussian_regression"},
          "training": {"stage_1": {"optimizer": {"type": "sgd", "dampening": 0.1}}}},
         "training.stage_1.optimizer.dampening: Keras' SGD has no dampening"),
        ({"training": {"stage_0": {"scheduler": {"type": "cosine", "gamma": 0.5}}}},
         "training.stage_0.scheduler.gamma: not an argument of scheduler type 'cosine'"),
        ({"inference": {"sets": {"mine": "nowhere/*.h5"}}}, "inference.sets.mine: the pattern 'nowhere/*.h5' matches "
         "no file"),
        ({"inference": {"sets": {"simulated": ["x.h5"]}}}, "config key inference.sets"),
        ({"evaluation": {"max_samples": 10}}, "evaluation.max_samples: 10 is below evaluation.num_samples (200)"),
        ({"model": {"type": "gaussian_regression"}, "local": {"cpu_processes": 2}},
         "local.cpu_processes: 2 processes, but model.type gaussian_regression trains on one"),
    ],
    ids=["unknown key", "unknown nested key", "wrong type", "unknown distribution", "unknown parameter", "empty glob",
         "missing asd file", "levels per detector", "prior bounds", "shuffle buffer", "label weight name",
         "ema with regression", "compare with itself", "warm start later stage", "log label not inferred",
         "dampening with regression", "scheduler argument", "empty inference set", "set named simulated",
         "sample cap below a batch", "ranks with regression"],
)
def test_an_invalid_config_stops_the_run_naming_the_key(tmp_path, overrides, message):
    result = snakemake(copy_workflow(tmp_path), "-n", overrides=overrides, check=False)
    assert result.returncode != 0
    assert message in result.output


@pytest.mark.slow
def test_a_second_run_with_the_same_seed_stopped_after_every_epoch_gives_the_same_model_metrics_and_plots(
        tiny_run, tmp_path):
    """A second run from scratch (simulation, trafo, SVD, weights, noise: all drawn from `seed`) whose
    jobs each stop after one epoch (exit 75, a failed attempt) and resume from model_latest.pt: the
    same model tensor for tensor, the same metrics.json number for number, the same plots byte for byte."""
    workdir = copy_workflow(tmp_path)
    limited = {"local": {"runtime_limits": {"max_epochs_per_run": 1}}, "inference": {"simulated_events": 0}}
    attempts = 0
    while snakemake(workdir, overrides=limited, check=False).returncode != 0:
        attempts += 1
        assert attempts <= 3, "the runs made no progress"
    assert attempts == 2  # stage_0 and stage_1 each stopped once after epoch 1
    reference = torch.load(tiny_run[0] / "results/tiny/stage_1/model_stage_1.pt", weights_only=True)
    resumed = torch.load(workdir / "results/tiny/stage_1/model_stage_1.pt", weights_only=True)
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert [row["epoch"] for row in resumed["history"]] == [1, 2]

    evaluations = [run / "results/tiny/evaluation" for run in (tiny_run[0], workdir)]
    reference_metrics, metrics = (flat_metrics(folder / "metrics.json") for folder in evaluations)
    assert metrics.keys() == reference_metrics.keys()
    for key, value in reference_metrics.items():
        assert metrics[key] == value, (key, value, metrics[key])  # no field of metrics.json may differ
    for name in ("importance_sampling.csv", "metrics.html", *(f"{plot}.png" for plot in (*PLOTS, "pulls"))):
        assert (evaluations[1] / name).read_bytes() == (evaluations[0] / name).read_bytes(), name


def flat_metrics(path):
    """metrics.json as {dotted key: value}."""
    def flatten(value, prefix):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}
    return flatten(json.loads(path.read_text()), "")


def test_workflow_passes_snakemake_lint_and_snakefmt():
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True,
                          env={"CONDOR_CONFIG": "/dev/null", "PATH": "/usr/bin:/bin"})
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


PROVENANCE = ["version_stagewise", "version_torch", "version_nflows", "version_numpy", "version_h5py",
              "version_snakemake", "git_revision", "git_dirty", "host", "created"]


@pytest.mark.slow
def test_every_artefact_carries_its_settings_and_provenance(tiny_run):
    run = tiny_run[0] / "results" / "tiny"
    h5_files = sorted(run.rglob("*.h5"))
    assert len(h5_files) == 4 + 2 + 1 + 2 + 2  # event files, ASD files, trafo, SVD bases, observed set, posterior
    for path in h5_files:
        with h5py.File(path, "r") as f:
            assert json.loads(f.attrs["settings"]), path
            for key in PROVENANCE:
                assert str(f.attrs[key]), (path, key)
    pt_files = sorted(run.rglob("*.pt"))
    assert len(pt_files) >= 2 + 2 * 3  # stage models; latest and two periodic checkpoints per stage
    for path in pt_files:
        state = torch.load(path, weights_only=True)
        assert "local" not in state["settings"] and state["settings"]["training"], path
        assert set(PROVENANCE) <= set(state["provenance"]), path
        assert state["fingerprint"] and state["architecture"], path


@pytest.mark.slow
def test_local_settings_are_saved_beside_the_results(tiny_run):
    saved = yaml.safe_load((tiny_run[0] / "results" / "tiny" / "local_settings.yaml").read_text())
    assert saved == {"device": "cpu", "threads": 2, "cpu_processes": 1, "checkpoint_epochs": 1, "memory_limit_mb": 8192,
                     "wandb": None,
                     "wandb_run_ids": {},
                     "runtime_limits": {"max_time_per_run": None, "max_epochs_per_run": None},
                     "training_job": {"gpus": 1, "mem_mb": 16000, "runtime": 1440, "stop_margin": 300}}


@pytest.mark.slow
def test_stage_0_warm_starts_from_another_runs_model_and_refuses_one_of_another_shape(tiny_run, tmp_path):
    workdir = Path(shutil.copytree(tiny_run[0], tmp_path / "workdir", symlinks=True))
    other = tiny_run[0] / "results/tiny/stage_1/model_stage_1.pt"
    warm = {"training": {"stage_0": {"warm_start": str(other)}}}
    planned = planned_jobs(snakemake(workdir, "-n", overrides=warm).output)
    assert planned == {"train_stage_0", "train_stage_1", "evaluate", "infer_set", "all"}
    snakemake(workdir, "train_stage_0", overrides=warm)
    log = (workdir / "results/tiny/logs/train_stage_0.log").read_text()
    assert f"stage_0 starts from the weights of {other} (epoch 2)" in log

    wider = {**warm, "model": {"embedding": {"hidden_dims": [32]}}}
    result = snakemake(workdir, "train_stage_0", overrides=wider, check=False)
    assert result.returncode != 0
    log = (workdir / "results/tiny/logs/train_stage_0.log").read_text()
    assert (f"training.stage_0.warm_start: {other}: parameter 'embedding.blocks.0.inner.weight' has shape (64, 40) "
            "there but (32, 40) in this config's model") in log
