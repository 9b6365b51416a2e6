"""Pieces of the command line shared by every command module (``cli``, ``glue.cli``,
``plot``): the recipe arguments and the ``--help`` listing of recipe keys."""

from __future__ import annotations

import argparse


def type_name(ann) -> str:
    """A recipe key's type for --help: ``int``, ``int | null``, ``no|fp16|bf16``, ``list[str]``."""
    import types
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def keys_help(schema) -> str:
    """One line per recipe key: dotted name, type and default."""
    from pydantic import BaseModel

    rows = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            rows.append((prefix + name, type_name(ann), "null" if default is None else default))

    walk(schema, "")
    width = max(len(key) for key, _, _ in rows)
    kinds = max(len(kind) for _, kind, _ in rows)
    lines = [f"  {key:<{width}}  {kind:<{kinds}}  default: {default}" for key, kind, default in rows]
    return ("recipe keys (override any with key.path=value; the defaults below are the schema's, a recipe file\n"
            "sets its own: `bert-recipes show RECIPE` prints every value a run would use):\n" + "\n".join(lines))


def recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 output_dir=/tmp/run")
