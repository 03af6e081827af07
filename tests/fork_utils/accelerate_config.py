"""The accelerate launch configs users have, written for tests."""

from pathlib import Path

import yaml


# Where the generated configs of NVMe offload put it (never written to: the tests only read the configs)
NVME_PATH = "/local_nvme"


def generated_accelerate_yaml(path: Path, param: str, optimizer: str, zero_stage: int = 3) -> Path:
    """The yaml `accelerate config` writes for DeepSpeed without a config file (its keys, sorted as it dumps them)."""
    deepspeed_config = {"gradient_accumulation_steps": 1, "offload_optimizer_device": optimizer,
                        "offload_param_device": param, "zero3_init_flag": True, "zero3_save_16bit_model": True,
                        "zero_stage": zero_stage}
    for what, device in (("optimizer", optimizer), ("param", param)):
        if device == "nvme":
            deepspeed_config[f"offload_{what}_nvme_path"] = NVME_PATH
    config = {"compute_environment": "LOCAL_MACHINE", "debug": False, "deepspeed_config": deepspeed_config,
              "distributed_type": "DEEPSPEED", "downcast_bf16": "no", "enable_cpu_affinity": False,
              "machine_rank": 0, "main_training_function": "main", "mixed_precision": "no", "num_machines": 1,
              "num_processes": 2, "rdzv_backend": "static", "same_network": True, "tpu_env": [],
              "tpu_use_cluster": False, "tpu_use_sudo": False, "use_cpu": False}
    path.write_text(yaml.safe_dump(config))
    return path
