"""Every `docker build` / `podman build` of the repo (context `.`) that the README, docs/, the Containerfile
and compose.yaml show finds its build file and target when run from the repo root, by each tool's own rule: Docker reads
`Dockerfile` unless given `-f`; Podman reads `Containerfile`, else `Dockerfile`. (The repo's file is
`Containerfile`: the README's `docker build --target serve -t food-classifier .` found nothing.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "Containerfile", ROOT / "compose.yaml"]
DEFAULT_FILES = {"docker": ["Dockerfile"], "podman": ["Containerfile", "Dockerfile"]}
VALUE_OPTIONS = {"-f", "--file", "-t", "--tag", "--target", "--build-arg", "--format", "--platform"}


def documented_builds() -> list[tuple[str, list[str]]]:
    found = []
    for source in SOURCES:
        for m in re.finditer(r"\b(docker|podman) build [^`#\n]*", source.read_text()):
            argv = shlex.split(m.group(0))
            if argv[-1] == ".":  # the repo's images (not e.g. DEPLOY.md's stand-in for a pulled image)
                found.append((f"{source.relative_to(ROOT)}: {m.group(0).strip()}", argv))
    return found


def resolve(argv: list[str]) -> tuple[Path | None, str | None]:
    """(the build file the tool would read, the --target) for a `TOOL build ...` command run in ROOT."""
    tool, options, positional = argv[0], {}, []
    args = iter(argv[2:])
    for arg in args:
        name, _, value = arg.partition("=")
        if name in VALUE_OPTIONS:
            options[name] = value or next(args)
        elif not arg.startswith("-"):
            positional.append(arg)
    assert len(positional) == 1, f"expected one build context, got {positional}"
    context = ROOT / positional[0]
    given = options.get("-f") or options.get("--file")
    candidates = [context / given] if given else [context / name for name in DEFAULT_FILES[tool]]
    return next((c for c in candidates if c.is_file()), None), options.get("--target")


def test_every_documented_build_command_finds_its_file_and_target():
    builds = documented_builds()
    tools = {argv[0] for _, argv in builds}
    assert len(builds) >= 6 and tools == {"docker", "podman"}, builds
    for where, argv in builds:
        file, target = resolve(argv)
        assert file is not None, f"{where}: {argv[0]} finds no build file"
        stages = re.findall(r"^FROM \S+ AS (\S+)$", file.read_text(), re.M)
        assert target in stages, f"{where}: no stage {target!r} in {file.name} ({stages})"
