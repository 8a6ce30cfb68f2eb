"""Building and loading a C kernel at first use: the compiler, the flags, the cache and the OpenMP runtime.

A :class:`SharedLibrary` compiles one C source with the system C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``), ``-O3`` and, where they work, ``-fopenmp`` and ``-march=native``, into a cache directory
(``$FUSEDBUN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedbun`` or ``~/.cache/fusedbun``), under a name keyed
by a hash of the source, the compile-time definitions, the compiler, its flags and the CPU. A build is
written to a temporary name and renamed into place, so two processes compiling at once do not clash.

The flag sets are tried in order; the first build that compiles, loads, passes the caller's check and,
when built with ``-fopenmp``, binds to the OpenMP runtime that torch has already loaded (two OpenMP
runtimes in one process fight over the cores) is used. Nothing is compiled before the first
:meth:`SharedLibrary.load`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["SharedLibrary", "BuildError", "find_compiler", "cache_dir", "FLAG_SETS"]

# -fopenmp-simd: the `omp simd` reductions vectorize even in the build without an OpenMP runtime.
# -ffp-contract=fast: a * b + c may be one fused multiply-add, as in torch's own vectorized kernels.
_COMMON_FLAGS = (
    "-O3",
    "-std=gnu11",
    "-fPIC",
    "-shared",
    "-pthread",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp-simd",
    "-ffp-contract=fast",
)
FLAG_SETS = (
    _COMMON_FLAGS + ("-fopenmp", "-march=native"),
    _COMMON_FLAGS + ("-fopenmp",),
    _COMMON_FLAGS + ("-march=native",),
    _COMMON_FLAGS,
)
"""The flag sets tried in order (the last two start POSIX threads instead of using OpenMP)."""

_OPENMP_LIBS = ("libgomp", "libomp", "libiomp")
_COMPILE_TIMEOUT_S = 120


class BuildError(Exception):
    """A build that cannot be used: the compiler's message, a failed check, a second OpenMP runtime."""


def find_compiler() -> str | None:
    """The C compiler to use: ``$CC`` if set, else the first of ``cc``, ``gcc``, ``clang`` on the PATH."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$FUSEDBUN_CACHE_DIR``, else a per-user cache directory."""
    explicit = os.environ.get("FUSEDBUN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "fusedbun"


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags, where the OS tells them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


@functools.cache
def _compiler_identity(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return f"{os.path.realpath(cc)}\n{out.stdout}"
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"the C compiler {cc!r} does not run: {e}") from None


def compile_source(source: Path, cc: str, directory: Path, flags: tuple[str, ...]) -> Path:
    """Compile ``source`` with ``flags`` into ``directory``, or return the cached build: its name is a hash of
    the source, the compiler, the flags (definitions included) and the CPU. Raises :class:`BuildError` with
    the compiler's message."""
    text = source.read_bytes()
    identity = [text, _compiler_identity(cc).encode(), " ".join(flags).encode()]
    identity += [platform.machine().encode(), _cpu_identity().encode()]
    key = hashlib.sha256(b"\0".join(identity)).hexdigest()[:20]
    target = directory / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so.tmp", dir=directory)
    os.close(fd)
    cmd = [cc, *flags, str(source), "-o", tmp, "-lm"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        if out.returncode != 0:
            raise BuildError(f"$ {' '.join(cmd)}\n{(out.stderr or out.stdout).strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
        return target
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"$ {' '.join(cmd)}\n{e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _openmp_runtimes() -> set[str] | None:
    """Files of OpenMP runtimes mapped into this process, or ``None`` where the OS does not say."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split(None, 5)[-1].strip() for line in f if line.count(" ") >= 5}
    except OSError:
        return None
    return {p for p in paths if os.path.basename(p).startswith(_OPENMP_LIBS)}


class SharedLibrary:
    """A C source compiled and loaded once per process.

    ``defines`` become ``-D`` flags (the constants the Python side owns); ``check(lib)`` runs on every
    loaded build and raises :class:`BuildError` when the build does not fit the Python side (an interface
    version, a struct layout, a constant).
    """

    def __init__(self, source: Path, *, defines: Mapping[str, str], check: Callable[[ctypes.CDLL], None]):
        self.source = source
        self.defines = dict(defines)
        self.check = check
        self.flag_sets = FLAG_SETS
        self._lock = threading.Lock()
        self._loaded: tuple[ctypes.CDLL | None, str, Path | None] | None = None

    def reset(self) -> None:
        """Forget the loaded build, so that the next :meth:`load` tries again (tests use this)."""
        with self._lock:
            self._loaded = None

    def _definitions(self) -> tuple[str, ...]:
        return tuple(f"-D{name}={value}" for name, value in sorted(self.defines.items()))

    def _load_build(self, cc: str, flags: tuple[str, ...]) -> tuple[ctypes.CDLL, Path]:
        flags = flags + self._definitions()
        try:
            path = compile_source(self.source, cc, cache_dir(), flags)
        except OSError:  # the cache directory is not writable: a per-user temporary one
            user = os.getuid() if hasattr(os, "getuid") else "user"
            path = compile_source(self.source, cc, Path(tempfile.gettempdir()) / f"fusedbun-{user}", flags)
        openmp = "-fopenmp" in flags
        before = _openmp_runtimes() if openmp else None
        if openmp and before is None:
            raise BuildError("cannot check which OpenMP runtime an OpenMP build would use here")
        lib = ctypes.CDLL(str(path))
        if openmp:
            added = _openmp_runtimes() - before
            if added or not before:
                raise BuildError(
                    f"the OpenMP build does not share torch's OpenMP runtime ({sorted(before)}): "
                    f"it loaded {sorted(added)}"
                )
        self.check(lib)
        return lib, path

    def load(self) -> tuple[ctypes.CDLL | None, str, Path | None]:
        """``(library, "", path)``, or ``(None, why not, None)``; the first call compiles (about a second)
        unless a cached build exists."""
        with self._lock:
            if self._loaded is not None:
                return self._loaded
            cc = find_compiler()
            if cc is None:
                self._loaded = (None, "no C compiler found (set $CC, or install cc, gcc or clang)", None)
                return self._loaded
            errors = []
            for flags in self.flag_sets:
                try:
                    lib, path = self._load_build(cc, flags)
                except (BuildError, OSError) as e:
                    errors.append(str(e))
                    continue
                self._loaded = (lib, "", path)
                return self._loaded
            self._loaded = (None, f"compiling {self.source.name} failed:\n" + "\n".join(errors), None)
            return self._loaded
