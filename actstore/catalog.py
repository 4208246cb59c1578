"""catalog.yaml: short names for models, prompt sets and stores.

Commands, flows and deployments refer to ``toy-ldm`` or ``demo`` instead of paths that
differ per machine; the catalog is the one place that maps names to locations. It is
validated against its JSON schema (``actstore/catalog.schema.json``, package data, so an
installed actstore finds it; ``schemas/`` links to it) and every problem becomes a one-line
:class:`ActstoreError` naming the key path, because a typo in a config file should cost
seconds, not a failed overnight run.

Resolution rules (the same for every kind of entry):

* ``${VAR}`` and ``${VAR:-default}`` expand from the environment, then ``~``;
* a relative local path resolves against the catalog file's folder, so the catalog means
  the same thing whatever the working directory; fsspec URLs (``s3://...``) are kept as is;
* a name that is not in the catalog is passed through as a path, URL or Hugging Face id.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from actstore.errors import ActstoreError

SCHEMA_PATH = Path(__file__).resolve().parent / "catalog.schema.json"  # package data
REPO_CATALOG = Path(__file__).resolve().parent.parent / "catalog.yaml"
BUILTIN_MODELS = ("tiny-random",)
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")
_STORE_SETTINGS = ("steps", "guidance", "height", "width", "capture", "vae_source")
SD_GUIDANCE = 7.5  # the paper's (SD v1.x's usual); the one default of generation and flows


@dataclass(frozen=True)
class Catalog:
    """A validated catalog; entries are the raw YAML mappings, resolved only on demand."""

    path: Path
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    prompt_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    stores: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        """Relative paths in the catalog are relative to this folder, not to the cwd."""
        return self.path.parent


def find_catalog(path: str | None = None) -> Catalog | None:
    """``--catalog``, else ./catalog.yaml, else the repository's: one lookup for the
    ``actstore`` commands and the ``python -m`` diagnostics, so a store name that works in
    one works in the other."""
    if path:
        return load_catalog(path)
    if Path("catalog.yaml").is_file():
        return load_catalog("catalog.yaml")
    return load_catalog(REPO_CATALOG) if REPO_CATALOG.is_file() else None


def load_catalog(path: str | os.PathLike[str] = "catalog.yaml") -> Catalog:
    """Parse (``yaml.safe_load``), validate and cross-check a catalog file."""
    label = str(path)  # as the user wrote it, so the message points where they looked
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ActstoreError(f"{label}: cannot read catalog ({type(exc).__name__}: "
                            f"{exc.strerror if isinstance(exc, OSError) else exc}); "
                            "check the catalog path") from exc
    try:
        data = yaml.safe_load(text)
        _check_duplicate_keys(text, label)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ActstoreError(f"{label}: {where}invalid YAML ({' '.join(str(problem).split())}); "
                            "fix the syntax") from exc
    if data is None:
        data = {}
    _validate(data, label)
    catalog = Catalog(path=path, models=data.get("models") or {},
                      prompt_sets=data.get("prompt_sets") or {}, stores=data.get("stores") or {})
    _check_references(catalog, label)
    return catalog


def resolve_model(catalog: Catalog | None, name_or_path: str) -> dict[str, Any]:
    """Turn a model argument into ``{name, kind, ref, revision, dtype, guidance,
    description}``.

    ``kind`` is ``"builtin"``, ``"path"`` (``ref`` an absolute folder) or ``"hf_id"``
    (``ref`` an ``org/name`` to load from the local Hugging Face cache). ``name`` is the
    catalog name or None; ``dtype`` and ``guidance`` None mean "the usual default".
    """
    out: dict[str, Any] = {"name": None, "revision": None, "dtype": None, "guidance": None,
                           "description": None}
    if catalog is not None and name_or_path in catalog.models:
        entry = catalog.models[name_or_path]
        key = f"{catalog.path.name}: models.{name_or_path}"
        guidance = entry.get("guidance")
        out.update(name=name_or_path, dtype=entry.get("dtype"),
                   guidance=None if guidance is None else float(guidance),
                   description=entry.get("description"), revision=entry.get("revision"))
        if "builtin" in entry:
            return {**out, "kind": "builtin", "ref": entry["builtin"]}
        if "hf_id" in entry:
            return {**out, "kind": "hf_id", "ref": entry["hf_id"]}
        return {**out, "kind": "path", "ref": _resolve_location(entry["path"], catalog.root,
                                                                f"{key}.path")}
    if name_or_path in BUILTIN_MODELS:
        return {**out, "kind": "builtin", "ref": name_or_path}
    expanded = _expand(name_or_path, "model")
    if _URL.match(expanded):
        return {**out, "kind": "path", "ref": expanded}
    local = Path(expanded).expanduser()
    if local.exists() or expanded.startswith((".", "/", "~")):
        ref = str(local.resolve())
        named = _model_named_by_path(catalog, ref)  # `models/toy-ldm` means `toy-ldm`
        return resolve_model(catalog, named) if named else {**out, "kind": "path", "ref": ref}
    if _HF_ID.match(expanded):
        return {**out, "kind": "hf_id", "ref": name_or_path}
    raise ActstoreError(
        f"unknown model '{name_or_path}': not a catalog name{_choices(catalog, 'models')}, "
        f"a builtin ({', '.join(BUILTIN_MODELS)}), an existing folder, or a Hugging Face id "
        "'org/name'; fix the name or add it to catalog.yaml")


def _model_named_by_path(catalog: Catalog | None, ref: str) -> str | None:
    """The catalog model whose folder is ``ref``, so a path gets its entry's dtype and
    guidance too; entries whose location cannot be resolved here are skipped."""
    for name, entry in (catalog.models if catalog is not None else {}).items():
        if "path" not in entry:
            continue
        try:
            if _resolve_location(entry["path"], catalog.root, name) == ref:
                return name
        except ActstoreError:
            continue
    return None


def resolve_prompts(catalog: Catalog | None, name_or_path: str) -> str:
    """Turn a prompt-set argument into a path or URL that :func:`load_prompts` reads."""
    if catalog is not None and name_or_path in catalog.prompt_sets:
        key = f"{catalog.path.name}: prompt_sets.{name_or_path}.path"
        return _resolve_location(catalog.prompt_sets[name_or_path]["path"], catalog.root, key)
    expanded = _expand(name_or_path, "prompts")
    if _URL.match(expanded):
        return expanded
    local = Path(expanded).expanduser()
    if local.exists() or local.suffix:  # a file name: let load_prompts say what is wrong
        return str(local)
    raise ActstoreError(
        f"unknown prompt set '{name_or_path}': not a catalog name"
        f"{_choices(catalog, 'prompt_sets')} nor a .csv/.parquet file; fix the name or add "
        "it to catalog.yaml")


def resolve_store(catalog: Catalog | None, name_or_uri: str) -> dict[str, Any]:
    """Turn a store argument into ``{name, uri, model, prompts, steps, guidance, height,
    width, description}``.

    ``model`` and ``prompts`` stay catalog names (pass them to :func:`resolve_model` and
    :func:`resolve_prompts`); settings absent from the entry, and all of them for a plain
    URI, are None so the caller's defaults or flags apply.
    """
    out: dict[str, Any] = {k: None for k in ("name", "uri", "model", "prompts", "description",
                                             *_STORE_SETTINGS)}
    if catalog is not None and name_or_uri in catalog.stores:
        entry = catalog.stores[name_or_uri]
        key = f"{catalog.path.name}: stores.{name_or_uri}.uri"
        out.update({k: entry.get(k) for k in out}, name=name_or_uri,
                   uri=_resolve_location(entry["uri"], catalog.root, key))
        for k in ("steps", "height", "width"):
            out[k] = None if out[k] is None else int(out[k])
        out["guidance"] = None if out["guidance"] is None else float(out["guidance"])
        return out
    expanded = _expand(name_or_uri, "store")
    uri = expanded if _URL.match(expanded) else str(Path(expanded).expanduser())
    return {**out, "uri": uri}


def resolve_guidance(flag: float | None, store: dict[str, Any],
                     model: dict[str, Any]) -> float:
    """The guidance of a run: ``--guidance``, else the store entry's, else the model's,
    else SD's 7.5. A model trained small (the toy LDM) can name the guidance it samples
    cleanly at, and every store of it then uses that without each entry repeating it."""
    for source, value in (("--guidance", flag), ("the store entry", store.get("guidance")),
                          ("the model entry", model.get("guidance"))):
        if value is not None:
            if not math.isfinite(value := float(value)) or value < 0:
                raise ActstoreError(f"guidance {value} (from {source}): must be a finite "
                                    "number >= 0, e.g. 7.5 for SD v1.x")
            return value
    return SD_GUIDANCE


# --- validation -------------------------------------------------------------------------

def _validate(data: Any, label: str) -> None:
    """Report the single most useful schema error, phrased for a human editing YAML."""
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = list(validator.iter_errors(data))
    if not errors:
        return
    rank = {"additionalProperties": 0, "propertyNames": 0, "type": 1, "required": 2}
    best = min(errors, key=lambda e: (rank.get(e.validator, 3), -len(e.path)))
    raise ActstoreError(f"{label}: {_describe(best)}")


def _describe(err: jsonschema.ValidationError) -> str:
    """One line: key path, what is wrong, what would be right."""
    path = ".".join(str(p) for p in err.path) or "top level"
    schema = err.schema if isinstance(err.schema, dict) else {}
    if err.validator == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        unknown = [k for k in err.instance if k not in allowed]
        hint = difflib.get_close_matches(str(unknown[0]), allowed, n=1)
        guess = f"; did you mean '{hint[0]}'?" if hint else ""
        return (f"{path}: unknown key '{unknown[0]}' (allowed: {', '.join(allowed)}){guess}")
    if err.validator == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        return f"{path}: missing required key '{missing[0]}'"
    if "propertyNames" in err.relative_schema_path:
        return f"{path}: bad name {err.instance!r}: {schema.get('x-message', err.message)}"
    parent, _, key = path.rpartition(".")
    subject = f"{parent or 'top level'}: '{key}'" if err.path else "top level"
    got = _shown(err.instance)
    if err.validator == "type":
        want = err.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        article = "an" if str(want)[0] in "aeiou" else "a"
        return f"{subject} must be {article} {want}, got {got}"
    if err.validator in ("enum", "const"):
        choices = err.validator_value if err.validator == "enum" else [err.validator_value]
        return f"{subject} must be one of: {', '.join(map(str, choices))}; got {got}"
    if err.validator in ("minimum", "maximum", "multipleOf", "minLength"):
        op = {"minimum": ">=", "maximum": "<=", "multipleOf": "a multiple of",
              "minLength": "at least this many characters:"}[err.validator]
        return f"{subject} must be {op} {err.validator_value}, got {got}"
    if "x-message" in schema:
        if err.validator == "oneOf":
            return f"{path}: {schema['x-message']}"
        return f"{subject} must be {schema['x-message']}, got {got}"
    return f"{path}: {' '.join(err.message.split())}"


def _check_references(catalog: Catalog, label: str) -> None:
    """A store naming an undefined model would only fail at run time; fail at load."""
    for name, store in catalog.stores.items():
        for key, section in (("model", "models"), ("prompts", "prompt_sets")):
            target = store[key]
            if target not in getattr(catalog, section):
                raise ActstoreError(
                    f"{label}: stores.{name}: '{key}' names unknown {section[:-1].replace('_', ' ')}"
                    f" '{target}'{_choices(catalog, section)}; define it under '{section}' or "
                    "fix the name")


def _check_duplicate_keys(text: str, label: str) -> None:
    """safe_load keeps the last of two equal keys silently; a second 'toy' store would
    quietly replace the first, so walk the composed (never constructed) node tree."""
    stack = [yaml.compose(text, Loader=yaml.SafeLoader)]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        raise ActstoreError(
                            f"{label}: line {key.start_mark.line + 1}: duplicate key "
                            f"'{key.value}' (first on line {seen[key.value]}); keep only one")
                    seen[key.value] = key.start_mark.line + 1
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


# --- locations --------------------------------------------------------------------------

def _resolve_location(value: str, root: Path, key: str) -> str:
    """Expand, then anchor relative local paths at the catalog folder."""
    expanded = _expand(value, key)
    if _URL.match(expanded):
        return expanded
    path = Path(expanded).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def _expand(value: str, key: str) -> str:
    """``${VAR}`` / ``${VAR:-default}``; an unset variable without default is an error,
    because silently using an empty string would point at the wrong folder."""
    def sub(m: re.Match[str]) -> str:
        var, default = m.group(1), m.group(2)
        if os.environ.get(var):
            return os.environ[var]
        if default is not None:
            return default
        raise ActstoreError(f"{key}: environment variable '{var}' is not set and has no "
                            f"default; export {var}=... or write ${{{var}:-/default/path}}")
    return _ENV.sub(sub, value)


def _choices(catalog: Catalog | None, section: str) -> str:
    names = list(getattr(catalog, section)) if catalog is not None else []
    return f" (catalog has: {', '.join(names)})" if names else ""


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
