#!/usr/bin/env python
"""Training throughput: our ResNet50 vs ``keras.applications.ResNet50``, and the tf.data input pipeline vs memory.

Three measurements, side by side in one process (TensorFlow op determinism on, as ``kfer.training.fit.fit``):

(a) **model**: training images/s of ``build_resnet(S, 7, head_units=0, kernel_initializer="glorot_uniform")``
    (depth [3, 4, 6, 3], width 64: Keras' backbone) against ``keras.applications.ResNet50(weights=None)``, the same
    random batch, Adam 1e-3, batch size and steps, fed from memory with tf.data autotune off (with it on, TF 2.21
    sometimes stalls when an iterator is deleted; see docs/performance.md). Whole ``fit`` calls and the median
    step. Target: ours / keras ≥ 0.95.

(c) **input pipeline**: at ``--c-size`` gray, ``--c-n-images`` smooth random PNGs (~30 KB at 224 px, like kfer's
    crops) in a temporary project; a model trained fed by ``make_dataset(params, table, training=True)`` (files:
    ``train.decode_workers`` parallel read + decode; ``--decode-workers`` overrides) and by the same images in
    memory with the same shuffle, checked first to give the same batches pixel for pixel; also each feed alone (one
    pass, no model). The small model (blocks [1, 1, 1, 1], width 16) exposes the pipeline; ``--c-models default``
    adds params.yaml's (on ``--c-n-images-default`` PNGs). Target: pipeline / memory ≥ 0.95.

(e) **the real-faces recipe's input path**: at each of ``--e-sizes``, ``recipes/real-faces.yaml``'s model and
    settings trained on ``--e-n-images`` crops (at 48 px; scaled by (48/S)², at least 128) fed as ``kfer train``
    feeds it (the crops decoded once into the pixel store, fresh augmented copies every epoch) against the same
    rows as float32 tensors in memory. Target: recipe / memory ≥ 0.9 at every size.

Every timed segment runs ``--rounds`` times in alternating order after ``--warmup`` untimed steps; medians are
reported with the CPU-s *other* processes used; a segment above ``--max-other`` is re-run (``--tries``, after
waiting up to ``max(--wait-idle, 60)`` s for a quiet machine).
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
    Segment, alternating, ints, machine_info, median, usable_cores, wait_idle, write_params)

N_CLASSES = 7
PARTS = "ace"
SMALL_MODEL = {"blocks": [1, 1, 1, 1], "base_width": 16}
RETRY = {"max_other": float("inf"), "tries": 1, "wait": 0.0}  # set from the command line


def no_autotune(tf, ds):
    """The dataset with tf.data's autotune off: with it on, deleting an iterator (Keras makes one per epoch) may
    wait for the autotune thread's next, ever later wake-up (docs/performance.md)."""
    opts = tf.data.Options()
    opts.autotune.enabled = False
    return ds.with_options(opts)


def _fit_timed(model, ds, images: int, batch: int, **fit_kw) -> dict:
    """One model.fit call: ``ips`` over the whole call, ``step_ips`` over the median step (batch end to batch end,
    the first from the start of fit: stalls outside the steps left out)."""
    import keras

    stamps: list[float] = []

    class StepClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            stamps.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            stamps.append(time.perf_counter())

    with Segment() as s:
        model.fit(ds, verbose=0, shuffle=False, callbacks=[StepClock()], **fit_kw)
    t_end = time.perf_counter()
    med = float(np.median(np.diff(stamps))) if len(stamps) > 1 else float("nan")
    return {"wall": s.wall, "ips": images / s.wall, "own": s.own, "other": s.other, "step_s": med,
            "step_ips": batch / med, "before": stamps[0] - s.t0, "after": t_end - stamps[-1]}


def interleaved(contenders: dict, rounds: int, label: str) -> dict[str, list[dict]]:
    """Each contender once per round, alternating the order; one line per segment. A segment disturbed by other
    processes (``--max-other``) is re-run after an idle wait, up to ``--tries`` times; the last try is kept."""
    results: dict[str, list[dict]] = {n: [] for n in contenders}
    for r, order in alternating(contenders, rounds):
        for n in order:
            for attempt in range(1, RETRY["tries"] + 1):
                res = contenders[n]()
                if res["other"] <= RETRY["max_other"] or attempt == RETRY["tries"]:
                    break
                print(f"  [{label}] round {r + 1} {n:>10}: discarded (other processes used {res['other']:.1f} CPU-s)"
                      f"; {wait_idle(RETRY['wait'], 12.5)}", flush=True)
            results[n].append(res)
            steps = (f"  median step {res['step_s']:.3f} s = {res['step_ips']:7.1f} img/s, outside steps "
                     f"{res['before']:.2f} + {res['after']:.2f} s" if "step_s" in res else "")
            busy = "   <-- other processes busy" if res["other"] > max(2.0, 0.1 * res["wall"]) else ""
            print(f"  [{label}] round {r + 1} {n:>10}: {res['wall']:7.2f} s {res['ips']:8.1f} img/s{steps}  own CPU "
                  f"{res['own']:6.1f} s, other {res['other']:5.1f} s{busy}", flush=True)
    return results


def _med(rs: list[dict], key: str = "ips") -> float:
    return median(r[key] for r in rs)


def _range(rs: list[dict], key: str = "ips") -> str:
    return f"{_med(rs, key):.1f} ({min(r[key] for r in rs):.1f}–{max(r[key] for r in rs):.1f})"


def _warm_up(model, feeds: dict, steps: int, **fit_kw) -> None:
    for name, (ds, kw) in feeds.items():
        with Segment() as s:
            model.fit(ds, epochs=1, **{**kw, "steps_per_epoch": steps}, verbose=0, shuffle=False, **fit_kw)
        print(f"  warm-up fed by {name}: {steps} step(s) in {s.wall:.1f} s (tracing included)", flush=True)


# --- (a) our ResNet50 vs keras.applications.ResNet50 -----------------------------------------------------------
def part_a(args, tf, keras) -> dict:
    from kfer.training.model import build_resnet

    S, B, steps = args.size, args.batch, args.steps
    rng = np.random.default_rng(args.seed)
    x = rng.uniform(0.0, 255.0, (B, S, S, 1)).astype(np.float32)
    y = np.eye(N_CLASSES, dtype=np.float32)[rng.integers(0, N_CLASSES, B)]
    ds = no_autotune(tf, tf.data.Dataset.from_tensors((x, y)).repeat())
    keras.utils.set_random_seed(args.seed)
    models = {"ours": build_resnet(S, N_CLASSES, head_units=0, kernel_initializer="glorot_uniform"),
              "keras": keras.applications.ResNet50(weights=None, input_shape=(S, S, 1), classes=N_CLASSES)}
    print(f"== (a) model: ours vs keras.applications.ResNet50, {S}x{S}x1, batch {B}, Adam(1e-3), {steps} steps a "
          f"round, from memory ==")
    for name, m in models.items():
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.CategoricalCrossentropy())
        print(f"  {name:>5}: {len(m.layers)} layers, {m.count_params():,} parameters")
        _warm_up(m, {name: (ds, {})}, args.warmup)
    res = interleaved({n: (lambda m=m: _fit_timed(m, ds, steps * B, B, steps_per_epoch=steps, epochs=1))
                       for n, m in models.items()}, args.rounds, "a")
    out = {"ratio": _med(res["ours"]) / _med(res["keras"]),
           "ratio_step": _med(res["ours"], "step_ips") / _med(res["keras"], "step_ips"), "res": res}
    for what, key in (("whole fit", "ips"), ("per step", "step_ips")):
        out[key] = f"ours {_range(res['ours'], key)}, keras {_range(res['keras'], key)} img/s ({what})"
        print(f"  median {out[key]}")
    print()
    keras.backend.clear_session()
    return out


# --- (c) tf.data pipeline vs memory ------------------------------------------------------------------------------
def _fake_faces(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random gray images (an 8×8 random grid upscaled bicubic, plus noise of sigma 4: PNGs of ~3.1 KB at
    64 px and ~30 KB at 224 px, as kfer's crops) and labels."""
    import cv2

    rng = np.random.default_rng(seed)
    imgs = np.empty((n, size, size), np.uint8)
    for i in range(n):
        img = cv2.resize(rng.uniform(0, 255, (8, 8)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
        imgs[i] = np.clip(img + rng.normal(0, 4.0, (size, size)), 0, 255).astype(np.uint8)
    return imgs, rng.integers(0, N_CLASSES, n)


def fake_faces_project(root: Path, args, model_over: dict, n_images: int, size: int, under: str = "augmented"):
    """params.yaml (the repository's + overrides) and ``n_images`` PNGs under ``<paths.<under>>/train/<label>/``;
    returns (params, table, images, labels)."""
    import pandas as pd

    from kfer import files

    train = {"batch_size": args.batch, "epochs": 1}
    if args.decode_workers is not None:
        train["decode_workers"] = args.decode_workers
    params = write_params(root, {"seed": args.seed, "crop": {"image_size": size}, "train": train, "model": model_over})
    imgs, labels = _fake_faces(n_images, size, args.seed)
    rows = []
    for i, (img, lab) in enumerate(zip(imgs, labels, strict=True)):
        p = params.path(getattr(params.paths, under)) / "train" / params.class_names[lab] / f"img{i:05d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        files.write_png(p, img)
        rows.append({"path": params.rel(p), "label": params.class_names[lab]})
    return params, pd.DataFrame(rows), imgs, labels


def _memory_dataset(tf, imgs: np.ndarray, labels: np.ndarray, batch: int, seed: int):
    """The decoded images as make_dataset yields them (float32 (B, S, S, 1), one-hot), one pass in make_dataset's
    epoch-0 order (``stateless_shuffle`` of the row numbers seeded by (seed, 0)), gathered from tensors in memory;
    Keras re-iterates it each epoch in that order."""
    x = tf.constant(imgs[..., None].astype(np.float32))
    y = tf.constant(np.eye(N_CLASSES, dtype=np.float32)[labels])
    order = tf.random.experimental.stateless_shuffle(tf.range(len(imgs), dtype=tf.int64),
                                                     seed=tf.constant([seed, 0], tf.int64))
    ds = (tf.data.Dataset.from_tensor_slices(order).batch(batch)
          .map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx))).prefetch(tf.data.AUTOTUNE))
    return no_autotune(tf, ds)


def part_c(args, tf, keras, root: Path, variant: str) -> dict:
    from kfer.training.inputs import class_weights, decode_workers, make_dataset
    from kfer.training.model import build_from_params
    from kfer.training.schedule import compile_model

    n_images = args.c_n_images if variant == "small" else args.c_n_images_default
    params, table, imgs, labels = fake_faces_project(root, args, SMALL_MODEL if variant == "small" else {},
                                                     n_images, size=args.c_size)
    n, B, E = len(table), params.train.batch_size, args.c_epochs
    png_kb = np.array([params.path(p).stat().st_size for p in table["path"]]) / 1000
    print(f"== (c) input pipeline vs memory at {args.c_size} px, {variant} model ==")
    print(f"  {n} PNGs (mean {png_kb.mean():.1f} KB), decode_workers {decode_workers(params)}, batch {B}, class "
          f"weights, {E} epoch(s) per timed fit; pipeline = make_dataset(params, table, training=True), memory = "
          "the same images decoded, from_tensor_slices().cache().shuffle(N).batch().prefetch()")
    same = all(np.array_equal(xp.numpy(), xm.numpy()) and np.array_equal(yp.numpy(), ym.numpy())
               for (xp, yp), (xm, ym) in zip(make_dataset(params, table, training=True),
                                             _memory_dataset(tf, imgs, labels, B, params.seed), strict=True))
    print(f"  same batches (first epoch, pixel for pixel, label for label): {'yes' if same else 'NO'}")
    feeds = {"pipeline": make_dataset(params, table, training=True),
             "memory": _memory_dataset(tf, imgs, labels, B, params.seed)}

    def iterate(ds):  # the feed alone, one pass without a model
        with Segment() as s:
            k = sum(int(xb.shape[0]) for xb, _ in ds)
        return {"wall": s.wall, "ips": k / s.wall, "own": s.own, "other": s.other}

    for ds in feeds.values():
        iterate(ds)  # warm (file cache, tracing)
    alone = interleaved({k: (lambda ds=ds: iterate(ds)) for k, ds in feeds.items()}, args.rounds,
                        f"c/{variant} no model")
    cw = class_weights(params, table)
    keras.utils.set_random_seed(params.seed)
    model = compile_model(build_from_params(params), params)
    print(f"  model: {model.count_params():,} parameters")
    _warm_up(model, {k: (ds, {}) for k, ds in feeds.items()}, min(args.warmup, -(-n // B)), class_weight=cw)
    res = interleaved({k: (lambda ds=ds: _fit_timed(model, ds, E * n, B, epochs=E, class_weight=cw))
                       for k, ds in feeds.items()}, args.rounds, f"c/{variant} train")
    keras.backend.clear_session()
    out = {"ratio": _med(res["pipeline"]) / _med(res["memory"]), "res": res, "same": same,
           "ratio_step": _med(res["pipeline"], "step_ips") / _med(res["memory"], "step_ips"),
           "text": f"pipeline {_range(res['pipeline'])}, memory {_range(res['memory'])} img/s; no model: "
                   + ", ".join(f"{k} {_med(v):.0f}" for k, v in alone.items())}
    print(f"  median {out['text']}\n")
    return out


# --- (e) the recipe's input path (kfer train, fresh augmentation from the decoded store) vs memory ---------------
def part_e(args, tf, keras, root: Path, S: int) -> dict:
    from real_faces import RECIPE  # recipes/real-faces.yaml

    from kfer.data.augment import run_augment
    from kfer.training.inputs import augmentation, class_weights, decoded_pixels, make_dataset, train_table
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
    rows, fn = augmentation(params, train_table(params))  # as run_train: the crops, new copies every epoch
    with Segment() as s_store:
        pixels = decoded_pixels(params, rows)
    n, B, E = len(rows), params.train.batch_size, params.train.epochs
    store, which = pixels
    labels = np.array([params.class_names.index(lab) for lab in rows["label"]])
    feeds = {"recipe": (make_dataset(params, rows, training=True, augment=fn, pixels=pixels),
                        {"steps_per_epoch": -(-n // B)}),  # one dataset of E epochs, as run_train fits it
             "memory": (_memory_dataset(tf, np.asarray(store[which])[..., 0], labels, B, params.seed), {})}
    cw = class_weights(params, rows) if params.train.class_weights else None
    keras.utils.set_random_seed(params.seed)
    model = compile_model(build_from_params(params), params)
    print(f"== (e) the recipe's input path vs in-memory tensors at {S} px, training ==")
    print(f"  {len(table)} crops, {n} rows an epoch (fresh copies every epoch; store built in {s_store.wall:.2f} s), "
          f"{model.count_params():,} parameters, {params.train.optimizer}, batch {B}, {E} epoch(s) per timed fit")
    _warm_up(model, feeds, min(args.warmup, -(-n // B)), class_weight=cw)
    res = interleaved({name: (lambda ds=ds, kw=kw: _fit_timed(model, ds, E * n, B, epochs=E, class_weight=cw, **kw))
                       for name, (ds, kw) in feeds.items()}, args.rounds, f"e {S} px train")
    keras.backend.clear_session()
    out = {"ratio": _med(res["recipe"]) / _med(res["memory"]), "res": res,
           "text": f"recipe {_range(res['recipe'])}, memory {_range(res['memory'])} img/s; {n} rows an epoch"}
    print(f"  median {out['text']}\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="a,c,e", help="any of a, c, e (default a,c,e)")
    ap.add_argument("--size", type=int, default=64, help="(a) image side S")
    ap.add_argument("--batch", type=int, default=32, help="(a, c) batch size")
    ap.add_argument("--steps", type=int, default=12, help="(a) timed steps per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per contender")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed rounds, median reported")
    ap.add_argument("--c-size", type=int, default=224, help="(c) image side (default AI Hub's 224)")
    ap.add_argument("--c-n-images", type=int, default=512, help="(c) PNGs, small model")
    ap.add_argument("--c-models", default="small", help="(c) small, default or small,default")
    ap.add_argument("--c-n-images-default", type=int, default=64, help="(c) PNGs, default model")
    ap.add_argument("--c-epochs", type=int, default=1, help="(c) epochs per timed fit")
    ap.add_argument("--e-sizes", type=ints, default=[48, 224], help="(e) image sides (default 48,224)")
    ap.add_argument("--e-n-images", type=int, default=2048, help="(e) crops at 48 px, scaled by (48/S)^2")
    ap.add_argument("--e-epochs", type=int, default=2, help="(e) epochs per timed fit")
    ap.add_argument("--decode-workers", type=lambda t: t if t == "auto" else int(t), default=None,
                    help="(c) train.decode_workers: an integer or auto (default: params.yaml's)")
    ap.add_argument("--wait-idle", type=float, default=0.0, help="wait up to S s for a quiet machine first")
    ap.add_argument("--max-other", type=float, default=3.0,
                    help="re-run a timed segment during which other processes used more CPU-s (default 3)")
    ap.add_argument("--tries", type=int, default=3, help="attempts per timed segment")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder of (c, e)")
    args = ap.parse_args(argv)
    parts = set(args.parts.replace(",", "").replace(" ", ""))
    if not parts or parts - set(PARTS):
        ap.error(f"--parts: expected a, c and/or e, got {args.parts!r} (parts b and d were removed: their runs "
                 "are in docs/performance.md)")

    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy("float32")
    tf.config.experimental.enable_op_determinism()
    print("\n".join(machine_info()))
    RETRY.update(max_other=args.max_other, tries=max(1, args.tries), wait=max(args.wait_idle, 60.0))
    if args.wait_idle > 0:
        print(f"wait-idle    : {wait_idle(args.wait_idle, 12.5)}\n", flush=True)

    t0 = time.perf_counter()
    a = part_a(args, tf, keras) if "a" in parts else None
    c: dict[str, dict] = {}
    e: dict[int, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="kfer-bench-train-"))
    try:
        for variant in [v.strip() for v in args.c_models.split(",") if v.strip()] if "c" in parts else []:
            c[variant] = part_c(args, tf, keras, tmp / f"c-{variant}", variant)
        for size in args.e_sizes if "e" in parts else []:
            e[size] = part_e(args, tf, keras, tmp / f"e-{size}", size)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"== summary (median images/s; a: S={args.size}, c: {args.c_size} px; batch {args.batch}, {args.rounds} "
          f"rounds, nproc {usable_cores()}, TF {tf.__version__}) ==")
    verdict = {True: "PASS", False: "FAIL"}
    if a:
        print(f"(a) ours/keras {a['ratio']:.3f} whole fit, {a['ratio_step']:.3f} per step, target >= 0.95 "
              f"{verdict[a['ratio'] >= 0.95]}: {a['ips']}")
    for variant, r in c.items():
        print(f"(c) {variant} model: pipeline/memory {r['ratio']:.3f} (median step {r['ratio_step']:.3f}), target "
              f">= 0.95 {verdict[r['ratio'] >= 0.95]}, same batches {'yes' if r['same'] else 'NO'}: {r['text']}")
    for size, r in e.items():
        print(f"(e) {size} px: recipe/memory {r['ratio']:.3f}, target >= 0.9 {verdict[r['ratio'] >= 0.9]}: "
              f"{r['text']}")
    other = [x["other"] for r in [a, *c.values(), *e.values()] if r for rs in r["res"].values() for x in rs]
    if other:
        print(f"other processes' CPU during timed segments: max {max(other):.1f} CPU-s"
              + ("  (WARNING: contention, timings unreliable)" if max(other) > 2.0 else "  (quiet)"))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
