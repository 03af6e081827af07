"""An expert-parallel model under DeepSpeed ZeRO-3 keeps the save contracts of accelerate, DeepSpeed and PEFT.

Users save the way those libraries document, not only with the fork's `save_pretrained` on every rank. After 3 AdamW
steps under `accelerate launch` with docs/configs' ZeRO-3 config (persistence threshold 0, 16-bit gather on save), for
Qwen3-MoE and Mixtral, EP 2 on 2 ranks and EP 2 x EDP 2 on 4 ranks (slow), each beside its plain ZeRO-3 twin (the same
script, `from_pretrained` without `distributed_config`):
- `accelerator.get_state_dict` then `save_pretrained(dir, state_dict=..., is_main_process=..., save_function=...)`,
  `accelerator.save_model` and `engine.save_16bit_model` / `engine._zero3_consolidated_16bit_state_dict`: rank 0's
  state dict and the saved files hold every expert with the keys and shapes of a single-process model (the original
  checkpoint layout where `save_pretrained` writes), reload in one process, and equal the gathered training state bit
  for bit and a single process trained on the same global batches within the AdamW noise floor;
- `accelerator.save_state` then `load_state` restores every rank's weights and optimizer state exactly;
- with the gather of experts across the EP group switched off (negative control), each of those comparisons fails.
PEFT LoRA on q_proj, v_proj, trained by the Trainer under ZeRO-3 with persistence threshold 0, is at parity with a
single-process PEFT run, and `trainer.save_model` writes the adapter's real values, which reload onto a single-process
base; LoRA on the experts (`target_parameters`) is refused on every rank before any step. Saving into a directory that
is the root of a mounted volume works (every configuration's launch saves there when the test may mount a tmpfs).

The same at ZeRO stage 2 (issue 24), 2 ranks, Qwen3-MoE, beside its plain ZeRO-2 twin.

One launch does every save of a configuration (each launch costs 25-40 s here); the tests of its paths share it.
"""

import json
import os
import shutil
import tempfile
import traceback
import unittest
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from parameterized import parameterized

from tests.deepspeed.test_ep_zero3_train import train_reference
from tests.fork_utils.expert_state import assemble_experts, max_diff
from tests.fork_utils.launcher import CONFIG_DIR, LaunchResult, launch
from tests.fork_utils.mounts import mount_tmpfs, unmount
from tests.fork_utils.tiny_models import checkpoint_keys_and_shapes, make_checkpoint


SCRIPT = Path(__file__).parent / "scripts" / "ep_save_contracts.py"
ACCELERATE_ZERO3 = CONFIG_DIR / "accelerate_deepspeed_zero3.yaml"
ACCELERATE_CONFIGS = {3: ACCELERATE_ZERO3, 2: CONFIG_DIR / "accelerate_deepspeed_zero2.yaml"}
LR, STEPS = 1e-3, 3
TIMEOUT = {2: 180, 4: 360}  # seconds per launch; a healthy 2-rank launch takes 25-40 s here
# One launch per configuration, in this order. `get_state_dict` last: before the fix its save leaves the ranks out
# of step, and the script stops there.
SAVE_PATHS = ("save_16bit_model", "save_model", "save_state", "get_state_dict")
# Every configuration saves into the roots of mounted volumes: accelerate's documented ZeRO-3 save and, with EP, the
# fork's `save_pretrained` on every rank (without EP, `save_pretrained` needs the gathered state dict)
MOUNTED = {
    (family, nproc, ep_size, SAVE_PATHS, ()): ("save_pretrained", "get_state_dict") if ep_size > 1 else ("get_state_dict",)
    for family in ("qwen3_moe", "mixtral") for nproc in (2, 4) for ep_size in (2, 1)
}
# (family, ranks, EP size, save path) of the mount-point tests; the 4-rank ones are slow
MOUNT_CASES = [(family, nproc, ep_size, path) for (family, nproc, ep_size, _, _), paths in MOUNTED.items()
               for path in paths]
# The paths that gather experts across the EP group (the negative control switches that gather off)
GATHER_PATHS = ("save_16bit_model", "save_model", "save_pretrained", "get_state_dict")

# family, ranks, EP size (1: the plain ZeRO-3 twin)
TWO_RANKS = [("qwen3_moe", 2, 2), ("qwen3_moe", 2, 1), ("mixtral", 2, 2), ("mixtral", 2, 1)]
FOUR_RANKS = [("qwen3_moe", 4, 2), ("qwen3_moe", 4, 1), ("mixtral", 4, 2), ("mixtral", 4, 1)]
PEFT_FAST = [("qwen3_moe", 2, 2), ("qwen3_moe", 2, 1)]
# At ZeRO stage 2: EP 2 and its plain ZeRO-2 twin, every save path in one launch each
ZERO2 = [("qwen3_moe", 2, 2), ("qwen3_moe", 2, 1)]
PEFT_SLOW = [("mixtral", 2, 2), ("mixtral", 2, 1), ("qwen3_moe", 4, 2), ("qwen3_moe", 4, 1)]


def config_name(func, _num, param):
    family, nproc, ep_size = param.args[:3]
    name = f"{func.__name__}_{family}_{nproc}_ranks_{f'ep{ep_size}' if ep_size > 1 else 'no_ep'}"
    return "_".join([name, *map(str, param.args[3:])])


def shapes_of(state_dict: dict) -> dict[str, tuple]:
    return {name: tuple(tensor.shape) for name, tensor in state_dict.items()}


def is_lora(name: str) -> bool:
    return ".lora_" in name


def last_lines(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass
class Run:
    """One launch of the script and what the tests derive from it."""

    result: LaunchResult
    out: Path
    family: str
    nproc: int
    ep_size: int
    mounted: dict  # save path -> None where its directory was the root of a mounted volume, else why it was not
    stage: int = 3  # the ZeRO stage
    reference: object = None
    _results: dict | None = None

    @property
    def results(self) -> dict[int, dict]:
        if self._results is None:
            self._results = {rank: report or {} for rank, report in self.result.results().items()}
        return self._results


@dataclass
class Reference:
    trained: dict  # the gathered training state, whole tensors
    weights: dict  # a single process trained on the same global batches
    losses: list
    tolerance: float  # against `weights`: 10x the AdamW noise floor here, or lr/100


def train_peft_reference(checkpoint, lora_config: dict, initial_lora: dict, global_batches, lr, chunks=1):
    """The Trainer's PEFT run in one process: LoRA with the same config and initial values, AdamW (no weight decay,
    constant lr, no clipping) over the adapter, each step on the global batch (`chunks`: its mean loss summed in
    another order)."""
    from peft import LoraConfig, get_peft_model

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = LoraConfig(**{key: lora_config[key] for key in ("r", "lora_alpha", "lora_dropout", "target_modules")})
    model = get_peft_model(base, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in initial_lora.items():
            params[name].copy_(value)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for batch in global_batches:
        loss = sum(model(input_ids=part, labels=part).loss for part in batch.chunk(chunks)) / chunks
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters() if is_lora(name)}


@pytest.mark.multiprocess
class EPZero3SaveContractsTest(unittest.TestCase):
    maxDiff = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = Path(tempfile.mkdtemp(prefix="ep-zero3-save-contracts-"))
        cls.checkpoints = {
            "qwen3_moe": make_checkpoint("qwen3_moe", cls.tmp / "qwen3_moe", seed=51).path,
            "mixtral": make_checkpoint("mixtral", cls.tmp / "mixtral", seed=52).path,
        }
        cls.runs = {}  # (family, ranks, EP size, paths, extra) -> Run: the tests of one configuration share its launch
        cls.shapes = {}
        cls.mounted = []

    @classmethod
    def tearDownClass(cls):
        for directory in cls.mounted:
            unmount(directory)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    # ----- launches and references

    def launch_saves(self, family, nproc, ep_size, paths=SAVE_PATHS, extra=(), stage=3) -> Run:
        """Train and save under `accelerate launch` (docs/configs' config of ZeRO `stage` 3 or 2), once per
        configuration: its tests share the launch. The saves of the configurations in `MOUNTED` go into the roots of
        tmpfs volumes mounted for them (where the test may mount; unmounted by `tearDownClass`)."""
        key = (family, nproc, ep_size, tuple(paths), tuple(extra)) + ((stage,) if stage != 3 else ())
        if key in self.runs:
            return self.runs[key]
        out = self.tmp / "-".join(map(str, [family, nproc, ep_size, *(e.strip("-") for e in extra)]))
        if stage != 3:
            out = out.with_name(f"{out.name}-zero{stage}")
        mounted = {}
        for path in MOUNTED.get(key, ()):
            mounted[path] = mount_tmpfs(out / path)  # None once mounted, else why not
            if mounted[path] is None:
                self.mounted.append(out / path)
        paths = [path for path in mounted if path not in paths] + list(paths)
        args = ["--checkpoint", self.checkpoints[family], "--ep-size", ep_size, "--steps", STEPS, "--lr", LR,
                "--out", out, "--paths", *paths, *extra]
        result = launch(SCRIPT, args, nproc=nproc, launcher="accelerate", accelerate_config=ACCELERATE_CONFIGS[stage],
                        timeout=TIMEOUT[nproc])
        print(f"launch of {family}, {nproc} ranks, EP {ep_size}, ZeRO-{stage}, {' '.join(paths)} {' '.join(extra)}: "
              f"{result.elapsed:.1f} s")
        self.runs[key] = Run(result, out, family, nproc, ep_size, mounted, stage)
        return self.runs[key]

    def single_process_shapes(self, family) -> dict[str, tuple]:
        """Keys and shapes of `model.state_dict()` of the model loaded in one process."""
        if family not in self.shapes:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.checkpoints[family], dtype=torch.float32)
            self.shapes[family] = shapes_of(model.state_dict())
        return self.shapes[family]

    def trained_and_reference(self, run: Run) -> Reference:
        if run.reference is None:
            results = run.results
            missing = [r for r in range(run.nproc) if "final" not in results.get(r, {})]
            if missing:
                self.fail(f"ranks {missing} did not report their training\n{run.result.report()}")
            self.assertEqual([len(results[r]["losses"]) for r in range(run.nproc)], [STEPS] * run.nproc)
            batches = [torch.cat([results[r]["inputs"][s] for r in range(run.nproc)]) for s in range(STEPS)]
            checkpoint, clip = self.checkpoints[run.family], results[0]["clip"]
            losses, weights = train_reference(checkpoint, batches, "adamw", LR, clip)
            _, reordered = train_reference(checkpoint, batches, "adamw", LR, clip, chunks=run.nproc)
            floor, _ = max_diff(reordered, weights)
            run.reference = Reference(assemble_experts(results, "final", run.ep_size), weights, losses,
                                      max(10 * floor, LR / 100))
        return run.reference

    # ----- comparisons

    def path_results(self, run: Run, path: str) -> dict[int, dict]:
        """Every rank's report, once `path` ran to its end on every rank and without an error on rank 0, which writes.
        The other ranks' errors are checked last (`assert_no_errors`), after what rank 0 saved."""
        results = run.results
        missing = [r for r in range(run.nproc) if path not in results.get(r, {}).get("errors", {})]
        if missing:
            self.fail(f"{path} did not run to its end on ranks {missing}\n{run.result.report()}")
        if results[0]["errors"][path]:
            self.assert_no_errors(run, path)
        return results

    def assert_no_errors(self, run: Run, path: str):
        errors = {r: report["errors"][path] for r, report in sorted(run.results.items()) if report["errors"][path]}
        if errors:
            checked = "" if 0 in errors else " (what rank 0 saved was checked first, and is right)"
            self.fail(f"{path} raised on ranks {sorted(errors)}{checked}:\n"
                      + "\n".join(f"--- rank {r}:\n{last_lines(error)}" for r, error in errors.items()))

    def assert_matches(self, got: dict, run: Run, what: str):
        """`got` has the keys and shapes of a single-process model's state dict, equals the gathered training state
        bit for bit, and the single-process reference within its tolerance."""
        reference = self.trained_and_reference(run)
        self.assertEqual(shapes_of(got), self.single_process_shapes(run.family),
                         f"{what}: keys and shapes differ from a single-process model.state_dict()")
        diff, worst = max_diff(got, reference.trained)
        self.assertEqual(diff, 0.0, f"{what}: {diff} away from the gathered training state at {worst}")
        diff, worst = max_diff(got, reference.weights)
        self.assertLessEqual(diff, reference.tolerance,
                             f"{what}: {diff} from the single-process reference at {worst} (tolerance "
                             f"{reference.tolerance:.2e})")

    def reload(self, directory: Path, what: str) -> dict:
        """The state dict of `directory` loaded in one process (a failed load fails the test)."""
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).state_dict()
        except Exception as e:
            self.fail(f"{what}: does not load in one process: {type(e).__name__}: {last_lines(str(e), 4)}\n"
                      f"{last_lines(traceback.format_exc())}")

    def assert_checkpoint(self, run: Run, saved: Path, what: str):
        """A `save_pretrained` checkpoint: the config without `distributed_config`, the keys and shapes of a plain
        single-process `save_pretrained` (original layout), and it reloads in one process equal to the references."""
        self.assertTrue((saved / "config.json").is_file(), f"{what}: no config.json in {sorted(os.listdir(saved))}")
        self.assertNotIn("distributed_config", json.loads((saved / "config.json").read_text()))
        self.assertEqual(checkpoint_keys_and_shapes(saved), checkpoint_keys_and_shapes(self.checkpoints[run.family]),
                         f"{what}: keys and shapes differ from those of a plain single-process save_pretrained")
        self.assert_matches(self.reload(saved, what), run, f"{what}, reloaded in one process")

    # ----- one check per save path

    def check_save_16bit_model(self, run: Run):
        results = self.path_results(run, "save_16bit_model")
        self.assertIs(results[0]["save_16bit_model_returned"], True, "save_16bit_model did not save")
        if run.stage == 3:  # ZeRO-3's consolidation, behind the save
            self.assert_matches(results[0]["consolidated"], run,
                                "rank 0's engine._zero3_consolidated_16bit_state_dict()")
            for r in range(1, run.nproc):
                self.assertIs(results[r].get("consolidated"), True, f"rank {r}: a consolidated state dict, not None")
        saved = torch.load(run.out / "save_16bit_model" / "pytorch_model.bin", weights_only=True)
        self.assert_matches(saved, run, "engine.save_16bit_model's pytorch_model.bin")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.checkpoints[run.family], dtype=torch.float32)
        model.load_state_dict(saved, strict=True)
        self.assert_matches(model.state_dict(), run, "a single-process model loaded with save_16bit_model's file")
        self.assert_no_errors(run, "save_16bit_model")

    def check_save_model(self, run: Run):
        self.path_results(run, "save_model")
        saved = run.out / "save_model"
        # accelerate writes the model's state dict as it is (model layout), weights only
        self.assertEqual(checkpoint_keys_and_shapes(saved), self.single_process_shapes(run.family),
                         "accelerator.save_model: keys and shapes differ from a single-process model.state_dict()")
        shutil.copy(self.checkpoints[run.family] / "config.json", saved / "config.json")
        self.assert_matches(self.reload(saved, "accelerator.save_model"), run,
                            "accelerator.save_model, reloaded in one process (with the model's config)")
        self.assert_no_errors(run, "save_model")

    def check_get_state_dict(self, run: Run):
        results = self.path_results(run, "get_state_dict")
        self.assert_matches(results[0]["state_dict"], run, "rank 0's accelerator.get_state_dict(model)")
        self.assert_checkpoint(run, run.out / "get_state_dict",
                               "save_pretrained(state_dict=accelerator.get_state_dict(model), is_main_process=...)")
        self.assert_no_errors(run, "get_state_dict")

    def check_save_pretrained(self, run: Run):
        self.path_results(run, "save_pretrained")
        self.assert_checkpoint(run, run.out / "save_pretrained", "save_pretrained on every rank")
        self.assert_no_errors(run, "save_pretrained")

    def check_save_state(self, run: Run):
        results = self.path_results(run, "save_state")
        self.assert_no_errors(run, "save_state")  # every rank restores its own state
        for r, report in sorted(results.items()):
            moved, _ = max_diff(report["perturbed"], report["final"])
            self.assertGreater(moved, 0.0, f"rank {r}: the step after save_state moved nothing: it proves nothing")
            diff, worst = max_diff(report["loaded"], report["final"])
            self.assertEqual(diff, 0.0, f"rank {r}: load_state restored the weights {diff} away at {worst}")
            self.assertEqual(report["resumed_loss"], report["perturbed_loss"], f"rank {r}: loss after load_state")
            diff, worst = max_diff(report["resumed"], report["perturbed"])
            self.assertEqual(diff, 0.0, f"rank {r}: the same step after load_state lands {diff} away at {worst} "
                                        "(optimizer state not restored)")

    CHECKS = {
        "save_16bit_model": check_save_16bit_model,
        "save_model": check_save_model,
        "get_state_dict": check_get_state_dict,
        "save_pretrained": check_save_pretrained,
        "save_state": check_save_state,
    }

    def check_training(self, run: Run):
        """The launch trained at parity with one process: else no save can be."""
        reference = self.trained_and_reference(run)
        results = run.results
        for s in range(STEPS):
            rows = {tuple(results[r]["inputs"][s].flatten().tolist()) for r in range(run.nproc)}
            self.assertEqual(len(rows), run.nproc, f"step {s}: the ranks did not feed batches of their own")
        for s, want in enumerate(reference.losses):
            got = sum(results[r]["losses"][s] for r in range(run.nproc)) / run.nproc
            self.assertLessEqual(abs(got - want) / want, 1e-5, f"step {s}: loss {got} vs reference {want}")
        diff, worst = max_diff(reference.trained, reference.weights)
        self.assertLessEqual(diff, reference.tolerance, f"trained weights off by {diff} at {worst}")
        self.assertLess(diff, LR / 10, "off by a whole update: a stale or misplaced expert")

    # ----- accelerate and DeepSpeed saves at ZeRO stage 2 (issue 24): every path of one launch per configuration

    @parameterized.expand(ZERO2, name_func=config_name)
    def test_zero2_trains_at_parity_and_keeps_every_save_contract(self, family, nproc, ep_size):
        """`get_state_dict` + `save_pretrained(state_dict=...)`, `accelerator.save_model` and `engine.save_16bit_model`
        write every expert (gathered onto rank 0); `save_state` / `load_state` restore every rank; with EP also
        `save_pretrained` on every rank. The plain ZeRO-2 twin the same."""
        paths = SAVE_PATHS + (("save_pretrained",) if ep_size > 1 else ())
        run = self.launch_saves(family, nproc, ep_size, paths=paths, stage=2)
        self.check_training(run)
        for path in paths:
            with self.subTest(path=path):
                self.CHECKS[path](self, run)

    # ----- accelerate and DeepSpeed saves: 2 ranks

    @parameterized.expand(TWO_RANKS, name_func=config_name)
    def test_training_at_parity(self, family, nproc, ep_size):
        self.check_training(self.launch_saves(family, nproc, ep_size))

    @parameterized.expand(TWO_RANKS, name_func=config_name)
    def test_get_state_dict_then_save_pretrained(self, family, nproc, ep_size):
        self.check_get_state_dict(self.launch_saves(family, nproc, ep_size))

    @parameterized.expand(TWO_RANKS, name_func=config_name)
    def test_accelerator_save_model(self, family, nproc, ep_size):
        self.check_save_model(self.launch_saves(family, nproc, ep_size))

    @parameterized.expand(TWO_RANKS, name_func=config_name)
    def test_engine_save_16bit_model(self, family, nproc, ep_size):
        self.check_save_16bit_model(self.launch_saves(family, nproc, ep_size))

    @parameterized.expand(TWO_RANKS, name_func=config_name)
    def test_accelerator_save_state_then_load_state(self, family, nproc, ep_size):
        self.check_save_state(self.launch_saves(family, nproc, ep_size))

    # ----- the same on 4 ranks: EP 2 x expert-data-parallel 2

    @parameterized.expand(FOUR_RANKS, name_func=config_name)
    @pytest.mark.slow
    def test_training_at_parity_slow(self, family, nproc, ep_size):
        self.check_training(self.launch_saves(family, nproc, ep_size))

    @parameterized.expand(FOUR_RANKS, name_func=config_name)
    @pytest.mark.slow
    def test_get_state_dict_then_save_pretrained_slow(self, family, nproc, ep_size):
        self.check_get_state_dict(self.launch_saves(family, nproc, ep_size))

    @parameterized.expand(FOUR_RANKS, name_func=config_name)
    @pytest.mark.slow
    def test_accelerator_save_model_slow(self, family, nproc, ep_size):
        self.check_save_model(self.launch_saves(family, nproc, ep_size))

    @parameterized.expand(FOUR_RANKS, name_func=config_name)
    @pytest.mark.slow
    def test_engine_save_16bit_model_slow(self, family, nproc, ep_size):
        self.check_save_16bit_model(self.launch_saves(family, nproc, ep_size))

    @parameterized.expand(FOUR_RANKS, name_func=config_name)
    @pytest.mark.slow
    def test_accelerator_save_state_then_load_state_slow(self, family, nproc, ep_size):
        self.check_save_state(self.launch_saves(family, nproc, ep_size))

    # ----- negative control

    @parameterized.expand([(path,) for path in GATHER_PATHS])
    def test_negative_control_without_the_ep_gather_the_comparison_fails(self, path):
        """Each expert saved as rank 0's slice (`_gather_expert_parallel_tensor` with no layout): the check of the
        path must fail. The switch must have been hit on the path, or the control proves nothing."""
        run = self.launch_saves("qwen3_moe", 2, 2, paths=GATHER_PATHS, extra=("--no-ep-gather",))
        switched_off = run.results.get(0, {}).get("expert_gathers", {}).get(path)
        self.assertIsNotNone(switched_off, f"{path} did not run\n{run.result.report()}")
        self.assertGreater(switched_off, 0, f"{path} never gathered an expert through _gather_expert_parallel_tensor:"
                                            " switching it off proves nothing")
        with self.assertRaises(AssertionError) as caught:
            self.CHECKS[path](self, run)
        print(f"negative control, {path}: {last_lines(str(caught.exception), 3)}")

    # ----- PEFT

    def launch_peft(self, family, nproc, ep_size, *extra, stage=3) -> tuple[LaunchResult, Path]:
        out = self.tmp / "-".join(map(str, ["peft", family, nproc, ep_size, stage, *(e.strip("-") for e in extra)]))
        args = ["--checkpoint", self.checkpoints[family], "--ep-size", ep_size, "--steps", STEPS, "--lr", LR,
                "--out", out, "--peft", "--stage", stage, *extra]
        return launch(SCRIPT, args, nproc=nproc, launcher="torchrun", timeout=TIMEOUT[nproc]), out

    def check_peft(self, family, nproc, ep_size, stage=3):
        from peft import PeftModel
        from safetensors.torch import load_file

        from transformers import AutoModelForCausalLM

        result, out = self.launch_peft(family, nproc, ep_size, stage=stage)
        results = result.check().results()
        self.assertEqual([len(results[r]["losses"]) for r in range(nproc)], [STEPS] * nproc)
        initial = assemble_experts(results, "initial", ep_size)
        final = assemble_experts(results, "final", ep_size)
        lora_initial = {name: t for name, t in initial.items() if is_lora(name)}
        lora_final = {name: t for name, t in final.items() if is_lora(name)}
        self.assertEqual(len(lora_final), 2 * 2 * 2, "LoRA A and B on q_proj and v_proj of 2 layers")
        frozen, worst = max_diff({k: v for k, v in final.items() if not is_lora(k)},
                                 {k: v for k, v in initial.items() if not is_lora(k)})
        self.assertEqual(frozen, 0.0, f"the frozen base moved, by {frozen} at {worst}")
        moved, _ = max_diff(lora_final, lora_initial)
        self.assertGreater(moved, 0.0, "training did not move the adapter")

        # Parity with one process on the same global batches, from the same adapter initialisation
        batches = [torch.cat([results[r]["inputs"][s] for r in range(nproc)]) for s in range(STEPS)]
        checkpoint = self.checkpoints[family]
        ref_losses, ref_lora = train_peft_reference(checkpoint, results[0]["lora"], lora_initial, batches, LR)
        _, reordered = train_peft_reference(checkpoint, results[0]["lora"], lora_initial, batches, LR, chunks=nproc)
        floor, _ = max_diff(reordered, ref_lora)
        tolerance = max(10 * floor, LR / 100)
        for s, want in enumerate(ref_losses):
            got = sum(results[r]["losses"][s] for r in range(nproc)) / nproc
            self.assertLessEqual(abs(got - want) / want, 1e-5, f"step {s}: loss {got} vs reference {want}")
        diff, worst = max_diff(lora_final, ref_lora)
        print(f"PEFT {family}, {nproc} ranks, EP {ep_size}: adapter moved {moved:.2e}, {diff:.2e} from the reference "
              f"(tolerance {tolerance:.2e}); losses {[round(x, 6) for x in ref_losses]}")
        self.assertLessEqual(diff, tolerance, f"trained adapter {diff} from the reference at {worst}")

        # trainer.save_model: the adapter's real values, which reload onto a single-process base
        saved = out / "trainer"
        adapter_file = saved / "adapter_model.safetensors"
        self.assertTrue(adapter_file.is_file(), f"no adapter saved: {sorted(os.listdir(saved))}")
        adapter = load_file(adapter_file)
        expected = {name.replace(".default.", "."): t for name, t in lora_final.items()}
        self.assertEqual(shapes_of(adapter), shapes_of(expected), "the saved adapter's keys and shapes (0: empty)")
        diff, worst = max_diff(adapter, expected)
        self.assertEqual(diff, 0.0, f"the saved adapter is {diff} away from the trained one at {worst}")
        base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, saved)
        reloaded_lora = {name: p.detach() for name, p in reloaded.named_parameters() if is_lora(name)}
        self.assertEqual(shapes_of(reloaded_lora), shapes_of(lora_final))
        diff, worst = max_diff(reloaded_lora, lora_final)
        self.assertEqual(diff, 0.0, f"the reloaded adapter is {diff} away from the trained one at {worst}")

    @parameterized.expand(PEFT_FAST, name_func=config_name)
    def test_peft_lora_trains_at_parity_and_trainer_saves_the_adapter(self, family, nproc, ep_size):
        self.check_peft(family, nproc, ep_size)

    @parameterized.expand(PEFT_SLOW, name_func=config_name)
    @pytest.mark.slow
    def test_peft_lora_trains_at_parity_and_trainer_saves_the_adapter_slow(self, family, nproc, ep_size):
        self.check_peft(family, nproc, ep_size)

    def test_peft_lora_at_zero2_trains_at_parity_and_trainer_saves_the_adapter(self):
        """The same at ZeRO stage 2 with EP 2 (issue 24): the experts frozen, the optimizer dense."""
        self.check_peft("qwen3_moe", 2, 2, stage=2)

    def test_lora_on_experts_is_refused_on_every_rank_before_training(self):
        result, _ = self.launch_peft("qwen3_moe", 2, 2, "--lora-experts")
        self.assertFalse(result.ok, "LoRA on the experts (target_parameters) trained without an error")
        self.assertFalse(result.timed_out, result.report())
        for r in range(2):
            outcome = result.ranks.get(r)
            self.assertTrue(outcome is not None and outcome.error, f"rank {r} did not raise\n{result.report()}")
            self.assertIn("target_parameters", outcome.error, f"rank {r}: {last_lines(outcome.error)}")
            if outcome.result is not None:
                self.assertEqual(outcome.result["steps_done"], 0, f"rank {r} trained before the refusal")

    # ----- a directory that is the root of a mounted volume

    @parameterized.expand([case for case in MOUNT_CASES if case[1] == 2], name_func=config_name)
    def test_save_into_the_root_of_a_mounted_volume(self, family, nproc, ep_size, path):
        self.check_save_into_mount_point(family, nproc, ep_size, path)

    @parameterized.expand([case for case in MOUNT_CASES if case[1] == 4], name_func=config_name)
    @pytest.mark.slow
    def test_save_into_the_root_of_a_mounted_volume_slow(self, family, nproc, ep_size, path):
        self.check_save_into_mount_point(family, nproc, ep_size, path)

    def check_save_into_mount_point(self, family, nproc, ep_size, path):
        """The fork's `save_pretrained` on every rank (EP only: without EP, `save_pretrained` needs the gathered state
        dict), and accelerate's documented ZeRO-3 save, into a directory that is the root of a mounted volume (the
        launch of the configuration saves there: see `MOUNTED`)."""
        run = self.launch_saves(family, nproc, ep_size)
        if run.mounted[path] is not None:
            self.skipTest(run.mounted[path])
        self.assertTrue(os.path.ismount(run.out / path), f"{run.out / path} is no longer a mount point")
        self.CHECKS[path](self, run)
