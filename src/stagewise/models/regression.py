"""The TensorFlow backend's network (`model.type: gaussian_regression`): a Keras model that
predicts a mean and an uncertainty for every label, as dnn_reco does, its loss and its file.
training.keras_recipe trains it with the same runner as the flow.

Only this module and training.keras_recipe import TensorFlow; a torch run never does. Batches come from the same
sources as for the flow (torch tensors on the CPU), so the data, its order and its noise
are the same for both backends. With TF's op determinism and a fixed thread count, a
resumed stage equals an uninterrupted one bit for bit on CPU.
"""

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ..files import UnsafeFile, atomic_path  # noqa: E402

if TYPE_CHECKING:
    import torch  # only for to_tf's annotation: importing this module must not change what is loaded

# sigma = softplus(raw) + MIN_SIGMA: never zero, and unlike a squashed log sigma it has no flat
# region where a network that started with too wide a sigma stops learning.
MIN_SIGMA = 1e-3


def configure(threads: int, seed: int) -> None:
    """Deterministic TensorFlow on `threads` CPU threads, Keras weights seeded by `seed`.

    Must run before TensorFlow executes its first operation."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised in this process (tests): keep its threads
        pass
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(seed % 2**32)


def gaussian_nll(theta: tf.Tensor, mean: tf.Tensor, log_sigma: tf.Tensor, weights: tf.Tensor | np.ndarray) -> tf.Tensor:
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

    svd_weight: keras.Variable  # (C, K, 2F or K)
    projection_scale: keras.Variable  # (C * K,), not trainable
    blocks: list[tuple[keras.layers.Dense, keras.layers.Dense, keras.layers.Dense | None]]  # (inner, outer, skip)
    head: keras.layers.Dense

    def __init__(self, architecture: Mapping[str, Any], info: dict[str, Any] | None = None, **kwargs: Any) -> None:
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

    def project(self, inputs: tf.Tensor) -> tf.Tensor:
        flat = tf.reshape(inputs, (tf.shape(inputs)[0], self.architecture["num_detectors"], -1))
        coefficients = tf.einsum("bdi,dki->bdk", flat, self.svd_weight)
        return tf.reshape(coefficients, (tf.shape(inputs)[0], -1))

    def call(self, inputs: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        strain, features = inputs
        x = tf.concat([self.project(strain) / self.projection_scale, features], axis=1)
        for inner, outer, skip in self.blocks:
            x = (x if skip is None else skip(x)) + outer(tf.nn.elu(inner(tf.nn.elu(x))))
        mean, raw = tf.split(self.head(tf.nn.elu(x)), 2, axis=1)
        return mean, tf.math.log(tf.nn.softplus(raw) + MIN_SIGMA)

    @property
    def architecture(self) -> dict[str, Any]:
        return json.loads(self._architecture)

    @property
    def info(self) -> dict[str, Any]:
        return json.loads(self._info)

    @info.setter
    def info(self, value: dict[str, Any]) -> None:
        self._info = json.dumps(value, default=lambda array: array.tolist())  # tensors (the inference bundle)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "architecture": self.architecture, "info": self.info}

    def build_all(self) -> None:
        """Create every variable by running a batch of zeros."""
        a = self.architecture
        self((tf.zeros((1, a["num_detectors"], a["num_inputs"])), tf.zeros((1, a["num_asd_features"]))))

    def seed_svd(self, bases: Sequence[np.ndarray]) -> None:
        self.svd_weight.assign(np.stack([np.asarray(b, dtype=np.float32).T for b in bases]))

    def freeze_svd(self, frozen: bool) -> None:
        self.svd_weight.trainable = not frozen


def new_regression_model(architecture: Mapping[str, Any]) -> RegressionModel:
    model = RegressionModel(architecture)
    model.build_all()
    return model


def save_regression_model(model: RegressionModel, path: str | Path, info: dict[str, Any]) -> None:
    """The model as a .keras file (atomic), with `info` in its config."""
    model.info = info
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def load_regression_model(path: str | Path) -> RegressionModel:
    """A RegressionModel from a .keras file, loaded in Keras' safe mode, which builds no Python code
    (a Lambda layer's function) from the file: UnsafeFile for such a file, ValueError naming the file
    when it cannot be read."""
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as err:
        if "safe_mode" in str(err):
            raise UnsafeFile(f"{path}: refused by Keras' safe mode: {str(err).split('. ')[0]}; a stagewise "
                             "model holds no Python code, and nothing from this one was run") from None
        raise ValueError(f"{path}: unreadable Keras model (ValueError: {err})") from None
    except Exception as err:  # Keras raises many kinds for a damaged or foreign file
        raise ValueError(f"{path}: unreadable Keras model ({type(err).__name__}: {err})") from None
    if not isinstance(model, RegressionModel):
        raise ValueError(f"{path}: not a stagewise regression model")
    return model


def to_tf(batch: "Sequence[torch.Tensor]") -> list[tf.Tensor]:
    """A batch of torch tensors (theta, inputs, ASD features) as float32 TensorFlow tensors."""
    return [tf.convert_to_tensor(part.detach().cpu().numpy(), dtype=tf.float32) for part in batch]
