"""Sweeps (src/stagewise/sweep.py, workflow/rules/sweep.smk): every run's config and training seed, where
each step's files are computed (once for runs that compute it alike), the comparison tables, one-line
errors for bad sweep files, and a real sweep of the tiny problem with Snakemake."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from snakemake.utils import update_config

from helpers import REPO, copy_workflow, planned_jobs, snakemake, tiny_config
from stagewise import config as settings
from stagewise.sweep import comparison_tables, load_sweep

LR = "training.stage_1.optimizer.learning_rate"
DATA_STEPS = ("simulate", "count_events", "fit_trafo", "build_svd")


def write(tmp_path, content, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content, sort_keys=False) if not isinstance(content, str) else content)
    return path


def checked(config):
    settings.validate(config)
    return config


def test_runs_and_replicas_get_their_overrides_and_training_seeds(tmp_path):
    base = checked(tiny_config())
    path = write(tmp_path, {"name": "lr", "replicas": 2, "runs": [
        {"name": "slow", "set": {LR: 1.0e-4}}, {"name": "fast", "set": {LR: 1.0e-3}}]})
    name, runs = load_sweep(path, base)
    seed = base["seed"]
    assert name == "lr"
    assert [(r.name, r.group, r.seed) for r in runs] == [
        (f"slow.seed{seed}", "slow", seed), (f"slow.seed{seed + 1}", "slow", seed + 1),
        (f"fast.seed{seed}", "fast", seed), (f"fast.seed{seed + 1}", "fast", seed + 1)]
    assert [r.config["training"]["stage_1"]["optimizer"]["learning_rate"] for r in runs] == [1e-4] * 2 + [1e-3] * 2
    assert [r.config["training_seed"] for r in runs] == [seed, seed + 1] * 2
    assert {r.config["seed"] for r in runs} == {seed}  # the data's seed stays
    assert runs[1].folder == f"results/lr/slow.seed{seed + 1}" and runs[1].rule_prefix == f"slow_seed{seed + 1}__"
    assert base["training"]["stage_1"]["optimizer"]["learning_rate"] not in (1e-4, 1e-3)  # base untouched
    # one replica: the run's name is the setting's, its seed the config's
    _, single = load_sweep(write(tmp_path, {"name": "one", "runs": [{"name": "a"}]}), base)
    assert [(r.name, r.config["training_seed"]) for r in single] == [("a", None)]


def test_the_training_seed_changes_only_the_training_steps():
    base = checked(tiny_config())
    other = checked(dict(tiny_config(), training_seed=base["seed"] + 5))
    same = checked(dict(tiny_config(), training_seed=base["seed"]))
    assert settings.stage_settings(other, "stage_0")["seed"] == base["seed"] + 5
    assert settings.stage_settings(same, "stage_1") == settings.stage_settings(base, "stage_1")  # null means seed
    for step in (settings.simulation_settings, settings.trafo_settings, settings.svd_settings,
                 settings.evaluation_settings, settings.observed_simulation_settings):
        assert step(other) == step(base)


def test_a_step_that_runs_compute_alike_is_computed_once_in_the_first_of_them(tmp_path):
    path = write(tmp_path, {"name": "s", "replicas": 2, "runs": [
        {"name": "slow", "set": {LR: 1.0e-4}}, {"name": "fast", "set": {LR: 1.0e-3}},
        {"name": "wide", "set": {"svd.size": 12}}, {"name": "more_data", "set": {"simulation.events_per_file": 300}}]})
    runs = {r.name: r for r in load_sweep(path, checked(tiny_config()))[1]}
    first, second = runs["slow.seed42"], runs["slow.seed43"]
    assert all(place == first.folder for place in first.places.values())
    for name in ("slow.seed43", "fast.seed42", "fast.seed43", "wide.seed42"):  # one data set and trafo
        assert all(runs[name].places[step] == first.folder for step in DATA_STEPS[:3])
    assert second.places["train_stage_0"] == second.folder  # another training seed trains anew
    assert runs["fast.seed42"].places["train_stage_0"] == first.folder  # stage 1 differs, stage 0 does not
    assert runs["fast.seed43"].places["train_stage_0"] == second.folder
    assert runs["fast.seed42"].places["train_stage_1"] == runs["fast.seed42"].folder
    wide = runs["wide.seed42"]  # another SVD: its basis and everything trained on it
    assert all(wide.places[step] == wide.folder for step in ("build_svd", "train_stage_0", "evaluate"))
    more = runs["more_data.seed42"]
    assert all(place == more.folder for place in more.places.values())
    # GNPE's init network is placed like a stage: shared across learning rates of stage 1
    free_time = tiny_config()
    update_config(free_time, yaml.safe_load((REPO / "tests/configs/tiny_free_time.yaml").read_text()))
    free = {r.name: r for r in load_sweep(path, checked(free_time))[1]}
    assert free["fast.seed42"].places["train_init"] == free["slow.seed42"].folder
    assert free["slow.seed43"].places["train_init"] == free["slow.seed43"].folder


def test_the_comparison_sorts_runs_and_gives_each_setting_its_mean_and_spread():
    rows = [{"run": f"{setting}.seed{seed}", "setting": setting, "training_seed": seed, "test_loss": loss,
             "is_efficiency": efficiency}
            for setting, seed, loss, efficiency in [("a", 1, -1.0, 0.1), ("a", 2, -3.0, 0.3), ("b", 1, -2.5, 0.2),
                                                    ("b", 2, -2.3, np.nan)]]
    table, by_setting = comparison_tables(rows)
    assert list(table["run"]) == ["a.seed2", "b.seed1", "b.seed2", "a.seed1"]
    assert list(by_setting["setting"]) == ["b", "a"]
    b = by_setting.set_index("setting").loc["b"]
    assert b["replicas"] == 2 and b["test_loss mean"] == pytest.approx(-2.4)
    assert b["test_loss std"] == pytest.approx(np.std([-2.5, -2.3], ddof=1))
    assert b["is_efficiency mean"] == pytest.approx(0.2)  # a missing figure is left out, not taken as 0


@pytest.mark.parametrize("content, message", [
    ({"name": "s", "runs": [{"name": "a"}, {"name": "a", "set": {LR: 0.1}}]}, "run 'a': the name is used twice"),
    ({"name": "s", "runs": [{"name": "a", "set": {"training.stage_1.optimizer.lerning_rate": 0.1}}]},
     "run 'a': config key training.stage_1.optimizer"),
    ({"name": "s", "runs": [{"name": "a", "set": {"trainig.stage_1.epochs": 3}}]},
     "run 'a': trainig.stage_1.epochs: 'trainig' is not a section of the config"),
    ({"name": "s", "runs": [{"name": "a", "set": {"training.stage_1.epochs": "many"}}]},
     "run 'a': config key training.stage_1.epochs: 'many' is not of type 'integer'"),
    ({"name": "s", "runs": [{"name": "a", "set": {"run": "x"}}]}, "run 'a': set: run: the sweep names its runs"),
    ({"name": "s", "runs": [{"name": "a-b"}, {"name": "a_b"}]}, "run 'a_b': its rule names would be those of"),
    ({"name": "s", "replicas": 0, "runs": [{"name": "a"}]}, "replicas: expected an integer >= 1, got 0"),
    ({"name": "s/t", "runs": [{"name": "a"}]}, "name: expected letters, digits"),
    ({"name": "s", "runs": [{"name": "a", "sett": {}}]}, "runs[0]: unknown key 'sett'"),
    ({"name": "s", "runs": []}, "runs: expected a list of runs"),
    ("name: [unclosed", "cannot read it"),
], ids=["duplicate name", "unknown key", "unknown section", "wrong type", "run overridden", "rule names clash",
        "replicas", "sweep name", "unknown run key", "no runs", "not YAML"])
def test_a_bad_sweep_file_stops_with_one_line_naming_the_problem(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(ValueError) as error:
        load_sweep(path, checked(tiny_config()))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert f"sweep file {path}" in str(error.value)


SWEEP = {"name": "lr", "replicas": 2, "runs": [{"name": "slow", "set": {LR: 1.0e-4}},
                                               {"name": "fast", "set": {LR: 1.0e-3}}]}
RUNS = ["slow.seed42", "slow.seed43", "fast.seed42", "fast.seed43"]
EVALUATION = {"num_injections": 20, "num_plot_events": 1}  # fewer than the tiny config's: seconds


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """A workflow copy where `snakemake sweep` ran the tiny problem's SWEEP: (workdir, jobs it ran)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("sweep"))
    write(workdir, SWEEP)
    one_thread = {"sweep": "sweep.yaml", "evaluation": EVALUATION, "local": {"threads": 1}}  # two jobs at a time
    jobs = planned_jobs(snakemake(workdir, "sweep", overrides=one_thread).output)
    return workdir, jobs


def dry_sweep(workdir, sweep, check=True):
    write(workdir, sweep, "changed.yaml")
    overrides = {"sweep": "changed.yaml", "evaluation": EVALUATION, "local": {"threads": 1}}
    return snakemake(workdir, "sweep", "-n", overrides=overrides, check=check)


@pytest.mark.slow
def test_a_sweep_trains_every_run_once_per_setting_and_tables_them(sweep_run):
    workdir, jobs = sweep_run
    assert jobs == {f"slow_seed42__{step}" for step in DATA_STEPS} | {
        "slow_seed42__train_stage_0", "slow_seed43__train_stage_0", "sweep"} | {
        f"{run.replace('.', '_')}__{step}" for run in RUNS for step in ("train_stage_1", "evaluate")}
    table = pd.read_csv(workdir / "results/lr/comparison.csv")
    assert sorted(table["run"]) == sorted(RUNS)
    assert list(table["test_loss"]) == sorted(table["test_loss"])
    for run in RUNS:
        metrics = json.loads((workdir / f"results/lr/{run}/evaluation/metrics.json").read_text())
        row = table.set_index("run").loc[run]
        assert row["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-12)
        assert row["is_efficiency"] == pytest.approx(metrics["importance_sampling"]["efficiency_median"], rel=1e-12)
        assert row["epochs"] == 4 and row["training_min"] > 0
    # the same stage 0 (one per seed) under both learning rates, each stage 1 its own
    assert not (workdir / "results/lr/fast.seed42/stage_0").exists()
    stage_1 = {run: (workdir / f"results/lr/{run}/stage_1/model_stage_1.pt").read_bytes() for run in RUNS}
    assert len(set(stage_1.values())) == 4
    by_setting = pd.read_csv(workdir / "results/lr/comparison_by_setting.csv")
    assert sorted(by_setting["setting"]) == ["fast", "slow"] and set(by_setting["replicas"]) == {2}
    assert (workdir / "results/lr/validation_loss.png").stat().st_size > 10_000
    assert "fast.seed43" in (workdir / "results/lr/comparison.html").read_text()


@pytest.mark.slow
def test_dry_runs_plan_only_what_a_change_of_the_sweep_touches(sweep_run):
    workdir, _ = sweep_run
    assert planned_jobs(dry_sweep(workdir, SWEEP).output) == set()
    faster = {**SWEEP, "runs": [SWEEP["runs"][0], {"name": "fast", "set": {LR: 2.0e-3}}]}
    assert planned_jobs(dry_sweep(workdir, faster).output) == {
        f"fast_seed{seed}__{step}" for seed in (42, 43) for step in ("train_stage_1", "evaluate")} | {"sweep"}
    more = {**SWEEP, "runs": [*SWEEP["runs"], {"name": "mid", "set": {LR: 5.0e-4}}]}
    assert planned_jobs(dry_sweep(workdir, more).output) == {
        f"mid_seed{seed}__{step}" for seed in (42, 43) for step in ("train_stage_1", "evaluate")} | {"sweep"}


@pytest.mark.slow
def test_a_bad_sweep_file_or_none_stops_snakemake_with_the_problem_named(sweep_run):
    workdir, _ = sweep_run
    twice = {**SWEEP, "runs": [*SWEEP["runs"], {"name": "slow"}]}
    result = dry_sweep(workdir, twice, check=False)
    assert result.returncode != 0
    assert "sweep file changed.yaml: run 'slow': the name is used twice" in result.output
    none = snakemake(workdir, "sweep", "-n", check=False)
    assert none.returncode != 0 and "target sweep: the config key sweep names no sweep file" in none.output
