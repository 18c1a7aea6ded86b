"""The classifier's inference runtime: ONNX Runtime on the CPU, without TensorFlow or Keras.

``kfer train`` (and tune's best trial) exports the served Keras classifier, flip TTA included, to ONNX
(:mod:`kfer.serving.export`); the photo model (:class:`kfer.serving.photo_model.PhotoEmotionModel`) classifies faces
with :class:`OnnxClassifier`. This module imports numpy and, when a classifier is made, ``onnxruntime``: nothing
else, so the served model never loads TensorFlow (README, "Serving runtime", says why ONNX Runtime).
"""

from __future__ import annotations

import os

import numpy as np

#: overrides the intra-op thread count of every ONNX Runtime session kfer opens (default: the usable cores)
THREADS_ENV = "KFER_RUNTIME_THREADS"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or ``taskset``'s limit, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def runtime_threads() -> int:
    """Intra-op threads of an ONNX Runtime session: ``$KFER_RUNTIME_THREADS`` when set, else :func:`usable_cores`.
    (ONNX Runtime's own default counts the host's physical cores, more than a CPU-limited container may use.)"""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={value!r} is not a whole number of threads") from None
        if threads < 1:
            raise ValueError(f"{THREADS_ENV}={value!r}: give at least 1 thread")
        return threads
    return usable_cores()


def as_faces(faces) -> np.ndarray:
    """uint8 or float faces ``(N, S, S)`` / ``(N, S, S, C)`` -> ``float32 (N, S, S, C)``, raw 0..255: what the
    classifier takes."""
    x = np.asarray(faces, dtype=np.float32)
    return x[..., None] if x.ndim == 3 else x


class OnnxClassifier:
    """An ONNX face classifier on ONNX Runtime's CPU provider: ``float32 (N, S, S, C)`` raw 0..255 ->
    probabilities ``float32 (N, n_classes)``, as the Keras model it was exported from."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or runtime_threads())
        options.inter_op_num_threads = 1  # one graph, run op after op: parallelism is within the ops
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle pool threads sleep instead of spinning: on the 48-px recipe ResNet20, 2 threads, beside a training
        # run, 2.8x the faces/s of spinning at batch 1 and 64 at half the CPU per face; ENABLE_EXTENDED instead
        # of ALL: 0.5x (docs/performance.md, "Choosing the runtime";
        # benchmarks/bench_serving.py --sections runtimes --ort spin,nospin)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, sess_options=options, providers=["CPUExecutionProvider"])
        (inp,) = self.session.get_inputs()
        (out,) = self.session.get_outputs()
        self.input_name = inp.name
        self.input_shape = tuple(inp.shape)  # (batch symbol, S, S, C)
        self.n_classes = int(out.shape[-1])

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]
