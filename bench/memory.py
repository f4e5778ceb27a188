"""Training memory and step time per configuration: measured, next to the paper's estimates.

Run as ``python -m bench.memory``. For ResNet18 and MobileNetV2 (batch 64, 3x32x32) and each
configuration (BatchNorm; NSConv; NSConv + SAP at s_ta 0.9 with each cache value format of
``sap-format``, fp32, fp16, bf16 and int8, and each position coding: relative to the preceding
ReLU's mask where there is one, the default, or a full bitmap; and NSConv under
``torch.utils.checkpoint`` over 4 segments, what a user would reach for instead of SAP; each dense and
at parameter sparsity 0.9) a fresh child process trains a few SGD steps and reports:

- ``activation_bytes``: every storage autograd holds between forward and backward, counted
  exactly through saved-tensor hooks (model parameters and buffers excluded, they are held anyway);
- parameter, gradient and optimizer (momentum) bytes as allocated;
- the child's peak RSS (its VmHWM, :func:`common.measure.runtime.peak_rss_bytes`) and its median step time,
  with the project's runtime setting
  (:data:`common.measure.runtime.TRAINING_ENV`, huge-page tensor allocation) and, from a second child, with
  glibc's default allocation, whose page faults cost SAP more than plain autograd; NSConv and
  NSConv + SAP, whose step times are compared, run ``--repeats`` times each, alternating, and the
  median is over all their steps (likewise the other SAP formats, alternating with them);
- the appendix 7.2 memory estimate and appendix 7.3 FLOPs for the same model.

Writes ``bench/results/memory.json`` and ``memory.md`` and prints the table.

``--bytes-only`` measures just the activation bytes, in this process, one seeded step per
configuration (they are deterministic: no timing, so it can run on a busy machine), and writes
``memory_bytes.json`` and ``memory_bytes.md``: per model, SAP format and position coding, the bytes
held and their ratio to NSConv without SAP.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from common.measure import runtime
from common.measure.accounting import SavedTensorMeter, estimate_flops, estimate_memory, profile_layers
from common.methods import METHODS
from common.nn import bitkernels
from common.nn.models import build_model
from common.nn.sap import seed_threshold_sampler
from common.nn.sapcache import SAP_FORMATS
from common.pruning.masks import load_masks, random_masks, weight_shapes

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("resnet18", "mobilenetv2")
#: How a SAP cache codes its positions: relative to the preceding ReLU's mask where it can (the
#: default, ``sap_relative``), or always a full bitmap (before it).
POSITIONS = {"relu-relative": True, "bitmap": False}
# (fmt, positions) -> label: "nsconv+sap" is the fp32 cache, "nsconv+sap-<format>" the others,
# "-bitmap" appended for full bitmaps
SAP_CONFIGS = {
    (f, pos): ("nsconv+sap" if f == "fp32" else f"nsconv+sap-{f}") + ("" if relative else "-bitmap")
    for f in SAP_FORMATS
    for pos, relative in POSITIONS.items()
}
CHECKPOINT_SEGMENTS = 4


class Config(NamedTuple):
    label: str
    norm: str
    act_sparsity: float | None = None
    sap_format: str = "fp32"
    sap_relative: bool = True
    #: >0: the model's body runs under ``torch.utils.checkpoint`` in this many segments
    checkpoint_segments: int = 0


CONFIGS = (
    Config("batchnorm", "batchnorm"),
    Config("nsconv", "nsconv"),
    *(Config(label, "nsconv", 0.9, f, POSITIONS[pos]) for (f, pos), label in SAP_CONFIGS.items()),
    Config("nsconv+checkpoint", "nsconv", checkpoint_segments=CHECKPOINT_SEGMENTS),
)
PARAM_SPARSITIES = (0.0, 0.9)
BATCH, STEPS, WARMUP, REPEATS = 64, 8, 1, 3
#: what each child records per timed step, pooled over the repeats
PER_STEP = ("step_seconds", "step_kernel_seconds", "step_minor_faults")
# the configurations whose step times are compared with NSConv's (the target is on the SAP formats as
# they run by default; the full bitmaps are measured once, for their bytes)
TIMED = ("nsconv", *(label for (_, pos), label in SAP_CONFIGS.items() if POSITIONS[pos]), "nsconv+checkpoint")


class _Checkpointed(nn.Module):
    """A model's body (an ``nn.Sequential``) recomputed segment by segment in backward.

    Reentrant on purpose: it saves each segment's input through ``ctx.save_for_backward``, where
    :class:`SavedTensorMeter`'s hooks see it; the non-reentrant variant keeps the inputs through hooks
    of its own, and the meter would count nothing for the checkpointed body.
    """

    def __init__(self, body: nn.Sequential, segments: int):
        super().__init__()
        self.body, self.segments = body, segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_sequential(self.body, self.segments, x, use_reentrant=True)


def checkpointed(model: nn.Module, segments: int) -> nn.Module:
    """``model`` with its body (ResNet's stages, MobileNetV2's inverted residuals) checkpointed."""
    name = "layers" if hasattr(model, "layers") else "blocks"
    setattr(model, name, _Checkpointed(getattr(model, name), segments))
    return model


def _model(
    model_name: str,
    norm: str,
    act_sparsity: float | None,
    sap_format: str,
    param_sparsity: float,
    sap_relative: bool = True,
    checkpoint_segments: int = 0,
):
    torch.manual_seed(0)
    seed_threshold_sampler(0x5A9)
    model = build_model(
        model_name, norm=norm, act_sparsity=act_sparsity, sap_format=sap_format, sap_relative=sap_relative
    )
    if param_sparsity > 0:
        load_masks(
            model, random_masks(weight_shapes(model), param_sparsity, generator=torch.Generator().manual_seed(0))
        )
    return checkpointed(model, checkpoint_segments) if checkpoint_segments else model


def held_bytes(
    model_name: str,
    norm: str,
    act_sparsity: float | None,
    sap_format: str,
    param_sparsity: float,
    batch: int,
    sap_relative: bool = True,
    checkpoint_segments: int = 0,
) -> int:
    """Activation bytes held for backward in one seeded step (deterministic; ``--bytes-only``)."""
    model = _model(model_name, norm, act_sparsity, sap_format, param_sparsity, sap_relative, checkpoint_segments)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(10, (batch,))
    with SavedTensorMeter(model) as meter:
        loss = F.cross_entropy(model(x), y)
    loss.backward()  # the held storages are enough for backward
    return meter.held.activation_bytes


def measure(
    model_name: str,
    norm: str,
    act_sparsity: float | None,
    param_sparsity: float,
    batch: int,
    steps: int,
    sap_format: str = "fp32",
    sap_relative: bool = True,
    checkpoint_segments: int = 0,
) -> dict:
    """Train ``steps`` SGD steps (after one warm-up) and measure; runs inside the child process."""
    model = _model(model_name, norm, act_sparsity, sap_format, param_sparsity, sap_relative, checkpoint_segments)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(10, (batch,))
    times, kernel, faults, held = [], [], [], None
    for step in range(WARMUP + steps):
        usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with SavedTensorMeter(model) as meter:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
            # Where a step's time goes besides arithmetic: pages faulted in (and zeroed) by the kernel
            # for fresh allocations, which the project's mmap threshold makes of every large tensor.
            after = resource.getrusage(resource.RUSAGE_SELF)
            kernel.append(after.ru_stime - usage.ru_stime)
            faults.append(after.ru_minflt - usage.ru_minflt)
        held = meter.held
    params = list(model.parameters())
    costs = profile_layers(model, x)
    estimate = estimate_memory(costs, act_sparsity or 0.0)
    flops = estimate_flops(costs, param_sparsity)
    sparse, sap = param_sparsity > 0, act_sparsity is not None
    return {
        "activation_bytes": held.activation_bytes,
        "saved_tensors": held.tensors,
        "parameter_bytes": sum(p.nbytes for p in params),
        "gradient_bytes": sum(p.grad.nbytes for p in params if p.grad is not None),
        "optimizer_bytes": sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)),
        "allocator": runtime.allocator(),
        "peak_rss_bytes": runtime.peak_rss_bytes(),
        "step_seconds_median": statistics.median(times),
        "step_seconds": times,
        "step_kernel_seconds": kernel,
        "step_minor_faults": faults,
        # a sparse model as FedMef holds it (top-K gradients included), a dense one as FedAvg; SAP as run
        "estimate_bytes": estimate.footprint(METHODS["fedmef" if sparse else "fedavg"], sap),
        "estimate_terms": estimate.__dict__,
        "train_flops_per_step": 3 * (flops.sparse if sparse else flops.dense) + (3 * flops.overhead if sap else 0),
        "inference_flops": {"dense": flops.dense, "sparse": flops.sparse, "sap_bae_overhead": flops.overhead},
    }


def run_child(model_name: str, c: Config, param_sparsity: float, batch: int, steps: int, allocator: str) -> dict:
    child = [model_name, c.norm, c.act_sparsity, param_sparsity, batch, steps]
    child += [c.sap_format, c.sap_relative, c.checkpoint_segments]
    cmd = [sys.executable, "-m", "bench.memory", "--child", json.dumps(child)]
    env = (
        runtime.training_env()
        if allocator == "training"
        else {k: v for k, v in os.environ.items() if k not in runtime.TRAINING_ENV}
    )
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{model_name}/{c.label} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def table(results: dict) -> str:
    rows = [
        "| model | config | s_tm | held for backward (MiB) | params | grads | optim | peak RSS | estimate (app. 7.2) "
        "| step s (median) | of it in the kernel | minor faults/step | step s, glibc | peak RSS, glibc "
        "| train GFLOP/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model_name, entry in results["models"].items():
        for r in entry["configs"].values():
            glibc = r["glibc"] or {}
            rows.append(
                f"| {model_name} | {r['config']} | {r['param_sparsity']} | {mib(r['activation_bytes'])} | "
                f"{mib(r['parameter_bytes'])} | {mib(r['gradient_bytes'])} | {mib(r['optimizer_bytes'])} | "
                f"{mib(r['peak_rss_bytes'])} | {mib(r['estimate_bytes'])} | {r['step_seconds_median']:.2f} | "
                f"{_or_dash(r.get('step_kernel_seconds_median'), '{:.2f}')} | "
                f"{_or_dash(r.get('step_minor_faults_median'), '{:,.0f}')} | "
                f"{_or_dash(glibc.get('step_seconds_median'), '{:.2f}')} | "
                f"{_or_dash(glibc.get('peak_rss_bytes'), mib)} | "
                f"{r['train_flops_per_step'] / 1e9:.1f} |"
            )
    rows.append("")
    rows.append(
        "| model | s_tm | activation bytes nsconv / nsconv+SAP | step time nsconv+SAP / nsconv "
        "| same, glibc allocation | activation bytes nsconv / checkpoint | step time checkpoint / nsconv |"
    )
    rows.append("|---|---|---|---|---|---|---|")
    for model_name, entry in results["models"].items():
        for s, ratio in entry["ratios"].items():
            rows.append(
                f"| {model_name} | {s} | {ratio['activation_reduction']:.2f}x | {ratio['sap_step_time_ratio']:.2f}x "
                f"| {_or_dash(ratio['sap_step_time_ratio_glibc'], '{:.2f}x')} "
                f"| {ratio['checkpoint_activation_reduction']:.2f}x | {ratio['checkpoint_step_time_ratio']:.2f}x |"
            )
    rows.append("")
    rows.append(format_table(results))
    return "\n".join(rows)


def _or_dash(value: float | None, fmt) -> str:
    """``value`` formatted (a format string or a function), or "-" where it was not measured."""
    if value is None:
        return "-"
    return fmt(value) if callable(fmt) else fmt.format(value)


def format_table(results: dict) -> str:
    """Per model, parameter sparsity, SAP cache format and position coding: bytes held, and their
    reduction and step time against NSConv without SAP (step times only where measured)."""
    rows = [
        "| model | s_tm | SAP format | positions | held for backward (MiB) | nsconv / this | step time this / nsconv |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_name, entry in results["models"].items():
        for s, per_format in entry["formats"].items():
            for fmt, per_coding in per_format.items():
                for pos, r in per_coding.items():
                    step = f"{r['step_time_ratio']:.2f}x" if "step_time_ratio" in r else "-"
                    rows.append(
                        f"| {model_name} | {s} | {fmt} | {pos} | {mib(r['activation_bytes'])} | "
                        f"{r['activation_reduction']:.2f}x | {step} |"
                    )
    return "\n".join(rows)


def _formats(configs: dict, s: float) -> dict:
    """The per-format, per-coding entries of one parameter sparsity from ``configs`` (label@s -> measurement)."""
    plain = configs[f"nsconv@{s}"]
    out: dict = {}
    for (fmt, pos), label in SAP_CONFIGS.items():
        r = configs.get(f"{label}@{s}")
        if r is None:
            continue
        entry = out.setdefault(fmt, {})[pos] = {
            "activation_bytes": r["activation_bytes"],
            "activation_reduction": plain["activation_bytes"] / r["activation_bytes"],
        }
        if "step_seconds_median" in r and "step_seconds_median" in plain:
            entry["step_time_ratio"] = r["step_seconds_median"] / plain["step_seconds_median"]
    return out


def bytes_only(models: list[str], batch: int, out: Path, sparsities: list[float]) -> None:
    """``--bytes-only``: activation bytes per configuration, measured in this process."""
    results: dict = {"batch": batch, "input": [3, 32, 32], "torch": torch.__version__, "models": {}}
    for model_name in models:
        configs = {}
        for s in sparsities:
            for c in CONFIGS:
                print(f"[bench.memory] {model_name} {c.label} s_tm={s} (bytes) ...", file=sys.stderr, flush=True)
                held = held_bytes(
                    model_name, c.norm, c.act_sparsity, c.sap_format, s, batch, c.sap_relative, c.checkpoint_segments
                )
                configs[f"{c.label}@{s}"] = {"config": c.label, "sap_format": c.sap_format, "activation_bytes": held}
        results["models"][model_name] = {
            "activation_bytes": {k: v["activation_bytes"] for k, v in configs.items()},
            "formats": {str(s): _formats(configs, s) for s in sparsities},
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_bytes.json").write_text(json.dumps(results, indent=2))
    text = format_table(results)
    (out / "memory_bytes.md").write_text(
        f"# bench.memory --bytes-only (batch {batch}, 3x32x32, one seeded step each; s_ta 0.9; "
        f"torch {torch.__version__})\n\n{text}\n"
    )
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument(
        "--repeats",
        type=int,
        default=REPEATS,
        help="fresh-process runs of nsconv and nsconv+SAP, alternating, whose steps are pooled",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--param-sparsities", nargs="+", type=float, default=list(PARAM_SPARSITIES), metavar="S_TM")
    parser.add_argument(
        "--no-glibc", action="store_true", help="skip the second child per run that uses glibc's default allocation"
    )
    parser.add_argument(
        "--bytes-only",
        action="store_true",
        help="only the activation bytes held per configuration and SAP format (no timing; memory_bytes.json)",
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return
    if args.bytes_only:
        bytes_only(args.models, args.batch, args.out, args.param_sparsities)
        return

    results = {
        "batch": args.batch,
        "input": [3, 32, 32],
        "steps": args.steps,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sap_kernels": bitkernels.status(),
        "allocation": {
            "main": f"huge pages, {runtime.TRAINING_ENV}",
            "glibc": "not measured" if args.no_glibc else "glibc malloc defaults",
        },
        "models": {},
    }
    for model_name in args.models:
        configs = {}
        for s in args.param_sparsities:
            # The two configurations whose step times are compared alternate, each time in fresh
            # processes, so that a slow spell of this shared machine does not fall on one of them only.
            for rep in range(args.repeats):
                for c in CONFIGS:
                    if rep and c.label not in TIMED:
                        continue
                    print(
                        f"[bench.memory] {model_name} {c.label} s_tm={s} ({rep + 1}) ...", file=sys.stderr, flush=True
                    )
                    child = (model_name, c, s, args.batch, args.steps)
                    r = run_child(*child, "training")
                    glibc = None if args.no_glibc else run_child(*child, "glibc")
                    key = f"{c.label}@{s}"
                    if rep == 0:
                        configs[key] = {
                            "config": c.label,
                            "norm": c.norm,
                            "act_sparsity": c.act_sparsity,
                            "sap_format": c.sap_format,
                            "checkpoint_segments": c.checkpoint_segments,
                            "param_sparsity": s,
                            **r,
                            "glibc": glibc and {k: glibc[k] for k in ("allocator", "peak_rss_bytes", *PER_STEP)},
                        }
                    else:
                        for k in PER_STEP:
                            configs[key][k] += r[k]
                            if glibc:
                                configs[key]["glibc"][k] += glibc[k]
        for entry in configs.values():  # over every run's steps
            for timed in filter(None, (entry, entry["glibc"])):
                for k in PER_STEP:
                    timed[f"{k}_median"] = statistics.median(timed[k])
        ratios = {}
        for s in args.param_sparsities:
            plain, sap = configs[f"nsconv@{s}"], configs[f"nsconv+sap@{s}"]
            ckpt = configs[f"nsconv+checkpoint@{s}"]
            ratios[str(s)] = {
                "activation_reduction": plain["activation_bytes"] / sap["activation_bytes"],
                "sap_step_time_ratio": sap["step_seconds_median"] / plain["step_seconds_median"],
                "checkpoint_activation_reduction": plain["activation_bytes"] / ckpt["activation_bytes"],
                "checkpoint_step_time_ratio": ckpt["step_seconds_median"] / plain["step_seconds_median"],
                "sap_step_time_ratio_glibc": sap["glibc"]["step_seconds_median"] / plain["glibc"]["step_seconds_median"]
                if plain["glibc"]
                else None,
            }
        results["models"][model_name] = {
            "configs": configs,
            "ratios": ratios,
            "formats": {str(s): _formats(configs, s) for s in args.param_sparsities},
            "activation_bytes": {k: v["activation_bytes"] for k, v in configs.items()},
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    (args.out / "memory.md").write_text(
        f"# bench.memory (batch {args.batch}, 3x32x32, {args.steps} steps; NSConv and "
        f"NSConv + SAP: {args.repeats} alternating runs of {args.steps} steps; torch {torch.__version__})\n\n"
        f"SAP kernels: {results['sap_kernels']}\n\n{text}\n"
    )
    print(text)


if __name__ == "__main__":
    main()
