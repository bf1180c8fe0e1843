"""One shape for every committed measurement (eval/results/<kind>-<cpu>[...].json, assembled by bench/results.py):
what it is (`title`), on which machine (`cpu`: the CPU and its speed-deciding flags, or the GPU; `machine`: the same
as a record), when (`date`), the commands that made it, its markdown rendering, and the data itself."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def write_result(stem: Path, data: dict, markdown: str, title: str, machine: dict,
                 commands: list[str] | None = None) -> Path:
    """Write <stem>.json (data + the fields above) and <stem>.md; returns the JSON path."""
    from dspark_train.hardware import Capabilities

    stem.parent.mkdir(parents=True, exist_ok=True)
    record = {"title": title, "cpu": Capabilities.from_dict(machine).describe(), "machine": machine,
              "date": time.strftime("%Y-%m-%d"), "commands": commands or ["python " + " ".join(sys.argv)],
              **{k: v for k, v in data.items() if k not in ("commands", "machine")}, "markdown": markdown}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown)
    return stem.with_suffix(".json")
