"""The sans-io core: sequencing, dedup, rings, snapshots, filters, readers.

Installed, its modules are compiled to C by mypyc (setup.py); the sources
here are what is compiled, and what runs when nothing is
(`BROKER_PURE_PYTHON=1` at install time).

In a source tree (an editable install: scripts/run, scripts/test), a
compiled module is imported in place of its source, so one built before
its source last changed would run old code. Importing the package then
fails (StaleBuild), naming the module, instead of running or testing what
is no longer in the tree; scripts/run, scripts/test and scripts/check
rebuild when a source is newer than the build, and so does
`.venv/bin/pip install -e .`.
"""

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
    core = os.path.join(package, "core") if package else os.path.dirname(os.path.abspath(__file__))
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


check_core_fresh()
