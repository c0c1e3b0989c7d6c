"""Typed errors: an upload that cannot be scored (each mapped to one HTTP status), and an
artifact that cannot be served."""

from __future__ import annotations


class ImageRejected(Exception):
    """An upload that cannot be scored; `status` and `reason` tell the client why."""

    status = "400 Bad Request"
    reason = "undecodable"

    def __init__(self, description: str):
        super().__init__(description)
        self.description = description


class UndecodableImage(ImageRejected):
    status = "400 Bad Request"
    reason = "undecodable"


class UnsupportedImageType(ImageRejected):
    status = "415 Unsupported Media Type"
    reason = "unsupported_type"


class TooManyPixels(ImageRejected):
    status = "422 Unprocessable Entity"
    reason = "too_many_pixels"


class BodyTooLarge(ImageRejected):
    status = "413 Payload Too Large"
    reason = "too_large"


class EmptyBody(ImageRejected):
    status = "400 Bad Request"
    reason = "empty"


class ArtifactError(Exception):
    """The artifact folder cannot be served; the message says what is wrong in one line."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line, for one-line reasons in logs and errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
