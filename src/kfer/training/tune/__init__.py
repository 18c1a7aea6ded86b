"""The ``tune`` stage: an Optuna search over the original work's design choices, tracked in MLflow.

Searched (ranges in ``params.yaml`` → ``tune.space``): ``model.kernel_initializer``, ``model.head_units``,
``augment.strength`` and ``train.learning_rate`` (log-uniform). Everything else is fixed by params.yaml.

**Data.** A trial trains on the *cropped* train split (``splits.csv`` rows with ``split == train``), never on
the augmented folder: each epoch every image appears once as itself and ``augment.copies`` times augmented on the
fly at the trial's strength by :class:`kfer.data.augment.OnTheFlyAugment`, the function and generator of the
``augment`` stage (with ``train.fresh_augmentation`` new draws each epoch, as ``kfer train``; without it the stage's
very bytes, which a test compares). Decoded pixels come from the store (``tune.pixel_cache``). The trial then runs
the fit → score → log step of ``kfer train`` (:func:`kfer.training.fit.fit_score_log`): its objective is
``tune.metric`` (default macro-F1) of the best epoch's model as it is served, on the val split. The test split is
never read.

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

**Layout.** :mod:`.study` (storage, sampler, pruner, fingerprint), :mod:`.data` (the trial's images),
:mod:`.trials` (one trial, the worker loop), :mod:`.workers` (processes, GPUs), :mod:`.report` (parent run,
DVC outputs), :mod:`.apply` (``--apply``); this file runs the stage. A parent run left RUNNING by a killed
``kfer tune`` (SIGKILL, the OOM killer) on this host is ended KILLED by the next invocation.
"""

from __future__ import annotations

import logging
import time

from kfer import tracking
from kfer.config import Params
from kfer.training.tune.apply import apply_best
from kfer.training.tune.data import check_label_search, trial_table, validation_label_name
from kfer.training.tune.report import finish
from kfer.training.tune.study import (
    BEST_RUN_TAG,
    FINGERPRINT_ATTR,
    MODEL_URI_ATTR,
    RUN_ID_ATTR,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    WORKER_ATTR,
    TuneError,
    counts,
    fingerprint,
    open_study,
    portable_url,
    redact,
    storage_url,
)
from kfer.training.tune.trials import (
    SEARCHED,
    context,
    nested_values,
    suggest,
    with_values,
    work,
)
from kfer.training.tune.workers import (
    gpu_assignment,
    parse_visible_devices,
    spawn_workers,
    visible_gpu_ids,
)

__all__ = [
    "BEST_RUN_TAG", "FINGERPRINT_ATTR", "MODEL_URI_ATTR", "RUN_ID_ATTR", "SEARCHED", "STATE_TAG", "STUDY_TAG",
    "TRIAL_TAG", "WORKER_ATTR", "TuneError", "apply_best", "fingerprint",
    "gpu_assignment",
    "nested_values", "open_study", "parse_visible_devices", "portable_url", "redact", "run_tune", "spawn_workers",
    "storage_url", "suggest", "trial_table", "visible_gpu_ids", "with_values", "work",
]

log = logging.getLogger("kfer.training.tune")


def run_tune(
    params: Params,
    n_trials: int | None = None,
    timeout: float | None = None,
    workers: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
) -> dict:
    """Run (or continue) the study; write ``paths.tune_best`` and ``paths.tune_summary``; return the summary."""
    from kfer.training.inputs import split_table
    from kfer.training.train import log_datasets

    cfg = params.tune
    check_label_search(params)  # before the study: a range the split made impossible is one line
    budget = n_trials or cfg.n_trials
    timeout = cfg.timeout_s if timeout is None else timeout
    workers = workers or cfg.workers
    url = storage_url(params, storage)
    study = open_study(params, url, study_name, worker=0)
    name = study.study_name
    n = counts(study)
    log.info("tune: study %s in %s: %s; budget %d COMPLETE+PRUNED, %d worker(s)%s; val scored against the %s "
             "label", name, redact(url), n or "new", budget, workers, f", {timeout:g} s" if timeout else "",
             validation_label_name(params))
    tags = {"kfer.stage": "tune", STUDY_TAG: name, "optuna.storage": redact(url), "optuna.budget": str(budget),
            "optuna.workers": str(workers), FINGERPRINT_ATTR: study.user_attrs.get(FINGERPRINT_ATTR, "")}
    for run_id in tracking.close_orphaned_runs(params, cfg.experiment, "tune"):
        log.warning("tune: parent run %s of a killed kfer tune was left RUNNING: ended KILLED", run_id)
    t0 = time.monotonic()
    with tracking.tracked_run(params, f"tune-{name}", tags=tags, experiment=cfg.experiment) as run:
        ctx = context(params, name, run.info.run_id)
        log_datasets(params, {"train": (split_table(params, "train"), params.paths.splits, "training"),
                              "val": (ctx.val_df, params.paths.splits, "validation")})
        error: BaseException | None = None
        try:
            if workers == 1:
                work(ctx, study, budget, None if timeout is None else t0 + timeout)
            else:
                codes = spawn_workers(params, study, url, run.info.run_id, workers, budget, timeout)
                if any(codes):
                    error = TuneError(f"worker exit codes {codes}: see the log above")
        except Exception as exc:  # noqa: BLE001 - still write what the study has, then fail
            error = exc
        try:
            summary = finish(params, study, url, budget, time.monotonic() - t0, run.info.run_id)
        except TuneError:
            if error is None:
                raise
            log.exception("tune: could not summarize the study")
        if error is not None:
            raise error
    return summary
