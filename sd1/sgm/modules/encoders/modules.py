"""The SDXL conditioner and its embedders (`sgm.modules.encoders.modules`), inference only, fully offline.

`GeneralConditioner` runs every embedder on its `input_key` of a batch dict and concatenates the outputs by
their rank: 2-D outputs into "vector" (B, V), 3-D into "crossattn" (B, M, D). For SDXL base:

* `FrozenCLIPEmbedder` (layer hidden, layer_idx 11): CLIP ViT-L/14 text, (B, 77, 768) -> crossattn
* `FrozenOpenCLIPEmbedder2` (penultimate, pooled, legacy False): OpenCLIP ViT-bigG/14 text, (B, 77, 1280)
  -> crossattn and its pooled (B, 1280) -> vector
* 3 x `ConcatTimestepEmbedderND` (outdim 256) on original_size_as_tuple, crop_coords_top_left and
  target_size_as_tuple: (B, 2) each -> (B, 512) -> vector

so crossattn is (B, 77, 2048) and vector (B, 2816). The text towers are the shared `ldm` ones, built from
config (no download; `text_config` / `embed_dim` + `text_cfg` override their sizes, e.g. for tiny test towers).
Training features of upstream (trainable embedders, conditioning dropout via ucg_rate) are not included.
"""
import math
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
from omegaconf import ListConfig

from ldm.modules.encoders.modules import FrozenCLIPEmbedder as CompVisCLIPEmbedder
from ldm.modules.encoders.modules import (
    _blocks_batch_first,
    _module_device,
    _openclip_text_cfg,
    _resolve_device,
)
from sgm.modules.diffusionmodules.openaimodel import Timestep
from sgm.util import instantiate_from_config


class AbstractEmbModel(nn.Module):
    """An embedder of the GeneralConditioner; the conditioner sets `is_trainable`, `ucg_rate` and `input_key`."""

    is_trainable = False
    ucg_rate = 0.0
    input_key: Optional[str] = None


class GeneralConditioner(nn.Module):
    """Runs the embedders on a batch dict and merges their outputs (see the module docstring).

    forward(batch, force_zero_embeddings=None) -> {"crossattn": (B, M, D), "vector": (B, V), ...}; the outputs
    of embedders whose input_key is in force_zero_embeddings are zeros.
    """

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, emb_models: Union[List, ListConfig]):
        super().__init__()
        embedders = []
        for n, embconfig in enumerate(emb_models):
            embedder = instantiate_from_config(embconfig)
            name = type(embedder).__name__
            if not isinstance(embedder, AbstractEmbModel):
                raise TypeError(f"embedder #{n} {name} has to inherit from sgm AbstractEmbModel")
            if embconfig.get("is_trainable", False):
                raise ValueError(f"embedder #{n} {name}: is_trainable is a training option (inference only here)")
            if embconfig.get("ucg_rate", 0.0) or embconfig.get("legacy_ucg_value") is not None:
                raise ValueError(f"embedder #{n} {name}: ucg_rate / legacy_ucg_value (conditioning dropout) are "
                                 f"training options (inference only here)")
            if "input_key" in embconfig:
                embedder.input_key = embconfig["input_key"]
            elif "input_keys" in embconfig:
                embedder.input_keys = list(embconfig["input_keys"])
            else:
                raise KeyError(f"need either 'input_key' or 'input_keys' for embedder #{n} {name}")
            embedder.eval()
            for param in embedder.parameters():
                param.requires_grad = False
            embedders.append(embedder)
        self.embedders = nn.ModuleList(embedders)

    def _inputs(self, embedder, batch):
        keys = [embedder.input_key] if embedder.input_key is not None else embedder.input_keys
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(f"the conditioning batch has no {missing} for {type(embedder).__name__} "
                           f"(batch keys: {sorted(batch)})")
        return [batch[k] for k in keys]

    def forward(self, batch: Dict, force_zero_embeddings: Optional[List] = None) -> Dict[str, torch.Tensor]:
        force_zero_embeddings = force_zero_embeddings or []
        output = {}
        for embedder in self.embedders:
            with torch.no_grad():
                emb_out = embedder(*self._inputs(embedder, batch))
            if not isinstance(emb_out, (list, tuple)):
                emb_out = [emb_out]
            for emb in emb_out:
                out_key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.input_key is not None and embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                if out_key in output:
                    output[out_key] = torch.cat((output[out_key], emb), self.KEY2CATDIM[out_key])
                else:
                    output[out_key] = emb
        return output

    def get_unconditional_conditioning(self, batch_c: Dict, batch_uc: Optional[Dict] = None,
                                       force_uc_zero_embeddings: Optional[List[str]] = None,
                                       force_cond_zero_embeddings: Optional[List[str]] = None):
        """(c, uc): the conditioning of batch_c, and of batch_uc (default batch_c) with the embedders of the
        input keys in force_uc_zero_embeddings zeroed (SDXL: ["txt"], so uc's text parts are 0)."""
        c = self(batch_c, force_cond_zero_embeddings)
        uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings)
        return c, uc


class FrozenCLIPEmbedder(CompVisCLIPEmbedder, AbstractEmbModel):
    """The CLIP text encoder of `ldm` with sgm's signature: text (B strings) -> (B, 77, hidden), and with
    always_return_pooled also the pooled (B, hidden). `device` defaults to cuda as upstream (cpu without one)."""

    def __init__(self, version="openai/clip-vit-large-patch14", device="cuda", max_length=77, freeze=True,
                 layer="last", layer_idx=None, always_return_pooled=False, text_config=None):
        super().__init__(version=version, device=device, max_length=max_length, freeze=freeze, layer=layer,
                         layer_idx=layer_idx, text_config=text_config)
        self.return_pooled = always_return_pooled

    def forward(self, text):
        outputs = self.run_transformer(text)
        z = self.layer_output(outputs)
        if self.return_pooled:
            return z, outputs.pooler_output
        return z


class OpenCLIPTextModel(nn.Module):
    """The text half of an open_clip CLIP model, laid out as `open_clip.CLIP` after `del model.visual`
    (checkpoint names and parameter order: positional_embedding, text_projection, logit_scale, transformer,
    token_embedding, ln_final; the causal `attn_mask` is a non-persistent buffer)."""

    def __init__(self, arch, embed_dim=None, text_cfg=None):
        super().__init__()
        try:
            from open_clip.model import _build_text_tower
        except ImportError as e:  # pragma: no cover - dependency missing / incompatible
            raise ImportError("FrozenOpenCLIPEmbedder2 needs open-clip-torch >= 2.x") from e
        edim, cfg, quick_gelu = _openclip_text_cfg(arch, embed_dim, text_cfg)
        text = _build_text_tower(edim, cfg, quick_gelu=quick_gelu, cast_dtype=None)
        if getattr(text, "cls_emb", None) is not None or getattr(text, "attn_mask", None) is None:
            raise ValueError("FrozenOpenCLIPEmbedder2 needs a causal text tower without a CLS embedding")
        if not isinstance(text.text_projection, nn.Parameter):
            raise ValueError("FrozenOpenCLIPEmbedder2 needs a text_projection matrix (open_clip proj_type linear, "
                             "no bias), as in ViT-bigG-14")
        self.transformer = text.transformer
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))


class FrozenOpenCLIPEmbedder2(AbstractEmbModel):
    """OpenCLIP text encoder of SDXL (only the text tower is built; open_clip tokenizer, pad 0).

    text (B strings) -> the `layer` output (B, 77, width): "penultimate" = the input of the last block, "last" =
    the output of all blocks; with legacy False it is NOT passed through ln_final. always_return_pooled (needs
    legacy False) also returns the pooled embedding (B, embed_dim): ln_final of the last layer at the EOT
    position (the largest token id) times text_projection. With legacy True the layer output goes through
    ln_final and nothing else is returned.
    """

    LAYERS = ["last", "penultimate"]

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device="cuda", max_length=77, freeze=True,
                 layer="last", always_return_pooled=False, legacy=True, embed_dim=None, text_cfg=None):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if always_return_pooled and legacy:
            raise ValueError("always_return_pooled needs legacy: False (the pooled output is not the legacy path)")
        self.model = OpenCLIPTextModel(arch, embed_dim=embed_dim, text_cfg=text_cfg)
        context_length = self.model.positional_embedding.shape[0]
        if max_length != context_length:
            raise ValueError(f"max_length {max_length} must equal the tower's context_length {context_length}")
        self.arch = arch
        self.version = version
        self.device = _resolve_device(device)
        self.max_length = max_length
        self.return_pooled = always_return_pooled
        self.layer = layer
        self.layer_idx = 0 if layer == "last" else 1
        self.legacy = legacy
        if freeze:
            self.freeze()

    def freeze(self):
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text):
        """list[str] | str -> LongTensor (B, max_length): [SOT, tokens, EOT, 0, 0, ...]."""
        import open_clip

        return open_clip.tokenize(text, context_length=self.max_length).to(_module_device(self.model))

    def forward(self, text):
        tokens = self.tokenize(text)
        layers = self.encode_with_transformer(tokens)
        if self.legacy:
            return self.model.ln_final(layers[self.layer])
        if self.return_pooled:
            return layers[self.layer], self.pool(self.model.ln_final(layers["last"]), tokens)
        return layers[self.layer]

    def encode_with_transformer(self, tokens):
        """tokens: (B, L) -> {"penultimate": (B, L, width), "last": (B, L, width)} (no ln_final)."""
        x = self.model.token_embedding(tokens)
        x = x + self.model.positional_embedding.to(x.dtype)
        return self.text_transformer_forward(x, attn_mask=self.model.attn_mask)

    def text_transformer_forward(self, x, attn_mask=None):
        """x: (B, L, D) through every resblock with the additive causal mask (L, L); keeps the input of the last
        block ("penultimate") and the output of all ("last")."""
        transformer = self.model.transformer
        batch_first = _blocks_batch_first(transformer)
        if not batch_first:
            x = x.transpose(0, 1)  # (L, B, D) for sequence-first open_clip
        outputs = {}
        blocks = transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                outputs["penultimate"] = x
            x = block(x, attn_mask=attn_mask)
        outputs["last"] = x
        if not batch_first:
            outputs = {k: v.transpose(0, 1) for k, v in outputs.items()}
        return outputs

    def pool(self, x, tokens):
        """x: (B, L, width) after ln_final, tokens: (B, L) -> (B, embed_dim) at the EOT token."""
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.model.text_projection

    def encode(self, text):
        return self(text)


class ConcatTimestepEmbedderND(AbstractEmbModel):
    """Embeds each of D numbers per sample with a sinusoid of `outdim` channels and concatenates them:
    x: (B,) or (B, D) -> (B, D * outdim). SDXL: (height, width) or (top, left) pairs, outdim 256."""

    def __init__(self, outdim: int):
        super().__init__()
        self.timestep = Timestep(outdim)
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"ConcatTimestepEmbedderND takes (B,) or (B, D) numbers, got shape {tuple(x.shape)}")
        b, dims = x.shape
        emb = self.timestep(x.reshape(b * dims))
        return emb.reshape(b, dims * self.outdim)
