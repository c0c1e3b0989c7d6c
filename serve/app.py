"""`serve.app:get_app()`, the WSGI entry point earlier releases documented for other servers
(gunicorn 'serve.app:get_app()'): kept so their configurations keep working. Start-up lives
in serve/process/startup.py."""

from .process.startup import get_app

__all__ = ["get_app"]
