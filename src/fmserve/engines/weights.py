"""Which weights a llama.cpp worker loads: the GGUF as shipped, or a converted copy.

``FMSERVE_LLAMA_WEIGHTS`` (server-wide) or a served entity's
``environment_vars.FMSERVE_LLAMA_WEIGHTS`` names them:

* ``gguf`` - the file as it is (the default for a user's ``.gguf`` entity);
* ``auto`` - the copy that batches best on this CPU without losing quality: ``bf16``
  where llama.cpp runs AVX512-BF16 kernels, else ``q8_0`` (the bundled SmolLM2's
  default);
* a llama.cpp file type (:data:`WEIGHT_TYPES`: ``bf16``, ``q8_0``, ``f16``, ``q4_0``, ...).

A copy is made once with ``llama_model_quantize`` (dequantizing first when the
source is quantized) into ``$XDG_CACHE_HOME/fmserve/models`` (default
``~/.cache/fmserve/models``), named by the source's path, size and mtime, the type
and the llama-cpp-python version; replicas starting together make it once (a file
lock). SmolLM2-135M: about 1 s; 271 MB for bf16, 145 MB for q8_0.

Why: llama.cpp multiplies a batch of activations by Q4_1 weights one dot product at
a time, so a decode step for 8 sequences costs nearly 8 single steps, while other
types go through matrix kernels that reuse each weight row across the batch. Bare
``llama_decode`` on a 2-core AMD EPYC, 2 threads, SmolLM2-135M, tokens/s at 1 / 8
sequences per step (perplexity on README.md's first 6,000 characters):

============  ===================  ===================  ==========
weights       AVX-512 build        AVX2-only build      perplexity
============  ===================  ===================  ==========
Q4_1 (file)   180 / 284            167 / 333            16.415
BF16          122 / 481            125 / 306            16.415
Q8_0          176 / 317            167 / 488            16.496
F16           120 / 359            116 / 333            18.364
Q4_0          205 / 571            222 / 552            20.939
============  ===================  ===================  ==========

BF16 holds a Q4_1 file's values exactly; Q8_0 nearly; F16 loses accuracy (llama.cpp
rounds the activations to F16 too), and re-quantizing to another 4-bit type more."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import Any

# The names FMSERVE_LLAMA_WEIGHTS accepts (besides "gguf" and "auto"); each is
# llama.cpp's LLAMA_FTYPE_MOSTLY_<NAME>.
WEIGHT_TYPES = ("bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0",
                "q4_k_m", "q4_k_s", "q4_1", "q4_0", "iq4_nl")
WEIGHTS_CHOICES = ("gguf", "auto", *WEIGHT_TYPES)
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
    """True when llama.cpp was built with, and so runs, its AVX512-BF16 kernels
    (``llama_print_system_info``; ``scripts/install.sh`` enables them on CPUs that
    have the instructions)."""
    import llama_cpp

    return "AVX512_BF16 = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


def resolve_type(weights: str) -> str | None:
    """The tensor type ``weights`` means on this machine; None for the file as is."""
    w = check_weights(weights or "gguf")
    if w == "gguf":
        return None
    if w == "auto":
        return "bf16" if cpu_has_bf16() else "q8_0"
    return w


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmserve" / "models"


def prepare(model_path: str, weights: str, *, threads: int = 0) -> str:
    """The GGUF path to load for ``model_path`` under ``weights`` (see module doc).

    Returns ``model_path`` itself for ``gguf``, or when the cache cannot be written
    (a warning is printed to the worker log); otherwise a cached converted copy,
    made now if missing (seconds for a small model; minutes and 2 bytes per
    parameter of disk for a bf16 copy of a 7B one). Copies for older source files
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
