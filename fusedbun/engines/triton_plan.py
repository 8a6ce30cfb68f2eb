"""The launch plans of the fused CUDA engine: the tables that tell the Triton kernel where each tensor is.

Everything here runs on the host and imports without Triton. A *plan* holds, for one list of tensors,
what a step's launches need and that does not change from step to step: one row of ``META_WIDTH``
int64 per tensor (element offsets of the parameter, gradient, momentum, row means and accumulators from
a base tensor of each kind, the sizes, and ``beta_t`` as fp32 bit patterns; the slots are named below)
and one row of 3 int32 per program (tensor, row block, column block), both on the device, plus the
buffers of the new accumulators. Plans are cached, keyed by every address, shape and dtype they depend
on. The layout constants here are the ones the kernel (:mod:`fusedbun.engines.triton_kernels`) reads.
"""

from __future__ import annotations

import struct
import warnings
from collections import OrderedDict

import torch
from torch import Tensor

from fusedbun.factored import factored_column_means_
from fusedbun.hessian import HESSIAN_DTYPES

__all__ = ["KernelConfig", "CONFIG", "MAX_NDIM", "META_WIDTH", "step_plan", "kernel_takes"]

# Layout of a row of the meta table (int64 slots). Locations are element offsets from the base pointers.
P, G, M, MEAN, ROWS, COLS, NUMEL, BETA, ONE_MINUS_BETA, ACC0_OLD, ACC0_NEW, FLAG, ROUND_K0, ROUND_K1 = range(14)
# cover="factored": where the tensor's S = mean(a0) is written for the step, and where its column sums go
SCALE, COL_SUMS = 14, 15
# A dense v of 16 bits (hessian_dtype=torch.bfloat16): the keys of the stream that rounds it stochastically
V_ROUND_K0, V_ROUND_K1 = 16, 17
DIM_BASE = 18  # then, for each dim k >= 1: size n_k, stride s_k (within a row), old a_k, new a_k
DIM_SLOTS = 4
MAX_NDIM = 6
META_WIDTH = DIM_BASE + DIM_SLOTS * (MAX_NDIM - 1)

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_PLANS = 16  # plans of whole lists (a step() of a param group): a few per optimizer
# Plans of one tensor: fusedbun.step_in_backward steps each parameter on its own, so a model of N tensors
# needs N of them every step. A plan's device memory is its table and O(n+m) scratch, so even thousands
# of one-tensor plans hold about as much as the SM3 accumulators they serve.
_MAX_SINGLE_PLANS = 4096
# The largest element offset the kernel may form in 32-bit arithmetic (tests lower it to run the 64-bit path)
INDEX32_LIMIT = 2**31 - 1
_FINISH_BLOCK = 1024  # numbers per program of the factored cover's scale and finishing kernels


class KernelConfig:
    """Tile shape of the kernel: a program owns ``rows_per_tile`` rows by ``block_cols`` columns and walks
    them ``elems_per_iter // block_cols`` rows at a time (``elems_per_iter_16bit`` when the parameter, the
    gradient or the momentum is bf16 or fp16); 0-D and 1-D tensors are cut into rows of ``dense_cols``
    numbers. ``prefetch`` issues the next rows' loads before working on the current ones.

    The defaults were the fastest of sweeps on an H100 and an H200 (``benchmarks/gpu_step.py --sweep`` and
    ``--sweep-bf16``): with 128 columns a warp holds whole rows, so a row's maximum needs no exchange between
    warps, and with the next rows' loads in flight while a block is worked on, the kernel keeps the memory
    busy. With 16-bit tensors a step moves fewer bytes per element, so it has less time per element for
    the same arithmetic: smaller blocks need fewer registers, so more programs share a multiprocessor and
    hide each other's latency."""

    def __init__(
        self,
        *,
        rows_per_tile=256,
        block_cols=128,
        elems_per_iter=2048,
        elems_per_iter_16bit=1024,
        dense_cols=1024,
        num_warps=4,
        prefetch=True,
        direct_launch=True,
    ):
        self.rows_per_tile = rows_per_tile
        self.block_cols = block_cols
        self.elems_per_iter = elems_per_iter
        self.elems_per_iter_16bit = elems_per_iter_16bit
        self.dense_cols = dense_cols
        self.num_warps = num_warps
        self.prefetch = prefetch
        # After a plan's first launch, launch the compiled kernel it keeps directly, past Triton's dispatch
        # (which re-derives the kernel from the arguments every time); any error falls back to the dispatch.
        self.direct_launch = direct_launch

    def as_dict(self) -> dict:
        return dict(vars(self))

    def key(self) -> tuple:
        return tuple(sorted(vars(self).items()))


CONFIG = KernelConfig()


def _f32_bits(x: float) -> int:
    """The bit pattern of ``x`` rounded to float32, as a non-negative int (for an int64 table slot)."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


def kernel_takes(p: Tensor, g: Tensor, m: Tensor | None, hess) -> bool:
    """Whether the kernel steps this tensor: contiguous tensors of its dtypes on one device, at most
    ``MAX_NDIM`` dims; a dense ``v`` in fp32 or bf16 (:data:`fusedbun.hessian.HESSIAN_DTYPES`; the kernel
    rounds a bf16 one stochastically), accumulators in fp32."""
    if p.dtype not in _KERNEL_DTYPES or g.dtype not in _KERNEL_DTYPES or p.dim() > MAX_NDIM:
        return False
    if m is not None and (m.dtype not in _KERNEL_DTYPES or not m.is_contiguous() or m.device != p.device):
        return False
    if g.device != p.device or not (p.is_contiguous() and g.is_contiguous()):
        return False
    if isinstance(hess, Tensor):
        return hess.is_contiguous() and hess.dtype in HESSIAN_DTYPES and hess.device == p.device
    return all(a.is_contiguous() and a.dtype == torch.float32 and a.device == p.device for a in hess)


def _block_cols(n_cols: int, cap: int) -> int:
    """Columns per block: the smallest of 16, 64 and ``cap`` that covers a row, else ``cap`` (few sizes, so
    few kernel variants to compile)."""
    for bc in sorted({16, 64, cap}):
        if n_cols <= bc:
            return bc
    return cap


class _Offsets:
    """Element offsets of tensors of one dtype from a base tensor, and whether all are 16-byte aligned."""

    def __init__(self, base: Tensor):
        self.base = base
        self.address = base.data_ptr()
        self.size = base.element_size()
        self.aligned = True

    def __call__(self, t: Tensor) -> int:
        delta = t.data_ptr() - self.address
        if delta % self.size:  # cannot happen for tensors of one dtype, which are aligned to their size
            raise RuntimeError("fused cuda engine: a tensor is not aligned to its element size")
        self.aligned &= t.data_ptr() % 16 == 0
        return delta // self.size

    def shift(self) -> int:
        """log2 of the elements in 16 bytes when every tensor seen is 16-byte aligned, else 0."""
        return (16 // self.size).bit_length() - 1 if self.aligned else 0


class _Plan:
    """What one launch needs that does not change from step to step, for one list of tensors: the tables
    on the device, and the buffers for the new accumulators (zeroed between steps) and the row means.

    A plan keeps no reference to the tensors themselves: the table holds element offsets from the first
    tensor of each kind, and each launch passes the current first tensors as the bases.
    """

    def __init__(
        self, items, positions, flags, *, ndim: int, bc: int, centralize: bool, config: KernelConfig, factored=False
    ):
        tk = _LAYOUT

        p0, g0, m0, h0 = items[0]
        device = p0.device
        dense = ndim == 1
        self.ndim, self.bc, self.centralize = ndim, bc, centralize and not dense
        narrow = any(t is not None and t.element_size() == 2 for t in (p0, g0, m0))
        per_iter = config.elems_per_iter_16bit if narrow else config.elems_per_iter
        self.br = max(1, per_iter // bc)
        self.rows_per_tile = max(config.rows_per_tile, self.br)
        self.num_warps, self.prefetch, self.direct_launch = config.num_warps, config.prefetch, config.direct_launch
        self.compiled: dict[tuple, object] = {}
        self.has_momentum = m0 is not None
        # A dense v of 16 bits is rounded stochastically on a stream of its own: its keys go into the table
        self.rounds_v = dense and h0.dtype != torch.float32
        self.flags = flags  # int32, one per tensor of the step's list; the kernel sets a tensor's at its position
        self.new_accs = self.means = None
        # factored (cover="factored"): per tensor its S, its slots of row sums (one per row and column block)
        # and of column sums (one per column and row block), all in new_accs; tensors of 3+ dims also keep
        # (column sums, accumulators, shape) for the host's reduction to a_k, k >= 1
        self.factored = factored and not dense
        self.factored_jobs: list[tuple] = []
        if self.factored:
            sizes = [self._factored_slots(item[0], bc) for item in items]
            self.new_accs = torch.empty(len(items) + sum(r + c for r, c in sizes), dtype=torch.float32, device=device)
            self.row_chunks = max(-(-item[0].shape[0] // _FINISH_BLOCK) for item in items)
            col_chunks = max(-(-(item[0].numel() // item[0].shape[0]) // _FINISH_BLOCK) for item in items)
            self.finish_grid = (len(items), self.row_chunks + col_chunks, 1)
        elif not dense:
            self.new_accs = torch.zeros(
                sum(a.numel() for item in items for a in item[3]), dtype=torch.float32, device=device
            )
        if self.centralize:
            self.means = torch.empty(sum(item[0].shape[0] for item in items), dtype=torch.float32, device=device)

        p_off, g_off, f_off = _Offsets(p0), _Offsets(g0), _Offsets(h0 if dense else h0[0])
        m_off = _Offsets(m0) if self.has_momentum else None
        cols_aligned = True
        # INDEX32: every element offset the kernel forms inside a tensor, a block of rows past the last
        # row included (those lanes are masked), fits an int32, so the kernel's index arithmetic is 32-bit.
        self.index32 = True
        table: list[int] = []
        grid_rows, grid_cols = [], []
        self.copy_src, self.mean_jobs = [], []
        acc_pos = len(items) if self.factored else 0  # a factored plan's S come first
        mean_pos = 0
        for t_index, ((p, g, m, hess), position) in enumerate(zip(items, positions)):
            row = [0] * tk.META_WIDTH
            row[tk.P], row[tk.G], row[tk.FLAG] = p_off(p), g_off(g), position
            if self.has_momentum:
                row[tk.M] = m_off(m)
            if dense:
                rows, cols = -(-p.numel() // bc), bc
                cols_aligned &= p.numel() % 16 == 0
                row[tk.ACC0_OLD] = f_off(hess)
            else:
                rows, cols = p.shape[0], p.numel() // p.shape[0]
                cols_aligned &= cols % 16 == 0
                sizes = [a.numel() for a in hess]
                views = self.new_accs[acc_pos : acc_pos + sum(sizes)].split(sizes)
                row[tk.ACC0_OLD], row[tk.ACC0_NEW] = f_off(hess[0]), acc_pos
                stride, pos = cols, acc_pos + sizes[0]
                for k in range(1, p.dim()):
                    stride //= p.shape[k]
                    base = tk.DIM_BASE + tk.DIM_SLOTS * (k - 1)
                    row[base : base + 4] = [p.shape[k], stride, f_off(hess[k]), pos]
                    pos += sizes[k]
                if self.factored:  # the slots of the sums take the place of the new maxima
                    row_slots, col_slots = self._factored_slots(p, bc)
                    row[tk.SCALE], row[tk.COL_SUMS] = t_index, acc_pos + row_slots
                    if p.dim() > 2:
                        col_sums = self.new_accs[acc_pos + row_slots : acc_pos + row_slots + cols]
                        self.factored_jobs.append((col_sums, hess[1:], tuple(p.shape)))
                    acc_pos += row_slots + col_slots
                else:
                    acc_pos += sum(sizes)
                    self.copy_src.extend(v.view_as(a) for v, a in zip(views, hess))
                if self.centralize:
                    row[tk.MEAN] = f_off(self.means[mean_pos:])
                    self.mean_jobs.append((rows, cols, self.means[mean_pos : mean_pos + rows]))
                    mean_pos += rows
            row[tk.ROWS], row[tk.COLS], row[tk.NUMEL] = rows, cols, p.numel()
            self.index32 &= (rows + self.rows_per_tile + self.br) * cols <= INDEX32_LIMIT
            table.extend(row)
            grid_rows.append(-(-rows // self.rows_per_tile))
            grid_cols.append(-(-cols // bc))
        pinned = device.type == "cuda"
        self.meta = _to_device(torch.tensor(table, dtype=torch.int64, pin_memory=pinned), device)
        self.meta = self.meta.view(len(items), tk.META_WIDTH)
        self.grid_tensors = len(items)
        self.tiles = _to_device(_tile_table(grid_rows, grid_cols, pinned), device)
        self.grid = (sum(r * c for r, c in zip(grid_rows, grid_cols)), 1, 1)
        self.shifts = dict(
            P_SHIFT=p_off.shift() if cols_aligned else 0,
            G_SHIFT=g_off.shift() if cols_aligned else 0,
            M_SHIFT=m_off.shift() if self.has_momentum and cols_aligned else 0,
            V_SHIFT=f_off.shift() if dense and cols_aligned else 0,
            COLS_SHIFT=4 if cols_aligned else 0,
        )

    def _factored_slots(self, p: Tensor, bc: int) -> tuple[int, int]:
        """Slots of row sums (one per row and column block) and of column sums (one per column and row
        block) of a factored tensor."""
        rows, cols = p.shape[0], p.numel() // p.shape[0]
        return -(-cols // bc) * rows, -(-rows // self.rows_per_tile) * cols

    def set_betas(self, betas: list[float] | None, device_betas: tuple[Tensor, Tensor] | None, index: list[int]):
        """Per-tensor decays into the table: from host floats (one small copy) or from device tensors."""
        tk = _LAYOUT

        if betas is not None:
            bits = [[_f32_bits(b), _f32_bits(1.0 - b)] for b in betas]
            src = torch.tensor(bits, dtype=torch.int64, pin_memory=self.meta.is_cuda)
            self.meta[:, tk.BETA : tk.BETA + 2].copy_(src, non_blocking=True)
        else:
            at = _to_device(torch.tensor(index, pin_memory=self.meta.is_cuda), self.meta.device)
            self.meta[:, tk.BETA] = device_betas[0][at].view(torch.int32).to(torch.int64)
            self.meta[:, tk.ONE_MINUS_BETA] = device_betas[1][at].view(torch.int32).to(torch.int64)

    def set_rounding(self, keys: list, *, hessian: bool = False) -> None:
        """Per-tensor keys of the stochastic rounding's random stream into the table (they change every
        step): host ints (one small copy) or 0-d device tensors (step counts kept on the device). The keys
        of the parameters' stream, or with ``hessian`` those of their bf16 ``v``'s."""
        tk = _LAYOUT
        k0 = tk.V_ROUND_K0 if hessian else tk.ROUND_K0
        if all(isinstance(k, int) for pair in keys for k in pair):
            src = torch.tensor(keys, dtype=torch.int64, pin_memory=self.meta.is_cuda)
            self.meta[:, k0 : k0 + 2].copy_(src, non_blocking=True)
        else:
            self.meta[:, k0 : k0 + 2] = torch.stack(
                [torch.stack([torch.as_tensor(k, device=self.meta.device) for k in pair]) for pair in keys]
            )

    def launch(self, p0, g0, m0, h0, grads, hessians, *, beta: float | None, hyper, stochastic: bool) -> None:
        """One step of the plan's tensors; ``p0, g0, m0, h0`` are the current first tensors (the bases of
        the offsets), ``grads`` and ``hessians`` the current lists (for the row means and the copy back)."""
        for (rows, cols, out), g in zip(self.mean_jobs, grads):
            torch.mean(g.view(rows, cols), dim=1, dtype=torch.float32, out=out)
        f32_base = h0 if self.ndim == 1 else h0[0]
        if self.factored:  # S = mean(a0) of every tensor, before any program changes an a0
            _kernels().factored_scale_kernel[(self.grid_tensors, 1, 1)](
                self.meta, f32_base, self.new_accs, BLOCK=_FINISH_BLOCK, num_warps=4
            )
        lr = float(hyper.lr)
        args = (
            self.tiles,
            self.meta,
            p0,
            g0,
            m0 if self.has_momentum else p0,
            f32_base,
            # The dense path has no new accumulators: any int32 tensor serves (a bf16 v may have no int32 view)
            self.flags if self.new_accs is None else self.new_accs.view(torch.int32),
            self.flags,
            lr,
            1.0 - lr * hyper.Lambda,
            hyper.eps,
            1.0 - hyper.momentum_beta,
            0.0 if beta is None else beta,
            0.0 if beta is None else 1.0 - beta,
            float(hyper.grad_unscale),
        )
        variant = (hyper.maximize, hyper.use_rms, beta is None, stochastic)
        compiled = self.compiled.get(variant) if self.direct_launch else None
        if compiled is not None:
            try:  # the launcher takes every argument in signature order, constexprs included (Triton 3.x)
                compiled[0][self.grid](*args, *compiled[1])
                return self._copy_back(hessians, f32_base)
            except (TypeError, IndexError, AttributeError, KeyError) as exc:  # another Triton's launcher
                self.direct_launch = False
                _warn_direct_launch_failed(exc)
        tk = _kernels()
        constexprs = dict(
            NDIM=self.ndim,
            HAS_MOMENTUM=self.has_momentum,
            CENTRALIZE=self.centralize,
            MAXIMIZE=hyper.maximize,
            USE_RMS=hyper.use_rms,
            ROWS_PER_TILE=self.rows_per_tile,
            BR=self.br,
            BC=self.bc,
            PREFETCH=self.prefetch,
            PER_TENSOR_BETA=beta is None,
            STOCHASTIC=stochastic,
            FACTORED=self.factored,
            INDEX32=self.index32,
            HARDWARE_ROUNDING=not _interpreting(),
            **self.shifts,
        )
        compiled = tk.fusion_step_kernel[self.grid](*args, **constexprs, num_warps=self.num_warps)
        if compiled is None:  # Triton's interpreter runs the kernel and returns nothing to launch again
            self.direct_launch = False
        else:
            names = tk.fusion_step_kernel.arg_names
            self.compiled[variant] = (compiled, tuple(constexprs[n] for n in names[len(args) :]))
        self._copy_back(hessians, f32_base)

    def _copy_back(self, hessians, f32_base) -> None:
        if self.factored:  # the slots added in order (a fixed-order reduction), then divided: the new means
            _kernels().factored_finish_kernel[self.finish_grid](
                self.meta,
                f32_base,
                self.new_accs,
                self.row_chunks,
                NDIM=self.ndim,
                ROWS_PER_TILE=self.rows_per_tile,
                BC=self.bc,
                BLOCK=_FINISH_BLOCK,
                num_warps=4,
            )
            for col_sums, accs, shape in self.factored_jobs:  # 3+ dims: the column sums to each a_k, k >= 1
                factored_column_means_(accs, col_sums, shape)
        elif self.new_accs is not None:  # the new maxima over the accumulators; zero for the next step
            torch._foreach_copy_([a for h in hessians for a in h], self.copy_src)
            self.new_accs.zero_()


def _interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when they were
    defined), whose float conversions do not round to nearest: the kernel then rounds with integer
    arithmetic."""
    import triton

    return not isinstance(_kernels().fusion_step_kernel, triton.runtime.JITFunction)


def _kernels():
    """:mod:`fusedbun.engines.triton_kernels`, imported on first use (it imports Triton)."""
    from fusedbun.engines import triton_kernels

    return triton_kernels


_DIRECT_LAUNCH_WARNED = False


def _warn_direct_launch_failed(exc: Exception) -> None:
    """Say once per process that the kept kernel could not be launched directly, and why; the engine goes on
    through Triton's dispatch (the same kernel, some microseconds more host time per launch)."""
    global _DIRECT_LAUNCH_WARNED
    if not _DIRECT_LAUNCH_WARNED:
        _DIRECT_LAUNCH_WARNED = True
        warnings.warn(
            "fusedbun's fused CUDA engine could not launch its compiled kernel directly "
            f"({type(exc).__name__}: {exc}); it launches through Triton's dispatch from now on",
            RuntimeWarning,
            stacklevel=4,
        )


class _Layout:
    """The slot numbers above, as attributes (``tk.P``), for the table builders."""

    P, G, M, MEAN, ROWS, COLS, NUMEL, BETA, ONE_MINUS_BETA = P, G, M, MEAN, ROWS, COLS, NUMEL, BETA, ONE_MINUS_BETA
    ROUND_K0, ROUND_K1, SCALE, COL_SUMS = ROUND_K0, ROUND_K1, SCALE, COL_SUMS
    V_ROUND_K0, V_ROUND_K1 = V_ROUND_K0, V_ROUND_K1
    ACC0_OLD, ACC0_NEW, FLAG, DIM_BASE, DIM_SLOTS, META_WIDTH = (
        ACC0_OLD,
        ACC0_NEW,
        FLAG,
        DIM_BASE,
        DIM_SLOTS,
        META_WIDTH,
    )


_LAYOUT = _Layout


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    return t.to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _tile_table(grid_rows: list[int], grid_cols: list[int], pinned: bool) -> Tensor:
    """(tensor, row block, column block) for every program of a launch."""
    entries = []
    for t, (nr, nc) in enumerate(zip(grid_rows, grid_cols)):
        for rb in range(nr):
            for cb in range(nc):
                entries.extend((t, rb, cb))
    return torch.tensor(entries, dtype=torch.int32, pin_memory=pinned)


class _StepPlan:
    """For one list of tensors: which of them the multi-tensor engine steps, and the kernel launches for
    the others (a plan, and the positions of its tensors in the list)."""

    def __init__(
        self, params, grads, momentum_buffers, exp_hessians, *, centralize: bool, config: KernelConfig, factored=False
    ):
        # A dense v of 2+ dims (cover="dense") takes the dense path, which does not centralize: such a tensor
        # goes to the multi-tensor engine when the group centralizes.
        takes = [
            kernel_takes(p, g, m, h) and not (centralize and p.dim() >= 2 and isinstance(h, Tensor))
            for p, g, m, h in zip(params, grads, momentum_buffers, exp_hessians)
        ]
        self.fallback = [i for i, ok in enumerate(takes) if not ok]
        self.kernel_positions = [i for i, ok in enumerate(takes) if ok]
        groups: dict[tuple, list[int]] = {}
        for i in self.kernel_positions:
            p, g, m = params[i], grads[i], momentum_buffers[i]
            if p.numel() == 0:
                continue  # nothing to update; its accumulators cover nothing (as in the reference)
            h = exp_hessians[i]
            if isinstance(h, Tensor):  # a dense v: 0-D, 1-D, or any shape with cover="dense"; fp32 or bf16
                ndim, bc, v_dtype = 1, config.dense_cols, h.dtype
            else:
                ndim, bc, v_dtype = p.dim(), _block_cols(p.numel() // p.shape[0], config.block_cols), None
            key = (p.device, p.dtype, g.dtype, None if m is None else m.dtype, v_dtype, bc, ndim)
            groups.setdefault(key, []).append(i)
        self.launches = []
        # Per device, one flag per tensor of the list (the kernel sets those of its tensors; zeroed per step).
        devices = dict.fromkeys(p.device for p in params)
        self.flags = {d: torch.zeros(len(params), dtype=torch.int32, device=d) for d in devices}
        for (device, *_, bc, ndim), idx in groups.items():
            items = [(params[i], grads[i], momentum_buffers[i], exp_hessians[i]) for i in idx]
            plan = _Plan(
                items,
                idx,
                self.flags[device],
                ndim=ndim,
                bc=bc,
                centralize=centralize,
                config=config,
                factored=factored,
            )
            self.launches.append((plan, idx))


_STEP_PLANS: OrderedDict = OrderedDict()  # both kinds, each bounded by its own limit (step_plan)


def step_plan(
    params, grads, momentum_buffers, exp_hessians, *, centralize: bool, config: KernelConfig, factored: bool = False
) -> _StepPlan:
    """The cached plan of these tensors, or a new one. The key holds every address, shape, dtype and
    layout fact the plan depends on, so a plan is reused only for tensors laid out as when it was built.
    The gradients enter by their layout alone (:func:`_layout`): the table holds their offsets from the
    first one, and each launch passes the current first gradient as the base. So gradients freed and
    allocated again elsewhere (``zero_grad(set_to_none=True)``, or :func:`fusedbun.step_in_backward`, which
    steps each parameter on its own, with a new gradient every step) reuse the plan."""
    # Built with map() and one tuple per fact: this runs before every launch, and the device idles meanwhile.
    data_ptr = Tensor.data_ptr
    key = (
        config.key(),
        centralize,
        factored,
        tuple(map(data_ptr, params)),  # addresses imply devices
        tuple(p.shape for p in params),
        tuple(p.dtype for p in params),
        _layout(grads),  # where they lie relative to each other, not where: gradients move between steps
        tuple(g.dtype for g in grads),
        tuple(map(Tensor.is_contiguous, grads)),
        tuple(0 if m is None else (m.data_ptr(), m.dtype) for m in momentum_buffers),
        tuple((h.data_ptr(), h.dtype) if isinstance(h, Tensor) else tuple(map(data_ptr, h)) for h in exp_hessians),
    )
    plan = _STEP_PLANS.get(key)
    if plan is None:
        plan = _StepPlan(
            params, grads, momentum_buffers, exp_hessians, centralize=centralize, config=config, factored=factored
        )
        _STEP_PLANS[key] = plan
        _evict(single=len(params) == 1)
    else:
        _STEP_PLANS.move_to_end(key)
    return plan


def _layout(tensors) -> tuple:
    """What a plan depends on of the tensors' addresses: the first one's alignment to 16 bytes and the
    others' byte offsets from it (the alignment of each follows)."""
    if not tensors:
        return ()
    base = tensors[0].data_ptr()
    return (base % 16, tuple(t.data_ptr() - base for t in tensors))


def _evict(*, single: bool) -> None:
    """Drop the least recently used plans of one kind (one tensor, or a list) beyond that kind's limit."""
    limit = _MAX_SINGLE_PLANS if single else _MAX_PLANS
    kind = [k for k in _STEP_PLANS if (len(k[3]) == 1) == single]
    for k in kind[: max(0, len(kind) - limit)]:
        del _STEP_PLANS[k]
