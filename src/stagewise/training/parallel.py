"""Data-parallel training: one stage on several processes (ranks) of one node, on N GPUs or on the CPU.

The training job supervises its ranks itself (no torchrun: an exit code 75 would not survive it, nor
SIGUSR1): it holds the checkpoint-folder lock, starts each rank as a plain subprocess
(`python -m stagewise.training.parallel JOB RANK`), forwards SIGTERM, SIGINT and SIGUSR1 to them and
exits as they did: 0 when all finished, 75 (EXIT_STOPPED) when all checkpointed and stopped, 1 when
one failed, after ending the others.

Every rank makes the whole batch of a step from the epoch's generator, as one process would, and
trains on its share of the rows (Ranks.shard); DistributedDataParallel averages the gradients of the
shares, weighted so that the step is that of the whole batch. The ranks agree at every step whether
to stop (runner), so they stop at the same step; rank 0 alone writes checkpoints, the stage model,
TensorBoard and W&B. A checkpoint is the same as one process writes, and one rank through this path
trains bit for bit as the ordinary single-process path does.
"""

import ctypes
import ctypes.util
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import Settings, rank_count
from ..logs import log_to_file
from .lock import checkpoint_lock
from .monitor import Monitor
from .ranks import Ranks
from .runner import EXIT_STOPPED, STOP_SIGNALS, StageStopped
from .stage import StageInputs, StageOutputs, train_stage

log = logging.getLogger(__name__)

EXIT_FAILED = 1
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies
# After rank 0 has exited, how long the other ranks may take to follow before they are ended (s).
FOLLOW_RANK_0 = 60.0
# NCCL's choices that could change the order of the gradient sums between runs on the same machine.
NCCL_REPRODUCIBLE = {"NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple", "NCCL_NVLS_ENABLE": "0"}


def rank_device(local: Settings, rank: int) -> str:
    """The device of rank `rank`: its own GPU of the job's (CUDA_VISIBLE_DEVICES), or the CPU."""
    return f"cuda:{rank}" if local["device"].startswith("cuda") else "cpu"


def _plain(value: Any) -> Any:
    """`value` as JSON: dataclasses as dicts, paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {key: _plain(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _end_with_parent() -> Callable[[], Any] | None:
    """A function for a rank to call before it runs (Linux): be killed when the supervising job dies, even by
    SIGKILL. None where libc is not found. libc is looked up here, not between fork and exec."""
    libc = ctypes.util.find_library("c")
    if libc is None:
        return None
    prctl = ctypes.CDLL(libc, use_errno=True).prctl
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_training_job(job: dict[str, Any], monitor: dict[str, Any] | None, log_path: str | Path) -> int:
    """Train a stage as the workflow's training job does and return the job's exit status.

    job: the keyword arguments of stage.train_stage but the monitor; monitor: those of monitor.Monitor,
    or None. One rank trains in this process; more are started and supervised (`supervise`)."""
    size = rank_count(job["local"])
    if size > 1:
        return supervise(size, job, monitor, log_path)
    try:
        train_stage(**job, monitor=None if monitor is None else Monitor(**monitor))
    except StageStopped as stop:
        return stop.exit_code
    return 0


def supervise(size: int, job: dict[str, Any], monitor: dict[str, Any] | None, log_path: str | Path) -> int:
    """Train a stage on `size` ranks (see the module's docstring) and return the job's exit status.

    The job's `threads` are shared out among the ranks (at least one each)."""
    job = dict(job, threads=max(1, job["threads"] // size))
    with checkpoint_lock(job["checkpoint_dir"]), tempfile.TemporaryDirectory(prefix="stagewise-ranks-") as folder:
        spec = Path(folder) / "job.json"
        spec.write_text(json.dumps(_plain(dict(job=job, monitor=monitor, size=size, log=log_path,
                                                    rendezvous=str(Path(folder) / "rendezvous")))))
        env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), **{
            key: os.environ.get(key, value) for key, value in NCCL_REPRODUCIBLE.items()})
        log.info("training %s on %d ranks (%s), %d threads each", job["name"], size, job["local"]["device"],
                 job["threads"])
        end_with_parent = _end_with_parent()
        ranks: list[subprocess.Popen] = []
        with _forwarding_stop_signals(ranks), open(log_path, "a") as stderr:
            for rank in range(size):
                ranks.append(subprocess.Popen([sys.executable, "-m", __name__, str(spec), str(rank)], env=env,
                                              stdout=stderr, stderr=stderr, preexec_fn=end_with_parent))
            return _wait(ranks)


@contextmanager
def _forwarding_stop_signals(ranks: list[subprocess.Popen]) -> Iterator[None]:
    """While active, STOP_SIGNALS that this process receives go to the running processes of `ranks`."""

    def forward(signum, frame):
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait(ranks: list[subprocess.Popen]) -> int:
    """The job's exit status once all ranks have exited; when one fails, the others are ended."""
    rank_0_ended = None
    while True:
        codes = [process.poll() for process in ranks]
        failed: list[tuple[int, int | str]] = [(rank, code) for rank, code in enumerate(codes)
                                               if code is not None and code not in (0, EXIT_STOPPED)]
        if codes[0] is not None and rank_0_ended is None:
            rank_0_ended = time.monotonic()
        if not failed and None in codes and rank_0_ended and time.monotonic() - rank_0_ended > FOLLOW_RANK_0:
            failed = [(rank, "still running") for rank, code in enumerate(codes) if code is None]
        if failed:
            for process in ranks:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            log.error("rank %s failed (exit status %s): the other ranks were ended; run again to resume from "
                      "the last checkpoint", *failed[0])
            return EXIT_FAILED
        if None not in codes:
            return EXIT_STOPPED if EXIT_STOPPED in codes else 0
        time.sleep(0.2)


def init_ranks(rank: int, size: int, rendezvous: str | Path, local: Settings) -> Ranks:
    """Join the process group of `size` ranks (gloo on the CPU, NCCL on GPUs) through a rendezvous file."""
    device = rank_device(local, rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=f"file://{rendezvous}",
                            rank=rank, world_size=size)
    return Ranks(rank, size, supervised=True, device=device)


def _rank_main(spec_path: str, rank: int) -> int:
    """One rank of `supervise`: train its share and return its exit status."""
    spec = json.loads(Path(spec_path).read_text())
    log_to_file(spec["log"], f"rank {rank}", level=logging.INFO if rank == 0 else logging.WARNING)
    job = spec["job"]
    ranks = init_ranks(rank, spec["size"], spec["rendezvous"], job["local"])
    job.update(local=dict(job["local"], device=ranks.device), inputs=StageInputs(**job["inputs"]),
               outputs=StageOutputs(**job["outputs"]))
    monitor = Monitor(**spec["monitor"]) if ranks.main and spec["monitor"] else None
    try:
        train_stage(**job, monitor=monitor, ranks=ranks)
        return 0
    except StageStopped as stop:
        return stop.exit_code
    except Exception:
        log.exception("rank %d failed", rank)
        return EXIT_FAILED
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1], int(sys.argv[2])))
