"""The sans-io core: sequencing, dedup, rings, snapshots, filters, readers.

Installed, its modules are compiled to C by mypyc (setup.py); the sources
here are what is compiled, and what runs when nothing is
(`BROKER_PURE_PYTHON=1` at install time).

In a source tree (an editable install: scripts/run, scripts/test), a
compiled module is imported in place of its source, so one built before
its source last changed would run old code. Importing the package then
fails, naming the module, instead of running or testing what is no longer
in the tree; scripts/run, scripts/test and scripts/check rebuild when a
source is newer than the build, and so does `.venv/bin/pip install -e .`.
"""

from __future__ import annotations

import os
from importlib.machinery import EXTENSION_SUFFIXES


def _check_compiled_fresh() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.exists(os.path.join(here, "..", "..", "setup.py")):
        return  # installed as a wheel: sources and extensions came together
    suffix = EXTENSION_SUFFIXES[0]
    for name in os.listdir(here):
        if not name.endswith(suffix):
            continue
        source = os.path.join(here, name[: -len(suffix)] + ".py")
        compiled = os.path.join(here, name)
        if os.path.exists(source) and os.path.getmtime(source) > os.path.getmtime(compiled):
            raise ImportError(
                f"broker/core/{os.path.basename(source)} changed after it was compiled: "
                "rebuild with `.venv/bin/pip install -e .` (scripts/test and scripts/run do it), "
                "or delete broker/core/*.so to run the core interpreted"
            )


_check_compiled_fresh()
