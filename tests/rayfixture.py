"""One real local Ray per test module, shared by every Ray test of the module.

``ray.init`` costs 3-6 s here (and more when the machine is busy), so every
test that needs Ray uses the fixture ``ray_session`` instead of its own
cluster. It is module-scoped, not session-scoped, because some modules
(tests/ray_apps) start and stop a Ray of their own, which must not find one
already running. Use it from a package's conftest::

    from rayfixture import ray_session  # noqa: F401  (tests/ is on sys.path, see below)

The fixture yields the cluster's GCS address, which subprocesses pass to
``kvtier.init(address=...)`` to join the same cluster. Tests that need a
cluster of their own (multi-node ``ray.cluster_utils.Cluster``, the embedded
tier) run it in a subprocess so they never fight this one.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)


def subprocess_env() -> dict[str, str]:
    """Environment for a subprocess that imports kvtier and the tests' helpers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO_DIR, TESTS_DIR, env.get("PYTHONPATH", "")])
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


@pytest.fixture(scope="module")
def ray_session():
    import ray

    if ray.is_initialized():  # a caller's own Ray is up: share it, leave it running
        yield ray.get_runtime_context().gcs_address
        return
    # a short path: Ray's unix sockets live under it and must stay under 107 characters
    tmp = tempfile.mkdtemp(prefix="kvtray", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        from kvtier.runtime import api

        # a test that failed before its kvtier.shutdown() left a client: its threads must stop before Ray
        # does (one inside a Ray call at ray.shutdown() is the suspected cause of CI's silent exit 1)
        api.shutdown(stop=False)
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
