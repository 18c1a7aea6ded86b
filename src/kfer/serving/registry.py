"""``kfer register``: put the best training run's photo model in the Model Registry under the alias ``champion``.

The best run is chosen by a VALIDATION metric (``best_<train.monitor>``, logged by the training stage) among the
FINISHED runs of ``train.experiment`` that logged a photo model (tag :data:`kfer.tracking.MODEL_URI_TAG`) and were
trained on the current data lineage (:func:`data_lineage`: the same raw data and the same ``splits.csv`` as the
workspace's ``*.dvc`` files and ``dvc.lock``), so that their validation metrics were measured on the same faces;
``any_data`` (``kfer register --any-data``) drops that condition.
Test metrics are copied onto the version for information only; they never choose. Registering the same run
again reuses its version (no duplicate) and only re-points the alias and refreshes the tags.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from kfer import selection, tracking
from kfer.catalog import Catalog
from kfer.config import Params
from kfer.errors import UserError

log = logging.getLogger(__name__)

CHAMPION = "champion"
RUN_ID_TAG = "kfer.run_id"
SELECTED_BY_TAG = "kfer.selected_by"
LINEAGE_PREFIXES = ("git.", "data.", "dvc.")
ANY_DATA_FLAG = "--any-data"
_MODEL_ID_URI = re.compile(r"^models:/(m-[0-9a-f]+)/?$")


class RegistryError(UserError):
    """Nothing (or nothing valid) to register; the message says why."""


def selection_metric(params: Params, metric: str | None = None) -> tuple[str, bool]:
    """The run metric that picks the champion and whether higher is better.

    Default ``best_<train.monitor>``. Only validation metrics (``best_val_*`` / ``val_*``) are accepted:
    choosing by a test metric would leak the test set into model selection.
    """
    name = metric or f"best_{params.train.monitor}"
    if not (name.startswith("best_val_") or name.startswith("val_")):
        raise RegistryError(f"refusing to select by {name!r}: use a validation metric (best_val_* or val_*), "
                            "never a test metric")
    return name, not selection.lower_is_better(name)


def _eligible(run: Run) -> bool:
    return run.info.status == RunStatus.to_string(RunStatus.FINISHED) and bool(
        run.data.tags.get(tracking.MODEL_URI_TAG))


def data_lineage(params: Params) -> dict[str, str]:
    """The current data lineage: the run tags (see :func:`kfer.tracking.lineage_tags`) that a run must carry, with
    these values, for its validation metrics to be comparable with a run trained now.

    They are the raw data hash of every ``*.dvc`` file at the root (``dvc.data.dvc``) and the hash of
    ``paths.splits`` in ``dvc.lock`` (``dvc.split.data/splits.csv``): the same photos and the same persons in the
    validation split. Code and training params are not part of it (choosing among them is the point). Raises
    :class:`RegistryError` when ``dvc.lock`` records no hash of ``paths.splits`` (nothing to compare with).
    """
    tags = tracking.lineage_tags(params)
    splits = Path(params.paths.splits).as_posix()  # as dvc.yaml's ${paths.splits} writes it into dvc.lock
    raw = {k: v for k, v in tags.items() if k.startswith("dvc.") and k.endswith(".dvc") and "/" not in k}
    split = {k: v for k, v in tags.items() if k.startswith("dvc.") and k.endswith(f".{splits}") and k not in raw}
    if not split:
        raise RegistryError(f"cannot tell the current data lineage: {params.rel(params.root / 'dvc.lock')} records "
                            f"no hash of {splits} (run `dvc repro split`), or pass {ANY_DATA_FLAG}")
    return {**raw, **split}


def on_lineage(run: Run, lineage: dict[str, str]) -> bool:
    """Whether ``run`` was trained on ``lineage`` (every tag present with the same value)."""
    return all(run.data.tags.get(k) == v for k, v in lineage.items())


def _describe(lineage: dict[str, str]) -> str:
    return ", ".join(f"{k}={v[:8]}" for k, v in sorted(lineage.items()))


def _all_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def best_run(params: Params, metric: str | None = None, client: MlflowClient | None = None,
             any_data: bool = False) -> Run:
    """The FINISHED run with a photo model and the best ``metric`` (ties: the most recent), among the runs of the
    current data lineage (:func:`data_lineage`) unless ``any_data``."""
    client = client or MlflowClient()
    name, higher = selection_metric(params, metric)
    exp = client.get_experiment_by_name(params.train.experiment)
    if exp is None:
        raise RegistryError(f"no MLflow experiment {params.train.experiment!r} in {client.tracking_uri}: "
                            "train a model first (dvc repro / kfer train)")
    runs = [r for r in _all_runs(client, exp.experiment_id) if _eligible(r)]
    if not runs:
        raise RegistryError(f"no FINISHED run of experiment {params.train.experiment!r} has a logged photo "
                            f"model (tag {tracking.MODEL_URI_TAG}); train a model first")
    if not any_data:
        lineage = data_lineage(params)
        current = [r for r in runs if on_lineage(r, lineage)]
        if not current:
            raise RegistryError(f"none of the {len(runs)} eligible runs of {params.train.experiment!r} was trained "
                                f"on the current data ({_describe(lineage)}): train one, or pass {ANY_DATA_FLAG} "
                                "to choose among runs on any data")
        if len(current) < len(runs):
            log.info("register: %d of %d eligible runs are on the current data lineage (%s); the others are "
                     "ignored (%s includes them)", len(current), len(runs), _describe(lineage), ANY_DATA_FLAG)
        runs = current
    scored = [r for r in runs if name in r.data.metrics]
    if not scored:
        raise RegistryError(f"none of the {len(runs)} eligible runs of {params.train.experiment!r} logged "
                            f"the metric {name!r}")
    sign = 1.0 if higher else -1.0
    return max(scored, key=lambda r: (sign * r.data.metrics[name], r.info.start_time or 0))


def version_tags(run: Run, selected_by: str | None) -> dict[str, str]:
    """Validation metrics, test metrics (informational) and the data lineage of ``run``."""
    tags = {RUN_ID_TAG: run.info.run_id}
    if selected_by:
        tags[SELECTED_BY_TAG] = selected_by
    for key, value in sorted(run.data.metrics.items()):
        if key.startswith(("best_val_", "test_")):
            tags[key] = f"{value:.6g}"
    for key, value in sorted(run.data.tags.items()):
        if key.startswith(LINEAGE_PREFIXES):
            tags[key] = value
    return tags


def _existing_version(client: MlflowClient, name: str, run_id: str, source: str) -> ModelVersion | None:
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    same = [v for v in versions if v.source == source and (v.run_id in (None, "", run_id))]
    return min(same, key=lambda v: int(v.version)) if same else None


def _create_version(client: MlflowClient, name: str, source: str, run_id: str, tags: dict[str, str]) -> ModelVersion:
    try:
        client.create_registered_model(
            name, description="Korean facial-expression recognition: photo in, one row per face out (kfer).")
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    m = _MODEL_ID_URI.match(source)
    if m:  # a LoggedModel (MLflow 3): keep the run lineage and the model id on the version
        return client.create_model_version(name, source=source, run_id=run_id, tags=tags, model_id=m.group(1))
    import mlflow  # runs:/ and other URIs: let MLflow resolve them

    return mlflow.register_model(source, name, tags=tags)


def tuned_run(params: Params) -> tuple[str, str]:
    """The MLflow run id of the last study's best trial (from ``paths.tune_summary``) and how it was chosen."""
    import json

    path = Catalog(params).tune_summary
    if not path.is_file():
        raise RegistryError(f"{params.rel(path)} is absent: run `kfer tune` (or `dvc repro tune`) first")
    summary = json.loads(path.read_text(encoding="utf-8"))
    if not summary.get("best_run_id"):
        raise RegistryError(f"{params.rel(path)} names no best trial run (no trial of study "
                            f"{summary.get('study_name')!r} completed with a logged model)")
    return summary["best_run_id"], (f"best trial {summary.get('best_trial')} of Optuna study "
                                    f"{summary.get('study_name')} by {summary.get('metric')}")


def _warn_other_lineage(params: Params, run: Run, selected_by: str) -> None:
    """An explicitly chosen run (``--run-id``, ``--tuned``) is registered whatever its data; say so when that data
    is not the current lineage (nothing is said when the current lineage is unknown)."""
    try:
        lineage = data_lineage(params)
    except RegistryError:
        return
    if not on_lineage(run, lineage):
        theirs = {k: run.data.tags.get(k, "-") for k in lineage}
        log.warning("register: run %s (%s) was not trained on the current data (%s; the run has %s): registering "
                    "it anyway", run.info.run_id, selected_by, _describe(lineage), _describe(theirs))


def register(params: Params, run_id: str | None = None, metric: str | None = None,
             tuned: bool = False, any_data: bool = False) -> ModelVersion:
    """Register a run's photo model under ``train.registered_model`` and point the alias ``champion`` at it.

    Without ``run_id`` the best eligible run of the current data lineage is chosen (of any data with
    ``any_data``; see :func:`best_run`); with ``tuned`` the best trial of the last ``kfer tune`` study (see
    :func:`tuned_run`). An explicit or tuned run is registered whatever its data (a warning says when it is not
    the current lineage). Idempotent: a run that already has a version reuses it. Returns the (refreshed) model
    version.
    """
    import mlflow

    if tuned and run_id:
        raise RegistryError("give a run id or ask for the tuned best trial, not both")
    mlflow.set_tracking_uri(tracking.tracking_uri(params))  # the registry lives in the same store
    client = MlflowClient()
    name = params.train.registered_model
    selected_by = "explicit run id"
    if tuned:
        run_id, selected_by = tuned_run(params)
    if run_id is None:
        run = best_run(params, metric, client, any_data=any_data)
        selected_by, _ = selection_metric(params, metric)
        if any_data:
            selected_by += " (any data)"
    else:
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if tuned:  # e.g. a summary written on another machine, or a store deleted since
                raise RegistryError(
                    f"{params.rel(Catalog(params).tune_summary)} names run {run_id}, which is not in "
                    f"this MLflow store ({client.tracking_uri}): run `dvc repro tune` (or `kfer tune`) here, "
                    "then `kfer register --tuned`") from None
            raise RegistryError(f"run {run_id!r} not found in {client.tracking_uri}") from exc
        if run.info.status != RunStatus.to_string(RunStatus.FINISHED):
            raise RegistryError(f"run {run_id} is {run.info.status}, not FINISHED: refusing to register it")
        if not run.data.tags.get(tracking.MODEL_URI_TAG):
            raise RegistryError(f"run {run_id} has no photo model (tag {tracking.MODEL_URI_TAG})")
        if not any_data:
            _warn_other_lineage(params, run, selected_by)
    source = run.data.tags[tracking.MODEL_URI_TAG]
    rid = run.info.run_id
    tags = version_tags(run, selected_by)

    version = _existing_version(client, name, rid, source)
    if version is None:
        version = _create_version(client, name, source, rid, tags)
        log.info("registered %s version %s from run %s (%s)", name, version.version, rid, source)
    else:
        log.info("run %s is already %s version %s: reusing it", rid, name, version.version)
        for key, value in tags.items():
            client.set_model_version_tag(name, version.version, key, value)
    client.set_registered_model_alias(name, CHAMPION, version.version)
    log.info("alias %s@%s -> version %s", name, CHAMPION, version.version)
    card = model_card(rid)
    if card is None:
        log.warning("run %s has no %s: the version has no description (run `kfer train` and `kfer evaluate`)",
                    rid, tracking.MODEL_CARD)
    else:
        client.update_model_version(name, version.version, description=card)
    return client.get_model_version(name, version.version)


def model_card(run_id: str) -> str | None:
    """The run's model card (the ``model_card.md`` artifact that train logs and evaluate completes), or None."""
    import mlflow

    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{tracking.MODEL_CARD}")
    except (MlflowException, OSError):
        return None


def scorecard(params: Params, run_id: str, metric: str | None = None) -> tuple[str, dict[str, float]]:
    """What ``kfer register`` prints of the run it registered: a line with its validation score (``metric``,
    default ``best_<train.monitor>``) and test accuracy, and all the run's metrics (for the behaviour checks that
    ``kfer evaluate`` logged)."""
    metrics = MlflowClient(tracking.tracking_uri(params)).get_run(run_id).data.metrics
    name, _ = selection_metric(params, metric)
    scores = [f"{k} {metrics[k]:.4f}" for k in (name, "test_accuracy") if k in metrics]
    return ", ".join(scores) or f"no {name} logged", metrics
