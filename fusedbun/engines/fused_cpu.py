"""The fused CPU engine: one pass over each tensor per step, in C, on torch's CPU threads.

An optimizer step is memory-bound. Per element of a 2-D fp32 weight the rule must read ``p``, ``g`` and
the momentum ``m`` and write ``p`` and ``m``: 20 bytes, because the new SM3 accumulators are maxima of
``nu`` and ``nu`` needs only the previous accumulators and ``g``, so the whole step fits in one pass.
Whole-tensor PyTorch ops move several times that. This engine runs the step as one loop in C
(``fusedbun/_csrc/fused_step.c``):

- A tensor of 2 or more dims is viewed as ``(n0, R)``, ``R`` the product of the other dims. Its
  accumulator ``a0`` has ``n0`` numbers; the others enter as ``rest = min_{k>=1} a_k`` broadcast to ``R``
  numbers (computed here, O(R)). Per element the kernel forms ``prev = min(a0[i], rest[j])`` and ``nu``;
  per row it keeps the maximum (the new ``a0[i]``), per thread the column maxima (``R`` numbers), which
  are combined after the pass and reduced here to the new ``a_k``, ``k >= 1`` (O(R)). With centralization
  the row mean is taken first; that second read of a row comes from cache.
- A 0-D or 1-D tensor has a dense second moment ``v``: ``prev = v``, and ``nu`` is written back.
- Rows are split among ``torch.get_num_threads()`` threads inside the C call, in contiguous ranges of
  about equal element counts. The kernel is built with ``-fopenmp`` and must then bind to the OpenMP
  runtime that torch has loaded (``libgomp.so.1`` in torch's wheels): it uses torch's own worker threads,
  which are already awake after torch's last parallel region. If loading it would bring in a second
  OpenMP runtime (two thread pools fighting over the cores), or the compiler has no OpenMP, a build that
  starts POSIX threads per step is used instead (:func:`threading_backend` says which).
- fp32, bf16 and fp16 parameters and gradients, fp32/bf16/fp16 momentum; the arithmetic is fp32, the
  stores round to nearest even, the update uses the momentum as stored. Other tensors (fp64 parameters,
  non-contiguous tensors, other dtypes or devices) are stepped by the multi-tensor engine
  (:func:`fusedbun.engines.foreach.foreach_fusion`) in the same call, so any input gives the same rule.
- Results match the reference engine to fp32 rounding, not bit for bit: a multiply and an add may fuse
  into one FMA (as in torch's own vector kernels) and the row mean is summed in another order; a bf16 or
  fp16 result may then differ by one unit in the last place. They do not depend on the thread count.

The C file is compiled at first use with the system C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``), ``-O3`` and, where they work, ``-fopenmp`` and ``-march=native``, into a cache directory
(``$FUSEDBUN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedbun`` or ``~/.cache/fusedbun``), under a name keyed
by a hash of the source, the compiler, its flags and the CPU. It is written to a temporary name and renamed into place, so two
processes compiling at once do not clash. Without a working compiler, :func:`unavailable_reason` says
why and the optimizer uses the multi-tensor engine; importing :mod:`fusedbun` never compiles anything.
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
from pathlib import Path

import torch
from torch import Tensor

from fusedbun.engines.foreach import foreach_fusion
from fusedbun.hessian import hessian_decay

__all__ = [
    "fused_fusion",
    "unavailable_reason",
    "library_path",
    "threading_backend",
    "find_compiler",
    "cache_dir",
    "SOURCE",
]

SOURCE = Path(__file__).resolve().parent.parent / "_csrc" / "fused_step.c"
_ABI_VERSION = 4
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
# Tried in order; the first that compiles, loads and (for OpenMP) shares torch's OpenMP runtime is used.
_FLAG_SETS = (
    _COMMON_FLAGS + ("-fopenmp", "-march=native"),
    _COMMON_FLAGS + ("-fopenmp",),
    _COMMON_FLAGS + ("-march=native",),
    _COMMON_FLAGS,
)
_OPENMP_LIBS = ("libgomp", "libomp", "libiomp")
_COMPILE_TIMEOUT_S = 120
_MIN_ELEMS_PER_THREAD = 1 << 16  # below this a thread costs more to start than it saves

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_DENSE, _SM3 = 0, 1
_CENTRALIZE, _USE_RMS, _MAXIMIZE = 1, 2, 4


class _Task(ctypes.Structure):
    """Mirrors ``fb_task`` in fused_step.c."""

    _fields_ = [
        ("p", ctypes.c_void_p),
        ("g", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
        ("acc", ctypes.c_void_p),
        ("rest", ctypes.c_void_p),
        ("colmax", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("row_len", ctypes.c_int64),
        ("p_dtype", ctypes.c_int32),
        ("g_dtype", ctypes.c_int32),
        ("m_dtype", ctypes.c_int32),
        ("kind", ctypes.c_int32),
        ("beta", ctypes.c_float),
        ("one_minus_beta", ctypes.c_float),
        ("nonfinite", ctypes.c_int32),
    ]


class _Hyper(ctypes.Structure):
    """Mirrors ``fb_hyper`` in fused_step.c."""

    _fields_ = [
        ("neg_lr", ctypes.c_float),
        ("decay", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("momentum_weight", ctypes.c_float),
        ("flags", ctypes.c_int32),
        ("nthreads", ctypes.c_int32),
    ]


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
        raise _BuildError(f"the C compiler {cc!r} does not run: {e}") from None


class _BuildError(Exception):
    pass


def _compile(cc: str, directory: Path, flags: tuple[str, ...]) -> Path:
    """Compile SOURCE with ``flags`` into ``directory``, or return the cached build: its name is a hash of
    the source, the compiler, the flags and the CPU. Raises ``_BuildError`` with the compiler's message."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                _compiler_identity(cc).encode(),
                " ".join(flags).encode(),
                platform.machine().encode(),
                _cpu_identity().encode(),
            ]
        )
    ).hexdigest()[:20]
    target = directory / f"fused_step-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fused_step-", suffix=".so.tmp", dir=directory)
    os.close(fd)
    cmd = [cc, *flags, str(SOURCE), "-o", tmp, "-lm"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        if out.returncode != 0:
            raise _BuildError(f"$ {' '.join(cmd)}\n{(out.stderr or out.stdout).strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
        return target
    except (OSError, subprocess.SubprocessError) as e:
        raise _BuildError(f"$ {' '.join(cmd)}\n{e}") from None
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


_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL | None, str, Path | None] | None = None  # (library, reason, path), once tried


def _load_build(cc: str, flags: tuple[str, ...]) -> tuple[ctypes.CDLL, Path]:
    try:
        path = _compile(cc, cache_dir(), flags)
    except OSError:  # the cache directory is not writable: a per-user temporary one
        user = os.getuid() if hasattr(os, "getuid") else "user"
        path = _compile(cc, Path(tempfile.gettempdir()) / f"fusedbun-{user}", flags)
    before = _openmp_runtimes() if "-fopenmp" in flags else None
    if "-fopenmp" in flags and before is None:
        raise _BuildError("cannot check which OpenMP runtime an OpenMP build would use here")
    lib = ctypes.CDLL(str(path))
    if "-fopenmp" in flags:
        # Two OpenMP runtimes in one process fight over the cores; the build must bind to torch's.
        added = _openmp_runtimes() - before
        if added or not before:
            raise _BuildError(
                f"the OpenMP build does not share torch's OpenMP runtime ({sorted(before)}): it loaded {sorted(added)}"
            )
    if lib.fb_abi_version() != _ABI_VERSION:
        raise _BuildError(f"{path} has interface version {lib.fb_abi_version()}, expected {_ABI_VERSION}")
    lib.fb_fused_step.argtypes = [ctypes.POINTER(_Task), ctypes.c_int64, ctypes.POINTER(_Hyper), ctypes.c_void_p]
    lib.fb_fused_step.restype = ctypes.c_int
    return lib, path


def _load() -> tuple[ctypes.CDLL | None, str, Path | None]:
    """Compile (or find in the cache) and load the kernel, once per process: the first flag set of
    ``_FLAG_SETS`` that compiles and loads wins."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        cc = find_compiler()
        if cc is None:
            _loaded = (None, "no C compiler found (set $CC, or install cc, gcc or clang)", None)
            return _loaded
        errors = []
        for flags in _FLAG_SETS:
            try:
                lib, path = _load_build(cc, flags)
            except (_BuildError, OSError) as e:
                errors.append(str(e))
                continue
            _loaded = (lib, "", path)
            return _loaded
        _loaded = (None, "compiling the fused CPU kernel failed:\n" + "\n".join(errors), None)
        return _loaded


def threading_backend() -> str:
    """How the kernel runs on several threads: ``"openmp"`` (torch's own OpenMP runtime) or ``"pthreads"``;
    ``""`` when the engine cannot run."""
    lib = _load()[0]
    return "" if lib is None else ("openmp" if lib.fb_uses_openmp() else "pthreads")


def unavailable_reason() -> str:
    """``""`` when the fused CPU engine can run here, else why not (e.g. the compiler's error message).

    The first call compiles the kernel (about a second) unless a cached build exists.
    """
    return _load()[1]


def library_path() -> Path | None:
    """The compiled kernel's path, or ``None`` when the engine cannot run."""
    return _load()[2]


def _fusable(p: Tensor, g: Tensor, m: Tensor | None, hess) -> bool:
    """Can the C kernel step this tensor? Otherwise it goes to the multi-tensor engine."""
    codes = _DTYPE_CODES
    if not (p.is_cpu and g.is_cpu and p.dtype in codes and g.dtype in codes and g.layout is torch.strided):
        return False
    if g.shape != p.shape or not (p.is_contiguous() and g.is_contiguous()):
        return False
    if m is not None and not (m.is_cpu and m.dtype in codes and m.shape == p.shape and m.is_contiguous()):
        return False
    if p.dim() <= 1:
        hess = (hess,)
    elif len(hess) != p.dim():
        return False
    for a in hess:
        if a.dtype is not torch.float32 or not a.is_cpu or not a.is_contiguous():
            return False
    return True


def fused_fusion(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    exp_hessians: list[Tensor | list[Tensor]],
    state_steps: list[Tensor],
    *,
    lr: float,
    eps: float,
    beta_decay: float,
    Lambda: float,
    momentum_beta: float,
    centralize: bool,
    use_rms: bool,
    maximize: bool,
    find_nonfinite: bool = False,
) -> Tensor | None:
    """One FusionOptimizer step over lists of CPU tensors (the engine signature of :mod:`fusedbun.engines`).

    The kernel masks gradient entries that are not usable numbers in its one pass and flags their tasks,
    so ``find_nonfinite`` costs nothing extra."""
    lib, reason, _ = _load()
    if lib is None:
        raise RuntimeError(f"the fused CPU engine cannot run: {reason}")
    found = torch.zeros(len(params), dtype=torch.bool) if find_nonfinite else None
    if not params:
        return found
    lr = float(lr)
    hyper = dict(
        lr=lr,
        eps=eps,
        Lambda=Lambda,
        momentum_beta=momentum_beta,
        centralize=centralize,
        use_rms=use_rms,
        maximize=maximize,
    )
    fused, other = [], []
    for i, p in enumerate(params):
        if momentum_beta > 0 and momentum_buffers[i] is None:
            raise ValueError("momentum_beta > 0 but a momentum buffer is None")
        m = momentum_buffers[i] if momentum_beta > 0 else None
        (fused if _fusable(p, grads[i], m, exp_hessians[i]) else other).append(i)
    if other:
        flags = foreach_fusion(
            *([seq[i] for i in other] for seq in (params, grads, momentum_buffers, exp_hessians, state_steps)),
            beta_decay=beta_decay,
            find_nonfinite=find_nonfinite,
            **hyper,
        )
        if find_nonfinite:
            found[other] = flags
    if not fused:
        return found
    steps = [state_steps[i] for i in fused]
    torch._foreach_add_(steps, 1)

    tasks = (_Task * len(fused))()
    keep_alive: list[Tensor] = []  # temporaries the kernel reads or writes, alive until it returns
    reduce_after: list[tuple[Tensor, list[Tensor]]] = []  # (column maxima, accumulators of dims >= 1) for 3-D+
    n, total, cols = 0, 0, 0
    positions = []  # the list position of each task
    for i, step in zip(fused, steps):
        p, g = params[i], grads[i]
        if p.numel() == 0:
            continue  # nothing to update; accumulators cover nothing (as in the reference)
        m = momentum_buffers[i] if momentum_beta > 0 else None
        beta = hessian_decay(step.item(), beta_decay=beta_decay)
        if p.dim() <= 1:
            kind, rows, row_len = _DENSE, p.numel(), 1
            acc, rest_ptr = exp_hessians[i].data_ptr(), None
        else:
            accs = exp_hessians[i]
            kind, rows, row_len = _SM3, p.shape[0], p.numel() // p.shape[0]
            cols += row_len
            acc = accs[0].data_ptr()
            if p.dim() == 2:
                # rest is a_1 itself; the combined column maxima are the new a_1, written after the pass.
                rest_ptr = colmax_ptr = accs[1].data_ptr()
            else:
                rest = accs[1]
                for a in accs[2:]:
                    rest = torch.minimum(rest, a)
                rest = rest.expand((1, *p.shape[1:])).contiguous()
                colmax = torch.empty(p.shape[1:], dtype=torch.float32)
                keep_alive += [rest, colmax]
                rest_ptr, colmax_ptr = rest.data_ptr(), colmax.data_ptr()
                reduce_after.append((colmax, accs[1:]))
        tasks[n] = _Task(
            p.data_ptr(),
            g.data_ptr(),
            None if m is None else m.data_ptr(),
            acc,
            rest_ptr,
            colmax_ptr if kind == _SM3 else None,
            rows,
            row_len,
            _DTYPE_CODES[p.dtype],
            _DTYPE_CODES[g.dtype],
            0 if m is None else _DTYPE_CODES[m.dtype],
            kind,
            beta,
            1.0 - beta,
            0,
        )
        positions.append(i)
        n += 1
        total += p.numel()
    if n == 0:
        return found

    flags = (_CENTRALIZE if centralize else 0) | (_USE_RMS if use_rms else 0) | (_MAXIMIZE if maximize else 0)
    nthreads = max(1, min(torch.get_num_threads(), total // _MIN_ELEMS_PER_THREAD))
    h = _Hyper(
        neg_lr=-lr,
        decay=1.0 - lr * Lambda,
        eps=eps,
        momentum_weight=1.0 - momentum_beta,
        flags=flags,
        nthreads=nthreads,
    )
    # Per-thread column maxima, O(threads * sum of row lengths); allocated here so torch accounts for it.
    scratch = torch.empty(max(1, nthreads * cols), dtype=torch.float32)
    lib.fb_fused_step(tasks, n, ctypes.byref(h), scratch.data_ptr())
    # The kernel wrote through raw pointers; tell autograd, as torch's in-place ops do, so that a tensor
    # saved for backward and then stepped is reported instead of silently used.
    written = [params[i] for i in fused]
    written += [momentum_buffers[i] for i in fused if momentum_beta > 0]
    written += [a for i in fused for a in ([exp_hessians[i]] if params[i].dim() <= 1 else exp_hessians[i])]
    torch.autograd.graph.increment_version(written)

    for colmax, accs in reduce_after:
        d = colmax.dim()
        for k, a in enumerate(accs):  # a is the accumulator of dim k + 1
            others = tuple(j for j in range(d) if j != k)
            a.copy_(colmax.amax(dim=others, keepdim=True).unsqueeze(0) if others else colmax.unsqueeze(0))
    if find_nonfinite:
        found[positions] = torch.tensor([tasks[k].nonfinite != 0 for k in range(n)])
    return found
