"""Worker processes on one study: each its own GPU (``CUDA_VISIBLE_DEVICES``, memory growth), CPU threads,
storage connection, sampler and MLflow client."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

from kfer import files, tracking
from kfer.config import Params
from kfer.training.tune.study import open_study
from kfer.training.tune.trials import context, work

log = logging.getLogger("kfer.training.tune")

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
    os.environ.pop("MLFLOW_RUN_ID", None)  # under `mlflow run`: that run is the parent's, not this worker's
    logging.basicConfig(level=spec["log_level"], format="%(levelname)s %(name)s[w%(process)d]: %(message)s")
    if tf_before:
        log.warning("tune: TensorFlow was already imported in worker %d before CUDA_VISIBLE_DEVICES was set: "
                    "its GPU assignment may not apply", spec["worker"])
    signal.signal(signal.SIGTERM, tracking.raise_terminated)
    gpus = _worker_tensorflow(spec["threads"])
    log.info("tune: worker %d (pid %d): CUDA_VISIBLE_DEVICES=%s (%s); TensorFlow sees %d GPU(s)%s; %d CPU "
             "thread(s)", spec["worker"], os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
             "inherited" if spec.get("cuda_visible_devices") is None else "assigned", len(gpus),
             ", memory growth on" if gpus else "", spec["threads"])
    params = Params.model_validate(spec["params"])
    params._root = Path(spec["root"])
    study = open_study(params, spec["storage"], spec["study_name"], worker=spec["worker"])
    ctx = context(params, study.study_name, spec["parent_run_id"])
    tracking.setup(params, params.tune.experiment)
    work(ctx, study, spec["budget"], None if spec["timeout"] is None else time.monotonic() + spec["timeout"])


def spawn_workers(params: Params, study, url: str, parent_run_id: str, workers: int, budget: int,
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


