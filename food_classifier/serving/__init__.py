"""The HTTP prediction service (FastAPI + uvicorn over `inference.Classifier`; never imports torch).

Nothing is imported here, so `food_classifier.serving.cli` stays cheap to import. Entry points:
`food-classifier serve` (cli.serve), `python -m food_classifier.serving`, `app.create_app(settings)`.
"""
