"""llmkern: verified Triton kernels for LLM inference.

Each op family lives in one host module here (validation, dispatch, launch) and one device module in
llmkern.kernels; llmkern.reference holds the plain-PyTorch ground truth of every op.
"""
from llmkern import reference  # noqa: F401
from llmkern.kv_cache import CacheFullError, PagedKVCache  # noqa: F401
from llmkern.paged_attention import (PagedAttentionPlan, paged_decode_attention, paged_kv_write,  # noqa: F401
                                     paged_prefill_attention)
from llmkern.attention import attention, attention_varlen  # noqa: F401
from llmkern.mla import mla_decode_attention, mla_kv_write, mla_prefill_attention  # noqa: F401
from llmkern.layers import add_rms_norm, apply_rope, rms_norm  # noqa: F401
from llmkern.patch import patch_model  # noqa: F401
from llmkern.sampling import SamplingParams, sample, sampling_probs  # noqa: F401
from llmkern.decoding import apply_penalties, beam_topk, speculative_sample  # noqa: F401
from llmkern.quant import quant_matmul  # noqa: F401
from llmkern.quant_weight import QuantizedWeight, quantize_weight  # noqa: F401
from llmkern.quant_linear import QuantLinear, quantize_model  # noqa: F401
from llmkern.moe import QuantizedExperts, fused_moe, moe_topk, quantize_experts  # noqa: F401
from llmkern.generate import generate  # noqa: F401
from llmkern.beam_search import beam_search  # noqa: F401

__version__ = "0.1.0"
