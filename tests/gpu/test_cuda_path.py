"""The CUDA path, where a GPU is there (``pytest -m gpu``; they skip elsewhere): every method steps under bf16
without a host synchronisation, and the GPU pieces (batched augmentation, torch k-means, split BatchNorm in
channels-last, the frozen teacher in bf16) agree with their CPU counterparts."""

import numpy as np
import pytest
import torch
from test_method_conformance import METHODS, _batch, _build, _to

from kt_edge.data.gpu_augment import BatchAugment
from kt_edge.kmeans import fit_kmeans
from kt_edge.models.backbones import build_backbone
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.models.split_batchnorm import use_split_batchnorm
from kt_edge.teachers import TEACHERS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)"),
]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("kind, name", METHODS)
def test_every_method_steps_under_bf16_without_a_host_synchronisation(kind, name, tmp_path, monkeypatch):
    from kt_edge.teachers import tiles

    monkeypatch.setenv(tiles.CACHE_ENV, str(tmp_path / "cache"))
    method, registry = _build(kind, name, CUDA)
    batch = _to(_batch(method, *registry), CUDA)
    method.to(CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = method.training_step(batch)
        out["loss"].backward()
        method.after_step(0, 10)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32


@pytest.mark.parametrize("method, size", [("moco", 32), ("byol", 224)])
def test_batched_augmentation_on_the_gpu_equals_the_cpu(method, size):
    aug = BatchAugment.from_transform(TEACHERS[method].train_transform(size))
    images = torch.randint(0, 256, (16, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    uniforms = aug.draw(range(16))
    for cpu, gpu in zip(aug(images, uniforms), aug(images.to(CUDA), uniforms.to(CUDA))):
        torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-4, rtol=0)


def test_torch_kmeans_on_the_gpu_equals_it_on_the_cpu():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 64)) + np.repeat(rng.standard_normal((16, 64)) * 4, 250, axis=0)
    x = x.astype(np.float32)
    gpu = fit_kmeans(x, 16, niter=10, seed=0, engine_name="torch")
    cpu_visible = torch.cuda.is_available
    try:
        torch.cuda.is_available = lambda: False  # the same engine, on the CPU
        cpu = fit_kmeans(x, 16, niter=10, seed=0, engine_name="torch")
    finally:
        torch.cuda.is_available = cpu_visible
    np.testing.assert_allclose(gpu.objective_history, cpu.objective_history, rtol=1e-4)


def test_split_batchnorm_in_channels_last_equals_contiguous():
    torch.manual_seed(0)
    net = build_backbone("resnet18", 32).to(CUDA).train()
    for layer in use_split_batchnorm(net):
        layer.splits = 4
    x = torch.randn(64, 3, 32, 32, device=CUDA)
    reference = net(x)
    net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last)), reference, atol=1e-4, rtol=1e-4)


def test_the_frozen_teacher_in_bf16_keeps_its_directions():
    model = build_backbone("resnet50", 32).eval()
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        exact = model(x)
    mixed = FrozenTeacher(model, CUDA)(x.to(CUDA)).cpu()
    assert torch.nn.functional.cosine_similarity(mixed, exact).min() > 0.99
