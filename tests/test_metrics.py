"""vidseek.eval: tie-safe ranks, R@K/MdR/MnR/RSum/SumR, DSL, infAP, tables, reports, plots.

Expected numbers are worked out by hand in the comments next to each matrix.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vidseek.errors import ConfigError, DatasetError, VidseekError
from vidseek.eval import metrics
from vidseek.eval.metrics import (
    MetricInputError,
    average_precision,
    dual_softmax,
    gallery_recall_at,
    gt_ranks,
    inferred_ap,
    mean_inferred_ap,
    read_sampled_qrels,
    recall_at,
    recall_metrics,
    retrieval_report,
)
from vidseek.eval.plots import plot_training_curve, read_training_log
from vidseek.eval.report import REQUIRED_SETTINGS, format_table, write_report

# 3 queries x 3 videos, ground truth on the diagonal.
SIM_3X3 = np.array(
    [
        [0.9, 0.1, 0.3],  # q0: 0.9 is the top          -> t2v rank 1
        [0.2, 0.5, 0.8],  # q1: 0.8 beats 0.5           -> t2v rank 2
        [0.7, 0.6, 0.4],  # q2: 0.7 and 0.6 beat 0.4    -> t2v rank 3
    ]
)
# v2t, per column: v0 [0.9, 0.2, 0.7] own 0.9 -> 1; v1 [0.1, 0.5, 0.6] own 0.5 -> 2;
# v2 [0.3, 0.8, 0.4] own 0.4 -> 2.


# --- gt_ranks -------------------------------------------------------------------------------------


def test_ranks_3x3_both_directions():
    assert gt_ranks(SIM_3X3, [0, 1, 2]).tolist() == [1, 2, 3]
    assert gt_ranks(SIM_3X3.T, [0, 1, 2]).tolist() == [1, 2, 2]


def test_ranks_4x5_with_arbitrary_ground_truth():
    sim = np.array(
        [
            [0.1, 0.2, 0.3, 0.4, 0.5],  # gt 3 (0.4): only 0.5 above       -> 2
            [0.9, 0.8, 0.7, 0.6, 0.5],  # gt 0 (0.9): top                  -> 1
            [0.3, 0.1, 0.5, 0.45, 0.4],  # gt 4 (0.4): 0.5, 0.45 above      -> 3
            [0.5, 0.1, 0.9, 0.8, 0.7],  # gt 1 (0.1): all four others above -> 5
        ],
        dtype=np.float32,
    )
    ranks = gt_ranks(sim, np.array([3, 0, 4, 1]))
    assert ranks.tolist() == [2, 1, 3, 5]
    # Even number of ranks: the median is the mean of the middle two, (2 + 3) / 2.
    assert recall_metrics(ranks) == {"R@1": 25.0, "R@5": 100.0, "R@10": 100.0, "MdR": 2.5, "MnR": 2.75}
    assert recall_metrics(ranks, ks=(2, 3)) == {"R@2": 50.0, "R@3": 75.0, "MdR": 2.5, "MnR": 2.75}


def test_ties_never_improve_a_rank():
    sim = np.array(
        [
            [0.5, 0.5, 0.1, 0.0],  # gt 0 tied with video 1
            [0.3, 0.3, 0.3, 0.3],  # all-equal row, gt 2
            [0.2, 0.9, 0.9, 0.9],  # gt 2 tied with 1 and 3 at the top
        ]
    )
    gt = [0, 2, 2]
    assert gt_ranks(sim, gt).tolist() == [2, 4, 3]  # pessimistic is the default
    assert gt_ranks(sim, gt, ties="optimistic").tolist() == [1, 1, 1]
    assert gt_ranks(sim, gt, ties="mean").tolist() == [1.5, 2.5, 2.0]
    assert gt_ranks(sim, gt).dtype == np.int64
    # A constant model must not score R@1 = 100 (what an argsort tie-break can report).
    constant = np.zeros((5, 5), dtype=np.float32)
    assert gt_ranks(constant, list(range(5))).tolist() == [5, 5, 5, 5, 5]
    assert retrieval_report(constant, list(range(5)))["t2v.R@1"] == 0.0


def test_multi_positive_rank_uses_the_best_positive_and_ignores_the_others():
    sim = np.array([[0.9, 0.2, 0.8, 0.5], [0.1, 0.1, 0.4, 0.4]])
    # row 0: positives {1, 2}: best is 0.8; only 0.9 (non-positive) is above; the positive 0.2 is ignored.
    # row 1: positives {2, 3}, both 0.4: best 0.4; no non-positive >= 0.4 -> rank 1 (no self-tie penalty).
    assert gt_ranks(sim, [{1, 2}, [2, 3]]).tolist() == [2, 1]
    # ints and collections can mix; row 1 with only {3} now ties with the non-positive column 2 -> 2.
    assert gt_ranks(sim, [[1, 2], 3]).tolist() == [2, 2]


def _slow_ranks(sim: np.ndarray, positives: list[set[int]], ties: str) -> list[float]:
    ranks = []
    for row, positive_set in enumerate(positives):
        best = max(sim[row, j] for j in positive_set)
        ge = gt = 0
        for j in range(sim.shape[1]):
            if j in positive_set:
                continue
            ge += sim[row, j] >= best
            gt += sim[row, j] > best
        ranks.append({"pessimistic": 1 + ge, "optimistic": 1 + gt, "mean": 1 + (ge + gt) / 2}[ties])
    return ranks


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ranks_equal_a_slow_double_loop_with_injected_ties(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    num_rows, num_cols = 23, 17
    # Coarse integer scores: ties everywhere. Half float32, half float64.
    sim = rng.integers(0, 5, size=(num_rows, num_cols)).astype(np.float32 if seed % 2 else np.float64)
    sim[rng.integers(num_rows)] = 1.0  # one all-equal row
    single = rng.integers(0, num_cols, size=num_rows)
    multi = [set(rng.choice(num_cols, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(num_rows)]
    # Tiny blocks, so rows are spread across many blocks, including a short last one.
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 5 * num_cols)
    for ties in ("pessimistic", "optimistic", "mean"):
        assert gt_ranks(sim, single, ties=ties).tolist() == _slow_ranks(sim, [{int(c)} for c in single], ties)
        assert gt_ranks(sim, multi, ties=ties).tolist() == _slow_ranks(sim, multi, ties)
        assert gt_ranks(sim.T, [{r} for r in range(num_cols)], ties=ties).tolist() == _slow_ranks(
            sim.T, [{r} for r in range(num_cols)], ties
        )


def test_bad_inputs_are_one_line_value_errors():
    sim = SIM_3X3.copy()
    sim[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN in row 1"):
        gt_ranks(sim, [0, 1, 2])
    with pytest.raises(MetricInputError, match="index 3 of row 2"):
        gt_ranks(SIM_3X3, [0, 1, 3])
    with pytest.raises(MetricInputError, match="row 1 has no ground-truth"):
        gt_ranks(SIM_3X3, [{0}, set(), {2}])
    with pytest.raises(MetricInputError, match="2 ground-truth entries"):
        gt_ranks(SIM_3X3, [0, 1])
    with pytest.raises(MetricInputError, match="unknown ties mode"):
        gt_ranks(SIM_3X3, [0, 1, 2], ties="random")
    with pytest.raises(MetricInputError, match=r"first: index 1\) have no query"):
        retrieval_report(SIM_3X3, [0, 0, 2])
    assert issubclass(MetricInputError, VidseekError)


# --- retrieval_report -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_gallery_recall_equals_the_mean_over_every_sub_gallery(k):
    # 6 videos x 2 captions, ties injected; enumerate every 4-video sub-gallery that holds each
    # query's video and rank the query there (pessimistic ties), exactly as a sampler would.
    import itertools

    rng = np.random.default_rng(5)
    sim = np.round(rng.normal(size=(12, 6)), 1)
    query_video = np.repeat(np.arange(6), 2)
    ranks = gt_ranks(sim, query_video)
    hits = []
    for q, own in enumerate(query_video):
        others = [v for v in range(6) if v != own]
        for rest in itertools.combinations(others, 3):
            hits.append(1 + sum(sim[q, v] >= sim[q, own] for v in rest) <= k)
    assert gallery_recall_at(ranks, 6, 4, k) == pytest.approx(100.0 * np.mean(hits), abs=1e-9)
    assert gallery_recall_at(ranks, 6, 6, k) == pytest.approx(recall_at(ranks, k))  # the full gallery
    assert gallery_recall_at(ranks, 6, 1, k) == 100.0  # alone in its gallery, every query hits


def test_gallery_recall_rejects_impossible_sizes():
    with pytest.raises(MetricInputError, match="sub-gallery size"):
        gallery_recall_at(np.array([1, 2]), 5, 6)
    with pytest.raises(MetricInputError, match="ranks must lie"):
        gallery_recall_at(np.array([1, 7]), 5, 3)


def test_report_3x3_rsum_and_sumr():
    report = retrieval_report(SIM_3X3, [0, 1, 2])
    third = 100 / 3
    expected = {
        "t2v.R@1": third, "t2v.R@5": 100.0, "t2v.R@10": 100.0, "t2v.MdR": 2.0, "t2v.MnR": 2.0,
        "t2v.RSum": third + 200,  # ranks [1, 2, 3]
        "v2t.R@1": third, "v2t.R@5": 100.0, "v2t.R@10": 100.0, "v2t.MdR": 2.0, "v2t.MnR": 5 / 3,
        "v2t.RSum": third + 200,  # ranks [1, 2, 2]
        "SumR": 2 * third + 400,
        "num_queries": 3, "num_videos": 3,
    }  # fmt: skip
    assert report.keys() == expected.keys()
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, abs=1e-9), key
    assert all(type(v) in (float, int) for v in report.values())  # python numbers, JSON-ready


def test_report_multi_caption_v2t_counts_the_best_own_caption():
    # Video 0 has captions q0 and q1; video 1 has caption q2.
    sim = np.array(
        [
            [0.2, 0.9],  # q0 -> v0: 0.9 (v1) above           -> t2v rank 2
            [0.8, 0.3],  # q1 -> v0: top                       -> t2v rank 1
            [0.1, 0.7],  # q2 -> v1: top                       -> t2v rank 1
        ]
    )
    # v2t: v0's column [0.2, 0.8, 0.1]: best own caption q1 (0.8); the only other caption q2 (0.1)
    # is below -> rank 1 (its weaker own caption q0 does not count against it).
    # v1's column [0.9, 0.3, 0.7]: own q2 (0.7), q0 (0.9) above -> rank 2.
    report = retrieval_report(sim, [0, 0, 1])
    assert report["t2v.R@1"] == pytest.approx(200 / 3)
    assert report["t2v.MdR"] == 1.0 and report["t2v.MnR"] == pytest.approx(4 / 3)
    assert report["v2t.R@1"] == 50.0
    assert report["v2t.MdR"] == 1.5 and report["v2t.MnR"] == 1.5  # two videos: mean of ranks 1 and 2
    assert report["t2v.RSum"] == pytest.approx(200 / 3 + 200)
    assert report["v2t.RSum"] == 250.0
    assert report["SumR"] == pytest.approx(200 / 3 + 450)
    assert (report["num_queries"], report["num_videos"]) == (3, 2)


# --- dual softmax ---------------------------------------------------------------------------------


def test_dual_softmax_2x2_by_hand():
    e = math.e
    sim = np.array([[2.0, 1.0], [1.0, 1.0]])
    # temperature 1, softmax over queries (columns): col 0 of [2, 1] -> [e/(e+1), 1/(e+1)]; col 1 -> [1/2, 1/2]
    expected = np.array([[2 * e / (e + 1), 0.5], [1 / (e + 1), 0.5]])
    np.testing.assert_allclose(dual_softmax(sim, temperature=1.0), expected, rtol=1e-12)
    # Default temperature 100: logits col 0 = [3, 1], col 1 = [1, 2].
    sim = np.array([[0.03, 0.01], [0.01, 0.02]])
    expected = np.array(
        [[0.03 * e**2 / (e**2 + 1), 0.01 / (1 + e)], [0.01 / (e**2 + 1), 0.02 * e / (1 + e)]]
    )
    np.testing.assert_allclose(dual_softmax(sim), expected, rtol=1e-9)
    np.testing.assert_allclose(dual_softmax(sim, axis=1), dual_softmax(sim.T, axis=0).T, rtol=1e-12)
    assert dual_softmax(sim.astype(np.float32)).dtype == np.float32
    # Large scores do not overflow (max-subtracted softmax).
    assert np.isfinite(dual_softmax(np.array([[50.0, 1.0], [49.0, 2.0]]))).all()


# --- inferred AP ----------------------------------------------------------------------------------


def _plain_ap(ranked: list[str], relevant: set[str]) -> float:
    hits, total = 0, 0.0
    for k, shot in enumerate(ranked, start=1):
        if shot in relevant:
            hits += 1
            total += hits / k
    return total / len(relevant)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_infap_equals_ap_on_complete_judgements(seed):
    rng = np.random.default_rng(seed)
    shots = [f"shot{i}" for i in range(40)]
    judged = {shot: int(rng.random() < 0.3) for shot in shots[:30]}  # every pooled shot judged
    judged[shots[int(rng.integers(30))]] = 1  # at least one relevant
    ranked = [shots[i] for i in rng.permutation(40)[:25]]  # includes unpooled shots (not relevant)
    relevant = {s for s, r in judged.items() if r}
    reference = _plain_ap(ranked, relevant)
    assert inferred_ap(ranked, judged, epsilon=0.0) == pytest.approx(reference, rel=1e-12, abs=1e-15)
    assert inferred_ap(ranked, judged) == pytest.approx(reference, abs=1e-4)  # trec_eval's epsilon
    assert average_precision(ranked, relevant) == pytest.approx(reference, rel=1e-12)
    # One stratum per shot class with every shot judged is still plain AP.
    strata = {s: i % 3 for i, s in enumerate(judged)}
    assert inferred_ap(ranked, judged, strata, epsilon=0.0) == pytest.approx(reference, rel=1e-12)


def test_infap_uniform_sample_by_hand():
    # Pool {a, b, c, d, f, g}; judged a, c, d, f (p = 4/6); relevant a, d, f. e was never pooled.
    qrels = {"a": 1, "b": -1, "c": 0, "d": 1, "f": 1, "g": -1}
    ranked = ["a", "b", "c", "d", "e"]
    # a at k=1: E[P@1] = 1.
    # d at k=4: above are a (judged rel), b (pooled, unjudged), c (judged non-rel): n=3, j=2, r=1
    #   E[P@4] = 1/4 + 3/4 * (3/3) * (1+eps)/(2+2eps) = 1/4 + 3/8 = 0.625
    # infAP = (1 + 0.625)/p / (3/p) = 1.625 / 3.   (Plain AP with b unjudged-as-irrelevant: 1.5/3.)
    assert inferred_ap(ranked, qrels) == pytest.approx(1.625 / 3, rel=1e-12)
    assert inferred_ap(["e", "g"], qrels) == 0.0
    assert inferred_ap(ranked, {"b": -1, "c": 0}) == 0.0  # no relevant shot: 0, as trec_eval
    # Depth cut: only the first 3 shots count -> only a is found.
    assert inferred_ap(ranked, qrels, depth=3) == pytest.approx(1 / 3, rel=1e-12)


STRATIFIED_QRELS = {"a": 1, "b": 0, "x": -1, "c": 1, "y": 0, "z": -1}
STRATA = {"a": 1, "b": 1, "x": 2, "c": 2, "y": 2, "z": 2}


def test_infap_stratified_sample_by_hand():
    # Stratum 1 {a, b} fully judged (p1 = 1); stratum 2 {x, c, y, z}, judged c, y (p2 = 1/2).
    # Estimated relevant R = 1/p1 (a) + 1/p2 (c) = 3.
    ranked = ["a", "x", "b", "c"]
    # a at k=1: E[P@1] = 1, weight 1/p1 -> 1.
    # c at k=4: stratum 1 above: n=2 (a, b), j=2, r=1 -> 2 * (1+eps)/(2+2eps) = 1
    #           stratum 2 above: n=1 (x), j=0, r=0   -> 1 * eps/(2 eps)       = 1/2
    #   E[P@4] = 1/4 + 3/4 * (1.5 / 3) = 0.625, weight 1/p2 -> 1.25.
    # infAP = (1 + 1.25) / 3 = 0.75.
    assert inferred_ap(ranked, STRATIFIED_QRELS, STRATA) == pytest.approx(0.75, rel=1e-12)
    assert inferred_ap(ranked, STRATIFIED_QRELS, STRATA, epsilon=0.0) == pytest.approx(0.75, rel=1e-12)
    with pytest.raises(MetricInputError, match="'z' has no stratum"):
        inferred_ap(ranked, STRATIFIED_QRELS, {k: v for k, v in STRATA.items() if k != "z"})
    with pytest.raises(MetricInputError, match="'a' appears twice"):
        inferred_ap(["a", "x", "a"], STRATIFIED_QRELS, STRATA)


def test_qrels_file_and_mean_infap(tmp_path):
    lines = [f"1501 0 {shot} {STRATA[shot]} {rel}" for shot, rel in STRATIFIED_QRELS.items()]
    lines += ["1502 0 p 1 1", "1502 0 q 1 0"]
    path = tmp_path / "avs.qrels"
    path.write_text("\n".join(lines) + "\n")
    qrels, strata = read_sampled_qrels(path)
    assert qrels["1501"] == STRATIFIED_QRELS and strata["1501"] == STRATA
    runs = {"1501": ["a", "x", "b", "c"], "9999": ["p"]}  # 1502 skipped, 9999 has no qrels
    result = mean_inferred_ap(runs, qrels, strata)
    assert result == {"1501": pytest.approx(0.75), "1502": 0.0, "mean": pytest.approx(0.375)}
    # 4-column trec_eval layout: one stratum.
    path.write_text("1 0 a 1\n1 0 b -1\n1 0 c 0\n1 0 d 1\n1 0 f 1\n1 0 g -1\n")
    qrels, strata = read_sampled_qrels(path)
    assert strata is None
    assert mean_inferred_ap({"1": ["a", "b", "c", "d", "e"]}, qrels)["mean"] == pytest.approx(1.625 / 3)
    path.write_text("1 0 a 1\n1 0 b\n")
    with pytest.raises(DatasetError, match="avs.qrels:2"):
        read_sampled_qrels(path)
    with pytest.raises(DatasetError, match="not found"):
        read_sampled_qrels(tmp_path / "missing.qrels")


# --- report ---------------------------------------------------------------------------------------


def test_table_has_one_decimal_numbers_and_labelled_rows():
    base = retrieval_report(SIM_3X3, [0, 1, 2])
    t2v_only = {k: v for k, v in base.items() if k.startswith("t2v.")}
    table = format_table({"seqTransf": base, "seqTransf + DSL": t2v_only}, title="synth test")
    lines = table.splitlines()
    assert lines[0] == "synth test"
    header = lines[2].replace("|", " ").split()
    assert header == ["Method"] + ["R@1", "R@5", "R@10", "MdR", "MnR", "RSum"] * 2 + ["SumR"]
    row = next(line for line in lines if line.startswith("seqTransf "))
    assert row.replace("|", " ").split() == [
        "seqTransf", "33.3", "100.0", "100.0", "2.0", "2.0", "233.3",
        "33.3", "100.0", "100.0", "2.0", "1.7", "233.3", "466.7",
    ]  # fmt: skip
    dsl_row = next(line for line in lines if line.startswith("seqTransf + DSL"))
    assert dsl_row.replace("|", " ").split()[-7:] == ["-"] * 7
    assert len({len(line) for line in lines[1:]}) == 1  # fixed width
    with pytest.raises(ConfigError):
        format_table({})


def test_write_report_round_trip_and_required_settings(tmp_path):
    settings = {
        "frames": 12, "fps": None, "batch": np.int64(128), "precision": "fp32", "split": "val",
        "post_processing": "none", "checkpoint": tmp_path / "best.pt", "seed": 0,
    }  # fmt: skip
    metrics_row = {"t2v.R@1": np.float32(12.5), "SumR": 300.25}
    path = tmp_path / "reports" / "eval.json"
    write_report(path, metrics_row, settings)
    data = json.loads(path.read_text())
    assert data["metrics"] == {"t2v.R@1": 12.5, "SumR": 300.25}
    assert data["settings"]["batch"] == 128 and data["settings"]["checkpoint"] == str(tmp_path / "best.pt")
    assert data["settings"]["fps"] is None and data["vidseek_version"]
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temporary file left
    incomplete = {k: v for k, v in settings.items() if k not in ("split", "post_processing")}
    with pytest.raises(ConfigError, match="lack split, post_processing"):
        write_report(tmp_path / "other.json", metrics_row, incomplete)
    assert not (tmp_path / "other.json").exists()
    assert set(REQUIRED_SETTINGS) <= settings.keys()


# --- plots ----------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_write_png_without_touching_the_global_backend(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"step": 10, "epoch": 0, "loss": 3.2, "lr": 1e-4}, {"step": 20, "loss": 2.9},
               {"step": 20, "val.t2v.R@1": 12.5}, {"step": 30, "loss": 2.4}]  # fmt: skip
    log.write_text("\n".join(json.dumps(r) for r in records) + '\n{"step": 40, "lo')  # crashed mid-write
    # A fresh interpreter whose user picked the SVG backend: plotting must leave it so.
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, matplotlib
        matplotlib.use("svg")
        import vidseek.eval
        assert "matplotlib.pyplot" not in sys.modules
        from vidseek.eval.plots import plot_histogram, plot_recall_curves, plot_training_curve
        out = {str(tmp_path)!r}
        plot_recall_curves({{"meanP": np.array([1, 3, 8, 20]), "seqTransf": np.array([1, 1, 2, 9])}},
                           out + "/recall.png", max_k=20, title="R@K")
        plot_training_curve({str(log)!r}, out + "/train.png")
        plot_histogram([1, 2, 2, 3, 7], out + "/hist.png", "GRDR candidates", "candidates per query")
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["svg", "False"]
    for name in ("recall.png", "train.png", "hist.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hist.png", "log.jsonl", "recall.png", "train.png"]


def test_training_log_errors_name_the_problem(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    assert read_training_log(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    with pytest.raises(ConfigError, match="no values for 'val.t2v.R@1'; available keys: loss"):
        plot_training_curve(log, tmp_path / "x.png")
    log.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.5}\n')
    with pytest.raises(DatasetError, match="log.jsonl:2 is not valid JSON"):
        read_training_log(log)
    with pytest.raises(DatasetError, match="not found"):
        read_training_log(tmp_path / "missing.jsonl")
    assert not (tmp_path / "x.png").exists()
