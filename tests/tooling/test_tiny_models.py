"""The tiny checkpoint factory: seeded, reloadable, and its legacy layout needs (and gets) the conversion mapping."""

import tempfile
import unittest
from pathlib import Path

import torch
from parameterized import parameterized
from safetensors import safe_open

from tests.fork_utils.tiny_models import MOE_FAMILIES, make_checkpoint


class TinyModelsTest(unittest.TestCase):
    @parameterized.expand([(f, legacy) for f in MOE_FAMILIES for legacy in (False, True)] + [("llama", False)])
    def test_checkpoint_reloads_to_its_reference(self, family, legacy):
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = make_checkpoint(family, Path(tmp) / "ckpt", seed=3, legacy_layout=legacy)
            keys = set()
            for file in ckpt.path.glob("*.safetensors"):
                with safe_open(file, framework="pt") as f:
                    keys |= set(f.keys())
            if legacy:
                self.assertFalse([k for k in keys if k.endswith("gate_up_proj")], "legacy layout must not be fused")
                self.assertTrue([k for k in keys if ".experts.0." in k])
            model = AutoModelForCausalLM.from_pretrained(ckpt.path)
            loaded, reference = model.state_dict(), ckpt.reference_state_dict()
            self.assertEqual(set(loaded), set(reference))
            for key, tensor in reference.items():
                self.assertTrue(torch.equal(loaded[key], tensor), key)

    def test_seed_makes_it_reproducible(self):
        with tempfile.TemporaryDirectory() as tmp:
            a = make_checkpoint("qwen3_moe", Path(tmp) / "a", seed=1).reference_state_dict()
            b = make_checkpoint("qwen3_moe", Path(tmp) / "b", seed=1).reference_state_dict()
            c = make_checkpoint("qwen3_moe", Path(tmp) / "c", seed=2).reference_state_dict()
        self.assertTrue(all(torch.equal(a[k], b[k]) for k in a))
        self.assertFalse(all(torch.equal(a[k], c[k]) for k in a))
