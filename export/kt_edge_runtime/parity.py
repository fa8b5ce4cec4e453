"""Parity checks between a reference (PyTorch fp32) and an exported model.

The same functions run on the host at export time and on the device after an
engine is built, so "verified" means the same thing on both sides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8")

# |reference| values below this are treated as this in the relative error,
# so near-zero reference entries do not turn the reported figure into noise.
_REL_FLOOR = 1e-6


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits for one precision.

    rtol/atol (element-wise allclose) apply only where set (fp32); min_cosine
    is the lowest per-sample cosine allowed; max_top1_drop is the largest
    k-NN top-1 drop, in percentage points, against the reference.
    """

    min_cosine: float
    rtol: float | None = None
    atol: float | None = None
    max_top1_drop: float = 1.0

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must lie in [-1, 1], got {self.min_cosine}")
        if (self.rtol is None) != (self.atol is None):
            raise ValueError("rtol and atol must be given together or not at all")
        for name in ("rtol", "atol", "max_top1_drop"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> Thresholds:
        unknown = set(data) - {"min_cosine", "rtol", "atol", "max_top1_drop"}
        if unknown:
            raise ValueError(f"unknown threshold field(s): {', '.join(sorted(unknown))}")
        if "min_cosine" not in data:
            raise ValueError("threshold field 'min_cosine' is missing")
        numbers = {}
        for key, value in data.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"threshold field {key!r} must be a number, got {type(value).__name__}")
            numbers[key] = float(value)
        return cls(**numbers)


DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(min_cosine=0.99999, rtol=1e-3, atol=1e-5),
    "fp16": Thresholds(min_cosine=0.997),
    "int8": Thresholds(min_cosine=0.98),
}


@dataclass(frozen=True)
class ParityReport:
    """Outcome of comparing candidate outputs with reference outputs on golden inputs.

    worst_sample is the index of the sample that fails hardest: for a precision
    with rtol/atol the one with the largest allclose violation ratio
    |c - r| / (atol + rtol * |r|), otherwise the one with the lowest cosine.
    """

    precision: str
    passed: bool
    samples: int
    max_abs_err: float
    max_rel_err: float
    min_cosine: float
    mean_cosine: float
    p1_cosine: float
    median_cosine: float
    worst_sample: int
    worst_abs_err: float
    worst_cosine: float
    thresholds: Thresholds
    failures: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        why = f" ({'; '.join(self.failures)})" if self.failures else ""
        return (
            f"{self.precision} {verdict}{why}: {self.samples} samples, "
            f"max abs err {self.max_abs_err:.3g}, max rel err {self.max_rel_err:.3g}, "
            f"min cosine {self.min_cosine:.6f}, 1st percentile {self.p1_cosine:.6f}, median "
            f"{self.median_cosine:.6f}; worst sample {self.worst_sample} "
            f"(max abs err {self.worst_abs_err:.3g}, cosine {self.worst_cosine:.6f})"
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["thresholds"] = self.thresholds.to_dict()
        data["failures"] = list(self.failures)
        return data


@dataclass(frozen=True)
class AccuracyReport:
    """k-NN top-1 of the candidate against the reference, in percentage points."""

    reference_top1: float
    candidate_top1: float
    drop: float
    max_drop: float
    passed: bool

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"accuracy {verdict}: k-NN top-1 {self.candidate_top1:.2f} vs reference "
            f"{self.reference_top1:.2f} (drop {self.drop:+.2f} points, allowed {self.max_drop:.2f})"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine per row; two zero rows count as identical, one zero row as orthogonal."""
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    denom = na * nb
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), 0.0)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


def golden_parity(
    reference: np.ndarray,
    candidate: np.ndarray,
    precision: str,
    thresholds: Thresholds | None = None,
) -> ParityReport:
    """Compare candidate embeddings [N, D] with the reference embeddings [N, D]."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    th = thresholds if thresholds is not None else DEFAULT_THRESHOLDS[precision]
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.ndim != 2 or ref.shape[0] == 0:
        raise ValueError(f"reference must be a non-empty [N, D] array, got shape {ref.shape}")
    if cand.shape != ref.shape:
        raise ValueError(f"candidate shape {cand.shape} does not match reference shape {ref.shape}")

    failures: list[str] = []
    finite = np.isfinite(cand).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        failures.append(f"{int((~finite).sum())} sample(s) with non-finite values, first {bad}")
        cand = np.where(np.isfinite(cand), cand, 0.0)

    abs_err = np.abs(cand - ref)
    rel_err = abs_err / np.maximum(np.abs(ref), _REL_FLOOR)
    cos = _row_cosine(ref, cand)
    cos[~finite] = -1.0

    if th.rtol is not None:
        ratio = abs_err / (th.atol + th.rtol * np.abs(ref))
        ratio[~finite] = np.inf
        per_sample = ratio.max(axis=1)
        worst = int(np.argmax(per_sample))
        outside = int((per_sample > 1.0).sum())
        if outside:
            failures.append(f"{outside}/{len(ref)} samples outside rtol={th.rtol:g} atol={th.atol:g}")
    else:
        worst = int(np.argmin(cos))

    min_cos = float(cos.min())
    if min_cos < th.min_cosine:
        failures.append(f"min cosine {min_cos:.6f} < {th.min_cosine:g}")

    return ParityReport(
        precision=precision,
        passed=not failures,
        samples=int(ref.shape[0]),
        max_abs_err=float(abs_err.max()),
        max_rel_err=float(rel_err.max()),
        min_cosine=min_cos,
        mean_cosine=float(cos.mean()),
        p1_cosine=float(np.percentile(cos, 1)),
        median_cosine=float(np.median(cos)),
        worst_sample=worst,
        worst_abs_err=float(abs_err[worst].max()),
        worst_cosine=float(cos[worst]),
        thresholds=th,
        failures=tuple(failures),
    )


def knn_top1(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = 200,
    t: float = 0.1,
    batch_size: int = 256,
) -> float:
    """Weighted k-NN top-1 accuracy in percent (InstDisc protocol).

    Features are L2-normalised, neighbours ranked by cosine, and each of the k
    neighbours votes for its class with weight exp(sim / t). Test samples are
    processed in batches so memory stays at batch_size x len(train_x).
    """
    train_x = np.asarray(train_x, dtype=np.float32)
    test_x = np.asarray(test_x, dtype=np.float32)
    train_y = np.asarray(train_y).astype(np.int64, copy=False)
    test_y = np.asarray(test_y).astype(np.int64, copy=False)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {train_x.shape} and {test_x.shape}")
    if len(train_y) != len(train_x) or len(test_y) != len(test_x):
        raise ValueError("each feature array needs exactly one label per row")
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("k-NN needs at least one train and one test sample")
    if k < 1 or t <= 0:
        raise ValueError(f"k must be >= 1 and t > 0, got k={k}, t={t}")
    if train_y.min() < 0:
        raise ValueError("labels must be non-negative class ids")

    def normalise(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    bank = normalise(train_x)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(test_x), batch_size):
        query = normalise(test_x[start : start + batch_size])
        sim = query @ bank.T
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(sim, idx, axis=1).astype(np.float64)
        weights = np.exp((top_sim - 1.0) / t)  # shifted by the max possible sim: same argmax, no overflow
        votes = np.zeros((len(query), num_classes))
        np.add.at(votes, (np.arange(len(query))[:, None], train_y[idx]), weights)
        correct += int((votes.argmax(axis=1) == test_y[start : start + batch_size]).sum())
    return 100.0 * correct / len(test_x)


def accuracy_parity(reference_top1: float, candidate_top1: float, max_drop: float = 1.0) -> AccuracyReport:
    """Pass when the candidate's top-1 is at most max_drop points below the reference."""
    for name, value in (("reference_top1", reference_top1), ("candidate_top1", candidate_top1)):
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"{name} must be a percentage in [0, 100], got {value}")
    drop = float(reference_top1) - float(candidate_top1)
    return AccuracyReport(
        reference_top1=float(reference_top1),
        candidate_top1=float(candidate_top1),
        drop=drop,
        max_drop=float(max_drop),
        passed=drop <= max_drop,
    )
