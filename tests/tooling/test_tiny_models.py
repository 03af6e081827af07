"""The tiny checkpoint factory: seeded, reloadable, in both key layouts (save_pretrained's per-expert layout, which
needs the conversion mapping, and the model's fused layout)."""

import tempfile
import unittest
from pathlib import Path

import torch
from parameterized import parameterized
from safetensors import safe_open

from tests.fork_utils.tiny_models import MOE_FAMILIES, make_checkpoint


class TinyModelsTest(unittest.TestCase):
    @parameterized.expand([(f, fused) for f in MOE_FAMILIES for fused in (False, True)] + [("llama", False)])
    def test_checkpoint_reloads_to_its_reference(self, family, fused):
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = make_checkpoint(family, Path(tmp) / "ckpt", seed=3, fused_layout=fused)
            keys = set()
            for file in ckpt.path.glob("*.safetensors"):
                with safe_open(file, framework="pt") as f:
                    keys |= set(f.keys())
            if family in MOE_FAMILIES:
                fused_keys = [k for k in keys if k.endswith("experts.gate_up_proj")]
                per_expert_keys = [k for k in keys if ".experts.0." in k]
                self.assertEqual(bool(fused_keys), fused)
                self.assertEqual(bool(per_expert_keys), not fused, "save_pretrained writes the per-expert layout")
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
