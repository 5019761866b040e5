"""`gaussreg tui --web`: the dashboard in a browser. textual-serve starts `gaussreg tui`
(unchanged, with the same store and manifest) for each browser tab and relays its screen
and keys over a websocket. It has no login: whoever reaches the port can launch and cancel
runs, so it listens on localhost unless another host is asked for."""

from __future__ import annotations

import ipaddress
import shlex
import sys
from pathlib import Path

from textual_serve.server import Server

LOCAL_HOSTS = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_local(host: str) -> bool:
    """Whether only this machine can reach `host` (a loopback name or address)."""
    if host.lower() in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tui_command(store: Path, manifest: Path) -> str:
    """The shell command each tab runs: this Python's `gaussreg tui`, so the served app is the
    one installed beside the server whatever PATH holds."""
    return shlex.join([sys.executable, "-m", "gaussreg", "tui", "--store", str(store), "--manifest", str(manifest)])


class DashboardServer(Server):
    """textual-serve's server, whose page points its websocket at the address the browser
    used: textual-serve's own would be built from --host, and 0.0.0.0 (or a name the
    browser does not know) reaches nothing from another machine."""

    async def handle_index(self, request):
        self.public_url = str(request.url.origin())  # no await before the page is made: no other request between
        return await super().handle_index(request)


def serve(store: Path, manifest: Path, host: str, port: int) -> None:
    """Serve the dashboard until interrupted; OSError when the port cannot be listened on."""
    DashboardServer(tui_command(store, manifest), host=host, port=port, title="gaussreg tui").serve()
