"""Shared test setup: CPU runs go through Triton's interpreter; hypothesis profiles."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

# "ci" keeps the interpreter-mode suite within a few minutes on 2 cores and draws
# the same examples every run (derandomized), so that whether a commit lands does
# not depend on the draw; "explore" draws fresh random examples, more of them: run
# it before a change is called done (HYPOTHESIS_PROFILE=explore). "gpu" draws more
# examples when a GPU runs the compiled kernels.
settings.register_profile(
    "ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile(
    "explore", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "gpu", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# "report": a few examples and no shrinking, to see a failure fast on a rented GPU.
settings.register_profile(
    "report", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate], report_multiple_bugs=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "ci"))
