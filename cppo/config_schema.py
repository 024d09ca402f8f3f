"""JSON-schema checking and defaults shared by the project's YAML files (the pipeline config,
cppo/pipeline/schema.yaml, and run.yaml, cppo/run/schema.yaml).

One validator (JSON Schema 2020-12) and one error formatter: every message starts with the dotted
key path and names the closest valid key for a typo, e.g.
``models.toy-s-base.schedule: unknown key 'prompt_per_iter' (did you mean 'prompts_per_iter'?)``.
Defaults live in the schema (`default:`) and `fill_defaults` applies them.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml


class YamlFileError(ValueError):
    """A YAML file that does not parse; the message is one line: file:line:column: problem."""


# YAML 1.2 reads 2e-5 and 1E3 as numbers; PyYAML follows YAML 1.1, which needs a dot in the
# mantissa (2.0e-5) and reads 2e-5 as a string. The project's files, and strings of that form
# where a schema expects a number, are read as YAML 1.2 does.
YAML12_FLOAT = re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$")


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", YAML12_FLOAT, list("-+0123456789."))


def load_yaml(path: str | Path) -> Any:
    """A YAML file (YAML 1.2 floats); a syntax error is YamlFileError naming file and line."""
    try:
        with Path(path).open() as fh:
            return yaml.load(fh, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise YamlFileError(f"{where}: not valid YAML: {problem}") from None


@cache
def load_schema(path: str | Path) -> dict[str, Any]:
    with Path(path).open() as fh:
        return yaml.safe_load(fh)


def yaml12_numbers(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None):
    """In place: strings such as '2e-5' (what a YAML 1.1 reader, e.g. Snakemake's, makes of
    YAML 1.2 floats) become floats where the schema allows a number. Returns `instance`."""
    root = schema if root is None else root
    node = resolve_ref(schema, root)
    if not isinstance(instance, dict):
        return instance
    props = node.get("properties", {})
    extra = node.get("additionalProperties")
    for key, value in instance.items():
        sub = props.get(key, extra if isinstance(extra, Mapping) else None)
        if sub is None:
            continue
        sub = resolve_ref(sub, root)
        types = sub.get("type", [])
        types = [types] if isinstance(types, str) else types
        if "number" in types and isinstance(value, str) and YAML12_FLOAT.match(value.strip()):
            instance[key] = float(value.strip().replace("_", ""))
        elif isinstance(value, dict):
            yaml12_numbers(value, sub, root)
    return instance


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict update, the way Snakemake merges several --configfile files."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- errors ----------------------------------------------------------------------------------


def key_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def _join(path: str, key: str) -> str:
    return key if path == "<top level>" else f"{path}.{key}"


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format(err: jsonschema.ValidationError) -> list[str]:
    path = key_path(err.absolute_path)
    schema = err.schema if isinstance(err.schema, dict) else {}
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(schema.get("properties", {}))
        extra = [k for k in err.instance if k not in schema.get("properties", {})]
        if allowed:
            return [
                f"{path}: unknown key '{k}'{suggest(k, allowed)}; allowed: {', '.join(allowed)}"
                for k in extra
            ]
        return [f"{path}: unknown key '{k}'" for k in extra]
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return [f"{_join(path, missing)}: missing required key"]
    if err.validator == "propertyNames" or "propertyNames" in err.absolute_schema_path:
        return [
            f"{path}: invalid name {err.instance!r} (use letters and digits, separated by "
            "single '.', '_' or '-')"
        ]
    if err.validator == "enum":
        return [f"{path}: {err.instance!r} is not one of {err.validator_value}"]
    if err.validator == "type":
        return [f"{path}: expected {err.validator_value}, got {err.instance!r}"]
    if err.validator in ("oneOf", "anyOf") and schema.get("description"):
        return [f"{path}: {err.instance!r} is not a valid value ({schema['description']})"]
    if err.validator == "pattern":
        return [f"{path}: {err.instance!r} does not match the pattern {err.validator_value}"]
    return [f"{path}: {err.message}"]


def schema_errors(instance: Any, schema: Mapping[str, Any]) -> list[str]:
    """Every problem of `instance` under `schema`, one formatted message each."""
    validator = jsonschema.Draft202012Validator(schema)
    errors: list[str] = []
    for err in sorted(
        validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))
    ):
        # propertyNames errors are reported on the parent; keep the message, drop duplicates
        for msg in _format(err):
            if msg not in errors:
                errors.append(msg)
    return errors


# --- defaults --------------------------------------------------------------------------------


def resolve_ref(node: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """A subschema with its local `$ref` (#/$defs/...) followed; sibling keys win."""
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = root
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return {**resolve_ref(target, root), **{k: v for k, v in node.items() if k != "$ref"}}


def fill_defaults(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None):
    """Fill in place the `default:` of every absent property, recursing into mappings (also the
    entries of name -> object maps, `additionalProperties`). A default given for a mapping that
    is present is merged under it. Returns `instance`."""
    root = schema if root is None else root
    node = resolve_ref(schema, root)
    if not isinstance(instance, dict):
        return instance
    props = node.get("properties", {})
    for key, sub in props.items():
        sub = resolve_ref(sub, root)
        if "default" in sub:
            if key not in instance:
                instance[key] = copy.deepcopy(sub["default"])
            elif isinstance(sub["default"], Mapping) and isinstance(instance[key], Mapping):
                instance[key] = deep_merge(sub["default"], instance[key])
        if key in instance:
            fill_defaults(instance[key], sub, root)
    extra = node.get("additionalProperties")
    if isinstance(extra, Mapping):
        for key, value in instance.items():
            if key not in props:
                fill_defaults(value, extra, root)
    return instance
