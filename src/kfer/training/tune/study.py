"""Where a study lives and how it is opened: the storage URL, heartbeats and stale trials, the seeded sampler,
the pruner, and the fingerprint that keeps a study to one data/params version."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

from kfer import files, tracking
from kfer.catalog import Catalog
from kfer.config import Params
from kfer.errors import KferError

log = logging.getLogger("kfer.training.tune")

STATE_TAG = "kfer.trial_state"
TRIAL_TAG = "optuna.trial_number"
STUDY_TAG = "optuna.study_name"
PARENT_TAG = "mlflow.parentRunId"
BEST_RUN_TAG = "kfer.best_run_id"
RUN_ID_ATTR = "mlflow_run_id"
MODEL_URI_ATTR = "model_uri"
WORKER_ATTR = "worker"
SURPLUS_ATTR = "surplus"  # a trial that found the budget taken when it started: ended FAIL without training
FINGERPRINT_ATTR = "kfer.fingerprint"
MAX_CONSECUTIVE_FAILURES = 3


class TuneError(KferError, RuntimeError):
    """The study cannot run or produced nothing usable; the message says why (one line, exit 1)."""


# --- storage and study -------------------------------------------------------------------------------------

def storage_url(params: Params, override: str | None = None) -> str:
    """``--storage``, else ``tune.storage``, else ``sqlite:///<absolute paths.optuna_db>``."""
    url = override or params.tune.storage
    if url:
        return url
    return "sqlite:///" + str(tracking.store_path(params, params.paths.optuna_db).resolve())


def redact(url: str) -> str:
    """The URL without its password (for logs and tags)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: show nothing secret
        return url.split("@")[-1] if "@" in url else url


def portable_url(params: Params, url: str) -> str:
    """The URL as written into committed or shared outputs: the default SQLite file relative to the repository
    root (``sqlite:///optuna.db``), never one machine's absolute path; any other URL without its password."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url.removeprefix("sqlite:///"))
        base = tracking.store_root(params).resolve()
        if path.is_absolute() and path.resolve().is_relative_to(base):
            return "sqlite:///" + path.resolve().relative_to(base).as_posix()
    return redact(url)


def fingerprint(params: Params) -> str:
    """A short hash of what makes trials comparable: ``splits.csv`` and every param a trial does not search.

    Budget, workers, storage, heartbeat settings, experiment names and worker counts are left out.
    """
    d = params.model_dump(mode="json")
    drop = {
        "crop": {"workers", "chunksize"},
        "augment": {"workers", "strength"},
        "model": {"kernel_initializer", "head_units"},
        "train": {"learning_rate", "experiment", "registered_model", "monitor", "decode_workers", "resume",
                  "onnx_tolerance", "onnx_check_faces"},  # the export's check shapes no trial
    }
    fixed = {"seed": d["seed"], "classes": d["classes"],
             "tune": {"metric": d["tune"]["metric"], "space": d["tune"]["space"], "epochs": d["tune"]["epochs"],
                      "validation_label": d["tune"]["validation_label"]},
             # the label policy's keys, less those the trials search
             "data": {k: d["data"][k] for k in ("label_policy", "min_agreement", "soft_uploader_weight")
                      if d["tune"]["space"].get(k) is None}}
    for section, keys in drop.items():
        fixed[section] = {k: v for k, v in d[section].items() if k not in keys}
    splits = Catalog(params).splits
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


def counts(study) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(t.state.name for t in study.get_trials(deepcopy=False)))


def is_surplus(study, trial_number: int, budget: int) -> bool:
    """Whether the just-started trial ``trial_number`` would take the study past ``budget`` COMPLETE + PRUNED
    trials. Workers check the count before they start a trial; two that check at the same moment both start
    one, and the RUNNING trials with the lowest numbers keep the free places: the others give way (the trial
    numbers come from the storage, so exactly the right number gives way, whatever the timing)."""
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    running = sorted(t.number for t in trials if t.state.name == "RUNNING")
    return trial_number not in running[:max(budget - done, 0)]


def fail_stale(study) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)

