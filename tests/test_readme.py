from sample_kit import REPO


def _readme_command(after: str) -> str:
    readme = (REPO / "README.md").read_text()
    block = readme.split(after, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return block.strip()


def test_readme_opens_with_the_quick_start_and_the_test_command():
    assert _readme_command("Quick start").endswith("kt-edge run recipes/quickstart.yaml")
    assert _readme_command("Tests:").endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert _readme_command("Tests:") in ci_lines
