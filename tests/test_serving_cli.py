"""`serve`'s flags are built from ServeSettings: one declaration gives flag, help, default and env var."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import typer
from fastapi.testclient import TestClient
from helpers import ROOT, invoke_serve
from pydantic import Field
from typer.testing import CliRunner

from food_classifier.cli.serve import command_for
from food_classifier.serving.settings import ServeSettings


def serve_help(columns: int = 80) -> str:
    out = subprocess.run([sys.executable, "-m", "food_classifier.cli", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": str(columns)})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_every_setting_is_a_flag_with_its_env_var_and_default():
    text = serve_help()
    flat = " ".join(text.split())  # undo the wrapping: what a reader sees, word by word
    assert all(len(line) <= 80 for line in text.splitlines())
    for name, field in ServeSettings.model_fields.items():
        env = f"FOOD_CLASSIFIER_{name.upper()}"
        assert re.search(rf"\b{env}\b", text), env  # never split across lines
        if name != "bundles":
            flag = "--" + name.replace("_", "-")
            assert re.search(rf"(^|\s){flag}\b", text, re.M), flag
        assert " ".join(field.description.split()) in flat, name
    assert "-p, --port INT" in text and "--warmup / --no-warmup" in text
    assert "default: 8383]" in flat and "default: 10485760 = 10 MiB]" in flat and "default: 0.0.0.0]" in flat
    assert "--log-level critical|error|warning|info|debug" in text


def test_a_new_settings_field_becomes_a_flag(monkeypatch):
    """What the cache settings will do: add a field, get `--cache-bytes` with no other edit."""

    class WithCache(ServeSettings):
        cache_bytes: int = Field(64 * 1024 * 1024, ge=0, description="Prediction cache size.")
        cache_url: str | None = Field(None, description="Redis URL of a shared cache.")

    seen = []
    app = typer.Typer(rich_markup_mode=None)
    app.command()(command_for(WithCache, seen.append, "Serve with a cache."))
    runner = CliRunner()

    help_text = " ".join(runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output.split())
    assert ("--cache-bytes INT Prediction cache size. [env var: FOOD_CLASSIFIER_CACHE_BYTES; "
            "default: 67108864 = 64 MiB]") in help_text
    assert "--cache-url TEXT Redis URL of a shared cache. [env var: FOOD_CLASSIFIER_CACHE_URL]" in help_text

    monkeypatch.setenv("FOOD_CLASSIFIER_CACHE_BYTES", "1000")
    monkeypatch.setenv("FOOD_CLASSIFIER_CACHE_URL", "redis://127.0.0.1:1/0")
    assert runner.invoke(app, ["--cache-bytes", "5", "--port", "9001"]).exit_code == 0
    assert runner.invoke(app, []).exit_code == 0
    flag, env = seen
    assert (flag.cache_bytes, flag.cache_url, flag.port) == (5, "redis://127.0.0.1:1/0", 9001)  # flag > env
    assert (env.cache_bytes, env.port) == (1000, 8383)  # env > default
    monkeypatch.delenv("FOOD_CLASSIFIER_CACHE_BYTES")
    assert runner.invoke(app, []).exit_code == 0 and seen[-1].cache_bytes == 64 * 1024 * 1024

    bad = runner.invoke(app, ["--cache-bytes", "-1"])
    assert bad.exit_code == 2 and "invalid setting cache_bytes: Input should be greater than or equal to 0" in (
        bad.stderr)


def test_flags_win_over_env_and_env_over_defaults(monkeypatch, colour_bundle):
    """Through the real `serve` command (uvicorn.run captured): what the app and the middleware get."""
    for name, value in {"TOP_K": "7", "PORT": "9100", "MAX_BODY_BYTES": "5000", "VARIANT": "fp32,colour=fp32",
                        "WARMUP": "false", "LOG_LEVEL": "WARNING"}.items():
        monkeypatch.setenv(f"FOOD_CLASSIFIER_{name}", value)
    result, started = invoke_serve(monkeypatch, None, str(colour_bundle), "--port", "9200", "--max-body-bytes",
                                   "4096", "--warmup", "--access-log", "--variant", "int8")
    assert result.exit_code == 0, result.output
    s = started["app"].state.settings
    assert (s.port, s.max_body_bytes, s.variant, s.warmup) == (9200, 4096, ["int8"], True)  # flags
    assert (s.top_k, s.log_level) == (7, "warning")  # environment
    assert (s.host, s.ort_threads, s.batch_max_size) == ("0.0.0.0", 1, 1)  # defaults
    assert (started["port"], started["log_level"], started["access_log"]) == (9200, "warning", True)
    with TestClient(started["app"]) as client:  # the middleware enforces the flag's body limit
        r = client.post("/predict", content=b"x" * 5000, headers={"content-type": "image/jpeg"})
    assert r.status_code == 413 and r.json()["detail"] == "request body is 5000 bytes, limit is 4096"


@pytest.mark.parametrize("args, message", [
    (["--log-level", "loud"], "invalid setting log_level: Input should be 'critical', 'error'"),
    (["--batch-max-size", "0"], "invalid setting batch_max_size: Input should be greater than or equal to 1"),
])
def test_bad_settings_are_one_line(monkeypatch, colour_bundle, args, message):
    result, started = invoke_serve(monkeypatch, None, str(colour_bundle), *args)
    assert result.exit_code == 2 and not started
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
