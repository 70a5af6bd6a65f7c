"""The audit log and its readers (DESIGN.md §7): filters, resume by cursor,
gaps when the ring lost facts."""

from __future__ import annotations

import orjson
import pytest

from broker.core.audit import ACTIONS, AuditFilter, AuditLog, AuditReader
from broker.core.errors import InvalidArgument


def actions(items: list) -> list[str]:
    return [orjson.loads(it.body)["action"] if it.kind == "audit" else "gap" for it in items]


def test_facts_have_every_field_and_filters_select_them() -> None:
    log = AuditLog("ep", 100)
    everyone = AuditReader(log, AuditFilter())
    failures = AuditReader(log, AuditFilter.from_query({"actions": "auth.failed, access.denied", "tenant": "acme"}))
    log.record("auth.failed", 5, remote="1.2.3.4", tenant="acme", detail="x" * 600)
    log.record("auth.failed", 6, tenant="globex")
    log.record("connection.opened", 7, user="ada", tenant="acme", transport="sse", connection=3)
    got = everyone.pull()
    body = orjson.loads(got[0].body)
    assert set(body) == {
        "kind",
        "cursor",
        "ts",
        "action",
        "user",
        "tenant",
        "transport",
        "remote",
        "connection",
        "workflow_id",
        "detail",
    }
    assert body["cursor"] == "ep.1" and body["remote"] == "1.2.3.4" and len(body["detail"]) == 513
    assert actions(failures.pull()) == ["auth.failed"]
    assert got[-1].cursor == "ep.3" and everyone.pull() == []


def test_a_cursor_resumes_exactly_after_it_and_a_lost_stretch_is_a_gap() -> None:
    log = AuditLog("ep", 5)
    for n in range(3):
        log.record("config.reloaded", n)
    resumed = AuditReader(log, AuditFilter(), "ep.2")
    assert [it.cursor for it in resumed.pull()] == ["ep.3"]
    for n in range(6):
        log.record("config.reloaded", 10 + n)  # 9 recorded, 5 kept: 5..9
    old = AuditReader(log, AuditFilter(), "ep.1")
    items = old.pull()
    assert items[0].kind == "gap" and orjson.loads(items[0].body)["missed"] == 3
    assert [it.cursor for it in items[1:]] == ["ep.5", "ep.6", "ep.7", "ep.8", "ep.9"]
    behind = resumed  # it read up to ep.3; the ring now starts at ep.5
    items = behind.pull()
    assert items[0].kind == "gap" and orjson.loads(items[0].body)["missed"] == 1
    for cursor in ("other.3", "ep.x", "ep.99", "garbage", "ep.0" + "9" * 19, "ep." + "9" * 10_000):
        items = AuditReader(log, AuditFilter(), cursor).pull()
        assert [it.kind for it in items] == ["gap"] and orjson.loads(items[0].body)["missed"] is None
    assert AuditReader(log, AuditFilter()).pull() == []  # fresh: live from now


@pytest.mark.parametrize(
    "raw",
    [[], {"actions": ["nope"]}, {"actions": "auth.failed"}, {"tenant": ""}, {"user": 5}, {"other": 1}],
)
def test_bad_ws_filters(raw: object) -> None:
    with pytest.raises(InvalidArgument):
        AuditFilter.from_ws(raw)


def test_every_action_is_accepted_by_a_filter() -> None:
    assert AuditFilter.from_ws({"actions": list(ACTIONS)}).actions == frozenset(ACTIONS)
