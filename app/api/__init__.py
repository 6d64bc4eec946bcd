"""HTTP routes of the simple API: `/predict` (raw ASGI), `/models`, health, `/metrics`."""
