"""Check the built docs in a real browser with the network cut off.

Serves ``docs/_build/html`` on 127.0.0.1, opens every page in headless Chromium
with every request to another host refused, and checks that

* no page asks for anything outside the site (a CDN, fonts, analytics);
* mathematics is typeset by the local MathJax (``mjx-container`` elements appear),
  without TeX errors;
* on tutorial pages with saved widget state, the widgets render from the local
  html-manager: widget elements appear, and every widget image has a real size;
* no page logs a JavaScript error.

Usage (after ``make docs``)::

    .venv/bin/python docs/check_offline.py [docs/_build/html] [--screenshots DIR]

Needs Playwright for Python and Debian's chromium (``make test`` installs both).
Exits with status 1 and a list of problems if any check fails.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import sys
import threading
from pathlib import Path

WIDGET_STATE = 'script[type="application/vnd.jupyter.widget-state+json"]'
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """A quiet static file server for ``root`` on a free local port."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def check_page(page, url: str, name: str, problems: list[str], screenshots: Path | None) -> str:
    """Load one page and check its maths and widgets; returns a one-line summary."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(url, wait_until="load")
    notes = []
    if page.locator(".math").count():
        try:
            page.wait_for_selector("mjx-container", timeout=20_000)
            page.wait_for_timeout(300)
            notes.append(f"{page.locator('mjx-container').count()} formulas typeset")
            for formula in page.locator("mjx-merror").all():
                problems.append(f"{name}: a TeX error in a formula: {formula.get_attribute('data-mjx-error')}")
        except Exception:
            problems.append(f"{name}: mathematics was not typeset by the local MathJax")
    if page.locator(WIDGET_STATE).count():
        try:
            page.wait_for_selector(".jupyter-widgets", timeout=20_000)
            page.wait_for_timeout(500)
            sizes = page.eval_on_selector_all(
                ".jupyter-widgets img", "images => images.map(i => [i.naturalWidth, i.naturalHeight])")
            if not sizes or any(w == 0 or h == 0 for w, h in sizes):
                problems.append(f"{name}: a widget image did not render (sizes {sizes})")
            bars = page.locator(".jupyter-widgets .progress-bar, .jupyter-widgets .widget-progress").count()
            notes.append(f"{page.locator('.jupyter-widgets').count()} widget elements, "
                         f"{len(sizes)} widget images {sizes}, {bars} progress bars")
        except Exception:
            problems.append(f"{name}: the saved widget state did not render")
    if screenshots is not None:
        page.screenshot(path=str(screenshots / (name.replace("/", "_") + ".png")), full_page=True)
    problems.extend(f"{name}: JavaScript error: {error}" for error in errors)
    return f"{name}: " + ("; ".join(notes) if notes else "loaded")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).parent / "_build" / "html"))
    parser.add_argument("--screenshots", type=Path, default=None)
    args = parser.parse_args()
    root = Path(args.root).resolve()
    if not (root / "index.html").exists():
        print(f"no built docs at {root}; run `make docs` first", file=sys.stderr)
        return 1
    if args.screenshots is not None:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    pages = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html")
                   if not p.relative_to(root).as_posix().startswith("_"))
    server, base = serve(root)
    problems: list[str] = []
    outside: list[str] = []
    try:
        with sync_playwright() as playwright:
            executable = shutil.which("chromium")
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS) \
                if executable else playwright.chromium.launch()
            context = browser.new_context()

            def only_local(route):
                if route.request.url.startswith(base) or route.request.url.startswith("data:"):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()

            context.route("**/*", only_local)
            for name in pages:
                page = context.new_page()
                print(check_page(page, base + name, name, problems, args.screenshots))
                page.close()
            browser.close()
    finally:
        server.shutdown()
    problems.extend(f"request outside the site refused: {url}" for url in sorted(set(outside)))
    if problems:
        print("\n".join(["", "PROBLEMS:", *problems]), file=sys.stderr)
        return 1
    print(f"OK: {len(pages)} pages, no request left the site")
    return 0


if __name__ == "__main__":
    sys.exit(main())
