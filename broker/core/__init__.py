"""The sans-io core: sequencing, dedup, rings, snapshots, filters, readers.

Installed, its modules are compiled to C by mypyc (setup.py); the sources
here are what is compiled, and what runs when nothing is
(`BROKER_PURE_PYTHON=1` at install time).

In a source tree (an editable install: scripts/run, scripts/test), a
compiled module is imported in place of its source, so one built before
its source last changed would run old code. Importing the package then
fails (broker._compiled.StaleBuild), naming the module, instead of
running or testing what is no longer in the tree; scripts/run,
scripts/test and scripts/check rebuild when a source is newer than the
build, and so does `.venv/bin/pip install -e .`.
"""

from __future__ import annotations

from .._compiled import check_core_fresh

check_core_fresh()
