"""Two trainers never share a checkpoint folder; a second Snakemake on a running folder refuses."""

import logging
import os
import subprocess
import sys
import time

import pytest
import yaml

from stagewise.training.lock import STALE_AFTER, CheckpointFolderLocked, checkpoint_lock


def write_lock(folder, host, pid, age=0.0):
    path = folder.with_name(folder.name + ".lock")
    path.write_text(yaml.safe_dump({"host": host, "pid": pid, "since": "earlier"}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_live_trainer_on_this_host_keeps_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        write_lock(tmp_path / "stage_0", os.uname().nodename, holder.pid)
        with pytest.raises(CheckpointFolderLocked, match=f"in use by pid {holder.pid} on host"):
            with checkpoint_lock(tmp_path / "stage_0"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_dead_process_is_stale_and_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = write_lock(tmp_path / "stage_0", os.uname().nodename, dead.pid)
    with caplog.at_level(logging.WARNING), checkpoint_lock(tmp_path / "stage_0"):
        assert yaml.safe_load(lock.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text
    assert not lock.exists()


def test_another_hosts_lock_counts_only_while_its_heartbeat_is_fresh(tmp_path):
    write_lock(tmp_path / "stage_0", "other-node", 1234)
    with pytest.raises(CheckpointFolderLocked, match="on host other-node"):
        with checkpoint_lock(tmp_path / "stage_0"):
            pass
    write_lock(tmp_path / "stage_0", "other-node", 1234, age=STALE_AFTER + 60)
    with checkpoint_lock(tmp_path / "stage_0"):
        pass
