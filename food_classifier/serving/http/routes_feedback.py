"""`POST /v1/models/{name}/feedback`: the true label of an earlier prediction (the QA loop).

The answer says whether the prediction was right; `/metrics` then shows the live accuracy over the
latest predictions that got feedback (`food_classifier_live_accuracy`), and the prediction log, when
on, keeps the feedback beside the prediction for `food-classifier monitor`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from food_classifier.serving.http import schemas
from food_classifier.serving.observer import ServingMonitor
from food_classifier.serving.registry import ModelRegistry

router = APIRouter()


@router.post("/v1/models/{name}/feedback", tags=["monitoring"],
             responses=schemas.AUTH | schemas.errors({400: "Body is not parsable JSON",
                                                      404: "Unknown model, or no recent prediction with this "
                                                           "request_id / sha256",
                                                      422: "Unknown label, or not exactly one of request_id "
                                                           "and sha256",
                                                      503: "Models still loading"}),
             response_model_exclude_none=True)  # training_photo only when the server keeps photos and kept it
async def feedback(request: Request, name: str, body: schemas.FeedbackIn) -> schemas.FeedbackOut:
    """Record the true `label` of a prediction of this model, named by the `request_id` it answered
    with or by the `sha256` of the image (its latest prediction)."""
    reg: ModelRegistry = request.app.state.registry
    reg.get(name)  # 404 unknown model, 503 still loading
    request.state.model = name
    monitor: ServingMonitor = request.app.state.monitor
    return schemas.FeedbackOut.model_validate(monitor.feedback(name, body.label, getattr(body, "request_id", None),
                                                                getattr(body, "sha256", None)))
