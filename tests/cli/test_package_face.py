"""The package's public face: four names at its top, loaded on first use, and `python -m kwanzaa_adapter`."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kwanzaa_adapter
from kwanzaa_adapter.backend.models import create_model
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.safety.artifacts import verify_artifact
from kwanzaa_adapter.training.workflow import train_adapter


def test_the_top_names_are_the_layers_own_functions():
    from kwanzaa_adapter import create_model as top_create_model
    from kwanzaa_adapter import load_training_config as top_load
    from kwanzaa_adapter import train_adapter as top_train
    from kwanzaa_adapter import verify_artifact as top_verify

    assert (top_train, top_load, top_create_model, top_verify) == (
        train_adapter, load_training_config, create_model, verify_artifact)
    assert kwanzaa_adapter.__version__ == "0.1.0"


def test_an_unknown_top_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'train'"):
        kwanzaa_adapter.train  # noqa: B018


def test_importing_the_package_loads_no_layer():
    code = "import sys, kwanzaa_adapter; print(sorted(m for m in sys.modules if m.startswith('kwanzaa_adapter.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["kwanzaa_adapter", "kwanzaa_adapter.cli"])
def test_python_dash_m_runs_the_command(module):
    done = subprocess.run([sys.executable, "-m", module, "schema"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '"kwanzaa.answer.v1"' in done.stdout
