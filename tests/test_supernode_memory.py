"""bench.supernode_memory's measuring parts: the ClientApp process sampler and the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.supernode_memory import ClientAppSampler, Deployment, table, write
from common.measure import runtime

ALLOCATE = "import time; block = bytearray({mib} * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(0.3)"


def _named_child(name: str, mib: int) -> subprocess.Popen:
    # argv[0] is what the sampler matches, as Flower's own processes show theirs
    code = ALLOCATE.format(mib=mib)
    return subprocess.Popen(["bash", "-c", f'exec -a {name} "{sys.executable}" -c "{code}"'])


def test_the_sampler_keeps_the_peak_of_each_clientapp_process_after_it_exits_and_ignores_others():
    with ClientAppSampler(os.getpid()) as sampler:
        for name, mib in (("flwr-clientapp", 120), ("flower-supernode", 300), ("flwr-clientapp", 40)):
            _named_child(name, mib).wait()
            time.sleep(0.05)
    peaks = [peak / 2**20 for peak in sampler.in_order()]
    assert len(peaks) == 2, peaks  # the two ClientApps, oldest first; not the SuperNode-named one
    assert 120 < peaks[0] < 120 + 60, peaks  # the block plus the interpreter
    assert 40 < peaks[1] < 40 + 60, peaks


def test_a_round_takes_the_peak_of_the_process_its_reply_names_and_an_unseen_one_is_a_clear_error():
    with ClientAppSampler(os.getpid()) as sampler:
        # a spare process first, as a SuperNode beside a busy runner started: order must not matter
        for mib in (150, 40):
            child = _named_child("flwr-clientapp", mib)
            child.wait()
            time.sleep(0.05)
    trained = child.pid
    assert 40 < sampler.peak_of(trained, "round 2") / 2**20 < 40 + 60
    with pytest.raises(
        RuntimeError, match=r"round 3: the reply names ClientApp process 1, which the sampler never saw"
    ):
        sampler.peak_of(1, "round 3")
    with pytest.raises(RuntimeError, match=r"round 1: the reply names ClientApp process None"):
        sampler.peak_of(None, "round 1")


def test_the_table_compares_normal_rounds_with_fedtinys_on_the_same_model():
    def row(method: str, normal: float, adjustment: float) -> dict:
        return {
            "model": "resnet18",
            "method": method,
            "peak_mib": {"first": normal - 60, "adjustment": adjustment, "normal": normal},
            "activation_mib": [20.0, 20.0, 20.0],
            "topk_activation_mib": [0.0, 19.9, 0.0],
            "train_s": [1.0, 2.0, 1.0],
        }

    text = table([row("fedtiny", 1500, 1500), row("fedmef", 900, 910)], "t")
    fedmef = next(line for line in text.splitlines() if line.startswith("| resnet18 | fedmef |"))
    assert "| 900 | 910 | 840 | -40% |" in fedmef
    assert "| 19.9 |" in fedmef


def test_a_run_past_its_timeout_is_a_clear_error_that_names_the_option(tmp_path: Path):
    dep = Deployment.__new__(Deployment)  # the operator's side only: no SuperLink is needed to time out
    dep.homes = {"operator": tmp_path}
    with pytest.raises(RuntimeError, match=r"resnet18-fedmef: flwr run took over 0 s.*--timeout"):
        dep.run({"run-name": "resnet18-fedmef"}, timeout=0.001)


def test_results_record_the_training_environment(tmp_path: Path):
    row = {
        "model": "resnet18",
        "method": "fedtiny",
        "peak_mib": {"first": 1, "adjustment": 2, "normal": 3},
        "activation_mib": [1.0],
        "topk_activation_mib": [0.0],
        "train_s": [1.0],
    }
    write([row], "t", tmp_path, "partial")
    record = json.loads((tmp_path / "partial.json").read_text())
    assert record["training_env"] == runtime.TRAINING_ENV and record["rows"] == [row]
    assert (tmp_path / "partial.md").read_text().startswith("t\n")
