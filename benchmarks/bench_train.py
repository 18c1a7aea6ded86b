#!/usr/bin/env python
"""Training throughput: our ResNet50 vs ``keras.applications.ResNet50``, and the tf.data input pipeline vs memory.

Three measurements, printed side by side in one run (all in this process, same TensorFlow session):

(a) **model** — training images/s of ``kfer.training.model.build_resnet(S, 7, head_units=0,
    kernel_initializer="glorot_uniform")`` (default depth [3, 4, 6, 3] and width 64, i.e. the same backbone as
    Keras') against ``keras.applications.ResNet50(weights=None, input_shape=(S, S, 1), classes=7)``. Both get
    the same random batch (float32 in 0..255; ours rescales it inside the model with one ``Rescaling`` layer,
    Keras' does not), the same optimizer (Adam 1e-3), loss (categorical cross-entropy), batch size and number
    of steps, fed from memory (``Dataset.from_tensors(batch).repeat()``, tf.data autotune off: with it on, TF
    2.21 sometimes stalls when an iterator is deleted, see docs/performance.md). Printed both for whole ``fit``
    calls and for the median step. Target: ours / keras >= 0.95.

(c) **input pipeline** — at ``--c-size`` (224, AI Hub's crop size) gray: ``--c-n-images`` PNGs (512 smooth random
    "faces", ~30 KB each like real 224-px kfer crops) and a table (path, label) in a temporary project (the
    repository's params.yaml with overrides), a model trained fed by ``kfer.training.inputs.make_dataset(params,
    table, training=True)`` (files: shuffle, ``train.decode_workers`` parallel read + PNG decode calls, batch,
    prefetch; ``--decode-workers`` overrides params.yaml's ``auto``) and by the same images decoded in memory
    with the same shuffle (``from_tensor_slices → cache → shuffle → batch → prefetch``); the script first checks
    that both give the same batches (first epoch, pixel for pixel). The small model (``--small-blocks``,
    ``--small-width``: a fast model exposes the pipeline), ``--c-models default`` for the params.yaml model (on
    ``--c-n-images-default`` PNGs: ResNet50 at 224 px trains at ~1 img/s on 2 cores). Also the pipelines alone
    (one pass without a model). Target: pipeline / memory >= 0.95 (PASS/FAIL).

(e) **the real-faces recipe's input path vs in-memory tensors, training** — at each of ``--e-sizes`` (48, the
    recipe's crop, and 224, AI Hub's), the recipe's model and settings (``recipes/real-faces.yaml``: compact
    stem, blocks [2, 2, 2], width 16, fresh augmentation, ``augment.copies`` and ``strength``, batch 64, AdamW,
    class weights) trained on ``--e-n-images`` crops at 48 px (scaled by (48/S)² at other sizes, at least 128)
    fed the way ``kfer train`` feeds it (``augmentation`` → ``decoded_pixels`` → ``make_dataset(...,
    augment=OnTheFlyAugment, pixels=store)``: the crops decoded once into ``paths.pixel_store``, new copies drawn
    every epoch) against the same number of rows as float32 tensors in memory (nothing decoded or augmented).
    ``--e-epochs`` epochs per timed fit. Target: recipe / memory >= 0.9 at every size (PASS/FAIL).

Every timed segment is repeated ``--rounds`` times, alternating the order of the contenders each round, after
``--warmup`` untimed steps per contender (tracing, first-call allocations); the median is reported. For every
segment the CPU seconds used by *other* processes (``/proc/stat`` busy time minus this process' rusage) are
printed: more than a few CPU-s means another job competed with the measurement; such a segment is discarded
and re-run (``--max-other``, default 3 CPU-s; ``--tries``, default 3; before a retry it waits up to
``max(--wait-idle, 60)`` s for a quiet machine). ``kfer.training.fit.fit`` enables TensorFlow op determinism; so
does this script by default (``--no-op-determinism`` to measure without it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    Segment,
    alternating,
    ints,
    machine_info,
    median,
    usable_cores,
    wait_idle_cores,
    write_params,
)

N_CLASSES = 7
PARTS = "ace"


# --- timing helpers -------------------------------------------------------------------------------------------
def _step_clock(keras):
    class StepClock(keras.callbacks.Callback):
        """perf_counter at the start of fit and at the end of every train batch."""

        def __init__(self):
            super().__init__()
            self.t: list[float] = []

        def on_train_begin(self, logs=None):
            self.t = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            self.t.append(time.perf_counter())

    return StepClock()


def no_autotune(tf, ds):
    """The dataset with tf.data's autotuning thread off (AUTOTUNE parallelism and buffer sizes get static values).

    Why: with autotune on, deleting an iterator sometimes (intermittently) waits for the autotune thread's next
    wake-up, and those come at exponentially growing intervals since the iterator was created (10 ms, 20 ms,
    40 ms, ...). Keras makes a new iterator every epoch of a finite dataset (and drops it at the end of every fit
    call), so the stall can be as long as the epoch itself. See docs/performance.md.
    """
    opts = tf.data.Options()
    opts.autotune.enabled = False
    return ds.with_options(opts)


def _fit_timed(model, ds, images: int, batch: int, **fit_kw) -> dict:
    """One model.fit call. ``ips``: images / wall time of the whole call; ``step_ips``: batch / median step time
    (steps measured batch end to batch end, the first one from the start of fit), which ignores stalls outside
    the steps (fit set-up, epoch ends, iterator creation)."""
    import keras

    clock = _step_clock(keras)
    with Segment() as s:
        model.fit(ds, verbose=0, shuffle=False, callbacks=[clock], **fit_kw)
    t_end = time.perf_counter()
    steps = np.diff(clock.t)
    med = float(np.median(steps)) if len(steps) else float("nan")
    return {"wall": s.wall, "ips": images / s.wall, "own": s.own, "other": s.other,
            "step_s": med, "step_ips": batch / med, "n_steps": len(steps), "in_steps": float(steps.sum()),
            "before": clock.t[0] - s.t0, "after": t_end - clock.t[-1]}


RETRY = {"max_other": float("inf"), "tries": 1, "wait": 0.0}  # set from the command line


def interleaved(contenders: dict, rounds: int, label: str) -> dict[str, list[dict]]:
    """Run each contender once per round, alternating the order each round; print one line per segment.

    A segment during which other processes used more than ``--max-other`` CPU-s is discarded and re-run (after
    waiting up to ``--wait-idle`` s for a quiet machine), up to ``--tries`` times; the last try is kept.
    """
    names = list(contenders)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r, order in alternating(names, rounds):
        for n in order:
            for attempt in range(1, RETRY["tries"] + 1):
                res = contenders[n]()
                if res["other"] <= RETRY["max_other"] or attempt == RETRY["tries"]:
                    break
                print(f"  [{label}] round {r + 1} {n:>10}: discarded ({res['wall']:.2f} s, other processes used "
                      f"{res['other']:.1f} CPU-s), retry {attempt + 1}/{RETRY['tries']}", flush=True)
                wait_idle_cores(RETRY["wait"])
            results[n].append(res)
            flag = "   <-- other processes busy" if res["other"] > max(2.0, 0.1 * res["wall"]) else ""
            steps = (f"  median step {res['step_s']:.3f} s = {res['step_ips']:7.1f} img/s, outside steps "
                     f"{res['before']:.2f} s before + {res['after']:.2f} s after" if "step_s" in res else "")
            print(f"  [{label}] round {r + 1} {n:>10}: {res['wall']:7.2f} s  {res['ips']:8.1f} img/s{steps}  "
                  f"own CPU {res['own']:6.1f} s  other CPU {res['other']:5.1f} s{flag}", flush=True)
    return results


def _median(rs: list[dict], key: str = "ips") -> float:
    return median(r[key] for r in rs)


def _spread(rs: list[dict], key: str = "ips") -> str:
    v = [r[key] for r in rs]
    return f"{min(v):.1f}–{max(v):.1f}"


# --- (a) our ResNet50 vs keras.applications.ResNet50 -----------------------------------------------------------
def part_a(args, tf, keras) -> dict:
    from kfer.training.model import build_resnet

    S, B, steps = args.size, args.batch, args.steps
    print("== (a) model: ours vs keras.applications.ResNet50 ==")
    print(f"settings: input {S}x{S}x1 float32 uniform 0..255 (random, seed {args.seed}), {N_CLASSES} classes, "
          f"batch {B}, Adam(1e-3), CategoricalCrossentropy, metrics {'accuracy' if args.metrics else 'none'}, "
          f"{args.warmup} warm-up step(s) per model (untimed), then {args.rounds} alternating rounds of "
          f"{steps} steps each = {steps * B} images per round; one model.fit call per round, fed from memory "
          "(Dataset.from_tensors(batch).repeat(), tf.data autotune off)")
    rng = np.random.default_rng(args.seed)
    x = rng.uniform(0.0, 255.0, (B, S, S, 1)).astype(np.float32)
    y = np.eye(N_CLASSES, dtype=np.float32)[rng.integers(0, N_CLASSES, B)]
    # autotune off: part (a) compares models, so the feed must not add iterator-teardown stalls (see no_autotune)
    ds = no_autotune(tf, tf.data.Dataset.from_tensors((x, y)).repeat())

    keras.utils.set_random_seed(args.seed)
    models = {
        "ours": build_resnet(S, N_CLASSES, head_units=0, kernel_initializer="glorot_uniform"),
        "keras": keras.applications.ResNet50(weights=None, input_shape=(S, S, 1), classes=N_CLASSES),
    }
    for name, m in models.items():
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.CategoricalCrossentropy(),
                  metrics=["accuracy"] if args.metrics else None)
        print(f"  {name:>5}: {m.name}, {len(m.layers)} layers, {m.count_params():,} parameters")
    for name, m in models.items():
        with Segment() as s:
            m.fit(ds, steps_per_epoch=args.warmup, epochs=1, verbose=0, shuffle=False)
        print(f"  warm-up {name}: {args.warmup} step(s) in {s.wall:.1f} s (tracing included)", flush=True)

    contenders = {n: (lambda m=m: _fit_timed(m, ds, steps * B, B, steps_per_epoch=steps, epochs=1))
                  for n, m in models.items()}
    res = interleaved(contenders, args.rounds, "a")
    ours, ker = _median(res["ours"]), _median(res["keras"])
    ours_s, ker_s = _median(res["ours"], "step_ips"), _median(res["keras"], "step_ips")
    ratio, ratio_s = ours / ker, ours_s / ker_s
    out = {"ours": ours, "keras": ker, "ratio": ratio, "ours_step": ours_s, "keras_step": ker_s,
           "ratio_step": ratio_s, "res": res}
    print(f"  median, whole fit call: ours {ours:.1f} img/s (range {_spread(res['ours'])}), keras {ker:.1f} img/s "
          f"(range {_spread(res['keras'])}); ours/keras = {ratio:.3f} "
          f"(target >= 0.95: {'MET' if ratio >= 0.95 else 'NOT met'})")
    print(f"  median, per step:       ours {ours_s:.1f} img/s (range {_spread(res['ours'], 'step_ips')}), keras "
          f"{ker_s:.1f} img/s (range {_spread(res['keras'], 'step_ips')}); ours/keras = {ratio_s:.3f} "
          f"(target >= 0.95: {'MET' if ratio_s >= 0.95 else 'NOT met'})")
    print()
    del models
    keras.backend.clear_session()
    return out


# --- (c) tf.data pipeline vs memory at full size -------------------------------------------------------------
def _fake_faces(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random grayscale images and labels: an 8×8 random grid upscaled (bicubic) plus gaussian noise
    (sigma 4), so that PNGs compress like face crops: ~3.1 KB at 64 px (the demo's 64-px crops: 2.0-2.5 KB),
    ~30 KB at 224 px (kfer crops of the aihub_style_tfeid photos at 224 px: mean 29.2 KB, 25.9-33.5 KB)."""
    import cv2

    rng = np.random.default_rng(seed)
    imgs = np.empty((n, size, size), np.uint8)
    for i in range(n):
        low = rng.uniform(0, 255, (8, 8)).astype(np.float32)
        img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
        img += rng.normal(0, 4.0, (size, size)).astype(np.float32)
        imgs[i] = np.clip(img, 0, 255).astype(np.uint8)
    labels = rng.integers(0, N_CLASSES, n)
    return imgs, labels


def fake_faces_project(root: Path, args, model_over: dict, n_images: int, size: int, under: str = "augmented"):
    """params.yaml (repo's + overrides) and N PNGs + table under root; returns (params, table, images, labels).

    ``--decode-workers`` (if given) sets ``train.decode_workers``. The PNGs go to ``<paths.<under>>/train/<label>/``
    (``under="cropped"``: where the crop stage writes, so that the augment stage can run on them)."""
    import pandas as pd

    from kfer import files

    train = {"batch_size": args.batch, "epochs": 1}
    if args.decode_workers is not None:
        train["decode_workers"] = args.decode_workers
    # every path in params.yaml is relative to the folder holding it, so they all point into root
    params = write_params(root, {"seed": args.seed, "crop": {"image_size": size}, "train": train, "model": model_over})

    imgs, labels = _fake_faces(n_images, size, args.seed)
    names = params.class_names
    rows = []
    img_dir = params.path(getattr(params.paths, under)) / "train"
    for i, (img, lab) in enumerate(zip(imgs, labels, strict=True)):
        p = img_dir / names[lab] / f"img{i:05d}.png"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            files.write_png(p, img)
        rows.append({"path": params.rel(p), "label": names[lab]})
    table = pd.DataFrame(rows)
    return params, table, imgs, labels


def _race_feeds(feeds, params, table, args, epochs, n, B, steps, label):
    """The feeds alone (one pass each, no model: how fast can they deliver images?), then one model trained
    from each in alternating rounds after a warm-up; prints both. Returns (alone, fit results, median img/s)."""
    import keras

    from kfer.training.inputs import class_weights
    from kfer.training.model import build_from_params
    from kfer.training.schedule import compile_model

    def iterate(ds):
        with Segment() as s:
            k = sum(int(xb.shape[0]) for xb, _ in ds)
        return {"wall": s.wall, "ips": k / s.wall, "own": s.own, "other": s.other}

    for ds in feeds.values():
        iterate(ds)  # warm (file cache, tracing)
    alone = interleaved({k: (lambda ds=ds: iterate(ds)) for k, ds in feeds.items()}, args.rounds,
                        f"{label} no model, 1 pass")

    cw = class_weights(params, table) if args.class_weights else None
    keras.utils.set_random_seed(params.seed)
    model = compile_model(build_from_params(params), params)
    print(f"  model {model.name}: {model.count_params():,} parameters")
    for name, ds in feeds.items():
        with Segment() as s:
            model.fit(ds, steps_per_epoch=min(args.warmup, steps), epochs=1, class_weight=cw, verbose=0,
                      shuffle=False)
        print(f"  warm-up fed by {name}: {min(args.warmup, steps)} step(s) in {s.wall:.1f} s", flush=True)
    contenders = {k: (lambda ds=ds: _fit_timed(model, ds, epochs * n, B, epochs=epochs, class_weight=cw))
                  for k, ds in feeds.items()}
    res = interleaved(contenders, args.rounds, f"{label} train")
    med = {k: _median(v) for k, v in res.items()}
    print("  no model, median img/s: " + ", ".join(f"{k} {_median(v):.0f}" for k, v in alone.items()))
    print("  training median img/s (whole fit): " + ", ".join(
        f"{k} {med[k]:.1f} (range {_spread(res[k])})" for k in feeds))
    keras.backend.clear_session()
    return alone, res, med


def _memory_dataset(tf, imgs: np.ndarray, labels: np.ndarray, batch: int, seed: int):
    """The decoded images as make_dataset yields them (float32 (B, S, S, 1), one-hot), same shuffle: the global
    seed and the op seed are set as make_dataset sets them, over a buffer of the whole table, so the k-th epoch
    of each dataset is the same permutation."""
    x = imgs[..., None].astype(np.float32)
    y = np.eye(N_CLASSES, dtype=np.float32)[labels]
    tf.random.set_seed(seed)
    ds = (tf.data.Dataset.from_tensor_slices((x, y)).cache()
          .shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(batch).prefetch(tf.data.AUTOTUNE))
    return no_autotune(tf, ds)


def part_c(args, tf, keras, root: Path, variant: str) -> dict:
    from kfer.training.inputs import decode_workers, make_dataset

    S = args.c_size
    if variant == "small":
        model_over = {"blocks": args.small_blocks, "base_width": args.small_width}
        n_images, epochs = args.c_n_images, args.c_epochs
    else:
        model_over = {}
        n_images, epochs = args.c_n_images_default, args.c_epochs
    params, table, imgs, labels = fake_faces_project(root, args, model_over, n_images, size=S)
    m = params.model
    n, B = len(table), params.train.batch_size
    steps = -(-n // B)
    png_kb = np.array([params.path(p).stat().st_size for p in table["path"]]) / 1000
    workers = decode_workers(params)
    print(f"== (c) input pipeline vs memory at {S} px — {variant} model ==")
    print(f"settings: {n} PNGs {S}x{S} gray (mean {png_kb.mean():.1f} KB, {png_kb.min():.1f}-{png_kb.max():.1f} KB; "
          f"{png_kb.sum() / 1000:.1f} MB) in {root}; train.decode_workers {params.train.decode_workers!r} = "
          f"{workers} parallel read+decode call(s); model blocks {list(m.blocks)} width {m.base_width} head "
          f"{m.head_units}; batch {B} ({steps} steps/epoch), class weights {'on' if args.class_weights else 'off'}, "
          f"kfer compile_model; {epochs} epoch(s) = {epochs * n} images per timed fit, {args.rounds} alternating "
          "rounds")
    print("  contenders: pipeline = kfer.training.inputs.make_dataset(params, table, training=True) (files: read + PNG "
          "decode); memory = from_tensor_slices(the same images decoded).cache().shuffle(N).batch().prefetch()")

    # same batches: a fresh dataset of each, first epoch, element by element
    same = all(np.array_equal(xp.numpy(), xm.numpy()) and np.array_equal(yp.numpy(), ym.numpy())
               for (xp, yp), (xm, ym) in zip(make_dataset(params, table, training=True),
                                             _memory_dataset(tf, imgs, labels, B, params.seed), strict=True))
    print(f"  same batches (first epoch, pixel for pixel and label for label): {'yes' if same else 'NO'}")

    ds_pipe = make_dataset(params, table, training=True)
    ds_mem = _memory_dataset(tf, imgs, labels, B, params.seed)
    feeds = {"pipeline": ds_pipe, "memory": ds_mem}

    alone, res, med = _race_feeds(feeds, params, table, args, epochs, n, B, steps, f"c/{variant}")
    ratio = med["pipeline"] / med["memory"]
    ratio_step = _median(res["pipeline"], "step_ips") / _median(res["memory"], "step_ips")
    print(f"  pipeline/memory = {ratio:.3f} whole fit, {ratio_step:.3f} median step "
          f"(target >= 0.95: {'PASS' if ratio >= 0.95 else 'FAIL'})")
    print()
    return {"pipeline": med["pipeline"], "memory": med["memory"], "ratio": ratio, "ratio_step": ratio_step,
            "alone": {k: _median(v) for k, v in alone.items()}, "res": res, "same": same, "workers": workers,
            "n": n, "epochs": epochs, "png_kb": float(png_kb.mean())}


# --- (e) the recipe's input path (kfer train, fresh augmentation from the decoded store) vs memory, training ------
def part_e(args, tf, keras, root: Path, S: int) -> dict:
    """The real-faces recipe's model trained from ``kfer train``'s input path and from in-memory tensors."""
    from real_faces import RECIPE  # recipes/real-faces.yaml

    from kfer.data.augment import run_augment
    from kfer.training.inputs import (
        augmentation,
        class_weights,
        decoded_pixels,
        make_dataset,
        train_table,
    )
    from kfer.training.model import build_from_params
    from kfer.training.schedule import compile_model

    n_images = max(128, int(round(args.e_n_images * (48 / S) ** 2)))
    model_over = {k: v for k, v in RECIPE["model"].items() if k != "tta_flip"}
    params, table, _, _ = fake_faces_project(root, args, model_over, n_images, size=S, under="cropped")
    params = params.updated({
        "augment": {k: v for k, v in RECIPE["augment"].items() if k != "workers"},
        "train": {k: RECIPE["train"][k] for k in ("batch_size", "learning_rate", "optimizer", "weight_decay",
                                                  "label_smoothing", "mixup_alpha", "fresh_augmentation")}
        | {"epochs": args.e_epochs, "pixel_cache": True}})
    splits = table.assign(group=[f"p{i % 20:02d}" for i in range(len(table))], split="train")
    splits.to_csv(params.path(params.paths.splits), index=False)  # what the split stage would write
    run_augment(params)
    manifest = train_table(params)
    rows, fn = augmentation(params, manifest)  # as run_train: the crops, new copies every epoch
    with Segment() as s_store:
        pixels = decoded_pixels(params, rows)
    n, B, E = len(rows), params.train.batch_size, params.train.epochs
    steps = -(-n // B)
    store, which = pixels
    labels = np.array([params.class_names.index(lab) for lab in rows["label"]])
    feeds = {"recipe": (make_dataset(params, rows, training=True, augment=fn, pixels=pixels),
                        {"steps_per_epoch": steps}),  # one dataset of E epochs, as run_train fits it
             "memory": (_memory_dataset(tf, np.asarray(store[which])[..., 0], labels, B, params.seed), {})}
    cw = class_weights(params, rows) if params.train.class_weights else None
    keras.utils.set_random_seed(params.seed)
    model = compile_model(build_from_params(params), params)
    m = params.model
    print(f"== (e) the recipe's input path vs in-memory tensors at {S} px, training ==")
    print(f"settings: {len(table)} crops {S}x{S} gray in {root}, augment.copies {params.augment.copies} at strength "
          f"{params.augment.strength:g} = {n} rows an epoch, fresh copies every epoch; the crops decoded once into "
          f"{store.filename} in {s_store.wall:.2f} s; model stem {m.stem} blocks {list(m.blocks)} width "
          f"{m.base_width} head {m.head_units} ({model.count_params():,} parameters), {params.train.optimizer}, "
          f"batch {B}, class weights {'on' if cw else 'off'}; {E} epoch(s) = {E * n} images per timed fit, "
          f"{args.rounds} alternating rounds")
    print("  contenders: recipe = make_dataset(params, rows, training=True, augment=OnTheFlyAugment, "
          "pixels=decoded_pixels(...)) (kfer train's input with train.fresh_augmentation and train.pixel_cache); "
          "memory = from_tensor_slices(the rows' pixels as float32).cache().shuffle(N).batch().prefetch()")
    for name, (ds, kw) in feeds.items():
        with Segment() as s:
            model.fit(ds, epochs=1, **{**kw, "steps_per_epoch": min(args.warmup, steps)}, class_weight=cw,
                      verbose=0, shuffle=False)
        print(f"  warm-up fed by {name}: {min(args.warmup, steps)} step(s) in {s.wall:.1f} s", flush=True)
    contenders = {name: (lambda ds=ds, kw=kw: _fit_timed(model, ds, E * n, B, epochs=E, class_weight=cw, **kw))
                  for name, (ds, kw) in feeds.items()}
    res = interleaved(contenders, args.rounds, f"e {S} px train")
    med = {k: _median(v) for k, v in res.items()}
    ratio = med["recipe"] / med["memory"]
    print(f"  training median img/s: recipe {med['recipe']:.1f} (range {_spread(res['recipe'])}), memory "
          f"{med['memory']:.1f} (range {_spread(res['memory'])}); recipe/memory = {ratio:.3f} "
          f"(target >= 0.9: {'PASS' if ratio >= 0.9 else 'FAIL'})")
    print()
    keras.backend.clear_session()
    return {"ips": med, "ratio": ratio, "res": res, "n": n, "store_s": s_store.wall}


# --- main -----------------------------------------------------------------------------------------------------
def _workers(text: str):
    return "auto" if text.strip() == "auto" else int(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="a,c,e", help="any of a, c, e, comma-separated (default a,c,e; 'ace' too)")
    ap.add_argument("--size", type=int, default=64, help="(a) image side S (default 64)")
    ap.add_argument("--batch", type=int, default=32, help="(a, c) batch size (default 32)")
    ap.add_argument("--steps", type=int, default=12, help="(a) timed steps per round (default 12)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per contender (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed rounds, median reported (default 3)")
    ap.add_argument("--metrics", action="store_true", help="(a) compile both with an accuracy metric too")
    ap.add_argument("--small-blocks", type=ints, default=[1, 1, 1, 1], help="(c) small model blocks (1,1,1,1)")
    ap.add_argument("--small-width", type=int, default=16, help="(c) small model base width (16)")
    ap.add_argument("--c-size", type=int, default=224, help="(c) image side (default 224, AI Hub's)")
    ap.add_argument("--c-n-images", type=int, default=512, help="(c) number of PNGs, small model (default 512)")
    ap.add_argument("--c-models", default="small", help="(c) small, default or small,default (default small)")
    ap.add_argument("--c-n-images-default", type=int, default=64, help="(c) number of PNGs, default model (64)")
    ap.add_argument("--c-epochs", type=int, default=1, help="(c) epochs per timed fit (default 1)")
    ap.add_argument("--e-sizes", type=ints, default=[48, 224], help="(e) image sides (default 48,224)")
    ap.add_argument("--e-n-images", type=int, default=2048,
                    help="(e) crops at 48 px, scaled by (48/S)^2 at other sizes, at least 128 (default 2048)")
    ap.add_argument("--e-epochs", type=int, default=2, help="(e) epochs per timed fit (default 2)")
    ap.add_argument("--decode-workers", type=_workers, default=None,
                    help="(c) train.decode_workers: an integer >= 1 or auto (default: params.yaml's)")
    ap.add_argument("--no-class-weights", dest="class_weights", action="store_false",
                    help="(c) fit without class_weight (run_train passes it by default)")
    ap.add_argument("--no-op-determinism", dest="op_determinism", action="store_false")
    ap.add_argument("--threads", default=None, help="INTRA,INTER TensorFlow thread pools (default: TF's)")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="wait up to this many seconds for other processes to go quiet before measuring")
    ap.add_argument("--max-other", type=float, default=3.0,
                    help="discard and re-run a timed segment during which other processes used more CPU-s (3)")
    ap.add_argument("--tries", type=int, default=3, help="attempts per timed segment (default 3)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder of (c, e)")
    args = ap.parse_args(argv)
    parts = set(args.parts.replace(",", "").replace(" ", ""))  # "a,c", "ac", "c", ...
    if not parts or parts - set(PARTS):
        ap.error(f"--parts: expected a, c and/or e, got {args.parts!r} (parts b and d were removed: their runs "
                 "are in docs/performance.md)")

    import tensorflow as tf

    if args.threads:
        intra, inter = ints(args.threads)
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    import keras

    keras.mixed_precision.set_global_policy("float32")
    if args.op_determinism:
        tf.config.experimental.enable_op_determinism()
    for ln in machine_info():
        print(ln)
    threads = [tf.config.threading.get_intra_op_parallelism_threads(),
               tf.config.threading.get_inter_op_parallelism_threads()]
    print(f"tensorflow   : threads intra_op {threads[0] or 'all cores'}, inter_op {threads[1] or 'all cores'}; "
          f"GPUs {len(tf.config.list_physical_devices('GPU'))}; op determinism "
          f"{'on (as kfer.training.fit.fit)' if args.op_determinism else 'off'}\n")
    RETRY.update(max_other=args.max_other, tries=max(1, args.tries), wait=max(args.wait_idle, 60.0))
    wait_idle_cores(args.wait_idle)

    t0 = time.perf_counter()
    a = part_a(args, tf, keras) if "a" in parts else None
    c: dict[str, dict] = {}
    e: dict[int, dict] = {}
    if parts & {"c", "e"}:
        tmp = Path(tempfile.mkdtemp(prefix="kfer-bench-train-"))
        try:
            if "c" in parts:
                for variant in [v.strip() for v in args.c_models.split(",") if v.strip()]:
                    c[variant] = part_c(args, tf, keras, tmp / f"c-{variant}", variant)
            if "e" in parts:
                for size in args.e_sizes:
                    e[size] = part_e(args, tf, keras, tmp / f"e-{size}", size)
        finally:
            if args.keep:
                print(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)

    print("== summary (median images/s; higher is better) ==")
    print(f"S={args.size} (c: {args.c_size}) batch={args.batch} rounds={args.rounds} "
          f"op_determinism={args.op_determinism} decode_workers={args.decode_workers or 'params.yaml'} "
          f"nproc={usable_cores()} TF {tf.__version__}")
    segments = [rs for r in ([a] if a else []) + [*c.values(), *e.values()] for rs in r["res"].values()]
    if a:
        for what, key in (("whole fit calls", ""), ("median step", "_step")):
            ratio = a[f"ratio{key}"]
            print(f"(a) train, ours ResNet50 {a[f'ours{key}']:8.1f}   keras ResNet50 {a[f'keras{key}']:8.1f}   "
                  f"ours/keras {ratio:.3f}  target >= 0.95 {'MET' if ratio >= 0.95 else 'NOT met'}   ({what})")
    for variant, r in c.items():
        print(f"(c) train {args.c_size} px, {variant:>7} model: pipeline {r['pipeline']:8.1f}   memory "
              f"{r['memory']:8.1f}   pipeline/memory {r['ratio']:.3f} (median step {r['ratio_step']:.3f})  "
              f"target >= 0.95  {'PASS' if r['ratio'] >= 0.95 else 'FAIL'}   decode_workers {r['workers']}, "
              f"same batches {'yes' if r['same'] else 'NO'}; no model: pipeline {r['alone']['pipeline']:.0f}, "
              f"memory {r['alone']['memory']:.0f} img/s")
    for size, r in e.items():
        print(f"(e) train {size} px, the recipe: kfer train's input {r['ips']['recipe']:8.1f}   memory "
              f"{r['ips']['memory']:8.1f}   recipe/memory {r['ratio']:.3f}  target >= 0.9  "
              f"{'PASS' if r['ratio'] >= 0.9 else 'FAIL'}   ({r['n']} rows an epoch, store built in "
              f"{r['store_s']:.1f} s)")
    other = [x["other"] for rs in segments for x in rs]
    if other:
        print(f"other processes' CPU during timed segments: max {max(other):.1f} CPU-s, total {sum(other):.1f} CPU-s"
              + ("  (WARNING: contention, timings unreliable)" if max(other) > 2.0 else "  (quiet)"))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
