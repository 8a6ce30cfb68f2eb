"""Triton kernel of the fused CUDA engine: one FusionOptimizer step in a single pass over each tensor.

Imported only by :mod:`fusedbun.engines.fused_cuda` once Triton is known to be importable; importing
:mod:`fusedbun` never imports this module.

One launch steps many tensors of one dtype combination and rank class. The host passes two tables:

- ``meta``: one row of ``META_WIDTH`` int64 per tensor (its layout is in
  :mod:`fusedbun.engines.triton_plan`): where the parameter, gradient, momentum, row means and
  accumulators are, the sizes, and ``beta_t`` and ``1 - beta_t`` as fp32 bit patterns (step counts may
  differ per tensor, so the decay does too). A location is an element offset from a base pointer of the
  same dtype passed as a kernel argument: Triton knows a pointer argument's alignment, and keeps it
  through ``base + offset`` when the offset is known to be a multiple of 16 bytes, so loads and stores
  are 16 bytes wide. (An address read from memory and cast to a pointer loses that.)
- ``tiles``: one row of 3 int32 per program: (tensor, row block, column block).

A tensor of ``d >= 2`` dims is viewed as ``(n0, C)``, ``C`` the product of its other dims. A program owns
``ROWS_PER_TILE`` rows by ``BC`` columns and walks them ``BR`` rows at a time. Per element it forms
``prev = min(a0[row], a1[i1], ...)``, ``nu``, the update, and writes ``p`` and ``m``; per row it takes the
maximum of ``nu`` over its columns, and per column the maximum over its rows (elementwise in registers
while it walks, reduced once at the end). Those partial maxima go to the *new* accumulators by atomic max
on the int32 bit patterns: every ``nu`` is >= +0.0, and for such floats the integer order is the float
order. Maxima do not depend on the order in which programs arrive, so the result is deterministic. The
old accumulators are only read, so every program sees the previous step's values.

Gradient entries that are not usable numbers (NaN, Inf, or ``|g| >= 2**64``, whose square overflows fp32)
are masked like entries at or below ``eps`` (:func:`fusedbun.adalite.eps_mask`). A program that met one
sets its tensor's entry of ``flags`` (int32, at the position the table names, zeroed by the host) to 1:
a plain store of the same value from any number of programs, so no atomic is needed.

With ``FACTORED`` (``cover="factored"``, :mod:`fusedbun.factored`) the column side of ``prev`` is the
product of ``a_k / S`` over ``k >= 1`` instead of their minimum, ``S = mean(a0)`` written for each tensor
by :func:`factored_scale_kernel` before the step, and ``prev = a0[row] * that``. The new accumulators are
means, whose sums must not depend on the order in which programs finish, so no atomics: each program
stores the sums of ``nu`` over its columns for each of its rows (one slot per row and column block) and
over its rows for each of its columns (one slot per column and row block), each reduced in a fixed order
inside the program; :func:`factored_finish_kernel` then adds the slots in order and divides.

A 0-D or 1-D tensor (any tensor with ``cover="dense"``) keeps a dense ``v``: ``prev = v``, and ``nu`` is
written back in place. It is viewed as rows of ``BC`` numbers (the last row masked), so the same walk
serves, and an element's offset is its flat index. A ``v`` stored in bf16 (``hessian_dtype``) is widened
to fp32 on load and ``nu`` is rounded into it stochastically, on the stream whose keys the table holds for
the tensor's ``v`` (:func:`fusedbun.rounding.hessian_key`), with the same hash as the parameter's rounding;
the update then normalizes by the value as stored. The pointer's dtype selects that code at compile time,
so the kernel of an fp32 ``v`` is the same as without it.

Each block's loads (g, m, p and the previous second moment) are issued before any of its work, and with
``PREFETCH`` the next block's loads are issued before the current block is worked on: the row maxima
synchronize the program's warps (a reduction and a change of layout before the atomic), and without
loads in flight across that point the memory would idle while the warps wait.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fusedbun.adalite import GRAD_LIMIT
from fusedbun.engines.triton_plan import (
    ACC0_NEW,
    ACC0_OLD,
    BETA,
    COL_SUMS,
    COLS,
    DIM_BASE,
    DIM_SLOTS,
    FLAG,
    MEAN,
    META_WIDTH,
    NUMEL,
    ONE_MINUS_BETA,
    ROUND_K0,
    ROUND_K1,
    ROWS,
    SCALE,
    V_ROUND_K0,
    V_ROUND_K1,
    G,
    M,
    P,
)

# The layout of a row of the meta table (fusedbun.engines.triton_plan, which fills it) and the mask's upper
# bound (fusedbun.adalite.GRAD_LIMIT), as constexpr globals: how a Triton kernel may read module constants.
_P, _G, _M, _MEAN, _ROWS, _COLS, _NUMEL = (tl.constexpr(v) for v in (P, G, M, MEAN, ROWS, COLS, NUMEL))
_BETA, _ONE_MINUS_BETA, _ACC0_OLD, _ACC0_NEW, _FLAG = (
    tl.constexpr(v) for v in (BETA, ONE_MINUS_BETA, ACC0_OLD, ACC0_NEW, FLAG)
)
_ROUND_K0, _ROUND_K1 = tl.constexpr(ROUND_K0), tl.constexpr(ROUND_K1)
_V_ROUND_K0, _V_ROUND_K1 = tl.constexpr(V_ROUND_K0), tl.constexpr(V_ROUND_K1)
_SCALE, _COL_SUMS = tl.constexpr(SCALE), tl.constexpr(COL_SUMS)
_GRAD_LIMIT = tl.constexpr(GRAD_LIMIT)
_DIM_BASE, _DIM_SLOTS, _META_WIDTH = tl.constexpr(DIM_BASE), tl.constexpr(DIM_SLOTS), tl.constexpr(META_WIDTH)


@triton.jit
def _offset(row, slot: tl.constexpr, SHIFT: tl.constexpr):
    """An element offset from the table; with SHIFT > 0 the host guarantees it is a multiple of
    2**SHIFT elements (16 bytes), and the shifts tell the compiler so."""
    offset = tl.load(row + slot)
    if SHIFT > 0:
        offset = (offset >> SHIFT) << SHIFT
    return offset


@triton.jit
def _size(row, slot: tl.constexpr, SHIFT: tl.constexpr, INDEX32: tl.constexpr):
    """A size from the table (rows, columns, numel): int32 with ``INDEX32`` (every offset inside the
    launch's tensors fits), else int64; with SHIFT > 0 a multiple of 2**SHIFT, as for :func:`_offset`."""
    size = tl.load(row + slot)
    if INDEX32:
        size = size.to(tl.int32)
    if SHIFT > 0:
        size = (size >> SHIFT) << SHIFT
    return size


@triton.jit
def _load_f32(row, slot: tl.constexpr):
    # A float32 stored as its bit pattern in the low half of an int64 slot.
    return tl.load(row + slot).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _dim_index(row, cols, k: tl.constexpr, NDIM: tl.constexpr):
    """Each column's index along dim k (k >= 1) of the tensor viewed as (n0, C)."""
    index = cols
    if NDIM > 2:
        base = _DIM_BASE + _DIM_SLOTS * (k - 1)
        index = ((cols // tl.load(row + base + 1).to(tl.int32)) % tl.load(row + base).to(tl.int32)).to(tl.int32)
    return index


@triton.jit
def _bits_to_bf16_rne(u):
    """fp32 bit patterns (uint32) to bf16 bit patterns (uint32 holding 16 bits), rounded to nearest even;
    NaN stays a quiet NaN. The same integer arithmetic as the C kernel's f32_to_bf16 (and bit for bit what
    the hardware's conversion gives): written out, so that Triton's CPU interpreter, whose own float
    conversions truncate, computes what the GPU computes."""
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)


@triton.jit
def _bits_to_f16_rne(u):
    """fp32 bit patterns (uint32) to fp16 bit patterns (uint32 holding 16 bits), rounded to nearest even,
    as the C kernel's f32_to_f16: NaN stays NaN, beyond the largest finite value gives Inf, subnormals are
    rounded by the fp32 adder."""
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    normal = (a + 0xFFF + ((a >> 13) & 1) - 0x38000000) >> 13
    # Below 2**-14: adding 0.5 makes the fp32 adder round (to nearest even) at 2**-24.
    shifted = (a.to(tl.float32, bitcast=True) + 0.5).to(tl.uint32, bitcast=True) - 0x3F000000
    out = tl.where(a < 0x38800000, shifted, normal)
    out = tl.where(a >= 0x477FF000, 0x7C00, out)
    out = tl.where(a > 0x7F800000, 0x7E00, out)
    return sign | out


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finalizer on uint32 words (fusedbun/rounding.py has the same)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _counter(index, INDEX32: tl.constexpr):
    """The element counter of the flat index ``index``: ``i_lo + 0x9E3779B9 * i_hi`` (uint32); with
    ``INDEX32`` the index is an int32 below 2**31, so ``i_hi`` is 0."""
    if INDEX32:
        counter = index.to(tl.uint32)
    else:
        counter = index.to(tl.uint32) + (index >> 32).to(tl.uint32) * 0x9E3779B9
    return counter


@triton.jit
def _random_bits(index, k0, k1, INDEX32: tl.constexpr):
    """The random word of each element at flat index ``index`` in the stream ``(k0, k1)``."""
    return _fmix32(_counter(index, INDEX32) * (k1 | 1) + k0)


@triton.jit
def _round_stochastically(x, ty: tl.constexpr, index, k0, k1, INDEX32: tl.constexpr):
    """``x`` (fp32) into ``ty`` (bf16 or fp16), away from zero with probability equal to its fractional
    distance between the two neighbours, the random word of each element's flat ``index`` in the stream
    ``(k0, k1)`` deciding; as the C kernel."""
    u = x.to(tl.uint32, bitcast=True)
    if ty == tl.bfloat16:
        # The top 16 random bits carry into the kept 16 with the wanted probability (the compiler drops
        # the finalizer's last step, which leaves them as they are). Infinities stay infinite (the added
        # bits stay below their kept bits); NaN becomes the quiet NaN 0x7FC0, as rounding to nearest gives.
        bits = tl.where(x != x, 0x7FC0, (u + (_random_bits(index, k0, k1, INDEX32) >> 16)) >> 16)
    else:
        r = _random_bits(index, k0, k1, INDEX32)
        a = u & 0x7FFFFFFF
        sign = (u >> 16) & 0x8000
        kept = (a + (r >> 19)) & 0xFFFFE000  # fp16's normal range: 13 dropped bits
        normal = sign | _bits_to_f16_rne(kept)
        n = tl.abs(x) * 16777216.0  # the subnormal range: a grid of 2**-24
        low = tl.floor(n)
        up = ((r >> 8).to(tl.float32) < (n - low) * 16777216.0).to(tl.uint32)
        sub = sign | (low.to(tl.uint32) + up)
        bits = tl.where(a >= 0x7F800000, _bits_to_f16_rne(u), tl.where(a >= 0x38800000, normal, sub))
    return bits.to(tl.uint16).to(ty, bitcast=True)


@triton.jit
def _round_to(x, ty: tl.constexpr, HARDWARE: tl.constexpr):
    """``x`` (fp32) rounded to nearest even into ``ty`` (bf16 or fp16). With ``HARDWARE`` (a compiled
    kernel) the GPU's conversion instruction does it: the same values, except that a NaN may keep another
    payload. Otherwise (Triton's interpreter, whose own conversions truncate) the
    integer arithmetic of the C kernel."""
    if HARDWARE:
        return x.to(ty, fp_downcast_rounding="rtne")
    u = x.to(tl.uint32, bitcast=True)
    if ty == tl.bfloat16:
        bits = _bits_to_bf16_rne(u)
    else:
        bits = _bits_to_f16_rne(u)
    return bits.to(tl.uint16).to(ty, bitcast=True)


@triton.jit
def _load_block(
    r0,
    row_end,
    cols,
    col_ok,
    n_cols,
    numel,
    g_ptr,
    m_ptr,
    p_ptr,
    prev_ptr,
    NDIM: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    BR: tl.constexpr,
):
    """Load the block of rows r0 .. r0 + BR: g, m, p as stored, and the previous second moment from
    ``prev_ptr`` (the dense v for NDIM == 1, as stored, else the rows' a0)."""
    rows = r0 + tl.arange(0, BR)
    row_ok = rows < row_end
    offs = rows[:, None] * n_cols + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if NDIM == 1:
        ok = ok & (offs < numel)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    if HAS_MOMENTUM:
        m = tl.load(m_ptr + offs, mask=ok, other=0.0)
    else:
        m = g
    p = tl.load(p_ptr + offs, mask=ok, other=0.0)
    if NDIM == 1:
        a = tl.load(prev_ptr + offs, mask=ok, other=0.0)
    else:
        a = tl.load(prev_ptr + rows, mask=row_ok, other=0.0)
    return g, m, p, a


@triton.jit
def fusion_step_kernel(
    tiles,
    meta,
    p_base,
    g_base,
    m_base,
    f32_base,  # accumulators and row means (fp32), or the dense v (fp32 or bf16)
    i32_base,  # the new SM3 accumulators, as int32 bit patterns for atomic max
    flags,  # int32 per tensor (at its FLAG position): set to 1 where a gradient entry was masked as non-finite
    lr,
    decay,  # 1 - lr * Lambda
    eps,
    momentum_weight,  # 1 - momentum_beta (the lerp weight)
    beta_arg,  # beta_t and 1 - beta_t when every tensor of the launch has the same step count
    one_minus_beta_arg,
    grad_unscale,  # multiplies every gradient first (1 / GradScaler's loss scale, else 1)
    NDIM: tl.constexpr,  # 1: dense second moment (0-D and 1-D tensors); >= 2: SM3 accumulators
    HAS_MOMENTUM: tl.constexpr,
    CENTRALIZE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    USE_RMS: tl.constexpr,
    P_SHIFT: tl.constexpr,  # log2 of 16 bytes in elements of p, g, m (0: not known to be aligned)
    G_SHIFT: tl.constexpr,
    M_SHIFT: tl.constexpr,
    V_SHIFT: tl.constexpr,
    COLS_SHIFT: tl.constexpr,  # C is a multiple of 2**COLS_SHIFT
    ROWS_PER_TILE: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    PREFETCH: tl.constexpr,  # issue the next block's loads before working on the current one
    PER_TENSOR_BETA: tl.constexpr,  # beta_t from the table (step counts differ), else the arguments
    STOCHASTIC: tl.constexpr,  # round p (bf16, fp16) stochastically, with the table's stream keys
    FACTORED: tl.constexpr = False,  # cover="factored": prev = a0 * prod(a_k / S), the sums of nu into slots
    INDEX32: tl.constexpr = False,  # every element offset inside a tensor (a tile past its end too) < 2**31
    HARDWARE_ROUNDING: tl.constexpr = False,  # round to nearest with the GPU's conversion (compiled kernels)
):
    pid = tl.program_id(0)
    tensor = tl.load(tiles + 3 * pid).to(tl.int64)
    row_block = tl.load(tiles + 3 * pid + 1)
    if not INDEX32:
        row_block = row_block.to(tl.int64)
    col_block = tl.load(tiles + 3 * pid + 2)
    row = meta + tensor * _META_WIDTH

    p_ptr = p_base + _offset(row, _P, P_SHIFT)
    g_ptr = g_base + _offset(row, _G, G_SHIFT)
    n_rows = _size(row, _ROWS, 0, INDEX32)
    n_cols = _size(row, _COLS, COLS_SHIFT, INDEX32)
    if STOCHASTIC:
        round_k0 = tl.load(row + _ROUND_K0).to(tl.uint32)
        round_k1 = tl.load(row + _ROUND_K1).to(tl.uint32)
    if PER_TENSOR_BETA:
        beta = _load_f32(row, _BETA)
        one_minus_beta = _load_f32(row, _ONE_MINUS_BETA)
    else:
        beta = beta_arg
        one_minus_beta = one_minus_beta_arg

    cols = col_block * BC + tl.arange(0, BC)
    col_ok = cols < n_cols
    if NDIM == 1:
        v_ptr = f32_base + _offset(row, _ACC0_OLD, V_SHIFT)
        numel = _size(row, _NUMEL, COLS_SHIFT, INDEX32)  # for a dense tensor COLS_SHIFT says how numel divides
        prev_ptr = v_ptr
        if v_ptr.dtype.element_ty != tl.float32:  # the keys of the stream that rounds v stochastically
            v_k0 = tl.load(row + _V_ROUND_K0).to(tl.uint32)
            v_k1 = tl.load(row + _V_ROUND_K1).to(tl.uint32)
    else:
        v_ptr = f32_base  # unused
        numel = 0  # unused
        prev_ptr = f32_base + _offset(row, _ACC0_OLD, 0)  # the old a0
        acc0_new = i32_base + _offset(row, _ACC0_NEW, 0)
        # The column side of prev: min over k >= 1 of a_k at each column's index along dim k.
        # (factored: the product of a_k / S, the reference's order; 0 while S is 0 and outside the tensor)
        if FACTORED:
            scale = tl.load(i32_base + tl.load(row + _SCALE)).to(tl.float32, bitcast=True)
            safe = tl.where(scale > 0, scale, 1.0)
            col_prev = tl.full([BC], 1.0, tl.float32)
        else:
            col_prev = tl.full([BC], float("inf"), tl.float32)
        for k in tl.static_range(1, NDIM):
            acc_k = f32_base + _offset(row, _DIM_BASE + _DIM_SLOTS * (k - 1) + 2, 0)
            index = _dim_index(row, cols, k, NDIM)
            if FACTORED:
                col_prev = col_prev * (tl.load(acc_k + index, mask=col_ok, other=0.0) / safe)
            else:
                col_prev = tl.minimum(col_prev, tl.load(acc_k + index, mask=col_ok, other=float("inf")))
        if FACTORED:
            col_prev = tl.where(scale > 0, col_prev, 0.0)
        else:
            col_prev = tl.where(col_ok, col_prev, 0.0)
        col_acc = tl.zeros([BR, BC], tl.float32)
    if CENTRALIZE:
        mean_ptr = f32_base + _offset(row, _MEAN, 0)
    if HAS_MOMENTUM:
        m_ptr = m_base + _offset(row, _M, M_SHIFT)
    else:
        m_ptr = m_base  # unused

    # The largest |g| met at each place, NaN once a NaN was met: not a usable number anywhere <=> not < the limit
    bad_acc = tl.zeros([BR, BC], tl.float32)
    row_start = row_block * ROWS_PER_TILE
    row_end = tl.minimum(row_start + ROWS_PER_TILE, n_rows)
    if PREFETCH:  # the first block's loads; each iteration then issues the next block's before its own work
        g_n, m_n, p_n, a_n = _load_block(
            row_start, row_end, cols, col_ok, n_cols, numel, g_ptr, m_ptr, p_ptr, prev_ptr, NDIM, HAS_MOMENTUM, BR
        )
    for r0 in range(row_start, row_end, BR):
        rows = r0 + tl.arange(0, BR)
        row_ok = rows < row_end
        offs = rows[:, None] * n_cols + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        if NDIM == 1:
            ok = ok & (offs < numel)
        # Every load of the block is issued first, so that the three streams are in flight together
        # (the reductions below synchronize the program's warps).
        if PREFETCH:
            g, m, p, a = g_n, m_n, p_n, a_n
            g_n, m_n, p_n, a_n = _load_block(
                r0 + BR, row_end, cols, col_ok, n_cols, numel, g_ptr, m_ptr, p_ptr, prev_ptr, NDIM, HAS_MOMENTUM, BR
            )
        else:
            g, m, p, a = _load_block(
                r0, row_end, cols, col_ok, n_cols, numel, g_ptr, m_ptr, p_ptr, prev_ptr, NDIM, HAS_MOMENTUM, BR
            )

        g = g.to(tl.float32)
        if grad_unscale != 1.0:  # uniform: no multiply unless GradScaler's scale is set
            g = g * grad_unscale
        if CENTRALIZE:
            g = g - tl.load(mean_ptr + rows, mask=row_ok, other=0.0)[:, None] * grad_unscale
        if MAXIMIZE:
            g = -g
        magnitude = tl.abs(g)
        usable = magnitude < _GRAD_LIMIT  # False for NaN
        bad_acc = tl.maximum(bad_acc, magnitude, propagate_nan=tl.PropagateNan.ALL)
        keep = (magnitude > eps) & usable
        g = tl.where(keep, g, 0.0)

        # Outside the tensor every load gave 0 (rows, columns and g), so there prev is 0 and, g being 0 and
        # not kept, nu is 0: neutral for the sums and (every nu being >= +0.0) for the maxima. Centralized,
        # g there is minus its row's mean, so nu is set to 0 there explicitly.
        if NDIM == 1:
            prev = a.to(tl.float32)
        elif FACTORED:
            prev = a[:, None] * col_prev[None, :]
        else:
            prev = tl.minimum(a[:, None], col_prev[None, :])
        nu = tl.where(keep, prev * beta + one_minus_beta * (g * g), prev)
        if CENTRALIZE and NDIM >= 2:
            nu_ok = tl.where(ok, nu, 0.0)
        else:
            nu_ok = nu
        if NDIM == 1 and v_ptr.dtype.element_ty == tl.float32:
            tl.store(v_ptr + offs, nu, mask=ok)
        elif NDIM == 1:  # rounded stochastically (offs is the flat index); the update uses v as stored
            v_stored = _round_stochastically(nu, v_ptr.dtype.element_ty, offs, v_k0, v_k1, INDEX32)
            tl.store(v_ptr + offs, v_stored, mask=ok)
            nu = v_stored.to(tl.float32)
        elif FACTORED:  # this program's sums: its rows over its columns, and (below) its columns over its rows
            row_sum = tl.sum(nu_ok, axis=1).to(tl.int32, bitcast=True)
            tl.store(acc0_new + col_block * n_rows + rows, row_sum, mask=row_ok)
            col_acc = col_acc + nu_ok
        else:
            nu_max = nu_ok
            row_max = tl.max(nu_max, axis=1)
            tl.atomic_max(acc0_new + rows, row_max.to(tl.int32, bitcast=True), mask=row_ok, sem="relaxed")
            col_acc = tl.maximum(col_acc, nu_max)

        if USE_RMS:
            u = tl.div_rn(g, tl.sqrt_rn(nu) + eps)
        else:
            u = g
        if HAS_MOMENTUM:
            m = m.to(tl.float32)
            # torch.lerp's two-sided formula, so the fp32 result matches the reference's m.lerp_(u, w).
            # (The side is uniform: a branch, not a select per element.)
            diff = u - m
            if momentum_weight < 0.5:
                m = m + momentum_weight * diff
            else:
                m = u - diff * (1.0 - momentum_weight)
            if m_ptr.dtype.element_ty == tl.float32:
                m_stored = m
            else:
                m_stored = _round_to(m, m_ptr.dtype.element_ty, HARDWARE_ROUNDING)
            tl.store(m_ptr + offs, m_stored, mask=ok)
            u = m_stored.to(tl.float32)  # the update uses the momentum as stored
        p = p.to(tl.float32) * decay
        p = p + (-lr) * u
        if p_ptr.dtype.element_ty == tl.float32:
            tl.store(p_ptr + offs, p, mask=ok)
        elif STOCHASTIC:
            rounded = _round_stochastically(p, p_ptr.dtype.element_ty, offs, round_k0, round_k1, INDEX32)
            tl.store(p_ptr + offs, rounded, mask=ok)
        else:
            tl.store(p_ptr + offs, _round_to(p, p_ptr.dtype.element_ty, HARDWARE_ROUNDING), mask=ok)

    bad = tl.max(tl.max(tl.where(bad_acc < _GRAD_LIMIT, 0, 1), axis=1), axis=0)
    tl.store(flags + tl.load(row + _FLAG), bad, mask=bad > 0)
    if FACTORED:
        col_sum = tl.sum(col_acc, axis=0).to(tl.int32, bitcast=True)
        col_sums = i32_base + _offset(row, _COL_SUMS, 0)
        tl.store(col_sums + row_block * n_cols + cols, col_sum, mask=col_ok)
    elif NDIM >= 2:
        col_bits = tl.max(col_acc, axis=0).to(tl.int32, bitcast=True)
        for k in tl.static_range(1, NDIM):
            acc_k_new = i32_base + _offset(row, _DIM_BASE + _DIM_SLOTS * (k - 1) + 3, 0)
            index = _dim_index(row, cols, k, NDIM)
            tl.atomic_max(acc_k_new + index, col_bits, mask=col_ok, sem="relaxed")


@triton.jit
def factored_scale_kernel(meta, f32_base, sums, BLOCK: tl.constexpr):
    """``S = mean(a0)`` of tensor ``program_id(0)`` of a launch into ``sums`` at its ``SCALE`` slot: the
    blocks of ``a0`` added in order, each reduced in a fixed order (cover="factored")."""
    row = meta + tl.program_id(0).to(tl.int64) * _META_WIDTH
    n_rows = tl.load(row + _ROWS)
    a0 = f32_base + tl.load(row + _ACC0_OLD)
    acc = tl.zeros([BLOCK], tl.float32)
    for r0 in range(0, n_rows, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        acc += tl.load(a0 + rows, mask=rows < n_rows, other=0.0)
    tl.store(sums + tl.load(row + _SCALE), tl.sum(acc, axis=0) / n_rows.to(tl.float32))


@triton.jit
def factored_finish_kernel(
    meta,
    f32_base,
    sums,
    row_chunks,  # programs along axis 1 below this one reduce row sums, the others column sums
    NDIM: tl.constexpr,
    ROWS_PER_TILE: tl.constexpr,
    BC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The new factored accumulators of tensor ``program_id(0)`` from the step's slots, each added in slot
    order: ``a0`` (the rows' sums over the column blocks, divided by the row length) and, for a 2-D tensor,
    ``a1`` (the columns' sums over the row blocks, divided by the rows); a tensor of more dims keeps its
    column sums in the first row of its slots, for the host to reduce to each ``a_k``."""
    row = meta + tl.program_id(0).to(tl.int64) * _META_WIDTH
    chunk = tl.program_id(1)
    n_rows = tl.load(row + _ROWS)
    n_cols = tl.load(row + _COLS)
    if chunk < row_chunks:
        rows = chunk * BLOCK + tl.arange(0, BLOCK)
        ok = rows < n_rows
        slots = sums + tl.load(row + _ACC0_NEW)
        acc = tl.zeros([BLOCK], tl.float32)
        for cb in range(0, tl.cdiv(n_cols, BC)):
            acc += tl.load(slots + cb * n_rows + rows, mask=ok, other=0.0)
        tl.store(f32_base + tl.load(row + _ACC0_OLD) + rows, acc / n_cols.to(tl.float32), mask=ok)
    else:
        cols = (chunk - row_chunks) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        slots = sums + tl.load(row + _COL_SUMS)
        acc = tl.zeros([BLOCK], tl.float32)
        for rb in range(0, tl.cdiv(n_rows, ROWS_PER_TILE)):
            acc += tl.load(slots + rb * n_cols + cols, mask=ok, other=0.0)
        if NDIM == 2:
            a1 = f32_base + tl.load(row + _DIM_BASE + 2)
            tl.store(a1 + cols, acc / n_rows.to(tl.float32), mask=ok)
        else:
            tl.store(slots + cols, acc, mask=ok)
