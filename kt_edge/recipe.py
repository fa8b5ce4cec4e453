"""Recipes: the one YAML file that says what a run does, validated before any compute.

Every section is a strict pydantic model (unknown keys are errors).  Method-specific options live
in the method's own ``Options`` model and are validated here through the method registries, so a
new method needs no change to this file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kt_edge.errors import RecipeError


def _validate_options(section: str, method: str, options: dict, registry: dict, batch_size: int) -> dict:
    """The method's options, validated by its own model; its queues and banks checked against the global batch."""
    from kt_edge.engine.queue import check_queue_batch, queue_options

    if method not in registry:
        raise ValueError(f"unknown {section}.method {method!r}; choose from {', '.join(sorted(registry))}")
    try:
        validated = registry[method].Options.model_validate(options).model_dump(mode="json")
    except ValidationError as exc:
        raise ValueError(_first_error(exc, prefix=f"{section}.options")) from None
    for name in queue_options(registry[method].Options):
        check_queue_batch(f"{section}.options.{name}", validated[name], batch_size, f"{section}.train.batch_size")
    return validated


def _first_error(exc: ValidationError, prefix: str = "") -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
    if err["type"] == "extra_forbidden":
        return f"unknown key {where!r}"
    if err["type"] == "missing":
        return f"missing key {where!r}"
    if err["type"] == "value_error":  # raised by our own validators: their message is already complete
        return str(err["ctx"]["error"])
    return f"{where}: {err['msg']}" if where else err["msg"]


PROTOCOL = re.compile(r"knn|linear|clusters|linear_(\d+(?:\.\d+)?)pct")  # eval.protocols; group 1: the label %


def check_protocols(protocols: list[str]) -> None:
    """Raise ValueError naming the first unknown, out-of-range or repeated protocol."""
    for protocol in protocols:
        match = PROTOCOL.fullmatch(protocol)
        if match is None:
            raise ValueError(f"unknown eval protocol {protocol!r}: use knn, linear, clusters or linear_<P>pct")
        if match.group(1) is not None and not 0 < float(match.group(1)) <= 100:
            raise ValueError(f"eval protocol {protocol!r}: the label percentage must be in (0, 100]")
    repeated = sorted({p for p in protocols if protocols.count(p) > 1})
    if repeated:
        raise ValueError(f"eval protocol {repeated[0]!r} is listed twice")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSource(Strict):
    """One split of images on disk."""

    path: Path
    format: Literal["auto", "imagefolder", "folder", "cifar10"] = "auto"
    split: Literal["train", "test"] = "train"  # which CIFAR-10 pickle split, for format cifar10
    subset: int | None = Field(default=None, gt=0, description="seeded random subset of this many images")
    strict: bool = False  # refuse corrupt images instead of skipping them


class DataConfig(Strict):
    train: DataSource
    test: DataSource | None = None  # labelled split for evaluation; the k-NN bank is `train`
    image_size: int = Field(default=32, ge=16, le=512)
    workers: int = Field(default=2, ge=0)
    cache: bool = Field(
        default=False,
        description="train from a uint8 copy decoded at image_size "
        "(`kt-edge data cache`; built on first use when missing)",
    )
    cache_dir: Path = Path("cache")
    augment: Literal["auto", "per_sample", "batched"] = Field(
        default="auto",
        description="per_sample: decode and augment each image in DataLoader workers; "
        "batched: augment whole uint8 batches on the device (needs data.cache, or CIFAR pickles at their "
        "32px); auto: batched on CUDA when the images are in such an array, per_sample otherwise",
    )


class TrainConfig(Strict):
    """Budget and optimiser of one training stage; shared by teachers and students."""

    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps")
    batch_size: int = Field(default=256, ge=2)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.06, gt=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    warmup_epochs: float = Field(default=0.0, ge=0)
    log_every: int = Field(
        default=10,
        ge=1,
        description="steps between logged scalars (the only host syncs of "
        "the loop: the NaN guard, a stop signal and a due resume point are checked there)",
    )
    checkpoint_every: int | None = Field(
        default=None, ge=1, description="steps between resume points; unset: every checkpoint_minutes"
    )
    checkpoint_minutes: float = Field(
        default=5.0, gt=0, description="minutes between resume points (checked every log_every steps)"
    )
    sync_batchnorm: bool | Literal["auto"] = Field(
        default="auto",
        description="SyncBatchNorm under torchrun (GPUs only); auto: on for methods that use it in "
        "their official code (BYOL, SimCLR, Barlow Twins)",
    )
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # NHWC activations and weights on CUDA (faster convolutions); ignored on CPU
    compile: bool = False  # torch.compile the networks: slow first steps, faster ones after


class TeacherConfig(Strict):
    arch: Literal["resnet18", "resnet50", "alexnet"] = "resnet50"
    method: str = "moco"
    checkpoint: Path | None = None  # import instead of training
    format: Literal["auto", "kt-edge", "torchvision", "moco", "swav", "dino", "timm"] = Field(
        default="auto", description="layout of teacher.checkpoint; auto reads it from the keys"
    )
    layer: Literal["layer1", "layer2", "layer3", "layer4", "conv1", "conv2", "conv3", "conv4", "conv5"] | None = Field(
        default=None, description="the layer whose pooled output is the teacher's embedding (default: the last)"
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=200, lr=0.06))
    options: dict[str, Any] = Field(default_factory=dict, description="method options, see `kt-edge methods`")

    @model_validator(mode="after")
    def _check_method(self) -> "TeacherConfig":
        from kt_edge.teachers import TEACHERS

        self.options = _validate_options("teacher", self.method, self.options, TEACHERS, self.train.batch_size)
        if self.format != "auto" and self.checkpoint is None:
            raise ValueError(f"teacher.format {self.format!r} describes teacher.checkpoint, which is not set")
        return self


class DistillConfig(Strict):
    student: Literal["resnet18", "alexnet", "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0"] = Field(
        default="resnet18",
        description="the network distilled into: the seed papers' ResNet-18 and AlexNet, or a "
        "Jetson-class MobileNetV3 / EfficientNet-B0 (torchvision, random init)",
    )
    method: str = "seed"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=200, lr=0.03))
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_method(self) -> "DistillConfig":
        from kt_edge.teachers import TEACHERS
        from kt_edge.transfer import DISTILLERS

        # A teacher method here trains the student alone: the baseline distillation must beat.
        self.options = _validate_options(
            "distill", self.method, self.options, {**DISTILLERS, **TEACHERS}, self.train.batch_size
        )
        return self


class KnnConfig(Strict):
    """One weighted k-NN setting: k neighbours, each voting exp(cosine / t)."""

    k: int = Field(default=200, ge=1)
    t: float = Field(default=0.1, gt=0)


class EvalConfig(Strict):
    """How frozen embeddings are scored: which protocols, their options, and an optional transfer dataset."""

    class Linear(Strict):
        normalize: bool = True  # L2-normalise, then standardise with the train split's statistics (CompRess)
        weight_decay: float | None = Field(default=None, ge=0, description="fixed value; unset: pick from a grid")
        max_iter: int = Field(default=1000, ge=1, description="L-BFGS iterations per fit")

    class Transfer(Strict):
        """A labelled dataset not used for training: train builds the k-NN bank and fits probes, test is scored."""

        train: DataSource
        test: DataSource

    protocols: list[str] = Field(
        default_factory=lambda: ["knn", "linear", "clusters"],
        description="knn, linear, clusters, and few-label probes linear_<P>pct (e.g. linear_1pct, linear_10pct)",
    )
    knn: list[KnnConfig] = Field(default_factory=lambda: [KnnConfig(k=200, t=0.1), KnnConfig(k=20, t=0.07)])
    linear: Linear = Field(default_factory=Linear)
    transfer: Transfer | None = None
    teacher: bool = True  # also score the teacher (off when a shared teacher is scored once elsewhere)
    baseline: bool = True  # also score a random-init student, the floor distillation must beat

    @field_validator("protocols")
    @classmethod
    def _check_protocols(cls, value: list[str]) -> list[str]:
        check_protocols(value)
        return value

    @model_validator(mode="after")
    def _check_knn(self) -> "EvalConfig":
        settings = [(s.k, s.t) for s in self.knn]
        if len(set(settings)) != len(settings):
            raise ValueError("eval.knn lists the same (k, t) setting twice")
        if "knn" in self.protocols and not settings:
            raise ValueError("eval.protocols has 'knn' but eval.knn lists no setting")
        return self


class ClusterConfig(Strict):
    """k-means on the teacher's features of data.train; every image's nearest centroid is its pseudo-label."""

    k: int = Field(default=2000, ge=2, description="clusters (2000 for ImageNet, as Noroozi et al.)")
    niter: int = Field(default=20, ge=1)
    pca_dim: int | None = Field(default=None, ge=1, description="PCA-whiten to this many dims first; unset: off")
    normalize: bool = True  # L2-normalise (after PCA) before k-means and assignment
    max_points_per_centroid: int = Field(default=256, ge=1, description="k-means trains on at most k x this")
    use_gpu: bool | Literal["auto"] = "auto"
    assign_to: DataSource | None = None  # label this dataset instead of data.train (cluster transfer trains on it)


class Int8Config(Strict):
    """How the int8 model is quantized; all of it is recorded in the bundle's manifest."""

    target: Literal["tensorrt", "onnxruntime"] = Field(
        default="tensorrt",
        description="tensorrt: symmetric int8, Q/DQ where TensorRT wants it; onnxruntime: "
        "uint8 activations and 7-bit weights, exact and fast on ONNX Runtime's CPU kernels",
    )
    keep_float: list[str] | Literal["auto"] = Field(
        default="auto",
        description="ops that stay float: auto (measured: all int8, then the stem, then also the depthwise "
        "convs float, the first that keeps min_cosine_int8) or a list of stem, depthwise, op types (HardSwish) "
        "and node-name globs (/body/*/block.2/*)",
    )
    choice_images: int = Field(
        default=256, ge=1, description="held-out train images the auto keep_float choice is measured on"
    )
    quantize_output: bool = Field(default=False, description="also quantize the output embedding")


class ExportConfig(Strict):
    opset: int = Field(default=17, ge=13, le=21)
    golden: int = Field(default=16, ge=1, description="real images whose fp32 outputs ship in the bundle")
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(default_factory=lambda: ["fp32"])
    calibration: int = Field(default=512, ge=1, description="images for int8 calibration")
    int8: Int8Config = Field(default_factory=Int8Config)
    sign_key: Path | None = Field(
        default=None, description="Ed25519 private key (unencrypted PEM) that signs the bundle's manifest"
    )
    rtol: float = Field(default=1e-3, gt=0)
    atol: float = Field(default=1e-5, gt=0)
    min_cosine_fp32: float = Field(default=0.99999, gt=0, le=1)
    min_cosine_fp16: float = Field(default=0.997, gt=0, le=1)
    min_cosine_int8: float = Field(default=0.98, gt=0, le=1)
    max_knn_drop: float = Field(default=1.0, ge=0, description="k-NN top-1 points the export may lose")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    runs_dir: Path = Path("runs")
    data: DataConfig
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("runs_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name

    def digest(self, *keys: str) -> str:
        """Hash of the named parts (dotted keys; all when none): a stage reruns only when its inputs change."""
        data = self.model_dump(mode="json")
        picked = {}
        for key in keys:
            node = data
            for part in key.split("."):
                node = node[part]
            picked[key] = node
        return hashlib.sha256(json.dumps(picked if keys else data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value), the value parsed as YAML (so 3, 1e-4, true, [1, 2] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"bad override {text!r}: expected KEY=VALUE, e.g. distill.train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # e.g. 2001-13-01, or nesting too deep: keep the text
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"bad override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_recipe(path: Path | str, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is one RecipeError line naming the key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and bad dates are ValueErrors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecipeError(f"{path}: not valid YAML ({reason})") from None
    return recipe_from_dict(data, overrides, source=str(path))


def recipe_from_dict(data: Any, overrides: list[str] = (), source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_first_error(exc)}") from None
