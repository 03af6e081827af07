"""The fork's demo: a tiny MoE checkpoint, 2 CPU ranks, expert parallelism under DeepSpeed ZeRO-3.

    make demo        (sets up .venv first), or: python examples/ep_deepspeed/run_demo.py

It saves a tiny random Qwen3-MoE checkpoint, runs `ep_zero3.py` on 2 ranks with `accelerate launch` and the DeepSpeed
ZeRO-3 config of docs/configs under a hard timeout (load: each rank its experts; then a few training steps, each rank
its own batch, then `save_pretrained` on every rank), trains a single process on the same global batches to print its
losses next to them, and reloads the saved checkpoint in one process to compare it with that reference's weights.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from transformers import AutoModelForCausalLM, Qwen3MoeConfig


DEPRECATED_COLLECTIVES_WARNINGS = ",".join(
    f"ignore:`torch.distributed.{name}` is deprecated:FutureWarning"
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor")
)


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


def single_process_training(model_path: Path, record: dict, learning_rate: float):
    """The reference: one process, the whole global batch of each step, the same AdamW and gradient clipping."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    losses = []
    for batch in record["global_batches"]:
        input_ids = torch.tensor(batch)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if record["gradient_clipping"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), record["gradient_clipping"])
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict()


def compare_saved_checkpoint(saved: Path, reference_weights: dict) -> bool:
    """Reload the checkpoint the 2 ranks saved, in one process, and compare it with the reference's weights."""
    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).state_dict()
    diff = max((reloaded[k] - v).abs().max().item() for k, v in reference_weights.items())
    experts = sum(v.shape[0] for k, v in reloaded.items() if k.endswith("experts.gate_up_proj"))
    # AdamW turns fp32 rounding into ~1e-6 differences; a missing or stale expert is off by whole updates (~1e-3).
    ok = set(reloaded) == set(reference_weights) and diff < 1e-4
    print(
        f"demo: reloaded the saved checkpoint in one process ({experts} experts over all layers): weights "
        f"{'match' if ok else 'DIFFER FROM'} the single-process reference (max abs diff {diff:.1e})"
    )
    return ok


def print_loss_table(record: dict, reference: list[float]) -> float:
    print("demo: step | EP + ZeRO-3, 2 ranks | single process, same global batch | relative diff")
    worst = 0.0
    for step, (ours, ref) in enumerate(zip(record["losses"], reference)):
        rel = abs(ours - ref) / ref
        worst = max(worst, rel)
        print(f"demo: {step:4d} | {ours:20.6f} | {ref:34.6f} | {rel:.1e}")
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds before the whole job is killed")
    parser.add_argument("--train_steps", type=int, default=5)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ep-zero3-demo-") as workdir:
        model_path = Path(workdir) / "tiny-qwen3-moe"
        reference = Path(workdir) / "reference.safetensors"
        make_tiny_moe(model_path, reference)
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
            "--num_processes", str(args.nproc), str(Path(__file__).with_name("ep_zero3.py")),
            "--model_path", str(model_path), "--ep_size", str(args.nproc), "--reference", str(reference),
            "--train_steps", str(args.train_steps), "--learning_rate", str(args.learning_rate),
            "--record", str(Path(workdir) / "record.json"), "--save_dir", str(Path(workdir) / "trained"),
        ]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        # DeepSpeed 0.19 calls collectives that torch 2.13 deprecates: ~70 warnings around the demo's own lines
        env.setdefault("PYTHONWARNINGS", DEPRECATED_COLLECTIVES_WARNINGS)
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
        print("demo: " + " ".join(command[2:]), flush=True)
        try:
            proc = subprocess.run(command, cwd=REPO_ROOT, env=env, timeout=args.timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            sys.exit(f"demo: timed out after {args.timeout:.0f} s")
        if proc.returncode != 0:
            sys.exit(proc.returncode)
        if args.train_steps:
            record = json.loads((Path(workdir) / "record.json").read_text())
            reference, reference_weights = single_process_training(model_path, record, args.learning_rate)
            worst = print_loss_table(record, reference)
            verdict = "match" if worst <= 1e-5 else "DIFFER"
            print(f"demo: training losses {verdict} the single-process reference (max relative diff {worst:.1e})")
            saved_ok = compare_saved_checkpoint(Path(workdir) / "trained", reference_weights)
            if worst > 1e-5 or not saved_ok:
                sys.exit(1)


if __name__ == "__main__":
    main()
