"""A causal-LM model tester and test base for upstream's common test mixins, written for this fork's upstream gate.

utils/upstream_tests.py places this module at `tests/causal_lm_tester.py` of the extracted upstream tests (the
sdist ships the mixins, not the tester they are written against). A family's test module subclasses both:

    class Qwen3MoeModelTester(CausalLMModelTester):
        config_class = Qwen3MoeConfig
        base_model_class = Qwen3MoeModel
        causal_lm_class = Qwen3MoeForCausalLM
        config_overrides = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)

    class Qwen3MoeModelTest(CausalLMModelTest, unittest.TestCase):
        model_tester_class = Qwen3MoeModelTester

`CausalLMModelTester` provides what the mixins read from `self.model_tester`: `get_config()`,
`prepare_config_and_inputs_for_common()` (config, {input_ids, attention_mask}), the sizes (`batch_size`,
`seq_length`, `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `vocab_size`), `is_training`, and the model
classes (`base_model_class`, `causal_lm_class`, `sequence_classification_class`, ...). `CausalLMModelTest` combines
`ModelTesterMixin`, the generation marker mixin, `TrainingTesterMixin`, `TensorParallelTesterMixin`,
`ExpertParallelTesterMixin`, `FSDPTesterMixin` and the gate's own `Zero3CpuTesterMixin`, plus a config test through
upstream's `ConfigTester`.
"""

from __future__ import annotations

import copy

from transformers import is_torch_available

from .test_configuration_common import ConfigTester
from .test_expert_parallel_mixin import ExpertParallelTesterMixin
from .test_fsdp_mixin import FSDPTesterMixin
from .test_modeling_common import ModelTesterMixin, ids_tensor
from .test_tensor_parallel_mixin import TensorParallelTesterMixin
from .test_training_mixin import TrainingTesterMixin
from .generation.test_utils import GenerationTesterMixin
from .zero3_cpu_mixin import Zero3CpuTesterMixin


if is_torch_available():
    import torch


# Sizes shared by every family (a family adds or changes its own in `config_overrides`). The vocabulary does not divide
# by 2 on purpose: tensor-parallel tests then shard `lm_head` unevenly, as real vocabularies need.
COMMON_CONFIG = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


class CausalLMModelTester:
    config_class = None
    base_model_class = None
    causal_lm_class = None
    sequence_classification_class = None
    token_classification_class = None
    question_answering_class = None
    config_overrides: dict = {}

    def __init__(self, parent, batch_size: int = 2, seq_length: int = 7, is_training: bool = True, **overrides):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.config_kwargs = {**COMMON_CONFIG, **self.config_overrides, **overrides}
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            setattr(self, name, self.config_kwargs[name])

    @property
    def all_model_classes(self) -> tuple:
        classes = (
            self.base_model_class,
            self.causal_lm_class,
            self.sequence_classification_class,
            self.token_classification_class,
            self.question_answering_class,
        )
        return tuple(c for c in classes if c is not None)

    def get_config(self):
        return self.config_class(**copy.deepcopy(self.config_kwargs))

    def prepare_config_and_inputs(self):
        # Token ids from 3 up: no pad / bos / eos in the body of a sequence.
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 3) + 3
        # A left-padded batch: every row attends to a suffix of at least half its length.
        attention_mask = torch.ones(self.batch_size, self.seq_length, dtype=torch.long)
        for row in range(1, self.batch_size):
            attention_mask[row, : min(row, self.seq_length // 2)] = 0
        return self.get_config(), input_ids.to(torch.long), attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}


class CausalLMModelTest(
    ModelTesterMixin,
    GenerationTesterMixin,
    TrainingTesterMixin,
    TensorParallelTesterMixin,
    ExpertParallelTesterMixin,
    FSDPTesterMixin,
    Zero3CpuTesterMixin,
):
    """Base of a family's test class (with `unittest.TestCase`). `ModelTesterMixin` comes first: its plain
    `model_tester = None` shadows the abstract property the other mixins declare, so `setUp` can assign it."""

    model_tester_class = None
    # MoE routers send no token to some experts in a tiny batch: those get no gradient.
    test_all_params_have_gradient = False

    @property
    def all_model_classes(self):
        return self.model_tester.all_model_classes

    def setUp(self):
        self.model_tester = self.model_tester_class(self)
        self.config_tester = ConfigTester(self, config_class=self.model_tester.config_class, hidden_size=37)

    def test_config(self):
        self.config_tester.run_common_tests()
