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

**Layout.** :mod:`.stage` runs the stage (:func:`kfer.training.tune.stage.run_tune`, what ``kfer tune`` calls),
:mod:`.study` (storage, sampler, pruner, fingerprint), :mod:`.data` (the trial's images), :mod:`.trials` (one
trial, the worker loop), :mod:`.workers` (processes, GPUs), :mod:`.report` (parent run, DVC outputs),
:mod:`.apply` (``--apply``: :func:`kfer.training.tune.apply.apply_best`). A parent run left RUNNING by a killed
``kfer tune`` (SIGKILL, the OOM killer) on this host is ended KILLED by the next invocation.
"""
