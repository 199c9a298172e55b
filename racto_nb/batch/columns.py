"""Typed columns from structured replies: one column per field of the spec, beside ``content``.

A batch run with ``choices`` or ``schema`` (:mod:`racto_nb.structured`) gets,
in its result frame, one column per leaf of the reply object:

* typed by the schema, nullable: ``integer`` → ``Int64``, ``number`` →
  ``Float64``, ``boolean`` → ``boolean``, ``string`` → ``string``; an enum,
  a ``Literal`` or the choices → ``category`` with the allowed values as its
  categories (in their order, so value counts list every label, even unused);
  anything else (arrays, free-form objects) → ``object`` holding the value;
* nested objects flattened with dotted names (``address.city``);
* a field whose name clashes with a column the frame already has (``status``,
  ``content``, ``prompt``, ...) is prefixed with :data:`CLASH_PREFIX`
  (``out.status``): racto_nb's own columns keep their meaning;
* filled only on rows whose status is ``success``: a failed row
  (``SchemaError`` included) has ``<NA>`` there, and its reply in ``content``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from racto_nb.structured import CHOICE_FIELD, FieldSpec, OutputSpec

__all__ = ["CLASH_PREFIX", "FIELDS_ATTR", "field_columns", "with_fields", "write_back_fields"]

#: Put before a field's name when the frame already has a column of that name.
CLASH_PREFIX = "out."
#: ``frame.attrs`` key: field (dotted) → its column, for code that reads the fields (write-back).
FIELDS_ATTR = "racto_fields"

_DTYPES = {"int": "Int64", "float": "Float64", "bool": "boolean", "string": "string"}


def field_columns(spec: OutputSpec, taken: list[str]) -> dict[str, FieldSpec]:
    """Column name → field, in the spec's order; names in ``taken`` get :data:`CLASH_PREFIX`."""
    used = set(taken)
    out: dict[str, FieldSpec] = {}
    for field in spec.fields():
        name = field.name
        while name in used:
            name = CLASH_PREFIX + name
        used.add(name)
        out[name] = field
    return out


def with_fields(frame: pd.DataFrame, spec: OutputSpec, *, after: str = "parsed") -> pd.DataFrame:
    """``frame`` with the typed field columns inserted after column ``after`` (read from ``frame["parsed"]``)."""
    ok = (frame["status"] == "success").fillna(False).to_numpy(dtype=bool)
    parsed = [v if good and isinstance(v, dict) else None for v, good in zip(frame["parsed"], ok, strict=True)]
    position = frame.columns.get_loc(after) + 1 if after in frame.columns else len(frame.columns)
    out = frame.copy()
    columns = field_columns(spec, list(frame.columns))
    for offset, (name, field) in enumerate(columns.items()):
        values = [_lookup(value, field.path) for value in parsed]
        out.insert(int(position) + offset, name, typed(values, field, frame.index))
    out.attrs[FIELDS_ATTR] = {field.name: name for name, field in columns.items()}
    return out


def write_back_fields(column: str, spec: OutputSpec | None) -> dict[str, str | None]:
    """Where ``write_back=column`` puts the answers: target column → the field it holds (``None``: the content).

    Choices: the label into ``column`` itself; a schema: each field into
    ``COLUMN.FIELD`` (the object named by the column, its fields dotted below
    it, as nested fields are).
    """
    if spec is None:
        return {column: None}
    if spec.choices is not None:
        return {column: CHOICE_FIELD}
    return {f"{column}.{field.name}": field.name for field in spec.fields()}


def typed(values: list[Any], field: FieldSpec, index: pd.Index) -> pd.Series:
    """``values`` as the column ``field`` calls for (missing values: ``<NA>``)."""
    if field.kind == "category":
        categories = list(dict.fromkeys(field.categories))
        known = [v if v in categories else None for v in values]
        return pd.Series(pd.Categorical(known, categories=categories), index=index)
    dtype = _DTYPES.get(field.kind)
    if dtype is None:
        return pd.Series(values, index=index, dtype=object)
    if field.kind in ("int", "float"):
        numbers = pd.to_numeric(pd.Series(values, index=index, dtype=object), errors="coerce")
        if field.kind == "int":
            whole = numbers.where(numbers.isna() | (numbers == numbers.round()))
            return whole.astype("Float64").astype("Int64")
        return numbers.astype("Float64")
    if field.kind == "bool":
        return pd.Series([v if isinstance(v, bool) else None for v in values], index=index, dtype="boolean")
    return pd.Series([v if isinstance(v, str) else None for v in values], index=index, dtype="string")


def _lookup(value: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
