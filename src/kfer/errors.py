"""kfer's errors: what the CLI prints as one line (``Error: ...``) and the exit code it gives, and the wording
that turns a YAML or pydantic error in params.yaml into that one line naming the file and the dotted key."""

from __future__ import annotations

import difflib
import types
from pathlib import Path
from typing import Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError


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


class WorkerDiedError(KferError, RuntimeError):
    """A worker process of :func:`kfer.files.parallel_map` died (typically killed by the OOM killer): the stage
    fails."""


def yaml_error(p: Path, exc: yaml.YAMLError) -> str:
    """One line: the file, the line and column of the problem, and what YAML found there."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{p}" if mark is None else f"{p} line {mark.line + 1}, column {mark.column + 1}"
    what = getattr(exc, "problem", None) or str(exc)
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        what += f" ({context}" + (f" that starts at line {cmark.line + 1}, column {cmark.column + 1})"
                                  if cmark is not None else ")")
    return " ".join(f"{where}: invalid YAML: {what}".split())


def _model_at(root: type[BaseModel], parts: tuple) -> type[BaseModel] | None:
    """The params model at a dotted location (``("data", "sources", "x", "group")`` -> GroupCfg), if any."""
    tp: object = root
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


def _meant(root: type[BaseModel], err: dict) -> str | None:
    """For an unknown key, the dotted key of the model's field it most resembles (the one the user misspelt)."""
    if err["type"] != "extra_forbidden":
        return None
    parts = tuple(err["loc"])
    model = _model_at(root, parts[:-1])
    close = difflib.get_close_matches(str(parts[-1]), list(model.model_fields), n=1) if model else []
    return ".".join([*map(str, parts[:-1]), close[0]]) if close else None


def _error_line(root: type[BaseModel], err: dict) -> str:
    parts = tuple(err["loc"])
    key = ".".join(map(str, parts))
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        meant = _meant(root, err)
        return f"unknown key {key}" + (f" (did you mean {meant}?)" if meant else "")
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


def validation_message(exc: ValidationError, root: type[BaseModel]) -> str:
    """Pydantic's errors as one line: one clause per error naming its dotted key, joined with '; ' (``root``: the
    model that was validated, for "did you mean" hints on unknown keys). A key that is missing because it was
    misspelt is said once: "unknown key crop.imagesize (did you mean crop.image_size?)"."""
    errors = exc.errors()
    meant = {_meant(root, e) for e in errors}
    errors = [e for e in errors if not (e["type"] == "missing" and ".".join(map(str, e["loc"])) in meant)]
    lines = list(dict.fromkeys(_error_line(root, e) for e in errors))
    return "; ".join(" ".join(line.split()) for line in lines)
