"""`DistributedConfig` and the EP-under-ZeRO-3 decision point, in one process (no launcher needed)."""

import os
import unittest
from unittest import mock

from parameterized import parameterized

from transformers.distributed import DistributedConfig
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import is_expert_parallel_under_zero3, unset_hf_deepspeed_config


def zero_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}


class DistributedConfigUnderDeepSpeedTest(unittest.TestCase):
    def setUp(self):
        self.addCleanup(unset_hf_deepspeed_config)

    def world(self, size: int):
        return mock.patch.dict(os.environ, {"WORLD_SIZE": str(size)})

    @parameterized.expand([(2, 2, 2, 1), (4, 2, 4, 2), (4, 4, 4, 1)])
    def test_ep_size_alone_is_enough_under_zero3(self, world_size, ep_size, fsdp_size, expert_data_parallel):
        keep = HfDeepSpeedConfig(zero_config(3))  # noqa: F841
        with self.world(world_size):
            config = DistributedConfig(ep_size=ep_size)
        self.assertEqual((config.ep_size, config.fsdp_size, config.tp_size), (ep_size, fsdp_size, 1))
        self.assertEqual(config.fsdp_size * config.tp_size // config.ep_size, expert_data_parallel)
        self.assertTrue(is_expert_parallel_under_zero3(config))

    def test_ep_size_alone_without_deepspeed_keeps_upstreams_error(self):
        with self.world(2), self.assertRaisesRegex(ValueError, r"`ep_size` \(2\) must divide `fsdp_size \* tp_size`"):
            DistributedConfig(ep_size=2)

    def test_explicit_fsdp_size_is_kept(self):
        keep = HfDeepSpeedConfig(zero_config(3))  # noqa: F841
        with self.world(4):
            config = DistributedConfig(ep_size=2, fsdp_size=2)
        self.assertEqual(config.fsdp_size, 2)

    @parameterized.expand([("zero3", 3, True), ("zero2", 2, False)])
    def test_deprecated_enable_expert_parallel_means_all_ranks(self, _name, stage, under_zero3):
        keep = HfDeepSpeedConfig(zero_config(stage))  # noqa: F841
        with self.world(2):
            if under_zero3:
                config = DistributedConfig(enable_expert_parallel=True)
                self.assertEqual(config.ep_size, 2, "enable_expert_parallel must not silently mean no EP")
                self.assertTrue(is_expert_parallel_under_zero3(config))
            else:
                # EP under another ZeRO stage: a clear error on every rank rather than a wrongly trained model.
                with self.assertRaisesRegex(NotImplementedError, "needs ZeRO stage 3, got stage 2"):
                    DistributedConfig(enable_expert_parallel=True)

    def test_decision_point_is_false_without_zero3_or_ep(self):
        self.assertFalse(is_expert_parallel_under_zero3(None))
        with self.world(2):
            config = DistributedConfig(ep_size=2, fsdp_size=2)
        self.assertFalse(is_expert_parallel_under_zero3(config), "no DeepSpeed config is registered")
        keep = HfDeepSpeedConfig(zero_config(3))  # noqa: F841
        self.assertTrue(is_expert_parallel_under_zero3(config))
        with self.world(2):
            self.assertFalse(is_expert_parallel_under_zero3(DistributedConfig(tp_size=2)))
