"""`food-classifier label DIR`: label the photos `serve --keep-photos DIR` kept, in a page on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import typer

from food_classifier.cli.common import fail

DEFAULT_PORT = 8384


def label(keep_dir: Path = typer.Argument(..., metavar="DIR", help="The kept-photos folder (serve --keep-photos)."),
          model: Path | None = typer.Option(None, "--model", help="Re-score the photos with this bundle or model "
                                                                  "dir (default: the answers kept with them)."),
          data: Path | None = typer.Option(None, "--data", help="Training folder the labels are written to, as "
                                                                "DATA/<class>/<sha256>.jpg (default: DIR/labelled, "
                                                                "where the server writes feedback labels)."),
          port: int = typer.Option(DEFAULT_PORT, "--port", min=0, max=65535, help="Port on 127.0.0.1.")) -> None:
    """Label kept photos in a page on 127.0.0.1.

    The photos most worth a label come first, one at a time; keys 1-9 choose a label, n not food, s skip,
    u undo. Every label is written at once."""
    from food_classifier.labeling.session import Session, SessionError, check_writable, lock_folder

    if not (keep_dir / "photos").is_dir():
        fail(f"{keep_dir} holds no kept photos ({keep_dir / 'photos'} is missing): start the server with "
             f"--keep-photos {keep_dir} first")
    data = data if data is not None else keep_dir / "labelled"
    try:
        check_writable(data)
        lock = lock_folder(keep_dir, data)
    except SessionError as exc:
        fail(str(exc))
    classifier = None
    if model is not None:
        from food_classifier.inference import Classifier

        classifier = Classifier(model)
    import socket

    import uvicorn

    from food_classifier.labeling.app import create_app

    with socket.socket() as probe:  # say it in one line now, not in uvicorn's words after start-up
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            fail(f"cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}): pass another --port")
    session = Session(keep_dir, data, classifier)
    for problem in session.problems:
        typer.secho(f"warning: {problem}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"{len(session.queue)} photo(s) to label of {session.total} kept; labels go to {data}")
    typer.echo(f"label page: http://127.0.0.1:{port}/  (Ctrl-C to stop)")
    try:
        uvicorn.run(create_app(session), host="127.0.0.1", port=port, log_level="warning")
    finally:
        import os

        os.close(lock)
