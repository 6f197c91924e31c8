"""transformers-style helpers the tests use to feed padded batches to both our model and
transformers' (the runtime needs none of them): `batch_encode` (`tokenizer(texts, ...)`),
`batch_decode`, and `generate_tensor` (`model.generate(input_ids, ...)` on our engine)."""

import torch

from model import Engine, SamplingParams


def batch_encode(tok, texts, padding_side="left", max_length=None, truncation=False, add_bos=None,
                 return_tensors="pt", padding="longest") -> dict:
    """A padded {"input_ids", "attention_mask"} pair for `texts` (a str is a batch of one).

    padding_side: "left" (for generation) or "right"; pads are tok.pad_token_id with mask 0.
    max_length: longest row, BOS included; a longer one raises ValueError unless `truncation`
    is "left" (keep the last tokens) or "right" / True (keep the first); BOS is always kept.
    padding: "longest" or "max_length". return_tensors: "pt" ([B, T] long tensors) or None."""
    if isinstance(texts, str):
        texts = [texts]
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if truncation is True:
        truncation = "right"
    if truncation not in (False, None, "left", "right"):
        raise ValueError(f"truncation must be False, True, 'left' or 'right', got {truncation!r}")
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    if return_tensors not in ("pt", None):
        raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    if (truncation or padding == "max_length") and max_length is None:
        raise ValueError("truncation and padding='max_length' need max_length")
    add_bos = tok.add_bos_token if add_bos is None else add_bos
    prefix = [tok.bos_token_id] if add_bos and tok.bos_token_id is not None else []
    if max_length is not None and max_length < len(prefix):
        raise ValueError(f"max_length={max_length} leaves no room for BOS")
    rows = []
    for text in texts:
        ids = tok.encode(text, add_bos=False)
        if max_length is not None and len(prefix) + len(ids) > max_length:
            if not truncation:
                raise ValueError(f"a text encodes to {len(prefix) + len(ids)} tokens > max_length={max_length}; "
                                 "pass truncation='left' or 'right'")
            keep = max_length - len(prefix)
            ids = ids[len(ids) - keep:] if truncation == "left" else ids[:keep]
        rows.append(prefix + ids)
    width = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
    input_ids, attention_mask = [], []
    for row in rows:
        pads, ones, zeros = [tok.pad_token_id] * (width - len(row)), [1] * len(row), [0] * (width - len(row))
        input_ids.append(pads + row if padding_side == "left" else row + pads)
        attention_mask.append(zeros + ones if padding_side == "left" else ones + zeros)
    if return_tensors == "pt":
        shape = (len(rows), width)  # [B, T], also for an empty batch
        input_ids = torch.tensor(input_ids, dtype=torch.long).reshape(shape)
        attention_mask = torch.tensor(attention_mask, dtype=torch.long).reshape(shape)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def batch_decode(tok, batch, skip_special_tokens=True) -> list[str]:
    """`tok.decode` of each row of a list of lists or a [B, T] tensor (pads go with the special ids)."""
    rows = batch.tolist() if hasattr(batch, "tolist") else batch
    return [tok.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]


def generate_tensor(model, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, temperature=1.0,
                    top_k=None, top_p=None, eos_token_id=None, pad_token_id=None, seed=None):
    """transformers-style `generate` on the engine: [B, T] (left- or right-padded with a mask) in,
    [B, T + new] out, rows that stop early padded with pad_token_id (eos when unset)."""
    cfg = model.config
    eos = cfg.eos_ids() if eos_token_id is None else (
        list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None
                                                         else (eos[0] if eos else 0))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_k=top_k or 0, top_p=top_p or 1.0, stop_token_ids=eos, ignore_eos=True, seed=seed)
    engine = Engine(model, None, max_batch_size=input_ids.shape[0], max_seq_len=input_ids.shape[1] + max_new_tokens)
    completions = engine.generate(prompts, params)
    for c in completions:
        if c.error:
            raise ValueError(c.error)
    new = max(len(c.token_ids) for c in completions)
    out = torch.full((input_ids.shape[0], new), pad, dtype=input_ids.dtype)
    for row, c in enumerate(completions):
        out[row, :len(c.token_ids)] = torch.tensor(c.token_ids, dtype=input_ids.dtype)
    return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
