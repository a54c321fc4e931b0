"""Fixtures of the Helm chart tests; the helpers are in helmkit.py."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helmkit import CHART  # noqa: E402


@pytest.fixture(scope="session")
def chart():
    """The chart, loaded once (helm-python-sdk: the Helm Go SDK through ctypes, offline)."""
    helm = pytest.importorskip("helm_python")
    with helm.Chart.load(CHART) as c:
        yield c
