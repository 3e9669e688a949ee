"""How a stage updates its weights: optimizer, learning-rate schedule, gradient clipping,
EMA of the weights and early stopping, each built from the stage's settings and each
with a state that a checkpoint saves and restores."""

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import Settings, scheduler_with_defaults
from .ranks import ONE_PROCESS, Ranks, ShardLoss

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def torch_optimizer(model: torch.nn.Module, settings: Settings) -> torch.optim.Optimizer:
    """The stage's optimizer over the trainable parameters. Adam and AdamW use torch's fused
    kernels: one pass over all parameters instead of several per tensor (15 % of a default
    training step was the unfused update)."""
    options = dict(settings["optimizer"])
    kind, learning_rate = options.pop("type"), options.pop("learning_rate")
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if kind in ("adam", "adamw") else {}
    return OPTIMIZERS[kind](trainable, lr=learning_rate, **options, **fused)


def batch_mean(loss: Callable[[Any], float], batches: Iterable[Sequence[Any]], ranks: Ranks = ONE_PROCESS) -> float:
    """The mean of loss(batch) over `batches`, each weighted by its size (the last may be short);
    with several ranks each takes its share of every batch and the sums are added up."""
    total, count = 0.0, 0
    for batch in batches:
        shard = ranks.shard(batch)
        if len(shard[0]):
            total += loss(shard) * len(shard[0])
        count += len(batch[0])
    return ranks.sum([total])[0] / count


class LearningRate:
    """The learning rate of each epoch: an optional linear warm-up, then the scheduler.

    Epoch e (1, 2, ...) of W warm-up epochs trains at base * e / (W + 1); the scheduler
    then counts epochs from the end of the warm-up. `reduce_on_plateau` multiplies the
    rate by `factor` when the validation loss has not improved by more than `threshold`
    (relative) for more than `patience` epochs. `step` is called after each epoch.
    """

    optimizer: torch.optim.Optimizer
    settings: Settings  # the stage's scheduler settings, their defaults filled in
    base: list[float]  # the base rate of each parameter group
    warmup: int  # warm-up epochs
    main_epochs: int  # epochs after the warm-up
    state: dict[str, Any]  # epoch, plateau_factor, best, bad_epochs: what a checkpoint keeps

    def __init__(self, optimizer: torch.optim.Optimizer, settings: Settings, epochs: int) -> None:
        self.optimizer = optimizer
        self.settings = scheduler_with_defaults(settings)
        self.base = self._base_rates()
        self.warmup = self.settings["warmup_epochs"]
        self.main_epochs = epochs - self.warmup
        self.state = {"epoch": 0, "plateau_factor": 1.0, "best": None, "bad_epochs": 0}
        self._apply()

    def factor(self, epoch: int) -> float:
        """The factor on the base rate while training epoch `epoch + 1` (epoch = epochs done)."""
        s = self.settings
        if epoch < self.warmup:
            return (epoch + 1) / (self.warmup + 1)
        t = epoch - self.warmup
        kind = s["type"]
        if kind == "cosine":
            return s["min_factor"] + (1 - s["min_factor"]) * 0.5 * (1 + math.cos(math.pi * t / self.main_epochs))
        if kind == "step":
            return s["gamma"] ** (t // s["step_size"])
        if kind == "exponential":
            return s["gamma"] ** t
        if kind == "reduce_on_plateau":
            return self.state["plateau_factor"]
        return 1.0

    def step(self, validation_loss: float) -> None:
        state = self.state
        state["epoch"] += 1
        if self.settings["type"] == "reduce_on_plateau" and state["epoch"] > self.warmup:
            best = state["best"]
            if best is None or validation_loss < best - self.settings["threshold"] * abs(best):
                state["best"], state["bad_epochs"] = validation_loss, 0
            else:
                state["bad_epochs"] += 1
                if state["bad_epochs"] > self.settings["patience"]:
                    state["plateau_factor"] *= self.settings["factor"]
                    state["bad_epochs"] = 0
        self._apply()

    def _base_rates(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _apply(self) -> None:
        factor = self.factor(self.state["epoch"])
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * factor

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)
        self._apply()


def clip_gradients(parameters: Iterable[torch.nn.Parameter], settings: Settings | None) -> float:
    """Clip by norm or by value as `settings` ({type: norm | value, max}, or None) says; return the
    gradients' total norm before clipping."""
    parameters = [p for p in parameters if p.grad is not None]
    if settings is not None and settings["type"] == "norm":
        return torch.nn.utils.clip_grad_norm_(parameters, settings["max"]).item()
    norm = torch.nn.utils.clip_grad_norm_(parameters, math.inf).item()
    if settings is not None:
        torch.nn.utils.clip_grad_value_(parameters, settings["max"])
    return norm


def make_ema(model: torch.nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of the weights (and buffers), or None when decay is None."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class EarlyStopping:
    """Stop a stage when `metric` has not improved by more than `min_delta` for `patience` epochs."""

    settings: Settings  # the stage's early_stopping: metric, mode, min_delta, patience
    state: dict[str, Any]  # best, bad_epochs: what a checkpoint keeps

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = {"best": None, "bad_epochs": 0}

    def update(self, row: Mapping[str, Any]) -> bool:
        """Take one epoch's history row; True when the stage should stop."""
        value, best = row[self.settings["metric"]], self.state["best"]
        sign = 1 if self.settings["mode"] == "min" else -1
        if best is None or sign * (best - value) > self.settings["min_delta"]:
            self.state.update(best=value, bad_epochs=0)
        else:
            self.state["bad_epochs"] += 1
        return self.state["bad_epochs"] >= self.settings["patience"]

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)


class TorchRecipe:
    """A torch model and everything that updates its weights in one stage: what the runner trains,
    validates and checkpoints (runner.Recipe). With several ranks (ranks.py) each trains on its share of
    every batch, through DistributedDataParallel, and the losses are those of the whole batch."""

    model: Any  # a torch.nn.Module with loss(*batch) -> scalar tensor, e.g. models.posterior.PosteriorModel
    ranks: Ranks
    parallel: DistributedDataParallel | None  # the loss of a shard through DDP, when there is a process group
    optimizer: torch.optim.Optimizer
    learning_rate: LearningRate
    clip: Settings | None  # the stage's gradient_clip
    ema: AveragedModel | None
    early_stopping: EarlyStopping | None

    def __init__(self, model: torch.nn.Module, settings: Settings, ranks: Ranks = ONE_PROCESS) -> None:
        self.model, self.ranks = model, ranks
        self.parallel = None
        if ranks.supervised:
            device_ids = [torch.device(ranks.device)] if ranks.device.startswith("cuda") else None
            self.parallel = DistributedDataParallel(ShardLoss(model), device_ids=device_ids, forward_sync_buffers=False,
                                                    gradient_as_bucket_view=True)
        self.optimizer = torch_optimizer(model, settings)
        self.learning_rate = LearningRate(self.optimizer, settings["scheduler"], settings["epochs"])
        self.clip = settings["gradient_clip"]
        self.ema = make_ema(model, settings["ema_decay"])
        self.early_stopping = None if settings["early_stopping"] is None else EarlyStopping(settings["early_stopping"])

    @property
    def evaluated(self) -> torch.nn.Module:
        """The weights that are validated and become the stage model: the EMA when there is one."""
        return self.model if self.ema is None else self.ema.module

    def current_learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, batch: Sequence[torch.Tensor]) -> tuple[float, float]:
        """One optimizer step; (loss, gradient norm before clipping). FloatingPointError on a non-finite loss."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.parallel is not None:
            shard = self.ranks.shard(batch)
            loss = self.parallel(*shard) * self.ranks.weight(len(shard[0]), len(batch[0]))
        else:
            loss = self.model.loss(*batch)
        value = self.ranks.sum([loss.item()])[0] / self.ranks.size  # one host sync checks and returns the loss
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value}")
        loss.backward()
        grad_norm = clip_gradients(self.model.parameters(), self.clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return value, grad_norm

    @torch.no_grad()
    def validation_loss(self, batches: Iterable[Sequence[torch.Tensor]]) -> float:
        model: Any = self.evaluated  # a module with loss(), as self.model
        model.eval()
        return batch_mean(lambda batch: model.loss(*batch).item(), batches, self.ranks)

    def end_epoch(self, validation_loss: float) -> None:
        self.learning_rate.step(validation_loss)

    def weights(self) -> dict[str, torch.Tensor]:
        """The validated weights, as the stage model file stores them."""
        return self.evaluated.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "recipe": {
            "optimizer": self.optimizer.state_dict(), "learning_rate": self.learning_rate.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "early_stopping": None if self.early_stopping is None else self.early_stopping.state_dict(),
        }}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        recipe = state["recipe"]
        self.optimizer.load_state_dict(recipe["optimizer"])
        self.learning_rate.load_state_dict(recipe["learning_rate"])
        for part in ("ema", "early_stopping"):
            if getattr(self, part) is not None:
                getattr(self, part).load_state_dict(recipe[part])
