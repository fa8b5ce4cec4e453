"""Every registered teacher and distiller keeps the method contract, on the CPU and on a stand-in for a GPU,
and trains every student architecture (a teacher method there is the student trained alone).

The ``meta`` device stands in for CUDA: an operation that mixes in a tensor made on the CPU (a scalar,
an index, a generator's draw) fails there as it would on a GPU, and so does an operation that needs the
host to read a value (``.item()``, ``nonzero()``), which would stall the GPU's queue.
"""

import numpy as np
import pytest
import torch
from sample_kit import fixed_batch, sample_images

from kt_edge.engine.method import Method, Needs, needs
from kt_edge.engine.queue import queue_options
from kt_edge.models.backbones import MOBILE, Backbone, build_backbone
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.teachers import TEACHERS, tiles
from kt_edge.transfer import DISTILLERS
from kt_edge.transfer.cached_teacher import CachedTeacher

META = torch.device("meta")
N = 8
SHRINK = {"hidden": 32, "dim": 16, "tile_dim": 16, "permutations": 20}  # options that size a network


def small(options) -> dict:
    """A method's options at a test's size: its networks narrow and its queues of 4, whatever the method."""
    return {**{k: v for k, v in SHRINK.items() if k in options.model_fields}, **{q: 4 for q in queue_options(options)}}


TEACHER_OPTIONS = {name: small(method.Options) for name, method in TEACHERS.items()}
DISTILLER_OPTIONS = {  # name -> (registry name, options): every registered distiller, and the variants
    **{name: (name, small(method.Options)) for name, method in DISTILLERS.items()},
    "seed-backbone": ("seed", {"queue": 4, "hidden": 32, "teacher_space": "backbone"}),
    "compress-1q": ("compress", {"variant": "1q", "bank": 4}),
    "compress-2q-official": ("compress", {"variant": "2q", "bank": 4, "student_head": "none", "augment": "crop_flip"}),
    "compress-cached": ("compress", {"variant": "2q", "bank": 4, "teacher_features": "cached"}),
    "regress-cached": ("regress", {"hidden": 32, "teacher_features": "cached"}),
}


def _teacher_method(name, student):
    torch.manual_seed(0)
    return TEACHERS[name](build_backbone(student, 32), TEACHER_OPTIONS[name], n_images=N)


def _distiller(name, device, student):
    registry, options = DISTILLER_OPTIONS[name]
    torch.manual_seed(0)
    teacher_net = build_backbone("resnet18", 32)
    if options.get("teacher_features") == "cached":
        teacher = _cached(teacher_net, device)
    else:
        space = getattr(DISTILLERS[registry].Options(**options), "teacher_space", "backbone")
        head = torch.nn.Sequential(torch.nn.Linear(512, 24)) if space == "head" else None
        teacher = FrozenTeacher(teacher_net, device, head)
    extra = {"n_classes": 4} if _labelled(registry, options) else {}
    return DISTILLERS[registry](build_backbone(student, 32), teacher, options, n_images=N, **extra)


def _cached(model, device):
    class Store:
        shard_features = (np.random.default_rng(0).standard_normal((N, 512)).astype(np.float16),)
        dim = 512

    return CachedTeacher(Store(), device)


def _labelled(registry, options) -> bool:
    return registry in DISTILLERS and needs(DISTILLERS[registry], options) is Needs.PSEUDO_LABELS


def _batch(method, registry, options=None):
    views, _ = fixed_batch(method, sample_images(N))
    # pseudo-labels of 4 clusters, or image indices (what a cached teacher looks up; unused by the others)
    labels = torch.arange(N) % 4 if _labelled(registry, options or {}) else torch.arange(N)
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


CPU = torch.device("cpu")


def _build(kind, name, device=CPU, student="alexnet"):
    """The method, and how to make its batch: (registry name, options)."""
    if kind == "teacher":
        return _teacher_method(name, student), (name, TEACHER_OPTIONS[name])
    return _distiller(name, device, student), DISTILLER_OPTIONS[name]


def test_every_registered_method_keeps_the_method_contract():
    for kind, name in (param.values for param in METHODS):
        method, _ = _build(kind, name)
        assert isinstance(method, Method), name
        assert (type(method).__doc__ or "").strip(), name  # `kt-edge methods` shows its first line


@pytest.mark.parametrize("kind, name", METHODS)
def test_one_step_is_finite_hands_on_its_backbone_and_round_trips_its_state(
    kind, name, tmp_path, monkeypatch, one_thread
):
    monkeypatch.setenv(tiles.CACHE_ENV, str(tmp_path / "cache"))
    method, registry = _build(kind, name)
    out = method.training_step(_batch(method, *registry))
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    method.after_step(0, 10)
    assert isinstance(method.backbone, Backbone) and method.backbone.embed_dim == 256
    again, _ = _build(kind, name)
    again.load_state_dict(method.state_dict())  # strict: every key, every shape
    for key, value in method.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize("kind, name", METHODS)
def test_a_step_keeps_every_tensor_on_the_device_and_never_reads_one_back(
    kind, name, tmp_path, monkeypatch, one_thread
):
    monkeypatch.setenv(tiles.CACHE_ENV, str(tmp_path / "cache"))
    method, registry = _build(kind, name, META)
    batch = _to(_batch(method, *registry), META)
    method.to(META)
    out = method.training_step(batch)
    assert {value.device for value in out.values()} == {META}, {k: v.device for k, v in out.items()}
    torch.stack([value.detach().float().reshape(()) for value in out.values()])  # the trainer's one read
    out["loss"].backward()
    method.after_step(0, 10)


@pytest.mark.parametrize("student", MOBILE)  # alexnet: the tests above; resnet18: the stage tests
@pytest.mark.parametrize("kind, name", METHODS)
def test_every_method_trains_every_student(kind, name, student, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv(tiles.CACHE_ENV, str(tmp_path / "cache"))
    method, registry = _build(kind, name, student=student)
    out = method.training_step(_batch(method, *registry))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in method.backbone.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), "the student learns nothing"
    assert method.backbone.arch == student
    again, _ = _build(kind, name, student=student)
    again.load_state_dict(method.state_dict())  # strict: every key, every shape
