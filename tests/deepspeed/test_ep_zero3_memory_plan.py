"""The memory planner (`deepspeed_expert_parallel_memory.plan_memory`): its arithmetic, and its figures against what
CPU runs of EP + ZeRO-3 hold. CI runs 2 ranks, EP 2, with and without offload; `make check-memory-plan` the sweep: 2
and 4 ranks, EP 1 / 2 / 4, offload of the parameters and / or the optimizer, persistent parameters.

The measured side (scripts/ep_memory_plan.py) counts, after `deepspeed.initialize` and one AdamW step, every tensor of
the ZeRO-3 state on each rank (parameter partitions, whole persistent parameters, gradient partitions, offload's fp32
gradients, fp32 master partitions, optimizer state; each storage once), and samples the peak anonymous RSS over
`from_pretrained` and over `save_pretrained` (glibc's mmap threshold fixed: memory in use, not what glibc keeps for
reuse). The planner sees only the checkpoint's config. State, save peak and load peak must agree within 10 %.
"""

import json
import os
import shutil
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
from parameterized import parameterized

from tests.fork_utils.launcher import launch
from tests.fork_utils.tiny_models import make_checkpoint, tiny_config
from transformers.integrations.deepspeed_expert_parallel_memory import (
    OPTIMIZER_STATES,
    ParameterInfo,
    ZeroOptions,
    main,
    partition_numel,
    plan_memory,
)


SCRIPT = Path(__file__).parent / "scripts" / "ep_memory_plan.py"
# Per launch: start-up, then each case (load, deepspeed.initialize, a step, a save) on a loaded 2-core machine
TIMEOUT_START, TIMEOUT_PER_CASE = 120, 60
TOLERANCE = 0.10
# Big enough for the tensors to dominate the RSS noise of a process (a few MB): 16 experts of hidden 512 and
# moe_intermediate 512, 2 layers, fp32: 100 MB of experts (largest tensor 33.5 MB), 5 MB of dense weights.
MODEL = dict(hidden_size=512, moe_intermediate_size=512, num_experts=16, vocab_size=1024, intermediate_size=512)
BUCKET = 50_000  # reduce and prefetch buckets: small, so that working buffers do not blur the state
# Per launch: the first case also warms the process up (its peaks include one-time costs: only its state is compared).
# CI runs LAUNCHES["ci"]; `make check-memory-plan` (EPFORK_MEMORY_PLAN_SWEEP=1) the 2- and 4-rank sweeps.
LAUNCHES = {
    "ci": (2, [
        {"name": "ep2_offload_both", "ep_size": 2, "offload": ["optimizer", "param"]},
        {"name": "ep2", "ep_size": 2},
        {"name": "ep1", "ep_size": 1},
    ]),
    "2": (2, [
        {"name": "ep2_offload_both", "ep_size": 2, "offload": ["optimizer", "param"]},
        {"name": "ep2_offload_optimizer", "ep_size": 2, "offload": ["optimizer"]},
        {"name": "ep2", "ep_size": 2},
        {"name": "ep1_offload_optimizer", "ep_size": 1, "offload": ["optimizer"]},
    ]),
    "4": (4, [
        {"name": "ep1_offload_param_persistent", "ep_size": 1, "offload": ["param"], "persistence_threshold": 100_000},
        {"name": "ep4_offload_optimizer", "ep_size": 4, "offload": ["optimizer"]},
        {"name": "ep2", "ep_size": 2},
        {"name": "ep4_persistent", "ep_size": 4, "persistence_threshold": 100_000},
        {"name": "ep1", "ep_size": 1},
    ]),
}
SWEEP = os.environ.get("EPFORK_MEMORY_PLAN_SWEEP") == "1"
# Peaks of memory in use: freed memory handed back at once rather than kept by glibc for reuse (its default)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
STATE_KINDS = {"parameters": "parameters", "persistent": "persistent_parameters", "gradients": "gradients",
               "fp32_gradients": "offloaded_fp32_gradients", "master": "fp32_master", "optimizer": "optimizer_state"}


def zero_options(case) -> ZeroOptions:
    return ZeroOptions(
        offload_param="param" in case.get("offload", []), offload_optimizer="optimizer" in case.get("offload", []),
        param_persistence_threshold=case.get("persistence_threshold", 0), reduce_bucket_size=BUCKET,
        prefetch_bucket_size=BUCKET,
    )


def within(measured: float, planned: float, tolerance: float = TOLERANCE) -> bool:
    return abs(measured - planned) <= tolerance * max(planned, 1)


class MemoryPlanArithmeticTest(unittest.TestCase):
    """The planner's rules on a tiny config, against sums written out by hand (no launch, meta device only)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="memory-plan-"))
        cls.config = tiny_config("qwen3_moe", num_experts=4, moe_intermediate_size=24, vocab_size=130)
        cls.config.save_pretrained(cls.tmp)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def shapes(self):
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(self.config)
        return {name: param.numel() for name, param in model.named_parameters()}

    @parameterized.expand([(4, 2, "fp32"), (4, 4, "bf16"), (2, 1, "bf16"), (8, 2, "fp32")])
    def test_partitions_dense_over_world_experts_over_edp(self, world, ep, dtype):
        size = 4 if dtype == "fp32" else 2
        plan = plan_memory(self.tmp, world, ep, dtype, "adamw", ZeroOptions(param_persistence_threshold=0))
        dense = experts = 0
        for name, numel in self.shapes().items():
            if ".experts." in name and ep > 1:
                experts += -(-(numel // ep) // (world // ep))  # ceil over the expert-data-parallel group
            else:
                dense += -(-numel // world)
        self.assertEqual((plan.parameters.dense, plan.parameters.experts), (dense * size, experts * size))
        self.assertEqual(plan.gradients.total, (dense + experts) * size)
        self.assertEqual(plan.fp32_master.total, (dense + experts) * 4)
        self.assertEqual(plan.optimizer_state.total, (dense + experts) * 8)
        self.assertEqual(plan.persistent_parameters.total, 0)
        self.assertEqual(plan.offloaded_fp32_gradients.total, 0)
        self.assertEqual(plan.num_parameters, sum(self.shapes().values()))

    def test_partitions_are_padded_to_the_group_size(self):
        dense = ParameterInfo("w", "", 10, is_expert=False, holds_experts=False, layer=None)
        expert = ParameterInfo("e", "", 10, is_expert=True, holds_experts=True, layer=None)
        self.assertEqual([partition_numel(dense, 4, 2), partition_numel(expert, 4, 2), partition_numel(expert, 8, 2)],
                         [3, 5, 3])

    def test_persistent_parameters_stay_whole_and_are_partitioned_too(self):
        threshold = 64 * 64  # the norms, router, k/v projections (32 x 64) and q/o projections (64 x 64)
        plan = plan_memory(self.tmp, 4, 2, "fp32", zero=ZeroOptions(param_persistence_threshold=threshold))
        # what a rank holds decides: for experts its E/P of them (down_proj: 4 x 64 x 24 / 2 = 3072 elements)
        local = {name: n // 2 if ".experts." in name else n for name, n in self.shapes().items()}
        persistent = [name for name, n in local.items() if n <= threshold]
        self.assertEqual(plan.persistent_parameters.total, sum(local[name] for name in persistent) * 4)
        self.assertEqual(plan.persistent_parameters.experts, sum(local[n] for n in persistent if ".experts." in n) * 4)
        self.assertGreater(plan.persistent_parameters.experts, 0)
        plain = plan_memory(self.tmp, 4, 2, "fp32", zero=ZeroOptions(param_persistence_threshold=0))
        self.assertEqual(plan.parameters.total, plain.parameters.total)

    def test_offload_moves_state_to_the_host(self):
        zero = ZeroOptions(offload_param=True, offload_optimizer=True, param_persistence_threshold=0)
        plan = plan_memory(self.tmp, 4, 2, "bf16", "adamw", zero)
        self.assertEqual(plan.parameters.device, "host")
        self.assertEqual(plan.optimizer_state.device, "host")
        self.assertEqual(plan.offloaded_fp32_gradients.total, plan.fp32_master.total)
        self.assertEqual(plan.per_device("gpu"), plan.reduce_bucket + plan.gathered_parameters)
        on_gpu = plan_memory(self.tmp, 4, 2, "bf16", "adamw", ZeroOptions(param_persistence_threshold=0))
        self.assertEqual(on_gpu.per_device("host"), 0)
        self.assertEqual(on_gpu.zero3_state + on_gpu.reduce_bucket + on_gpu.gathered_parameters,
                         on_gpu.per_device("gpu"))

    def test_optimizers(self):
        for optimizer, states in OPTIMIZER_STATES.items():
            plan = plan_memory(self.tmp, 2, 2, "bf16", optimizer)
            self.assertEqual(plan.optimizer_state.total, plan.fp32_master.total * states, optimizer)

    def test_load_and_save_working_sets(self):
        shapes = self.shapes()
        plan = plan_memory(self.tmp, 4, 2, "fp32")
        largest_expert = max(n for name, n in shapes.items() if ".experts." in name)
        dense = sum(n for name, n in shapes.items() if ".experts." not in name)
        experts = sum(shapes.values()) - dense
        self.assertEqual(plan.load_share, (dense + experts // 2) * 4)  # dense whole, half of the experts
        self.assertEqual(plan.load_working_set, largest_expert // 2 * 4)  # the rank's largest expert parameter
        # without EP: the ZeRO-3 partitions, and twice the experts of gate_up_proj that a rank's partition spans (its
        # gate and up stacks, their concatenation): 4 experts, 4 ranks: one expert each; 3 ranks: partitions of
        # 4/3 experts start inside one, so two of them
        gate_up = max(n for name, n in shapes.items() if name.endswith("experts.gate_up_proj"))
        self.assertEqual(plan_memory(self.tmp, 4, 1, "fp32").load_working_set, 2 * (gate_up // 4) * 4)
        self.assertEqual(plan_memory(self.tmp, 3, 1, "fp32").load_working_set, 2 * (2 * gate_up // 4) * 4)
        largest = max(shapes.values()) * 4
        # Every rank writing: its experts converted, 1/P, gathered over the expert-data-parallel group first, 2/P
        self.assertEqual(plan.save_writer_working_set, int(1.0 * largest))
        self.assertEqual(plan.save_other_working_set, plan.save_writer_working_set)
        self.assertEqual(plan_memory(self.tmp, 4, 4, "fp32").save_writer_working_set, int(0.25 * largest))
        # Rank 0 writing alone (nodes with a disk each): 2 + 1/P
        self.assertEqual(plan.save_single_writer_working_set, int(2.5 * largest))
        self.assertEqual(plan_memory(self.tmp, 4, 4, "fp32").save_single_writer_working_set, int(2.25 * largest))
        without_ep = plan_memory(self.tmp, 4, 1, "fp32")
        self.assertEqual(without_ep.save_writer_working_set, sum(shapes.values()) * 4 + 2 * largest)
        self.assertEqual(plan.load_peak, plan.load_share + plan.load_working_set)

    def test_deepspeed_config_auto_values(self):
        config = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                        "stage3_prefetch_bucket_size": "auto",
                                        "stage3_param_persistence_threshold": "auto",
                                        "offload_optimizer": {"device": "cpu"}},
                  "data_types": {"grad_accum_dtype": "fp32"}}
        zero = ZeroOptions.from_deepspeed_config(config, hidden_size=100, max_live_parameters=7)
        self.assertEqual((zero.reduce_bucket_size, zero.prefetch_bucket_size, zero.param_persistence_threshold),
                         (10_000, 9_000, 1_000))
        self.assertEqual((zero.offload_optimizer, zero.offload_param, zero.max_live_parameters), (True, False, 7))
        self.assertEqual(zero.grad_accum_dtype, "fp32")
        with self.assertRaisesRegex(ValueError, "hidden size"):
            ZeroOptions.from_deepspeed_config(config)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "must divide the world size"):
            plan_memory(self.tmp, 4, 3)
        with self.assertRaisesRegex(ValueError, "Cannot evenly shard 4 experts"):
            plan_memory(self.tmp, 8, 8)
        with self.assertRaisesRegex(ValueError, "unknown optimizer"):
            plan_memory(self.tmp, 2, 2, optimizer="lion")
        llama = self.tmp / "llama"
        tiny_config("llama").save_pretrained(llama)
        with self.assertRaisesRegex(ValueError, "has no `ep_plan`"):
            plan_memory(llama, 2, 2)
        self.assertEqual(plan_memory(llama, 2, 1).parameters.experts, 0)

    def test_command(self):
        from contextlib import redirect_stdout
        from io import StringIO

        out = StringIO()
        with redirect_stdout(out):
            plan = main([str(self.tmp / "config.json"), "--world-size", "4", "--ep-size", "2", "--json"])
        self.assertEqual(json.loads(out.getvalue())["zero3_state"], plan.zero3_state)
        with redirect_stdout(StringIO()) as text:
            main([str(self.tmp), "--world-size", "4", "--ep-size", "2", "--offload-optimizer",
                  "--ranks-per-node", "2"])
        self.assertIn("per node (2 ranks)", text.getvalue())
        self.assertIn("activations are not modelled", text.getvalue())


@pytest.mark.multiprocess
class MemoryPlanAgainstMeasuredTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="memory-plan-measured-"))
        cls.checkpoint = make_checkpoint("qwen3_moe", cls.tmp / "model", seed=31, **MODEL).path
        cls.measured = {}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def run_launch(self, launch_name):
        if launch_name not in self.measured:
            nproc, cases = LAUNCHES[launch_name]
            args = ["--checkpoint", self.checkpoint, "--cases", json.dumps(cases),
                    "--save-dir", self.tmp / f"saves-{launch_name}", "--bucket", BUCKET]
            timeout = TIMEOUT_START + TIMEOUT_PER_CASE * len(cases) * nproc // 2
            result = launch(SCRIPT, args, nproc=nproc, timeout=timeout, env=MALLOC_ENV).check()
            type(self).measured[launch_name] = result.results()
        return self.measured[launch_name]

    def plan(self, nproc, case):
        return plan_memory(self.checkpoint, nproc, case["ep_size"], "fp32", "adamw", zero_options(case),
                           cpu_only=True)

    def compare(self, launch_name):
        """Every rank's ZeRO-3 state by kind, dense and experts apart, within 10 %; rank 0's save peak within 10 %;
        every rank's anonymous load peak within 10 %."""
        results = self.run_launch(launch_name)
        nproc, cases = LAUNCHES[launch_name]
        report, failures = [], []

        def check(line, ok):
            report.append(line)
            if not ok:
                failures.append(line)

        for index, case in enumerate(cases):
            plan = self.plan(nproc, case)
            for rank, by_case in results.items():
                measured = by_case[case["name"]]
                for kind, attribute in STATE_KINDS.items():
                    planned = getattr(plan, attribute)
                    got = measured["state"].get(kind, {"dense": 0, "experts": 0})
                    for part in ("dense", "experts"):
                        check(f"{case['name']} rank {rank} {kind} {part}: measured {got[part]}, planned "
                              f"{getattr(planned, part)}", within(got[part], getattr(planned, part)))
                if index == 0:
                    continue  # the warm-up case: its peaks include the process's one-time costs
                if rank == 0:
                    got, planned = measured["save_peak_increase"], plan.save_writer_working_set
                    check(f"{case['name']} rank 0 save peak increase: measured {got / 2**20:.1f} MiB, planned "
                          f"{planned / 2**20:.1f} MiB ({got / planned:.2f})", within(got, planned))
                # Anonymous memory, within 10 %: with EP the experts' share plus the working set (the dense weights
                # stay mapped from the checkpoint); without EP the ZeRO-3 partitions plus one conversion in full.
                got, planned = measured["load_peak_increase"], plan.load_peak_anonymous
                ok = within(got, planned)
                check(f"{case['name']} rank {rank} load peak increase: measured {got / 2**20:.1f} MiB, planned "
                      f"{planned / 2**20:.1f} MiB ({got / planned:.2f}), share {plan.load_share / 2**20:.1f} MiB", ok)
        print("\n".join(report))
        self.assertFalse(failures, "\n".join(failures))

    def test_two_ranks(self):
        self.compare("ci")
        # Negative control: the same run planned as if the experts were partitioned over all ranks (no EP) disagrees
        nproc, cases = LAUNCHES["ci"]
        measured = self.run_launch("ci")[0][cases[1]["name"]]["state"]["optimizer"]
        wrong = plan_memory(self.checkpoint, nproc, 1, "fp32", "adamw", zero_options(cases[1]), cpu_only=True)
        self.assertFalse(within(measured["experts"], wrong.optimizer_state.experts))

    @unittest.skipUnless(SWEEP, "the sweep: make check-memory-plan (EPFORK_MEMORY_PLAN_SWEEP=1)")
    def test_two_ranks_sweep(self):
        self.compare("2")

    @unittest.skipUnless(SWEEP, "the sweep: make check-memory-plan (EPFORK_MEMORY_PLAN_SWEEP=1)")
    def test_four_ranks_sweep(self):
        self.compare("4")
