"""Fingerprints (README, "Fingerprints" and "`local` settings"): a checkpoint records a hash of the
stage's settings and of the bytes of its inputs (trafo.h5, the SVD files, the previous stage's model
or the warm-start file); `local` is in no fingerprint. A checkpoint folder with another fingerprint is
never resumed: it is moved aside to checkpoints/stage_<k>.<old fingerprint> and the stage starts afresh.

The fingerprint is config.fingerprint(config.stage_settings(config, stage),
StageInputs.fingerprinted_files(warm_start)), as train_stage computes it from what the workflow passes."""

import copy
import logging
import shutil

import pytest
import torch
import yaml

from helpers import REPO, tiny_config
from stagewise import config as settings
from stagewise.simulate.files import simulate
from stagewise.steps import build_svd_step, fit_trafo_step
from stagewise.training import checkpoints
from stagewise.training.runner import StageStopped
from stagewise.training.stage import StageInputs, StageOutputs, train_stage


@pytest.fixture(scope="module")
def config():
    config = tiny_config()
    settings.validate(config)  # fills the stages' defaults, as the workflow does
    return config


def files(folder, contents):
    """Write {name: bytes} into `folder`; the paths in the same order."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in contents]


INPUTS = {"trafo.h5": b"trafo bytes" * 100, "svd_H1.h5": b"H1 basis" * 100, "svd_L1.h5": b"L1 basis" * 100,
          "model_stage_0.pt": b"previous stage" * 100}


# --- config.fingerprint: settings plus input bytes ---

def test_fingerprint_is_equal_for_equal_settings_in_any_key_order_and_equal_input_bytes_anywhere(config, tmp_path):
    stage = settings.stage_settings(config, "stage_0")
    reordered = copy.deepcopy(dict(reversed(stage.items())))
    reordered["model"] = dict(reversed(reordered["model"].items()))
    assert list(reordered) != list(stage) and reordered == stage
    here, moved = files(tmp_path / "here", INPUTS), files(tmp_path / "elsewhere/results", INPUTS)
    assert settings.fingerprint(stage, here) == settings.fingerprint(reordered, moved)


@pytest.mark.parametrize("index", range(len(INPUTS)), ids=list(INPUTS))
@pytest.mark.parametrize("change", ["one byte flipped", "one byte appended"])
def test_fingerprint_changes_with_the_bytes_of_any_input_file(config, tmp_path, index, change):
    stage = settings.stage_settings(config, "stage_0")
    paths = files(tmp_path, INPUTS)
    before = settings.fingerprint(stage, paths)
    data = bytearray(INPUTS[list(INPUTS)[index]])
    if change == "one byte flipped":
        data[len(data) // 2] ^= 1
    else:
        data.append(0)
    with open(paths[index], "wb") as f:
        f.write(data)
    assert settings.fingerprint(stage, paths) != before


# Every top-level config key, and what changing it does to stage_0's fingerprint: "changes" when the
# key is in stage_0's settings (config.stage_settings), "same" otherwise. Keys of the earlier steps
# (simulation, trafo, svd, ...) reach a stage through the bytes of the files they change, not its settings.
CHANGES = {
    "seed": 43,
    "training_seed": 7,
    "data.kind": "observations",
    "data.simulate": False,
    "data.shuffle.block_events": 1024,
    "data.shuffle.buffer_mb": 256,
    "extrinsic_prior.snr.high": 50.0,
    "inference_parameters": ["f0", "tau"],
    "detectors.L1.time_offset": 0.008,
    "model.type": "gaussian_regression",
    "model.num_asd_bands": 8,
    "model.embedding.output_dim": 32,
    "model.flow.num_bins": 8,
    "training.stage_0.epochs": 3,
    "training.stage_0.batch_size": 50,
    "training.stage_0.optimizer.learning_rate": 0.002,
    "training.stage_0.scheduler": {"type": "constant"},
    "training.stage_0.warm_start": "results/other/stage_0/model_stage_0.pt",
    "training.stage_0.ema_decay": 0.99,
    "gnpe": yaml.safe_load((REPO / "config/config.yaml").read_text())["gnpe"],
}
SAME = {
    "run": "other",
    "sweep": "config/sweep_example.yaml",
    "data.training_data_file": "elsewhere/*.h5",
    "data.validation_data_file": "elsewhere/validation.h5",
    "data.test_data_file": "elsewhere/test.h5",
    "data.trafo_data_file": "elsewhere/trafo.h5",
    "data.fiducial_asd_file": "elsewhere/fiducial.h5",
    "data.asd_set_file": "elsewhere/asd_set.h5",
    "simulation.events_per_file": 100,
    "intrinsic_prior.f0.high": 300.0,
    "trafo.num_batches": 3,
    "svd.size": 8,
    "training.stage_1.epochs": 5,
    "training.stage_2": {"epochs": 1, "batch_size": 10},
    "evaluation.num_samples": 100,
    "inference.num_samples": 100,
    "inference.simulated_events": 4,
    "local.device": "cuda",
    "local.threads": 7,
    "local.checkpoint_epochs": 3,
    "local.memory_limit_mb": 10,
    "local.runtime_limits": {"max_time_per_run": 60, "max_epochs_per_run": 1},
    "local.training_job": {"gpus": 0, "mem_mb": 100, "runtime": 5, "stop_margin": 30},
    "local.wandb": {"project": "p", "entity": None, "mode": "offline"},
}


def changed(config, key, value):
    config = copy.deepcopy(config)
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    assert last in node or key == "training.stage_2", key  # a key of the config, not a new one
    node[last] = value
    return config


def test_every_config_key_is_classified_for_the_stage_fingerprint(config):
    classified = {key.split(".")[0] for key in [*CHANGES, *SAME]}
    assert classified == set(config), set(config) ^ classified


@pytest.mark.parametrize("key", list(CHANGES))
def test_a_setting_of_the_stage_changes_its_fingerprint(config, tmp_path, key):
    paths = files(tmp_path, INPUTS)
    before = settings.fingerprint(settings.stage_settings(config, "stage_0"), paths)
    after = settings.fingerprint(settings.stage_settings(changed(config, key, CHANGES[key]), "stage_0"), paths)
    assert after != before


@pytest.mark.parametrize("key", list(SAME))
def test_local_settings_and_other_steps_settings_leave_the_stage_fingerprint_as_it_was(config, tmp_path, key):
    paths = files(tmp_path, INPUTS)
    before = settings.fingerprint(settings.stage_settings(config, "stage_0"), paths)
    after = settings.fingerprint(settings.stage_settings(changed(config, key, SAME[key]), "stage_0"), paths)
    assert after == before


@pytest.mark.parametrize("key, value, same", [
    ("kernel", 0.002, False), ("iterations", {"min": 1, "max": 9, "ks_pvalue": 0.2}, True),
    ("init", {"embedding": {"hidden_dims": [8], "output_dim": 4}}, True),
])
def test_of_gnpe_only_the_kernel_enters_the_stage_fingerprint(config, tmp_path, key, value, same):
    """The kernel shapes what the stages learn; the init network and the Gibbs bounds do not (the init
    network travels in the stage model files, and the bounds are for sampling)."""
    paths = files(tmp_path, INPUTS)
    gnpe = changed(config, "gnpe", CHANGES["gnpe"])
    before = settings.fingerprint(settings.stage_settings(gnpe, "stage_0"), paths)
    after = settings.fingerprint(settings.stage_settings(changed(gnpe, f"gnpe.{key}", value), "stage_0"), paths)
    assert (after == before) == same


# --- StageInputs.fingerprinted_files: which files' bytes count ---

def stage_inputs(paths, previous_model=None):
    trafo, svd_h1, svd_l1 = paths[:3]
    return StageInputs(training_files=["training.h5"], validation_files=["validation.h5"], trafo=trafo,
                       svd={"H1": svd_h1, "L1": svd_l1}, fiducial_asd="fiducial.h5", asd_set="asd_set.h5",
                       previous_model=previous_model)


def test_fingerprinted_files_are_the_trafo_the_svd_bases_and_the_model_the_stage_starts_from(tmp_path):
    trafo, svd_h1, svd_l1, previous = files(tmp_path, INPUTS)
    warm = files(tmp_path, {"warm.pt": b"another run's model"})[0]
    assert stage_inputs([trafo, svd_h1, svd_l1]).fingerprinted_files(None) == [trafo, svd_h1, svd_l1]
    assert stage_inputs([trafo, svd_h1, svd_l1]).fingerprinted_files(warm) == [trafo, svd_h1, svd_l1, warm]
    later = stage_inputs([trafo, svd_h1, svd_l1], previous_model=previous)
    assert later.fingerprinted_files(None) == [trafo, svd_h1, svd_l1, previous]
    # the data files are not hashed (their settings and names are): reading them all would take long
    assert not {"training.h5", "validation.h5", "fiducial.h5", "asd_set.h5"} & set(later.fingerprinted_files(None))


# --- train_stage: a changed trafo moves the checkpoint folder aside; a changed `local` resumes ---

@pytest.fixture(scope="module")
def tiny_data(config, tmp_path_factory):
    """The tiny config's training and validation files, fiducial ASD, ASD set, trafo and SVD bases,
    and a second trafo.h5 fitted with other trafo settings (other bytes)."""
    out = tmp_path_factory.mktemp("fingerprint_data")
    events = [out / name for name in ("training_00.h5", "training_01.h5", "validation_00.h5")]
    fiducial, asd_set = out / "fiducial_asd.h5", out / "asd_set.h5"
    simulate(settings.simulation_settings(config), events, fiducial, asd_set)
    fit_trafo_step(settings.trafo_settings(config), events[:2], fiducial, out / "trafo.h5")
    other = changed(config, "trafo.num_batches", 1)
    fit_trafo_step(settings.trafo_settings(other), events[:2], fiducial, out / "other_trafo.h5")
    svd = {d: str(out / f"svd_{d}.h5") for d in config["detectors"]}
    build_svd_step(settings.svd_settings(config), events[:2], fiducial, out / "trafo.h5", svd)
    return dict(training_files=[str(e) for e in events[:2]], validation_files=[str(events[2])],
                trafo=str(out / "trafo.h5"), svd=svd, fiducial_asd=str(fiducial), asd_set=str(asd_set),
                other_trafo=str(out / "other_trafo.h5"))


def train(config, data, folder, trafo, local=None):
    """One run of train_stage for stage_0 as the workflow calls it: stage_settings, the `local` section
    (with `local` overrides) and the files; True when the stage completed, False when a runtime limit stopped it."""
    inputs = StageInputs(training_files=data["training_files"], validation_files=data["validation_files"],
                         trafo=trafo, svd=data["svd"], fiducial_asd=data["fiducial_asd"], asd_set=data["asd_set"],
                         previous_model=None)
    outputs = StageOutputs(model=str(folder / "model_stage_0.pt"), history=str(folder / "history.csv"))
    try:
        train_stage(settings.stage_settings(config, "stage_0"), {**config["local"], **(local or {})}, "stage_0",
                    inputs, outputs, folder / "checkpoints/stage_0")
    except StageStopped:
        return False
    return True


ONE_EPOCH = {"runtime_limits": {"max_time_per_run": None, "max_epochs_per_run": 1}}


def test_a_changed_trafo_moves_the_checkpoint_folder_aside_and_a_changed_local_section_resumes(
        config, tiny_data, tmp_path, caplog):
    assert config["training"]["stage_0"]["epochs"] == 2
    folder = tmp_path / "run"
    checkpoint_dir = folder / "checkpoints/stage_0"
    assert not train(config, tiny_data, folder, tiny_data["trafo"], ONE_EPOCH)
    first = checkpoints.load(checkpoint_dir / checkpoints.LATEST)
    stage = settings.stage_settings(config, "stage_0")
    expected = settings.fingerprint(stage, [tiny_data["trafo"], *tiny_data["svd"].values()])
    assert (first["fingerprint"], first["epoch"]) == (expected, 1)

    # other `local` settings (threads, checkpoint period, memory limit, W&B, job): the same fingerprint, resumed
    local = {**ONE_EPOCH, "threads": 1, "checkpoint_epochs": 2, "memory_limit_mb": 4096,
             "training_job": {**config["local"]["training_job"], "runtime": 60, "stop_margin": 10},
             "wandb": {"project": "p", "entity": None, "mode": "disabled"}}
    with caplog.at_level(logging.INFO, logger="stagewise"):
        assert train(config, tiny_data, folder, tiny_data["trafo"], local)
    assert "resuming from" in caplog.text
    done = torch.load(folder / "model_stage_0.pt", weights_only=True)
    assert (done["fingerprint"], done["epoch"], len(done["history"])) == (expected, 2, 2)
    assert [p.name for p in checkpoint_dir.parent.iterdir()] == ["stage_0"]  # nothing moved aside

    # a trafo with other bytes: the folder is moved aside, untouched, and the stage starts afresh
    shutil.copy(tiny_data["other_trafo"], tmp_path / "trafo.h5")
    new_trafo = str(tmp_path / "trafo.h5")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stagewise"):
        assert not train(config, tiny_data, folder, new_trafo, ONE_EPOCH)
    aside = checkpoint_dir.with_name(f"stage_0.{expected}")
    old = checkpoints.load(aside / checkpoints.LATEST)
    assert (old["fingerprint"], old["epoch"]) == (expected, 2)
    new = checkpoints.load(checkpoint_dir / checkpoints.LATEST)
    assert new["fingerprint"] == settings.fingerprint(stage, [new_trafo, *tiny_data["svd"].values()]) != expected
    assert (new["epoch"], len(new["history"])) == (1, 1)  # afresh: one epoch trained, not three
    assert "made by other settings" in caplog.text and str(aside) in caplog.text
