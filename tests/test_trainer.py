"""Local training as instructed: the adjustment round's gradient pass, exact and within a SAP step's memory."""

import copy
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from client.trainer import build_local_model, effective_weight_gradients, local_train
from common.data.datasets import STANDARDISATIONS, Split
from common.measure.runtime import training_env
from common.nn.layers import set_activation_sparsity
from common.protocol.config import parse_run_config
from common.pruning.masks import load_masks
from server.server_app import global_model
from server.strategy import make_strategy

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(**overrides):
    cfg = parse_run_config(
        {"model": "resnet18", "width": 8, "batch-size": 32, "max-local-steps": 2, "grad-batches": 2, **overrides}
    )
    strategy = make_strategy(cfg, global_model(cfg, 10, 3))
    ins = strategy.instructions(2)  # delta-r 2: an adjustment round with top-K
    assert ins.topk and ins.adjusting
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    data = Split(pixels, torch.randint(0, 10, (96,)), STANDARDISATIONS["cifar10"])
    model = build_local_model(ins, 10, 3)
    model.load_state_dict(strategy.global_state(), strict=False)
    load_masks(model, strategy.masks)
    return model, strategy.masks, data, ins


def test_the_exact_top_k_pass_holds_no_more_than_a_sap_training_step():
    model, masks, data, ins = _setup()
    result = local_train(model, masks, data, ins)
    assert ins.topk_pass == "exact"
    assert 1 <= result.topk_micro_batch < ins.batch_size  # exact activations need a smaller micro-batch
    assert 0 < result.topk_activation_bytes <= result.activation_bytes
    # and SAP is back on for the next round's training
    assert any(getattr(m, "act_sparsity", None) == ins.act_sparsity for m in model.modules())


# One FedMef adjustment round in a fresh process with the training allocator: the process's peak RSS
# (VmHWM) when the gradient pass starts, reset, then again when it ends.
_PASS_PEAK = """
import sys
sys.path.insert(0, "tests")
import client.trainer as trainer
from test_trainer import _setup

def hwm():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))

def measured(*args, **kwargs):
    peaks.append(hwm())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    out = original(*args, **kwargs)
    peaks.append(hwm())
    return out

peaks, original = [], trainer.gradient_pass
trainer.gradient_pass = measured
model, masks, data, ins = _setup(width=32, **{"batch-size": 8, "max-local-steps": 2, "grad-batches": 1})
trainer.local_train(model, masks, data, ins)
print(*peaks)
"""


def test_the_adjustment_rounds_gradient_pass_peaks_no_higher_than_its_training():
    """The pass holds a dense copy of the weights and their gradient; training's last gradients and its
    momentum, two copies as large, are freed first. At width 32 a copy is 11 MiB: with neither freed
    and a fresh gradient per micro-batch beside the running sum, the pass peaked 24 MiB above training."""
    done = subprocess.run(
        [sys.executable, "-c", _PASS_PEAK], env=training_env(), capture_output=True, text=True, check=True
    )
    before, during = (int(kib) for kib in done.stdout.split())
    assert during <= before, f"the pass peaked at {during} KiB, training at {before} KiB"


def test_the_sap_top_k_pass_runs_at_the_full_batch():
    model, masks, data, ins = _setup(**{"topk-pass": "sap"})
    result = local_train(model, masks, data, ins)
    assert result.topk_micro_batch == ins.batch_size


def test_micro_batches_give_the_full_batch_gradient_without_batchnorm():
    model, _, data, ins = _setup()
    set_activation_sparsity(model, None)
    whole, _ = effective_weight_gradients(model, data, 32, 2, torch.Generator().manual_seed(3))
    split, held = effective_weight_gradients(model, data, 32, 2, torch.Generator().manual_seed(3), micro_batch=5)
    for name in whole:
        assert torch.allclose(whole[name], split[name], rtol=1e-4, atol=1e-6), name
    _, held_whole = effective_weight_gradients(model, data, 32, 2, torch.Generator().manual_seed(3))
    assert held < held_whole


def test_sap_and_exact_passes_differ_only_where_sap_prunes_activations():
    model, masks, data, ins = _setup()
    exact = local_train(model, masks, data, ins)
    model, masks, data, ins = _setup()
    approx = local_train(model, masks, data, replace(ins, topk_pass="sap"))
    assert exact.topk is not None and approx.topk is not None
    overlaps = [
        len(set(exact.topk[n][0].tolist()) & set(approx.topk[n][0].tolist())) / max(len(exact.topk[n][0]), 1)
        for n in exact.topk
    ]
    assert min(overlaps) < 1.0  # SAP's gradients are an approximation


def test_a_round_on_a_device_is_the_cpu_round(device):
    """On the CPU every move is a no-op: the round is bit for bit that of a model that never moved (the
    client's path before the device key). On CUDA it is the same round up to float rounding."""
    model, masks, data, ins = _setup()
    assert ins.bae and ins.topk  # SAP, BaE and the top-K pass all run
    unmoved = copy.deepcopy(model)
    reference = local_train(unmoved, {name: m.clone() for name, m in masks.items()}, data, ins)
    result = local_train(model.to(device), {name: m.to(device) for name, m in masks.items()}, data, ins)
    assert result.topk is not None and reference.topk is not None
    assert all(t.device.type == device.type for t in [*model.state_dict().values(), *result.masks.values()])
    assert all(t.device.type == device.type for pair in result.topk.values() for t in pair)
    state = {key: value.cpu() for key, value in model.state_dict().items()}
    if device.type == "cpu":
        assert all(torch.equal(state[key], value) for key, value in unmoved.state_dict().items())
        assert all(torch.equal(result.topk[n][i], reference.topk[n][i]) for n in reference.topk for i in (0, 1))
        assert (result.loss, result.activation_bytes, result.topk_micro_batch, result.marked_norm_end) == (
            reference.loss,
            reference.activation_bytes,
            reference.topk_micro_batch,
            reference.marked_norm_end,
        )
    else:
        for key, value in unmoved.state_dict().items():
            assert torch.allclose(state[key].float(), value.float(), rtol=1e-2, atol=1e-3), key
        assert abs(result.loss - reference.loss) < 1e-2 * reference.loss
        assert abs(result.activation_bytes - reference.activation_bytes) < 0.05 * reference.activation_bytes
        for name, (positions, _) in result.topk.items():  # as many positions, all of them pruned
            assert len(positions) == len(reference.topk[name][0])
            assert not bool(masks[name].reshape(-1)[positions.cpu()].any())
