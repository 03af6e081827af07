"""Fault matrix of expert parallelism under DeepSpeed ZeRO-3: every misuse and broken input ends the whole job fast.

Each case runs through the real launcher (`accelerate launch` with docs/configs' ZeRO-3 config, or torchrun for the
plain DeepSpeed entry point) on 2 CPU ranks and must show: every rank fails (the job exits non-zero), the message that
says what to change is in every rank's output, the job ends within seconds of the first rank's failure (counted from
that failure, not from the launch, whose start-up a loaded machine stretches), and no process of the job is left
running.

A rank that dies (SIGKILL, as the out-of-memory killer or a lost node would) is noticed by the launcher's agent, which
ends the other ranks: they are stopped, not left waiting in the collective the dead rank never joins.
"""

import json
import shutil
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
from parameterized import parameterized
from safetensors.torch import load_file, save_file

from tests.fork_utils.launcher import CONFIG_DIR, launch
from tests.fork_utils.tiny_models import make_checkpoint


LOAD = Path(__file__).parent / "scripts" / "ep_load.py"
TRAIN = Path(__file__).parent / "scripts" / "ep_train.py"
ACCELERATE_ZERO3 = CONFIG_DIR / "accelerate_deepspeed_zero3.yaml"
# How long (seconds) the job may go on after its first rank failed (wrote its traceback, or was SIGKILLed). Here a
# raising rank lingers the launcher's failure grace (8 s, for its peers to reach their own error), then the launcher's
# agent ends the job: 9-10 s after an error, 1-2 s after a SIGKILL, with or without a busy neighbour. Start-up is not
# what this bounds: imports and the first launch's cold caches took 14-22 s on a quiet machine and over 60 s on a
# loaded CI machine. A rank that never gets to its error is caught by `assert_every_rank_raised`; a job that hangs
# before any rank fails, by the launch timeout.
ENDS_AFTER_FAULT_WITHIN = 30
LAUNCH_TIMEOUT = 180  # start-up on a loaded machine, the fault, and the bound above
# What gloo raises on a rank whose peer process is gone (reading from it, or writing to it)
GLOO_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")

# case name, checkpoint, ZeRO stage, extra ep_load.py arguments, expected message (in every rank's error)
CONFIG_CASES = [
    ("experts_not_divisible_by_ep_size", "qwen3_moe_3", 3, ["--ep-size", "2"],
     "Cannot evenly shard 3 experts across 2 expert-parallel ranks"),
    ("ep_size_not_dividing_world_size", "qwen3_moe", 3, ["--ep-size", "3"],
     "`ep_size` (3) must divide `fsdp_size * tp_size` (2 * 1)"),
    ("zero_stage_0", "qwen3_moe", 0, ["--ep-size", "2"], "needs ZeRO stage 1, 2 or 3, got stage 0"),
    ("tensor_parallel_with_ep", "qwen3_moe", 3, ["--ep-size", "2", "--tp-size", "2"],
     "tensor parallelism (`tp_size=2`)"),
    ("pipeline_parallel_with_ep", "qwen3_moe", 3, ["--ep-size", "2", "--pp-size", "2"],
     "pipeline parallelism (`pp_size=2`)"),
    ("model_without_ep_plan", "llama", 3, ["--ep-size", "2"], "has no `ep_plan`"),
    ("quantized_model", "qwen3_moe_quantized", 3, ["--ep-size", "2"], "does not support quantized models"),
]

# case name, checkpoint (a broken copy of the sharded Qwen3-MoE), expected message in every rank's error
BROKEN_CHECKPOINT_CASES = [
    ("missing_shard_file", "missing_shard", "model-00002-of-00015.safetensors"),
    ("truncated_safetensors", "truncated", "Error while deserializing header"),
    ("corrupt_safetensors_header", "corrupt_header", "Error while deserializing header"),
    # Only rank 1 holds expert 2: it cannot stack it with its other expert, and rank 0 learns it from rank 1.
    ("expert_with_wrong_shape", "wrong_expert_shape", "automatic conversion of the weights"),
    ("dense_weight_with_wrong_shape", "wrong_dense_shape", "ignore_mismatched_sizes"),
    ("missing_expert_key", "missing_expert", "automatic conversion of the weights"),
    ("unexpected_expert_key", "unexpected_expert", "automatic conversion of the weights"),
]

# Dense keys missing from, or unexpected in, the checkpoint: upstream's loading report on every rank, as without EP
# (missing weights are initialized, unexpected ones ignored).
REPORTED_KEY_CASES = [
    ("missing_dense_key", "missing_dense", "model.layers.0.self_attn.q_proj.weight | MISSING"),
    ("unexpected_dense_key", "unexpected_dense", "model.layers.0.mlp.shared_proj.weight | UNEXPECTED"),
]


def deepspeed_config_with_stage(stage: int, directory: Path) -> Path:
    """The accelerate config of docs/configs with another ZeRO stage (the shipped file itself for stage 3)."""
    if stage == 3:
        return ACCELERATE_ZERO3
    ds_config = json.loads((CONFIG_DIR / "ds_zero3.json").read_text())
    ds_config["zero_optimization"] = {"stage": stage}
    (directory / f"ds_zero{stage}.json").write_text(json.dumps(ds_config))
    accelerate_config = ACCELERATE_ZERO3.read_text().replace(
        "docs/configs/ds_zero3.json", str(directory / f"ds_zero{stage}.json")
    )
    path = directory / f"accelerate_deepspeed_zero{stage}.yaml"
    path.write_text(accelerate_config)
    return path


class BrokenCheckpoints:
    """Copies of one sharded checkpoint, each broken in one way."""

    def __init__(self, source: Path, root: Path):
        self.source, self.root = source, root
        self.index = json.loads((source / "model.safetensors.index.json").read_text())

    def copy(self, name: str) -> Path:
        target = self.root / name
        shutil.copytree(self.source, target, ignore=shutil.ignore_patterns("reference"))
        return target

    def file_of(self, key: str) -> str:
        return self.index["weight_map"][key]

    def rewrite_tensor(self, checkpoint: Path, key: str, edit) -> None:
        """Replace the tensor `key` by `edit(tensor)`, or drop it (`edit` returns None), index included."""
        shard = checkpoint / self.file_of(key)
        tensors = load_file(shard)
        tensors[key] = edit(tensors[key])
        if tensors[key] is None:
            del tensors[key]
            index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
            del index["weight_map"][key]
            (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
        save_file(tensors, shard, metadata={"format": "pt"})

    def add_tensor(self, checkpoint: Path, key: str, tensor, next_to: str) -> None:
        shard = checkpoint / self.file_of(next_to)
        tensors = load_file(shard)
        tensors[key] = tensor
        save_file(tensors, shard, metadata={"format": "pt"})
        index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
        index["weight_map"][key] = self.file_of(next_to)
        (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))

    def build_all(self) -> dict[str, Path]:
        built = {}
        built["missing_shard"] = self.copy("missing_shard")
        (built["missing_shard"] / "model-00002-of-00015.safetensors").unlink()

        built["truncated"] = self.copy("truncated")
        shard = built["truncated"] / self.file_of("model.layers.1.mlp.experts.3.down_proj.weight")
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

        built["corrupt_header"] = self.copy("corrupt_header")
        shard = built["corrupt_header"] / self.file_of("model.layers.0.mlp.experts.0.gate_proj.weight")
        data = bytearray(shard.read_bytes())
        data[8:24] = b"\xff" * 16  # the JSON header no longer parses
        shard.write_bytes(bytes(data))

        built["wrong_expert_shape"] = self.copy("wrong_expert_shape")
        self.rewrite_tensor(built["wrong_expert_shape"], "model.layers.1.mlp.experts.2.up_proj.weight",
                            lambda t: t[:-1].clone())
        built["wrong_dense_shape"] = self.copy("wrong_dense_shape")
        self.rewrite_tensor(built["wrong_dense_shape"], "model.layers.0.self_attn.o_proj.weight",
                            lambda t: t[:, :-1].clone())

        built["missing_expert"] = self.copy("missing_expert")
        self.rewrite_tensor(built["missing_expert"], "model.layers.1.mlp.experts.3.gate_proj.weight", lambda t: None)
        built["missing_dense"] = self.copy("missing_dense")
        self.rewrite_tensor(built["missing_dense"], "model.layers.0.self_attn.q_proj.weight", lambda t: None)
        built["unexpected_expert"] = self.copy("unexpected_expert")
        expert = load_file(self.source / self.file_of("model.layers.0.mlp.experts.0.gate_proj.weight"))
        self.add_tensor(built["unexpected_expert"], "model.layers.0.mlp.experts.4.gate_proj.weight",
                        expert["model.layers.0.mlp.experts.0.gate_proj.weight"],
                        next_to="model.layers.0.mlp.experts.0.gate_proj.weight")
        built["unexpected_dense"] = self.copy("unexpected_dense")
        self.add_tensor(built["unexpected_dense"], "model.layers.0.mlp.shared_proj.weight", torch.zeros(3, 3),
                        next_to="model.layers.0.self_attn.q_proj.weight")
        return built


def quantized_copy(source: Path, target: Path) -> Path:
    """A checkpoint whose config asks for quantization (BitNet's quantizer runs on CPU without extra packages)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("reference"))
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitnet"}
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.multiprocess
class EPZero3FaultTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-zero3-faults-"))
        sharded = make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe_sharded", seed=51, max_shard_size="20KB").path
        cls.checkpoints = {
            "qwen3_moe": sharded,
            "qwen3_moe_3": make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe_3", seed=52, num_experts=3).path,
            "llama": make_checkpoint("llama", cls.tmp / "llama", seed=53).path,
            "qwen3_moe_quantized": quantized_copy(sharded, cls.tmp / "qwen3_moe_quantized"),
            **BrokenCheckpoints(sharded, cls.tmp).build_all(),
        }

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def load(self, checkpoint, *extra, zero_stage=3, **kwargs):
        args = ["--mode", "accelerate", "--checkpoint", self.checkpoints[checkpoint], *extra]
        return launch(LOAD, args, nproc=2, launcher="accelerate", timeout=LAUNCH_TIMEOUT,
                      accelerate_config=deepspeed_config_with_stage(zero_stage, self.tmp), **kwargs)

    def assert_whole_job_failed_fast(self, result):
        self.assertFalse(result.timed_out, f"the job hung:\n{result.report()}")
        self.assertNotEqual(result.returncode, 0, f"the job succeeded:\n{result.report()}")
        after_fault = result.seconds_from_first_fault_to_end
        self.assertIsNotNone(after_fault, f"no rank recorded its failure:\n{result.report()}")
        self.assertLess(after_fault, ENDS_AFTER_FAULT_WITHIN,
                        f"the job went on {after_fault:.0f} s after a rank failed:\n{result.report()}")
        self.assertEqual(result.stragglers, [], "processes of the job were left running")
        self.assertEqual(result.leftover_pids, [])

    def assert_every_rank_raised(self, result, message):
        for rank in (0, 1):
            outcome = result.ranks.get(rank)
            self.assertIsNotNone(outcome, f"rank {rank} did not start:\n{result.report()}")
            self.assertIsNotNone(outcome.error, f"rank {rank} did not raise:\n{result.report()}")
            self.assertIn(message, outcome.error, f"rank {rank} raised something else:\n{outcome.error}")

    @parameterized.expand(CONFIG_CASES)
    def test_unsupported_setting_raises_on_every_rank(self, _name, checkpoint, zero_stage, extra, message):
        result = self.load(checkpoint, *extra, zero_stage=zero_stage)
        self.assert_whole_job_failed_fast(result)
        self.assert_every_rank_raised(result, message)

    @parameterized.expand(BROKEN_CHECKPOINT_CASES)
    def test_broken_checkpoint_raises_on_every_rank(self, _name, checkpoint, message):
        result = self.load(checkpoint, "--ep-size", "2")
        self.assert_whole_job_failed_fast(result)
        self.assert_every_rank_raised(result, message)

    @parameterized.expand(REPORTED_KEY_CASES)
    def test_missing_or_unexpected_dense_key_is_reported_on_every_rank(self, _name, checkpoint, report_line):
        result = self.load(checkpoint, "--ep-size", "2").check()
        self.assertEqual(result.stragglers, [])
        for rank, outcome in result.ranks.items():
            self.assertIn(report_line, " ".join(outcome.log.split()), f"rank {rank} did not report it")

    def test_rank_dying_while_loading_ends_the_job(self):
        result = self.load("qwen3_moe", "--ep-size", "2", "--die-while-loading")
        self.assert_whole_job_failed_fast(result)
        self.assertIn("Signal 9 (SIGKILL) received by PID", result.output)
        # Rank 0 is stopped by the launcher, or first sees its peer gone in the collective after loading (gloo's
        # wording depends on when the socket died)
        error = result.ranks[0].error
        self.assertTrue(error is None or any(gone in error for gone in GLOO_PEER_GONE), error)

    def test_rank_dying_in_a_training_step_ends_the_job(self):
        args = ["--checkpoint", self.checkpoints["qwen3_moe"], "--entry", "deepspeed", "--ep-size", 2, "--steps", 3,
                "--die-at-step", 1]
        result = launch(TRAIN, args, nproc=2, timeout=LAUNCH_TIMEOUT)
        self.assert_whole_job_failed_fast(result)
        self.assertIn("Signal 9 (SIGKILL) received by PID", result.output)
