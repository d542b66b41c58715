"""How a command ends on what its user can fix: one line and an exit status, no traceback."""

import sys

import pytest

from vit_jax import command_line


@pytest.mark.parametrize("error,status,line", [
    (ValueError("config.seed=-1 must be in [0, 2**32)"), 2,
     "error: config.seed=-1 must be in [0, 2**32)"),
    (OSError(), 2, "error: "),  # no message at all: still one line
    (KeyboardInterrupt(), 130,  # Ctrl-C before training set its own handler
     "interrupted by Ctrl-C before anything was saved; rerun the same command"),
])
def test_a_command_ends_in_one_line_with_its_status(error, status, line, monkeypatch):
  said = []
  monkeypatch.setattr(command_line, "to_console", said.append)

  def command():
    raise error

  with pytest.raises(SystemExit) as exit_:
    command_line.ending_in_one_line(command)
  assert exit_.value.code == status and said == [line]


def test_a_console_whose_reader_left_ends_quietly_with_the_status_of_sigpipe(monkeypatch):
  said, redirected = [], []
  monkeypatch.setattr(command_line, "to_console", said.append)
  monkeypatch.setattr(command_line.os, "dup2", lambda fd, to: redirected.append(to))

  def command():  # `launch.py | head`: the final result's print finds head gone
    raise BrokenPipeError(32, "Broken pipe")

  with pytest.raises(SystemExit) as exit_:
    command_line.ending_in_one_line(command)
  # stdout, which Python flushes at exit, goes nowhere: no error about the pipe then.
  assert exit_.value.code == 141 and said == [] and redirected == [sys.stdout.fileno()]


def test_a_ctrl_c_while_the_command_s_modules_load_ends_in_one_line(monkeypatch):
  import sys

  class CtrlC:  # a Ctrl-C that lands while orbax and JAX load
    def find_spec(self, name, *args):
      if name == "vit_jax.interrupt":
        raise KeyboardInterrupt

  said = []
  monkeypatch.setattr(command_line, "to_console", said.append)
  monkeypatch.delitem(sys.modules, "vit_jax.interrupt", raising=False)
  monkeypatch.setattr(sys, "meta_path", [CtrlC(), *sys.meta_path])
  with pytest.raises(SystemExit) as exit_:
    command_line.ending_in_one_line(lambda: None)
  assert exit_.value.code == 130 and said == [
      "interrupted by Ctrl-C before anything was saved; rerun the same command"]


def test_a_config_file_that_is_not_there_is_one_line_naming_the_flag(monkeypatch, tmp_path):
  from absl import flags
  from ml_collections import config_flags

  said = []
  monkeypatch.setattr(command_line, "to_console", said.append)

  def command():  # as launch.py parses its --config
    parsed = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=parsed)
    parsed(["launch.py", f"--config={tmp_path}/nope.py"])
    parsed.config.seed  # noqa: B018 - the config is read

  with pytest.raises(SystemExit) as exit_:
    command_line.ending_in_one_line(command)
  assert exit_.value.code == 2 and said == [
      f"error: --config={tmp_path}/nope.py cannot be read: [Errno 2] No such file or "
      f"directory: '{tmp_path}/nope.py'"]


@pytest.mark.parametrize("source,line", [
    ('x = "', " cannot be loaded: SyntaxError: unterminated string literal (detected at line 1) "
     "(c.py, line 1)"),
    ("x = 1", " cannot be loaded: AttributeError: module 'config_config' has no attribute "
     "'get_config'"),
    ("def get_config():\n  return undefined", " cannot be loaded: NameError: name 'undefined' is "
     "not defined"),
    ("def get_config():\n  return 5", ": get_config() returned int 5, not a ConfigDict"),
    # ml_collections wraps what get_config() raises (ValueError, TypeError) with its
    # traceback as text, and absl that in a flag error: the original, on one line.
    ("def get_config():\n  raise ValueError('one\\ntwo')",
     " cannot be loaded: ValueError: one two"),
    ("def get_config(arg):\n  return {}", " cannot be loaded: TypeError: get_config() missing 1 "
     "required positional argument: 'arg'"),
])
def test_a_config_file_that_cannot_be_run_is_one_line_naming_the_flag(source, line, monkeypatch,
                                                                       tmp_path):
  from absl import flags
  from ml_collections import config_flags

  said = []
  monkeypatch.setattr(command_line, "to_console", said.append)
  (tmp_path / "c.py").write_text(source)
  argv = ["launch.py", f"--config={tmp_path}/c.py"]
  monkeypatch.setattr("sys.argv", argv)

  def command():  # as launch.py parses and reads its --config
    parsed = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=parsed)
    parsed(argv)
    command_line.checked_config(parsed)

  with pytest.raises(SystemExit) as exit_:
    command_line.ending_in_one_line(command)
  assert exit_.value.code == 2 and said == [f"error: --config={tmp_path}/c.py{line}"]


def test_a_type_error_inside_the_code_a_config_calls_keeps_its_traceback(monkeypatch, tmp_path):
  from absl import flags
  from ml_collections import config_flags

  (tmp_path / "c.py").write_text("import json\ndef get_config():\n  return json.loads(5)")
  argv = ["launch.py", f"--config={tmp_path}/c.py"]
  monkeypatch.setattr("sys.argv", argv)

  def command():
    parsed = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=parsed)
    parsed(argv)

  with pytest.raises(flags.IllegalFlagValueError, match="json"):  # a bug, not a user's slip
    command_line.ending_in_one_line(command)


def test_a_config_flag_naming_a_folder_is_one_line(monkeypatch, tmp_path):
  from absl import flags
  from ml_collections import config_flags

  said = []
  monkeypatch.setattr(command_line, "to_console", said.append)

  def command():
    parsed = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=parsed)
    parsed(["launch.py", f"--config={tmp_path}"])
    command_line.checked_config(parsed)

  with pytest.raises(SystemExit):
    command_line.ending_in_one_line(command)
  assert said == [f"error: --config cannot be read: [Errno 21] Is a directory: '{tmp_path}'"]


def test_an_attribute_error_of_no_config_flag_is_not_hidden(monkeypatch):
  monkeypatch.setattr("sys.argv", ["launch.py", "--config.seed=1"])
  with pytest.raises(AttributeError, match="a bug"):  # a real bug keeps its traceback
    command_line.ending_in_one_line(lambda: (_ for _ in ()).throw(AttributeError("a bug")))


def test_a_trained_run_s_recorded_config_with_its_machine_s_choices_open_and_flags_on_top(
    tmp_path):
  from conftest import REPO

  from vit_jax.experiment_config import validate

  assert command_line.recorded_config(tmp_path, {"seed": 1}) is None  # no config.json: none
  shipped = command_line.recorded_config(REPO / "pretrained" / "mnist_seed",
                                         {"eval_max_shift": 1, "model.compute_dtype": "float32"})
  # Recorded before fields such as eval_max_shift existed: those take their defaults.
  config = validate(shipped)
  assert (config.num_epochs, config.model.num_heads, config.model.patch_size) == (9.0, 4, 4)
  assert config.eval_max_shift == 1 and config.model.compute_dtype == "float32"  # flags win
  assert (config.microbatch_size, config.model.attention_kernel) == ("auto", "auto")
