"""Bootstrap CIs and paired comparisons: coverage on simulated data, symmetry, identity, refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vidseek.errors import ConfigError
from vidseek.eval.bootstrap import (
    QueryOutcomes,
    bootstrap_ratios,
    compare_runs,
    metric_columns,
    metric_intervals,
    percentile_interval,
    summarize_runs,
)
from vidseek.eval.report import REQUIRED_SETTINGS, read_outcomes, write_report


def outcomes(ranks, pairs=None, prefix="v"):
    ids = tuple(f"{prefix}{i}#0" for i in range(len(ranks)))
    return QueryOutcomes(ids, np.asarray(ranks), pairs or {})


def test_point_estimates_are_the_hand_computed_metrics():
    # ranks 1, 3, 7, 12: R@1 25, R@5 50, R@10 75, MnR 5.75; order pairs: q0 won 2 of 2, q2 lost 1 -> 66.7
    pairs = {"order": {"v0#0": {"a": True, "b": True}, "v2#0": {"c": False}}}
    iv = metric_intervals(outcomes([1, 3, 7, 12], pairs), resamples=200)
    assert iv["t2v.R@1"].value == pytest.approx(25.0)
    assert iv["t2v.R@5"].value == pytest.approx(50.0)
    assert iv["t2v.R@10"].value == pytest.approx(75.0)
    assert iv["t2v.MnR"].value == pytest.approx(5.75)
    assert iv["hardneg.order.acc"].value == pytest.approx(200 / 3)
    assert iv["hardneg.order.t2v.R@1"].value == pytest.approx(50.0)  # q0 hit, q2 miss
    for interval in iv.values():
        assert interval.low <= interval.value <= interval.high


def test_ci_covers_the_true_rate_at_the_stated_level():
    # Bernoulli hits with p = 0.3 on 500 queries, 200 simulated test sets (one column each, all
    # bootstrapped in one vectorised call): the 95% interval should contain 30% in about 95% of
    # them (binomial sd of the coverage ≈ 1.5 points).
    rng = np.random.default_rng(123)
    hits = 100.0 * (rng.random((500, 200)) < 0.3)
    replicates = bootstrap_ratios(hits, np.ones_like(hits), resamples=1000, seed=1)
    covered = sum(percentile_interval(hits[:, d].mean(), replicates[:, d]).low <= 30.0
                  <= percentile_interval(hits[:, d].mean(), replicates[:, d]).high for d in range(200))
    assert 0.92 <= covered / 200 <= 0.98


def test_interval_width_matches_the_binomial_standard_error():
    hits = np.zeros(400, bool)
    hits[:120] = True  # 30%
    iv = metric_intervals(outcomes(np.where(hits, 1, 9)), resamples=4000)["t2v.R@1"]
    se = 100 * np.sqrt(0.3 * 0.7 / 400)
    assert (iv.high - iv.low) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_compare_is_antisymmetric_and_mirrored():
    rng = np.random.default_rng(5)
    a = outcomes(rng.integers(1, 30, 300))
    b = outcomes(rng.integers(1, 30, 300))
    ab, ba = compare_runs([a], [b], resamples=500), compare_runs([b], [a], resamples=500)
    for name in ab:
        assert ab[name]["delta"] == pytest.approx(-ba[name]["delta"], abs=1e-12)
        assert ab[name]["low"] == pytest.approx(-ba[name]["high"], abs=1e-9)
        assert ab[name]["high"] == pytest.approx(-ba[name]["low"], abs=1e-9)
        assert ab[name]["a"] == ba[name]["b"]


def test_identical_runs_give_zero_with_a_zero_width_interval():
    pairs = {"attribute": {"v1#0": {"x": True}, "v3#0": {"y": False}}}
    a = outcomes([1, 4, 2, 8, 1], pairs)
    for d in compare_runs([a], [a], resamples=300).values():
        assert (d["delta"], d["low"], d["high"]) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_separates_a_small_consistent_gain():
    # B misses 10 of 500 queries that A gets right and is otherwise identical: A - B = +2.0 points.
    # Each run's own interval is ~±4 points wide (they overlap), the paired one excludes 0.
    rng = np.random.default_rng(0)
    hits_b = rng.random(500) < 0.4
    flip = np.flatnonzero(~hits_b)[:10]
    hits_a = hits_b.copy()
    hits_a[flip] = True
    a, b = outcomes(np.where(hits_a, 1, 20)), outcomes(np.where(hits_b, 1, 20))
    iv_a, iv_b = metric_intervals(a)["t2v.R@1"], metric_intervals(b)["t2v.R@1"]
    assert iv_a.low < iv_b.high  # unpaired intervals overlap
    d = compare_runs([a], [b])["t2v.R@1"]
    assert d["delta"] == pytest.approx(2.0)
    assert 0 < d["low"] < 2.0 < d["high"]


def test_queries_are_paired_by_id_not_by_position():
    a = outcomes([1, 5, 9])
    shuffled = QueryOutcomes(("v2#0", "v0#0", "v1#0"), np.array([9, 1, 5]))
    for d in compare_runs([a], [shuffled], resamples=200).values():
        assert (d["delta"], d["low"], d["high"]) == (0.0, 0.0, 0.0)


def test_mismatched_queries_or_pairs_are_refused():
    a = outcomes([1, 2, 3])
    with pytest.raises(ConfigError, match="different queries"):
        compare_runs([a], [outcomes([1, 2, 3, 4])])
    with pytest.raises(ConfigError, match="different queries"):
        compare_runs([a], [outcomes([1, 2, 3], prefix="w")])
    with pytest.raises(ConfigError, match="order hard-negative pairs differ"):
        compare_runs([a], [outcomes([1, 2, 3], {"order": {"v0#0": {"p": True}}})])
    with pytest.raises(ConfigError, match="different queries"):  # seeds of one side must match too
        compare_runs([a, outcomes([1, 2])], [a])


def test_seeds_pool_to_the_mean_with_their_spread():
    s1, s2, s3 = outcomes([1, 1, 2, 2]), outcomes([1, 2, 2, 2]), outcomes([1, 1, 1, 2])  # R@1 50, 25, 75
    summary = summarize_runs([s1, s2, s3], resamples=300)["t2v.R@1"]
    assert summary["mean"] == pytest.approx(50.0)
    assert summary["seed_sd"] == pytest.approx(25.0)
    assert summary["runs"] == 3
    d = compare_runs([s1, s3], [s2, s2], resamples=300)["t2v.R@1"]
    assert (d["a"], d["b"], d["delta"]) == pytest.approx((62.5, 25.0, 37.5))


def test_resampling_is_seeded_and_vectorised_over_runs():
    rng = np.random.default_rng(1)
    num, den = rng.random((50, 3)), np.ones((50, 3))
    first, again = bootstrap_ratios(num, den, 100, seed=7), bootstrap_ratios(num, den, 100, seed=7)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, bootstrap_ratios(num, den, 100, seed=8))
    stacked = bootstrap_ratios(np.stack([num, 2 * num]), den, 100, seed=7)
    np.testing.assert_allclose(stacked[0], first)
    np.testing.assert_allclose(stacked[1], 2 * first)
    # one replicate by hand: counts from the same generator
    counts = np.bincount(np.random.default_rng(7).integers(0, 50, size=(100, 50))[0], minlength=50)
    np.testing.assert_allclose(first[0], counts @ num / counts.sum())


def test_pairs_of_one_query_are_resampled_together():
    pairs = {"order": {"v0#0": {"a": True, "b": True, "c": True}, "v1#0": {"d": False}}}
    num, den = metric_columns(outcomes([1, 2], pairs))["hardneg.order.acc"]
    np.testing.assert_array_equal(num, [300.0, 0.0])
    np.testing.assert_array_equal(den, [3.0, 1.0])


def test_report_round_trip_and_run_folder(tmp_path):
    pairs = {"order": {"v0#0": {"p": True}}}
    o = QueryOutcomes.from_texts(["a then b", "b then a", "c"], ["v0", "v0", "v1"], np.array([1, 3, 2]),
                                 {"order": {0: {"p": True}}})
    assert o.query_ids == ("v0#0", "v0#1", "v1#0") and dict(o.pairs) == pairs
    settings = {key: None for key in REQUIRED_SETTINGS}
    write_report(tmp_path / "eval-test.json", {"t2v.R@1": 33.3}, settings, per_query=o.to_json())
    back = read_outcomes(tmp_path)  # a run folder: reads eval-test.json
    assert back.query_ids == o.query_ids and back.texts_sha1 == o.texts_sha1
    np.testing.assert_array_equal(back.t2v_ranks, [1, 3, 2])
    assert json.loads((tmp_path / "eval-test.json").read_text())["per_query"]["hardneg"] == {"order": {"v0#0": {"p": True}}}
    with pytest.raises(ConfigError, match="eval-val.json not found"):
        read_outcomes(tmp_path, split="val")
    write_report(tmp_path / "old.json", {"t2v.R@1": 1.0}, settings)
    with pytest.raises(ConfigError, match="no per-query outcomes"):
        read_outcomes(tmp_path / "old.json")


def test_compare_command_prints_deltas_and_refuses_mismatch(tmp_path):
    from typer.testing import CliRunner

    from vidseek.cli import cli

    settings = {key: None for key in REQUIRED_SETTINGS}
    for name, ranks in (("a", [1, 1, 3, 1]), ("b", [2, 1, 3, 4]), ("c", [1, 1])):
        o = QueryOutcomes.from_texts([f"q{i}" for i in range(len(ranks))], [f"v{i}" for i in range(len(ranks))],
                                     np.array(ranks))
        write_report(tmp_path / f"{name}.json", {}, settings, per_query=o.to_json())
    runner = CliRunner()
    result = runner.invoke(cli, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--resamples", "200"])
    assert result.exit_code == 0, result.output
    r1 = next(line for line in result.output.splitlines() if line.startswith("t2v.R@1 "))
    assert r1.split()[1:4] == ["75.0", "25.0", "+50.0"]
    result = runner.invoke(cli, ["compare", str(tmp_path / "a.json"), "vs", str(tmp_path / "c.json")])
    assert result.exit_code != 0 and "different queries" in str(result.exception)


def test_eval_writes_intervals_and_per_query_outcomes_that_reproduce_the_metrics(tiny_synth, tmp_path):
    from typer.testing import CliRunner

    from vidseek.cli import cli
    from vidseek.models.registry import get_preset
    from vidseek.train.loop import train

    preset = get_preset("synth-clip-tiny").with_overrides(batch_size=8, max_steps=1, eval_every=1)
    train(preset, tiny_synth, tmp_path / "run", progress=False)
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "run"), "--data", str(tiny_synth)])
    assert result.exit_code == 0, result.output
    assert "95% CI" in result.output
    report = json.loads((tmp_path / "run" / "eval-test.json").read_text())
    metrics, outcomes_back = report["metrics"], read_outcomes(tmp_path / "run")
    assert len(outcomes_back.query_ids) == metrics["num_queries"]
    recomputed = metric_intervals(outcomes_back, resamples=100)
    for name in ("t2v.R@1", "t2v.R@5", "t2v.MnR", "hardneg.order.acc", "hardneg.attribute.acc"):
        assert recomputed[name].value == pytest.approx(metrics[name]), name
        low, high = metrics[f"{name}_ci"]
        assert low <= metrics[name] <= high
    pairs = sum(len(p) for p in outcomes_back.pairs["order"].values())
    assert pairs == metrics["hardneg.order.pairs"]
    result = CliRunner().invoke(cli, ["compare", str(tmp_path / "run"), str(tmp_path / "run" / "eval-test.json")])
    assert result.exit_code == 0, result.output
    assert "+0.0  [+0.0, +0.0]" in result.output


def test_sub_gallery_column_is_the_mean_of_exact_hit_probabilities():
    from vidseek.eval.metrics import gallery_recall_at

    # 150 videos x 2 captions: above the 120-video sub-gallery, so the column is reported.
    ranks = np.random.default_rng(3).integers(1, 151, size=300)
    ids = tuple(f"v{q // 2}#{q % 2}" for q in range(300))
    columns = metric_columns(QueryOutcomes(ids, ranks))
    num, den = columns["t2v.R@1.gallery120"]
    assert num.sum() / den.sum() == pytest.approx(gallery_recall_at(ranks, 150, 120))
    small = QueryOutcomes(ids[:200], ranks[:200].clip(max=100))  # 100 videos: no sub-gallery
    assert "t2v.R@1.gallery120" not in metric_columns(small)
