"""Shadow mode (issue 23 item 4) through the real server: a second version answers sampled live photos in its
own thread; agreement and per-class disagreement move in /metrics, disagreements land in the kept photos."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import colour_image, image_bytes, make_colour_bundle
from prometheus_client.parser import text_string_to_metric_families

from food_classifier.bundle import BundleError
from food_classifier.serving.shadow import resolve
from food_classifier.testing import ServerProcess

SERVED = "20260101T000000-colour"
AGREES = "20251201T000000-agrees"  # older: the server serves SERVED, the shadow is named
DISAGREES = "20251101T000000-argmin"
BROKEN = "20251001T000000-broken"  # its graph refuses the crop its preprocessing makes: every shadow run fails


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Three versions of one model: the served one, one that agrees (same argmax, softer) and one that never
    agrees (negative weights: its best class is the least present colour)."""
    root = tmp_path_factory.mktemp("shadow") / "colour"
    make_colour_bundle(root / SERVED)
    make_colour_bundle(root / AGREES, version=AGREES, created_at="2025-12-01T00:00:00+00:00", scale=2.0)
    make_colour_bundle(root / DISAGREES, version=DISAGREES, created_at="2025-11-01T00:00:00+00:00", scale=-4.0)
    make_colour_bundle(root / BROKEN, version=BROKEN, created_at="2025-10-01T00:00:00+00:00")
    meta = json.loads((root / BROKEN / "bundle.json").read_text())
    meta["preprocessing"].update(crop=48, resize=54)  # the graph's input stays [N, 3, 32, 32]
    (root / BROKEN / "bundle.json").write_text(json.dumps(meta))
    return root


def scrape(c: httpx.Client) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(c.get("/metrics").text) for s in fam.samples
            if s.name.startswith("food_classifier_shadow")}


def value(m: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and labels.items() <= dict(ls).items())


def send(c: httpx.Client, colours: list[str]) -> list[dict]:
    out = []
    for i, name in enumerate(colours):
        r = c.post("/v1/models/colour/predict", content=image_bytes(colour_image(name, seed=500 + i)),
                   headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def wait_compared(c: httpx.Client, n: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = scrape(c)
        if value(m, "food_classifier_shadow_compared_total") >= n:
            return m
        time.sleep(0.1)
    raise AssertionError(f"shadow compared fewer than {n} photos: {scrape(c)}")


@pytest.mark.live
def test_agreement_moves_when_the_shadow_disagrees_and_disagreements_are_kept(model_dir, tmp_path):
    colours = ["red", "green", "blue", "red"]
    with ServerProcess([model_dir], args=["--shadow", AGREES, "--shadow-sample", "1", "--ort-threads", "1"]) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        answers = send(c, colours)
        assert [a["label"] for a in answers] == colours and {a["model_version"] for a in answers} == {SERVED}
        m = wait_compared(c, len(colours))
        assert value(m, "food_classifier_shadow_agreement", shadow_version=AGREES) == 1.0
        assert value(m, "food_classifier_shadow_compared_total", outcome="disagree") == 0

    kept = tmp_path / "kept"
    args = ["--shadow", DISAGREES, "--shadow-sample", "1", "--ort-threads", "1", "--keep-photos", str(kept),
            "--keep-sample", "0", "--keep-margin", "0"]
    with ServerProcess([model_dir], args=args) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        answers = send(c, colours)
        assert [a["label"] for a in answers] == colours  # the shadow never answers a client
        m = wait_compared(c, len(colours))
        assert value(m, "food_classifier_shadow_agreement", shadow_version=DISAGREES) == 0.0
        assert value(m, "food_classifier_shadow_compared_total", outcome="disagree") == len(colours)
        per_class = {c: value(m, "food_classifier_shadow_disagreements_total", served=c) for c in set(colours)}
        assert per_class == {"red": 2, "green": 1, "blue": 1}
        assert value(m, "food_classifier_shadow_disagreements_total", served="red", shadow="red") == 0
        deadline = time.monotonic() + 10
        while len(records := list((kept / "photos").glob("*.json"))) < len(colours) and time.monotonic() < deadline:
            time.sleep(0.1)
    saved = [json.loads(p.read_text()) for p in records]
    assert len(saved) == len(colours) and {r["why"] for r in saved} == {"shadow_disagrees"}
    assert {r["shadow"]["version"] for r in saved} == {DISAGREES}
    assert all(r["shadow"]["label"] != r["answer"]["label"] for r in saved)


@pytest.mark.live
def test_sampling_zero_compares_nothing(model_dir):
    args = ["--shadow", DISAGREES, "--shadow-sample", "0", "--ort-threads", "1"]
    with ServerProcess([model_dir], args=args) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        send(c, ["red", "blue"])
        time.sleep(0.3)
        assert value(scrape(c), "food_classifier_shadow_compared_total") == 0


@pytest.mark.live
def test_a_failing_shadow_never_fails_an_answer_and_is_counted(model_dir):
    args = ["--shadow", BROKEN, "--shadow-sample", "1", "--ort-threads", "1"]
    with ServerProcess([model_dir], args=args) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        answers = send(c, ["red", "green", "blue"])
        assert [a["label"] for a in answers] == ["red", "green", "blue"]
        deadline = time.monotonic() + 20
        while value(m := scrape(c), "food_classifier_shadow_errors_total") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert value(m, "food_classifier_shadow_errors_total") == 3
        assert value(m, "food_classifier_shadow_compared_total") == 0


def test_an_unknown_shadow_version_is_a_clear_error(model_dir):
    assert resolve(DISAGREES, [model_dir]) == model_dir / DISAGREES
    with pytest.raises(BundleError, match="--shadow nope: no such version in .* models list"):
        resolve("nope", [model_dir])


@pytest.mark.live
def test_a_shadow_promoted_and_reloaded_is_not_compared_with_itself(model_dir, tmp_path):
    import shutil
    import signal

    from food_classifier.bundle import set_promoted

    root = tmp_path / "colour"
    shutil.copytree(model_dir, root)
    args = ["--shadow", AGREES, "--shadow-sample", "1", "--ort-threads", "1"]
    with ServerProcess([root], args=args) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        send(c, ["red", "green"])
        wait_compared(c, 2)
        set_promoted(root, AGREES)  # what `models promote colour AGREES` writes
        srv.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while c.get("/v1/models/colour").json()["version"] != AGREES and time.monotonic() < deadline:
            time.sleep(0.2)
        answers = send(c, ["blue", "red", "green"])
        assert {a["model_version"] for a in answers} == {AGREES}
        deadline = time.monotonic() + 10
        while value(m := scrape(c), "food_classifier_shadow_served_total") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert value(m, "food_classifier_shadow_served_total") == 3
        assert value(m, "food_classifier_shadow_compared_total") == 2  # only the photos before the promotion
