"""The rule's constants are written once, in Python, and every copy the kernels see is checked against it.

The C kernel receives ``GRAD_LIMIT`` and its interface version as compile-time definitions, and its structs
are mirrored with ctypes; the loader compares the build's struct layout, constant and version with the
Python side and refuses a build that differs. The Triton kernel reads the same Python constants as
constexprs. These tests make each mirror drift on purpose and check that the drift is caught.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from fusedbun.adalite import GRAD_LIMIT
from fusedbun.engines import _cbuild, fused_cpu, triton_plan

PACKAGE = Path(fused_cpu.__file__).resolve().parents[1]


@pytest.fixture
def kernel(monkeypatch, tmp_path):
    """The C source built with the Python constants but without the loader's checks, so that a drift fails
    the tests below instead of making the engine unavailable (and these tests skipped)."""
    if _cbuild.find_compiler() is None:
        pytest.skip("no C compiler found (set $CC, or install cc, gcc or clang)")
    monkeypatch.setenv("FUSEDBUN_CACHE_DIR", str(tmp_path))
    library = _cbuild.SharedLibrary(fused_cpu.SOURCE, defines=fused_cpu.DEFINES, check=lambda lib: None)
    library.flag_sets = _cbuild.FLAG_SETS[-1:]
    lib, reason, _ = library.load()
    assert lib is not None, reason
    lib.fb_grad_limit.restype = ctypes.c_float
    return lib


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A library object of its own, building into a cache of its own, for one test."""
    if _cbuild.find_compiler() is None:
        pytest.skip("no C compiler found (set $CC, or install cc, gcc or clang)")
    monkeypatch.setenv("FUSEDBUN_CACHE_DIR", str(tmp_path))
    library = _cbuild.SharedLibrary(fused_cpu.SOURCE, defines=fused_cpu.DEFINES, check=fused_cpu._check_build)
    library.flag_sets = _cbuild.FLAG_SETS[-1:]  # one build (no OpenMP, no -march=native) is enough here
    return library


def test_the_c_structs_have_the_layout_of_their_ctypes_mirrors(kernel):
    task, hyper = fused_cpu.built_layout(kernel)
    assert task == fused_cpu.struct_layout(fused_cpu._Task)
    assert hyper == fused_cpu.struct_layout(fused_cpu._Hyper)


def test_the_build_holds_the_python_constants(kernel):
    assert kernel.fb_grad_limit() == GRAD_LIMIT
    assert kernel.fb_abi_version() == fused_cpu.ABI_VERSION


def test_the_engine_loads_its_checked_build():
    if _cbuild.find_compiler() is None:
        pytest.skip("no C compiler found (set $CC, or install cc, gcc or clang)")
    assert fused_cpu.unavailable_reason() == ""


def test_a_ctypes_mirror_that_drifts_is_refused_at_load(fresh_library, monkeypatch):
    fields = list(fused_cpu._Task._fields_)
    fields[8] = ("p_dtype", ctypes.c_int64)  # one field widened on the Python side only

    class Drifted(ctypes.Structure):
        _fields_ = fields

    monkeypatch.setattr(fused_cpu, "_Task", Drifted)
    lib, reason, _ = fresh_library.load()
    assert lib is None and "ctypes mirrors" in reason


def test_a_build_with_another_grad_limit_is_refused(fresh_library):
    fresh_library.defines = dict(fused_cpu.DEFINES, FB_GRAD_LIMIT="0x1p+63f")
    lib, reason, _ = fresh_library.load()
    assert lib is None and "GRAD_LIMIT" in reason


def test_a_build_of_another_interface_version_is_refused(fresh_library):
    fresh_library.defines = dict(fused_cpu.DEFINES, FB_ABI_VERSION=str(fused_cpu.ABI_VERSION + 1))
    lib, reason, _ = fresh_library.load()
    assert lib is None and "interface version" in reason


def test_the_c_source_does_not_compile_without_the_python_constants(fresh_library):
    fresh_library.defines = {k: v for k, v in fused_cpu.DEFINES.items() if k != "FB_GRAD_LIMIT"}
    lib, reason, _ = fresh_library.load()
    assert lib is None and "FB_GRAD_LIMIT" in reason


def test_no_module_writes_the_mask_bound_as_a_literal():
    # 2**64 is written once (fusedbun.adalite.GRAD_LIMIT); a literal copy elsewhere is a mirror nobody checks.
    literal = re.compile(r"18446744073709551616|2\.0\s*\*\*\s*64|0x1p\+?64|1\.8446744\d*e\+?19")
    found = [
        f"{path.relative_to(PACKAGE)}:{n}"
        for path in sorted(PACKAGE.rglob("*"))
        if path.suffix in (".py", ".c") and path.name != "adalite.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line.split("#")[0] if path.suffix == ".py" else line)
    ]
    assert not found, found


def test_the_triton_kernel_reads_the_plan_layout_and_the_mask_bound():
    pytest.importorskip("triton", reason="triton is not installed")
    from fusedbun.engines import triton_kernels as tk

    assert tk._GRAD_LIMIT.value == GRAD_LIMIT
    for name in ("P", "G", "M", "MEAN", "ROWS", "COLS", "NUMEL", "BETA", "ONE_MINUS_BETA", "ACC0_OLD", "ACC0_NEW"):
        assert getattr(tk, f"_{name}").value == getattr(triton_plan, name), name
    assert (tk._DIM_BASE.value, tk._DIM_SLOTS.value, tk._META_WIDTH.value) == (
        triton_plan.DIM_BASE,
        triton_plan.DIM_SLOTS,
        triton_plan.META_WIDTH,
    )
    assert triton_plan.META_WIDTH == triton_plan.DIM_BASE + triton_plan.DIM_SLOTS * (triton_plan.MAX_NDIM - 1)
