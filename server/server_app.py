"""The Flower ServerApp: validate the run config, build the strategy, run it, write the results.

Each run writes ``<results-dir>/<run-name>/`` with ``results.json`` (rewritten after every round, so an
interrupted run keeps its finished rounds), ``results.svg`` (accuracy and bytes per round),
``results.md`` (the summary table, also printed) and ``model.pt`` (final weights and masks).
"""

from __future__ import annotations

import platform
import random
import time
from datetime import datetime, timezone
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.config import ConfigError, RunConfig, parse_run_config
from common.datasets import DataError, Split, load_dataset
from common.masks import Masks, load_masks
from common.models import build_model
from common.training import evaluate
from server.results import ResultsLog, markdown_table, plot_runs
from server.strategy import make_strategy

app = ServerApp()


class GlobalEvaluator:
    """Accuracy of the global model on the (optionally capped) test set, in a no-SAP copy of the model."""

    def __init__(self, cfg: RunConfig, test: Split, num_classes: int, in_channels: int):
        self.model = build_model(cfg.model, norm=cfg.resolved_norm, num_classes=num_classes,
                                 in_channels=in_channels, gamma=cfg.gamma)
        self.test = test
        self.batch_size = cfg.eval_batch_size

    def __call__(self, state: dict[str, torch.Tensor], masks: Masks) -> tuple[float, float]:
        self.model.load_state_dict(state, strict=False)
        load_masks(self.model, masks)
        return evaluate(self.model, self.test, self.batch_size)


def run_dir(cfg: RunConfig) -> Path:
    name = cfg.run_name or f"{cfg.strategy}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.results_dir).expanduser().resolve() / name


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = parse_run_config(context.run_config)
        data = load_dataset(cfg.dataset, cfg.data_dir or None, download=cfg.download)
    except (ConfigError, DataError) as exc:
        log(ERROR, "%s", exc)
        raise SystemExit(1) from exc
    random.seed(cfg.seed)  # Flower samples nodes with `random`
    torch.manual_seed(cfg.seed)
    test = data.test
    if cfg.max_test_examples and len(test) > cfg.max_test_examples:
        test = Split(test.images[:cfg.max_test_examples], test.labels[:cfg.max_test_examples])
    template = build_model(cfg.model, norm=cfg.resolved_norm, num_classes=data.num_classes,
                           in_channels=data.in_channels, gamma=cfg.gamma)
    out = run_dir(cfg)
    results = ResultsLog(out / "results.json", {
        "strategy": cfg.strategy, "config": cfg.as_dict(), "norm": cfg.resolved_norm, "sap": cfg.sap_on,
        "bae": cfg.bae_on, "started": datetime.now(timezone.utc).isoformat(), "host": platform.node(),
        "torch": torch.__version__, "test_examples": len(test)})
    started = time.time()

    def on_round(record: dict) -> None:
        if record["round"] == 0:
            results.data["run"]["initial"] = record
            return
        results.add_round(record)
        done = record["round"]
        eta = (time.time() - started) / done * (cfg.num_server_rounds - done)
        log(INFO, "[%s] round %d/%d: test acc %.4f, %.1f KiB/client (%.3fx dense), %d clients, %d rejected, "
            "ETA %.0f s", cfg.strategy, done, cfg.num_server_rounds, record["accuracy"],
            record["bytes_per_client"] / 1024, record["bytes_per_client"] / record["dense_bytes_per_client"],
            len(record["clients"]), len(record["rejected"]), eta)

    strategy = make_strategy(cfg, template, GlobalEvaluator(cfg, test, data.num_classes, data.in_channels), on_round)
    strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=cfg.num_server_rounds,
                   timeout=cfg.round_timeout, evaluate_fn=strategy.evaluate_global)
    results.finish()
    torch.save({"state": strategy.global_state(), "masks": strategy.masks, "config": cfg.as_dict()},
               results.path.with_name("model.pt"))
    plot_runs({cfg.strategy: results.data}, results.path.with_suffix(".svg"), title=f"{cfg.strategy} on {cfg.dataset}")
    table = markdown_table({cfg.strategy: results.data})
    results.path.with_suffix(".md").write_text(table + "\n")
    log(INFO, "results: %s\n%s", results.path, table)
