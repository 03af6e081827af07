"""The launcher helper must bound every job, kill all it started, and report each rank's failure."""

import os
import sys
import textwrap
import time
import unittest
from pathlib import Path
from unittest import mock

import pytest
from parameterized import parameterized

from tests.fork_utils.launcher import REPO_ROOT, _tagged_pids, launch


def _write(tmp: Path, body: str) -> Path:
    script = tmp / "job.py"
    script.write_text(
        "from tests.fork_utils.worker import run_rank, rank, init_process_group\n" + textwrap.dedent(body),
        encoding="utf-8",
    )
    return script


@pytest.mark.multiprocess
class LauncherTest(unittest.TestCase):
    def setUp(self):
        import tempfile

        self.tmp = Path(tempfile.mkdtemp(prefix="launcher-test-"))

    def test_ranks_import_this_checkouts_transformers(self):
        """Whatever the environment's PYTHONPATH or editable install points to (a git worktree shares the install of
        the checkout that made it), a launched rank imports the transformers of the checkout the test runs from."""
        script = _write(
            self.tmp,
            """
            def main():
                import transformers

                return transformers.__file__

            run_rank(main)
            """,
        )
        with mock.patch.dict(os.environ, {"PYTHONPATH": ""}):
            result = launch(script, nproc=1, launcher="python", timeout=60).check()
        self.assertEqual(result.results()[0], str(REPO_ROOT / "src" / "transformers" / "__init__.py"))

    def test_job_past_its_timeout_is_killed_and_reported(self):
        script = _write(
            self.tmp,
            """
            import time

            def main():
                init_process_group()
                print(f"rank {rank()} sleeping", flush=True)
                time.sleep(600)

            run_rank(main)
            """,
        )
        timeout = 15
        start = time.monotonic()
        result = launch(script, nproc=2, timeout=timeout)
        elapsed = time.monotonic() - start

        self.assertTrue(result.timed_out)
        self.assertLess(elapsed, timeout + 8, "the launcher must give up within the timeout plus a few seconds")
        self.assertEqual(result.leftover_pids, [])
        self.assertEqual(_tagged_pids(result.tag), [])
        self.assertEqual(sorted(result.ranks), [0, 1])
        for rank, outcome in result.ranks.items():
            self.assertIn(f"rank {rank} sleeping", outcome.log)
            # The stack dump asked for before the kill says where the rank was stuck.
            self.assertIn("in main", outcome.log)
        self.assertIn("TIMED OUT", result.report())
        with self.assertRaises(AssertionError):
            result.check()

    @parameterized.expand([("torchrun",), ("deepspeed",)])
    def test_rank_that_raises_is_reported_with_its_traceback(self, launcher):
        script = _write(
            self.tmp,
            """
            import torch.distributed as dist

            def main():
                init_process_group()
                if rank() == 1:
                    raise ValueError("boom on rank 1")
                dist.barrier()  # rank 0 would wait here forever: the launcher must still end the job
                return {"rank": rank()}

            run_rank(main)
            """,
        )
        result = launch(script, nproc=2, launcher=launcher, timeout=60)

        self.assertFalse(result.ok)
        self.assertFalse(result.timed_out, f"{launcher} should stop the job as soon as rank 1 fails")
        self.assertIn("ValueError: boom on rank 1", result.ranks[1].error)
        self.assertIn("raise ValueError", result.ranks[1].error)
        self.assertIn("ValueError: boom on rank 1", result.report())
        self.assertEqual(_tagged_pids(result.tag), [])
        # Counted from rank 1's traceback: its failure grace (8 s, for peers to reach their own error), then the end
        self.assertGreater(result.seconds_from_first_fault_to_end, 7.5)
        self.assertLess(result.seconds_from_first_fault_to_end, 30)

    def test_results_come_back_per_rank(self):
        script = _write(
            self.tmp,
            """
            import torch
            import torch.distributed as dist

            def main():
                init_process_group()
                value = torch.tensor([float(rank() + 1)])
                dist.all_reduce(value)
                return {"rank": rank(), "sum": value}

            run_rank(main)
            """,
        )
        result = launch(script, nproc=2, timeout=60).check()
        self.assertIsNone(result.seconds_from_first_fault_to_end)
        results = result.results()
        self.assertEqual(sorted(results), [0, 1])
        for rank, value in results.items():
            self.assertEqual(value["rank"], rank)
            self.assertEqual(value["sum"].item(), 3.0)



class RunCommandsTest(unittest.TestCase):
    """`run_commands`: plain commands side by side, with this checkout's transformers and the launcher's hard timeout."""

    def test_exit_codes_and_outputs_in_order(self):
        from tests.fork_utils.launcher import run_commands

        code = "import sys, transformers; print(transformers.__file__); sys.exit({})"
        results = run_commands([[sys.executable, "-c", code.format(0)], [sys.executable, "-c", code.format(3)]],
                               timeout=60)
        self.assertEqual([result.returncode for result in results], [0, 3])
        for result in results:
            self.assertTrue(result.output.strip().startswith(str(REPO_ROOT / "src")), result.output)

    def test_past_the_timeout_everything_is_killed(self):
        from tests.fork_utils.launcher import run_commands

        start = time.monotonic()
        results = run_commands([[sys.executable, "-c", "import time; time.sleep(60)"]], timeout=2)
        self.assertLess(time.monotonic() - start, 30)
        self.assertIsNone(results[0].returncode)
