"""Benchmarks: scripts that time one part against a baseline measured in the same run.

Each prints a table and writes JSON (``python -m pipeline.bench.<name> --help``); the numbers
worth keeping go to ``BENCHMARKS.md`` with the command that reproduces them.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def run_meta(module: str, settings: Any, argv: list[str] | None,
             libraries: tuple[str, ...] = ("ray", "torch"), **extra: Any) -> dict[str, Any]:
    """What every benchmark JSON records about its run: when, the command that reproduces it,
    the machine and its load, library versions (from metadata, no import) and the settings."""
    versions = {}
    for name in libraries:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        **versions, **extra, "settings": asdict(settings),
    }


def process_table() -> tuple[dict[int, list[int]], dict[int, int]]:
    """Every process's children, and its CPU ticks (user + system), read from ``/proc``: what
    the benchmarks walk to measure a whole process tree (the driver, Ray and its workers)."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                line = stat.read()
        except OSError:  # exited meanwhile
            continue
        fields = line.rsplit(")", 1)[1].split()  # the name may hold spaces and ")"
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    return children, ticks
