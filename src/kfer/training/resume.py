"""Resume a killed ``kfer train`` from its last finished epoch.

A Keras ``BackupAndRestore`` (subclassed to write atomically and to carry what Keras leaves out) keeps the
training state in ``paths.train_backup``:

- ``state.json``: the run's fingerprint (params, train/val rows, global batch), its MLflow run id, the finished
  epochs with their logs (the history so far), the seconds trained, the state of early stopping, the plateau
  schedule and the best checkpoint, the dropout seed-generator states (Keras' ``save_weights`` leaves them
  out, and without them a resumed run draws other dropout masks), and which files below are current;
- ``epoch-NNN.weights.h5``: weights and optimizer state after epoch NNN;
- ``best-NNN.keras``: the best model so far by ``train.monitor`` (``ModelCheckpoint``).

``state.json`` is replaced atomically after the files it names are complete, so a kill at any moment leaves the
previous epoch's state intact. The epoch order of the input pipeline depends on the seed and the epoch only
(:func:`kfer.training.inputs.make_dataset`), so the resumed epochs see the batches the uninterrupted run would
have seen.
A backup whose fingerprint does not match (other params or data) is discarded with a warning; the folder is
deleted when the run ends well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from kfer import files, selection
from kfer.catalog import Catalog
from kfer.config import Params

log = logging.getLogger(__name__)

STATE = "state.json"
VERSION = 1
# attributes of the stateful Keras callbacks that a resumed fit must start from (their on_train_begin resets them)
_CALLBACK_STATE = {
    "EarlyStopping": ("wait", "best", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "ModelCheckpoint": ("best",),
}


def fingerprint(params: Params, train_df: pd.DataFrame, val_df: pd.DataFrame, global_batch: int) -> str:
    """What a backup must match to be resumed: the params that shape training and the exact train/val rows."""
    dump = params.model_dump(mode="json")
    speed_or_export = {"decode_workers", "resume", "onnx_tolerance", "onnx_check_faces"}  # shape no weights
    dump["train"] = {k: v for k, v in dump["train"].items() if k not in speed_or_export}
    h = hashlib.sha256(json.dumps(dump, sort_keys=True, default=str).encode())
    h.update(str(global_batch).encode())
    for df in (train_df, val_df):
        h.update(pd.util.hash_pandas_object(df[["path", "label"]], index=False).to_numpy().tobytes())
    return h.hexdigest()[:32]


def _plain(v):
    if isinstance(v, (np.generic, np.ndarray)):
        return v.tolist()
    return v


class TrainBackup:
    """The backup folder of one ``kfer train``: read at start, written after every epoch, deleted at the end."""

    def __init__(self, params: Params, fp: str) -> None:
        self.dir = Catalog(params).train_backup
        self.fingerprint = fp
        self.epochs = params.train.epochs
        self.state: dict | None = None
        state = self._read()
        if state is None:
            return
        if not params.train.resume:
            log.warning("train: train.resume is false: discarding the backup in %s (epoch %d)", self.dir,
                        state["epoch"])
        elif state.get("version") != VERSION or state.get("fingerprint") != fp:
            log.warning("train: the backup in %s is of another run (params or data changed): starting over",
                        self.dir)
        else:
            self.state = state
            return
        self.discard()

    def _read(self) -> dict | None:
        path = self.dir / STATE
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("train: unreadable backup state %s (%s): starting over", path, e)
            return None

    # --- what a resumed run starts from ---
    @property
    def epoch(self) -> int:
        """Epochs finished (0 for a new run)."""
        return int(self.state["epoch"]) if self.state else 0

    @property
    def run_id(self) -> str | None:
        return self.state["run_id"] if self.state else None

    @property
    def done(self) -> bool:
        """Every epoch finished, or early stopping ended the run: nothing is left to fit."""
        return bool(self.state) and (self.epoch >= self.epochs or bool(self.state.get("stopped")))

    @property
    def seconds(self) -> float:
        return float(self.state["seconds"]) if self.state else 0.0

    def history(self) -> pd.DataFrame:
        rows = self.state["history"] if self.state else []
        df = pd.DataFrame(rows)
        if not df.empty:
            df.insert(0, "epoch", np.arange(1, len(df) + 1))
        return df

    def best_checkpoint(self) -> Path | None:
        name = self.state.get("best") if self.state else None
        return self.dir / name if name else None

    def checkpoint_pattern(self) -> Path:
        return self.dir / "best-{epoch:03d}.keras"

    # --- writing ---
    def begin(self, run_id: str) -> None:
        """Start a new backup for MLflow run ``run_id`` (nothing finished yet)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = {"version": VERSION, "fingerprint": self.fingerprint, "run_id": run_id, "epoch": 0,
                      "seconds": 0.0, "history": [], "stopped": False, "weights": None, "best": None,
                      "callbacks": {}, "seeds": []}
        self._write()

    def _write(self) -> None:
        files.write_json(self.dir / STATE, self.state)

    def discard(self) -> None:
        self.state = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def callback(self, stateful: list, monitor: str, seconds_before: float):
        return _callback(self, stateful, monitor, seconds_before)

    def restore_into(self, model) -> None:
        """Load the last finished epoch's weights (and optimizer state) and dropout seed states into ``model``."""
        state = self.state
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(self.dir / state["weights"])
        for var, value in zip(_seed_variables(model), state["seeds"], strict=True):
            var.assign(np.asarray(value, dtype=var.dtype))

    # --- the attempt interface of kfer.training.fit (shared with NoBackup) ---
    def checkpoints(self, workdir: Path) -> Path:  # noqa: ARG002 - the checkpoints live in the backup
        return self.checkpoint_pattern()

    def watch(self, callbacks: list, monitor: str) -> None:
        """Append the backup callback; last, so that its on_train_begin restores what the others' reset."""
        callbacks.append(self.callback(callbacks, monitor, self.seconds))

    def outcome(self, keras_history, elapsed: float) -> tuple[pd.DataFrame, float]:  # noqa: ARG002
        """(history, seconds) over every attempt: the backup's record, not this attempt's alone."""
        return self.history(), self.seconds

    def best_file(self, checkpoints: Path) -> Path | None:  # noqa: ARG002
        return self.best_checkpoint()


class NoBackup:
    """A fit that is not backed up (tuning trials, tests): nothing to resume, the best checkpoint in ``workdir``.
    Same interface as :class:`TrainBackup`, so the fit step has one path whether or not it resumes."""

    epoch = 0
    done = False
    seconds = 0.0
    dir = None

    def checkpoints(self, workdir: Path) -> Path:
        return Path(workdir) / "best.keras"

    def watch(self, callbacks: list, monitor: str) -> None:
        pass

    def outcome(self, keras_history, elapsed: float) -> tuple[pd.DataFrame, float]:
        history = pd.DataFrame(keras_history.history)
        history.insert(0, "epoch", np.arange(1, len(history) + 1))
        return history, elapsed

    def best_file(self, checkpoints: Path) -> Path | None:
        return checkpoints

    def history(self) -> pd.DataFrame:
        return pd.DataFrame()


def _seed_variables(model) -> list:
    return [v for v in model.non_trainable_variables if "seed_generator" in v.path]


def _callback(backup: TrainBackup, stateful: list, monitor: str, seconds_before: float):
    import time

    import keras

    class Backup(keras.callbacks.BackupAndRestore):
        """BackupAndRestore with atomic epoch files, callback and seed states, and the history."""

        def __init__(self) -> None:
            super().__init__(backup_dir=str(backup.dir), save_freq="epoch", delete_checkpoint=False)

        def on_train_begin(self, logs=None):  # runs after the other callbacks' resets: it comes last
            self._t0 = time.perf_counter()
            state = backup.state
            if not state or not state["epoch"]:
                return
            backup.restore_into(self.model)
            for cb in stateful:
                for attr, value in state["callbacks"].get(type(cb).__name__, {}).items():
                    setattr(cb, attr, value)
            self.model._initial_epoch = state["epoch"]
            log.info("train: resumed after epoch %d/%d from %s (MLflow run %s)", state["epoch"], backup.epochs,
                     backup.dir, state["run_id"])

        def on_epoch_end(self, epoch, logs=None):
            state = backup.state
            done = epoch + 1
            weights = f"epoch-{done:03d}.weights.h5"
            tmp = backup.dir / f".{weights}{files.TMP_MARK}.weights.h5"  # Keras wants the .weights.h5 suffix
            self.model.save_weights(tmp, overwrite=True)
            tmp.replace(backup.dir / weights)
            history = state["history"] + [{k: _plain(v) for k, v in (logs or {}).items()}]
            best_epoch = selection.best_epoch((row.get(monitor) for row in history), monitor)
            best = f"best-{best_epoch:03d}.keras" if best_epoch else None
            old = (state["weights"], state["best"])
            backup.state = {
                **state, "epoch": done, "history": history, "weights": weights,
                "best": best if best and (backup.dir / best).exists() else state["best"],
                "stopped": bool(self.model.stop_training),
                "seconds": seconds_before + time.perf_counter() - self._t0,
                "callbacks": {type(cb).__name__: {a: _plain(getattr(cb, a, None))
                                                  for a in _CALLBACK_STATE.get(type(cb).__name__, ())}
                              for cb in stateful},
                "seeds": [np.asarray(v.numpy()).tolist() for v in _seed_variables(self.model)],
            }
            backup._write()  # the commit point: the files it names are complete
            for name in old:
                if name and name not in (backup.state["weights"], backup.state["best"]):
                    (backup.dir / name).unlink(missing_ok=True)

        def on_train_batch_end(self, batch, logs=None):
            pass

        def on_train_end(self, logs=None):
            pass

    return Backup()
