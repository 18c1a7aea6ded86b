"""The custom ResNet50 of the original project, built from Keras layers.

ResNet50 v1 (as ``keras.applications.ResNet50``): a 7×7/2 stem, 3×3/2 max-pool, bottleneck stages
``blocks = [3, 4, 6, 3]`` of widths ``base_width·2^i`` (expansion 4) with projection shortcuts on the first block
of each stage, global average pooling. The original's changes: a configurable ``kernel_initializer``
(``he_normal`` instead of Keras' ``glorot_uniform``) and an extra Dense head (512, ReLU) before the softmax.
Input is (S, S, 1) grayscale in [0, 255]; the model rescales it itself, so callers feed raw pixels.

With the default depth and width the backbone has exactly the parameters of
``keras.applications.ResNet50(weights=None)`` for the same input (a test checks the count). ``blocks`` and
``base_width`` make small variants for tests and demos. Knows nothing about MLflow or files.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

BN_EPS = 1.001e-5  # as keras.applications.resnet
BN_MOMENTUM = 0.99  # Keras' default; small datasets converge their moving statistics faster with 0.9


def _bottleneck(x, filters: int, stride: int, project: bool, init: str, name: str, momentum: float):
    if project:
        shortcut = layers.Conv2D(4 * filters, 1, strides=stride, kernel_initializer=init, name=f"{name}_0_conv")(x)
        shortcut = layers.BatchNormalization(epsilon=BN_EPS, momentum=momentum, name=f"{name}_0_bn")(shortcut)
    else:
        shortcut = x
    x = layers.Conv2D(filters, 1, strides=stride, kernel_initializer=init, name=f"{name}_1_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPS, momentum=momentum, name=f"{name}_1_bn")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = layers.Conv2D(filters, 3, padding="same", kernel_initializer=init, name=f"{name}_2_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPS, momentum=momentum, name=f"{name}_2_bn")(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = layers.Conv2D(4 * filters, 1, kernel_initializer=init, name=f"{name}_3_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPS, momentum=momentum, name=f"{name}_3_bn")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def build_resnet(
    image_size: int,
    num_classes: int,
    kernel_initializer: str = "he_normal",
    head_units: int = 512,
    head_dropout: float = 0.0,
    blocks: Sequence[int] = (3, 4, 6, 3),
    base_width: int = 64,
    channels: int = 1,
    seed: int | None = None,
    bn_momentum: float = BN_MOMENTUM,
    stem: str = "imagenet",
) -> keras.Model:
    """Build the (uncompiled) classifier. ``head_units = 0`` means no extra Dense layer.

    ``stem`` "imagenet" is ResNet50's (7×7/2 conv, 3×3/2 max-pool: the first stage sees S/4); "compact" a 3×3/2
    conv without pooling (the first stage sees S/2: for 48–64 px faces, whose detail the ImageNet stem discards).

    ``seed`` makes the initial weights reproducible (it seeds Keras' global generator before building).
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    init, momentum = kernel_initializer, bn_momentum
    inputs = keras.Input((image_size, image_size, channels), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    if stem == "imagenet":
        x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
        x = layers.Conv2D(base_width, 7, strides=2, kernel_initializer=init, name="conv1_conv")(x)
    elif stem == "compact":
        x = layers.Conv2D(base_width, 3, strides=2, padding="same", kernel_initializer=init, name="conv1_conv")(x)
    else:
        raise ValueError(f"stem must be imagenet or compact, got {stem!r}")
    x = layers.BatchNormalization(epsilon=BN_EPS, momentum=momentum, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    if stem == "imagenet":
        x = layers.ZeroPadding2D(1, name="pool1_pad")(x)
        x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, n in enumerate(blocks):
        filters = base_width * 2**stage
        for b in range(n):
            stride = (1 if stage == 0 else 2) if b == 0 else 1
            x = _bottleneck(x, filters, stride, project=b == 0, init=init,
                            name=f"conv{stage + 2}_block{b + 1}", momentum=momentum)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if head_units:
        x = layers.Dense(head_units, activation="relu", kernel_initializer=init, name="head")(x)
        if head_dropout:
            x = layers.Dropout(head_dropout, name="head_dropout")(x)
    # float32 softmax keeps mixed-precision training numerically safe
    outputs = layers.Dense(num_classes, activation="softmax", kernel_initializer=init, dtype="float32",
                           name="predictions")(x)
    depth = 2 + 3 * sum(blocks)
    return keras.Model(inputs, outputs, name=f"kfer_resnet{depth}")


def build_from_params(params, seed: int | None = None) -> keras.Model:
    m = params.model
    return build_resnet(
        params.crop.image_size, len(params.classes), m.kernel_initializer, m.head_units, m.head_dropout,
        m.blocks, m.base_width, channels=1 if params.crop.grayscale else 3,
        seed=params.seed if seed is None else seed, bn_momentum=m.bn_momentum, stem=m.stem,
    )
