"""Upstream's common tests on a tiny Mixtral, a model tester written for this fork's upstream-test gate.

utils/upstream_tests.py places it at `tests/models/mixtral/test_modeling_mixtral.py` of the
extracted upstream tests (the sdist does not ship upstream's model test modules), next to the mixins it imports
relatively.
"""

import unittest

from transformers import is_torch_available
from transformers.testing_utils import require_torch

from ...causal_lm_tester import CausalLMModelTest, CausalLMModelTester


if is_torch_available():
    from transformers import (
        MixtralConfig,
        MixtralModel,
        MixtralForCausalLM,
        MixtralForSequenceClassification,
        MixtralForTokenClassification,
    )


class MixtralModelTester(CausalLMModelTester):
    if is_torch_available():
        config_class = MixtralConfig
        base_model_class = MixtralModel
        causal_lm_class = MixtralForCausalLM
        sequence_classification_class = MixtralForSequenceClassification
        token_classification_class = MixtralForTokenClassification
    config_overrides = dict(num_local_experts=4, num_experts_per_tok=2)


@require_torch
class MixtralModelTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = MixtralModelTester
