"""The analysis report: one `report.md` (every plot embedded, every number of a plot in a table, a "how to
read this" line per analysis) and `analysis.json` (the same numbers, for scripts)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .balance import LoadBalance
from .capacity import DropRates
from .coactivation import Coactivation
from .learning import RoutingAgreement
from .specialisation import GroupSpecialisation, TokenSpecialisation

MAX_MATRIX_EXPERTS = 32  # co-activation matrices are tabulated in full up to this many experts
SHARE_BINS = 10  # histogram of per-token mode shares (plot and table)

HOW_TO_READ = {
    "balance": "MaxVio = max load / mean load - 1 (0 = perfectly balanced); dead experts got no token of this "
               "data; routing entropy is that of each token's router distribution (log N = uniform, 0 = one "
               "expert); the percentiles are of load / mean load over the experts (1 = a fair share). The second "
               "figure draws the three per layer: dead experts, entropy against log N, percentile bands.",
    "domain": "Each cell is the share of a data file's tokens sent to an expert divided by that expert's share "
              "of all tokens: 1 (white) = the expert serves this domain like any other, 2 = twice as much. The "
              "score is the mutual information between domain and expert over the domain's entropy, rescaled so "
              "0 = what routing independent of the domain gives on this many tokens and 1 = every expert serves "
              "one domain only.",
    "position": "As for domains, with the position in the sequence (bucketed) as the group: a red column "
                "slice at the first bucket is an expert that takes the first tokens (e.g. attention-sink "
                "positions); a score near 0 = routing does not depend on position.",
    "token": "For every token id seen at least min_count times: the share of its occurrences that took its "
             "most frequent expert set. The score rescales the occurrence-weighted mean of that share so 0 = "
             "no more concentrated than when expert sets are shuffled among all tokens and 1 = every token id "
             "always takes one same expert set (routing fixed by token id, OpenMoE's context-independent "
             "specialisation). 'Explained by token id' is the share of routing decisions a table token id -> "
             "its K most frequent experts reproduces, rescaled the same way.",
    "coactivation": "Lift of a pair of experts = how often both serve one token / how often choices independent "
                    "of each other would pair them (given each expert's load; exact for uniform top-k): 1 = "
                    "independent, > 1 = chosen together (e.g. experts of one group under group-limited routing), "
                    "< 1 = they avoid each other, 0 = never together.",
    "drops": "Share of routed slots over capacity (dropped: the token skips that expert), replayed with the "
             "model's own priority rule (first choices of all tokens before second choices, in token order), "
             "once with one capacity group per batch (what the model's forward does on these batches: the "
             "sequences of a batch queue one after the other) and once per sequence. A rate rising with "
             "position is OpenMoE's 'drop towards the end': late tokens queue behind early ones.",
    "learning": "For each checkpoint, the fraction of tokens whose expert set equals the final model's (dashed: "
                "share of the final experts it already chose). Curves that reach their final level early mean "
                "the routing was learned early in training (OpenMoE's 'early routing learning').",
}


@dataclass
class RoutingAnalysis:
    """Everything `analyze` computed (None where an analysis could not run; `notes` say why)."""

    model: str
    source: str
    num_experts: int
    top_k: int
    layers: list[str]
    domains: list[str]
    tokens_per_domain: list[int]
    seq_len: int
    balance: LoadBalance
    domain: GroupSpecialisation | None
    position: GroupSpecialisation
    token: TokenSpecialisation
    token_strings: dict[int, str]
    coactivation: Coactivation
    drops: list[DropRates]  # one per capacity grouping: one batch (the model's forward), one sequence
    agreement: RoutingAgreement | None
    plots: dict[str, Path] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _image(result: RoutingAnalysis, key: str, alt: str) -> str:
    path = result.plots.get(key)
    return f"![{alt}]({path.name})\n" if path is not None else ""


def _how(key: str) -> str:
    return f"*How to read this:* {HOW_TO_READ[key]}\n"


def _section_balance(r: RoutingAnalysis) -> str:
    b = r.balance
    quantile_names = [f"p{round(100 * q)}" for q in b.quantiles]
    rows = [[layer, int(b.loads[i].sum()), _fmt(b.max_vio[i]), _fmt(b.dead[i]), _fmt(b.entropy[i]),
             _fmt(b.entropy_fraction[i]), *[_fmt(v, 2) for v in b.percentiles[i].tolist()]]
            for i, layer in enumerate(b.layers)]
    loads = [[layer, *[int(v) for v in b.loads[i].tolist()]] for i, layer in enumerate(b.layers)]
    return "\n".join([
        "## Load balance", _how("balance"), _image(r, "load", "expert load per layer"),
        _image(r, "balance", "dead experts, routing entropy and load percentiles per layer"),
        _table(["layer", "slots", "MaxVio", "dead experts", "entropy (nats)", "entropy / log N",
                *[f"load {q}" for q in quantile_names]], rows), "",
        "Slots routed to each expert:", "", _table(["layer", *[str(e) for e in range(r.num_experts)]], loads), ""])


def _group_tables(spec: GroupSpecialisation, group_header: str) -> list[str]:
    out = [_table(["layer", "specialisation score", "NMI", "chance NMI"],
                  [[layer, _fmt(spec.score[i]), _fmt(spec.nmi[i], 4), _fmt(spec.chance[i], 4)]
                   for i, layer in enumerate(spec.layers)]), ""]
    experts = [str(e) for e in range(spec.ratio.shape[2])]
    for i, layer in enumerate(spec.layers):
        rows = [[f"{name} ({int(spec.tokens[g])} tok)", *[_fmt(v, 2) for v in spec.ratio[i, g].tolist()]]
                for g, name in enumerate(spec.groups)]
        rows.append(["overall share of tokens (%)", *[_fmt(100 * v, 1) for v in spec.overall[i].tolist()]])
        out += [f"{layer}: share of the {group_header}'s tokens / overall share, per expert", "",
                _table([group_header, *experts], rows), ""]
    return out


def _section_domain(r: RoutingAnalysis) -> str:
    head = ["## Domain specialisation", _how("domain")]
    if r.domain is None:
        return "\n".join([*head, f"Not run: {r.notes.get('domain', 'needs at least two data files')}.", ""])
    return "\n".join([*head, _image(r, "domain", "domain specialisation"), *_group_tables(r.domain, "domain")])


def _section_position(r: RoutingAnalysis) -> str:
    return "\n".join(["## Position specialisation", _how("position"), _image(r, "position", "position specialisation"),
                      *_group_tables(r.position, "position")])


def _token_text(r: RoutingAnalysis, token: int) -> str:
    text = r.token_strings.get(token, str(token))
    return "`" + repr(text)[1:-1].replace("|", "\\|").replace("`", "'") + "`"


def _section_token(r: RoutingAnalysis) -> str:
    t = r.token
    rows = [[layer, _fmt(t.concentration[i]), _fmt(t.chance[i]), _fmt(t.score[i]), _fmt(t.explained[i]),
             _fmt(t.explained_chance[i]), _fmt(t.explained_score[i])] for i, layer in enumerate(t.layers)]
    hist = t.mode_share_histogram(SHARE_BINS)
    edges = torch.linspace(0, 1, SHARE_BINS + 1).tolist()
    out = ["## Token-id specialisation", _how("token"), _image(r, "token", "token-id specialisation"),
           f"{t.distinct_tokens} token ids with at least {t.min_count} occurrences ({t.tokens_counted} tokens).", "",
           _table(["layer", "concentration A", "chance A0", "score", "explained H", "chance H0", "explained score"], rows),
           "", "Share of token occurrences by the mode share of their token id:", "",
           _table(["layer", *[f"{edges[b]:.1f}-{edges[b + 1]:.1f}" for b in range(SHARE_BINS)]],
                  [[layer, *[_fmt(v, 3) for v in hist[i].tolist()]] for i, layer in enumerate(t.layers)]), ""]
    for i, layer in enumerate(t.layers):
        rows = [[e, ", ".join(f"{_token_text(r, tok)} ({100 * share:.0f}% of {count})" for tok, share, count in tops)]
                for e, tops in enumerate(t.top_tokens[i])]
        out += [f"{layer}: top tokens per expert (share of the token's occurrences sent to the expert)", "",
                _table(["expert", "tokens"], rows), ""]
    return "\n".join(out)


def _section_coactivation(r: RoutingAnalysis) -> str:
    co = r.coactivation
    out = ["## Co-activation", _how("coactivation"), _image(r, "coactivation", "co-activation")]
    for i, layer in enumerate(co.layers):
        pairs = co.top_pairs(i, 8)
        out += [f"{layer}: pairs chosen together most often (relative to independence)", "",
                _table(["expert i", "expert j", "lift", "tokens with both"], [[a, b, _fmt(v, 2), n] for a, b, v, n in pairs]), ""]
        if co.lift.shape[1] <= MAX_MATRIX_EXPERTS:
            experts = [str(e) for e in range(co.lift.shape[1])]
            out += [f"{layer}: lift matrix", "", _table(["", *experts], [[e, *[_fmt(v, 2) for v in co.lift[i, e].tolist()]]
                                                                       for e in range(co.lift.shape[1])]), ""]
    if co.lift.shape[1] > MAX_MATRIX_EXPERTS:
        out += [f"Full lift matrices ({co.lift.shape[1]} experts) are in analysis.json.", ""]
    return "\n".join(out)


def _section_drops(r: RoutingAnalysis) -> str:
    whose = r.notes.get("drops", "the model's own")
    out = ["## Drop towards the end", _how("drops"), _image(r, "drops", "drop rate by position"),
           f"Capacity factor {r.drops[0].capacity_factor:g} ({whose}).", ""]
    for d in r.drops:
        rows = [[layer, _fmt(100 * d.overall[i], 2), *[_fmt(100 * v, 2) for v in d.rates[i].tolist()]]
                for i, layer in enumerate(d.layers)]
        out += [f"Capacity groups: one {d.group_by} (capacity per expert and group: "
                f"{', '.join(map(str, d.capacities))} slots); slots dropped (%):", "",
                _table(["layer", "all positions", *d.buckets], rows), ""]
    return "\n".join(out)


def _section_learning(r: RoutingAnalysis) -> str:
    head = ["## Early routing learning", _how("learning")]
    a = r.agreement
    if a is None:
        return "\n".join([*head, f"Not run: {r.notes.get('learning', 'no checkpoints given (--checkpoints)')}.", ""])
    rows = [[name, "" if step is None else step, *[f"{_fmt(a.agreement[c, i])} ({_fmt(a.overlap[c, i])})"
                                                  for i in range(len(a.layers))]]
            for c, (name, step) in enumerate(zip(a.checkpoints, a.steps))]
    return "\n".join([*head, _image(r, "learning", "early routing learning"),
                      "Fraction of tokens with the final expert set (in brackets: share of the final experts chosen):",
                      "", _table(["checkpoint", "step", *a.layers], rows), ""])


def render_report(result: RoutingAnalysis) -> str:
    """report.md's text."""
    summary = _table(["", ""], [
        ["model", f"`{result.model}` ({result.source})"], ["MoE layers traced", ", ".join(result.layers)],
        ["routed experts, top-k", f"{result.num_experts}, {result.top_k}"], ["sequence length", result.seq_len],
        *[[f"data: `{name}`", f"{count} tokens"] for name, count in zip(result.domains, result.tokens_per_domain)],
    ])
    return "\n".join([
        "# Routing analysis", "",
        "What the routers of this model learned, on the given data files (each file is one domain). Analyses "
        "after OpenMoE (Xue et al. 2024, arXiv 2402.01739). All numbers are also in `analysis.json`.", "",
        summary, "", _section_balance(result), _section_domain(result), _section_token(result),
        _section_position(result), _section_coactivation(result), _section_drops(result), _section_learning(result),
    ])


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: _jsonable(getattr(value, name)) for name in value.__dataclass_fields__}
    return value


def write_report(result: RoutingAnalysis, output_dir: str | Path) -> Path:
    """Write `report.md` and `analysis.json` into `output_dir`; returns the report's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "analysis.json").write_text(json.dumps(_jsonable(result), indent=1))
    path = output_dir / "report.md"
    path.write_text(render_report(result))
    return path
