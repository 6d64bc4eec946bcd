"""Schemathesis over every operation of the OpenAPI document, against the app in process.

Every check schemathesis has (server errors, status codes, content types, response schemas and headers,
schema-valid data accepted, schema-invalid data refused, unsupported methods, ignored auth, ...) runs on
every operation, the admin ones with the admin key, on a fresh app with the fixture models loaded.
Generation is bounded and derandomized: the same cases on every run, in well under a minute.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.http.admin import is_admin_path
from app.main import create_app
from app.settings import Settings

ADMIN_KEY = "schemathesis-admin-key"
# Bodies whose validity depends on the model they name: rows must match its input shape and dtype, which a
# schema cannot say. Schemathesis generates schema-valid rows of any shape that the server rightly refuses
# (400), so these operations skip `positive_data_acceptance`; every other check still runs on them.
MODEL_SHAPED_BODIES = frozenset(
    {"/predict", "/evaluate", "/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"}
)

# `/evaluate` uploads: NDJSON is text, NPZ raw bytes.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")
schemathesis.serializer.alias("application/x-npz", "application/octet-stream")


STATE_DIR = tempfile.mkdtemp(prefix="modelserve-schemathesis-")


def _settings(model_repository: Path | str) -> Settings:
    return Settings(
        model_repository=model_repository, access_log=False, admin_api_key=ADMIN_KEY, state_dir=STATE_DIR
    )


# The document does not depend on the models, so it is read at import from an app whose lifespan never runs
# (schemathesis's fixture-based loader does not work with pytest 9).
schema = schemathesis.openapi.from_dict(create_app(_settings("/nonexistent")).openapi())


@pytest.fixture
def served_app(model_repository: Path) -> Any:
    """A fresh app per operation (admin operations unload models): schemathesis runs its lifespan when it
    sends the first request, and ends it with the test."""
    return create_app(_settings(model_repository))


@schema.parametrize()
@settings(max_examples=20, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_api(case: Any, served_app: Any) -> None:
    # Both are read: the request goes to the operation's app, the checks' own probes to the schema's.
    case.operation.schema.app = case.operation.app = served_app
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"} if is_admin_path(case.operation.path) else None
    excluded = [positive_data_acceptance] if case.operation.path in MODEL_SHAPED_BODIES else []
    case.call_and_validate(headers=headers, checks=CHECKS.get_all(), excluded_checks=excluded)
