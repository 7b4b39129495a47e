"""The one way the benchmark scripts report: the Markdown table on stdout, and on request as files."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(rows: Any, json_path: str) -> None:
  """Writes `rows` as JSON to json_path whole or not at all (a kill leaves the previous version)."""
  with open(json_path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)
  os.replace(json_path + ".tmp", json_path)


def publish(table: str, rows: Any, json_path: str = "", markdown_path: str = "") -> None:
  """Prints `table`; writes `rows` as JSON to json_path and `table` to markdown_path where given."""
  print(table)
  if json_path:
    write_json(rows, json_path)
  if markdown_path:
    with open(markdown_path, "w", encoding="utf-8") as f:
      f.write(table)
