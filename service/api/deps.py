"""Request-scoped access to the app's shared objects, and API-key checks (HTTP and WebSocket)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import HTTPException, Request
from starlette.requests import HTTPConnection

from service.config import Settings

API_KEY_HEADER = "X-API-Key"
API_KEY_QUERY = "api_key"


def key_is_valid(given: str | None, settings: Settings) -> bool:
    """True when ``given`` is one of the configured keys (constant-time comparison)."""
    if given is None:
        return False
    return any(hmac.compare_digest(given.encode(), key.encode()) for key in settings.api_key_values())


def presented_key(conn: HTTPConnection) -> str | None:
    """The key a request or WebSocket upgrade carries: header first, then ``?api_key=`` (browsers)."""
    return conn.headers.get(API_KEY_HEADER) or conn.query_params.get(API_KEY_QUERY)


def auth_required(settings: Settings) -> bool:
    return bool(settings.api_keys)


async def require_api_key(request: Request) -> None:
    """Dependency for HTTP routes: 401 unless no keys are configured or a valid key is presented."""
    settings: Settings = request.app.state.settings
    if auth_required(settings) and not key_is_valid(presented_key(request), settings):
        raise HTTPException(
            401,
            f"missing or invalid API key (send the {API_KEY_HEADER} header)",
            headers={"WWW-Authenticate": API_KEY_HEADER},
        )


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


@dataclass(frozen=True)
class ServingInfo:
    """How the loaded model is served (resolved once at startup from card and settings)."""

    window_steps: int
    hop_steps: int
    input_kinds: tuple[str, ...]
    mode: str = "window"  # "step": streams run the step model (app.state.step_scheduler)
