"""Fixtures of the vLLM tests: the shared Ray (tests/rayfixture.py); modules that need vLLM skip without it."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayfixture import ray_session  # noqa: E402,F401
