"""What MoE routers learned, answered with numbers and pictures (the questions of OpenMoE, Xue et al. 2024,
arXiv 2402.01739): do experts specialise by domain, by position, by token id; which experts go together;
which positions a capacity limit drops; how early routing settles in training; how balanced the load is.

    hf-moe analyze MODEL --data code.txt prose.txt [--checkpoints C1 C2 ...] --output outputs/analysis

or in Python: `analyze(model_dir, [files], output_dir)` (report.md + PNGs + analysis.json), or step by step:

    trace = trace_routing(model, file_sequences("code.txt", 0, tokenizer, seq_len=256))   # RoutingTrace
    token_id_specialisation(trace).score      # per layer, 0 = chance, 1 = routing fixed by token id

Modules, one job each: `data` (text files -> token sequences), `loading` (any model hf_moe loads), `trace`
(per-token routing of every layer), `specialisation` (domain, position, token id), `coactivation`,
`capacity` (drops by position), `learning` (agreement across checkpoints), `balance` (loads, MaxVio, dead
experts, entropy, percentiles), `plots` / `routing_plots` (PNG; need matplotlib: `pip install 'hf-moe[plot]'`),
`report` (report.md, analysis.json), `pipeline` (`analyze`), `stdlib_domains` (the demo's two domains).
"""

from .balance import LoadBalance, load_balance
from .capacity import DropRates, drop_rate_by_position, dropped_slots
from .coactivation import Coactivation, coactivation
from .data import DataFileError, TokenSequence, check_text_file, file_sequences
from .learning import RoutingAgreement, routing_agreement, set_agreement
from .loading import LoadedModel, ModelLoadError, checkpoint_step, load_moe_config, load_moe_model
from .pipeline import analyze, draw_plots
from .plots import max_vio_series, plot_expert_load, plot_load_balance, plot_max_vio
from .report import RoutingAnalysis, render_report, write_report
from .routing_plots import (
    plot_coactivation,
    plot_drop_rates,
    plot_group_specialisation,
    plot_routing_agreement,
    plot_token_specialisation,
)
from .specialisation import (
    GroupSpecialisation,
    TokenSpecialisation,
    domain_specialisation,
    group_specialisation,
    position_buckets,
    position_specialisation,
    token_id_specialisation,
)
from .trace import RoutingTrace, trace_routing

__all__ = [
    "Coactivation",
    "DataFileError",
    "DropRates",
    "GroupSpecialisation",
    "LoadBalance",
    "LoadedModel",
    "ModelLoadError",
    "RoutingAgreement",
    "RoutingAnalysis",
    "RoutingTrace",
    "TokenSequence",
    "TokenSpecialisation",
    "analyze",
    "check_text_file",
    "checkpoint_step",
    "coactivation",
    "domain_specialisation",
    "draw_plots",
    "drop_rate_by_position",
    "dropped_slots",
    "file_sequences",
    "group_specialisation",
    "load_balance",
    "load_moe_config",
    "load_moe_model",
    "max_vio_series",
    "plot_coactivation",
    "plot_drop_rates",
    "plot_expert_load",
    "plot_group_specialisation",
    "plot_load_balance",
    "plot_max_vio",
    "plot_routing_agreement",
    "plot_token_specialisation",
    "position_buckets",
    "position_specialisation",
    "render_report",
    "routing_agreement",
    "set_agreement",
    "token_id_specialisation",
    "trace_routing",
    "write_report",
]
