"""A full device: every artefact writer fails with one line naming the file (files.NoSpaceLeft).

Each test mounts its own 2 MiB tmpfs, a real filesystem that fills up. The tests are skipped when
not run as root or where mounting is not permitted (a container without CAP_SYS_ADMIN)."""

import errno
import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stagewise.events import write_event_file
from stagewise.files import NoSpaceLeft, atomic_path, write_text
from stagewise.training import checkpoints
from stagewise.training.monitor import TAGS, Monitor

BIG = 4 << 20  # bytes, twice the filesystem


@pytest.fixture
def disk(tmp_path):
    """A fresh 2 MiB tmpfs, unmounted afterwards (which fails the test if a file on it is still open)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
    yield mount_point
    result = subprocess.run(["umount", str(mount_point)], capture_output=True, text=True)
    if result.returncode:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)
        pytest.fail(f"umount {mount_point}: {result.stderr.strip()} (a file left open?)")


def fill(disk):
    """Write zeros to `disk`/filler until the device is full."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)


def free_bytes(disk):
    fs = os.statvfs(disk)
    return fs.f_bavail * fs.f_frsize


def assert_one_line(err, path):
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(err) == f"no space left on device writing {path}"


def test_checkpoint_on_full_disk_keeps_the_older_one(disk):
    folder = disk / "results/run/checkpoints/stage_0"
    target = folder / checkpoints.LATEST
    checkpoints.save(target, {"fingerprint": "f", "epoch": 1, "w": torch.ones(10)})
    free = free_bytes(disk)
    with pytest.raises(NoSpaceLeft) as caught:
        checkpoints.save(target, {"fingerprint": "f", "epoch": 2, "w": torch.zeros(BIG // 4)})
    assert_one_line(caught.value, target)
    assert sorted(p.name for p in folder.iterdir()) == [target.name]  # no temporary file left
    del caught  # its traceback holds torch's writer, which keeps the removed temporary file open
    gc.collect()
    assert free_bytes(disk) == free
    state = checkpoints.load(target)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(10))


def test_event_file_and_text_on_full_disk(disk):
    events, text = disk / "events.h5", disk / "notes.txt"
    write_text(text, "old")
    with pytest.raises(NoSpaceLeft) as caught:
        write_event_file(events, {"mass": np.ones(4)}, {"strain": np.zeros((4, BIG // 32))}, "training")
    assert_one_line(caught.value, events)
    with pytest.raises(NoSpaceLeft) as caught:
        write_text(text, "x" * BIG)
    assert_one_line(caught.value, text)
    assert sorted(p.name for p in disk.iterdir()) == [text.name]
    assert text.read_text() == "old"


def test_other_errors_pass_unchanged(disk):
    """Only a full device is translated: an error without errno while there is space, or one that
    cannot come from writing, propagates as it was raised."""
    with pytest.raises(RuntimeError, match="^not a full disk$"):
        with atomic_path(disk / "a.pt"):
            raise RuntimeError("not a full disk")
    fill(disk)
    with pytest.raises(ValueError, match="^a bug$"):
        with atomic_path(disk / "a.pt"):
            raise ValueError("a bug")
    with pytest.raises(PermissionError):
        with atomic_path(disk / "a.pt"):
            raise PermissionError(errno.EACCES, "denied")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_tensorboard_on_full_disk(disk):
    log_dir = disk / "results/run/tensorboard/stage_0"
    monitor = Monitor(log_dir, "stage_0")
    monitor.begin(0)
    fill(disk)
    with pytest.raises(NoSpaceLeft) as caught:
        monitor.log({key: 1.0 for key in TAGS} | {"epoch": 1})
    assert_one_line(caught.value, log_dir)
    monitor.close()  # the failed writer is gone: nothing to raise, no file left open (see umount)


STAGE = """
import sys
import torch
from stagewise.training import checkpoints
from stagewise.training.monitor import Monitor

disk, target = sys.argv[1:]
monitor = Monitor(f"{disk}/tensorboard/stage_0", "stage_0")
monitor.begin(0)  # its first events wait in tensorboardX's buffer: close() will fail to flush them
try:
    open(f"{disk}/filler", "wb").write(bytes(4 << 20))
except OSError:
    pass
try:
    checkpoints.save(target, {"w": torch.zeros(10)})
finally:
    monitor.close()
"""


def test_stage_stopped_by_full_disk_ends_with_one_line(disk):
    """As in run_stage: a checkpoint write fails on the full device, then the monitor closes in a
    `finally`. The traceback ends with the checkpoint's line, not TensorBoard's, nor one from
    tensorboardX's exit handler."""
    target = disk / "checkpoints/stage_0/model_latest.pt"
    result = subprocess.run([sys.executable, "-c", STAGE, str(disk), str(target)], capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"stagewise.files.NoSpaceLeft: no space left on device writing {target}", result.stderr
    assert f"no space left on device writing {disk}/tensorboard/stage_0" in lines  # logged by close()
