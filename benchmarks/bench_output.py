"""Where every benchmark script's result goes: a JSON file (with the environment), and a summary on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_result(result: dict[str, Any], output: str | Path, echo: bool = True) -> Path:
    """Write ``result`` as JSON to ``output`` (folders created); print it without the environment block."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if echo:
        print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    return out
