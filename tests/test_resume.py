"""Checkpoints and resume: what a run killed after round r needs to finish as if it had never stopped."""

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord
from loopback import LoopbackGrid
from test_strategy import run_config as strategy_config

from common.data.datasets import load_dataset
from common.nn.models import build_model
from common.protocol.config import ConfigError, parse_run_config, resolve_device
from server.checkpoint import (
    NAME,
    PREVIOUS,
    check_resumable,
    discard_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from server.results import ResultsLog
from server.server_app import GlobalEvaluator
from server.strategy import make_strategy

ROOT = Path(__file__).resolve().parent.parent
NODES = 4


def run_config(**overrides) -> dict:
    """test_strategy's small federation, with half the nodes sampled per round so the sample matters."""
    return strategy_config(
        **{
            "max-local-steps": 3,
            "delta-r": 1,
            "r-stop": 4,
            "num-server-rounds": 4,
            "max-test-examples": 100,
            "fraction-train": 0.5,
            "min-train-nodes": 2,
            "augment": True,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def fmnist():
    return load_dataset("fashion-mnist")


def strategy_for(fmnist, rc: dict):
    cfg = parse_run_config(rc)
    torch.manual_seed(cfg.seed)  # the ServerApp's seed: the same initial model in every start
    template = build_model(cfg.model, norm=cfg.resolved_norm, num_classes=10, in_channels=1, gamma=cfg.gamma)
    evaluator = GlobalEvaluator(cfg, fmnist.test.subset(slice(0, 100)), 10, 1, resolve_device(cfg.device))
    return make_strategy(cfg, template, evaluator, max_train_size=len(fmnist.train))


def rounds(strategy, grid, first: int, last: int) -> None:
    """Flower's round loop, numbered as Flower numbers the rounds of one ``start``."""
    for server_round in range(first, last + 1):
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, strategy.global_arrays(), ConfigRecord(), grid)
        )
        strategy.aggregate_train(server_round, replies)


@pytest.mark.parametrize("method", ["fedmef", "feddst", "feddip"])
def test_a_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_runs_model_bit_for_bit(fmnist, method, tmp_path):
    """The resumed half runs on a new federation, as a new Flower run does: other node ids, nodes that
    hold no mask, replies in another order. Sampling, the clients' random streams and the aggregation
    order depend on partitions, not on node ids or arrival, so nothing of that shows in the model."""
    rc = run_config(strategy=method)
    whole = strategy_for(fmnist, rc)
    rounds(whole, LoopbackGrid(NODES, rc), 1, 4)

    first = strategy_for(fmnist, rc)
    rounds(first, LoopbackGrid(NODES, rc), 1, 2)
    save_checkpoint(tmp_path, {"round": 2, "config": rc, "strategy": first.checkpoint()})
    del first

    resumed = strategy_for(fmnist, rc)
    resumed.restore(load_checkpoint(tmp_path)["strategy"], 2)
    grid = LoopbackGrid(NODES, rc, first_node=9001)
    grid.contexts = dict(reversed(grid.contexts.items()))  # Flower lists nodes in no promised order
    rounds(resumed, grid, 1, 2)  # Flower's rounds 1-2 of this start are the run's rounds 3-4
    assert resumed.round is not None and resumed.round.number == 4
    assert resumed.mask_version == whole.mask_version
    for name, mask in whole.masks.items():
        assert torch.equal(resumed.masks[name], mask), name
    for name, value in whole.global_state().items():
        assert torch.equal(resumed.global_state()[name], value), name


def test_the_same_seed_samples_the_same_partitions_whatever_the_node_ids(fmnist):
    rc = run_config()
    chosen = []
    for first_node in (101, 7_000_000_000):
        strategy, grid = strategy_for(fmnist, rc), LoopbackGrid(NODES, rc, first_node=first_node)
        messages = strategy.configure_train(1, strategy.global_arrays(), ConfigRecord(), grid)
        partitions = {node: c.node_config["partition-id"] for node, c in grid.contexts.items()}
        chosen.append(sorted(partitions[m.metadata.dst_node_id] for m in messages))
    assert chosen[0] == chosen[1] and len(chosen[0]) == 2


def test_an_over_selected_round_aggregates_the_first_replies_and_records_the_rest(fmnist):
    rc = run_config(**{"fraction-train": 0.25, "min-train-nodes": 1, "over-selection": 1.0})  # want 1, ask 2
    strategy, grid = strategy_for(fmnist, rc), LoopbackGrid(NODES, rc)
    messages = list(strategy.configure_train(1, strategy.global_arrays(), ConfigRecord(), grid))
    asked = [m.metadata.dst_node_id for m in messages]
    grid.slow = {asked[0]}  # its reply is still on its way when the other one is in
    replies = strategy.over_selecting(grid).send_and_receive(messages, timeout=60)
    strategy.aggregate_train(1, replies)
    record = strategy.round_record()
    assert len(asked) == 2
    assert [c["node_id"] for c in record["clients"]] == [asked[1]] and record["abandoned"] == [asked[0]]


def test_a_round_without_enough_nodes_is_skipped_after_the_node_wait_and_the_run_goes_on(fmnist):
    rc = run_config(**{"min-train-nodes": NODES + 1, "node-wait-timeout": 1.0})
    strategy, grid = strategy_for(fmnist, rc), LoopbackGrid(NODES, rc)
    before = {name: t.clone() for name, t in strategy.global_state().items()}
    result = strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=2)
    record = strategy.round_record()
    assert record["round"] == 2 and "only 4 of the min-train-nodes = 5" in record["skipped"]
    assert record["clients"] == [] and not result.train_metrics_clientapp
    for name, value in before.items():
        assert torch.equal(strategy.global_state()[name], value), name


# ---------------------------------------------------------------------------------------------- files


def test_a_checkpoint_replaces_the_last_one_and_keeps_it_as_the_previous(tmp_path):
    save_checkpoint(tmp_path, {"round": 1, "w": torch.ones(3)})
    save_checkpoint(tmp_path, {"round": 2, "w": torch.zeros(3)})
    assert load_checkpoint(tmp_path)["round"] == 2
    assert torch.load(tmp_path / PREVIOUS, weights_only=True)["round"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([NAME, PREVIOUS])  # no temporary file left


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_round(tmp_path, damage):
    save_checkpoint(tmp_path, {"round": 1})
    save_checkpoint(tmp_path, {"round": 2})
    path = tmp_path / NAME
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 9, "empty": b""}[damage]
    )
    assert load_checkpoint(tmp_path)["round"] == 1


def test_resuming_without_a_readable_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint in .*start it without resume"):
        load_checkpoint(tmp_path)
    (tmp_path / NAME).write_bytes(b"junk")
    with pytest.raises(ConfigError, match="unreadable.*new run-name"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_runs_no_code_when_read(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"format": 1, "round": 1, "x": Payload()}, tmp_path / NAME)
    with pytest.raises(ConfigError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_a_resumed_run_may_change_where_it_waits_and_reads_but_not_what_it_computes():
    saved = parse_run_config(run_config()).as_dict()
    check_resumable(saved, {**saved, "resume": True, "round-timeout": 60.0, "data-dir": "/elsewhere"})
    # the hardware too, and a checkpoint from before the device key resumes under the new default
    check_resumable(saved, {**saved, "resume": True, "device": "cuda"})
    check_resumable({k: v for k, v in saved.items() if k != "device"}, {**saved, "resume": True})
    with pytest.raises(ConfigError, match=r"lr = 0.05 -> 0.1.*seed = 42 -> 1"):
        check_resumable(saved, {**saved, "resume": True, "lr": 0.1, "seed": 1})


def test_a_key_added_after_the_checkpoint_counts_as_what_the_app_did_before_it():
    saved = parse_run_config(run_config()).as_dict()
    # written before prune-centre and BaE's step and penalty existed
    older = {key: value for key, value in saved.items() if key not in ("prune-centre", "bae-step", "bae-penalty")}
    # prune-centre's default is what every run did before it: resumable with it
    check_resumable(older, {**saved, "resume": True, "bae-step": "loss", "bae-penalty": "l2"})
    # BaE's default changed after its keys came: such a run took the squared penalty in the loss
    with pytest.raises(ConfigError, match=r"bae-penalty = 'l2' -> 'l1', bae-step = 'loss' -> 'proximal'"):
        check_resumable(older, {**saved, "resume": True})


def test_a_resumed_results_log_goes_on_from_the_checkpoints_rounds(tmp_path):
    log = ResultsLog(tmp_path / "results.json", {"strategy": "fedmef", "torch": torch.__version__})
    log.add_round({"round": 1, "accuracy": 0.5, "loss": float("nan")})
    # what the checkpoint holds: JSON types only, so a weights-only load reads it (torch's version is no str)
    save_checkpoint(tmp_path, {"round": 1, "results": log.plain()})
    saved = load_checkpoint(tmp_path)["results"]
    log.add_round({"round": 2, "accuracy": 0.6})  # in the file, not in the checkpoint: killed in between
    resumed = ResultsLog.resumed(tmp_path / "results.json", saved, elapsed_s=30.0)
    resumed.add_round({"round": 2, "accuracy": 0.61})
    assert [r["accuracy"] for r in resumed.data["rounds"]] == [0.5, 0.61]
    assert resumed.data["run"]["resumed"] == [{"after_round": 1, "elapsed_s": 30.0}]
    assert resumed.finish() is not None and resumed.data["run"]["wall_time_s"] >= 30.0


def test_a_finished_runs_checkpoints_are_removed(tmp_path):
    save_checkpoint(tmp_path, {"round": 1})
    save_checkpoint(tmp_path, {"round": 2})
    discard_checkpoints(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_resume_needs_the_run_name():
    with pytest.raises(ConfigError, match="resume = true needs the run-name"):
        parse_run_config(run_config(resume=True))
