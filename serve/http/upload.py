"""Where a request's image bytes are read: raw bodies and multipart uploads, within the size limit."""

from __future__ import annotations

import falcon

from ..model.decode import ACCEPTED_MEDIA_TYPES
from ..model.errors import BodyTooLarge, EmptyBody, UnsupportedImageType

# Raw bodies may also be untyped or generic bytes: the decoder, not the header, decides.
RAW_TYPES = frozenset(ACCEPTED_MEDIA_TYPES) | {"application/octet-stream", ""}


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The request body, refusing anything over `limit` bytes without reading it all."""
    if req.content_length is not None and req.content_length > limit:
        raise BodyTooLarge(f"body is {req.content_length} bytes; the limit is {limit}")
    data = req.bounded_stream.read(limit + 1)
    if len(data) > limit:
        raise BodyTooLarge(f"body is over the limit of {limit} bytes")
    return data


def read_upload(req: falcon.Request, limit: int) -> bytes:
    """Image bytes from a raw body or from the multipart field `file`."""
    media_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        if not req.content_length:
            # Falcon's form parser asserts on a missing length; Waitress sets one for every body it passes on.
            raise EmptyBody("the multipart body is empty; send the image as the field 'file'")
        if req.content_length > limit:
            raise BodyTooLarge(f"body is {req.content_length} bytes; the limit is {limit}")
        files = []
        for part in req.get_media():
            try:
                name = part.name
            except UnicodeDecodeError:
                # Falcon decodes part headers as UTF-8 and lets the error escape as a 500.
                raise falcon.MultipartParseError(description="a part's headers are not valid UTF-8") from None
            if name == "file":
                files.append(part.stream.read(limit + 1))
                if len(files[-1]) > limit:
                    raise BodyTooLarge(f"file is over the limit of {limit} bytes")
            else:
                part.stream.read()  # drain fields we do not use
        if len(files) != 1:
            raise falcon.HTTPBadRequest(
                title="Bad Request", code="multipart_file",
                description=f"multipart upload needs exactly one field named 'file' (got {len(files)})")
        return files[0]
    if media_type not in RAW_TYPES:
        raise UnsupportedImageType(
            f"Content-Type {media_type!r} is not accepted; send the image as {', '.join(ACCEPTED_MEDIA_TYPES)} "
            "or application/octet-stream, or as multipart/form-data field 'file'")
    return read_body(req, limit)
