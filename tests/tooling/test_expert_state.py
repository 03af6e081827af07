"""The helpers that compare what expert-parallel ranks hold with whole tensors."""

import unittest

import torch

from tests.fork_utils.expert_state import assemble_experts, expected_local, max_abs_diff, max_diff


class ExpertStateTest(unittest.TestCase):
    def test_ranks_hold_consecutive_expert_slices_and_assemble_back(self):
        full = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 8 experts
        dense = torch.ones(2)
        # 4 ranks, EP 2: ranks 0 and 2 hold experts 0-3, ranks 1 and 3 experts 4-7
        results = {
            rank: {"ep_rank": rank % 2, "state": {"mlp.experts.w": expected_local("mlp.experts.w", full, rank, 2),
                                                   "norm.weight": expected_local("norm.weight", dense, rank, 2)}}
            for rank in range(4)
        }
        self.assertTrue(torch.equal(results[3]["state"]["mlp.experts.w"], full[4:]))
        self.assertTrue(torch.equal(results[2]["state"]["mlp.experts.w"], full[:4]))
        whole = assemble_experts(results, "state", ep_size=2)
        self.assertTrue(torch.equal(whole["mlp.experts.w"], full))
        self.assertTrue(torch.equal(whole["norm.weight"], dense))

    def test_max_diff_names_the_worst_tensor(self):
        a = {"x": torch.zeros(3), "y": torch.zeros(2)}
        b = {"x": torch.tensor([0.0, 0.5, 0.0]), "y": torch.tensor([0.0, -2.0])}
        self.assertEqual(max_diff(a, b), (2.0, "y"))
        self.assertEqual(max_abs_diff(torch.zeros(0), torch.zeros(0)), 0.0)
