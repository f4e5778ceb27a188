"""The Flower ServerApp: validate the run config, build the strategy, run it, write the results.

Each run writes ``<results-dir>/<run-name>/`` with ``results.json`` (rewritten after every round, so an
interrupted run keeps its finished rounds), ``checkpoint.pt`` (after every round, until the run ends:
``resume = true`` continues a killed run from it, see :mod:`server.checkpoint`), ``results.png``
(accuracy and bytes per round, memory), ``results.md`` (the summary table, also printed) and
``model.pt`` (final weights and masks).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from logging import ERROR, INFO
from pathlib import Path
from typing import cast

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from torch import nn

from common.data.datasets import DataError, Dataset, Split, load_dataset
from common.measure import runtime
from common.nn.models import Norm, build_model
from common.nn.training import evaluate
from common.protocol.config import ConfigError, RunConfig, describe_device, parse_run_config, resolve_device
from common.pruning.masks import Masks, load_masks, sparsity
from server.checkpoint import NAME, check_resumable, discard_checkpoints, load_checkpoint, save_checkpoint
from server.plots import plot_runs
from server.results import ResultsLog, markdown_table
from server.strategy import FleetError, SparseStrategy, make_strategy

app = ServerApp()

# Starts the ServerApp's log line when a run cannot go on, for a launcher to stop waiting at once:
# Flower reports the exception only after winding the simulation down (15-30 s here).
RUN_FAILED = "run failed:"


def global_model(cfg: RunConfig, num_classes: int, in_channels: int) -> nn.Module:
    """The run's model as the server holds it: plain autograd (SAP only matters where it trains)."""
    return build_model(
        cfg.model,
        norm=cast(Norm, cfg.resolved_norm),  # parse_run_config has checked it is one of NORMS
        num_classes=num_classes,
        in_channels=in_channels,
        gamma=cfg.gamma,
        width=cfg.width,
    )


def check_model_takes(cfg: RunConfig, data: Dataset) -> None:
    """A ConfigError unless the run's model takes the data set's images: a model sized for other images
    (LeNet-5's classifier expects 28x28) would otherwise fail in every client with a shape error."""
    shape = tuple(data.test.images.shape[1:])
    model = global_model(cfg, data.num_classes, data.in_channels)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    except RuntimeError as exc:
        raise ConfigError(
            f"model = {cfg.model!r} does not take the {cfg.dataset} images ({' x '.join(map(str, shape))}): "
            f"{str(exc).splitlines()[0]}; choose a model made for them (`model` in the README's configuration table)"
        ) from exc


class GlobalEvaluator:
    """Accuracy of the global model on the (optionally capped) test set, in a no-SAP copy of the model
    on ``device`` (the strategy's own weights and masks stay on the CPU, beside the wire)."""

    def __init__(self, cfg: RunConfig, test: Split, num_classes: int, in_channels: int, device: torch.device):
        self.model = global_model(cfg, num_classes, in_channels).to(device)
        self.test = test
        self.batch_size = cfg.eval_batch_size

    def __call__(self, state: dict[str, torch.Tensor], masks: Masks) -> tuple[float, float]:
        self.model.load_state_dict(state, strict=False)
        load_masks(self.model, masks)
        return evaluate(self.model, self.test, self.batch_size)


def round_evaluation(
    strategy: SparseStrategy, evaluator: GlobalEvaluator, on_record: Callable[[dict], None]
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """Flower's ``evaluate_fn``, its last call of each round: the global model's test accuracy, then the
    round's record (the strategy's :meth:`~server.strategy.SparseStrategy.round_record` plus accuracy)
    handed to ``on_record``. Round 0 is the initial model."""

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and strategy.rounds_before:
            return None  # a resumed run starts from its checkpoint's model, recorded already
        server_round += strategy.rounds_before
        start = time.perf_counter()
        loss, accuracy = evaluator(strategy.global_state(), strategy.masks)
        if server_round == 0:
            on_record({"round": 0, "accuracy": accuracy, "loss": loss, "sparsity": sparsity(strategy.masks)})
        else:
            on_record(
                {
                    **strategy.round_record(),
                    "accuracy": accuracy,
                    "loss": loss,
                    "eval_time_s": time.perf_counter() - start,
                }
            )
        return MetricRecord({"test-loss": loss, "test-acc": accuracy})

    return evaluate_round


def provenance(grid: Grid, device: torch.device) -> dict:
    """What produced a run, for its results file: the app bundle Flower ran (its hash names the code
    exactly; in simulation and on the devices there is no git checkout), the commit when the launcher
    knows it (``FEDMEF_COMMIT``, set by :mod:`server.simulation`), versions, the device the server
    evaluates on and its allocator, and how many nodes were connected at the start. Each client adds
    its own in ``device``."""
    run = grid.run
    return {
        "host": platform.node(),
        "app": {"fab_id": run.fab_id, "fab_version": run.fab_version, "fab_hash": run.fab_hash},
        "commit": os.environ.get("FEDMEF_COMMIT"),
        "flwr": importlib.metadata.version("flwr"),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "device": describe_device(device),
        "allocator": runtime.allocator(),
        "nodes_at_start": len(list(grid.get_node_ids())),
    }


def run_dir(cfg: RunConfig) -> Path:
    name = cfg.run_name or f"{cfg.strategy}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.results_dir).expanduser().resolve() / name


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = parse_run_config(context.run_config)
        device = resolve_device(cfg.device)
        data = load_dataset(cfg.dataset, cfg.data_dir or None, download=cfg.download)
        out = run_dir(cfg)
        saved = load_checkpoint(out) if cfg.resume else None
        if saved is not None:
            check_resumable(saved["config"], cfg.as_dict())
        elif (out / NAME).exists():
            raise ConfigError(
                f"{out} holds the checkpoint of an unfinished run: continue it with resume = true, "
                "or choose another run-name"
            )
        check_model_takes(cfg, data)
    except (ConfigError, DataError) as exc:
        # raised, not SystemExit: Flower reports an exception in the run's status and in
        # `flwr run --stream`, but a ServerApp that exits quietly only after its heartbeat times out
        log(ERROR, "%s %s", RUN_FAILED, exc)
        raise
    torch.manual_seed(cfg.seed)
    test = data.test
    if cfg.max_test_examples and len(test) > cfg.max_test_examples:
        test = test.subset(slice(0, cfg.max_test_examples))
    template = global_model(cfg, data.num_classes, data.in_channels)
    evaluator = GlobalEvaluator(cfg, test, data.num_classes, data.in_channels, device)
    strategy = make_strategy(cfg, template, evaluator, max_train_size=len(data.train))
    if saved is None:
        results = ResultsLog(
            out / "results.json",
            {
                "strategy": cfg.strategy,
                "config": cfg.as_dict(),
                "norm": cfg.resolved_norm,
                "sap": cfg.sap_on,
                "bae": cfg.bae_on,
                "started": datetime.now(UTC).isoformat(),
                "test_examples": len(test),
                **provenance(grid, device),
            },
        )
    else:
        strategy.restore(saved["strategy"], saved["round"])
        results = ResultsLog.resumed(out / "results.json", saved["results"], saved["elapsed_s"])
        log(INFO, "[%s] resuming after round %d of %d in %s", cfg.strategy, saved["round"], cfg.num_server_rounds, out)
    started, first = time.time(), strategy.rounds_before

    def on_record(record: dict) -> None:
        if record["round"] == 0:
            results.set_initial(record)
            return
        results.add_round(record)
        done = record["round"]
        checkpoint = {
            "round": done,
            "config": cfg.as_dict(),
            "strategy": strategy.checkpoint(),
            "results": results.plain(),
            "elapsed_s": results.elapsed_s,
        }
        save_checkpoint(out, checkpoint)
        eta = (time.time() - started) / (done - first) * (cfg.num_server_rounds - done)
        log(
            INFO,
            "[%s] round %d/%d: test acc %.4f, %.1f KiB/client (%.3fx dense), %d clients, %d rejected, "
            "%.0f s elapsed, ETA %.0f s",
            cfg.strategy,
            done,
            cfg.num_server_rounds,
            record["accuracy"],
            record["bytes_per_client"] / 1024,
            record["bytes_per_client"] / record["dense_bytes_per_client"],
            len(record["clients"]),
            len(record["rejected"]),
            results.elapsed_s,
            eta,
        )

    evaluate_round = round_evaluation(strategy, evaluator, on_record)
    if cfg.num_server_rounds > strategy.rounds_before:
        try:
            strategy.start(
                grid,
                initial_arrays=strategy.global_arrays(),
                num_rounds=cfg.num_server_rounds - strategy.rounds_before,
                timeout=cfg.round_timeout,
                evaluate_fn=evaluate_round,
            )
        except FleetError as exc:
            log(ERROR, "%s %s", RUN_FAILED, exc)
            raise
    results.finish()
    torch.save(
        {"state": strategy.global_state(), "masks": strategy.masks, "config": cfg.as_dict()},
        results.path.with_name("model.pt"),
    )
    plot_runs({cfg.strategy: results.data}, results.path.with_suffix(".png"), title=f"{cfg.strategy} on {cfg.dataset}")
    table = markdown_table({cfg.strategy: results.data})
    results.path.with_suffix(".md").write_text(table + "\n")
    discard_checkpoints(out)  # results.json and model.pt now hold everything
    log(INFO, "results: %s\n%s", results.path, table)
