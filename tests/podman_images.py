"""podman for the container tests (there is no Docker engine or registry here), after ../shared/FACTS.md:

- `configure()`: CONTAINERS_CONF = tests/container/containers.conf rendered with its folder's path (runc,
  cgroupfs, ulimits the sandbox allows, the machine's CA bundle + pip.conf mounted into builds);
- `rootfs_image()`: images pulled elsewhere are stand-ins built from Debian packages here (mmdebstrap ->
  `podman import`), their rootfs tarballs cached in $FOOD_CLASSIFIER_CACHE/container;
- `build()`: each Containerfile target built once per session. Layers of earlier builds are removed,
  except those the newest build of any target used (their ids are kept in the cache folder), so
  test_container.py and test_compose.py do not throw away each other's build cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "container"
BASE = "docker.io/library/python:3.11-slim"
STAND_IN_LABEL = "org.food_classifier.stand_in"
CACHE = Path(os.environ.get("FOOD_CLASSIFIER_CACHE", Path.home() / ".cache" / "food_classifier")) / "container"
_env: dict[str, str] = {}
_built: dict[tuple[str, str], str] = {}


def configure(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for podman (and podman-compose) commands; skips the test without podman."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (.ci/run installs it: apt-get install podman buildah runc mmdebstrap)")
    if not _env:
        conf = tmp_path_factory.mktemp("podman") / "containers.conf"
        conf.write_text((HERE / "containers.conf").read_text().replace("@CONTAINER_DIR@", str(HERE)))
        _env.update({**os.environ, "CONTAINERS_CONF": str(conf)})
    return _env


def podman(env: dict, *args: str, timeout: float = 120, check: bool = True,
           input: str | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, input=input)
    if check and out.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def image_mb(env: dict, image: str) -> float:
    return int(podman(env, "image", "inspect", "--format", "{{.Size}}", image).stdout.strip()) / 1e6


def rootfs_image(env: dict, tag: str, tarball: str, include: str, *changes: str, hooks: tuple[str, ...] = ()) -> None:
    """`tag` as a Debian bookworm minbase + the `include` packages, unless podman has it already."""
    if podman(env, "image", "exists", tag, check=False).returncode == 0:
        return
    tar = CACHE / tarball
    if not tar.is_file():
        if shutil.which("mmdebstrap") is None:
            pytest.skip(f"no {tag} image and no mmdebstrap to build a stand-in")
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = tar.with_suffix(".tmp.tar")
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={include}", "--quiet",
             *[f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale")],
             *[f"--customize-hook={h}" for h in hooks],
             "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
             "bookworm", str(tmp)], check=True, timeout=900, capture_output=True)
        tmp.rename(tar)
    args = [a for c in (*changes, f"LABEL {STAND_IN_LABEL}=debian-bookworm") for a in ("--change", c)]
    podman(env, "import", *args, str(tar), tag, timeout=300)


def ensure_base(env: dict) -> None:
    """A stand-in python:3.11-slim: Debian's python3 + a venv first on PATH (so `python` and `pip` behave
    as in the official image); a standard `FROM python:3.11-slim` Containerfile then builds unchanged."""
    rootfs_image(env, BASE, "debian-bookworm-python3.tar", "python3,python3-venv",
                 "ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 'CMD ["python3"]', hooks=("chroot \"$1\" python3 -m venv /opt/python",))


def build(env: dict, target: str, tag: str) -> str:
    """`tag` built from the repo's Containerfile `target`, once per session (podman reuses its layers)."""
    if (target, tag) not in _built:
        ensure_base(env)
        t = time.monotonic()
        out = podman(env, "build", "--format", "docker", "--target", target, "-t", tag, "-f",
                     str(REPO / "Containerfile"), str(REPO), timeout=1200)
        print(f"\nbuild {target}: {time.monotonic() - t:.1f} s")
        keep_layers(env, target, out.stdout)
        _built[target, tag] = tag
    return tag


def keep_layers(env: dict, target: str, build_log: str) -> None:
    """Record the layers this build of `target` used; remove untagged images on the stand-in base that
    no target's newest build used (earlier builds' layers)."""
    used = {line.split()[-1][:11] for line in build_log.splitlines() if line.startswith("--> ")}  # 11 or 64 hex
    assert len(used) > 5, "no layer ids in the build output: refusing to guess what is stale"
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / f"layers-{target}.txt").write_text("\n".join(sorted(used)) + "\n")
    for other in CACHE.glob("layers-*.txt"):
        used |= set(other.read_text().split())
    listed = podman(env, "images", "-a", "--filter", f"label={STAND_IN_LABEL}", "--format",
                    "{{.ID}} {{.Repository}}").stdout.split("\n")
    stale = [line.split()[0] for line in listed if line.endswith(" <none>") and line[:11] not in used]
    for image in stale:  # newest first, so children go before their parents
        podman(env, "rmi", image, check=False)
