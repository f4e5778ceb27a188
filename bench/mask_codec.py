"""The global mask on the wire: bytes, encode and decode time of :func:`common.protocol.wire.encode_masks` /
:func:`common.protocol.wire.decode_masks` for the models of the protocols.

    python -m bench.mask_codec        # writes bench/results/mask_codec.json and prints the table

Each model is built as FedMef's server builds it (NSConv, CIFAR-10: 10 classes, 3 input channels; LeNet-5
as on Fashion-MNIST: 1 channel) and given random ERK masks at sparsity 0.9, what a node holding a stale
mask version receives. Times are medians over ``--reps`` repetitions at torch's default thread count, both
wall-clock and CPU time of the process (all its threads): on a busy machine the wall-clock time is mostly
waiting for a core, while the CPU time is the work done. Every decode is checked to give back exactly the
encoded masks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common.nn.models import build_model
from common.protocol.wire import ModelLayout, decode_masks, encode_masks
from common.pruning.masks import random_masks, weight_shapes

RESULTS = Path(__file__).resolve().parent / "results"

# (label, model, width, input channels)
MODELS = (
    ("ResNet18, width 8 (conf/cifar10_cpu.toml)", "resnet18", 8, 3),
    ("ResNet18, width 64", "resnet18", None, 3),
    ("MobileNetV2", "mobilenetv2", None, 3),
    ("LeNet-5", "lenet5", None, 1),
)


def _median_seconds(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median (wall-clock, process CPU) seconds of ``fn()``."""
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def measure(name: str, width: int | None, in_channels: int, sparsity: float, reps: int) -> dict[str, float | int]:
    model = build_model(name, "nsconv", None, num_classes=10, in_channels=in_channels, width=width)
    layout = ModelLayout.of(model)
    masks = random_masks(weight_shapes(model), sparsity, generator=torch.Generator().manual_seed(0))
    buf = encode_masks(masks, layout)
    back = decode_masks(buf, layout)
    if any(not torch.equal(back[n], masks[n]) for n in masks):
        raise AssertionError(f"{name}: decode_masks does not give back the encoded masks")
    encode_s, encode_cpu_s = _median_seconds(lambda: encode_masks(masks, layout), reps)
    decode_s, decode_cpu_s = _median_seconds(lambda: decode_masks(buf, layout), reps)
    return {
        "weights": layout.masked_numel,
        "active": sum(int(m.sum()) for m in masks.values()),
        "bytes": int(buf.size),
        "encode_s": encode_s,
        "encode_cpu_s": encode_cpu_s,
        "decode_s": decode_s,
        "decode_cpu_s": decode_cpu_s,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7, help="repetitions per timing (the median is reported)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--out", default=str(RESULTS / "mask_codec.json"))
    a = p.parse_args(argv)
    rows = {label: measure(name, width, ch, a.sparsity, a.reps) for label, name, width, ch in MODELS}
    out = {"sparsity": a.sparsity, "reps": a.reps, "torch_threads": torch.get_num_threads(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"ERK masks at sparsity {a.sparsity}, medians of {a.reps}, {torch.get_num_threads()} torch threads")
    print("| model | weights | active | bytes | bits / weight | encode ms (CPU) | decode ms (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(
            f"| {label} | {r['weights']} | {r['active']} | {r['bytes']} | {8 * r['bytes'] / r['weights']:.3f} "
            f"| {1e3 * r['encode_s']:.1f} ({1e3 * r['encode_cpu_s']:.1f}) "
            f"| {1e3 * r['decode_s']:.1f} ({1e3 * r['decode_cpu_s']:.1f}) |"
        )


if __name__ == "__main__":
    main()
