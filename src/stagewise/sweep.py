"""Sweeps: many runs in one DAG. A sweep file names runs, each the config plus overrides by config
path, optionally with seed replicas; this module reads and checks it, gives every run its full checked
config, and places every step of every run: a step that two runs would compute alike (the same
settings, from the same upstream steps) is computed once, in the folder of the first of them.

A sweep file (YAML; config/sweep_example.yaml):

    name: stage_1_lr            # results/<name>/<run>/ ...
    replicas: 2                 # training seeds training_seed, +1, ... of every run (default 1)
    runs:
      - name: lr_1e-4
        set: {training.stage_1.optimizer.learning_rate: 1.0e-4}
      - name: lr_3e-4           # the config as it is
"""

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from . import config as settings
from .config import Settings

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
SWEEP_KEYS = {"name", "replicas", "runs"}
RUN_KEYS = {"name", "set"}
TIME_COLUMNS = ("time_data", "time_compute", "time_validation")  # history.csv: seconds per epoch


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: `name` (its folder results/<sweep>/<name>/), `group` (the sweep file's run
    name, the same for its replicas), its training `seed`, its checked `config`, and `places`: the folder
    of each step's files (this run's own, or that of the first run that computes the step alike)."""

    name: str
    group: str
    seed: int
    config: Settings
    places: dict[str, str]

    @property
    def folder(self) -> str:
        return self.places["run"]

    @property
    def rule_prefix(self) -> str:
        return rule_prefix(self.name)

    def borrowed_steps(self) -> list[str]:
        """The rules this run does not define: it reads their files from an earlier run's folder."""
        return [step for step, folder in self.places.items() if folder != self.folder]

    def summary(self) -> Settings:
        """What the comparison reads of this run: name, group, seed, and the paths of its metrics.json and
        of each trained stage's history.csv (GNPE's init first)."""
        stages = ([settings.INIT_STAGE] if self.config["gnpe"] is not None else []) + settings.stage_names(self.config)
        histories = {stage: str(Path(self.places[f"train_{stage}"]) / stage / "history.csv") for stage in stages}
        return {"name": self.name, "group": self.group, "seed": self.seed, "histories": histories,
                "metrics": str(Path(self.places["evaluate"]) / "evaluation" / "metrics.json")}

    def module_config(self) -> Settings:
        """The config its Snakemake module reads: the run's, plus `_sweep` (popped by common.smk)."""
        return {**copy.deepcopy(self.config), "_sweep": {"name": self.name, "places": dict(self.places)}}


def rule_prefix(run_name: str) -> str:
    """The prefix of a run's rule names: its name with every character other than a letter, digit or '_'
    as '_', and '__' (run lr_1e-4: rule lr_1e_4__train_stage_1)."""
    return re.sub(r"\W", "_", run_name) + "__"


def no_sweep_file(*_: Any) -> list[str]:
    """The input of the target sweep when the config names no sweep file: a ValueError saying so."""
    raise ValueError("target sweep: the config key sweep names no sweep file "
                     "(e.g. snakemake sweep --config sweep=config/sweep_example.yaml)")


def step_keys(config: Settings) -> dict[str, str]:
    """{rule name: a fingerprint of what the rule's files are computed from}: its settings (the rule's
    params) and the keys of the steps whose files it reads. Equal keys mean equal files."""
    keys: dict[str, str] = {}

    def key(step: str, own: Settings, *after: str) -> None:
        keys[step] = settings.fingerprint({"step": step, "settings": own, "after": [keys[a] for a in after]})

    key("simulate", {"data": config["data"]} | settings.simulation_settings(config))
    key("count_events", settings.count_settings(config), "simulate")
    key("fit_trafo", settings.trafo_settings(config), "simulate", "count_events")
    key("build_svd", settings.svd_settings(config), "simulate", "fit_trafo")
    trained = []
    if config["gnpe"] is not None:
        key(f"train_{settings.INIT_STAGE}", settings.init_settings(config), "simulate", "fit_trafo")
        trained.append(f"train_{settings.INIT_STAGE}")
    for stage in settings.stage_names(config):
        previous = [trained[-1]] if trained else []
        key(f"train_{stage}", settings.stage_settings(config, stage), "simulate", "fit_trafo", "build_svd", *previous)
        trained.append(f"train_{stage}")
    evaluation = settings.evaluation_settings(config) | {"compare_runs": config["evaluation"]["compare_runs"]}
    key("evaluate", evaluation, "simulate", "fit_trafo", "build_svd", *trained)
    key("simulate_observed", settings.observed_simulation_settings(config), "simulate")
    inference = settings.inference_settings(config) | {"sets": config["inference"]["sets"]}
    key("infer_set", inference, trained[-1], "simulate_observed")
    return keys


def with_overrides(base: Settings, overrides: dict[str, Any], where: str) -> Settings:
    """A deep copy of `base` with each `path.to.key: value` of `overrides` set; ValueError naming the path
    when a part of it is not a section of the config."""
    config = copy.deepcopy(base)
    for path, value in overrides.items():
        node = config
        *sections, key = str(path).split(".")
        for depth, section in enumerate(sections):
            if not isinstance(node.get(section), dict):
                raise ValueError(f"{where}: {path}: '{'.'.join(sections[:depth + 1])}' is not a section of the "
                                 "config")
            node = node[section]
        node[key] = value
    return config


def _mapping(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(sorted(allowed))}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key '{unknown[0]}' (expected {', '.join(sorted(allowed))})")
    return value


def _run_configs(path: str | Path, name: str, replicas: int, entries: Any,
                 base: Settings) -> list[tuple[str, str, int, Settings]]:
    """(run name, group, training seed, checked config) of every run and replica of the file's `runs`."""
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"sweep file {path}: runs: expected a list of runs, each {{name, set}}")
    runs, seen, prefixes = [], set(), set()
    for index, entry in enumerate(entries):
        entry = _mapping(entry, f"sweep file {path}: runs[{index}]", RUN_KEYS)
        group = entry.get("name")
        where = f"sweep file {path}: run '{group}'"
        if not isinstance(group, str) or not NAME.match(group):
            raise ValueError(f"sweep file {path}: runs[{index}].name: expected letters, digits, '_', '.' or '-', "
                             f"got {group!r}")
        if group in seen:
            raise ValueError(f"{where}: the name is used twice")
        seen.add(group)
        overrides = entry.get("set") or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"{where}: set: expected a mapping of config paths to values")
        for key in ("run", "sweep"):
            if key in overrides:
                raise ValueError(f"{where}: set: {key}: the sweep names its runs (results/{name}/<run>)")
        config = with_overrides(base, overrides, where)
        first_seed = config["seed"] if config["training_seed"] is None else config["training_seed"]
        for replica in range(replicas):
            seed = first_seed + replica
            run_name = group if replicas == 1 else f"{group}.seed{seed}"
            prefix = rule_prefix(run_name)
            if prefix in prefixes:
                raise ValueError(f"{where}: its rule names would be those of another run ({prefix}...): rename it")
            prefixes.add(prefix)
            run_config = dict(copy.deepcopy(config), run=f"{name}.{run_name}", sweep=None,
                              training_seed=seed if replicas > 1 else config["training_seed"])
            try:
                settings.validate(run_config)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            runs.append((run_name, group, seed, run_config))
    return runs


def load_sweep(path: str | Path, base: Settings) -> tuple[str, list[SweepRun]]:
    """(the sweep's name, its runs) from sweep file `path` over the checked config `base`; ValueError
    with one line naming the file, the run and the problem for a bad file."""
    try:
        content = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"sweep file {path}: cannot read it ({' '.join(str(err).split())})") from None
    sweep = _mapping(content, f"sweep file {path}", SWEEP_KEYS)
    name, replicas = sweep.get("name"), sweep.get("replicas", 1)
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"sweep file {path}: name: expected letters, digits, '_', '.' or '-', got {name!r}")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ValueError(f"sweep file {path}: replicas: expected an integer >= 1, got {replicas!r}")
    owners: dict[str, str] = {}  # step key -> the folder of the first run that computes it
    runs = []
    for run_name, group, seed, config in _run_configs(path, name, replicas, sweep.get("runs"), base):
        folder = str(Path("results") / name / run_name)
        places = {step: owners.setdefault(key, folder) for step, key in step_keys(config).items()}
        runs.append(SweepRun(run_name, group, seed, config, {"run": folder, **places}))
    return name, runs


def run_row(run: Settings, metrics: Settings, histories: dict[str, pd.DataFrame]) -> Settings:
    """One run's row of the comparison: its name, setting and training seed, then its metrics (NaN
    where its model type has none), its training time (minutes) and epochs over all its stages."""
    importance = metrics.get("importance_sampling") or {}
    widths = metrics.get("posterior_std_over_prior_std") or {}
    times = [h[column].sum() for h in histories.values() for column in TIME_COLUMNS if column in h]
    return {"run": run["name"], "setting": run["group"], "training_seed": run["seed"],
            "test_loss": metrics["test_loss"], "pp_combined": metrics.get("pp_ks_pvalue_combined", np.nan),
            "is_efficiency": importance.get("efficiency_median", np.nan),
            **{f"width_{name}": value for name, value in widths.items()},
            "training_min": sum(times) / 60, "epochs": sum(len(h) for h in histories.values())}


def comparison_tables(rows: list[Settings]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every run, sorted by test loss; every setting: mean and standard deviation of each figure over
    its seed replicas and their number, sorted by mean test loss)."""
    table = pd.DataFrame(rows).sort_values("test_loss", kind="stable").reset_index(drop=True)
    figures = table.drop(columns=["run", "training_seed"]).groupby("setting", sort=False)
    by_setting = figures.agg(["mean", "std"])
    by_setting.columns = [f"{figure} {statistic}" for figure, statistic in by_setting.columns]
    by_setting.insert(0, "replicas", figures.size())
    return table, by_setting.sort_values("test_loss mean", kind="stable").reset_index()
