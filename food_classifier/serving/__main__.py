"""`python -m food_classifier.serving BUNDLE...`: the serve command without the main CLI."""

import typer

from food_classifier.serving.cli import serve

if __name__ == "__main__":
    typer.run(serve)
