"""Shared fixtures: the engines every conformance test runs on, and a generator seeded per test."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

# Without a GPU, the Triton kernel is checked under Triton's CPU interpreter (tests/test_fused_cuda.py).
# Triton reads the switch when it is first imported, and torch.compile's tests import it early: set it here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fused_cpu_reason() -> str:
    try:  # a failure here must not break the collection of every test: it becomes the skip reason
        from fusedbun.engines import fused_cpu

        return fused_cpu.unavailable_reason()
    except Exception as exc:  # noqa: BLE001
        return f"fusedbun.engines.fused_cpu failed: {type(exc).__name__}: {exc}"


FUSED_CPU_REASON = _fused_cpu_reason()

# Constructor keywords that pin each engine: the single-tensor reference loop, the multi-tensor engine and,
# where it can run on this machine, the fused CPU engine (skipped with its reason otherwise).
ENGINE_PARAMS = [
    pytest.param({"foreach": False}, id="single"),
    pytest.param({"foreach": True}, id="foreach"),
    pytest.param(
        {"fused": True},
        id="fused",
        marks=pytest.mark.skipif(bool(FUSED_CPU_REASON), reason=f"fused CPU engine unavailable: {FUSED_CPU_REASON}"),
    ),
]
AVAILABLE_ENGINES = [p.values[0] for p in ENGINE_PARAMS if not (p.id == "fused" and FUSED_CPU_REASON)]


@pytest.fixture(params=ENGINE_PARAMS)
def engine(request) -> dict:
    """Keyword arguments of FusionOptimizer that select one engine (a fresh dict per test)."""
    return dict(request.param)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id (and the global RNG too, for nn.Module initialisation)."""
    seed = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
