"""`broker bench --tiny`: the benchmark itself runs end to end (tiny numbers).

Not a performance test: it checks the bench's plumbing (broker, engines,
subscriber processes, the nginx + nchan reference when it can be installed)
and the behaviour figures that must hold at any scale: nothing lost or
repeated, every reconnecting client resumed at its cursor.
"""

from __future__ import annotations

import subprocess
import sys

import orjson

from .conftest import ROOT


def test_bench_tiny_runs_every_scenario(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "broker", "bench", "--tiny", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "machine:" in proc.stdout and "scenario" in proc.stdout
    r = orjson.loads(out.read_bytes())
    assert r["machine"]["cores"] >= 1
    assert r["ingest"]["broker_eps"] > 0 and r["ingest"]["pull_ref_eps"] > 0
    fan = r["fanout"]["broker"]
    assert fan["delivered"] == fan["expected"] and fan["lost"] == 0 and fan["dups"] == 0
    nchan = r["fanout"]["nchan"]
    # The reference either ran, or the bench said plainly why not.
    assert "deliveries_per_s" in nchan or nchan.get("skipped")
    many = r["many"]
    assert many["delivered"] == many["expected"] and many["lost"] == 0
    assert r["idle"]["connections"] > 0 and r["idle"]["kb_per_conn"] > 0
    storm = r["storm"]
    assert storm["resumed_at_cursor"] == storm["clients"] == storm["complete"] == storm["ended"]
    assert storm["lost"] == 0 and storm["dups"] == 0
