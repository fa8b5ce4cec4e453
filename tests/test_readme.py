from sample_kit import REPO


def test_ci_runs_the_readme_commands_that_exist():
    readme = (REPO / "README.md").read_text()
    assert "kt-edge run recipes/quickstart.yaml" in readme.split("Tests:")[0]
    assert 'python -m pytest' in readme.split("Tests:")[1].split("```")[1]
    assert "README.md" in (REPO / ".ci" / "run").read_text()
