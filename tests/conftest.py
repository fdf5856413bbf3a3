"""Shared test set-up: one CPU thread (two stall on the CI box), one Inductor cache per run, small
hypothesis profiles in CI."""

import os
import tempfile

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fxcache-inductor-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(1)
torch.set_grad_enabled(False)

settings.register_profile("ci", max_examples=6, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with no compiled code and zeroed dynamo counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
