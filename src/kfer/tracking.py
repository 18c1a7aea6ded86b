"""Where the MLflow store is, how runs are named and ended, and the lineage tags every run carries.

Default store: a SQLite database and an artifact folder at the repository root (``paths.mlflow_db``,
``paths.mlflow_artifacts``), resolved to absolute paths so that runs started from ``dvc exp run --temp``, the
queue or another working directory land in the same store. ``MLFLOW_TRACKING_URI`` overrides it (a shared
tracking server). No training logic lives here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import RunStatus  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from kfer.config import Params, deep_merge  # noqa: E402

MODEL_URI_TAG = "kfer.model_uri"  # the photo model (pyfunc) logged by the run
MODEL_CARD = "model_card.md"  # each training run's model card (kfer.reporting.card; the registered description)
KERAS_URI_TAG = "kfer.keras_model_uri"


class Terminated(BaseException):
    """SIGTERM received (e.g. `dvc exp` queue cancel, a scheduler): the run ends KILLED."""


def store_root(params: Params) -> Path:
    """Where the MLflow and Optuna stores live: the root, except inside a ``dvc exp run --temp`` or queued
    experiment, which runs in a copy of the repository under ``<repo>/.dvc/tmp/exps/`` that DVC deletes
    afterwards; there the stores are the main repository's (DVC names it in ``DVC_ROOT``), so no run is
    lost with the copy."""
    main = os.environ.get("DVC_ROOT")
    root = params.root.resolve()
    if not main:
        return params.root
    main_path = Path(main).resolve()
    temp = main_path / ".dvc" / "tmp"
    if not root.is_relative_to(temp):
        return params.root
    copy = next((d for d in (root, *root.parents) if (d / ".dvc").is_dir() and d != main_path), None)
    return main_path / root.relative_to(copy) if copy is not None and root.is_relative_to(copy) else main_path


def store_path(params: Params, p: Path | str) -> Path:
    """A store path of ``paths`` (``mlflow_db``, ``mlflow_artifacts``, ``optuna_db``) resolved against
    :func:`store_root`."""
    p = Path(p)
    return p if p.is_absolute() else store_root(params) / p


def tracking_uri(params: Params) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(store_path(params, params.paths.mlflow_db).resolve())


def artifact_location(params: Params) -> str | None:
    """Artifact root for new experiments in the default store; a tracking server decides its own."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return store_path(params, params.paths.mlflow_artifacts).resolve().as_uri()


def setup(params: Params, experiment: str | None = None) -> str:
    """Point MLflow at the project's store and make sure the experiment exists; returns its id."""
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri, art = tracking_uri(params), artifact_location(params)
    mlflow.set_tracking_uri(uri)
    if user_uri is None:  # MLflow 3 exports the URI it is given; keep the variable meaning "the user's override"
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    name = experiment or params.train.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = mlflow.create_experiment(name, artifact_location=art)
        except MlflowException:  # another process created it first
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


OWNER_TAG = "kfer.owner"  # host:pid:start-time of the process that holds the run open


def _start_time(pid: int) -> str | None:
    """The process' start time in clock ticks since boot (field 22 of /proc/PID/stat): with the pid, it names one
    process, even after the pid is reused; ``None`` when there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_tag() -> str:
    """``host:pid:start`` of this process, for :func:`close_orphaned_runs`."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid()) or '?'}"


def _owner_gone(owner: str) -> bool:
    """Whether the process named by an :func:`owner_tag` is gone. Only a process on this host can be checked
    (another host's run is never closed from here); a pid that now belongs to another process counts as gone."""
    import socket

    host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or start == "?":
        return False
    return _start_time(int(pid)) != start


def close_orphaned_runs(params: Params, experiment: str, stage: str) -> list[str]:
    """End KILLED every RUNNING run of ``stage`` (tag ``kfer.stage``) in ``experiment`` whose owning process on
    this host is gone (killed by SIGKILL or the OOM killer, which no handler sees). Returns their run ids."""
    exp_id = setup(params, experiment)
    client = mlflow.MlflowClient()
    runs = client.search_runs([exp_id], f"tags.`kfer.stage` = '{stage}' and attributes.status = 'RUNNING'",
                              max_results=1000)
    closed = []
    for run in runs:
        owner = run.data.tags.get(OWNER_TAG)
        if owner and _owner_gone(owner):
            client.set_tag(run.info.run_id, "kfer.end_reason", f"owner process {owner} gone (killed)")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            closed.append(run.info.run_id)
    return closed


def flat_params(params: Params) -> dict[str, str]:
    """params.yaml flattened to dotted keys (``model.head_units``); lists and the label map as JSON text."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and not prefix.endswith("label_map"):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (list, tuple, dict)):
            out[prefix] = json.dumps(node, ensure_ascii=False)
        else:
            out[prefix] = str(node)

    walk("", params.model_dump(mode="json"))
    return out


def _git(root: Path, *args: str, strip: bool = True) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() if strip else proc.stdout


_INTERPOLATION = re.compile(r"\$\{\s*([^${}\s]+)\s*\}")


def _lookup(ctx: Any, dotted: str) -> Any:
    node = ctx
    for key in dotted.split("."):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise KeyError(dotted)
    return node


def _stage_outputs(params: Params) -> list[Path]:
    """The paths that the stages of ``dvc.yaml`` write (``outs``, ``metrics``, ``plots``), absolute. DVC deletes
    them before it runs a stage, so they say nothing of what a run was started from. ``${...}`` resolves, as DVC
    does, from params.yaml and the file's own ``vars``; an entry that does not resolve is left out (and so still
    counts as dirty). No dvc.yaml, or one that cannot be read: no paths."""
    root = params.root
    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), dict):
        return []
    ctx: dict = params.model_dump(mode="json")
    with contextlib.suppress(OSError, yaml.YAMLError):
        raw = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
        if isinstance(raw, dict):
            ctx = deep_merge(ctx, raw)
    for var in spec.get("vars") or []:
        if isinstance(var, dict):
            ctx = deep_merge(ctx, var)

    def resolve(text: str) -> str | None:
        try:
            return _INTERPOLATION.sub(lambda m: str(_lookup(ctx, m.group(1))), text)
        except KeyError:
            return None

    outputs: list[Path] = []
    for stage in spec["stages"].values():
        if not isinstance(stage, dict):
            continue
        stage = stage.get("do", stage) if isinstance(stage.get("do"), dict) else stage  # foreach/matrix
        wdir = resolve(str(stage.get("wdir", "."))) or "."
        for kind in ("outs", "metrics", "plots"):
            entries = stage.get(kind) or []
            for entry in entries if isinstance(entries, list) else []:
                path = next(iter(entry), None) if isinstance(entry, dict) else entry
                resolved = resolve(path) if isinstance(path, str) else None
                if resolved:
                    outputs.append(root / wdir / resolved)
    return outputs


def _dirty(params: Params) -> bool | None:
    """Whether a tracked file differs from HEAD (``None``: git cannot tell). Outputs of the DVC stages do not
    count: ``dvc repro`` deletes a stage's git-tracked outputs (reports, metrics) before it runs the stage, which
    changes nothing the run is made from; code, params.yaml, dvc.yaml, dvc.lock and *.dvc files do count.
    Untracked and ignored files never count."""
    root = params.root
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=no", strip=False)  # paths from the top
    if not status:
        return None if status is None else False
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None:
        return None
    top_path = Path(top).resolve()
    outs = {out.resolve() for out in _stage_outputs(params)}
    outs = {out.relative_to(top_path).as_posix() for out in outs if out.is_relative_to(top_path)}

    def is_output(path: str) -> bool:
        return any(path == o or path.startswith(o.rstrip("/") + "/") for o in outs)

    fields = status.split("\0")
    i = 0
    while i < len(fields):
        entry = fields[i]
        i += 1
        if len(entry) < 4:
            continue
        code, paths = entry[:2], [entry[3:]]
        if "R" in code or "C" in code:  # a rename or copy: the source path follows
            paths.append(fields[i] if i < len(fields) else "")
            i += 1
        if not all(is_output(p) for p in paths):
            return True
    return False


def lineage_tags(params: Params) -> dict[str, str]:
    """git commit + dirty flag (see :func:`_dirty`), the raw data hash from data.dvc and the data stage outputs'
    hashes from dvc.lock."""
    root = params.root
    tags: dict[str, str] = {}
    commit = _git(root, "rev-parse", "HEAD")
    tags["git.commit"] = commit or "unknown"
    dirty = _dirty(params)
    tags["git.dirty"] = "unknown" if dirty is None else str(dirty).lower()

    for dvc_file in sorted(root.glob("*.dvc")):
        with contextlib.suppress(OSError, yaml.YAMLError, KeyError, TypeError, IndexError):
            out = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["outs"][0]
            tags[f"dvc.{dvc_file.name}"] = str(out.get("md5"))
    lock = root / "dvc.lock"
    if lock.exists():
        with contextlib.suppress(OSError, yaml.YAMLError, AttributeError, TypeError):
            stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
            for stage, info in stages.items():
                for out in info.get("outs", []) or []:
                    tags[f"dvc.{stage}.{out['path']}"] = str(out.get("md5"))
    return tags


@contextlib.contextmanager
def tracked_run(
    params: Params,
    run_name: str | None = None,
    *,
    run_id: str | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
    log_params: bool = True,
    experiment: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, with ``run_id``) a run that always ends in a final state.

    FINISHED on success, FAILED on an exception, KILLED on Ctrl-C or SIGTERM — never left RUNNING.
    """
    exp_id = setup(params, experiment)
    if not nested and run_id is None:
        _check_outer_run(exp_id)
    previous = None
    if not nested:  # SIGTERM handling belongs to the outermost run
        try:
            previous = signal.signal(signal.SIGTERM, raise_terminated)
        except ValueError:  # not the main thread
            previous = None
    run = mlflow.start_run(run_id=run_id, run_name=run_name if run_id is None else None, nested=nested)
    try:
        if run_id is None:
            mlflow.set_tags({**lineage_tags(params), OWNER_TAG: owner_tag(), **(tags or {})})
            if log_params:
                _log_params(flat_params(params))
        else:
            mlflow.set_tags({OWNER_TAG: owner_tag(), **(tags or {})})
        yield run
    except (KeyboardInterrupt, Terminated):
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _check_outer_run(exp_id: str) -> None:
    """Under ``mlflow run`` (``MLFLOW_RUN_ID`` set), kfer logs into the run MLflow opened, which must be in
    kfer's experiment and store: otherwise one clear line says what to add, instead of MLflow's mismatch error."""
    from kfer.errors import UserError

    outer = os.environ.get("MLFLOW_RUN_ID")
    if not outer:
        return
    try:
        run = mlflow.MlflowClient().get_run(outer)
    except MlflowException:
        raise UserError(f"MLFLOW_RUN_ID={outer} (set by `mlflow run`) is not a run of kfer's store "
                        f"{mlflow.get_tracking_uri()}: unset MLFLOW_TRACKING_URI or point both at one store") from None
    if run.info.experiment_id != exp_id:
        theirs = mlflow.MlflowClient().get_experiment(run.info.experiment_id).name
        ours = mlflow.MlflowClient().get_experiment(exp_id).name
        raise UserError(f"`mlflow run` opened run {outer} in experiment {theirs!r}, but kfer logs this stage into "
                        f"{ours!r}: add --experiment-name {ours} to the mlflow run command")


def raise_terminated(signum, frame):  # noqa: ARG001
    raise Terminated(f"signal {signum}")


def _log_params(flat: dict[str, str]) -> None:
    items = list(flat.items())
    for i in range(0, len(items), 90):  # MLflow accepts at most 100 params per batch
        mlflow.log_params(dict(items[i : i + 90]))
