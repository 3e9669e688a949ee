"""Follow a training: one stage's epochs to TensorBoard, and to Weights & Biases when configured.

TensorBoard files go to `results/<run>/tensorboard/<stage>/`, W&B's to `results/<run>/wandb/`. A resumed job drops what
an earlier job logged after its last checkpoint (TensorBoard's purge step), so each
epoch appears once. The W&B run id of each stage is kept in `local_settings.yaml`, so
that a resumed job continues the same W&B run.
"""

import importlib.util
import logging
import secrets
from pathlib import Path

import yaml

from ..files import write_yaml

log = logging.getLogger(__name__)

# history column -> TensorBoard tag
TAGS = {
    "train_loss": "loss/train", "test_loss": "loss/validation", "learning_rate": "learning_rate",
    "grad_norm": "grad_norm", "time_data": "time/data", "time_compute": "time/compute", "time_test": "time/validation",
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
        for key, tag in TAGS.items():
            self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({tag: row[key] for key, tag in TAGS.items()} | {"epoch": row["epoch"]},
                               step=row["epoch"])

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
