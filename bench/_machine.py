"""The line every benchmark result starts with: which machine, which Python, which day."""

from __future__ import annotations

import os
import platform
from datetime import date
from pathlib import Path


def machine() -> str:
    """``2 cores (Intel(R) Xeon(R) ...), Python 3.11.7, 2026-12-04``: figures mean little without it."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {date.today().isoformat()}"
