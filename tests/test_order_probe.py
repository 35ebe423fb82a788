"""benchmarks/order_probe.py: labels of sequence clips, the order margin and twin decision, the
state targets, grid pooling, and that a probe learns order from inputs that carry it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import imported_benchmark


@pytest.fixture(scope="module")
def probe():
    with imported_benchmark("order_probe") as module:
        yield module


def _meta(kind, events, objects=None):
    objects = objects or [{"shape": "circle", "colour": "red", "size": "small", "x": 0.5, "y": 0.5},
                          {"shape": "square", "colour": "blue", "size": "large", "x": 0.3, "y": 0.3}]
    return {"kind": kind, "objects": objects, "events": events, "hard_negatives": []}


def test_sequence_labels_follow_the_steps_not_the_list_order(probe):
    meta = _meta("sequence", [{"object": 1, "motion": "grow", "step": 1}, {"object": 0, "motion": "left", "step": 0}])
    first, second = probe.sequence_labels(meta)
    colours, shapes, motions = (names for _, names in probe.EVENT_FIELDS)
    assert first == (colours.index("red"), shapes.index("circle"), motions.index("left"))
    assert second == (colours.index("blue"), shapes.index("square"), motions.index("grow"))
    assert probe.sequence_labels(_meta("concurrent", [{"object": 0, "motion": "left", "step": 0},
                                                      {"object": 1, "motion": "up", "step": 0}])) is None
    assert probe.sequence_labels(_meta("single", [{"object": 0, "motion": "left", "step": 0}])) is None


def test_frame_times_of_8_from_16_frames(probe):
    assert probe.frame_times(16, 8) * 15 == pytest.approx([0, 2, 4, 6, 9, 11, 13, 15])


def test_order_margin_is_antisymmetric_and_follows_the_half_heads(probe):
    sizes = probe.FIELD_SIZES
    logits = torch.zeros(1, 2 * sum(sizes))
    motion0 = sizes[0] + sizes[1]  # the first half's motion block
    logits[0, motion0 + 3] = 2.0  # half 1 prefers motion 3
    logits[0, sum(sizes) + motion0 + 5] = 1.0  # half 2 prefers motion 5
    a = torch.tensor([[0, 0, 3]])
    b = torch.tensor([[0, 0, 5]])
    margin = probe.order_margin(logits, a, b)
    assert float(margin) > 0
    # Exact value: only the motion fields differ; log-softmax constants cancel, 2 + 1 of logits remain.
    assert float(margin) == pytest.approx(3.0, abs=1e-5)
    assert float(probe.order_margin(logits, b, a)) == pytest.approx(-3.0, abs=1e-5)


def test_twin_accuracy_compares_the_two_clips_margins(probe):
    # A orders its events right by 2, B (A's events swapped) wrongly by 1: A still wins (2 - 1 > 0).
    assert probe.twin_accuracy(np.array([2.0, -1.0]), ["a", "b"], [("a", "b"), ("b", "a")]) == 100.0
    assert probe.twin_accuracy(np.array([1.0, -3.0]), ["a", "b"], [("a", "b"), ("b", "a")]) == 0.0
    assert probe.twin_accuracy(np.array([1.0, -1.0]), ["a", "b"], [("a", "b")]) == 50.0
    with pytest.raises(ValueError, match="no order-twin pairs"):
        probe.twin_accuracy(np.array([1.0]), ["a"], [])


def test_object_state_targets_only_for_one_object_clips(probe):
    meta = _meta("single", [{"object": 0, "motion": "left", "step": 0}], objects=[
        {"shape": "circle", "colour": "red", "size": "small", "x": 0.7, "y": 0.4}])
    targets = probe.object_state_targets(meta, np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(targets, [[0.7, 0.4, 1.0], [0.5, 0.4, 1.0], [0.3, 0.4, 1.0]])
    assert probe.object_state_targets(_meta("single", [{"object": 0, "motion": "left", "step": 0}]),
                                      np.array([0.0])) is None


def test_ridge_r2_recovers_a_linear_target(probe):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    y = np.stack([x @ np.array([1.0, -2.0, 0.5, 0.0]), rng.normal(size=200)], axis=1)
    r2 = probe.ridge_r2(x[:150], y[:150], x[150:], y[150:], alpha=1e-3)
    assert r2[0] > 0.999
    assert r2[1] < 0.1


def test_probe_learns_order_only_when_the_frames_carry_it(probe):
    """Frames that show the first event's motion in frames 0-1 and the second's in 2-3: the probe
    orders them; the same frames averaged over time (order erased): chance."""
    rng = np.random.default_rng(0)
    n, motions = 400, len(probe.MOTIONS)
    first = np.zeros((n, 3), dtype=np.int64)
    second = np.zeros((n, 3), dtype=np.int64)
    first[:, 2] = rng.integers(0, motions, n)
    second[:, 2] = (first[:, 2] + rng.integers(1, motions, n)) % motions
    eye = np.eye(motions, dtype=np.float32)
    x = np.concatenate([eye[first[:, 2]][:, None].repeat(2, 1), eye[second[:, 2]][:, None].repeat(2, 1)], axis=1)
    x += rng.normal(0, 0.1, x.shape).astype(np.float32)
    split = 300
    ordered = probe.fit_order_probe("linear", x[:split], (first[:split], second[:split]), x[split:],
                                    (first[split:], second[split:]), epochs=60)
    assert ordered.order_acc > 95
    erased = x.mean(1, keepdims=True).repeat(4, 1)
    blind = probe.fit_order_probe("linear", erased[:split], (first[:split], second[:split]), erased[split:],
                                  (first[split:], second[split:]), epochs=60)
    assert 35 < blind.order_acc < 65
    with pytest.raises(ValueError, match="unknown probe head"):
        probe.make_head("lstm", 4, 3, 10)
