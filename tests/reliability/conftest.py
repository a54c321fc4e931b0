"""Fixtures of the reliability tests: the module's shared Ray (tests/rayfixture.py),
started after a real S3 server where a module needs one."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayfixture import ray_session  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _no_load_outlives_its_test():
    """A test that failed before stopping its ``tierkit.Load`` must not leave it running into later tests."""
    yield
    from tierkit import stop_all

    hung = stop_all()
    assert hung == [], f"load threads still inside a call 30 s after their test: {hung}"


@pytest.fixture(scope="module")
def cluster(request):
    """An S3 server first, its credentials in the environment, then the module's Ray, whose worker
    processes (the tier's controller and shards) inherit them: credentials travel by environment only,
    never in a config. Yields {"s3": the server, "gcs": the Ray address}."""
    import ray

    from s3server import s3_server

    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    old = {k: os.environ.get(k) for k in keys}
    with s3_server() as s3:
        os.environ.update(s3.env())
        try:
            gcs = request.getfixturevalue("ray_session")

            @ray.remote(num_cpus=0)
            def env_of_a_worker():
                return os.environ.get("AWS_ACCESS_KEY_ID")

            if ray.get(env_of_a_worker.remote(), timeout=120) != s3.access_key:
                pytest.fail("Ray was already running without the S3 credentials: run this module on its own Ray")
            yield {"s3": s3, "gcs": gcs}
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
