"""The shipped CIFAR-10 sample and tiny recipes that run in seconds on CPU (imported by tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import default_collate

from kt_edge.data.sources import Images, open_images
from kt_edge.models.backbones import build_backbone

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "cifar10"


def sample_images(n: int, seed: int = 0) -> Images:
    """A seeded subset of the shipped CIFAR-10 sample (real 32 px images)."""
    return open_images(SAMPLE / "train", subset=n, seed=seed)


def fixed_batch(method: torch.nn.Module, images: Images, image_size: int = 32, seed: int = 0):
    """One batch as the trainer's DataLoader would build it: (method's views, labels)."""
    torch.manual_seed(seed)
    transform = method.train_transform(image_size)
    return default_collate([(transform(images.image(i)), int(images.labels[i])) for i in range(len(images))])


def tiny_recipe_dict(runs_dir: Path, **sections) -> dict:
    """A complete recipe on a seeded subset of the sample: 256 train / 128 test images, 32 px, a few steps."""
    data = {
        "name": "tiny",
        "seed": 0,
        "device": "cpu",
        "runs_dir": str(runs_dir),
        "data": {
            "train": {"path": str(SAMPLE / "train"), "subset": 256},
            "test": {"path": str(SAMPLE / "test"), "subset": 128},
            "image_size": 32,
            "workers": 0,
        },
        "teacher": {
            "arch": "resnet18",
            "method": "moco",
            "train": {"epochs": 1, "max_steps": 3, "batch_size": 32, "lr": 0.05, "checkpoint_every": 2, "log_every": 1},
            "options": {"queue": 64, "hidden": 64, "dim": 32, "momentum": 0.99},
        },
        "distill": {
            "student": "alexnet",
            "method": "seed",
            "train": {"epochs": 1, "max_steps": 3, "batch_size": 32, "lr": 0.05, "checkpoint_every": 2, "log_every": 1},
            "options": {"queue": 64, "hidden": 64},
        },
        "eval": {"knn": [{"k": 20, "t": 0.07}]},
        "export": {"golden": 4},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def train_steps(method: torch.nn.Module, batch, steps: int, lr: float = 1e-3) -> list[float]:
    """Train on the same batch for ``steps`` AdamW steps, calling after_step like the trainer; the losses."""
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    method.train()
    losses = []
    for step in range(steps):
        loss = method.training_step(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hasattr(method, "after_step"):
            method.after_step(step, steps)
        losses.append(loss.item())
    return losses


def crashing_at(method: torch.nn.Module, step: int) -> torch.nn.Module:
    """``method`` with an after_step that raises once it has finished ``step`` (0-based), as a crash would."""
    original = method.after_step

    def after_step(i: int, total: int) -> None:
        original(i, total)
        if i == step:
            raise RuntimeError("simulated crash")

    method.after_step = after_step
    return method


def student_with_statistics(arch: str, image_size: int = 32) -> torch.nn.Module:
    """A seeded random-init student whose BatchNorm statistics come from data, not the initial 0 / 1, in eval mode."""
    torch.manual_seed(0)
    model = build_backbone(arch, image_size).train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(32, 3, image_size, image_size))
    return model.eval()
