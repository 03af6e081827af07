"""Stand-in for upstream's `tests/utils/test_configuration_utils.py`, written for this fork's upstream-test gate.

utils/upstream_tests.py places it at `tests/utils/test_configuration_utils.py` of the extracted upstream tests:
`ConfigTester.check_config_arguments_init` builds a config from `config_common_kwargs` and checks that every value
was kept. These are attributes every `PreTrainedConfig` has, each set to a value other than its default (the test
expects `dtype` to come back as `torch.float16`).
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["GateTestModel"],
    "id2label": {0: "negative", 1: "neutral", 2: "positive"},
    "label2id": {"negative": 0, "neutral": 1, "positive": 2},
    "problem_type": "single_label_classification",
}
