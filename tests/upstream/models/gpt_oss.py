"""Upstream's common tests on a tiny GptOss, a model tester written for this fork's upstream-test gate.

utils/upstream_tests.py places it at `tests/models/gpt_oss/test_modeling_gpt_oss.py` of the
extracted upstream tests (the sdist does not ship upstream's model test modules), next to the mixins it imports
relatively.
"""

import unittest

from transformers import is_torch_available
from transformers.testing_utils import require_torch

from ...causal_lm_tester import CausalLMModelTest, CausalLMModelTester


if is_torch_available():
    from transformers import (
        GptOssConfig,
        GptOssModel,
        GptOssForCausalLM,
        GptOssForSequenceClassification,
        GptOssForTokenClassification,
    )


class GptOssModelTester(CausalLMModelTester):
    if is_torch_available():
        config_class = GptOssConfig
        base_model_class = GptOssModel
        causal_lm_class = GptOssForCausalLM
        sequence_classification_class = GptOssForSequenceClassification
        token_classification_class = GptOssForTokenClassification
    config_overrides = dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4)


@require_torch
class GptOssModelTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = GptOssModelTester
