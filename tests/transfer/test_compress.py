"""CompRess 1q / 2q: the loss against hand computation, the banks, the momentum student, learning."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from sample_kit import train_steps
from transfer_kit import sample_batch, tiny_backbone

from kt_edge.engine.method import Needs
from kt_edge.errors import DataError, RecipeError
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.recipe import recipe_from_dict
from kt_edge.transfer.compress import Compress, compress_loss


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def test_compress_loss_1q_matches_hand_computation():
    # one bank of teacher anchors serves both sides
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])
    bank = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    tau = 0.5
    kl_1 = kl(softmax([0.8 / tau, -0.6 / tau]), softmax([0.0 / tau, -1.0 / tau]))
    kl_2 = kl(softmax([0.6 / tau, 0.8 / tau]), softmax([1.0 / tau, 0.0 / tau]))
    expected = (kl_1 + kl_2) / 2  # batchmean
    assert compress_loss(s, t, bank, bank, tau, tau).item() == pytest.approx(expected, rel=1e-5)


def test_compress_loss_2q_uses_the_student_bank_and_its_temperature():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.6, 0.8]])
    teacher_bank = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    student_bank = torch.tensor([[0.6, 0.8], [0.0, -1.0]])
    tau_s, tau_t = 0.2, 0.04
    target = softmax([0.8 / tau_t, -0.6 / tau_t])
    student = softmax([0.6 / tau_s, 0.0 / tau_s])
    loss = compress_loss(s, t, student_bank, teacher_bank, tau_s, tau_t)
    assert loss.item() == pytest.approx(kl(target, student), rel=1e-5)
    # identical similarity profiles give zero divergence
    assert compress_loss(t, t, teacher_bank, teacher_bank, 0.04, 0.04).item() == pytest.approx(0, abs=1e-6)


def test_1q_compares_the_student_with_the_teacher_bank_and_enqueues_after_the_loss():
    torch.manual_seed(0)
    teacher = FrozenTeacher(tiny_backbone(48), torch.device("cpu"))
    method = Compress(tiny_backbone(), teacher, {"variant": "1q", "bank": 40, "tau_student": 0.1}, n_images=100)
    assert method.head.out_features == 48 and not hasattr(method, "student_bank")
    x, labels = sample_batch()
    bank_before = method.teacher_bank.items.clone()
    loss = method.training_step((x, labels))["loss"]
    t = F.normalize(teacher(x), dim=1)
    s = F.normalize(method.head(method.backbone(x)), dim=1)
    assert torch.allclose(loss, compress_loss(s, t, bank_before, bank_before, 0.1, 0.04), atol=1e-5)
    assert torch.equal(method.teacher_bank.items, bank_before), "the bank changes only after the loss"
    method.after_step(0, 1)
    assert torch.allclose(method.teacher_bank.items[:32], t, atol=1e-6)
    assert torch.equal(method.teacher_bank.items[32:], bank_before[32:]) and int(method.teacher_bank.ptr) == 32


def test_2q_fills_the_student_bank_from_the_momentum_student():
    torch.manual_seed(0)
    teacher = FrozenTeacher(tiny_backbone(48), torch.device("cpu"))
    method = Compress(tiny_backbone(), teacher, {"variant": "2q", "bank": 40, "dim": 16, "momentum": 0.5}, n_images=100)
    assert all(not p.requires_grad for p in method.momentum_backbone.parameters())
    assert all(not p.requires_grad for p in method.momentum_head.parameters())
    x, labels = sample_batch()
    ema_before = copy.deepcopy((method.momentum_backbone, method.momentum_head))
    expected_keys = F.normalize(ema_before[1](ema_before[0](x)), dim=1)  # train-mode BN, as in the step
    loss = method.training_step((x, labels))["loss"]
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    loss.backward()
    optimizer.step()
    method.after_step(0, 1)
    # the student bank holds the momentum student's keys of this batch, the teacher bank the teacher's
    assert torch.allclose(method.student_bank.items[:32], expected_keys.detach(), atol=1e-5)
    assert torch.allclose(method.teacher_bank.items[:32], F.normalize(teacher(x), dim=1), atol=1e-6)
    # EMA: m <- 0.5 m + 0.5 p, after the optimiser step
    for online, ema, old in (
        (method.backbone, method.momentum_backbone, ema_before[0]),
        (method.head, method.momentum_head, ema_before[1]),
    ):
        for p, m, o in zip(online.parameters(), ema.parameters(), old.parameters()):
            assert torch.allclose(m, 0.5 * o + 0.5 * p.detach(), atol=1e-6)
    assert any(not torch.equal(m, o) for m, o in zip(method.momentum_head.parameters(), ema_before[1].parameters()))


@pytest.mark.parametrize("variant", ["1q", "2q"])
def test_loss_falls_over_a_few_steps(variant):
    torch.manual_seed(0)
    teacher = FrozenTeacher(tiny_backbone(48), torch.device("cpu"))
    method = Compress(tiny_backbone(), teacher, {"variant": variant, "bank": 64}, n_images=1000)
    losses = train_steps(method, sample_batch(), steps=8, lr=3e-3)
    # from step 2 on the bank holds this batch's anchors (64 = 2 x 32), so what changes is the student
    assert losses[-1] < 0.8 * losses[2], losses


def test_bank_not_smaller_than_the_dataset_is_refused():
    teacher = FrozenTeacher(tiny_backbone(48), torch.device("cpu"))
    with pytest.raises(DataError, match="distill.options.bank 128000 is not smaller than the 50000"):
        Compress(tiny_backbone(), teacher, {}, n_images=50000)


def test_cached_option_needs_cached_features():
    teacher = FrozenTeacher(tiny_backbone(48), torch.device("cpu"))
    with pytest.raises(ValueError, match="teacher_features is 'cached'"):
        Compress(tiny_backbone(), teacher, {"bank": 8, "teacher_features": "cached"}, n_images=100)
    assert Compress.needs({"teacher_features": "cached"}) is Needs.FEATURES
    assert Compress.needs({"teacher_features": "live"}) is Needs.TEACHER


def test_recipe_validates_compress_options(tmp_path):
    base = {"name": "x", "data": {"train": {"path": str(tmp_path)}}, "distill": {"method": "compress"}}
    recipe = recipe_from_dict(base)
    assert recipe.distill.options["variant"] == "2q" and recipe.distill.options["bank"] == 128000
    assert recipe.distill.options["tau_teacher"] == recipe.distill.options["tau_student"] == 0.04
    with pytest.raises(RecipeError, match="distill.options.variant"):
        recipe_from_dict(base, ["distill.options.variant=3q"])


def test_the_official_2q_setting_uses_raw_features_and_crop_and_flip():
    """UMBCvision/CompRess train_student.py: the student's pooled features fill its bank (no extra layer), the
    teacher's backbone features (fc removed) fill the teacher's, and the views are crop and flip only."""
    from torchvision import transforms as T

    from kt_edge.models.backbones import build_backbone

    teacher = FrozenTeacher(build_backbone("resnet18", 32), torch.device("cpu"))
    method = Compress(
        build_backbone("alexnet", 32),
        teacher,
        {"variant": "2q", "bank": 16, "student_head": "none", "augment": "crop_flip"},
        n_images=64,
    )
    assert isinstance(method.head, torch.nn.Identity) and method.student_bank.items.shape == (16, 256)
    assert method.teacher_bank.items.shape == (16, 512)
    steps = [type(t) for t in method.train_transform(32).transforms]
    assert steps == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    with pytest.raises(ValueError, match="student_head none needs variant 2q"):
        Compress.Options(variant="1q", student_head="none")
