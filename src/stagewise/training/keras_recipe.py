"""How a stage updates the weights of the TensorFlow backend's model: the Keras optimizer, the
learning-rate schedule of training.optim, gradient clipping and early stopping, with the
interface runner.run_stage expects (runner.Recipe)."""

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..config import Settings
from ..models.regression import RegressionModel, gaussian_nll, keras, tf, to_tf  # TensorFlow as configured there
from .optim import EarlyStopping, LearningRate, batch_mean

# torch's name of an optimizer argument -> Keras' (betas become beta_1 and beta_2)
KERAS_ARGUMENT_NAMES = {"eps": "epsilon", "weight_decay": "weight_decay", "amsgrad": "amsgrad",
                        "momentum": "momentum", "nesterov": "nesterov"}
KERAS_OPTIMIZERS = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD}


def keras_optimizer(settings: Settings) -> keras.optimizers.Optimizer:
    """The Keras optimizer of a stage (its weight_decay is Keras' decoupled decay for all three).
    config.validate has refused the one argument Keras lacks (SGD's dampening)."""
    arguments: dict[str, Any] = {}
    for key, value in settings["optimizer"].items():
        if key == "betas":
            arguments["beta_1"], arguments["beta_2"] = value
        elif key not in ("type", "learning_rate"):
            arguments[KERAS_ARGUMENT_NAMES[key]] = value
    kind = KERAS_OPTIMIZERS[settings["optimizer"]["type"]]
    return kind(learning_rate=settings["optimizer"]["learning_rate"], **arguments)


class KerasLearningRate(LearningRate):
    """The learning-rate schedule of training.optim, setting a Keras optimizer's rate."""

    optimizer: Any  # a keras.optimizers.Optimizer

    def _base_rates(self) -> list[float]:
        return [float(self.optimizer.learning_rate.numpy())]

    def _apply(self) -> None:
        self.optimizer.learning_rate.assign(self.base[0] * self.factor(self.state["epoch"]))


class KerasRecipe:
    """A RegressionModel and what updates it, with the interface runner.run_stage expects."""

    model: RegressionModel
    weights_per_label: tf.Tensor  # float32 (P,), the loss weight of each label
    optimizer: keras.optimizers.Optimizer
    learning_rate: KerasLearningRate
    clip: Settings | None  # the stage's gradient_clip
    early_stopping: EarlyStopping | None

    def __init__(self, model: RegressionModel, settings: Settings, label_weights: Sequence[float]) -> None:
        self.model, self.weights_per_label = model, tf.constant(np.asarray(label_weights, dtype=np.float32))
        self.optimizer = keras_optimizer(settings)
        self.optimizer.build(model.trainable_variables)  # before any restore: its variables must exist
        self.learning_rate = KerasLearningRate(self.optimizer, settings["scheduler"], settings["epochs"])
        self.clip = settings["gradient_clip"]
        self.early_stopping = None if settings["early_stopping"] is None else EarlyStopping(settings["early_stopping"])

    def loss(self, theta: tf.Tensor, strain: tf.Tensor, features: tf.Tensor) -> tf.Tensor:
        mean, log_sigma = self.model((strain, features))
        return gaussian_nll(theta, mean, log_sigma, self.weights_per_label)

    @tf.function(reduce_retracing=True)
    def _gradients(self, theta: tf.Tensor, strain: tf.Tensor,
                   features: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor], tf.Tensor]:
        with tf.GradientTape() as tape:
            loss = self.loss(theta, strain, features)
        gradients = tape.gradient(loss, self.model.trainable_variables)
        return loss, gradients, tf.linalg.global_norm(gradients)

    @tf.function(reduce_retracing=True)
    def _apply(self, gradients: list[tf.Tensor], norm: tf.Tensor) -> None:
        if self.clip is not None and self.clip["type"] == "norm":
            gradients, _ = tf.clip_by_global_norm(gradients, self.clip["max"], use_norm=norm)
        elif self.clip is not None:
            gradients = [tf.clip_by_value(g, -self.clip["max"], self.clip["max"]) for g in gradients]
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables, strict=True))

    def train_step(self, batch: Sequence[torch.Tensor]) -> tuple[float, float]:
        loss, gradients, norm = self._gradients(*to_tf(batch))
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss}")
        self._apply(gradients, norm)
        return loss, float(norm)

    def validation_loss(self, batches: Iterable[Sequence[torch.Tensor]]) -> float:
        return batch_mean(lambda batch: float(self.loss(*to_tf(batch))), batches)

    def current_learning_rate(self) -> float:
        return float(self.optimizer.learning_rate.numpy())

    def end_epoch(self, validation_loss: float) -> None:
        self.learning_rate.step(validation_loss)

    def weights(self) -> list[np.ndarray]:
        return [w.copy() for w in self.model.get_weights()]

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.weights(), "recipe": {
            "optimizer": [v.numpy() for v in self.optimizer.variables],
            "learning_rate": self.learning_rate.state_dict(),
            "early_stopping": None if self.early_stopping is None else self.early_stopping.state_dict(),
        }}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.set_weights([np.asarray(w) for w in state["model"]])  # tensors in a checkpoint file
        recipe = state["recipe"]
        for variable, value in zip(self.optimizer.variables, recipe["optimizer"], strict=True):
            variable.assign(np.asarray(value))
        self.learning_rate.load_state_dict(recipe["learning_rate"])
        if self.early_stopping is not None:
            self.early_stopping.load_state_dict(recipe["early_stopping"])
