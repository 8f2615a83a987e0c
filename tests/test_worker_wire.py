"""The stream worker's message format and CLI checks: no broker, so these run in the fast tier
(tests/test_worker.py runs the worker against a real broker)."""

from __future__ import annotations

import base64
import json

import pytest
from typer.testing import CliRunner

from food_classifier.serving.stream.worker import WireError, parse_value


def test_wire_format_and_cli_errors():
    assert parse_value(b"\xff\xd8abc", 100) == (None, b"\xff\xd8abc")
    assert parse_value(json.dumps({"id": 7, "image_b64": base64.b64encode(b"xy").decode()}).encode(), 100) == (7, b"xy")
    assert parse_value(b'{"id": "a", "image_b64": "eHk="}', 100) == ("a", b"xy")
    assert parse_value(b'{"id": 1.5, "image_b64": "eHk="}', 100) == (1.5, b"xy")
    for value, code in [(b"", "missing_image"), (b"x" * 101, "body_too_large"), (b"{nope", "invalid_json"),
                        (b'{"id": 1}', "missing_image"), (b'{"image_b64": "%%"}', "invalid_base64"),
                        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "invalid_json"),  # was a RecursionError
                        (b'{"id": NaN, "image_b64": "eHk="}', "invalid_json"),  # was bare NaN in the result
                        (b'{"id": -Infinity, "image_b64": "eHk="}', "invalid_json"),
                        (b'{"id": 1e400, "image_b64": "eHk="}', "invalid_id"),  # parses as inf
                        (b'{"id": ' + b"7" * 5000 + b', "image_b64": "eHk="}', "invalid_json"),  # was a ValueError
                        (b'{"id": 18446744073709551616, "image_b64": "eHk="}', "invalid_id"),
                        (b'{"id": [1], "image_b64": "eHk="}', "invalid_id"),
                        (json.dumps({"id": "x" * 257, "image_b64": "eHk="}).encode(), "invalid_id")]:
        with pytest.raises(WireError) as e:
            parse_value(value, 100 if code == "body_too_large" else 100_000)
        assert e.value.code == code
    from food_classifier.cli import app

    r = CliRunner().invoke(app, ["worker", "--in-topic", "x"])
    assert r.exit_code == 2 and "give one of --kafka" in r.output
    r = CliRunner().invoke(app, ["worker", "--kafka", "127.0.0.1:1", "--kafka-config", "nokey"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
