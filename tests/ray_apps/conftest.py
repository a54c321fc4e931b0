"""Fixtures of the ray_apps tests: the session's shared Ray (tests/rayfixture.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayfixture import ray_session  # noqa: E402,F401
