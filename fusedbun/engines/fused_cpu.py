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
- With ``cover="factored"`` (:mod:`fusedbun.factored`) ``rest`` is ``prod_{k>=1} a_k / S^(d-1)`` (for a
  matrix the kernel forms ``a1 / S`` itself, and writes the new ``a1``) and ``prev = a0[i] * rest[j]``.
  The new ``a0[i]`` is the row's mean of ``nu``, and the column sums are kept per block of ``SUM_ROWS``
  rows, each block summed in row order, then the blocks in block order, so the result does not depend on
  the thread count (threads take whole blocks). The new ``a_k``, ``k >= 1``, of a tensor of 3 or more
  dims are their means here (O(R)).
- A 0-D or 1-D tensor (any tensor with ``cover="dense"``) has a dense second moment ``v``: ``prev = v``,
  and ``nu`` is written back. A ``v`` stored in bf16 (``hessian_dtype=torch.bfloat16``) is widened when read
  and rounded stochastically when written, on its own stream (:meth:`StepHyper.hessian_rounding
  <fusedbun.engines.common.StepHyper.hessian_rounding>`, the same bits as
  :func:`fusedbun.rounding.stochastic_round_at`), and the step normalizes by the value as stored.
- Rows are split among ``torch.get_num_threads()`` threads inside the C call, in contiguous ranges of
  about equal element counts. The kernel is built with ``-fopenmp`` and must then bind to the OpenMP
  runtime that torch has loaded (``libgomp.so.1`` in torch's wheels): it uses torch's own worker threads,
  which are already awake after torch's last parallel region. If loading it would bring in a second
  OpenMP runtime (two thread pools fighting over the cores), or the compiler has no OpenMP, a build that
  starts POSIX threads per step is used instead (:func:`threading_backend` says which).
- fp32, bf16 and fp16 parameters and gradients, fp32/bf16/fp16 momentum, fp32/bf16 dense ``v``; the
  arithmetic is fp32, the stores round to nearest even (a bf16 or fp16 parameter stochastically, with
  ``stochastic_rounding``, and a bf16 ``v`` always: :mod:`fusedbun.rounding`), the update uses the momentum
  as stored. Other tensors (fp64 parameters, non-contiguous tensors, other dtypes or devices) are stepped
  by the multi-tensor engine (:func:`fusedbun.engines.foreach.foreach_fusion`) in the same call, so any
  input gives the same rule.
- Results match the reference engine to fp32 rounding, not bit for bit: a multiply and an add may fuse
  into one FMA (as in torch's own vector kernels) and the row mean is summed in another order; a bf16 or
  fp16 result may then differ by one unit in the last place. They do not depend on the thread count.

The C file is compiled at first use (:mod:`fusedbun.engines._cbuild`: the compiler, the flags, the cache
and the OpenMP runtime). The rule's constants it needs (the mask's upper bound ``GRAD_LIMIT``, the
interface version) are handed to it as compile-time definitions from this module, and the layout of its
structs is checked against the ctypes mirrors below when it loads, so the two sides cannot drift apart.
Without a working compiler, :func:`unavailable_reason` says why and the optimizer uses the multi-tensor
engine; importing :mod:`fusedbun` never compiles anything.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from fusedbun.adalite import GRAD_LIMIT
from fusedbun.engines._cbuild import BuildError, SharedLibrary, cache_dir, find_compiler
from fusedbun.engines.common import StepHyper, StepTensors
from fusedbun.engines.foreach import foreach_fusion
from fusedbun.factored import factored_column_means_, factored_rest
from fusedbun.hessian import hessian_decay

__all__ = [
    "fused_fusion",
    "unavailable_reason",
    "library_path",
    "threading_backend",
    "find_compiler",
    "cache_dir",
    "SOURCE",
    "ABI_VERSION",
    "LIBRARY",
]

SOURCE = Path(__file__).resolve().parent.parent / "_csrc" / "fused_step.c"
ABI_VERSION = 8
"""The version of the C interface (the structs and functions below); the build must report the same."""
_MIN_ELEMS_PER_THREAD = 1 << 16  # below this a thread costs more to start than it saves

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_V_CODES = {torch.float32: 0, torch.bfloat16: 1}  # a dense v (fusedbun.hessian.HESSIAN_DTYPES)
_DENSE, _SM3, _FACTORED, _FACTORED_2D = 0, 1, 2, 3
SUM_ROWS = 32
"""Rows per block of a factored tensor's column sums (the kernel's ``FB_SUM_ROWS``): its scratch is
``ceil(rows / SUM_ROWS) * row_len`` floats, about 3% of the tensor."""
_CENTRALIZE, _USE_RMS, _MAXIMIZE = 1, 2, 4


class _Task(ctypes.Structure):
    """Mirrors ``fb_task`` in fused_step.c (checked at load by :func:`_check_build`)."""

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
        ("v_dtype", ctypes.c_int32),
        ("kind", ctypes.c_int32),
        ("beta", ctypes.c_float),
        ("one_minus_beta", ctypes.c_float),
        ("nonfinite", ctypes.c_int32),
        ("stochastic", ctypes.c_int32),
        ("round_k0", ctypes.c_uint32),
        ("round_k1", ctypes.c_uint32),
        ("v_k0", ctypes.c_uint32),
        ("v_k1", ctypes.c_uint32),
    ]


class _Hyper(ctypes.Structure):
    """Mirrors ``fb_hyper`` in fused_step.c (checked at load by :func:`_check_build`)."""

    _fields_ = [
        ("neg_lr", ctypes.c_float),
        ("decay", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("momentum_weight", ctypes.c_float),
        ("flags", ctypes.c_int32),
        ("nthreads", ctypes.c_int32),
        ("grad_unscale", ctypes.c_float),
    ]


def _c_float(x: float) -> str:
    """A C float literal that is exactly ``x`` (a hexadecimal literal: no decimal rounding)."""
    return f"{float(x).hex()}f"


DEFINES = {"FB_ABI_VERSION": str(ABI_VERSION), "FB_GRAD_LIMIT": _c_float(GRAD_LIMIT), "FB_SUM_ROWS": str(SUM_ROWS)}
"""The compile-time definitions: the interface version and the constants of the rule, from Python."""


def struct_layout(struct: type[ctypes.Structure]) -> list[int]:
    """``[sizeof, offset of each field...]`` of a ctypes struct, in the order :c:func:`fb_layout` reports."""
    return [ctypes.sizeof(struct)] + [getattr(struct, name).offset for name, _ in struct._fields_]


def built_layout(lib: ctypes.CDLL) -> tuple[list[int], list[int]]:
    """The layouts of ``fb_task`` and ``fb_hyper`` as the build sees them (``sizeof`` and offsets)."""
    n_task, n_hyper = len(_Task._fields_) + 1, len(_Hyper._fields_) + 1
    out = (ctypes.c_int64 * (n_task + n_hyper))()
    lib.fb_layout.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    lib.fb_layout.restype = ctypes.c_int64
    written = lib.fb_layout(out, n_task + n_hyper)
    if written != n_task + n_hyper:
        raise BuildError(f"fb_layout reported {written} numbers, expected {n_task + n_hyper}")
    return list(out[:n_task]), list(out[n_task:])


def _check_build(lib: ctypes.CDLL) -> None:
    """Refuse a build whose interface version, struct layouts or constants differ from this module's."""
    if lib.fb_abi_version() != ABI_VERSION:
        raise BuildError(f"the build has interface version {lib.fb_abi_version()}, expected {ABI_VERSION}")
    task, hyper = built_layout(lib)
    if task != struct_layout(_Task) or hyper != struct_layout(_Hyper):
        raise BuildError(
            f"the C structs differ from their ctypes mirrors: fb_task {task} vs {struct_layout(_Task)}, "
            f"fb_hyper {hyper} vs {struct_layout(_Hyper)} (sizeof, then offsets)"
        )
    lib.fb_grad_limit.restype = ctypes.c_float
    if lib.fb_grad_limit() != GRAD_LIMIT:
        raise BuildError(f"the build's GRAD_LIMIT is {lib.fb_grad_limit()}, expected {GRAD_LIMIT}")
    lib.fb_fused_step.argtypes = [ctypes.POINTER(_Task), ctypes.c_int64, ctypes.POINTER(_Hyper), ctypes.c_void_p]
    lib.fb_fused_step.restype = ctypes.c_int


LIBRARY = SharedLibrary(SOURCE, defines=DEFINES, check=_check_build)
"""The kernel, compiled at first use (:class:`fusedbun.engines._cbuild.SharedLibrary`)."""


def threading_backend() -> str:
    """How the kernel runs on several threads: ``"openmp"`` (torch's own OpenMP runtime) or ``"pthreads"``;
    ``""`` when the engine cannot run."""
    lib = LIBRARY.load()[0]
    return "" if lib is None else ("openmp" if lib.fb_uses_openmp() else "pthreads")


def unavailable_reason() -> str:
    """``""`` when the fused CPU engine can run here, else why not (e.g. the compiler's error message).

    The first call compiles the kernel (about a second) unless a cached build exists.
    """
    return LIBRARY.load()[1]


def library_path() -> Path | None:
    """The compiled kernel's path, or ``None`` when the engine cannot run."""
    return LIBRARY.load()[2]


def _dtype_codes(p: Tensor, g: Tensor, m: Tensor | None, hess) -> tuple[int, int, int, int] | None:
    """The kernel's dtype codes of ``p``, ``g``, ``m`` (0 without momentum) and a dense ``v`` (fp32 or bf16;
    0 for the accumulators, always fp32) when it can step this tensor; ``None`` sends it to the multi-tensor
    engine."""
    codes = _DTYPE_CODES
    p_code, g_code = codes.get(p.dtype), codes.get(g.dtype)
    if p_code is None or g_code is None or not (p.is_cpu and g.is_cpu and g.layout is torch.strided):
        return None
    if g.shape != p.shape or not (p.is_contiguous() and g.is_contiguous()):
        return None
    m_code = 0
    if m is not None:
        m_code = codes.get(m.dtype)
        if m_code is None or not (m.is_cpu and m.shape == p.shape and m.is_contiguous()):
            return None
    if isinstance(hess, Tensor):  # a dense v: 0-D, 1-D, or any shape with cover="dense"
        v_code = _V_CODES.get(hess.dtype)
        if v_code is None or not (hess.is_cpu and hess.shape == p.shape and hess.is_contiguous()):
            return None
        return p_code, g_code, m_code, v_code
    if len(hess) != p.dim():
        return None
    for a in hess:
        if a.dtype is not torch.float32 or not a.is_cpu or not a.is_contiguous():
            return None
    return p_code, g_code, m_code, 0


def _increment_steps(steps: list[Tensor]) -> list[float]:
    """Add 1 to each step count and return the new counts as floats (the version counters are bumped with
    the tensors the kernel writes).

    torch._foreach_add_ costs about 1.5 us per 0-d tensor on the CPU, more than the rest of a tensor's
    bookkeeping; a float32 CPU count is read and written through its pointer instead (the sum rounded to
    fp32 once, as the tensor add rounds it: exact below 2**24). Other counts take the torch op."""
    cells = []
    for s in steps:
        if s.dtype is torch.float32 and s.is_cpu and s.dim() == 0 and not s.requires_grad:
            cell = ctypes.c_float.from_address(s.data_ptr())
            cell.value += 1.0
            cells.append(cell)
        else:
            torch._foreach_add_([s], 1)
            cells.append(s)
    # read after every increment, as after one _foreach_add_ (should a count appear twice in the list)
    return [c.value if isinstance(c, ctypes.c_float) else c.item() for c in cells]


def fused_fusion(tensors: StepTensors, hyper: StepHyper, *, find_nonfinite: bool = False) -> Tensor | None:
    """One FusionOptimizer step over lists of CPU tensors (the :class:`~fusedbun.engines.common.Engine`
    signature).

    The kernel masks gradient entries that are not usable numbers in its one pass and flags their tasks,
    so ``find_nonfinite`` costs nothing extra."""
    params, grads, momentum_buffers, exp_hessians, state_steps = tensors[:5]
    lib, reason, _ = LIBRARY.load()
    if lib is None:
        raise RuntimeError(f"the fused CPU engine cannot run: {reason}")
    if not params:
        return torch.zeros(0, dtype=torch.bool) if find_nonfinite else None
    lr, momentum_beta = float(hyper.lr), hyper.momentum_beta
    with_momentum = momentum_beta > 0
    fused, other = [], []  # fused: (list position, dtype codes)
    # A dense v of 2+ dims (cover="dense") takes the kernel's dense kind, which does not centralize: such a
    # tensor goes to the multi-tensor engine when the group centralizes.
    centralize_dense = hyper.centralize and hyper.cover == "dense"
    for i, p in enumerate(params):
        m = momentum_buffers[i] if with_momentum else None
        if with_momentum and m is None:
            raise ValueError("momentum_beta > 0 but a momentum buffer is None")
        codes = None if centralize_dense and p.dim() >= 2 else _dtype_codes(p, grads[i], m, exp_hessians[i])
        if codes is None:
            other.append(i)
        else:
            fused.append((i, codes))
    other_flags = foreach_fusion(tensors.select(other), hyper, find_nonfinite=find_nonfinite) if other else None
    if not fused:
        return _found(len(params), [], [], other, other_flags) if find_nonfinite else None
    steps = [state_steps[i] for i, _ in fused]
    counts = _increment_steps(steps)

    # This loop runs for every tensor of every step, before the kernel can start: each tensor's attributes
    # are read once (the dtype codes already by _dtype_codes), and the decay is computed once per distinct
    # step count.
    tasks = (_Task * len(fused))()
    keep_alive: list[Tensor] = []  # temporaries the kernel reads or writes, alive until it returns
    reduce_after: list[tuple[Tensor, list[Tensor]]] = []  # (column maxima, accumulators of dims >= 1) for 3-D+
    means_after: list[tuple[Tensor, list[Tensor], tuple]] = []  # factored: (column sums, accumulators, shape)
    factored = hyper.factored
    written: list[Tensor] = steps.copy()  # what the kernel writes through raw pointers (see below)
    n, total, cols = 0, 0, 0
    positions = []  # the list position of each task
    betas: dict[float, float] = {}
    stochastic = hyper.stochastic_rounding
    for (i, (p_code, g_code, m_code, v_code)), count in zip(fused, counts):
        p, m, hess = params[i], momentum_buffers[i] if with_momentum else None, exp_hessians[i]
        dim = p.dim()
        dense = isinstance(hess, Tensor)
        written.append(p)
        if m is not None:
            written.append(m)
        if dense:
            written.append(hess)
        else:
            written += hess
        numel = p.numel()
        if numel == 0:
            continue  # nothing to update; accumulators cover nothing (as in the reference)
        beta = betas.get(count)
        if beta is None:
            beta = betas[count] = hessian_decay(count, beta_decay=hyper.beta_decay)
        rounding = hyper.rounding(p, tensors.key(i), count) if stochastic else None
        v_rounding = hyper.hessian_rounding(hess, tensors.key(i), count) if v_code else None
        if dense:
            kind, rows, row_len = _DENSE, numel, 1
            acc, rest_ptr, colmax_ptr = hess.data_ptr(), None, None
        elif factored:
            rows = p.shape[0]
            row_len = numel // rows
            acc = hess[0].data_ptr()
            blocks = -(-rows // SUM_ROWS)
            if dim == 2:  # the kernel forms rest = a1 / S itself (into the buffer's tail) and writes the new a1
                kind = _FACTORED_2D
                sums = torch.empty((blocks + 1) * row_len, dtype=torch.float32)
                rest_ptr = hess[1].data_ptr()
            else:
                kind = _FACTORED
                rest = factored_rest(hess).expand((1, *p.shape[1:])).contiguous()
                sums = torch.empty(blocks * row_len, dtype=torch.float32)
                keep_alive.append(rest)
                rest_ptr = rest.data_ptr()
                means_after.append((sums[:row_len], hess[1:], tuple(p.shape)))
            keep_alive.append(sums)
            colmax_ptr = sums.data_ptr()
        else:
            rows = p.shape[0]
            kind, row_len = _SM3, numel // rows
            cols += row_len
            acc = hess[0].data_ptr()
            if dim == 2:
                # rest is a_1 itself; the combined column maxima are the new a_1, written after the pass.
                rest_ptr = colmax_ptr = hess[1].data_ptr()
            else:
                rest = hess[1]
                for a in hess[2:]:
                    rest = torch.minimum(rest, a)
                rest = rest.expand((1, *p.shape[1:])).contiguous()
                colmax = torch.empty(p.shape[1:], dtype=torch.float32)
                keep_alive += [rest, colmax]
                rest_ptr, colmax_ptr = rest.data_ptr(), colmax.data_ptr()
                reduce_after.append((colmax, hess[1:]))
        tasks[n] = _Task(
            p.data_ptr(),
            grads[i].data_ptr(),
            None if m is None else m.data_ptr(),
            acc,
            rest_ptr,
            colmax_ptr,
            rows,
            row_len,
            p_code,
            g_code,
            m_code,
            v_code,
            kind,
            beta,
            1.0 - beta,
            0,
            rounding is not None,
            *(rounding or (0, 0)),
            *(v_rounding or (0, 0)),
        )
        positions.append(i)
        n += 1
        total += numel
    if n == 0:
        torch.autograd.graph.increment_version(steps)  # the counts were written through their pointers
        return _found(len(params), [], [], other, other_flags) if find_nonfinite else None

    flags = (_CENTRALIZE if hyper.centralize else 0) | (_USE_RMS if hyper.use_rms else 0)
    flags |= _MAXIMIZE if hyper.maximize else 0
    nthreads = max(1, min(torch.get_num_threads(), total // _MIN_ELEMS_PER_THREAD))
    h = _Hyper(
        neg_lr=-lr,
        decay=1.0 - lr * hyper.Lambda,
        eps=hyper.eps,
        momentum_weight=1.0 - momentum_beta,
        flags=flags,
        nthreads=nthreads,
        grad_unscale=hyper.grad_unscale,
    )
    # Per-thread column maxima, O(threads * sum of row lengths); allocated here so torch accounts for it.
    scratch = torch.empty(max(1, nthreads * cols), dtype=torch.float32)
    # The kernel writes through raw pointers; tell autograd, as torch's in-place ops do, so that a tensor
    # saved for backward and then stepped is reported instead of silently used. Bumped before the call:
    # the same to autograd (nothing runs in between), and these tensors' objects are still in the caches,
    # which the kernel's pass over every parameter evicts (after it, this took 2-3 times as long).
    torch.autograd.graph.increment_version(written)
    used = lib.fb_fused_step(tasks, n, ctypes.byref(h), scratch.data_ptr())
    if not 1 <= used <= nthreads:
        raise RuntimeError(f"the fused CPU kernel reports {used} threads for {n} tasks on {nthreads} threads")

    for column_sums, accs, shape in means_after:
        factored_column_means_(accs, column_sums, shape)
    for colmax, accs in reduce_after:
        d = colmax.dim()
        for k, a in enumerate(accs):  # a is the accumulator of dim k + 1
            others = tuple(j for j in range(d) if j != k)
            a.copy_(colmax.amax(dim=others, keepdim=True).unsqueeze(0) if others else colmax.unsqueeze(0))
    if not find_nonfinite:
        return None
    # The tasks' nonfinite fields in one slice of the array seen as int32 words (a struct object per task
    # would cost more, with the caches cold after the kernel).
    words = (ctypes.c_int32 * (n * ctypes.sizeof(_Task) // 4)).from_buffer(tasks)
    flags = words[_Task.nonfinite.offset // 4 :: ctypes.sizeof(_Task) // 4]
    return _found(len(params), positions, flags, other, other_flags)


def _found(count: int, positions: list[int], flags: list[int], other: list[int], other_flags: Tensor | None) -> Tensor:
    """The per-tensor non-finite flags: the kernel's ``flags`` (nonzero: found) at ``positions``, the
    multi-tensor engine's at ``other``, False elsewhere (tensors with no elements). One tensor built from a
    list: indexing a tensor with lists costs more than the rest of a small step."""
    if len(positions) == count:  # every tensor went to the kernel, in order
        values = flags
    else:
        values = [0] * count
        for i, bad in zip(positions, flags):
            values[i] = bad
    found = torch.tensor(values, dtype=torch.bool)
    if other:
        found[other] = other_flags
    return found
