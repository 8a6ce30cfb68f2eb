"""Where the book's chapters find the repository's benchmark harness and its recorded results.

The chapters that measure the optimizer (memory, comparison, speed, scaling out) import the harness in
``benchmarks/`` and read the records in ``benchmarks/results/``. Neither ships with the installed
package. A notebook opened inside a clone of the repository (or on Binder, which clones it) finds them
in a folder above its own; a notebook opened on its own (Colab, a downloaded ``.ipynb``) can ask
:func:`repository` to download a copy of the repository, and says what it cannot show when that fails
(no network).

Nothing here is needed to train with :class:`fusedbun.FusionOptimizer`.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

__all__ = ["REPOSITORY_URL", "find_repository", "fetch_repository", "repository", "unavailable"]

#: The repository of the book and the package (the launch buttons open its notebooks).
REPOSITORY_URL = "https://github.com/fusedbun/fusedbun"


def _is_repository(folder: Path) -> bool:
    return (folder / "benchmarks" / "compare.py").is_file() and (folder / "benchmarks" / "results").is_dir()


def find_repository(start: str | os.PathLike | None = None) -> Path | None:
    """The checkout that holds ``benchmarks/``, or ``None``.

    Looked for, in order: the folder named by the environment variable ``FUSEDBUN_REPOSITORY``;
    ``start`` (default: the working directory, a notebook's own folder) and the folders above it; the
    folders above this package (an editable install, ``pip install -e .``, runs from the checkout).
    """
    candidates: list[Path] = []
    if os.environ.get("FUSEDBUN_REPOSITORY"):
        candidates.append(Path(os.environ["FUSEDBUN_REPOSITORY"]))
    here = Path(start if start is not None else Path.cwd()).resolve()
    candidates += [here, *here.parents]
    candidates += list(Path(__file__).resolve().parents[1:3])
    return next((c for c in candidates if _is_repository(c)), None)


def fetch_repository(
    url: str = REPOSITORY_URL, ref: str = "main", cache: str | os.PathLike | None = None, timeout: float = 30
) -> Path:
    """Download the repository at ``ref`` as a tar archive (once: it is kept in ``cache``) and return
    the folder it unpacks to. Raises ``OSError`` when the download fails (no network, say)."""
    cache = Path(cache) if cache is not None else Path.home() / ".cache" / "fusedbun"
    target = cache / ref.replace("/", "_")
    if _is_repository(target):
        return target
    archive = f"{url.rstrip('/')}/archive/{ref}.tar.gz"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        path = Path(scratch, "repository.tar.gz")
        with urllib.request.urlopen(archive, timeout=timeout) as response, open(path, "wb") as out:
            shutil.copyfileobj(response, out)
        with tarfile.open(path) as tar:
            try:
                tar.extractall(scratch, filter="data")
            except TypeError:  # Python without tarfile filters (before 3.10.12 / 3.11.4)
                tar.extractall(scratch)
        roots = [p for p in Path(scratch).iterdir() if p.is_dir()]
        if len(roots) != 1 or not _is_repository(roots[0]):
            raise OSError(f"{archive} does not hold the benchmarks/ folder")
        if target.exists():
            shutil.rmtree(target)
        roots[0].rename(target)
    return target


def repository(*, fetch: bool = True, start: str | os.PathLike | None = None) -> Path | None:
    """The repository's checkout (:func:`find_repository`), else, with ``fetch``, a downloaded copy
    (:func:`fetch_repository`); ``None`` when neither is at hand."""
    found = find_repository(start)
    if found is not None or not fetch:
        return found
    try:
        return fetch_repository()
    except OSError:
        return None


def unavailable(what: str) -> str:
    """The sentence a chapter prints in place of ``what`` when :func:`repository` found nothing."""
    return (
        f"{what} needs the benchmarks/ folder of the repository, which this notebook cannot reach (it is "
        f"not in a clone of the repository, and downloading {REPOSITORY_URL} failed). Clone the repository "
        "and open the notebook from its book/ folder, or set FUSEDBUN_REPOSITORY to a checkout, to see it."
    )
