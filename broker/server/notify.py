"""systemd's notify protocol, spoken over `$NOTIFY_SOCKET` (sd_notify(3)).

A datagram of `KEY=value` lines to the AF_UNIX socket systemd names in
`$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). The
broker sends `READY=1` once ingest, HTTP and the store's restore are up,
`STATUS=…` lines as it goes, `WATCHDOG=1` while its data path is proven
alive (server/probe.py), and `STOPPING=1` when a graceful stop begins.
Without `$NOTIFY_SOCKET` (not run by systemd) every call does nothing.
A few lines of socket code: no package does it better.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("broker")


def socket_address(value: str) -> str:
    """The AF_UNIX address of a `$NOTIFY_SOCKET` value ('@' = abstract)."""
    return "\0" + value[1:] if value.startswith("@") else value


def message(**fields: str | int) -> bytes:
    """`READY=1\\nSTATUS=…`: one field per line (newlines inside a value
    would start a new field, so they become spaces)."""
    return "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()).encode()


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # systemd restarts the unit if no WATCHDOG=1 comes within this.
        self.watchdog: float | None = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._sock: socket.socket | None = None
        self._failed = False
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """Send one notification; False if it could not go (logged once)."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto(message(**fields), socket_address(self.address))
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("sd_notify to %s failed: %s (systemd will not hear from the broker)", self.address, exc)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
