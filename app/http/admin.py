"""The admin surface: `POST /models/{name}/reload` and the V2 repository extension (`/v2/repository/...`).

Off by default. `MODELSERVE_ADMIN_API_KEY` turns it on, and then only `Authorization: Bearer <admin key>`
opens it: the API key does not (the general API-key check skips these paths, see `guarded_by_admin_key`),
and the admin key opens no other route unless both keys are equal. `MODELSERVE_ENABLE_REPOSITORY_API`
turns it on without an admin key; the API key, if set, then guards it like any other route.

Admin handlers call `require_admin` first; `ADMIN_KEY` documents the scheme in OpenAPI and reads the header.
"""

from __future__ import annotations

import hmac
import re
from typing import Final

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import FeatureDisabled, Unauthorized
from app.settings import Settings

ADMIN_DISABLED: Final = (
    "the admin routes (model reload, the model repository extension: index, load, unload) are disabled; "
    "set MODELSERVE_ADMIN_API_KEY to enable them (or MODELSERVE_ENABLE_REPOSITORY_API=true without a key)"
)
ADMIN_KEY: Final = HTTPBearer(
    scheme_name="adminKey",
    description="MODELSERVE_ADMIN_API_KEY, when set (the API key does not open the admin routes)",
    auto_error=False,
)
_ADMIN_PATH: Final = re.compile(r"^/v2/repository/|^/models/[^/]+/reload$")


def is_admin_path(path: str) -> bool:
    """Whether `path` is an admin route: `/models/{name}/reload` or under `/v2/repository/`."""
    return _ADMIN_PATH.match(path) is not None


def guarded_by_admin_key(settings: Settings, path: str) -> bool:
    """Whether the admin key, not the API key, guards `path`: an admin key is set and `path` is an admin
    route. The general API-key check skips exactly these paths (`require_admin` checks them)."""
    return bool(_admin_key(settings)) and is_admin_path(path)


def admin_enabled(settings: Settings) -> bool:
    """Whether the admin routes answer (an admin key is set, or the repository API is enabled)."""
    return bool(_admin_key(settings)) or settings.enable_repository_api


def require_admin(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> None:
    """Let an admin request through, or raise.

    Args:
        settings: the service settings.
        credentials: the request's bearer credentials, as `ADMIN_KEY` reads them (None: none sent).

    Raises:
        FeatureDisabled: the admin routes are off (403).
        Unauthorized: an admin key is set and the request does not carry it (401).
    """
    if not admin_enabled(settings):
        raise FeatureDisabled(ADMIN_DISABLED)
    key = _admin_key(settings)
    presented = credentials.credentials if credentials is not None else ""
    if key and not hmac.compare_digest(presented.encode(), key.encode()):
        raise Unauthorized("missing or wrong admin key; send Authorization: Bearer <admin key>")


def _admin_key(settings: Settings) -> str:
    return settings.admin_api_key.get_secret_value() if settings.admin_api_key else ""
