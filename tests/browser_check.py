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
- every link inside the site points to a file that exists, and its ``#fragment`` to an id on that page;
- no Markdown table is left as pipe text (a ``| --- |`` delimiter row in prose or in a cell's output: a
  table printed with ``display(Markdown(...))`` that a renderer without tables passed through);
- no image is wider than its column (its natural width, or the width it asks for, above the width of
  the block that holds it: the browser shrinks it, and its lettering with it);
- the page names an icon (``<link rel="icon">``) that exists: without one, browsers ask for
  ``/favicon.ico`` and log a 404 in the console (Playwright does not see that request);
- the page text (prose, code, outputs, folded cells included) has none of the words about how the
  project is run (``PROCESS_PHRASES``): a reader has none of that context.

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
ICON = re.compile(r'<link[^>]+rel="(?:shortcut )?icon"[^>]+href="([^"]+)"', re.IGNORECASE)
REFRESH = re.compile(r'<meta[^>]+http-equiv="refresh"[^>]+content="\d+;\s*url=([^"]+)"', re.IGNORECASE)
EXTRA_PAGES = ["index.html", "genindex.html", "py-modindex.html", "search.html"]
# Words about how the project is run, which mean nothing to a reader of the book (case-insensitive; "'"
# also matches the typographic apostrophe). Each is a phrase precise enough not to catch ordinary English.
_APOSTROPHE = "['\u2019]"
PROCESS_PHRASES = {
    "the original request(s)": r"\boriginal requests?\b",
    "the issue's ...": rf"\bthe issue{_APOSTROPHE}s\b",
    "the project's target(s)": rf"\bproject{_APOSTROPHE}s targets?\b",
    "seed configuration": r"\bseed configuration\b",
    "the SPEC / SPEC.md": r"\bthe SPEC\b|\bSPEC\.md\b",
    "[met] / [not met]": r"\[(?:not )?met\]|^\s*(?:not )?met\s*:",
    "PYTHONPATH": r"\bPYTHONPATH\b",
    "git on the GPU machine": r"\bgit (?:was|is) not available\b|\bGPU machine\b",
    "lent machines": r"\blent (?:machines?|GPUs?|devices?)\b",
    "device time (a budget)": r"\bdevice time\b",
    "sessions": r"\bsessions?\b",
    "CEO": r"\bCEO\b",
}
_PROCESS = {label: re.compile(rx, re.IGNORECASE | re.MULTILINE) for label, rx in PROCESS_PHRASES.items()}
# The delimiter row of a Markdown table, | --- | --- | (with optional colons), in text that is not code.
# Two cells at least; "---" may have been typeset as an em dash, "--" as an en dash.
_DELIMITER_CELL = r"\s*:?(?:-{3,}|[\u2013\u2014][-\u2013\u2014]*):?\s*"
PIPE_TABLE = re.compile(rf"\|{_DELIMITER_CELL}\|{_DELIMITER_CELL}\|")


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
      (i) => new Promise((r) => {
        i.addEventListener("load", r);
        i.addEventListener("error", r);
        setTimeout(r, 10000);
      })));
  // Text outside code, scripts and MathJax output: raw TeX left there was not typeset.
  const skip = new Set(["PRE", "CODE", "SCRIPT", "STYLE", "TEXTAREA", "MJX-CONTAINER", "MJX-ASSISTIVE-MML"]);
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      for (let el = node.parentElement; el; el = el.parentElement) {
        if (skip.has(el.tagName)) return NodeFilter.FILTER_REJECT;
      }
      return NodeFilter.FILTER_ACCEPT;
    },
  });
  const rawTex = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const m = n.textContent.match(/\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{/);
    if (m) rawTex.push(n.textContent.trim().slice(0, 80));
  }
  // Text a reader sees as prose or as a cell's output (not a cell's source, not code in the prose):
  // a Markdown table delimiter row there is a table that was not rendered.
  const inOutput = (el) => el.closest(".cell_output, .output");
  const proseWalker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      const el = node.parentElement;
      if (!el || el.closest("script, style, textarea, .cell_input")) return NodeFilter.FILTER_REJECT;
      if (!inOutput(el) && el.closest("pre, code, .highlight")) return NodeFilter.FILTER_REJECT;
      return NodeFilter.FILTER_ACCEPT;
    },
  });
  const proseBlocks = new Set();
  const blockTags = "p, pre, li, td, th, dt, dd, blockquote, h1, h2, h3, h4, h5, h6";
  for (let n = proseWalker.nextNode(); n; n = proseWalker.nextNode()) {
    if (n.textContent.trim()) proseBlocks.add(n.parentElement.closest(blockTags) || n.parentElement);
  }
  const proseText = Array.from(proseBlocks).map((b) => b.textContent);
  // Every text of the page, folded cells included (their source is in the page, only hidden).
  const allWalker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      return node.parentElement && node.parentElement.closest("script, style, template")
        ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT;
    },
  });
  const allText = [];
  for (let n = allWalker.nextNode(); n; n = allWalker.nextNode()) allText.push(n.textContent);
  // Images: the width each asks for (its width attribute, else its natural width) against the width
  // of the block that holds it. Hidden images (the launch buttons' logos in a closed menu) are skipped.
  const wideImages = [];
  for (const img of document.images) {
    const shown = img.getBoundingClientRect().width;
    if (!shown || !img.naturalWidth) continue;
    const asked = img.getAttribute("width") && !img.getAttribute("width").endsWith("%")
      ? parseFloat(img.getAttribute("width")) : img.naturalWidth;
    let box = img.parentElement;
    while (box && getComputedStyle(box).display.startsWith("inline")) box = box.parentElement;
    if (!box) continue;
    const cs = getComputedStyle(box);
    const column = box.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
    if (asked > column + 1) {
      wideImages.push({ src: (img.currentSrc || img.src).split("/").pop().slice(0, 40), asked: asked,
                        column: Math.round(column) });
    }
  }
  const mathElems = Array.from(document.querySelectorAll(".math"));
  return {
    mathElements: mathElems.length,
    mathUnrendered: mathElems.filter((e) => !e.querySelector("mjx-container"))
      .map((e) => e.textContent.trim().slice(0, 80)),
    mathjaxOutputs: document.querySelectorAll("mjx-container").length,
    mathjaxErrors: Array.from(document.querySelectorAll("mjx-merror"))
      .map((e) => e.getAttribute("data-mjx-error") || e.textContent),
    rawTex: rawTex,
    images: Array.from(document.images)
      .map((i) => ({ src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0 })),
    widgetViews: views().length,
    widgetsRendered: rendered(),
    links: Array.from(document.querySelectorAll("a[href]")).map((a) => a.getAttribute("href")),
    ids: Array.from(document.querySelectorAll("[id]")).map((e) => e.id),
    proseText: proseText,
    allText: allText.join(""),
    wideImages: wideImages,
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
    icon = ICON.search((SITE / rel).read_text(encoding="utf-8"))
    if not icon:
        problems.append('no <link rel="icon">: the browser asks for /favicon.ico, which is not there (a 404)')
    else:
        target = _local_target(url, icon.group(1), server)
        if target and not (SITE / target[0]).is_file():
            problems.append(f"the page's icon {icon.group(1)} does not exist")
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
    for block in seen["proseText"]:
        match = PIPE_TABLE.search(block)
        if match:
            start = max(0, match.start() - 60)
            problems.append(f"Markdown table left as pipe text: {block[start : match.end() + 20].strip()!r}")
    for img in seen["wideImages"]:
        problems.append(
            f"image wider than its column: {img['src']} is {img['asked']} px wide, the column {img['column']} px"
        )
    for label, pattern in _PROCESS.items():
        for match in pattern.finditer(seen["allText"]):
            context = seen["allText"][max(0, match.start() - 50) : match.end() + 30].replace("\n", " ")
            problems.append(f"words about how the project is run ({label}): {context.strip()!r}")
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
    assert any("<table" in text and "cell_output" in text for text in html.values()), (
        "no cell of the book outputs a table (the pipe-table check would pass vacuously)"
    )
