"""README's commands run as written: every `python train.py` / `python sample.py` names config files that exist
and flags that parse (nothing is trained or sampled)."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The placeholders README's multi-host command asks the reader to fill in, filled as one host of two would.
PLACEHOLDERS = {"--num_processes=N": "--num_processes=2", "--process_id=I": "--process_id=0"}

# One process imports the entry points' libraries once, then forks a child per command: the child defines the entry
# point's flags afresh from that command line (ml_collections reads its --config.key overrides from sys.argv) and
# parses them exactly as `app.run` would; its exit code is the parse's (2 for any problem, with the one-line error).
PARSE_EACH = textwrap.dedent("""
    import json, os, runpy, sys
    from ddpm_jax import builders
    codes = []
    for script, args in json.loads(sys.argv[1]):
      pid = os.fork()
      if pid == 0:
        sys.argv = [script, *args]
        try:
          entry = runpy.run_path(script, run_name="readme_check")
          builders.flags_parser(script, entry.get("DEFAULT_CONFIG"))(sys.argv)
        except SystemExit as e:
          os._exit(e.code if isinstance(e.code, int) else 1)
        os._exit(0)
      codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(json.dumps(codes))
""")


def readme_commands() -> list[tuple[str, list[str]]]:
  """(script, arguments) of every `python train.py` / `python sample.py` in README.md, in code blocks or inline
  code: backslash continuations joined, a command ending at `&&`, a `#` comment, a closing backtick or a closing
  double quote (a command inside another's quoted argument, as gcloud's --command)."""
  text = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
  commands = []
  for m in re.finditer(r"python (train\.py|sample\.py)([^`\n\"]*)", text):
    args = re.split(r"&&|\s#", m.group(2))[0]
    for placeholder, value in PLACEHOLDERS.items():
      args = args.replace(placeholder, value)
    commands.append((m.group(1), shlex.split(args)))
  return commands


def test_every_readme_command_names_existing_configs_and_parses():
  commands = readme_commands()
  assert sum(script == "train.py" for script, _ in commands) >= 5 and len(commands) >= 15, commands  # all found
  for _, args in commands:
    configs = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    configs += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    for path in configs:
      assert (ROOT / path.split(":")[0]).is_file(), f"README names {path}, which does not exist"
  unique = list(dict.fromkeys((script, tuple(args)) for script, args in commands))
  res = subprocess.run([sys.executable, "-c", PARSE_EACH, json.dumps(unique)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)))
  assert res.returncode == 0, res.stderr[-3000:]
  codes = json.loads(res.stdout.strip().splitlines()[-1])
  failed = [f"python {script} {shlex.join(args)}" for (script, args), code in zip(unique, codes) if code]
  assert not failed, (failed, [l for l in res.stderr.splitlines() if ": error: " in l])
