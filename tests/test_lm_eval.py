"""lm-eval end to end: `--model hf` with `pretrained=FOLDER,trust_remote_code=True` on a folder saved by plain
`save_pretrained`, in a process that never imports hf_moe, on a tiny multiple-choice task whose YAML and data this
test writes (no download). Its per-choice log-likelihoods equal the ones hf_moe's own model gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_moe import MoEForCausalLM
from tests.conftest import tiny_config

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[dev]')")

TASK = """task: tiny_moe_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""

RUN_LM_EVAL = r"""
import json, sys
import torch
import lm_eval
from lm_eval.tasks import TaskManager

folder, tasks, threads = sys.argv[1:4]
torch.set_num_threads(int(threads))
results = lm_eval.simple_evaluate(
    model="hf", model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32,device=cpu",
    tasks=["tiny_moe_choice"], task_manager=TaskManager(include_path=tasks, include_defaults=False),  # no indexing
    batch_size=4, log_samples=True,                                                                 # of 1000s of tasks
)
samples = [{"doc_id": s["doc_id"], "logliks": [r[0][0] for r in s["resps"]]} for s in results["samples"]["tiny_moe_choice"]]
print(json.dumps({"acc": results["results"]["tiny_moe_choice"]["acc,none"], "samples": samples,
                  "hf_moe_modules": sorted(m for m in sys.modules if m == "hf_moe" or m.startswith("hf_moe."))}))
"""


def word_tokenizer():  # noqa: ANN201 - PreTrainedTokenizerFast: one token per word "w3".."w96"
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def documents() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    docs = []
    for i in range(8):
        words = torch.randint(3, 97, (9,), generator=generator).tolist()
        docs.append({"question": " ".join(f"w{w}" for w in words[:6]),
                     "choices": [f"w{words[6]}", f"w{words[7]} w{words[8]}", f"w{(words[6] + 5) % 94 + 3}"],
                     "label": i % 3})
    return docs


def continuation_loglik(model: MoEForCausalLM, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = model(ids[:, :-1]).logits.float().log_softmax(-1)[0]
    positions = range(len(context) - 1, ids.shape[1] - 1)
    return sum(logp[p, ids[0, p + 1]].item() for p in positions)


@pytest.mark.slow
def test_lm_eval_hf_model_with_trust_remote_code_without_hf_moe(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = tmp_path / "model"
    MoEForCausalLM(tiny_config()).save_pretrained(folder)
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(folder)
    docs = documents()
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_moe_choice.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", RUN_LM_EVAL, str(folder), str(tmp_path / "tasks"),
                             str(torch.get_num_threads())], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["hf_moe_modules"] == []

    # the oracle: hf_moe's own model scores " " + choice after the question, as lm-eval's multiple_choice does
    model = MoEForCausalLM.from_pretrained(folder, attn_implementation="sdpa", experts_implementation="eager").eval()
    correct = 0
    by_doc = {sample["doc_id"]: sample["logliks"] for sample in report["samples"]}
    assert sorted(by_doc) == list(range(len(docs)))
    for i, doc in enumerate(docs):
        context = tokenizer(doc["question"])["input_ids"]
        expected = [continuation_loglik(model, context, tokenizer(" " + c)["input_ids"]) for c in doc["choices"]]
        assert by_doc[i] == pytest.approx(expected, rel=1e-4, abs=1e-4), i
        correct += max(range(3), key=expected.__getitem__) == doc["label"]
    assert report["acc"] == pytest.approx(correct / len(docs))
