"""One "done" stamp for every stage: a stage is made once per inputs, and a killed one is made again.

The teacher stage stands for all of them (run.py treats every stage alike); its work is replaced by a
writer that counts its calls, so these tests train nothing.
"""

import pytest

from kt_edge.recipe import load_recipe, recipe_from_dict
from kt_edge.stages import run, stamp
from kt_edge.stages.inputs import teacher_inputs


class Killed(BaseException):
    pass


@pytest.fixture
def made(monkeypatch):
    """The teacher stage's calls; it writes one file, then dies when ``made.kill`` is set."""
    calls = []

    def train_teacher(recipe, resume=False):
        folder = recipe.run_dir / "teacher"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_text(str(len(calls)))
        (folder / "model.json").write_text("{}")
        calls.append(recipe.digest())
        if made.kill:
            raise Killed
        return folder

    monkeypatch.setattr(run, "train_teacher", train_teacher)
    made = type("Made", (), {"calls": calls, "kill": False})
    return made


def test_a_stage_is_made_once_for_the_same_inputs_and_again_for_others(tiny_recipe, made, capsys):
    recipe = load_recipe(tiny_recipe())
    folder = run.teacher(recipe)
    assert stamp.read(folder) == teacher_inputs(recipe) and len(made.calls) == 1
    assert run.teacher(recipe) == folder and len(made.calls) == 1
    assert "teacher: up to date" in capsys.readouterr().err
    other = recipe_from_dict(recipe.model_dump(mode="json"), ["teacher.train.lr=0.5"])
    run.teacher(other)
    assert len(made.calls) == 2 and stamp.read(folder) == teacher_inputs(other)
    run.teacher(recipe)  # the stamp vouches for the last inputs only
    assert len(made.calls) == 3


def test_a_killed_stage_leaves_no_stamp_and_is_made_again(tiny_recipe, made):
    recipe = load_recipe(tiny_recipe())
    folder = run.teacher(recipe)
    other = recipe_from_dict(recipe.model_dump(mode="json"), ["teacher.train.lr=0.5"])
    made.kill = True
    with pytest.raises(Killed):
        run.teacher(other)
    assert stamp.read(folder) is None  # deleted before the first byte of the rewrite: it vouches for nothing
    with pytest.raises(Killed):
        run.teacher(recipe)  # not even for the inputs of the output that was there before
    made.kill = False
    run.teacher(recipe)
    assert len(made.calls) == 4 and stamp.fresh(folder, teacher_inputs(recipe))


def _finished_model(folder, inputs="a finished model"):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "model.json").write_text("{}")
    stamp.write(folder, inputs)


def test_the_stages_after_the_teacher_need_its_stamp(tiny_recipe, made):
    recipe = load_recipe(tiny_recipe())
    folder = run.teacher(recipe)
    assert run.trained_teacher(recipe) == folder
    stamp.clear(folder)  # the weights are there, but nothing says they were finished
    with pytest.raises(Exception, match="run `kt-edge train-teacher` first"):
        run.trained_teacher(recipe)


def test_a_stamped_model_without_its_sidecar_is_trained_again(tiny_recipe, made):
    recipe = load_recipe(tiny_recipe())
    folder = run.teacher(recipe)
    (folder / "model.json").unlink()
    with pytest.raises(Exception, match="run `kt-edge train-teacher` first"):
        run.trained_teacher(recipe)
    run.teacher(recipe)
    assert len(made.calls) == 2 and run.trained_teacher(recipe) == folder


def test_a_damaged_bundle_is_not_taken_for_a_finished_one(tiny_recipe, monkeypatch):
    recipe = load_recipe(tiny_recipe())
    student, exported = recipe.run_dir / "student", []
    _finished_model(student)
    monkeypatch.setattr(run, "export", lambda recipe, folder: exported.append(folder) or {"bundle": "new"})
    assert run.bundle(recipe) == {"bundle": "new"}
    assert run.bundle(recipe) == {"bundle": "new"} and len(exported) == 2  # stamped, but no manifest: made again


def test_a_stamped_output_that_lost_a_file_is_made_again(tiny_recipe, monkeypatch):
    """The stamp vouches for the inputs; the stages also find their output whole before they skip."""
    recipe = load_recipe(tiny_recipe())
    _finished_model(recipe.run_dir / "teacher", teacher_inputs(recipe))
    extracted, evaluated = [], []
    monkeypatch.setattr(run, "extract_features", lambda recipe, split, teacher: extracted.append(split))
    monkeypatch.setattr(run, "evaluate", lambda recipe, models: evaluated.append(models) or {"student": {}})
    run.features(recipe, "train")
    run.features(recipe, "train")  # stamped, but no index.json: not a store
    run.evaluation(recipe)
    run.evaluation(recipe)  # stamped, but no results.json
    clustered = []
    monkeypatch.setattr(run, "cluster_stage", lambda recipe, train, assign_to: clustered.append(train))
    run.clusters(recipe)
    run.clusters(recipe)  # stamped, but no pseudo_labels.npy
    assert extracted == ["train"] * 4 and len(evaluated) == len(clustered) == 2
