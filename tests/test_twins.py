"""Twin-heavy batches and the partner loss (issue 11; docs/synthetic-recipe.md runs D/G)."""
from __future__ import annotations

import math

import pytest
import torch

from vidseek.data.hard_negatives import Partner
from vidseek.errors import ConfigError, DatasetError
from vidseek.models.losses import partner_infonce
from vidseek.models.registry import TrainConfig, check_preset_fields, get_preset
from vidseek.train.data import EpochBatches

from test_train import tiny_preset


def planted_partners(n: int = 40) -> list[list[Partner]]:
    """Clips 0-1, 2-3, … 10-11 are order twins, 12-13 … 18-19 attribute twins, the rest alone."""
    out: list[list[Partner]] = [[] for _ in range(n)]
    for a in range(0, 20, 2):
        kind = "order" if a < 12 else "attribute"
        out[a], out[a + 1] = [Partner(a + 1, kind)], [Partner(a, kind)]
    return out


@pytest.mark.parametrize("kind, pairs_of_kind", [("order", 6), ("attribute", 4), ("any", 10)])
def test_twin_batches_hold_the_requested_pairs_and_never_a_clip_twice(kind, pairs_of_kind):
    partners = planted_partners()
    sampler = EpochBatches(list(range(40)), batch_size=8, seed=5, partners=partners, twin_pairs=3, twin_kind=kind)
    assert len(sampler.twin_pair_list()) == pairs_of_kind
    twins = {c for pair in sampler.twin_pair_list() for c in pair}
    for epoch in range(3):
        batches = sampler.for_epoch(epoch)
        assert batches == sampler.for_epoch(epoch)  # deterministic: resume redraws the same epoch
        # the non-twin clips fill 2 slots per batch, each once per epoch
        assert len(batches) == (40 - len(twins)) // 2
        rest = []
        for batch in batches:
            assert len(batch) == 8 and len(set(batch)) == 8
            for a, b in zip(batch[0:6:2], batch[1:6:2]):  # positions (0,1), (2,3), (4,5)
                assert Partner(b, kind) in partners[a] if kind != "any" else b in {p.index for p in partners[a]}
            assert not set(batch[6:]) & twins
            rest += batch[6:]
        assert len(rest) == len(set(rest))
    # pairs cycle: over an epoch every pair of the kind opens some batch
    opened = {tuple(b[k:k + 2]) for b in sampler.for_epoch(0) for k in (0, 2, 4)}
    assert opened == set(sampler.twin_pair_list())


def test_too_few_pairs_and_bad_settings_are_one_line_errors():
    sampler = EpochBatches(list(range(40)), 8, 5, planted_partners(), twin_pairs=3, twin_kind="attribute")
    sampler.twin_pairs = 5
    with pytest.raises(DatasetError, match="only 4 disjoint pairs of kind 'attribute'"):
        sampler.for_epoch(0)
    with pytest.raises(ConfigError, match="must be in \\[0, 1\\)"):
        TrainConfig(twin_share=1.0, hard_negatives="mined")
    with pytest.raises(ConfigError, match="needs partners"):
        TrainConfig(twin_share=0.5)
    with pytest.raises(ConfigError, match="twin_kind"):
        TrainConfig(twin_share=0.5, hard_negatives="mined", twin_kind="colour")
    with pytest.raises(ConfigError, match="set --twin-share > 0"):
        TrainConfig(partner_loss_weight=1.0)
    with pytest.raises(ConfigError, match="0 partner pairs in a batch of 8"):
        TrainConfig(twin_share=0.1, batch_size=8, hard_negatives="mined")
    with pytest.raises(ConfigError, match="grdr training does not use train.hard_negatives"):
        check_preset_fields(get_preset("synth-grdr-tiny").with_overrides(twin_share=0.5, hard_negatives="mined"))
    assert TrainConfig(twin_share=0.5, batch_size=64, hard_negatives="mined").twin_pairs == 16


def test_partner_loss_equals_a_hand_computation():
    # pairs (0, 1) and (2, 3); rows are texts, columns videos
    logits = torch.tensor([[2.0, 1.0, 0.0, 5.0],
                           [0.5, 3.0, 9.0, 0.0],
                           [0.0, 0.0, 1.0, -1.0],
                           [7.0, 0.0, 2.0, 2.0]])

    def ce(own, other):  # 2-way cross-entropy with the correct choice `own`
        return -math.log(math.exp(own) / (math.exp(own) + math.exp(other)))

    # pair (0,1): text 0 {2, 1}, text 1 {3, 0.5}, video 0 {2, 0.5}, video 1 {3, 1}
    # pair (2,3): text 2 {1, -1}, text 3 {2, 2}, video 2 {1, 2}, video 3 {2, -1}
    terms = [ce(2, 1), ce(3, 0.5), ce(2, 0.5), ce(3, 1), ce(1, -1), ce(2, 2), ce(1, 2), ce(2, -1)]
    assert float(partner_infonce(logits, 2)) == pytest.approx(sum(terms) / 8, rel=1e-6)
    assert float(partner_infonce(logits, 1)) == pytest.approx(sum(terms[:4]) / 4, rel=1e-6)
    # the entries outside the pairs do not matter
    other = logits.clone()
    other[0, 2:] = other[2:, 0] = 100.0
    assert float(partner_infonce(other, 2)) == float(partner_infonce(logits, 2))


def _loss_sequence(monkeypatch, preset, data, out, **train_kwargs) -> list[tuple[float, dict[str, float]]]:
    """(loss, logged terms) of every step `train` runs."""
    import vidseek.train.loop as loop

    steps, step = [], loop.train_step

    def recording(*args, **kwargs):
        result = step(*args, **kwargs)
        steps.append((float(result.loss.detach()), dict(result.terms)))
        return result

    monkeypatch.setattr(loop, "train_step", recording)
    loop.train(preset, data, out, progress=False, **train_kwargs)
    return steps


#: Losses of the first 4 steps recorded on commit 80d8c71 (before these options existed), this
#: fixture (tests/conftest.py `tiny_synth`), CPU float32, one intra-op thread (as conftest sets).
BEFORE = {
    "synth-clip-tiny": ["0x1.1fd4280000000p+1", "0x1.3190260000000p+1", "0x1.127db80000000p+1", "0x1.0f55b80000000p+1"],
    "synth-seqtransf-tiny": ["0x1.1736880000000p+1", "0x1.34fd300000000p+1", "0x1.0cda1a0000000p+1", "0x1.0c7f4c0000000p+1"],
}


@pytest.mark.parametrize("name", ["synth-clip-tiny", "synth-seqtransf-tiny"])  # frames mode, features mode
def test_with_both_options_at_zero_training_matches_the_losses_from_before(tiny_synth, tmp_path, monkeypatch, name):
    preset = tiny_preset(name, max_steps=4, eval_every=4, hard_negatives="mined", twin_share=0.0, partner_loss_weight=0.0)
    losses = [loss for loss, _ in _loss_sequence(monkeypatch, preset, tiny_synth, tmp_path / "run")]
    # Bit-identical on the machine they were recorded on; the tolerance only absorbs a BLAS build's
    # summation order. A changed batch (sampler) or loss moves these by far more than 1e-5.
    assert losses == pytest.approx([float.fromhex(x) for x in BEFORE[name]], rel=1e-5, abs=0)


def test_partner_loss_is_added_with_its_weight_and_resume_stays_exact(tiny_synth, tmp_path, monkeypatch):
    preset = tiny_preset("synth-seqtransf-tiny", max_steps=4, eval_every=2, hard_negatives="mined", twin_share=0.5,
                         partner_loss_weight=2.0)
    with_partner = _loss_sequence(monkeypatch, preset, tiny_synth, tmp_path / "straight")
    without = _loss_sequence(monkeypatch, preset.with_overrides(partner_loss_weight=0.0), tiny_synth, tmp_path / "plain")
    # step 1: same weights, same twin batch; the difference is exactly 2 × the partner term
    (loss_w, terms_w), (loss_0, terms_0) = with_partner[0], without[0]
    assert "partner" not in terms_0 and 0 < terms_w["partner"]
    assert terms_w["infonce"] == terms_0["infonce"]
    assert loss_w == pytest.approx(loss_0 + 2.0 * terms_w["partner"], rel=1e-6)

    import vidseek.train.loop as loop

    loop.train(preset, tiny_synth, tmp_path / "resumed", progress=False, stop_after_steps=2)
    loop.train(preset, tiny_synth, tmp_path / "resumed", progress=False, resume=True)
    a = torch.load(tmp_path / "straight" / "last.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed" / "last.pt", map_location="cpu", weights_only=False)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_partner_loss_on_a_loss_without_logits_is_a_config_error():
    from vidseek.models.base import LossOutput
    from vidseek.train.loop import batch_loss

    class GenerationOnly:  # like PIG stage 1: no contrastive matrix
        def loss(self, text, video):
            return LossOutput(torch.tensor(1.0))

    assert float(batch_loss(GenerationOnly(), None, None).loss) == 1.0  # weight 0: untouched
    with pytest.raises(ConfigError, match="GenerationOnly training here has no contrastive logits"):
        batch_loss(GenerationOnly(), None, None, partner_pairs=1, partner_weight=1.0)
