"""How a command ends on what its user can fix: one line and an exit status, no traceback."""

import pytest

from vit_jax import command_line


@pytest.mark.parametrize("error,status,line", [
    (ValueError("config.seed=-1 must be in [0, 2**32)"), 2,
     "error: config.seed=-1 must be in [0, 2**32)"),
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


def test_an_attribute_error_of_no_config_flag_is_not_hidden(monkeypatch):
  monkeypatch.setattr("sys.argv", ["launch.py", "--config.seed=1"])
  with pytest.raises(AttributeError, match="a bug"):  # a real bug keeps its traceback
    command_line.ending_in_one_line(lambda: (_ for _ in ()).throw(AttributeError("a bug")))
