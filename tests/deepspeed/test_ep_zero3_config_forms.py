"""Every check of the fork that reads a DeepSpeed config, against each form users write the config in (issue 23).

`accelerate config` writes `offload_param_device: none` and `offload_optimizer_device: none` into its yaml, and
accelerate turns them into `offload_param: {device: none}` sections; the engine then returns a config object for
`zero_offload_param()`, truthy although nothing is offloaded. `load_checkpoint_on_new_topology` once refused every
resume under that config on the section's truth. Here each form goes through the code users' runs go through, in one
process (the Trainer's in a child process, which it starts a process group in):

- accelerate's generated yaml: accelerate's own `launch_command` (stopped where it would start the ranks) gives the
  environment of a rank, from which `DeepSpeedPlugin` builds the config, as `Accelerator()` does in each rank;
- a DeepSpeed JSON file (`docs/configs/ds_zero3.json`, with the offload sections of each case added);
- an accelerate yaml naming that JSON file (`deepspeed_config_file`, as `docs/configs/accelerate_deepspeed_zero3.yaml`);
- `TrainingArguments(deepspeed=dict)` of the same dict.

Each config is then read by DeepSpeed's own `DeepSpeedConfig`, under the accessors of `DeepSpeedEngine` (what
`engine.zero_offload_param()` returns), by transformers' `HfDeepSpeedConfig` (what `deepspeed_config()` and
`is_deepspeed_zero3_enabled()` answer at load), and by the memory planner's reader.
"""

import copy
import json
import os
import shutil
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import pytest
import yaml

from tests.fork_utils.accelerate_config import NVME_PATH, generated_accelerate_yaml
from tests.fork_utils.launcher import CONFIG_DIR, launch
from transformers.distributed import DistributedConfig
from transformers.integrations.deepspeed import (
    HfDeepSpeedConfig,
    is_deepspeed_zero3_enabled,
    unset_hf_deepspeed_config,
)
from transformers.integrations.deepspeed_expert_parallel import (
    check_expert_parallel_deepspeed_support,
    offload_device,
)
from transformers.integrations.deepspeed_expert_parallel_memory import ZeroOptions
from transformers.integrations.deepspeed_expert_parallel_reshard import _check_engine_supported


SCRIPT = Path(__file__).parent / "scripts" / "training_arguments_config.py"
DS_JSON = CONFIG_DIR / "ds_zero3.json"
# (offload_param device, offload_optimizer device); None: the config has no such section
OFFLOAD_CASES = [(None, None), ("none", "none"), ("cpu", "cpu"), ("cpu", "none"), ("nvme", "none"), ("none", "nvme")]
FORMS = ("accelerate config yaml", "DeepSpeed JSON file", "accelerate yaml + JSON file", "TrainingArguments(dict)")


def accelerate_yaml_naming(path: Path, json_file: Path) -> Path:
    """`docs/configs/accelerate_deepspeed_zero3.yaml`, naming `json_file`."""
    config = yaml.safe_load((CONFIG_DIR / "accelerate_deepspeed_zero3.yaml").read_text())
    config["deepspeed_config"]["deepspeed_config_file"] = str(json_file)
    path.write_text(yaml.safe_dump(config))
    return path


def json_with_offload(path: Path, param: str | None, optimizer: str | None, stage: int = 3) -> Path:
    config = json.loads(DS_JSON.read_text())
    config["zero_optimization"]["stage"] = stage
    for what, device in (("param", param), ("optimizer", optimizer)):
        if device is not None:
            config["zero_optimization"][f"offload_{what}"] = {"device": device, **(
                {"nvme_path": NVME_PATH} if device == "nvme" else {})}
    path.write_text(json.dumps(config, indent=1))
    return path


def config_under_accelerate_launch(yaml_path: Path) -> dict:
    """
    The DeepSpeed config each rank of `accelerate launch --config_file yaml_path` works with: accelerate's launcher
    (`launch_command`) up to where it would start the ranks, then `DeepSpeedPlugin()` in the environment it gives them,
    as `Accelerator()` builds it there.
    """
    import accelerate.commands.launch as accelerate_launch
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    environments = []
    with mock.patch.object(accelerate_launch, "deepspeed_launcher",
                           lambda args: environments.append(prepare_deepspeed_cmd_env(args)[1])):
        parser = accelerate_launch.launch_command_parser()
        accelerate_launch.launch_command(parser.parse_args(["--config_file", str(yaml_path), "train.py"]))
    (environment,) = environments
    rank_environment = {key: value for key, value in environment.items() if key.startswith("ACCELERATE_")}
    with mock.patch.dict(os.environ, rank_environment):
        return copy.deepcopy(DeepSpeedPlugin().deepspeed_config)


def as_one_process_run_fills_it(config: dict | str) -> dict:
    """`config` (or the JSON file it names) with the "auto" values of its batch and clipping filled in as accelerate
    and the Trainer fill them before `deepspeed.initialize` (here for one process), so that DeepSpeed's own
    `DeepSpeedConfig` accepts it."""
    config = json.loads(Path(config).read_text()) if isinstance(config, str) else copy.deepcopy(config)
    for key, value in (("train_micro_batch_size_per_gpu", 1), ("train_batch_size", 1),
                       ("gradient_accumulation_steps", 1), ("gradient_clipping", 1.0)):
        if config.get(key, "auto") == "auto":
            config[key] = value
    config["steps_per_print"] = 10**9
    return config


class ConfiguredEngine:
    """What a `DeepSpeedEngine` built with `config` answers about it: its accessors, on DeepSpeed's parsed config."""

    def __init__(self, config: dict):
        from deepspeed.runtime.config import DeepSpeedConfig
        from deepspeed.runtime.engine import DeepSpeedEngine

        self._config = DeepSpeedConfig(as_one_process_run_fills_it(config))
        for accessor in ("zero_offload_param", "zero_offload_optimizer", "zero_optimization_stage",
                         "zero_optimization_partition_weights"):
            setattr(self, accessor, getattr(DeepSpeedEngine, accessor).__get__(self))


@pytest.mark.multiprocess  # one child process, for the TrainingArguments form
class DeepSpeedConfigFormsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-config-forms-"))
        cls.configs = {}  # (form, param, optimizer, stage) -> the config dict the run works with
        dicts = {}
        for param, optimizer in OFFLOAD_CASES:
            for stage in (2, 3):
                name = f"{param}-{optimizer}-stage{stage}"
                json_file = json_with_offload(cls.tmp / f"{name}.json", param, optimizer, stage)
                dicts[param, optimizer, stage] = json.loads(json_file.read_text())
                cls.configs["DeepSpeed JSON file", param, optimizer, stage] = str(json_file)  # read by each reader
                cls.configs["accelerate yaml + JSON file", param, optimizer, stage] = config_under_accelerate_launch(
                    accelerate_yaml_naming(cls.tmp / f"{name}-naming-json.yaml", json_file)
                )
                if param is not None:  # `accelerate config` always writes both devices
                    cls.configs["accelerate config yaml", param, optimizer, stage] = config_under_accelerate_launch(
                        generated_accelerate_yaml(cls.tmp / f"{name}-generated.yaml", param, optimizer, stage)
                    )
        (cls.tmp / "dicts.json").write_text(json.dumps(list(dicts.values())))
        result = launch(SCRIPT, ["--configs", cls.tmp / "dicts.json", "--output-dir", cls.tmp / "trainer"],
                        nproc=1, launcher="python", timeout=120).check()
        for key, config in zip(dicts, result.results()[0]):
            cls.configs["TrainingArguments(dict)", *key] = config

    @classmethod
    def tearDownClass(cls):
        unset_hf_deepspeed_config()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def cases(self, stage=3):
        for (form, param, optimizer, case_stage), config in sorted(self.configs.items(), key=str):
            if case_stage == stage:
                yield f"{form}, offload_param {param}, offload_optimizer {optimizer}", config, param, optimizer

    def test_every_form_of_every_case_was_built(self):
        for form in FORMS:
            built = {(param, optimizer) for f, param, optimizer, _ in self.configs if f == form}
            want = {case for case in OFFLOAD_CASES if form != "accelerate config yaml" or case[0] is not None}
            self.assertEqual(built, want, form)

    def test_the_engine_reports_the_devices_of_every_form(self):
        """`offload_device` of what the engine's accessors return: the device each form asked for, `none` without
        a section. The config objects of `{device: none}` sections are truthy (what the old check read)."""
        for label, config, param, optimizer in self.cases():
            with self.subTest(label):
                engine = ConfiguredEngine(config)
                self.assertEqual(offload_device(engine.zero_offload_param()), param or "none")
                self.assertEqual(offload_device(engine.zero_offload_optimizer()), optimizer or "none")
                if param == "none":  # the negative control: reading the section's truth says "offloaded"
                    self.assertTrue(engine.zero_offload_param())

    def test_reshard_accepts_no_offload_and_cpu_offload_and_refuses_nvme(self):
        for label, config, param, optimizer in self.cases():
            with self.subTest(label):
                engine = ConfiguredEngine(config)
                if "nvme" in (param, optimizer):
                    with self.assertRaisesRegex(NotImplementedError, r"NVMe offload.*offload to the CPU"):
                        _check_engine_supported(engine)
                else:
                    _check_engine_supported(engine)

    def test_reshard_refuses_stage_2_of_every_form(self):
        for label, config, _, _ in self.cases(stage=2):
            with self.subTest(label):
                with self.assertRaisesRegex(NotImplementedError, "ZeRO stage 2"):
                    _check_engine_supported(ConfiguredEngine(config))

    def test_load_time_checks_read_every_form(self):
        """What `from_pretrained` asks of the registered config: ZeRO on (stage 3, or 2: issue 24), no setting EP
        refuses."""
        distributed_config = DistributedConfig(ep_size=2, fsdp_size=2)  # 2 ranks, as the yaml launches
        for stage in (2, 3):
            for label, config, _, _ in self.cases(stage):
                with self.subTest(label, stage=stage):
                    registered = HfDeepSpeedConfig(copy.deepcopy(config))  # noqa: F841 (held weakly while checked)
                    self.assertEqual(is_deepspeed_zero3_enabled(), stage == 3)
                    check_expert_parallel_deepspeed_support(distributed_config)
                    unset_hf_deepspeed_config()

    def test_memory_planner_reads_the_offload_of_every_form(self):
        for label, config, param, optimizer in self.cases():
            with self.subTest(label):
                zero = ZeroOptions.from_deepspeed_config(config, hidden_size=64)
                self.assertEqual((zero.offload_param, zero.offload_optimizer), (param == "cpu", optimizer == "cpu"))

    def test_offload_device_reads_dicts_objects_and_absence(self):
        from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadParamConfig, OffloadDeviceEnum

        self.assertEqual(offload_device(None), "none")
        self.assertEqual(offload_device({}), "none")
        self.assertEqual(offload_device({"device": None}), "none")
        self.assertEqual(offload_device({"device": "CPU"}), "cpu")
        self.assertEqual(offload_device(DeepSpeedZeroOffloadParamConfig(device="none")), "none")
        self.assertEqual(offload_device(DeepSpeedZeroOffloadParamConfig(device=OffloadDeviceEnum.nvme)), "nvme")
        with self.assertRaisesRegex(ValueError, "Unknown ZeRO offload device 'gpu'"):
            offload_device({"device": "gpu"})
