"""One line and exit status 2 for bad input, in every console script.

A config field out of range, an unknown flag, a dataset that is not prepared or a
workdir without a checkpoint is the user's to fix, not a bug: the scripts print
``<prog>: error: <message>`` (argparse's form) with no traceback and exit 2, the
status absl and argparse use for usage errors. ``DALE_JAX_TRACEBACK=1`` (or absl's
``--verbosity=1``) prints the traceback too. Anything else is a bug and keeps its
traceback.

A training run that diverges (non-finite meters or weights) is not bad input but
not a bug either: it ends in one line naming the step, the non-finite values and
the checkpoint kept, with exit status 1 (:data:`DIVERGED_EXIT`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Callable, Iterator, NoReturn

from absl import app
from absl import flags
from absl import logging

from dale_jax import validation

USAGE_EXIT = 2
DIVERGED_EXIT = 1


def fail(prog: str, message: object, *, show_traceback: bool = False,
         status: int = USAGE_EXIT) -> NoReturn:
  """Prints ``prog: error: message`` to stderr and exits with ``status`` (2: usage)."""
  if show_traceback or os.environ.get("DALE_JAX_TRACEBACK", "") not in ("", "0"):
    traceback.print_exc()
  text = str(message).strip() or type(message).__name__
  print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
  sys.exit(status)


def run_absl(prog: str, main: Callable[[list[str]], object]) -> None:
  """``absl.app.run(main)`` with flag errors and :class:`validation.BadInput` as one line."""
  # Here, not at the top: the configs start JAX, which dale-train and dale-eval need
  # anyway and the research tools (which share this module) must not.
  from dale_jax import configs  # pylint: disable=import-outside-toplevel

  def parse(argv):
    if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:]):
      _print_help(prog, main)  # absl's --helpfull still lists every library's flags too
    # A bundled config by name (--config=quickstart:PGD) from any directory.
    argv = configs.expand_config_flags(argv)
    try:
      return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of no field
      fail(prog, configs.unknown_field_message(e, argv))
    except flags.Error as e:
      # ml_collections wraps an error of the config file (e.g. an unknown algorithm)
      # with that file's traceback: the original is the message.
      fail(prog, _original(e, validation.BadInput) or e)

  def guarded(argv):
    try:
      return main(argv)
    except (validation.BadInput, app.UsageError) as e:
      fail(prog, e, show_traceback=logging.get_verbosity() >= 1)
    except FloatingPointError as e:  # a diverged run (see the module docstring)
      fail(prog, e, show_traceback=logging.get_verbosity() >= 1, status=DIVERGED_EXIT)

  app.run(guarded, flags_parser=parse)


def _print_help(prog: str, main: Callable) -> NoReturn:
  """The script's docstring and its own flags (those its module defines), exit 0."""
  from dale_jax.cli import _flags  # pylint: disable=import-outside-toplevel  # _flags imports us

  module = sys.modules[main.__module__]
  own = flags.FLAGS.get_flags_for_module(module.__name__)
  lines = [f"usage: {prog} [--flag=value ...]", "", (module.__doc__ or "").strip(), "",
           "flags:", *_flags.flag_lines(own), "",
           "--helpfull lists every flag, absl's and the libraries' too."]
  print("\n".join(lines))
  sys.exit(0)


def _original(error: BaseException, kind: type) -> BaseException | None:
  """The innermost exception of type ``kind`` that ``error`` was raised from, if any."""
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, kind):
      found = error
    error = error.__cause__ or error.__context__
  return found


@contextlib.contextmanager
def one_line(prog: str) -> Iterator[None]:
  """Turns a :class:`validation.BadInput` raised in the block into ``prog: error: ...``
  and exit status 2, so that a script's ``main(argv)`` keeps the contract when it is
  called from Python (the tests) as well as from its console script."""
  try:
    yield
  except validation.BadInput as e:
    fail(prog, " ".join(str(e).split()))


def run_main(main: Callable[[], object]) -> NoReturn:
  """``sys.exit(main())`` for a console script whose ``main`` parses ``sys.argv``."""
  code = main()
  sys.exit(code if isinstance(code, int) else 0)
