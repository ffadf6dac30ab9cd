"""Text encoders: FrozenCLIPEmbedder (SD 1.x) against the CompVis goldens, FrozenOpenCLIPEmbedder (SD 2.x) against
the SD 2 checkpoint key list and an independent per-block reference computation."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm.modules.encoders.modules import AbstractEncoder, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

DATA_DIR = Path(__file__).parent / "data"
PROMPT = "a photograph of an astronaut riding a horse"
PROMPTS = [PROMPT, "a painting of a fox sitting in a field at sunrise"]
BOS, EOS = 49406, 49407
ATOL = 1e-5  # tests/data/README.md: honest tolerance for single forward passes


def read_tsv(name, prefix):
    """{key without prefix: (shape list, dtype str)} for the rows of a state-dict TSV starting with prefix."""
    rows = {}
    for line in (DATA_DIR / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        if key.startswith(prefix):
            rows[key[len(prefix):]] = (list(eval(shape)), dtype)
    return rows


def key_shapes(module):
    return {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in module.state_dict().items()}


def golden_clip_weights(model, golden_state_dict):
    """Golden `cond_stage_model.*` weights renamed to the installed transformers' layout, position_ids dropped."""
    prefix = "cond_stage_model.transformer."
    weights = {}
    for key, value in golden_state_dict.items():
        if not key.startswith(prefix) or key.endswith("embeddings.position_ids"):
            continue
        key = key[len(prefix):]
        if not model.has_text_model_level:  # transformers 5 has no `text_model.` level
            assert key.startswith("text_model.")
            key = key[len("text_model."):]
        weights[key] = value
    return weights


@pytest.fixture(scope="module")
def clip(golden_config, golden_state_dict):
    params = golden_config.model.params.cond_stage_config.params
    model = FrozenCLIPEmbedder(**params)
    missing, unexpected = model.transformer.load_state_dict(golden_clip_weights(model, golden_state_dict), strict=True)
    assert not missing and not unexpected
    return model


# ---------------------------------------------------------------- FrozenCLIPEmbedder (SD 1.x)


def test_clip_tokenize_matches_golden(clip, golden_io):
    ids = clip.tokenize([PROMPT, ""])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert torch.equal(ids, golden_io["text.ids"])
    assert torch.equal(ids[1], torch.tensor([BOS] + [EOS] * 76))  # EOS-padded, as HF CLIPTokenizer
    assert torch.equal(clip.tokenize(PROMPTS), golden_io["sample.prompt_ids"])
    assert torch.equal(clip.tokenize(PROMPT), golden_io["text.ids"][:1])  # a bare string is a batch of one


def test_clip_tokenizer_cleans_text_like_hf(clip):
    # lower-cased and whitespace-collapsed before BPE
    assert torch.equal(clip.tokenize("  A   Photograph\nof an ASTRONAUT riding a horse "), clip.tokenize(PROMPT))


def test_clip_forward_matches_golden(clip, golden_io):
    with torch.no_grad():
        out = clip([PROMPT, ""])
        enc = clip.encode([PROMPT, ""])
    assert out.shape == (2, 77, 16) and out.dtype == torch.float32
    err = (out - golden_io["text.out"]).abs().max().item()
    assert err < ATOL, f"text.out max error {err}"
    assert torch.equal(out, enc)


def test_clip_sampling_conditioning_matches_golden(clip, golden_io):
    with torch.no_grad():
        c = clip(PROMPTS)
        uc = clip(["", ""])
    err_c = (c - golden_io["sample.c"]).abs().max().item()
    err_uc = (uc - golden_io["sample.uc"]).abs().max().item()
    assert err_c < ATOL and err_uc < ATOL, (err_c, err_uc)
    assert (c[0] - c[1]).abs().max() > 1e-2  # different prompts give different conditioning


def test_clip_truncates_long_prompt(clip):
    ids = clip.tokenize(["a " * 100, "horse " * 100])
    assert ids.shape == (2, 77)
    # BOS + first 75 text tokens + EOS, no padding ("a" = 320, "horse" = 4558)
    assert torch.equal(ids[0], torch.tensor([BOS] + [320] * 75 + [EOS]))
    assert torch.equal(ids[1], torch.tensor([BOS] + [4558] * 75 + [EOS]))
    with torch.no_grad():
        assert clip(["a " * 100]).shape == (1, 77, 16)


def test_clip_hidden_layer_and_pooled(golden_config, clip):
    params = dict(golden_config.model.params.cond_stage_config.params)
    hidden = FrozenCLIPEmbedder(**params, layer="hidden", layer_idx=-1)
    hidden.load_state_dict(clip.state_dict())
    with torch.no_grad():
        last = clip(PROMPTS)
        h = hidden(PROMPTS)  # output of the last encoder layer, before final_layer_norm
        assert (h - last).abs().max() > 1e-2
        final_ln = clip.transformer.final_layer_norm if not clip.has_text_model_level \
            else clip.transformer.text_model.final_layer_norm
        assert (final_ln(h) - last).abs().max() < 1e-6
    pooled = FrozenCLIPEmbedder(**params, layer="pooled")
    pooled.load_state_dict(clip.state_dict())
    with torch.no_grad():
        p = pooled(PROMPTS)
    assert p.shape == (2, 1, 16)
    eos_pos = clip.tokenize(PROMPTS).argmax(dim=1)  # first EOS (the largest id)
    assert torch.allclose(p[:, 0], last[torch.arange(2), eos_pos], atol=1e-6)
    with pytest.raises(ValueError):
        FrozenCLIPEmbedder(**params, layer="hidden")  # layer_idx missing


def test_clip_frozen_and_device(golden_config, clip):
    assert isinstance(clip, AbstractEncoder)
    assert not clip.transformer.training
    assert not any(p.requires_grad for p in clip.parameters())
    assert clip.transformer.config._attn_implementation == "eager"
    params = dict(golden_config.model.params.cond_stage_config.params)
    params["device"] = "cuda"  # CompVis default; must not crash on a CPU-only machine
    model = FrozenCLIPEmbedder(**params)
    assert model.tokenize(PROMPT).device == next(model.transformer.parameters()).device
    with torch.device("meta"):
        meta = FrozenCLIPEmbedder(**params)
    assert meta.tokenize(PROMPT).device.type == "meta"  # tokens follow the parameters, not the `device` string


def test_clip_default_is_vit_l_with_checkpoint_keys():
    with torch.device("meta"):
        model = FrozenCLIPEmbedder()
    got = {}
    for key, value in key_shapes(model).items():
        assert key.startswith("transformer.")
        if not key.startswith("transformer.text_model."):  # transformers 5: insert the checkpoint's level back
            key = "transformer.text_model." + key[len("transformer."):]
        got[key] = value
    expected = read_tsv("sd-v1-state-dict.tsv", "cond_stage_model.")
    assert expected.pop("transformer.text_model.embeddings.position_ids") == ([1, 77], "int64")
    got.pop("transformer.text_model.embeddings.position_ids", None)  # persistent only in transformers < 4.31
    assert len(expected) == 196
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == 123_060_480
    assert model.transformer.config.hidden_act == "quick_gelu"


# ---------------------------------------------------------------- FrozenOpenCLIPEmbedder (SD 2.x)

TINY = dict(embed_dim=16, text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2))


def test_openclip_default_is_vit_h_with_checkpoint_keys():
    with torch.device("meta"):
        model = FrozenOpenCLIPEmbedder(layer="penultimate")  # SD 2.x v2-inference.yaml setting
    expected = read_tsv("sd-v2-state-dict.tsv", "cond_stage_model.")
    assert len(expected) == 294
    assert key_shapes(model) == expected
    assert "model.attn_mask" not in model.state_dict() and model.model.attn_mask.shape == (77, 77)
    assert sum(p.numel() for p in model.parameters()) == 354_032_641
    assert not hasattr(model.model, "visual")
    assert model.layer_idx == 1


def test_openclip_tokenizer_pads_with_zero(golden_io):
    model = FrozenOpenCLIPEmbedder(**TINY)
    ids = model.tokenize([PROMPT, ""])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    # same ids as the SD 1.x tokenizer, but padded with 0 after the (first) EOS
    expected = golden_io["text.ids"].clone()
    for row in expected:
        row[int((row == EOS).nonzero()[0]) + 1:] = 0
    assert torch.equal(ids, expected)
    assert (ids[1, 2:] == 0).all()
    long_ids = model.tokenize("a " * 100)
    assert long_ids[0, 0] == BOS and long_ids[0, -1] == EOS and (long_ids[0, 1:-1] == 320).all()


def tiny_tower(layer, seed=0):
    model = FrozenOpenCLIPEmbedder(layer=layer, **TINY)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("ln" in name):
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            elif p.ndim >= 2:
                p.copy_(noise * min(0.1, 1 / math.sqrt(p.shape[-1])))
    return model


def reference_text_encoding(model, tokens, n_blocks):
    """Independent per-block computation from the raw weights: (B, L) ids -> (B, L, D) after n_blocks + ln_final."""
    m = model.model
    x = m.token_embedding.weight[tokens] + m.positional_embedding[: tokens.shape[1]]
    B, L, D = x.shape
    mask = torch.triu(torch.full((L, L), float("-inf")), diagonal=1)
    for blk in list(m.transformer.resblocks)[:n_blocks]:
        heads = blk.attn.num_heads
        h = F.layer_norm(x, (D,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
        q, k, v = (h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, L, heads, D // heads).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads) + mask, dim=-1)
        a = (w @ v).transpose(1, 2).reshape(B, L, D)
        x = x + a @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
        h = F.layer_norm(x, (D,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
        h = F.gelu(h @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias)  # ViT-H-14 text uses exact GELU
        x = x + h @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias
    return F.layer_norm(x, (D,), m.ln_final.weight, m.ln_final.bias, m.ln_final.eps)


def test_openclip_tiny_last_matches_references():
    model = tiny_tower("last")
    tokens = model.tokenize(PROMPTS)
    with torch.no_grad():
        out = model(PROMPTS)
        ref = reference_text_encoding(model, tokens, n_blocks=2)
        # open_clip's own text path on the same weights (its token output is after ln_final)
        model.model.output_tokens = True
        _, oc_tokens = model.model(tokens)
    assert out.shape == (2, 77, 32)
    assert (out - ref).abs().max() < ATOL
    assert (out - oc_tokens).abs().max() < ATOL
    assert (out[0] - out[1]).abs().max() > 1e-2
    # causal: positions before the first difference between the prompts see identical prefixes
    assert (out[:, :2][0] - out[:, :2][1]).abs().max() < 1e-6


def test_openclip_tiny_penultimate():
    last = tiny_tower("last")
    pen = tiny_tower("penultimate")
    assert torch.equal(last.model.token_embedding.weight, pen.model.token_embedding.weight)
    tokens = pen.tokenize(PROMPTS)
    with torch.no_grad():
        out_pen, out_last = pen(PROMPTS), last(PROMPTS)
        ref = reference_text_encoding(pen, tokens, n_blocks=1)
    assert (out_pen - out_last).abs().max() > 1e-2
    assert (out_pen - ref).abs().max() < ATOL


def test_openclip_sequence_first_blocks_give_same_output():
    from open_clip.transformer import Transformer

    model = tiny_tower("penultimate")
    with torch.no_grad():
        expected = model(PROMPTS)
        seq_first = Transformer(width=32, layers=2, heads=4, batch_first=False)
        seq_first.load_state_dict(model.model.transformer.state_dict())
        model.model.transformer = seq_first.eval()
        got = model(PROMPTS)
    assert not model.model.transformer.resblocks[0].attn.batch_first
    assert (got - expected).abs().max() < ATOL  # float rounding differs between the two MHA layouts


def test_openclip_rejects_bad_arguments():
    with pytest.raises(ValueError):
        FrozenOpenCLIPEmbedder(layer="pooled", **TINY)
    with pytest.raises(ValueError):
        FrozenOpenCLIPEmbedder(arch="hf-hub:someone/model", **TINY)
    with pytest.raises(ValueError):
        FrozenOpenCLIPEmbedder(max_length=78, **TINY)
