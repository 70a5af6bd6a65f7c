"""The shipped systemd unit: what an operator relies on is in it, and
systemd's own checker accepts it (where systemd-analyze is installed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import ROOT

UNIT = ROOT / "config" / "broker.service"


def _settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#") and not line.startswith("["):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_unit_is_type_notify_with_a_watchdog_and_hardening() -> None:
    s = _settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert int(s["WatchdogSec"][0]) > 0 and int(s["LimitNOFILE"][0]) >= 65536
    assert s["DynamicUser"] == ["yes"] and s["ProtectSystem"] == ["strict"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "RestrictNamespaces", "LockPersonality"):
        assert s[key] == ["yes"], key
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "setrlimit" not in " ".join(s.get("SystemCallFilter", []))  # the broker raises its NOFILE limit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_accepts_the_unit() -> None:
    done = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    # The only complaint allowed: the install path of ExecStart does not exist here.
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "is not executable" not in line and "No such file" not in line
    ]
    assert problems == [], problems
