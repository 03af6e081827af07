"""EP + DeepSpeed ZeRO-3 across nodes: two nodes on one machine, each with its own network and its own disk.

`tests/fork_utils/cluster.py` builds the nodes (network namespaces joined by a virtual switch, a hostname and a private
disk each) and starts the job the way clusters do: one launcher per node, `torchrun` with a c10d rendezvous,
`accelerate launch --num_machines 2`, DeepSpeed's launcher with `--no_ssh`. Each test compares with a single process
trained on the same global batches, and checks the layout from the collectives each rank ran: with expert parallelism
inside a node no expert all-to-all crosses nodes (only dense and expert-data-parallel reductions and gathers do); with
expert parallelism across nodes it does (the check can fail). Saves go to each node's own disk: the HF checkpoint is
complete on the main node, or on every node with `save_on_each_node`; DeepSpeed checkpoints on node-local storage
resume with each node's own files. Faults: a node's cable unplugged mid-step, a node killed mid-step: every surviving
rank ends with an error within the process-group timeout plus the launchers' teardown, nothing left running.
"""

import json
import os
import shutil
import tempfile
import time
import unittest
from pathlib import Path

import pytest
import torch

from tests.deepspeed.test_ep_zero3_train import train_reference
from tests.fork_utils.cluster import VirtualCluster, launch_on_nodes
from tests.fork_utils.expert_state import assemble_experts, max_diff
from tests.fork_utils.launcher import CONFIG_DIR
from tests.fork_utils.tiny_models import make_checkpoint


SCRIPT = Path(__file__).parent / "scripts" / "ep_train.py"
# `make test` runs the torchrun test (load, train, save on each node, resume, layout) and the pulled cable;
# `make test-multinode` (EPFORK_MULTINODE_FULL=1) also the other launchers and the killed node, 5 more minutes.
FULL = os.environ.get("EPFORK_MULTINODE_FULL") == "1"
only_in_full_run = unittest.skipUnless(FULL, "make test-multinode runs it (EPFORK_MULTINODE_FULL=1)")
TIMEOUT = 240
LR = 1e-2
# Collective timeout of the fault tests' process groups (EPFORK_PG_TIMEOUT_S), and the bound they assert: the timeout,
# the 8 s a failed rank of these tests lingers (launcher.FAILURE_GRACE_ENV), the launchers noticing (they poll their
# workers every few seconds) and tearing down. Measured here: 27 s after the cable is unplugged.
FAULT_PG_TIMEOUT_S = 15
FAULT_BOUND_S = 60


def nodes_of(results) -> dict[int, int]:
    """rank -> the node it ran on (as each rank reported it)."""
    return {rank: int(report["node"]) for rank, report in results.items()}


def crossing_collectives(results) -> dict[tuple[str, tuple], int]:
    """The collectives whose group spans several nodes: (operation, group ranks) -> calls, over all ranks."""
    node = nodes_of(results)
    crossing = {}
    for report in results.values():
        for (operation, ranks), (calls, _) in report["collectives"].items():
            if len({node[r] for r in ranks}) > 1:
                crossing[(operation, ranks)] = crossing.get((operation, ranks), 0) + calls
    return crossing


def is_all_to_all(operation: str) -> bool:
    return "all_to_all" in operation


@pytest.mark.multiprocess
@pytest.mark.multinode
class EPZero3MultiNodeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        reason = VirtualCluster.unavailable()
        if reason is not None:
            raise unittest.SkipTest(f"no virtual cluster on this machine: {reason}")
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-zero3-multinode-"))
        cls.checkpoint = make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe", seed=41).path

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def args(self, entry, ep_size, steps, *extra):
        return ["--checkpoint", self.checkpoint, "--entry", entry, "--ep-size", ep_size, "--steps", steps,
                "--optimizer", "adamw", "--lr", LR, *extra]

    def assert_at_parity_with_one_process(self, results, ep_size):
        """Mean losses per step and final weights of a single process trained on the same global batches."""
        world = len(results)
        steps = len(results[0]["losses"])
        batches = [torch.cat([results[r]["inputs"][s] for r in range(world)]) for s in range(steps)]
        ref_losses, ref_weights = train_reference(self.checkpoint, batches, "adamw", LR, results[0]["clip"])
        for step in range(steps):
            got = sum(results[r]["losses"][step] for r in range(world)) / world
            self.assertLessEqual(abs(got - ref_losses[step]) / ref_losses[step], 1e-5, f"step {step}: loss {got}")
        _, reordered = train_reference(self.checkpoint, batches, "adamw", LR, results[0]["clip"], chunks=world)
        floor, _ = max_diff(reordered, ref_weights)
        diff, worst = max_diff(assemble_experts(results, "final", ep_size), ref_weights)
        self.assertLessEqual(diff, max(10 * floor, LR / 100), f"final weights off by {diff} at {worst}")

    def assert_expert_parallel_inside_nodes(self, results):
        node = nodes_of(results)
        for rank, report in results.items():
            self.assertEqual({node[r] for r in report["groups"]["ep"]}, {node[rank]}, f"rank {rank}: EP group")
            self.assertEqual(len({node[r] for r in report["groups"]["edp"]}), 2, f"rank {rank}: EDP group")
        crossing = crossing_collectives(results)
        self.assertTrue(crossing, "no collective crossed nodes: the ranks were not on two nodes")
        self.assertEqual([key for key in crossing if is_all_to_all(key[0])], [], "an all-to-all crossed nodes")
        # What crosses is what the layout needs: dense collectives over all ranks, expert ones over EDP groups.
        world = tuple(range(len(results)))
        edp_groups = {tuple(report["groups"]["edp"]) for report in results.values()}
        self.assertLessEqual({ranks for _, ranks in crossing}, {world} | edp_groups)
        self.assertTrue(any(ranks in edp_groups for _, ranks in crossing), "expert-data-parallel reductions")

    def assert_checkpoint_equals(self, directory, results, ep_size):
        """A whole HF checkpoint in `directory` (loaded in one process) equal to the training state."""
        from transformers import AutoModelForCausalLM

        self.assertTrue((directory / "config.json").is_file(), f"{directory}: no complete checkpoint")
        self.assertNotIn("distributed_config", json.loads((directory / "config.json").read_text()))
        loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).state_dict()
        final = assemble_experts(results, "final", ep_size)
        self.assertEqual(set(final), {name for name in loaded if name in final})
        for name, tensor in final.items():
            self.assertTrue(torch.equal(loaded[name], tensor), f"{directory}: {name}")

    def assert_saved_by_every_rank_where_every_node_sees_the_directory(self, cluster, results, shared, node_local):
        """`save_pretrained` on every rank: into a directory both nodes see, every rank wrote its part of the one
        checkpoint; into a path on each node's own disk, rank 0 saw that the other node does not see its directory
        and wrote the whole checkpoint alone, on its node (nothing on the other node's disk: no split checkpoint)."""
        written = {rank: report["also_saved_bytes_written"] for rank, report in results.items()}
        self.assert_checkpoint_equals(shared, results, ep_size=2)
        total = sum(path.stat().st_size for path in shared.glob("*.safetensors"))
        shared_bytes = [written[rank][str(shared)] for rank in sorted(written)]
        self.assertTrue(all(shared_bytes), f"bytes written per rank {shared_bytes}")
        self.assertLess(sum(shared_bytes), total)  # the tensors' bytes, without the headers
        main_node = int(results[0]["node"])
        self.assert_checkpoint_equals(cluster.node_disk(main_node) / node_local.name, results, ep_size=2)
        self.assertEqual([written[rank][str(node_local)] for rank in sorted(written)][1:], [0] * (len(written) - 1))
        self.assertEqual(written[0][str(node_local)], sum(shared_bytes))
        other_disk = cluster.node_disk(1 - main_node) / node_local.name
        self.assertEqual(sorted(other_disk.iterdir()) if other_disk.exists() else [], [])

    def test_trainer_under_torchrun_saves_on_each_node_and_resumes_from_each_nodes_disk(self):
        """torchrun, c10d rendezvous, 2 nodes x 2 ranks, EP 2 inside each node, expert data parallelism across them;
        Trainer checkpoints with `save_on_each_node` on each node's own disk, resumed by new processes; then
        `save_pretrained` into a directory both nodes see and into one on each node's disk."""
        with VirtualCluster(2, workdir=self.tmp / "trainer") as cluster:
            output = cluster.disk_path / "out"
            shared_directory, node_directory = cluster.workdir / "shared-hf", cluster.disk_path / "hf"
            straight = launch_on_nodes(
                cluster, SCRIPT, self.args("trainer", 2, 6, "--save-steps", 3, "--save-on-each-node",
                                           "--output-dir", output, "--record-collectives",
                                           "--also-save-dirs", shared_directory, node_directory),
                nproc_per_node=2, launcher="torchrun", timeout=TIMEOUT,
            )
            results = straight.check().results()
            # The rendezvous ranks nodes by hostname: node0 runs ranks 0 and 1, at every launch.
            self.assertEqual(nodes_of(results), {0: 0, 1: 0, 2: 1, 3: 1})
            self.assert_at_parity_with_one_process(results, ep_size=2)
            self.assert_expert_parallel_inside_nodes(results)
            for index in range(2):
                disk = cluster.node_disk(index) / "out"
                # The model after 6 steps, complete on each node; DeepSpeed's state with this node's ranks' files
                self.assert_checkpoint_equals(disk / "checkpoint-6", results, ep_size=2)
                ranks = [r for r, n in nodes_of(results).items() if n == index]
                optimizer_files = sorted(p.name for p in (disk / "checkpoint-3" / "global_step3").glob("*optim*"))
                self.assertEqual(len(optimizer_files), len(ranks), optimizer_files)
            self.assert_saved_by_every_rank_where_every_node_sees_the_directory(
                cluster, results, shared_directory, node_directory
            )

            resumed = launch_on_nodes(
                cluster, SCRIPT, self.args("trainer", 2, 6, "--resume-from", output / "checkpoint-3",
                                           "--output-dir", cluster.disk_path / "resumed"),
                nproc_per_node=2, launcher="torchrun", timeout=TIMEOUT,
            ).check().results()
        self.assertEqual(nodes_of(resumed), nodes_of(results))
        for rank, report in resumed.items():
            self.assertEqual(len(report["losses"]), 3, f"rank {rank} did not skip the 3 trained steps")
            self.assertEqual(report["losses"], results[rank]["losses"][3:], f"rank {rank}: losses after resuming")
        final = assemble_experts(resumed, "final", ep_size=2)
        for name, tensor in assemble_experts(results, "final", ep_size=2).items():
            self.assertTrue(torch.equal(final[name], tensor), name)

    @only_in_full_run
    def test_accelerate_saves_on_the_main_node_and_resumes_node_local_state(self):
        """accelerate launch --num_machines 2, 2 ranks each, EP 2: `save_pretrained` on the main node's disk only,
        `save_state` with DeepSpeed's node-local storage, `load_state` from each node's own disk."""
        config = json.loads((CONFIG_DIR / "ds_zero3.json").read_text())
        config["checkpoint"] = {"use_node_local_storage": True}
        ds_config = self.tmp / "ds_zero3_node_local.json"
        ds_config.write_text(json.dumps(config))
        accelerate_config = self.tmp / "accelerate_node_local.yaml"
        accelerate_config.write_text(
            (CONFIG_DIR / "accelerate_deepspeed_zero3.yaml").read_text().replace("docs/configs/ds_zero3.json",
                                                                                str(ds_config))
        )
        with VirtualCluster(2, workdir=self.tmp / "accelerate") as cluster:
            first = launch_on_nodes(
                cluster, SCRIPT, self.args("accelerate", 2, 3, "--save-checkpoint", cluster.disk_path / "state",
                                           "--save-dir", cluster.disk_path / "hf", "--record-collectives"),
                nproc_per_node=2, launcher="accelerate", accelerate_config=accelerate_config, timeout=TIMEOUT,
            ).check().results()
            self.assert_expert_parallel_inside_nodes(first)
            main_node = int(first[0]["node"])
            self.assert_checkpoint_equals(cluster.node_disk(main_node) / "hf", first, ep_size=2)
            self.assertFalse((cluster.node_disk(1 - main_node) / "hf" / "config.json").exists(),
                             "the other node wrote a checkpoint")
            second = launch_on_nodes(
                cluster, SCRIPT, self.args("accelerate", 2, 3, "--resume-from", cluster.disk_path / "state",
                                           "--first-step", 3),
                nproc_per_node=2, launcher="accelerate", accelerate_config=accelerate_config, timeout=TIMEOUT,
            ).check().results()
        # Each rank resumed exactly where it stopped; six steps in two launches at parity with one process trained
        # six steps on the same global batches (the moments restored: lost ones would land off the reference).
        for rank in first:
            for name, tensor in first[rank]["final"].items():
                self.assertTrue(torch.equal(second[rank]["initial"][name], tensor), f"rank {rank}: {name}")
            second[rank]["losses"] = first[rank]["losses"] + second[rank]["losses"]
            second[rank]["inputs"] = torch.cat([first[rank]["inputs"], second[rank]["inputs"]])
        self.assert_at_parity_with_one_process(second, ep_size=2)

    @only_in_full_run
    def test_deepspeed_launcher_with_expert_parallelism_across_nodes_over_a_slow_link(self):
        """DeepSpeed's launcher (`--no_ssh`), 2 nodes x 2 ranks, EP 4 across both nodes, links capped at 200 Mbit/s (and
        2 ms latency where the kernel has netem):
        the expert all-to-all crosses nodes (the layout check sees it), training stays at parity."""
        with VirtualCluster(2, workdir=self.tmp / "deepspeed") as cluster:
            shaped = [cluster.shape(index, delay_ms=2, rate_mbit=200) for index in range(2)]
            print(f"links: {shaped}")  # netem where the kernel has it, else the bandwidth cap alone
            results = launch_on_nodes(
                cluster, SCRIPT, self.args("deepspeed", 4, 3, "--record-collectives"),
                nproc_per_node=2, launcher="deepspeed", timeout=TIMEOUT,
            ).check().results()
            self.assertGreater(sum(cluster.traffic_bytes(i) for i in range(2)), 0)
        self.assert_at_parity_with_one_process(results, ep_size=4)
        crossing = crossing_collectives(results)
        self.assertTrue([key for key in crossing if is_all_to_all(key[0])], "the expert all-to-all spans both nodes")

    def run_until_fault(self, launcher, inject):
        """2 nodes x 1 rank, EP 2, a long run; `inject(cluster, job)` once rank 0 started step 2."""
        with VirtualCluster(2, workdir=self.tmp / f"fault-{launcher}") as cluster:

            def during(job):
                self.assertTrue(job.wait_for_file("step2", timeout=TIMEOUT - 60), "the run never reached step 2")
                inject(cluster, job)
                return time.monotonic()

            result = launch_on_nodes(
                cluster, SCRIPT, self.args("deepspeed", 2, 10_000, "--marker-at-step", 2),
                nproc_per_node=1, launcher=launcher, timeout=TIMEOUT, during=during,
                env={"EPFORK_PG_TIMEOUT_S": str(FAULT_PG_TIMEOUT_S)},
            )
        self.assertFalse(result.timed_out, result.report())
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual((result.leftover_pids, result.stragglers), ([], []), "processes left running")
        return result, result.finished_at - result.during_result

    def test_unplugged_node_ends_the_job_within_the_timeout(self):
        """accelerate launch (static rendezvous). torchrun's elastic agent on a node cut off from the c10d rendezvous
        store keeps waiting on the store after its rank ended (docs: multi-node, faults)."""
        result, ended_after = self.run_until_fault("accelerate", lambda cluster, job: cluster.link_down(1))
        self.assertLess(ended_after, FAULT_BOUND_S, result.report())
        # Both ranks are alive and each loses its peer: both end with the collective's timeout, the one set for the
        # default group, which the expert all-to-all's group took over (torch's own default for it is 30 minutes).
        for rank in (0, 1):
            self.assertIsNotNone(result.ranks[rank].error, f"rank {rank} ended without an error")
            self.assertRegex(result.ranks[rank].error, rf"Timed out waiting {FAULT_PG_TIMEOUT_S * 1000}ms", f"rank {rank}")

    @only_in_full_run
    def test_killed_node_ends_the_job_on_the_other_node(self):
        """torchrun, c10d rendezvous: every process of node 1 SIGKILLed at once; node 0's rank sees its peer gone."""
        result, ended_after = self.run_until_fault("torchrun", lambda cluster, job: job.kill_node(1))
        self.assertLess(ended_after, FAULT_BOUND_S, result.report())
        self.assertIsNotNone(result.ranks[0].error, "the surviving rank ended without an error")
        self.assertRegex(result.ranks[0].error, r"[Cc]onnection|[Tt]imed out|closed|reset")
