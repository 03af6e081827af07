"""A DeepSpeed ZeRO-3 checkpoint exported offline to a Hugging Face checkpoint (`deepspeed_expert_parallel_export`).

Two ranks train a tiny MoE 3 AdamW steps and save a ZeRO checkpoint: Qwen3-MoE with EP 2 through the Trainer (its
`checkpoint-3` holds `config.json`), Mixtral with EP 2 through `engine.save_checkpoint` (no config in the folder: the
export is given the model's), and Qwen3-MoE without EP (plain ZeRO-3, the twin). In this one process, without the
training topology, the export must write what `save_pretrained` of the trained model writes: `from_pretrained` of it
gives the weights the ranks ended with (bit for bit in fp32; their bf16 cast with `--dtype bf16`) and is at parity
with one process trained on the same batches; its keys and shapes are those of the checkpoint the run started from
(the original layout: one tensor per expert, where the model fuses them). A failed export leaves the previous
checkpoint in the folder as it was. Negative control: with the expert-parallel part of the reader switched off
(DeepSpeed's reader), the EP checkpoints do not export.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors import safe_open

from tests.deepspeed.test_ep_zero3_reshard import (
    GLOBAL_BATCH,
    LR,
    SCRIPT,
    STEPS_PER_HOP,
    TIMEOUT,
    assert_within_noise_floor,
    train_reference,
    whole_state,
)
from tests.fork_utils.launcher import REPO_ROOT, launch
from tests.fork_utils.tiny_models import checkpoint_keys_and_shapes, make_checkpoint


def load_exported(folder) -> dict[str, torch.Tensor]:
    """`from_pretrained` of the export, in this process, as its parameters by name (the model's layout)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def file_dtypes(folder) -> set[str]:
    dtypes = set()
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            dtypes.update(str(f.get_slice(key).get_dtype()) for key in f.keys())
    return dtypes


@pytest.mark.multiprocess
class HfExportTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-zero3-hf-export-"))
        cls.originals = {family: make_checkpoint(family, cls.tmp / family, seed=41).path
                         for family in ("qwen3_moe", "mixtral")}
        cls.runs = {}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def run_once(self, name):
        """The ZeRO checkpoint of run `name` and the weights its ranks ended with (whole, the model's names)."""
        if name not in self.runs:
            family, ep_size, entry = {"qwen3-ep2-trainer": ("qwen3_moe", 2, "trainer"),
                                      "mixtral-ep2-engine": ("mixtral", 2, "deepspeed"),
                                      "qwen3-plain-engine": ("qwen3_moe", 1, "deepspeed")}[name]
            args = ["--checkpoint", self.originals[family], "--ep-size", ep_size, "--steps", STEPS_PER_HOP,
                    "--global-batch", GLOBAL_BATCH, "--lr", LR, "--entry", entry]
            if entry == "trainer":
                args += ["--output-dir", self.tmp / name, "--save-steps", STEPS_PER_HOP]
                checkpoint = self.tmp / name / f"checkpoint-{STEPS_PER_HOP}"
            else:
                args += ["--save-checkpoint", self.tmp / name]
                checkpoint = self.tmp / name
            results = launch(SCRIPT, args, nproc=2, timeout=TIMEOUT).check().results()
            self.runs[name] = (str(checkpoint), family, whole_state(results, "final", ep_size)["param"])
        return self.runs[name]

    def export(self, checkpoint, out, **kwargs):
        from transformers.integrations.deepspeed_expert_parallel_export import export_zero_checkpoint_to_hf_checkpoint

        export_zero_checkpoint_to_hf_checkpoint(checkpoint, str(out), **kwargs)
        return out

    def assert_exported(self, out, family, final, dtype=torch.float32):
        """The export reloads with the ranks' weights (in `dtype`) and the original checkpoint's keys and shapes."""
        self.assertEqual(checkpoint_keys_and_shapes(out), checkpoint_keys_and_shapes(self.originals[family]))
        loaded = load_exported(out)
        self.assertEqual(sorted(loaded), sorted(final))
        for name, tensor in final.items():
            self.assertEqual(loaded[name].dtype, dtype, name)
            self.assertTrue(torch.equal(loaded[name], tensor.to(dtype)), f"{name}: not the weights the ranks ended with")
        config = json.loads((Path(out) / "config.json").read_text())
        self.assertEqual(config["dtype"], str(dtype).split(".")[1])
        self.assertFalse([entry for entry in os.listdir(out) if entry.startswith(".")], "staging left behind")

    def assert_at_parity_with_one_process(self, weights, family):
        """Against one process trained on the same batches, within the noise floor of the reference rerun with each
        batch summed in the ranks' two parts."""
        _, reference = train_reference(self.originals[family], STEPS_PER_HOP)
        _, reordered = train_reference(self.originals[family], STEPS_PER_HOP, chunks=2)
        assert_within_noise_floor(self, weights, reference["param"], reordered["param"], "the export")

    def test_trainer_checkpoint_exports_with_its_own_config(self):
        """Qwen3-MoE, EP 2, the Trainer's checkpoint-3: fp32 (default `auto`: the config records float32), then bf16
        through the command line, sharded. At parity with one process."""
        checkpoint, family, final = self.run_once("qwen3-ep2-trainer")
        self.assertTrue(os.path.isfile(os.path.join(checkpoint, "config.json")))
        out = self.export(checkpoint, self.tmp / "export-qwen3-ep2")
        self.assert_exported(out, family, final)
        self.assert_at_parity_with_one_process(load_exported(out), family)

        out_bf16 = self.tmp / "export-qwen3-ep2-bf16"
        command = [sys.executable, "-m", "transformers.integrations.deepspeed_expert_parallel_export", checkpoint,
                   str(out_bf16), "--dtype", "bf16", "--max_shard_size", "100KB"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO_ROOT, check=False)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        index = json.loads((out_bf16 / "model.safetensors.index.json").read_text())
        self.assertGreater(len(set(index["weight_map"].values())), 1, "not sharded")
        self.assertEqual(file_dtypes(out_bf16), {"BF16"})
        self.assert_exported(out_bf16, family, final, dtype=torch.bfloat16)

    def test_engine_checkpoint_exports_with_the_models_config(self):
        """Mixtral, EP 2, `engine.save_checkpoint` (no config.json in the folder): refused without a config, exported
        with the original checkpoint's, which a wrong config (Qwen3-MoE's) is refused in place of."""
        checkpoint, family, final = self.run_once("mixtral-ep2-engine")
        with self.assertRaisesRegex(FileNotFoundError, "No config.json .* pass the model's config"):
            self.export(checkpoint, self.tmp / "no-config")
        with self.assertRaisesRegex(ValueError, "does not hold the tensors of the model the config describes"):
            self.export(checkpoint, self.tmp / "wrong-config", config=self.originals["qwen3_moe"])
        out = self.export(checkpoint, self.tmp / "export-mixtral-ep2", config=self.originals[family])
        self.assert_exported(out, family, final)

    def test_checkpoint_without_ep_exports_as_deepspeeds_reader_reads_it(self):
        """The twin without EP: the export equals DeepSpeed's own fp32 weights, bit for bit, and the ranks'."""
        from deepspeed.utils import zero_to_fp32

        checkpoint, family, final = self.run_once("qwen3-plain-engine")
        out = self.export(checkpoint, self.tmp / "export-plain", config=self.originals[family])
        self.assert_exported(out, family, final)
        deepspeeds = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoint)
        loaded = load_exported(out)
        for name, tensor in deepspeeds.items():
            self.assertTrue(torch.equal(loaded[name], tensor), f"{name}: not DeepSpeed's")

    def test_a_failed_export_leaves_the_previous_checkpoint(self):
        """An export that fails on its third tensor leaves the folder's previous checkpoint loading as before, and no
        staging directory."""
        from transformers.integrations import deepspeed_expert_parallel_export as export

        checkpoint, family, final = self.run_once("qwen3-ep2-trainer")
        out = self.export(checkpoint, self.tmp / "export-twice", dtype="bf16")
        before = {path.name: path.read_bytes() for path in out.iterdir()}
        read_as, reads = export._read_as, []

        def failing(value, dtype):
            reads.append(value)
            if len(reads) == 3:
                raise OSError("disk gone")
            return read_as(value, dtype)

        with mock.patch.object(export, "_read_as", failing), self.assertRaisesRegex(OSError, "disk gone"):
            self.export(checkpoint, out, dtype="float32")
        self.assertEqual({path.name: path.read_bytes() for path in out.iterdir()}, before)
        self.assert_exported(out, family, final, dtype=torch.bfloat16)

    def test_negative_control_deepspeeds_reader_cannot_export_ep_checkpoints(self):
        """With the expert-parallel part of the reader switched off (the checkpoint read by DeepSpeed's reader, as a
        stage 1/2 one is), the EP checkpoint does not export: DeepSpeed's reader runs out of elements."""
        from transformers.integrations import deepspeed_expert_parallel_export as export

        checkpoint, family, _ = self.run_once("mixtral-ep2-engine")
        with mock.patch.object(export, "_zero_stage", return_value=2), \
                self.assertRaisesRegex(ValueError, "consumed .* numels out of"):
            self.export(checkpoint, self.tmp / "switched-off", config=self.originals[family])
        self.assertFalse(os.path.exists(self.tmp / "switched-off" / "config.json"))
