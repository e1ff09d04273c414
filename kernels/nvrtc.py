"""Compile CUDA C to PTX with NVRTC through ctypes: no GPU, driver or CuPy needed.

CuPy's own ``compile_using_nvrtc`` queries the CUDA runtime for the device and driver
version and fails on a machine without a driver, so CI on a CPU machine calls the
NVRTC library directly. The library comes from the ``nvidia-cuda-nvrtc-cu12`` wheel, a
CUDA toolkit, or wherever ``cuda.pathfinder`` (a CuPy dependency) finds it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import sys


class NvrtcUnavailableError(RuntimeError):
    """No loadable NVRTC library was found."""


class NvrtcCompileError(RuntimeError):
    """NVRTC rejected a source; the message carries its compile log."""


def _candidate_paths() -> list[str]:
    """Places NVRTC may live, most specific first."""
    candidates: list[str] = []
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        candidates.append(load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception:  # pathfinder is optional, and raises different errors per platform
        pass
    pattern = "nvrtc64_*.dll" if sys.platform == "win32" else "libnvrtc.so*"
    try:
        import nvidia.cuda_nvrtc as wheel

        for root in wheel.__path__:
            found = glob.glob(os.path.join(root, "lib", pattern)) + glob.glob(os.path.join(root, "bin", pattern))
            # libnvrtc.alt.so is a variant with a different C++ runtime; prefer the plain one.
            candidates += sorted(path for path in found if ".alt." not in path)
    except ImportError:
        pass
    if found_by_linker := ctypes.util.find_library("nvrtc"):
        candidates.append(found_by_linker)
    for toolkit in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if toolkit:
            candidates += sorted(glob.glob(os.path.join(toolkit, "lib64", "libnvrtc.so*")))
    return candidates


@functools.cache
def load_library() -> ctypes.CDLL:
    """The first NVRTC library that loads, with the signatures we call declared."""
    errors = []
    for path in _candidate_paths():
        try:
            library = ctypes.CDLL(path)
        except OSError as error:
            errors.append(f"{path}: {error}")
            continue
        _declare_signatures(library)
        return library
    tried = "; ".join(errors) or "no candidate paths"
    raise NvrtcUnavailableError(f"NVRTC not found (pip install nvidia-cuda-nvrtc-cu12); tried: {tried}")


def _declare_signatures(library: ctypes.CDLL) -> None:
    pointer, size = ctypes.c_void_p, ctypes.c_size_t
    signatures = {
        "nvrtcVersion": [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)],
        "nvrtcCreateProgram": [
            ctypes.POINTER(pointer),
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_int,
            pointer,
            pointer,
        ],
        "nvrtcCompileProgram": [pointer, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        "nvrtcGetPTXSize": [pointer, ctypes.POINTER(size)],
        "nvrtcGetPTX": [pointer, ctypes.c_char_p],
        "nvrtcGetCUBINSize": [pointer, ctypes.POINTER(size)],
        "nvrtcGetCUBIN": [pointer, ctypes.c_char_p],
        "nvrtcGetProgramLogSize": [pointer, ctypes.POINTER(size)],
        "nvrtcGetProgramLog": [pointer, ctypes.c_char_p],
        "nvrtcDestroyProgram": [ctypes.POINTER(pointer)],
    }
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int


def version() -> tuple[int, int]:
    """(major, minor) of the loaded NVRTC."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(load_library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(status: int, call: str) -> None:
    if status != 0:
        raise NvrtcCompileError(f"{call} failed with nvrtcResult {status}")


def _read(program: ctypes.c_void_p, size_call: str, read_call: str) -> bytes:
    library = load_library()
    size = ctypes.c_size_t()
    _check(getattr(library, size_call)(program, ctypes.byref(size)), size_call)
    buffer = ctypes.create_string_buffer(size.value)
    _check(getattr(library, read_call)(program, buffer), read_call)
    return buffer.raw


def compile_source(source: str, name: str, arch: str = "sm_90", output: str = "ptx",
                   options: tuple[str, ...] = ()) -> bytes:
    """Compile ``source`` for ``arch`` (like "sm_90") to PTX text or to a CUBIN (ELF) image.

    PTX targets the virtual architecture (compute_90) and is what ships; a CUBIN also
    runs NVRTC's built-in assembler, which catches errors in inline PTX that PTX
    generation alone lets through. `options` are further NVRTC flags.
    """
    if output not in ("ptx", "cubin"):
        raise ValueError(f"output must be 'ptx' or 'cubin', got {output!r}")
    if not arch.startswith(("sm_", "compute_")):
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    number = arch.split("_", 1)[1]
    flag = f"--gpu-architecture={'compute' if output == 'ptx' else 'sm'}_{number}"
    library = load_library()
    program = ctypes.c_void_p()
    _check(
        library.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(), 0, None, None),
        "nvrtcCreateProgram",
    )
    try:
        flags = [flag.encode(), *(option.encode() for option in options)]
        if library.nvrtcCompileProgram(program, len(flags), (ctypes.c_char_p * len(flags))(*flags)) != 0:
            log = _read(program, "nvrtcGetProgramLogSize", "nvrtcGetProgramLog").rstrip(b"\0").decode(errors="replace")
            raise NvrtcCompileError(f"{name} failed to compile for {arch}:\n{log}")
        if output == "ptx":
            return _read(program, "nvrtcGetPTXSize", "nvrtcGetPTX").rstrip(b"\0")
        return _read(program, "nvrtcGetCUBINSize", "nvrtcGetCUBIN")
    finally:
        library.nvrtcDestroyProgram(ctypes.byref(program))
