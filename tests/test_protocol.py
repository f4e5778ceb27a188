"""The per-round instructions: a round trip through a Flower ConfigRecord, and bad records refused."""

import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from common.protocol.instructions import Instructions, ProtocolError

BASE = Instructions(
    server_round=3,
    model="lenet5",
    width=64,
    norm="nsconv",
    s_ta=0.9,
    sap_linear=False,
    sap_format="fp16",
    wire_format="fp16",
    gamma=1.7,
    mode="masked",
    mask_version=2,
    lr=0.05,
    eta0=0.05,
    momentum=0.9,
    weight_decay=0.0,
    local_epochs=1,
    max_local_steps=10,
    batch_size=32,
    augment=True,
    seed=7,
    counts=[3, 0, 5],
    bae=True,
    bae_lambda=1e-3,
    bae_step="loss",
    bae_penalty="l1",
    prune_centre="filter-mean",
    topk=True,
    grad_batches=2,
    topk_pass="exact",
    adjust_local=False,
    reg_lambda=0.0,
)


def test_round_trip_through_the_wire():
    rd = recorddict_from_proto(recorddict_to_proto(RecordDict({"train": ConfigRecord(BASE.to_config())})))
    back = Instructions.from_config(rd["train"])
    assert back == BASE and back.adjusting and back.act_sparsity == 0.9


@pytest.mark.parametrize(
    "key, value",
    [
        ("batch-size", "32"),
        ("bae", 1),
        ("counts", [1.5]),
        ("mode", "sparse"),
        ("batch-size", 0),
        ("server-round", True),
        ("sap-format", "fp8"),
        ("sap-format", 16),
        ("wire-format", "int8"),
        ("bae-penalty", "l0"),
    ],
)
def test_bad_values_are_refused_with_the_key(key, value):
    config = {**BASE.to_config(), key: value}
    with pytest.raises(ProtocolError):
        Instructions.from_config(config)


def test_a_missing_key_is_refused_and_ints_pass_for_floats():
    config = BASE.to_config()
    del config["lr"]
    with pytest.raises(ProtocolError, match="'lr'"):
        Instructions.from_config(config)
    assert Instructions.from_config({**BASE.to_config(), "lr": 1}).lr == 1.0
    assert Instructions.from_config({**BASE.to_config(), "s-ta": -1.0}).act_sparsity is None
