"""What a saved record (an export's `unipelt_config.json`, a checkpoint's `unipelt` entry) must look like, and the
one function that checks a record against it before anything reads a field.

A file can be damaged or written by someone else: every field is checked for presence and type, so a bad
record is one `PELTError` line naming the file and the field, never a KeyError or TypeError further on.
Fields not named here are left alone (a newer unipelt may add some).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import PELTError


@dataclass(frozen=True)
class Field:
    """One field: ``ok(value)`` says whether it is acceptable, ``rule`` what it must be (for the message)."""

    ok: Callable[[Any], bool]
    rule: str
    required: bool = True


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int | None = None, high: int | None = None, *, none: bool = False, required: bool = True) -> Field:
    """An integer in ``low..high`` (either bound optional), or null with ``none``."""
    def ok(v: Any) -> bool:
        return (none and v is None) or (_integer(v) and (low is None or v >= low) and (high is None or v <= high))
    bounds = f" in {low}..{high}" if low is not None and high is not None else f" >= {low}" if low is not None else ""
    return Field(ok, f"an integer{bounds}" + (" or null" if none else ""), required)


def text(*, none: bool = False, required: bool = True, choices: tuple[str, ...] = ()) -> Field:
    """A non-empty string (one of ``choices`` when given), or null with ``none``."""
    def ok(v: Any) -> bool:
        return (none and v is None) or (isinstance(v, str) and bool(v) and (not choices or v in choices))
    rule = f"one of {', '.join(map(repr, choices))}" if choices else "a non-empty string"
    return Field(ok, rule + (" or null" if none else ""), required)


def mapping(required: bool = True) -> Field:
    return Field(lambda v: isinstance(v, dict), "a JSON object", required)


def _label_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and k.isdigit() and isinstance(v, str)
                                           for k, v in value.items())


SIZE = integer(1, none=True, required=False)
BACKBONE: dict[str, Any] = {
    "model_name_or_path": text(),
    "model_type": text(none=True, required=False),
    **{k: SIZE for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")},
    "num_labels": integer(1),
    "problem_type": text(none=True, choices=("regression", "single_label_classification",
                                             "multi_label_classification")),
    "id2label": Field(_label_map, 'an object {"0": "<label>", ...}'),
    "fingerprint": text(none=True, required=False),
    "architecture": text(none=True, required=False),
}
# What a checkpoint and an export both record (unipelt.io.identity): the method, its config, the backbone.
IDENTITY: dict[str, Any] = {"method": text(), "pelt_config": mapping(), "backbone": BACKBONE}


def check_record(record: Any, schema: dict[str, Any], where: str, prefix: str = "") -> dict[str, Any]:
    """``record`` if it has every required field of ``schema`` (nested dicts are nested schemas) with an
    acceptable value, else PELTError: ``<where>: <field> ...``."""
    if not isinstance(record, dict):
        raise PELTError(f"{where}: {prefix.rstrip('.') or 'the record'} must be a JSON object, "
                        f"not {type(record).__name__}")
    for key, spec in schema.items():
        name = prefix + key
        if key not in record:
            if isinstance(spec, dict) or spec.required:
                raise PELTError(f"{where}: {name} is missing")
            continue
        if isinstance(spec, dict):
            check_record(record[key], spec, where, name + ".")
        elif not spec.ok(record[key]):
            shown = repr(record[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise PELTError(f"{where}: {name} = {shown} must be {spec.rule}")
    if schema is BACKBONE and len(record["id2label"]) != record["num_labels"]:
        raise PELTError(f"{where}: {prefix}id2label has {len(record['id2label'])} labels but {prefix}num_labels "
                        f"is {record['num_labels']}")
    return record
