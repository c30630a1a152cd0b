"""``reconstruct``'s method options, built from the methods' own signatures.

Each method's options are the keyword-only parameters of ``stemdask.methods.<name>.run``:
the flag is the parameter's name with dashes (``kernel_size`` → ``--kernel-size``), the type
and choices come from its annotation, the help from its docstring's ``Parameters`` section
(meaning and units) plus the default from the signature — so nothing is declared twice. A
parameter several methods share (``com_reference``) is declared once, in its own group.
Options are parsed with no default; what is not given takes the method's own default, and a
given option that none of the chosen methods takes is refused.
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass

from ..methods import NAMES, Positive, runner, summary
from .common import CLIError

#: Units as they appear in the docstrings → the metavar shown in the help.
_UNITS = (("Å⁻²", "Å⁻²"), ("Å²", "Å²"), ("Å⁻¹", "Å⁻¹"), ("Å", "Å"), ("mrad", "MRAD"), ("degrees", "DEG"))


@dataclass
class Option:
    """One command-line option: its parameter, the methods that take it and their defaults."""

    parameter: str
    annotation: object
    help: str
    defaults: dict  # method → default

    @property
    def flag(self) -> str:
        return "--" + self.parameter.replace("_", "-")


def parameter_docs(fn) -> dict[str, str]:
    """``name → description`` from a numpydoc ``Parameters`` section of ``fn``'s docstring."""
    doc = inspect.getdoc(fn) or ""
    section = re.split(r"\nParameters\n-+\n", doc)
    if len(section) < 2:
        return {}
    out, name = {}, None
    for line in section[1].splitlines():
        if line and not line.startswith(" "):
            name = line.split(":")[0].strip()
            out[name] = ""
        elif name is not None and line.strip():
            out[name] = (out[name] + " " + line.strip()).strip()
    return out


def method_options(names=NAMES) -> dict[str, Option]:
    """Every option of the methods ``names``, by parameter name."""
    options: dict[str, Option] = {}
    for name in names:
        fn = runner(name)
        hints = typing.get_type_hints(fn, include_extras=True)
        docs = parameter_docs(fn)
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            option = options.setdefault(p.name, Option(p.name, hints[p.name], docs.get(p.name, ""), {}))
            option.defaults[name] = p.default
    return options


def _parts(annotation) -> tuple[list, list, bool, bool]:
    """(plain types, literal values, optional, positive) of an annotation such as
    ``PositiveFloat | Literal["auto"] | None``."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    plain, literals, optional, positive = [], [], False, False
    for a in args:
        if typing.get_origin(a) is typing.Annotated:
            a, *marks = typing.get_args(a)
            positive = positive or Positive in marks
        if a is type(None):
            optional = True
        elif typing.get_origin(a) is typing.Literal:
            literals += list(typing.get_args(a))
        else:
            plain.append(a)
    return plain, literals, optional, positive


def _converter(plain: list, literals: list, positive: bool):
    """A parser of one value: a number of the plain type (> 0 if ``positive``), or one of the
    literal words."""
    kind = plain[0]

    def convert(text: str):
        if text.strip().lower() in literals:
            return text.strip().lower()
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (positive and value <= 0):
            words = " or ".join(repr(w) for w in literals)
            what = ("a positive " if positive else "an ") + ("integer" if kind is int else "number")
            raise argparse.ArgumentTypeError(f"expected {what.replace('an number', 'a number')}"
                                             + (f" or {words}" if words else "") + f", got {text!r}")
        return value

    convert.__name__ = kind.__name__
    return convert


def _shown(value) -> str:
    return "none" if value is None else "off" if value is False else f"{value:g}" if isinstance(value, float) \
        else str(value)


def _default_text(option: Option) -> str:
    """``default 61``, ``default bf for com, mean for icom/dpc/ricom``; empty where the help
    already says what no value means (``(none: …)``)."""
    by_value: dict[str, list[str]] = {}
    for method, value in option.defaults.items():
        by_value.setdefault(_shown(value), []).append(method)
    if list(by_value) == ["none"] and "(none:" in option.help:  # shown as "(default: …)"
        return ""
    if len(by_value) == 1:
        return f"; default {next(iter(by_value))}"
    return "; default " + ", ".join(f"{v} for {'/'.join(ms)}" for v, ms in by_value.items())


def _add(group, option: Option) -> None:
    help_text = (option.help + _default_text(option)).replace("(none: ", "(default: ") if option.help else ""
    plain, literals, _, positive = _parts(option.annotation)
    kw: dict = {"dest": option.parameter, "default": argparse.SUPPRESS, "help": help_text}
    if plain == [bool]:
        kw["action"] = "store_true"
    elif not plain:
        kw["choices"] = literals
    else:
        kw["type"] = _converter(plain, literals, positive) if plain[0] in (int, float) else plain[0]
        unit = next((m for u, m in _UNITS if u in option.help), None)
        kw["metavar"] = (unit or ("N" if plain[0] is int else "DIR" if plain[0] is str else "X")) + \
            ("|" + "|".join(literals) if literals else "")
    group.add_argument(option.flag, **kw)


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One argument group per method, and one for the options several methods share."""
    options = method_options()
    shared = [o for o in options.values() if len(o.defaults) > 1]
    for name in NAMES:
        own = [o for o in options.values() if list(o.defaults) == [name]]
        also = [o.flag for o in shared if name in o.defaults]
        group = parser.add_argument_group(f"--method {name}: {summary(name)}",
                                          f"also {', '.join(also)} (below)" if also else None)
        for option in own:
            _add(group, option)
    if shared:
        group = parser.add_argument_group("options of several methods")
        for option in shared:
            _add(group, option)


def chosen_options(args: argparse.Namespace, methods: list[str]) -> dict[str, dict]:
    """``{method: {option: value}}`` of the options given on the command line; a given option
    that none of ``methods`` takes is a :class:`CLIError`."""
    options = method_options()
    given = {name: getattr(args, name) for name in options if hasattr(args, name)}
    for name in given:
        takers = [m for m in options[name].defaults if m in methods]
        if not takers:
            raise CLIError(f"{options[name].flag} applies to --method {' / '.join(options[name].defaults)}, "
                           f"not to {', '.join(methods)}")
    return {m: {k: v for k, v in given.items() if m in options[k].defaults} for m in dict.fromkeys(methods)}
