"""A model file is data, never code: every reader refuses a crafted pickle without running it.

The crafted files hold an object whose unpickling would call os.system to create a marker file;
each test checks that the reader refuses the file with one line naming that call and that the
marker never appears. The files of earlier versions (numpy arrays inside) get a line naming
`stagewise convert`, which rewrites them, and a resume from a converted checkpoint is tested in
test_interruption.py."""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import in_process, snakemake
from stagewise import files
from stagewise.training import checkpoints

STAGEWISE = [sys.executable, "-m", "stagewise.cli"]
REFUSED = "refused: loading it would build posix.system"


class Payload:
    """Unpickled, calls os.system (posix.system) to create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(folder, kind):
    """(a crafted model file, the marker its unpickling would create) in torch.save's format or as a bare pickle."""
    marker, path = folder / "pwned_by_model_file", folder / "evil.pt"
    state = {"fingerprint": "0" * 16, "stage": "stage_0", "model": Payload(marker)}
    if kind == "torch zip":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=4))
    return path, marker


@pytest.fixture(params=["torch zip", "bare pickle"])
def crafted(request, tmp_path):
    return craft(tmp_path, request.param)


def stagewise(*args):
    return subprocess.run([*STAGEWISE, *map(str, args)], capture_output=True, text=True)




@pytest.mark.parametrize("command", ["ls", "plan", "convert", "append-stage", "infer"])
def test_every_command_refuses_a_crafted_pickle_with_one_line_and_runs_nothing(crafted, command, tmp_path, capsys):
    path, marker = crafted
    stage = tmp_path / "stage.yaml"
    stage.write_text("epochs: 1\nbatch_size: 100\nasd: set\nfreeze_svd: false\n"
                     "optimizer: {type: adam, learning_rate: 1.0e-4}\nscheduler: {type: cosine}\n")
    out = tmp_path / "out.pt"
    args = {"ls": [path], "plan": [path], "convert": [path, out],
            "append-stage": ["--checkpoint", path, "--stage-settings", stage, "--out", out],
            "infer": [path, tmp_path / "events.h5", "--out", out]}[command]
    result = in_process(capsys, command, *args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"stagewise {command}: {path}: {REFUSED}; a stagewise file holds only "
                                          "tensors, numbers, strings, lists and dicts, and nothing from this one "
                                          "was run"]
    assert not marker.exists() and not out.exists()


def test_the_resume_refuses_a_crafted_checkpoint_instead_of_starting_afresh(crafted, tmp_path):
    """latest_valid skips a damaged file but raises on a refused one, and moves nothing aside."""
    path, marker = crafted
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(path, folder / checkpoints.LATEST)
    with pytest.raises(files.UnsafeFile, match="posix.system"):
        checkpoints.resume_state(folder, "another fingerprint")
    assert (folder / checkpoints.LATEST).read_bytes() == path.read_bytes()
    assert not marker.exists() and [p.name for p in tmp_path.iterdir()] == sorted(["checkpoints", path.name])


def test_a_state_with_numpy_objects_is_written_as_plain_data_and_reads_back_equal(tmp_path):
    np.random.seed(7)
    weights = [np.random.rand(3, 2).astype(np.float32), np.arange(4, dtype=np.int64)]
    state = {"fingerprint": "f", "numpy": np.random.get_state(), "model": weights, "best": np.float32(0.1),
             "history": [{"epoch": 1, "train_loss": 1.5}], "step": np.int64(3)}
    files.write_torch_file(tmp_path / "state.pt", state)

    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "state.pt") == []
    read = files.read_torch_file(tmp_path / "state.pt", "fingerprint")
    assert [np.asarray(w).dtype for w in read["model"]] == [np.float32, np.int64]
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(read["model"], weights, strict=True))
    assert read["best"] == float(np.float32(0.1)) and read["step"] == 3 and type(read["step"]) is int
    name, key, *rest = read["numpy"]
    np.random.set_state((name, np.asarray(key), *rest))
    expected = np.random.RandomState(7)
    expected.rand(6)  # the draws of `weights`
    assert np.array_equal(np.random.rand(5), expected.rand(5))


def test_writing_an_object_the_safe_loader_would_refuse_fails_and_leaves_no_file(tmp_path):
    with pytest.raises(TypeError, match="pathlib"):
        files.write_torch_file(tmp_path / "state.pt", {"fingerprint": "f", "where": Path("/tmp")})
    assert list(tmp_path.iterdir()) == []


def test_a_file_of_an_earlier_version_names_the_conversion_which_keeps_every_value(tmp_path, capsys):
    """The old writer: torch.save of numpy arrays and scalars (numpy random state, Keras weights)."""
    np.random.seed(3)
    old_state = {"fingerprint": "f", "stage": "stage_0", "random_states": {"numpy": np.random.get_state()},
                 "model": [np.random.rand(4).astype(np.float32)], "recipe": {"best": np.float64(0.25)}}
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save(old_state, old)

    result = in_process(capsys, "ls", old)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"stagewise ls: {old}: written by an earlier stagewise version (it holds "
                                          f"numpy arrays); convert it (this runs nothing from the file): "
                                          f"stagewise convert {old} NEW"]
    result = in_process(capsys, "convert", old, new)
    assert result.returncode == 0, result.stderr
    converted = files.read_torch_file(new, "fingerprint")
    assert torch.equal(converted["random_states"]["numpy"][1], torch.from_numpy(old_state["random_states"]["numpy"][1]))
    assert converted["random_states"]["numpy"][2:] == old_state["random_states"]["numpy"][2:]
    assert torch.equal(converted["model"][0], torch.from_numpy(old_state["model"][0]))
    assert converted["recipe"]["best"] == 0.25


def test_a_keras_model_with_a_lambda_layer_is_refused_by_safe_mode(tmp_path):
    import keras

    path = tmp_path / "model_stage_0.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda x: x * 2)]).save(path)
    result = stagewise("ls", path)
    assert result.returncode == 2
    # TensorFlow 2.21 prints its oneDNN notice at import whatever TF_CPP_MIN_LOG_LEVEL says: the error is the rest
    assert result.stderr.splitlines()[-1:] == [f"stagewise ls: {path}: refused by Keras' safe mode: Requested the "
                                          "deserialization of a `Lambda` layer whose `function` is a Python lambda; "
                                          "a stagewise model holds no Python code, and nothing from this one was run"]


@pytest.mark.slow
def test_a_crafted_checkpoint_and_a_crafted_warm_start_stop_the_stage_and_run_nothing(tiny_run, tmp_path):
    """Real Snakemake runs: stage 1 resuming from the crafted file as model_latest.pt, then stage 0
    warm-starting from it. (Both file kinds reach the same reader, tested above for every command.)"""
    path, marker = craft(tmp_path, "torch zip")
    workdir = Path(shutil.copytree(tiny_run[0], tmp_path / "workdir", symlinks=True))
    folder = workdir / "results/tiny/checkpoints/stage_1"
    shutil.copy(path, folder / checkpoints.LATEST)
    result = snakemake(workdir, "train_stage_1", "--forcerun", "train_stage_1", check=False)
    assert result.returncode != 0
    log = (workdir / "results/tiny/logs/train_stage_1.log").read_text()
    assert f"results/tiny/checkpoints/stage_1/{checkpoints.LATEST}: {REFUSED}" in log.splitlines()[-1]
    assert not marker.exists()
    assert (folder / checkpoints.LATEST).read_bytes() == path.read_bytes()  # neither moved aside nor overwritten
    assert not list(folder.parent.glob("stage_1.*"))
    assert not (workdir / "results/tiny/stage_1/model_stage_1.pt").exists()

    result = snakemake(workdir, "train_stage_0", overrides={"training": {"stage_0": {"warm_start": str(path)}}},
                       check=False)
    assert result.returncode != 0
    assert f"{path}: {REFUSED}" in (workdir / "results/tiny/logs/train_stage_0.log").read_text().splitlines()[-1]
    assert not marker.exists()
