"""One trial and the loop that runs them: the searched values, the trial's params, its training and MLflow child
run, its report to Optuna (pruning), and a worker's loop up to the study's budget."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kfer import selection, tracking
from kfer.config import Params
from kfer.data.augment import OnTheFlyAugment
from kfer.data.pixels import decoded_images
from kfer.training.tune.data import trial_rows, trial_table, validation_table
from kfer.training.tune.study import (
    MAX_CONSECUTIVE_FAILURES,
    MODEL_URI_ATTR,
    PARENT_TAG,
    RUN_ID_ATTR,
    STATE_TAG,
    STUDY_TAG,
    SURPLUS_ATTR,
    TRIAL_TAG,
    WORKER_ATTR,
    TuneError,
    counts,
    fail_stale,
    is_surplus,
)

log = logging.getLogger("kfer.training.tune")


#: Optuna parameter name -> (params.yaml section, key)
SEARCHED: dict[str, tuple[str, str]] = {
    "kernel_initializer": ("model", "kernel_initializer"),
    "head_units": ("model", "head_units"),
    "strength": ("augment", "strength"),
    "learning_rate": ("train", "learning_rate"),
    "label_policy": ("data", "label_policy"),
    "min_agreement": ("data", "min_agreement"),
}

# --- one trial ---------------------------------------------------------------------------------------------

def suggest(trial, params: Params) -> dict[str, Any]:
    """The trial's values for the searched params (Optuna names, see :data:`SEARCHED`)."""
    space = params.tune.space
    values = {
        "kernel_initializer": trial.suggest_categorical("kernel_initializer", list(space.kernel_initializer)),
        "head_units": trial.suggest_categorical("head_units", list(space.head_units)),
        "strength": trial.suggest_float("strength", *space.strength),
        "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
    }
    if space.label_policy is not None:  # the label search, when asked for (tune.space; off by default)
        values["label_policy"] = trial.suggest_categorical("label_policy", list(space.label_policy))
    if space.min_agreement is not None:
        values["min_agreement"] = trial.suggest_int("min_agreement", *space.min_agreement)
    return values


def nested_values(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"head_units": 256, ...}`` -> ``{"model": {"head_units": 256}, ...}`` (params.yaml's layout)."""
    out: dict[str, dict[str, Any]] = {}
    for name, (section, key) in SEARCHED.items():
        if name in values:
            v = values[name]
            out.setdefault(section, {})[key] = v.item() if isinstance(v, np.generic) else v
    return out


def with_values(params: Params, values: dict[str, Any]) -> Params:
    """The params of one trial: the searched values set, ``train.monitor`` = ``tune.metric`` (so the kept
    epoch, early stopping and the LR schedule follow the objective) and ``train.epochs`` = ``tune.epochs`` when
    that is set."""
    over = nested_values(values)
    over.setdefault("train", {})["monitor"] = params.tune.metric
    if params.tune.epochs is not None:
        over["train"]["epochs"] = params.tune.epochs
    return params.updated(over)



@dataclass
class Context:
    params: Params
    study_name: str
    parent_run_id: str
    train_df: pd.DataFrame
    val_df: pd.DataFrame
    pixels: tuple[np.ndarray, np.ndarray] | None = None  # train_df's images decoded (tune.pixel_cache)
    init: Any = None  # train.init_from's model (kfer.training.train.InitWeights): every trial starts from its weights


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


def _is_best_so_far(study, value: float, metric: str) -> bool:
    try:
        best = study.best_value  # COMPLETE trials only: the running one is not among them yet
    except ValueError:
        return True
    return selection.at_least_as_good(value, best, metric)


def _train_trial(trial, p: Params, ctx: Context, workdir: Path) -> float:
    import optuna

    from kfer.training.fit import calibrate, fit_score_log, publish, strip_for_serving
    from kfer.training.inputs import class_weights, make_dataset

    metric = p.tune.metric
    table, pixels = trial_rows(p, ctx.train_df, ctx.pixels)
    augment = OnTheFlyAugment(p, table, p.augment.strength, fresh=p.train.fresh_augmentation)  # as kfer train
    train_ds = make_dataset(p, table, training=True, augment=augment, pixels=pixels)
    val_ds = make_dataset(p, ctx.val_df, training=False)
    weights = class_weights(p, table) if p.train.class_weights else None
    reporter = _reporter(trial, metric, p.train.epochs)
    fitted = fit_score_log(p, train_ds, val_ds, weights, workdir, n_train=len(table), n_val=len(ctx.val_df),
                           metric=metric, extra_callbacks=[reporter], verbose=0, init=ctx.init,
                           stopped_at=lambda: reporter.pruned_epoch)
    if not fitted.scored:
        best_so_far = selection.best_value(fitted.history[metric], metric)  # what the median pruner compared
        raise optuna.TrialPruned(f"epoch {reporter.pruned_epoch + 1}: best {metric} so far "
                                 f"{best_so_far:.4f} is worse than the median of finished trials")
    value = fitted.metrics[f"best_{metric}"]
    if not math.isfinite(value):
        raise FloatingPointError(f"{metric} of trial {trial.number} is {value}")
    if _is_best_so_far(trial.study, value, metric):  # the study's best so far: keep its model, registrable
        served = strip_for_serving(fitted.model, p)
        temperature = calibrate(served, p, val_ds, ctx.val_df["label"])["temperature"]
        uris = publish(served, p, val_ds, temperature=temperature)  # the ONNX export checked on val faces
        trial.set_user_attr(MODEL_URI_ATTR, uris["model_uri"])
    return value


class SurplusTrial(RuntimeError):
    """The trial started when the budget was already taken (see :func:`kfer.training.tune.study.is_surplus`)."""


def objective(trial, ctx: Context, budget: int | None = None) -> float:
    """Optuna's objective for one trial: the trial's best ``tune.metric``, trained on its suggested values in a
    nested MLflow run tagged with its study and number (``optuna.TrialPruned`` when the pruner stops it). With
    ``budget``, a trial started when other workers' trials had taken the budget's last place ends at once
    (:class:`SurplusTrial`), without training."""
    import keras
    import mlflow
    import optuna

    if budget is not None and is_surplus(trial.study, trial.number, budget):
        trial.set_user_attr(SURPLUS_ATTR, True)
        raise SurplusTrial(f"trial {trial.number} started when another worker's trial had taken the last place of "
                           f"the budget ({budget}): ended without training")
    values = suggest(trial, ctx.params)
    p = with_values(ctx.params, values)
    worker = tracking.owner_tag()  # host:pid:start, as the runs' kfer.owner tag
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

def work(ctx: Context, study, budget: int, deadline: float | None) -> int:
    """Run trials until the study has ``budget`` COMPLETE + PRUNED trials or ``deadline`` passes.

    While other workers' running trials would fill the budget, wait: they finish, or their heartbeat goes
    stale and they end FAIL, and the budget is then completed here. A trial started at the same moment as
    another worker's last one gives way (:func:`kfer.training.tune.study.is_surplus`): the budget is exact. Returns the
    number of trials run.
    """
    from optuna.trial import TrialState

    poll = min(5.0, float(ctx.params.tune.heartbeat_interval))
    ran = fails = 0
    waiting = False
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            log.info("tune: time budget reached")
            break
        fail_stale(study)
        n = counts(study)
        done = n.get("COMPLETE", 0) + n.get("PRUNED", 0)
        if done >= budget:
            break
        if done + n.get("RUNNING", 0) >= budget:
            if not waiting:
                log.info("tune: %d trial(s) running elsewhere would fill the budget: waiting for them to end (a "
                         "killed worker's trial ends FAIL %d s after its last heartbeat)", n["RUNNING"],
                         ctx.params.tune.grace_period)
            waiting = True
            time.sleep(poll)
            continue
        waiting = False
        finished: list = []
        study.optimize(lambda t: objective(t, ctx, budget), n_trials=1, catch=(Exception,),
                       callbacks=[lambda s, t: finished.append(t)], gc_after_trial=True)
        if finished and finished[-1].user_attrs.get(SURPLUS_ATTR):
            continue  # not run, not a failure: the loop now waits for the budget's running trials
        ran += 1
        if finished and finished[-1].state == TrialState.FAIL:
            fails += 1
            if fails >= MAX_CONSECUTIVE_FAILURES:
                raise TuneError(f"{fails} trials in a row failed (last: trial {finished[-1].number}); see the log")
        else:
            fails = 0
    return ran


def context(params: Params, study_name: str, parent_run_id: str) -> Context:
    from kfer.training.init import load as load_init

    val_df = validation_table(params)
    if val_df.empty:
        raise TuneError("the val split is empty: check split ratios (split.val) and the split report")
    table = trial_table(params)
    pixels = decoded_images(params, table) if params.tune.pixel_cache else None
    return Context(params, study_name, parent_run_id, table, val_df, pixels, load_init(params))

