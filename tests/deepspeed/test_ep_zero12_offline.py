"""DeepSpeed ZeRO stage 1 and 2 checkpoints of an expert-parallel MoE, read offline (issue 24): the fork's
`get_fp32_state_dict_from_zero_checkpoint`, the `zero_to_fp32.py` in the checkpoint folder, the Hugging Face export and
the reader behind them (`deepspeed_expert_parallel_zero12_reader.SavedZero12Checkpoint`), in this one process.

The ranks train a tiny Qwen3-MoE (4 experts per layer, EP 2) 3 AdamW steps with the rank script of the topology tests
(scripts/ep_reshard.py, `--stage 1|2`) and save with `engine.save_checkpoint`:
DeepSpeed's MoE layout, one file per expert, rank 0's model states without the experts, one optimizer file per rank.
Read back, the fp32 weights equal bit for bit what the ranks ended with (their fp32 parameters; under bf16 the
optimizer's fp32 master weights, `safe_get_full_fp32_param`), every expert of every EP rank in place, frozen parameters
(in no optimizer group) as loaded, in the dtype they trained in; Adam's moments too (`whole_tensor(name, "exp_avg")`).
Cases: stage 2 fp32 on 2 ranks (the script as a process, the export); stage 1 bf16 on 2 ranks with the embeddings and
one expert tensor frozen; stage 2 on 4 ranks (EP 2 x expert-data-parallel 2: each EP rank's experts partitioned over 2
ranks) with layer 0's experts frozen. Negative controls: DeepSpeed's own reader stops on these checkpoints; the reader
with its MoE groups joined over every rank (as DeepSpeed's merge joins them) refuses them; with the
expert-data-parallel ranks taken in another order it reads experts that are not the trained ones.
"""

import os
import re
import runpy
import shutil
import sys
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.deepspeed.test_ep_zero3_reshard import MOMENT_KEYS, STEPS_PER_HOP, ResumeChecks, read_converted
from tests.fork_utils.expert_state import assemble_experts, is_expert_param
from tests.fork_utils.launcher import run_commands
from tests.fork_utils.tiny_models import num_experts


EP_SIZE = 2
CONVERT_TIMEOUT = 120


def assembled(results: dict, kind: str) -> dict[str, torch.Tensor]:
    """The whole tensors of the ranks' final `kind` snapshot ("param", "master" or a moment): experts in EP order."""
    reports = {r: {"ep_rank": report["ep_rank"], "final": report["final"][kind]} for r, report in results.items()}
    return assemble_experts(reports, "final", EP_SIZE)


@pytest.mark.multiprocess
class EPZero12OfflineTest(ResumeChecks, unittest.TestCase):
    tmp_prefix = "ep-zero12-offline-"

    def train_and_save(self, name, stage, nproc, *extra):
        """3 steps on `nproc` ranks at ZeRO `stage`, EP 2, saved with `engine.save_checkpoint`; the ranks' reports."""
        return self.hop(name, nproc, EP_SIZE, extra=["--stage", stage, *extra])

    def tag_dir(self, name) -> str:
        return str(self.tmp / name / (self.tmp / name / "latest").read_text().strip())

    def loaded(self) -> dict[str, torch.Tensor]:
        """The weights the run started from (fp32), what frozen parameters keep."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.checkpoint, dtype=torch.float32)
        return {name: param.detach() for name, param in model.named_parameters()}

    def assert_equal_tensors(self, got: dict, want: dict, what: str):
        self.assertEqual(sorted(got), sorted(want), what)
        for name, tensor in want.items():
            self.assertEqual(got[name].shape, tensor.shape, f"{what}: {name}")
            self.assertTrue(torch.equal(got[name], tensor), f"{what}: {name} is not what the ranks ended with")

    def assert_read_offline(self, name, results, trained: str = "param", frozen: str | None = None):
        """
        The checkpoint `name` read offline: is told expert parallel; the fp32 state dict holds every parameter, the
        trained ones in fp32 equal to the ranks' `trained` snapshot, the frozen ones (`frozen` matches them) in the
        dtype they trained in, equal to the weights loaded (cast to it); `exclude_frozen_parameters` leaves them out;
        the reader's moments equal the ranks'. Returns the state dict.
        """
        from transformers import AutoConfig
        from transformers.integrations import deepspeed_expert_parallel_checkpoint as offline
        from transformers.integrations.deepspeed_expert_parallel_zero12_reader import SavedZero12Checkpoint

        self.assertTrue(offline.is_expert_parallel_checkpoint(self.tag_dir(name)))
        final = assembled(results, trained)
        weights = offline.get_fp32_state_dict_from_zero_checkpoint(str(self.tmp / name))
        self.assertEqual(sorted(weights), sorted(final))
        experts = num_experts(AutoConfig.from_pretrained(self.checkpoint))
        frozen_names = [n for n in final if frozen is not None and re.search(frozen, n)]
        loaded = self.loaded()
        for param_name, tensor in weights.items():
            if is_expert_param(param_name):
                self.assertEqual(tensor.shape[0], experts, f"{param_name}: not every expert")
            if param_name in frozen_names:
                dtype = results[0]["final"]["param"][param_name].dtype
                self.assertEqual(tensor.dtype, dtype, param_name)
                self.assertTrue(torch.equal(tensor, loaded[param_name].to(dtype)), f"{param_name}: not as loaded")
            else:
                self.assertEqual(tensor.dtype, torch.float32, param_name)
        self.assert_equal_tensors({n: t.float() for n, t in weights.items()}, final, "fp32 state dict")
        without_frozen = offline.get_fp32_state_dict_from_zero_checkpoint(
            str(self.tmp / name), exclude_frozen_parameters=True
        )
        self.assertEqual(sorted(without_frozen), sorted(set(final) - set(frozen_names)))

        saved = SavedZero12Checkpoint(self.tag_dir(name))
        self.assertEqual(saved.step, STEPS_PER_HOP)
        for key in MOMENT_KEYS:
            moments = assembled(results, key)
            self.assertEqual(sorted(saved.trained_names()), sorted(moments))
            self.assert_equal_tensors({n: saved.whole_tensor(n, key) for n in moments}, moments, key)
        return weights

    def test_stage_2_on_2_ranks_read_by_the_folders_script_and_exported(self):
        """Stage 2, fp32: the state dict and moments; `python <checkpoint>/zero_to_fp32.py <checkpoint> <out>` (the
        fork's script, in a process of its own); the Hugging Face export reloads with `from_pretrained` to the
        trained weights. Negative controls: DeepSpeed's reader stops on the per-expert files; the fork's with the
        MoE groups joined over every rank refuses the checkpoint."""
        from deepspeed.utils import zero_to_fp32

        from transformers import AutoModelForCausalLM
        from transformers.integrations import deepspeed_expert_parallel_checkpoint as offline
        from transformers.integrations import deepspeed_expert_parallel_zero12_reader as reader
        from transformers.integrations.deepspeed_expert_parallel_export import export_zero_checkpoint_to_hf_checkpoint

        results = self.train_and_save("stage2", 2, 2)
        weights = self.assert_read_offline("stage2", results)
        checkpoint = self.tmp / "stage2"

        script = checkpoint / "zero_to_fp32.py"
        self.assertEqual(script.read_bytes(), Path(offline.RECOVERY_SCRIPT).read_bytes(), "not the fork's script")
        [run] = run_commands([[sys.executable, script, checkpoint, self.tmp / "script-out"]], timeout=CONVERT_TIMEOUT)
        self.assertEqual(run.returncode, 0, run.output[-3000:])
        self.assertEqual(os.listdir(self.tmp / "script-out"), ["pytorch_model.bin"])
        self.assert_equal_tensors(read_converted(self.tmp / "script-out"), weights, "zero_to_fp32.py")

        export = self.tmp / "export"
        export_zero_checkpoint_to_hf_checkpoint(str(checkpoint), str(export), config=self.checkpoint, dtype="float32")
        model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
        exported = {name: param.detach() for name, param in model.named_parameters()}
        self.assert_equal_tensors(exported, assembled(results, "param"), "the export")

        with self.assertRaisesRegex(ValueError, "layer_0_expert_0_mp_rank_00_model_states.pt is not a model state"):
            zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
        every_rank = mock.patch.object(reader.SavedZero12Checkpoint, "_ranks",
                                       lambda saved, ep_size, ep_rank: range(saved.world_size))
        with every_rank, self.assertRaisesRegex(ValueError, "hold 49152 elements, its parameters 24576"):
            offline.get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))

        # Optimizer states without a ZeRO stage (`BF16_Optimizer`'s, another layout): refused by name
        other = self.tmp / "bf16-optimizer"
        shutil.copytree(checkpoint, other)
        for path in Path(self.tag_dir("bf16-optimizer")).glob("*optim_states.pt"):
            state = torch.load(path, weights_only=False)
            del state["optimizer_state_dict"]["zero_stage"]
            torch.save(state, path)
        for read in (offline.get_fp32_state_dict_from_zero_checkpoint,
                     lambda folder: export_zero_checkpoint_to_hf_checkpoint(folder, str(self.tmp / "no-export"),
                                                                            config=self.checkpoint)):
            with self.assertRaisesRegex(NotImplementedError, "BF16_Optimizer"):
                read(str(other))

    def test_stage_1_bf16_with_frozen_embeddings_and_down_proj(self):
        """Stage 1, bf16: the trained parameters are the fp32 master weights (not their bf16 copies), the frozen
        ones (embeddings: from rank 0's model states; `down_proj` experts: from the per-expert files) as loaded, in
        bf16. The folder's script gives the same, also with `--exclude_frozen_parameters`."""
        frozen = r"embed_tokens|experts\.down_proj"
        results = self.train_and_save("stage1-bf16", 1, 2, "--bf16", "--freeze", frozen)
        weights = self.assert_read_offline("stage1-bf16", results, trained="master", frozen=frozen)
        params = assembled(results, "param")
        rounded = [n for n, t in weights.items() if t.dtype == torch.float32 and not torch.equal(t, params[n].float())]
        self.assertTrue(rounded, "the masters are the bf16 weights: bf16 not in play")

        checkpoint = str(self.tmp / "stage1-bf16")
        script, out = os.path.join(checkpoint, "zero_to_fp32.py"), self.tmp / "stage1-bf16-out"
        for extra in ([], ["--exclude_frozen_parameters"]):
            with mock.patch.object(sys, "argv", [script, checkpoint, str(out), *extra]):
                runpy.run_path(script, run_name="__main__")
            converted = read_converted(out)
            want = {n: t for n, t in weights.items() if not (extra and re.search(frozen, n))}
            self.assert_equal_tensors(converted, want, f"zero_to_fp32.py {extra}")
            shutil.rmtree(out)

    def test_stage_2_on_4_ranks_ep2_x_expert_data_parallel_2(self):
        """4 ranks, EP 2: each EP rank's experts partitioned over its 2 expert-data-parallel ranks (e, e + 2); layer
        0's experts and the embeddings frozen (DeepSpeed's frozen fragments hold rank 0's experts only). Negative
        control: the expert-data-parallel ranks taken as consecutive ranks read other values for the experts."""
        from transformers.integrations import deepspeed_expert_parallel_checkpoint as offline
        from transformers.integrations import deepspeed_expert_parallel_zero12_reader as reader

        frozen = r"embed_tokens|layers\.0\.mlp\.experts"
        results = self.train_and_save("stage2-4ranks", 2, 4, "--freeze", frozen)
        weights = self.assert_read_offline("stage2-4ranks", results, frozen=frozen)

        def consecutive(saved, ep_size, ep_rank):
            size = saved.world_size // ep_size
            return range(ep_rank * size, (ep_rank + 1) * size)

        with mock.patch.object(reader.SavedZero12Checkpoint, "_ranks", consecutive):
            misread = offline.get_fp32_state_dict_from_zero_checkpoint(str(self.tmp / "stage2-4ranks"))
        wrong = sorted(n for n, t in misread.items() if not torch.equal(t, weights[n]))
        trained_experts = [n for n in weights if is_expert_param(n) and not re.search(frozen, n)]
        self.assertEqual(wrong, sorted(trained_experts))


if __name__ == "__main__":
    unittest.main()
