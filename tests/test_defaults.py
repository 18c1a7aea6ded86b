"""One source for every default: params.yaml. The typed config's field defaults (used when a key is left out of
a params file) and the library defaults of ``FaceCropper`` must be params.yaml's values, so that no setting means
one thing in params.yaml and another in code."""

from __future__ import annotations

import dataclasses

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kfer.config import Params
from kfer.faces import FaceCropper

from .conftest import REPO


def _defaults(model: type[BaseModel], raw: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, code default, params.yaml value) for every field of ``model`` that has a default."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        value = raw.get(name, PydanticUndefined) if isinstance(raw, dict) else PydanticUndefined
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict):
            out.extend(_defaults(sub, value, f"{key}."))
            continue
        default = field.get_default(call_default_factory=True)
        if default is PydanticUndefined or value is PydanticUndefined:
            continue
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        out.append((key, default, value))
    return out


def _same(a, b) -> bool:
    a = yaml.safe_load(yaml.safe_dump(_plain(a)))
    b = yaml.safe_load(yaml.safe_dump(_plain(b)))
    return a == b


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "as_posix"):
        return v.as_posix()
    return v


def test_config_defaults_are_params_yaml_values():
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    checked = _defaults(Params, raw)
    differ = [(k, d, v) for k, d, v in checked if not _same(d, v)]
    assert not differ, "config.py defaults that differ from params.yaml (key, code, params.yaml): " + repr(differ)
    assert len(checked) > 60


def test_face_cropper_defaults_are_params_yaml_values():
    crop = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["crop"]
    names = {"size": "image_size", "min_side": "min_image_side"}
    fields = {f.name: f.default for f in dataclasses.fields(FaceCropper)}
    differ = {k: (d, crop[names.get(k, k)]) for k, d in fields.items() if d != crop[names.get(k, k)]}
    assert not differ, f"FaceCropper defaults vs params.yaml crop: {differ}"
