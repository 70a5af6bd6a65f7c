"""The core stays sans-io: no module under broker/core imports an I/O or
concurrency library, a clock, or anything of the broker outside the core.

Checked on the source (ast), not by importing: every `import` and
`from … import` at any depth (inside functions, `if TYPE_CHECKING:` blocks,
try/except) counts, since a lazy import inside a function is still a
dependency. What the core needs from time or the network it is handed:
`now` as an argument, bytes in and out (STYLE.md, "The shape").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "broker" / "core"
CORE_PACKAGE = "broker.core"

# Top-level names: `import trio.lowlevel` and `from zmq.asyncio import x` are caught by their first part.
FORBIDDEN = frozenset(
    {
        "trio",
        "zmq",
        "quart",
        "quart_trio",
        "hypercorn",
        "psycopg",
        "psycopg_pool",
        "time",
        "asyncio",
        "socket",
        "threading",
    }
)


def _package_of(path: Path) -> list[str]:
    """The dotted package a module's relative imports start from, as parts."""
    # broker/core/state.py -> broker.core, and broker/core/__init__.py -> broker.core too.
    return list(path.relative_to(ROOT).parent.parts)


def _inside_core(name: str) -> bool:
    return name == CORE_PACKAGE or name.startswith(CORE_PACKAGE + ".")


def violations(source: str, path: Path) -> list[str]:
    """`file:line: what` for each import in `source` that breaks the boundary."""
    where = path.relative_to(ROOT) if path.is_absolute() else path
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN:
                    found.append(f"{where}:{node.lineno}: import {alias.name}")
                elif alias.name.split(".")[0] == "broker" and not _inside_core(alias.name):
                    found.append(f"{where}:{node.lineno}: import {alias.name} (outside {CORE_PACKAGE})")
        elif isinstance(node, ast.ImportFrom):
            names = ", ".join(a.name for a in node.names)
            if node.level == 0:
                module = node.module or ""
                if module.split(".")[0] in FORBIDDEN:
                    found.append(f"{where}:{node.lineno}: from {module} import {names}")
                elif module.split(".")[0] == "broker" and not _inside_core(module):
                    found.append(f"{where}:{node.lineno}: from {module} import {names} (outside {CORE_PACKAGE})")
                continue
            package = _package_of(ROOT / where)
            up = node.level - 1
            base = package[: len(package) - up] if up <= len(package) else []
            if not base:
                found.append(f"{where}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {names}")
                continue
            # `from .. import core` names broker.core itself: resolve each name then.
            targets = (
                [".".join([*base, node.module])] if node.module else [".".join([*base, a.name]) for a in node.names]
            )
            if not all(_inside_core(t) for t in targets):
                dots = "." * node.level
                found.append(
                    f"{where}:{node.lineno}: from {dots}{node.module or ''} import {names}"
                    f" (resolves to {', '.join(targets)}, outside {CORE_PACKAGE})"
                )
    return found


CORE_MODULES = sorted(CORE.rglob("*.py"))


def test_the_core_has_modules() -> None:
    assert len(CORE_MODULES) >= 10, CORE_MODULES  # the glob found the package


@pytest.mark.parametrize("path", CORE_MODULES, ids=[str(p.relative_to(CORE)) for p in CORE_MODULES])
def test_core_module_imports_no_io(path: Path) -> None:
    found = violations(path.read_text(encoding="utf-8"), path)
    assert not found, "the core must stay sans-io:\n" + "\n".join(found)


# The checker itself, on made-up modules: it must catch each kind of import
# it is meant to, wherever it hides, and let the core's own imports through.
BAD_SOURCES = [
    ("import trio", "import trio"),
    ("import trio.lowlevel", "import trio.lowlevel"),
    ("import zmq as z", "import zmq"),
    ("from zmq.asyncio import Socket", "from zmq.asyncio"),
    ("from time import monotonic", "from time"),
    ("import asyncio, json", "import asyncio"),
    ("def f():\n    import socket\n", "import socket"),
    ("class C:\n    def m(self):\n        from threading import Lock\n", "from threading"),
    ("try:\n    import psycopg\nexcept ImportError:\n    pass\n", "import psycopg"),
    ("if True:\n    from psycopg_pool import ConnectionPool\n", "from psycopg_pool"),
    ("import quart", "import quart"),
    ("import quart_trio", "import quart_trio"),
    ("from hypercorn.trio import serve", "from hypercorn.trio"),
    ("from ..server import hub", "broker.server"),
    ("from .. import config", "broker.config"),
    ("from ...elsewhere import x", "from ...elsewhere"),
    ("from broker.server.hub import Hub", "from broker.server.hub"),
    ("import broker.server", "import broker.server"),
]
GOOD_SOURCES = [
    "from .state import BrokerState",
    "from . import envelope",
    "from .. import core",
    "from ..core.ring import Ring",
    "from broker.core.errors import Reject",
    "import orjson",
    "import timeit",  # not `time`
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .state import Workflow\n",
]


@pytest.mark.parametrize("source, needle", BAD_SOURCES, ids=[s for s, _ in BAD_SOURCES])
def test_checker_catches(source: str, needle: str) -> None:
    path = CORE / "made_up.py"
    found = violations(source, path)
    assert len(found) == 1, found
    assert found[0].startswith("broker/core/made_up.py:") and needle in found[0], found


@pytest.mark.parametrize("source", GOOD_SOURCES)
def test_checker_allows(source: str) -> None:
    assert violations(source, CORE / "made_up.py") == []


def test_checker_names_the_line() -> None:
    found = violations("import orjson\n\n\ndef f():\n    import trio\n", CORE / "made_up.py")
    assert found == ["broker/core/made_up.py:5: import trio"]
