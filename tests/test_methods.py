"""Every PEFT method x architecture: attach, train through the one loop, save, reload exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import char_tokenizer, copy_task, base_info, tiny_model
from transpeft.evaluate import evaluate
from transpeft.methods import METHODS, MethodConfig
from transpeft.train import TrainConfig, train_adapter
from transpeft.transfer import load_adapter, unload_adapter

MATRIX = [(arch, method) for arch in ("llama", "qwen2", "gpt_neox", "gpt2") for method in METHODS]
PROBE = torch.tensor([[1, 10, 11, 12, 13, 14, 15]])


@pytest.mark.parametrize("arch,method", MATRIX)
@pytest.mark.parametrize("p_c", [0.0, 0.5])
def test_train_save_and_reload_reproduces_the_adapter(tmp_path, arch, method, p_c):
    tok = char_tokenizer()
    base = tiny_model(arch)
    info = base_info(base, tok)
    before = base(PROBE).logits
    model, manifest, result = train_adapter(
        base, tok, info, [copy_task(32, 8)], MethodConfig(name=method, r=4),
        TrainConfig(steps=4, batch_size=8, lr=5e-2, p_c=p_c, p_i=0.1), tmp_path / "adapter", progress=False)
    trained = model(PROBE).logits
    assert not torch.allclose(trained, before)  # the adapter changed the model

    fresh = tiny_model(arch)
    reloaded = load_adapter(fresh, info, tmp_path / "adapter")
    assert torch.equal(reloaded(PROBE).logits, trained)
    assert manifest.p_c == p_c and manifest.method.name == method and manifest.targets

    restored = unload_adapter(reloaded, method)
    assert torch.equal(restored(PROBE).logits, before)


def test_target_modules_rank_alpha_and_dropout_reach_peft():
    model = train_ready = tiny_model("llama")
    from transpeft.methods import get_method

    cfg = MethodConfig(name="lora", r=3, alpha=6, dropout=0.1, target_modules=("q_proj", "v_proj"))
    model = get_method("lora").attach(train_ready, cfg)
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (3, 6, 0.1)
    assert set(lora.target_modules) == {"q_proj", "v_proj"}
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}


def test_bottleneck_sublayers_and_variant_are_configurable():
    from transpeft import bottleneck

    model = tiny_model("llama")
    bottleneck.attach(model, bottleneck.BottleneckConfig(bottleneck_size=5, variant="parallel", sublayers=("attention",)))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, bottleneck.BottleneckSublayer)]
    assert wrapped == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapter." not in n)


@pytest.mark.parametrize("bad,match", [
    (dict(name="prefix"), "name must be 'lora', 'dora', 'ia3' or 'bottleneck', got 'prefix'"),
    (dict(r=0), "r must be >= 1, got 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(name="bottleneck", variant="diagonal"), "variant must be 'serial' or 'parallel'"),
    (dict(name="bottleneck", target_modules=("mlp",)), "target_modules must be sub-layers attention and/or ffn"),
    (dict(target_modules=()), "target_modules is empty"),
    (dict(rank=4), r"unknown key rank \(known: alpha, dropout, name, r, target_modules, variant\)"),
])
def test_bad_method_configs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        cfg = MethodConfig(**bad)
        if cfg.name == "bottleneck":
            from transpeft.methods import _bottleneck_config
            _bottleneck_config(cfg)


def test_hot_swap_scores_equal_separate_loads(tmp_path):
    """Many adapters on one base loaded once score exactly as each loaded on its own fresh base."""
    tok = char_tokenizer()
    task = copy_task(32, 16)
    info = base_info(tiny_model("llama"), tok)
    for i, method in enumerate(["lora", "dora", "bottleneck"]):
        train_adapter(tiny_model("llama"), tok, info, [task], MethodConfig(name=method, r=4),
                      TrainConfig(steps=3, batch_size=8, lr=5e-2, seed=i), tmp_path / method, progress=False)
    from transpeft.transfer import evaluate_adapters

    shared = evaluate_adapters(tiny_model("llama"), tok, info, [tmp_path / m for m in ("lora", "dora", "bottleneck")],
                               [task])
    for method in ("lora", "dora", "bottleneck"):
        alone = evaluate(load_adapter(tiny_model("llama"), info, tmp_path / method), tok, list(task.eval))
        assert shared[str(tmp_path / method)]["copy"] == alone.as_dict()
