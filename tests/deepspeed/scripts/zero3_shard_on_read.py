"""Rank side of the dense ZeRO-3 shard-on-read tests: load a checkpoint under `accelerate launch` + ZeRO-3 (no
distributed config) and report every parameter as this rank holds it, gathered, plus which load path ran.

Nothing is asserted here: the test process compares the tensors with a single-process load.
"""

import argparse
import logging

import torch
import torch.distributed as dist

from tests.fork_utils.worker import rank, run_rank, start_accelerator


SHARD_ON_READ_LOGGER = "transformers.integrations.deepspeed_shard_on_read"


class Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--fail-reads-on-rank", type=int, default=None,
                        help="this rank's reads of tensor data raise OSError (an I/O error on one node)")
    return parser.parse_args()


def fail_tensor_reads(reader_class) -> None:
    read_into = reader_class.read_into

    def failing_read_into(self, file, offset, out, header=False):
        if not header:
            raise OSError(f"{file}: injected read error at byte {offset}")
        return read_into(self, file, offset, out, header=header)

    reader_class.read_into = failing_read_into


def main():
    args = parse_args()
    accelerator = start_accelerator()  # noqa: F841  (registers the DeepSpeed ZeRO-3 config: keep it alive)

    import deepspeed

    from transformers import AutoModelForCausalLM
    from transformers.integrations import deepspeed_shard_on_read
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if args.fail_reads_on_rank == rank():
        fail_tensor_reads(deepspeed_shard_on_read.RangeReader)
    records = Records()
    shard_logger = logging.getLogger(SHARD_ON_READ_LOGGER)
    shard_logger.setLevel(logging.DEBUG)
    shard_logger.addHandler(records)

    model, info = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, dtype=args.dtype if args.dtype == "auto" else getattr(torch, args.dtype),
        output_loading_info=True,
    )
    params = {}
    for name, param in model.named_parameters():
        entry = {"ds_id": hasattr(param, "ds_id"), "dtype": param.dtype}
        if entry["ds_id"]:
            entry["ds_local_numel"] = param.ds_tensor.numel()
            entry["ds_numel"] = param.ds_numel
            entry["local"] = param.ds_tensor.detach().clone()
            with deepspeed.zero.GatheredParameters([param]):
                entry["gathered"] = param.data.detach().clone()
        else:
            entry["gathered"] = param.data.detach().clone()
        params[name] = entry
    report = {
        "rank": rank(),
        "world_size": dist.get_world_size(),
        "zero3": is_deepspeed_zero3_enabled(),
        "params": params,
        "buffers": {name: buf.detach().clone() for name, buf in model.named_buffers()},
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "messages": records.messages,
        "last_load": dict(deepspeed_shard_on_read.last_load),
    }
    dist.barrier()
    return report


if __name__ == "__main__":
    run_rank(main)
