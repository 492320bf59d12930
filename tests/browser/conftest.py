"""Fixtures for tests that drive a real headless Chromium (Debian's) through Playwright.

Prerequisites are installed by ``tools/install-test-deps.sh`` (``make test`` runs it):
Debian's chromium at /usr/bin/chromium and the npm-packed
``@jupyter-widgets/html-manager`` under .cache/npm/html-manager/. A missing one is a
failure that says how to install it, never a skip: CI installs everything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
HTML_MANAGER_DIST = ROOT / ".cache" / "npm" / "html-manager" / "dist"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
INSTALL_HINT = "run `tools/install-test-deps.sh .venv/bin/python` (make test does)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    if not (CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Debian's chromium is missing at {CHROMIUM}; {INSTALL_HINT}", pytrace=False)
    return CHROMIUM


@pytest.fixture(scope="session")
def embed_js() -> Path:
    """dist/embed.js of @jupyter-widgets/html-manager (renders saved widget state, no require.js)."""
    path = HTML_MANAGER_DIST / "embed.js"
    if not path.is_file() or path.stat().st_size < 100_000:
        pytest.fail(f"the widget JavaScript {path} is missing; {INSTALL_HINT}", pytrace=False)
    return path


@pytest.fixture
def browser(chromium_path: Path) -> Iterator[object]:
    # Per test, not per session: a running sync Playwright holds an asyncio loop in the main
    # thread, which breaks later tests that use asyncio.run or start their own Playwright.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # what the page threw, for assertion messages
    try:
        yield page
    finally:
        context.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _this_python_kernel() -> None:
    """Fail unless the python3 kernel JupyterLab will start is this environment's python."""
    spec = Path(sys.prefix) / "share" / "jupyter" / "kernels" / "python3" / "kernel.json"
    hint = (f"install it with `{sys.executable} -m ipykernel install --sys-prefix --name python3` "
            "(the Makefile does)")
    if not spec.is_file():
        pytest.fail(f"no python3 kernel spec at {spec}; {hint}", pytrace=False)
    command = json.loads(spec.read_text())["argv"][0]
    if command not in ("python", "python3") and Path(command).resolve() != Path(sys.executable).resolve():
        pytest.fail(f"the python3 kernel at {spec} runs {command}, not {sys.executable}; {hint}", pytrace=False)


class JupyterLab:
    """A JupyterLab server on 127.0.0.1 without a token, serving ``root``."""

    def __init__(self, root: Path, port: int, process: subprocess.Popen, log: Path) -> None:
        self.root, self.port, self.process, self.log = root, port, process, log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def jupyterlab(tmp_path: Path) -> Iterator[JupyterLab]:
    _this_python_kernel()
    root, home = tmp_path / "notebooks", tmp_path / "jupyter"
    root.mkdir()
    # private config, data and runtime dirs: no user settings, workspaces or kernels leak in;
    # JUPYTER_PATH puts this environment's kernel spec first
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter"),
           "JUPYTER_PLATFORM_DIRS": "1"}
    port = free_port()
    log = tmp_path / "jupyterlab.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--allow-root", "--ServerApp.token=", "--ServerApp.password=",
               "--LabApp.expose_app_in_browser=True", f"--ServerApp.root_dir={root}",
               "--ServerApp.port_retries=0", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    server = JupyterLab(root, port, process, log)
    try:
        _wait_until_serving(server, timeout=60)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_serving(server: JupyterLab, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.process.returncode}:\n{server.log_tail()}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{server.url}/api/status", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"JupyterLab did not answer within {timeout} s:\n{server.log_tail()}", pytrace=False)
