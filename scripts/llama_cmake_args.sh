#!/usr/bin/env bash
# Prints the CMAKE_ARGS for building llama-cpp-python on this machine's CPU.
#
# GGML_NATIVE=ON is never used: on some Sapphire-Rapids-class Xeons it enables
# llama.cpp's AMX backend, which segfaults in decode (ggml-org/llama.cpp#20824).
# Instead each SIMD extension is switched on only if /proc/cpuinfo lists it, so
# the build runs on the CPU it was built on (an AVX-512 flag on an AVX2-only
# EPYC would die with SIGILL).
set -euo pipefail
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { [[ "$flags" == *" $1 "* ]]; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
on_off() { if has "$2"; then args+=" -D$1=ON"; else args+=" -D$1=OFF"; fi; }
on_off GGML_AVX avx
on_off GGML_AVX2 avx2
on_off GGML_FMA fma
on_off GGML_F16C f16c
on_off GGML_BMI2 bmi2
on_off GGML_AVX512 avx512f
on_off GGML_AVX512_VBMI avx512_vbmi
on_off GGML_AVX512_VNNI avx512_vnni
on_off GGML_AVX512_BF16 avx512_bf16
on_off GGML_AVX_VNNI avx_vnni
echo "$args"
