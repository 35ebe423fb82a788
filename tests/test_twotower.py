"""Two-tower baseline (CLIP4Clip meanP / seqTransf): pooling, masks, logit scale, loss."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from vidseek.encoders import build_clip
from vidseek.errors import ConfigError
from vidseek.models.base import FrameFeatures, TextFeatures
from vidseek.models.losses import LogitScale, symmetric_infonce
from vidseek.models.twotower import TwoTower, TwoTowerConfig


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_clip("tiny")


def test_meanp_is_normalised_masked_mean_of_normalised_frames(clip):
    model = TwoTower(clip, TwoTowerConfig(pooling="meanP"))
    frames = torch.tensor([[[3.0, 4.0] + [0.0] * 62, [0.0, 2.0] + [0.0] * 62, [9.0, 9.0] + [0.0] * 62]])
    mask = torch.tensor([[True, True, False]])
    video = model.encode_video_features(FrameFeatures(frames, mask))
    # frames normalised: (0.6, 0.8) and (0, 1); mean (0.3, 0.9); normalised by sqrt(0.9)
    expected = torch.zeros(1, 64)
    expected[0, 0], expected[0, 1] = 0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)
    torch.testing.assert_close(video, expected)


@pytest.mark.parametrize("pooling", ["meanP", "seqTransf"])
def test_padded_frames_do_not_change_the_video_vector(clip, pooling):
    torch.manual_seed(1)
    model = TwoTower(clip, TwoTowerConfig(pooling=pooling, temporal_layers=2)).eval()
    frames = torch.randn(2, 5, 64)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    changed = frames.clone()
    changed[0, 3:] = torch.randn(2, 64) * 10
    a = model.encode_video_features(FrameFeatures(frames, mask))
    b = model.encode_video_features(FrameFeatures(changed, mask))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], a[1])


def test_seqtransf_differs_from_meanp_and_sees_order(clip):
    torch.manual_seed(2)
    model = TwoTower(clip, TwoTowerConfig(pooling="seqTransf", temporal_layers=2)).eval()
    frames = torch.randn(1, 4, 64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    forward = model.encode_video_features(FrameFeatures(frames, mask))
    reversed_ = model.encode_video_features(FrameFeatures(frames.flip(1), mask))
    meanp = TwoTower(clip, TwoTowerConfig(pooling="meanP")).encode_video_features(FrameFeatures(frames, mask))
    meanp_rev = TwoTower(clip, TwoTowerConfig(pooling="meanP")).encode_video_features(FrameFeatures(frames.flip(1), mask))
    torch.testing.assert_close(meanp, meanp_rev)  # mean pooling is order-blind
    assert (forward - reversed_).abs().max() > 1e-4  # the position embedding makes order visible


def test_logit_scale_init_and_clamp():
    scale = LogitScale()
    assert float(scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert float(scale().detach()) == pytest.approx(100.0, rel=1e-5)


def test_symmetric_infonce_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    # rows: CE(row0, 0) = -log(e^2/(e^2+1)); CE(row1, 1) = -log(e^3/(e+e^3))
    t2v = (-math.log(math.e**2 / (math.e**2 + 1)) - math.log(math.e**3 / (math.e + math.e**3))) / 2
    # columns: col0 = (2, 1) target 0; col1 = (0, 3) target 1
    v2t = (-math.log(math.e**2 / (math.e**2 + math.e)) - math.log(math.e**3 / (1 + math.e**3))) / 2
    assert float(symmetric_infonce(logits)) == pytest.approx((t2v + v2t) / 2, rel=1e-6)


def test_score_and_loss_use_cosine_times_scale(clip):
    model = TwoTower(clip, TwoTowerConfig(pooling="meanP"))
    sentence = torch.randn(3, 64)
    video = F.normalize(torch.randn(3, 64), dim=-1)
    text = TextFeatures(sentence, torch.randn(3, 5, 64), torch.ones(3, 5, dtype=torch.bool))
    sim = model.score(text, video)
    torch.testing.assert_close(sim, F.normalize(sentence, dim=-1) @ video.t())
    out = model.loss(text, video)
    torch.testing.assert_close(out.loss, symmetric_infonce(sim / 0.07), rtol=1e-5, atol=1e-5)
    assert out.terms["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)


def test_unknown_pooling_is_a_config_error(clip):
    from vidseek.errors import ConfigError

    with pytest.raises(ConfigError, match="meanP"):
        TwoTower(clip, TwoTowerConfig(pooling="maxP"))


def test_patch_grid_pooling_averages_blocks():
    from vidseek.models.twotower import pool_patch_grid

    patches = torch.arange(36, dtype=torch.float32).reshape(1, 1, 36, 1)  # 6×6 grid, value = index
    pooled = pool_patch_grid(patches, 3)
    assert pooled.shape == (1, 1, 9)
    assert pooled[0, 0, 0] == pytest.approx(sum([0, 1, 6, 7]) / 4)
    assert pooled[0, 0, 8] == pytest.approx(sum([28, 29, 34, 35]) / 4)
    with pytest.raises(ValueError, match="not a square grid"):
        pool_patch_grid(torch.zeros(1, 1, 25, 1), 6)


def test_patch_grid_starts_as_cls_only_and_then_reads_the_patches(clip):
    plain = TwoTower(clip, TwoTowerConfig(pooling="seqTransf", temporal_layers=2)).eval()
    torch.manual_seed(0)
    gridded = TwoTower(clip, TwoTowerConfig(pooling="seqTransf", temporal_layers=2, patch_grid=3)).eval()
    gridded.temporal.load_state_dict(plain.temporal.state_dict())
    assert gridded.needs_patches and not plain.needs_patches
    frames, mask = torch.randn(2, 4, 64), torch.ones(2, 4, dtype=torch.bool)
    patches = torch.randn(2, 4, 36, 64)
    with torch.no_grad():
        before = gridded.encode_video_features(FrameFeatures(frames, mask, patches))
        torch.testing.assert_close(before, plain.encode_video_features(FrameFeatures(frames, mask)))
        gridded.grid_proj.weight.normal_()
        after = gridded.encode_video_features(FrameFeatures(frames, mask, patches))
    assert not torch.allclose(after, before)
    with pytest.raises(ConfigError, match="patch_grid needs patch tokens"):
        gridded.encode_video_features(FrameFeatures(frames, mask))
    with pytest.raises(ConfigError, match="patch_grid must be 0"):
        TwoTower(clip, TwoTowerConfig(patch_grid=-1))
