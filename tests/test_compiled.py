"""The compiled core (setup.py, mypyc): a module compiled before its source
last changed is refused, never run; an installed wheel is never checked."""

from __future__ import annotations

import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import broker.core.state
from broker.core import StaleBuild, check_core_fresh


def _tree(root: Path, *, source_newer: bool, setup_py: bool = True) -> Path:
    package = root / "broker"
    core = package / "core"
    core.mkdir(parents=True)
    if setup_py:
        (root / "setup.py").write_text("")
    source, compiled = core / "ring.py", core / ("ring" + EXTENSION_SUFFIXES[0])
    source.write_text("")
    compiled.write_bytes(b"")
    older, newer = (compiled, source) if source_newer else (source, compiled)
    os.utime(older, (1_000_000, 1_000_000))
    os.utime(newer, (2_000_000, 2_000_000))
    return package


def test_a_source_newer_than_its_compiled_module_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(StaleBuild, match=r"broker/core/ring.py changed after it was compiled: rebuild with"):
        check_core_fresh(str(_tree(tmp_path, source_newer=True)))


def test_a_fresh_build_and_an_installed_wheel_pass(tmp_path: Path) -> None:
    check_core_fresh(str(_tree(tmp_path / "fresh", source_newer=False)))
    check_core_fresh(str(_tree(tmp_path / "wheel", source_newer=True, setup_py=False)))


def test_the_tests_run_the_compiled_core_unless_the_install_skipped_it() -> None:
    compiled = broker.core.state.__file__.endswith(EXTENSION_SUFFIXES[0])
    assert compiled or os.environ.get("BROKER_PURE_PYTHON") == "1", broker.core.state.__file__
