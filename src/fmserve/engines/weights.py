"""Which weights a llama.cpp worker loads: the GGUF as shipped, or a converted copy.

``FMSERVE_LLAMA_WEIGHTS`` (server-wide) or a served entity's
``environment_vars.FMSERVE_LLAMA_WEIGHTS`` names the tensor type:

* ``gguf`` - the file as it is (the default for a user's ``.gguf`` entity);
* ``16bit`` - ``bf16`` where the CPU has AVX512-BF16, else ``f16`` (the default for
  the bundled SmolLM2, see below);
* a llama.cpp file type (:data:`WEIGHT_TYPES`: ``bf16``, ``f16``, ``q8_0``, ``q4_0``, ...).

A copy is made once with ``llama_model_quantize`` (dequantizing first when the
source is quantized) into ``$XDG_CACHE_HOME/fmserve/models`` (default
``~/.cache/fmserve/models``), named by the source's path, size and mtime, the type
and the llama-cpp-python version; replicas starting together make it once (a file
lock). SmolLM2-135M: about 1 s, 271 MB for 16-bit.

Why 16-bit for small models on CPU: llama.cpp multiplies a batch of quantized
activations by Q4_1 weights one dot product at a time, so a decode step for 8
sequences costs nearly 8 single steps, while 16-bit weights go through a real matrix
kernel that reuses each weight row across the batch. Measured on a 2-core AVX-512
EPYC (``bench/bench_batching.py``, bare ``llama_decode``, tokens/s at 1 / 8
sequences per step): Q4_1 180 / 284, BF16 122 / 481 - the 16-bit copy is ~30 %
slower for one stream and ~1.7x faster for eight. Lossless for a Q4_1 source
(perplexity 16.415 both); re-quantizing to another 4-bit type is not (Q4_0 20.9).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import Any

# The names FMSERVE_LLAMA_WEIGHTS accepts (besides "gguf" and "16bit"); each is
# llama.cpp's LLAMA_FTYPE_MOSTLY_<NAME>.
WEIGHT_TYPES = ("bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0",
                "q4_k_m", "q4_k_s", "q4_1", "q4_0", "iq4_nl")
WEIGHTS_CHOICES = ("gguf", "16bit", *WEIGHT_TYPES)
ENV_VAR = "FMSERVE_LLAMA_WEIGHTS"


def check_weights(value: str) -> str:
    """``value`` normalised (lower case).

    Raises:
        ValueError: not one of :data:`WEIGHTS_CHOICES`.
    """
    v = value.strip().lower()
    if v not in WEIGHTS_CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(WEIGHTS_CHOICES)}; "
                         f"got {value!r}")
    return v


def cpu_has_bf16() -> bool:
    """True when ``/proc/cpuinfo`` lists ``avx512_bf16`` (llama.cpp's fast BF16 path)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split()
                       for line in f)
    except OSError:
        return False


def resolve_type(weights: str) -> str | None:
    """The tensor type ``weights`` means on this machine; None for the file as is."""
    w = check_weights(weights or "gguf")
    if w == "gguf":
        return None
    if w == "16bit":
        return "bf16" if cpu_has_bf16() else "f16"
    return w


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmserve" / "models"


def prepare(model_path: str, weights: str, *, threads: int = 0) -> str:
    """The GGUF path to load for ``model_path`` under ``weights`` (see module doc).

    Returns ``model_path`` itself for ``gguf``, or when the cache cannot be written
    (a warning is printed to the worker log); otherwise a cached converted copy,
    made now if missing (seconds for a small model; minutes and 2 bytes per
    parameter of disk for a 16-bit copy of a 7B one). Copies for older source files
    or llama-cpp-python versions are not removed.

    Raises:
        ValueError: an unknown ``weights`` value.
        RuntimeError: llama.cpp could not convert the file (e.g. not a GGUF model).
    """
    ftype = resolve_type(weights)
    if ftype is None:
        return model_path
    import llama_cpp

    src = Path(model_path).resolve()
    st = src.stat()
    key = hashlib.sha256(f"{src}|{st.st_size}|{st.st_mtime_ns}|{ftype}|"
                         f"{llama_cpp.__version__}".encode()).hexdigest()[:16]
    out = cache_dir() / f"{src.stem}.{key}.{ftype}.gguf"
    if out.exists():
        return str(out)
    try:
        return _convert(llama_cpp, src, out, ftype, threads)
    except OSError as e:  # e.g. a read-only home: serve the file as it is
        print(f"cannot write {out.parent} ({e}); loading {src.name} as it is", flush=True)
        return model_path


def _convert(llama_cpp: Any, src: Path, out: Path, ftype: str, threads: int) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another replica may be converting
        if out.exists():
            return str(out)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
        params.allow_requantize = True
        params.nthread = threads or os.cpu_count() or 1
        print(f"converting {src.name} to {ftype} weights in {out.parent}", flush=True)
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama.cpp could not convert {src.name} to {ftype} "
                                   f"(llama_model_quantize returned {rc})")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return str(out)
