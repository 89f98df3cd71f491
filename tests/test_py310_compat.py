"""Python 3.10 has no ``tomllib``: the config reader falls back to the ``tomli`` package
(issue 21, item 1). Checked on any Python by blocking ``tomllib`` in a child process."""
from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import sys
sys.modules["tomllib"] = None  # as on Python 3.10: `import tomllib` raises ModuleNotFoundError
from leantune.train.config import load_config
import leantune.train.config as config
cfg = load_config(sys.argv[1], ["train.lr=0.001"])
print(config.tomllib.__name__, cfg.train.seed, cfg.train.lr, cfg.adapter.r)
"""


def test_config_loads_with_tomli_when_tomllib_is_missing(tmp_path):
    pytest.importorskip("tomli")
    path = tmp_path / "run.toml"
    path.write_text('[train]\nseed = 7\n\n[adapter]\nr = 4\n', encoding="utf-8")
    res = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["tomli", "7", "0.001", "4"]
