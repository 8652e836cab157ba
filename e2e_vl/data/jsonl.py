"""JSON-lines files (VCR's and NLVR2's official annotations): each line one JSON object, read with the
file and line named in every error, so a bad line is found before training starts."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


def json_objects(path: str | os.PathLike, error: type[Exception], what: str) -> Iterator[tuple[str, dict]]:
    """("<file>:<line>", object) for every non-blank line of `path`; `error` names the file when it is
    missing (as `what`) and the line when it is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: not a JSON object ({exc})") from None
            if not isinstance(raw, dict):
                raise error(f"{where}: expected a JSON object, got {type(raw).__name__}")
            yield where, raw
