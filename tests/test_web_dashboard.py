"""`gaussreg tui --web`: the dashboard served by textual-serve, driven in a real headless
Chromium over the DevTools protocol.

The browser is Debian's chromium. Where it is missing, the test installs it (apt-get, as
root: CI runs as root and reaches Debian's packages; nothing pip installs carries a
browser, and Playwright's browser download needs a host these machines cannot reach).
The page draws the terminal on a canvas, so the test reads what it shows from the page's
own xterm.js terminal (its buffer holds every cell drawn), which a script added before the
page loads hands to the test.
"""
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import psutil
import pytest
from conftest import apt_install, cli, gaussreg, python_env, wait_for
from factories import dashboard_run

from gaussreg.runs.store import Store, short_id

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  # without these Chromium keeps calling hosts this closed network refuses
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900"]
# the page's terminal object, caught as the page's code stores it (`this.terminal = new Terminal`)
CATCH_TERMINAL = """Object.defineProperty(Object.prototype, 'terminal', {configurable: true, set(v) {
  Object.defineProperty(this, 'terminal', {value: v, writable: true, configurable: true, enumerable: true});
  window.__terminal = v; }});"""
SCREEN = """(() => { const t = window.__terminal; if (!t) return '';
  const b = t.buffer.active, rows = [];
  for (let i = 0; i < t.rows; i++) { const line = b.getLine(b.viewportY + i); rows.push(line ? line.translateToString(true) : ''); }
  return rows.join('\\n'); })()"""
KEYS = {"?": ("Slash", 191), "s": ("KeyS", 83), "q": ("KeyQ", 81), "Escape": ("Escape", 27)}


def chromium() -> str:
    """Debian's chromium, installed here when missing (once, whichever test worker asks first)."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("the browser test needs Debian's chromium: apt-get install -y chromium (as root)")
    r = apt_install("chromium")  # one test worker at a time; a second finds it installed
    assert r.returncode == 0 and shutil.which("chromium"), f"apt-get could not install chromium: {r.stderr[-2000:]}"
    return shutil.which("chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    """The page at `url`, or None while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None


class Browser:
    """A headless Chromium with one page, driven over the DevTools protocol (aiohttp's
    websocket client, which textual-serve brings), one call at a time."""

    def __init__(self, exe: str, profile):
        self.process = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        port = wait_for(lambda: port_file.exists() and port_file.read_text().split()[:1], 60,
                        "Chromium's DevTools port")[0]
        page = next(t for t in json.loads(get(f"http://127.0.0.1:{port}/json/list")) if t["type"] == "page")
        self.loop = asyncio.new_event_loop()
        self.session, self.ws = self.loop.run_until_complete(self._connect(page["webSocketDebuggerUrl"]))
        self.calls = 0

    @staticmethod
    async def _connect(url):
        import aiohttp  # textual-serve's own dependency: the web extra brings it
        session = aiohttp.ClientSession()
        return session, await session.ws_connect(url, max_msg_size=0)

    async def _call(self, method, params):
        self.calls += 1
        await self.ws.send_json({"id": self.calls, "method": method, "params": params})
        async for msg in self.ws:
            reply = json.loads(msg.data)
            if reply.get("id") == self.calls:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
        raise AssertionError(f"Chromium closed the DevTools connection during {method}")

    def call(self, method, **params):
        return self.loop.run_until_complete(asyncio.wait_for(self._call(method, params), 30))

    def open(self, url):
        self.call("Page.enable")
        self.call("Page.addScriptToEvaluateOnNewDocument", source=CATCH_TERMINAL)
        self.call("Page.navigate", url=url)

    def eval(self, expression):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screen(self) -> str:
        return self.eval(SCREEN) or ""

    def press(self, key):
        code, vk = KEYS[key]
        text = {"text": key, "unmodifiedText": key} if len(key) == 1 else {}
        self.call("Input.dispatchKeyEvent", type="keyDown", key=key, code=code, windowsVirtualKeyCode=vk, **text)
        self.call("Input.dispatchKeyEvent", type="keyUp", key=key, code=code, windowsVirtualKeyCode=vk)

    def close(self):
        try:
            self.loop.run_until_complete(self.ws.close())
            self.loop.run_until_complete(self.session.close())
            self.loop.close()
        finally:
            self.process.terminate()
            self.process.wait(30)


def served(store, *args, env=None):
    """`gaussreg tui --web ARGS` on a free port, once it answers; (process, port)."""
    port = free_port()
    proc = subprocess.Popen(cli("tui", "--web", "--store", store, "--manifest", store / "none.toml", "--port", port,
                                *args), env=env or python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: proc.poll() is not None or get(f"http://127.0.0.1:{port}/"), 120, "the dashboard's web server")
    assert proc.poll() is None, proc.communicate()
    return proc, port


def command_line(p: psutil.Process) -> list:
    try:
        return p.cmdline()
    except psutil.Error:  # gone (or a zombie) meanwhile
        return []


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop(proc):
    """The server and what it started (the apps of pages still open)."""
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()
    out, err = proc.communicate(timeout=60)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()  # one a page left running (it is gone when the page closed first)
    return out, err


@pytest.mark.process
def test_the_dashboard_in_a_browser_shows_the_runs_and_takes_keys(tmp_path):
    st = Store(tmp_path / "runs")
    runs = [dashboard_run(st, "baseline", 0.90, 0.50), dashboard_run(st, "augment", 0.905, 0.70, sigma=0.25, folds=2),
            dashboard_run(st, "regularizer", 0.92, 0.78, sigma=0.5, alpha=1.0),
            dashboard_run(st, "regularizer", state="failed", sigma=5.0, alpha=1.0)]
    exe = chromium()
    server, port = served(st.root)
    browser = None
    try:
        browser = Browser(exe, tmp_path / "profile")
        browser.open(f"http://localhost:{port}/")
        # the runs table of the fixture store, as `gaussreg tui` draws it, in the page
        ids = {short_id(r.id) for r in runs}
        screen = wait_for(lambda: (lambda s: "4 runs (4 shown)" in s and all(i in s for i in ids) and s)(
            browser.screen()), 120, "the runs table in the page")
        rows = {w[0]: w for w in ([c for c in line.split() if c.isascii()] for line in screen.splitlines())
                if w[:1] and w[0] in ids}
        assert set(rows) == ids, screen
        assert {rows[short_id(r.id)][1] for r in runs} == {"baseline", "augment", "regularizer"}
        assert rows[short_id(runs[2].id)][4:7] == ["0", "completed", "92.00"]  # seed, state, test accuracy
        assert "failed" in rows[short_id(runs[3].id)]
        assert "Runs screen" not in screen
        # a key typed in the page reaches the app: ? opens the help screen, escape closes it
        browser.call("Runtime.evaluate", expression="window.__terminal.focus()")
        browser.press("?")
        wait_for(lambda: "Runs screen" in browser.screen(), 60, "the help screen after ?")
        browser.press("Escape")
        wait_for(lambda: "Runs screen" not in browser.screen(), 60, "the runs screen after escape")
        # q quits the app: its process ends and the page says so
        app = wait_for(lambda: [p for p in psutil.Process(server.pid).children(recursive=True)
                                if "tui" in command_line(p)], 30, "the app's process")
        browser.press("q")
        wait_for(lambda: browser.eval("document.body.classList.contains('-closed')"), 60, "the page's 'Session ended'")
        wait_for(lambda: not any(map(alive, app)), 60, "the app's process to end")
    finally:
        if browser is not None:
            browser.close()
        out, err = stop(server)
    assert f"on http://localhost:{port}" in out and "warning" not in err


@pytest.mark.process
def test_web_listens_on_localhost_unless_asked_and_then_warns(tmp_path):
    st = Store(tmp_path / "runs")
    dashboard_run(st, "baseline", 0.90, 0.50)
    server, port = served(st.root)
    try:
        listening = {c.laddr.ip for c in psutil.Process(server.pid).net_connections("inet") if c.status == "LISTEN"}
        assert listening and all(ip in ("127.0.0.1", "::1") for ip in listening), listening
        # a port already taken: one sentence
        second = subprocess.run(cli("tui", "--web", "--store", st.root, "--port", port), capture_output=True,
                                text=True, env=python_env(), timeout=120)
        assert second.returncode == 2
        assert f"error: cannot listen on localhost:{port}: " in second.stderr and "Traceback" not in second.stderr
    finally:
        out, err = stop(server)
    assert "warning" not in err and "Traceback" not in err  # SIGTERM stops it quietly
    server, port = served(st.root, "--host", "0.0.0.0")
    try:
        listening = {c.laddr.ip for c in psutil.Process(server.pid).net_connections("inet") if c.status == "LISTEN"}
        assert listening == {"0.0.0.0"}
        # the page sends the browser's websocket to the address the browser used, not to 0.0.0.0
        assert f'data-session-websocket-url="ws://127.0.0.1:{port}/ws"' in get(f"http://127.0.0.1:{port}/")
    finally:
        out, err = stop(server)
    assert f"warning: listening on 0.0.0.0: anyone who can reach port {port} there can launch and cancel runs" \
           in " ".join(err.split())


def test_web_needs_its_extra_and_its_flags(tmp_path, monkeypatch):
    r = gaussreg("tui", "--store", tmp_path, "--port", "8001")
    assert r.exit_code == 2 and "--port and --host are for --web" in r.stderr
    r = gaussreg("tui", "--web", "--store", tmp_path, "--port", "70000")
    assert r.exit_code == 2 and "--port must be from 1 to 65535, not 70000" in r.stderr
    monkeypatch.delitem(sys.modules, "gaussreg.views.web_dashboard", raising=False)
    for name in [m for m in sys.modules if m == "textual_serve" or m.startswith("textual_serve.")] + ["textual_serve"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it was never installed
    r = gaussreg("tui", "--web", "--store", tmp_path)
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --web needs textual-serve: pip install -e '.[web]' in the clone"
