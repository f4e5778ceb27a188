"""What travels between server and clients, and how many bytes it takes.

Only sparse content goes over the wire (issue 3, FedMef App. 7.1):

- weights as one vector of the active values in mask order, layer after layer (float32, or float16
  under ``wire-format = "fp16"``), plus one float32 vector of the small dense tensors (biases, gains,
  norm parameters and running statistics: 7 % of the values' bytes for ResNet18 at s_tm 0.9, and running
  variances are the tensors least fit for half precision);
- masks only when they changed, each layer as a bitmap, packed positions or Rice-coded gaps,
  whichever is smallest;
- top-K gradients as (flat position in the full weight tensor, value) per layer;
- a FedDST client's mask change as the flat positions that flipped.

Both ends build the same model, so a :class:`ModelLayout` (layer names and shapes in model order) is
all the structure needed to read these flat vectors back. Every decoder validates what it reads and
raises :class:`WireError` with the reason, so the server can drop a malformed reply and go on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from common.protocol.config import WIRE_FORMATS
from common.pruning.masks import Masks, prunable_weights
from common.sparse.bits import CodecError, index_bits, pack_bits, pack_uints, read_uints, unpack_uints
from common.sparse.rice import rice_decode, rice_encode

Shapes = tuple[tuple[str, tuple[int, ...]], ...]
_BITMAP, _POSITIONS, _RICE = 0, 1, 2


class WireError(ValueError):
    """A message's content does not match what the protocol and the model layout allow."""


@dataclass(frozen=True)
class ModelLayout:
    """Names and shapes of a model's masked weights and of its other float tensors, in model order."""

    masked: Shapes
    dense: Shapes

    @classmethod
    def of(cls, model: nn.Module) -> ModelLayout:
        weights = prunable_weights(model)
        state = model.state_dict()
        masked = tuple((name, tuple(w.shape)) for name, w in weights.items())
        # Mask buffers travel as masks; integer buffers (BatchNorm's batch counter) stay local.
        dense = tuple(
            (name, tuple(t.shape))
            for name, t in state.items()
            if name not in weights and not name.endswith(".mask") and t.is_floating_point()
        )
        return cls(masked, dense)

    @property
    def masked_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.masked)

    @property
    def masked_numel(self) -> int:
        return sum(math.prod(s) for _, s in self.masked)

    @property
    def dense_numel(self) -> int:
        return sum(math.prod(s) for _, s in self.dense)


# --------------------------------------------------------------------------- values


def pack_values(
    state: Mapping[str, torch.Tensor],
    layout: ModelLayout,
    masks: Mapping[str, torch.Tensor] | None,
    wire_format: str = "fp32",
) -> dict[str, np.ndarray]:
    """``values``: masked weights' active entries in mask order (all entries if ``masks`` is None), in
    ``wire_format``'s precision (rounded to nearest); ``dense``: the other float tensors, float32, flattened
    in layout order."""
    values = [
        state[name].detach().reshape(-1)[masks[name].reshape(-1)]
        if masks is not None
        else state[name].detach().reshape(-1)
        for name, _ in layout.masked
    ]
    dense = [state[name].detach().reshape(-1) for name, _ in layout.dense]
    packed = _cat_f32(values).numpy()
    if wire_format != "fp32":
        exact = packed
        with np.errstate(over="ignore"):  # an overflow is refused just below, with what to do
            packed = exact.astype(WIRE_FORMATS[wire_format])
        if not np.isfinite(packed).all() and np.isfinite(exact).all():
            # a silent inf would be refused by the receiver as a corrupt message, blaming the wrong end
            raise WireError(
                f"a weight of magnitude {np.abs(exact).max():.4g} exceeds the range of wire-format {wire_format!r}; "
                'run with wire-format = "fp32"'
            )
    return {"values": packed, "dense": _cat_f32(dense).numpy()}


def unpack_values(
    arrays: Mapping[str, np.ndarray],
    layout: ModelLayout,
    masks: Mapping[str, torch.Tensor] | None,
    wire_format: str = "fp32",
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_values`, float32: full-shape tensors, zeros at pruned positions. The
    values must be in ``wire_format``'s precision, as both ends' run config says."""
    expected = layout.masked_numel if masks is None else sum(int(masks[n].sum()) for n, _ in layout.masked)
    values = _float_vector(arrays, "values", expected, wire_format)
    dense = _float_vector(arrays, "dense", layout.dense_numel)
    out: dict[str, torch.Tensor] = {}
    start = 0
    for name, shape in layout.masked:
        if masks is None:
            count = math.prod(shape)
            out[name] = values[start : start + count].reshape(shape).clone()
        else:
            count = int(masks[name].sum())
            full = torch.zeros(math.prod(shape), dtype=torch.float32)
            full[masks[name].reshape(-1)] = values[start : start + count]
            out[name] = full.reshape(shape)
        start += count
    start = 0
    for name, shape in layout.dense:
        count = math.prod(shape)
        out[name] = dense[start : start + count].reshape(shape).clone()
        start += count
    return out


# --------------------------------------------------------------------------- masks


def encode_masks(masks: Mapping[str, torch.Tensor], layout: ModelLayout) -> np.ndarray:
    """Each layer as ``[format byte][payload]``, whichever payload is smallest: a bitmap (n bits, App.
    7.1), the active positions in ``ceil(log2 n)``-bit fields, or Rice-coded gaps between them
    (:mod:`common.sparse.rice`).

    At density d a bitmap costs 1 bit per weight, Rice codes about ``d·(k + 2)`` with
    ``2^k ≈ 1/d``: 0.4 bits at d = 0.08, so a new client's first mask costs less than half."""
    chunks: list[bytes] = []
    for name, _ in layout.masked:
        flat = masks[name].reshape(-1)
        positions = torch.nonzero(flat).reshape(-1)
        width = index_bits(flat.numel())
        candidates = [bytes([_BITMAP]) + pack_bits(flat).numpy().tobytes(), bytes([_RICE]) + rice_encode(positions)]
        if 32 + positions.numel() * width < flat.numel():
            candidates.append(
                bytes([_POSITIONS])
                + np.uint32(positions.numel()).tobytes()
                + pack_uints(positions, width).numpy().tobytes()
            )
        chunks.append(min(candidates, key=len))
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()


def decode_masks(buf: np.ndarray, layout: ModelLayout) -> Masks:
    """Inverse of :func:`encode_masks`; a short, long or inconsistent buffer raises WireError.

    Decoded with numpy, which runs single-threaded: torch's intra-op threads wait on each other at
    every op while other processes hold the cores, as on a 2-core client beside training."""
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        raise WireError("masks must be a 1-D uint8 array (the output of encode_masks)")
    # One writable copy, so that rice_decode gets zero-copy tensor views of it (Flower's arrays are read-only).
    data = torch.from_numpy(buf.copy())
    buf = data.numpy()
    masks: Masks = {}
    at = 0
    for name, shape in layout.masked:
        n = math.prod(shape)
        if at >= buf.size:
            raise WireError(f"mask buffer ends before layer {name!r}")
        fmt = int(buf[at])
        at += 1
        if fmt == _BITMAP:
            nbytes = -(-n // 8)
            if at + nbytes > buf.size:
                raise WireError(f"mask of {name!r} is truncated: needs {nbytes} bytes")
            masks[name] = torch.from_numpy(np.unpackbits(buf[at : at + nbytes], count=n).view(np.bool_)).reshape(shape)
            at += nbytes
            continue
        if fmt == _POSITIONS:
            if at + 4 > buf.size:
                raise WireError(f"mask of {name!r} is truncated in its count")
            count = int.from_bytes(buf[at : at + 4].tobytes(), "little")
            at += 4
            width = index_bits(n)
            nbytes = -(-count * width // 8)
            if count > n or at + nbytes > buf.size:
                raise WireError(f"mask of {name!r} claims {count} positions of {n}; the buffer is too short")
            positions = read_uints(buf[at : at + nbytes], count, width)
            if count and (int(positions.max()) >= n or bool((positions[1:] <= positions[:-1]).any())):
                raise WireError(f"mask of {name!r} has positions out of range or not strictly increasing")
            at += nbytes
        elif fmt == _RICE:
            try:
                rice, used = rice_decode(data[at:], n)
            except CodecError as err:
                raise WireError(f"mask of {name!r}: {err}") from None
            positions = rice.numpy()
            at += used
        else:
            raise WireError(f"mask of {name!r} has unknown format byte {fmt}")
        flat = np.zeros(n, dtype=np.bool_)
        flat[positions] = True
        masks[name] = torch.from_numpy(flat).reshape(shape)
    if at != buf.size:
        raise WireError(f"mask buffer has {buf.size - at} bytes beyond the last layer")
    return masks


# --------------------------------------------------------------------------- sparse per-layer index lists


def encode_positions(
    entries: Mapping[str, tuple[torch.Tensor, torch.Tensor | None]], layout: ModelLayout, prefix: str
) -> dict[str, np.ndarray]:
    """Per-layer (flat position, optional value) lists as ``{prefix}-count/-idx[/-val]`` vectors.

    Positions are packed in ``ceil(log2 n)``-bit fields per layer (App. 7.1's offsets), each layer
    starting on a byte. Serves top-K gradients (positions with values) and FedDST mask flips."""
    counts, idx, vals = [], [], []
    with_values = any(v is not None for _, v in entries.values())
    for name, shape in layout.masked:
        positions, values = entries.get(name, (torch.zeros(0, dtype=torch.int64), None))
        counts.append(positions.numel())
        idx.append(pack_uints(positions.reshape(-1).to(torch.int64), index_bits(math.prod(shape))))
        if with_values:
            vals.append(values.reshape(-1) if values is not None else torch.zeros(positions.numel()))
    out = {f"{prefix}-count": np.asarray(counts, dtype=np.int64), f"{prefix}-idx": torch.cat(idx).numpy()}
    if with_values:
        out[f"{prefix}-val"] = _cat_f32(vals).numpy()
    return out


def decode_positions(
    arrays: Mapping[str, np.ndarray], layout: ModelLayout, prefix: str, with_values: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Inverse of :func:`encode_positions`, checking counts, ranges, order and finiteness."""
    for key in (f"{prefix}-count", f"{prefix}-idx") + ((f"{prefix}-val",) if with_values else ()):
        if key not in arrays:
            raise WireError(f"reply lacks {key!r}")
    counts = arrays[f"{prefix}-count"]
    if (
        counts.ndim != 1
        or counts.size != len(layout.masked)
        or not np.issubdtype(counts.dtype, np.integer)
        or (counts < 0).any()
    ):
        raise WireError(f"{prefix}-count must hold one non-negative count per masked layer ({len(layout.masked)})")
    idx = arrays[f"{prefix}-idx"]
    widths = [index_bits(math.prod(shape)) for _, shape in layout.masked]
    nbytes = [-(-count * width // 8) for count, width in zip(counts.tolist(), widths, strict=True)]
    if idx.ndim != 1 or idx.dtype != np.uint8 or idx.size != sum(nbytes):
        raise WireError(f"{prefix}-idx must be {sum(nbytes)} bytes of packed positions for these counts")
    vals = _float_vector(arrays, f"{prefix}-val", int(counts.sum())) if with_values else None
    packed = torch.from_numpy(idx.copy())
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    byte, start = 0, 0
    for (name, shape), count, width, size in zip(layout.masked, counts.tolist(), widths, nbytes, strict=True):
        pos = unpack_uints(packed[byte : byte + size], count, width)
        if count and (int(pos.max()) >= math.prod(shape) or bool((pos[1:] <= pos[:-1]).any())):
            raise WireError(
                f"{prefix} positions of {name!r} are out of range [0, {math.prod(shape)}) or not strictly increasing"
            )
        out[name] = (pos, vals[start : start + count].clone() if vals is not None else None)
        byte, start = byte + size, start + count
    return out


# --------------------------------------------------------------------------- records and bytes


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    try:
        return {key: array.numpy() for key, array in record.items()}
    except Exception as exc:  # a foreign serialisation type or corrupt bytes
        raise WireError(f"cannot read array record: {exc}") from exc


def content_bytes(content: RecordDict) -> int:
    """The payload bytes of ``content``, what results report as bytes_up / bytes_down.

    Counted: each Array's serialised data (``Array.data``: the ``.npy`` bytes, ~128 B of header
    included), 8 bytes per number and 1 per bool in config and metric records (Flower sends numbers as
    64-bit), the UTF-8 length of each str and of bytes, and every key and record name. Not counted: the
    framing Flower's transport adds (protobuf tags and lengths, each Array's dtype/shape/stype, object ids,
    gRPC, TLS), a few hundred bytes per message. Earlier versions counted Flower's protobuf size through
    its private serde module: under 1 % more for a sparse model (a FedMef LeNet-5 train message at 90 %
    sparsity: 26,499 B there, 26,294 B here). Flower's public ``count_bytes`` counts the same way, but
    its ConfigRecord's raises IndexError on an empty list, which ``counts`` is outside adjustment rounds.
    """
    return sum(len(name.encode()) + _record_bytes(record) for name, record in content.items())


def _record_bytes(record: ArrayRecord | ConfigRecord | MetricRecord) -> int:
    if isinstance(record, ArrayRecord):
        return sum(len(key.encode()) + len(array.data) for key, array in record.items())
    return sum(len(key.encode()) + _value_bytes(value) for key, value in record.items())


def _value_bytes(value: object) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, bool):  # before int: a bool is an int
        return 1
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, bytes):
        return len(value)
    return 8


def _cat_f32(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.to(torch.float32) for p in parts]) if parts else torch.zeros(0, dtype=torch.float32)


def _float_vector(arrays: Mapping[str, np.ndarray], key: str, expected: int, wire_format: str = "fp32") -> torch.Tensor:
    """``arrays[key]`` checked (1-D, ``wire_format``'s dtype, ``expected`` finite values) as a float32 tensor."""
    if key not in arrays:
        raise WireError(f"missing {key!r}")
    value = arrays[key]
    dtype = np.dtype(WIRE_FORMATS[wire_format])
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.ndim != 1:
        found = f"{value.ndim}-D {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise WireError(f"{key!r} must be a 1-D {dtype} vector (wire-format {wire_format!r}), got {found}")
    if value.size != expected:
        raise WireError(f"{key!r} holds {value.size} values; the mask and model need {expected}")
    if not np.isfinite(value).all():
        raise WireError(f"{key!r} holds NaN or Inf values")
    return torch.from_numpy(value.astype(np.float32))  # a copy: the tensor must not alias the message
