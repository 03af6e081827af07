"""`DistributedConfig` and the EP-under-ZeRO-3 decision point, in one process (no launcher needed).

The decision is taken from the `DistributedConfig` while a model is loaded and recorded on the model; a model answers
with that record afterwards, whatever DeepSpeed config is registered since (the 2-rank case of a model loaded before
`TrainingArguments(deepspeed=...)` is in tests/deepspeed/test_ep_zero3_load.py)."""

import os
import unittest
from unittest import mock

import torch
from parameterized import parameterized

from transformers.distributed import DistributedConfig
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.integrations.deepspeed_expert_parallel import (
    _refuse_models_not_handed_over,
    check_model_handed_over_to_deepspeed,
    is_expert_parallel_under_zero3,
    loads_with_zero3,
)


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

    @parameterized.expand([("zero3", 3, True), ("zero2", 2, True), ("zero1", 1, True), ("zero0", 0, False)])
    def test_deprecated_enable_expert_parallel_means_all_ranks(self, _name, stage, under_zero):
        keep = HfDeepSpeedConfig(zero_config(stage))  # noqa: F841
        with self.world(2):
            if under_zero:
                config = DistributedConfig(enable_expert_parallel=True)
                self.assertEqual(config.ep_size, 2, "enable_expert_parallel must not silently mean no EP")
                self.assertTrue(is_expert_parallel_under_zero3(config))
            else:
                # EP under DeepSpeed without ZeRO: a clear error on every rank rather than a wrongly trained model.
                with self.assertRaisesRegex(NotImplementedError, "needs ZeRO stage 1, 2 or 3, got stage 0"):
                    DistributedConfig(enable_expert_parallel=True)

    @parameterized.expand([("fp32_accumulation", "fp32", True), ("bf16_accumulation", "bf16", False)])
    def test_zero1_with_bf16_refuses_only_deepspeeds_bf16_optimizer(self, _name, accumulation, refused):
        """ZeRO-1 + bf16 + fp32 gradient accumulation (DeepSpeed's `BF16_Optimizer`, not run with EP) is refused."""
        config = {**zero_config(1), "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": accumulation}}
        keep = HfDeepSpeedConfig(config)  # noqa: F841
        with self.world(2):
            if refused:
                with self.assertRaisesRegex(NotImplementedError, "ZeRO stage 1 does not support bf16 with fp32"):
                    DistributedConfig(ep_size=2)
            else:
                self.assertEqual(DistributedConfig(ep_size=2).ep_size, 2)

    def test_decision_point_is_false_without_zero3_or_ep(self):
        self.assertFalse(is_expert_parallel_under_zero3(None))
        with self.world(2):
            config = DistributedConfig(ep_size=2, fsdp_size=2)
        self.assertFalse(is_expert_parallel_under_zero3(config), "no DeepSpeed config is registered")
        keep = HfDeepSpeedConfig(zero_config(3))  # noqa: F841
        self.assertTrue(is_expert_parallel_under_zero3(config))
        with self.world(2):
            self.assertFalse(is_expert_parallel_under_zero3(DistributedConfig(tp_size=2)))

    def test_a_model_answers_with_the_decision_recorded_at_load(self):
        keep = HfDeepSpeedConfig(zero_config(3))  # noqa: F841
        model = torch.nn.Linear(2, 2)
        self.assertFalse(is_expert_parallel_under_zero3(model), "nothing recorded: not loaded with EP under ZeRO-3")
        self.assertTrue(loads_with_zero3(model))
        self.assertFalse(loads_with_zero3(model, is_quantized=True))
        model._expert_parallel_under_zero3 = True  # what `maybe_distribute_model` records
        self.assertTrue(is_expert_parallel_under_zero3(model))
        self.assertFalse(loads_with_zero3(model))
        unset_hf_deepspeed_config()
        self.assertTrue(is_expert_parallel_under_zero3(model), "the record answers, not the DeepSpeed config now")

    def test_wrapper_forwarding_attribute_lookups_answers_for_its_model(self):
        class Wrapper(torch.nn.Module):  # as PEFT's models forward look-ups to the model they wrap
            def __init__(self, model):
                super().__init__()
                self.model = model

            def __getattr__(self, name):
                try:
                    return super().__getattr__(name)
                except AttributeError:
                    return getattr(self.model, name)

        model = torch.nn.Linear(2, 2)
        model._expert_parallel_under_zero3 = True
        self.assertTrue(is_expert_parallel_under_zero3(Wrapper(model)))

    def test_trainer_refuses_an_expert_parallel_model_deepspeed_does_not_own(self):
        class ExpertParallelModel(torch.nn.Linear):
            has_ep = True

        keep = HfDeepSpeedConfig(zero_config(3))  # noqa: F841 (registered after the load: changes nothing)
        model = ExpertParallelModel(2, 2)
        with self.assertRaisesRegex(ValueError, r"while no DeepSpeed ZeRO-3 config was registered.*before `from_pretrained`"):
            check_model_handed_over_to_deepspeed(model)
        model._expert_parallel_under_zero3 = True
        check_model_handed_over_to_deepspeed(model)
        check_model_handed_over_to_deepspeed(torch.nn.Linear(2, 2))  # no expert parallelism: nothing to refuse

    def test_deepspeed_engine_refuses_an_expert_parallel_model_it_does_not_own(self):
        """The engine's `__init__` checks its model first, however it is passed, and stays wrapped once."""

        class ExpertParallelModel(torch.nn.Linear):
            has_ep = True

        class Engine:  # DeepSpeedEngine's signature: `deepspeed.initialize` passes the model by keyword
            def __init__(self, args, model, optimizer=None):
                self.module = model

        _refuse_models_not_handed_over(Engine)
        wrapped = Engine.__init__
        _refuse_models_not_handed_over(Engine)
        self.assertIs(Engine.__init__, wrapped)

        model = ExpertParallelModel(2, 2)
        for build in (lambda: Engine(None, model), lambda: Engine(args=None, model=model, optimizer=None)):
            with self.assertRaisesRegex(ValueError, r"while no DeepSpeed ZeRO-3 config was registered.*`Accelerator`"):
                build()
        model._expert_parallel_under_zero3 = True  # handed over at load
        self.assertIs(Engine(args=None, model=model).module, model)
        dense = torch.nn.Linear(2, 2)
        self.assertIs(Engine(None, dense).module, dense)
