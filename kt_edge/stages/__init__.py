"""The stages of a run, one module each: a function of the recipe and the artifacts it is given.

``runs/<name>/``: ``recipe.yaml`` (resolved), ``metrics.jsonl``, ``teacher/``, ``features/<split>/``
(teacher features, fp16 shards), ``clusters/`` (centroids, pseudo-labels, report), ``student/``
(safetensors + JSON sidecar, ``resume.pt``), ``eval/results.json``, ``bundle/``.  ``run.py`` alone
orders them, skipping a stage whose ``.done`` stamp (``stamp.py``) matches its inputs; a partial one
is redone, or resumed with ``resume``.
"""
