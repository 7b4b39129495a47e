"""What the entry points (train.py, sample.py, tools/) share: absl flag parsing with a --config file whose problems
end in one line and exit code 2, -h/--help that list the config's fields, and one-line errors for the rest."""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import sys
from typing import Callable, Optional

from absl import flags

from ddpm_jax import builders, checkpoint


def _config_path(argv: list[str], default: Optional[str]) -> Optional[str]:
  """The --config file named on the command line (without a ':argument' suffix), else `default`."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return default


def _config_keys(path: str) -> list[str]:
  """Every dotted key of the config a file's get_config() returns; ValueError naming the file when it cannot be
  loaded (it raises, or has no get_config)."""
  spec = importlib.util.spec_from_file_location("ddpm_jax_config_file", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  # config files can raise anything while they load
    raise ValueError(f"config file {path!r} raised {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"config file {path!r} has no get_config(): a config file defines get_config() returning an "
                     "ml_collections.ConfigDict (see configs/default.py)")
  try:
    config = module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"config file {path!r}: get_config() raised {type(e).__name__}: "
                     f"{' '.join(str(e).split())[:300]}") from None
  return [key for key, _ in builders.config_items(config)]


def flag_error(argv: list[str], error: Exception, default_config: Optional[str]) -> str:
  """One line saying what is wrong with a command line whose parsing raised `error`."""
  if isinstance(error, SyntaxError):
    return f"config file {error.filename} has a syntax error at line {error.lineno}: {error.msg}"
  path = _config_path(argv, default_config)
  if path and not os.path.isfile(path):
    return f"config file {path!r} does not exist"
  try:
    keys = _config_keys(path) if path else []
  except ValueError as e:  # the file itself is at fault
    return str(e)
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if overrides and path and isinstance(error, (AttributeError, KeyError)):
    for key in overrides:
      if key not in keys:
        near = difflib.get_close_matches(key, keys, n=3, cutoff=0.0)
        return f"unknown config key {key!r} (--config.{key}): {os.path.basename(path)} has no such key; nearest: " \
               f"{', '.join(near)}"
  text = str(error).strip().splitlines()
  return text[0] if isinstance(error, flags.Error) and text else f"{type(error).__name__}: {' '.join(text)[:300]}"


def _exit_on_flag_error(program: str, argv: list[str], error: Exception, default_config: Optional[str]) -> None:
  """Prints the one-line explanation of a command-line problem and exits with code 2."""
  print(f"{program}: error: {flag_error(argv, error, default_config)}", file=sys.stderr)
  sys.exit(2)


def define_config_flag(program: str, default: Optional[str], help_text: str) -> None:
  """--config (a config file, fields overridable as --config.key=value), one of the program's own flags in --help;
  a problem with the default file or an override (ml_collections applies them while defining the flag) ends the
  program with one line and exit 2."""
  try:
    builders.define_config_file_flag(default, help_text)
  except Exception as e:  # config files can raise anything while they load
    _exit_on_flag_error(program, sys.argv, e, default)
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["config"])


HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def _print_help(doc: str, full: bool) -> None:
  """The program's description, its flags (`full`: every module's) and, when a config is loaded, every --config.KEY
  with its value."""
  print(f"{doc.strip()}\n\n{(flags.FLAGS.get_help() if full else flags.FLAGS.main_module_help()).strip()}")
  config = flags.FLAGS["config"].value
  if config is not None:
    print("\n--config fields (override any as --config.KEY=VALUE):")
    for key, value in builders.config_items(config):
      print(f"  --config.{key}={value!r}")


def flags_parser(program: str, default_config: Optional[str]) -> Callable[[list[str]], list[str]]:
  """absl's flag parser, with any problem in the flags or the config file reported in one line and exit code 2;
  -h / --help print the program's flags and its config's fields and exit 0."""

  def parse(argv: list[str]) -> list[str]:
    asked_help = any(arg in HELP_FLAGS for arg in argv[1:])
    try:
      rest = flags.FLAGS([arg for arg in argv if arg not in HELP_FLAGS])
      config = flags.FLAGS["config"].value
      if config is not None:
        list(config.keys())  # a config file that failed to load reports it on first access
    except Exception as e:  # config files can raise anything while they load
      _exit_on_flag_error(program, argv, e, default_config)
    if asked_help:
      _print_help(sys.modules["__main__"].__doc__ or program, "--helpfull" in argv)
      sys.exit(0)
    return rest
  return parse


@contextlib.contextmanager
def one_line_errors(program: str):
  """Ends the program on an error with one line on stderr: exit code 2 for bad input (ValueError), 1 for a run-time
  failure (OSError, CheckpointError)."""
  try:
    yield
  except ValueError as e:
    print(f"{program}: error: {e}", file=sys.stderr)
    sys.exit(2)
  except (OSError, checkpoint.CheckpointError) as e:
    print(f"{program}: error: {e}", file=sys.stderr)
    sys.exit(1)
