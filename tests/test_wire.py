"""The sparse wire format: exact round trips, byte counts, and rejection of malformed content."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.nn.models import build_model
from common.protocol.wire import (
    ModelLayout,
    WireError,
    content_bytes,
    decode_masks,
    decode_positions,
    encode_masks,
    encode_positions,
    from_array_record,
    pack_values,
    to_array_record,
    unpack_values,
)
from common.pruning.masks import random_masks
from common.sparse.bits import index_bits


@pytest.fixture(scope="module")
def lenet():
    model = build_model("lenet5", norm="batchnorm", num_classes=10, in_channels=1)
    layout = ModelLayout.of(model)
    masks = random_masks(layout.masked_shapes, 0.9, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, mask in masks.items():
        state[name] = state[name] * mask
    return model, layout, masks, state


def test_layout_separates_masked_weights_from_dense_tensors(lenet):
    model, layout, _, _ = lenet
    masked = dict(layout.masked)
    assert set(masked) == {n for n, m in model.named_parameters() if n.endswith("weight") and m.dim() >= 2}
    dense = dict(layout.dense)
    assert not any(n.endswith(".mask") or n.endswith("num_batches_tracked") for n in dense)
    assert any(n.endswith("running_mean") for n in dense)  # BatchNorm statistics travel


def test_values_round_trip_exactly_through_an_array_record(lenet):
    _, layout, masks, state = lenet
    arrays = from_array_record(to_array_record(pack_values(state, layout, masks)))
    assert arrays["values"].size == sum(int(m.sum()) for m in masks.values())
    back = unpack_values(arrays, layout, masks)
    for name in back:
        assert torch.equal(back[name], state[name].float()), name


def test_fp16_wire_halves_the_values_and_rounds_each_to_nearest(lenet):
    """``wire-format = "fp16"``: the values travel as float16, each within half a unit in the last
    place (relative error <= 2^-11 in the normal range); the dense tensors stay float32, exact."""
    _, layout, masks, state = lenet
    exact = pack_values(state, layout, masks)
    half = pack_values(state, layout, masks, "fp16")
    assert half["values"].dtype == np.float16 and half["values"].nbytes * 2 == exact["values"].nbytes
    assert np.array_equal(half["dense"], exact["dense"])
    back = unpack_values(from_array_record(to_array_record(half)), layout, masks, "fp16")
    for name, _ in layout.masked:
        assert back[name].dtype == torch.float32
        assert torch.equal(back[name], state[name].half().float()), name  # round to nearest, zeros kept
        err = (back[name] - state[name]).abs()
        assert (err <= state[name].abs() * 2**-11 + 2**-25).all(), name
    for name, _ in layout.dense:
        assert torch.equal(back[name], state[name].float()), name


def test_values_in_another_wire_format_than_agreed_are_refused(lenet):
    _, layout, masks, state = lenet
    with pytest.raises(WireError, match="1-D float32 vector .wire-format 'fp32'., got 1-D float16"):
        unpack_values(pack_values(state, layout, masks, "fp16"), layout, masks)
    with pytest.raises(WireError, match="1-D float16 vector"):
        unpack_values(pack_values(state, layout, masks), layout, masks, "fp16")


def test_a_weight_beyond_fp16s_range_is_refused_at_the_sender_with_the_fix(lenet):
    _, layout, masks, state = lenet
    name = layout.masked[0][0]
    big = {**state, name: state[name] + 1e5 * masks[name]}
    with pytest.raises(WireError, match="exceeds the range of wire-format 'fp16'; run with wire-format = \"fp32\""):
        pack_values(big, layout, masks, "fp16")


def test_dense_values_round_trip(lenet):
    _, layout, _, state = lenet
    back = unpack_values(pack_values(state, layout, None), layout, None)
    assert all(torch.equal(back[n], state[n].float()) for n in back)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.5, 1.0])
def test_masks_round_trip_at_any_density(lenet, density):
    _, layout, _, _ = lenet
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(s, generator=g) < density for n, s in layout.masked}
    back = decode_masks(encode_masks(masks, layout), layout)
    assert all(torch.equal(back[n], masks[n]) for n in masks)


def test_sparse_masks_take_positions_dense_masks_a_bitmap(lenet):
    _, layout, _, _ = lenet
    n = sum(np.prod(s) for _, s in layout.masked)
    empty = {name: torch.zeros(s, dtype=torch.bool) for name, s in layout.masked}
    full = {name: torch.ones(s, dtype=torch.bool) for name, s in layout.masked}
    assert encode_masks(empty, layout).size == 5 * len(layout.masked)  # format byte + count, no positions
    assert encode_masks(full, layout).size == sum(1 + -(-int(np.prod(s)) // 8) for _, s in layout.masked)
    assert encode_masks(full, layout).size < n / 7


@pytest.mark.parametrize("corrupt", ["truncate", "extra", "format", "position"])
def test_corrupt_masks_are_rejected(lenet, corrupt):
    _, layout, masks, _ = lenet
    sparse = {n: torch.zeros_like(m) for n, m in masks.items()}
    sparse[layout.masked[0][0]].view(-1)[[3, 9]] = True
    buf = encode_masks(sparse, layout)
    if corrupt == "truncate":
        buf = buf[:-3]
    elif corrupt == "extra":
        buf = np.concatenate([buf, np.zeros(2, np.uint8)])
    elif corrupt == "format":
        buf = buf.copy()
        buf[0] = 7
    else:  # claim more positions than the layer has
        buf = buf.copy()
        buf[1:5] = np.frombuffer(np.uint32(10**6).tobytes(), np.uint8)
    with pytest.raises(WireError):
        decode_masks(buf, layout)


def test_positions_round_trip_with_and_without_values(lenet):
    _, layout, masks, _ = lenet
    name = layout.masked[2][0]
    entries = {name: (torch.tensor([0, 5, 17]), torch.tensor([0.5, -1.0, 2.0]))}
    back = decode_positions(encode_positions(entries, layout, "topk"), layout, "topk", True)
    assert torch.equal(back[name][0], entries[name][0]) and torch.equal(back[name][1], entries[name][1])
    assert all(back[n][0].numel() == 0 for n, _ in layout.masked if n != name)
    flips = decode_positions(
        encode_positions({name: (torch.tensor([4, 8]), None)}, layout, "flips"), layout, "flips", False
    )
    assert flips[name][0].tolist() == [4, 8] and flips[name][1] is None


@pytest.mark.parametrize("problem", ["missing", "nan", "inf", "short", "dtype", "2d"])
def test_malformed_values_are_rejected(lenet, problem):
    _, layout, masks, state = lenet
    arrays = pack_values(state, layout, masks)
    if problem == "missing":
        del arrays["values"]
    elif problem == "nan":
        arrays["values"][3] = np.nan
    elif problem == "inf":
        arrays["dense"][0] = np.inf
    elif problem == "short":
        arrays["values"] = arrays["values"][:-1]
    elif problem == "dtype":
        arrays["values"] = arrays["values"].astype(np.float64)
    else:
        arrays["values"] = arrays["values"].reshape(1, -1)
    with pytest.raises(WireError):
        unpack_values(arrays, layout, masks)


@pytest.mark.parametrize("problem", ["out-of-range", "unsorted", "count", "negative-count", "nan", "bytes"])
def test_malformed_positions_are_rejected(lenet, problem):
    _, layout, _, _ = lenet
    name, shape = layout.masked[0]
    arrays = encode_positions({name: (torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0, 3.0]))}, layout, "topk")
    if problem == "out-of-range":  # 2**width - 1 lies beyond this layer's n
        arrays = encode_positions(
            {name: (torch.tensor([1, 2, 2 ** index_bits(int(np.prod(shape))) - 1]), torch.tensor([1.0, 2.0, 3.0]))},
            layout,
            "topk",
        )
    elif problem == "unsorted":
        arrays = encode_positions({name: (torch.tensor([3, 1, 2]), torch.tensor([1.0, 2.0, 3.0]))}, layout, "topk")
    elif problem == "count":
        arrays["topk-count"][0] = 4
    elif problem == "negative-count":
        arrays["topk-count"][1] = -1
    elif problem == "nan":
        arrays["topk-val"][0] = np.nan
    else:
        arrays["topk-idx"] = arrays["topk-idx"][:-1]
    with pytest.raises(WireError):
        decode_positions(arrays, layout, "topk", True)


def test_positions_take_ceil_log2_n_bits(lenet):
    _, layout, _, _ = lenet
    name, shape = layout.masked[-1]
    arrays = encode_positions({name: (torch.arange(0, 800, 2), None)}, layout, "flips")
    assert arrays["flips-idx"].size == -(-400 * index_bits(int(np.prod(shape))) // 8)


def test_sparse_content_is_about_a_tenth_of_dense_at_sparsity_0_9(lenet):
    _, layout, masks, state = lenet
    dense = content_bytes(RecordDict({"model": to_array_record(pack_values(state, layout, None))}))
    sparse = content_bytes(RecordDict({"model": to_array_record(pack_values(state, layout, masks))}))
    with_mask = content_bytes(
        RecordDict(
            {
                "model": to_array_record(pack_values(state, layout, masks)),
                "masks": to_array_record({"bits": encode_masks(masks, layout)}),
            }
        )
    )
    assert 0.09 < sparse / dense < 0.11
    assert with_mask - sparse < dense / 32 + 500  # a mask costs at most ~1 bit per weight


def test_content_bytes_are_the_arrays_data_8_bytes_a_number_and_every_key():
    values = Array(np.zeros(10, np.float32))
    assert len(values.data) == 128 + 40  # the .npy header, then the values
    content = RecordDict(
        {
            "model": ArrayRecord({"v": values}),
            # an empty list, as counts is outside adjustment rounds: Flower's own count_bytes fails on it
            "train": ConfigRecord({"counts": [], "lr": 0.1, "bae": True, "model": "lenet5", "ids": [1, 2]}),
            "metrics": MetricRecord({"loss": 1.5, "steps": [1, 2]}),
        }
    )
    model = len("model") + len("v") + 168
    train = len("train") + len("counts") + len("lr") + 8 + len("bae") + 1 + len("model") + 6 + len("ids") + 16
    metrics = len("metrics") + len("loss") + 8 + len("steps") + 16
    assert content_bytes(content) == model + train + metrics


def test_sparse_masks_are_rice_coded_below_half_a_bit_per_weight(lenet):
    _, layout, _, _ = lenet
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(s, generator=g) < 0.08 for n, s in layout.masked}
    buf = encode_masks(masks, layout)
    n = sum(int(np.prod(s)) for _, s in layout.masked)
    assert 8 * buf.size < 0.5 * n
    assert buf[0] in (0, 2)  # the first layer (150 weights) may keep its bitmap; the big ones use Rice


@pytest.mark.parametrize("cut", [1, 6, 12])
def test_corrupt_rice_masks_are_rejected(lenet, cut):
    _, layout, _, _ = lenet
    name, shape = layout.masked[2]
    masks = {n: torch.zeros(s, dtype=torch.bool) for n, s in layout.masked}
    masks[name].view(-1)[torch.arange(0, int(np.prod(shape)), 13)] = True
    buf = encode_masks(masks, layout)
    start = sum(5 for _ in layout.masked[:2])  # two empty layers before it
    assert buf[start] == 2
    bad = buf.copy()
    if cut == 1:  # count larger than the quotients hold
        bad[start + 1 : start + 5] = np.frombuffer(np.uint32(10**5).tobytes(), np.uint8)
    elif cut == 6:  # unary stream length inconsistent with the count
        bad[start + 6 : start + 10] = np.frombuffer(np.uint32(3).tobytes(), np.uint8)
    else:  # a truncated buffer
        bad = bad[: start + 12]
    with pytest.raises(WireError):
        decode_masks(bad, layout)


# Every mask format on edge shapes: an empty layer, one weight, and layers big enough for Rice codes.
EDGE_LAYOUT = ModelLayout(
    masked=(("empty", (0, 3)), ("one", (1, 1)), ("conv", (32, 16, 3, 3)), ("fc", (10, 500))), dense=()
)


def _edge_masks(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    masks = {}
    for name, shape in EDGE_LAYOUT.masked:
        if kind == "zeros":
            masks[name] = torch.zeros(shape, dtype=torch.bool)
        elif kind == "ones":
            masks[name] = torch.ones(shape, dtype=torch.bool)
        elif kind == "non-contiguous":
            # Same shape and values as a random mask, but strided through a transpose.
            flipped = tuple(reversed(shape))
            masks[name] = (torch.rand(flipped, generator=g) < 0.1).permute(*reversed(range(len(shape))))
        else:
            masks[name] = torch.rand(shape, generator=g) < float(kind)
    return masks


@pytest.mark.parametrize("kind", ["zeros", "ones", "non-contiguous", "0.0005", "0.01", "0.05", "0.1", "0.3", "0.7"])
def test_masks_round_trip_bit_identically_on_edge_layouts(kind):
    masks = _edge_masks(kind)
    back = decode_masks(encode_masks(masks, EDGE_LAYOUT), EDGE_LAYOUT)
    assert list(back) == [name for name, _ in EDGE_LAYOUT.masked]
    for name, shape in EDGE_LAYOUT.masked:
        assert back[name].dtype == torch.bool and back[name].shape == shape and back[name].is_contiguous()
        assert torch.equal(back[name], masks[name])


def test_rice_coded_resnet_masks_round_trip_at_several_sparsities():
    layout = ModelLayout.of(build_model("resnet18", num_classes=10, in_channels=3, width=8))
    for sparsity in (0.5, 0.8, 0.9, 0.95, 0.99):
        masks = random_masks(layout.masked_shapes, sparsity, generator=torch.Generator().manual_seed(2))
        buf = encode_masks(masks, layout)
        back = decode_masks(buf, layout)
        assert all(torch.equal(back[n], masks[n]) for n in masks)
        assert 2 in buf  # at least one layer took the Rice path (format byte 2)


def test_every_truncation_and_corruption_raises_wire_error():
    masks = _edge_masks("0.05")
    buf = encode_masks(masks, EDGE_LAYOUT)
    for cut in range(buf.size):
        with pytest.raises(WireError):
            decode_masks(buf[:cut], EDGE_LAYOUT)
    rng = np.random.default_rng(0)
    for _ in range(300):
        bad = buf.copy()
        at = rng.integers(bad.size, size=rng.integers(1, 4))
        bad[at] = rng.integers(256, size=at.size)
        # A flipped bit inside a bitmap or a remainder is still a valid mask; anything else must be a WireError.
        try:
            back = decode_masks(bad, EDGE_LAYOUT)
        except WireError:
            continue
        assert all(back[name].shape == shape and back[name].dtype == torch.bool for name, shape in EDGE_LAYOUT.masked)
