"""One home for every default: params.yaml. The typed config has no field defaults of its own (a key missing from
params.yaml is an error naming it, never a value the code chose), and ``FaceCropper`` takes every setting from
the config. The exceptions are the entries a user adds to a list or map (a class, a ``data.sources`` entry, its
``group``, a ``groups`` table): their optional keys are not params.yaml keys, so their defaults live in the schema
alone."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from pydantic import BaseModel

from kfer.config import ClassSpec, GroupCfg, GroupsCfg, Params, SourceCfg, load_params
from kfer.data.faces import FaceCropper
from kfer.errors import UserError
from tests.helpers import REPO

ENTRIES = (ClassSpec, SourceCfg, GroupCfg, GroupsCfg)  # items of user lists and maps, not keys of params.yaml


def _models(model: type[BaseModel], prefix: str = ""):
    """(dotted key, model) for ``model`` and every nested params model reached by field annotations."""
    yield prefix, model
    for name, field in model.model_fields.items():
        for sub in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(sub, type) and issubclass(sub, BaseModel) and sub not in ENTRIES:
                yield from _models(sub, f"{prefix}{name}.")


def test_the_config_has_no_defaults_of_its_own():
    with_default = [f"{prefix}{name}" for prefix, model in _models(Params)
                    for name, field in model.model_fields.items() if not field.is_required()]
    assert not with_default, f"config fields with a code default (give the value in params.yaml): {with_default}"
    assert len(list(_models(Params))) > 10


@pytest.mark.parametrize("key", ["train.epochs", "crop.margin", "tune.sampler.seed", "paths.pixel_store", "seed"])
def test_a_key_left_out_of_params_yaml_is_named(tmp_path, key):
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[leaf]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(UserError, match=rf"missing key {key}\b"):
        load_params(path)


def test_face_cropper_takes_every_setting_from_the_config():
    missing = [f.name for f in dataclasses.fields(FaceCropper)
               if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert not missing, f"FaceCropper fields with a default of their own: {missing}"
    crop = load_params(REPO / "params.yaml").crop
    cropper = FaceCropper.from_params(crop)
    assert (cropper.size, cropper.margin, cropper.min_side, cropper.box) == (
        crop.image_size, crop.margin, crop.min_image_side, crop.box)
