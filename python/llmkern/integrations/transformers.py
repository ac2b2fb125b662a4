"""llmkern as a Hugging Face transformers attention backend.

    import llmkern.integrations.transformers  # registers "llmkern"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="llmkern")
    # or, on a loaded model: model.set_attn_implementation("llmkern")

Importing this module registers two functions under the name "llmkern":

* an attention function with transformers' `AttentionInterface`. Model code calls it as
  `fn(module, query, key, value, attention_mask, dropout=, scaling=, sliding_window=, softcap=, **kwargs)` with
  query `(batch, num_heads, seqlen_q, head_dim)` and key/value `(batch, num_kv_heads, seqlen_k, head_dim)` as
  returned by the model's KV cache, and expects `(batch, seqlen_q, num_heads, head_dim)` back. The tensors are
  transposed as views into llmkern's `(batch, seqlen, heads, head_dim)` layout; K/V are never repeated for GQA.
* a mask function with `AttentionMaskInterface`. transformers builds one mask per forward (per layer type) through
  it. A dense 4D mask would throw away what llmkern's kernels know how to do (causal, window, varlen), so ours
  returns something much smaller: None when the pattern is purely causal over all keys, else the 2D boolean padding
  mask of the keys that can be seen, cut at the last query (see `llmkern_mask`). Patterns it cannot express that way
  (packed sequences, image-token overlays, chunked attention, user mask functions) get the full 4D mask, and the
  attention function then runs a plain PyTorch fallback, with a one-time warning. Layers whose dtype or head_dim
  the kernels do not run (float64, head_dim outside multiples of 8 in [32, 256]) take the same fallback (warned
  once) rather than failing at their first forward: nothing in transformers checks an attention implementation
  when it is chosen, so that is the only step that can refuse it.

How each case maps onto llmkern (the query/key positions below are transformers' cache indices):

* no padding: `llmkern.attention` on the views, `causal=True` (bottom-right aligned, so decode with one query
  against the whole cache is the same call), `window=(sliding_window - 1, 0)` for sliding layers: transformers'
  sliding mask keeps key j for query i when `j > i - sliding_window`, i.e. `i - j <= sliding_window - 1`.
* padding (left padding from `generate`, right padding, static-cache slots not yet written): the real tokens of
  each row are packed (a copy, as transformers' own flash-attention path does) and run through
  `llmkern.attention_varlen`. Within a row the real keys are in cache order and the real queries are its last real
  keys, so bottom-right causal alignment is exact. Query rows that are padding get zeros (no real token attends to
  them, and their logits are never used). A sliding window counts cache positions, so for a sliding layer the
  real tokens of a row must be contiguous (always true for left or right padding); otherwise the fallback runs.
* softcap (Gemma-2) and the module's `scaling` are passed through.
* attention sinks: models with sinks hand them to the attention function as the keyword `s_aux`, one logit per
  query head (transformers 5.24: gpt-oss, and also GraniteSWA, MiMo-V2-Flash, DeepSeek-V4 among others); they go to
  llmkern's `sinks=` as float32, on every path (dense, varlen, and the PyTorch fallback).
* ALiBi: no model of transformers 5.24 hands ALiBi to an attention backend. BLOOM, MPT and Falcon (with
  `alibi=True`) build the bias tensor themselves and add it to the scores in their own attention code, which never
  calls `AttentionInterface`, so there are no slopes to pass through, and "llmkern" cannot serve them:
  `set_attn_implementation("llmkern")` is refused by transformers with a warning (the model keeps its attention),
  and loading one with `attn_implementation="llmkern"` fails in transformers' model code (Falcon: KeyError from its
  own class table; BLOOM, MPT: their code expects sdpa's 4D mask where llmkern's mask function returns None or a
  2D padding mask). Load them with "eager" or "sdpa". `llmkern.attention(...,
  alibi_slopes=llmkern.alibi_slopes(num_heads))` is the kernel-side API for model code of one's own.

Continuous batching (`model.generate_batch` / `init_continuous_batching`) cannot call a function registered under
"llmkern": transformers 5.x `ContinuousBatchingManager.switch_to_cb_friendly_attn` accepts only "sdpa",
"paged|eager" or a name containing "flash" (and raises ValueError otherwise), and a "flash" name is resolved by
`set_attn_implementation` to a flash-attention package or a Hub kernel that it downloads. See `CONTINUOUS_BATCHING`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

import llmkern
from llmkern import _utils

from transformers import AttentionInterface
from transformers import masking_utils
from transformers.masking_utils import AttentionMaskInterface

NAME = "llmkern"

CONTINUOUS_BATCHING = (
    "transformers' continuous batching cannot call a registered attention function named 'llmkern': "
    "ContinuousBatchingManager.switch_to_cb_friendly_attn (transformers 5.x) accepts only 'sdpa', 'paged|eager' or "
    "an implementation whose name contains 'flash' and raises ValueError for any other name; a name containing "
    "'flash' is treated by PreTrainedModel.set_attn_implementation as a flash-attention package or a Hub kernel repo "
    "to download, so a local function cannot be registered under one.")

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


# ------------------------------------------------------------------------------------------------ mask patterns
def _mask_pattern(fn: Callable) -> tuple[str, int | None] | None:
    """What a transformers mask function computes, when llmkern can express it, else None.

    transformers composes mask functions from a few named pieces (`and_masks`/`or_masks` closures over them); we
    walk that tree and recognize the pieces by their qualified names. Returns ("causal", window) with window None or
    the sliding window size, ("bidirectional", None), or None for anything else (or-overlays, chunked attention,
    packed-sequence remapping, user functions), which the caller hands to the dense fallback.
    """
    if fn is masking_utils.causal_mask_function:
        return ("causal", None)
    if fn is masking_utils.bidirectional_mask_function:
        return ("bidirectional", None)
    if getattr(fn, "__qualname__", "") == "and_masks.<locals>.and_mask":
        kind, window = None, None
        for part in _cells(fn).get("mask_functions", ()):
            if getattr(part, "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask":
                w = _cells(part).get("sliding_window")
                if not isinstance(w, int) or (window is not None and window != w):
                    return None
                window = w
                continue
            sub = _mask_pattern(part)
            if sub is None or (kind is not None and sub[0] != kind):
                return None
            kind = sub[0]
            if sub[1] is not None:
                if window is not None and window != sub[1]:
                    return None
                window = sub[1]
        return None if kind is None else (kind, window)
    return None


def _cells(fn: Callable) -> dict[str, Any]:
    """A closure's free variables by name (empty for anything that is not a Python function)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return {}
    return dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def llmkern_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
                 mask_function: Callable = masking_utils.causal_mask_function,
                 attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """The mask transformers hands to every "llmkern" attention call of one forward.

    transformers' semantics (`sdpa_mask`): query i (cache index q_offset + i) sees key j (cache index kv_offset + j)
    when the pattern allows it (causal: key index <= query index; sliding: also key index > query index - window)
    and the 2D padding mask is True at the key. Ours returns:

    * None: causal (or bidirectional) with no padding, queries at the end of the keys. The kernel's own masking is
      the whole story.
    * a bool `(batch, L)` tensor, the padding mask over key slots `kv_offset ... kv_offset + L - 1`. For causal
      patterns L = q_offset + q_length - kv_offset, i.e. it stops at the last query: later slots (a static cache's
      unwritten tail) can never be seen, and the attention function reads the query positions from L.
    * the dense 4D mask of `sdpa_mask` for patterns llmkern cannot express (see `_mask_pattern`).
    """
    pattern = _mask_pattern(mask_function)
    if pattern is None:
        _warn_once("llmkern attention: this mask pattern (e.g. packed sequences, image-token or chunked attention) "
                   "is not expressible as causal/window + padding; those layers use a PyTorch fallback.")
        kwargs.pop("allow_is_causal_skip", None)
        kwargs.pop("allow_is_bidirectional_skip", None)
        return masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                       q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                       attention_mask=attention_mask, allow_is_causal_skip=False, **kwargs)
    q_offset = int(q_offset)  # a 0-d tensor for static caches
    end = kv_length if pattern[0] == "bidirectional" else q_offset + q_length - kv_offset
    if attention_mask is None:
        if end == kv_length:
            return None
        device = kwargs.get("device", "cpu")
        return torch.ones(batch_size, end, dtype=torch.bool, device=device)
    padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    padding = padding[:, kv_offset:kv_offset + end].to(torch.bool)
    if end == kv_length and bool(padding.all()):
        return None
    return padding


# ------------------------------------------------------------------------------------------------ attention
def _dense_fallback(query, key, value, mask4d, scaling, softcap, is_causal, sinks=None):
    """Plain PyTorch attention with an arbitrary transformers 4D mask (bool or additive float), fp32 math; sinks
    (num_heads,) join each row's softmax denominator with no value."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).float()
    v = value.repeat_interleave(groups, dim=1).float()
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask4d is None:
        if is_causal:
            sq, sk = scores.shape[-2:]
            keep = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).tril(sk - sq)
            scores = scores.masked_fill(~keep, float("-inf"))
    elif mask4d.dtype == torch.bool:
        scores = scores.masked_fill(~mask4d, float("-inf"))
    else:
        scores = scores + mask4d.float()
    if sinks is not None:
        sink = sinks.float()[None, :, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1].nan_to_num(0.0)
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no visible key gets zeros, like llmkern
    out = torch.matmul(probs, v).to(query.dtype)
    return out.transpose(1, 2).contiguous()


def _packed_rows(valid: torch.Tensor) -> tuple[torch.Tensor, int]:
    lens = valid.sum(dim=1, dtype=torch.int32)
    cu = torch.zeros(valid.shape[0] + 1, dtype=torch.int32, device=valid.device)
    cu[1:] = torch.cumsum(lens, dim=0)
    return cu, int(lens.max()) if lens.numel() else 0


def _contiguous_rows(valid: torch.Tensor) -> bool:
    """Each row's True entries form one run (left or right padding, or none)."""
    idx = torch.arange(valid.shape[1], device=valid.device)
    count = valid.sum(dim=1)
    first = torch.where(valid, idx, valid.shape[1]).amin(dim=1)
    last = torch.where(valid, idx, -1).amax(dim=1)
    return bool(((count == 0) | (last - first + 1 == count)).all())


def llmkern_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, sliding_window: int | None = None,
                              softcap: float | None = None, is_causal: bool | None = None,
                              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function on llmkern.attention / attention_varlen. See the module docstring."""
    if dropout:
        raise ValueError(f"llmkern attention is inference-only: dropout must be 0, got {dropout} "
                         "(call model.eval() or set config.attention_dropout = 0)")
    sinks = kwargs.get("s_aux")
    if sinks is not None:   # one logit per query head (gpt-oss's module.sinks, a parameter of the model's dtype)
        sinks = sinks.detach().to(torch.float32)
    if kwargs.get("output_attentions", False):
        _warn_once("llmkern attention does not return attention weights (output_attentions); they are None.")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query/key/value must be (batch, heads, seqlen, head_dim), got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if value.shape[-1] != query.shape[-1]:
        raise ValueError(f"llmkern attention needs one head_dim for q, k and v; got q {query.shape[-1]}, "
                         f"v {value.shape[-1]}")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = (-1, -1)
    if sliding_window is not None:
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        # causal: transformers keeps key j for query i when j > i - sliding_window (sliding_window_overlay);
        # bidirectional: when |i - j| <= sliding_window (sliding_window_bidirectional_overlay)
        w = int(sliding_window)
        window = (w - 1, 0) if causal else (w, w)
    batch, _, seqlen_q, _ = query.shape

    if attention_mask is not None and attention_mask.dim() == 4:
        return _dense_fallback(query, key, value, attention_mask, scale, softcap, causal, sinks), None

    # llmkern layout (batch, seqlen, heads, head_dim): views, no copies
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"llmkern attention expects the mask built by llmkern_mask (None, 2D or 4D), got shape "
                         f"{tuple(attention_mask.shape)}; load the model with attn_implementation='llmkern'")
    if attention_mask is not None:
        length = attention_mask.shape[1]
        if length > k.shape[1] or (causal and length < seqlen_q):
            raise ValueError(f"attention mask covers {length} key slots but the layer has {k.shape[1]} keys and "
                             f"{seqlen_q} queries")
        k, v = k[:, :length], v[:, :length]
        if bool(attention_mask.all()):
            attention_mask = None

    # Layers the kernels cannot run (a float64 model, a head_dim outside llmkern's set) take the PyTorch fallback:
    # choosing attn_implementation="llmkern" is the step a user could change, and nothing checks it then, so a
    # refusal here would come only at the first forward.
    runnable = query.dtype in _utils.FLOAT_DTYPES and _utils.supported_head_dim(query.shape[-1])
    if not runnable:
        _warn_once(f"llmkern attention: {query.dtype} with head_dim {query.shape[-1]} is outside what the kernels "
                   f"run (float16/bfloat16/float32, head_dim a multiple of 8 in [32, 256]); those layers use a "
                   f"PyTorch fallback.")
    if attention_mask is None and runnable:
        out = llmkern.attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks)
        return out, None

    # Padding: pack each row's real tokens and run varlen. The queries are the last seqlen_q key slots (causal),
    # so query row i of batch b is real when its own key slot is.
    valid_k = attention_mask if attention_mask is not None else \
        torch.ones(batch, k.shape[1], dtype=torch.bool, device=q.device)
    valid_q = valid_k[:, valid_k.shape[1] - seqlen_q:] if causal else \
        torch.ones(batch, seqlen_q, dtype=torch.bool, device=q.device)
    if not runnable or (window != (-1, -1) and not _contiguous_rows(valid_k)):
        if runnable:
            _warn_once("llmkern attention: padding inside a sequence with a sliding window; using a PyTorch "
                       "fallback.")
        mask4d = _dense_mask(valid_k, seqlen_q, causal, window)
        out = _dense_fallback(query, key[:, :, :valid_k.shape[1]], value[:, :, :valid_k.shape[1]], mask4d, scale,
                              softcap, False, sinks)
        return out.masked_fill(~valid_q[:, :, None, None], 0.0), None  # padding query rows: zeros, as below
    cu_k, max_k = _packed_rows(valid_k)
    cu_q, max_q = _packed_rows(valid_q)
    out_packed = llmkern.attention_varlen(q[valid_q], k[valid_k], v[valid_k], cu_q, cu_k, max_q, max_k,
                                          causal=causal, scale=scale, window=window, softcap=softcap, sinks=sinks)
    out = q.new_zeros(q.shape)
    out[valid_q] = out_packed
    return out, None


def _dense_mask(valid_k: torch.Tensor, seqlen_q: int, causal: bool, window: tuple[int, int]) -> torch.Tensor:
    """transformers' mask in cache positions: (batch, 1, seqlen_q, L) bool, queries on the last seqlen_q slots."""
    length = valid_k.shape[1]
    qpos = torch.arange(length - seqlen_q, length, device=valid_k.device)[:, None]
    kpos = torch.arange(length, device=valid_k.device)[None, :]
    keep = torch.ones(seqlen_q, length, dtype=torch.bool, device=valid_k.device)
    if causal:
        keep &= kpos <= qpos
    if window[0] >= 0:
        keep &= kpos >= qpos - window[0]
    if window[1] >= 0:
        keep &= kpos <= qpos + window[1]
    return keep[None, None] & valid_k[:, None, None, :]


def register(name: str = NAME) -> None:
    """Register the attention and mask functions under `name` (done for "llmkern" at import)."""
    AttentionInterface.register(name, llmkern_attention_forward)
    AttentionMaskInterface.register(name, llmkern_mask)


register()

__all__ = ["NAME", "CONTINUOUS_BATCHING", "llmkern_attention_forward", "llmkern_mask", "register"]
