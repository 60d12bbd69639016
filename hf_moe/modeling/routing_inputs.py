"""What a router may need besides the hidden states: the token ids (hash routing), expert choices to replay
(routing replay for RL, arXiv 2510.11370) and whether the forward decodes from a cache (expert choice refuses).

`MoEModel.forward` builds one `RoutingInputs` per MoE layer and hands it down explicitly (decoder layer ->
MoE block -> router), so gradient checkpointing's recompute sees the same inputs as the first forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NOT_RECORDED = -1  # a replay entry that was not recorded: the router chooses itself there


@dataclass
class RoutingInputs:
    """Per-layer routing inputs for T = B*L flattened tokens."""

    token_ids: torch.Tensor | None = None  # (T,) int64 token ids
    replay_ids: torch.Tensor | None = None  # (T, K) int64 expert ids to use; NOT_RECORDED where not given
    decoding: bool = False  # the forward extends a cache (incremental decoding)


def apply_replay(topk_ids: torch.Tensor, routing_inputs: RoutingInputs | None) -> torch.Tensor:
    """The router's own (T, K) choice, replaced by the replayed ids where there are any (R3: the policy gradient
    sees the routing the sampler used); rows with a NOT_RECORDED entry keep the router's own choice."""
    if routing_inputs is None or routing_inputs.replay_ids is None:
        return topk_ids
    replay = routing_inputs.replay_ids.to(topk_ids.device, torch.long)
    if replay.shape != topk_ids.shape:
        raise ValueError(f"replay_routing: expected expert ids of shape {tuple(topk_ids.shape)} (tokens, "
                         f"num_experts_per_tok) for this layer, got {tuple(replay.shape)}.")
    recorded = (replay != NOT_RECORDED).all(dim=-1, keepdim=True)  # (T, 1)
    return torch.where(recorded, replay, topk_ids)


def layer_routing_inputs(
    config: object, token_ids: torch.Tensor | None, replay_routing: list | tuple | None,
    batch_shape: tuple[int, int], decoding: bool = False,
) -> dict[int, RoutingInputs]:
    """{decoder layer index: RoutingInputs} for the MoE layers of `config` (`config.moe_layer_indices`).
    `replay_routing`: one (B, T, K) (or (B*T, K)) id tensor per MoE layer, in layer order."""
    layers = config.moe_layer_indices
    if replay_routing is not None and len(replay_routing) != len(layers):
        raise ValueError(f"replay_routing: expected one expert-id tensor per MoE layer ({len(layers)}: layers "
                         f"{layers}), got {len(replay_routing)}.")
    flat_ids = None if token_ids is None else token_ids.reshape(-1)
    top_k = config.num_experts_per_tok
    inputs = {}
    for position, layer in enumerate(layers):
        replay = None
        if replay_routing is not None:
            replay = replay_routing[position]
            if replay.shape[:-1] not in (torch.Size(batch_shape), torch.Size([batch_shape[0] * batch_shape[1]])) \
                    or replay.shape[-1] != top_k:
                raise ValueError(f"replay_routing[{position}] (layer {layer}): expected shape {(*batch_shape, top_k)}"
                                 f" (batch, tokens, num_experts_per_tok), got {tuple(replay.shape)}.")
            replay = replay.reshape(-1, top_k)
        inputs[layer] = RoutingInputs(token_ids=flat_ids, replay_ids=replay, decoding=decoding)
    return inputs


class RoutingRecorder:
    """Records the expert ids every main-model MoE layer chose, forward after forward (e.g. through
    `generate()`: the prefill, then one token per step), for routing replay in a later training forward.

        with RoutingRecorder(model) as recorder:
            sequences = model.generate(prompt, max_new_tokens=16, do_sample=True)
        out = model(sequences, replay_routing=recorder.replay_routing(sequences.shape[1]))

    `replay_routing(length)` concatenates the recorded steps along the sequence: one (B, length, K) tensor per
    MoE layer; positions never run through the model (the last sampled token) are NOT_RECORDED, where the
    training forward's router chooses itself (their routing affects no sampled token's probability).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from .moe import MoEBlock  # moe imports this module

        self.blocks = [(name, module) for name, module in model.named_modules()
                       if isinstance(module, MoEBlock) and ".mtp." not in f".{name}."]
        self.steps: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self._handles: list = []

    def __enter__(self) -> RoutingRecorder:
        def recorder(index: int):  # noqa: ANN202
            def record(module: torch.nn.Module, args: tuple, output: tuple) -> None:
                batch, length = args[0].shape[:2]
                self.steps[index].append(output[1].topk_ids.detach().view(batch, length, -1))
            return record

        self._handles = [block.register_forward_hook(recorder(i)) for i, (_, block) in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def replay_routing(self, length: int | None = None) -> list[torch.Tensor]:
        """One (B, length, K) int64 tensor per MoE layer (length: the recorded positions by default)."""
        layers = []
        for steps in self.steps:
            if not steps:
                raise ValueError("RoutingRecorder: nothing was recorded (run the model inside the `with` block).")
            ids = torch.cat(steps, dim=1)
            if length is not None:
                if ids.shape[1] > length:
                    raise ValueError(f"RoutingRecorder: {ids.shape[1]} positions recorded, more than length={length}.")
                pad = ids.new_full((ids.shape[0], length - ids.shape[1], ids.shape[2]), NOT_RECORDED)
                ids = torch.cat([ids, pad], dim=1)
            layers.append(ids)
        return layers
