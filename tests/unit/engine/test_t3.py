"""T3 on a tiny random configuration: strict loading, the Llama backbone and its KV cache, sampling processors,
and the batched decoder (batch-vs-alone equivalence, joining mid-way, seeds, cfg_weight=0, stopping)."""
import math

import pytest
import torch

from chatterbox_serverless.engine.checkpoint import CheckpointError
from chatterbox_serverless.engine.models.llama import KVCache, LlamaConfig, llama3_inv_freq
from chatterbox_serverless.engine.models.t3 import T3, T3Config
from chatterbox_serverless.engine.sampling import (
    SamplingParams, apply_cfg, apply_min_p, apply_repetition_penalty, apply_temperature, apply_top_p,
    process_logits, sample)
from chatterbox_serverless.engine.t3_decoder import T3Decoder, T3Request, generate, postprocess, teacher_force
from chatterbox_serverless.engine.contract import SynthesisParams

EOS, BOS = 6562, 6561


def tiny_t3(seed: int = 0) -> T3:
    torch.manual_seed(seed)
    model = T3(T3Config.tiny())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".norm." in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_t3()


def request(model, n_text=7, seed=0, voice=0, max_new_tokens=12, **params) -> T3Request:
    g = torch.Generator().manual_seed(1000 + voice)
    cfg = model.cfg
    speaker_emb = torch.randn(1, cfg.speaker_embed_size, generator=g)           # the voice depends on `voice` only
    prompt_tokens = torch.randint(0, 6561, (1, cfg.prompt_len), generator=g)
    return T3Request(
        text_ids=torch.randint(1, cfg.text_vocab_size, (n_text,), generator=g).tolist(),
        speaker_emb=speaker_emb, prompt_tokens=prompt_tokens,
        params=SynthesisParams(seed=seed, **params), max_new_tokens=max_new_tokens, record=True)


# ---- loading ------------------------------------------------------------------------------------------------

def test_state_dict_keys_are_the_official_ones(model):
    keys = set(model.state_dict())
    for k in ("tfmr.embed_tokens.weight", "tfmr.layers.1.self_attn.o_proj.weight", "tfmr.layers.0.mlp.down_proj.weight",
              "tfmr.layers.0.input_layernorm.weight", "tfmr.layers.0.post_attention_layernorm.weight",
              "tfmr.norm.weight", "cond_enc.spkr_enc.weight", "cond_enc.spkr_enc.bias",
              "cond_enc.emotion_adv_fc.weight", "cond_enc.perceiver.pre_attention_query",
              "cond_enc.perceiver.attn.norm.bias", "cond_enc.perceiver.attn.to_q.bias",
              "cond_enc.perceiver.attn.proj_out.weight", "text_emb.weight", "speech_emb.weight",
              "text_pos_emb.emb.weight", "speech_pos_emb.emb.weight", "text_head.weight", "speech_head.weight"):
        assert k in keys, k
    assert "speech_head.bias" not in keys and "tfmr.layers.0.self_attn.q_proj.bias" not in keys
    assert not any("inv_freq" in k for k in keys)


def test_default_config_is_the_official_size():
    cfg = T3Config()
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.intermediate_size) == (1024, 30, 16, 64, 4096)
    assert (cfg.text_vocab_size, cfg.speech_vocab_size, cfg.cond_len) == (704, 8194, 34)


def test_round_trip_and_config_from_shapes(model):
    sd = model.state_dict()
    loaded = T3.from_state_dict(sd, overrides={"num_heads": 4, "perceiver_heads": 2, "prompt_len": 12})
    assert loaded.cfg == model.cfg
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # a "model." prefix is unwrapped
    T3.from_state_dict({"model." + k: v for k, v in sd.items()}, overrides={"num_heads": 4, "perceiver_heads": 2})


def test_strict_load_names_missing_unexpected_and_misshapen_keys(model):
    sd = dict(model.state_dict())
    ov = {"num_heads": 4, "perceiver_heads": 2}
    missing = {k: v for k, v in sd.items() if k != "text_head.weight"}
    with pytest.raises(CheckpointError, match="missing key.*text_head.weight"):
        T3.from_state_dict(missing, ov)
    with pytest.raises(CheckpointError, match="unexpected key.*speech_head.bias"):
        T3.from_state_dict({**sd, "speech_head.bias": torch.zeros(8194)}, ov)
    bad = {**sd, "cond_enc.emotion_adv_fc.weight": torch.zeros(32, 2)}
    with pytest.raises(CheckpointError, match=r"wrong shape.*emotion_adv_fc.weight \(32, 2\)"):
        T3.from_state_dict(bad, ov)
    with pytest.raises(CheckpointError, match="missing key.*speech_emb.weight"):
        T3.from_state_dict({k: v for k, v in sd.items() if k != "speech_emb.weight"}, ov)
    with pytest.raises(CheckpointError, match="unknown configuration key.*heads_typo"):
        T3.from_state_dict(sd, {"heads_typo": 3})
    with pytest.raises(CheckpointError, match="not divisible"):
        T3.from_state_dict(sd, {"num_heads": 5})


def test_from_checkpoint_reads_serverless_config(model, tmp_path):
    import json
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "t3_cfg.safetensors")
    (tmp_path / "serverless_config.json").write_text(json.dumps({"t3": {"num_heads": 4, "perceiver_heads": 2}}))
    assert T3.from_checkpoint(tmp_path).cfg.num_heads == 4


# ---- backbone -------------------------------------------------------------------------------------------------

def test_llama3_rope_frequencies():
    cfg = LlamaConfig()
    inv = llama3_inv_freq(cfg)
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2).float() / 64))
    wavelen = 2 * math.pi / base
    high = wavelen < 8192 / 4            # short wavelengths: untouched
    low = wavelen > 8192 / 1             # long wavelengths: divided by 8
    assert high.any() and low.any()
    assert torch.equal(inv[high], base[high])
    assert torch.allclose(inv[low], base[low] / 8)
    mid = ~high & ~low
    smooth = (8192 / wavelen[mid] - 1) / 3
    assert torch.allclose(inv[mid], (1 - smooth) * base[mid] / 8 + smooth * base[mid])


def test_kv_cache_decoding_matches_one_full_forward(model):
    """Prefill + one-token steps (rows at different positions) == causal forward of the whole sequence."""
    torch.manual_seed(1)
    C = model.cfg.hidden_size
    x = torch.randn(2, 9, C)
    with torch.inference_mode():
        full = model.tfmr(x, model.tfmr.new_cache(2, 16), slice(0, 2), torch.zeros(2, dtype=torch.long))
        cache = KVCache(model.tfmr.cfg, rows=1, capacity=2, chunk=2)   # grows (rows and positions) as needed
        # row 0 prefills 5 positions, row 1 prefills 3 (right-padded to 5), then both step one token at a time
        h0 = model.tfmr(x[:1, :5], cache, slice(0, 1), torch.tensor([0]))
        h1 = model.tfmr(x[1:, :5], cache, slice(1, 2), torch.tensor([0]))
        assert torch.allclose(h0, full[:1, :5], atol=1e-5) and torch.allclose(h1[:, :3], full[1:, :3], atol=1e-5)
        lens = [5, 3]
        outs = {0: [], 1: []}
        for _ in range(4):
            step_x = torch.stack([x[0, lens[0]], x[1, lens[1]]])[:, None]
            h = model.tfmr(step_x, cache, slice(0, 2), torch.tensor(lens))
            for r in range(2):
                outs[r].append((lens[r], h[r, 0]))
                lens[r] += 1
    for r in range(2):
        for pos, h in outs[r]:
            assert torch.allclose(h, full[r, pos], atol=1e-5), (r, pos)
    assert cache.rows == 2 and cache.capacity >= 9


# ---- sampling -------------------------------------------------------------------------------------------------

def test_cfg_and_repetition_penalty_by_hand():
    c = torch.tensor([[1.0, 2.0, -1.0], [1.0, 2.0, -1.0]])
    u = torch.tensor([[0.0, 4.0, -1.0], [5.0, 5.0, 5.0]])
    out = apply_cfg(c, u, torch.tensor([0.5, 0.0]))
    assert torch.allclose(out, torch.tensor([[1.5, 1.0, -1.0], [1.0, 2.0, -1.0]]))
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False], [False, False, True]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 1.5]))
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 1.0], [2.0, -2.0, 1.0 / 1.5]]))
    assert torch.allclose(apply_temperature(logits, torch.tensor([0.5, 2.0])),
                          torch.tensor([[4.0, -4.0, 2.0], [1.0, -1.0, 0.5]]))


def test_min_p_and_top_p_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    out = apply_min_p(logits, torch.tensor([0.2, 0.0]))      # thresholds 0.1 and 0
    assert torch.isinf(out[0, 3]) and torch.isfinite(out[0, :3]).all() and torch.equal(out[1], logits[1])
    out = apply_min_p(logits, torch.tensor([1.0, 0.7]))      # the top token always stays
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]
    out = apply_top_p(logits, torch.tensor([0.8, 1.0], dtype=torch.float64))
    # ascending cumulative 0.05, 0.2, 0.5, 1.0: <= 0.2 removed -> keeps 0.5 and 0.3
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    assert torch.equal(out[1], logits[1])
    out = apply_top_p(logits, torch.tensor([0.01, 0.5], dtype=torch.float64))
    assert torch.isfinite(out).tolist() == [[True, False, False, False], [True, False, False, False]]


def test_process_logits_order_and_per_row_params():
    torch.manual_seed(0)
    c, u = torch.randn(3, 50), torch.randn(3, 50)
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[:, [3, 7]] = True
    params = SamplingParams.from_lists("cpu", cfg_weight=[0.5, 0.0, 1.0], repetition_penalty=[1.2, 1.0, 2.0],
                                       temperature=[0.8, 1.0, 0.5], min_p=[0.05, 0.0, 0.1], top_p=[1.0, 1.0, 0.9])
    probs = process_logits(c, u, seen, params)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    for i in range(3):       # the same as processing each row alone, step by step
        p1 = SamplingParams.from_lists("cpu", cfg_weight=[params.cfg_weight[i].item()],
                                       repetition_penalty=[params.repetition_penalty[i].item()],
                                       temperature=[params.temperature[i].item()], min_p=[params.min_p[i].item()],
                                       top_p=[params.top_p[i].item()])
        l = apply_cfg(c[i:i + 1], u[i:i + 1], p1.cfg_weight)
        l = apply_repetition_penalty(l, seen[i:i + 1], p1.repetition_penalty)
        l = apply_top_p(apply_min_p(apply_temperature(l, p1.temperature), p1.min_p), p1.top_p)
        assert torch.equal(probs[i], torch.softmax(l, -1)[0])
    assert torch.allclose(probs[1], torch.softmax(c[1], -1))   # all processors neutral


def test_sample_uses_each_rows_generator():
    probs = torch.softmax(torch.randn(2, 100), -1)
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    a = sample(probs, gens)
    torch.manual_seed(6)
    assert a[1].item() == torch.multinomial(probs[1:2], 1).item()   # == the official global-RNG draw
    b = sample(probs[1:], [torch.Generator().manual_seed(6)])
    assert b[0] == a[1]
    onehot = torch.zeros(1, 10)
    onehot[0, 4] = 1
    assert sample(onehot, [torch.Generator()]).tolist() == [4]


def test_postprocess_cuts_at_first_eos_and_drops_special_ids():
    g = torch.tensor([5, BOS, 7, 6600, EOS, 8, EOS])
    assert postprocess(g, EOS, BOS).tolist() == [5, 7]
    assert postprocess(torch.tensor([1, 2]), EOS, BOS).tolist() == [1, 2]


# ---- decoder --------------------------------------------------------------------------------------------------

def test_prefix_reproduces_the_official_layout(model):
    cfg = model.cfg
    req = request(model, n_text=5)
    dec = T3Decoder(model)
    with torch.inference_mode():
        cond = dec.conditioning(req)
        text = torch.tensor([cfg.start_text_token, *req.text_ids, cfg.stop_text_token])
        x = model.prefix_embeds(cond, text, cfg=True)
        assert x.shape == (2, cfg.cond_len + 7 + 2, cfg.hidden_size)
        assert torch.equal(x[0, :cfg.cond_len], x[1, :cfg.cond_len])
        pos = model.text_pos_emb.emb.weight[:7]
        assert torch.allclose(x[1, cfg.cond_len:cfg.cond_len + 7], pos)           # uncond: text zeroed, positions kept
        assert torch.allclose(x[0, cfg.cond_len:cfg.cond_len + 7], model.text_emb(text) + pos)
        bos = model.speech_emb.weight[BOS] + model.speech_pos_emb.emb.weight[0]
        assert torch.allclose(x[:, -1], bos.expand(2, -1)) and torch.allclose(x[:, -2], bos.expand(2, -1))


def test_seed_determinism(model):
    a = generate(model, [request(model, seed=3)])[0]
    b = generate(model, [request(model, seed=3)])[0]
    c = generate(model, [request(model, seed=4)])[0]
    assert torch.equal(a.generated, b.generated)
    assert not torch.equal(a.generated, c.generated)
    assert a.logits.shape == (12, 2, 8194) and a.probs.shape == (12, 8194)
    assert a.stop_reason == "max_new_tokens" and len(a.generated) == 12


def test_batch_equals_alone_with_different_lengths_params_and_late_joiners(model):
    reqs = [
        request(model, n_text=7, seed=1, voice=0),
        request(model, n_text=3, seed=2, voice=1, max_new_tokens=5, temperature=0.5, min_p=0.2, top_p=0.8,
                repetition_penalty=1.5, cfg_weight=0.3, exaggeration=1.2),
        request(model, n_text=11, seed=3, voice=2, max_new_tokens=9, cfg_weight=0.0),
        request(model, n_text=4, seed=4, voice=3, max_new_tokens=10, temperature=1.3),
    ]
    alone = [generate(model, [r])[0] for r in reqs]
    dec = T3Decoder(model, max_rows=6)      # 2+2+1 rows fit, the last request waits for a free pair of rows
    done = {}
    for r in reqs[:2]:
        dec.submit(r)
    for i in range(30):
        if i == 3:
            dec.submit(reqs[2])             # joins mid-way
            dec.submit(reqs[3])             # joins too, but waits until the 5-token request frees its rows
        for res in dec.step():
            done[id(res.request)] = res
        if i == 3:
            assert len(dec.waiting) == 1 and dec.rows_in_use == 5
        if not dec.busy:
            break
    assert len(done) == 4
    for r, a in zip(reqs, alone):
        b = done[id(r)]
        assert torch.equal(a.generated, b.generated)
        # float32 rounding noise only (batched matrix products sum in another order; ~3e-6 of the largest logit
        # seen on an AMD machine): tolerances relative to the values' scale
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5 * float(a.logits.abs().max()))
        torch.testing.assert_close(b.probs, a.probs, rtol=1e-5, atol=1e-5)
    assert alone[2].logits.shape[1] == 1   # cfg_weight=0: no unconditional row


def test_cfg_weight_zero_uses_the_conditional_row_only(model):
    r0 = request(model, seed=7, cfg_weight=0.0)
    r1 = request(model, seed=7, cfg_weight=0.5)
    a = generate(model, [r0])[0]
    forced = teacher_force(model, r1, a.generated.tolist())
    # the conditional row does not depend on the unconditional one: same logits, and w=0 samples from them
    assert torch.allclose(a.logits[:, 0], forced.logits[:, 0], atol=1e-5)
    seen = torch.zeros(8194, dtype=torch.bool)
    seen[BOS] = True
    p = process_logits(a.logits[:1, 0], a.logits[:1, 0], seen[None],
                       SamplingParams.from_lists("cpu", cfg_weight=[0.0], repetition_penalty=[1.2],
                                                 temperature=[0.8], min_p=[0.05], top_p=[1.0]))
    assert torch.allclose(p[0], a.probs[0])


def test_teacher_forcing_reproduces_free_running_logits(model):
    r = request(model, seed=11, top_p=0.9)
    free = generate(model, [r])[0]
    forced = teacher_force(model, r, free.generated.tolist())
    assert torch.equal(forced.generated, free.generated)
    assert torch.allclose(forced.logits, free.logits, atol=1e-6)
    assert torch.allclose(forced.probs, free.probs, atol=1e-7)


def test_stops_at_eos_and_postprocesses(model):
    r = request(model, seed=1, max_new_tokens=20)
    res = teacher_force(model, r, [10, BOS, 12, EOS])
    assert res.stop_reason == "eos" and res.speech_tokens.tolist() == [10, 12]
    # a model whose head always prefers EOS stops after one token
    eos_model = tiny_t3(1)
    with torch.no_grad():
        for layer in eos_model.tfmr.layers:       # residual branches off: the backbone passes its input through
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        bos = eos_model.speech_emb.weight[BOS] + eos_model.speech_pos_emb.emb.weight[0]
        h = eos_model.tfmr.norm(bos)
        eos_model.speech_head.weight[EOS] = 50 * h / h.norm()
    res = generate(eos_model, [request(eos_model, seed=0, max_new_tokens=20, cfg_weight=0.0)])[0]
    assert res.generated.tolist() == [EOS] and res.stop_reason == "eos" and res.speech_tokens.numel() == 0


def test_invalid_requests_are_refused_with_a_message(model):
    dec = T3Decoder(model)
    too_long = request(model, n_text=model.cfg.max_text_positions)
    with pytest.raises(ValueError, match="text too long"):
        dec.submit(too_long)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.submit(request(model, max_new_tokens=model.cfg.max_speech_positions))
    bad = request(model)
    bad.speaker_emb = torch.zeros(3)
    with pytest.raises(ValueError, match="speaker embedding"):
        dec.submit(bad)
    bad = request(model)
    bad.prompt_tokens = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="conditioning prompt"):
        dec.submit(bad)
    bad.prompt_tokens = torch.full((1, 5), 9000)
    with pytest.raises(ValueError, match="out of range"):
        dec.submit(bad)
    assert not dec.busy


def test_release_memory_then_decode_again(model):
    r = request(model, seed=9, max_new_tokens=3)
    dec = T3Decoder(model)
    first = dec.run([r])[0]
    dec.release_memory()
    assert dec.cache.rows == 0 and not dec.prefix_cache
    again = dec.run([r])[0]
    assert torch.equal(first.generated, again.generated)


def test_steps_equal_one_forward_of_the_official_sequence(model):
    """Teacher-forced step logits == one causal forward over [prefix | token_i + speech_pos(i+1) ...]."""
    cfg = model.cfg
    r = request(model, n_text=6, seed=2)
    tokens = [17, 4000, 17, 250]
    forced = teacher_force(model, r, tokens)
    with torch.inference_mode():
        cond = T3Decoder(model).conditioning(r)
        text = torch.tensor([cfg.start_text_token, *r.text_ids, cfg.stop_text_token])
        prefix = model.prefix_embeds(cond, text, cfg=True)
        gen = model.speech_emb(torch.tensor(tokens[:-1])) + model.speech_pos_emb.emb.weight[1:len(tokens)]
        seq = torch.cat((prefix, gen[None].expand(2, -1, -1)), dim=1)
        h = model.tfmr(seq, model.tfmr.new_cache(2, seq.shape[1]), slice(0, 2), torch.zeros(2, dtype=torch.long))
        logits = model.logits(h[:, prefix.shape[1] - 1:])                 # (2, S, V)
    assert torch.allclose(forced.logits, logits.transpose(0, 1), atol=1e-5)


def test_bfloat16_decoding_runs(model):
    m = tiny_t3(0).to(torch.bfloat16)
    res = generate(m, [request(m, seed=1, max_new_tokens=4), request(m, seed=2, max_new_tokens=3, cfg_weight=0.0)])
    assert [len(r.generated) for r in res] == [4, 3]
    assert res[0].probs.dtype == torch.float32 and torch.allclose(res[0].probs.sum(-1), torch.ones(4))


def test_voice_prefix_cache_matches_a_fresh_prefill(model):
    """Per voice: conditioning + unconditional text positions are cached, grown for longer texts, reused for
    shorter ones; a different exaggeration is another entry. Every path gives what a cache-less decoder gives."""
    n_cond = model.cfg.cond_len
    r1 = request(model, seed=1, voice=5, n_text=7, max_new_tokens=4)
    r2 = request(model, seed=2, voice=5, n_text=12, max_new_tokens=4)         # same voice, longer text: grows
    r3 = request(model, seed=3, voice=5, n_text=4, max_new_tokens=4)          # shorter text: a pure hit
    r4 = request(model, seed=3, voice=5, n_text=4, max_new_tokens=4, exaggeration=0.9)
    r5 = request(model, seed=4, voice=5, n_text=30, max_new_tokens=4)         # longer than max_cached_text
    dec = T3Decoder(model, prefix_cache_size=1, max_cached_text=20)
    results, sizes = [], []
    for r in (r1, r2, r3, r4, r5):
        results.append(dec.run([r])[0])
        sizes.append([kv[0][0].shape[1] for kv in dec.prefix_cache.values()])
    # r4 evicts the 0.5 entry (LRU of 1); r5 misses, keeps the conditioning only (its text is too long to keep)
    assert sizes == [[n_cond + 9], [n_cond + 14], [n_cond + 14], [n_cond + 6], [n_cond]]
    for r, got in zip((r1, r2, r3, r4, r5), results):
        fresh = T3Decoder(model, prefix_cache_size=0).run([r])[0]
        assert torch.equal(fresh.generated, got.generated)
        assert torch.allclose(fresh.logits, got.logits, atol=1e-5)


def test_prepacked_weights_give_the_same_logits_and_follow_weight_changes():
    from chatterbox_serverless.engine.models.llama import prepacking_supported
    m = tiny_t3(3)
    if not prepacking_supported(torch.device("cpu"), torch.float32):
        pytest.skip("no oneDNN on this CPU build")
    r = request(m, seed=5, max_new_tokens=5)
    plain = generate(m, [r])[0]
    assert m.tfmr.set_prepacked_weights(True)
    packed = generate(m, [r])[0]
    assert torch.equal(plain.generated, packed.generated)
    assert torch.allclose(plain.logits, packed.logits, atol=1e-5)
    with torch.no_grad():
        m.tfmr.layers[0].self_attn.k_proj.weight.mul_(3)        # an in-place change invalidates the packed copy
    changed = generate(m, [r])[0]
    m.tfmr.set_prepacked_weights(False)
    assert torch.allclose(changed.logits, generate(m, [r])[0].logits, atol=1e-5)
    assert not torch.allclose(changed.logits, plain.logits, atol=1e-3)


def test_requests_admitted_together_share_the_prefill_and_equal_alone(model):
    # one admit: a new voice (its unconditional row computed in full), a voice seen before (two positions
    # left), no CFG, and texts of different lengths: the padded rows must not change anything
    reqs = [request(model, n_text=9, seed=1, voice=5), request(model, n_text=2, seed=2, voice=0),
            request(model, n_text=6, seed=3, voice=6, cfg_weight=0.0), request(model, n_text=13, seed=4, voice=0)]
    alone = [generate(model, [r])[0] for r in reqs]
    dec = T3Decoder(model, max_rows=8)
    dec.run([request(model, n_text=5, voice=0, max_new_tokens=1)])          # voice 0 is in the prefix cache
    for r in reqs:
        dec.submit(r)
    dec.admit()
    assert not dec.waiting and dec.rows_in_use == 7
    done = {}
    while dec.busy:
        done.update({id(res.request): res for res in dec.step()})
    for r, a in zip(reqs, alone):
        b = done[id(r)]
        assert torch.equal(a.generated, b.generated)
        assert torch.allclose(a.logits, b.logits, atol=5e-5, rtol=1e-5)   # float32 rounding of other GEMM sizes


def test_compiled_decoding_step_matches_eager():
    torch.set_num_threads(1)
    eager_model, compiled_model = tiny_t3(seed=5), tiny_t3(seed=5)
    compiled_model.tfmr.compile_decoding()
    reqs = [request(eager_model, n_text=7, seed=1, voice=0), request(eager_model, n_text=4, seed=2, voice=1),
            request(eager_model, n_text=5, seed=3, voice=2, cfg_weight=0.0, max_new_tokens=6)]
    compiled_step, steps = compiled_model.tfmr._compiled_layers, []
    compiled_model.tfmr._compiled_layers = lambda *args: steps.append(args[0].shape[0]) or compiled_step(*args)
    from torch._dynamo.utils import counters
    graphs_before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        eager = generate(eager_model, reqs)
        compiled = generate(compiled_model, reqs)            # 5 rows, then 4 and 2 as requests finish
        compiled_again = generate(compiled_model, reqs[:1])  # other row and cache sizes: no recompilation
    for a, b in zip(eager, compiled):
        assert torch.equal(a.generated, b.generated)
        assert torch.allclose(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(compiled_again[0].generated, eager[0].generated)
    assert {5, 4, 2} <= set(steps)                          # the decoding steps went through the compiled graph
    assert counters["stats"]["unique_graphs"] - graphs_before == 1


def test_decode_attention_equals_sdpa_over_a_strided_masked_cache():
    import torch.nn.functional as F
    from chatterbox_serverless.engine.models.llama import decode_attention
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(6, 4, 40, 16, generator=g) for _ in range(2))   # rows, heads, capacity, dim
    q = torch.randn(3, 4, 1, 16, generator=g)
    keys, values = k_cache[1:4, :, :25], v_cache[1:4, :, :25]                        # strided views, as decoding
    mask = torch.zeros(3, 1, 1, 25)
    mask[0, ..., 20:] = float("-inf")
    mask[2, ..., 7:] = float("-inf")
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    torch.testing.assert_close(decode_attention(q, keys, values, mask), want, rtol=1e-5, atol=1e-6)
    low = decode_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(), mask.bfloat16())
    assert low.dtype == torch.bfloat16 and ((low.float() - want).norm() / want.norm()) < 1e-2
