"""Follow a training: one stage's epochs to TensorBoard, and to Weights & Biases when configured.

TensorBoard files go to `results/<run>/tensorboard/<stage>/`, W&B's to `results/<run>/wandb/`. A resumed job drops what
an earlier job logged after its last checkpoint (TensorBoard's purge step), so each
epoch appears once. The W&B run id of each stage is kept in `local_settings.yaml`, so
that a resumed job continues the same W&B run. A full device raises files.NoSpaceLeft naming the
TensorBoard folder.
"""

import importlib.util
import logging
import secrets
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

from ..files import NoSpaceLeft, full_device_errors, write_yaml

log = logging.getLogger(__name__)

# history column -> TensorBoard tag
TAGS = {
    "train_loss": "loss/train", "validation_loss": "loss/validation", "learning_rate": "learning_rate",
    "grad_norm": "grad_norm", "time_data": "time/data", "time_compute": "time/compute",
    "time_validation": "time/validation",
}


def write_local_settings(path, local):
    """local_settings.yaml: the `local` section this job runs with, and the W&B run ids that
    earlier jobs kept there."""
    path = Path(path)
    kept = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
    write_yaml(path, local | {"wandb_run_ids": kept.get("wandb_run_ids", {})})


class Monitor:
    """begin(epochs done), log(history row) after each epoch, close()."""

    def __init__(self, log_dir, stage, wandb_settings=None, local_settings=None, run_config=None):
        self.log_dir, self.stage = Path(log_dir), stage
        self.wandb_settings, self.local_settings, self.run_config = wandb_settings, local_settings, run_config
        self.writer = self.wandb_run = None

    def begin(self, epochs_done):
        from tensorboardX import SummaryWriter  # torch's writer would import TensorFlow where it is installed

        with self._tensorboard():
            self.writer = SummaryWriter(self.log_dir, purge_step=epochs_done + 1)
        if self.wandb_settings is not None:
            self.wandb_run = self._start_wandb()

    def _start_wandb(self):
        if importlib.util.find_spec("wandb") is None:
            log.warning("local.wandb is set but the wandb package is not installed: logging to TensorBoard only")
            return None
        import wandb

        settings = yaml.safe_load(Path(self.local_settings).read_text()) or {}
        run_ids = settings.setdefault("wandb_run_ids", {})
        if self.stage not in run_ids:
            run_ids[self.stage] = secrets.token_hex(4)  # a name, not a draw that shapes a result
            write_yaml(self.local_settings, settings)
        options = {k: v for k, v in self.wandb_settings.items() if v is not None}
        folder = Path(self.local_settings).parent / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(id=run_ids[self.stage], resume="allow", name=self.stage, config=self.run_config,
                         dir=str(folder), **options)
        log.info("W&B run %s (%s)", run.id, run.url or "offline")
        return run

    def log(self, row):
        with self._tensorboard():
            for key, tag in TAGS.items():
                self.writer.add_scalar(tag, row[key], row["epoch"])
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({tag: row[key] for key, tag in TAGS.items()} | {"epoch": row["epoch"]},
                               step=row["epoch"])

    def close(self):
        """Close the writers. A full device raises NoSpaceLeft, or when an error is already on its way
        (close() in a `finally`), is only logged, so that the traceback still ends with that error."""
        failing = sys.exc_info()[1] is not None
        try:
            if self.writer is not None:
                with self._tensorboard():
                    self.writer.close()
        except NoSpaceLeft as err:
            if not failing:
                raise
            log.error("%s", err)
        finally:
            if self.wandb_run is not None:
                self.wandb_run.finish()

    @contextmanager
    def _tensorboard(self):
        """NoSpaceLeft naming the TensorBoard folder for a full device; the SummaryWriter is then dropped."""
        try:
            with full_device_errors(self.log_dir):
                yield
        except NoSpaceLeft:
            self._drop_writer()
            raise

    def _drop_writer(self):
        """Stop tensorboardX's worker thread and close its event files without the flush that would fail
        again, also in tensorboardX's exit handler (whose traceback would follow the one-line message).
        Uses tensorboardX (2.6) internals; where they differ, only that exit traceback comes back."""
        writer, self.writer = self.writer, None
        if writer is None:
            return
        try:
            for file_writer in (writer.all_writers or {}).values():
                events = file_writer.event_writer
                events._closed = True  # its close(), called at exit, now does nothing
                if events._worker is not None and events._worker.is_alive():
                    events._worker.stop()
                try:
                    events._ev_writer._py_recordio_writer.close()  # closes the file, though its flush fails
                except OSError:
                    pass
        except AttributeError as err:
            log.debug("could not drop the TensorBoard writer: %s", err)
