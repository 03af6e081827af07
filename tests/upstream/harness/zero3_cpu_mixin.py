"""DeepSpeed ZeRO-3 on CPU ranks: where upstream's common tests need a GPU to reach ZeRO-3 code, written for this
fork's upstream-test gate (utils/upstream_tests.py places it at `tests/zero3_cpu_mixin.py` of the extracted tests).

Upstream's ZeRO-3 tests in `ModelTesterMixin` (`test_resize_tokens_embeddings_with_deepspeed*`,
`test_resize_embeddings_untied_with_deepspeed*`) require CUDA devices, and none of them loads a checkpoint under
ZeRO-3: the fork's shard-on-read path (`from_pretrained` of a model without expert parallelism under ZeRO-3) and its
EP-under-ZeRO-3 load are out of their reach. The tests here run on 2 CPU ranks (gloo, `DS_ACCELERATOR=cpu`) with
DeepSpeed's ZeRO-3 config registered through `HfDeepSpeedConfig`, as upstream's `_deepspeed_zero3` helper does:

- `test_zero3_cpu_from_pretrained_{one_file,sharded}`: load a tiny checkpoint (save_pretrained's layout: per-expert
  tensors that the conversion mapping fuses) under ZeRO-3; every parameter must be ZeRO-partitioned, every gathered
  parameter and every buffer equal to a load without DeepSpeed, and the logits computed with the parameters gathered
  equal to that load's;
- `test_zero3_cpu_expert_parallel_from_pretrained`: the same with `DistributedConfig(ep_size=2)`: each rank holds
  its block of experts (the fork hands them to DeepSpeed as plain per-rank tensors, dense parameters are partitioned
  at `deepspeed.initialize`), equal to that block of a load without DeepSpeed, and the EP forward gives the same
  logits. Pristine 5.24.0 refuses the combination: this test marks what the fork adds, it cannot be a regression;
- `test_resize_tokens_embeddings_with_deepspeed_cpu`, `test_resize_embeddings_untied_with_deepspeed_cpu`: upstream's
  own test bodies (`test_resize_tokens_embeddings`, `test_resize_embeddings_untied`) on every rank under ZeRO-3, as
  upstream's `*_with_deepspeed_multi_gpu` variants run them on GPUs.

Every rank runs in a fresh process started by the harness (`run_distributed`), under its timeout.
"""

from __future__ import annotations

import importlib
import os
import tempfile

from parameterized import parameterized

from transformers import set_seed
from transformers.testing_utils import require_deepspeed

from .distributed_testing_utils import run_distributed


ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}
WORLD_SIZE = 2


def _start_deepspeed():
    """DeepSpeed on the harness' process group (the CPU accelerator on a machine without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return deepspeed


def _expected_local(name, gathered, reference, rank, world_size):
    """The reference tensor a rank's gathered parameter stands for: all of it, or (expert parallelism) this rank's
    contiguous block of experts along dim 0."""
    if gathered.shape == reference.shape:
        return reference
    if gathered.dim() == reference.dim() and gathered.shape[1:] == reference.shape[1:]:
        block = gathered.shape[0]
        assert block * world_size == reference.shape[0], f"{name}: {tuple(gathered.shape)} vs {tuple(reference.shape)}"
        return reference.narrow(0, rank * block, block)
    raise AssertionError(f"{name}: gathered shape {tuple(gathered.shape)}, reference {tuple(reference.shape)}")


def _zero3_load_impl(rank, model_path, model_class, expert_parallel, atol, rtol):
    import torch
    import torch.distributed as dist

    deepspeed = _start_deepspeed()
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    world_size = dist.get_world_size()
    reference = model_class.from_pretrained(model_path).eval()
    reference_state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    set_seed(0)
    input_ids = torch.randint(3, reference.config.get_text_config().vocab_size, (2, 16))
    with torch.no_grad():
        reference_logits = reference(input_ids).logits
    del reference

    ds_config = HfDeepSpeedConfig(dict(ZERO3_CONFIG))  # noqa: F841  (transformers holds it weakly: keep it alive)
    try:
        assert is_deepspeed_zero3_enabled(), "HfDeepSpeedConfig did not register ZeRO-3"
        kwargs = {}
        if expert_parallel:
            from transformers.distributed.configuration_utils import DistributedConfig

            kwargs["distributed_config"] = DistributedConfig(ep_size=world_size)
        model = model_class.from_pretrained(model_path, **kwargs).eval()
        params = dict(model.named_parameters())
        partitioned = {name: p for name, p in params.items() if hasattr(p, "ds_id")}
        if not expert_parallel:
            unpartitioned = sorted(set(params) - set(partitioned))
            assert not unpartitioned, f"parameters not partitioned by ZeRO-3: {unpartitioned}"

        mismatches, expert_blocks = [], []
        with deepspeed.zero.GatheredParameters(list(partitioned.values())):
            for name, param in params.items():
                if name not in reference_state:
                    mismatches.append(f"{name}: not in the reference model")
                    continue
                expected = _expected_local(name, param.data, reference_state[name], rank, world_size)
                if expected is not reference_state[name]:
                    expert_blocks.append(name)
                if not torch.equal(param.data.cpu(), expected.cpu()):
                    diff = (param.data.cpu().float() - expected.cpu().float()).abs().max().item()
                    mismatches.append(f"{name}: max abs diff {diff}")
            for name, buffer in model.named_buffers():
                if name in reference_state and not torch.equal(buffer.cpu(), reference_state[name].cpu()):
                    mismatches.append(f"buffer {name} differs")
            with torch.no_grad():
                logits = model(input_ids).logits
            if not torch.allclose(logits, reference_logits, atol=atol, rtol=rtol):
                diff = (logits - reference_logits).abs().max().item()
                mismatches.append(f"logits differ from a load without DeepSpeed: max abs diff {diff}")
        if expert_parallel and not expert_blocks:
            mismatches.append("expert parallelism: every rank holds every expert")
        assert not mismatches, f"rank {rank}: ZeRO-3 load differs from a plain load:\n  " + "\n  ".join(mismatches)
    finally:
        unset_hf_deepspeed_config()
    dist.barrier()


def _upstream_test_under_zero3_impl(rank, module_name, class_name, method_name):
    """Run one of upstream's `ModelTesterMixin` test bodies on this rank with ZeRO-3 registered."""
    _start_deepspeed()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    test_class = getattr(importlib.import_module(module_name), class_name)
    case = test_class(method_name)
    case.setUp()
    ds_config = HfDeepSpeedConfig(dict(ZERO3_CONFIG))  # noqa: F841
    try:
        getattr(case, method_name)()
    finally:
        unset_hf_deepspeed_config()
        case.doCleanups()


class Zero3CpuTesterMixin:
    """ZeRO-3 tests on CPU ranks, for a test class that also has `ModelTesterMixin` and a causal-LM model tester."""

    zero3_cpu_atol: float = 1e-5
    zero3_cpu_rtol: float = 1e-5

    def _skip_if_zero3_cpu_not_supported(self):
        import torch

        from transformers.integrations.deepspeed import is_deepspeed_available

        if not is_deepspeed_available():
            self.skipTest("DeepSpeed is not installed")
        if torch.cuda.is_available():
            self.skipTest("the CPU variant of upstream's ZeRO-3 tests: upstream's GPU tests cover this machine")
        if (os.cpu_count() or 1) < WORLD_SIZE:
            self.skipTest(f"needs {WORLD_SIZE} CPUs")
        if getattr(self.model_tester, "causal_lm_class", None) is None:
            self.skipTest("the model tester has no causal_lm_class")

    def _zero3_checkpoint(self, tmp_dir, max_shard_size=None):
        config = self.model_tester.get_config()
        set_seed(42)
        model = self.model_tester.causal_lm_class(config)
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(tmp_dir, **kwargs)

    @parameterized.expand([("one_file", None), ("sharded", "20KB")])
    @require_deepspeed
    def test_zero3_cpu_from_pretrained(self, _, max_shard_size):
        self._skip_if_zero3_cpu_not_supported()
        with tempfile.TemporaryDirectory() as tmp_dir:
            self._zero3_checkpoint(tmp_dir, max_shard_size)
            run_distributed(world_size=WORLD_SIZE)(_zero3_load_impl)(
                tmp_dir, self.model_tester.causal_lm_class, False, self.zero3_cpu_atol, self.zero3_cpu_rtol
            )

    @require_deepspeed
    def test_zero3_cpu_expert_parallel_from_pretrained(self):
        self._skip_if_zero3_cpu_not_supported()
        config = self.model_tester.get_config().get_text_config()
        if getattr(config, "base_model_ep_plan", None) is None:
            self.skipTest("Model does not have an expert parallel plan (base_model_ep_plan)")
        with tempfile.TemporaryDirectory() as tmp_dir:
            self._zero3_checkpoint(tmp_dir)
            run_distributed(world_size=WORLD_SIZE)(_zero3_load_impl)(
                tmp_dir, self.model_tester.causal_lm_class, True, self.zero3_cpu_atol, self.zero3_cpu_rtol
            )

    def _run_upstream_test_under_zero3(self, method_name):
        self._skip_if_zero3_cpu_not_supported()
        if not self.test_resize_embeddings:
            self.skipTest(reason="test_resize_embeddings is set to `False`")
        cls = type(self)
        run_distributed(world_size=WORLD_SIZE)(_upstream_test_under_zero3_impl)(
            cls.__module__, cls.__qualname__, method_name
        )

    @require_deepspeed
    def test_resize_tokens_embeddings_with_deepspeed_cpu(self):
        self._run_upstream_test_under_zero3("test_resize_tokens_embeddings")

    @require_deepspeed
    def test_resize_embeddings_untied_with_deepspeed_cpu(self):
        self._run_upstream_test_under_zero3("test_resize_embeddings_untied")

