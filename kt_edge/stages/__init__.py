"""The stages of a run, one module each, each reading the previous stage's artifact from the run directory.

``runs/<name>/``: ``recipe.yaml`` (resolved), ``metrics.jsonl``, ``teacher/``, ``features/<split>/``
(teacher features, fp16 shards), ``clusters/`` (centroids, pseudo-labels, report), ``student/``
(safetensors + JSON sidecar, ``resume.pt``), ``eval/results.json``, ``bundle/``.  A stage whose
output exists for the same inputs is skipped; a partial one is redone, or resumed with ``resume``.
"""
