"""The model card: what a deployer must know of a trained model, generated from the stages' reports, never
written by hand.

``kfer train`` logs one into its MLflow run (``model_card.md``) with what is known then (data, recipe, validation);
``kfer evaluate`` writes the whole card to ``paths.model_card`` (test scores, accuracy by group, calibration when
measured, behaviour checks, known limits) and replaces the run's copy; ``kfer register`` makes it the registered
version's description. Sources: ``params`` and the JSON reports of crop, split, train and evaluate
(``paths.crop_report``, ``split_report``, ``train_metrics``, ``eval_metrics``); a section whose report is missing
says so.

Known limits are derived from the numbers by fixed rules (:func:`limits`): a class or group with fewer test faces
than ``evaluate.group_min_n``, the largest gap between groups, a behaviour check that changes more than 10% of
the answers or costs more than 0.05 accuracy, a test split of few persons, annotators who disagree with the
uploader, and the photo path falling short of the crop path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kfer.catalog import Catalog
from kfer.tracking import MODEL_CARD as ARTIFACT  # its name in the MLflow run
from kfer.config import Params

REPORTS = {"crop": "crop_report", "split": "split_report", "train": "train_metrics", "eval": "eval_metrics"}
FEW_PERSONS = 30  # a test split of fewer persons than this is named in the limits
BEHAVIOUR_SAME = 0.90  # a check that keeps fewer answers than this is named in the limits
BEHAVIOUR_COST = 0.05  # ... or costs more accuracy than this


def read_reports(params: Params) -> dict[str, dict]:
    """The reports that exist, by stage name."""
    out = {}
    for stage, key in REPORTS.items():
        path = getattr(Catalog(params), key)
        if path.is_file():
            out[stage] = json.loads(path.read_text(encoding="utf-8"))
    return out


def _f(x: Any, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def model_section(params: Params, reports: dict) -> list[str]:
    m, t, c = params.model, params.train, params.crop
    classes = ", ".join(f"{k.name} ({k.ko})" if k.ko else k.name for k in params.classes)
    lines = ["## Model", "",
             f"- Task: the expression of one face, cut from a photo by the crop stage's detector and geometry "
             f"({c.image_size}×{c.image_size} {'gray' if c.grayscale else 'colour'}, margin {c.margin}), as one of "
             f"{len(params.classes)} classes: {classes}.",
             f"- Network: ResNet ({m.stem} stem, blocks {list(m.blocks)}, base width {m.base_width}, "
             f"{m.kernel_initializer} init), a Dense {m.head_units} head"
             + (", flip test-time augmentation (the mean of the face and its mirror image)" if m.tta_flip else "")
             + ".",
             f"- Training: {t.optimizer}, learning rate {t.learning_rate} ({t.lr_schedule}), batch {t.batch_size}, "
             f"up to {t.epochs} epochs, label smoothing {t.label_smoothing}, mixup {t.mixup_alpha}, class weights "
             f"{'on' if t.class_weights else 'off'}, seed {params.seed}"
             + (f"; started from `{t.init_from}`" if t.init_from else "") + "."]
    train = reports.get("train")
    if train:
        lines.append(f"- Selected epoch {train['best_epoch']} of {train['epochs_run']} by validation "
                     f"{t.monitor}; {train['train_images']} training images an epoch, {train['train_seconds']:.0f} s.")
    return [*lines, ""]


def data_section(params: Params, reports: dict) -> list[str]:
    lines = ["## Data", ""]
    crop, split = reports.get("crop"), reports.get("split")
    if crop is None or split is None:
        return [*lines, "No crop or split report: the data are not described.", ""]
    sources = ", ".join(sorted(params.data.sources)) or f"one folder (`{params.paths.raw}`, layout {crop['layout']})"
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(crop["skipped"].items())) or "none"
    lines += [f"- Sources: {sources}.",
              f"- Photos read: {crop['total']}; faces cut: {crop['ok']}; skipped by reason: {skipped}.",
              f"- Label policy: `{split['label_policy']}`"
              + (f" (min agreement {split['min_agreement']})" if split.get("min_agreement") else "")
              + f"; {split.get('dropped') or 0} faces dropped by it.",
              "- Split by person (no person in two splits), seed "
              f"{split['seed']}:", ""]
    lines += _table(["split", "faces", "persons"],
                    [[s, split["counts"].get(s, 0), split["groups"].get(s, 0)] for s in ("train", "val", "test")])
    per_class = split.get("per_class") or {}
    if per_class:
        lines += _table(["class", *per_class], [[c.name, *(per_class[s].get(c.name, 0) for s in per_class)]
                                                for c in params.classes])
    return lines


def scores_section(reports: dict) -> list[str]:
    train, ev = reports.get("train"), reports.get("eval")
    lines = ["## Scores", ""]
    rows = []
    if train:
        rows.append(["val (model selection)", train["val_images"], _f(train["best_val_accuracy"]),
                     _f(train["best_val_macro_f1"])])
    if ev:
        rows.append(["test (crop path)", ev["test_images"], _f(ev["test_accuracy"]), _f(ev["test_macro_f1"])])
        if ev.get("photo_accuracy") is not None:
            rows.append(["test (photo path: the served model on whole photos)", ev["photo_images"],
                         _f(ev["photo_accuracy"]), _f(ev["photo_macro_f1"])])
    if not rows:
        return [*lines, "Not trained yet.", ""]
    lines += _table(["split", "faces", "accuracy", "macro-F1"], rows)
    if not ev:
        return [*lines, "Not evaluated on the test split yet (`kfer evaluate`).", ""]
    lines += _table(["class", "precision", "recall", "F1", "test faces"],
                    [[k, _f(m["precision"]), _f(m["recall"]), _f(m["f1"]), m["support"]]
                     for k, m in ev["per_class"].items()])
    if ev.get("per_source"):
        lines += ["Per source:", ""] + _table(
            ["source", "faces", "persons", "accuracy", "macro-F1"],
            [[s, m["n"], m["persons"], _f(m["accuracy"]), _f(m["macro_f1"])] for s, m in ev["per_source"].items()])
    kinds = {k: m for k, m in (ev.get("label_kinds") or {}).items() if m["n"]}
    if kinds:
        lines += ["Against each kind of label (the same predictions):", ""] + _table(
            ["label", "faces", "left out", "accuracy", "macro-F1"],
            [[k, m["n"], m["left_out"], _f(m["accuracy"]), _f(m["macro_f1"])] for k, m in kinds.items()])
    return lines


def groups_section(ev: dict | None) -> list[str]:
    lines = ["## Accuracy by group", ""]
    groups = (ev or {}).get("groups")
    if not groups:
        return [*lines, "No group fields in the test split (or not evaluated).", ""]
    rows = []
    for field, entry in groups["fields"].items():
        for value, m in entry["values"].items():
            rows.append([field, value, m["n"],
                         f"{_f(m['accuracy'])} [{_f(m['accuracy_low'])}, {_f(m['accuracy_high'])}]" if m["claim"]
                         else "too few faces: no claim", _f(m.get("macro_f1")) if m["claim"] else "–"])
    lines += _table(["field", "group", "faces", "accuracy [95% interval]", "macro-F1"], rows)
    gap = groups.get("largest_gap")
    if gap:
        lines += [f"Largest gap: {gap['gap']:.3f} in {gap.get('field', '?')} ({gap['best']} vs {gap['worst']}).", ""]
    return lines


def calibration_section(ev: dict | None) -> list[str]:
    cal = (ev or {}).get("calibration")
    if not cal:
        return ["## Calibration", "", "Not measured: the probabilities are the network's softmax, not calibrated.",
                ""]
    rows = [[split, m["n"], _f(m["ece_before"]), _f(m["ece_after"])] for split, m in cal["splits"].items()]
    return ["## Calibration", "", f"Temperature {cal['temperature']:.3f}, fitted on val; the served model's "
            "probabilities are p^(1/T), renormalized (softmax(logits / T); argmax, and so accuracy, unchanged).",
            "",
            *_table(["split", "faces", "ECE before", "ECE after"], rows)]


def behaviour_section(ev: dict | None) -> list[str]:
    beh = (ev or {}).get("behaviour")
    if not beh:
        return ["## Behaviour checks", "", "Not checked (`kfer evaluate`).", ""]
    return ["## Behaviour checks", "",
            f"On {beh['n']} test faces (accuracy {beh['accuracy']:.3f} as they are): the share whose answer stays "
            "the same under each change, and the accuracy under it.", "",
            *_table(["change", "answer unchanged", "accuracy", "accuracy change"],
                    [[k, f"{m['same_prediction']:.1%}", _f(m["accuracy"]), f"{m['accuracy_change']:+.3f}"]
                     for k, m in beh["checks"].items()])]


def limits(params: Params, reports: dict) -> list[str]:
    """The known limits, each from a fixed rule on the reports (see the module docstring)."""
    out = []
    ev, split, min_n = reports.get("eval") or {}, reports.get("split") or {}, params.evaluate.group_min_n
    few = [f"{k} ({m['support']})" for k, m in (ev.get("per_class") or {}).items() if m["support"] < min_n]
    if few:
        out.append(f"Classes with fewer than {min_n} test faces, whose scores are rough: {', '.join(few)}.")
    persons = (split.get("groups") or {}).get("test")
    if persons is not None and persons < FEW_PERSONS:
        out.append(f"The test split holds {persons} persons: its scores depend on who they are.")
    groups = ev.get("groups")
    if groups:
        none = [f"{f}={v} ({m['n']})" for f, e in groups["fields"].items() for v, m in e["values"].items()
                if not m["claim"] and v != "unknown"]
        if none:
            out.append(f"Groups too small for a claim (under {min_n} test faces): {', '.join(none)}.")
        gap = groups.get("largest_gap")
        if gap and gap["gap"] >= 0.05:
            out.append(f"Accuracy differs by {gap['gap']:.3f} between {gap['best']} and {gap['worst']} "
                       f"({gap.get('field', 'a group field')}).")
    for k, m in ((ev.get("behaviour") or {}).get("checks") or {}).items():
        if m["same_prediction"] < BEHAVIOUR_SAME or m["accuracy_change"] < -BEHAVIOUR_COST:
            out.append(f"Under `{k}` {1 - m['same_prediction']:.1%} of the answers change (accuracy "
                       f"{m['accuracy_change']:+.3f}).")
    table = ((ev.get("opinions") or {}).get("per_class") or {}).values()
    voted = sum(r["with_votes"] for r in table)
    if voted and (share := sum(r["majority_is_uploader"] for r in table) / voted) < 0.8:
        out.append(f"The raters' majority names the uploader's label for only {share:.0%} of the {voted} test "
                   f"faces with votes: the labels themselves are uncertain (policy `{split.get('label_policy')}`).")
    if ev.get("photo_accuracy") is not None and ev["photo_accuracy"] < ev["test_accuracy"] - 0.02:
        out.append(f"On whole photos (finding the face itself) accuracy is {ev['photo_accuracy']:.3f}, below the "
                   f"{ev['test_accuracy']:.3f} on the crop stage's faces ({ev.get('photo_missed', 0)} photos "
                   "without the face found).")
    if not (ev.get("calibration")):
        out.append("Probabilities are not calibrated: read them as scores, not as chances.")
    return out


def build_card(params: Params, reports: dict, run_id: str | None = None) -> str:
    """The model card (markdown) from ``params`` and the stages' ``reports`` (by stage name)."""
    name = params.train.registered_model
    ev = reports.get("eval")
    lines = [f"# Model card: {name}" + (f" (MLflow run {run_id})" if run_id else ""), "",
             "Generated by kfer from the stages' reports (crop, split, train, evaluate): do not edit by hand.", "",
             *model_section(params, reports), *data_section(params, reports), *scores_section(reports),
             *groups_section(ev), *calibration_section(ev), *behaviour_section(ev), "## Known limits", ""]
    found = limits(params, reports)
    lines += [f"- {x}" for x in found] if found else ["None found by the card's rules."]
    return "\n".join(lines).rstrip() + "\n"
