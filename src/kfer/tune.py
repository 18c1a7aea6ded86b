"""The ``tune`` stage: an Optuna search over the original work's design choices, tracked in MLflow.

Searched (ranges in ``params.yaml`` → ``tune.space``): ``model.kernel_initializer``, ``model.head_units``,
``augment.strength`` and ``train.learning_rate`` (log-uniform). Everything else is fixed by params.yaml.

**Data.** A trial trains on the *cropped* train split (``splits.csv`` rows with ``split == train``), never on
the augmented folder: every image appears once as itself and ``augment.copies`` times augmented on the fly at
the trial's strength, i.e. exactly the images the ``augment`` stage would write for that strength. The copies
come from :func:`kfer.augment.augment_image` with the generator :func:`kfer.augment.rng_for` ``(seed, path,
copy)`` (the same function and the same draws as the stage, so a test compares bytes); they depend only on
(seed, image, copy, strength), not on the epoch, worker or trial. The objective is a validation metric
(``tune.metric``, default macro-F1) of the best epoch, on the val split. The test split is never read.

**Search.** Seeded TPE (seed ``tune.sampler.seed`` or ``seed``, salted with the worker index and the number of
trials already in the study, so that a resumed study or a second worker does not replay the same random
start-up points); every epoch is reported and a median pruner stops bad trials. The budget ``tune.n_trials``
(``--trials``) counts the study's COMPLETE + PRUNED trials, so re-running an interrupted study completes it;
``tune.timeout_s`` (``--timeout``) stops starting trials after that many seconds of one invocation.

**Storage.** An Optuna RDB storage URL (``tune.storage`` / ``--storage``); default a SQLite file at the
repository root (``paths.optuna_db``, made absolute). The study name defaults to ``kfer-<fingerprint>`` of
``splits.csv`` and the fixed params, so new data or settings start a new study and the same ones resume it
(an explicitly named study created with other data/settings is refused). Workers write a heartbeat; a trial of
a killed worker whose heartbeat is older than ``tune.grace_period`` ends FAIL (its MLflow run too) the next
time any worker of the study looks, and its params are queued again up to ``tune.retry_stale`` times.
``--workers N`` starts N processes on the study; on several machines run ``kfer tune --storage
postgresql://...`` on each (driver: psycopg 3, SQLAlchemy 2.1's default for ``postgresql://``). With G GPUs
visible, worker i (0-based) gets GPU i mod G alone through ``CUDA_VISIBLE_DEVICES`` (the user's list when set),
with TensorFlow memory growth on.

**MLflow** (experiment ``tune.experiment``). One parent run per invocation; one child run per trial (tag
``mlflow.parentRunId``, also from worker processes) with all params, per-epoch metrics, ``best_val_*``,
tags ``kfer.trial_state`` (COMPLETE, PRUNED, FAIL), ``optuna.trial_number`` and ``optuna.study_name``. A
trial that is the study's best when it completes also logs its models (as ``kfer train`` does), so
``kfer register --tuned`` (the best trial's run id from ``paths.tune_summary``) works; the parent holds the
study's best params and value, the trials table and Optuna's plots (PNG, matplotlib). Outputs for DVC:
``paths.tune_best`` (the best params in params.yaml's layout; ``kfer tune --apply`` writes them into
params.yaml, comments kept) and ``paths.tune_summary``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from . import files, tracking
from .config import Params, _deep_merge

log = logging.getLogger(__name__)

#: Optuna parameter name -> (params.yaml section, key)
SEARCHED: dict[str, tuple[str, str]] = {
    "kernel_initializer": ("model", "kernel_initializer"),
    "head_units": ("model", "head_units"),
    "strength": ("augment", "strength"),
    "learning_rate": ("train", "learning_rate"),
}
STATE_TAG = "kfer.trial_state"
TRIAL_TAG = "optuna.trial_number"
STUDY_TAG = "optuna.study_name"
PARENT_TAG = "mlflow.parentRunId"
BEST_RUN_TAG = "kfer.best_run_id"
RUN_ID_ATTR = "mlflow_run_id"
MODEL_URI_ATTR = "model_uri"
WORKER_ATTR = "worker"
FINGERPRINT_ATTR = "kfer.fingerprint"
MAX_CONSECUTIVE_FAILURES = 3


class TuneError(RuntimeError):
    """The study cannot run or produced nothing usable; the message says why."""


# --- storage and study -------------------------------------------------------------------------------------

def storage_url(params: Params, override: str | None = None) -> str:
    """``--storage``, else ``tune.storage``, else ``sqlite:///<absolute paths.optuna_db>``."""
    url = override or params.tune.storage
    if url:
        return url
    return "sqlite:///" + str(params.path(params.paths.optuna_db).resolve())


def redact(url: str) -> str:
    """The URL without its password (for logs and tags)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: show nothing secret
        return url.split("@")[-1] if "@" in url else url


def fingerprint(params: Params) -> str:
    """A short hash of what makes trials comparable: ``splits.csv`` and every param a trial does not search.

    Budget, workers, storage, heartbeat settings, experiment names and worker counts are left out.
    """
    d = params.model_dump(mode="json")
    drop = {
        "crop": {"workers", "chunksize"},
        "augment": {"workers", "strength"},
        "model": {"kernel_initializer", "head_units"},
        "train": {"learning_rate", "experiment", "registered_model", "monitor", "decode_workers", "resume"},
    }
    fixed = {"seed": d["seed"], "classes": d["classes"],
             "tune": {"metric": d["tune"]["metric"], "space": d["tune"]["space"]}}
    for section, keys in drop.items():
        fixed[section] = {k: v for k, v in d[section].items() if k not in keys}
    splits = params.path(params.paths.splits)
    if not splits.exists():
        raise FileNotFoundError(f"splits file {splits} not found: run `kfer split` (dvc repro split) first")
    h = hashlib.sha256(json.dumps(fixed, sort_keys=True).encode("utf-8"))
    h.update(splits.read_bytes())
    return h.hexdigest()[:12]


class _StaleTrial:
    """Called for a trial whose worker stopped sending heartbeats (killed): its MLflow run ends FAILED with state
    FAIL, then its params are queued again (Optuna's RetryHeartbeatStaleTrialCallback) up to ``max_retry``."""

    def __init__(self, tracking_uri: str, max_retry: int) -> None:
        import optuna

        self.tracking_uri = tracking_uri
        self.retry = None
        if max_retry > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study, trial) -> None:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        log.warning("tune: trial %d lost its worker (no heartbeat): FAIL%s", trial.number,
                    " and queued again" if self.retry else "")
        if run_id:
            try:
                from mlflow import MlflowClient

                client = MlflowClient(self.tracking_uri)
                client.set_tag(run_id, STATE_TAG, "FAIL")
                client.set_tag(run_id, "kfer.fail_reason", "worker lost (heartbeat stale)")
                client.set_terminated(run_id, "FAILED")
            except Exception as exc:  # noqa: BLE001 - the study must go on even if MLflow is unreachable
                log.warning("tune: could not close MLflow run %s of trial %d: %s", run_id, trial.number, exc)
        if self.retry is not None:
            self.retry(study, trial)


def open_storage(params: Params, url: str):
    """An RDBStorage with heartbeats (stale trials end FAIL) and, for SQLite, a 60 s lock timeout."""
    import optuna

    cfg = params.tune
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=cfg.heartbeat_interval,
            grace_period=cfg.grace_period,
            heartbeat_stale_trial_callback=_StaleTrial(tracking.tracking_uri(params), cfg.retry_stale),
        )


def make_sampler(params: Params, salt: tuple = ()):
    import optuna

    cfg = params.tune.sampler
    seed = params.seed if cfg.seed is None else cfg.seed
    return optuna.samplers.TPESampler(seed=files.stable_int("tune", seed, *salt) % 2**32,
                                      n_startup_trials=cfg.n_startup_trials, constant_liar=True)


def make_pruner(params: Params):
    import optuna

    cfg = params.tune.pruner
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps)


def open_study(params: Params, storage: str | None = None, study_name: str | None = None, worker: int = 0):
    """Create the study or load it (the same study for every worker and every re-run).

    The sampler is seeded from the params seed, ``worker`` and the number of trials already in the study.
    Raises :class:`TuneError` when an existing study was made with other data or fixed params.
    """
    import optuna

    fp = fingerprint(params)
    name = study_name or params.tune.study_name or f"kfer-{fp}"
    url = storage_url(params, storage)
    study = optuna.create_study(storage=open_storage(params, url), study_name=name,
                                direction=params.tune.direction, pruner=make_pruner(params), load_if_exists=True)
    known = study.user_attrs.get(FINGERPRINT_ATTR)
    if known is None:
        study.set_user_attr(FINGERPRINT_ATTR, fp)
        study.set_user_attr("kfer.metric", params.tune.metric)
    elif known != fp:
        raise TuneError(
            f"study {name!r} in {redact(url)} was created with other data or fixed params (fingerprint {known}, "
            f"now {fp}): its trials are not comparable. Use another name (--study-name / tune.study_name) or "
            "leave tune.study_name empty to get one per data/params version.")
    if study.direction.name.lower() != params.tune.direction:
        raise TuneError(f"study {name!r} is to {study.direction.name.lower()}, but tune.metric "
                        f"{params.tune.metric} needs {params.tune.direction}")
    study.sampler = make_sampler(params, (worker, len(study.get_trials(deepcopy=False))))
    return study


def _counts(study) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(t.state.name for t in study.get_trials(deepcopy=False)))


def _fail_stale(study) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


# --- one trial ---------------------------------------------------------------------------------------------

def suggest(trial, params: Params) -> dict[str, Any]:
    """The trial's values for the searched params (Optuna names, see :data:`SEARCHED`)."""
    space = params.tune.space
    return {
        "kernel_initializer": trial.suggest_categorical("kernel_initializer", list(space.kernel_initializer)),
        "head_units": trial.suggest_categorical("head_units", list(space.head_units)),
        "strength": trial.suggest_float("strength", *space.strength),
        "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
    }


def nested_values(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"head_units": 256, ...}`` -> ``{"model": {"head_units": 256}, ...}`` (params.yaml's layout)."""
    out: dict[str, dict[str, Any]] = {}
    for name, (section, key) in SEARCHED.items():
        if name in values:
            v = values[name]
            out.setdefault(section, {})[key] = v.item() if isinstance(v, np.generic) else v
    return out


def with_values(params: Params, values: dict[str, Any]) -> Params:
    """The params of one trial: the searched values set, and ``train.monitor`` = ``tune.metric`` (so the kept
    epoch, early stopping and the LR schedule follow the objective)."""
    over = nested_values(values)
    over.setdefault("train", {})["monitor"] = params.tune.metric
    new = Params.model_validate(_deep_merge(params.model_dump(mode="json"), over))
    new._root = params.root
    return new


def trial_table(params: Params) -> pd.DataFrame:
    """The train split of ``splits.csv``, each image as copy 0 (itself) and copies 1..``augment.copies``.

    The same rows, in the same order, as the ``augment`` stage's manifest (which holds the files instead).
    """
    from .train import split_table

    train = split_table(params, "train")
    train = train[train["label"].isin(params.class_names) & ~train["path"].duplicated()].reset_index(drop=True)
    if train.empty:
        raise TuneError("the train split is empty: check the crop and split reports")
    k = params.augment.copies + 1
    out = train.loc[train.index.repeat(k), ["path", "label", "group"]].reset_index(drop=True)
    out["copy"] = np.tile(np.arange(k), len(train))
    return out


class OnTheFlyAugment:
    """``fn(image_uint8, row_index)`` for :func:`kfer.train.make_dataset`: row ``i`` of :func:`trial_table` is
    the image itself (copy 0) or :func:`kfer.augment.augment_image` with ``rng_for(seed, path, copy)`` at
    ``strength``: byte for byte what the augment stage writes for that strength."""

    def __init__(self, params: Params, table: pd.DataFrame, strength: float) -> None:
        self.cfg = params.augment
        self.seed = params.seed
        self.strength = float(strength)
        self.paths = list(table["path"])
        self.copies = table["copy"].to_numpy(dtype=np.int64)

    def __call__(self, image: np.ndarray, index) -> np.ndarray:
        from .augment import augment_image, rng_for

        i = int(index)
        k = int(self.copies[i])
        if k == 0:
            return np.asarray(image, dtype=np.uint8)
        return augment_image(image, rng_for(self.seed, self.paths[i], k), self.cfg, self.strength)


@dataclass
class _Context:
    params: Params
    study_name: str
    parent_run_id: str
    train_df: pd.DataFrame
    val_df: pd.DataFrame


def _reporter(trial, metric: str, epochs: int):
    """Keras callback: per-epoch metrics to MLflow, the objective to Optuna, and stop when the pruner says so."""
    import keras
    import mlflow

    class TrialReporter(keras.callbacks.Callback):
        pruned_epoch: int | None = None

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            mlflow.log_metrics({k: float(v) for k, v in logs.items()}, step=epoch)
            if metric not in logs:
                return
            value = float(logs[metric])
            trial.report(value, epoch)
            log.info("tune: trial %d epoch %d/%d %s %.4f", trial.number, epoch + 1, epochs, metric, value)
            if trial.should_prune():
                self.pruned_epoch = epoch
                self.model.stop_training = True

    return TrialReporter()


def _is_best_so_far(study, value: float) -> bool:
    import optuna

    try:
        best = study.best_value  # COMPLETE trials only: the running one is not among them yet
    except ValueError:
        return True
    return value >= best if study.direction == optuna.study.StudyDirection.MAXIMIZE else value <= best


def _train_trial(trial, p: Params, ctx: _Context, workdir: Path) -> float:
    import mlflow
    import optuna

    from . import serving
    from .train import _example_face, class_weights, fit, make_dataset, strip_for_serving

    metric = p.tune.metric
    table = ctx.train_df
    train_ds = make_dataset(p, table, training=True, augment=OnTheFlyAugment(p, table, p.augment.strength))
    val_ds = make_dataset(p, ctx.val_df, training=False)
    weights = class_weights(p, table) if p.train.class_weights else None
    reporter = _reporter(trial, metric, p.train.epochs)
    model, history, seconds = fit(p, train_ds, val_ds, weights, workdir, [reporter], verbose=0)
    run_metrics = {"epochs_run": int(len(history)), "train_seconds": round(seconds, 2),
                   "train_images": int(len(table)), "val_images": int(len(ctx.val_df))}
    col = history[metric]
    lower_is_better = metric.endswith("loss")
    if reporter.pruned_epoch is not None:
        mlflow.log_metrics({**run_metrics, "pruned_epoch": reporter.pruned_epoch + 1})
        best_so_far = col.min() if lower_is_better else col.max()  # what the median pruner compared
        raise optuna.TrialPruned(f"epoch {reporter.pruned_epoch + 1}: best {metric} so far "
                                 f"{best_so_far:.4f} is worse than the median of finished trials")
    scores = model.evaluate(val_ds, verbose=0, return_dict=True)
    best = {"best_val_loss": float(scores["loss"]), "best_val_accuracy": float(scores["accuracy"]),
            "best_val_macro_f1": float(scores["macro_f1"])}
    value = best[f"best_{metric}"]
    if not math.isfinite(value):
        raise FloatingPointError(f"{metric} of trial {trial.number} is {value}")
    run_metrics["best_epoch"] = int((col.idxmin() if lower_is_better else col.idxmax()) + 1)
    mlflow.log_metrics({**run_metrics, **best})
    if _is_best_so_far(trial.study, value):  # the study's best so far: keep its model, registrable
        uris = serving.log_models(strip_for_serving(model, p), p, example_face=_example_face(p, ctx.val_df))
        mlflow.set_tags({tracking.MODEL_URI_TAG: uris["model_uri"], tracking.KERAS_URI_TAG: uris["keras_model_uri"]})
        trial.set_user_attr(MODEL_URI_ATTR, uris["model_uri"])
    return value


def _objective(trial, ctx: _Context) -> float:
    import keras
    import mlflow
    import optuna

    values = suggest(trial, ctx.params)
    p = with_values(ctx.params, values)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    trial.set_user_attr(WORKER_ATTR, worker)
    tags = {PARENT_TAG: ctx.parent_run_id, "kfer.stage": "tune-trial", STUDY_TAG: ctx.study_name,
            TRIAL_TAG: str(trial.number), "kfer.worker": worker}
    with contextlib.suppress(Exception):  # a re-queued stale trial: Optuna keeps the original's number
        retry_of = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
    log.info("tune: trial %d %s", trial.number, json.dumps(values))
    pruned: optuna.TrialPruned | None = None
    value = math.nan
    try:
        with tracking.tracked_run(p, f"trial-{trial.number}", nested=True, tags=tags,
                                  experiment=p.tune.experiment) as run, \
                tempfile.TemporaryDirectory(prefix="kfer-tune-") as tmp:
            trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
            try:
                value = _train_trial(trial, p, ctx, Path(tmp))
            except optuna.TrialPruned as exc:
                mlflow.set_tag(STATE_TAG, "PRUNED")
                pruned = exc
            except BaseException:
                mlflow.set_tag(STATE_TAG, "FAIL")
                raise
            else:
                mlflow.set_tag(STATE_TAG, "COMPLETE")
    except tracking.Terminated as exc:  # Optuna ends a trial FAIL on Exception/KeyboardInterrupt only
        raise KeyboardInterrupt(str(exc)) from exc
    finally:
        keras.backend.clear_session()
    if pruned is not None:
        raise pruned
    return value


# --- workers -----------------------------------------------------------------------------------------------

def _work(ctx: _Context, study, budget: int, deadline: float | None) -> int:
    """Run trials until the study has ``budget`` COMPLETE + PRUNED trials or ``deadline`` passes.

    While other workers' running trials would fill the budget, wait: they finish, or their heartbeat goes
    stale and they end FAIL, and the budget is then completed here. Returns the number of trials run.
    """
    from optuna.trial import TrialState

    poll = min(5.0, float(ctx.params.tune.heartbeat_interval))
    ran = fails = 0
    waiting = False
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            log.info("tune: time budget reached")
            break
        _fail_stale(study)
        counts = _counts(study)
        done = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
        if done >= budget:
            break
        if done + counts.get("RUNNING", 0) >= budget:
            if not waiting:
                log.info("tune: %d trial(s) running elsewhere would fill the budget: waiting for them to end (a "
                         "killed worker's trial ends FAIL %d s after its last heartbeat)", counts["RUNNING"],
                         ctx.params.tune.grace_period)
            waiting = True
            time.sleep(poll)
            continue
        waiting = False
        finished: list = []
        study.optimize(lambda t: _objective(t, ctx), n_trials=1, catch=(Exception,),
                       callbacks=[lambda s, t: finished.append(t)], gc_after_trial=True)
        ran += 1
        if finished and finished[-1].state == TrialState.FAIL:
            fails += 1
            if fails >= MAX_CONSECUTIVE_FAILURES:
                raise TuneError(f"{fails} trials in a row failed (last: trial {finished[-1].number}); see the log")
        else:
            fails = 0
    return ran


def _context(params: Params, study_name: str, parent_run_id: str) -> _Context:
    from .train import split_table

    val_df = split_table(params, "val")
    if val_df.empty:
        raise TuneError("the val split is empty: check split ratios (split.val) and the split report")
    return _Context(params, study_name, parent_run_id, trial_table(params), val_df)


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise tracking.Terminated(f"signal {signum}")


def parse_visible_devices(value: str) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` as a list of ids (indices or ``GPU-…``/``MIG-…`` UUIDs, kept as written).

    CUDA stops at the first invalid entry, so ``""`` and ``"-1"`` hide every GPU and ``"0,-1,1"`` is ``["0"]``.
    """
    ids = []
    for token in value.split(","):
        token = token.strip()
        if not token or token.startswith("-"):
            break
        ids.append(token)
    return ids


def visible_gpu_ids() -> list[str]:
    """The GPUs this process may hand to its workers, found without taking GPU memory.

    The user's ``CUDA_VISIBLE_DEVICES`` when set (its ids, so a worker gets one of *those*); else TensorFlow's
    physical GPUs, numbered ``0..G-1``. Listing physical devices enumerates them (``cuInit``) but creates no
    CUDA context, so it allocates no GPU memory, and it counts only GPUs this TensorFlow build can use
    (``tensorflow-cpu``: none, so a CPU install never touches the variable).
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return parse_visible_devices(env)
    import tensorflow as tf

    return [str(i) for i in range(len(tf.config.list_physical_devices("GPU")))]


def gpu_assignment(workers: int, visible_ids: list[str]) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` for worker 0..N-1: worker ``i`` gets GPU ``visible_ids[i mod G]`` alone;
    ``None`` for every worker when no GPU is visible (its environment is left as inherited)."""
    if not visible_ids:
        return [None] * workers
    return [visible_ids[i % len(visible_ids)] for i in range(workers)]


def _worker_device(spec: dict) -> bool:
    """First thing in a worker: its ``CUDA_VISIBLE_DEVICES``, before TensorFlow is imported in the process
    (CUDA reads it once, when TensorFlow first touches the GPUs). Returns whether TensorFlow was already
    imported, i.e. whether the variable may have come too late (with the spawn start method it is not: before
    this runs the child imports only this module and the parent's main module, e.g. ``kfer.cli``, and neither
    imports TensorFlow; tested)."""
    device = spec.get("cuda_visible_devices")
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    return "tensorflow" in sys.modules


def _worker_tensorflow(threads: int) -> list:
    """Memory growth on for every GPU the worker sees (each then takes only what its trial needs, not the whole
    card), and the worker's share of CPU threads; before any TensorFlow op. Returns the GPUs."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError) as exc:  # already initialized: cannot change it any more
            log.warning("tune: memory growth not set on %s: %s", gpu.name, exc)
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    return gpus


def _worker_main(spec: dict) -> None:
    """Entry of a spawned worker process: its own GPU, storage, sampler and MLflow client on the shared study."""
    tf_before = _worker_device(spec)
    logging.basicConfig(level=spec["log_level"], format="%(levelname)s %(name)s[w%(process)d]: %(message)s")
    if tf_before:
        log.warning("tune: TensorFlow was already imported in worker %d before CUDA_VISIBLE_DEVICES was set: "
                    "its GPU assignment may not apply", spec["worker"])
    signal.signal(signal.SIGTERM, _on_sigterm)
    gpus = _worker_tensorflow(spec["threads"])
    log.info("tune: worker %d (pid %d): CUDA_VISIBLE_DEVICES=%s (%s); TensorFlow sees %d GPU(s)%s; %d CPU "
             "thread(s)", spec["worker"], os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
             "inherited" if spec.get("cuda_visible_devices") is None else "assigned", len(gpus),
             ", memory growth on" if gpus else "", spec["threads"])
    params = Params.model_validate(spec["params"])
    params._root = Path(spec["root"])
    study = open_study(params, spec["storage"], spec["study_name"], worker=spec["worker"])
    ctx = _context(params, study.study_name, spec["parent_run_id"])
    tracking.setup(params, params.tune.experiment)
    _work(ctx, study, spec["budget"], None if spec["timeout"] is None else time.monotonic() + spec["timeout"])


def _spawn_workers(params: Params, study, url: str, parent_run_id: str, workers: int, budget: int,
                   timeout: float | None) -> list[int]:
    ctx = multiprocessing.get_context("spawn")  # the parent may hold threads; fork does not copy them safely
    threads = max(1, files.resolve_workers(0) // workers)
    devices = gpu_assignment(workers, visible_gpu_ids())
    procs = []
    for i in range(workers):
        spec = {"params": params.model_dump(mode="json"), "root": str(params.root), "storage": url,
                "study_name": study.study_name, "parent_run_id": parent_run_id, "worker": i + 1,
                "budget": budget, "timeout": timeout, "threads": threads, "cuda_visible_devices": devices[i],
                "log_level": logging.getLogger().getEffectiveLevel()}
        procs.append(ctx.Process(target=_worker_main, args=(spec,), name=f"kfer-tune-{i + 1}"))
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [proc.exitcode for proc in procs]


# --- the stage ---------------------------------------------------------------------------------------------

def run_tune(
    params: Params,
    n_trials: int | None = None,
    timeout: float | None = None,
    workers: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
) -> dict:
    """Run (or continue) the study; write ``paths.tune_best`` and ``paths.tune_summary``; return the summary."""
    from .train import log_datasets, split_table

    cfg = params.tune
    budget = n_trials or cfg.n_trials
    timeout = cfg.timeout_s if timeout is None else timeout
    workers = workers or cfg.workers
    url = storage_url(params, storage)
    study = open_study(params, url, study_name, worker=0)
    name = study.study_name
    counts = _counts(study)
    log.info("tune: study %s in %s: %s; budget %d COMPLETE+PRUNED, %d worker(s)%s", name, redact(url),
             counts or "new", budget, workers, f", {timeout:g} s" if timeout else "")
    tags = {"kfer.stage": "tune", STUDY_TAG: name, "optuna.storage": redact(url), "optuna.budget": str(budget),
            "optuna.workers": str(workers), FINGERPRINT_ATTR: study.user_attrs.get(FINGERPRINT_ATTR, "")}
    t0 = time.monotonic()
    with tracking.tracked_run(params, f"tune-{name}", tags=tags, experiment=cfg.experiment) as run:
        ctx = _context(params, name, run.info.run_id)
        log_datasets(params, {"train": (split_table(params, "train"), params.paths.splits, "training"),
                              "val": (ctx.val_df, params.paths.splits, "validation")})
        error: BaseException | None = None
        try:
            if workers == 1:
                _work(ctx, study, budget, None if timeout is None else t0 + timeout)
            else:
                codes = _spawn_workers(params, study, url, run.info.run_id, workers, budget, timeout)
                if any(codes):
                    error = TuneError(f"worker exit codes {codes}: see the log above")
        except Exception as exc:  # noqa: BLE001 - still write what the study has, then fail
            error = exc
        try:
            summary = _finish(params, study, url, budget, time.monotonic() - t0, run.info.run_id)
        except TuneError:
            if error is None:
                raise
            log.exception("tune: could not summarize the study")
        if error is not None:
            raise error
    return summary


def _finish(params: Params, study, url: str, budget: int, seconds: float, parent_run_id: str) -> dict:
    """Parent-run logging and the DVC outputs, from the whole study (all invocations and workers)."""
    import mlflow
    from optuna.trial import TrialState

    cfg = params.tune
    counts = _counts(study)
    summary: dict[str, Any] = {
        "study_name": study.study_name, "storage": redact(url), "metric": cfg.metric,
        "direction": cfg.direction, "budget": budget,
        **{f"n_{s.lower()}": counts.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")},
        "seconds": round(seconds, 1), "parent_run_id": parent_run_id,
    }
    mlflow.log_metrics({k: float(v) for k, v in summary.items() if k.startswith("n_")})
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        nested = nested_values(best.params)
        dotted = {f"{s}.{k}": v for s, kv in nested.items() for k, v in kv.items()}
        summary.update(best_value=best.value, best_trial=best.number, best_params=dotted,
                       best_run_id=best.user_attrs.get(RUN_ID_ATTR), best_model_uri=best.user_attrs.get(MODEL_URI_ATTR))
        mlflow.log_params({f"best.{k}": v for k, v in dotted.items()})
        mlflow.log_metric(f"best_{cfg.metric}", best.value)
        mlflow.set_tags({"optuna.best_trial": str(best.number), BEST_RUN_TAG: summary["best_run_id"] or ""})
        _write_best(params, study, best, nested)
    with tempfile.TemporaryDirectory(prefix="kfer-tune-plots-") as tmp:
        made = _plots(study, Path(tmp))
        study.trials_dataframe().to_csv(Path(tmp) / "trials.csv", index=False)
        mlflow.log_artifacts(tmp, "optuna")
    summary["plots"] = made
    files.write_json(params.path(params.paths.tune_summary), summary)
    if not complete:
        raise TuneError(f"no trial of study {study.study_name} completed ({counts}): no best params to write")
    sets = " ".join(f"-S {k}={v}" for k, v in summary["best_params"].items())
    log.info("tune: best trial %d %s %.4f %s (MLflow run %s) -> %s\n  apply: kfer tune --apply   or: dvc exp run %s"
             "\n  register its model: kfer register --tuned", summary["best_trial"], cfg.metric,
             summary["best_value"], summary["best_params"], summary["best_run_id"],
             params.rel(params.path(params.paths.tune_best)), sets)
    return summary


def _write_best(params: Params, study, best, nested: dict) -> None:
    header = (f"# Best trial of Optuna study {study.study_name}: trial {best.number}, {params.tune.metric} = "
              f"{best.value:.6g} (MLflow run {best.user_attrs.get(RUN_ID_ATTR)}).\n"
              "# Written by `kfer tune`; apply to params.yaml with `kfer tune --apply`.\n")
    with files.atomic_file(params.path(params.paths.tune_best)) as fh:
        fh.write(header + yaml.safe_dump(nested, sort_keys=False, allow_unicode=True))


def _plots(study, out: Path) -> list[str]:
    """Optuna's matplotlib plots as PNG; a plot that the study cannot support yet (too few trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    made = []
    for name, fn in (("optimization_history", ovm.plot_optimization_history),
                     ("param_importances", ovm.plot_param_importances),
                     ("parallel_coordinate", ovm.plot_parallel_coordinate),
                     ("slice", ovm.plot_slice),
                     ("intermediate_values", ovm.plot_intermediate_values)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            first = ax.flat[0] if isinstance(ax, np.ndarray) else ax
            first.figure.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
            made.append(name)
        except Exception as exc:  # noqa: BLE001 - e.g. importances need 2+ complete trials
            log.info("tune: plot %s skipped: %s", name, exc)
        finally:
            plt.close("all")
    return made


# --- applying the result -----------------------------------------------------------------------------------

def _round_trip_yaml():
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)  # this repository's style: params.yaml round-trips unchanged
    y.representer.add_representer(
        type(None), lambda r, d: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def apply_best(params: Params, params_file: str | os.PathLike) -> dict[str, tuple[Any, Any]]:
    """Write ``paths.tune_best`` into ``params_file`` (keeps comments and layout); returns {key: (old, new)}."""
    best_file = params.path(params.paths.tune_best)
    if not best_file.exists():
        raise TuneError(f"{best_file} not found: run `kfer tune` (or dvc repro tune) first")
    best = yaml.safe_load(best_file.read_text(encoding="utf-8")) or {}
    path = Path(params_file)
    y = _round_trip_yaml()
    doc = y.load(path.read_text(encoding="utf-8"))
    changed: dict[str, tuple[Any, Any]] = {}
    for section, values in best.items():
        if section not in doc or not isinstance(values, dict):
            raise TuneError(f"{best_file}: section {section!r} is not in {path}")
        for key, value in values.items():
            old = doc[section].get(key)
            if old != value:
                doc[section][key] = value
                changed[f"{section}.{key}"] = (old, value)
    buf = io.StringIO()
    y.dump(doc, buf)
    Params.model_validate(yaml.safe_load(buf.getvalue()))  # never write an invalid params file
    with files.atomic_file(path) as fh:
        fh.write(buf.getvalue())
    return changed
