"""The serving half never imports torch or the trainer (the serving image has neither)."""

from __future__ import annotations

import json
import subprocess
import sys

from .helpers import REPO_ROOT

# Import every module under app/ in a fresh interpreter, then report which forbidden packages got loaded.
PROBE = """
import importlib, json, pkgutil, sys
import app
names = [m.name for m in pkgutil.walk_packages(app.__path__, prefix="app.")]
for name in names:
    importlib.import_module(name)
forbidden = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "trainer", "torchvision"})
print(json.dumps({"imported": names, "forbidden": forbidden}))
"""


def test_app_imports_neither_torch_nor_trainer() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "app.model_card" in report["imported"]
    assert len(report["imported"]) > 1
    assert report["forbidden"] == []
