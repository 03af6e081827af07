"""The output-capture registry is a dict: string keys and defaults work (DeepSpeed AutoEP relies on it), and the
model-keyed lookup transformers uses is unchanged."""

import unittest

from transformers import AutoModelForCausalLM
from transformers.utils.output_capturing import _CanRecordRegistry

from tests.fork_utils.tiny_models import tiny_config


class OutputCaptureRegistryTest(unittest.TestCase):
    def setUp(self):
        self.model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
        self.registry = _CanRecordRegistry()

    def test_model_keyed_lookup(self):
        self.assertEqual(self.registry.get(self.model), {})
        self.registry[self.model] = {"router_logits": "recorder"}
        self.assertEqual(self.registry.get(self.model), {"router_logits": "recorder"})
        self.assertEqual(list(self.registry), [str(self.model.__class__)])

    def test_dict_contract_with_string_keys_and_default(self):
        missing = object()
        key = str(self.model.__class__)
        self.assertIs(self.registry.get(key, missing), missing)
        self.registry[key] = {"router_logits": "recorder"}  # as DeepSpeed restores an entry
        self.assertEqual(self.registry.get(key, missing), {"router_logits": "recorder"})
        self.assertEqual(self.registry.get(self.model), {"router_logits": "recorder"}, "same entry, by model")
        self.registry[key] = None
        self.assertIsNone(self.registry.get(key, missing), "a stored None is a value, not a missing key")
        self.assertEqual(self.registry.get(self.model), {})
        self.registry.pop(key)
        self.assertIs(self.registry.get(self.model, missing), missing)
