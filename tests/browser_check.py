"""Browser check of the built book: every page renders offline, as a reader's browser shows it.

Run by ``make browser-check`` (part of ``make test``) after ``make book``; by hand:
``.venv/bin/pytest tests/browser_check.py``. (The file name keeps it out of ``make unit``: it needs the
built book.) It serves ``_build/html`` on 127.0.0.1 and opens every page in Debian's chromium, driven by
Playwright through ``executable_path`` (Playwright's own browser downloads are never used). Every
request that leaves 127.0.0.1 is blocked and reported, so the result is the same with or without a
network. For each page it checks that

- the console shows no errors, no script throws, and no request fails or answers 4xx/5xx;
- math is rendered: each Sphinx math element holds MathJax output, MathJax reports no TeX error, and
  no raw ``$$``, ``\\(``, ``\\[`` is left in the text outside code;
- every image has loaded (``naturalWidth > 0``);
- every embedded widget view has been rendered by the widget manager;
- every link inside the site points to a file that exists, and its ``#fragment`` to an id on that page.

Environment: ``CHROMIUM`` (default ``/usr/bin/chromium``), ``BOOK_HTML`` (default ``_build/html``),
``BOOK_SCREENSHOTS`` (a folder for a full-page screenshot of each page, to look at what was checked).
Without a browser, Playwright or a built book, the module is skipped and says why.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("BOOK_HTML", ROOT / "_build" / "html")).resolve()
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = os.environ.get("BOOK_SCREENSHOTS", "")  # a folder: save a full-page screenshot of each page
# What chromium needs on a closed network (the fresh profile is launch_persistent_context's user_data_dir).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_TIMEOUT_MS = 60_000
REFRESH = re.compile(r'<meta[^>]+http-equiv="refresh"[^>]+content="\d+;\s*url=([^"]+)"', re.IGNORECASE)
EXTRA_PAGES = ["index.html", "genindex.html", "py-modindex.html", "search.html"]


def _skip_reason() -> str | None:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return (
            f"browser check skipped: no chromium at {CHROMIUM} (install Debian's: `apt-get install chromium`, "
            "or point CHROMIUM at one)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "browser check skipped: the playwright Python package is not installed (requirements-dev.txt)"
    if not (SITE / "searchindex.js").is_file():
        return f"browser check skipped: no built book at {SITE}; run `make book` first"
    return None


_reason = _skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)


def _pages() -> list[str]:
    """The pages of the current build: Sphinx's list of documents (in searchindex.js) and its extra
    pages. Listing _build/html would also pick up pages that an earlier build left behind."""
    index = (SITE / "searchindex.js").read_text(encoding="utf-8")
    match = re.search(r'"docnames":\s*(\[[^\]]*\])', index)
    assert match, f"no document list in {SITE / 'searchindex.js'}"
    docs = [f"{name}.html" for name in json.loads(match.group(1))]
    extra = [name for name in EXTRA_PAGES if (SITE / name).is_file()]
    return sorted(docs) + extra


PAGES = _pages()

# Runs in the page after `load`: waits for MathJax and the widget manager, then reports what it sees.
INSPECT_JS = r"""
async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
    await window.MathJax.startup.promise;
  }
  // Widget views: the manager replaces each view script's placeholder with a rendered widget.
  const views = () => Array.from(document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]'));
  const rendered = () => views().filter((s) => s.parentElement &&
      s.parentElement.querySelector(".jupyter-widgets, .widget-container, .lm-Widget")).length;
  for (let i = 0; i < 100 && rendered() < views().length; i++) await sleep(100);
  // Images: load lazy ones, then wait for every image to settle.
  for (const img of document.images) { img.loading = "eager"; }
  await Promise.all(Array.from(document.images).filter((i) => !i.complete).map(
      (i) => new Promise((r) => { i.addEventListener("load", r); i.addEventListener("error", r); setTimeout(r, 10000); })));
  // Text outside code, scripts and MathJax output: raw TeX left there was not typeset.
  const skip = new Set(["PRE", "CODE", "SCRIPT", "STYLE", "TEXTAREA", "MJX-CONTAINER", "MJX-ASSISTIVE-MML"]);
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      for (let el = node.parentElement; el; el = el.parentElement) if (skip.has(el.tagName)) return NodeFilter.FILTER_REJECT;
      return NodeFilter.FILTER_ACCEPT;
    },
  });
  const rawTex = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const m = n.textContent.match(/\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{/);
    if (m) rawTex.push(n.textContent.trim().slice(0, 80));
  }
  const mathElems = Array.from(document.querySelectorAll(".math"));
  return {
    mathElements: mathElems.length,
    mathUnrendered: mathElems.filter((e) => !e.querySelector("mjx-container")).map((e) => e.textContent.trim().slice(0, 80)),
    mathjaxOutputs: document.querySelectorAll("mjx-container").length,
    mathjaxErrors: Array.from(document.querySelectorAll("mjx-merror")).map((e) => e.getAttribute("data-mjx-error") || e.textContent),
    rawTex: rawTex,
    images: Array.from(document.images).map((i) => ({ src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0 })),
    widgetViews: views().length,
    widgetsRendered: rendered(),
    links: Array.from(document.querySelectorAll("a[href]")).map((a) => a.getAttribute("href")),
    ids: Array.from(document.querySelectorAll("[id]")).map((e) => e.id),
  };
}
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the signature is http.server's
        pass


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="book-chromium-")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        external: list[str] = []

        def route(r):
            if r.request.url.startswith(server) or not r.request.url.startswith(("http:", "https:", "ws:", "wss:")):
                r.continue_()
            else:
                external.append(r.request.url)
                r.abort("blockedbyclient")

        context.route("**/*", route)
        yield context, external
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def site_ids():
    """Ids found on each visited page, for the fragment check that runs after every page."""
    return {}


@pytest.fixture(scope="module")
def site_links():
    """(page, href) of every link inside the site with a fragment, for the fragment check."""
    return []


def _local_target(page_url: str, href: str, server: str) -> tuple[str, str] | None:
    """(path of the file under SITE, fragment) for a link inside the site; None for other links."""
    absolute = urljoin(page_url, href)
    if not absolute.startswith(server):
        return None
    url, fragment = urldefrag(absolute)
    path = unquote(urlsplit(url).path).lstrip("/")
    if path == "" or path.endswith("/"):
        path += "index.html"
    return path, fragment


@pytest.mark.timeout(180)
@pytest.mark.parametrize("rel", PAGES)
def test_page_renders_offline(rel, server, browser, site_ids, site_links):
    context, external = browser
    url = urljoin(server, rel)
    redirect = REFRESH.search((SITE / rel).read_text(encoding="utf-8"))
    if redirect:  # a redirect page (the top-level index.html): its target must exist
        target = _local_target(url, redirect.group(1), server)
        assert target and (SITE / target[0]).is_file(), f"{rel} redirects to {redirect.group(1)}, which does not exist"
        return
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"uncaught exception: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    external.clear()
    try:
        page.goto(url, wait_until="load", timeout=PAGE_TIMEOUT_MS)
        seen = page.evaluate(INSPECT_JS)
        if SCREENSHOTS:
            shot = Path(SCREENSHOTS, rel.replace("/", "__") + ".png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()

    problems += [f"request to an outside host (blocked): {u}" for u in external]
    problems += [f"math left as TeX: {t!r}" for t in seen["mathUnrendered"]]
    problems += [f"raw TeX in the text: {t!r}" for t in seen["rawTex"]]
    problems += [f"MathJax error: {t!r}" for t in seen["mathjaxErrors"]]
    problems += [f"image did not load: {i['src']}" for i in seen["images"] if not i["ok"]]
    if seen["widgetsRendered"] < seen["widgetViews"]:
        problems.append(f"only {seen['widgetsRendered']} of {seen['widgetViews']} widget views rendered")
    site_ids[rel] = set(seen["ids"])
    for href in seen["links"]:
        target = _local_target(url, href, server)
        if target is None:
            continue
        path, fragment = target
        if not (SITE / path).is_file():
            problems.append(f"broken link: {href} -> {path} does not exist")
        elif fragment:
            site_links.append((rel, href, path, fragment))
    assert not problems, f"{rel}: {len(problems)} problem(s):\n  " + "\n  ".join(problems)


def test_link_fragments_name_ids_that_exist(site_ids, site_links):
    if not site_ids:
        pytest.skip("no page was inspected (run the page tests in the same session)")
    missing = [
        f"{rel}: {href} (no id {fragment!r} on {path})"
        for rel, href, path, fragment in site_links
        if path in site_ids and fragment not in site_ids[path]
    ]
    assert not missing, "links to missing anchors:\n  " + "\n  ".join(missing)


def test_the_book_has_typeset_math_and_figures():
    """Guards the checks above against passing vacuously (e.g. if no page had math any more)."""
    html = {rel: (SITE / rel).read_text(encoding="utf-8") for rel in PAGES}
    assert any('class="math' in text for text in html.values()), "no page of the book has math"
    assert any("<img" in text and "_images/" in text for text in html.values()), "no page of the book has a figure"
