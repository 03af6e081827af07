"""Stand-in for upstream's `tests/generation/test_utils.py`, written for this fork's upstream-test gate.

utils/upstream_tests.py places it at `tests/generation/test_utils.py` of the extracted upstream tests, because
`tests/test_modeling_common.py` imports `GenerationTesterMixin` from there and the sdist does not ship it. Upstream's
generation tests are not part of the gate (the fork changes no generation code): this mixin only marks a test class
as one of a model that can `generate`, which `ModelTesterMixin.test_generation_tester_mixin_inheritance` checks.
"""


class GenerationTesterMixin:
    """Marker: the model class under test can generate. Carries no tests of its own."""
