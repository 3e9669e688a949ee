"""The `stagewise` command on the artefacts of a real tiny run: ls, append-stage, plan."""

import subprocess
import sys

import pytest
import yaml

from helpers import planned_jobs, snakemake

STAGEWISE = [sys.executable, "-m", "stagewise.cli"]


def stagewise(*args):
    return subprocess.run([*STAGEWISE, *map(str, args)], capture_output=True, text=True)


@pytest.mark.slow
def test_ls_describes_every_kind_of_artefact(tiny_run):
    run = tiny_run[0] / "results" / "tiny"
    expected = {
        "checkpoints/stage_1/model_latest.pt": ["stage: stage_1", "epochs completed: 2", "fingerprint", "stage_0:"],
        "stage_0/model_stage_0.pt": ["stage: stage_0", "freeze_svd: true", "architecture",
                                     "inference bundle: yes"],
        "trafo.h5": ["tau: {mean:", "log: true", "inputs"],
        "svd_L1.h5": ["detector: L1", "mismatch by basis size", "p99.9"],
        "counts.yaml": ["total: 400", "validation"],
        "data/training_00.h5": ["events: 200", "complex64 (200, 124)", "124 bins, 20 to 512 Hz"],
        "data/asd_set.h5": ["8 ASD(s)"],
        "data/observed.h5": ["observed-data file", "events: 4", "detectors: [H1, L1]", "labels: [f0, phase"],
        "inference/simulated/posterior.h5": ["posterior file", "samples per event: 200", "efficiency median",
                                               "network vs exact, JSD median (nat)"],
    }
    for name, fragments in expected.items():
        result = stagewise("ls", run / name)
        assert result.returncode == 0, result.stderr
        for fragment in fragments + (["version_torch", "git_revision", "host"] if name != "counts.yaml" else []):
            assert fragment in result.stdout, (name, fragment)


def test_ls_refuses_a_file_it_does_not_know_with_one_line(tmp_path):
    stranger = tmp_path / "notes.txt"
    stranger.write_text("hello")
    result = stagewise("ls", stranger)
    assert result.returncode == 2
    assert result.stderr.strip() == f"stagewise ls: {stranger}: not a stagewise artefact (expected a .pt model " \
                                     "or checkpoint, a .keras model, an HDF5 file of stagewise, or counts.yaml)"


def test_ls_names_a_damaged_checkpoint(tmp_path):
    damaged = tmp_path / "model_latest.pt"
    damaged.write_bytes(b"\x80\x02 truncated")
    result = stagewise("ls", damaged)
    assert result.returncode == 2 and f"{damaged}: unreadable checkpoint" in result.stderr


def write_stage(path, **changes):
    settings = {"epochs": 1, "batch_size": 100, "asd": "set", "freeze_svd": False,
                "optimizer": {"type": "adam", "learning_rate": 1e-4}, "scheduler": {"type": "cosine"}}
    path.write_text(yaml.safe_dump(settings | changes))
    return path


@pytest.mark.slow
def test_append_stage_then_plan_drives_the_workflow_to_train_only_the_new_stage(tiny_run, tmp_path):
    workdir = tiny_run[0]
    checkpoint = workdir / "results/tiny/stage_1/model_stage_1.pt"
    edited = tmp_path / "planned.pt"
    result = stagewise("append-stage", "--checkpoint", checkpoint, "--stage-settings", write_stage(tmp_path / "s.yaml"),
                       "--out", edited)
    assert result.returncode == 0, result.stderr
    plan = stagewise("plan", edited).stdout
    assert list(yaml.safe_load(plan)["training"]) == ["stage_0", "stage_1", "stage_2"]
    overrides = yaml.safe_load(plan)
    planned = planned_jobs(snakemake(workdir, "-n", overrides=overrides).output)
    assert planned == {"train_stage_2", "evaluate", "infer_set", "all"}


@pytest.mark.slow
def test_append_stage_replaces_a_planned_stage_but_refuses_one_that_has_begun(tiny_run, tmp_path):
    checkpoint = tiny_run[0] / "results/tiny/checkpoints/stage_1/model_latest.pt"
    first = tmp_path / "first.pt"
    stagewise("append-stage", "--checkpoint", checkpoint, "--stage-settings", write_stage(tmp_path / "a.yaml"),
              "--out", first)
    replaced = tmp_path / "replaced.pt"
    result = stagewise("append-stage", "--checkpoint", first, "--replace", 2, "--out", replaced,
                       "--stage-settings", write_stage(tmp_path / "b.yaml", epochs=7))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(stagewise("plan", replaced).stdout)["training"]["stage_2"]["epochs"] == 7
    refused = stagewise("append-stage", "--checkpoint", first, "--replace", 1, "--out", tmp_path / "no.pt",
                        "--stage-settings", write_stage(tmp_path / "c.yaml"))
    assert refused.returncode == 2
    assert "stage_1 has begun" in refused.stderr
    assert not (tmp_path / "no.pt").exists()


@pytest.mark.slow
def test_append_stage_rejects_invalid_stage_settings_naming_the_key(tiny_run, tmp_path):
    checkpoint = tiny_run[0] / "results/tiny/stage_1/model_stage_1.pt"
    result = stagewise("append-stage", "--checkpoint", checkpoint, "--out", tmp_path / "x.pt",
                       "--stage-settings", write_stage(tmp_path / "bad.yaml", epochs=0))
    assert result.returncode == 2
    assert "stage setting epochs: 0 is less than the minimum of 1" in result.stderr
    assert not (tmp_path / "x.pt").exists()
