"""How a command ends on a failure its user can fix: one line on the console, not a traceback.

Layer 5 of vit_jax: shared by launch.py, experiments/sweep_heads.py, ship_model.py and the
benchmarks. Each defines its config flag inside the command it passes (see `launch.run`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_command(define_flags: Callable[[], None], main: Callable[[list[str]], None]) -> None:
  """A command's whole life: `define_flags()` (where a --config file's flags are defined,
  its misspelt keys already fail), absl's parsing (`parse_flags`), then `main(argv)`, each
  failure a user can fix ending in one line (`ending_in_one_line`)."""
  from absl import app

  ending_in_one_line(lambda: (define_flags(), app.run(main, flags_parser=parse_flags)))


def ending_in_one_line(command: Callable[[], None]) -> None:
  """Runs `command`. A bad config, data or file (ValueError, OSError) or a non-finite loss
  ends the process with 'error: ...' and exit status 2; SIGTERM or Ctrl-C, once training has
  saved its checkpoint, with 'interrupted: ...' and 128 + the signal's number."""
  WriteError = TrainingInterruptedError = ()  # noqa: N806 - until imported: match nothing
  try:
    # These imports take a second or two (JAX, orbax): a Ctrl-C within them ends in one line.
    from vit_jax import run_log
    from vit_jax.checkpoints import WriteError
    from vit_jax.interrupt import TrainingInterruptedError

    run_log.PROCESS_ENDS_ON_FAILURE = True
    command()
  except BrokenPipeError:  # the console's reader left (`| head`): nobody to tell
    with contextlib.suppress(OSError):
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    sys.exit(141)  # 128 + SIGPIPE, as the shell reports a process the pipe ended
  except KeyboardInterrupt:  # Ctrl-C before training set its handler: nothing to save yet
    to_console("interrupted by Ctrl-C before anything was saved; rerun the same command")
    sys.exit(130)
  except (AttributeError, KeyError) as e:
    # ml_collections raises these, with a traceback, for `--config.x=...` naming no field
    # (when the config flag is defined, or when the flags are parsed: both inside `command`).
    if (line := unknown_config_key(e) or config_file_failure(e)) is None:
      raise
    to_console(f"error: {line}")
    sys.exit(2)
  except (ValueError, FloatingPointError, OSError) as e:
    to_console(f"error: {config_file_failure(e) or e}")
    if isinstance(e, WriteError):
      # A failed write's threads may still report into a closed event loop, into the run's
      # log, where stderr stays diverted; nothing is left to save, so nothing waits for them.
      os._exit(2)
    sys.exit(2)
  except TrainingInterruptedError as e:
    to_console(f"interrupted: {e}")
    sys.exit(128 + e.signum)
  except Exception as e:  # e.g. a SyntaxError in the --config file; anything else is a bug
    if (line := config_file_failure(e)) is None:
      raise
    to_console(f"error: {line}")
    sys.exit(2)


def keep_the_console_for_ours() -> None:
  """Orbax, TFDS and JAX log every step of their work at INFO (and JAX its search for a TPU):
  keep their warnings and errors only. Called in a command's `main`, after absl has set up
  its logging. TensorFlow (imported later, by TFDS or the export) computes nothing of ours:
  without its oneDNN kernels it does not announce them at INFO ("oneDNN custom operations
  are on", twice, on CPUs with AVX-512), unless the user chose otherwise."""
  for name in ("absl", "jax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  from absl import logging as absl_logging

  for handler in logging.getLogger().handlers:  # absl's, once its app has started
    if isinstance(handler, absl_logging.ABSLHandler):  # formats in a handler of its own
      others = absl_logging.PythonFormatter()
    else:
      others = handler.formatter or logging.Formatter()
    if not isinstance(others, _OwnLinesPlain):
      handler.setFormatter(_OwnLinesPlain(others))


class _OwnLinesPlain(logging.Formatter):
  """vit_jax's records as 'warning: ...' lines, like the rest of what a run prints; other
  libraries' with the handler's own format (absl's: level, time, thread, file and line)."""

  def __init__(self, others: logging.Formatter):
    super().__init__()
    self.others = others

  def format(self, record: logging.LogRecord) -> str:
    if record.name == "vit_jax" or record.name.startswith("vit_jax."):
      line = f"{record.levelname.lower()}: {record.getMessage()}"
      return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")
    return self.others.format(record)


# What a trained run chose for these on its machine is chosen again on the one that uses it
# (`auto.resolve` keeps the run's precision and attention where this machine computes them).
CHOSEN_PER_MACHINE = {"microbatch_size": "auto", "model.compute_dtype": "auto",
                      "model.attention_kernel": "auto"}


def recorded_config(workdir: str | os.PathLike, overrides: dict[str, Any]) -> dict | None:
  """The config a run recorded (WORKDIR/config.json), its machine's choices left to 'auto'
  again and `overrides` on top ({'model.num_heads': 8}, as `--config.x` flags give them);
  None where the workdir has no config.json. Fields it lacks (a run older than them) take
  their defaults when it is validated."""
  from vit_jax.workdir import saved_config

  if (config := saved_config(workdir)) is None:
    return None
  for name, value in {**CHOSEN_PER_MACHINE, **overrides}.items():
    *sections, field = name.split(".")
    section = config
    for key in sections:
      section = section.setdefault(key, {})
    section[field] = value
  return config


def unknown_config_key(error: Exception) -> str | None:
  """The one line for a `--config.a.b=...` flag naming a key the config lacks, or None.

  ml_collections raises KeyError or AttributeError with the key on the first line of its
  message and a did-you-mean on the next.
  """
  message = error
  while isinstance(message, BaseException):  # AttributeError(KeyError(text)) -> text
    message = message.args[0] if message.args else ""
  name, *hint = str(message).splitlines() or [""]
  name = name.strip("\"'")
  for arg in sys.argv[1:]:
    path = arg.split("=")[0].removeprefix("--").split(".")
    if path[0] == "config" and name in path[1:]:
      key = ".".join(path[:path.index(name, 1) + 1])
      suggestion = " ".join(hint).strip()
      return f"{key} is not a known key of the config" + (
          f"; {suggestion[:1].lower()}{suggestion[1:]}" if suggestion else "")
  return None


_NOT_LOADED = "Configuration is not available because of an earlier failure to load: "
# ml_collections' words for a get_config() that raised a TypeError or ValueError (e.g.
# `--config=experiments/mnist.py:x`, an argument it takes none of); the traceback follows.
_GET_CONFIG_RAISED = "Error whilst parsing config file"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run`'s flags_parser), except that a --config file whose
  get_config() failed in one line's worth reaches `ending_in_one_line`, where absl would
  print ml_collections' traceback. Everything else is told as absl tells it."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if config_file_failure(e) is not None:
      raise
    message = str(e)  # as absl's app.parse_flags_with_usage says it (which parses again)
    sys.stderr.write(f"FATAL Flags parsing error:\n{textwrap.indent(message, '  ')}\n"
                     if "\n" in message else f"FATAL Flags parsing error: {message}\n")
    sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def config_file_failure(error: Exception) -> str | None:
  """One line for a --config file that cannot be read or run, or None. ml_collections' own
  messages take four lines naming the flag 'config_config', or speak of "an earlier
  failure"; an error in the file itself (a SyntaxError, no get_config) is a traceback, and a
  ValueError or TypeError that get_config() raised comes inside absl's flag error."""
  lines = [line.strip() for line in str(error).splitlines()]
  if (raised := _raised_by_get_config(error)) is not None:
    if not (isinstance(raised, ValueError) or _raised_by_the_file(raised)):
      return None
    flag = lines[0].removeprefix("flag ").removesuffix(f": {_GET_CONFIG_RAISED}:")
    told = " ".join(line.strip() for line in str(raised).splitlines() if line.strip())
    return f"{flag} cannot be loaded: {type(raised).__name__}: {told}"
  if len(lines) >= 3 and "Failed loading config file" in lines[0]:
    return f"--config={lines[2]} cannot be read: {lines[-1]}"
  if str(error).startswith(_NOT_LOADED):  # e.g. a folder
    return f"--config cannot be read: {str(error).removeprefix(_NOT_LOADED)}"
  if not _raised_by_the_file(error):
    return None
  return f"--config={_config_flag_value()} cannot be loaded: {type(error).__name__}: {error}"


def _raised_by_get_config(error: Exception) -> BaseException | None:
  """What get_config() raised, where `error` is absl's flag error around ml_collections'
  (which holds the traceback as text); None for any other error."""
  from absl import flags

  wrapped = error.__context__
  if isinstance(error, flags.Error) and str(wrapped).startswith(_GET_CONFIG_RAISED):
    return wrapped.__context__
  return None


def _raised_by_the_file(error: BaseException) -> bool:
  """Whether the --config file's own lines raised `error`, or the loader calling its
  get_config (none there, or called with an argument it does not take); an error inside the
  code a config calls (vit_jax's) is that code's, and keeps its traceback."""
  path = _config_flag_value()
  if path is None or not os.path.isfile(path):
    return False
  frames = [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
  if isinstance(error, SyntaxError):  # raised compiling the file: its frame is not there
    frames.append(error.filename or "")
  in_file = bool(frames) and os.path.abspath(frames[-1]) == os.path.abspath(path)
  loading = "get_config" in str(error) and bool(frames) and frames[-1].endswith("config_flags.py")
  return in_file or loading


def _config_flag_value() -> str | None:
  """The file the last --config names on the command line (absl takes the last), without
  ml_collections' `:argument` suffix; None where no --config is given."""
  args, value = sys.argv[1:], None
  for i, arg in enumerate(args):
    if arg.startswith("--config="):
      value = arg.removeprefix("--config=")
    elif arg == "--config" and i + 1 < len(args):
      value = args[i + 1]
  if value is not None and not os.path.isfile(value) and ":" in value:
    value = value.rsplit(":", 1)[0]
  return value


def check_folder_flag(flag: str, value: str) -> None:
  """A one-line ValueError where --`flag`=`value` names no folder or an existing file ("" would
  be the current folder: the checkout)."""
  if not value.strip():
    raise ValueError(f"--{flag}={value!r} names no folder")
  if os.path.exists(value) and not os.path.isdir(value):
    raise ValueError(f"--{flag}={value!r} is a file, not a folder")


def check_output_file(flag: str, value: str | None) -> None:
  """A one-line ValueError, before any work, where --`flag`=`value` cannot name a new file:
  measured results are not lost to a typo at the end."""
  if value is None:
    return
  parent = Path(value).parent
  if not value.strip() or Path(value).is_dir():
    raise ValueError(f"--{flag}={value!r} names no file")
  if not parent.is_dir():
    raise ValueError(f"--{flag}={value!r}: {str(parent)!r} "
                     f"{'is not a folder' if parent.exists() else 'does not exist'}")


def checked_config(flag_values: Any) -> Any:
  """The --config flag's config; a one-line ValueError where its file's get_config()
  returned something other than a config (a ConfigDict or dict)."""
  import ml_collections

  config = flag_values.config
  if not isinstance(config, (ml_collections.ConfigDict, dict)):
    getattr(config, "keys", None)  # the stand-in for a file that failed raises its error here
    raise ValueError(f"--config={flag_values['config'].config_filename}: get_config() "
                     f"returned {type(config).__name__} {config!r:.40}, not a ConfigDict")
  return config


def to_console(line: str) -> None:
  """`line` on the console's stderr, also where a failure left stderr in the run's log."""
  from vit_jax import run_log

  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(OSError):  # stderr may still go to the run's log, on a full disk
      stream.flush()
  with contextlib.suppress(BrokenPipeError):  # the console's reader is gone (`| head`)
    os.write(run_log.console_fd(), f"{line}\n".encode())
