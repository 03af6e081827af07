"""Saving an expert-parallel model trained under DeepSpeed ZeRO-3, and resuming its training.

`save_pretrained` on every rank (and `Trainer.save_model`) must write one normal checkpoint with every expert: it
reloads single-process and under EP + ZeRO-3 bit for bit equal to the training state, with the keys and shapes of a
plain `save_pretrained`. A DeepSpeed checkpoint resumes with the losses of an uninterrupted run. A save that fails
midway is reported on every rank and leaves the previous checkpoint loadable.
"""

import json
import shutil
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
from parameterized import parameterized

from tests.fork_utils.expert_state import assemble_experts
from tests.fork_utils.launcher import CONFIG_DIR, launch
from tests.fork_utils.mounts import mount_tmpfs, remount_tmpfs, unmount, used_bytes
from tests.fork_utils.tiny_models import checkpoint_keys_and_shapes, make_checkpoint


TRAIN = Path(__file__).parent / "scripts" / "ep_train.py"
LOAD = Path(__file__).parent / "scripts" / "ep_load.py"
TIMEOUT = 180
# How a save is made: `save_pretrained` gathering on every rank, or rank 0 writing the whole state dict it was given
# (accelerate's ZeRO-3 save); into a plain directory or into the root of a mounted volume (no directory swap there).
SAVE_PATHS = [
    ("gathered", [], False),
    ("state_dict", ["--save-from-state-dict"], False),
    ("gathered_into_mount_point", [], True),
]
# A save where every rank writes, failing on (or killing) the other rank than the one that writes headers and commits
FAILED_SAVE_PATHS = [*SAVE_PATHS, ("gathered_rank_1_fails", ["--fail-save-rank", 1], False)]
KILLED_SAVE_PATHS = [*SAVE_PATHS, ("gathered_rank_1_killed", ["--fail-save-rank", 1], False)]


def checkpoint_files(directory: Path) -> dict[str, bytes]:
    """The bytes of each file of a checkpoint directory; hidden entries (a save's staging directory) left out."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if not p.name.startswith(".")}


def tensor_bytes(directory: Path) -> tuple[int, int]:
    """The bytes of tensor data a checkpoint holds, and those of its largest tensor."""
    from safetensors import safe_open

    sizes = []
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            names = f.keys()
            sizes += [f.get_tensor(name).nbytes for name in names]
    return sum(sizes), max(sizes)


@pytest.mark.multiprocess
class EPZero3SaveTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-zero3-save-"))
        cls.mounted = []
        cls.checkpoints = {
            "qwen3_moe": make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe", seed=41).path,
            "mixtral": make_checkpoint("mixtral", cls.tmp / "mixtral", seed=42).path,
            "gpt_oss": make_checkpoint("gpt_oss", cls.tmp / "gpt_oss", seed=43).path,
        }

    @classmethod
    def tearDownClass(cls):
        for directory in cls.mounted:
            unmount(directory)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def save_target(self, name, mounted):
        """A directory to save into; `mounted`: the root of a tmpfs mounted for the test (a mounted volume)."""
        target = self.tmp / name
        if mounted:
            why_not = mount_tmpfs(target)
            if why_not:
                self.skipTest(why_not)
            self.mounted.append(target)
        return target

    def train(self, checkpoint, *extra, entry="deepspeed", steps=3, nproc=2):
        args = ["--checkpoint", self.checkpoints[checkpoint], "--entry", entry, "--ep-size", 2, "--steps", steps,
                "--optimizer", "adamw", "--lr", "1e-3", *extra]
        return launch(TRAIN, args, nproc=nproc, timeout=TIMEOUT)

    def assert_checkpoint_holds(self, saved: Path, expected: dict, family_checkpoint: Path):
        from transformers import AutoModelForCausalLM

        config = json.loads((saved / "config.json").read_text())
        self.assertNotIn("distributed_config", config)
        self.assertEqual(checkpoint_keys_and_shapes(saved), checkpoint_keys_and_shapes(family_checkpoint),
                         "keys and shapes must be those of a plain single-process save_pretrained")
        dtype = next(iter(expected.values())).dtype
        reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype).state_dict()
        self.assertEqual(set(reloaded), set(expected))
        for name, tensor in expected.items():
            self.assertTrue(torch.equal(reloaded[name], tensor), f"{name} differs from the training state")

    def assert_every_rank_wrote(self, results, saved):
        """Each rank wrote its share: about the checkpoint's tensor bytes over the ranks, give or take one tensor."""
        total, largest = tensor_bytes(saved)
        written = [results[rank]["save_bytes_written"] for rank in sorted(results)]
        self.assertEqual(sum(written), total, f"bytes written per rank {written}")
        share = total / len(written)
        for rank, count in enumerate(written):
            self.assertLessEqual(abs(count - share), 0.1 * share + largest,
                                 f"rank {rank} wrote {count} bytes, its share is {share:.0f} (largest {largest})")

    # (checkpoint, max_shard_size, whole_shards, nproc, bf16): each family on 2 ranks, Mixtral and gpt-oss (experts
    # saved fused: one key spanning the ranks) on 4 ranks (EP 2 x EDP 2), Qwen3-MoE and gpt-oss in bf16 too
    @parameterized.expand([
        ("qwen3_moe", "50GB", False, 2, False),
        ("qwen3_moe", "50GB", False, 2, True),
        ("mixtral", "20KB", False, 2, False),
        ("mixtral", "20KB", True, 2, False),
        ("mixtral_ep2_edp2", "20KB", False, 4, False),
        ("gpt_oss", "20KB", False, 2, False),
        ("gpt_oss_ep2_edp2", "20KB", False, 4, True),
    ])
    def test_round_trip_after_training(self, checkpoint, max_shard_size, whole_shards, nproc, bf16):
        """Every rank writes its part of each shard (experts by the ranks holding them, tensors stored as ranges of
        them by every rank from its ZeRO-3 partition), byte for byte the checkpoint global rank 0 writes alone, saved
        again after it for comparison; or (`whole_shards`, for conversions that need several tensors at once) rank 0
        alone collects each shard and converts it whole."""
        saved = self.tmp / f"saved-{checkpoint}-{max_shard_size}-{whole_shards}-{nproc}-{bf16}"
        single_writer = saved.with_name(saved.name + "-single-writer")
        extra = ["--convert-whole-shards"] if whole_shards else ["--single-writer-save-dir", single_writer]
        extra += ["--bf16"] if bf16 else []
        checkpoint = checkpoint.partition("_ep2")[0]
        results = self.train(checkpoint, "--save-dir", saved, "--max-shard-size", max_shard_size, *extra, nproc=nproc)
        results = results.check().results()
        self.assertFalse([r.get("save_error") for r in results.values() if r.get("save_error")])
        total, _ = tensor_bytes(saved)
        if whole_shards:
            # The single writer's path, unchanged
            self.assertEqual([results[rank]["save_bytes_written"] for rank in sorted(results)], [total, 0])
        else:
            self.assertEqual(checkpoint_files(saved), checkpoint_files(single_writer))
            self.assert_every_rank_wrote(results, saved)
            self.assertEqual([results[rank]["single_writer_bytes_written"] for rank in sorted(results)],
                             [total] + [0] * (nproc - 1))
        trained = assemble_experts(results, "final", ep_size=2)
        self.assertEqual({t.dtype for t in trained.values()}, {torch.bfloat16 if bf16 else torch.float32})
        self.assertNotEqual(max(abs(trained[k] - v).max().item() for k, v in
                                assemble_experts(results, "initial", ep_size=2).items()), 0.0, "training did nothing")
        if max_shard_size != "50GB":
            self.assertGreater(len(list(saved.glob("*.safetensors"))), 1, "max_shard_size must be honoured")
            self.assertTrue((saved / "model.safetensors.index.json").is_file())
        # Single process: every tensor equals the gathered training state, bit for bit.
        self.assert_checkpoint_holds(saved, trained, self.checkpoints[checkpoint])
        if nproc != 2:
            return  # byte for byte rank 0's checkpoint, which reloads as above: the 2-rank runs reload it under EP too
        # EP + ZeRO-3 again: each rank's shard equals its slice of the training state.
        reloaded = launch(LOAD, ["--mode", "accelerate", "--checkpoint", saved, "--ep-size", 2], nproc=2,
                          launcher="accelerate", accelerate_config=CONFIG_DIR / "accelerate_deepspeed_zero3.yaml",
                          timeout=TIMEOUT).check().results()
        for rank, report in reloaded.items():
            for name, entry in report["params"].items():
                want = trained[name]
                if ".experts." in name:
                    want = want.chunk(2)[rank]
                self.assertTrue(torch.equal(entry["local"], want.to(entry["local"].dtype)), f"rank {rank}: {name}")

    def test_trainer_save_model_writes_every_expert(self):
        saved = self.tmp / "saved-by-trainer"
        results = self.train("qwen3_moe", "--save-dir", saved, entry="trainer").check().results()
        trained = assemble_experts(results, "final", ep_size=2)
        self.assert_checkpoint_holds(saved, trained, self.checkpoints["qwen3_moe"])

    def test_resume_from_deepspeed_checkpoint_continues_identically(self):
        straight = self.train("qwen3_moe", steps=6).check().results()
        ds_checkpoint = self.tmp / "ds-checkpoint"
        self.train("qwen3_moe", "--save-checkpoint", ds_checkpoint, steps=3).check()
        resumed = self.train("qwen3_moe", "--resume-from", ds_checkpoint, "--first-step", 3, steps=3).check().results()
        for rank in (0, 1):
            self.assertEqual(resumed[rank]["losses"], straight[rank]["losses"][3:], f"rank {rank}")
            for name, tensor in straight[rank]["final"].items():
                self.assertTrue(torch.equal(resumed[rank]["final"][name], tensor), f"rank {rank}: {name}")

    def save_mixtral(self, saved, *extra, steps):
        """Train tiny Mixtral `steps` steps and save it to `saved` in 20KB shards (many shards: a save can fail
        between two of them)."""
        return self.train("mixtral", "--save-dir", saved, "--max-shard-size", "20KB", *extra, steps=steps)

    def assert_previous_checkpoint_kept(self, saved, before, first):
        """`saved` still holds, byte for byte, the checkpoint of the run `first` (files `before`), and it loads."""
        self.assertEqual(checkpoint_files(saved), before)
        self.assert_checkpoint_holds(saved, assemble_experts(first, "final", ep_size=2), self.checkpoints["mixtral"])

    @parameterized.expand(FAILED_SAVE_PATHS)
    def test_failed_save_keeps_the_previous_checkpoint(self, path, save_args, mounted):
        """Gathered on every rank (every rank writing), the error is raised on every rank; from a state dict rank 0
        writes alone."""
        saved = self.save_target(f"saved-then-failed-{path}", mounted)
        first = self.save_mixtral(saved, steps=1).check().results()
        before = checkpoint_files(saved)
        result = self.save_mixtral(saved, "--fail-save-after-shards", 1, *save_args, steps=2)
        self.assertTrue(result.ok, result.report())  # the ranks caught the save error and reported it
        self.assertLess(result.elapsed, TIMEOUT / 2)
        from_state_dict = "--save-from-state-dict" in save_args
        failing = int(save_args[-1]) if "--fail-save-rank" in save_args else 0
        for rank in [0] if from_state_dict else [0, 1]:
            self.assertIn("save_error", result.results()[rank], f"rank {rank} did not see the failed save")
        self.assertIn("No space left on device", result.results()[failing]["save_error"])
        if not from_state_dict:
            self.assertIn(f"failed on rank(s) [{failing}]", result.results()[1 - failing]["save_error"])
        # The previous checkpoint is untouched, and nothing half-written sits in (or next to) the target.
        self.assertEqual(sorted(p.name for p in saved.iterdir() if p.name.startswith(".")), [])
        self.assertEqual(sorted(p.name for p in saved.parent.iterdir() if p.name.startswith(f".{saved.name}")), [])
        self.assert_previous_checkpoint_kept(saved, before, first)

    def test_trainer_checkpoints_and_resumes_identically(self):
        output_dir = self.tmp / "trainer-run"
        straight = self.train("qwen3_moe", "--save-steps", 3, "--output-dir", output_dir, entry="trainer",
                              steps=6).check().results()
        checkpoint = output_dir / "checkpoint-3"
        # Every Trainer checkpoint holds the model as a normal checkpoint and DeepSpeed's state (optimizer included).
        self.assertTrue((checkpoint / "config.json").is_file())
        self.assertTrue(list(checkpoint.glob("global_step3/*optim_states.pt")), sorted(checkpoint.rglob("*")))
        self.assertEqual(checkpoint_keys_and_shapes(checkpoint),
                         checkpoint_keys_and_shapes(self.checkpoints["qwen3_moe"]))
        # New processes resume from step 3 of the 6 and continue as the uninterrupted run did.
        resumed = self.train("qwen3_moe", "--resume-from", checkpoint, "--output-dir", self.tmp / "trainer-resumed",
                             entry="trainer", steps=6).check().results()
        for rank in (0, 1):
            self.assertEqual(len(resumed[rank]["losses"]), 3, f"rank {rank} did not skip the 3 trained steps")
            self.assertTrue(torch.equal(resumed[rank]["inputs"], straight[rank]["inputs"][3:]), f"rank {rank}: data")
            self.assertEqual(resumed[rank]["losses"], straight[rank]["losses"][3:], f"rank {rank}")
            for name, tensor in straight[rank]["final"].items():
                self.assertTrue(torch.equal(resumed[rank]["final"][name], tensor), f"rank {rank}: {name}")

    @parameterized.expand([("every_rank_writing", []), ("single_writer", ["--single-writer"])])
    def test_save_out_of_disk_keeps_the_previous_checkpoint(self, path, save_args):
        """A real full disk: a volume with room for one checkpoint and half of another. The save runs out of space
        midway (where every rank writes: on whichever rank writes then; a write, or the close that flushes it): every
        rank raises, naming the failed rank(s) and the error, nothing half-written stays, the previous checkpoint
        loads."""
        saved = self.save_target(f"saved-then-out-of-disk-{path}", mounted=True)
        first = self.save_mixtral(saved, steps=1).check().results()
        before = checkpoint_files(saved)
        used = used_bytes(saved)
        why_not = remount_tmpfs(saved, size=used + used // 2)
        if why_not:
            self.skipTest(why_not)
        result = self.save_mixtral(saved, *save_args, steps=2)
        self.assertTrue(result.ok, result.report())  # the ranks caught the save error and reported it
        self.assertLess(result.elapsed, TIMEOUT / 2)
        errors = {rank: report.get("save_error") for rank, report in result.results().items()}
        self.assertTrue(all(errors.values()), f"not every rank saw the failed save: {errors}")
        self.assertTrue(any("No space left on device" in error for error in errors.values()), errors)
        self.assertTrue(all("failed on rank(s)" in error or "No space left on device" in error
                            for error in errors.values()), errors)
        self.assertEqual(sorted(p.name for p in saved.iterdir() if p.name.startswith(".")), [])
        self.assert_previous_checkpoint_kept(saved, before, first)

    @parameterized.expand(KILLED_SAVE_PATHS)
    def test_killed_save_keeps_the_previous_checkpoint_and_the_next_save_cleans_up(self, path, save_args, mounted):
        saved = self.save_target(f"saved-then-killed-{path}", mounted)
        first = self.save_mixtral(saved, steps=1).check().results()
        before = checkpoint_files(saved)
        killed = self.save_mixtral(saved, "--kill-save-after-shards", 1, *save_args, steps=2)
        self.assertFalse(killed.ok)
        self.assertFalse(killed.timed_out, killed.report())
        self.assertLess(killed.elapsed, TIMEOUT / 2)
        self.assertEqual(killed.stragglers, [])
        self.assertIn("Signal 9 (SIGKILL) received by PID", killed.output)
        # The previous checkpoint is untouched and loads; the killed save's hidden staging directory does not load.
        self.assert_previous_checkpoint_kept(saved, before, first)
        leftovers = [p for p in saved.iterdir() if p.name.startswith(".save-in-progress-")]
        if "--fail-save-rank" not in save_args:
            # Rank 0, killed, left its staging directory; another rank killed, rank 0 may remove it before it is
            # stopped in turn
            self.assertEqual(len(leftovers), 1, "the killed save wrote somewhere else than a hidden staging directory")
            self.assertTrue(list(leftovers[0].glob("*.safetensors")), "the save was killed before writing a shard")
        self.assertLessEqual(len(leftovers), 1, leftovers)
        for leftover in leftovers:
            self.assertFalse((leftover / "config.json").exists())
        # The next save replaces the checkpoint and removes what the killed one left.
        second = self.save_mixtral(saved, *save_args, steps=2).check().results()
        for leftover in leftovers:
            self.assertFalse(leftover.exists(), "the next save left the killed save's directory behind")
        self.assert_checkpoint_holds(saved, assemble_experts(second, "final", ep_size=2), self.checkpoints["mixtral"])


class ExpertWriterAssignmentTest(unittest.TestCase):
    """Which rank writes which original key when every rank writes (single process: the plan alone decides)."""

    def plan(self, family, save_original_format=True):
        from transformers import AutoModelForCausalLM
        from transformers.integrations import deepspeed_expert_parallel_save as ep_save

        tmp = Path(tempfile.mkdtemp(prefix="ep-writers-"))
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(make_checkpoint(family, tmp / family, seed=3).path,
                                                     dtype=torch.float32)
        state_dict = model.state_dict()
        meta = ep_save._meta_state_dict(model, state_dict, lambda name, t: t.shape)
        return state_dict, ep_save.plan_checkpoint(model, meta, "20KB", save_original_format=save_original_format)

    @parameterized.expand([("qwen3_moe",), ("mixtral",)])
    def test_each_rank_converts_its_own_experts_to_the_keys_of_the_whole_model(self, family):
        from transformers.integrations import deepspeed_expert_parallel_save as ep_save
        from transformers.integrations.deepspeed_expert_parallel import ExpertShardLayout

        state_dict, plan = self.plan(family)
        experts = {name: t for name, t in state_dict.items() if ".experts." in name}
        self.assertTrue(experts)
        for ep_size in (2, 4):
            for name, tensor in experts.items():
                whole = plan.revert({name: tensor})
                held = set()
                for ep_rank in range(ep_size):
                    layout = ExpertShardLayout(tuple(tensor.shape), 0, ep_rank, ep_size)
                    owners = ep_save._expert_rank_of_keys(plan.revert, name, layout)
                    self.assertEqual(sorted(owners), sorted(whole), name)
                    keys = ep_save._local_expert_keys(plan.revert, name, layout)
                    self.assertIsNotNone(keys, name)
                    part = plan.revert({name: tensor.chunk(ep_size)[ep_rank]})
                    self.assertEqual(sorted(keys.values()), sorted(k for k, r in owners.items() if r == ep_rank))
                    for key, value in part.items():
                        self.assertTrue(torch.equal(value, whole[keys[key]]), f"{name}: {key} -> {keys[key]}")
                    held |= set(keys.values())
                self.assertEqual(held, set(whole), f"{name}: EP {ep_size}")
            ep_ranks = [rank % 2 for rank in range(ep_size)]  # EP 2 x EDP ep_size / 2
            layouts = {name: ExpertShardLayout(tuple(t.shape), 0, 0, 2) for name, t in experts.items()}
            for by_element in (False, True):
                assignment = ep_save.assign_writers(plan, layouts, ep_ranks, by_element=by_element)
                self.assert_each_byte_written_once(plan, assignment, layouts, ep_ranks)
                if by_element:
                    # Every tensor but the experts' gate and up projections (split, then copied, per expert) is
                    # written in place by every rank
                    self.assertEqual(sorted([*assignment.key_offsets, *assignment.expert_keys]),
                                     sorted(plan.meta_state_dict), by_element)
                    self.assertTrue(all(name.endswith("gate_up_proj") for name in assignment.expert_keys))

    def assert_each_byte_written_once(self, plan, assignment, layouts, ep_ranks):
        """Each key written whole by one rank (an expert's by a rank holding it) or by element ranges that tile it,
        each rank's within its own experts; the bytes shared out evenly."""
        from transformers.integrations import deepspeed_expert_parallel_save as ep_save

        planned = {key: meta for keys in assignment.shard_keys for key, meta in keys.items()}
        in_place = {key: name for name, offsets in assignment.key_offsets.items() for key in offsets}
        self.assertEqual(sorted([*assignment.key_writers, *in_place]), sorted(planned))
        for name in assignment.expert_keys:
            owners = ep_save._expert_rank_of_keys(plan.revert, name, layouts[name])
            for key, ep_rank in owners.items():
                self.assertEqual(ep_ranks[assignment.key_writers[key]], ep_rank, key)
        for name, ranges in assignment.element_ranges.items():
            numel = plan.meta_state_dict[name].numel()
            self.assertEqual(min(ranges)[0], 0, name)
            self.assertEqual(max(end for _, end in ranges), numel, name)
            for (_, end), (start, _) in zip(sorted(ranges), sorted(ranges)[1:]):
                self.assertEqual(end, start, f"{name}: {ranges}")
            if name in layouts:
                per_rank = numel // layouts[name].ep_size
                for rank, (start, end) in enumerate(ranges):
                    self.assertLessEqual(ep_ranks[rank] * per_rank, start, f"{name}: rank {rank}")
                    self.assertLessEqual(end, (ep_ranks[rank] + 1) * per_rank, f"{name}: rank {rank}")
        sizes = [meta.nbytes for meta in planned.values()]
        share = sum(sizes) / len(ep_ranks)
        self.assertEqual(sum(assignment.bytes_per_rank), sum(sizes))
        for count in assignment.bytes_per_rank:
            self.assertLessEqual(abs(count - share), 0.1 * share + max(sizes), assignment.bytes_per_rank)

    def test_experts_kept_fused_are_written_in_place_by_every_rank(self):
        """`save_original_format=False`: each expert tensor is one key spanning every rank's experts, as gpt-oss
        stores them: each rank writes the byte range of the experts it holds; without writing in place (partitions
        not readable) no rank can write such a key alone, the save falls back to the single writer."""
        from transformers.integrations import deepspeed_expert_parallel_save as ep_save
        from transformers.integrations.deepspeed_expert_parallel import ExpertShardLayout

        state_dict, plan = self.plan("mixtral", save_original_format=False)
        layouts = {name: ExpertShardLayout(tuple(t.shape), 0, 0, 2) for name, t in state_dict.items()
                   if ".experts." in name}
        for name, layout in layouts.items():
            self.assertIsNone(ep_save._expert_rank_of_keys(plan.revert, name, layout), name)
        for ep_ranks in ([0, 1], [0, 1, 0, 1]):
            assignment = ep_save.assign_writers(plan, layouts, ep_ranks)
            self.assertEqual(sorted(assignment.key_offsets), sorted(plan.meta_state_dict))
            self.assert_each_byte_written_once(plan, assignment, layouts, ep_ranks)
        self.assertIsNone(ep_save.assign_writers(plan, layouts, [0, 1], by_element=False))
        _, plan = self.plan("mixtral")
        self.assertIsNotNone(ep_save.assign_writers(plan, layouts, [0, 1], by_element=False))
