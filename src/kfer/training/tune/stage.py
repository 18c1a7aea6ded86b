"""The ``tune`` stage, what ``kfer tune`` runs: the study, its parent MLflow run, the trials in this process or in
worker processes, then the summary (the package's docstring says how each part works)."""

from __future__ import annotations

import logging
import time

from kfer import tracking
from kfer.config import Params
from kfer.training.tune.data import check_label_search, validation_label_name
from kfer.training.tune.report import finish
from kfer.training.tune.study import FINGERPRINT_ATTR, STUDY_TAG, TuneError, counts, open_study, redact, storage_url
from kfer.training.tune.trials import context, work
from kfer.training.tune.workers import spawn_workers

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
