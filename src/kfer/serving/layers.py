"""The Keras objects every model kfer saves needs to load again: the flip test-time augmentation (a layer) and
the macro-F1 metric that checkpoints are compiled with. Importing this module registers them with Keras
(package ``kfer``), so ``keras.saving.load_model`` finds them by name wherever the model was built."""

from __future__ import annotations

import keras
from keras import layers


@keras.saving.register_keras_serializable(package="kfer")
class MacroF1(keras.metrics.F1Score):
    """Macro-F1 over the classes that occur in the evaluated data (a class with no support is left out,
    not counted as 0: with 7 classes and a dataset lacking one, plain macro-F1 could never exceed 6/7)."""

    def __init__(self, name="macro_f1", **kwargs):
        kwargs.pop("average", None)
        super().__init__(average=None, name=name, **kwargs)

    def result(self):
        per_class = super().result()
        support = self.true_positives + self.false_negatives
        mask = keras.ops.cast(support > 0, per_class.dtype)
        return keras.ops.sum(per_class * mask) / keras.ops.maximum(keras.ops.sum(mask), 1.0)


@keras.saving.register_keras_serializable(package="kfer")
class HorizontalFlip(layers.Layer):
    """The image mirrored left-right (always: a deterministic layer, unlike ``RandomFlip``)."""

    def call(self, x):
        return keras.ops.flip(x, axis=-2)


def with_flip_tta(model: keras.Model) -> keras.Model:
    """``model`` with horizontal-flip test-time augmentation: the mean of its softmax on the face and on the
    mirrored face. Same input and output as ``model``; its weights are shared, not copied."""
    inputs = keras.Input(model.input_shape[1:], name="image")
    plain = model(inputs)
    mirrored = model(HorizontalFlip(name="mirror")(inputs))
    return keras.Model(inputs, layers.Average(name="tta_flip", dtype="float32")([plain, mirrored]),
                       name=f"{model.name}_tta")
