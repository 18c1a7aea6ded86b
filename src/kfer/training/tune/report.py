"""The parent run's report of a study (counts, best trial, trials table, Optuna's plots) and the DVC outputs
``paths.tune_best``, ``paths.tune_summary`` and its headline numbers ``paths.tune_headline`` (DVC metrics)."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kfer import files
from kfer.catalog import Catalog
from kfer.config import Params
from kfer.training.tune.data import validation_label_name
from kfer.training.tune.study import (
    BEST_RUN_TAG,
    MODEL_URI_ATTR,
    RUN_ID_ATTR,
    TuneError,
    counts,
    portable_url,
)
from kfer.training.tune.trials import nested_values

log = logging.getLogger("kfer.training.tune")

def finish(params: Params, study, url: str, budget: int, seconds: float, parent_run_id: str) -> dict:
    """Parent-run logging and the DVC outputs, from the whole study (all invocations and workers)."""
    import mlflow
    from optuna.trial import TrialState

    cfg = params.tune
    n = counts(study)
    summary: dict[str, Any] = {
        "study_name": study.study_name, "storage": portable_url(params, url), "metric": cfg.metric,
        # the label val is scored against, the same for every trial (tune.validation_label)
        "validation_label": validation_label_name(params),
        "direction": cfg.direction, "budget": budget,
        **{f"n_{s.lower()}": n.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")},
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
    Catalog(params).write_json("tune_summary", summary)
    Catalog(params).write_json("tune_headline",  # DVC metrics: best value, complete trials
                     {**({"best": summary["best_value"]} if complete else {}), "trials": summary["n_complete"]})
    if not complete:
        raise TuneError(f"no trial of study {study.study_name} completed ({n}): no best params to write")
    sets = " ".join(f"-S {k}={v}" for k, v in summary["best_params"].items())
    log.info("tune: best trial %d %s %.4f %s (MLflow run %s) -> %s\n  apply: kfer tune --apply   or: dvc exp run %s"
             "\n  register its model: kfer register --tuned", summary["best_trial"], cfg.metric,
             summary["best_value"], summary["best_params"], summary["best_run_id"],
             params.rel(Catalog(params).tune_best), sets)
    return summary


def _write_best(params: Params, study, best, nested: dict) -> None:
    header = (f"# Best trial of Optuna study {study.study_name}: trial {best.number}, {params.tune.metric} = "
              f"{best.value:.6g} (MLflow run {best.user_attrs.get(RUN_ID_ATTR)}).\n"
              "# Written by `kfer tune`; apply to params.yaml with `kfer tune --apply`.\n")
    with files.atomic_file(Catalog(params).tune_best) as fh:
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


