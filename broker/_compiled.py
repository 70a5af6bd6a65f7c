"""Whether the compiled core (setup.py: broker/core with mypyc) is as new as
its sources. Outside broker/core, so the command line can say so in one
line without importing the core first (broker/core/__init__.py checks at
import)."""

from __future__ import annotations

import os
from importlib.machinery import EXTENSION_SUFFIXES


class StaleBuild(ImportError):
    """A compiled core module is older than its source: it would run old code."""


def check_core_fresh(package: str | None = None) -> None:
    """Raise StaleBuild in a source tree (an editable install: scripts/run,
    scripts/test) whose compiled core module is older than its source;
    nothing in an installed wheel (sources and extensions came together).
    `package`: the broker package's directory (this one's by default)."""
    core = os.path.join(package or os.path.dirname(os.path.abspath(__file__)), "core")
    if not os.path.exists(os.path.join(core, "..", "..", "setup.py")):
        return
    suffix = EXTENSION_SUFFIXES[0]
    for name in os.listdir(core):
        if not name.endswith(suffix):
            continue
        source = os.path.join(core, name[: -len(suffix)] + ".py")
        compiled = os.path.join(core, name)
        if os.path.exists(source) and os.path.getmtime(source) > os.path.getmtime(compiled):
            raise StaleBuild(
                f"broker/core/{os.path.basename(source)} changed after it was compiled: "
                "rebuild with `.venv/bin/pip install -e .` (scripts/test and scripts/run do it), "
                "or delete broker/core/*.so to run the core interpreted"
            )
