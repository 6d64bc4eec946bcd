"""Container health check: exit 0 when the server answers 200 on `/v2/health/ready`.

Standard library only (the image has no curl), and no import of `app`, so it costs a few milliseconds.
Health endpoints need no API key. Used by the Dockerfile's `HEALTHCHECK`; Kubernetes probes the same
path over HTTP instead.
"""

from __future__ import annotations

import os
import sys
import urllib.request

READY_PATH = "/v2/health/ready"


def main() -> int:
    """Probe the server inside this container; 0 = ready, 1 = not ready or not answering."""
    port = os.environ.get("MODELSERVE_PORT", "8000")
    url = f"http://127.0.0.1:{port}{READY_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (OSError, ValueError):  # refused, timed out, HTTP 503 (HTTPError is an OSError)
        return 1


if __name__ == "__main__":
    sys.exit(main())
