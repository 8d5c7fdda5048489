"""The options of ``fit`` (and those ``compare`` shares), generated from :class:`pyroseg.config.FitConfig`.

Each option is defined once, beside its field in ``pyroseg/config.py`` (``option(default,
help=..., choices=..., check=...)``); :func:`config_options` adds one click option per such
field, in field order, and :func:`read_options` turns what click parsed into field values.
The click option's type comes from the field's type: a ``bool`` field is a flag (with
``--no-...`` when it defaults to on), ``choices`` a :class:`click.Choice`, an option written as
text (``--widths 8,16``) a string read by its :class:`pyroseg.config.Text`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from pyroseg.config import FitConfig, Option, flag_of, read_option
from pyroseg.config import config_options as _fields

__all__ = ["config_options", "read_options", "given_on_command_line", "click_default"]


def _base_type(hint: Any) -> Any:
    """``float`` for ``float | None``."""
    if isinstance(hint, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def click_default(opt: Option, default: Any) -> Any:
    """The click default of an option whose field defaults to ``default`` (its text, for text options)."""
    return opt.text.format(default) if opt.text is not None else default


def _click_option(name: str, opt: Option, default: Any, hint: Any, help: str | None) -> Callable:
    flag = flag_of(name)
    kw: dict[str, Any] = {"help": help or opt.help}
    if hint is bool:
        decls = [f"{flag}/--no-{flag[2:]}" if default else flag, name]
        kw.update(is_flag=True, default=default, show_default=bool(default))
    else:
        decls = [flag, name]
        kw["default"] = click_default(opt, default)
        kw["show_default"] = opt.default_text is None and kw["default"] not in (None, ())
        if opt.choices:
            kw["type"] = click.Choice(opt.choices)
        elif opt.folder:
            kw["type"] = click.Path(file_okay=False)
        elif opt.text is not None:
            kw.update(type=str, multiple=opt.text.multiple, metavar=opt.text.metavar)
        else:
            kw["type"] = hint
    if opt.default_text is not None:
        kw["help"] += f"  [default: {opt.default_text}]"
    return click.option(*decls, **kw)


def config_options(*names: str, help: dict[str, str] | None = None) -> Callable:
    """A decorator adding the options of the FitConfig fields ``names`` (all of them when none
    are named) to a click command, in field order; ``help`` replaces the help of some, for a
    command where the option means something else (``compare --seed``: the first seed)."""
    options = _fields()
    unknown = set(names) - set(options)
    if unknown:
        raise ValueError(f"not FitConfig options: {sorted(unknown)}")
    fields = {f.name: f for f in dataclasses.fields(FitConfig)}
    hints = typing.get_type_hints(FitConfig)
    chosen = [n for n in options if not names or n in names]

    def decorate(fn: Callable) -> Callable:
        for name in reversed(chosen):  # click lists the options of stacked decorators top down
            f = fields[name]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            fn = _click_option(name, options[name], default, _base_type(hints[name]), (help or {}).get(name))(fn)
        return fn

    return decorate


def read_options(params: dict[str, Any]) -> dict[str, Any]:
    """The FitConfig field values of the options among a command's ``params`` (text read, bad text refused)."""
    return {name: read_option(name, params[name]) for name in _fields() if name in params}


def given_on_command_line() -> set[str]:
    """The parameters of the current command given on the command line (not defaults)."""
    ctx = click.get_current_context()
    return {p.name for p in ctx.command.params if ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE}
