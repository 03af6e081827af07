"""Upstream's common tests on a tiny Qwen3Moe, a model tester written for this fork's upstream-test gate.

utils/upstream_tests.py places it at `tests/models/qwen3_moe/test_modeling_qwen3_moe.py` of the
extracted upstream tests (the sdist does not ship upstream's model test modules), next to the mixins it imports
relatively.
"""

import unittest

from transformers import is_torch_available
from transformers.testing_utils import require_torch

from ...causal_lm_tester import CausalLMModelTest, CausalLMModelTester


if is_torch_available():
    from transformers import (
        Qwen3MoeConfig,
        Qwen3MoeModel,
        Qwen3MoeForCausalLM,
        Qwen3MoeForSequenceClassification,
        Qwen3MoeForTokenClassification,
    )


class Qwen3MoeModelTester(CausalLMModelTester):
    if is_torch_available():
        config_class = Qwen3MoeConfig
        base_model_class = Qwen3MoeModel
        causal_lm_class = Qwen3MoeForCausalLM
        sequence_classification_class = Qwen3MoeForSequenceClassification
        token_classification_class = Qwen3MoeForTokenClassification
    config_overrides = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


@require_torch
class Qwen3MoeModelTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = Qwen3MoeModelTester
