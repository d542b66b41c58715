"""Strict construction of frozen config dataclasses from plain mappings.

Configs arrive as ml_collections ConfigDicts (or dicts) from the command line and
are validated once, here: an unknown key, a value of the wrong type or a value a
dataclass's `__post_init__` rejects raises a one-line `ValueError` that names the
key (with its path) and the value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def _allowed_types(annotation: Any) -> tuple[type, ...]:
  """The runtime types a field annotation admits (`int | None` -> (int, NoneType))."""
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    return tuple(t for arg in typing.get_args(annotation) for t in _allowed_types(arg))
  if origin is typing.Literal:
    return tuple({type(a) for a in typing.get_args(annotation)})
  if origin is not None:
    return (origin,)
  return (annotation,)


def _check_value(path: str, annotation: Any, value: Any) -> Any:
  allowed = _allowed_types(annotation)
  if typing.get_origin(annotation) is typing.Literal and value not in typing.get_args(annotation):
    choices = ", ".join(repr(a) for a in typing.get_args(annotation))
    raise ValueError(f"{path}={value!r} is not one of {choices}")
  if isinstance(value, bool) and bool not in allowed:
    raise ValueError(f"{path}={value!r} has type bool, expected {_type_names(allowed)}")
  int_for_float = float in allowed and int not in allowed
  if isinstance(value, int) and not isinstance(value, bool) and int_for_float:
    return float(value)
  if not isinstance(value, allowed):
    raise ValueError(
        f"{path}={value!r} has type {type(value).__name__}, expected {_type_names(allowed)}")
  return value


def _type_names(allowed: tuple[type, ...]) -> str:
  return " or ".join("None" if t is type(None) else t.__name__ for t in allowed)


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | T, path: str = "config") -> T:
  """Builds dataclass `cls` from `mapping`, rejecting unknown keys and wrong types.

  Nested dataclass fields are built recursively from nested mappings. Missing keys
  take the dataclass defaults.
  """
  if isinstance(mapping, cls):
    mapping = dataclasses.asdict(mapping)
  if not isinstance(mapping, Mapping):
    if hasattr(mapping, "to_dict"):  # ml_collections.ConfigDict, without importing it
      mapping = mapping.to_dict()
    else:
      raise ValueError(f"{path}={mapping!r} is not a mapping")
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = sorted(set(mapping) - names)
  if unknown:
    raise ValueError(
        f"{path}.{unknown[0]} is not a known key (known: {', '.join(sorted(names))})")
  kwargs = {}
  for key, value in mapping.items():
    annotation = hints[key]
    if dataclasses.is_dataclass(annotation):
      kwargs[key] = from_mapping(annotation, value, f"{path}.{key}")
    else:
      kwargs[key] = _check_value(f"{path}.{key}", annotation, value)
  try:
    return cls(**kwargs)
  except ValueError as e:
    raise ValueError(f"{path}.{e}") from None
  except TypeError as e:  # e.g. a required field missing
    raise ValueError(f"{path}: {e}") from None


def check_types(obj: Any) -> None:
  """For a dataclass's `__post_init__`: each field as its annotation admits, as `from_mapping`
  checks a mapping's (a config constructed directly gets the same one-line errors); an int
  given for a float field becomes that float."""
  hints = typing.get_type_hints(type(obj))
  for field in dataclasses.fields(obj):
    value, annotation = getattr(obj, field.name), hints[field.name]
    if dataclasses.is_dataclass(annotation):
      require(isinstance(value, annotation), field.name, value,
              f"has type {type(value).__name__}, expected {annotation.__name__}")
      continue
    checked = _check_value(field.name, annotation, value)
    if checked is not value:
      object.__setattr__(obj, field.name, checked)


def require(condition: bool, key: str, value: Any, why: str) -> None:
  """Raises `ValueError('key=value why')` unless `condition`; for `__post_init__`."""
  if not condition:
    raise ValueError(f"{key}={value!r} {why}")
