"""The documentation runs as written: every `python train.py`, `python sample.py`, `python benchmarks/...` and
`python tools/...` command in README.md, CONTRIBUTING.md, BENCHMARKS.md and docs/*.md names files that exist and
flags that parse (nothing is trained, sampled or measured); every file and link the pages name exists; README keeps
the shape of a user's guide."""

import json
import pathlib
import re
import shlex
import textwrap

from helpers import ROOT, run_python

PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")])
# The placeholders the multi-host command asks the reader to fill in, filled as one host of two would.
# Arguments that name what a user makes first: checked as the nearest that exists here (configs/pretrained.py reads
# an imported workdir's config, whose keys are the default config's).
PLACEHOLDERS = {"--num_processes=N": "--num_processes=2", "--process_id=I": "--process_id=0",
                "configs/pretrained.py:runs/ddpm-cifar10-32": "configs/cifar10.py"}
# Pages that other branches add (the likelihood, pretrained-model and run-record features); the pages here name them
# in plain code, not as links, until they land.
PENDING = {"docs/reproducibility.md"}
SCRIPT = r"(train\.py|sample\.py|(?:benchmarks|tools)/\w+\.py)"

# One process imports the entry points' libraries once, then forks a child per command. For train.py and sample.py
# the child defines the entry point's flags afresh from that command line (ml_collections reads its --config.key
# overrides from sys.argv) and parses them exactly as `app.run` would. For a benchmark or tool it runs the script
# with argparse's parse_args, or absl's app.run, ending the child once the flags are parsed, so nothing runs. The
# child's exit code is the parse's: 2 for any problem (with the one-line error), 3 for a script that never parsed
# its arguments.
PARSE_EACH = textwrap.dedent("""
    import argparse, json, os, runpy, sys
    from absl import app, flags
    from ddpm_jax import cli

    def parse_only(main, argv=None, flags_parser=None):
      try:
        (flags_parser or flags.FLAGS)(argv or sys.argv)
      except flags.Error as e:
        print(f"{sys.argv[0]}: error: {e}", file=sys.stderr)
        os._exit(2)
      os._exit(0)

    codes = []
    for script, args in json.loads(sys.argv[1]):
      pid = os.fork()
      if pid == 0:
        sys.argv = [script, *args]
        try:
          if script in ("train.py", "sample.py"):
            entry = runpy.run_path(script, run_name="readme_check")
            cli.flags_parser(script, entry.get("DEFAULT_CONFIG"))(sys.argv)
          else:
            parse = argparse.ArgumentParser.parse_args
            argparse.ArgumentParser.parse_args = lambda *a, **k: (parse(*a, **k), os._exit(0))
            app.run = parse_only
            sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
            runpy.run_path(script, run_name="__main__")
            os._exit(3)
        except SystemExit as e:
          os._exit(e.code if isinstance(e.code, int) else 1)
        os._exit(0)
      codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(json.dumps(codes))
""")


def page_text(page) -> str:
  """A page's text with backslash continuations joined."""
  return page.read_text(encoding="utf-8").replace("\\\n", " ")


def documented_commands(page) -> list[tuple[str, list[str]]]:
  """(script, arguments) of every `python SCRIPT` on a page, in code blocks or inline code: a command ending at
  `&&`, a `#` comment, a closing backtick or a closing double quote (a command inside another's quoted argument, as
  gcloud's --command)."""
  commands = []
  for m in re.finditer(rf"python {SCRIPT}([^`\n\"]*)", page_text(page)):
    args = re.split(r"&&|\s#", m.group(2))[0]
    for placeholder, value in PLACEHOLDERS.items():
      args = args.replace(placeholder, value)
    commands.append((m.group(1), shlex.split(args)))
  return commands


def test_every_documented_command_names_existing_files_and_parses():
  # An inline command broken over two lines would be read (and checked) only up to the line's end.
  wrapped = [f"{page.name}: {m.group()}" for page in PAGES for m in re.finditer(r"`python [^`\n]*\n", page_text(page))]
  assert not wrapped, wrapped
  commands = [command for page in PAGES for command in documented_commands(page)]
  scripts = [script for script, _ in commands]
  assert scripts.count("train.py") >= 5 and scripts.count("sample.py") >= 10 and len(commands) >= 40, scripts
  assert {"benchmarks/bench.py", "tools/convert_inception_weights.py"} <= set(scripts), scripts  # all found
  for script, args in commands:
    configs = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    configs += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    for path in [script, *configs]:
      assert (ROOT / path.split(":")[0]).is_file(), f"the documentation names {path}, which does not exist"
  unique = list(dict.fromkeys((script, tuple(args)) for script, args in commands))
  res = run_python("-c", PARSE_EACH, json.dumps(unique), cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  codes = json.loads(res.stdout.strip().splitlines()[-1])
  failed = [f"python {script} {shlex.join(args)}: exit {code}" for (script, args), code in zip(unique, codes) if code]
  assert not failed, (failed, [line for line in res.stderr.splitlines() if "error: " in line])


def slug(heading: str) -> str:
  """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set[str]:
  """The anchors of a page's headings (outside code blocks)."""
  text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
  return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def named_paths(page) -> list[tuple[pathlib.Path, str]]:
  """(folder, path) of every repository path a page names: relative link and image targets (with any #anchor), from
  the page's folder; the files of `bash`, `sh` and `pip install -r` and code spans that are paths under the
  repository's own folders, from the root, where the commands run."""
  text = page_text(page)
  commands = re.findall(r"\b(?:bash|sh) ((?:benchmarks|tools|\.ci)/[\w./-]+)", text)
  commands += re.findall(r"-r (requirements[\w-]*\.txt)", text)
  folders = "ddpm_jax|configs|tests|benchmarks|tools|docs"
  commands += re.findall(rf"`((?:{folders})/[\w./-]*\.(?:py|md|txt|sh|png|json))`", text)
  links = re.findall(r"\]\((?!https?:)([^)\s]+)\)", text)
  return [(page.parent, link) for link in links] + [(ROOT, path) for path in commands]


def test_every_file_and_link_the_pages_name_exists():
  missing = []
  for page in PAGES:
    for folder, path in named_paths(page):
      target, _, anchor = path.partition("#")
      where = (folder / target).resolve() if target else page
      if where.relative_to(ROOT).as_posix() in PENDING:
        continue
      if not where.exists():
        missing.append(f"{page.name}: {path}")
      elif anchor and anchor not in anchors(where):
        missing.append(f"{page.name}: {path} (no such heading)")
  assert not missing, missing


def test_every_python_block_compiles():
  for page in PAGES:
    for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
      compile(block, str(page), "exec")  # README's "Library use" block also runs: test_functional.py


def prose_sentences(text: str) -> list[str]:
  """The sentences of a page's prose: code blocks, tables, headings, list markers and HTML comments left out."""
  text = re.sub(r"```.*?```|<!--.*?-->", "", text, flags=re.S)
  lines = [line for line in text.splitlines() if not line.startswith(("|", "#", "!["))]
  prose = re.sub(r"^\s*- ", "", "\n".join(lines), flags=re.M)
  return [s for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", prose) if s.strip()]


def test_readme_is_a_short_guide_with_the_commands_first():
  text = (ROOT / "README.md").read_text(encoding="utf-8")
  lines = text.splitlines()
  assert len(lines) < 250, len(lines)
  first = "\n".join(lines[:40])
  assert "pip install -r requirements.txt && python train.py" in first
  assert "<!-- ci:test -->" in first and "<!-- /ci:test -->" in first and "docs/default_samples.png" in first
  long = [s for s in prose_sentences(text) if len(s.split()) > 60]
  assert not long, long
  # Dates and CPU names belong to the one provenance line of a result, not to the prose.
  dated = [line for line in lines if re.search(r"\b20\d\d-\d\d-\d\d\b", line) and not line.startswith("Provenance:")]
  assert not dated and "lscpu" not in text and not re.search(r"family \d+ model \d+", text), dated


def test_no_file_points_outside_the_repository():
  # A clone has only the repository: nothing may point to a design file or folder that lives elsewhere.
  outside = re.compile("DESIGN" + r"\.md|shared " + "folder|/work/" + "shared")
  files = [*ROOT.glob("*.*"), *(ROOT / ".ci").glob("*")]
  for folder in ("ddpm_jax", "configs", "tests", "benchmarks", "tools", "docs"):
    files += (ROOT / folder).rglob("*")
  hits = []
  for path in files:
    if path.is_file() and path.suffix in (".py", ".md", ".txt", ".sh", ".toml", ""):
      text = path.read_text(encoding="utf-8", errors="ignore")
      hits += [f"{path.relative_to(ROOT)}: {m.group()}" for m in outside.finditer(text)]
  assert len(files) > 50 and not hits, hits
