"""SIGTERM to a whole process group outside training, as `timeout`, Slurm, Kubernetes and systemd send it:
DataLoader workers ignore it and the stage stops with one line (training: test_kill_resume)."""

from __future__ import annotations

import signal

import yaml

from kt_edge.models.backbones import build_backbone
from kt_edge.models.checkpoint import save_backbone

from process_kit import children, error_lines, finish, under_timeout, wait_until
from sample_kit import SAMPLE, tiny_recipe_dict


def test_eval_with_workers_stops_in_one_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "runs", data={
        "workers": 2, "train": {"path": str(SAMPLE / "train"), "subset": 1000}})))
    save_backbone(build_backbone("resnet18", 32), tmp_path / "runs" / "tiny" / "teacher")
    scheduled = under_timeout("eval", recipe)
    main = wait_until(lambda: children(scheduled.pid), "the kt-edge process", scheduled)[0]
    wait_until(lambda: len(children(main)) == 2, "DataLoader workers embedding the data", scheduled)
    scheduled.send_signal(signal.SIGTERM)  # timeout sends it on to kt-edge, then to the whole group
    code, err = finish(scheduled)
    assert code == 130, err
    assert error_lines(err) == ["error: stopped by SIGTERM; finished work (whole artifacts, feature shards) is "
                                "kept: run the same command again to go on"], err
    assert not (tmp_path / "runs" / "tiny" / "eval" / "results.json").exists()
