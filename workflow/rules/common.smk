import os
import sys
from pathlib import Path

# The stagewise package of this checkout, for this process and for every job
# (also inside conda environments, which do not install it).
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
)

from stagewise import config as settings
from stagewise.problem import check_config, is_regression

settings.validate(
    config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"
)
RUN = Path("results") / config["run"]
STAGES = sorted(config["training"], key=lambda name: int(name.split("_")[1]))
SPLITS = ("training", "trafo", "validation", "test")
ENV = "../../envs/stagewise.yaml"
TRAINING_JOB = config["local"]["training_job"]
OBSERVATIONS = config["data"]["kind"] == "observations"
# One SVD basis per detector for signals, one of the inputs for observations, none with svd: null.
SVD_NAMES = (
    []
    if config["svd"] is None
    else ["inputs"] if OBSERVATIONS else list(config["detectors"])
)

check_config(config)


def split_files(split):
    """Event files of a split: the simulated ones, or the config's glob or list."""
    data = config["data"]
    if data["simulate"]:
        simulated = "training" if split == "trafo" else split
        count = config["simulation"]["num_files"][simulated]
        return [str(RUN / "data" / f"{simulated}_{i:02d}.h5") for i in range(count)]
    key = f"{split}_data_file"
    if split == "trafo" and data[key] is None:
        key = "training_data_file"
    return settings.resolve_files(data[key], key)


def asd_file(kind):
    """The fiducial ASD file or the ASD-set file (none for observations)."""
    if OBSERVATIONS:
        return []
    if config["data"]["simulate"]:
        return str(RUN / "data" / f"{kind}.h5")
    key = f"{kind}_file"
    return settings.resolve_file(config["data"][key], key)


def svd_files():
    return [RUN / f"svd_{name}.h5" for name in SVD_NAMES]


def stage_dir(stage):
    return RUN / stage


def stage_model(stage):
    """A stage's model file: torch (.pt) for flows, Keras (.keras) for gaussian_regression."""
    suffix = ".keras" if is_regression(config) else ".pt"
    return stage_dir(stage) / f"model_{stage}{suffix}"


def log_file(name):
    return str(RUN / "logs" / f"{name}.log")
