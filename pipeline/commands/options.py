"""Click options made from config dataclasses, so each option's flag, help, default and choices are
written once: as the metadata of its `dataclasses.field` (the way open_clip keeps model configs as
data). A command stacks `options(Config, include)` decorators and builds its config with
`config(Config, values)`.

Field metadata (every key optional):
    help, metavar, hidden, required   as click's
    flag            the option's name, or a tuple of names (default: --field-name)
    choices         a tuple of the allowed values (a click.Choice)
    path            True, or "file": the option is a click.Path that gives a pathlib.Path
    show_default    text shown as the default (for a default that is None, or depends on something)
    parse           the option's value -> the field's (raises ValueError, a one-line error); applied
                    when the config is built, in field order
    type            with parse: the option's type (str unless given)
    format          with parse: the field's default -> the option's default
    default_from    (other field, function): the default is function(the other field's value)
The option's type is the field's annotation (int, float, str, bool; `| None` allowed). A bool field
is a switch: --x/--no-x when it defaults to True, a flag otherwise.
"""
from __future__ import annotations

from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Callable

import click

TYPES = {"int": int, "float": float, "str": str, "bool": bool}

cache_option = click.option("--cache", "cache_dir", required=True, type=click.Path(path_type=Path),
                            help="Cache folder.")


class FieldOption(click.Option):
    """A click option that stands for one config field; keeps the field's parse hooks."""

    def __init__(self, decls, parse: Callable | None = None, default_from: tuple | None = None, **kw):
        super().__init__(decls, **kw)
        self.parse, self.default_from = parse, default_from


def field_option(f: Field, **overrides) -> Callable:
    """The click option decorator of field `f`; `overrides` replace metadata keys (None removes one)."""
    md = {k: v for k, v in {**f.metadata, **overrides}.items() if v is not None}
    flags = md.get("flag", "--" + f.name.replace("_", "-"))
    flags = [flags] if isinstance(flags, str) else list(flags)
    kind = TYPES.get(str(f.type).replace(" | None", ""))
    default = f.default_factory() if f.default is MISSING else f.default
    if "default_from" in md:
        default = None
    elif "format" in md:
        default = md["format"](default)
    kw = dict(help=md.get("help"), metavar=md.get("metavar"), hidden=md.get("hidden", False),
              show_default=md.get("show_default", True), parse=md.get("parse"), default_from=md.get("default_from"))
    if md.get("required"):  # no default at all: click then asks for the option
        kw["required"] = True
    else:
        kw["default"] = default
    if "choices" in md:
        kw["type"] = click.Choice(list(md["choices"]))
    elif "path" in md:
        kw["type"] = click.Path(dir_okay=md["path"] != "file", path_type=Path)
    elif "parse" in md:
        kw["type"] = md.get("type", str)
    elif kind is bool and default:
        flags = [f"{flags[0]}/--no-{flags[0][2:]}"]
    elif kind is bool:
        kw.update(is_flag=True, show_default=md.get("show_default", False))
    elif kind is None:
        raise TypeError(f"{f.name}: no option type for {f.type!r}; give metadata 'parse' (and 'type')")
    else:
        kw["type"] = kind
    return click.option(*flags, f.name, cls=FieldOption, **kw)


def options(cls, include: tuple[str, ...], overrides: dict[str, dict] | None = None) -> Callable:
    """A decorator adding an option for each field of dataclass `cls` named in `include`, in that
    order; `overrides` maps a field to metadata that differs for this command."""
    by_name = {f.name: f for f in fields(cls)}
    made = [field_option(by_name[name], **(overrides or {}).get(name, {})) for name in include]

    def decorate(fn):
        for option in reversed(made):
            fn = option(fn)
        return fn

    return decorate


def config(cls, values: dict):
    """`cls(...)` from the current command's parsed `values` of its fields (other keys are ignored):
    parse hooks and default_from rules applied in field order; a field without an option keeps its
    default."""
    params = {p.name: p for p in click.get_current_context().command.params if isinstance(p, FieldOption)}
    kw: dict = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        value, p = values[f.name], params.get(f.name)
        if p is not None and value is None and p.default_from:
            other, rule = p.default_from
            value = rule(values[other])
        elif p is not None and value is not None and p.parse:
            value = p.parse(value)
        kw[f.name] = value
    return cls(**kw)


def typed(values: dict) -> dict:
    """The entries of `values` whose option was given on this command line (not defaulted)."""
    ctx = click.get_current_context()
    return {k: v for k, v in values.items() if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
