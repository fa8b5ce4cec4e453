"""Every CLI stage on a tiny subset of the sample, in the order a user runs them."""

import json

import numpy as np
import onnx
import pytest
from kt_edge_runtime.bundle import load_bundle
from onnx import numpy_helper
from typer.testing import CliRunner

from kt_edge.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny run through train-teacher, distill, eval and export, shared by the tests below."""
    import yaml
    from sample_kit import tiny_recipe_dict

    root = tmp_path_factory.mktemp("cli")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(root / "runs")))
    outputs = {cmd: invoke(cmd, recipe) for cmd in ("train-teacher", "distill", "eval", "export")}
    return recipe, root / "runs" / "tiny", outputs


def test_each_stage_succeeds_and_writes_its_artifact(trained_run):
    recipe, run_dir, outputs = trained_run
    for cmd, result in outputs.items():
        assert result.exit_code == 0, f"{cmd}: {result.output}"
    for path in (
        "recipe.yaml",
        "metrics.jsonl",
        "teacher/model.safetensors",
        "teacher/model.json",
        "student/model.safetensors",
        "student/model.json",
        "eval/results.json",
        "bundle/manifest.json",
    ):
        assert (run_dir / path).is_file(), path
    stages = {json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"teacher", "distill"}
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results) == {"teacher", "student", "random_init"}
    assert all(0 <= results[model]["knn_k20_t0.07"] <= 100 for model in results)


def test_every_stage_stamps_its_output_last(trained_run):
    _, run_dir, _ = trained_run
    for stage in ("teacher", "student", "eval", "bundle"):
        folder = run_dir / stage
        written = {path.name: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}
        done = written.pop(".done")
        assert written and done >= max(written.values()), stage


def test_bundle_is_verified_and_hash_checked(trained_run):
    _, run_dir, _ = trained_run
    manifest = load_bundle(run_dir / "bundle")
    assert manifest.verified
    fp32 = manifest.parity.results["fp32"]
    assert fp32["passed"] and fp32["golden"]["min_cosine"] >= 0.99999
    assert abs(fp32["accuracy"]["drop"]) <= 1.0
    assert manifest.input.shape == (3, 32, 32) and manifest.output.dim == 256
    assert manifest.provenance["teacher_space"] == "head"  # SEED distils the MoCo teacher's projection
    # parity over the whole labelled test split, its cosine distribution recorded
    cosine = fp32["split"]["cosine"]
    assert fp32["split"]["passed"] and cosine["images"] == fp32["split"]["samples"] == 128  # the whole subset
    assert 0.99999 <= cosine["min"] <= cosine["p1"] <= cosine["median"] <= 1.0


def test_finished_stages_are_not_redone(trained_run):
    recipe, run_dir, _ = trained_run
    artifacts = {"distill": "student/model.safetensors", "eval": "eval/results.json", "export": "bundle/manifest.json"}
    before = {cmd: (run_dir / path).stat().st_mtime_ns for cmd, path in artifacts.items()}
    for cmd, path in artifacts.items():
        result = invoke(cmd, recipe)
        assert result.exit_code == 0 and "up to date" in result.output, cmd
        assert (run_dir / path).stat().st_mtime_ns == before[cmd], cmd


def test_eval_and_export_rerun_when_their_inputs_change_or_the_bundle_is_damaged(trained_run):
    recipe, run_dir, _ = trained_run
    result = invoke("eval", recipe, "-s", "eval.knn=[{k: 5, t: 0.07}]")
    assert result.exit_code == 0 and "up to date" not in result.output
    student = json.loads((run_dir / "eval" / "results.json").read_text())["student"]
    assert "knn_k5_t0.07" in student and "knn_k20_t0.07" not in student
    result = invoke("export", recipe)  # the bundle carries the results: new results, new bundle
    assert result.exit_code == 0 and "up to date" not in result.output
    assert "knn_k5_t0.07" in load_bundle(run_dir / "bundle").provenance["metrics"]["student"]
    golden = run_dir / "bundle" / "golden" / "outputs.npy"
    golden.write_bytes(golden.read_bytes()[:-8] + bytes(8))
    result = invoke("export", recipe)
    assert result.exit_code == 0 and "up to date" not in result.output
    assert load_bundle(run_dir / "bundle").verified


def test_export_fails_for_a_perturbed_model(trained_run, monkeypatch):
    from kt_edge.export import bundle

    recipe, run_dir, _ = trained_run
    original = bundle.export_fp32

    def perturbed_export(model, path, image_size, opset=17):
        original(model, path, image_size, opset)
        graph = onnx.load(str(path))
        weight = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.05, weight.name))
        onnx.save(graph, str(path))

    monkeypatch.setattr(bundle, "export_fp32", perturbed_export)
    result = invoke("export", recipe, "-s", "export.golden=5")  # new inputs: the bundle is built again
    assert result.exit_code == 1
    assert "model.fp32.onnx" in result.output and "worst sample" in result.output
    assert not load_bundle(run_dir / "bundle").verified


def test_signed_int8_export_for_onnxruntime_records_how_it_was_quantized(trained_run, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    recipe, run_dir, _ = trained_run
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = tmp_path / "edge.pem", tmp_path / "edge.pub.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    result = invoke(
        "export",
        recipe,
        "-s",
        "export.precisions=[fp32, int8]",
        "-s",
        "export.int8.target=onnxruntime",
        "-s",
        "export.int8.keep_float=[GlobalAveragePool]",
        "-s",
        f"export.sign_key={private}",
    )
    assert result.exit_code == 0, result.output
    bundle_dir = run_dir / "bundle"
    manifest = load_bundle(bundle_dir, public)  # signed by our key
    quantization = manifest.models["int8"].quantization
    assert quantization["target"] == "onnxruntime" and quantization["weight_bits"] == 7
    assert quantization["keep_float"] == ["GlobalAveragePool"] and len(quantization["float_nodes"]) == 1
    assert quantization["calibration"]["images"] > 0 and len(quantization["calibration"]["sha256"]) == 64
    assert not list(bundle_dir.glob("calibration*")) and "calibration.npy" not in manifest.files
    int8 = manifest.parity.results["int8"]
    assert int8["passed"] and int8["split"]["cosine"]["min"] >= 0.98
    result = invoke("export", recipe, "-s", "export.precisions=[fp32, int8]", "-s", "export.sign_key=missing.pem")
    assert result.exit_code != 0 and "export.sign_key: cannot read key missing.pem" in result.output


def test_int8_export_chooses_its_float_ops_on_held_out_train_images(trained_run):
    recipe, run_dir, _ = trained_run
    strict = ("export.precisions=[fp32, int8]", "export.min_cosine_int8=0.999999", "export.int8.choice_images=24")
    result = invoke("export", recipe, *[arg for s in strict for arg in ("-s", s)])
    assert result.exit_code == 1 and "model.int8.onnx" in result.output  # no rung keeps 0.999999: unverified
    quantization = load_bundle(run_dir / "bundle").models["int8"].quantization
    choice = quantization["choice"]
    assert [t["keep_float"] for t in choice["tries"]] == [[], ["stem"]]  # no depthwise conv: two rungs
    assert choice["images"] == 24 and choice["split"] == quantization["calibration"]["split"]
    assert quantization["keep_float"] == max(choice["tries"], key=lambda t: t["min_cosine"])["keep_float"]


def test_methods_lists_every_student_and_every_registered_method():
    from kt_edge.models.backbones import STUDENTS
    from kt_edge.teachers import TEACHERS
    from kt_edge.transfer import DISTILLERS

    result = invoke("methods")
    assert result.exit_code == 0
    assert f"distill.student: {', '.join(STUDENTS)}" in result.output and "mobilenet_v3_large" in result.output
    for section, registry in (("teacher", TEACHERS), ("distill", DISTILLERS)):
        assert all(f"{section}.method: {name}  (" in result.output for name in registry)


def test_stage_out_of_order_is_a_clear_error(tmp_path, tiny_recipe):
    recipe = tiny_recipe()
    result = invoke("distill", recipe)
    assert result.exit_code == 2
    assert "run `kt-edge train-teacher` first" in result.output


def test_run_skips_finished_stages_and_ends_with_both_tables(trained_run):
    recipe, run_dir, _ = trained_run
    result = invoke("run", recipe)  # eval and export run again: the tests above left other inputs behind
    assert result.exit_code == 0, result.output
    assert "teacher: up to date" in result.output and "student: up to date" in result.output
    assert "random-init" in result.output and "knn_k20_t0.07" in result.output
    assert "export parity" in result.output and "PASS" in result.output
    assert load_bundle(run_dir / "bundle").verified
    again = invoke("run", recipe)
    for stage in ("teacher", "student", "eval", "export"):
        assert f"{stage}: up to date" in again.output
    assert again.output.count("PASS") == result.output.count("PASS")


def test_a_killed_exports_temp_files_are_removed_by_the_next_export(trained_run):
    recipe, run_dir, _ = trained_run
    bundle = run_dir / "bundle"
    for done in (
        bundle / ".done",
        bundle / "manifest.json",
    ):  # a killed export: the stamp went first, then the manifest
        done.unlink()
    left = [bundle / ".model.fp32.onnx.k1ll3d.tmp", bundle / "golden" / ".inputs.npy.k1ll3d.tmp"]
    for path in left:
        path.write_bytes(b"half an export")
    result = invoke("export", recipe)
    assert result.exit_code == 0, result.output
    assert not [path for path in left if path.exists()]
    assert load_bundle(bundle).verified


def _imported_teacher(tmp_path, tiny_recipe):
    import torch

    from kt_edge.models.backbones import build_backbone

    weights = tmp_path / "teacher.pth"
    torch.save(build_backbone("alexnet", 32).state_dict(), weights)
    return tiny_recipe(teacher={"arch": "alexnet", "checkpoint": str(weights)}), weights


def test_a_failed_command_leaves_the_runs_recipe_as_it_was(tmp_path, tiny_recipe):
    import yaml

    recipe, _ = _imported_teacher(tmp_path, tiny_recipe)
    saved = tmp_path / "runs" / "tiny" / "recipe.yaml"
    assert invoke("train-teacher", recipe).exit_code == 0
    before = saved.read_text()
    typo = tmp_path / "data" / "tset"
    result = invoke("eval", recipe, "-s", f"data.test.path={typo}")
    assert result.exit_code == 2 and f"data folder not found: {typo}" in result.output
    assert saved.read_text() == before  # report and compare read the run's recipe: no typo there
    result = invoke("train-teacher", recipe, "-s", "export.golden=2")  # succeeds (up to date): recorded
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(saved.read_text())["export"]["golden"] == 2


def test_user_errors_are_plain_text(tmp_path, tiny_recipe):
    """Brackets in an error are text, never rich markup: a path with `[/...]`, a list of missing keys."""
    import torch

    from kt_edge.models.backbones import build_backbone

    odd = tmp_path / "[" / "x]" / "[bold]train"
    result = invoke("train-teacher", tiny_recipe(data={"train": {"path": str(odd)}}))
    assert result.exit_code == 2
    assert result.output == f"error: data folder not found: {odd}\n"

    state = build_backbone("alexnet", 32).state_dict()
    first = next(iter(state))
    state["body.extra"] = state.pop(first)
    weights = tmp_path / "teacher.pth"
    torch.save(state, weights)
    result = invoke("train-teacher", tiny_recipe(teacher={"arch": "alexnet", "checkpoint": str(weights)}))
    assert result.exit_code == 2
    assert f"missing [{first}]; unexpected [body.extra]" in result.output, result.output
