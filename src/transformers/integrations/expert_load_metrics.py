# Copyright 2026 The HuggingFace Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Expert load metrics for training Mixture-of-Experts models: how many tokens each expert of each MoE layer gets, how
unevenly they spread over the experts and over the expert-parallel ranks, which experts get none, and how sure the
router is.

Nothing is recomputed: forward pre-hooks on the experts modules (the modules an `ep_plan` names `ep_dispatch_experts`,
called by every MoE block as `experts(hidden_states, top_k_index, top_k_weights)` with global expert ids, with and
without expert parallelism) count the router's top-k choices, and forward hooks on the routers (the module the model
records its `router_logits` from) add up the entropy of their probabilities. Counts stay on the device, with no host
sync, until the figures are collected: then every rank joins ONE all-reduce of all layers' counts, so the figures are
those of the global batch (all ranks' data) and are the same with and without expert parallelism.

- Plain loops and `accelerate`: `tracker = track_expert_load(model)`, then `tracker.collect(step)` on every rank when
  logging (e.g. `accelerator.log(tracker.collect(step), step=step)`).
- `Trainer`: `add_expert_load_metrics(trainer)` adds `ExpertLoadMetricsCallback`, whose figures join the Trainer's logs
  and so reach every `report_to` integration.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..trainer_callback import DefaultFlowCallback, TrainerCallback
from ..utils import logging


logger = logging.get_logger(__name__)

DEFAULT_PREFIX = "expert_load"
DEFAULT_DEAD_WINDOW = 100


# ---------------------------------------------------------------------------------------------------------------------
# The arithmetic (on the reduced, global counts)


def load_imbalance(loads: torch.Tensor) -> torch.Tensor:
    """max / mean over the last dimension (1.0 = perfectly even, E = everything on one of E); 0 where nothing ran."""
    loads = loads.double()
    mean = loads.mean(dim=-1)
    return torch.where(mean > 0, loads.amax(dim=-1) / mean.clamp_min(1e-30), torch.zeros_like(mean))


def normalized_entropy_sum(router_logits: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the entropy of softmax(router logits), divided by log(num_experts): per token 1.0 is a
    uniform router, 0.0 one that puts all its probability on one expert."""
    logits = router_logits.detach().reshape(-1, router_logits.shape[-1]).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    num_experts = logits.shape[-1]
    return entropy.sum().double() / (math.log(num_experts) if num_experts > 1 else 1.0)


class DeadExpertWindow:
    """
    Which experts got no token during the last `window` steps. Fed the counts of each logging interval with the step
    it ended at: an expert is dead at step s when no interval that ended after s - window gave it a token and the
    tracking started at or before s - window. With intervals longer than the window, a dead expert is one that got no
    token during the whole interval.
    """

    def __init__(self, window: int, num_layers: int, num_experts: int, start_step: int = 0):
        if window < 1:
            raise ValueError(f"`dead_window` must be at least 1 step, got {window}.")
        self.window = window
        self.last_active_step = torch.full((num_layers, num_experts), start_step, dtype=torch.long)

    def update(self, step: int, counts: torch.Tensor) -> torch.Tensor:
        """Record the counts of the interval that ended at `step`; return the dead mask (layers x experts)."""
        self.last_active_step[counts.cpu() > 0] = step
        return (step - self.last_active_step) >= self.window


# ---------------------------------------------------------------------------------------------------------------------
# Finding the MoE layers


@dataclass
class MoeLayer:
    """One MoE block: its experts module (whose inputs carry the top-k ids) and its router (whose output carries the
    logits, at `router_output_index`), if the model says which module that is."""

    name: str
    label: str
    experts: nn.Module
    num_experts: int
    router: nn.Module | None = None
    router_output_index: int = 0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a DeepSpeed engine, DDP or other wrapper that keeps it as `.module`. (Not
    `hasattr(model, "ep_plan")`: the DeepSpeed engine forwards unknown attributes to its module.)"""
    from ..modeling_utils import PreTrainedModel

    while not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _pattern_to_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"\d+") + "$")


def _experts_module_names(model: nn.Module) -> list[str]:
    plan = getattr(model, "ep_plan", None) or {}
    patterns = [key for key, style in plan.items() if style == "ep_dispatch_experts"]
    if not patterns:
        # Plans that only shard the expert weights: their experts module is the weights' parent
        patterns = sorted({key.rpartition(".")[0] for key, style in plan.items() if style == "grouped_gemm"})
    regexes = [_pattern_to_regex(pattern) for pattern in patterns]
    return [name for name, _ in model.named_modules() if any(regex.match(name) for regex in regexes)]


def _router_recorder(model: nn.Module):
    """The `OutputRecorder` the model records `router_logits` with (class and output index), if it has one."""
    for module in model.modules():
        recorder = (getattr(module, "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is not None:
            return recorder
    return None


def _expert_parallel_size(model: nn.Module) -> int:
    return model._mesh_manager.get_mesh("ep").size() if getattr(model, "has_ep", False) else 1


def find_moe_layers(model: nn.Module) -> list[MoeLayer]:
    """The MoE layers of a model with an `ep_plan`, in module order, each with its global number of experts."""
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    recorder = _router_recorder(model)
    ep_size = _expert_parallel_size(model)
    layers = []
    for position, name in enumerate(_experts_module_names(model)):
        experts = modules[name]
        local_experts = getattr(experts, "num_experts", None)
        if not isinstance(local_experts, int):
            raise ValueError(f"`{name}` ({type(experts).__name__}) has no integer `num_experts`.")
        # Under expert parallelism the experts module counts only the experts of its rank
        num_experts = local_experts * ep_size if getattr(experts, "_is_expert_parallel", False) else local_experts
        layer_number = re.search(r"\.(\d+)\.", f".{name}.")
        label = f"layer_{layer_number.group(1)}" if layer_number else f"moe_{position}"
        layer = MoeLayer(name=name, label=label, experts=experts, num_experts=num_experts)
        if recorder is not None:
            parent_name = name.rpartition(".")[0]
            parent = modules[parent_name]
            candidates = [parent, *parent.children()]
            routers = [module for module in candidates if isinstance(module, recorder.target_class)]
            if routers:
                layer.router, layer.router_output_index = routers[0], recorder.index
        layers.append(layer)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no MoE layer this module can find: it looks for the experts modules of the "
            "model's `ep_plan`."
        )
    if len({layer.num_experts for layer in layers}) != 1:
        raise NotImplementedError("MoE layers with different numbers of experts are not supported yet.")
    return layers


# ---------------------------------------------------------------------------------------------------------------------
# Counting and collecting


def _sum_over_ranks(payload: torch.Tensor, group) -> None:
    """The one collective of a collect (a function of its own so a test can take it out as a negative control)."""
    torch.distributed.all_reduce(payload, group=group)


def _in_backward() -> bool:
    """Inside the autograd engine, i.e. a gradient-checkpointing recomputation: the forward already counted it."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class ExpertLoadReport:
    """The figures of one logging interval, the same on every rank. `counts[l, e]`: (token, expert) assignments to
    expert e of MoE layer l over all ranks' data; `rank_loads[l, r]`: assignments rank r's experts processed (expert
    parallelism only); `router_entropy[l]`: mean normalized entropy per token (NaN where no router was found)."""

    step: int
    layer_labels: list[str]
    counts: torch.Tensor
    router_entropy: torch.Tensor
    dead: torch.Tensor
    rank_loads: torch.Tensor | None = None

    @property
    def expert_imbalance(self) -> torch.Tensor:
        return load_imbalance(self.counts)

    @property
    def ep_rank_imbalance(self) -> torch.Tensor | None:
        return None if self.rank_loads is None else load_imbalance(self.rank_loads)

    def as_logs(self, prefix: str = DEFAULT_PREFIX, per_expert: bool = False) -> dict[str, float]:
        """Flat `{name: float}` for loggers: a few scalars per layer, their summary over layers, and with `per_expert`
        every expert's (and rank's) token count."""
        logs = {}
        expert_imbalance, ep_rank_imbalance = self.expert_imbalance, self.ep_rank_imbalance
        dead_per_layer = self.dead.sum(dim=-1)
        for index, label in enumerate(self.layer_labels):
            key = f"{prefix}/{label}"
            logs[f"{key}/expert_imbalance"] = float(expert_imbalance[index])
            logs[f"{key}/dead_experts"] = float(dead_per_layer[index])
            if not math.isnan(self.router_entropy[index]):
                logs[f"{key}/router_entropy"] = float(self.router_entropy[index])
            if ep_rank_imbalance is not None:
                logs[f"{key}/ep_rank_imbalance"] = float(ep_rank_imbalance[index])
            if per_expert:
                for expert, count in enumerate(self.counts[index].tolist()):
                    logs[f"{key}/expert_{expert}_tokens"] = float(count)
                if self.rank_loads is not None:
                    for rank, load in enumerate(self.rank_loads[index].tolist()):
                        logs[f"{key}/rank_{rank}_tokens"] = float(load)
        logs[f"{prefix}/expert_imbalance_max"] = float(expert_imbalance.max())
        logs[f"{prefix}/dead_experts"] = float(dead_per_layer.sum())
        entropies = self.router_entropy[~self.router_entropy.isnan()]
        if entropies.numel():
            logs[f"{prefix}/router_entropy_mean"] = float(entropies.mean())
        if ep_rank_imbalance is not None:
            logs[f"{prefix}/ep_rank_imbalance_max"] = float(ep_rank_imbalance.max())
        logs[f"{prefix}/routed_tokens"] = float(self.counts.sum())
        return logs


class ExpertLoadTracker:
    """
    Counts, per MoE layer, the tokens routed to each expert in training forwards (modules in training mode; gradient
    checkpointing recomputations are not counted twice), and collects them over all ranks with one all-reduce.

    Args:
        model: a transformers MoE model with an `ep_plan`, or a wrapper keeping it as `.module` (DeepSpeed engine).
        dead_window: an expert with no token during this many steps counts as dead.
        per_expert: `collect` also returns every expert's token count (and, under expert parallelism, every rank's).
        prefix: the first part of every log name.
        group: the process group of all ranks that hold different data (default: the whole world).
        start_step: the step counting starts at (the dead window needs that much history first).
    """

    def __init__(
        self,
        model: nn.Module,
        dead_window: int = DEFAULT_DEAD_WINDOW,
        per_expert: bool = False,
        prefix: str = DEFAULT_PREFIX,
        group=None,
        start_step: int = 0,
    ):
        self.model = unwrap_model(model)
        self.layers = find_moe_layers(self.model)
        self.num_experts = self.layers[0].num_experts
        self.per_expert = per_expert
        self.prefix = prefix
        self.group = group
        self.dead_window = DeadExpertWindow(dead_window, len(self.layers), self.num_experts, start_step)
        self._expert_owners = self._expert_owner_ranks()
        # Ranks of a tensor-parallel group share one batch: only the first one counts it
        self._counts_here = self._tensor_parallel_rank() == 0
        self._counts = self._entropy_sums = self._router_tokens = None
        self._handles = []
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.experts.register_forward_pre_hook(self._count_hook(index), with_kwargs=True))
            if layer.router is not None:
                self._handles.append(layer.router.register_forward_hook(self._entropy_hook(index, layer)))
        self.last_report: ExpertLoadReport | None = None

    # -- layout -------------------------------------------------------------------------------------------------------

    def _expert_owner_ranks(self) -> torch.Tensor | None:
        """Under expert parallelism, the global rank that processes this rank's tokens for each expert."""
        if not getattr(self.model, "has_ep", False) or self._tensor_parallel_size() > 1:
            return None
        from torch.distributed import get_process_group_ranks

        ep_mesh = self.model._mesh_manager.get_mesh("ep")
        ep_ranks = get_process_group_ranks(ep_mesh.get_group())  # in expert-parallel rank order
        experts_per_rank = self.num_experts // len(ep_ranks)
        return torch.tensor(ep_ranks, dtype=torch.long).repeat_interleave(experts_per_rank)

    def _tensor_parallel_size(self) -> int:
        return getattr(self.model, "_tp_size", None) or 1

    def _tensor_parallel_rank(self) -> int:
        if self._tensor_parallel_size() > 1:
            return self.model._mesh_manager.get_mesh("tp").get_local_rank()
        return 0

    def _world_size(self) -> int:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 1
        return torch.distributed.get_world_size(self.group)

    # -- hooks --------------------------------------------------------------------------------------------------------

    def _allocate(self, device) -> None:
        num_layers = len(self.layers)
        self._counts = torch.zeros(num_layers, self.num_experts, dtype=torch.long, device=device)
        self._entropy_sums = torch.zeros(num_layers, dtype=torch.float64, device=device)
        self._router_tokens = torch.zeros(num_layers, dtype=torch.float64, device=device)

    def _should_count(self, module: nn.Module) -> bool:
        return self._counts_here and module.training and not _in_backward()

    def _count_hook(self, index: int):
        def count_routed_tokens(module, args, kwargs):
            if not self._should_count(module):
                return
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            if self._counts is None:
                self._allocate(top_k_index.device)
            expert_ids = top_k_index.detach().reshape(-1).long()
            # index_add_ into a fixed-size row: no host sync (bincount would read the largest id back)
            self._counts[index].index_add_(0, expert_ids, torch.ones_like(expert_ids))

        return count_routed_tokens

    def _entropy_hook(self, index: int, layer: MoeLayer):
        def add_router_entropy(module, args, output):
            if not self._should_count(module):
                return
            logits = output[layer.router_output_index] if isinstance(output, (tuple, list)) else output
            if self._counts is None:
                self._allocate(logits.device)
            with torch.no_grad():
                self._entropy_sums[index] += normalized_entropy_sum(logits)
                self._router_tokens[index] += logits.numel() // logits.shape[-1]

        return add_router_entropy

    def remove(self) -> None:
        """Stop counting (removes the hooks)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- collecting ---------------------------------------------------------------------------------------------------

    def _collective_device(self):
        if self._counts is not None:
            return self._counts.device
        if self._world_size() > 1 and torch.distributed.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _local_payload(self) -> torch.Tensor:
        """All layers in one float64 tensor (exact for counts below 2**53): counts, entropy sum, router tokens and,
        under expert parallelism, what this rank's tokens add to each rank's load."""
        if self._counts is None:
            self._allocate(self._collective_device())
        columns = [self._counts.double(), self._entropy_sums[:, None], self._router_tokens[:, None]]
        if self._expert_owners is not None:
            world_size = self._world_size()
            owners = self._expert_owners.to(self._counts.device)
            loads = torch.zeros(len(self.layers), world_size, dtype=torch.float64, device=self._counts.device)
            loads.index_add_(1, owners, self._counts.double())
            columns.append(loads)
        return torch.cat(columns, dim=1)

    def _reset(self) -> None:
        for accumulator in (self._counts, self._entropy_sums, self._router_tokens):
            accumulator.zero_()

    def collect_report(self, step: int) -> ExpertLoadReport:
        """The figures since the last collect, over all ranks. Every rank of the group calls it at the same step."""
        payload = self._local_payload()
        if self._world_size() > 1:
            _sum_over_ranks(payload, self.group)
        self._reset()
        payload = payload.cpu()
        num_experts = self.num_experts
        counts = payload[:, :num_experts].round().long()
        entropy_sums, router_tokens = payload[:, num_experts], payload[:, num_experts + 1]
        has_router = torch.tensor([layer.router is not None for layer in self.layers])
        router_entropy = torch.where(
            has_router & (router_tokens > 0), entropy_sums / router_tokens.clamp_min(1), torch.nan
        )
        rank_loads = payload[:, num_experts + 2 :].round().long() if self._expert_owners is not None else None
        self.last_report = ExpertLoadReport(
            step=step,
            layer_labels=[layer.label for layer in self.layers],
            counts=counts,
            router_entropy=router_entropy,
            dead=self.dead_window.update(step, counts),
            rank_loads=rank_loads,
        )
        return self.last_report

    def collect(self, step: int) -> dict[str, float]:
        """`collect_report(step)` as flat `{name: float}` logs. Every rank must call it (one all-reduce)."""
        return self.collect_report(step).as_logs(self.prefix, self.per_expert)


def track_expert_load(model: nn.Module, **kwargs) -> ExpertLoadTracker:
    """Start counting expert load on `model` (see `ExpertLoadTracker` for the options); call `.collect(step)` on every
    rank at each logging step. For `accelerate` and plain training loops."""
    return ExpertLoadTracker(model, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Trainer


class ExpertLoadMetricsCallback(TrainerCallback):
    """
    Adds the expert load figures to the Trainer's training logs, so that every `report_to` integration gets them. Add
    it with `add_expert_load_metrics(trainer)`, which puts it where it must be: after `DefaultFlowCallback` (which
    decides at `on_step_end` whether this step logs) and before the reporting callbacks (which read the logs at
    `on_log`).

    The all-reduce runs in `on_step_end` / `on_epoch_end` when the step logs, which every rank reaches at the same
    step, never in `on_log`: a `Trainer.log` call made on some ranks only then never waits for the others.
    """

    def __init__(self, dead_window: int = DEFAULT_DEAD_WINDOW, per_expert: bool = False, prefix: str = DEFAULT_PREFIX):
        self.options = {"dead_window": dead_window, "per_expert": per_expert, "prefix": prefix}
        self.tracker: ExpertLoadTracker | None = None
        self._pending: dict[str, float] | None = None
        self._collected_step = -1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.tracker is None:
            self.tracker = ExpertLoadTracker(model, start_step=state.global_step, **self.options)
        self._collected_step = state.global_step

    def _collect_if_logging(self, state, control):
        # The Trainer logs at this step only if it has not logged it yet: same condition, same answer on every rank
        if control.should_log and state.global_step > self._collected_step and self.tracker is not None:
            self._pending = self.tracker.collect(state.global_step)
            self._collected_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self._collect_if_logging(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._collect_if_logging(state, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None or logs is None:
            return
        logs.update(self._pending)
        # `Trainer.log` stored a copy in the history before the callbacks ran
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            self.tracker.remove()
            self.tracker = None


def add_expert_load_metrics(trainer, **kwargs) -> ExpertLoadMetricsCallback:
    """Switch expert load metrics on for `trainer` (options: see `ExpertLoadMetricsCallback`): the figures join every
    training log. The callback goes right after `DefaultFlowCallback`, before the reporting integrations."""
    callbacks = trainer.callback_handler.callbacks
    if any(isinstance(callback, ExpertLoadMetricsCallback) for callback in callbacks):
        raise ValueError("This Trainer already has an `ExpertLoadMetricsCallback`.")
    flow_positions = [index for index, callback in enumerate(callbacks) if isinstance(callback, DefaultFlowCallback)]
    callback = ExpertLoadMetricsCallback(**kwargs)
    callbacks.insert(flow_positions[-1] + 1 if flow_positions else 0, callback)
    return callback
