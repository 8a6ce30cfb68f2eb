"""Byte-level text corpora for the language-model benchmark, built reproducibly and split by document.

    python -m benchmarks.corpus build                       # Python 3.11 documentation (Debian python3.11-doc)
    python -m benchmarks.corpus build --deb python3.11-doc_3.11.2-6+deb12u9_all.deb   # from a .deb at hand
    python -m benchmarks.corpus smoke --out /tmp/smoke      # a small corpus built offline (stdlib docstrings)

The benchmark corpus is the reStructuredText source of the Python 3.11 documentation (497 documents, about
11 MB of English prose with code samples), as Debian's ``python3.11-doc`` package ships it under
``usr/share/doc/python3.11/html/_sources``. ``build`` downloads that package with ``apt-get download``
when no ``--deb`` is given, reads the ``.deb`` with the Python standard library (an ``ar`` archive holding
tarballs; no ``dpkg`` needed) and writes, under ``--out``:

- ``train.bin``, ``val.bin``, ``test.bin``: the documents of each split as raw bytes (uint8), sorted by
  path, each followed by one 0 byte (the end-of-document marker; the text holds none);
- ``manifest.json``: the source (package name and version, sha256 of the ``.deb``), the split rule, and for
  each split its documents, size and sha256.

The split is by document, fixed by the path alone: a document goes to train, val or test by the first 8
bytes of ``sha256(path)`` modulo 1000 (below 900, below 950, the rest), so the same package gives the same
files on any machine, and a document never straddles two splits.

Training code reads the built files with :func:`load_corpus`, which checks them against the manifest; it
never downloads anything.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "SPLITS",
    "Corpus",
    "split_of",
    "write_corpus",
    "load_corpus",
    "build_python_doc",
    "build_smoke",
    "DEFAULT_DIR",
    "main",
]

SPLITS = ("train", "val", "test")
SPLIT_RULE = "int.from_bytes(sha256(path)[:8], 'big') % 1000: < 900 train, < 950 val, else test"
END_OF_DOCUMENT = 0
DEFAULT_PACKAGE = "python3.11-doc"
DOC_ROOT = "usr/share/doc/python3.11/html/_sources/"
DEFAULT_DIR = Path(__file__).resolve().parent / "data" / DEFAULT_PACKAGE


def split_of(path: str) -> str:
    """The split a document belongs to, from its path alone (see the module docstring)."""
    bucket = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") % 1000
    return "train" if bucket < 900 else ("val" if bucket < 950 else "test")


@dataclass
class Corpus:
    """The three splits as 1-D uint8 tensors of bytes, and the manifest they were built with."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    manifest: dict
    path: Path

    def split(self, name: str) -> torch.Tensor:
        return getattr(self, name)


def write_corpus(out: Path, documents: Iterable[tuple[str, bytes]], source: dict) -> dict:
    """Split ``(path, text)`` documents by :func:`split_of`, write the three ``.bin`` files and the manifest
    under ``out``; return the manifest. Every split must receive at least one document."""
    by_split: dict[str, list[tuple[str, bytes]]] = {s: [] for s in SPLITS}
    for path, text in documents:
        if END_OF_DOCUMENT in text:
            raise ValueError(f"{path} holds a 0 byte, which marks the end of a document")
        by_split[split_of(path)].append((path, text))
    empty = [s for s in SPLITS if not by_split[s]]
    if empty:
        raise ValueError(f"no document fell into the split(s) {empty}: the corpus is too small to split by document")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in SPLITS:
        docs = sorted(by_split[name])
        blob = b"".join(text + bytes([END_OF_DOCUMENT]) for _, text in docs)
        (out / f"{name}.bin").write_bytes(blob)
        files[name] = dict(
            file=f"{name}.bin",
            bytes=len(blob),
            sha256=hashlib.sha256(blob).hexdigest(),
            documents=len(docs),
            paths=[p for p, _ in docs],
        )
    manifest = dict(
        format="uint8 bytes; each document followed by one 0 byte (end of document)",
        split_rule=SPLIT_RULE,
        source=source,
        total_bytes=sum(f["bytes"] for f in files.values()),
        splits=files,
    )
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_corpus(path: str | os.PathLike, *, verify: bool = True) -> Corpus:
    """Read a corpus written by :func:`write_corpus`; with ``verify``, check each file's sha256."""
    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.exists():
        raise FileNotFoundError(
            f"no corpus at {path} (no manifest.json); build one with `python -m benchmarks.corpus build --out {path}`"
        )
    manifest = json.loads(manifest_file.read_text())
    tensors = {}
    for name in SPLITS:
        info = manifest["splits"][name]
        blob = (path / info["file"]).read_bytes()
        if verify and hashlib.sha256(blob).hexdigest() != info["sha256"]:
            raise ValueError(f"{path / info['file']} does not match its sha256 in the manifest")
        tensors[name] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return Corpus(manifest=manifest, path=path, **tensors)


# ---------------------------------------------------------------- the Debian package


def _ar_members(blob: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the container of a ``.deb``)."""
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (a .deb starts with '!<arch>')")
    members, pos = {}, 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def _tar_member(members: dict[str, bytes], stem: str) -> tarfile.TarFile:
    name = next((n for n in members if n.startswith(stem + ".tar")), None)
    if name is None:
        raise ValueError(f"the .deb has no {stem}.tar.* member (members: {sorted(members)})")
    return tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*")


def read_deb(deb: Path, root: str = DOC_ROOT) -> tuple[dict, list[tuple[str, bytes]]]:
    """The control fields and the ``.rst.txt`` documents under ``root`` of a ``.deb`` file, by path relative
    to ``root``."""
    blob = deb.read_bytes()
    members = _ar_members(blob)
    with _tar_member(members, "control") as tar:
        control_member = next(m for m in tar.getmembers() if m.name.lstrip("./") == "control")
        control_text = tar.extractfile(control_member).read().decode()
    control = {}
    for line in control_text.splitlines():
        if ":" in line and not line.startswith(" "):
            key, value = line.split(":", 1)
            control[key.strip()] = value.strip()
    documents = []
    with _tar_member(members, "data") as tar:
        for m in tar.getmembers():
            name = m.name.lstrip("./")
            if m.isfile() and name.startswith(root) and name.endswith(".rst.txt"):
                documents.append((name[len(root) :], tar.extractfile(m).read()))
    if not documents:
        raise ValueError(f"{deb} holds no .rst.txt files under {root}")
    source = dict(
        kind="debian package",
        package=control.get("Package"),
        version=control.get("Version"),
        deb_file=deb.name,
        deb_sha256=hashlib.sha256(blob).hexdigest(),
        member_root=root,
        member_pattern="**/*.rst.txt",
        documents=len(documents),
    )
    return source, sorted(documents)


def download_deb(package: str, directory: Path) -> Path:
    """``apt-get download PACKAGE`` into ``directory``; the path of the ``.deb`` it fetched."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", package], cwd=directory, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(
            f"apt-get is not available: download {package}'s .deb elsewhere and pass it with --deb"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"apt-get download {package} failed: {exc.stderr.strip()}") from None
    debs = sorted(directory.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} left no {package}_*.deb in {directory}")
    return debs[-1]


def build_python_doc(out: Path = DEFAULT_DIR, deb: Path | None = None, package: str = DEFAULT_PACKAGE) -> dict:
    """Build the benchmark corpus from ``deb`` (downloaded with apt-get when ``None``)."""
    with tempfile.TemporaryDirectory() as tmp:
        deb = deb or download_deb(package, Path(tmp))
        source, documents = read_deb(deb)
        return write_corpus(out, documents, source)


# ---------------------------------------------------------------- the offline smoke corpus

# Pure-Python standard-library modules found in every supported Python; their docstrings are read from
# the source files with `ast` (nothing is imported).
SMOKE_MODULES = (
    "argparse",
    "ast",
    "calendar",
    "collections",
    "configparser",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "fractions",
    "ftplib",
    "functools",
    "gettext",
    "heapq",
    "http",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "mailbox",
    "optparse",
    "pickle",
    "pydoc",
    "random",
    "shutil",
    "smtplib",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "zipfile",
)


def _docstrings(source: str) -> Iterable[tuple[str, str]]:
    tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) > 40:
            yield getattr(node, "name", "<module>"), doc


def smoke_documents(modules: Sequence[str] = SMOKE_MODULES) -> list[tuple[str, bytes]]:
    """Every docstring (over 40 characters) of ``modules``' own source files, one document each."""
    documents = []
    for module in modules:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        origin = Path(spec.origin)
        sources = sorted(origin.parent.glob("*.py")) if origin.name == "__init__.py" else [origin]
        for file in sources:
            rel = f"{module}/{file.name}" if origin.name == "__init__.py" else file.name
            for i, (name, doc) in enumerate(_docstrings(file.read_text(encoding="utf-8"))):
                documents.append((f"{rel}:{i}:{name}", doc.encode()))
    return documents


def build_smoke(out: Path, modules: Sequence[str] = SMOKE_MODULES) -> dict:
    """A small corpus (about 1 MB, depending on the Python version) that needs no network: the docstrings of
    :data:`SMOKE_MODULES`, split by docstring with the same rule as the benchmark corpus."""
    source = dict(
        kind="docstrings of Python standard-library modules (offline smoke corpus)",
        python=sys.version.split()[0],
        modules=list(modules),
    )
    return write_corpus(out, smoke_documents(modules), source)


# ---------------------------------------------------------------- command line


def _describe(manifest: dict, out: Path) -> str:
    src = manifest["source"]
    name = f"{src.get('package')} {src.get('version')}" if src.get("package") else src["kind"]
    sizes = ", ".join(
        f"{s} {manifest['splits'][s]['documents']} docs / {manifest['splits'][s]['bytes'] / 1e6:.2f} MB" for s in SPLITS
    )
    return f"{out}: {name}; {sizes}"


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.corpus", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help=f"the benchmark corpus from Debian's {DEFAULT_PACKAGE}")
    b.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"output folder (default {DEFAULT_DIR})")
    b.add_argument("--deb", type=Path, default=None, help="a .deb already downloaded (default: apt-get download)")
    b.add_argument("--package", default=DEFAULT_PACKAGE, help="the Debian package to download")
    s = sub.add_parser("smoke", help="a small offline corpus from standard-library docstrings")
    s.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.command == "build":
        manifest = build_python_doc(args.out, args.deb, args.package)
    else:
        manifest = build_smoke(args.out)
    print(_describe(manifest, args.out))
    return manifest


if __name__ == "__main__":
    main()
