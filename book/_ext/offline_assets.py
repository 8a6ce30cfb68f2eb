"""Serve the book's browser assets with the book, so that its pages render with no network.

By default Sphinx loads MathJax, and myst-nb loads RequireJS and the Jupyter widgets HTML manager, from
public CDNs: offline (CI, a reader on a closed network) the math stays raw TeX and the widgets stay
blank. ``_config.yml`` points ``mathjax_path`` and ``nb_ipywidgets_js`` at ``_static/vendor/...``
instead, and this extension copies those files there from ``node_modules/`` (installed by ``npm ci``
from ``package.json``) when an HTML build starts (before the pages are written, so that Sphinx can
stamp each script's URL with its checksum).

The files are copied into the output rather than kept in a ``_static`` folder because Jupyter Book adds
every ``.js`` file under the static paths to every page as a ``<script>``: MathJax's hundreds of
lazily loaded components would all be loaded, eagerly, on every page.

It also registers Sphinx 7.4's late inline scripts once (see ``_register_inline_scripts_once``), and
lets the environment variable ``BOOK_REPOSITORY_URL`` override ``repository.url`` of
``_config.yml`` (the publishing workflow sets it, so a fork's book launches the fork's notebooks).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

# destination under _static/vendor/  ->  (source under node_modules/, file patterns left out)
VENDOR: dict[str, tuple[str, tuple[str, ...]]] = {
    "mathjax": ("mathjax/es5", ()),
    "requirejs/require.js": ("requirejs/require.js", ()),
    "html-manager": ("@jupyter-widgets/html-manager/dist", ("*.map", "embed.js*", "libembed-amd.js", "*.md")),
}


def _node_modules(app: Sphinx) -> Path:
    return Path(app.confdir, app.config.offline_assets_node_modules)


def _set_repository_url(app: Sphinx, config) -> None:
    url = os.environ.get("BOOK_REPOSITORY_URL", "").strip()
    if url:
        config.html_theme_options["repository_url"] = url


def _local_assets(app: Sphinx) -> list[str]:
    """The asset paths the configuration asks for that are not URLs (so must be served with the book)."""
    paths = [app.config.mathjax_path, *app.config.nb_ipywidgets_js]
    return [p for p in paths if p and "://" not in p and not p.startswith("//")]


def _check_sources(app: Sphinx) -> None:
    root = _node_modules(app)
    missing = [src for src, _ in VENDOR.values() if not (root / src).exists()]
    if missing:
        raise ExtensionError(
            f"offline_assets: {', '.join(missing)} not found under {root}; run `npm ci` at the "
            "repository root first (`make book` does)"
        )
    static_dirs = [Path(app.confdir, d) for d in app.config.html_static_path]
    for asset in _local_assets(app):
        if asset.startswith("vendor/"):
            found = _source_of(root, asset[len("vendor/") :]) is not None
        else:
            found = any((d / asset).is_file() for d in static_dirs)
        if not found:
            raise ExtensionError(
                f"offline_assets: the configuration loads {asset!r}, which the book does not serve; serve it "
                f"under vendor/ (one of {sorted(VENDOR)}), put it in a static folder, or give a full URL"
            )


def _source_of(root: Path, relative: str) -> Path | None:
    """The file under node_modules that _static/vendor/<relative> is copied from, if it exists."""
    for dest, (src, _) in VENDOR.items():
        if relative == dest:
            candidate = root / src
        elif relative.startswith(dest + "/"):
            candidate = root / src / relative[len(dest) + 1 :]
        else:
            continue
        return candidate if candidate.is_file() else None
    return None


def _register_inline_scripts_once(app: Sphinx, builder) -> None:
    """Keep inline scripts that extensions add after ``Builder.init()`` from appearing twice per page.

    Sphinx 7.4 keeps such a script as given (file name ``None``) and, in ``prepare_writing``, adds it
    again from the registry under the file name ``''``; the two do not compare equal, so every page
    carries it twice. For sphinx-thebe's ``const THEBE_JS_URL = ...`` the second copy is a SyntaxError
    in the browser. Renaming the first copy to ``''`` before ``prepare_writing`` makes the second
    addition find it. (Later Sphinx versions do not duplicate; then this changes nothing.)
    """
    scripts = getattr(builder, "_js_files", None)
    if not scripts:
        return
    from sphinx.builders.html._assets import _JavaScript

    builder._js_files = [
        _JavaScript("", priority=js.priority, **js.attributes) if js.filename is None else js for js in scripts
    ]


def _copy_assets(app: Sphinx) -> None:
    if app.builder.format != "html":
        return
    _check_sources(app)
    root = _node_modules(app)
    vendor = Path(app.outdir, "_static", "vendor")
    for dest, (src, excluded) in VENDOR.items():
        source, target = root / src, vendor / dest
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*excluded))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    logger.info("offline_assets: served MathJax, RequireJS and the widget manager from %s", vendor)


def setup(app: Sphinx) -> dict:
    app.add_config_value("offline_assets_node_modules", "node_modules", "html")
    app.connect("config-inited", _set_repository_url)
    app.connect("builder-inited", _copy_assets)
    app.connect("write-started", _register_inline_scripts_once)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1.0"}
