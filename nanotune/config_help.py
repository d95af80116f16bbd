"""`--help` for the training entry points, made from the config dataclasses themselves.

Each key's line is its type, its default and the comment written beside (or just above) the field
in config.py, so the help can never drift from the keys the loader accepts: a new field appears
in `--help` the moment it exists.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line, or the comment lines right above it."""
    source = inspect.getsource(cls)
    comments_by_line: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments_by_line[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    result = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if not line.startswith("    ") or line.startswith("     ") or not name.isidentifier():
            continue
        if number in comments_by_line:
            result[name] = comments_by_line[number]
            continue
        above, previous = [], number - 1
        while previous in comments_by_line and lines[previous - 1].strip().startswith("#"):
            above.insert(0, comments_by_line[previous])
            previous -= 1
        if above:
            result[name] = " ".join(above)
    return result


def _type_name(annotation) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def section_help(name: str, cls: type) -> list[str]:
    """The lines of one section: its docstring's first line, then one line per key."""
    doc = (inspect.getdoc(cls) or "").split("\n")[0]
    lines = [f"[{name}]" + (f"  {doc}" if doc else "")]
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{name}.{field.name}" if name else field.name
        default = _default(field)
        lines.append(f"  --{key}  ({_type_name(hints[field.name])}, default {default!r})  "
                     f"{comments.get(field.name, '')}".rstrip())
    return lines


def config_help(script: str, run_config_class: type, data_class: type, description: str = "") -> str:
    """The whole `--help` text of a training entry point whose data section is `data_class`."""
    out = [f"usage: python {script} [--config FILE.toml] [--section.key=value | --section.key value ...]"]
    if description:
        out += ["", description.strip()]
    out += ["", "Keys (in a TOML file under [section], or on the command line as --section.key=value):", ""]
    hints = typing.get_type_hints(run_config_class)
    top = [f for f in dataclasses.fields(run_config_class) if not dataclasses.is_dataclass(hints[f.name])
           and not typing.get_args(hints[f.name])]
    comments = field_comments(run_config_class)
    for field in top:
        out.append(f"  --{field.name}  ({_type_name(hints[field.name])}, default {_default(field)!r})  "
                   f"{comments.get(field.name, '')}".rstrip())
    for field in dataclasses.fields(run_config_class):
        if field in top:
            continue
        cls = data_class if field.name == "data" else hints[field.name]
        out += [""] + section_help(field.name, cls)
    return "\n".join(out) + "\n"
