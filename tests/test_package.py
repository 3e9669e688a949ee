"""The installed package is self-contained: built as a wheel and installed (not editable) into a
fresh virtual environment, `stagewise ls` and `stagewise append-stage` work from a folder outside
the source tree, reading the config schema from the package itself."""

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO
from stagewise.provenance import provenance
from stagewise.training import checkpoints

STAGE = {"epochs": 3, "batch_size": 10, "asd": "fiducial", "freeze_svd": True,
         "optimizer": {"type": "adam", "learning_rate": 1e-3}, "scheduler": {"type": "cosine"}}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The `stagewise` command of a fresh venv holding the package built as a wheel. The venv sees this
    environment's site-packages for the dependencies (a .pth line), not the source tree: the editable
    install's own .pth there is not read for a folder added this way."""
    folder = tmp_path_factory.mktemp("package")
    source = folder / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(folder / "wheels"), str(source)], check=True, cwd=folder)
    venv.create(folder / "venv", with_pip=True)
    python = folder / "venv" / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((folder / "wheels").glob("stagewise-*.whl"))
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)], check=True)
    return folder, python


def run(installed, *args):
    folder, python = installed
    return subprocess.run([python, "-m", "stagewise.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=folder, env={"PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_an_installed_package_lists_and_edits_a_checkpoint_outside_the_source_tree(installed):
    folder, python = installed
    where = subprocess.run([python, "-c", "import stagewise; print(stagewise.__file__)"], capture_output=True,
                           text=True, cwd=folder, check=True).stdout
    assert where.startswith(str(folder / "venv")) and str(REPO / "src") not in where
    checkpoint = folder / "model_latest.pt"
    checkpoints.save(checkpoint, {
        "stage": "stage_0", "epoch": 2, "partial_epoch": None, "fingerprint": "0123456789abcdef",
        "settings": {"training": {"stage_0": STAGE}}, "planned_stages": {"stage_0": STAGE},
        "architecture": {"num_detectors": 2}, "provenance": provenance(),
        "history": [{"epoch": 2, "train_loss": 1.5, "validation_loss": 1.25}], "model": {"w": torch.zeros(2)},
    })
    (folder / "stage_1.yaml").write_text(yaml.safe_dump(STAGE | {"asd": "set", "freeze_svd": False}))

    listed = run(installed, "ls", checkpoint)
    appended = run(installed, "append-stage", "--checkpoint", checkpoint, "--stage-settings",
                   folder / "stage_1.yaml", "--out", folder / "edited.pt")
    refused = run(installed, "append-stage", "--checkpoint", checkpoint, "--stage-settings",
                  folder / "model_latest.pt", "--out", folder / "never.pt")

    assert listed.returncode == 0, listed.stderr
    assert "epochs completed: 2" in listed.stdout and "validation_loss: 1.25" in listed.stdout
    assert appended.returncode == 0, appended.stderr
    planned = checkpoints.load(folder / "edited.pt")["planned_stages"]
    assert list(planned) == ["stage_0", "stage_1"] and planned["stage_1"]["stage_model"] == "last"  # schema default
    assert refused.returncode == 2 and "cannot read stage settings" in refused.stderr
    assert not (folder / "never.pt").exists()
