"""Writing a benchmark's figures as JSON (``--json PATH``), one way for every script."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json(path: Path, report: Any) -> None:
    """``report`` as indented JSON at ``path``, parent folders made.  Written to a temporary
    file beside it and renamed, so an interrupted run never leaves half a report where an
    earlier, complete one stood."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"\nwrote {path}")
