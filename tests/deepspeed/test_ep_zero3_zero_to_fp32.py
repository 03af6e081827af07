"""The fork's `zero_to_fp32.py` and file conversions, in one process, on a small ZeRO-3 checkpoint of 2 ranks (EP 2)
written here in DeepSpeed's file layout: what the script and the functions write, the script's command line and its
message without the fork, and which engines put it into their checkpoint folders.

The same on real checkpoints (trained through the launchers, against the ranks' weights, one process and DeepSpeed's
own script): `tests/deepspeed/test_ep_zero3_reshard.py`.
"""

import io
import json
import os
import runpy
import shutil
import sys
import tempfile
import unittest
from contextlib import redirect_stderr
from pathlib import Path
from unittest import mock

import torch
from parameterized import parameterized
from safetensors.torch import load_file

from tests.deepspeed.test_ep_zero3_reshard import read_converted
from transformers.integrations import deepspeed_expert_parallel_checkpoint as offline


SCRIPT = offline.RECOVERY_SCRIPT
WORLD_SIZE = 2


def whole_weights() -> dict[str, torch.Tensor]:
    """The model the checkpoint holds: a dense weight (15 elements: padded partitions), experts of 2 EP ranks, tied."""
    generator = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(64, 4, generator=generator),
        "dense.weight": torch.randn(3, 5, generator=generator),
        "experts.w": torch.randn(4, 3, 2, generator=generator),  # 2 experts per EP rank
    }


def write_checkpoint(folder: Path, tag: str = "global_step3", tied: bool = True) -> dict[str, torch.Tensor]:
    """
    A ZeRO-3 checkpoint of 2 ranks, EP 2, as DeepSpeed lays it out for an expert-parallel model: sub-group 0 (embedding
    and dense weight) partitioned over both ranks, sub-group 1 (this rank's experts) over its expert-data-parallel
    group (the rank alone); a buffer; `lm_head.weight` tied to `embed.weight` if `tied`. Returns the whole state dict
    expected.
    """
    weights = whole_weights()
    buffer = torch.arange(3, dtype=torch.float32)
    os.makedirs(folder / tag)
    (folder / "latest").write_text(tag)
    for rank in range(WORLD_SIZE):
        dense = {name: weights[name] for name in ("embed.weight", "dense.weight")}
        experts = {"experts.w": weights["experts.w"].chunk(WORLD_SIZE)[rank]}
        flat_dense = torch.cat([partition(tensor, rank, WORLD_SIZE) for tensor in dense.values()])
        flat_experts = torch.cat([partition(tensor, 0, 1) for tensor in experts.values()])
        model_state = {
            "module": {"buf": buffer},
            "buffer_names": ["buf"],
            "param_shapes": [{n: t.shape for n, t in dense.items()}, {n: t.shape for n, t in experts.items()}],
            "shared_params": {"lm_head.weight": "embed.weight"} if tied else {},
            "frozen_param_shapes": None,
            "frozen_param_fragments": None,
            "dp_world_size": WORLD_SIZE,
            "ds_version": "0.19.8",
        }
        groups = [
            {"partition_ranks": list(range(WORLD_SIZE)), "partition_rank": rank, "families": ["dense"]},
            {"partition_ranks": [rank], "partition_rank": 0, "families": ["autoep_expert"]},
        ]
        optimizer_state = {
            "zero_stage": 3,
            "ds_zero_partition_groups": groups,
            "fp32_flat_groups": [flat_dense, flat_experts],
            "optimizer_state_dict": {"state": {}, "param_groups": []},
        }
        torch.save(model_state, folder / tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": optimizer_state},
                   folder / tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    return {"buf": buffer, **weights, **({"lm_head.weight": weights["embed.weight"]} if tied else {})}


def partition(tensor: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    """ZeRO-3's partition `rank` of `ranks` of a flattened tensor, the last one padded."""
    size = -(-tensor.numel() // ranks)
    flat = torch.cat([tensor.reshape(-1), tensor.new_zeros(size * ranks - tensor.numel())])
    return flat[rank * size:(rank + 1) * size]


class ZeroToFp32ScriptTest(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="ep-zero-to-fp32-"))
        self.checkpoint = self.tmp / "ckpt"
        self.expected = write_checkpoint(self.checkpoint)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run_script(self, *args, script=SCRIPT):
        """The script as `python zero_to_fp32.py ...` runs it, in this process."""
        with mock.patch.object(sys, "argv", [str(script), *map(str, args)]):
            runpy.run_path(str(script), run_name="__main__")

    def assert_weights(self, got, dtype=torch.float32, names=None):
        names = names or self.expected
        self.assertEqual(sorted(got), sorted(names))
        for name in names:
            self.assertEqual(got[name].dtype, dtype, name)
            self.assertTrue(torch.equal(got[name], self.expected[name].to(dtype)), name)

    def test_the_checkpoint_is_told_expert_parallel(self):
        self.assertTrue(offline.is_expert_parallel_checkpoint(str(self.checkpoint / "global_step3")))

    def test_script_writes_pytorch_model_bin_with_every_expert(self):
        out = self.tmp / "out"
        self.run_script(self.checkpoint, out)
        self.assertEqual(sorted(os.listdir(out)), ["pytorch_model.bin"])
        got = torch.load(out / "pytorch_model.bin", weights_only=True)
        self.assert_weights(got)
        self.assertEqual(list(got), list(self.expected), "not DeepSpeed's order (buffers, parameters, tied)")
        self.assertIs(got["lm_head.weight"], got["embed.weight"], "tied weights saved twice")

    @parameterized.expand([("safetensors", False), ("bin", True)])
    def test_script_writes_shards_and_index_as_deepspeed_names_them(self, kind, tied):
        if not tied:
            shutil.rmtree(self.checkpoint)
            self.expected = write_checkpoint(self.checkpoint, tied=False)
        out = self.tmp / "out"
        safe = ["--safe_serialization"] if kind == "safetensors" else []
        # 1 kB: the 1024-byte embedding alone in a file, the others together
        self.run_script(self.checkpoint, out, *safe, "--max_shard_size", "1KB", "-t", "global_step3")
        prefix, suffix = ("model", ".safetensors") if safe else ("pytorch_model", ".bin")
        shards = sorted(name for name in os.listdir(out) if name.endswith(suffix))
        self.assertGreater(len(shards), 1)
        self.assertEqual(shards, [f"{prefix}-{i:05d}-of-{len(shards):05d}{suffix}" for i in range(1, len(shards) + 1)])
        self.assertEqual(sorted(os.listdir(out)), sorted([*shards, f"{prefix}{suffix}.index.json"]))
        index = json.loads((out / f"{prefix}{suffix}.index.json").read_text())
        stored = {}
        for shard in shards:
            tensors = load_file(out / shard) if safe else torch.load(out / shard, weights_only=True)
            stored.update({name: shard for name in tensors})
        self.assertEqual(stored, index["weight_map"])
        self.assert_weights(read_converted(out))
        if tied:
            self.assertEqual(index["weight_map"]["lm_head.weight"], index["weight_map"]["embed.weight"])
        counted_once = [name for name in self.expected if name != "lm_head.weight"]
        self.assertEqual(index["metadata"]["total_size"], sum(4 * self.expected[n].numel() for n in counted_once))

    def test_safetensors_with_tied_weights_in_one_file_is_refused_as_by_deepspeed(self):
        """safetensors refuses tensors sharing memory; DeepSpeed's conversion writes tied weights as one tensor too."""
        with self.assertRaisesRegex(RuntimeError, "share memory"):
            self.run_script(self.checkpoint, self.tmp / "out", "--safe_serialization")

    def test_exclude_frozen_parameters_one_file_and_a_torch_dtype(self):
        out = self.tmp / "out"
        offline.convert_zero_checkpoint_to_state_dict(str(self.checkpoint), str(out), dtype=torch.bfloat16,
                                                      max_shard_size=None, exclude_frozen_parameters=True)
        self.assert_weights(torch.load(out / "pytorch_model.bin", weights_only=True), torch.bfloat16)

    @parameterized.expand([("bf16", torch.bfloat16), ("float16", torch.float16)])
    def test_zero_to_torch_beside_it_converts_to_another_dtype(self, dtype, torch_dtype):
        """DeepSpeed's `zero_to_torch.py` imports the `zero_to_fp32.py` beside it: with the fork's, it converts EP
        checkpoints too, floating tensors in `dtype`."""
        import deepspeed

        shutil.copyfile(SCRIPT, self.checkpoint / "zero_to_fp32.py")
        zero_to_torch = Path(deepspeed.__file__).parent / "utils" / "zero_to_torch.py"
        shutil.copyfile(zero_to_torch, self.checkpoint / "zero_to_torch.py")
        out = self.tmp / "out"
        with mock.patch.object(sys, "path", [str(self.checkpoint), *sys.path]), \
                mock.patch.dict(sys.modules, {"zero_to_fp32": None}):
            sys.modules.pop("zero_to_fp32")
            self.run_script(self.checkpoint, out, "--dtype", dtype, script=self.checkpoint / "zero_to_torch.py")
        self.assert_weights(torch.load(out / "pytorch_model.bin", weights_only=True), torch_dtype)

    def test_runs_from_its_source_file_too(self):
        """As a separate process, from where it lives in the package: beside transformers' `integrations/deepspeed.py`,
        which Python would import as DeepSpeed from the script's folder."""
        from tests.fork_utils.launcher import run_commands

        out = self.tmp / "out"
        [result] = run_commands([[sys.executable, SCRIPT, self.checkpoint, out, "-d"]], timeout=120)
        self.assertEqual(result.returncode, 0, result.output[-3000:])
        self.assert_weights(torch.load(out / "pytorch_model.bin", weights_only=True))
        self.assertIn("tensors in", result.output, "-d: the fork's steps")

    def test_without_the_fork_it_says_what_to_install(self):
        with mock.patch.dict(sys.modules, {"transformers.integrations": None}):
            with self.assertRaises(SystemExit) as raised:
                self.run_script(self.checkpoint, self.tmp / "out")
        message = str(raised.exception.code)
        self.assertRegex(message, r"expert-parallel.*fork of transformers.*\+ep\.N.*pip install.*run this script")
        self.assertFalse((self.tmp / "out").exists())

    def test_command_line_is_deepspeeds(self):
        script = runpy.run_path(str(SCRIPT))
        args = script["parse_args"](["a", "b", "--safe_serialization", "--max_shard_size", "1GB", "-t", "global_step1",
                                     "--exclude_frozen_parameters", "-d"])
        self.assertEqual(vars(args), {"checkpoint_dir": "a", "output_dir": "b", "safe_serialization": True,
                                      "max_shard_size": "1GB", "tag": "global_step1",
                                      "exclude_frozen_parameters": True, "debug": True})
        defaults = vars(script["parse_args"](["a", "b"]))
        self.assertEqual((defaults["max_shard_size"], defaults["safe_serialization"], defaults["tag"]),
                         ("5GB", False, None))
        with redirect_stderr(io.StringIO()), self.assertRaises(SystemExit):
            script["parse_args"](["a"])

    def test_output_dtypes_are_deepspeeds(self):
        from deepspeed.utils import zero_to_fp32

        names = set(runpy.run_path(str(SCRIPT))["OUTPUT_DTYPE_NAMES"])
        self.assertEqual(names, set(zero_to_fp32.OUTPUT_DTYPE_NAMES))
        self.assertEqual(names, set(offline._OUTPUT_DTYPES))

    def test_load_state_dict_from_zero_checkpoint(self):
        model = torch.nn.Module()
        model.register_buffer("buf", torch.zeros(3))
        for name, tensor in whole_weights().items():
            module_name, param_name = name.split(".")
            if not hasattr(model, module_name):
                model.add_module(module_name, torch.nn.Module())
            getattr(model, module_name).register_parameter(param_name, torch.nn.Parameter(torch.zeros_like(tensor)))
        loaded = offline.load_state_dict_from_zero_checkpoint(model, str(self.checkpoint))
        self.assertIs(loaded, model)
        for name, tensor in model.state_dict().items():
            self.assertTrue(torch.equal(tensor, self.expected[name]), name)
        model.experts._expert_parallel_handed_over = True
        with self.assertRaisesRegex(ValueError, "one rank's experts"):
            offline.load_state_dict_from_zero_checkpoint(model, str(self.checkpoint))


class RecoveryScriptInCheckpointFoldersTest(unittest.TestCase):
    """Which `zero_to_fp32.py` DeepSpeed's `_copy_recovery_script` (run by `save_checkpoint`) puts into the folder."""

    def copy_scripts(self, module):
        from deepspeed.runtime.engine import DeepSpeedEngine

        engine_class = type("Engine", (), {
            "_copy_recovery_script": DeepSpeedEngine._copy_recovery_script,
            "_change_recovery_script_permissions": DeepSpeedEngine._change_recovery_script_permissions,
        })
        offline._write_own_recovery_script_for_expert_parallel_models(engine_class)
        offline._write_own_recovery_script_for_expert_parallel_models(engine_class)  # once only
        engine = engine_class()
        engine.module = module
        folder = tempfile.mkdtemp(prefix="ep-recovery-script-")
        self.addCleanup(shutil.rmtree, folder, ignore_errors=True)
        engine._copy_recovery_script(folder)
        return Path(folder)

    def test_expert_parallel_models_get_the_forks_script(self):
        import deepspeed

        model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        model[0]._expert_parallel_handed_over = True
        folder = self.copy_scripts(model)
        self.assertEqual((folder / "zero_to_fp32.py").read_bytes(), Path(SCRIPT).read_bytes())
        self.assertTrue(os.access(folder / "zero_to_fp32.py", os.X_OK))
        deepspeeds = Path(deepspeed.__file__).parent / "utils"
        self.assertEqual((folder / "zero_to_torch.py").read_bytes(), (deepspeeds / "zero_to_torch.py").read_bytes())

    def test_other_models_keep_deepspeeds(self):
        import deepspeed

        folder = self.copy_scripts(torch.nn.Linear(2, 2))
        deepspeeds = Path(deepspeed.__file__).parent / "utils" / "zero_to_fp32.py"
        self.assertEqual((folder / "zero_to_fp32.py").read_bytes(), deepspeeds.read_bytes())


if __name__ == "__main__":
    unittest.main()
