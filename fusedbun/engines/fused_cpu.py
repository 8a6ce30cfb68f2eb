"""Placeholder until the fused cpu engine lands: it reports itself unavailable, so nothing selects it."""

from __future__ import annotations


def unavailable_reason() -> str:
    return "the fused cpu engine is not built yet"


def fused_fusion(*args, **kwargs) -> None:
    raise RuntimeError(unavailable_reason())
