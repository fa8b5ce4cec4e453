"""SimCLR, BYOL and Barlow Twins: their losses on known inputs, BYOL's target schedule, and falling losses."""

import math

import pytest
import torch
import torch.nn.functional as F
from sample_kit import fixed_batch, sample_images, train_steps

from kt_edge.models.backbones import build_backbone
from kt_edge.teachers.barlow import BarlowTwins, barlow_loss
from kt_edge.teachers.byol import BYOL, momentum_at, regression_loss
from kt_edge.teachers.simclr import SimCLR, nt_xent


def test_nt_xent_matches_its_definition():
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 8), torch.randn(3, 8)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / 0.5
    expected = 0.0
    for i in range(6):
        positive = (i + 3) % 6
        others = [j for j in range(6) if j != i]
        expected += -sim[i, positive] + torch.logsumexp(sim[i, others], dim=0)
    assert torch.allclose(nt_xent(z1, z2, 0.5), expected / 6, atol=1e-5)


def test_nt_xent_is_low_when_views_agree_and_images_differ():
    basis = torch.eye(4)
    agree = nt_xent(basis, basis, 0.1)
    swapped = nt_xent(basis, basis.roll(1, 0), 0.1)
    assert agree < 0.01 and swapped > 5


def test_barlow_loss_is_zero_for_identical_decorrelated_views_and_weights_redundancy():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # standardised, uncorrelated columns
    assert barlow_loss(z, z, 5e-3) < 1e-6
    redundant = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0], [-1.0, -1.0]])  # C = all ones
    loss = barlow_loss(redundant, redundant, 5e-3)
    assert loss == pytest.approx(5e-3 * 2, rel=1e-3)  # only the two off-diagonal ones, times lambda


def test_byol_momentum_rises_from_base_to_one_on_a_cosine():
    assert momentum_at(0, 100, 0.996) == pytest.approx(0.996)
    assert momentum_at(50, 100, 0.996) == pytest.approx(0.998)
    assert momentum_at(100, 100, 0.996) == pytest.approx(1.0)
    assert regression_loss(torch.ones(2, 3), 2 * torch.ones(2, 3)) == pytest.approx(0.0, abs=1e-6)


def test_byol_target_is_an_ema_of_the_online_weights_and_gets_no_gradient():
    method = BYOL(build_backbone("alexnet", 32), {"hidden": 32, "dim": 16}, n_images=8)
    assert not any(p.requires_grad for p in method.target_backbone.parameters())
    online = next(method.backbone.parameters())
    target = next(method.target_backbone.parameters())
    with torch.no_grad():
        online.add_(1.0)
    before = target.clone()
    method.after_step(25, 100)
    m = 1 - (1 - 0.996) * (math.cos(math.pi * 25 / 100) + 1) / 2
    assert method.momentum == pytest.approx(m)
    assert torch.allclose(target, m * before + (1 - m) * online, atol=1e-6)


@pytest.mark.parametrize(
    "cls, options",
    [
        (SimCLR, {"hidden": 64, "dim": 32}),
        (BYOL, {"hidden": 64, "dim": 32}),
        (BarlowTwins, {"hidden": 64, "dim": 64}),
    ],
)
def test_the_loss_falls_on_real_images(cls, options):
    torch.manual_seed(0)
    method = cls(build_backbone("alexnet", 32), options, n_images=8)
    losses = train_steps(method, fixed_batch(method, sample_images(4)), steps=4)
    assert losses[-1] < 0.8 * losses[0], losses


def test_byol_forwards_each_view_through_its_own_batchnorm_batch():
    """As the official code: online and target networks see view 1 and view 2 separately (BatchNorm statistics of
    one view at a time), never the two views as one batch."""
    method = BYOL(build_backbone("alexnet", 32), {"hidden": 32, "dim": 16}, n_images=8)
    seen = {"online": [], "target": []}
    method.backbone.register_forward_hook(lambda _m, args, _o: seen["online"].append(len(args[0])))
    method.target_backbone.register_forward_hook(lambda _m, args, _o: seen["target"].append(len(args[0])))
    views = (torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    out = method.training_step((views, None))
    assert seen == {"online": [4, 4], "target": [4, 4]}
    assert out["momentum"].device == out["loss"].device and out["momentum"].item() == pytest.approx(0.996)
