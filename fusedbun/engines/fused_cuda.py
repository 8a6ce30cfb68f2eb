"""Placeholder until the fused cuda engine lands: it reports itself unavailable, so nothing selects it."""

from __future__ import annotations


def unavailable_reason() -> str:
    return "the fused cuda engine is not built yet"


def fused_fusion(*args, **kwargs) -> None:
    raise RuntimeError(unavailable_reason())
