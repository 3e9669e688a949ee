"""The TensorFlow backend (`model.type: gaussian_regression`): a Keras network that predicts a
mean and an uncertainty for every label, as dnn_reco does, trained by the same runner.

Only this module imports TensorFlow; a torch run never does. Batches come from the same
sources as for the flow (torch tensors on the CPU), so the data, its order and its noise
are the same for both backends. With TF's op determinism and a fixed thread count, a
resumed stage equals an uninterrupted one bit for bit on CPU.
"""

import json
import math
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from .. import problem  # noqa: E402
from ..files import atomic_path  # noqa: E402
from ..training.optim import EarlyStopping, LearningRate, batch_mean  # noqa: E402

# sigma = softplus(raw) + MIN_SIGMA: never zero, and unlike a squashed log sigma it has no flat
# region where a network that started with too wide a sigma stops learning.
MIN_SIGMA = 1e-3


def configure(threads, seed):
    """Deterministic TensorFlow on `threads` CPU threads, Keras weights seeded by `seed`.

    Must run before TensorFlow executes its first operation."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised in this process (tests): keep its threads
        pass
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed % 2**32)


def label_weights(config):
    """problem.label_weights as a float32 array for the loss."""
    return np.array(problem.label_weights(config), dtype=np.float32)


def gaussian_nll(theta, mean, log_sigma, weights):
    """Mean over the batch of sum_p w_p (2 log sigma_p + ((theta_p - mean_p) / sigma_p)^2).

    Labels of weight 0 enter with zero residual and zero log sigma, so whatever the network
    predicts for them, neither the loss nor its gradient can become NaN."""
    used = weights > 0
    delta = tf.where(used, theta - mean, 0.0)
    log_sigma = tf.where(used, log_sigma, 0.0)
    per_label = 2.0 * log_sigma + tf.square(delta) * tf.exp(-2.0 * log_sigma)
    return tf.reduce_mean(tf.reduce_sum(weights * per_label, axis=1))


@keras.saving.register_keras_serializable(package="stagewise")
class RegressionModel(keras.Model):
    """(inputs (B, C, 2F or K), ASD features (B, A)) -> (mean (B, P), log sigma (B, P)) in network space,
    with sigma = softplus(raw) + MIN_SIGMA.

    The first layer projects each channel onto K basis vectors (seeded by the SVD, can be
    frozen), divided by a fixed scale set from data, then residual blocks as in the torch
    embedding. `info` (settings, fingerprint, history, provenance) travels in the .keras file.
    """

    def __init__(self, architecture, info=None, **kwargs):
        super().__init__(**kwargs)
        # As JSON text: Keras would wrap dict attributes into tracked objects that cannot be pickled.
        self._architecture, self._info = json.dumps(architecture), json.dumps(info or {})
        a = self.architecture
        channels, width, size = a["num_detectors"], a["num_inputs"], a["svd_size"]
        self.svd_weight = self.add_weight(shape=(channels, size, width), name="svd_weight",
                                          initializer=keras.initializers.RandomNormal(stddev=width**-0.5))
        self.projection_scale = self.add_weight(shape=(channels * size,), name="projection_scale",
                                                initializer="ones", trainable=False)
        widths = [*a["embedding"]["hidden_dims"], a["embedding"]["output_dim"]]
        self.blocks = []
        previous = channels * size + a["num_asd_features"]
        for i, out in enumerate(widths):
            skip = None if previous == out else keras.layers.Dense(out, use_bias=False, name=f"skip_{i}")
            self.blocks.append((keras.layers.Dense(out, name=f"inner_{i}"), keras.layers.Dense(out, name=f"outer_{i}"),
                                skip))
            previous = out
        # Starts at mean 0 and sigma 1 for every event (the trafo's scale): a loss near the number of
        # labels, where a random head gives some events a tiny sigma and a loss in the thousands.
        count = a["num_parameters"]
        self.head = keras.layers.Dense(2 * count, name="head", kernel_initializer="zeros", bias_initializer=(
            keras.initializers.Constant([0.0] * count + [float(np.log(np.expm1(1.0 - MIN_SIGMA)))] * count)))

    def project(self, inputs):
        flat = tf.reshape(inputs, (tf.shape(inputs)[0], self.architecture["num_detectors"], -1))
        coefficients = tf.einsum("bdi,dki->bdk", flat, self.svd_weight)
        return tf.reshape(coefficients, (tf.shape(inputs)[0], -1))

    def call(self, inputs):
        strain, features = inputs
        x = tf.concat([self.project(strain) / self.projection_scale, features], axis=1)
        for inner, outer, skip in self.blocks:
            x = (x if skip is None else skip(x)) + outer(tf.nn.elu(inner(tf.nn.elu(x))))
        mean, raw = tf.split(self.head(tf.nn.elu(x)), 2, axis=1)
        return mean, tf.math.log(tf.nn.softplus(raw) + MIN_SIGMA)

    @property
    def architecture(self):
        return json.loads(self._architecture)

    @property
    def info(self):
        return json.loads(self._info)

    @info.setter
    def info(self, value):
        self._info = json.dumps(value)

    def get_config(self):
        return {**super().get_config(), "architecture": self.architecture, "info": self.info}

    def build_all(self):
        """Create every variable by running a batch of zeros."""
        a = self.architecture
        self((tf.zeros((1, a["num_detectors"], a["num_inputs"])), tf.zeros((1, a["num_asd_features"]))))

    def seed_svd(self, bases):
        self.svd_weight.assign(np.stack([np.asarray(b, dtype=np.float32).T for b in bases]))

    def freeze_svd(self, frozen):
        self.svd_weight.trainable = not frozen


def new_regression_model(architecture):
    model = RegressionModel(architecture)
    model.build_all()
    return model


def save_model(model, path, info):
    """The model as a .keras file (atomic), with `info` in its config."""
    model.info = info
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def load_model(path):
    """A RegressionModel from a .keras file; ValueError naming the file when it cannot be read."""
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as err:  # Keras raises many kinds for a damaged or foreign file
        raise ValueError(f"{path}: unreadable Keras model ({type(err).__name__}: {err})") from None
    if not isinstance(model, RegressionModel):
        raise ValueError(f"{path}: not a stagewise regression model")
    return model


def to_tf(batch):
    """A batch of torch tensors (theta, inputs, ASD features) as float32 TensorFlow tensors."""
    return [tf.convert_to_tensor(part.detach().cpu().numpy(), dtype=tf.float32) for part in batch]


OPTIMIZER_ARGUMENTS = {"betas": None, "eps": "epsilon", "weight_decay": "weight_decay", "amsgrad": "amsgrad",
                       "momentum": "momentum", "nesterov": "nesterov"}


def make_optimizer(settings):
    """The Keras optimizer of a stage (its weight_decay is Keras' decoupled decay for all three)."""
    options = {k: v for k, v in settings["optimizer"].items() if k not in ("type", "learning_rate")}
    if "dampening" in options:
        raise ValueError("optimizer.dampening: Keras' SGD has no dampening (model.type gaussian_regression)")
    arguments = {}
    for key, value in options.items():
        if key == "betas":
            arguments["beta_1"], arguments["beta_2"] = value
        else:
            arguments[OPTIMIZER_ARGUMENTS[key]] = value
    kind = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD}
    return kind[settings["optimizer"]["type"]](learning_rate=settings["optimizer"]["learning_rate"], **arguments)


class KerasLearningRate(LearningRate):
    """The learning-rate schedule of training.optim, setting a Keras optimizer's rate."""

    def _base_rates(self):
        return [float(self.optimizer.learning_rate.numpy())]

    def _apply(self):
        self.optimizer.learning_rate.assign(self.base[0] * self.factor(self.state["epoch"]))


class KerasRecipe:
    """A RegressionModel and what updates it, with the interface runner.run_stage expects."""

    def __init__(self, model, settings, weights):
        self.model, self.weights_per_label = model, tf.constant(weights)
        self.optimizer = make_optimizer(settings)
        self.optimizer.build(model.trainable_variables)  # before any restore: its variables must exist
        self.learning_rate = KerasLearningRate(self.optimizer, settings["scheduler"], settings["epochs"])
        self.clip = settings["gradient_clip"]
        self.early_stopping = None if settings["early_stopping"] is None else EarlyStopping(settings["early_stopping"])

    def loss(self, theta, strain, features):
        mean, log_sigma = self.model((strain, features))
        return gaussian_nll(theta, mean, log_sigma, self.weights_per_label)

    @tf.function(reduce_retracing=True)
    def _gradients(self, theta, strain, features):
        with tf.GradientTape() as tape:
            loss = self.loss(theta, strain, features)
        gradients = tape.gradient(loss, self.model.trainable_variables)
        return loss, gradients, tf.linalg.global_norm(gradients)

    @tf.function(reduce_retracing=True)
    def _apply(self, gradients, norm):
        if self.clip is not None and self.clip["type"] == "norm":
            gradients, _ = tf.clip_by_global_norm(gradients, self.clip["max"], use_norm=norm)
        elif self.clip is not None:
            gradients = [tf.clip_by_value(g, -self.clip["max"], self.clip["max"]) for g in gradients]
        self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))

    def train_step(self, batch):
        loss, gradients, norm = self._gradients(*to_tf(batch))
        loss = float(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss}")
        self._apply(gradients, norm)
        return loss, float(norm)

    def validation_loss(self, batches):
        return batch_mean(lambda batch: float(self.loss(*to_tf(batch))), batches)

    def current_learning_rate(self):
        return float(self.optimizer.learning_rate.numpy())

    def end_epoch(self, validation_loss):
        self.learning_rate.step(validation_loss)

    def weights(self):
        return [w.copy() for w in self.model.get_weights()]

    def state_dict(self):
        return {"model": self.weights(), "recipe": {
            "optimizer": [v.numpy() for v in self.optimizer.variables],
            "learning_rate": self.learning_rate.state_dict(),
            "early_stopping": None if self.early_stopping is None else self.early_stopping.state_dict(),
        }}

    def load_state_dict(self, state):
        self.model.set_weights(state["model"])
        recipe = state["recipe"]
        for variable, value in zip(self.optimizer.variables, recipe["optimizer"], strict=True):
            variable.assign(value)
        self.learning_rate.load_state_dict(recipe["learning_rate"])
        if self.early_stopping is not None:
            self.early_stopping.load_state_dict(recipe["early_stopping"])
