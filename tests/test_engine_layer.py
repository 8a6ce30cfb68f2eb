"""The package's layering and the engine layer's small contracts.

Components (``adalite``, ``sm3``, ``factored``, ``hessian``, ``rounding``, ``distributed``) <- engines (``engines/``) <-
the optimizer (``optimizer``, ``backward``) <- the book: no module imports from a layer above its own.
"""

from __future__ import annotations

import ast
import importlib.metadata
import warnings
from pathlib import Path

import pytest

import fusedbun
from fusedbun.engines import Engine, StepHyper, StepTensors, triton_plan

PACKAGE = Path(fusedbun.__file__).resolve().parent
LAYERS = {  # module (relative to the package) -> its layer; a module may import from its layer or below
    "adalite": 0,
    "sm3": 0,
    "factored": 0,
    "hessian": 0,
    "rounding": 0,
    "param_groups": 0,
    "distributed": 0,
    "engines": 1,
    "nonfinite": 2,
    "optimizer": 2,
    "backward": 2,
    "book": 3,
    "__init__": 3,
}


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return LAYERS[top]


def _imports(path: Path) -> set[str]:
    """The fusedbun modules a source file imports, anywhere in it (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fusedbun"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fusedbun"))
    return {m.removeprefix("fusedbun").lstrip(".") or "__init__" for m in found}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above_its_own(path):
    module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    own = _layer(module)
    above = sorted(m for m in _imports(path) if _layer(m) > own)
    assert not above, f"{module} (layer {own}) imports {above}"


def test_every_engine_has_the_one_engine_signature():
    import inspect

    from fusedbun.engines import dtensor, foreach, fused_cpu, fused_cuda, single_tensor, sparse

    engines = [
        single_tensor.single_tensor_fusion,
        foreach.foreach_fusion,
        fused_cpu.fused_fusion,
        fused_cuda.fused_fusion,
        sparse.sparse_fusion,
        dtensor.dtensor_fusion,
    ]
    expected = list(inspect.signature(Engine.__call__).parameters)[1:]
    for engine in engines:
        assert list(inspect.signature(inspect.unwrap(engine)).parameters) == expected, engine.__module__


def test_step_hyper_comes_from_a_param_group_and_keeps_every_hyperparameter():
    opt = fusedbun.FusionOptimizer([_param()], lr=0.1)
    hyper = StepHyper.from_group(opt.param_groups[0])
    for name in ("lr", "eps", "beta_decay", "Lambda", "momentum_beta", "centralize", "use_rms", "maximize"):
        assert getattr(hyper, name) == opt.param_groups[0][name], name
    assert hyper.stochastic_rounding is False and hyper.grad_unscale == 1.0


def _param():
    import torch

    return torch.nn.Parameter(torch.randn(3))


def test_step_tensors_select_keeps_the_keys_aligned():
    t = StepTensors([1, 2, 3], [4, 5, 6], [None] * 3, [7, 8, 9], [0, 0, 0], keys=[10, 11, 12])
    assert t.select([2, 0]) == StepTensors([3, 1], [6, 4], [None, None], [9, 7], [0, 0], keys=[12, 10])
    assert StepTensors([1], [2], [None], [3], [0]).select([0]).keys is None


def test_the_direct_launch_fallback_warns_once_with_its_reason(monkeypatch):
    monkeypatch.setattr(triton_plan, "_DIRECT_LAUNCH_WARNED", False)
    with pytest.warns(RuntimeWarning, match="TypeError: the launcher changed"):
        triton_plan._warn_direct_launch_failed(TypeError("the launcher changed"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triton_plan._warn_direct_launch_failed(TypeError("again"))  # once per process


def test_the_version_is_written_once():
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'attr = "fusedbun.__version__"' in text
    try:
        installed = importlib.metadata.version("fusedbun")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fusedbun is not installed as a distribution here")
    assert installed == fusedbun.__version__
