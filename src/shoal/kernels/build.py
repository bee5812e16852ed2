"""Build and load the C++ CPU kernels (`csrc/*.cpp`) once per machine.

The sources are compiled with the system's C++ compiler (`$CXX`, else g++ or c++) into one shared
library under `$SHOAL_KERNEL_CACHE` (default `~/.cache/shoal/kernels`), keyed by a hash of the
sources, the flags, the compiler and the CPU's feature flags (`-march=native` code must not run
on another CPU), and loaded with ctypes. A few seconds to build (the sources in parallel: ~5 s
on 2 cores, measured); later processes load the cached file. No compiler, a failed build or
`SHOAL_CPU_KERNELS=0`: `library()` returns None and callers keep their PyTorch paths
(`reason()` says why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))  # elementwise, attention (+ decode_attention_int8), lora, qlinear(+_dot, _fma), q4linear(+_amx), sampling (+ row_stats), llama_decode, prefill_attention; headers beside them
# no -ffast-math: the kernels round where PyTorch rounds; no FMA contraction, so a product
# plus a product rounds as PyTorch's separate ops do
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
         "-shared", "-fPIC", "-std=c++17"]
ABI = 15  # shoal_kernels_abi() of the source this module's signatures describe

_reason = "not loaded yet"

i64, vp, ci, cf = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
SIGNATURES = {  # argument types of each entry point (all return int: 0 = done, 1 = unsupported dtype)
    "shoal_rms_norm": [ci, vp, i64, vp, i64, vp, i64, vp, vp, i64, i64, i64, cf],
    "shoal_rope": [ci, vp, i64, i64, i64, i64, vp, vp],
    "shoal_cache_write": [ci, vp, i64, vp, i64, i64, i64, i64, vp, ci, vp, vp, i64, vp, vp],
    "shoal_decode_attention": [ci, vp, i64, vp, i64, i64, i64, i64, ci, vp, vp, i64, vp, vp, i64,
                               cf, vp, i64, vp, vp],
    "shoal_prefill_attention": [ci, vp, i64, i64, i64, i64, vp, vp, i64, i64, vp, vp, vp, vp, i64, cf,
                                vp, i64, ci, vp, vp],
    "shoal_prefill_attention_isa": [],
    "shoal_table_slots": [vp, vp, vp, i64, i64, i64, vp, vp, vp],
    "shoal_silu_mul": [ci, vp, i64, i64, i64, vp],
    "shoal_lora_bgmv": [ci, ci, vp, i64, i64, i64, vp, i64, i64, vp, vp, vp, vp, vp, vp, vp, vp, ci, vp, vp],
    "shoal_lora_int8": [],
    "shoal_fetch_l2": [ci, ci],
    "shoal_omp_release": [],
    "shoal_dot2_check": [i64, vp, vp, vp, vp, vp],
    "shoal_bf16_round": [i64, vp, vp],
    "shoal_amx_ready": [],
    "shoal_packed_isa": [ci],
    "shoal_qpack": [vp, i64, i64, vp],
    "shoal_bpack": [vp, i64, i64, vp],
    "shoal_qlinear": [vp, i64, i64, i64, vp, vp, vp, i64, vp, i64, ci],
    "shoal_blinear": [vp, i64, i64, i64, vp, vp, i64, vp, i64, ci],
    "shoal_q4linear": [vp, i64, i64, i64, vp, vp, i64, vp, i64, ci],
    "shoal_q4_quantize": [vp, i64, i64, i64, vp, vp, vp, ci],
    "shoal_row_stats": [ci, vp, i64, i64, i64, vp, vp, vp],
    "shoal_sample_rows": [ci, vp, i64, i64, i64, vp, vp, vp, vp, vp, vp, vp, vp],
    "shoal_decode_profile": [ci, vp],
    "shoal_llama_decode": [i64, i64, vp, vp, cf, cf, cf, vp, vp, vp, vp, vp, i64, vp, vp, vp, vp, vp,
                           vp, vp],
}


def reason() -> str:
    """Why `library()` is None (or "loaded")."""
    return _reason


def cache_dir() -> Path:
    env = os.environ.get("SHOAL_KERNEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shoal" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cxx: str, target: Path) -> None:
    """Compile each source to an object at once (one compiler per core: 8 s serial -> about half
    on 2 cores, measured), link them into a temporary file beside `target`, then rename (atomic:
    concurrent builders never load a half-written library)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    objdir = tempfile.mkdtemp(dir=target.parent)
    compile_flags = [f for f in FLAGS if f != "-shared"]
    try:
        objs, procs = [], []
        for src in SOURCES:
            obj = os.path.join(objdir, src.stem + ".o")
            objs.append(obj)
            procs.append(subprocess.Popen([cxx, *compile_flags, "-c", str(src), "-o", obj],
                                          stderr=subprocess.PIPE, text=True))
            if len(procs) >= (os.cpu_count() or 1):
                _wait(cxx, procs.pop(0))
        for proc in procs:
            _wait(cxx, proc)
        _wait(cxx, subprocess.Popen([cxx, *FLAGS, *objs, "-o", tmp], stderr=subprocess.PIPE, text=True))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        shutil.rmtree(objdir, ignore_errors=True)


def _wait(cxx: str, proc: subprocess.Popen) -> None:
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"{Path(cxx).name} timed out") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cxx).name} failed: {err.strip()[-2000:]}")


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None when unavailable (see `reason`)."""
    global _reason
    if os.environ.get("SHOAL_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        _reason = "disabled by SHOAL_CPU_KERNELS"
        return None
    if platform.system() != "Linux":
        _reason = f"not built on {platform.system()}"
        return None
    cxx = _compiler()
    if cxx is None:
        _reason = "no C++ compiler (g++ or $CXX) found"
        return None
    import torch  # noqa: F401  (loads PyTorch's libgomp first: the kernels then share its pool)

    sources = [p.read_bytes() for p in sorted(CSRC.glob("*.[ch]*"))]  # .cpp and .h
    key = hashlib.sha256(b"\0".join([*sources, " ".join(FLAGS).encode(), cxx.encode(),
                                     cpu_flags().encode()])).hexdigest()[:16]
    target = cache_dir() / key / "libshoal_cpu.so"
    try:
        if not target.exists():
            _build(cxx, target)
        lib = ctypes.CDLL(str(target))
        if lib.shoal_kernels_abi() != ABI:
            raise RuntimeError(f"ABI {lib.shoal_kernels_abi()} != {ABI}")
        for name, argtypes in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _reason = f"build or load failed: {e}"
        log.warning("shoal: CPU kernels unavailable, using PyTorch ops (%s)", e)
        return None
    _reason = "loaded"
    return lib
