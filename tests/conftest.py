"""Shared test setup.

The whole session runs with 8 simulated CPU devices so that sharding and
``shard_map`` tests (vocab-parallel losses, sharded inputs) run in the same process;
single-device tests are unaffected (they use device 0). The flag must be set before
jax initialises its backend, hence at import time of this conftest.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from jsoftmax import _compat  # noqa: E402

# tests/mutations.py: a deliberate defect at the public API, applied before any test module
# is imported (so module-level aliases such as `lce = jsm.linear_cross_entropy` see it).
MUTATION = os.environ.get("JSOFTMAX_MUTATION")
if MUTATION:
    import mutations  # noqa: E402

    mutations.apply(MUTATION)

# jit compilation dominates example time; deadlines would only measure compile noise.
settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("slow", max_examples=300, deadline=None, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (for float64 references and check_grads)."""
    with _compat.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_report_header(config):
    header = f"jax {jax.__version__}, devices: {jax.devices()}"
    return header + (f"\nMUTATED: {MUTATION}" if MUTATION else "")
