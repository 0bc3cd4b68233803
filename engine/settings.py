"""Settings dataclasses as the one source of the command line: a field made with `setting`
carries its help and choices, `add_dataclass_flags` makes a flag of each, and
`settings_from_dict` checks a table (TOML can hold anything) against the dataclass before
building it.
"""
import argparse
import typing
from dataclasses import field, fields


def setting(default, help, choices=None):
    """A settings-dataclass field that carries its command-line help and choices: the flags
    of `tinyfuse train` are generated from these, so the dataclass is their one source."""
    return field(default=default, metadata={"help": help, "choices": choices})


def field_choices(cls, name):
    return next(f.metadata.get("choices") for f in fields(cls) if f.name == name)


def setting_kind(annotation):
    """(type, optional) of a settings field annotated `int`, `float | None`, ..."""
    args = typing.get_args(annotation) or (annotation,)
    kind = next((a for a in args if a is not type(None)), None)
    return (kind if kind in (bool, int, float, str, dict) else None), type(None) in args


def settings_from_dict(cls, values, what):
    """cls(**values), with one error naming every key the dataclass does not have, or the
    first value of the wrong type (a TOML file can hold anything)."""
    if not isinstance(values, dict):
        raise ValueError(f"{what} settings must be a table of name = value; got {type(values).__name__} {values!r}")
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} settings: {', '.join(sorted(unknown))}")
    for f in fields(cls):
        if f.name not in values:
            continue
        value, (kind, optional) = values[f.name], setting_kind(f.type)
        if value is None and optional or kind is None:
            continue
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            expected = kind.__name__ + (" or none" if optional else "")
            raise ValueError(f"{what} setting {f.name} must be {'a table' if kind is dict else 'a ' + expected}; "
                             f"got {type(value).__name__} {value!r}")
    return cls(**values)


def add_dataclass_flags(parser, cls, title, shown=None, shown_as="default"):
    """One flag per field of a settings dataclass, its help, default and choices taken from
    the field (`setting`); a flag left out keeps the TOML's or the default.
    shown: the values a run with no flags uses, where they are not the field's default
    (the model's: the default preset's), named in the help as `shown_as`."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        kind, _ = setting_kind(f.type)
        if kind not in (bool, int, float, str) or "help" not in f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices")
        value = f.default if shown is None else shown.get(f.name)
        default = "" if value is None else f" ({shown_as}: {value})"
        if choices:
            help = f"{f.metadata['help']}; one of {', '.join(choices)}{default}"
        else:
            help = f"{f.metadata['help']}{default}"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            # Choices are checked by the dataclass's validate(), as for the TOML file: one line.
            metavar = "{" + ",".join(choices) + "}" if choices else kind.__name__.upper()
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help, metavar=metavar)
