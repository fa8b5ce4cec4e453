"""Single-process MoCo emulates shuffled BN: BatchNorm per sub-batch, keys shuffled across sub-batches."""

import torch
from torch import nn

from kt_edge.models.backbones import Backbone
from kt_edge.teachers.moco import MoCo

OPTIONS = {"queue": 16, "hidden": 16, "dim": 8}


def _moco(body: nn.Module, splits: int) -> MoCo:
    torch.manual_seed(0)
    return MoCo(Backbone("resnet18", 8, body, 12), {**OPTIONS, "bn_splits": splits}, n_images=64)


def _batch():
    torch.manual_seed(1)
    return (torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)), None


def test_without_batchnorm_splitting_changes_nothing():
    """The keys come back in their images' order: a BN-free net gives the same loss however it is split."""
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 12))
    losses = []
    for splits in (1, 4):
        method = _moco(linear, splits)
        torch.manual_seed(2)
        losses.append(method.training_step(_batch())["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_keys_are_shuffled_across_batchnorm_sub_batches():
    body = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    method = _moco(body, 4)
    seen = []
    method.key_backbone.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    method.backbone.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    (query_view, key_view), _ = _batch()
    method.training_step(((query_view, key_view), None))
    queries, keys = seen[:4], seen[4:]
    assert [len(c) for c in queries] == [len(c) for c in keys] == [4, 4, 4, 4]
    assert torch.equal(torch.cat(queries), query_view)  # queries in order, BN per sub-batch
    shuffled = torch.cat(keys)
    assert not torch.equal(shuffled, key_view)  # keys in another order ...
    assert torch.equal(shuffled.flatten(1).sum(1).sort().values, key_view.flatten(1).sum(1).sort().values)
