"""Feature regression and cached teacher features."""

import pytest
import torch
import torch.nn.functional as F
from sample_kit import train_steps
from torch.utils.data import TensorDataset
from transfer_kit import sample_batch, tiny_backbone

from kt_edge.engine.method import Needs
from kt_edge.features import extract
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.transfer.cached_teacher import CachedTeacher
from kt_edge.transfer.regress import Regress, regress_loss


def test_regress_loss_is_two_minus_two_cosine_of_the_normalised_vectors():
    s = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    t = torch.tensor([[10.0, 0.0], [0.0, 5.0]])
    # cosines 0.6 and -1: ||s/|s| - t/|t| ||^2 = 0.8 and 4
    assert regress_loss(s, t).item() == pytest.approx((0.8 + 4.0) / 2, rel=1e-6)
    assert regress_loss(7 * t, t).item() == pytest.approx(0, abs=1e-6)  # scale does not matter
    s, t = torch.randn(16, 8), torch.randn(16, 8)
    assert torch.allclose(regress_loss(s, t), (2 - 2 * F.cosine_similarity(s, t)).mean(), atol=1e-5)


def test_loss_falls_over_a_few_steps():
    torch.manual_seed(0)
    teacher = FrozenTeacher(tiny_backbone(48), torch.device("cpu"))
    method = Regress(tiny_backbone(), teacher, {"hidden": 64}, n_images=32)
    assert method.head[-1].out_features == 48
    losses = train_steps(method, sample_batch(), steps=8, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0], losses


def test_cached_features_are_looked_up_by_the_index_in_the_label_slot(tmp_path):
    x, _ = sample_batch()
    features = torch.randn(50, 24)
    store = extract(
        torch.nn.Identity(),
        TensorDataset(features, torch.full((50,), -1)),
        tmp_path / "f",
        shard_size=16,
        progress=False,
    )
    teacher = CachedTeacher(store, torch.device("cpu"))
    assert len(teacher) == 50 and teacher.embed_dim == 24
    indices = torch.tensor([3, 49, 0, 17])
    looked_up = teacher(indices)
    assert looked_up.dtype == torch.float32
    assert torch.allclose(looked_up, features[indices].half().float())  # stored as fp16
    torch.manual_seed(0)
    method = Regress(tiny_backbone(), teacher, {"hidden": 32, "teacher_features": "cached"}, n_images=50)
    method.eval()
    loss = method.training_step((x[:4], indices))["loss"]
    expected = regress_loss(method.head(method.backbone(x[:4])), features[indices].half().float())
    assert torch.allclose(loss, expected, atol=1e-6)
    with pytest.raises(ValueError, match="teacher_features is 'live' but the teacher given is a CachedTeacher"):
        Regress(tiny_backbone(), teacher, {}, n_images=50)
    assert Regress.needs({"teacher_features": "cached"}) is Needs.FEATURES and Regress.needs({}) is Needs.TEACHER
