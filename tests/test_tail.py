"""`broker tail` against the daemon as a subprocess: the live view driven
in tmux (send-keys is not needed: it only watches; capture-pane reads the
screen) shows the tasks and exits 0 at the end; `--json` prints each
message with its cursor; a refusal is one line and exit 1.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator

import orjson
import pytest
import trio

from .builders import ev, log, task
from .conftest import ROOT, Daemon
from .e2e import uid
from .test_client import opened

pytestmark = pytest.mark.slow

TAIL = [sys.executable, "-m", "broker", "tail"]


class Tmux:
    """A tmux server of its own (its own socket), one window of 110 × 30."""

    def __init__(self) -> None:
        tmux = shutil.which("tmux")
        assert tmux is not None, "tmux is missing: scripts/test installs it (apt-get install tmux)"
        self.cmd = [tmux, "-L", uid("tail-test")]

    def start(self, command: list[str]) -> None:
        line = " ".join(_quote(a) for a in command)
        shell = f"cd {_quote(str(ROOT))} && {line}; echo EXIT=$?; sleep 60"
        subprocess.run([*self.cmd, "new-session", "-d", "-x", "110", "-y", "30", shell], check=True)

    def screen(self) -> str:
        out = subprocess.run([*self.cmd, "capture-pane", "-p"], capture_output=True, text=True, check=False)
        return out.stdout

    async def wait_for(self, *texts: str, timeout: float = 10) -> str:
        with trio.move_on_after(timeout):
            while True:
                screen = await trio.to_thread.run_sync(self.screen)
                if all(t in screen for t in texts):
                    return screen
                await trio.sleep(0.05)
        raise AssertionError(f"not on the screen within {timeout} s: {texts}\n{self.screen()}")

    def kill(self) -> None:
        subprocess.run([*self.cmd, "kill-server"], capture_output=True, check=False)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    t = Tmux()
    yield t
    t.kill()


async def test_the_live_view_shows_the_tasks_and_exits_0_at_the_end(broker: Daemon, tmux: Tmux) -> None:
    wid = uid("tail")
    tmux.start([*TAIL, wid, "--url", broker.url])
    with trio.fail_after(30):
        await opened(broker)
        broker.push(
            ev(wid, "workflow.running"),
            task(wid, "extract", "running"),
            task(wid, "extract", "progress", progress=40, message="40k rows"),
            task(wid, "load", "running"),
            log(wid, "slow disk", level="warning", task_id="load"),
        )
        screen = await tmux.wait_for("● live", "extract", "40k rows", "load", "slow disk")
        assert f"{wid}  running" in screen, screen
        broker.push(
            task(wid, "extract", "completed"),
            task(wid, "load", "failed", error={"reason": "disk full"}),
            ev(wid, "workflow.failed"),
        )
        screen = await tmux.wait_for("EXIT=0")
    assert f"{wid}  failed" in screen and "■ ended" in screen, screen
    assert "100" in screen and 'last error (load): {"reason":"disk full"}' in screen, screen


async def test_json_prints_every_message_with_its_cursor_and_exits_0_at_the_end(broker: Daemon) -> None:
    a, b = uid("tail-a"), uid("tail-b")
    broker.push(ev(a, "workflow.running"), ev(b, "workflow.running"))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            result: list[subprocess.CompletedProcess[bytes]] = []

            async def run() -> None:
                args = [*TAIL, "--workflows", f"{a},{b}", "--json", "--url", broker.url]
                result.append(
                    await trio.run_process(args, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False)
                )

            nursery.start_soon(run)
            await opened(broker)
            broker.push(ev(a, "workflow.completed"), log(b, "hello"), ev(b, "workflow.completed"))
    proc = result[0]
    assert proc.returncode == 0, proc.stderr.decode()
    lines = [orjson.loads(line) for line in proc.stdout.splitlines()]
    kinds = [(m["kind"], m["workflow_id"]) for m in lines]
    assert ("end", a) in kinds and ("end", b) in kinds and ("log", b) in kinds, kinds
    assert all(m["cursor"] for m in lines), lines


async def test_a_refusal_is_one_line_and_exit_1_and_bad_arguments_exit_2(broker: Daemon) -> None:
    with trio.fail_after(20):
        bad = await trio.run_process(
            [*TAIL, "wf", "--level", "loud", "--url", broker.url], capture_stdout=True, capture_stderr=True, check=False
        )
        none = await trio.run_process([*TAIL, "--url", broker.url], capture_stderr=True, check=False)
        # A URL without its scheme could never connect: said at once, not retried for ever in silence.
        schemeless = broker.url.removeprefix("http://")
        no_scheme = await trio.run_process(
            [*TAIL, "wf", "--json", "--url", schemeless], capture_stderr=True, check=False
        )
    assert no_scheme.returncode == 2 and "url must be http://" in no_scheme.stderr.decode()
    err = bad.stderr.decode()
    assert bad.returncode == 1 and err.count("\n") == 1 and "invalid_argument" in err and "Traceback" not in err, err
    assert none.returncode == 2 and "give one workflow" in none.stderr.decode()
