"""Frozen text encoders for Stable Diffusion conditioning (inference only, fully offline).

* ``FrozenCLIPEmbedder`` (SD 1.x): the CLIP ViT-L/14 text tower as a ``transformers.CLIPTextModel`` built from a
  config (random weights; the SD checkpoint supplies them), with a tokenizer built from the BPE vocabulary shipped
  inside ``open_clip`` that reproduces the Hugging Face ``CLIPTokenizer`` output SD 1.x used (pad with EOS).
* ``FrozenOpenCLIPEmbedder`` (SD 2.x): only the OpenCLIP ViT-H/14 text tower (no vision tower is ever built),
  tokenised with open_clip's tokenizer (pad with 0).

Nothing here downloads anything; ``version`` arguments name the tokenizer / weights identity only.

Checkpoint key notes (the checkpoint loader handles them, not this module):
* ``FrozenCLIPEmbedder`` keys are ``transformer.text_model.*`` with transformers 4.x but ``transformer.*`` with
  transformers 5.x (it removed the ``text_model`` level). Real checkpoints use ``transformer.text_model.*`` and may
  contain ``transformer.text_model.embeddings.position_ids`` (not in a fresh state dict since transformers 4.31).
  ``FrozenCLIPEmbedder.has_text_model_level`` tells which layout the installed transformers builds.
* ``FrozenOpenCLIPEmbedder`` keys are ``model.*`` exactly as in SD 2.x checkpoints (``attn_mask`` is not saved).
"""
import functools
import math

import torch
import torch.nn as nn

# CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14) as used by SD 1.x.
CLIP_VIT_L_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)


class AbstractEncoder(nn.Module):
    def __init__(self):
        super().__init__()

    def encode(self, *args, **kwargs):
        raise NotImplementedError


def _to_plain_dict(cfg):
    """DictConfig / Mapping / None -> plain ``dict`` (nested DictConfigs resolved)."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # omegaconf is optional for this module
        pass
    return dict(cfg)


def _module_device(module):
    """Device of the first parameter (or buffer) of ``module``; cpu if it has none."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _resolve_device(device):
    """The CompVis ``device`` argument, downgraded to cpu when it names an accelerator that is not present."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


@functools.lru_cache(maxsize=None)
def _open_clip_bpe():
    """open_clip's ``SimpleTokenizer`` (BPE merges shipped inside the package; no download). Built once."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as e:  # pragma: no cover - dependency missing
        raise ImportError(
            "The CLIP tokenizer needs the BPE vocabulary shipped with open-clip-torch; "
            "install it with `pip install open-clip-torch`."
        ) from e
    return SimpleTokenizer()


class CLIPTokenizerHF:
    """CLIP BPE tokenizer with the Hugging Face ``CLIPTokenizer`` semantics used by SD 1.x.

    ``tokenizer(texts) -> LongTensor (B, max_length)``: ``[BOS, t_1 .. t_n, EOS, EOS, ...]`` with BOS = 49406,
    EOS = 49407, padded with EOS to ``max_length`` and truncated to BOS + first ``max_length - 2`` tokens + EOS
    (i.e. ``truncation=True, padding="max_length"``). Text is ftfy-fixed, whitespace-collapsed and lower-cased;
    the literals ``<|startoftext|>`` / ``<|endoftext|>`` map to BOS / EOS as in Hugging Face.
    The vocabulary (49408 entries) is open_clip's copy of the openai CLIP BPE, identical to
    openai/clip-vit-large-patch14.
    """

    SPECIALS = ("<|startoftext|>", "<|endoftext|>")

    def __init__(self, max_length=77):
        import regex

        self.max_length = max_length
        self._bpe = _open_clip_bpe()
        self.bos_token_id = self._bpe.encoder["<start_of_text>"]  # 49406
        self.eos_token_id = self._bpe.encoder["<end_of_text>"]  # 49407
        self.pad_token_id = self.eos_token_id
        self.vocab_size = len(self._bpe.encoder)
        self._special_ids = {self.SPECIALS[0]: self.bos_token_id, self.SPECIALS[1]: self.eos_token_id}
        self._pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        try:
            import ftfy

            self._fix_text = ftfy.fix_text
        except ImportError:  # pragma: no cover - ftfy is an open_clip dependency
            self._fix_text = None

    def _clean(self, text):
        if self._fix_text is not None:
            text = self._fix_text(text)
        return " ".join(text.split()).lower()

    def encode(self, text):
        """Token ids of ``text`` without BOS/EOS: list[int]."""
        bpe = self._bpe
        ids = []
        for piece in self._pat.findall(self._clean(text)):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
                continue
            piece = "".join(bpe.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(bpe.encoder[sub] for sub in bpe.bpe(piece).split(" "))
        return ids

    def __call__(self, texts, max_length=None):
        if isinstance(texts, str):
            texts = [texts]
        max_length = max_length or self.max_length
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for BOS and EOS), got {max_length}")
        out = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.bos_token_id] + self.encode(text)[: max_length - 2] + [self.eos_token_id]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class FrozenCLIPEmbedder(AbstractEncoder):
    """CLIP text encoder of SD 1.x (transformers ``CLIPTextModel``, built from a config, no download).

    ``text_config`` (dict / DictConfig of ``CLIPTextConfig`` fields) overrides the ViT-L/14 defaults; ``version``
    only names the tokenizer vocabulary. ``layer``: "last" (last_hidden_state, SD 1.x), "pooled"
    (pooler_output[:, None]) or "hidden" (``hidden_states[layer_idx]``, before the final LayerNorm).
    """

    LAYERS = ["last", "pooled", "hidden"]

    def __init__(self, version="openai/clip-vit-large-patch14", device="cpu", max_length=77, freeze=True,
                 layer="last", layer_idx=None, text_config=None):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        cfg = dict(CLIP_VIT_L_TEXT_CONFIG)
        cfg.update(_to_plain_dict(text_config))
        if layer == "hidden":
            if layer_idx is None or not 0 <= abs(layer_idx) <= cfg["num_hidden_layers"]:
                raise ValueError(
                    f"layer='hidden' needs layer_idx with |layer_idx| <= {cfg['num_hidden_layers']}, got {layer_idx}"
                )
        if max_length > cfg["max_position_embeddings"]:
            raise ValueError(
                f"max_length {max_length} exceeds max_position_embeddings {cfg['max_position_embeddings']}"
            )
        # Eager attention by default: the reference outputs were computed with it (sdpa differs by ~1e-6).
        attn_implementation = cfg.pop("attn_implementation", "eager")
        config = CLIPTextConfig(**cfg, attn_implementation=attn_implementation)
        config._attn_implementation = attn_implementation  # older 4.x releases ignore the constructor argument
        self.version = version
        self.tokenizer = CLIPTokenizerHF(max_length=max_length)
        self.transformer = CLIPTextModel(config)
        self.device = _resolve_device(device)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        if freeze:
            self.freeze()

    @property
    def has_text_model_level(self):
        """True with transformers 4.x (keys ``transformer.text_model.*``), False with 5.x (``transformer.*``)."""
        return hasattr(self.transformer, "text_model")

    def freeze(self):
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text):
        """list[str] | str -> LongTensor (B, max_length), EOS-padded, on the text model's device."""
        return self.tokenizer(text, max_length=self.max_length).to(_module_device(self.transformer))

    def forward(self, text):
        """list[str] | str -> (B, max_length, hidden) float tensor (or (B, 1, hidden) for layer="pooled")."""
        return self.layer_output(self.run_transformer(text))

    def run_transformer(self, text):
        """list[str] | str -> the CLIPTextModel outputs (hidden states kept when layer="hidden")."""
        return self.transformer(input_ids=self.tokenize(text), output_hidden_states=self.layer == "hidden")

    def layer_output(self, outputs):
        """The chosen layer of the CLIPTextModel outputs: (B, max_length, hidden) or (B, 1, hidden) (pooled)."""
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        return outputs.hidden_states[self.layer_idx]

    def encode(self, text):
        return self(text)


def _openclip_text_cfg(arch, embed_dim=None, text_cfg=None):
    """(embed_dim, text_cfg dict, quick_gelu) from open_clip's shipped model config for ``arch`` + overrides."""
    import open_clip

    if str(arch).startswith("hf-hub:"):
        raise ValueError(f"arch {arch!r} would be fetched from the Hugging Face hub; only local configs are allowed")
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    cfg = dict(model_cfg.get("text_cfg", {}))
    cfg.update(_to_plain_dict(text_cfg))
    if cfg.get("hf_model_name"):
        raise ValueError("Hugging Face text towers (text_cfg.hf_model_name) are not supported offline")
    if cfg.get("embed_cls"):
        raise ValueError("text towers with a CLS embedding (CoCa) are not supported by FrozenOpenCLIPEmbedder")
    edim = embed_dim if embed_dim is not None else model_cfg["embed_dim"]
    return edim, cfg, bool(model_cfg.get("quick_gelu", False))


def _blocks_batch_first(transformer):
    """Whether open_clip's resblocks take (N, L, D) (open_clip >= 2.24) or (L, N, D) (older releases)."""
    attn = getattr(transformer.resblocks[0], "attn", None)
    if isinstance(attn, nn.MultiheadAttention):
        return bool(attn.batch_first)
    return bool(getattr(transformer, "batch_first", False))


class FrozenOpenCLIPEmbedder(AbstractEncoder):
    """OpenCLIP text encoder of SD 2.x; only the text tower is built (from open_clip's config, no weights).

    ``self.model`` holds ``token_embedding``, ``positional_embedding``, ``transformer.resblocks``, ``ln_final``,
    ``text_projection`` and ``logit_scale`` (the last two unused here but present in SD 2.x checkpoints).
    ``layer``: "last" (all blocks) or "penultimate" (stop before the last block; SD 2.x), then ``ln_final``.
    ``embed_dim`` / ``text_cfg`` (open_clip text-tower fields: context_length, vocab_size, width, heads, layers,
    ...) override the ``arch`` config, e.g. for tiny test towers. ``version`` names the pretrained tag only.
    """

    LAYERS = ["last", "penultimate"]

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device="cpu", max_length=77, freeze=True,
                 layer="last", embed_dim=None, text_cfg=None):
        super().__init__()
        try:
            from open_clip.model import _build_text_tower
        except ImportError as e:  # pragma: no cover - dependency missing / incompatible
            raise ImportError(
                "FrozenOpenCLIPEmbedder needs open-clip-torch >= 2.x (open_clip.model._build_text_tower)"
            ) from e
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        edim, cfg, quick_gelu = _openclip_text_cfg(arch, embed_dim, text_cfg)
        model = _build_text_tower(edim, cfg, quick_gelu=quick_gelu, cast_dtype=None)
        # CLIP.logit_scale lives outside the text tower in open_clip but is part of SD 2.x checkpoints.
        model.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        if getattr(model, "cls_emb", None) is not None or getattr(model, "attn_mask", None) is None:
            raise ValueError("FrozenOpenCLIPEmbedder needs a causal text tower without a CLS embedding")
        context_length = model.positional_embedding.shape[0]
        if max_length > context_length:
            raise ValueError(f"max_length {max_length} exceeds the tower's context_length {context_length}")
        self.model = model
        self.arch = arch
        self.version = version
        self.device = _resolve_device(device)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = 0 if layer == "last" else 1  # number of final blocks skipped
        if freeze:
            self.freeze()

    def freeze(self):
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text):
        """list[str] | str -> LongTensor (B, max_length): [SOT, tokens, EOT, 0, 0, ...] (open_clip pads with 0)."""
        import open_clip

        return open_clip.tokenize(text, context_length=self.max_length).to(_module_device(self.model))

    def forward(self, text):
        """list[str] | str -> (B, max_length, width)."""
        return self.encode_with_transformer(self.tokenize(text))

    def encode_with_transformer(self, tokens):
        """tokens: (B, L) LongTensor -> (B, L, width) after the chosen block and ``ln_final``."""
        L = tokens.shape[1]
        x = self.model.token_embedding(tokens)  # (B, L, D)
        x = x + self.model.positional_embedding[:L].to(x.dtype)
        x = self.text_transformer_forward(x, attn_mask=self.model.attn_mask[:L, :L])
        return self.model.ln_final(x)

    def text_transformer_forward(self, x, attn_mask=None):
        """x: (B, L, D) -> (B, L, D) through resblocks[: len - layer_idx] with the additive causal mask (L, L)."""
        transformer = self.model.transformer
        batch_first = _blocks_batch_first(transformer)
        if not batch_first:
            x = x.transpose(0, 1)  # (L, B, D) for sequence-first open_clip
        n_blocks = len(transformer.resblocks) - self.layer_idx
        for r in transformer.resblocks[:n_blocks]:
            x = r(x, attn_mask=attn_mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return x

    def encode(self, text):
        return self(text)
