"""Every registered teacher and distiller keeps the method contract, on the CPU and on a stand-in for a GPU.

The ``meta`` device stands in for CUDA: an operation that mixes in a tensor made on the CPU (a scalar,
an index, a generator's draw) fails there as it would on a GPU, and so does an operation that needs the
host to read a value (``.item()``, ``nonzero()``), which would stall the GPU's queue.
"""

import numpy as np
import pytest
import torch

from kt_edge.models.backbones import Backbone, build_backbone
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.teachers import TEACHERS, tiles
from kt_edge.transfer import DISTILLERS
from kt_edge.transfer.cached_teacher import CachedTeacher
from teachers.teacher_kit import fixed_batch, sample_images

META = torch.device("meta")
N = 8
TEACHER_OPTIONS = {
    "moco": {"queue": 4, "hidden": 32, "dim": 16},
    "simclr": {"hidden": 32, "dim": 16},
    "byol": {"hidden": 32, "dim": 16},
    "barlow": {"hidden": 32, "dim": 32},
    "jigsaw": {"permutations": 20, "tile_dim": 16, "hidden": 32},
    "jigsaw_pp": {"permutations": 20, "tile_dim": 16, "hidden": 32},
    "rpl": {"tile_dim": 16, "hidden": 32},
    "rotation": {},
}
DISTILLER_OPTIONS = {  # name -> (registry name, options)
    "seed": ("seed", {"queue": 4, "hidden": 32}),
    "seed-backbone": ("seed", {"queue": 4, "hidden": 32, "teacher_space": "backbone"}),
    "compress-1q": ("compress", {"variant": "1q", "bank": 4}),
    "compress-2q": ("compress", {"variant": "2q", "bank": 4, "dim": 16}),
    "compress-2q-official": ("compress", {"variant": "2q", "bank": 4, "student_head": "none", "augment": "crop_flip"}),
    "compress-cached": ("compress", {"variant": "2q", "bank": 4, "teacher_features": "cached"}),
    "regress": ("regress", {"hidden": 32}),
    "regress-cached": ("regress", {"hidden": 32, "teacher_features": "cached"}),
    "cluster": ("cluster", {}),
}


def _teacher_method(name):
    torch.manual_seed(0)
    return TEACHERS[name](build_backbone("alexnet", 32), TEACHER_OPTIONS[name], n_images=N)


def _distiller(name, device):
    registry, options = DISTILLER_OPTIONS[name]
    torch.manual_seed(0)
    teacher_net = build_backbone("resnet18", 32)
    if options.get("teacher_features") == "cached":
        teacher = _cached(teacher_net, device)
    else:
        head = torch.nn.Sequential(torch.nn.Linear(512, 24)) if options.get("teacher_space", "head") == "head" else None
        teacher = FrozenTeacher(teacher_net, device, head if registry == "seed" else None)
    extra = {"n_classes": 4} if registry == "cluster" else {}
    return DISTILLERS[registry](build_backbone("alexnet", 32), teacher, options, n_images=N, **extra)


def _cached(model, device):
    class Store:
        shard_features = (np.random.default_rng(0).standard_normal((N, 512)).astype(np.float16),)
        dim = 512

    return CachedTeacher(Store(), device)


def _batch(method, registry):
    batch = fixed_batch(method, sample_images(N))
    views, labels = batch
    labels = torch.arange(N) % 4 if registry == "cluster" else torch.arange(N)  # pseudo-labels, or indices
    return views, labels


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return type(batch)(_to(item, device) for item in batch)


def _method_list():
    for name in TEACHER_OPTIONS:
        yield pytest.param("teacher", name, id=f"teacher-{name}")
    for name in DISTILLER_OPTIONS:
        yield pytest.param("distill", name, id=f"distill-{name}")


METHODS = list(_method_list())


def _build(kind, name, device=torch.device("cpu")):
    if kind == "teacher":
        return _teacher_method(name), name
    return _distiller(name, device), DISTILLER_OPTIONS[name][0]


def test_every_registered_method_is_covered():
    assert set(TEACHER_OPTIONS) == set(TEACHERS)
    assert {registry for registry, _ in DISTILLER_OPTIONS.values()} == set(DISTILLERS)


@pytest.mark.parametrize("kind, name", METHODS)
def test_one_step_is_finite_hands_on_its_backbone_and_round_trips_its_state(kind, name, tmp_path, monkeypatch,
                                                                            one_thread):
    monkeypatch.setenv(tiles.CACHE_ENV, str(tmp_path / "cache"))
    method, registry = _build(kind, name)
    out = method.training_step(_batch(method, registry))
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    if hasattr(method, "after_step"):
        method.after_step(0, 10)
    assert isinstance(method.backbone, Backbone) and method.backbone.embed_dim == 256
    again, _ = _build(kind, name)
    again.load_state_dict(method.state_dict())  # strict: every key, every shape
    for key, value in method.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize("kind, name", METHODS)
def test_a_step_keeps_every_tensor_on_the_device_and_never_reads_one_back(kind, name, tmp_path, monkeypatch,
                                                                          one_thread):
    monkeypatch.setenv(tiles.CACHE_ENV, str(tmp_path / "cache"))
    method, registry = _build(kind, name, META)
    batch = _to(_batch(method, registry), META)
    method.to(META)
    out = method.training_step(batch)
    assert {value.device for value in out.values()} == {META}, {k: v.device for k, v in out.items()}
    torch.stack([value.detach().float().reshape(()) for value in out.values()])  # the trainer's one read
    out["loss"].backward()
    if hasattr(method, "after_step"):
        method.after_step(0, 10)
