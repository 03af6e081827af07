"""The fork's demo: a tiny MoE checkpoint, 2 CPU ranks, expert parallelism under DeepSpeed ZeRO-3.

    make demo        (sets up .venv first), or: python examples/ep_deepspeed/run_demo.py

It saves a tiny random Qwen3-MoE checkpoint, then runs `ep_zero3.py` on 2 ranks with `accelerate launch` and the
DeepSpeed ZeRO-3 config of docs/configs, under a hard timeout.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from transformers import AutoModelForCausalLM, Qwen3MoeConfig


REPO_ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIG = REPO_ROOT / "docs" / "configs" / "accelerate_deepspeed_zero3.yaml"


def make_tiny_moe(path: Path, reference: Path) -> None:
    """Save a seeded random tiny MoE, and its state dict (model layout) for the ranks to compare with."""
    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, reference)
    print(f"demo: saved a tiny Qwen3-MoE ({config.num_experts} experts, {config.num_hidden_layers} layers) to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds before the whole job is killed")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ep-zero3-demo-") as workdir:
        model_path = Path(workdir) / "tiny-qwen3-moe"
        reference = Path(workdir) / "reference.safetensors"
        make_tiny_moe(model_path, reference)
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
            "--num_processes", str(args.nproc), str(Path(__file__).with_name("ep_zero3.py")),
            "--model_path", str(model_path), "--ep_size", str(args.nproc), "--reference", str(reference),
        ]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        print("demo: " + " ".join(command[2:]), flush=True)
        try:
            proc = subprocess.run(command, cwd=REPO_ROOT, env=env, timeout=args.timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            sys.exit(f"demo: timed out after {args.timeout:.0f} s")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
