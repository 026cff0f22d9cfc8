"""Teacher-forced exact match gives the same verdicts as greedy generate(), in one batched pass."""

from __future__ import annotations

from conftest import base_info, char_tokenizer, copy_task, tiny_model
from transpeft.evaluate import evaluate, exact_match_flags, generate_flags
from transpeft.methods import MethodConfig
from transpeft.train import TrainConfig, train_adapter


def test_teacher_forced_exact_match_equals_greedy_generate(tmp_path):
    tok = char_tokenizer()
    task = copy_task(128, 48)
    base = tiny_model("llama")
    model, _, _ = train_adapter(base, tok, base_info(base, tok), [task], MethodConfig(r=8),
                                TrainConfig(steps=30, batch_size=16, lr=2e-2), tmp_path / "a", progress=False)
    examples = list(task.eval)
    forced = exact_match_flags(model, tok, examples, batch_size=7)  # odd batches: padding must not matter
    assert forced == generate_flags(model, tok, examples)
    assert 0 < sum(forced) < len(forced), "need both right and wrong answers for the comparison to mean anything"
    metrics = evaluate(model, tok, examples)
    assert metrics.exact_match == sum(forced) / len(forced)
    assert metrics.exact_match <= metrics.token_accuracy <= 1.0
