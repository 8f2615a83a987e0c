"""Errors the service reports to clients, each with an HTTP status and a stable error code.

Logic modules raise `ServiceError`; the app turns every one of them (and FastAPI's own errors) into
`{"error": code, "detail": message}` so clients can branch on `error` without parsing prose.
"""

from __future__ import annotations

from PIL import Image

from food_classifier.preprocessing import ImageError, ImageTooLarge


class ServiceError(Exception):
    status = 400
    code = "bad_request"

    MAX_DETAIL = 2000  # characters: a message quoting a client's 9 MB value must not send it back

    def __init__(self, detail: str, *, status: int | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        if len(detail) > self.MAX_DETAIL:
            detail = f"{detail[:self.MAX_DETAIL]}... (message cut at {self.MAX_DETAIL:,} of {len(detail):,} characters)"
        super().__init__(detail)
        self.detail = detail
        self.status = status or self.status
        self.code = code or self.code
        self.headers = headers

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}


class BodyTooLarge(ServiceError):
    status, code = 413, "body_too_large"


class TooManyImages(ServiceError):
    status, code = 413, "too_many_images"


class ImageRejected(ServiceError):
    status, code = 415, "invalid_image"


class MissingImage(ServiceError):
    status, code = 422, "missing_image"


class InvalidInput(ServiceError):
    status, code = 422, "invalid_request"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class UnknownModel(ServiceError):
    status, code = 404, "unknown_model"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class ReloadFailed(ServiceError):
    status, code = 409, "reload_failed"


class AdminDisabled(ServiceError):
    status, code = 403, "admin_disabled"


class RequestTimeout(ServiceError):
    status, code = 408, "request_timeout"


class ClientDisconnected(ServiceError):
    """Nobody reads this answer; 499 (nginx's "client closed request") only labels the metrics and log."""

    status, code = 499, "client_disconnected"


class ShuttingDown(ServiceError):
    status, code = 503, "shutting_down"


def image_error(exc: BaseException) -> ServiceError:
    """Map a decode failure to a client error: bombs are 413, anything unreadable is 415."""
    if isinstance(exc, ImageTooLarge):
        return ServiceError(str(exc), status=413, code=ImageTooLarge.reason)
    if isinstance(exc, Image.DecompressionBombError):
        return ServiceError(str(exc), status=413, code=ImageTooLarge.reason)
    if isinstance(exc, ImageError):
        return ImageRejected(str(exc))
    return ImageRejected(f"not a readable image ({exc.__class__.__name__})")
