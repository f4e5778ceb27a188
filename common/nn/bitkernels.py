"""Native kernels for the bitmap hot paths of SAP: one fused C loop where torch needs several passes.

Scaled activation pruning touches every cached activation twice per step: forward selects the
entries with ``|x| > t`` and stores them as a bitmap plus their fp32 values (FedMef App. 7.1), and
backward scatters them back into a dense tensor; the bit-masked ReLU packs and unpacks its
pass-through bits. In torch each of these is a chain of full-tensor passes (``abs``, ``gt``,
``count_nonzero``, bit packing, ``nonzero`` + gather; bit unpacking + ``masked_scatter_``), which
on a 2-core CPU costs more than the depthwise convolutions of MobileNetV2 they serve. The C
versions here do each job in one or two passes, split over blocks of 32768 elements with OpenMP
(the ``libgomp`` torch has already loaded, so torch's thread count applies).

The C source is ``bitkernels.c`` beside this module. A Flower app bundle (FAB) carries only Python,
TOML, Markdown, YAML and JSON files (``FAB_INCLUDE_PATTERNS`` in ``flwr.common.constant``; the
``fab-include`` setting can only narrow them), and a ClientApp on a Raspberry Pi gets its code from
the FAB alone, so ``bitkernels.c.json`` carries the same text with its SHA-256: the loader reads the
``.c`` file where there is one and the JSON copy otherwise. After editing the C file, ``make kernels``
(``python -m common.nn.bitkernels --bundle``) regenerates the copy; ``tests/test_bitkernels.py``
fails while it is stale.

The library is compiled on first use with the system C compiler (``$CC``, default ``cc``) into
``~/.cache/fedmef/`` (``$FEDMEF_CACHE`` overrides), keyed by a hash of source text (the same from
either file), flags and the CPU's model and features, for this CPU (``-march=native``), so a
Raspberry Pi builds its own. Without a compiler or a readable source, or with ``FEDMEF_NATIVE=0``,
:func:`library` returns None and callers keep their torch implementation; both give bit-identical
results, which ``tests/test_bitkernels.py`` checks. Only contiguous float32 CPU tensors take this path.

Bit order is MSB-first within each byte, as :func:`common.sparse.bits.pack_bits`.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import json
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
C_SOURCE = Path(__file__).with_name("bitkernels.c")
BUNDLE = Path(__file__).with_name("bitkernels.c.json")

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {
    "fm_select_above": (_I64, [_PTR, _I64, _F32, _PTR, _PTR]),
    "fm_gather": (None, [_PTR, _I64, _PTR, _PTR, _PTR]),
    "fm_scatter": (_I64, [_PTR, _I64, _PTR, _I64, _PTR]),
    "fm_relu_pack": (None, [_PTR, _I64, ctypes.c_int, _F32, _PTR, _PTR]),
    "fm_mask_grad": (None, [_PTR, _PTR, _I64, _PTR]),
    "fm_popcount": (_I64, [_PTR, _I64]),
    "fm_restrict_bits": (_I64, [_PTR, _PTR, _I64, _PTR]),
    "fm_extend_bits": (_I64, [_PTR, _I64, _PTR, _I64, _PTR]),
    "fm_block_elements": (_I64, []),
    "fm_channel_absmax": (None, [_PTR, _I64, _I64, _I64, _PTR]),
    "fm_gather_quantize": (None, [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _PTR]),
    "fm_scatter_scaled": (_I64, [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR]),
}


_status = "not loaded yet"  # why the native path is or is not in use (logs, benchmark records)


def _cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "fedmef")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def bundle_text(source: str) -> str:
    """The content of ``bitkernels.c.json`` for the C ``source``: one JSON object, source and SHA-256."""
    return json.dumps({"source": source, "sha256": _sha256(source)}, indent=1) + "\n"


def _source() -> str:
    """The kernels' C source: ``bitkernels.c`` where it exists, else the text its JSON copy carries
    (in a FAB). Raises OSError when neither is readable, ValueError when the copy is corrupt."""
    if C_SOURCE.exists():
        return C_SOURCE.read_text(encoding="utf-8")
    bundle = json.loads(BUNDLE.read_text(encoding="utf-8"))
    source = bundle.get("source") if isinstance(bundle, dict) else None
    if not isinstance(source, str) or bundle.get("sha256") != _sha256(source):
        raise ValueError(f"{BUNDLE} is corrupt: its source does not match its sha256")
    return source


def _compile(compiler: str, flags: tuple[str, ...], source: str, target: Path) -> str | None:
    """Compile the C ``source`` to ``target`` atomically; returns the compiler's complaint on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source_file, built = Path(tmp) / "bitkernels.c", Path(tmp) / target.name
        source_file.write_text(source, encoding="utf-8")
        try:
            done = subprocess.run(
                [compiler, *flags, str(source_file), "-o", str(built)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
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
    try:
        source = _source()
    except (OSError, ValueError) as err:
        _status = f"torch (no kernel source: {err})"
        return None
    compiler = os.environ.get("CC", "cc")
    complaint = ""
    for flags in ((*_FLAGS, *extra) for extra in _VARIANTS):
        # The CPU is part of the key: a -march=native build must not be loaded on another CPU
        # sharing this cache (a home directory on NFS, a container image built elsewhere).
        key = _sha256("\0".join((source, compiler, _cpu_identity(), *flags)))[:16]
        target = _cache_dir() / f"bitkernels-{platform.machine()}-{key}.so"
        try:
            if not target.exists():
                complaint = _compile(compiler, flags, source, target) or ""
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
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def usable_bitmaps(*bitmaps: torch.Tensor) -> bool:
    """:func:`usable` for packed bitmaps: the kernels are loaded and every one is contiguous uint8 on the CPU."""
    return usable() and all(b.device.type == "cpu" and b.dtype == torch.uint8 and b.is_contiguous() for b in bitmaps)


def _loaded() -> ctypes.CDLL:
    """The compiled kernels, for the functions below: callers reach them only after :func:`usable`."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"the native kernels are not loaded: {_status}")
    return lib


def _nbytes(n: int) -> int:
    return -(-n // 8)


def select_above(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(bitmap of |x| > threshold, per-block counts, count)`` for a :func:`usable` tensor."""
    n = x.numel()
    bitmap = torch.empty(_nbytes(n), dtype=torch.uint8)
    lib = _loaded()
    counts = torch.empty(-(-n // lib.fm_block_elements()), dtype=torch.int64)
    kept = lib.fm_select_above(x.data_ptr(), n, threshold, bitmap.data_ptr(), counts.data_ptr())
    return bitmap, counts, int(kept)


def gather(x: torch.Tensor, bitmap: torch.Tensor, counts: torch.Tensor, kept: int) -> torch.Tensor:
    """The entries of ``x`` at ``bitmap``'s set bits, from :func:`select_above`'s output."""
    values = torch.empty(kept, dtype=x.dtype)
    _loaded().fm_gather(x.data_ptr(), x.numel(), bitmap.data_ptr(), counts.data_ptr(), values.data_ptr())
    return values


def _output(values: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(n, dtype=values.dtype)
    if out.dtype != values.dtype or out.device.type != "cpu" or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"out must be {n} contiguous {values.dtype} entries on the CPU")
    return out


def scatter(values: torch.Tensor, bitmap: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``n`` floats: ``values`` at the set bits of ``bitmap``, 0 elsewhere; written into ``out``
    (every entry of it) when given.

    Raises ValueError when the bitmap is too short or marks a different number of entries than
    there are values (the caller turns it into its own error type)."""
    if bitmap.dtype != torch.uint8 or bitmap.device.type != "cpu" or bitmap.numel() < _nbytes(n):
        raise ValueError(f"bitmap must be {_nbytes(n)} uint8 bytes on the CPU for {n} entries")
    bitmap = bitmap.contiguous()
    out = _output(values, n, out)
    marked = _loaded().fm_scatter(values.data_ptr(), values.numel(), bitmap.data_ptr(), n, out.data_ptr())
    if marked != values.numel():
        raise ValueError(f"bitmap marks {marked} entries but nnz={values.numel()}")
    return out


def channel_absmax(x: torch.Tensor, inner: int, channels: int) -> torch.Tensor:
    """Per channel, ``max |x|`` (NaN if any entry is), for a :func:`usable` ``x`` whose element ``i``
    lies in channel ``(i // inner) % channels`` (:mod:`common.nn.sapcache`'s int8 scale)."""
    amax = torch.empty(channels, dtype=torch.float32)
    _loaded().fm_channel_absmax(x.data_ptr(), x.numel(), inner, channels, amax.data_ptr())
    return amax


def gather_quantize(
    x: torch.Tensor, bitmap: torch.Tensor, counts: torch.Tensor, kept: int, scale: torch.Tensor, inner: int
) -> torch.Tensor:
    """:func:`gather`, each value divided by its channel's ``scale`` (float32, one per channel; channels
    as in :func:`channel_absmax`), rounded half to even and clamped to ±127, as int8."""
    q = torch.empty(kept, dtype=torch.int8)
    _loaded().fm_gather_quantize(
        x.data_ptr(),
        x.numel(),
        bitmap.data_ptr(),
        counts.data_ptr(),
        scale.data_ptr(),
        inner,
        scale.numel(),
        q.data_ptr(),
    )
    return q


def scatter_scaled(
    values: torch.Tensor, bitmap: torch.Tensor, n: int, scale: torch.Tensor, inner: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`scatter`, then every entry (the zeros too) multiplied by its channel's ``scale``, in one pass."""
    if bitmap.dtype != torch.uint8 or bitmap.device.type != "cpu" or bitmap.numel() < _nbytes(n):
        raise ValueError(f"bitmap must be {_nbytes(n)} uint8 bytes on the CPU for {n} entries")
    bitmap = bitmap.contiguous()
    out = _output(values, n, out)
    marked = _loaded().fm_scatter_scaled(
        values.data_ptr(), values.numel(), bitmap.data_ptr(), n, scale.data_ptr(), inner, scale.numel(), out.data_ptr()
    )
    if marked != values.numel():
        raise ValueError(f"bitmap marks {marked} entries but nnz={values.numel()}")
    return out


def relu_pack(x: torch.Tensor, upper: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clamp(x, 0, upper), bitmap of 0 < x < upper)`` in one pass (``upper=None``: no cap)."""
    out = torch.empty_like(x)
    bitmap = torch.empty(_nbytes(x.numel()), dtype=torch.uint8)
    _loaded().fm_relu_pack(
        x.data_ptr(),
        x.numel(),
        upper is not None,
        float("inf") if upper is None else upper,
        out.data_ptr(),
        bitmap.data_ptr(),
    )
    return out, bitmap


def mask_grad(grad: torch.Tensor, bitmap: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``bitmap``'s bit is set and 0 elsewhere (the bit-masked ReLU's backward)."""
    out = torch.empty_like(grad)
    _loaded().fm_mask_grad(grad.data_ptr(), bitmap.data_ptr(), grad.numel(), out.data_ptr())
    return out


def restrict_bits(bitmap: torch.Tensor, reference: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """``(sub, outside)``: ``bitmap``'s bits at ``reference``'s set bits, one per set bit, and the
    number of ``bitmap``'s set bits where ``reference``'s is clear; both :func:`usable_bitmaps` of
    ``ceil(n / 8)`` bytes. :func:`common.sparse.codec.restrict_bitmap` has the layout."""
    lib = _loaded()
    sub = torch.zeros(_nbytes(lib.fm_popcount(reference.data_ptr(), _nbytes(n))), dtype=torch.uint8)
    outside = lib.fm_restrict_bits(bitmap.data_ptr(), reference.data_ptr(), n, sub.data_ptr())
    return sub, int(outside)


def extend_bits(sub: torch.Tensor, reference: torch.Tensor, n: int) -> tuple[torch.Tensor | None, int]:
    """``(bitmap, popcount(reference))``: the inverse of :func:`restrict_bits` for a bitmap within
    ``reference``, ``ceil(n / 8)`` bytes; None unless ``sub`` is exactly ``ceil(popcount / 8)`` bytes."""
    bitmap = torch.empty(_nbytes(n), dtype=torch.uint8)
    ones = int(_loaded().fm_extend_bits(sub.data_ptr(), sub.numel(), reference.data_ptr(), n, bitmap.data_ptr()))
    return (bitmap if _nbytes(ones) == sub.numel() else None), ones


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m common.nn.bitkernels",
        description="Build the SAP kernels and say which implementation SAP runs, or regenerate their FAB copy.",
    )
    parser.add_argument("--bundle", action="store_true", help=f"rewrite {BUNDLE.name} from {C_SOURCE.name}")
    if parser.parse_args().bundle:
        BUNDLE.write_text(bundle_text(C_SOURCE.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"wrote {BUNDLE}")
    else:
        print(status())
