"""Griffe extension: dale_jax's reStructuredText docstring markup, rendered as Markdown.

dale_jax's docstrings are Google style (``Args:``, ``Returns:``, ``Raises:``) with the
reStructuredText markup that Sphinx reads (as in optax's and Flax's docstrings): ``:func:`x```
roles, ``::`` literal blocks and ``.. math::`` directives. mkdocstrings renders
docstrings as Markdown, so before they are parsed this extension rewrites, in every
docstring of the package:

* ``:func:`name``` (also ``:class:``, ``:mod:``, ``:data:``, ``:meth:``, ``:attr:``,
  ``:obj:``) into a link to ``name``'s entry in the reference when ``name`` resolves,
  from the docstring's scope, to a public object of dale_jax, and into ``name`` in
  code font otherwise (private helpers, other libraries);
* a paragraph ending in ``::`` and the indented block after it into the paragraph
  (ending in ``:``) and a fenced code block (``bash`` when it reads like a command,
  ``python`` when it parses, plain text otherwise), and an indented block of commands
  after a paragraph (``dale-eval ...``) into a ``bash`` block;
* an ``Args:`` or ``Attributes:`` entry that documents several names at once
  (``norm, eps: the threat model.``) into one entry per name, each with the text and
  the names it goes with, when every name is one of the function's parameters (or
  the class's); otherwise it stays as it is and griffe warns;
* ``.. math:: expr`` (one line, or the indented lines after it) into a ``$$`` block
  that MathJax typesets (``pymdownx.arithmatex``).

The docstrings themselves stay as they are, readable in the source and by ``help()``.
"""

from __future__ import annotations

import ast
import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|mod|data|meth|attr|obj):`~?([^`]+)`")
_GROUPED = re.compile(r"^(\s+)([A-Za-z_]\w*(?:, [A-Za-z_]\w*)+):(\s.*|)$")
_NAMED_SECTIONS = ("Args:", "Arguments:", "Parameters:", "Attributes:")
_COMMAND = re.compile(r"^(\$ |dale-|python |pip |tfds |srun |sbatch |cd |export )")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _take_block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
  """The lines from ``start`` indented deeper than ``base`` (blank lines inside kept)."""
  block, i = [], start
  while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
    block.append(lines[i])
    i += 1
  while block and not block[-1].strip():
    block.pop()
    i -= 1
  return block, i


def _language(code: list[str]) -> str:
  """``bash`` for commands, ``python`` for code that parses, ``text`` for the rest."""
  if _COMMAND.match(code[0]):
    return "bash"
  try:
    ast.parse("\n".join(code))
  except SyntaxError:
    return "text"
  return "python"


def _blocks(text: str) -> str:
  """``::`` literal blocks into fenced code, ``.. math::`` into ``$$`` blocks."""
  lines = text.split("\n")
  out: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    stripped = line.strip()
    base = _indent(line)
    if stripped.startswith(".. math::"):
      inline = stripped[len(".. math::"):].strip()
      block, i = _take_block(lines, i + 1, base)
      body = [inline] if inline else []
      body += textwrap.dedent("\n".join(block)).strip("\n").split("\n") if block else []
      pad = " " * base
      out += [pad + "$$"] + [pad + b for b in body if b.strip()] + [pad + "$$"]
      continue
    if stripped.endswith("::") and not stripped.startswith(".."):
      j = i + 1
      while j < len(lines) and not lines[j].strip():
        j += 1
      if j < len(lines) and _indent(lines[j]) > base:
        # reST: "text::" reads "text:", "text ::" reads "text", a lone "::" nothing.
        head = line.rstrip()[:-2]
        if head.strip():
          out.append(head.rstrip() if head.endswith(" ") else head + ":")
        block, i = _take_block(lines, j, base)
        code = textwrap.dedent("\n".join(block)).split("\n")
        lang = _language(code)
        pad = " " * base
        out += [""] if out and out[-1].strip() else []
        out += [pad + "```" + lang] + [pad + c if c.strip() else "" for c in code]
        out += [pad + "```"]
        continue
    prev = next((o for o in reversed(out) if o.strip()), None)
    if (stripped and _COMMAND.match(stripped) and out and not out[-1].strip()
        and prev is not None and base > _indent(prev)):
      # An indented command after a paragraph (a reST block quote) is a command to run.
      base = _indent(prev)
      block, i = _take_block(lines, i, base)
      code = textwrap.dedent("\n".join(block)).split("\n")
      pad = " " * base
      out += [pad + "```bash"] + [pad + c if c.strip() else "" for c in code] + [pad + "```"]
      continue
    out.append(line)
    i += 1
  return "\n".join(out)


def _known_names(obj: griffe.Object) -> set[str]:
  if obj.is_function:
    return {p.name for p in obj.parameters}
  if obj.is_class:
    names = set(obj.members)
    if "__init__" in obj.members and obj.members["__init__"].is_function:
      names |= {p.name for p in obj.members["__init__"].parameters}
    return names
  return set()


def _split_grouped(text: str, known: set[str]) -> str:
  """``a, b: text`` entries of the named sections into ``a: text`` and ``b: text``."""
  lines = text.split("\n")
  out: list[str] = []
  section = None  # indentation of the current named section's header
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.strip() and section is not None and _indent(line) <= section:
      section = None
    if line.strip() in _NAMED_SECTIONS:
      section = _indent(line)
      out.append(line)
      i += 1
      continue
    match = _GROUPED.match(line) if section is not None else None
    names = match.group(2).split(", ") if match else []
    if match and set(names) <= known:
      pad, rest = match.group(1), match.group(3).strip()
      body, i = _take_block(lines, i + 1, len(pad))
      together = ", ".join(f"``{n}``" for n in names)
      for name in names:
        out += [f"{pad}{name}: ({together}) {rest}".rstrip()] + body
      continue
    out.append(line)
    i += 1
  return "\n".join(out)


class RstDocstrings(griffe.Extension):
  """Rewrites every docstring of the loaded package (see the module docstring)."""

  def __init__(self) -> None:
    super().__init__()
    self._done: set[int] = set()

  def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
    self._walk(pkg)

  def _walk(self, obj: griffe.Object) -> None:
    if id(obj) in self._done:
      return
    self._done.add(id(obj))
    if obj.docstring is not None:
      obj.docstring.value = self._rewrite(obj, obj.docstring.value)
    for member in obj.members.values():
      if not member.is_alias:
        self._walk(member)

  def _rewrite(self, obj: griffe.Object, text: str) -> str:
    text = _split_grouped(_blocks(text), _known_names(obj))
    # Roles are rewritten outside the fenced blocks only: code stays as written.
    parts = re.split(r"(^[ \t]*```[^\n]*\n.*?^[ \t]*```[ \t]*$)", text, flags=re.M | re.S)
    return "".join(p if i % 2 else _ROLE.sub(lambda m: self._link(obj, m.group(1)), p)
                   for i, p in enumerate(parts))

  def _link(self, obj: griffe.Object, name: str) -> str:
    target = self._resolve(obj, name)
    if target is None:
      return f"`{name}`"
    return f"[`{name}`][{target}]"

  @staticmethod
  def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The path of the documented public dale_jax object ``name`` means, or None."""
    head, *rest = name.split(".")
    try:
      head = obj.resolve(head)
    except griffe.NameResolutionError:
      if head != obj.package.name:
        return None
    path = ".".join([head, *rest])
    package = obj.package
    if path != package.path and not path.startswith(package.path + "."):
      return None
    try:
      target = package[path[len(package.path) + 1:]] if path != package.path else package
      if target.is_alias:
        target = target.final_target
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
      return None
    private = any(p.startswith("_") and not p.startswith("__") for p in target.path.split("."))
    if private or not target.has_docstring:
      return None
    return target.path
