"""The run directory's layout, named in one place: the stages, the report, `compare` and the lock find
their files through it, so a renamed folder is one edit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    def model(self, stage: str) -> Path:
        """A stage's checkpoint folder: ``teacher`` or ``student``."""
        return self.root / stage

    @property
    def teacher(self) -> Path:
        return self.model("teacher")

    @property
    def student(self) -> Path:
        return self.model("student")

    def features(self, split: str) -> Path:
        return self.root / "features" / split

    @property
    def clusters(self) -> Path:
        return self.root / "clusters"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def results(self) -> Path:
        return self.eval / "results.json"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"
