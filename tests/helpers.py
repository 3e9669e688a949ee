"""Shared test helpers: a copy of the workflow in a temporary folder, real Snakemake runs in it,
the system parts of tests/system-up.sh, and watching the processes of a running training.

conftest.py holds the pytest hooks and fixtures and imports from here; test modules do too
(`from helpers import ...`)."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import yaml
from snakemake.utils import update_config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "configs" / "tiny.yaml"
SYSTEM_UP = REPO / "tests" / "system-up.sh"
# The background start of tests/system-up.sh by conftest.py: "process", "parts" and "log" once started.
_system = {}


def system_up(part):
    """Wait for the background start of `part`, or run it now; raise with the log if it failed."""
    process = _system.get("process")
    if process is None or part not in _system["parts"]:
        subprocess.run(["bash", str(SYSTEM_UP), part], check=True)
    elif process.wait() != 0:
        raise RuntimeError(f"tests/system-up.sh failed:\n{_system['log'].read_text()[-3000:]}")


def copy_workflow(target):
    """Copy the Snakefile, workflow/, config/, envs/, profiles/, examples/ and the tiny config into `target`."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "Snakefile", target)
    for folder in ("workflow", "config", "envs", "profiles", "examples"):
        shutil.copytree(REPO / folder, target / folder)
    shutil.copy(TINY, target / "tiny.yaml")
    return target


def snakemake(workdir, *args, overrides=None, check=True, configfiles=("config/config.yaml", "tiny.yaml"), cpus=None):
    """Run `snakemake --cores 2` on the tiny config (or `configfiles`), plus an optional overrides
    dict, in `workdir`; on the CPUs `cpus` only (a set of CPU numbers) if given.

    Targets must come first in `args` (multi-value options swallow what follows them)."""
    configfiles = list(configfiles)
    if overrides is not None:
        (Path(workdir) / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        configfiles.append("overrides.yaml")
    command = [sys.executable, "-m", "snakemake", *args, "--cores", "2", "--configfile", *configfiles]
    env = dict(os.environ, CONDOR_CONFIG="/dev/null")
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env,
                            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
    result.output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.output[-5000:]}")
    return result


def tiny_config():
    """config/config.yaml with tests/configs/tiny.yaml merged over it, as Snakemake merges configfiles."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load(TINY.read_text()))
    return config


def planned_jobs(output):
    """Rule names of the 'Job stats' table that snakemake prints (empty when nothing is to be done)."""
    match = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal", output, re.S)
    if match is None:
        return set()
    return {line.split()[0] for line in match.group(1).splitlines() if line.strip()}


def cluster_overrides(epochs):
    """The cluster tests' settings: one thread, a 1-minute 2 GB training job, and stage 0 with
    `epochs` epochs of batch size 10."""
    return {"local": {"threads": 1, "training_job": {"mem_mb": 2000, "runtime": 1}},
            "training": {"stage_0": {"epochs": epochs, "batch_size": 10}}}


# The interruption tests' stage 0: 8 epochs of 40 steps, blocks of 25 events shuffled in buffers of about 50
# (0.1 MB): the order of a split larger than memory.
LONG_STAGE = {"training": {"stage_0": {"epochs": 8, "batch_size": 10}},
              "data": {"shuffle": {"block_events": 25, "buffer_mb": 0.1}}}


def wait_for(condition, process, timeout=60.0, interval=0.01):
    """Poll `condition()` until true; False if the process ended first or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(interval)
    return False


def training_process(workdir):
    """The pid of the python process running this workdir's train_stage script."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (proc.name.isdigit() and str(workdir) in cmdline and "train_stage.py" in cmdline
                and "set -euo" not in cmdline):
            return int(proc.name)
    return None


def in_process(capsys, *args):
    """`stagewise ARGS` run in this process (quicker than a new interpreter): (exit status, stderr)."""
    from stagewise import cli

    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)
