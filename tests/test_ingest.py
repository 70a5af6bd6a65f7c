"""Ingest end to end (DESIGN.md §2-3): engine processes over ZMQ, POST /v1/events.

One broker daemon for the module (unique workflow ids per test, counters
compared as deltas), with a small `ingest.max_frame_bytes` and a short
reorder window. Engines are separate processes (tests/engine.py).
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import aclosing
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import zmq

from broker.core.envelope import kind_of

from .builders import deep_event, ev, log, nested_json
from .e2e import (
    Multipart,
    client_for,
    kinds,
    module_broker,
    msgs,
    open_sse,
    post_events,
    rejected,
    run_engine,
    seqs,
    stats,
    uid,
    wf_path,
    write_frames,
    zmq_barrier,
)
from .engine import workflow_events

MAX_FRAME = 4096
WINDOW_MS = 200

daemon = module_broker(
    ingest={"max_frame_bytes": MAX_FRAME},
    order={"reorder_window_ms": WINDOW_MS},
    stream={"unknown_workflow_wait": 5},
)

# Deep payloads and libzmq's MAXMSGSIZE: frames up to 4x + 64 KiB of the limit
# are received, rejected and counted; this daemon's limit leaves room for them.
MAX_FRAME_64K = 65536
daemon_64k = module_broker(ingest={"max_frame_bytes": MAX_FRAME_64K})


async def whole_stream(client, wid: str) -> list:
    """Every event of a workflow from its first (since=0) to `end`, then EOF."""
    async with open_sse(client, wf_path(wid), params={"since": "0"}) as s:
        assert s.status == 200, s.resp.text
        return await s.rest()


async def new_rejects(client, before: dict[str, Any]) -> tuple[list[dict[str, Any]], Counter]:
    after = await rejected(client)
    n = after["total"] - before["total"]
    recent = after["recent"][-n:] if n else []
    assert len(recent) == n, "recent rejects list lost entries"
    delta = Counter(after["by_reason"])
    delta.subtract(before["by_reason"])
    return recent, +delta


def assert_complete_in_order(received: list[dict[str, Any]], expected: list[dict[str, Any]], first_seq: int) -> None:
    """`received` is `expected` (seqs first_seq, first_seq+1, …) in order, nothing
    added, nothing lost, except what DESIGN.md §6 allows: progress updates of one
    task inside one write are coalesced to the latest, so a `task.progress` may be
    missing when a later progress of the same task was delivered."""
    got = {m["seq"]: m for m in received}
    assert [m["seq"] for m in received] == sorted(got), "out of order or repeated"
    for i, sent in enumerate(expected):
        seq = first_seq + i
        if seq in got:
            assert_same_event(got.pop(seq), sent)
            continue
        assert sent["type"] == "task.progress", f"lost seq {seq}: {sent}"
        assert any(
            s2 > seq and m["type"] == "task.progress" and m["task_id"] == sent["task_id"] for s2, m in got.items()
        ), f"progress seq {seq} dropped without a later progress of its task: {sent}"
    assert not got, f"unexpected extra events: {got}"


def label(m: dict[str, Any]) -> str:
    return m.get("message") or m.get("type") or m["kind"]


def assert_same_event(msg: dict[str, Any], sent: dict[str, Any]) -> None:
    for key, value in sent.items():
        if key == "tenant":
            assert "tenant" not in msg
            continue
        assert msg[key] == value, (key, msg, sent)
    assert msg["kind"] == kind_of(sent["type"])
    assert isinstance(msg["server_ts"], int) and isinstance(msg["ts"], int)


# ------------------------------------------------------- engine process → SSE


@pytest.mark.parametrize(
    "engine_args",
    [[], ["--seq"], ["--batch", "4", "--multipart", "3"], ["--seq", "--batch", "5"]],
    ids=["broker-seq", "engine-seq", "batch+multipart", "engine-seq-batch"],
)
async def test_engine_process_full_workflow_reaches_subscribers(daemon, engine_args):
    wid = uid()
    expected = workflow_events(wid, 3, 5, seq="--seq" in engine_args)
    results: dict[str, list] = {}
    with trio.fail_after(20):
        async with client_for(daemon) as client:

            async def subscribe(name: str, params: dict[str, str]) -> None:
                # The workflow does not exist yet: the request waits for it.
                async with open_sse(client, wf_path(wid), params=params) as s:
                    assert s.status == 200
                    results[name] = await s.rest()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(subscribe, "from_start", {"since": "0"})
                nursery.start_soon(subscribe, "live", {})
                out = await run_engine(
                    daemon.zmq,
                    "--workflow",
                    wid,
                    "--tasks",
                    "3",
                    "--log-lines",
                    "5",
                    "--rate",
                    "500",
                    *engine_args,
                )
                assert f"sent {_messages(len(expected), engine_args)} messages" in out

            # A subscriber arriving after the end gets the final snapshot and `end`.
            async with open_sse(client, wf_path(wid)) as s:
                final = await s.rest()

    everything = results["from_start"]
    assert everything[-1].event == "end"
    epoch = everything[0].json["epoch"]
    if "--seq" in engine_args:
        assert epoch == "e"
    for sse in everything:
        assert sse.id == f"{epoch}:{sse.json['seq']}"
    assert_complete_in_order(msgs(everything[:-1]), expected, 1)
    end = everything[-1]
    assert (
        end.json.items()
        >= {"kind": "end", "workflow_id": wid, "epoch": epoch, "seq": len(expected), "state": "completed"}.items()
    )
    assert end.id == everything[-2].id

    live = results["live"]
    assert live[-1].event == "end"
    if live[0].event == "snapshot":  # the workflow was there before the stream
        first = live[0].json["seq"]
        assert_complete_in_order(msgs(live[1:-1]), expected[first:], first + 1)
    else:  # the stream waited for it: every event from the first
        assert_complete_in_order(msgs(live[:-1]), expected, 1)

    assert kinds(final) == ["snapshot", "end"]
    snap = final[0].json
    assert snap["state"] == "completed" and snap["seq"] == len(expected)
    assert snap["result"] == {"tasks": 3}
    assert sorted(snap["tasks"]) == ["t-1", "t-2", "t-3"]
    for i, tid in enumerate(["t-1", "t-2", "t-3"], 1):
        task = snap["tasks"][tid]
        assert task["state"] == "completed" and task["progress"] == 100 and task["attempt"] == 1
        assert task["result"] == {"task": tid, "rows": i}
        assert task["started"] is not None and task["finished"] is not None


def _messages(n_events: int, args: list[str]) -> int:
    batch = int(args[args.index("--batch") + 1]) if "--batch" in args else 1
    multipart = int(args[args.index("--multipart") + 1]) if "--multipart" in args else 1
    frames = -(-n_events // batch)
    return -(-frames // multipart)


# ------------------------------------------------------------- batches


async def test_batch_frame_and_multipart_message_good_and_bad_interleaved(daemon, tmp_path: Path):
    wid = uid()
    good = [log(wid, f"good-{i}") for i in range(1, 9)]
    frames = write_frames(
        tmp_path / "frames",
        [
            # one frame, a JSON array: accepted event by event
            [good[0], {"type": "log", "level": "info"}, good[1], {**good[2], "colour": "red"}, good[2]],
            # one ZMQ message of several frames
            Multipart([good[3], b"{not json", good[4], orjson.dumps({**log(wid, "x" * MAX_FRAME)}), good[5]]),
            # a batch frame inside a multi-frame message
            Multipart([[good[6], 42], good[7]]),
            ev(wid, "workflow.completed"),
        ],
    )
    with trio.fail_after(20):
        async with client_for(daemon) as client:
            before = await rejected(client)
            await run_engine(daemon.zmq, frames_file=frames)
            events = await whole_stream(client, wid)
            recent, by_reason = await new_rejects(client, before)

    assert [m.get("message") for m in msgs(events[:-2])] == [f"good-{i}" for i in range(1, 9)]
    assert kinds(events[-2:]) == ["state", "end"]
    assert seqs(events[:-1]) == list(range(1, 10))
    assert [(r["reason"], r["index"], r["source"]) for r in recent] == [
        ("missing_field", 1, "zmq"),
        ("unknown_field", 3, "zmq"),
        ("invalid_json", 0, "zmq"),
        ("too_large", 0, "zmq"),
        ("not_object", 1, "zmq"),
    ]
    assert "colour" in recent[1]["detail"]
    assert recent[2]["sample"] == "{not json"
    assert by_reason == Counter(
        {"missing_field": 1, "unknown_field": 1, "invalid_json": 1, "too_large": 1, "not_object": 1}
    )


# ------------------------------------------------------------- bad input


def bad_inputs(wid_b: str, wid_e: str) -> list[tuple[str, bytes, str]]:
    """(name, frame, reason). wid_b is broker-sequenced with tenant acme, wid_e engine-sequenced."""
    w = "wf-bad"
    big = orjson.dumps(log(w, "y" * (MAX_FRAME + 1)))
    cases: list[tuple[str, Any, str]] = [
        ("not json", b"{not json", "invalid_json"),
        ("truncated json", b'{"workflow_id": "w", "type"', "invalid_json"),
        ("not utf-8", b'{"workflow_id": "\xff\xfe", "type": "log"}', "invalid_json"),
        ("trailing garbage", b'{"workflow_id": "w", "type": "x"} junk', "invalid_json"),
        ("oversized frame", big, "too_large"),
        ("number", b"42", "not_object"),
        ("string", b'"workflow.running"', "not_object"),
        ("empty batch", b"[]", "not_object"),
        ("null", b"null", "not_object"),
        ("no workflow_id", {"type": "workflow.running"}, "missing_field"),
        ("no type", {"workflow_id": w}, "missing_field"),
        ("task without task_id", {"workflow_id": w, "type": "task.running"}, "missing_field"),
        ("progress without progress", {"workflow_id": w, "type": "task.progress", "task_id": "t"}, "missing_field"),
        ("log without level", {"workflow_id": w, "type": "log", "message": "m"}, "missing_field"),
        ("workflow_id number", {"workflow_id": 5, "type": "workflow.running"}, "invalid_field"),
        ("workflow_id empty", {"workflow_id": "", "type": "workflow.running"}, "invalid_field"),
        ("workflow_id too long", {"workflow_id": "w" * 257, "type": "workflow.running"}, "invalid_field"),
        ("workflow_id control char", {"workflow_id": "a\nb", "type": "workflow.running"}, "invalid_field"),
        ("type number", {"workflow_id": w, "type": 7}, "invalid_field"),
        ("type with spaces", {"workflow_id": w, "type": "workflow running"}, "invalid_field"),
        ("id too long", {"workflow_id": w, "type": "x", "id": "i" * 129}, "invalid_field"),
        ("id number", {"workflow_id": w, "type": "x", "id": 12}, "invalid_field"),
        ("seq string", {"workflow_id": w, "type": "x", "seq": "1"}, "invalid_field"),
        ("seq zero", {"workflow_id": w, "type": "x", "seq": 0}, "invalid_field"),
        ("seq bool", {"workflow_id": w, "type": "x", "seq": True}, "invalid_field"),
        ("seq float", {"workflow_id": w, "type": "x", "seq": 1.5}, "invalid_field"),
        ("ts string", {"workflow_id": w, "type": "x", "ts": "now"}, "invalid_field"),
        ("ts negative", {"workflow_id": w, "type": "x", "ts": -1}, "invalid_field"),
        ("tenant number", {"workflow_id": w, "type": "x", "tenant": 5}, "invalid_field"),
        ("task_id list", {"workflow_id": w, "type": "task.running", "task_id": ["t"]}, "invalid_field"),
        ("parent_id number", {"workflow_id": w, "type": "x", "parent_id": 1}, "invalid_field"),
        ("state upper-case", {"workflow_id": w, "type": "x", "state": "Running"}, "invalid_field"),
        (
            "progress string",
            {"workflow_id": w, "type": "task.progress", "task_id": "t", "progress": "50"},
            "invalid_field",
        ),
        (
            "progress over 100",
            {"workflow_id": w, "type": "task.progress", "task_id": "t", "progress": 101},
            "invalid_field",
        ),
        ("level unknown", {"workflow_id": w, "type": "log", "level": "verbose"}, "invalid_field"),
        ("message number", {"workflow_id": w, "type": "log", "level": "info", "message": 5}, "invalid_field"),
        ("misspelt field", {"workflowid": w, "workflow_id": w, "type": "x"}, "unknown_field"),
        ("extra field", {"workflow_id": w, "type": "x", "payload": {}}, "unknown_field"),
        ("batch of non-objects", b"[1]", "not_object"),
        ("seq on broker-sequenced", {"workflow_id": wid_b, "type": "x", "seq": 2, "tenant": "acme"}, "unexpected_seq"),
        ("no seq on engine-sequenced", {"workflow_id": wid_e, "type": "x"}, "missing_seq"),
        ("other tenant", {"workflow_id": wid_b, "type": "x", "tenant": "globex"}, "tenant_mismatch"),
        ("other tenant, engine", {"workflow_id": wid_e, "type": "x", "seq": 2, "tenant": "globex"}, "tenant_mismatch"),
    ]
    return [(name, f if isinstance(f, bytes) else orjson.dumps(f), reason) for name, f, reason in cases]


async def test_every_bad_input_over_zmq_is_rejected_with_its_reason(daemon, tmp_path: Path):
    good_wid, wid_b, wid_e = uid("good"), uid("brk"), uid("eng")
    cases = bad_inputs(wid_b, wid_e)
    messages: list[Any] = [ev(wid_b, "workflow.running", tenant="acme"), ev(wid_e, "workflow.running", seq=1)]
    for i, (_, frame, _) in enumerate(cases):
        messages.append(frame)
        messages.append(log(good_wid, f"good-{i}"))  # a good event between every two bad ones
    messages += [
        ev(good_wid, "workflow.completed"),
        ev(wid_b, "workflow.completed", tenant="acme"),
        ev(wid_e, "workflow.completed", seq=2),
    ]
    frames = write_frames(tmp_path / "frames", messages)

    with trio.fail_after(20):
        async with client_for(daemon) as client:
            before = await rejected(client)
            log_lines_before = len(daemon.lines)
            await run_engine(daemon.zmq, frames_file=frames)
            good = await whole_stream(client, good_wid)
            eng = await whole_stream(client, wid_e)
            brk = await whole_stream(client, wid_b)
            recent, by_reason = await new_rejects(client, before)
            # The broker is unharmed.
            assert (await client.get("/healthz")).status_code == 200

    # Logged, but rate-limited (at most 10 lines per 10 s, the rest summed up later).
    reject_lines = [line for line in daemon.lines[log_lines_before:] if "ingest reject" in line]
    assert len(reject_lines) <= 10, f"{len(reject_lines)} reject log lines for {len(cases)} rejects"
    got = [(r["reason"], r["index"], r["source"]) for r in recent]
    want = [(reason, 0, "zmq") for _, _, reason in cases]
    assert got == want, "\n".join(
        f"{name}: got {g}, want {w}" for (name, _, _), g, w in zip(cases, got, want) if g != w
    )
    assert by_reason == Counter(reason for _, _, reason in cases)
    for r, (name, frame, _) in zip(recent, cases):
        assert r["detail"], name
        assert r["sample"] == frame[:256].decode("utf-8", "replace"), name
    # Every good event got through, in order, none lost.
    assert [m.get("message") for m in msgs(good[:-2])] == [f"good-{i}" for i in range(len(cases))]
    assert kinds(good[-2:]) == ["state", "end"]
    # The rejected events did not touch the workflows they named.
    assert [m.get("type", m["kind"]) for m in msgs(eng)] == ["workflow.running", "workflow.completed", "end"]
    assert seqs(eng) == [1, 2, 2]
    assert [m.get("type", m["kind"]) for m in msgs(brk)] == ["workflow.running", "workflow.completed", "end"]


async def test_every_bad_input_over_http_is_rejected_with_its_reason(daemon):
    good_wid, wid_b, wid_e = uid("good"), uid("brk"), uid("eng")
    # Frames that are JSON values can share one batch; the others go alone.
    cases = bad_inputs(wid_b, wid_e)
    with trio.fail_after(20):
        async with client_for(daemon) as client:
            r = await post_events(
                client, [ev(wid_b, "workflow.running", tenant="acme"), ev(wid_e, "workflow.running", seq=1)]
            )
            assert r.status_code == 202 and r.json()["accepted"] == 2
            usable = [(n, f, r) for n, f, r in cases if r not in ("invalid_json", "too_large")]
            goods = 0
            for start in range(0, len(usable), 6):  # batches under ingest.max_frame_bytes
                batch: list[Any] = []
                want: list[tuple[int, str]] = []
                for _, frame, reason in usable[start : start + 6]:
                    want.append((len(batch), reason))
                    batch.append(orjson.loads(frame))
                    goods += 1
                    batch.append(log(good_wid, f"good-{goods}"))
                r = await post_events(client, batch)
                assert r.status_code == 202, r.text
                body = r.json()
                assert set(body) == {"accepted", "duplicates", "rejected"}
                assert body["accepted"] == len(want) and body["duplicates"] == 0
                assert [(x["index"], x["reason"]) for x in body["rejected"]] == want
                assert all(isinstance(x["message"], str) and x["message"] for x in body["rejected"])

            # Each of them alone: nothing accepted → 400, same body shape.
            for name, frame, reason in cases:
                if reason in ("invalid_json", "too_large"):
                    continue
                r = await post_events(client, frame)
                assert r.status_code == 400, (name, r.status_code, r.text)
                body = r.json()
                assert body["accepted"] == 0 and body["duplicates"] == 0, name
                assert [x["reason"] for x in body["rejected"]] == [reason], (name, body)

            r = await post_events(client, ev(good_wid, "workflow.completed"))
            assert r.status_code == 202
            good = await whole_stream(client, good_wid)
    assert [m.get("message") for m in msgs(good[:-2])] == [f"good-{i}" for i in range(1, goods + 1)]


async def test_engine_seq_older_than_first_is_stale_and_first_event_waits_for_lower_seqs(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            # First event seq 10, then 9 right after: the sequence starts at 9.
            daemon.push({"workflow_id": wid, "type": "x.a", "seq": 10}, {"workflow_id": wid, "type": "x.b", "seq": 9})
            async with open_sse(client, wf_path(wid), params={"since": "0"}) as s:
                assert s.status == 200
                first = await s.take(2)
                assert seqs(first) == [9, 10] and [m["type"] for m in msgs(first)] == ["x.b", "x.a"]
                before = await rejected(client)
                daemon.push(
                    {"workflow_id": wid, "type": "x.c", "seq": 3},
                    {"workflow_id": wid, "type": "workflow.completed", "seq": 11},
                )
                rest = await s.rest()
            recent, by_reason = await new_rejects(client, before)
    assert [(e.event, e.json["seq"]) for e in rest] == [("state", 11), ("end", 11)]
    assert [r["reason"] for r in recent] == ["stale_seq"] and by_reason == Counter({"stale_seq": 1})


# ----------------------------------------- deep payloads, frame size (daemon_64k)


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def reject_count(rej: dict[str, Any], reason: str) -> int:
    return rej["by_reason"].get(reason, 0)


async def test_300_level_event_over_zmq_is_rejected_and_the_daemon_keeps_serving(daemon_64k):
    deep, ok, after = uid("deep"), uid("deep64"), uid("after")
    with trio.fail_after(15):
        async with client_for(daemon_64k) as client:
            before = await rejected(client)
            daemon_64k.push(deep_event(deep, 300), deep_event(ok, 64), ev(after, "workflow.running"))
            await zmq_barrier(daemon_64k, client)
            assert daemon_64k.proc.poll() is None, "the daemon_64k died:\n" + daemon_64k.output()
            assert (await client.get("/healthz")).status_code == 200
            now = await rejected(client)
            listed = [r for r in now["recent"] if f'"{deep}"' in r["sample"]]
            assert (await client.get(f"/v1/workflows/{deep}")).status_code == 404
            assert (await client.get(f"/v1/workflows/{after}")).status_code == 200
            # 64 levels pass, and stream back as they were sent.
            async with open_sse(client, wf_path(ok), params={"since": "0"}) as s:
                got = await s.expect()
    assert reject_count(now, "invalid_field") == reject_count(before, "invalid_field") + 1
    assert len(listed) == 1 and listed[0]["reason"] == "invalid_field" and listed[0]["source"] == "zmq"
    assert "64" in listed[0]["detail"], listed[0]
    assert got.event == "event" and got.json["data"] == orjson.loads(nested_json(64))


async def test_300_level_event_over_http_is_400_not_500(daemon_64k):
    deep, ok = uid("deep"), uid("deep64")
    with trio.fail_after(15):
        async with client_for(daemon_64k) as client:
            r = await post_events(client, deep_event(deep, 300))
            batch = await post_events(client, b"[%s,%s]" % (deep_event(deep, 300), deep_event(ok, 64)))
            ok_status = (await client.get(f"/v1/workflows/{ok}")).status_code
    assert r.status_code == 400, (r.status_code, r.text)
    assert [x["reason"] for x in r.json()["rejected"]] == ["invalid_field"]
    assert batch.status_code == 202, (batch.status_code, batch.text)
    assert ok_status == 200
    assert batch.json()["accepted"] == 1
    assert [(x["index"], x["reason"]) for x in batch.json()["rejected"]] == [(0, "invalid_field")]


def _wait_disconnected(monitor: zmq.Socket, timeout: float) -> bool:
    """Block until the monitored socket reports EVENT_DISCONNECTED (True) or timeout (False)."""
    from zmq.utils.monitor import recv_monitor_message

    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if monitor.poll(int(left * 1000)):
            if recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
                return True
    return False


async def test_frame_over_max_frame_bytes_is_counted_and_a_huge_one_never_reaches_the_broker(daemon_64k):
    wid = uid("big")
    with trio.fail_after(20):
        async with client_for(daemon_64k) as client:
            before = await rejected(client)
            # A little over the limit (and up to 4x + 64 KiB): received, rejected, counted.
            for size in (MAX_FRAME_64K + 1000, 4 * MAX_FRAME_64K):
                filler = "x" * (size - 60)
                daemon_64k.push(ev(wid, "tick", data=filler))
            await zmq_barrier(daemon_64k, client)
            mid = await rejected(client)
            assert reject_count(mid, "too_large") == reject_count(before, "too_large") + 2
            listed = [r for r in mid["recent"] if f'"{wid}"' in r["sample"]]
            assert [(r["reason"], r["source"]) for r in listed] == [("too_large", "zmq")] * 2
            # Far over it: 20 MB on its own connection. libzmq refuses it after
            # reading its size and drops the peer, before allocating anything.
            mem0 = proc_memory(daemon_64k.proc.pid)
            ctx = zmq.Context()
            push = ctx.socket(zmq.PUSH)
            monitor = push.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            try:
                push.connect(daemon_64k.zmq)
                huge = orjson.dumps(ev(uid("huge"), "tick"))[:-1] + b',"message":"' + b"x" * 20_000_000 + b'"}'
                push.send(huge, copy=False)
                disconnected = await trio.to_thread.run_sync(_wait_disconnected, monitor, 5.0)
            finally:
                push.disable_monitor()
                monitor.close(0)
                push.close(0)
                ctx.term()
            # Ingest still works and the daemon_64k still answers.
            await zmq_barrier(daemon_64k, client)
            after = await rejected(client)
            mem1 = proc_memory(daemon_64k.proc.pid)
            assert (await client.get("/healthz")).status_code == 200
    grew = mem1["VmHWM"] - mem0["VmHWM"]
    # Peak RSS, not RSS: a 20 MB buffer taken and freed again leaves VmRSS
    # where it was, but not VmHWM.
    assert grew < 10_000, f"peak RSS grew by {grew} kB ({mem0} -> {mem1}): the 20 MB frame was read"
    assert mem1["VmRSS"] < mem0["VmRSS"] + 10_000, (mem0, mem1)
    assert reject_count(after, "too_large") == reject_count(mid, "too_large"), "the 20 MB frame reached the broker"
    assert disconnected, "the broker did not drop the peer that sent 20 MB"


# ------------------------------------------------------------- POST /v1/events


async def test_post_events_answers(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            r = await post_events(client, ev(wid, "workflow.running", id=f"{wid}-a"))
            assert r.status_code == 202
            assert r.headers["content-type"].startswith("application/json")
            assert r.json() == {"accepted": 1, "duplicates": 0, "rejected": []}

            r = await post_events(
                client,
                [
                    log(wid, "one"),
                    {"workflow_id": wid},
                    log(wid, "two"),
                    ev(wid, "workflow.running", id=f"{wid}-a"),
                ],
            )
            assert r.status_code == 202
            body = r.json()
            assert body["accepted"] == 2 and body["duplicates"] == 1
            assert len(body["rejected"]) == 1
            rej = body["rejected"][0]
            assert rej["index"] == 1 and rej["reason"] == "missing_field" and "type" in rej["message"]

            r = await post_events(client, [{"workflow_id": wid}, {"type": "log"}])
            assert r.status_code == 400
            body = r.json()
            assert body["accepted"] == 0 and body["duplicates"] == 0
            assert [(x["index"], x["reason"]) for x in body["rejected"]] == [(0, "missing_field"), (1, "missing_field")]

            r = await post_events(client, b"[]")
            assert r.status_code == 400 and r.json()["accepted"] == 0
            assert [x["reason"] for x in r.json()["rejected"]] == ["not_object"]

            for raw in (b"this is not json", b"", b'{"workflow_id": "w", ', b"\xff\xfe\xfd"):
                r = await post_events(client, raw)
                assert r.status_code == 400, raw
                err = r.json()["error"]
                assert err["code"] == "invalid_argument" and err["message"], raw

            r = await post_events(client, ev(wid, "workflow.completed"))
            assert r.status_code == 202
            events = await whole_stream(client, wid)
    assert [label(m) for m in msgs(events)] == [
        "workflow.running",
        "one",
        "two",
        "workflow.completed",
        "end",
    ]


async def test_post_oversized_body_is_400_and_nothing_is_ingested(daemon):
    wid = uid()
    batch = [log(wid, f"line {i}") for i in range(200)]
    body = orjson.dumps(batch)
    assert len(body) > MAX_FRAME

    async def chunks():
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    with trio.fail_after(10):
        async with client_for(daemon) as client:
            before = await rejected(client)
        # (A fresh client per oversized POST: reusing its connection is
        # test_connection_still_usable_after_oversized_post's business.)
        async with client_for(daemon) as client:
            r = await post_events(client, body)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_argument"
        assert str(MAX_FRAME) in r.json()["error"]["message"]
        async with client_for(daemon) as client:  # streamed in chunks, no Content-Length
            r = await client.post("/v1/events", content=chunks())
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_argument"
        async with client_for(daemon) as client:
            recent, by_reason = await new_rejects(client, before)
            assert by_reason == Counter({"too_large": 2})
            assert {x["source"] for x in recent} == {"http"}
            assert (await client.get(f"/v1/workflows/{wid}")).status_code == 404
            # Just under the limit is fine.
            ok = orjson.dumps(batch[:20])
            assert len(ok) <= MAX_FRAME
            r = await post_events(client, ok)
            assert r.status_code == 202 and r.json()["accepted"] == 20


@pytest.mark.parametrize("how", ["content-length-1MiB", "chunked"])
async def test_connection_still_usable_after_oversized_post(daemon, how):
    """An oversized body is answered before it is read to the end; the keep-alive
    connection must then either be closed cleanly (`Connection: close`) or stay
    usable: the client's next request on it must get its answer."""
    line = orjson.dumps(log("wf-big", "z" * 100))
    body = b"[" + b",".join([line] * (10_000 if how.startswith("content") else 100)) + b"]"

    async def chunks():
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    async with client_for(daemon) as client:
        for attempt in range(10):
            # The server answers before reading the body through: the chunks
            # left unsent are closed here, not by the GC.
            async with aclosing(chunks()) as streamed:
                with trio.fail_after(5):
                    r = await client.post("/v1/events", content=body if how.startswith("content") else streamed)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_argument"
            with trio.fail_after(3):  # TooSlowError here: the next request on the connection got no answer
                r = await client.get("/healthz")
            assert r.status_code == 200, attempt


# ------------------------------------------------------------- dedup


async def test_duplicates_by_id_and_by_seq_are_dropped_and_counted(daemon):
    wid_b, wid_e = uid("brk"), uid("eng")
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            dups_before = (await stats(client))["counters"].get("duplicates", 0)
            daemon.push(
                ev(wid_b, "workflow.running", id=f"{wid_b}-1"),
                log(wid_b, "first", id=f"{wid_b}-2"),
                log(wid_b, "first again", id=f"{wid_b}-2"),  # same id: dropped
                [log(wid_b, "in batch", id=f"{wid_b}-3"), log(wid_b, "dup in batch", id=f"{wid_b}-3")],
                log(wid_e, "other workflow, same id", id=f"{wid_b}-1"),  # ids are global
                ev(wid_e, "workflow.running", seq=1, id=f"{wid_e}-1"),
                log(wid_e, "two", seq=2, id=f"{wid_e}-2"),
                log(wid_e, "two again, new id", seq=2, id=f"{wid_e}-2b"),  # same seq: dropped
                log(wid_e, "one again, no id", seq=1),  # same seq: dropped
                log(wid_e, "four", seq=4),
                log(wid_e, "four again while waiting", seq=4),  # same pending seq: dropped
                log(wid_e, "three", seq=3),
            )
            await zmq_barrier(daemon, client)
            r = await post_events(client, [log(wid_b, "via http, old id", id=f"{wid_b}-2"), log(wid_b, "new")])
            assert r.status_code == 202 and r.json() == {"accepted": 1, "duplicates": 1, "rejected": []}
            r = await post_events(client, log(wid_b, "only a duplicate", id=f"{wid_b}-3"))
            assert r.json()["accepted"] == 0 and r.json()["duplicates"] == 1
            daemon.push(ev(wid_b, "workflow.completed"), ev(wid_e, "workflow.completed", seq=5))
            brk = await whole_stream(client, wid_b)
            eng = await whole_stream(client, wid_e)
            dups_after = (await stats(client))["counters"]["duplicates"]

    assert [label(m) for m in msgs(brk)] == [
        "workflow.running",
        "first",
        "in batch",
        "new",
        "workflow.completed",
        "end",
    ]
    assert [label(m) for m in msgs(eng)] == [
        "workflow.running",
        "two",
        "three",
        "four",
        "workflow.completed",
        "end",
    ]
    assert seqs(eng[:-1]) == [1, 2, 3, 4, 5]
    # 3 by id over ZMQ, 3 by seq, 2 by id over HTTP.
    assert dups_after - dups_before == 8


# ------------------------------------------------------------- reorder


async def test_reorder_1_3_2_arrives_in_order(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            gaps_before = (await stats(client))["counters"].get("gaps", 0)
            daemon.push(ev(wid, "workflow.running", seq=1))
            async with open_sse(client, wf_path(wid)) as s:
                snap = await s.expect()
                # A snapshot, or the first event itself when the stream was
                # opened before the push was ingested (it waited for it).
                assert snap.event in ("snapshot", "state") and snap.json["seq"] == 1
                daemon.push(log(wid, "three", seq=3), log(wid, "two", seq=2), ev(wid, "workflow.completed", seq=4))
                rest = await s.rest()
            gaps_after = (await stats(client))["counters"].get("gaps", 0)
    assert [(e.event, e.id) for e in rest] == [("log", "e:2"), ("log", "e:3"), ("state", "e:4"), ("end", "e:4")]
    assert [m.get("message") for m in msgs(rest[:2])] == ["two", "three"]
    assert gaps_after == gaps_before


async def test_reorder_missing_seq_released_after_window_with_gap(daemon):
    wid = uid()
    with trio.fail_after(10):
        async with client_for(daemon) as client:
            daemon.push(ev(wid, "workflow.running", seq=1))
            async with open_sse(client, wf_path(wid)) as s:
                assert (await s.expect()).event == "snapshot"
                t0 = time.monotonic()
                daemon.push(log(wid, "three", seq=3))
                gap = await s.expect()
                waited = time.monotonic() - t0
                three = await s.expect()
                # seq 2 arriving after its gap was released is rejected, not streamed.
                before = await rejected(client)
                daemon.push(log(wid, "two, too late", seq=2), ev(wid, "workflow.completed", seq=4))
                rest = await s.rest()
                recent, _ = await new_rejects(client, before)
            # A new subscriber from the start sees the same gap in the same place.
            replay = await whole_stream(client, wid)
    assert gap.event == "gap" and gap.id == "e:2"
    assert gap.json["from"] == 2 and gap.json["to"] == 2 and gap.json["dropped"] == 1
    assert gap.json["workflow_id"] == wid
    assert waited >= WINDOW_MS / 1000 * 0.9, f"gap released after {waited:.3f}s, before the reorder window"
    assert three.event == "log" and three.json["seq"] == 3 and three.json["message"] == "three"
    assert [(e.event, e.json["seq"]) for e in rest] == [("state", 4), ("end", 4)]
    assert [r["reason"] for r in recent] == ["late_seq"]
    assert [(e.event, e.json["seq"]) for e in replay] == [
        ("state", 1),
        ("gap", 2),
        ("log", 3),
        ("state", 4),
        ("end", 4),
    ]
