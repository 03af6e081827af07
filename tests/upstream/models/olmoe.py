"""Upstream's common tests on a tiny Olmoe, a model tester written for this fork's upstream-test gate.

utils/upstream_tests.py places it at `tests/models/olmoe/test_modeling_olmoe.py` of the
extracted upstream tests (the sdist does not ship upstream's model test modules), next to the mixins it imports
relatively.
"""

import unittest

from transformers import is_torch_available
from transformers.testing_utils import require_torch

from ...causal_lm_tester import CausalLMModelTest, CausalLMModelTester


if is_torch_available():
    from transformers import OlmoeConfig, OlmoeModel, OlmoeForCausalLM


class OlmoeModelTester(CausalLMModelTester):
    if is_torch_available():
        config_class = OlmoeConfig
        base_model_class = OlmoeModel
        causal_lm_class = OlmoeForCausalLM
    config_overrides = dict(num_experts=4, num_experts_per_tok=2)


@require_torch
class OlmoeModelTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = OlmoeModelTester
