"""Native kernels for the bitmap hot paths of SAP: one fused C loop where torch needs several passes.

Scaled activation pruning touches every cached activation twice per step: forward selects the
entries with ``|x| > t`` and stores them as a bitmap plus their fp32 values (FedMef App. 7.1), and
backward scatters them back into a dense tensor; the bit-masked ReLU packs and unpacks its
pass-through bits. In torch each of these is a chain of full-tensor passes (``abs``, ``gt``,
``count_nonzero``, bit packing, ``nonzero`` + gather; bit unpacking + ``masked_scatter_``), which
on a 2-core CPU costs more than the depthwise convolutions of MobileNetV2 they serve. The C
versions here do each job in one or two passes, split over blocks of 32768 elements with OpenMP
(the ``libgomp`` torch has already loaded, so torch's thread count applies).

The library is compiled on first use with the system C compiler (``$CC``, default ``cc``) into
``~/.cache/fedmef/`` (``$FEDMEF_CACHE`` overrides), keyed by a hash of source, flags and the CPU's
model and features, for this CPU (``-march=native``), so a Raspberry Pi builds its own. Without a compiler, or with ``FEDMEF_NATIVE=0``, :func:`library`
returns None and callers keep their torch implementation; both give bit-identical results, which
``tests/test_bitkernels.py`` checks. Only contiguous float32 CPU tensors take this path.

Bit order is MSB-first within each byte, as :func:`common.sparse_codec.pack_bits`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

ENV_DISABLE = "FEDMEF_NATIVE"
ENV_CACHE = "FEDMEF_CACHE"
_FLAGS = ("-O3", "-fPIC", "-shared")
# Tried in order. -march=native (AVX2 / NEON tuned for this CPU) halves the ReLU kernel's time here;
# OpenMP shares torch's thread pool; the last is plain serial C for compilers that lack either.
_VARIANTS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 4096 /* bitmap bytes (32768 elements) per parallel block */

/* Per byte value: its eight bits as all-ones / all-zero 32-bit lanes; the offsets of its set bits
   (MSB first, padded with 0); and for each bit the number of set bits before it. The last two make
   gather and scatter branch-free: every byte moves eight floats, and the pointers advance by the
   popcount. */
static uint32_t lanes[256][8];
static uint8_t set_offsets[256][8];
static uint8_t rank_before[256][8];

__attribute__((constructor)) static void init_tables(void) {
    for (int b = 0; b < 256; b++) {
        int seen = 0;
        for (int j = 0; j < 8; j++) {
            int bit = (b >> (7 - j)) & 1;
            lanes[b][j] = bit ? 0xFFFFFFFFu : 0u;
            rank_before[b][j] = (uint8_t)seen;
            set_offsets[b][j] = 0;
            if (bit) seen++;
        }
        seen = 0;
        for (int j = 0; j < 8; j++)
            if ((b >> (7 - j)) & 1) set_offsets[b][seen++] = (uint8_t)j;
    }
}

int64_t fm_block_elements(void) { return 8 * BLOCK; } /* sizes fm_select_above's counts */

static int64_t block_count(int64_t nbytes) { return (nbytes + BLOCK - 1) / BLOCK; }
static int64_t block_end(int64_t k, int64_t nbytes) { return k * BLOCK + BLOCK < nbytes ? k * BLOCK + BLOCK : nbytes; }

/* Bit (7 - j) of bitmap[b] = |x[8b + j]| > t; counts[k] = bits set in block k; returns the total. */
int64_t fm_select_above(const float *x, int64_t n, float t, uint8_t *bitmap, int64_t *counts) {
    int64_t nbytes = (n + 7) / 8, nb = block_count(nbytes), whole = n / 8, total = 0;
    #pragma omp parallel for schedule(static) reduction(+ : total)
    for (int64_t k = 0; k < nb; k++) {
        int64_t end = block_end(k, nbytes), c = 0;
        for (int64_t b = k * BLOCK; b < end; b++) {
            unsigned bits = 0;
            if (b < whole) {
                const float *p = x + 8 * b;
                for (int j = 0; j < 8; j++) bits |= (unsigned)(fabsf(p[j]) > t) << (7 - j);
            } else {
                for (int64_t i = 8 * b; i < n; i++) bits |= (unsigned)(fabsf(x[i]) > t) << (7 - (i - 8 * b));
            }
            bitmap[b] = (uint8_t)bits;
            c += __builtin_popcount(bits);
        }
        counts[k] = c;
        total += c;
    }
    return total;
}

/* values <- x at the set bits, in order; counts as written by fm_select_above. A byte copies eight
   floats and advances by its popcount, the surplus being overwritten by the next byte, wherever
   eight floats fit before the block's share of values ends (past it they belong to another thread);
   the bytes after that copy exactly. */
void fm_gather(const float *x, int64_t n, const uint8_t *bitmap, const int64_t *counts, float *values) {
    int64_t nbytes = (n + 7) / 8, nb = block_count(nbytes);
    int64_t *start = malloc(sizeof(int64_t) * (nb + 1));
    start[0] = 0;
    for (int64_t k = 0; k < nb; k++) start[k + 1] = start[k] + counts[k];
    #pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < nb; k++) {
        float *out = values + start[k], *out_end = values + start[k + 1];
        for (int64_t b = k * BLOCK, end = block_end(k, nbytes); b < end; b++) {
            const float *p = x + 8 * b;
            if (out + 8 <= out_end) {
                const uint8_t *at = set_offsets[bitmap[b]];
                for (int j = 0; j < 8; j++) out[j] = p[at[j]];
                out += __builtin_popcount(bitmap[b]);
                continue;
            }
            for (unsigned bits = bitmap[b]; bits; ) {
                int j = __builtin_clz(bits << 24);
                *out++ = p[j];
                bits &= ~(0x80u >> j);
            }
        }
    }
    free(start);
}

/* out (n floats) <- values at the set bits, 0 elsewhere. Returns the bitmap's popcount; out is
   only written when it equals nnz. */
int64_t fm_scatter(const float *values, int64_t nnz, const uint8_t *bitmap, int64_t n, float *out) {
    int64_t nbytes = (n + 7) / 8, nb = block_count(nbytes);
    int64_t *start = malloc(sizeof(int64_t) * (nb + 1));
    start[0] = 0;
    #pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < nb; k++) {
        int64_t c = 0;
        for (int64_t b = k * BLOCK, end = block_end(k, nbytes); b < end; b++) c += __builtin_popcount(bitmap[b]);
        start[k + 1] = c;
    }
    for (int64_t k = 0; k < nb; k++) start[k + 1] += start[k];
    int64_t total = start[nb];
    if (total == nnz) {
        #pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < nb; k++) {
            const float *v = values + start[k], *v_end = values + nnz;
            for (int64_t b = k * BLOCK, end = block_end(k, nbytes); b < end; b++) {
                unsigned bits = bitmap[b];
                if (8 * b + 8 <= n && v + 8 <= v_end) {
                    /* out[j] = v[rank of bit j] under the bit's lane, +0.0 elsewhere; the lanes
                       read (never past the values) may belong to the next byte */
                    const uint32_t *m = lanes[bits], *vi = (const uint32_t *)v;
                    const uint8_t *r = rank_before[bits];
                    uint32_t *o = (uint32_t *)(out + 8 * b);
                    for (int j = 0; j < 8; j++) o[j] = vi[r[j]] & m[j];
                    v += __builtin_popcount(bits);
                    continue;
                }
                for (int64_t i = 8 * b, j = 0; i < n && j < 8; i++, j++)
                    out[i] = (bits >> (7 - j)) & 1 ? *v++ : 0.0f;
            }
        }
    }
    free(start);
    return total;
}

/* out = clamp(x, 0, upper) (NaN stays NaN, like torch); bit = 0 < x, and x < upper if capped
   (an uncapped ReLU passes +inf). */
void fm_relu_pack(const float *x, int64_t n, int capped, float upper, float *out, uint8_t *bitmap) {
    int64_t whole = n / 8;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < whole; b++) {
        const float *p = x + 8 * b;
        float *o = out + 8 * b;
        unsigned bits = 0;
        for (int j = 0; j < 8; j++) {
            float v = p[j];
            bits |= (unsigned)((v > 0.0f) & (!capped | (v < upper))) << (7 - j);
            o[j] = v < 0.0f ? 0.0f : (v > upper ? upper : v);
        }
        bitmap[b] = (uint8_t)bits;
    }
    if (8 * whole < n) {
        unsigned bits = 0;
        for (int64_t i = 8 * whole; i < n; i++) {
            float v = x[i];
            bits |= (unsigned)((v > 0.0f) & (!capped | (v < upper))) << (7 - (i - 8 * whole));
            out[i] = v < 0.0f ? 0.0f : (v > upper ? upper : v);
        }
        bitmap[whole] = (uint8_t)bits;
    }
}

/* out = grad where the bit is set, +0.0 elsewhere (a bitwise select: NaN gradients stay put). */
void fm_mask_grad(const float *grad, const uint8_t *bitmap, int64_t n, float *out) {
    const uint32_t *g = (const uint32_t *)grad;
    uint32_t *o = (uint32_t *)out;
    int64_t whole = n / 8;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < whole; b++) {
        const uint32_t *m = lanes[bitmap[b]];
        for (int j = 0; j < 8; j++) o[8 * b + j] = g[8 * b + j] & m[j];
    }
    for (int64_t i = 8 * whole; i < n; i++) o[i] = g[i] & lanes[bitmap[whole]][i - 8 * whole];
}
"""

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    "fm_select_above": (_I64, [_PTR, _I64, _F32, _PTR, _PTR]),
    "fm_gather": (None, [_PTR, _I64, _PTR, _PTR, _PTR]),
    "fm_scatter": (_I64, [_PTR, _I64, _PTR, _I64, _PTR]),
    "fm_relu_pack": (None, [_PTR, _I64, ctypes.c_int, _F32, _PTR, _PTR]),
    "fm_mask_grad": (None, [_PTR, _PTR, _I64, _PTR]),
    "fm_block_elements": (_I64, []),
}


_status = "not loaded yet"  # why the native path is or is not in use (logs, benchmark records)


def _cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "fedmef")


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile ``_SOURCE`` to ``target`` atomically; returns the compiler's complaint on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source, built = Path(tmp) / "bitkernels.c", Path(tmp) / target.name
        source.write_text(_SOURCE)
        try:
            done = subprocess.run([compiler, *flags, str(source), "-o", str(built)],
                                  capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            return str(err)
        if done.returncode != 0:
            return done.stderr.strip()[-500:] or f"exit status {done.returncode}"
        os.replace(built, target)  # atomic: concurrent processes never load a half-written file
    return None


@functools.cache
def _cpu_identity() -> str:
    """The CPU model and feature flags (x86 ``model name`` / ``flags``, arm64 ``CPU part`` /
    ``Features``), from /proc/cpuinfo where there is one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keys = ("model name", "flags", "CPU implementer", "CPU part", "Features")
    return "\n".join(sorted({line for line in lines if line.split(":", 1)[0].strip() in keys}))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (then :func:`status` says why and callers use torch)."""
    global _status
    if os.environ.get(ENV_DISABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        _status = f"torch (disabled by {ENV_DISABLE})"
        return None
    compiler = os.environ.get("CC", "cc")
    complaint = ""
    for flags in ((*_FLAGS, *extra) for extra in _VARIANTS):
        # The CPU is part of the key: a -march=native build must not be loaded on another CPU
        # sharing this cache (a home directory on NFS, a container image built elsewhere).
        key = hashlib.sha256("\0".join((_SOURCE, compiler, _cpu_identity(), *flags)).encode()).hexdigest()[:16]
        target = _cache_dir() / f"bitkernels-{platform.machine()}-{key}.so"
        try:
            if not target.exists():
                complaint = _compile(compiler, flags, target) or ""
                if complaint:
                    continue
            lib = ctypes.CDLL(str(target))
        except OSError as err:
            complaint = str(err)
            continue
        for name, (restype, argtypes) in _SIGNATURES.items():
            getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
        _status = f"native ({compiler} {' '.join(flags)}, {target})"
        return lib
    _status = f"torch (no native kernels: {compiler} failed: {complaint.splitlines()[-1] if complaint else '?'})"
    return None


def status() -> str:
    """``native (...)`` or ``torch (reason)``: which implementation the SAP hot paths use."""
    library()
    return _status


def usable(*tensors: torch.Tensor) -> bool:
    """True when the kernels are loaded and every tensor is a contiguous float32 CPU tensor."""
    return library() is not None and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def _nbytes(n: int) -> int:
    return -(-n // 8)


def select_above(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(bitmap of |x| > threshold, per-block counts, count)`` for a :func:`usable` tensor."""
    n = x.numel()
    bitmap = torch.empty(_nbytes(n), dtype=torch.uint8)
    counts = torch.empty(-(-n // library().fm_block_elements()), dtype=torch.int64)
    kept = library().fm_select_above(x.data_ptr(), n, threshold, bitmap.data_ptr(), counts.data_ptr())
    return bitmap, counts, int(kept)


def gather(x: torch.Tensor, bitmap: torch.Tensor, counts: torch.Tensor, kept: int) -> torch.Tensor:
    """The entries of ``x`` at ``bitmap``'s set bits, from :func:`select_above`'s output."""
    values = torch.empty(kept, dtype=x.dtype)
    library().fm_gather(x.data_ptr(), x.numel(), bitmap.data_ptr(), counts.data_ptr(), values.data_ptr())
    return values


def scatter(values: torch.Tensor, bitmap: torch.Tensor, n: int) -> torch.Tensor:
    """Dense ``n`` floats: ``values`` at the set bits of ``bitmap``, 0 elsewhere.

    Raises ValueError when the bitmap is too short or marks a different number of entries than
    there are values (the caller turns it into its own error type)."""
    if bitmap.dtype != torch.uint8 or bitmap.device.type != "cpu" or bitmap.numel() < _nbytes(n):
        raise ValueError(f"bitmap must be {_nbytes(n)} uint8 bytes on the CPU for {n} entries")
    bitmap = bitmap.contiguous()
    out = torch.empty(n, dtype=values.dtype)
    marked = library().fm_scatter(values.data_ptr(), values.numel(), bitmap.data_ptr(), n, out.data_ptr())
    if marked != values.numel():
        raise ValueError(f"bitmap marks {marked} entries but nnz={values.numel()}")
    return out


def relu_pack(x: torch.Tensor, upper: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clamp(x, 0, upper), bitmap of 0 < x < upper)`` in one pass (``upper=None``: no cap)."""
    out = torch.empty_like(x)
    bitmap = torch.empty(_nbytes(x.numel()), dtype=torch.uint8)
    library().fm_relu_pack(x.data_ptr(), x.numel(), upper is not None, float("inf") if upper is None else upper,
                           out.data_ptr(), bitmap.data_ptr())
    return out, bitmap


def mask_grad(grad: torch.Tensor, bitmap: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``bitmap``'s bit is set and 0 elsewhere (the bit-masked ReLU's backward)."""
    out = torch.empty_like(grad)
    library().fm_mask_grad(grad.data_ptr(), bitmap.data_ptr(), grad.numel(), out.data_ptr())
    return out

