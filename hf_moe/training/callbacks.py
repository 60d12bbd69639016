"""MoECallback: aux-loss-free balancing and MoE metrics for `transformers.Trainer`.

Trainer(model, args, ..., callbacks=[MoECallback()])

- `on_step_end` (the Trainer fires it once per optimizer step, after `optimizer.step()` and after all
  gradient-accumulation micro-batches) runs `update_router_biases`: one all_reduce of every router's
  counter, `b_i += gamma * sign(mean load - load_i)`, counters reset (Wang et al. 2024; DeepSeek-V3 §2.1.2).
  The biases are buffers of the model, so checkpoints carry them and `resume_from_checkpoint` restores them.
- `on_log` adds, to the training logs: `moe/max_vio` (per-step batch MaxVio, mean over the main model's MoE
  layers, averaged over the logging window), `moe/max_vio/layer_{i}` (and `moe/max_vio/mtp_{k}`),
  `moe/aux_loss`, `moe/mtp_loss`, `moe/lm_loss` (token-weighted means of the training forwards' outputs),
  and to evaluation logs `moe/eval_max_vio` (+ per layer): the global MaxVio over the whole eval set.
- Monitoring (the same functions as `hf_moe.analysis`): `moe/dead_experts` (fraction of the main layers'
  experts that got no token in the step, averaged over the window; `moe/dead_experts/layer_{i}` per layer),
  `moe/routing_entropy` (mean entropy in nats of the router distributions of the training forwards;
  `moe/routing_entropy/layer_{i}`) and per-layer load percentiles `moe/load_p{0,10,50,90,100}/layer_{i}`
  (relative load load_i / mean load at those quantiles over the experts, window means).

The losses are read from the model's outputs by a forward hook on the outermost hf_moe model (training
forwards with grad only); the eval loads by forward hooks on the routers. Nothing in transformers is patched.
Under TRL's trainers (SFT, DPO, GRPO, ...) the model serves TRL's fused LM head itself (`modeling/fused_head.py`),
so the same `moe/` metrics are logged there and `moe/aux_loss` stays hf_moe's balance loss.

The Trainer calls reporting integrations (TensorBoard, W&B, ...) before user callbacks, so these see the
`moe/` keys only when the callback is inserted ahead of them: `MoECallback.attach(trainer)` does that. The
console/progress printer and `trainer.state.log_history` get them either way.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..modeling.fused_head import FusedLMHeadOutput
from ..modeling.losses import target_count
from ..modeling.model import MoEPreTrainedModel
from .balancing import ExpertLoads, find_routers, read_expert_counts, reset_expert_counters, update_router_biases
from .metrics import RouterLoadRecorder, RoutingEntropyMeter, dead_experts, load_percentiles
from .parts import layer_label

PERCENTILES = (0.0, 0.1, 0.5, 0.9, 1.0)  # the per-layer load quantiles logged as moe/load_p{q}/layer_{i}

_LOSS_KEYS = ("aux_loss", "mtp_loss", "lm_loss")


def mark_moe_blocks_as_zero3_leaves(model: nn.Module) -> int:
    """DeepSpeed ZeRO-3: gather each MoE block's parameters (router, routed and shared experts) once on entry and
    release them on exit (`deepspeed.utils.set_z3_leaf_modules`), instead of hooking its submodules one by one,
    which fails in backward on hf_moe models. MoECallback does it when the Trainer runs DeepSpeed (before the engine
    is built); with accelerate alone set `deepspeed_moe_layer_cls_names: MoEBlock` in its DeepSpeed config (or
    ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES=MoEBlock), or call this before `accelerator.prepare`. Returns how many
    blocks were marked."""
    from deepspeed.utils import set_z3_leaf_modules

    from ..modeling.moe import MoEBlock

    if not any(isinstance(module, MoEBlock) for module in model.modules()):
        return 0
    return len(set_z3_leaf_modules(model, [MoEBlock]))


def check_biases_saved_with_adapter(model: nn.Module, rate: float | None = None) -> None:
    """Refuse bias updates on a peft model whose adapter would not save the biases: they are buffers of the frozen
    base, so base + adapter would differ from the trained model. Routers saved with the adapter (peft's
    `modules_to_save`, as `apply_recipe(model, "lora", bias_update=True)` sets up) are fine."""
    if getattr(model, "peft_config", None) is None:
        return
    routers = find_routers(model)
    gamma = routers[0][1].config.router_bias_update_rate if routers and rate is None else rate
    unsaved = [name for name, _ in routers if ".modules_to_save." not in name]
    if gamma and unsaved:
        raise ValueError(
            f"MoECallback would update the router biases (rate {gamma}) of a peft model, but its adapter does not save "
            f"them ({unsaved[0]} and {len(unsaved) - 1} more are buffers of the frozen base): base + adapter would "
            "differ from the trained model. Use apply_recipe(model, 'lora', bias_update=True) (saves the routers with "
            "the adapter), or turn the updates off: apply_recipe(model, 'lora') / MoECallback(update_biases=False) / "
            "config.router_bias_update_rate = 0.")


class MoECallback(TrainerCallback):
    """Updates router biases once per optimizer step and logs MoE balance metrics under `moe/`.

    update_biases: run the bias update (False: only measure; counters are still read and reset).
    rate / zero_mean: override `config.router_bias_update_rate` / `router_bias_update_zero_mean`.
    per_layer: also log `moe/max_vio/layer_{i}`.
    keep_history: keep every step's per-layer MaxVio in `self.history` (for `hf_moe.analysis`).
    """

    def __init__(
        self,
        update_biases: bool = True,
        rate: float | None = None,
        zero_mean: bool | None = None,
        per_layer: bool = True,
        keep_history: bool = True,
    ) -> None:
        self.update_biases = update_biases
        self.rate = rate
        self.zero_mean = zero_mean
        self.per_layer = per_layer
        self.keep_history = keep_history
        self.history: list[dict[str, Any]] = []  # one entry per optimizer step: step, labels, max_vio
        self.last_loads: ExpertLoads | None = None
        self._model: nn.Module | None = None
        self._handles: list[Any] = []
        self._recorder: RouterLoadRecorder | None = None
        self._entropy: RoutingEntropyMeter | None = None
        self._eval_counts = torch.zeros(0)
        self._reset_window()

    # ---------------------------------------------------------------------------------------- wiring
    @classmethod
    def attach(cls, trainer: Any, callback: MoECallback | None = None) -> MoECallback:
        """Insert a MoECallback right after the Trainer's flow callback, ahead of the reporting integrations,
        so that TensorBoard / W&B / ... receive the `moe/` keys too. Returns the callback."""
        callback = callback if callback is not None else cls()
        callbacks = trainer.callback_handler.callbacks
        if callback in callbacks:
            callbacks.remove(callback)
        callbacks.insert(1 if callbacks else 0, callback)
        callback._bind(trainer.model)
        return callback

    def _bind(self, model: nn.Module | None) -> None:
        """Hook the (outermost) hf_moe model once: losses of training forwards, loads of eval forwards."""
        if model is None or model is self._model:
            return
        self._unbind()
        self._model = model
        top = next((m for m in model.modules() if isinstance(m, MoEPreTrainedModel)), None)
        if top is not None:
            self._handles.append(top.register_forward_hook(self._record_losses, with_kwargs=True))
        self._recorder = RouterLoadRecorder(model, only_eval=True, reset_on_forward=True).attach()
        self._entropy = RoutingEntropyMeter(model).attach()
        self._eval_counts = torch.zeros_like(self._recorder.counts)

    def _unbind(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._recorder is not None:
            self._recorder.detach()
        if self._entropy is not None:
            self._entropy.detach()
        self._model = self._recorder = self._entropy = None

    def _reset_window(self) -> None:
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_weights: dict[str, torch.Tensor] = {}
        self._vio_sums: dict[str, float] = {}
        self._vio_counts: dict[str, int] = {}

    # ------------------------------------------------------------------------------------- recording
    def _record_losses(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook: accumulate the training forward's aux / MTP / LM losses, token-weighted.

        Under the Trainer the LM and MTP losses are sums divided by `num_items_in_batch` (all micro-batches);
        multiplying back gives this micro-batch's sum, so sum / tokens is the exact mean over the window."""
        if not (module.training and torch.is_grad_enabled()):
            return
        labels, num_items = kwargs.get("labels"), kwargs.get("num_items_in_batch")
        for key in _LOSS_KEYS:
            # under TRL's fused LM head `aux_loss` is what TRL adds (MTP + balance); the balance part is separate
            source = "balance_loss" if key == "aux_loss" and isinstance(output, FusedLMHeadOutput) else key
            value = getattr(output, source, None)
            if not isinstance(value, torch.Tensor):
                continue
            value = value.detach().float()
            # tensors all the way (no host sync per micro-batch); read once per log
            tokens = target_count(labels).float() if isinstance(labels, torch.Tensor) else value.new_ones(())
            tokens = tokens.to(value.device)
            scale = tokens if key == "aux_loss" or num_items is None else torch.as_tensor(
                num_items, dtype=torch.float32, device=value.device)
            total, weight = value * scale, tokens
            if key in self._loss_sums:
                total, weight = total + self._loss_sums[key], weight + self._loss_weights[key]
            self._loss_sums[key], self._loss_weights[key] = total, weight

    def _add(self, key: str, value: float) -> None:
        """One step's value of a window-averaged metric (NaN: no data this step, skipped)."""
        if not math.isnan(value):
            self._vio_sums[key] = self._vio_sums.get(key, 0.0) + value
            self._vio_counts[key] = self._vio_counts.get(key, 0) + 1

    def _record_step(self, loads: ExpertLoads, step: int) -> None:
        self.last_loads = loads
        values = loads.max_vio.cpu().tolist()
        mean = loads.mean_max_vio()
        self._add("max_vio", mean)
        for label, value in zip(loads.labels, values):
            self._add(f"max_vio/{label}", value)
        if len(loads.names):
            dead = dead_experts(loads.loads).cpu()
            main = torch.tensor(loads.is_main_layer()) & ~dead.isnan()
            self._add("dead_experts", dead[main].mean().item() if main.any() else float("nan"))
            percentiles = load_percentiles(loads.loads, PERCENTILES).cpu()
            for label, value, row in zip(loads.labels, dead.tolist(), percentiles.tolist()):
                self._add(f"dead_experts/{label}", value)
                for q, p in zip(PERCENTILES, row):
                    self._add(f"load_p{round(q * 100)}/{label}", p)
        if self._entropy is not None and self._entropy.routers:
            entropy = self._entropy.read()
            main = torch.tensor([not layer_label(n).startswith("mtp_") for n, _ in self._entropy.routers])
            main &= ~entropy.isnan()
            self._add("routing_entropy", entropy[main].mean().item() if main.any() else float("nan"))
            for (name, _), value in zip(self._entropy.routers, entropy.tolist()):
                self._add(f"routing_entropy/{layer_label(name)}", value)
        if self.keep_history:
            self.history.append({"step": step, "labels": loads.labels, "max_vio": values, "mean_max_vio": mean})

    def window_metrics(self) -> dict[str, float]:
        """The `moe/` metrics of the steps since the last training log."""
        metrics: dict[str, float] = {}
        for key, total in self._vio_sums.items():
            if "/" not in key or self.per_layer:
                metrics[f"moe/{key}"] = total / self._vio_counts[key]
        for key, total in self._loss_sums.items():
            metrics[f"moe/{key}"] = total.item() / max(self._loss_weights[key].item(), 1.0)
        return metrics

    # ------------------------------------------------------------------------------------- callbacks
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._bind(kwargs.get("model"))
        deepspeed = getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        if deepspeed and kwargs.get("model") is not None:  # `accelerate launch` with a DeepSpeed config sets the latter
            mark_moe_blocks_as_zero3_leaves(kwargs["model"])

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = kwargs.get("model")
        self._bind(model)
        if model is not None and self.update_biases:
            check_biases_saved_with_adapter(model, self.rate)
        if model is not None:
            reset_expert_counters(model)  # forwards made before training must not steer the first update
        self._reset_window()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None:
            return
        if self.update_biases:
            loads = update_router_biases(model, rate=self.rate, zero_mean=self.zero_mean)
        else:
            loads = update_router_biases(model, rate=0.0)  # still sums over ranks and resets the counters
        self._record_step(loads, state.global_step)

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After each evaluation batch: add its loads (recorded by the router hooks) to the eval-set total."""
        if self._recorder is not None:
            self._eval_counts += self._recorder.counts
            self._recorder.reset()

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None:
            return
        added: dict[str, float] = {}
        if any(key.startswith("eval_") for key in logs):
            if self._recorder is not None and self._eval_counts.sum() > 0:
                loads = ExpertLoads([name for name, _ in self._recorder.routers], self._eval_counts.clone())
                added["moe/eval_max_vio"] = loads.mean_max_vio()
                if self.per_layer:
                    for label, value in zip(loads.labels, loads.max_vio.tolist()):
                        if not math.isnan(value):
                            added[f"moe/eval_max_vio/{label}"] = value
                self._eval_counts.zero_()
        elif "loss" in logs:
            added = self.window_metrics()
            self._reset_window()
        if not added:
            return
        logs.update(added)
        # the Trainer appended a copy of `logs` to the history before calling us: complete that entry too
        if state.log_history and all(state.log_history[-1].get(k) == v for k, v in logs.items() if k not in added):
            state.log_history[-1].update(added)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is not None and self.last_loads is None:
            self.last_loads = read_expert_counts(model)
