import os
import sys
from pathlib import Path

# The stagewise package of this checkout, for this process and for every job
# (also inside conda environments, which do not install it).
SRC = str(Path(workflow.main_snakefile).parent / "src")
sys.path.insert(0, SRC)
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
)

from stagewise import config as settings

# A sweep's run (a module of the Snakefile, sweep.smk) gets its folder and the folder of each step's
# files, which it shares with the first run that computes that step alike (stagewise.sweep).
SWEEP_RUN = config.pop("_sweep", None)
settings.validate(config)
RUN = Path(SWEEP_RUN["places"]["run"]) if SWEEP_RUN else Path("results") / config["run"]
STAGES = settings.stage_names(config)
ENV = "../../envs/stagewise.yaml"
TRAINING_JOB = config["local"]["training_job"]
PROBLEM = settings.Problem.from_settings(config)
SVD_NAMES = settings.svd_names(config)
GNPE = config["gnpe"] is not None
INIT = settings.INIT_STAGE
TRAINED = ([INIT] if GNPE else []) + STAGES


def place(step):
    """The folder where the files of a step (named as its rule) are: this run's, or in a sweep maybe another's."""
    return Path(SWEEP_RUN["places"][step]) if SWEEP_RUN else RUN


def report_group(section, detail=None):
    """report() keys: a section ("Evaluation") and a detail; in a sweep each run's figures sit under its name."""
    if SWEEP_RUN:
        return dict(
            category=SWEEP_RUN["name"],
            subcategory=" ".join(filter(None, [section, detail])),
        )
    return dict(category=section, subcategory=detail)


COUNTS = place("count_events") / "counts.yaml"
TRAFO = place("fit_trafo") / "trafo.h5"


def split_files(split):
    """Event files of a split: the simulated ones, or the config's glob or list."""
    data = config["data"]
    if data["simulate"]:
        simulated = "training" if split == "trafo" else split
        count = config["simulation"]["num_files"][simulated]
        return [
            str(place("simulate") / "data" / f"{simulated}_{i:02d}.h5")
            for i in range(count)
        ]
    key = f"{split}_data_file"
    if split == "trafo" and data[key] is None:
        key = "training_data_file"
    return settings.resolve_files(data[key], f"data.{key}")


def asd_file(kind):
    """The fiducial ASD file or the ASD-set file (none for observations)."""
    if PROBLEM.observations:
        return []
    if config["data"]["simulate"]:
        return str(place("simulate") / "data" / f"{kind}.h5")
    key = f"{kind}_file"
    return settings.resolve_file(config["data"][key], f"data.{key}")


def svd_files():
    return [place("build_svd") / f"svd_{name}.h5" for name in SVD_NAMES]


def stage_dir(stage):
    return place(f"train_{stage}") / stage


def stage_model(stage):
    """A stage's model file: torch (.pt) for flows, Keras (.keras) for gaussian_regression."""
    suffix = ".keras" if settings.is_regression(config) else ".pt"
    return stage_dir(stage) / f"model_{stage}{suffix}"


def log_file(name):
    return str(RUN / "logs" / f"{name}.log")


def stage_inputs(stage):
    """What a stage reads besides the training and validation events and the ASDs."""
    if stage == INIT:  # no SVD layer, no previous stage
        return dict(svd=[], previous=[], init=[], warm_start=[])
    index = STAGES.index(stage)
    return dict(
        svd=svd_files(),
        previous=[stage_model(STAGES[index - 1])] if index else [],
        init=[stage_model(INIT)] if GNPE else [],
        warm_start=[path for path in [config["training"][stage]["warm_start"]] if path],
    )
