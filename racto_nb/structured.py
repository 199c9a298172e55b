"""Structured output: what a reply must be (``choices`` or a ``schema``), as plain JSON that crosses the broker.

An :class:`OutputSpec` is built once, in the kernel, from what the user gave:

* ``choices=["positive", "negative"]``: one label per row. It is the object
  ``{"label": <one of them>}``, so choices and schemas share every later step
  (columns, the ledger, strict provider schemas, which need an object root).
* ``schema=Model`` (a pydantic model class) or a JSON-schema dict describing an
  object. ``$ref``s are inlined here, so every consumer (a worker without the
  user's class, a grammar builder, the column typer) reads one self-contained
  schema.

Its JSON (``spec.model_dump(mode="json")``) is the batch's ``opts["output"]``:
the worker rebuilds the spec from it, hands it to the kit on
:attr:`~racto_nb.models.ChatConfig.output`, and checks the reply with
:meth:`OutputSpec.check`; the pay-once fingerprint includes it, so a reply
stored for one schema never answers another.

Constrained where the model allows it: :meth:`openai_response_format` is the
strict ``json_schema`` response format; :meth:`llama_grammar` is a GBNF
grammar (choices) or the JSON schema (objects) for llama.cpp's constrained
decoding. A kit that constrains nothing gets :meth:`instruction` appended to
the prompt, and an invalid reply is asked again with :meth:`reask_message`.

Pure: pydantic and ``jsonschema``, no Celery, no pandas.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr

from racto_nb.errors import InvalidArgument, SchemaError

__all__ = ["CHOICE_FIELD", "FieldSpec", "OutputSpec", "SchemaLike", "output_spec"]

#: The one field of a choices reply: ``{"label": "positive"}``, and the column it lands in.
CHOICE_FIELD = "label"
#: The name strict provider schemas carry for choices.
CHOICES_NAME = "choice"
#: How much of an invalid reply the error quotes.
QUOTE_CHARS = 80
#: JSON-schema keywords OpenAI's strict mode refuses; dropped from the strict copy only.
_STRICT_DROP = ("default", "title", "examples")
_NAME_OK = re.compile(r"[^A-Za-z0-9_-]")
_FENCE = re.compile(r"^```[A-Za-z]*\s*(.*?)\s*```$", re.DOTALL)


@dataclass(frozen=True)
class FieldSpec:
    """One leaf of the reply object: a typed column (``path`` joined with dots)."""

    path: tuple[str, ...]
    #: ``"int"``, ``"float"``, ``"bool"``, ``"string"``, ``"category"`` (enum, Literal, choices) or ``"object"``.
    kind: str
    categories: tuple[Any, ...] = ()

    @property
    def name(self) -> str:
        return ".".join(self.path)


class OutputSpec(BaseModel):
    """What every reply of a batch (or a task) must be; see the module docstring."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["choices", "schema"]
    #: The schema's name, as strict provider formats want it (a model's class name, ``"choice"`` for choices).
    name: str
    #: The object every valid reply is, ``$ref``-free.
    json_schema: dict[str, Any]
    choices: tuple[str, ...] | None = None
    _model: type[BaseModel] | None = PrivateAttr(default=None)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_choices(cls, choices: Sequence[str]) -> OutputSpec:
        """One label per row. Labels must differ beyond case and spaces: replies are matched without them."""
        if isinstance(choices, str):
            raise InvalidArgument(f"choices must be a list of labels, e.g. choices=['yes', 'no'] (got {choices!r})")
        labels = tuple(choices)
        if not labels:
            raise InvalidArgument("choices is empty: give two or more labels, e.g. choices=['positive', 'negative']")
        bad = [c for c in labels if not isinstance(c, str) or not c.strip()]
        if bad:
            raise InvalidArgument(f"choices must be non-empty strings; got {bad[0]!r}")
        if len(set(labels)) != len(labels):
            raise InvalidArgument(f"choices has a label twice: {sorted(c for c in labels if labels.count(c) > 1)[0]!r}")
        folded = [c.strip().lower() for c in labels]
        if len(set(folded)) != len(folded):
            raise InvalidArgument("choices must differ by more than case or spaces (a reply is matched without them)")
        schema = {
            "type": "object",
            "properties": {CHOICE_FIELD: {"type": "string", "enum": list(labels)}},
            "required": [CHOICE_FIELD],
            "additionalProperties": False,
        }
        return cls(kind="choices", name=CHOICES_NAME, json_schema=schema, choices=labels)

    @classmethod
    def from_schema(cls, schema: type[BaseModel] | dict[str, Any]) -> OutputSpec:
        """An object per row. The model class is kept (in this process only) to build instances from replies;
        the workers get its JSON schema, ``$ref``-free, checked here so a bad one fails before anything is sent."""
        model: type[BaseModel] | None = None
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            model, raw, name = schema, schema.model_json_schema(), schema.__name__
        elif isinstance(schema, dict):
            raw, name = schema, str(schema.get("title") or "output")
        else:
            raise InvalidArgument(
                f"schema must be a pydantic model class or a JSON-schema dict, not {type(schema).__name__}"
            )
        try:
            json.dumps(raw)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"schema must be JSON (it goes to the workers): {exc}") from None
        inlined = _inline_refs(raw)
        if inlined.get("type") != "object" or not isinstance(inlined.get("properties"), dict):
            raise InvalidArgument(
                "schema must describe a JSON object (type 'object' with 'properties'); for one label per row "
                "use choices=[...]"
            )
        if not inlined["properties"]:
            raise InvalidArgument("schema has no properties: name at least one field")
        _check_schema(inlined)
        spec = cls(kind="schema", name=_NAME_OK.sub("_", name)[:64] or "output", json_schema=inlined)
        spec._model = model
        return spec

    # ------------------------------------------------------------------ what kits send

    def strict_schema(self) -> dict[str, Any]:
        """The schema as OpenAI's strict mode wants it: every object closed, every property required."""
        strict: dict[str, Any] = _strict(copy.deepcopy(self.json_schema))
        return strict

    def openai_response_format(self) -> dict[str, Any]:
        """``response_format`` for a chat completion: a strict ``json_schema``."""
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name, "schema": self.strict_schema(), "strict": True},
        }

    def llama_grammar(self) -> dict[str, str]:
        """What llama.cpp decodes under: ``{"gbnf": ...}`` (exactly one label) or ``{"json_schema": ...}``.

        Choices are a bare label, not a JSON object: fewer tokens, and a small
        model's first token is then the decision itself.
        """
        if self.choices is not None:
            return {"gbnf": "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choices)}
        return {"json_schema": json.dumps(self.strict_schema())}

    def instruction(self) -> str:
        """What a kit that cannot constrain its output is told, after the prompt."""
        if self.choices is not None:
            return "Reply with exactly one of: " + ", ".join(self.choices) + ". Nothing else."
        return "Reply with only a JSON object matching this JSON schema:\n" + json.dumps(self.strict_schema())

    def reask_message(self, message: str, why: str) -> str:
        """The prompt of the next attempt after an invalid reply: the same request, told what was wrong."""
        return f"{message}\n\n(Your previous reply was not valid: {why}.)"

    # ------------------------------------------------------------------ checking a reply

    def check(self, content: str | None) -> dict[str, Any]:
        """The reply as the validated object (choices: ``{"label": <the choice>}``), or :class:`SchemaError`.

        A choice is matched ignoring case, surrounding spaces, quotes and a
        final full stop, or as the object ``{"label": ...}`` a strict provider
        answers with. An object reply may sit in a Markdown code fence.
        """
        text = (content or "").strip()
        if not text:
            raise SchemaError("the reply is empty", content)
        if self.choices is not None:
            return {CHOICE_FIELD: self._choice(text, content)}
        value = _loads(text)
        if not isinstance(value, dict):
            raise SchemaError(f"the reply is not a JSON object: {_quote(text)}", content)
        self._validate(value, content)
        return value

    def _choice(self, text: str, content: str | None) -> str:
        assert self.choices is not None
        candidate: Any = text
        if text[0] in '{"':
            parsed = _loads(text)
            if isinstance(parsed, dict) and set(parsed) == {CHOICE_FIELD}:
                candidate = parsed[CHOICE_FIELD]
            elif isinstance(parsed, str):
                candidate = parsed
        if isinstance(candidate, str):
            folded = candidate.strip().strip("\"'`*").rstrip(".!").strip().lower()
            for choice in self.choices:
                if choice.strip().lower() == folded:
                    return choice
        raise SchemaError(f"the reply {_quote(text)} is not one of {list(self.choices)}", content)

    def _validate(self, value: dict[str, Any], content: str | None) -> None:
        import jsonschema

        errors = sorted(jsonschema.Draft202012Validator(self.json_schema).iter_errors(value), key=lambda e: e.path)
        if errors:
            first = errors[0]
            where = ".".join(str(p) for p in first.absolute_path) or "the object"
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise SchemaError(f"{where}: {first.message}{more}", content)

    # ------------------------------------------------------------------ reading it back

    def fields(self) -> list[FieldSpec]:
        """The reply's leaves, depth first: nested objects flattened to dotted paths."""
        found: list[FieldSpec] = []
        _leaves(self.json_schema, (), found)
        return found

    def value(self, parsed: Any) -> Any:
        """The validated object as the user asked for it: the model instance, the dict, or the label."""
        if not isinstance(parsed, dict):
            return None
        if self.choices is not None:
            return parsed.get(CHOICE_FIELD)
        return self._model.model_validate(parsed) if self._model is not None else parsed

    def description(self) -> dict[str, Any]:
        """The JSON the workers get (``opts["output"]``) and the fingerprint includes."""
        return self.model_dump(mode="json")


#: What ``schema=`` accepts: a pydantic model class, a JSON-schema dict, or a spec built before.
SchemaLike = type[BaseModel] | dict[str, Any] | OutputSpec


def output_spec(choices: Sequence[str] | None = None, schema: SchemaLike | None = None) -> OutputSpec | None:
    """The spec for ``choices=`` or ``schema=`` (``None`` when neither is given); both: a one-line error."""
    if choices is not None and schema is not None:
        raise InvalidArgument("give choices= or schema=, not both (a label is the schema {'label': enum})")
    if choices is not None:
        return OutputSpec.from_choices(choices)
    if isinstance(schema, OutputSpec):
        return schema
    if schema is not None:
        return OutputSpec.from_schema(schema)
    return None


# ---------------------------------------------------------------------------- helpers


def _quote(text: str) -> str:
    return repr(text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 1] + "…")


def _loads(text: str) -> Any:
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text)
    except ValueError:
        return None


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with every local ``$ref`` replaced by its definition and ``$defs`` dropped."""
    defs: dict[str, Any] = {**schema.get("definitions", {}), **schema.get("$defs", {})}

    def walk(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [walk(item, seen) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            if not ref.startswith("#/") or name not in defs:
                raise InvalidArgument(f"schema refers to {ref!r}, which it does not define (only local $defs work)")
            if name in seen:
                raise InvalidArgument(f"schema is recursive through {name!r}; replies must have a fixed shape")
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return walk({**defs[name], **rest}, (*seen, name))
        return {
            k: _each(v, lambda inner: walk(inner, seen)) if k in _NAMED else walk(v, seen)
            for k, v in node.items()
            if k not in ("$defs", "definitions")
        }

    inlined: dict[str, Any] = walk(schema, ())
    return inlined


#: Keywords whose value maps names (of fields, of patterns) to schemas: its keys are names, never keywords.
_NAMED = ("properties", "patternProperties")


def _each(value: Any, change: Any) -> Any:
    return {name: change(inner) for name, inner in value.items()} if isinstance(value, dict) else change(value)


def _check_schema(schema: dict[str, Any]) -> None:
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidArgument(f"schema is not a valid JSON schema: {exc.message}") from None


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _each(v, _strict) if k in _NAMED else _strict(v) for k, v in node.items() if k not in _STRICT_DROP}
    if out.get("type") == "object" and isinstance(out.get("properties"), dict):
        out["required"] = list(out["properties"])
        out["additionalProperties"] = False
    return out


def _non_null(node: dict[str, Any]) -> dict[str, Any]:
    """``Optional[X]`` (``anyOf: [X, null]``) read as ``X``."""
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list):
            real = [o for o in options if isinstance(o, dict) and o.get("type") != "null"]
            if len(real) == 1:
                return {**{k: v for k, v in node.items() if k != key}, **real[0]}
    kind = node.get("type")
    if isinstance(kind, list):
        real_types = [t for t in kind if t != "null"]
        if len(real_types) == 1:
            return {**node, "type": real_types[0]}
    return node


_KINDS = {"integer": "int", "number": "float", "boolean": "bool", "string": "string"}


def _leaves(node: dict[str, Any], path: tuple[str, ...], found: list[FieldSpec]) -> None:
    node = _non_null(node)
    properties = node.get("properties")
    if node.get("type") == "object" and isinstance(properties, dict) and properties:
        for key, inner in properties.items():
            _leaves(inner if isinstance(inner, dict) else {}, (*path, str(key)), found)
        return
    if "enum" in node:
        found.append(FieldSpec(path, "category", tuple(node["enum"])))
    elif "const" in node:
        found.append(FieldSpec(path, "category", (node["const"],)))
    else:
        found.append(FieldSpec(path, _KINDS.get(str(node.get("type")), "object")))
