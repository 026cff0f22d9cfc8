"""Trans-PEFT's regularisers against the reference description, on every supported architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import ARCHS, VOCAB, tiny_model
from transpeft import bottleneck
from transpeft.regularisers import NoFFNFound, attach_regularisers, find_ffn_sites, linear_shape, unwrap

# No dropout anywhere, so that train mode differs from eval mode only by the regularisers.
# p_c is a probability in [0, 1); this one drops every FFN: torch.rand's float32 draws are all at most
# 1 - 2**-24, below it.
EVERY = 1 - 1e-9
NO_DROPOUT = dict(attention_dropout=0.0, hidden_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def model_for(arch: str, seed: int = 0):
    config_keys = AutoConfig.for_model(arch).to_dict()
    return tiny_model(arch, seed=seed, **{k: v for k, v in NO_DROPOUT.items() if k in config_keys})


def tokens(batch: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def ffn_linears(model) -> list[nn.Module]:
    return [m for site in find_ffn_sites(model) for m in unwrap(site.slot).modules() if linear_shape(m)]


class ZeroFFN(nn.Module):
    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_fraction_matches_p_i_without_rescaling(arch):
    model = model_for(arch).train()
    site = find_ffn_sites(model)[0]
    seen = {}
    site.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("before", a[0].detach().clone()))
    handle = attach_regularisers(model, p_i=0.3, seed=1)
    site.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("after", a[0].detach().clone()))
    model(tokens(batch=8, length=64))
    before, after = seen["before"], seen["after"]
    live = before != 0
    zeroed = (after[live] == 0).float().mean().item()
    assert abs(zeroed - 0.3) < 0.02, zeroed  # 8 * 64 * 64 elements: the binomial sd is about 0.002
    kept = after != 0
    assert torch.equal(after[kept], before[kept])  # no 1 / (1 - p) rescaling
    handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_dropping_every_ffn_equals_model_without_ffns_and_never_touches_their_weights(arch):
    model = model_for(arch).train()
    calls = []
    for linear in ffn_linears(model):
        linear.register_forward_hook(lambda *a: calls.append(1))
    with attach_regularisers(model, p_c=EVERY) as regs:
        out = model(tokens()).logits
        out.sum().backward()
        assert regs.dropped == len(regs.sites)
    assert calls == []  # not computed at all, not multiplied by zero
    assert all(p.grad is None for linear in ffn_linears(model) for p in linear.parameters())

    reference = model_for(arch).train()
    for site in find_ffn_sites(reference):
        setattr(site.layer, site.slot_name, ZeroFFN())
    torch.testing.assert_close(out, reference(tokens()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_mode_is_bit_identical_to_the_model_without_regularisers(arch):
    model = model_for(arch).eval()
    plain = model(tokens()).logits
    with attach_regularisers(model, p_i=0.5, p_c=0.5, seed=3):
        assert torch.equal(model(tokens()).logits, plain)


@pytest.mark.parametrize("arch", ARCHS)
def test_remove_restores_the_model_exactly(arch):
    model = model_for(arch).train()
    plain = model(tokens()).logits
    handle = attach_regularisers(model, p_i=0.5, p_c=0.5, seed=3)
    assert not torch.equal(model(tokens()).logits, plain)
    handle.remove()
    assert torch.equal(model(tokens()).logits, plain)
    assert all("forward" not in site.slot.__dict__ for site in find_ffn_sites(model))


def test_one_drop_draw_per_layer_per_forward_at_rate_p_c():
    model = model_for("llama").train()
    forwards = 200
    with attach_regularisers(model, p_c=0.25, seed=0) as regs:
        for _ in range(forwards):
            model(tokens(batch=1, length=4))
    rate = regs.dropped / (forwards * len(regs.sites))
    assert abs(rate - 0.25) < 0.05, rate  # 400 draws: sd about 0.022


def test_same_seed_same_masks_and_drops_other_seed_differs():
    def run(seed):
        model = model_for("llama").train()
        with attach_regularisers(model, p_i=0.2, p_c=0.3, seed=seed):
            return [model(tokens(seed=i)).logits for i in range(3)]

    first, again, other = run(7), run(7), run(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("variant", ["serial", "parallel"])
def test_bottleneck_after_the_ffn_still_runs_when_the_ffn_is_dropped(variant):
    model = model_for("llama").train()
    bottleneck.attach(model, bottleneck.BottleneckConfig(bottleneck_size=8, variant=variant, sublayers=("ffn",)))
    for name, param in model.named_parameters():
        if ".adapter.up." in name:  # zero-initialised: give it a value so its output shows
            nn.init.normal_(param, std=0.5)
    mlp_calls = []
    for linear in ffn_linears(model):
        linear.register_forward_hook(lambda *a: mlp_calls.append(1))
    with attach_regularisers(model, p_c=EVERY):
        with_adapter = model(tokens()).logits
        with_adapter.sum().backward()
    assert mlp_calls == []
    adapter_grads = [p.grad for n, p in model.named_parameters() if ".adapter." in n]
    assert adapter_grads and all(g is not None and g.abs().sum() > 0 for g in adapter_grads)

    bottleneck.detach(model)
    with attach_regularisers(model, p_c=EVERY):
        without_adapter = model(tokens()).logits
    assert not torch.allclose(with_adapter, without_adapter)


def test_masking_reaches_a_lora_wrapped_down_projection():
    """Masking hooks the outermost down projection, so the LoRA branch sees the mask too."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model_for("llama"), LoraConfig(r=4, target_modules=["down_proj"])).train()
    site = find_ffn_sites(model)[0]
    assert type(site.down_proj).__module__.startswith("peft")
    seen = {}
    site.down_proj.base_layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with attach_regularisers(model, p_i=0.5):
        model(tokens())
    assert (seen["x"] == 0).float().mean() > 0.4


def test_model_without_an_ffn_is_refused_clearly():
    config = AutoConfig.for_model("mamba", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(NoFFNFound, match="no decoder layers with a feed-forward"):
        attach_regularisers(model, p_c=0.1)
    attach_regularisers(model).remove()  # p_i = p_c = 0 needs no FFN


@pytest.mark.parametrize("p", [1.5, 1.0, -0.1])
def test_probabilities_outside_unit_interval_are_refused(p):
    with pytest.raises(ValueError, match=rf"p_c must be in \[0, 1\), got {p}"):  # the rule of every config
        attach_regularisers(model_for("llama"), p_c=p)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layer_drift_is_zero_for_the_same_base_and_separates_attention_from_ffn(arch):
    from transpeft.drift import layer_drift
    from transpeft.regularisers import find_ffn_sites

    old, new = tiny_model(arch), tiny_model(arch)
    assert all(row["attention"] == row["ffn"] == 0 for row in layer_drift(old, new))
    with torch.no_grad():
        for param in getattr(find_ffn_sites(new)[1].layer, find_ffn_sites(new)[1].slot_name).parameters():
            param.mul_(1.5)  # only layer 1's FFN moves, by half its norm
    rows = layer_drift(old, new)
    assert [r["layer"] for r in rows] == [0, 1]
    assert rows[0] == {"layer": 0, "attention": 0.0, "ffn": 0.0}
    assert rows[1]["attention"] == 0.0 and rows[1]["ffn"] == pytest.approx(0.5, abs=1e-3)


# The reference semantics of knowledge dropping, against forward passes written out by hand with
# every FFN dropped (p_c = EVERY): the sub-layer adds nothing, and a bottleneck adapter after it runs on
# the residual stream h.

def _attention(layer, x, model):
    positions = torch.arange(x.shape[1])[None]
    cos_sin = model.model.rotary_emb(x, positions)
    return layer.self_attn(x, position_embeddings=cos_sin, attention_mask=None)[0]


def _every_ffn_dropped_against_by_hand(model, layer_by_hand):
    """The model's logits with p_c = EVERY, and those of ``layer_by_hand(layer, h) -> h`` applied layer by layer."""
    ids = tokens()
    with attach_regularisers(model, p_c=EVERY):
        got = model(ids).logits
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        for layer in model.model.layers:
            h = layer_by_hand(layer, h)
        expected = model.lm_head(model.model.norm(h))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_dropped_ffn_hands_a_bottleneck_the_residual_stream_like_a_hand_written_llama_forward():
    model = model_for("llama").train()
    bottleneck.attach(model, bottleneck.BottleneckConfig(bottleneck_size=8, sublayers=("ffn",)))
    for name, param in model.named_parameters():
        if ".adapter.up." in name:
            nn.init.normal_(param, std=0.5)

    def by_hand(layer, h):
        h = h + _attention(layer, layer.input_layernorm(h), model)
        return h + layer.mlp.adapter(h)  # h itself, not post_attention_layernorm(h)

    _every_ffn_dropped_against_by_hand(model, by_hand)


def test_a_dropped_ffn_adds_no_bias_from_the_layernorm_after_it_like_a_hand_written_post_norm_forward():
    torch.manual_seed(0)
    config = AutoConfig.for_model("olmo2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128, initializer_range=0.2,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).train()  # post-norm: h + norm(ffn(h)), no norm in front
    for layer in model.model.layers:  # a post-FFN norm with a bias: norm(0) would be that bias
        layer.post_feedforward_layernorm = nn.LayerNorm(32)
        nn.init.normal_(layer.post_feedforward_layernorm.bias, std=1.0)

    def by_hand(layer, h):
        return h + layer.post_attention_layernorm(_attention(layer, h, model))  # the FFN, post-norm too, adds nothing

    _every_ffn_dropped_against_by_hand(model, by_hand)


def test_each_layer_draws_its_own_drop():
    model = model_for("llama").train()
    computed: list[int] = []
    sites = find_ffn_sites(model)
    for site in sites:
        site.down_proj.register_forward_hook(lambda module, args, out, i=site.layer_index: computed.append(i))
    patterns = []
    with attach_regularisers(model, p_c=0.5, seed=3):
        for _ in range(400):
            computed.clear()
            model(tokens(batch=1, length=4))
            patterns.append(tuple(i in computed for i in range(len(sites))))
    for i in range(len(sites)):
        rate = sum(not p[i] for p in patterns) / len(patterns)
        assert abs(rate - 0.5) < 0.08, (i, rate)
    both_dropped = sum(not any(p) for p in patterns) / len(patterns)
    assert abs(both_dropped - 0.25) < 0.07, both_dropped  # independent draws: p_c squared, not p_c
    assert (True, False) in patterns and (False, True) in patterns


def _gradients(method: str, checkpointing: bool, replay: bool = True):
    """Gradients of three forward/backward passes with masking, dropping and adapter dropout on."""
    from transpeft.methods import MethodConfig, get_method
    from transpeft.seeding import NO_REPLAY, Replay, private_dropout, seeded

    model = model_for("llama")
    with seeded(0):
        if method == "lora":
            model = get_method("lora").attach(model, MethodConfig(r=4, dropout=0.2, target_modules=("all-linear",)))
        else:
            bottleneck.attach(model, bottleneck.BottleneckConfig(bottleneck_size=8, dropout=0.2))
        for name, param in model.named_parameters():  # zero-initialised halves get values: gradients everywhere
            if ".lora_B." in name or ".adapter.up." in name:
                nn.init.normal_(param, std=0.5)
    model.train()
    draws = Replay() if replay else NO_REPLAY
    regularisers = attach_regularisers(model, p_i=0.2, p_c=0.4, seed=5, replay=draws)
    private_dropout(model, 5, draws)
    if checkpointing:
        kwargs = {"use_reentrant": False, **({"context_fn": draws.contexts} if replay else {})}
        model.activation_checkpointing_enable(kwargs)
    for i in range(3):
        ids = tokens(seed=i)
        model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, regularisers.dropped


@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_gradient_checkpointing_replays_masks_and_drops_so_gradients_equal_the_plain_pass(method):
    plain, dropped = _gradients(method, checkpointing=False)
    checkpointed, dropped_again = _gradients(method, checkpointing=True)
    assert 0 < dropped == dropped_again  # the recomputation's draws are not counted twice
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[k], checkpointed[k], rtol=1e-5, atol=1e-7) for k in plain)
    # Without the replay the recomputation draws new masks and drops: torch refuses the backward
    # (another layer dropped, so other tensors saved) or it gives other gradients.
    try:
        fresh, _ = _gradients(method, checkpointing=True, replay=False)
    except torch.utils.checkpoint.CheckpointError:
        return
    assert not all(torch.allclose(plain[k], fresh[k], rtol=1e-5, atol=1e-7) for k in plain)
