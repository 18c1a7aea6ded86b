"""Where training runs: MirroredStrategy over two logical CPU devices, the multi-machine refusal, XLA that takes
effect, mixed precision (bfloat16 on CPU) with a float32 served model. Real TensorFlow, tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import keras
import mlflow
import pytest

from kfer import tracking
from tests.helpers import TINY, prepare_demo, subprocess_env


@pytest.fixture
def project(tmp_path, make_params, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return prepare_demo(make_params(TINY))


def test_tf_config_stops_kfer_train_at_once_with_one_line(project):
    tf_config = json.dumps({"cluster": {"worker": ["127.0.0.1:23456", "127.0.0.1:23457"]},
                            "task": {"type": "worker", "index": 0}})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kfer.cli", "train"], cwd=project.root, capture_output=True,
                          text=True, env=subprocess_env(TF_CONFIG=tf_config), timeout=120)
    assert proc.returncode == 2, proc.stderr  # kfer's exit status for a user's mistake
    lines = [x for x in proc.stderr.splitlines() if x.startswith("Error:") or "Traceback" in x]
    assert len(lines) == 1 and "does not train across machines" in lines[0], proc.stderr
    assert "keras-team/keras#20585" in lines[0]
    assert time.monotonic() - t0 < 60  # at once: no training, no MLflow run
    assert not project.path(project.paths.model).exists()
    if (project.root / "mlflow.db").exists():
        client = mlflow.MlflowClient(tracking.tracking_uri(project))
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.training
def test_mirrored_strategy_over_two_logical_cpus_trains_and_logs_once(project):
    script = textwrap.dedent("""
        import sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from kfer.cli import main
        main(["train"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=project.root, capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch 32 on 2 replica(s)" in proc.stderr, proc.stderr[-3000:]  # 16 per replica, global 32
    client = mlflow.MlflowClient(tracking.tracking_uri(project))
    runs = client.search_runs([client.get_experiment_by_name(project.train.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["train.replicas"] == "2"
    assert runs[0].data.params["train.global_batch_size"] == "32"
    metrics = json.loads(project.path(project.paths.train_metrics).read_text())
    assert metrics["epochs_run"] == 2 and 0 <= metrics["best_val_accuracy"] <= 1


class _Seen(keras.callbacks.Callback):
    """What the model being fitted looked like."""

    def on_train_begin(self, logs=None):
        self.jit = self.model.jit_compile
        self.dtypes = {layer.compute_dtype for layer in self.model.layers if layer.weights}


def _fit(params, tmp_path):
    from kfer.training.fit import fit
    from kfer.training.inputs import make_dataset, split_table, train_table

    seen = _Seen()
    train_ds = make_dataset(params, train_table(params), training=True)
    val_ds = make_dataset(params, split_table(params, "val"), training=False)
    model, history, _ = fit(params, train_ds, val_ds, None, tmp_path, [seen], verbose=0)
    return seen, model, history


@pytest.mark.training
def test_xla_takes_effect_when_asked(project, tmp_path, make_params):
    from tensorflow.python.framework import config as tf_config

    from kfer.errors import UserError

    params = make_params({**TINY, "train": {**TINY["train"], "epochs": 1, "xla": True, "deterministic": False}},
                         root=project.root)
    seen, _, history = _fit(params, tmp_path)
    assert seen.jit is True and len(history) == 1
    assert not tf_config.is_op_determinism_enabled()
    seen, _, _ = _fit(make_params({**TINY, "train": {**TINY["train"], "epochs": 1}}, root=project.root), tmp_path)
    assert seen.jit is False and tf_config.is_op_determinism_enabled()  # the default: deterministic, no XLA
    with pytest.raises(UserError, match="train.xla needs train.deterministic: false"):
        make_params({"train": {"xla": True}}, root=tmp_path / "bad")


@pytest.mark.training
def test_bfloat16_training_serves_float32(project, tmp_path, make_params):
    import numpy as np

    from kfer.training.fit import strip_for_serving

    params = make_params({**TINY, "train": {**TINY["train"], "epochs": 1, "mixed_precision": "bfloat16"}},
                         root=project.root)
    seen, best, _ = _fit(params, tmp_path)
    assert "bfloat16" in seen.dtypes  # trained in bfloat16 ...
    assert keras.mixed_precision.global_policy().name == "float32"  # ... the policy is put back after fit
    served = strip_for_serving(best, params)
    served.save(tmp_path / "served.keras")
    served = keras.models.load_model(tmp_path / "served.keras", compile=False)
    assert {layer.dtype_policy.name for layer in served.layers} == {"float32"}  # ... and served in float32
    assert {w.dtype for w in served.weights} == {"float32"}
    x = np.zeros((2, *served.input_shape[1:]), np.float32)
    assert served.predict(x, verbose=0).dtype == np.float32
    assert make_params({"train": {"mixed_precision": True}}, root=tmp_path / "t").train.mixed_precision == "float16"
