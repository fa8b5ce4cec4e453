"""The run directory's layout, named in one place: the stages, the report, `compare` and the lock find
their files through it, so a renamed folder is one edit."""

from __future__ import annotations

from pathlib import Path


class RunDir:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.teacher, self.student = self.model("teacher"), self.model("student")
        self.clusters, self.bundle, self.eval = self.root / "clusters", self.root / "bundle", self.root / "eval"
        self.pseudo_labels = self.clusters / "pseudo_labels.npy"
        self.results = self.eval / "results.json"
        self.metrics, self.recipe = self.root / "metrics.jsonl", self.root / "recipe.yaml"
        self.report_html, self.report_md = self.root / "report.html", self.root / "report.md"
        self.lock = self.root / ".lock"

    def model(self, stage: str) -> Path:
        """A stage's checkpoint folder: ``teacher`` or ``student``."""
        return self.root / stage

    def features(self, split: str) -> Path:
        return self.root / "features" / split
