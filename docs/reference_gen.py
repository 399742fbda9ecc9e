"""The generated reference pages: the config keys from the pydantic schema, the CLI from the real
argparse parsers. Plain functions, no MkDocs: `docs/hooks.py` puts their output into
`reference/config.md` and `reference/cli.md` at build time, and `tests/test_docs.py` imports them.

Help text of a config key: the field's `description` when it has one, else the source comments
next to the field (the `#` lines just above it and the trailing `# ...` on its line), read with
`inspect`, `ast` and `tokenize` from the class that defines the field; a section's text is its
class docstring (or its module's docstring when that names the section).
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import io
import json
import os
import re
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the checkout, also when docrl is not installed in the environment
    sys.path.insert(0, str(ROOT))

CONFIG_MARKER = "<!-- generated: config reference -->"
CLI_MARKER = "<!-- generated: cli reference -->"


# ---------------------------------------------------------------------------------------------
# Config schema


@dataclass
class KeyDoc:
    """One leaf key of the config."""

    path: str  # dotted, e.g. rollout.sampling.n ("data.extra_sources[].path" for a list item's field)
    type: str
    default: typing.Any  # the value a default config holds (a Python value; `MISSING` when required)
    constraints: list[str]
    choices: list | None
    help: str


@dataclass
class SectionDoc:
    """A config section (a pydantic model), its own leaf keys, in schema order."""

    path: str  # "" for the root
    model: type
    help: str
    optional: bool = False  # the section itself may be null (its default is null)
    item_of: str | None = None  # a list field whose items have this schema
    keys: list[KeyDoc] = field(default_factory=list)


MISSING = object()


def _section_type(annotation) -> type | None:
    """The Section class of a field that is a section, or an optional one (`X | None`)."""
    from common.schema import Section

    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _section_type(args[0])
    return None


def _list_item_section(annotation) -> type | None:
    from common.schema import Section

    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, Section):
            return item
    return None


def _literal_args(annotation) -> list | None:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for a in typing.get_args(annotation):
            found = _literal_args(a)
            if found is not None:
                return found
    return None


def format_type(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " or ".join(sorted({format_type(type(a)) for a in args}))
    if origin in (typing.Union, types.UnionType):
        parts = [format_type(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {format_type(args[0])}"
    if origin is dict:
        return f"mapping of {format_type(args[0])} to {format_type(args[1])}"
    if isinstance(annotation, type):
        return {"str": "string", "bool": "boolean", "int": "integer", "float": "number"}.get(
            annotation.__name__, f"section {annotation.__name__}")
    return str(annotation)


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <=",
           "multiple_of": "multiple of"}


def _constraints(info) -> list[str]:
    out = []
    for meta in info.metadata:
        for attr, sign in _BOUNDS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value!r}")
    return out


def _comment_text(raw: str) -> str:
    return raw.lstrip("#").strip()


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field name: its source comments} for the fields `cls` itself defines: the contiguous `#`
    lines just above the field, then the trailing comment of the field's lines. A banner comment
    (`# -- ... --`) is a heading in the source, not help text."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    (classdef,) = ast.parse(source).body
    out = {}
    for stmt in classdef.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = []
        line = stmt.lineno - 1
        while line in comments and line not in code_lines:
            above.insert(0, _comment_text(comments[line]))
            line -= 1
        trailing = [_comment_text(comments[n]) for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
        parts = [t for t in above + trailing if t and not re.fullmatch(r"--.*--", t)]
        out[stmt.target.id] = " ".join(parts)
    return out


def field_help(model: type, name: str) -> str:
    info = model.model_fields[name]
    if info.description:
        return info.description
    for cls in model.__mro__:  # the class that defines the field holds its comments
        if name in cls.__dict__.get("__annotations__", {}):
            return field_comments(cls).get(name, "")
    return ""


def section_help(model: type, name: str) -> str:
    doc = model.__dict__.get("__doc__")
    if doc:
        return inspect.cleandoc(doc)
    module_doc = inspect.cleandoc(sys.modules[model.__module__].__doc__ or "")
    first = module_doc.split("\n\n")[0]
    return first if name and f"`{name}`" in first else ""


def config_sections(model: type | None = None, default=MISSING, prefix: str = "",
                    optional: bool = False, item_of: str | None = None) -> list[SectionDoc]:
    """Every section of the schema (depth first, in schema order) with its leaf keys; defaults
    are those of a default config (a section's default instance may differ from its class's
    defaults: `rollout.eval_sampling` is greedy)."""
    if model is None:
        from cluster.config import DocRLConfig

        model = DocRLConfig
        default = DocRLConfig()
    name = prefix.rsplit(".", 1)[-1]
    here = SectionDoc(prefix, model, section_help(model, name), optional=optional, item_of=item_of)
    out = [here]
    for fname, info in model.model_fields.items():
        path = f"{prefix}.{fname}" if prefix else fname
        if default is not MISSING and default is not None:
            value = getattr(default, fname)
        elif info.is_required():
            value = MISSING
        else:
            value = info.get_default(call_default_factory=True)
        sub = _section_type(info.annotation)
        if sub is not None:
            out += config_sections(sub, value, path, optional=value is None)
            continue
        item = _list_item_section(info.annotation)
        here.keys.append(KeyDoc(path, format_type(info.annotation), value, _constraints(info),
                                _literal_args(info.annotation), field_help(model, fname)))
        if item is not None:
            out += config_sections(item, MISSING, f"{path}[]", item_of=path)
    return out


def leaf_keys() -> list[str]:
    """The dotted path of every leaf key (list items' fields excluded: a list is set whole)."""
    return [k.path for s in config_sections() if s.item_of is None and "[]" not in s.path for k in s.keys]


def _md_escape(text: str) -> str:
    """Text from source comments as Markdown table-cell text: code spans kept as they are, `<`,
    `*` and `_` outside them escaped, `|` escaped everywhere (a cell separator otherwise)."""
    parts = re.split(r"(`[^`]*`)", text)
    for i, part in enumerate(parts):
        if i % 2 == 0:
            part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            part = re.sub(r"([*_\[\]])", r"\\\1", part)
        parts[i] = part.replace("|", "\\|")
    return "".join(parts).replace("\n", " ")


def format_default(value) -> str:
    if value is MISSING:
        return "required"
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return "`" + json.dumps(value, ensure_ascii=False) + "`"


def config_reference_markdown() -> str:
    lines = []
    for section in config_sections():
        if not section.path:
            continue
        depth = section.path.count(".") + 2
        title = f"`{section.path}`" if section.item_of is None else f"`{section.item_of}` items"
        lines += ["", f"{'#' * min(depth, 6)} {title} {{#{section.path.replace('[]', '-items')}}}", ""]
        where = f"`{section.model.__module__}.{section.model.__name__}` in `{section.model.__module__.replace('.', '/')}.py`"
        lines.append(f"Schema: {where}.")
        if section.optional:
            lines.append(f"Null (off) by default; set it, e.g. `{section.path}: {{}}`, to use it with the defaults below.")
        if section.item_of is not None:
            lines.append(f"Each item of the list `{section.item_of}` takes these keys (the list is set whole).")
        if section.help:
            lines += ["", _md_escape(section.help)]
        if section.keys:
            lines += ["", "| key | type | default | constraints | description |", "|---|---|---|---|---|"]
            for k in section.keys:
                rules = list(k.constraints)
                if k.choices is not None:
                    rules.insert(0, "one of " + ", ".join(f"`{json.dumps(c)}`" for c in k.choices))
                anchor = k.path.replace("[]", "-items")
                lines.append(f"| <span id=\"{anchor}\"></span>`{k.path}` | {_md_escape(k.type)} | "
                             f"{_md_escape(format_default(k.default))} | {_md_escape(', '.join(rules))} | "
                             f"{_md_escape(k.help)} |")
    return "\n".join(lines).lstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from cluster.cli import build_parser as docrl_parser

    return docrl_parser()


def subcommands(parser: argparse.ArgumentParser, prefix: str = "docrl"):
    """(command words, help, parser) for the parser and every subcommand under it, depth first."""
    yield prefix, parser.description or "", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                for words, text, p in subcommands(sub, f"{prefix} {name}"):
                    yield words, (helps[name] if words == f"{prefix} {name}" else text), p


def _invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._format_action_invocation(action)


def cli_reference_markdown() -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"  # argparse wraps usage lines to the terminal: fixed, so the page is stable
    try:
        parser = build_parser()
        lines = []
        for words, text, p in subcommands(parser):
            has_sub = any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
            depth = words.count(" ") + 2
            lines += ["", f"{'#' * min(depth, 6)} `{words}` {{#{words.replace(' ', '-')}}}", ""]
            if text:
                lines += [_md_escape(text), ""]
            func = p._defaults.get("func")
            doc = inspect.getdoc(func) if func is not None and func.__name__ != "<lambda>" else None
            if doc:
                lines += [_md_escape(doc), ""]
            lines += ["```text", p.format_usage().strip(), "```"]
            rows = []
            for action in p._actions:
                if isinstance(action, argparse._HelpAction):
                    continue
                if isinstance(action, argparse._SubParsersAction):
                    for choice in action._choices_actions:
                        rows.append((f"`{words} {choice.dest}`", "", "", choice.help or ""))
                    continue
                default = action.default
                shown = "" if default is None or default is False or default == argparse.SUPPRESS or action.nargs == 0 else f"`{default}`"
                choices = ", ".join(f"`{c}`" for c in action.choices) if action.choices else ""
                help_text = p._get_formatter()._expand_help(action) if action.help else ""
                rows.append((f"`{_invocation(p, action)}`", shown, choices, help_text))
            if rows:
                head = "subcommand or argument" if has_sub else "argument"
                lines += ["", f"| {head} | default | choices | help |", "|---|---|---|---|"]
                for name, shown, choices, help_text in rows:
                    lines.append(f"| {_md_escape(name)} | {_md_escape(shown)} | {_md_escape(choices)} | "
                                 f"{_md_escape(help_text)} |")
        return "\n".join(lines).lstrip("\n") + "\n"
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
