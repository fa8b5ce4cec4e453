"""The Dockerfile keeps its documented shape: base images as build args, a host and a torch-free runtime stage."""

from __future__ import annotations

import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with comments dropped and continuation lines joined."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    pairs = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def stages() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, rest in instructions():
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            current = name.strip()
            out[current] = [("FROM", image.strip())]
        elif current is not None:
            out[current].append((keyword, rest))
    return out


def test_base_images_are_build_args_with_defaults():
    args = dict(rest.split("=", 1) for keyword, rest in instructions() if keyword == "ARG" and "=" in rest)
    assert "pytorch" in args["BASE_IMAGE"]
    assert "l4t" in args["RUNTIME_BASE_IMAGE"]
    s = stages()
    assert s["host"][0] == ("FROM", "${BASE_IMAGE}")
    assert s["runtime"][0] == ("FROM", "${RUNTIME_BASE_IMAGE}")


def test_runtime_stage_installs_only_the_device_package():
    runtime = stages()["runtime"]
    copies = [rest for keyword, rest in runtime if keyword == "COPY"]
    assert copies == ["export/ export/"]
    installs = " ".join(rest for keyword, rest in runtime if keyword == "RUN")
    assert 'pip install "./export[jetpack${JETPACK}]"' in installs and "torch" not in installs
    assert ("ENTRYPOINT", '["kt-edge-runtime"]') in runtime


def test_runtime_stage_picks_the_cuda_bindings_of_jetpack_5_or_6():
    runtime = stages()["runtime"]
    assert ("ARG", "JETPACK=6") in runtime
    extras = (DOCKERFILE.parent / "export" / "pyproject.toml").read_text()
    assert "jetpack5 = [" in extras and "jetpack6 = [" in extras
    text = DOCKERFILE.read_text()
    assert "r35" in text and "JETPACK=5" in text  # JetPack 5's image and argument are documented


def test_host_stage_installs_both_packages_and_is_the_default_target():
    s = stages()
    assert list(s)[-1] == "host"  # `docker build .` without --target builds the host image
    host = s["host"]
    assert any(keyword == "RUN" and "pip install ./export ." in rest for keyword, rest in host)
    assert ("ENTRYPOINT", '["kt-edge"]') in host


def test_documented_build_commands_match_the_stages():
    text = DOCKERFILE.read_text()
    for name in stages():
        assert f"--target {name}" in text
