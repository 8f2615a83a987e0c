"""`python -m food_classifier.serving BUNDLE...`: the serve command without the main CLI."""

from food_classifier.serving.cli import serve_command

if __name__ == "__main__":
    serve_command()(prog_name="python -m food_classifier.serving")
