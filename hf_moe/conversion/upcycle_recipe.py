"""The upcycling recipe and its math: how one dense SwiGLU FFN becomes routed + shared experts and a router.

See `hf_moe.conversion.upcycle` for the layout (virtual groups, He et al. 2024, arXiv 2410.07524), the exactness
conditions and the router initialisations; Drop-Upcycling is Nakamura et al. 2025 (arXiv 2502.19261).
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

import torch
from transformers.activations import ACT2FN

from ..modeling.configuration import MoEConfig

STRATEGIES = ("auto", "copy", "virtual-group", "drop-upcycling")
ROUTER_INITS = ("random", "zero", "hidden")
SHARED_SELECTIONS = ("first", "active")
SCALE_TARGETS = ("down_proj", "routed_scaling_factor")
SCORING_FUNCS = ("softmax", "sigmoid")
TIE_BREAK = 1e-5  # per-copy bias step that orders copies under a zero router (far below gamma = 1e-3)


def invalid_argument(name: str, value: object, why: str) -> ValueError:
    """The error for an upcycle argument (named, with its value and what is allowed)."""
    return ValueError(f"upcycle {name}={value!r} is invalid: {why}.")


def _option(text: str, default: Any = MISSING, **cli: Any) -> Any:
    """A recipe field: its help `text` and the CLI details (`choices`; `flag` when the flag is not
    `--field-name`) live in its metadata, from which `hf-moe upcycle`'s flags are generated."""
    return field(default=default, metadata={"help": text, **cli})


@dataclass(frozen=True)
class UpcycleRecipe:
    """What `upcycle` builds (layout: `hf_moe.conversion.upcycle`'s docstring), each field's help in its metadata.
    The one spelling of the recipe: `upcycle(src, out, recipe)`, its keyword overrides (`build`) and the CLI's
    flags all come from these fields. Validated by `check`."""

    num_experts: int = _option("routed experts N per MoE layer", flag="--experts")
    top_k: int = _option("routed experts per token K; exact when a multiple of granularity - shared_experts")
    granularity: int = _option("shards G per FFN copy (fine-grained upcycling; the expert width is F / G)", 1)
    shared_experts: int = _option("shards of the FFN kept as always-on shared experts", 0, flag="--shared")
    strategy: str = _option("copy, virtual-group, drop-upcycling, or auto (from the other options; None = auto)",
                            "auto", choices=STRATEGIES)
    scoring_func: str = _option("router scores", "sigmoid", choices=SCORING_FUNCS)
    router_init: str = _option("router rows: random, zero, or hidden (needs one probe text per copy)", "random",
                               choices=ROUTER_INITS)
    drop_ratio: float = _option("fraction of each expert re-drawn (Drop-Upcycling; the paper's best: 0.5)", 0.0)
    shared_selection: str = _option("shared neurons: the first shards or the most active on the probe batch",
                                    "first", choices=SHARED_SELECTIONS)
    shared_expert_gate: bool = _option("Qwen2-MoE-style sigmoid-gated shared expert", False)
    scale_on: str = _option("where the factor R of exact fine-grained upcycling goes", "down_proj",
                            choices=SCALE_TARGETS)
    n_group: int = _option("expert groups of group-limited routing (as in MoEConfig)", 1)
    topk_group: int = _option("groups chosen per token (as in MoEConfig)", 1)
    first_k_dense_replace: int = _option("keep the first k layers dense", 0)
    moe_layer_freq: int = _option("every how many layers (after the dense ones) one is MoE", 1)
    router_bias_update_rate: float = _option("balancing bias step gamma (0 disables bias balancing)", 1e-3)
    seed: int = _option("seed of the random router rows and of Drop-Upcycling", 0)

    def __post_init__(self) -> None:
        if self.strategy is None:  # upcycle(strategy=None) has always meant "auto"
            object.__setattr__(self, "strategy", "auto")

    @classmethod
    def build(cls, recipe: UpcycleRecipe | None = None, **overrides: Any) -> UpcycleRecipe:
        """`recipe` with `overrides` (recipe field names) replaced, or a recipe made of `overrides` alone; a
        TypeError names an unknown keyword (with the closest field) or the required fields left out."""
        names = [f.name for f in fields(cls)]
        for key in overrides:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"upcycle got an unexpected keyword argument {key!r}{hint}: the recipe fields are "
                                f"{tuple(names)}.")  # fmt: skip
        if recipe is not None:
            return replace(recipe, **overrides)
        required = [f.name for f in fields(cls) if f.default is MISSING and f.name not in overrides]
        if required:
            raise TypeError(f"upcycle needs {' and '.join(required)} (or recipe=UpcycleRecipe(...)).")
        return cls(**overrides)

    @property
    def routed_shards(self) -> int:
        """R: shards of one copy that are routed experts."""
        return self.granularity - self.shared_experts

    @property
    def copies(self) -> int:
        """C = N / R copies of the routed neurons."""
        return self.num_experts // self.routed_shards

    @property
    def resolved_strategy(self) -> str:
        if self.strategy != "auto":
            return self.strategy
        if self.drop_ratio > 0:
            return "drop-upcycling"
        return "copy" if self.granularity == 1 and self.shared_experts == 0 else "virtual-group"

    def check(self, intermediate_size: int) -> None:
        """Raise ValueError naming the argument for a combination that cannot be built."""
        for option in fields(self):
            allowed = option.metadata.get("choices")
            if allowed is not None and getattr(self, option.name) not in allowed:
                raise invalid_argument(option.name, getattr(self, option.name), f"allowed values are {allowed}")
        for name in ("num_experts", "top_k", "granularity"):
            if getattr(self, name) < 1:
                raise invalid_argument(name, getattr(self, name), "must be a positive integer")
        if self.top_k > self.num_experts:
            raise invalid_argument("top_k", self.top_k, f"must be at most num_experts={self.num_experts}")
        if intermediate_size % self.granularity:
            why = f"must divide the FFN's intermediate_size={intermediate_size} (experts are equal shards)"
            raise invalid_argument("granularity", self.granularity, why)
        if not 0 <= self.shared_experts < self.granularity:
            why = (f"must be >= 0 and below granularity={self.granularity}: shared experts are shards carved out of "
                   "the FFN and at least one shard must remain for the routed experts")
            raise invalid_argument("shared_experts", self.shared_experts, why)
        if self.num_experts % self.routed_shards:
            why = (f"must be a multiple of the {self.routed_shards} routed shards per copy (granularity "
                   f"{self.granularity} - shared_experts {self.shared_experts})")
            raise invalid_argument("num_experts", self.num_experts, why)
        strategy = self.resolved_strategy
        if strategy == "copy" and (self.granularity != 1 or self.shared_experts):
            why = ("copy upcycling makes every expert a whole FFN (granularity=1, shared_experts=0); use "
                   "'virtual-group' for shards and shared experts")
            raise invalid_argument("strategy", "copy", why)
        if not 0.0 <= self.drop_ratio <= 1.0:
            raise invalid_argument("drop_ratio", self.drop_ratio, "must be between 0 and 1")
        if strategy == "drop-upcycling" and self.drop_ratio == 0:
            why = "strategy 'drop-upcycling' needs a ratio in (0, 1] (the paper's best: 0.5)"
            raise invalid_argument("drop_ratio", self.drop_ratio, why)
        if strategy != "drop-upcycling" and self.drop_ratio > 0:
            why = f"only strategy 'drop-upcycling' re-initialises experts (got strategy {strategy!r})"
            raise invalid_argument("drop_ratio", self.drop_ratio, why)
        if self.shared_expert_gate and not self.shared_experts:
            raise invalid_argument("shared_expert_gate", True, "needs shared_experts > 0")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise invalid_argument("n_group", self.n_group, f"must be >= 1 and divide num_experts={self.num_experts}")

    def exactness_issues(self, dtype: torch.dtype) -> list[str]:
        """Why this recipe cannot give the dense model's function exactly (empty when it can)."""
        issues, r = [], self.routed_shards
        if self.top_k % r:
            issues.append(f"top_k={self.top_k} is not a multiple of the {r} routed shards per copy, so a token gets "
                          "parts of copies; use top_k = m * (granularity - shared_experts)")
        if self.n_group > 1 and (self.num_experts // self.n_group) % r:
            issues.append(f"n_group={self.n_group} makes groups of {self.num_experts // self.n_group} experts that "
                          f"split copies of {r} shards, so group-limited routing can cut a copy")
        if self.resolved_strategy == "drop-upcycling":
            issues.append(f"Drop-Upcycling re-initialises {self.drop_ratio:.0%} of every expert's neurons")
        if self.scale_on == "down_proj" and r & (r - 1) and dtype not in (torch.float32, torch.float64):
            issues.append(f"down_proj x {r} rounds in {dtype} ({r} is not a power of two): "
                          "use scale_on='routed_scaling_factor' to keep the stored experts exact slices")
        return issues


# ------------------------------------------------------------------------------------------------ config
def build_moe_config(fields: dict[str, Any], recipe: UpcycleRecipe, base_model: str, base_type: str) -> MoEConfig:
    """The MoEConfig of the upcycled model: the dense model's shape and attention plus the recipe's experts."""
    size = fields["intermediate_size"] // recipe.granularity
    r = recipe.routed_shards
    sigmoid = recipe.scoring_func == "sigmoid"
    method = "noaux_tc" if sigmoid else ("group_limited_greedy" if recipe.n_group > 1 else "greedy")
    provenance = {"base_model": base_model, "base_model_type": base_type, **asdict(recipe),
                  "strategy": recipe.resolved_strategy, "routed_shards_per_copy": r, "copies": recipe.copies}
    return MoEConfig(
        **fields, n_routed_experts=recipe.num_experts, num_experts_per_tok=recipe.top_k, moe_intermediate_size=size,
        n_shared_experts=recipe.shared_experts, shared_expert_intermediate_size=recipe.shared_experts * size,
        shared_expert_gate=recipe.shared_expert_gate, first_k_dense_replace=recipe.first_k_dense_replace,
        moe_layer_freq=recipe.moe_layer_freq, scoring_func=recipe.scoring_func, topk_method=method,
        n_group=recipe.n_group, topk_group=recipe.topk_group, norm_topk_prob=True,
        routed_scaling_factor=float(r) if recipe.scale_on == "routed_scaling_factor" else 1.0,
        router_bias_update_rate=recipe.router_bias_update_rate, upcycled_from=provenance,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- FFN -> MoE
def neuron_partition(
    intermediate_size: int, recipe: UpcycleRecipe, activity: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared neuron ids (S*I,), routed neuron ids (R*I,)): the first S shards are shared, or with
    shared_selection "active" the S*I neurons of highest mean |act(gate x) * up x| (`activity`, (F,))."""
    width = intermediate_size // recipe.granularity * recipe.shared_experts
    order = torch.arange(intermediate_size)
    if recipe.shared_selection == "active" and width:
        if activity is None:
            raise ValueError("shared_selection='active' needs neuron activity measured on the probe batch.")
        chosen = torch.zeros(intermediate_size, dtype=torch.bool)
        chosen[activity.float().topk(width).indices] = True
        return order[chosen], order[~chosen]  # both kept in ascending neuron order
    return order[:width], order[width:]


def router_rows(recipe: UpcycleRecipe, hidden_size: int, std: float, layer: int,
                hidden_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router weight (N, H) fp32 (one row per copy, repeated over its R shards) and e_score_correction_bias (N,)."""
    r, copies = recipe.routed_shards, recipe.copies
    if recipe.router_init == "random":
        generator = torch.Generator().manual_seed(recipe.seed * 100_003 + layer)
        rows = torch.randn(copies, hidden_size, generator=generator) * std
    elif recipe.router_init == "zero":
        rows = torch.zeros(copies, hidden_size)
    else:
        if hidden_rows is None:
            raise ValueError("router_init='hidden' needs the FFN-input states of the probe texts.")
        rows = hidden_rows.float() / hidden_rows.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    copy_of_expert = torch.arange(recipe.num_experts) // r  # (N,)
    bias = torch.zeros(recipe.num_experts)
    if recipe.router_init == "zero" and r > 1:
        bias = -TIE_BREAK * copy_of_expert.float()
    return rows[copy_of_expert].contiguous(), bias


def _redraw(matrix: torch.Tensor, stats: tuple[float, float], mask: torch.Tensor, dim: int,
            generator: torch.Generator) -> torch.Tensor:
    """Replace the rows (dim 0) or columns (dim 1) of `matrix` where `mask` is True by N(mean, std) draws."""
    mean, std = stats
    fresh = torch.randn(matrix.shape, generator=generator) * std + mean
    keep = mask.view(-1, 1) if dim == 0 else mask.view(1, -1)
    return torch.where(keep, fresh, matrix.float()).to(matrix.dtype)


def _stats(matrix: torch.Tensor, scale: float = 1.0) -> tuple[float, float]:
    """(mean, std) of a dense weight matrix (times `scale`), the distribution Drop-Upcycling re-draws from."""
    values = matrix.float()
    return values.mean().item() * scale, values.std().item() * scale


def upcycle_ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, recipe: UpcycleRecipe, layer: int,
                shared_ids: torch.Tensor, routed_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The expert tensors (keys relative to `mlp.`) of one dense FFN gate (F, H), up (F, H), down (H, F);
    the router is added by the caller. Dtypes follow the dense weights."""
    size = gate.shape[0] // recipe.granularity
    r = recipe.routed_shards
    scale = float(r) if recipe.scale_on == "down_proj" else 1.0
    shard_ids = routed_ids.view(r, size)  # (R, I)
    expert_ids = shard_ids[torch.arange(recipe.num_experts) % r]  # (N, I): expert j = shard j mod R
    gate_up = torch.cat((gate[expert_ids], up[expert_ids]), dim=1)  # (N, 2I, H)
    down_experts = down[:, expert_ids].permute(1, 0, 2).contiguous()  # (N, H, I)
    if scale != 1.0:
        down_experts.mul_(scale)  # computed in fp32 and rounded once to the weights' dtype
    if recipe.drop_ratio > 0:  # Drop-Upcycling: per expert, re-draw round(r * I) neurons
        generator = torch.Generator().manual_seed(recipe.seed * 100_003 + layer + 7919)
        dropped = max(1, round(recipe.drop_ratio * size))
        gate_stats, up_stats, down_stats = _stats(gate), _stats(up), _stats(down, scale)
        for j in range(recipe.num_experts):
            mask = torch.zeros(size, dtype=torch.bool)
            mask[torch.randperm(size, generator=generator)[:dropped]] = True
            gate_up[j, :size] = _redraw(gate_up[j, :size], gate_stats, mask, 0, generator)
            gate_up[j, size:] = _redraw(gate_up[j, size:], up_stats, mask, 0, generator)
            down_experts[j] = _redraw(down_experts[j], down_stats, mask, 1, generator)
    out = {"experts.gate_up_proj": gate_up, "experts.down_proj": down_experts}
    if recipe.shared_experts:
        shared_down = down[:, shared_ids]
        if recipe.shared_expert_gate:  # sigmoid(0) = 1/2 on the shared output: store down x 2 (exact)
            shared_down = shared_down * 2
            out["shared_expert_gate.weight"] = torch.zeros(1, gate.shape[1], dtype=gate.dtype)
        out.update({"shared_experts.gate_proj.weight": gate[shared_ids], "shared_experts.up_proj.weight": up[shared_ids],
                    "shared_experts.down_proj.weight": shared_down.contiguous()})  # fmt: skip
    return out


def neuron_activity(ffn_input: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str,
                    valid: torch.Tensor) -> torch.Tensor:
    """Mean |act(gate x) * up x| per intermediate neuron (F,) over the real probe tokens."""
    x = ffn_input[valid].float()  # (tokens, H)
    h = ACT2FN[act](x @ gate.float().T) * (x @ up.float().T)  # (tokens, F)
    return h.abs().mean(dim=0)


__all__ = [
    "ROUTER_INITS", "SCALE_TARGETS", "SCORING_FUNCS", "SHARED_SELECTIONS", "STRATEGIES", "TIE_BREAK", "UpcycleRecipe",
    "build_moe_config", "invalid_argument", "neuron_activity", "neuron_partition", "router_rows", "upcycle_ffn",
]  # fmt: skip
