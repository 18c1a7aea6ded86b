"""``train.init_from``: start training from a trained model's weights (fine-tuning), not from fresh draws.

The path an AI Hub user takes: a model trained by the real-faces recipe on public faces, then trained on their own
photos. The source is a Model Registry URI (``models:/name@alias``, ``models:/name/3``), a run's model
(``runs:/<run id>/keras_model``, any MLflow artifact URI that holds one ``.keras`` file) or a local ``.keras`` file
under ``paths.init_models`` (a folder the train stage of dvc.yaml depends on, so DVC re-runs training when the file
changes). The photo pyfunc (what ``kfer register`` registers) carries its class list and names its run's Keras
classifier (``keras_model_uri`` in its ``config.json``; older photo models carry the ``.keras`` file itself), so
both kinds of model work.

Every backbone layer (all but ``head`` and ``predictions``) takes the source's weights; the architecture
(``model.blocks``, ``base_width``, ``stem``) and the input (``crop.image_size``, ``crop.grayscale``) must be the
ones the source was trained with, else one clear error. The Dense head (``head``) is kept when
``model.head_units`` matches, the softmax layer (``predictions``) when the head was kept and the class list is the
same (same names in the same order, where the source names them; else the same count): otherwise they are built
anew. A served model wrapped in flip test-time augmentation is unwrapped first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kfer.catalog import Catalog
from kfer.config import Params
from kfer.errors import UserError

log = logging.getLogger(__name__)

#: layers rebuilt when the head size or the class list differ; every other layer with weights is the backbone
HEAD, OUTPUT = "head", "predictions"
#: MLflow tags of the run that trained from another model
INIT_TAG, INIT_SOURCE_TAG = "kfer.init_from", "kfer.init_from.source"
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "file:/", "dbfs:/", "s3://", "gs://", "wasbs://")


class InitError(UserError):
    """``train.init_from`` cannot be used: missing, not one Keras model, or another architecture or input."""


@dataclass
class InitWeights:
    """The source model of ``train.init_from``, loaded: where it came from and what it holds."""

    spec: str  # train.init_from as written
    source: str  # what it resolved to: models:/name/<version> (run <id>), a run id, or the file and its digest
    model: object  # the Keras classifier (TTA wrapper removed)
    classes: list[str] | None  # the source's class names in output order, when it says them
    loaded: list[str] = field(default_factory=list)  # layers whose weights were copied (filled by apply())
    rebuilt: list[str] = field(default_factory=list)  # head layers built anew

    def tags(self) -> dict[str, str]:
        return {INIT_TAG: self.spec, INIT_SOURCE_TAG: self.source}


def is_uri(spec: str) -> bool:
    return spec.startswith(URI_SCHEMES)


def local_file(params: Params) -> Path | None:
    """The local ``.keras`` file of ``train.init_from`` (None for a URI or no init), checked to be inside
    ``paths.init_models``."""
    spec = params.train.init_from
    if not spec or is_uri(spec):
        return None
    path = params.path(spec).resolve()
    folder = Catalog(params).init_models.resolve()
    if not path.is_relative_to(folder):
        raise InitError(f"train.init_from {spec}: a local model must be inside paths.init_models "
                        f"({params.paths.init_models}/), the folder dvc.yaml's train stage depends on: copy it there")
    if path.suffix != ".keras":
        raise InitError(f"train.init_from {spec}: not a .keras file (or give an MLflow URI: models:/name@alias, "
                        "runs:/<run id>/keras_model)")
    if not path.is_file():
        raise InitError(f"train.init_from {spec}: no such file")
    return path


def load(params: Params) -> InitWeights | None:
    """The source model of ``train.init_from`` (downloaded when it is a URI, with the tracking URI in force),
    checked against the model ``params`` build (:func:`apply` on a throwaway build, so that a mismatch stops
    ``kfer train`` before its MLflow run starts); None when it is unset."""
    spec = params.train.init_from
    if not spec:
        return None
    import keras

    import kfer.serving.layers  # noqa: F401 - registers the served model's Keras objects (flip TTA) for loading
    from kfer.training.model import build_from_params

    path = local_file(params)
    with tempfile.TemporaryDirectory(prefix="kfer-init-") as tmp:
        if path is None:
            folder, source = _download(spec, Path(tmp) / "model")
            path, classes = _keras_file(spec, _keras_folder(spec, folder, Path(tmp) / "keras")), _classes(folder)
        else:
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            source, classes = f"{path.relative_to(params.root.resolve())} (sha256 {digest[:16]})", None
        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as exc:  # Keras raises ValueError, OSError, TypeError... for a file that is no model
            raise InitError(f"train.init_from {spec}: cannot load {path.name} as a Keras model "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(inner) == 1:  # the served flip-TTA wrapper: the classifier is its one inner model
        model = inner[0]
    init = InitWeights(spec, source, model, classes)
    apply(build_from_params(params), init, params, quiet=True)
    return init


def _download(spec: str, dest: Path) -> tuple[Path, str]:
    import mlflow
    from mlflow.exceptions import MlflowException

    source = spec
    try:
        if spec.startswith("models:/"):
            name, _, ref = spec[len("models:/"):].partition("@")
            client = mlflow.MlflowClient()
            if ref:  # alias: pin the version it points at now
                mv = client.get_model_version_by_alias(name, ref)
                source = f"models:/{name}/{mv.version} (run {mv.run_id})"
            else:
                name, _, version = spec[len("models:/"):].partition("/")
                if version.isdigit():
                    mv = client.get_model_version(name, version)
                    source = f"models:/{name}/{mv.version} (run {mv.run_id})"
        dest.mkdir(parents=True, exist_ok=True)
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(dest)))
    except MlflowException as exc:
        raise InitError(f"train.init_from {spec}: {exc.message.splitlines()[0]} (tracking URI "
                        f"{mlflow.get_tracking_uri()})") from None
    return folder, source


def _keras_folder(spec: str, folder: Path, dest: Path) -> Path:
    """``folder``, or for a photo model that classifies with ONNX (no ``.keras`` inside) the run's Keras model
    its ``config.json`` names (``keras_model_uri``), downloaded to ``dest``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if folder.is_file() or any(folder.rglob("*.keras")):
        return folder
    for p in sorted(folder.rglob("config.json")):
        try:
            uri = json.loads(p.read_text(encoding="utf-8")).get("keras_model_uri")
        except (OSError, ValueError, AttributeError):
            continue
        if uri:
            try:
                dest.mkdir(parents=True, exist_ok=True)
                return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
            except MlflowException as exc:
                raise InitError(f"train.init_from {spec}: its Keras model {uri}: {exc.message.splitlines()[0]}"
                                ) from None
    return folder


def _keras_file(spec: str, folder: Path) -> Path:
    if folder.is_file():
        return folder
    found = sorted(folder.rglob("*.keras"))
    if len(found) != 1:
        raise InitError(f"train.init_from {spec}: expected one .keras file in the model, found {len(found)}"
                        + (f" ({', '.join(p.name for p in found)})" if found else ""))
    return found[0]


def _classes(folder: Path) -> list[str] | None:
    """The class names a downloaded model states: the photo pyfunc's config.json, or a run's labels.json."""
    if folder.is_file():
        return None
    for name in ("config.json", "labels.json"):
        for p in sorted(folder.rglob(name)):
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            classes = data.get("classes") if isinstance(data, dict) else data
            if isinstance(classes, list) and all(isinstance(c, dict) and "name" in c for c in classes):
                return [c["name"] for c in classes]
    return None


def _shapes(layer) -> list[tuple]:
    return [tuple(w.shape) for w in layer.weights]


def apply(model, init: InitWeights, params: Params, quiet: bool = False) -> None:
    """Copy ``init``'s weights into the freshly built ``model`` (same layer names); raise :class:`InitError`
    when the input or the backbone differ. Fills ``init.loaded`` and ``init.rebuilt``."""
    src = init.model
    if tuple(src.input_shape[1:]) != tuple(model.input_shape[1:]):
        have, want = src.input_shape[1:], model.input_shape[1:]
        raise InitError(f"train.init_from {init.spec} takes {have[0]}x{have[1]}x{have[2]} faces; params give "
                        f"{want[0]}x{want[1]}x{want[2]} (crop.image_size, crop.grayscale): set them as it was "
                        "trained")
    theirs = {layer.name: layer for layer in src.layers if layer.weights}
    ours = {layer.name: layer for layer in model.layers if layer.weights}
    backbone = [n for n in ours if n not in (HEAD, OUTPUT)]
    extra = sorted(set(theirs) - set(ours) - {HEAD, OUTPUT})
    for name in backbone:
        shapes = _shapes(ours[name])
        other = _shapes(theirs[name]) if name in theirs else None
        if other != shapes:
            what = "has no layer " + name if other is None else f"has {name} of shapes {other}, not {shapes}"
            raise InitError(f"train.init_from {init.spec} is another architecture: it {what} (set model.blocks, "
                            "model.base_width and model.stem as it was trained)")
    if extra:
        raise InitError(f"train.init_from {init.spec} is another architecture: it has layers {extra[:3]} that "
                        "params' model has not (set model.blocks, model.base_width and model.stem as it was "
                        "trained)")
    for name in backbone:
        ours[name].set_weights(theirs[name].get_weights())
    init.loaded, init.rebuilt = list(backbone), []

    def same(name: str) -> bool:
        return name in ours and name in theirs and _shapes(ours[name]) == _shapes(theirs[name])

    keep_head = same(HEAD) or (HEAD not in ours and HEAD not in theirs)
    same_classes = init.classes is None or init.classes == params.class_names
    keep_output = keep_head and same(OUTPUT) and same_classes
    for name, keep in ((HEAD, keep_head), (OUTPUT, keep_output)):
        if name not in ours:
            continue
        if keep:
            ours[name].set_weights(theirs[name].get_weights())
            init.loaded.append(name)
        else:
            init.rebuilt.append(name)
    if quiet:
        return
    why = []
    if not keep_head:
        why.append("model.head_units differs")
    if not same_classes:
        why.append(f"the classes differ ({init.classes} → {params.class_names})")
    log.info("train.init_from %s (%s): %d layers' weights loaded%s", init.spec, init.source, len(init.loaded),
             f"; rebuilt {', '.join(init.rebuilt)} ({'; '.join(why) or 'other shapes'})" if init.rebuilt else
             ", the head included")
