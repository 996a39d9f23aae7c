"""The keys of a config dataclass, with type, default and a one-line doc (`mugv config keys`).

The docs are the dataclasses' own: a field's trailing `# comment` (or the comment lines right
above it), else a `name: text` entry in its class docstring; a nested section's doc is its
class docstring's first line.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, e.g. "optim.lr"
    type: str
    default: str
    doc: str
    section: bool = False  # a nested dataclass (its keys follow)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: doc} from the class source's comments and its docstring's `name: text` lines."""
    docs: dict[str, str] = {}
    entry = None
    for line in class_doc(cls).splitlines():
        name, sep, text = line.strip().partition(":")
        if sep and name.isidentifier() and text.strip() and not line.startswith(" "):
            entry = name
            docs[name] = text.strip()
        elif entry and line.startswith(" ") and line.strip():  # an entry's continuation lines
            docs[entry] += " " + line.strip()
        else:
            entry = None
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    comments: dict[int, str] = {}  # line number -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if text and not text.startswith("fmt:"):
                comments[tok.start[0]] = text
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, n = [], node.lineno - 1
        while n in comments and n not in code_lines:  # a comment block directly above
            above.insert(0, comments[n])
            n -= 1
        text = " ".join(own or above)
        if text:
            docs[node.target.id] = text
    return docs


def class_doc(cls: type) -> str:
    """The class's own docstring ("" for a dataclass without one, not its generated signature)."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "???"


def describe_keys(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every key of `cls`, depth first; nested dataclasses as a section entry then their keys."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            doc = docs.get(f.name) or class_doc(tp).split("\n")[0]
            out.append(KeyDoc(key, tp.__name__, "", doc, section=True))
            out += describe_keys(tp, key + ".")
        else:
            default = _default(f)
            out.append(KeyDoc(key, _type_name(tp), repr(default), docs.get(f.name, "")))
    return out


def format_keys(cls: type, section: str | None = None) -> str:
    """`mugv config keys` output: one line per key (type, default, doc), optionally one section."""
    keys = describe_keys(cls)
    if section:
        keys = [k for k in keys if k.key == section or k.key.startswith(section + ".")]
        if not keys:
            sections = sorted({k.key for k in describe_keys(cls) if k.section})
            raise KeyError(f"no key or section {section!r} in {cls.__name__} (sections: {', '.join(sections)})")
    width = max(len(k.key) for k in keys)
    twidth = max(len(k.type) for k in keys if not k.section) if any(not k.section for k in keys) else 0
    lines = []
    for k in keys:
        if k.section:
            lines.append(f"{k.key + ':':{width}s}  [{k.type}] {k.doc}".rstrip())
        else:
            lines.append(f"{k.key:{width}s}  {k.type:{twidth}s}  = {k.default}  {k.doc}".rstrip())
    return "\n".join(lines)
