"""Native onnxruntime kernels for the `road` ops, compiled on first use with the machine's C++ compiler.

Files from road-export run on stock onnxruntime through the ops' standard-op function bodies. A session that
registers this library runs each `road.Rotate` / `road.RotateTied` node as one kernel instead, which reads X
once and writes Y once, about the cost of a single Mul; the function bodies need 4 to 6 kernels per rotation.
onnxruntime prefers a registered kernel to a model-local function, so the file itself does not change.

The onnxruntime wheels ship no C headers, so the source declares the few C ABI entries it calls
(`ort_abi.h`) and builds with any C++17 compiler (`$CXX`, else c++, g++ or clang++). The library is cached
under `$ROAD_EXPORT_CACHE` (default `~/.cache/road-export`), keyed by its source, flags and compiler.

The same library holds CUDA kernels for the two ops (`road_cuda.h`), registered for onnxruntime's
CUDAExecutionProvider where the CUDA driver (libcuda.so.1) and NVRTC (libnvrtc, e.g. the `nvidia-cuda-nvrtc`
wheel) can be opened: the kernel is compiled by NVRTC at first use for the GPU's architecture and its cubin is
cached in the same directory. `cuda_kernels()` says whether they are there, or why not. Where cuBLAS opens too
(onnxruntime-gpu's own copy), `road.MatMulRotate` / `road.MatMulRotateRows` register for CUDA as well: a GEMM and
the rotation as one node (`matmul_kernels()`; road_export/passes/matmul_rotate.py writes them).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from road_export.core.errors import RoadError, first_line
from road_export.graph.files import atomic_write

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("road_ort.cc", "ort_abi.h", "road_cuda.h")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
LIBS = ("-ldl",)  # dlopen of the CUDA driver and NVRTC (in libc itself from glibc 2.34)
COMPILERS = ("c++", "g++", "clang++")


def cache_dir() -> Path:
    """Where built kernels live: `$ROAD_EXPORT_CACHE`, else `$XDG_CACHE_HOME/road-export` or `~/.cache/road-export`."""
    root = os.environ.get("ROAD_EXPORT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "road-export"


def compiler() -> str:
    """The C++ compiler to build with: $CXX, else the first of c++, g++, clang++ on PATH."""
    chosen = os.environ.get("CXX")
    if chosen:
        path = shutil.which(chosen)
        if not path:
            raise RoadError(f"CXX={chosen!r} is not an executable compiler; point CXX at a C++17 compiler")
        return path
    for name in COMPILERS:
        path = shutil.which(name)
        if path:
            return path
    raise RoadError("no C++ compiler found to build the road kernels; install g++ (or set CXX), "
                    "or run the road ops on their standard-op bodies (native=False / --no-native)")


def _key(cxx: str) -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    digest.update("\0".join((*FLAGS, *LIBS, version, platform.machine(), platform.system())).encode())
    return digest.hexdigest()[:16]


@functools.cache
def library_path() -> Path:
    """The compiled kernel library, built now if this machine has none for the current source."""
    cxx = compiler()
    target = cache_dir() / f"libroad_ort-{_key(cxx)}.so"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RoadError(f"cannot create the kernel cache {target.parent} ({e.strerror}); set ROAD_EXPORT_CACHE "
                        "to a writable directory") from e
    # atomic (road_export.graph.files): a concurrent build of the same key writes the same bytes, an interrupted one
    # nothing
    with atomic_write(target) as tmp:
        command = [cxx, *FLAGS, "-o", str(tmp), str(SOURCE_DIR / SOURCES[0]), *LIBS]
        logger.info("building the road kernels: %s", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
            raise RoadError(f"building the road kernels with {cxx} failed: {first}")
    return target


def _wheel_library(*relative: str) -> Path | None:
    """The first of `relative` (paths of an nvidia-* wheel's library under site-packages) found on sys.path."""
    import sys

    for root in sys.path:
        for rel in relative:
            candidate = Path(root or ".") / rel
            if candidate.is_file():
                return candidate
    return None


def nvrtc_path() -> Path | None:
    """libnvrtc from the `nvidia-cuda-nvrtc` wheel (CUDA 13 or 12 layout) on sys.path, else None (the library
    then tries the system's libnvrtc.so.13 / .12 through the dynamic loader)."""
    return _wheel_library("nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
                          "nvidia/cu12/lib/libnvrtc.so.12")


def cublas_path() -> Path | None:
    """libcublas from the `nvidia-cublas` wheel (CUDA 13 or 12 layout) on sys.path, else None (the library then
    takes the copy onnxruntime's CUDA provider loaded, or the system's libcublas.so.13 / .12)."""
    return _wheel_library("nvidia/cu13/lib/libcublas.so.13", "nvidia/cublas/lib/libcublas.so.12",
                          "nvidia/cu12/lib/libcublas.so.12")


def _loadable(*names: str) -> bool:
    import ctypes

    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


@functools.cache
def cuda_kernels() -> str | None:
    """None when the library registers its CUDA kernels on this machine, else the reason it does not."""
    import onnxruntime as ort

    if os.environ.get("ROAD_EXPORT_CUDA") == "0":
        return "ROAD_EXPORT_CUDA=0"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"
    if not _loadable("libcuda.so.1"):
        return "no CUDA driver (libcuda.so.1)"
    found = nvrtc_path()
    if not _loadable(*([str(found)] if found else []), "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"):
        return "no NVRTC (pip install nvidia-cuda-nvrtc, matching the CUDA of onnxruntime-gpu)"
    return None


@functools.cache
def matmul_kernels() -> str | None:
    """None when the library also registers `road.MatMulRotate` / `road.MatMulRotateRows` for CUDA (the CUDA kernels
    plus cuBLAS), else the reason it does not."""
    why = cuda_kernels()
    if why is not None:
        return why
    found = cublas_path()
    if not _loadable(*([str(found)] if found else []), "libcublas.so.13", "libcublas.so.12", "libcublas.so.11",
                     "libcublas.so"):
        return "no cuBLAS (pip install nvidia-cublas, matching the CUDA of onnxruntime-gpu)"
    return None


def _environment() -> None:
    """Tell the library where to cache cubins and which libnvrtc to open (read at its first CUDA use), and, under
    an onnxruntime without the CUDA provider, to leave the CUDA driver alone (ROAD_EXPORT_CUDA=0)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        os.environ.setdefault("ROAD_EXPORT_CUDA", "0")
    os.environ.setdefault("ROAD_EXPORT_KERNEL_CACHE", str(cache_dir()))
    found = nvrtc_path()
    if found:
        os.environ.setdefault("ROAD_EXPORT_NVRTC", str(found))
    found = cublas_path()
    if found:
        os.environ.setdefault("ROAD_EXPORT_CUBLAS", str(found))


def uses_road(path: str | Path) -> bool:
    """Whether an ONNX file imports the `road` domain; not ONNX, or unreadable: False (its loader will say why)."""
    try:
        return "road" in opset_domains(path)
    except (OSError, ValueError):
        return False


def opset_domains(path: str | Path) -> set[str]:
    """The domains of a model's opset_import, read off the file's top-level protobuf fields: the graph, which
    holds the weights of a model without external data, is skipped rather than parsed."""
    from onnx import OperatorSetIdProto

    opset_import = 8  # ModelProto field number
    domains = set()
    with open(path, "rb") as f:
        while (key := _varint(f)) is not None:
            field, wire = key >> 3, key & 7
            if wire == 0:
                _varint(f)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            elif wire == 2:
                length = _varint(f)
                if length is None:
                    raise ValueError("truncated field")
                if field == opset_import:
                    domains.add(OperatorSetIdProto.FromString(f.read(length)).domain)
                else:
                    f.seek(length, os.SEEK_CUR)
            else:
                raise ValueError(f"not an ONNX model (wire type {wire})")
    return domains


def _varint(f) -> int | None:
    result = shift = 0
    while byte := f.read(1):
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("not an ONNX model (bad varint)")
    if shift:
        raise ValueError("truncated varint")
    return None


def register(options, native: bool | None = None) -> bool:
    """Register the kernels on onnxruntime `SessionOptions`; returns whether they were.

    native=None registers them when they can be built and otherwise logs why not (the function bodies then
    run); True raises RoadError when they cannot; False leaves the options alone.
    """
    if native is False:
        return False
    try:
        _environment()
        options.register_custom_ops_library(str(library_path()))
    except RoadError as e:
        if native:
            raise
        logger.warning("road kernels unavailable, running the standard-op bodies: %s", e)
        return False
    except Exception as e:  # onnxruntime refused the library
        message = f"onnxruntime cannot load the road kernels ({first_line(e)})"
        if native:
            raise RoadError(message) from e
        logger.warning("%s; running the standard-op bodies", message)
        return False
    return True
