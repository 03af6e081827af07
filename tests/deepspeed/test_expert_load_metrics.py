"""Expert load metrics (`transformers.integrations.expert_load_metrics`).

The arithmetic (imbalance, entropy, dead window) on hand-made numbers; the counts of one process against the router's
own top-k choices, also with gradient checkpointing (recomputed forwards must not count twice) and in evaluation (not
counted); a model routed on purpose to one expert; and, through real launchers under DeepSpeed ZeRO-3, with EP and
without (plain ZeRO-3), through the Trainer and through accelerate, every rank's logged figures equal the count of a
single process trained on the same global batches, exactly (they are integers).
"""

import os
import shutil
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
from parameterized import parameterized

from tests.fork_utils.launcher import CONFIG_DIR, launch
from tests.fork_utils.tiny_models import make_checkpoint, tiny_config


SCRIPT = Path(__file__).parent / "scripts" / "expert_load.py"
ACCELERATE_ZERO3 = CONFIG_DIR / "accelerate_deepspeed_zero3.yaml"
TIMEOUT = 180
PREFIX = "expert_load"
# The suite runs two launches (its time budget); this adds the other entry / EP combinations and 4 ranks
FULL_SWEEP_ENV = "EPFORK_EXPERT_LOAD_FULL"
FULL_SWEEP = os.environ.get(FULL_SWEEP_ENV) == "1"


def tiny_model(seed=0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", **overrides), dtype=torch.float32)


def route_to_first_experts(model, scale=1.0):
    """Make expert 0 win every token's first choice and expert 1 every second one, in every MoE layer: a constant
    positive feature in every embedding (dimension 0) reaches each router through the residual stream; router row 0
    reads it positively, row 1 not at all, the others negatively (logits about +-8: apart after the softmax too)."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 10.0
        for layer in model.model.layers:
            weight = layer.mlp.gate.weight
            weight.zero_()
            weight[0, 0], weight[2:, 0] = scale, -scale
    return model


def routed_counts(model, input_ids) -> torch.Tensor:
    """Independent count (layers x experts) from the router logits the model returns and its own top-k."""
    top_k = model.config.num_experts_per_tok
    with torch.no_grad():
        router_logits = model(input_ids=input_ids, output_router_logits=True).router_logits
    counts = [torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=logits.shape[-1])
              for logits in router_logits]
    return torch.stack(counts)


def counts_from_logs(logs: dict, num_layers: int, num_experts: int, what="expert", size=None) -> torch.Tensor:
    size = size or num_experts
    return torch.tensor(
        [[logs[f"{PREFIX}/layer_{layer}/{what}_{i}_tokens"] for i in range(size)] for layer in range(num_layers)]
    ).long()


class ExpertLoadArithmeticTest(unittest.TestCase):
    def test_load_imbalance(self):
        from transformers.integrations.expert_load_metrics import load_imbalance

        loads = torch.tensor([[4, 4, 4, 4], [16, 0, 0, 0], [6, 2, 0, 0], [0, 0, 0, 0]])
        self.assertEqual(load_imbalance(loads).tolist(), [1.0, 4.0, 3.0, 0.0])

    def test_normalized_entropy(self):
        from transformers.integrations.expert_load_metrics import normalized_entropy_sum

        uniform = torch.zeros(3, 8)
        self.assertAlmostEqual(float(normalized_entropy_sum(uniform)), 3.0, places=6)
        certain = torch.tensor([[100.0, 0.0, 0.0, 0.0]])
        self.assertAlmostEqual(float(normalized_entropy_sum(certain)), 0.0, places=6)
        # two equally likely experts out of 4: log 2 / log 4, per token
        halves = torch.tensor([[0.0, 0.0, -1e4, -1e4]] * 2)
        self.assertAlmostEqual(float(normalized_entropy_sum(halves)), 1.0, places=6)

    def test_dead_window(self):
        from transformers.integrations.expert_load_metrics import DeadExpertWindow

        window = DeadExpertWindow(window=3, num_layers=1, num_experts=3, start_step=0)
        active_0_and_1, active_0 = torch.tensor([[1, 1, 0]]), torch.tensor([[5, 0, 0]])
        self.assertEqual(window.update(1, active_0_and_1).tolist(), [[False, False, False]])  # too little history
        self.assertEqual(window.update(2, active_0).tolist(), [[False, False, False]])
        self.assertEqual(window.update(3, active_0).tolist(), [[False, False, True]])  # expert 2: none in steps 1-3
        self.assertEqual(window.update(4, active_0).tolist(), [[False, True, True]])  # expert 1: none in steps 2-4
        self.assertEqual(window.update(6, active_0_and_1).tolist(), [[False, False, True]])  # expert 1 came back
        # A logging interval longer than the window: dead means no token in the whole interval
        self.assertEqual(window.update(16, active_0).tolist(), [[False, True, True]])
        with self.assertRaisesRegex(ValueError, "at least 1 step"):
            DeadExpertWindow(window=0, num_layers=1, num_experts=3)

    def test_logs_per_layer_and_summary(self):
        from transformers.integrations.expert_load_metrics import ExpertLoadReport

        report = ExpertLoadReport(
            step=3, layer_labels=["layer_0", "layer_1"], counts=torch.tensor([[8, 0], [4, 4]]),
            router_entropy=torch.tensor([0.25, 0.75]), dead=torch.tensor([[False, True], [False, False]]),
            rank_loads=torch.tensor([[8, 0], [4, 4]]),
        )
        logs = report.as_logs(per_expert=True)
        self.assertEqual(logs[f"{PREFIX}/layer_0/expert_imbalance"], 2.0)
        self.assertEqual(logs[f"{PREFIX}/layer_0/ep_rank_imbalance"], 2.0)
        self.assertEqual(logs[f"{PREFIX}/layer_1/ep_rank_imbalance"], 1.0)
        self.assertEqual(logs[f"{PREFIX}/dead_experts"], 1.0)
        self.assertEqual(logs[f"{PREFIX}/router_entropy_mean"], 0.5)
        self.assertEqual(logs[f"{PREFIX}/layer_1/expert_1_tokens"], 4.0)
        self.assertEqual(logs[f"{PREFIX}/layer_0/rank_1_tokens"], 0.0)
        self.assertEqual(logs[f"{PREFIX}/routed_tokens"], 16.0)
        self.assertTrue(all(isinstance(value, float) for value in logs.values()))
        self.assertNotIn(f"{PREFIX}/layer_0/expert_0_tokens", report.as_logs(per_expert=False))


class ExpertLoadSingleProcessTest(unittest.TestCase):
    def train_steps(self, model, batches, **tracker_options):
        from transformers.integrations.expert_load_metrics import track_expert_load

        tracker = track_expert_load(model, **tracker_options)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        reports, expected = [], []
        for step, batch in enumerate(batches, start=1):
            model.eval()
            expected.append(routed_counts(model, batch))  # evaluation forwards: not counted
            model.train()
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            reports.append(tracker.collect_report(step))
        tracker.remove()
        return reports, expected

    @parameterized.expand([("plain",), ("gradient_checkpointing",)])
    def test_counts_equal_the_routers_top_k(self, mode):
        model = tiny_model(seed=3)
        if mode == "gradient_checkpointing":
            model.gradient_checkpointing_enable()
        batches = [torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
        reports, expected = self.train_steps(model, batches)
        for step, (report, want) in enumerate(zip(reports, expected)):
            self.assertTrue(torch.equal(report.counts, want), f"step {step}: {report.counts} vs {want}")
            self.assertEqual(report.counts.sum(dim=-1).tolist(), [4 * 12 * 2] * 2)
            self.assertTrue(((report.router_entropy > 0.5) & (report.router_entropy <= 1.0)).all())
            self.assertIsNone(report.rank_loads)

    def test_model_routed_to_one_expert(self):
        """Expert 0 takes every token's first choice and expert 1 every second one: experts 2 and 3 are dead once the
        window has passed, 0 and 1 carry twice their share, and the router is nearly certain."""
        model = route_to_first_experts(tiny_model(seed=4))
        batches = [torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
        reports, expected = self.train_steps(model, batches, dead_window=2)
        tokens = 2 * 12
        for report, want in zip(reports, expected):
            self.assertEqual(report.counts.tolist(), [[tokens, tokens, 0, 0]] * 2)
            self.assertTrue(torch.equal(report.counts, want))
            self.assertEqual(report.expert_imbalance.tolist(), [2.0, 2.0])
            self.assertLess(float(report.router_entropy.max()), 0.1)
        self.assertEqual(reports[0].dead.sum().item(), 0)  # one step of history, window 2
        self.assertEqual(reports[1].dead.tolist(), [[False, False, True, True]] * 2)
        logs = reports[2].as_logs()
        self.assertEqual(logs[f"{PREFIX}/dead_experts"], 4.0)
        self.assertEqual(logs[f"{PREFIX}/expert_imbalance_max"], 2.0)

    def test_refuses_a_model_without_moe_layers(self):
        from transformers import AutoModelForCausalLM
        from transformers.integrations.expert_load_metrics import track_expert_load

        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
        with self.assertRaisesRegex(ValueError, "no MoE layer"):
            track_expert_load(model)


@pytest.mark.multiprocess
class ExpertLoadDistributedTest(unittest.TestCase):
    """Every rank's logged figures against one process on the same global batches. The ranks train with SGD at lr 0
    (full DeepSpeed steps, weights unchanged), so the reference routes with the same weights, exactly."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="expert-load-"))
        cls.checkpoint = make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe", seed=31).path

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def run_ranks(self, entry, ep_size, nproc=2, steps=3, extra=()):
        args = ["--checkpoint", self.checkpoint, "--entry", entry, "--ep-size", ep_size, "--steps", steps, *extra]
        launcher = "accelerate" if entry == "accelerate" else "torchrun"
        config = ACCELERATE_ZERO3 if launcher == "accelerate" else None
        result = launch(SCRIPT, args, nproc=nproc, launcher=launcher, accelerate_config=config, timeout=TIMEOUT)
        return result.check().results()

    def reference(self, per_rank_inputs):
        """Per step: the single-process tracker's report on the global batch, and each rank's rows counted apart."""
        from transformers import AutoModelForCausalLM
        from transformers.integrations.expert_load_metrics import track_expert_load

        model = AutoModelForCausalLM.from_pretrained(self.checkpoint, dtype=torch.float32)
        tracker = track_expert_load(model, dead_window=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        reports, rank_counts = [], []
        for step, inputs in enumerate(per_rank_inputs, start=1):
            model.eval()
            rank_counts.append([routed_counts(model, rows) for rows in inputs])
            model.train()
            batch = torch.cat(inputs)
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            reports.append(tracker.collect_report(step))
        return reports, rank_counts

    def check_against_reference(self, results, ep_size):
        nproc, num_layers, num_experts = len(results), 2, 4
        steps = len(results[0]["logs"])
        per_rank_inputs = [[results[r]["inputs"][s] for r in range(nproc)] for s in range(steps)]
        for s in range(steps):
            self.assertEqual(len({tuple(rows.flatten().tolist()) for rows in per_rank_inputs[s]}), nproc,
                             f"step {s}: the ranks did not feed batches of their own")
        reports, rank_counts = self.reference(per_rank_inputs)
        for s, (report, counts_per_rank) in enumerate(zip(reports, rank_counts)):
            self.assertTrue(torch.equal(report.counts, sum(counts_per_rank)), f"step {s}: the reference miscounts")
            for rank, outcome in results.items():
                logs = outcome["logs"][s]
                got = counts_from_logs(logs, num_layers, num_experts)
                self.assertTrue(torch.equal(got, report.counts), f"rank {rank} step {s}: {got} vs {report.counts}")
                for layer in range(num_layers):
                    key = f"{PREFIX}/layer_{layer}"
                    want_entropy = float(report.router_entropy[layer])
                    self.assertAlmostEqual(logs[f"{key}/router_entropy"], want_entropy, places=5)
                    self.assertEqual(logs[f"{key}/expert_imbalance"], float(report.expert_imbalance[layer]))
                    self.assertEqual(logs[f"{key}/dead_experts"], float(report.dead[layer].sum()))
                if ep_size == 1:
                    self.assertFalse(any("rank_" in key for key in logs), "EP-rank figures without EP")
                    continue
                # rank r runs experts [r % P * E/P, ...) on the tokens of the ranks of its expert-parallel group
                expected_loads = torch.zeros(num_layers, nproc, dtype=torch.long)
                per_rank = num_experts // ep_size
                for r in range(nproc):
                    group = range(r // ep_size * ep_size, (r // ep_size + 1) * ep_size)
                    experts = slice(r % ep_size * per_rank, (r % ep_size + 1) * per_rank)
                    expected_loads[:, r] = sum(counts_per_rank[g][:, experts].sum(dim=-1) for g in group)
                got_loads = counts_from_logs(logs, num_layers, num_experts, what="rank", size=nproc)
                self.assertTrue(torch.equal(got_loads, expected_loads), f"rank {rank} step {s}: {got_loads}")

    def check_trainer(self, ep_size, extra=()):
        results = self.run_ranks("trainer", ep_size, extra=extra)
        for rank, outcome in results.items():
            order = outcome["callback_order"]
            self.assertEqual(order[order.index("DefaultFlowCallback") + 1], "ExpertLoadMetricsCallback", order)
            self.assertTrue(outcome["hooks_removed"])
            self.assertEqual(len(outcome["logs"]), 3, f"rank {rank}: a training log without the figures")
        self.check_against_reference(results, ep_size)

    # In the suite: the Trainer with EP (under ZeRO-3 and ZeRO-2), accelerate without (3 launches). `make test-expert-load` adds the other two
    # combinations and 4 ranks.

    def test_trainer_with_ep_logs_the_single_process_counts(self):
        self.check_trainer(ep_size=2)

    def test_trainer_with_ep_at_zero_stage_2_logs_the_single_process_counts(self):
        """EP under ZeRO stage 2 (issue 24): the same figures."""
        self.check_trainer(ep_size=2, extra=["--stage", 2])

    def test_accelerate_without_ep_collects_the_single_process_counts(self):
        self.check_against_reference(self.run_ranks("accelerate", ep_size=1), ep_size=1)

    @unittest.skipUnless(FULL_SWEEP, f"{FULL_SWEEP_ENV}=1 (make test-expert-load)")
    def test_trainer_without_ep_logs_the_single_process_counts(self):
        self.check_trainer(ep_size=1)

    @unittest.skipUnless(FULL_SWEEP, f"{FULL_SWEEP_ENV}=1 (make test-expert-load)")
    def test_accelerate_with_ep_collects_the_single_process_counts(self):
        self.check_against_reference(self.run_ranks("accelerate", ep_size=2), ep_size=2)

    @pytest.mark.slow
    @unittest.skipUnless(FULL_SWEEP, f"{FULL_SWEEP_ENV}=1 (make test-expert-load)")
    def test_four_ranks_ep_2_by_expert_data_parallel_2(self):
        self.check_against_reference(self.run_ranks("accelerate", 2, nproc=4, steps=2), ep_size=2)

    @unittest.skipUnless(FULL_SWEEP, f"{FULL_SWEEP_ENV}=1 (make test-expert-load)")
    def test_negative_control_without_the_all_reduce(self):
        """Each rank then logs the counts of its own rows: the comparison must catch it."""
        results = self.run_ranks("accelerate", ep_size=2, steps=2, extra=["--no-reduce"])
        with self.assertRaisesRegex(AssertionError, "rank 0 step 0"):
            self.check_against_reference(results, ep_size=2)
