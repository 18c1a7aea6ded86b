"""Why did the model say that? Grad-CAM heat maps of the predicted class on face crops, and overlays.

:func:`grad_cam` is Grad-CAM (Selvaraju et al., 2017): the gradient of the class score with respect to the
last convolutional feature map (the last layer with a 4-D output before global pooling, found by walking the
layers), averaged over space, weights that map's channels; the weighted sum, ReLU'd, is upsampled to the face
size and scaled to [0, 1]. The class score is the logit when the model ends in a softmax Dense layer (the
softmax output saturates on confident faces, and its gradient with it), else the model's output.

A model wrapped by :func:`kfer.serving.layers.with_flip_tta` is explained through its nested classifier on the face as
given (the un-mirrored branch of the test-time augmentation); the default class is still the one the wrapped
model predicts (the mean over both branches).

:func:`overlay` blends a heat map onto a face (JET colours), :func:`explain_faces` does both for a batch, and
:func:`evaluation_grid` draws the evaluate stage's ``gradcam.png``: correct and wrong test faces with their
heat maps. Used by ``kfer predict --explain`` and ``kfer evaluate``; the served model never imports this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

ALPHA = 0.4  # weight of the heat colours in an overlay; the face keeps 1 - ALPHA
BATCH = 32  # faces per gradient computation
GRID_PER_ROW = 8  # evaluate: up to this many correct and this many wrong faces
GRID_FILE = "gradcam.png"
_TINY = 1e-12  # a map whose maximum is below this (all-zero gradients, a dead feature map) is all zeros


# --- Grad-CAM ----------------------------------------------------------------------------------------
def _ends_maps(layer) -> bool:
    """Global pooling or flattening: where the spatial feature maps end."""
    import keras

    return isinstance(layer, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D,
                              keras.layers.Flatten))


def _classifier(model):
    """The model whose layers are explained: ``model`` itself, or the one nested model it wraps and calls
    (flip TTA: an outer model with no pooling of its own around one classifier)."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) == 1 and not any(_ends_maps(layer) for layer in model.layers):
        return _classifier(nested[0])
    return model


def feature_layer(model):
    """The last layer with a 4-D output (N, h, w, channels) before the first global pooling / flatten."""
    import keras

    found = None
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if _ends_maps(layer):
            break
        if len(layer.output.shape) == 4:
            found = layer
    if found is None:
        raise ValueError(f"model {model.name!r} has no layer with a 4-D output to explain")
    return found


def _score_model(model):
    """A model: input -> (feature map, class scores), and whether the scores still need the final Dense."""
    import keras

    last = model.layers[-1]
    fmap = feature_layer(model).output
    if isinstance(last, keras.layers.Dense) and getattr(last.activation, "__name__", "") == "softmax":
        return keras.Model(model.inputs, [fmap, last.input]), last  # logits computed from the Dense's input
    return keras.Model(model.inputs, [fmap, model.outputs[0]]), None


def _as_batch(faces) -> np.ndarray:
    x = np.asarray(faces, dtype=np.float32)
    if x.ndim == 3:  # (N, S, S) grayscale
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"faces must be (N, S, S) or (N, S, S, C), got shape {x.shape}")
    return x


def grad_cam(keras_model, faces_uint8, class_index=None) -> np.ndarray:
    """Grad-CAM heat maps ``float32 (N, S, S)`` in [0, 1] (1 at each map's maximum) for face crops ``(N, S, S)``
    or ``(N, S, S, C)``, raw 0..255 as the model takes them.

    ``class_index``: None = each face's class predicted by ``keras_model``; an int = that class for every face;
    a sequence = one class per face. A face whose map is zero everywhere (no positive evidence, all-zero
    gradients) gets zeros, never NaN.
    """
    import tensorflow as tf

    x = _as_batch(faces_uint8)
    n, size = len(x), x.shape[1:3]
    if n == 0:
        return np.zeros((0, *size), np.float32)
    if class_index is None:
        classes = np.concatenate([np.asarray(keras_model.predict_on_batch(x[i:i + BATCH])).argmax(axis=1)
                                  for i in range(0, n, BATCH)])
    else:
        classes = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (n,))
    n_classes = int(keras_model.output_shape[-1])
    if classes.min() < 0 or classes.max() >= n_classes:
        raise ValueError(f"class_index must be in 0..{n_classes - 1}, got {sorted(set(classes.tolist()))}")
    scorer, dense = _score_model(_classifier(keras_model))
    maps = []
    for start in range(0, n, BATCH):
        xb = tf.convert_to_tensor(x[start:start + BATCH])
        cb = tf.convert_to_tensor(classes[start:start + BATCH], dtype=tf.int32)
        with tf.GradientTape() as tape:
            tape.watch(xb)  # records every op from the input on, weights or not
            raw_fmap, scores = scorer(xb, training=False)
            scores = tf.cast(scores, tf.float32)
            if dense is not None:
                scores = tf.matmul(scores, tf.cast(dense.kernel, tf.float32))
                if dense.use_bias:
                    scores = scores + tf.cast(dense.bias, tf.float32)
            score = tf.gather(scores, cb, axis=1, batch_dims=1)
        grads = tape.gradient(score, raw_fmap)
        fmap = tf.cast(raw_fmap, tf.float32)  # mixed precision: float16 maps, float32 arithmetic
        grads = tf.zeros_like(fmap) if grads is None else tf.cast(grads, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (B, 1, 1, K)
        maps.append(tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1)).numpy().astype(np.float64))
    cams = np.concatenate(maps, axis=0)
    out = np.zeros((n, *size), np.float32)
    for i, cam in enumerate(np.nan_to_num(cams, nan=0.0, posinf=0.0, neginf=0.0)):
        up = cv2.resize(cam, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)  # linear: stays within [0, max]
        top = float(up.max())
        if top > _TINY:
            out[i] = np.clip(up / top, 0.0, 1.0)
    return out


# --- pictures ----------------------------------------------------------------------------------------
def overlay(face_gray_or_bgr, heat, alpha: float = ALPHA) -> np.ndarray:
    """A face (uint8 gray ``(S, S)``/``(S, S, 1)`` or BGR ``(S, S, 3)``) with its heat map in JET colours (blue
    0 → red 1) blended on top: ``(1 - alpha)·face + alpha·colours``, BGR uint8. The map is resized to the face."""
    face = np.asarray(face_gray_or_bgr)
    if face.ndim == 3 and face.shape[-1] == 1:
        face = face[..., 0]
    bgr = cv2.cvtColor(face.astype(np.uint8), cv2.COLOR_GRAY2BGR) if face.ndim == 2 else face.astype(np.uint8)
    h = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0)
    if h.shape != bgr.shape[:2]:
        h = cv2.resize(h, (bgr.shape[1], bgr.shape[0]), interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap(np.round(np.clip(h, 0.0, 1.0) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(bgr, 1.0 - alpha, colours, alpha, 0.0)


def explain_faces(keras_model, faces, class_index=None, alpha: float = ALPHA) -> list[np.ndarray]:
    """:func:`overlay` of :func:`grad_cam` for each face: BGR uint8 images, in order."""
    heats = grad_cam(keras_model, faces, class_index)
    return [overlay(f, h, alpha) for f, h in zip(np.asarray(faces), heats, strict=True)]


def captioned(bgr: np.ndarray, text: str, min_side: int = 192) -> np.ndarray:
    """``bgr`` enlarged by a whole factor (nearest neighbour: every model pixel stays a visible square) to at least
    ``min_side`` wide, over a white strip with ``text`` (ASCII: OpenCV's fonts have no Hangul)."""
    k = max(1, -(-min_side // bgr.shape[1]))
    big = cv2.resize(bgr, (bgr.shape[1] * k, bgr.shape[0] * k), interpolation=cv2.INTER_NEAREST)
    scale = big.shape[1] / 320.0
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    if tw > big.shape[1] - 12:  # a long label: smaller letters, never cut off
        scale *= (big.shape[1] - 12) / tw
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    strip = np.full((th + base + 12, big.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, text, (6, th + 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([big, strip], axis=0)


def pick_faces(candidates: np.ndarray, groups: np.ndarray, confidence: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` of ``candidates`` (indices), deterministically: the most confident of each group (true class)
    in turn, groups in ascending order, ties by index."""
    candidates = np.asarray(candidates, dtype=np.int64)
    order = candidates[np.lexsort((candidates, -confidence[candidates]))]
    queues = [list(order[groups[order] == g]) for g in np.unique(groups[order])]
    picked: list[int] = []
    while len(picked) < k and any(queues):
        for q in queues:
            if q and len(picked) < k:
                picked.append(int(q.pop(0)))
    return np.asarray(picked, dtype=np.int64)


def evaluation_grid(keras_model, load_face: Callable[[int], np.ndarray], y_true, y_pred, confidence,
                    labels: Sequence[str], path: str | os.PathLike, per_row: int = GRID_PER_ROW) -> Path:
    """The evaluate stage's Grad-CAM figure: up to ``per_row`` correctly and ``per_row`` wrongly classified test
    faces (:func:`pick_faces`: the most confident of each true class in turn), each with the heat map of its
    predicted class, captioned "true → predicted p=0.83"; top row correct, bottom row wrong.

    ``load_face(i)``: the face of test row ``i`` (uint8, as the model takes it); ``labels``: class display names.
    """
    from kfer import plots

    y_true, y_pred, confidence = np.asarray(y_true), np.asarray(y_pred), np.asarray(confidence, dtype=float)
    ok = np.flatnonzero(y_true == y_pred)
    rows = [("correct", pick_faces(ok, y_true, confidence, per_row)),
            ("wrong", pick_faces(np.flatnonzero(y_true != y_pred), y_true, confidence, per_row))]
    chosen = np.concatenate([r[1] for r in rows])
    faces = [load_face(int(i)) for i in chosen]
    pictures = iter(explain_faces(keras_model, np.stack(faces), y_pred[chosen]) if faces else [])
    hangul = plots.has_hangul_font()
    names = {"correct": "correct 정답" if hangul else "correct", "wrong": "wrong 오답" if hangul else "wrong"}
    cols = max(1, *(len(r[1]) for r in rows))
    with plots._style():
        fig = plots._new_figure(max(2.1 * cols, 7.0), 5.6)
        fig.suptitle(f"Grad-CAM of the predicted class{' 예측 근거' if hangul else ''}: {len(ok)} of "
                     f"{len(y_true)} test faces correct (red: what the model looked at)")
        axes = fig.subplots(2, cols, squeeze=False)
        for r, (name, idx) in enumerate(rows):
            for c, ax in enumerate(axes[r]):
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c < len(idx):
                    i = idx[c]
                    ax.imshow(cv2.cvtColor(next(pictures), cv2.COLOR_BGR2RGB), interpolation="nearest")
                    ax.set_title(f"{labels[y_true[i]]}\n→ {labels[y_pred[i]]}\np={confidence[i]:.2f}", fontsize=8)
                elif c == 0:
                    ax.text(0.5, 0.5, f"no {name}\ntest faces", ha="center", va="center", fontsize=10,
                            transform=ax.transAxes)
            axes[r][0].set_ylabel(names[name], fontsize=10)
        return plots._save(fig, path)
