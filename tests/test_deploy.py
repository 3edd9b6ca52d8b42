"""The deploy kit's example config is valid as shipped (so copying it is a safe start)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_passes_check_config():
    env = {**os.environ, "FAXGW_UPSTREAM_PASSWORD": "example-secret-value"}
    result = subprocess.run([sys.executable, "-m", "gateway", "--config", str(ROOT / "deploy/faxgw.example.toml"),
                             "check-config"], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "example-secret-value" not in result.stdout + result.stderr
    assert '"fax.office.example"' in result.stdout  # the [addressing] override took effect
