"""Persimmon in plain torch, read top to bottom: rotary, attention, MLP, block, model, heads.

Parameter names are transformers' names, so HF checkpoints load by name, strictly. Two forwards:
- plain, over padded batches (`attention_mask`): training, and the reference the engine is tested against;
- the engine's: several sequences side by side as one flat run of N tokens, described by an
  `AttentionMetadata`, keys and values in a `PagedKVCache` (model/attention.py). Prefill, prefix
  reuse, recompute after preemption, decode and packed classification are all this one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMetadata, PagedKVCache, paged_attention
from .config import PersimmonConfig


# ---- rotary embedding (GPT-NeoX convention, on the first `rotary_dim` dims of each head) ----
def rope_inv_freq(config: PersimmonConfig, seq_len: int, device) -> torch.Tensor:
    """Inverse frequencies [rotary_dim/2] in fp32, with linear or dynamic-NTK scaling applied."""
    dim, base = config.rotary_dim, config.rope_theta
    if config.rope_type == "dynamic" and seq_len > config.max_position_embeddings:
        factor = config.rope_factor
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_factor
    return inv_freq


def rope_cos_sin(config: PersimmonConfig, position_ids: torch.Tensor, dtype: torch.dtype,
                 seq_lens: torch.Tensor | None = None):
    """cos, sin [B, T, rotary_dim] for integer positions [B, T]; angles in fp32. Dynamic NTK scales
    the frequencies by each row's own length (its max position + 1, or `seq_lens` [B, T] per
    token: a packed row's segment lengths), as transformers does for one sequence."""
    inv_freq = rope_inv_freq(config, 1, position_ids.device)  # unscaled by length
    if config.rope_type == "dynamic" and position_ids.numel():
        if seq_lens is None:
            seq_lens = position_ids.amax(dim=-1, keepdim=True).expand_as(position_ids) + 1
        inv_freq = inv_freq.expand(*position_ids.shape, -1).clone()  # [B, T, rd/2]
        for n in seq_lens.unique().tolist():  # syncs; only lengths past the limit rescale
            if n > config.max_position_embeddings:
                inv_freq[seq_lens == n] = rope_inv_freq(config, n, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, rd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, rd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of x [B, T, H, D]; the rest pass through."""
    rd = cos.shape[-1]
    cos, sin = cos[:, :, None], sin[:, :, None]  # [B, T, 1, rd]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# ---- blocks ----------------------------------------------------------------------------------
class PersimmonAttention(nn.Module):
    def __init__(self, config: PersimmonConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        # fused projection, output laid out per head as [q | k | v] blocks of head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:  # one LayerNorm(head_dim) shared by all heads
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        self.attention_dropout = config.attention_dropout

    def forward(self, x, cos, sin, mask=None, attn_metadata: AttentionMetadata | None = None,
                kv_cache: PagedKVCache | None = None):
        B, T, C = x.shape
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(dim=3)  # each [B, T, H, D]
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if attn_metadata is not None:  # engine: B == 1, T == the N packed tokens
            y = paged_attention(q[0], k[0], v[0], self.layer_idx, kv_cache, attn_metadata, self.head_dim ** -0.5)
            return self.dense(y.reshape(1, T, C))
        dropout = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           dropout_p=dropout, scale=self.head_dim ** -0.5)  # [B, H, T, D]
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class PersimmonMLP(nn.Module):
    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(torch.relu(self.dense_h_to_4h(x)).square())  # relu2


class PersimmonDecoderLayer(nn.Module):
    def __init__(self, config: PersimmonConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PersimmonAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = PersimmonMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x, cos, sin, mask=None, **engine_args):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, **engine_args)
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


def padding_causal_mask(attention_mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """Boolean [B, 1, T, T], True = may attend. Pad query rows see themselves (never NaN)."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if attention_mask is None:
        return causal[None, None].expand(B, 1, T, T)
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return mask | torch.eye(T, dtype=torch.bool, device=device)


class PersimmonPreTrainedModel(nn.Module):
    config_class = PersimmonConfig

    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.config = config

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None):
        """Random init as transformers does: N(0, initializer_range), zero bias, unit LayerNorm."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        self.tie_weights()
        return self

    def tie_weights(self):
        head = getattr(self, "lm_head", None)
        if head is not None and self.config.tie_word_embeddings:
            head.weight = self.model.embed_tokens.weight


class PersimmonModel(PersimmonPreTrainedModel):
    def __init__(self, config: PersimmonConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PersimmonDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, attention_mask=None, position_ids=None,
                attn_metadata: AttentionMetadata | None = None, kv_cache: PagedKVCache | None = None):
        """Plain: input_ids [B, T] -> final hidden states [B, T, C], keys masked by
        `attention_mask`, positions default arange(T). Engine (`attn_metadata`): the packed
        tokens [N] -> [N, C]; positions, spans and the KV cache come from the metadata."""
        if attn_metadata is not None:
            x = self.embed_tokens(input_ids.view(1, -1))  # [1, N, C]
            lens = attn_metadata.rope_lens[None] if attn_metadata.rope_lens is not None else None
            cos, sin = rope_cos_sin(self.config, attn_metadata.positions[None], x.dtype, lens)
            for layer in self.layers:
                x = layer(x, cos, sin, attn_metadata=attn_metadata, kv_cache=kv_cache)
            return self.final_layernorm(x)[0]
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)  # [B, T, C]
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device).expand(B, T)
        mask = padding_causal_mask(attention_mask, B, T, x.device)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.final_layernorm(x)


# ---- heads -----------------------------------------------------------------------------------
class PersimmonForCausalLM(PersimmonPreTrainedModel):
    def __init__(self, config: PersimmonConfig):
        super().__init__(config)
        self.model = PersimmonModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                logits_to_keep: int = 0) -> ModelOutput:
        h = self.model(input_ids, attention_mask, position_ids)  # [B, T, C]
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)  # [B, T', V]
        loss = None
        if labels is not None:  # predict token t+1 from position t; -100 is ignored
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(logits.device),
                                   ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=h)


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Index [B] of the rightmost token that is not padding (left- and right-padding alike)."""
    B, T = input_ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError("batch size > 1 needs config.pad_token_id to find each row's last token")
        return torch.full((1,), T - 1, device=input_ids.device)
    idx = torch.arange(T, device=input_ids.device)
    return (idx * (input_ids != pad_token_id)).argmax(-1)


def classification_loss(logits, labels, config: PersimmonConfig):
    """Loss by problem_type, inferred as transformers does when unset."""
    num_labels = config.num_labels
    problem = config.problem_type or ("regression" if num_labels == 1 else "single_label_classification"
                                      if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
    logits = logits.float()
    if problem == "regression":
        return F.mse_loss(logits.squeeze(-1) if num_labels == 1 else logits,
                          labels.squeeze(-1).float() if num_labels == 1 else labels.float())
    if problem == "single_label_classification":
        return F.cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1), ignore_index=-100)
    return F.binary_cross_entropy_with_logits(logits, labels.float())


class PersimmonForSequenceClassification(PersimmonPreTrainedModel):
    def __init__(self, config: PersimmonConfig):
        super().__init__(config)
        self.model = PersimmonModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None) -> ModelOutput:
        last = last_non_pad_index(input_ids, self.config.pad_token_id)  # [B]
        h = self.model(input_ids, attention_mask, position_ids)  # [B, T, C]
        pooled = h[torch.arange(h.shape[0], device=h.device), last]  # [B, C]
        logits = self.score(pooled)  # [B, num_labels]; the head is linear, so pool first
        loss = classification_loss(logits, labels, self.config) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=h)


class PersimmonForTokenClassification(PersimmonPreTrainedModel):
    def __init__(self, config: PersimmonConfig):
        super().__init__(config)
        self.model = PersimmonModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None) -> ModelOutput:
        h = self.model(input_ids, attention_mask, position_ids)
        logits = self.score(self.dropout(h))  # [B, T, num_labels]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=h)


MODEL_CLASSES = {cls.__name__: cls for cls in (PersimmonModel, PersimmonForCausalLM,
                                               PersimmonForSequenceClassification,
                                               PersimmonForTokenClassification)}
