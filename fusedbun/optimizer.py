"""``FusionOptimizer``: the class that holds the state and composes the components into one step.

The class follows ``torch.optim`` conventions: it gathers each param group's tensors (``_init_group``)
and hands them to one functional entry point, :func:`fusion`, which dispatches to an engine. Chapters 1
and 5 of the book build this module.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, required

from fusedbun.engines.common import StepHyper, StepTensors, is_dtensor, load_dtensor_type
from fusedbun.engines.dispatch import step_tensors
from fusedbun.hessian import COVERS, HESSIAN_DTYPES
from fusedbun.nonfinite import MODES as _NONFINITE_MODES
from fusedbun.nonfinite import NonfiniteReports, finite_gradients
from fusedbun.rounding import ROUNDED_DTYPES
from fusedbun.sm3 import sm3_accumulators

__all__ = ["FusionOptimizer", "fusion"]

_FP32_TINY = torch.finfo(torch.float32).tiny


def _check_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ``TypeError`` or ``ValueError``, naming the argument and its valid range, for a bad value. The
    constructor's defaults may leave ``lr`` unset (``required``): each param group then carries its own."""
    lr = group["lr"]
    if lr is required:
        lr = 0.0  # checked in each group instead (add_param_group)
    if isinstance(lr, Tensor) and (lr.numel() != 1 or lr.is_complex()):
        raise ValueError(f"lr as a tensor must hold one real element, got shape {tuple(lr.shape)}, {lr.dtype}")
    lr_value = lr.item() if isinstance(lr, Tensor) else lr
    for name in ("lr", "eps", "beta_decay", "Lambda", "momentum_beta"):
        value = lr_value if name == "lr" else group[name]
        # float and int first: the ABC check of numbers.Real costs more than the rest of this function
        if type(value) not in (float, int) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"Invalid {name}: {value!r}; it must be a real number, not {type(value).__name__}")
    for name in ("centralize", "use_rms", "maximize"):
        if not isinstance(group[name], bool):
            raise TypeError(f"Invalid {name}: {group[name]!r}; it must be True or False")
    for name in ("foreach", "fused"):
        if group[name] is not None and not isinstance(group[name], bool):
            raise TypeError(f"Invalid {name}: {group[name]!r}; it must be None, True or False")
    if group["use_rms"] and 0 <= group["eps"] < _FP32_TINY:
        raise ValueError(
            f"Invalid eps: {group['eps']!r}; with use_rms=True it guards the division by sqrt(nu) + eps, which is "
            f"formed in fp32, so eps >= {_FP32_TINY:.4g} (the smallest normal fp32 number)"
        )
    checks = [
        ("lr", lr_value, lr_value >= 0, "lr >= 0"),
        ("eps", group["eps"], group["eps"] >= 0, "eps >= 0"),
        ("beta_decay", group["beta_decay"], 0 < group["beta_decay"] <= 1, "0 < beta_decay <= 1"),
        ("momentum_beta", group["momentum_beta"], 0 <= group["momentum_beta"] < 1, "0 <= momentum_beta < 1"),
        ("Lambda", group["Lambda"], group["Lambda"] >= 0, "Lambda >= 0"),
    ]
    for name, value, ok, valid in checks:
        if not (ok and math.isfinite(value)):
            raise ValueError(f"Invalid {name}: {value!r}; it must be finite with {valid}")
    if group.get("fused") and group.get("foreach"):
        raise ValueError("fused=True and foreach=True are mutually exclusive; set one of them")
    if group["nonfinite"] not in _NONFINITE_MODES:
        raise ValueError(f"Invalid nonfinite: {group['nonfinite']!r}; it must be one of {_NONFINITE_MODES}")
    dtype = group["momentum_dtype"]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"Invalid momentum_dtype: {dtype!r}; it must be None or a floating torch.dtype")
    if not isinstance(group["stochastic_rounding"], bool):
        raise TypeError(f"Invalid stochastic_rounding: {group['stochastic_rounding']!r}; it must be True or False")
    seed = group["rounding_seed"]
    if type(seed) is not int and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"Invalid rounding_seed: {seed!r}; it must be an int in [0, 2**63)")
    if not 0 <= seed < 2**63:
        raise ValueError(f"Invalid rounding_seed: {seed!r}; it must be an int in [0, 2**63)")
    _check_cover(group["cover"])
    _check_hessian_dtype(group["hessian_dtype"])


def _check_hessian_dtype(dtype: Any) -> None:
    """Raise ``ValueError`` naming ``hessian_dtype`` and its values (:data:`fusedbun.hessian.HESSIAN_DTYPES`)."""
    if dtype is not None and dtype not in HESSIAN_DTYPES:
        valid = ", ".join(f"torch.{str(d).removeprefix('torch.')}" for d in HESSIAN_DTYPES)
        raise ValueError(f"Invalid hessian_dtype: {dtype!r}; it must be None, {valid}")


def _check_cover(cover: Any) -> None:
    """Raise ``TypeError`` or ``ValueError`` naming ``cover`` and its values (:data:`fusedbun.hessian.COVERS`)."""
    valid = ", ".join(map(repr, COVERS))
    if not isinstance(cover, str):
        raise TypeError(f"Invalid cover: {cover!r}; it must be one of {valid}")
    if cover not in COVERS:
        raise ValueError(f"Invalid cover: {cover!r}; it must be one of {valid}")


class FusionOptimizer(Optimizer):
    r"""SM3's O(n+m) second moment fused with Adalite's centralization, momentum and decay, and an eps mask.

    .. math::
        \begin{aligned}
        &\textbf{input: } \eta \text{ (lr)},\ \epsilon \text{ (eps)},\ c \text{ (beta_decay)},\
            \lambda \text{ (Lambda)},\ \beta_m \text{ (momentum_beta)},\ \theta_0 \text{ (params)} \\
        &\textbf{init: } m_0 \leftarrow 0;\ v_0 \leftarrow 0 \text{ (0-D, 1-D)};\
            a^{(k)}_0 \leftarrow 0 \in \mathbb{R}^{n_k},\ k = 1..d \text{ (d-D, } d \ge 2) \\
        &\textbf{for } t = 1, 2, \dots \\
        &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) / s \text{ (s: GradScaler's loss scale, else 1)};\quad
            \textbf{if maximize: } g_t \leftarrow -g_t \\
        &\quad \textbf{if centralize and } d \ge 2:\ g_t \leftarrow g_t - \operatorname{mean}_{1..d-1}(g_t) \\
        &\quad M_t \leftarrow \epsilon < |g_t| < 2^{64};\quad g_t \leftarrow M_t\,?\ g_t : 0
            \quad \text{(NaN fails both: masked)} \\
        &\quad \beta_t \leftarrow 1 - t^{-c} \\
        &\quad \textbf{if } d \le 1:\ \nu_t \leftarrow v_t \leftarrow
            M_t\,?\ \beta_t v_{t-1} + (1-\beta_t) g_t^2 : v_{t-1} \\
        &\quad \textbf{else: } \mathrm{prev} \leftarrow \min_k a^{(k)}_{t-1};\quad
            \nu_t \leftarrow M_t\,?\ \beta_t\,\mathrm{prev} + (1-\beta_t) g_t^2 : \mathrm{prev};\quad
            a^{(k)}_t \leftarrow \max_{\text{all dims but } k} \nu_t \\
        &\quad u_t \leftarrow g_t / (\sqrt{\nu_t} + \epsilon) \textbf{ if use_rms else } g_t \\
        &\quad \textbf{if } \beta_m > 0:\ m_t \leftarrow \beta_m m_{t-1} + (1-\beta_m) u_t;\ u_t \leftarrow m_t \\
        &\quad \theta_t \leftarrow \theta_{t-1} (1 - \eta\lambda) - \eta\, u_t
            \text{ (bf16/fp16: rounded to nearest, or stochastically)} \\
        &\textbf{return } \theta_t
        \end{aligned}

    Args:
        params: parameters or param groups to optimize.
        lr: learning rate :math:`\eta`: a float or a one-element tensor (read at every step, which waits
            for the device if the tensor lives on one). No default: leave it out only when every param
            group sets its own ``lr``.
        eps: the mask threshold and the RMS denominator's guard :math:`\epsilon` (default 1e-8).
        beta_decay: :math:`c` in :math:`\beta_t = 1 - t^{-c}`, in (0, 1] (default 0.8).
        Lambda: decoupled weight decay :math:`\lambda` (default 0.01).
        momentum_beta: EMA momentum :math:`\beta_m` in [0, 1); 0 keeps no buffer (default 0.9).
        centralize: gradient centralization for tensors of 2 or more dims (default False).
        use_rms: divide by :math:`\sqrt{\nu}+\epsilon` (default False). The second moment is maintained either way.
        maximize: maximize the objective instead of minimizing it.
        foreach: ``True`` for the multi-tensor engine, ``False`` for the single-tensor reference loop.
        fused: ``True`` for the fused single-pass engine of the parameters' device (an error if it cannot
            run there), ``False`` never. With ``foreach`` and ``fused`` both ``None`` (default), the fused
            engine is used where it can run and the multi-tensor engine elsewhere.
        momentum_dtype: dtype of the momentum buffer; ``None`` (default) uses the parameter's dtype,
            ``torch.bfloat16`` halves its memory for fp32 parameters. The arithmetic is fp32 either way.
        nonfinite: what a gradient entry that is NaN, Inf or so large that its square overflows fp32
            (:math:`|g| \ge 2^{64}`) does (:mod:`fusedbun.nonfinite`). ``"mask"`` (default): it is masked
            like an entry at or below ``eps`` (no step from it, its second moment carried over), inside
            the step's one pass, and a ``RuntimeWarning`` names the parameters (for CUDA tensors at a
            later ``step()``: the step never waits for the device; under ``torch.compile`` no warning).
            ``"skip"``: a parameter whose gradient holds one, or whose squares sum past fp32's range
            (a 2-norm above about :math:`1.8 \cdot 10^{19}`, :func:`fusedbun.nonfinite.finite_gradients`),
            is left as it is for this step (parameter, state and step count), with a ``RuntimeWarning``;
            ``"raise"``: ``step`` raises ``FloatingPointError`` before changing anything. Both cost one
            more read of every gradient and a host sync per step.
        stochastic_rounding: round bf16 and fp16 parameters into their dtype stochastically instead of to
            nearest (default False), so that updates below half a unit in the last place still move them on
            average (:func:`fusedbun.stochastic_round`). The random stream is a counter hash of
            ``rounding_seed``, the parameter's position in the optimizer, its step count and each element's
            index: reproducible for the seed, the same on every engine and device, and identical across
            data-parallel replicas. fp32 and fp64 parameters and the momentum are never rounded this way.
        rounding_seed: the seed of that stream, an int in [0, 2**63) (default 0).
        cover: how a tensor of 2 or more dims keeps its second moment in O(sum of its dims) numbers.
            ``"sm3"`` (default): the rule above, SM3's maxima and their minimum, an upper bound of each
            entry. ``"factored"``: the per-dimension *means* of :math:`\nu`, multiplied back as in
            Adafactor, :math:`\mathrm{prev} = a^{(0)} \prod_{k \ge 1} a^{(k)} / \operatorname{mean}(a^{(0)})^{d-1}`
            (:mod:`fusedbun.factored`): exact for a rank-one second moment and closer to AdamW's dense
            one in training, with the same state. ``"dense"``: one :math:`v` per element for every tensor,
            updated as 0-D and 1-D tensors always are (AdamW's layout: the state is no longer O(n+m), and
            the rule is step 4's dense one; centralization is unchanged). 0-D and 1-D tensors keep their
            dense ``v`` whatever the cover.
        hessian_dtype: dtype of the dense second moments (0-D and 1-D tensors, and every tensor with
            ``cover="dense"``): ``None`` or ``torch.float32`` (default) or ``torch.bfloat16``, which halves
            them. A bf16 :math:`v` is computed in fp32 from the stored value, rounded stochastically into bf16
            (an EMA whose increments fall below half a bf16 unit would stop moving if rounded to nearest:
            :math:`1-\beta_t` is below :math:`2^{-8}` from step 1025 on), on a random stream of its own
            (:func:`fusedbun.rounding.hessian_key`, seeded by ``rounding_seed``), and the step normalizes by
            the value as stored. SM3's and the factored accumulators stay fp32 (O(n+m) numbers).

    With ``torch.amp.GradScaler``, ``scaler.step(opt)`` hands the loss scale to :meth:`step`, which divides
    it out inside the engines' pass and skips the whole step (parameters, state and step counts) when the
    scaler found Inf or NaN. :func:`fusedbun.step_in_backward` steps each parameter during backward instead.

    State per parameter: ``step`` (a float32 tensor), ``exp_hessian`` (for 0-D and 1-D parameters, and
    every parameter with ``cover="dense"``, a tensor of ``hessian_dtype`` shaped like the parameter;
    otherwise a list of fp32 accumulators, the k-th shaped ``[1, ..., n_k, ..., 1]``, so an (n, m) weight
    keeps n + m numbers) and ``momentum_buffer`` when ``momentum_beta > 0``. Low-precision parameters are
    updated with fp32 arithmetic and rounded once. Complex parameters are refused.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = required,
        eps: float = 1e-8,
        beta_decay: float = 0.8,
        Lambda: float = 0.01,
        momentum_beta: float = 0.9,
        centralize: bool = False,
        use_rms: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        momentum_dtype: torch.dtype | None = None,
        nonfinite: str = "mask",
        stochastic_rounding: bool = False,
        rounding_seed: int = 0,
        cover: str = "sm3",
        hessian_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            eps=eps,
            beta_decay=beta_decay,
            Lambda=Lambda,
            momentum_beta=momentum_beta,
            centralize=centralize,
            use_rms=use_rms,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            momentum_dtype=momentum_dtype,
            nonfinite=nonfinite,
            stochastic_rounding=stochastic_rounding,
            rounding_seed=rounding_seed,
            cover=cover,
            hessian_dtype=hessian_dtype,
        )
        _check_hyperparameters(defaults)
        load_dtensor_type()  # before any step that torch.compile may trace
        self._nonfinite_reports = NonfiniteReports()
        self._step_calls = 0
        self._in_backward = None  # the StepInBackward handle stepping this optimizer, if any
        self._positions: dict | None = None  # parameter -> (group index, key), built when needed
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "lr" not in param_group and self.defaults["lr"] is required:
            raise ValueError(
                f"param group {len(self.param_groups)} has no lr, and the optimizer has no default lr: "
                "give every param group an 'lr', or pass lr= to FusionOptimizer"
            )
        self._positions = None
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hyperparameters(group)
            for p in group["params"]:
                if torch.is_complex(p):
                    raise TypeError(
                        "FusionOptimizer does not support complex parameters; optimize "
                        "torch.view_as_real(p) as a real parameter instead"
                    )
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_nonfinite_reports", NonfiniteReports())
        self.__dict__.setdefault("_step_calls", 0)
        self.__dict__.setdefault("_in_backward", None)
        self.__dict__.setdefault("_positions", None)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                # torch adds "differentiable" to the defaults here; FusionOptimizer has no such option, and a
                # reloaded optimizer's state_dict must equal the original's
                if key != "differentiable":
                    group.setdefault(key, value)

    def _init_group(
        self, group: dict[str, Any], params: list, grads: list, momentum_buffers: list, steps: list
    ) -> None:
        """Append the group's tensors that have gradients to the lists (creating state on first use).

        Filling lists passed in, rather than returning them, is the ``torch.optim`` convention that
        ``torch.compile`` relies on: it runs ``_init_group`` eagerly and guards on the tensors appended
        (which must be tensors or None, so the lists of SM3 accumulators are gathered by the caller).
        """
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                if not p.is_floating_point():  # also a parameter put into group["params"] by hand
                    raise TypeError(
                        f"FusionOptimizer optimizes floating point parameters, got {p.dtype}; "
                        "for a complex parameter optimize torch.view_as_real(p) instead"
                    )
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                if p.dim() <= 1 or group["cover"] == "dense":
                    dtype = group["hessian_dtype"] or torch.float32
                    state["exp_hessian"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                elif is_dtensor(p):  # sharded parameter: accumulators are DTensors that follow its sharding
                    from fusedbun.distributed import dtensor_sm3_accumulators

                    state["exp_hessian"] = dtensor_sm3_accumulators(p)
                else:
                    state["exp_hessian"] = sm3_accumulators(p)
            if group["momentum_beta"] > 0 and "momentum_buffer" not in state:
                dtype = group["momentum_dtype"] or p.dtype
                state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            momentum_buffers.append(state.get("momentum_buffer") if group["momentum_beta"] > 0 else None)
            steps.append(state["step"])

    _step_supports_amp_scaling = True
    """``torch.amp.GradScaler`` hands the loss scale and its overflow flag to :meth:`step` (as the
    attributes ``grad_scale`` and ``found_inf``): the engines divide the scale out in their one pass, and a
    step with an overflow is skipped whole, instead of the scaler reading and writing every gradient."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        if self._in_backward is not None:
            raise RuntimeError(
                "this optimizer steps each parameter during backward (fusedbun.step_in_backward): the "
                "parameters are already stepped, so optimizer.step() must not be called; call the handle's "
                ".remove() to step it the usual way again"
            )
        if not torch.compiler.is_compiling():  # hyperparameters set in a group between steps are checked too
            for group in self.param_groups:
                _check_hyperparameters(group)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_unscale = self._amp_grad_unscale()
        if grad_unscale is None:  # GradScaler found Inf or NaN in the scaled gradients: skip the whole step
            return loss
        if not torch.compiler.is_compiling():
            self._step_calls += 1
        self._step_groups(list(enumerate(self.param_groups)), grad_unscale=grad_unscale)
        return loss

    def _amp_grad_unscale(self) -> float | None:
        """The factor that undoes GradScaler's loss scale (1 without one), or ``None`` when its ``found_inf``
        says that this step must be skipped. Reading them waits for the device, as GradScaler's own
        ``step`` does for optimizers that take no scale."""
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if grad_scale is None and found_inf is None:
            return 1.0
        values = [torch.as_tensor(found_inf if found_inf is not None else 0.0, dtype=torch.float32).cpu()]
        if grad_scale is not None:
            values.append(torch.as_tensor(grad_scale, dtype=torch.float32).cpu())
        values = [float(v) for v in values]
        if values[0] != 0.0:
            return None
        return 1.0 / values[1] if grad_scale is not None else 1.0

    def _step_groups(self, groups: list[tuple[int, dict[str, Any]]], *, grad_unscale: float = 1.0) -> None:
        """Step the parameters of ``(group index, group)`` pairs that have gradients."""
        # Gather every group, check the gradients of "skip" and "raise" groups at once, then step. That
        # check is the step's one host sync; under torch.compile it is a graph break, which must fall
        # outside any loop (a graph break inside a loop makes torch.compile give up on the whole step).
        # "mask" groups (the default) need no check: the engines mask and report in their one pass.
        gathered = []
        for group_index, group in groups:
            params, grads, momentum_buffers, steps = [], [], [], []
            self._init_group(group, params, grads, momentum_buffers, steps)
            exp_hessians = [self.state[p]["exp_hessian"] for p in params]
            keys = self._rounding_keys(group_index, group, params)
            gathered.append(
                (group_index, group, StepTensors(params, grads, momentum_buffers, exp_hessians, steps, keys))
            )
        checked = [g for _, group, t in gathered if group["nonfinite"] != "mask" for g in t.grads]
        keep_all = finite_gradients(checked) if checked else []

        work = []
        for group_index, group, tensors in gathered:
            if group["nonfinite"] != "mask":
                keep, keep_all = keep_all[: len(tensors.params)], keep_all[len(tensors.params) :]
            if not tensors.params:
                continue
            if group["nonfinite"] != "mask" and not all(keep):
                names = [i for i, ok in enumerate(keep) if not ok]
                if group["nonfinite"] == "raise":
                    raise FloatingPointError(
                        f"non-finite gradient in {len(names)} parameter(s) of param group {group_index} "
                        f"(positions {names} among those with gradients); nothing was updated"
                    )
                warnings.warn(
                    f"FusionOptimizer: skipped {len(names)} parameter(s) of param group {group_index} with "
                    f"non-finite gradients (positions {names} among those with gradients); their values and "
                    "state are unchanged",
                    RuntimeWarning,
                    stacklevel=3,
                )
                tensors = tensors.select([i for i, ok in enumerate(keep) if ok])
            work.append((group_index, group, tensors))

        compiling = torch.compiler.is_compiling()
        for group_index, group, tensors in work:
            lr = group["lr"]
            # Under torch.compile a tensor lr stays a tensor: .item() would break the graph.
            hyper = StepHyper.from_group(
                group, lr=lr.item() if isinstance(lr, Tensor) and not compiling else lr, grad_unscale=grad_unscale
            )
            found = step_tensors(
                tensors,
                hyper,
                foreach=group["foreach"],
                fused=group["fused"],
                find_nonfinite=group["nonfinite"] == "mask" and not compiling,
            )
            if found:
                self._nonfinite_reports.add(self._step_calls, group_index, found)
        if not compiling:
            self._nonfinite_reports.poll()

    def _rounding_keys(self, group_index: int, group: dict[str, Any], params: list[Tensor]) -> list[int] | None:
        """Each parameter's position in the optimizer (the numbering of ``state_dict()``), which keys its
        stochastic rounding and that of a bf16 second moment; ``None`` where the group needs neither."""
        if not group["stochastic_rounding"] and group.get("hessian_dtype") in (None, torch.float32):
            return None
        if self._positions is None:
            positions, k = {}, 0
            for gi, g in enumerate(self.param_groups):
                for p in g["params"]:
                    positions.setdefault(p, (gi, k))
                    k += 1
            self._positions = positions
        return [self._positions[p][1] for p in params]

    def _step_parameter(self, param: Tensor) -> None:
        """Step one parameter as :meth:`step` would (its group's hyperparameters, engine and state); the
        entry point of :func:`fusedbun.step_in_backward`."""
        if self._positions is None or param not in self._positions:
            self._positions = None
            self._rounding_keys(0, {"stochastic_rounding": True}, [])
        group_index, _ = self._positions[param]
        group = self.param_groups[group_index]
        _check_hyperparameters(group)
        self._step_groups([(group_index, {**group, "params": [param]})])
        self._opt_called = True  # what torch's LR schedulers look at to tell that the optimizer stepped

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; state tensors keep the dtype they were saved in (fp32 statistics of a bf16
        parameter stay fp32), and a state that does not fit the parameters raises ``ValueError``.

        Load pre-hooks run first (as in ``torch.optim``), so a hook that migrates an older layout is
        validated and loaded like any other state dict; post-hooks run after the dtypes are restored.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        groups = self.param_groups
        if len(saved_groups) != len(groups):
            raise ValueError(f"the state dict has {len(saved_groups)} param groups, this optimizer {len(groups)}")
        pairs = []
        for g, sg in zip(groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"a param group of the state dict has {len(sg['params'])} parameters, "
                    f"the optimizer's has {len(g['params'])}"
                )
            pairs.extend((pid, p, sg.get("cover", "sm3")) for pid, p in zip(sg["params"], g["params"]))
        for pid, p, cover in pairs:
            if pid in saved_state:
                _check_saved_state(saved_state[pid], p, cover)
        # The hooks already ran (pre) or run below (post): the base class must not run them again.
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = (
            OrderedDict(),
            OrderedDict(),
        )
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = (
                pre_hooks,
                post_hooks,
            )
        # torch.optim casts floating state to the parameter's dtype; restore the saved dtypes exactly.
        for pid, p, _ in pairs:
            if pid not in saved_state:
                continue
            state = self.state[p]
            for key, saved in saved_state[pid].items():
                if key == "step":  # a number (older checkpoints) or a tensor anywhere: a float32 CPU tensor
                    state[key] = torch.tensor(float(saved), dtype=torch.float32)
                    continue
                if isinstance(saved, Tensor):
                    state[key] = saved.to(device=p.device, copy=True)
                elif isinstance(saved, (list, tuple)):
                    state[key] = [s.to(device=p.device, copy=True) for s in saved]
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _check_saved_state(saved: dict[str, Any], p: Tensor, cover: str = "sm3") -> None:
    """Refuse a saved state that cannot belong to ``p`` under the saved group's ``cover`` (another
    optimizer's, or another layout's)."""
    if "step" not in saved or "exp_hessian" not in saved:
        raise ValueError(
            f"the state dict does not look like FusionOptimizer's: a parameter's state has keys "
            f"{sorted(saved)}, expected 'step', 'exp_hessian' and, with momentum, 'momentum_buffer'"
        )
    hess = saved["exp_hessian"]
    if p.dim() <= 1 or cover == "dense":
        ok = isinstance(hess, Tensor) and hess.shape == p.shape
        expected = f"a tensor of shape {tuple(p.shape)}"
    else:
        expected_shapes = [tuple(a.shape) for a in sm3_accumulators(p.detach().to("meta"))]
        ok = isinstance(hess, (list, tuple)) and [tuple(h.shape) for h in hess] == expected_shapes
        expected = f"accumulators of shapes {expected_shapes}"
    buf = saved.get("momentum_buffer")
    if buf is not None and (not isinstance(buf, Tensor) or buf.shape != p.shape):
        ok = False
        expected += f" and a momentum_buffer of shape {tuple(p.shape)}"
    if not ok:
        raise ValueError(f"the state dict does not fit a parameter of shape {tuple(p.shape)}: expected {expected}")
    try:
        step = float(saved["step"])
    except (TypeError, ValueError, RuntimeError):
        step = math.nan
    if not (math.isfinite(step) and step >= 0 and step == int(step)):
        raise ValueError(f"the state dict holds an invalid step count {saved['step']!r}; expected a whole number >= 0")
    checked = [("exp_hessian", h) for h in (hess if isinstance(hess, (list, tuple)) else [hess])]
    for name, t in checked + ([("momentum_buffer", buf)] if buf is not None else []):
        if not t.is_floating_point() or not bool(t.isfinite().all()) or (name == "exp_hessian" and bool((t < 0).any())):
            raise ValueError(
                f"the state dict holds an invalid {name} for a parameter of shape {tuple(p.shape)}: "
                "it must be finite floating point (and, for exp_hessian, >= 0)"
            )


def fusion(
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
    foreach: bool | None = None,
    fused: bool | None = None,
    find_nonfinite: bool = False,
    cover: str = "sm3",
    rounding_seed: int = 0,
) -> list[Tensor] | None:
    r"""Functional form of one FusionOptimizer step over lists of tensors (see :class:`FusionOptimizer`).

    Sparse gradients take the lazy row-sparse path; dense ones are grouped by device and each group goes
    to the engine that :func:`fusedbun.engines.select_engine` picks from ``foreach`` and ``fused``
    (:func:`fusedbun.engines.step_tensors`).

    Gradient entries that are NaN, Inf or :math:`\ge 2^{64}` in magnitude are masked (see
    :func:`fusedbun.adalite.eps_mask`). With ``find_nonfinite``, returns one 0-d bool tensor per
    parameter, in order, on its engine's device: True where its gradient held such an entry. Reading
    them is left to the caller (for CUDA tensors a read waits for the step to finish). ``cover`` is the
    class's option of that name. A dense ``exp_hessian`` given in bf16 is rounded stochastically on the
    stream of ``rounding_seed`` with the parameter's position in ``params`` as its key.
    """
    _check_cover(cover)
    hyper = StepHyper(
        lr=lr,
        eps=eps,
        beta_decay=beta_decay,
        Lambda=Lambda,
        momentum_beta=momentum_beta,
        centralize=centralize,
        use_rms=use_rms,
        maximize=maximize,
        cover=cover,
        rounding_seed=rounding_seed,
    )
    rounded = any(isinstance(h, Tensor) and h.dtype in ROUNDED_DTYPES for h in exp_hessians)
    pairs = step_tensors(
        StepTensors(
            params, grads, momentum_buffers, exp_hessians, state_steps, list(range(len(params))) if rounded else None
        ),
        hyper,
        foreach=foreach,
        fused=fused,
        find_nonfinite=find_nonfinite,
    )
    if not find_nonfinite:
        return None
    found: list[Tensor | None] = [None] * len(params)
    for positions, flags in pairs:
        for i, flag in zip(positions, flags.unbind()):
            found[i] = flag
    return found
