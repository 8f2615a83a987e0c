"""A bounded schemathesis run against the real server: its /openapi.json must match what it does.

Every phase (examples, coverage, fuzzing, stateful) and every check (server errors, status codes,
content types, response schemas, positive and negative data, unsupported methods and their Allow
header...), a few examples per operation so `make test` stays around a minute. One deliberate
allowance: on the image operations a 415 answers schema-valid bytes that are not a decodable image.
That an upload is an image cannot be written in JSON Schema; the 415 is documented on each of them.
Likewise feedback answers 422 `unknown_label` to a label the model does not have (the labels are each
model's own, not the schema's), and the Open Inference Protocol's infer answers 400 to a tensor whose
data does not fit its shape and datatype (the protocol's own error; JSON Schema cannot relate them).
FC_SCHEMATHESIS_EXAMPLES=200 runs deeper. The run reports its seed; `schemathesis run URL --seed N`
with this config replays it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import colour_image, image_bytes, make_colour_bundle

from food_classifier.testing import ServerProcess

pytestmark = pytest.mark.live
ADMIN = "schemathesis-admin-key"
EXAMPLES = int(os.environ.get("FC_SCHEMATHESIS_EXAMPLES", "12"))  # raise it for a deeper run
CONFIG = """
[generation]
max-examples = {examples}

[checks]
enabled = true

[[operations]]
include-tag = "predict"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "415", "429", "5xx"]

[[operations]]
include-path-regex = "^/v2/models/.*/infer$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "415", "429",
                                                    "5xx"]

[[operations]]
include-path = "/v1/models/{{name}}/feedback"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
"""


def test_schemathesis_reports_no_failures(tmp_path):
    make_colour_bundle(tmp_path / "models" / "colour" / "v1", version="v1")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "pie.jpg").write_bytes(image_bytes(colour_image("green")))
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG.format(examples=EXAMPLES))
    log = tmp_path / "server.log"
    args = ["--allow-path-root", str(tmp_path / "photos"), "--max-body-bytes", "200000", "--ort-threads", "1"]
    with ServerProcess([tmp_path / "models" / "colour"], args=args, env={"FOOD_CLASSIFIER_ADMIN_KEY": ADMIN},
                       log_path=log) as srv:
        cli = Path(sys.executable).with_name("schemathesis")
        run = subprocess.run([str(cli), "--no-color", "--config-file", str(config), "run", srv.url + "/openapi.json",
                              "--header", f"X-API-Key: {ADMIN}", "--workers", "1", "--request-timeout", "20"],
                             capture_output=True, text=True, timeout=240, cwd=tmp_path)
    summary = run.stdout[-30000:]
    assert run.returncode == 0, summary
    assert "Tested: 11" in summary or "Tested:" in summary, summary
    assert " passed" in summary and "failure" not in summary.split("SUMMARY")[-1].lower(), summary
    server_log = log.read_text()
    assert "Traceback" not in server_log, server_log[-3000:]
