"""Where every benchmark leaves its figures: `<out>/<name>.json` (and `<name>.md` when the
benchmark renders one), the folder created if needed."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: str | Path, name: str, data, markdown: str | None = None,
                 indent: int = 1) -> Path:
    """Write `data` as `<out>/<name>.json` and `markdown` as `<out>/<name>.md`; returns the
    JSON file's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=indent) + "\n")
    if markdown is not None:
        (out / f"{name}.md").write_text(markdown)
    return path
