"""Where and how training runs: the distribution strategy, the dtype policy, op determinism and XLA.

- One machine: ``MirroredStrategy`` over its GPUs when it has several (or over several logical CPU devices, as
  the tests configure them), else TensorFlow's default strategy. ``train.batch_size`` is the batch of one
  replica: the global batch is ``batch_size × replicas`` (the learning rate is not scaled).
- Several machines (``TF_CONFIG`` set): refused at once. Keras 3's ``Model.fit`` does not run under
  ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585, open since TensorFlow 2.16); scaling out is Optuna
  workers on several machines sharing one study (``kfer tune --storage postgresql://…``).
- ``train.mixed_precision``: the global Keras policy while training (``mixed_float16`` / ``mixed_bfloat16``);
  the softmax and the served model are float32 (:func:`float32_config`).
- ``train.deterministic``: TensorFlow op determinism on or off for the process; ``train.xla`` needs it off.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kfer.config import Params
from kfer.errors import UserError

log = logging.getLogger(__name__)

MULTI_MACHINE_REFUSAL = (
    "TF_CONFIG is set, but kfer does not train across machines: Keras 3's Model.fit does not run under "
    "MultiWorkerMirroredStrategy (keras-team/keras#20585). Unset TF_CONFIG and train on one machine (all its GPUs "
    "are used), or scale out tuning with kfer tune workers on several machines sharing one --storage."
)


def refuse_multi_machine() -> None:
    if os.environ.get("TF_CONFIG"):
        raise UserError(MULTI_MACHINE_REFUSAL)


def strategy(params: Params):  # noqa: ARG001 - one signature for every caller; params may choose one day
    """The strategy for this process, made before any dataset: Mirrored over ≥ 2 GPUs (or ≥ 2 logical CPUs when
    no GPU is visible), else the default one. Raises :class:`UserError` when ``TF_CONFIG`` asks for several
    machines."""
    refuse_multi_machine()
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()


def global_batch(params: Params, strat) -> int:
    return params.train.batch_size * int(strat.num_replicas_in_sync)


def set_policy(params: Params) -> str:
    """Set the global Keras dtype policy for training; returns its name."""
    import keras
    import tensorflow as tf

    mp = params.train.mixed_precision
    name = f"mixed_{mp}" if mp else "float32"
    if mp == "float16" and not tf.config.list_physical_devices("GPU"):
        log.warning("train.mixed_precision float16 without a GPU: it runs, but slower than float32 on a CPU")
    keras.mixed_precision.set_global_policy(name)
    return name


def reset_policy() -> None:
    import keras

    keras.mixed_precision.set_global_policy("float32")


def set_determinism(params: Params) -> None:
    """TensorFlow op determinism on (``train.deterministic``) or off; it is a process-wide switch."""
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    if params.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    elif tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()


def float32_config(config: Any) -> Any:
    """A Keras model config with every mixed dtype policy replaced by float32 (weights are float32 already)."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy" and str(config.get("config", {}).get("name", "")).startswith(
                "mixed_"):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {k: float32_config(v) for k, v in config.items()}
    if isinstance(config, list):
        return [float32_config(v) for v in config]
    return config
