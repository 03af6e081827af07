"""The all-to-all EP path runs the experts without sentinel masks (patch 0015), in one process on a 1-rank group."""

import unittest

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from transformers import Qwen3MoeConfig
from transformers.distributed.expert_parallel import AllReduceEP, AllToAllEP
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts


def tiny_experts() -> Qwen3MoeExperts:
    config = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(config)
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.2)
    # What `MoEParamShard` sets when it splits the experts over an EP group.
    experts._is_expert_parallel = True
    return experts


def routing(num_tokens: int = 12, num_experts: int = 4, top_k: int = 2):
    torch.manual_seed(1)
    hidden_states = torch.randn(num_tokens, 16, requires_grad=True)
    top_k_index = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    top_k_weights = torch.softmax(torch.randn(num_tokens, top_k), dim=-1).requires_grad_()
    return hidden_states, top_k_index, top_k_weights


class AllToAllEPSentinelMasksTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.started_group = not dist.is_initialized()
        if cls.started_group:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        cls.mesh = init_device_mesh("cpu", (1,))

    @classmethod
    def tearDownClass(cls):
        if cls.started_group:
            dist.destroy_process_group()

    def record_flag(self, implementation) -> list[bool]:
        """The experts' `_is_expert_parallel` each time the implementation runs them."""
        seen, run_experts = [], implementation.experts_forward

        def recording_forward(*args):
            seen.append(run_experts.__self__._is_expert_parallel)
            return run_experts(*args)

        implementation.experts_forward = recording_forward
        return seen

    def test_all_to_all_runs_the_experts_unmasked_and_restores_the_flag(self):
        experts = tiny_experts()
        implementation = AllToAllEP(experts, self.mesh, self.mesh)
        seen = self.record_flag(implementation)
        hidden_states, top_k_index, top_k_weights = routing()

        output = implementation(hidden_states, top_k_index, top_k_weights)

        self.assertEqual(seen, [False])
        self.assertTrue(experts._is_expert_parallel, "the flag must be restored for the other EP paths")
        # On one rank the exchange is the identity: the result is the experts' own weighted top-k sum.
        with torch.no_grad():
            experts._is_expert_parallel = False
            expected = experts(hidden_states, top_k_index, top_k_weights)
            experts._is_expert_parallel = True
        self.assertLess((output - expected).abs().max().item(), 1e-6)
        output.sum().backward()
        self.assertTrue(torch.isfinite(hidden_states.grad).all())
        self.assertTrue(torch.isfinite(experts.gate_up_proj.grad).all())

    def test_flag_is_restored_when_the_experts_raise(self):
        experts = tiny_experts()
        implementation = AllToAllEP(experts, self.mesh, self.mesh)

        def failing_forward(*args):
            raise RuntimeError("experts failed")

        implementation.experts_forward = failing_forward
        with self.assertRaisesRegex(RuntimeError, "experts failed"):
            implementation(*routing())
        self.assertTrue(experts._is_expert_parallel)

    def test_all_reduce_keeps_the_sentinel_masks(self):
        experts = tiny_experts()
        implementation = AllReduceEP(experts, self.mesh, self.mesh)
        seen = self.record_flag(implementation)

        implementation(*routing())

        self.assertEqual(seen, [True])
