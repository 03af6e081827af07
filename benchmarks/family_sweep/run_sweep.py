"""EP + DeepSpeed ZeRO-3 sweep over MoE families with a `base_model_ep_plan`.

For each family: a tiny seeded random model, `save_pretrained` (the layout upstream writes, conversion mapping at
load); 2 CPU ranks under `accelerate launch` with docs/configs/accelerate_deepspeed_zero3.yaml run `rank.py` beside
this file (load with EP 2, SGD 2 steps via deepspeed.initialize, save_pretrained on every rank); then compared with
one process:
- load: each rank's expert params == its slice (dim 0, EP-rank order) of the single-process model, dense params equal;
- train: mean of the ranks' losses per step vs a single process on the concatenated global batch (rel <= 1e-5), and
  the trained weights (experts assembled over EP ranks) vs the reference (max abs, informative);
- save: the saved checkpoint reloaded in one process == the reference after 2 steps (max abs <= 1e-5), with the keys
  and shapes of a plain single-process save_pretrained.

    make sweep-families [FAMILIES="gpt_oss deepseek_v3"]    (one launch at a time; details in family_sweep/results/)
    make sweep-families SWEEP_STAGE=2    (under ZeRO-2, docs/configs/accelerate_deepspeed_zero2.yaml; results in
                                          results-zero2/)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.family_sweep.families import FAMILIES, num_experts, options, randomize, tiny_config
from tests.deepspeed.test_ep_zero3_train import train_reference
from tests.fork_utils.expert_state import max_diff
from tests.fork_utils.launcher import CONFIG_DIR, launch
from tests.fork_utils.tiny_models import checkpoint_keys_and_shapes


HERE = Path(__file__).parent
STAGE = int(os.environ.get("SWEEP_STAGE", "3"))
RESULTS = HERE / ("results" if STAGE == 3 else f"results-zero{STAGE}")
LAUNCH_CONFIG = CONFIG_DIR / ("accelerate_deepspeed_zero3.yaml" if STAGE == 3 else "accelerate_deepspeed_zero2.yaml")
TIMEOUT = 150
LR = 1e-2
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def max_diff_of_common(a: dict, b: dict):
    """`max_diff` over the tensors of the same name and shape in both (NaN when there are none)."""
    common = {k: v for k, v in a.items() if k in b and v.shape == b[k].shape}
    return max_diff(common, b) if common else (float("nan"), None)


def run_family(family: str, tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM

    out = {"family": family}
    config = tiny_config(family)
    out["num_experts"] = num_experts(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out["model_class"] = type(model).__name__
    out["randomized"] = randomize(family, model)
    checkpoint = tmp / "checkpoint"
    opts = options(family)
    out["options"] = opts
    model.save_pretrained(checkpoint, **opts)
    del model
    plain_shapes = checkpoint_keys_and_shapes(checkpoint)
    initial = {n: p.detach().clone() for n, p in
               AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).named_parameters()}

    saved = tmp / "saved"
    launch_dir = tmp / "launch"
    shard_args = ["--max-shard-size", opts["max_shard_size"]] if "max_shard_size" in opts else []
    result = launch(HERE / "rank.py", ["--checkpoint", checkpoint, "--save-dir", saved, "--stage", STAGE, *shard_args],
                    nproc=2, launcher="accelerate", accelerate_config=LAUNCH_CONFIG, timeout=TIMEOUT,
                    results_dir=launch_dir)
    out["launch"] = {"ok": result.ok, "timed_out": result.timed_out, "returncode": result.returncode,
                     "elapsed": round(result.elapsed, 1)}
    reports = result.results()
    errors = {r: o.error for r, o in result.ranks.items() if o.error}
    if errors:
        out["rank_errors"] = {r: e.strip().splitlines()[-1] for r, e in errors.items()}
        out["rank_tracebacks"] = errors
    if result.timed_out:
        out["timeout_tail"] = {r: o.log_tail(40) for r, o in result.ranks.items()}
    if not result.ranks or any(r not in reports or reports[r] is None for r in (0, 1)):
        out["load"] = {"ok": False, "detail": "no rank report", "launcher_tail": result.output.splitlines()[-30:]}
        return out

    # --- load
    load = {"ok": True}
    if any("loaded" not in reports[r] for r in (0, 1)):
        load.update(ok=False, detail="load raised")
    else:
        layout = reports[0]["layout"]
        load["expert_params"] = sorted(layout)
        load["num_experts_modules"] = reports[0]["num_experts_modules"]
        worst = (0.0, None)
        problems = []
        for r in (0, 1):
            rep = reports[r]
            ep_rank = rep["ep_rank"]
            if set(rep["loaded"]) != set(initial):
                only_ep = sorted(set(rep["loaded"]) - set(initial))
                only_ref = sorted(set(initial) - set(rep["loaded"]))
                problems.append(f"rank {r}: param names differ: only EP {only_ep[:4]} only ref {only_ref[:4]}")
            for name, got in rep["loaded"].items():
                if name not in initial:
                    continue
                want = initial[name]
                if name in rep["layout"]:
                    shape, dim, lr_, size = rep["layout"][name]
                    want = want.chunk(size, dim=dim)[ep_rank]
                if got.shape != want.shape:
                    problems.append(f"rank {r}: {name} shape {tuple(got.shape)} vs {tuple(want.shape)}")
                    continue
                d = (got - want).abs().max().item() if got.numel() else 0.0
                if d > worst[0]:
                    worst = (d, f"rank {r}: {name}")
        # expert tensors not sharded although the model has experts
        expert_like = [n for n in initial if ".experts." in n and n not in layout]
        if expert_like:
            problems.append(f"expert-looking params not in the EP layout: {expert_like[:4]}")
        load["max_abs_diff"], load["worst"] = worst
        load["problems"] = problems
        load["ok"] = worst[0] == 0.0 and not problems
    out["load"] = load

    # --- train
    train = {}
    if any(len(reports[r]["losses"]) < 2 or "final" not in reports[r] for r in (0, 1)):
        train.update(ok=False, detail="training did not finish")
    else:
        steps = len(reports[0]["losses"])
        train["engine_config"] = reports[0].get("engine_config")
        clip = reports[0].get("clip") or 0.0
        global_batches = [torch.cat([reports[r]["inputs"][s] for r in (0, 1)]) for s in range(steps)]
        ref_losses, trained = train_reference(checkpoint, global_batches, "sgd", LR, clip)
        mean = [(reports[0]["losses"][s] + reports[1]["losses"][s]) / 2 for s in range(steps)]
        rel = [abs(m - r) / abs(r) for m, r in zip(mean, ref_losses)]
        train.update(ep_losses=mean, ref_losses=ref_losses, rel_diff=rel, ok=max(rel) <= LOSS_RTOL)
        # trained weights, experts assembled in EP-rank order
        by_ep = {reports[r]["ep_rank"]: reports[r]["final"] for r in (0, 1)}
        layout = reports[0]["layout"]
        final = {n: (torch.cat([by_ep[e][n] for e in range(2)], dim=layout[n][1]) if n in layout else t)
                 for n, t in reports[0]["final"].items()}
        train["weights_max_abs_diff"], train["weights_worst"] = max_diff_of_common(final, trained)
        moved, _ = max_diff_of_common(trained, initial)
        train["reference_moved"] = moved
        experts = [n for n in final if n in layout]
        if experts:
            train["experts_max_abs_diff"] = max((final[n] - trained[n]).abs().max().item() for n in experts)
            train["experts_moved"] = max((trained[n] - initial[n]).abs().max().item() for n in experts)
        train["per_param"] = sorted(
            ((n, (final[n] - trained[n]).abs().max().item(), (trained[n] - initial[n]).abs().max().item())
             for n in final if n in trained and final[n].shape == trained[n].shape),
            key=lambda x: -x[1])[:8]
    out["train"] = train

    # --- save
    save = {}
    if not (saved / "config.json").exists():
        save.update(ok=False, detail="nothing saved")
    else:
        saved_shapes = checkpoint_keys_and_shapes(saved)
        save["keys_equal"] = set(saved_shapes) == set(plain_shapes)
        save["shapes_equal"] = save["keys_equal"] and all(saved_shapes[k] == plain_shapes[k] for k in plain_shapes)
        if not save["keys_equal"]:
            save["only_saved"] = sorted(set(saved_shapes) - set(plain_shapes))[:6]
            save["only_plain"] = sorted(set(plain_shapes) - set(saved_shapes))[:6]
        elif not save["shapes_equal"]:
            save["shape_diffs"] = {k: (saved_shapes[k], plain_shapes[k]) for k in plain_shapes
                                   if saved_shapes[k] != plain_shapes[k]}
        try:
            reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
            got = {n: p.detach() for n, p in reloaded.named_parameters()}
            if "ref_losses" in train:
                save["reload_max_abs_diff"], save["reload_worst"] = max_diff_of_common(got, trained)
                save["ok"] = (save["shapes_equal"] and set(got) == set(trained)
                              and save["reload_max_abs_diff"] <= WEIGHT_ATOL)
            else:
                save["ok"] = save["shapes_equal"]
        except Exception as e:
            save.update(ok=False, reload_error=f"{type(e).__name__}: {e}"[:500])
    out["save"] = save
    return out


def fmt(v):
    if isinstance(v, float):
        return f"{v:.2e}"
    return str(v)


def summary(out: dict) -> str:
    load, train, save = out.get("load", {}), out.get("train", {}), out.get("save", {})
    parts = [f"{out['family']:17s}"]
    parts.append(f"load={'OK' if load.get('ok') else 'FAIL'}({fmt(load.get('max_abs_diff'))})")
    rel = fmt(max(train["rel_diff"])) if "rel_diff" in train else "-"
    parts.append(f"train={'OK' if train.get('ok') else 'FAIL'}(rel={rel}, w={fmt(train.get('weights_max_abs_diff'))})")
    parts.append(f"save={'OK' if save.get('ok') else 'FAIL'}(reload={fmt(save.get('reload_max_abs_diff'))}, "
                 f"keys={save.get('keys_equal')}, shapes={save.get('shapes_equal')})")
    if out.get("rank_errors"):
        parts.append(f"errors={out['rank_errors']}")
    if out.get("launch", {}).get("timed_out"):
        parts.append("TIMED OUT")
    return " ".join(parts)


def main(families):
    RESULTS.mkdir(exist_ok=True)
    for family in families:
        tmp = Path(tempfile.mkdtemp(prefix=f"sweep-{family}-"))
        start = time.monotonic()
        try:
            out = run_family(family, tmp)
        except Exception:
            out = {"family": family, "driver_error": traceback.format_exc()}
        out["seconds"] = round(time.monotonic() - start, 1)
        (RESULTS / f"{family}.json").write_text(json.dumps(out, indent=1, default=str))
        print(summary(out) if "driver_error" not in out else f"{family}: DRIVER ERROR\n{out['driver_error']}",
              flush=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(FAMILIES))
