"""Wheels of the language-model benchmark's peer libraries, for a GPU machine that has no network.

    python -m benchmarks.gpu_wheels --out .whl           # download (pip) and slim, for CPython 3.12 x86_64
    pip install --no-index --no-deps .whl/*.whl           # on the GPU machine

``pip download`` fetches, for CPython 3.12 on manylinux x86_64 and without dependencies, the wheels in
:data:`WHEELS`: pytorch_optimizer (pure Python), torchao (one abi3 wheel for torch >= 2.11), bitsandbytes,
and accelerate with the two small dependencies it may lack (``transformers.Trainer`` needs accelerate).

The bitsandbytes wheel carries native libraries for every CUDA and ROCm release it supports (129 MB
unpacked, 43 MB packed). :func:`slim_wheel` rewrites it with the CUDA 13 libraries and the CPU one only,
under a build tag (``1cu13``) so the file says it is not the published wheel; its RECORD lists exactly the
files it holds, with their hashes. Nothing else in it changes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["WHEELS", "download", "slim_wheel", "main"]

WHEELS = (
    "pytorch_optimizer==4.1.0",
    "torchao==0.18.0",
    "bitsandbytes==0.50.2",
    "accelerate==1.15.0",
    "psutil==7.2.2",
    "PyYAML==6.0.4",
)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
BNB_KEEP = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so", "libbitsandbytes_cpu.so")
BUILD_TAG = "1cu13"


def download(requirement: str, out: Path, python_version: str = "3.12") -> Path:
    """``pip download`` one wheel for CPython ``python_version`` on manylinux x86_64; its path."""
    before = set(out.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(out)]
    cmd += ["--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + [requirement], check=True, capture_output=True, text=True)
    name = requirement.split("==")[0].lower().replace("-", "_")
    new = [w for w in set(out.glob("*.whl")) - before] or [
        w for w in out.glob("*.whl") if w.name.lower().startswith(name + "-")
    ]
    if not new:
        raise RuntimeError(f"pip download {requirement} left no wheel in {out}")
    return sorted(new)[-1]


def _record_hash(blob: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode()


def slim_wheel(wheel: Path, keep: Sequence[str] = BNB_KEEP, build_tag: str = BUILD_TAG) -> Path:
    """Rewrite a bitsandbytes wheel without the native libraries not named in ``keep``; the new wheel's
    name carries ``build_tag``. Returns its path (next to ``wheel``)."""
    name, version, *rest = wheel.name[: -len(".whl")].split("-")
    tags = rest[-3:]
    out = wheel.with_name("-".join([name, version, build_tag, *tags]) + ".whl")
    with zipfile.ZipFile(wheel) as src:
        entries = []
        for info in src.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and base not in keep:
                continue
            entries.append((info, src.read(info)))
    record_name = next(i.filename for i, _ in entries if i.filename.endswith(".dist-info/RECORD"))
    rows = []
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info, blob in entries:
            if info.filename == record_name:
                continue
            if info.filename.endswith(".dist-info/WHEEL"):
                lines = [ln for ln in blob.decode().splitlines() if ln.strip() and not ln.startswith("Build:")]
                blob = ("\n".join(lines) + f"\nBuild: {build_tag}\n").encode()
            dst.writestr(info, blob)
            rows.append(f"{info.filename},{_record_hash(blob)},{len(blob)}")
        rows.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(rows) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_wheels", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the wheels")
    p.add_argument("--python-version", default="3.12")
    p.add_argument("--full-bitsandbytes", action="store_true", help="keep every native library of bitsandbytes")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    wheels = []
    with tempfile.TemporaryDirectory() as tmp:
        for req in WHEELS:
            w = download(req, Path(tmp), args.python_version)
            if w.name.startswith("bitsandbytes-") and not args.full_bitsandbytes:
                w = slim_wheel(w)
            target = args.out / w.name
            target.write_bytes(w.read_bytes())
            wheels.append(target)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    print(f"{sum(w.stat().st_size for w in wheels) / 2**20:6.2f} MiB  in all, in {args.out}")
    return wheels


if __name__ == "__main__":
    main()
