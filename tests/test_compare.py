"""The experiment runner: finished runs are skipped, unfinished ones resumed or redone, the summary from run files."""

import json
import statistics
import subprocess

import pytest

import bench.compare as compare
from server.checkpoint import save_checkpoint
from server.results import ResultsLog


def _write_run(folder, accuracies, finish=True, drops=(), squeeze=None):
    log = ResultsLog(folder / "results.json", {"strategy": "fedmef"})
    for i, acc in enumerate(accuracies, start=1):
        record = {"round": i, "accuracy": acc, "bytes_per_client": 10.0, "dense_bytes_per_client": 100.0}
        if i <= len(drops):
            record["accuracy_before_adjustment"] = acc + drops[i - 1]
        if squeeze is not None:
            record["clients"] = [{"bae_marked": 5, "bae_norm_start": 1.0, "bae_norm_end": squeeze}]
        log.add_round(record)
    if finish:
        log.finish()


@pytest.fixture
def lab(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    monkeypatch.setitem(
        compare.PROTOCOLS, "toy", compare.Protocol("compare_fmnist.toml", 2, "toy", runs={"a": {}, "b": {}})
    )
    calls = []

    def fake_simulation(run_config, supernodes, results_dir, run_name, **kwargs):
        calls.append((run_name, run_config["seed"], run_config.get("resume", False)))
        if run_config.get("resume"):
            (results_dir / run_name / "results.json").unlink()  # the ServerApp rewrites it from the checkpoint
        _write_run(results_dir / run_name, [0.5, 0.6])
        return json.loads((results_dir / run_name / "results.json").read_text())

    monkeypatch.setattr(compare, "run_simulation", fake_simulation)
    return tmp_path, calls


def test_finished_runs_are_skipped_and_unfinished_ones_redone_with_the_old_folder_kept(lab):
    root, calls = lab
    _write_run(root / "toy" / "a-s0", [0.1, 0.2])  # finished
    _write_run(root / "toy" / "a-s1", [0.1], finish=False)  # crashed mid-run
    compare.run_matrix("toy", ["a"], [0, 1])
    assert calls == [("a-s1", 1, False)]
    assert (root / "toy" / "a-s1.partial" / "results.json").exists()
    assert compare.finished(root / "toy" / "a-s1")
    compare.run_matrix("toy", ["a"], [0, 1])  # nothing left to do
    assert calls == [("a-s1", 1, False)]


def test_an_unfinished_run_with_a_checkpoint_is_resumed_in_its_own_folder(lab):
    root, calls = lab
    _write_run(root / "toy" / "a-s0", [0.1], finish=False)
    save_checkpoint(root / "toy" / "a-s0", {"round": 1})
    compare.run_matrix("toy", ["a"], [0])
    assert calls == [("a-s0", 0, True)]
    assert not (root / "toy" / "a-s0.partial").exists() and compare.finished(root / "toy" / "a-s0")


def test_the_summary_comes_from_the_run_files(lab):
    root, _ = lab
    finals = {0: [0.50, 0.60], 1: [0.70, 0.80], 2: [0.40, 0.44]}
    for seed, accs in finals.items():
        _write_run(root / "toy" / f"a-s{seed}", accs, drops=(0.05, 0.01), squeeze=0.4 + 0.1 * seed)
    _write_run(root / "toy" / "b-s0", [0.3], finish=False)  # unfinished runs are left out
    summary = compare.summarize_protocol("toy")
    assert set(summary["runs"]) == {"a"}
    a = summary["runs"]["a"]
    means = [statistics.fmean(v) for v in finals.values()]  # final = mean of the (at most 5) last rounds
    assert a["seeds"] == [0, 1, 2]
    assert a["final_accuracy"]["mean"] == pytest.approx(statistics.fmean(means))
    assert a["final_accuracy"]["std"] == pytest.approx(statistics.stdev(means))
    assert (a["final_accuracy"]["min"], a["final_accuracy"]["max"]) == pytest.approx((min(means), max(means)))
    assert a["last_accuracy"]["mean"] == pytest.approx(statistics.fmean([0.60, 0.80, 0.44]))
    assert a["adjustment_drop"]["mean"] == pytest.approx(0.03)
    assert a["adjustment_change"]["mean"] == pytest.approx(0.03)  # both drops positive here
    assert a["bae_worst_squeeze"]["max"] == pytest.approx(0.6)
    # seeds 0 and 1 squeeze to 0.4 and 0.5 (halved: both rounds), seed 2 to 0.6 (neither)
    assert a["bae_rounds"] == 2 and a["bae_rounds_halved"]["mean"] == pytest.approx(4 / 3)
    assert "| 1.3 ± 1.2 of 2 |" in (root / "toy" / "summary.md").read_text()
    assert (root / "toy" / "summary.png").stat().st_size > 0
    assert (root / "toy" / "summary_final.png").stat().st_size > 0
    assert a["final10_by_seed"] == pytest.approx({seed: 100 * statistics.fmean(v) for seed, v in finals.items()})
    assert "| a | 3 |" in (root / "toy" / "summary.md").read_text()


def test_the_late_gain_is_the_last_ten_rounds_over_the_ten_before_and_needs_twenty(lab):
    root, _ = lab
    climbing = [0.1] * 5 + [0.3] * 10 + [0.5] * 10  # 25 rounds: rounds 6-15 at 0.3, 16-25 at 0.5
    _write_run(root / "toy" / "a-s0", climbing)
    _write_run(root / "toy" / "b-s0", [0.3] * 19)  # too short to tell
    assert compare.late_gain(compare.read_results(root / "toy" / "a-s0" / "results.json")) == pytest.approx(0.2)
    summary = compare.summarize_protocol("toy")["runs"]
    assert summary["a"]["final10_accuracy"]["mean"] == pytest.approx(0.5)
    assert summary["a"]["late_gain"]["mean"] == pytest.approx(0.2)
    assert summary["b"]["late_gain"]["n"] == 0 and summary["b"]["final10_accuracy"]["mean"] == pytest.approx(0.3)
    table = (root / "toy" / "summary.md").read_text()
    assert "| 50.00 ± 0.00 | 20.00 ± 0.00 |" in table and "| 30.00 ± 0.00 | n/a |" in table


def test_how_far_training_got_counts_examples_and_compares_late_test_and_training_losses(lab):
    root, _ = lab
    log = ResultsLog(root / "toy" / "a-s0" / "results.json", {"strategy": "fedavg"})
    for i in range(1, 26):  # rounds 6-15 against 16-25: the test loss falls by 0.5, the training loss rises by 0.1
        clients = [{"examples": 100, "loss": 1.0 + 0.1 * (i > 15) + d} for d in (-0.2, 0.2)]
        log.add_round({"round": i, "accuracy": 0.5, "loss": 2.0 - 0.5 * (i > 15), "clients": clients})
    log.finish()
    results = compare.read_results(root / "toy" / "a-s0" / "results.json")
    assert compare.examples_processed(results) == 25 * 2 * 100
    assert compare.late_loss_change(results) == pytest.approx((-0.5, 0.1))
    a = compare.summarize_protocol("toy")["runs"]["a"]
    assert a["examples_processed"]["mean"] == 5000
    assert a["late_test_loss_change"]["mean"] == pytest.approx(-0.5)
    assert a["late_train_loss_change"]["mean"] == pytest.approx(0.1)
    assert "| a | 5,000 | -0.500 ± 0.000 | 0.100 ± 0.000 |" in (root / "toy" / "summary.md").read_text()


def test_fedmef_is_compared_with_every_run_seed_by_seed_over_the_seeds_both_finished(lab, monkeypatch):
    root, _ = lab
    runs = {"fedmef": {}, "fedtiny": {}, "fedavg": {}}
    monkeypatch.setitem(compare.PROTOCOLS, "pair", compare.Protocol("compare_fmnist.toml", 2, "pair", runs=runs))
    for seed, acc in {0: 0.30, 1: 0.40, 2: 0.50}.items():
        _write_run(root / "pair" / f"fedmef-s{seed}", [acc])
    for seed, acc in {0: 0.35, 2: 0.52}.items():  # fedtiny's seed 1 did not run
        _write_run(root / "pair" / f"fedtiny-s{seed}", [acc])
    paired = compare.summarize_protocol("pair")["paired_vs_reference"]
    assert set(paired) == {"fedtiny"}  # not fedmef against itself, nor fedavg, which has no seed
    assert paired["fedtiny"]["by_seed"] == pytest.approx({0: -5.0, 2: -2.0})
    assert paired["fedtiny"]["mean"] == pytest.approx(-3.5) and paired["fedtiny"]["n"] == 2
    assert "| fedtiny | 2 | -3.50 ± 2.12 | 0: -5.00, 2: -2.00 |" in (root / "pair" / "summary.md").read_text()
    assert compare.summarize_protocol("toy")["paired_vs_reference"] == {}  # a protocol without FedMef


def test_drops_of_both_signs_cancel_in_the_mean_drop_not_in_its_absolute_value(lab):
    root, _ = lab
    _write_run(root / "toy" / "a-s0", [0.5, 0.5], drops=(0.02, -0.02))
    a = compare.summarize_protocol("toy")["runs"]["a"]
    assert a["adjustment_drop"]["mean"] == pytest.approx(0.0)
    assert a["adjustment_change"]["mean"] == pytest.approx(0.02)


def test_a_run_whose_name_starts_another_runs_name_keeps_its_own_seeds(lab, monkeypatch):
    root, _ = lab
    monkeypatch.setitem(
        compare.PROTOCOLS, "toy", compare.Protocol("compare_fmnist.toml", 2, "toy", runs={"x": {}, "x-sap": {}})
    )
    _write_run(root / "toy" / "x-s0", [0.1, 0.2])
    _write_run(root / "toy" / "x-sap-s0", [0.5, 0.6])
    table = compare.summarize_protocol("toy")["runs"]
    assert table["x"]["seeds"] == [0] and table["x-sap"]["seeds"] == [0]


def test_a_run_that_lost_many_replies_to_client_errors_is_redone_and_left_out(lab):
    """Ray killed workers of two CIFAR runs when other jobs filled the memory (252 of 600 replies): such
    a run measured the machine, not the method."""
    root, calls = lab
    folder = root / "toy" / "a-s0"
    _write_run(folder, [0.1, 0.2])
    data = json.loads((folder / "results.json").read_text())
    data["rounds"][0]["clients"] = [{"node_id": 1}]
    data["rounds"][0]["rejected"] = [{"node_id": 2, "reason": "client error: OutOfMemoryError"}]
    (folder / "results.json").write_text(json.dumps(data))
    assert compare.lost_replies(data) == 0.5 and not compare.finished(folder)
    compare.run_matrix("toy", ["a"], [0])
    assert calls == [("a-s0", 0, False)] and (root / "toy" / "a-s0.partial").exists()


def test_a_failed_run_is_reported_and_the_matrix_goes_on_without_it(lab, monkeypatch):
    root, calls = lab
    succeed = compare.run_simulation

    def flaky(run_config, supernodes, results_dir, run_name, **kwargs):
        if run_name == "a-s0":
            raise compare.SimulationError("flwr run failed (exit 1)")
        return succeed(run_config, supernodes, results_dir, run_name, **kwargs)

    monkeypatch.setattr(compare, "run_simulation", flaky)
    assert compare.run_matrix("toy", ["a", "b"], [0]) == ["a-s0"]
    assert compare.finished(root / "toy" / "b-s0") and not compare.finished(root / "toy" / "a-s0")
    with pytest.raises(SystemExit, match="1 run\\(s\\) failed: a-s0"):
        compare.main(["--protocol", "toy", "--seeds", "0"])


def test_each_run_starts_a_fresh_interpreter_with_the_runs_settings(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        _write_run(tmp_path / "x-s0", [0.5])
        return subprocess.CompletedProcess(cmd, 0, stderr="")

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    compare.run_simulation(
        {"seed": 3, "strategy": "fedtiny", "resume": True}, 7, tmp_path, "x-s0", preset=tmp_path / "p.toml", timeout=60
    )
    cmd = seen["cmd"]
    assert cmd[1:3] == ["-m", "server.simulation"] and cmd[cmd.index("--supernodes") + 1] == "7"
    assert cmd[cmd.index("--set") + 1] == 'seed=3 strategy="fedtiny"' and "--resume" in cmd
    assert cmd[cmd.index("--timeout") + 1] == "60"
