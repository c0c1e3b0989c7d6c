"""Request bodies: an image encoded in memory, and a multipart/form-data form."""

import io


def encode(image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def multipart(fields: list[tuple[str, str, bytes, str]], boundary: str = "whatcarboundary") -> tuple[bytes, str]:
    """A multipart/form-data body from (name, filename, data, content type) parts."""
    out = io.BytesIO()
    for name, filename, data, content_type in fields:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"Content-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"
