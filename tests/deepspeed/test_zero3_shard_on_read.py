"""Models without expert parallelism under DeepSpeed ZeRO-3: shard-on-read loading (patch 0014), through real
`accelerate launch` with docs/configs/accelerate_deepspeed_zero3.yaml on 2 CPU ranks.

Every rank must hold ZeRO-3 partitions (`ds_id`, ceil(numel / 2) local elements), each partition exactly its slice of
the single-process load (zero padded), every gathered parameter and every buffer bit-identical to a single-process
load, the same missing / unexpected keys, and the load must say it took the shard-on-read path; for dense weights a
rank reads exactly its partitions' bytes. What the path does not cover (.bin checkpoints, the path switched off) loads
through upstream's path and says so.
"""

import math
import shutil
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
from parameterized import parameterized

from tests.fork_utils.launcher import CONFIG_DIR, launch
from tests.fork_utils.tiny_models import make_checkpoint


SCRIPT = Path(__file__).parent / "scripts" / "zero3_shard_on_read.py"
ACCELERATE_ZERO3 = CONFIG_DIR / "accelerate_deepspeed_zero3.yaml"
LAUNCH_TIMEOUT = 120  # seconds; a healthy 2-rank load takes ~12 s here, most of it imports
WORLD = 2
NEW_PATH_LOG = "DeepSpeed ZeRO-3 load: shard-on-read"
UPSTREAM_PATH_LOG = "DeepSpeed ZeRO-3 load: upstream path"


def rewrite_safetensors(path: Path, drop=(), add=None, cast=None) -> None:
    """Rewrite a one-file checkpoint without the keys `drop`, with the tensors `add`, in the dtype `cast`."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    if cast is not None:
        tensors = {k: v.to(cast) for k, v in tensors.items()}
    for key in drop:
        del tensors[key]
    tensors.update(add or {})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def to_bin_checkpoint(path: Path) -> None:
    """The same weights as a `.bin` checkpoint (what `save_pretrained(safe_serialization=False)` wrote)."""
    from safetensors.torch import load_file

    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


def safetensors_layout(path: Path) -> dict:
    """key -> (file, absolute offset of its first byte, element size, numel), read from the headers here."""
    import json
    import struct

    layout = {}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key != "__metadata__":
                begin, end = info["data_offsets"]
                numel = math.prod(info["shape"])
                layout[key] = (str(file), 8 + n + begin, (end - begin) // max(numel, 1), numel)
    return layout


def truncate_last_element(path: Path) -> str:
    """Cut the last element of the file's last tensor, which only the last rank's partition holds; returns its key."""
    layout = safetensors_layout(path)
    key = max(layout, key=lambda k: layout[k][1])
    file, offset, element_size, numel = layout[key]
    assert numel >= WORLD, "the last tensor must span every rank's partition"
    with open(file, "r+b") as f:
        f.truncate(offset + (numel - 1) * element_size)
    return key


def expected_partition(full: torch.Tensor, rank: int, world: int = WORLD) -> torch.Tensor:
    size = math.ceil(full.numel() / world)
    part = full.reshape(-1)[rank * size : (rank + 1) * size]
    return torch.cat([part, torch.zeros(size - part.numel(), dtype=full.dtype)])


def single_process_load(checkpoint, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, output_loading_info=True)


@pytest.mark.multiprocess
class Zero3ShardOnReadTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="zero3-shard-on-read-"))
        cls.checkpoints = {
            "llama": make_checkpoint("llama", cls.tmp / "llama", seed=21).path,
            "llama_tied": make_checkpoint("llama", cls.tmp / "llama_tied", seed=22, tie_word_embeddings=True).path,
            # save_pretrained writes MoE checkpoints with per-expert keys: the conversion mapping fuses them
            "qwen3_moe": make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe", seed=23).path,
            # small shards: the experts fused into one parameter come from several files
            "mixtral_sharded": make_checkpoint(
                "mixtral", cls.tmp / "mixtral_sharded", seed=24, max_shard_size="20KB"
            ).path,
            "llama_missing": make_checkpoint("llama", cls.tmp / "llama_missing", seed=25).path,
            "llama_bin": make_checkpoint("llama", cls.tmp / "llama_bin", seed=26).path,
        }
        rewrite_safetensors(
            cls.checkpoints["llama_missing"],
            drop=["model.norm.weight", "model.layers.1.mlp.down_proj.weight"],
            add={"model.layers.0.unexpected.weight": torch.ones(3)},
        )
        to_bin_checkpoint(cls.checkpoints["llama_bin"])
        cls.checkpoints["llama_bf16"] = make_checkpoint("llama", cls.tmp / "llama_bf16", seed=27).path
        rewrite_safetensors(cls.checkpoints["llama_bf16"], cast=torch.bfloat16)
        cls.checkpoints["llama_truncated"] = make_checkpoint("llama", cls.tmp / "llama_truncated", seed=28).path
        cls.truncated_tensor = truncate_last_element(cls.checkpoints["llama_truncated"])

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def launch_script(self, checkpoint, *extra, env=None, world=WORLD):
        args = ["--checkpoint", self.checkpoints[checkpoint], *extra]
        return launch(SCRIPT, args, nproc=world, launcher="accelerate", accelerate_config=ACCELERATE_ZERO3,
                      timeout=LAUNCH_TIMEOUT, env=env)

    def launch_load(self, checkpoint, *extra, env=None, world=WORLD):
        results = self.launch_script(checkpoint, *extra, env=env, world=world).check().results()
        self.assertEqual(sorted(results), list(range(world)))
        return results

    def assert_took_path(self, report, path):
        self.assertTrue(report["zero3"], "the DeepSpeed ZeRO-3 config was not registered: the test proves nothing")
        self.assertEqual(report["last_load"]["path"], path, report["last_load"])
        log = NEW_PATH_LOG if path == "shard_on_read" else UPSTREAM_PATH_LOG
        self.assertTrue(any(m.startswith(log) for m in report["messages"]), report["messages"])

    def assert_equals_single_process(self, results, checkpoint, dtype=torch.float32, path="shard_on_read",
                                     world=WORLD):
        reference, reference_info = single_process_load(self.checkpoints[checkpoint], dtype)
        reference_params = dict(reference.named_parameters())
        reference_buffers = dict(reference.named_buffers())
        for rank, report in results.items():
            self.assert_took_path(report, path)
            self.assertEqual(set(report["params"]), set(reference_params))
            for name, entry in report["params"].items():
                want = reference_params[name].detach()
                self.assertTrue(entry["ds_id"], f"rank {rank}: {name} is not a ZeRO-3 parameter")
                self.assertEqual(entry["ds_numel"], want.numel())
                self.assertEqual(entry["ds_local_numel"], math.ceil(want.numel() / world), f"rank {rank}: {name}")
                self.assertEqual(entry["dtype"], want.dtype, f"rank {rank}: {name}")
                self.assertTrue(torch.equal(entry["gathered"], want), f"rank {rank}: {name} differs from the "
                                f"single-process load by {(entry['gathered'].float() - want.float()).abs().max()}")
                self.assertTrue(torch.equal(entry["local"], expected_partition(want, rank, world)),
                                f"rank {rank}: the partition of {name} is not its slice of the parameter")
            self.assertEqual(set(report["buffers"]), set(reference_buffers))
            for name, buffer in report["buffers"].items():
                self.assertTrue(torch.equal(buffer, reference_buffers[name]), f"rank {rank}: buffer {name}")
            info = {k: sorted(map(str, v)) for k, v in reference_info.items()}
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
                self.assertEqual(report["loading_info"][kind], info[kind], f"rank {rank}: {kind}")
        return reference

    def test_dense_llama_each_rank_reads_its_partitions(self):
        results = self.launch_load("llama")
        self.assert_equals_single_process(results, "llama")
        # Each rank read exactly the bytes of its partitions of every tensor, nothing else of the tensor data
        layout = safetensors_layout(self.checkpoints["llama"])
        for rank, report in results.items():
            expected = set()
            for file, offset, itemsize, numel in layout.values():
                size = math.ceil(numel / WORLD)
                start, stop = rank * size, min((rank + 1) * size, numel)
                if stop > start:
                    expected.add((file, offset + start * itemsize, offset + stop * itemsize))
            self.assertEqual(set(report["last_load"]["ranges"]), expected, f"rank {rank}")
            self.assertEqual(len(report["last_load"]["ranges"]), len(expected), f"rank {rank} read a range twice")

    @parameterized.expand([("qwen3_moe",), ("mixtral_sharded",)])
    def test_moe_without_ep_per_expert_checkpoint(self, checkpoint):
        results = self.launch_load(checkpoint)
        self.assert_equals_single_process(results, checkpoint)
        layout = safetensors_layout(self.checkpoints[checkpoint])
        total = sum(itemsize * numel for _, _, itemsize, numel in layout.values())
        expert_keys = [k for k in layout if ".experts." in k]
        self.assertGreater(len(expert_keys), 0, "the checkpoint must be in the per-expert layout")
        if checkpoint == "mixtral_sharded":
            files = {layout[k][0] for k in expert_keys if k.startswith("model.layers.0.")}
            self.assertGreater(len(files), 1, "the experts of one fused parameter should span several files")
        for rank, report in results.items():
            # only the experts a rank's partitions are made of are read: about half the checkpoint, never all of it
            self.assertLess(report["last_load"]["bytes_read"], 0.65 * total, f"rank {rank}")

    def test_moe_partitions_that_start_inside_an_expert(self):
        """3 ranks: each fused expert parameter's partitions begin and end inside an expert's rows (gate_up_proj of
        4 x 64 x 64 in partitions of 5462 elements), so each rank converts the experts its partitions span, some of
        them for a part only, and copies its slice out of them at an offset."""
        world = 3
        results = self.launch_load("qwen3_moe", world=world)
        self.assert_equals_single_process(results, "qwen3_moe", world=world)
        gate_up = results[0]["params"]["model.layers.0.mlp.experts.gate_up_proj"]
        row = gate_up["ds_numel"] // 4  # 4 experts
        self.assertNotEqual(gate_up["ds_local_numel"] % row, 0, "the partitions should split an expert's rows")

    def test_tied_embeddings(self):
        results = self.launch_load("llama_tied")
        self.assert_equals_single_process(results, "llama_tied")

    def test_dtype_handled_as_upstream_path(self):
        """A bf16 checkpoint loaded with `dtype=torch.bfloat16`: the parameters get the dtype upstream's ZeRO-3 path
        gives them (zero.Init's, from the DeepSpeed config: fp32 here) and the same values (cast as `copy_` does)."""
        new = self.launch_load("llama_bf16", "--dtype", "bfloat16")
        upstream = self.launch_load("llama_bf16", "--dtype", "bfloat16", env={"TRANSFORMERS_ZERO3_SHARD_ON_READ": "0"})
        from safetensors.torch import load_file

        checkpoint = load_file(self.checkpoints["llama_bf16"] / "model.safetensors")
        for rank in range(WORLD):
            self.assert_took_path(new[rank], "shard_on_read")
            self.assert_took_path(upstream[rank], "upstream")
            self.assertEqual(set(new[rank]["params"]), set(upstream[rank]["params"]))
            for name, entry in new[rank]["params"].items():
                want = upstream[rank]["params"][name]
                self.assertEqual(entry["dtype"], want["dtype"], name)
                self.assertTrue(torch.equal(entry["gathered"], want["gathered"]), name)
                self.assertTrue(torch.equal(entry["local"][: entry["ds_numel"] - rank * entry["ds_local_numel"]],
                                            want["local"][: entry["ds_numel"] - rank * entry["ds_local_numel"]]), name)
                self.assertTrue(torch.equal(entry["gathered"], checkpoint[name].to(entry["dtype"])), name)

    def test_missing_and_unexpected_keys(self):
        """Missing keys are initialised as upstream does (on rank 0, then partitioned), including the partitions of
        ranks other than 0: the ZeRO-3 init does not broadcast rank 0's uninitialised values any more."""
        results = self.launch_load("llama_missing")
        reference, reference_info = single_process_load(self.checkpoints["llama_missing"])
        self.assertEqual(reference_info["missing_keys"], {"model.norm.weight", "model.layers.1.mlp.down_proj.weight"})
        self.assertEqual(reference_info["unexpected_keys"], {"model.layers.0.unexpected.weight"})
        missing = ("model.norm.weight", "model.layers.1.mlp.down_proj.weight")
        reference_params = dict(reference.named_parameters())
        for rank, report in results.items():
            self.assert_took_path(report, "shard_on_read")
            self.assertEqual(report["loading_info"]["missing_keys"], sorted(missing))
            self.assertEqual(report["loading_info"]["unexpected_keys"], ["model.layers.0.unexpected.weight"])
            for name, entry in report["params"].items():
                if name not in missing:
                    self.assertTrue(torch.equal(entry["gathered"], reference_params[name].detach()), name)
            self.assertTrue(torch.equal(report["params"]["model.norm.weight"]["gathered"],
                                        torch.ones_like(reference_params["model.norm.weight"])))
            down = report["params"]["model.layers.1.mlp.down_proj.weight"]["gathered"].reshape(-1)
            for half in down.chunk(WORLD):  # each rank's partition: N(0, initializer_range = 0.02)
                self.assertTrue(0.015 < half.std().item() < 0.025, half.std().item())
        self.assertTrue(torch.equal(results[0]["params"]["model.layers.1.mlp.down_proj.weight"]["gathered"],
                                    results[1]["params"]["model.layers.1.mlp.down_proj.weight"]["gathered"]))

    def launch_failing_load(self, checkpoint, *extra):
        result = self.launch_script(checkpoint, *extra)
        self.assertFalse(result.ok, "the load succeeded")
        self.assertFalse(result.timed_out, "a rank waited for one that failed")
        self.assertLess(result.elapsed, 60)
        self.assertEqual(sorted(result.ranks), list(range(WORLD)), result.report())
        return result

    def test_truncated_checkpoint_fails_every_rank(self):
        """The last tensor's last element, which only rank 1's partition holds, is cut off: the header check finds it
        on every rank before any rank reads a partition."""
        result = self.launch_failing_load("llama_truncated")
        for rank, outcome in result.ranks.items():
            self.assertIn(f"the header entry of {self.truncated_tensor} does not match the file (corrupt checkpoint?)",
                          outcome.error or "", f"rank {rank}\n{result.report()}")

    def test_a_rank_that_cannot_read_its_partition_fails_every_rank(self):
        """An I/O error on rank 1 only: rank 1 raises it, and rank 0, whose own load succeeded, raises an error naming
        rank 1 and its error instead of going on alone into the next collective."""
        result = self.launch_failing_load("llama", "--fail-reads-on-rank", "1")
        self.assertIn("OSError: ", result.ranks[1].error or "", result.report())
        self.assertIn("injected read error", result.ranks[1].error)
        rank0_error = result.ranks[0].error or ""
        self.assertIn("DeepSpeed ZeRO-3 shard-on-read load failed on rank(s) [1]", rank0_error, result.report())
        self.assertIn("rank 1: OSError: ", rank0_error)

    def test_bin_checkpoint_falls_back_to_upstream_path(self):
        results = self.launch_load("llama_bin")
        self.assert_equals_single_process(results, "llama_bin", path="upstream")
        for report in results.values():
            self.assertIn("not in safetensors", report["last_load"]["reason"])

    def test_switched_off_takes_upstream_path(self):
        results = self.launch_load("qwen3_moe", env={"TRANSFORMERS_ZERO3_SHARD_ON_READ": "0"})
        self.assert_equals_single_process(results, "qwen3_moe", path="upstream")


class RangeReaderTest(unittest.TestCase):
    """Single process: the reader takes exactly the bytes asked for, and the partition arithmetic."""

    def test_reads_exact_ranges(self):
        from safetensors.torch import save_file

        from transformers.integrations.deepspeed_shard_on_read import RangeReader, read_safetensors_headers

        with tempfile.TemporaryDirectory() as tmp:
            tensors = {"a": torch.arange(10, dtype=torch.float32), "b": torch.arange(12, dtype=torch.int64).view(3, 4)}
            save_file(tensors, f"{tmp}/x.safetensors")
            reader = RangeReader()
            try:
                index = read_safetensors_headers([f"{tmp}/x.safetensors"], reader)
                self.assertEqual(index["b"].shape, (3, 4))
                self.assertEqual(index["b"].dtype, torch.int64)
                data_start = min(entry.offset for entry in index.values())
                self.assertEqual((reader.header_bytes, reader.ranges), (data_start, []))
                self.assertTrue(torch.equal(reader.read(index["a"], 5, 10), tensors["a"][5:]))
                self.assertTrue(torch.equal(reader.read(index["b"], 3, 7), tensors["b"].reshape(-1)[3:7]))
                self.assertTrue(torch.equal(reader.read(index["b"]).view(3, 4), tensors["b"]))
            finally:
                reader.close()
            a, b = index["a"], index["b"]
            self.assertEqual(
                reader.ranges,
                [(a.file, a.offset + 20, a.offset + 40), (b.file, b.offset + 24, b.offset + 56),
                 (b.file, b.offset, b.offset + 96)],
            )
            self.assertEqual(reader.bytes_read, data_start + 20 + 32 + 96)
