"""Build: the sans-io core (broker/core) compiled to C with mypyc.

The core is plain, fully typed Python (mypy --strict); mypyc, the compiler
that ships with mypy, turns each module into a C extension with the same
behaviour, about twice as fast per event (docs/benchmarks.md, "A compiled
core"). The adapters (server/, store/, …) stay interpreted: they spend
their time in trio, the kernel and the libraries.

BROKER_PURE_PYTHON=1 at install time skips the compilation: the same code
runs interpreted (slower; for a machine without a C compiler, or to debug).
"""

import os
from pathlib import Path

from setuptools import setup

# Every core module but these: the package's __init__ (it checks that the
# compiled modules are not older than their sources); errors.py (its error
# classes carry class attributes that the HTTP and WS adapters read from
# the classes, which mypyc's native classes do not keep); spill.py (the
# tests subclass its queue to watch what is pushed, and an interpreted
# class cannot subclass a compiled one; one call per event, not hot).
INTERPRETED = {"__init__.py", "errors.py", "spill.py"}

ext_modules = []
if os.environ.get("BROKER_PURE_PYTHON", "") != "1":
    from mypyc.build import mypycify

    core = sorted(str(p) for p in Path("broker/core").glob("*.py") if p.name not in INTERPRETED)
    ext_modules = mypycify(core, opt_level="3", group_name="broker_core")

setup(ext_modules=ext_modules)
