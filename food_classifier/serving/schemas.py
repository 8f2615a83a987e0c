"""Response shapes, for the OpenAPI docs at /docs (handlers return plain JSON for speed)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Error(BaseModel):
    error: str
    detail: str


class TopK(BaseModel):
    label: str
    probability: float


class Timing(BaseModel):
    total_ms: float
    preprocess_ms: float
    queue_ms: float
    inference_ms: float
    batch_size: int


class Prediction(BaseModel):
    label: str
    label_idx: int
    confidence: float
    top_k: list[TopK]
    abstained: bool
    model: str
    model_version: str
    cache: str  # hit-bytes, hit-pixels, miss or off
    timing: Timing


class BatchItem(BaseModel):
    index: int
    filename: str | None = None
    label: str | None = None
    label_idx: int | None = None
    confidence: float | None = None
    top_k: list[TopK] | None = None
    abstained: bool | None = None
    cache: str | None = None
    timing: Timing | None = None
    error: str | None = None
    detail: str | None = None
    status: int | None = None


class BatchPrediction(BaseModel):
    model: str
    model_version: str
    count: int
    failed: int
    results: list[BatchItem]
    timing: dict[str, float]


class SeedPrediction(BaseModel):
    label: str
    label_idx: int
    confidence: float


class ModelInfo(BaseModel):
    name: str
    version: str
    default: bool
    variant: str
    variants: list[str]
    labels: list[str]
    arch: str | None
    created_at: str | None
    metrics: dict[str, Any]
    preprocessing: dict[str, Any]
    temperature: float
    abstain_threshold: float | None
    loaded_at: str


class ModelList(BaseModel):
    default: str | None
    models: list[ModelInfo]


class Reloaded(BaseModel):
    model: str
    previous_version: str
    version: str
    variant: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": desc} for code, desc in {
        401: "API key missing or wrong", 404: "Unknown model", 413: "Body or image too large",
        415: "Not a readable image / unsupported content type", 422: "Missing image or invalid parameters",
        503: "Models still loading"}.items()}

IMAGE_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/webp": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "application/json": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "byte", "description": "base64 image"}}, "required": ["image"]}},
}}}

BATCH_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}, "required": ["files"]}},
    "application/json": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "byte"}}}, "required": ["images"]}},
}}}
