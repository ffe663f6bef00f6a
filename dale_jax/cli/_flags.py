"""absl flags for the console scripts that call ``main(argv)``: one parser, one behaviour.

Each script defines its flags in a ``flags.FlagValues`` of its own rather than in
absl's global ``FLAGS``: two scripts may then both have ``--output_dir`` and be
imported in one process, and ``main(argv)`` can run again and again with other flags
(the tests do; every call starts from the defaults). :func:`parse` gives every such
script the same contract:

* ``--help`` (``-h``, ``--helpfull``) prints the script's description and its own
  flags, each with its help text, and exits 0;
* an unknown flag, a value of the wrong type or out of range, a missing required flag
  or a stray positional argument is one line ``prog: error: --flag=value: what is
  accepted`` on stderr and exit status 2, before anything is read or written;
* flags are absl's: ``--name=value``, lists comma-separated, booleans ``--name`` and
  ``--noname``, underscores in every name.
"""

from __future__ import annotations

import re
import sys
import textwrap
from typing import Any, Collection, NoReturn, Sequence

from absl import flags

from dale_jax.cli import _errors

_HELP = ("-h", "--help", "--helpshort", "--helpfull", "-?")
_REQUIRED = "must have a value"


def parse(prog: str, flag_values: flags.FlagValues, argv: Sequence[str] | None, *,
          description: str, passthrough: str | None = None,
          renamed: dict[str, str] | None = None) -> list[str]:
  """Parses ``argv`` (without the program name; ``None``: ``sys.argv[1:]``) into
  ``flag_values``, reset to the defaults first.

  Args:
    prog: the program's name, the prefix of every error.
    flag_values: the script's own flags.
    argv: the command line without the program name.
    description: the first lines of ``--help``.
    passthrough: a prefix (``"--config."``) of arguments that are not this script's
      flags but passed on to the programs it runs; they are returned, in order.
    renamed: old flag names and what replaced them, named in the error when an old
      spelling is used (``{"precision": "--decimals"}``).

  Returns:
    The passthrough arguments (empty without ``passthrough``).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in _HELP for a in argv):
    print(help_text(prog, flag_values, description, passthrough))
    sys.exit(0)
  passed = [a for a in argv if passthrough and a.startswith(passthrough)]
  own = [a for a in argv if not (passthrough and a.startswith(passthrough))]
  flag_values.unparse_flags()
  try:
    positional = flag_values([prog, *own])[1:]
  except flags.UnrecognizedFlagError as e:
    if renamed and e.flagname in renamed:
      fail(prog, f"--{e.flagname} is now {renamed[e.flagname]}")
    fail(prog, _message(flag_values, e))
  except flags.Error as e:
    fail(prog, _message(flag_values, e))
  if positional:
    fail(prog, f"unexpected arguments {positional}: flags read --name=value")
  return passed


def fail(prog: str, message: object) -> NoReturn:
  """``prog: error: message`` on one line, exit status 2."""
  _errors.fail(prog, " ".join(str(message).split()))


def _message(flag_values: flags.FlagValues, error: flags.Error) -> str:
  """absl's error with what the flag accepts, e.g. ``--steps=x: expected a positive
  integer``; a missing required flag as ``--input_dir is required: <its help>``."""
  text = " ".join(str(error).split())
  match = re.fullmatch(r"flag --(\w+)=(.*?): (.*)", text)
  if not match or match.group(1) not in flag_values:
    return text
  name, value, why = match.groups()
  flag = flag_values[name]
  if value in ("None", "") and _REQUIRED in why:
    return f"--{name} is required: {flag.help}"
  if flag.boolean:
    return f"--{name}={value}: expected true or false (or --{name} / --no{name})"
  accepted = flag.parser.syntactic_help
  if accepted and accepted not in why:
    why = f"{why} (expected {accepted})"
  return f"--{name}={value}: {why}"


def mark_required(names: Sequence[str], flag_values: flags.FlagValues) -> None:
  """Refuses a command line without ``--name`` or with ``--name=`` (empty)."""
  for name in names:
    flags.register_validator(name, lambda value: value not in (None, "", []),
                             message=f"Flag --{name} {_REQUIRED}.", flag_values=flag_values)


def help_text(prog: str, flag_values: flags.FlagValues, description: str,
              passthrough: str | None = None) -> str:
  """Usage, description and the script's own flags in the order they were defined."""
  usage = f"usage: {prog} [--flag=value ...]"
  if passthrough:
    usage += f" [{passthrough}<field>=<value> ...]"
  lines = [usage, "", description.strip(), "", "flags:"]
  lines += flag_lines(flag_values[name] for name in flag_values
                      if flag_values[name].name == name)  # not a short name
  lines += ["", "absl: --flagfile=FILE reads further flags from FILE, one a line."]
  return "\n".join(lines)


def flag_lines(flag_list) -> list[str]:
  """Each flag with its help text, its default and what it accepts, in the given order."""
  lines = []
  for flag in flag_list:
    name = flag.name
    shown = f"--[no]{name}" if flag.boolean else f"--{name}"
    lines += textwrap.wrap(f"{shown}: {flag.help}", 88, initial_indent="  ",
                           subsequent_indent="    ")
    notes = []
    if flag.default is not None and not (isinstance(flag.default, list) and not flag.default):
      notes.append(f"default: {flag.default_as_str}")
    accepted = flag.parser.syntactic_help
    if accepted and not flag.boolean:
      notes.append(accepted)
    if notes:
      lines += textwrap.wrap(f"({'; '.join(notes)})", 88, initial_indent="    ",
                             subsequent_indent="     ")
  return lines


class _ListParser(flags.ArgumentParser):
  """A comma-separated list whose items ``convert`` checks (raising ``ValueError``)."""

  def __init__(self, convert, syntactic_help: str, distinct: bool = True):
    super().__init__()
    self._convert, self.syntactic_help, self._distinct = convert, syntactic_help, distinct

  def parse(self, argument: Any) -> list:
    if isinstance(argument, list):
      return argument
    items = [s.strip() for s in str(argument).split(",") if s.strip()]
    try:
      values = [self._convert(s) for s in items]
    except ValueError:
      values = None
    if not values or (self._distinct and len(set(values)) != len(values)):
      raise ValueError(f"expected {self.syntactic_help}")
    return values

  def flag_type(self) -> str:
    return "list"


def _integer_at_least(minimum: int):
  def convert(text: str) -> int:
    value = int(text)
    if value < minimum:
      raise ValueError(text)
    return value
  return convert


def _one_of(choices: Collection[str]):
  def convert(text: str) -> str:
    if text not in choices:
      raise ValueError(text)
    return text
  return convert


def define_integer_list(name: str, default: list[int] | None, help_text_: str,
                        flag_values: flags.FlagValues, *, minimum: int = 1):
  """A flag of distinct comma-separated integers >= ``minimum`` (``--batch_size=64,256``)."""
  parser = _ListParser(_integer_at_least(minimum),
                       f"distinct integers >= {minimum} separated by commas")
  return flags.DEFINE(parser, name, default, help_text_, flag_values=flag_values,
                      serializer=flags.CsvListSerializer(","))


def define_enum_list(name: str, default: list[str] | None, choices: Sequence[str],
                     help_text_: str, flag_values: flags.FlagValues):
  """A flag of distinct comma-separated names, each one of ``choices``."""
  parser = _ListParser(_one_of(choices),
                       f"distinct names from {', '.join(choices)} separated by commas")
  return flags.DEFINE(parser, name, default, help_text_, flag_values=flag_values,
                      serializer=flags.CsvListSerializer(","))


def define_name_list(name: str, default: list[str] | None, help_text_: str,
                     flag_values: flags.FlagValues):
  """A flag of distinct comma-separated names (checked later against what exists)."""
  parser = _ListParser(str, "distinct names separated by commas")
  return flags.DEFINE(parser, name, default, help_text_, flag_values=flag_values,
                      serializer=flags.CsvListSerializer(","))
