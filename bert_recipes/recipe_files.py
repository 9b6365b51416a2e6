"""Recipe files: YAML reading, ``base:`` inheritance, dotted overrides, one-line errors.

Knows nothing of the recipe schemas (:mod:`bert_recipes.recipe` defines them): this is
the file side of a recipe, from YAML text to a merged dict and back. YAML is read with a
``yaml.SafeLoader`` whose booleans are YAML 1.2's (only ``true``/``false``): ``no``, ``off``,
``yes`` and ``on`` stay strings, so ``precision: no`` means the documented value ``'no'``
(a bool key still accepts them: pydantic reads ``'yes'``/``'off'`` as booleans). Every error
is a one-line :class:`RecipeError`.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from .atomic import write_text
from .errors import RecipeError

_BOOL = "tag:yaml.org,2002:bool"


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans: ``true``/``false`` only (not ``no``/``on``...),
    and a key given twice in one mapping is an error (PyYAML keeps the last one silently)."""

    def flatten_mapping(self, node):
        """Refuse a key given twice among a mapping's own keys, before its ``<<: *anchor``
        merges are inlined (their keys may be overridden). PyYAML flattens a node in place and
        may reach it again through an alias, so each node is checked on its first visit only."""
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: SafeLoader's own error
                    break
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{key}' (first at line {first.line + 1})", key_node.start_mark)
        super().flatten_mapping(node)


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2 floats with an exponent and no dot or no exponent sign (1e3, 2e-5, 1.0e3), which
# YAML 1.1 reads as strings: train.max_steps=1e3 is then 1000, as a user means it
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                   list("-+0123456789."))


def parse_yaml(text: str):
    """``text`` parsed as safe YAML with YAML 1.2 booleans (see :class:`RecipeLoader`)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.__class__.__name__})") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise RecipeError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a YAML mapping of recipe keys, got {type(data).__name__}")
    return data


def deep_merge(base: dict, override: dict) -> dict:
    """Return ``base`` updated recursively with ``override`` (neither is modified)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_raw(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a recipe file and its ``base:`` chain into one merged dict.

    Relative paths inside the recipe (``base:``) are resolved against the recipe's folder.
    Raises :class:`RecipeError` on a missing file, bad YAML or a ``base:`` cycle.
    """
    path = Path(path)
    resolved = path.resolve()
    if resolved in _seen:
        raise RecipeError(f"{path}: 'base:' inheritance cycle")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"{path}: key 'base' must be a path to a recipe file, got {type(base).__name__}")
    base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
    try:
        parent = load_raw(base_path, _seen + (resolved,))
    except RecipeError as exc:
        if str(exc).startswith(f"{path}:"):  # a cycle back to this file: already named
            raise
        raise RecipeError(f"{path}: base '{base}': {exc}") from None
    return deep_merge(parent, data)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides; values are parsed as YAML."""
    out = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}': expected key.path=value")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override '{item}': expected key.path=value")
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError:
            raise RecipeError(f"override '{item}': value is not valid YAML") from None
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(valid_keys(ann, dotted + "."))
    return keys


def error_location(err: ValidationError) -> str:
    """The dotted key of a validation error's first problem ('' for the whole recipe)."""
    return ".".join(str(p) for p in err.errors()[0]["loc"])


def error_key(err: ValidationError) -> str:
    """:func:`error_location`, or for a whole-recipe check the dotted key its message starts
    with (``train.max_steps is required ...``, ``init_from_task: ...``), so that an override
    that set it is named."""
    loc = error_location(err)
    if loc:
        return loc
    found = re.match(r"(?:Value error, )?(?:([a-z_]+(?:\.[a-z_]+)+)\b|([a-z_]+):)", err.errors()[0]["msg"])
    return (found.group(1) or found.group(2)) if found else ""


def override_for(loc: str, overrides: list[str]) -> str | None:
    """The last override that set key ``loc``, a key inside it, or a section holding it."""
    if not loc:
        return None
    for item in reversed(overrides):
        key = item.partition("=")[0].strip()
        if key == loc or loc.startswith(key + ".") or key.startswith(loc + "."):
            return item
    return None


def format_error(schema: type[BaseModel], source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = error_location(err)
    if first["type"] == "extra_forbidden":
        candidates = valid_keys(schema)
        close = difflib.get_close_matches(loc, candidates, n=1, cutoff=0.5)
        if not close:  # match the last part alone, e.g. train.max_step -> train.max_steps
            leaf = loc.rsplit(".", 1)[-1]
            parent = loc.rsplit(".", 1)[0] + "." if "." in loc else ""
            siblings = [c for c in candidates if c.startswith(parent) and "." not in c[len(parent):]]
            leaves = difflib.get_close_matches(leaf, [s[len(parent):] for s in siblings], n=1, cutoff=0.5)
            close = [parent + leaves[0]] if leaves else []
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{source}: unknown key '{loc}'{hint}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        return f"{source}: {msg}" if not loc else f"{source}: key '{loc}': {msg}"
    got = first.get("input")
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    where = f"key '{loc}'" if loc else "recipe"
    return f"{source}: {where}: {msg} (got {shown})"


def dump_recipe(recipe: BaseModel) -> str:
    """The fully resolved recipe as YAML (written into every run and checkpoint)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested recipe dict as ``{"train.learning_rate": value, ...}``: numbers, strings and
    booleans kept, other values (lists, None) as their ``str`` (what trackers take; equal
    exactly when the values are, for a recipe's values); an empty dict adds no key."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def as_override(value) -> str:
    """``value`` (a recipe value, or :func:`flatten`'s ``str`` of one) as a command-line
    override writes it: ``null`` for None, ``true`` / ``false``, else its text
    (``set model.hidden_dropout_prob=None`` in a message was itself an invalid override)."""
    if value is None or value == "None":
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def save_recipe(recipe: BaseModel, directory: str | os.PathLike, name: str = "recipe.yaml") -> Path:
    """Write the resolved recipe to ``directory/name`` atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return write_text(directory / name, dump_recipe(recipe))


COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")  # compressed corpus files (data.corpus streams them)
_BINARY_OK = (".parquet", *COMPRESSION_SUFFIXES)  # binary by design: read by their own readers


def expand_files(patterns: list[str], key: str) -> list[str]:
    """Expand globs into a sorted, de-duplicated file list of corpus files.

    Raises :class:`RecipeError` when a pattern matches nothing, names a missing file or a
    folder, or a file other than parquet or compressed text has NUL bytes in its first 8 KB
    (an image, an Arrow file, UTF-16 text: read as UTF-8 they were trained on as garbage).
    """
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise RecipeError(f"{key}: pattern '{pattern}' matched no files")
            files.extend(matches)
        elif os.path.isfile(pattern):
            files.append(pattern)
        elif os.path.isdir(pattern) and os.path.isfile(os.path.join(pattern, "dataset_info.json")):
            raise RecipeError(f"{key}: '{pattern}' is a datasets save_to_disk folder; export it as files "
                              "(dataset.to_parquet('corpus.parquet') or to_json('corpus.jsonl')) and list those")
        elif os.path.isdir(pattern):
            raise RecipeError(f"{key}: '{pattern}' is a directory; expected files or a glob like '{pattern}/*.txt'")
        else:
            raise RecipeError(f"{key}: file '{pattern}' not found")
    seen = set()
    unique = [f for f in files if not (f in seen or seen.add(f))]
    for path in unique:
        if not path.lower().endswith(_BINARY_OK):
            with open(path, "rb") as handle:
                if b"\0" in handle.read(8192):
                    raise RecipeError(f"{key}: '{path}' is not UTF-8 text (NUL bytes: a binary file, or UTF-16 "
                                      "text?); expected text, JSON Lines or parquet files")
    return unique



__all__ = ["RecipeLoader", "apply_overrides", "deep_merge", "dump_recipe", "error_location", "expand_files",
           "format_error", "load_raw", "override_for", "parse_yaml", "read_yaml", "save_recipe", "valid_keys"]
