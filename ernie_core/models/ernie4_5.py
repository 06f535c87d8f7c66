"""ERNIE 4.5 dense decoder (ernie_reference §1.1) as one plain nn.Module.

Parameter names follow Hugging Face (`model.layers.{i}.self_attn.q_proj.weight`, ...), so a
`state_dict` of the unfused model is an HF checkpoint. With `fuse_linear=True` q|k|v and gate|up
each live in one weight (`self_attn.qkv_proj`, `mlp.up_gate_proj`, [out, in] layout); `io.py`
splits and joins them, so checkpoints on disk are always in the HF split layout.

Labels are ERNIE style: `labels[b, p]` is the target of the prediction made at position p (already
shifted by the data pipeline; -100 = no loss). The model never shifts them.

Parallelism is applied from outside (ernie_core/parallel); nothing here knows about it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ..ops import flashmask_attention, fused_head_ce, rms_norm, rope, swiglu
from ..ops.reference import rope_reference, startend_row_indices_to_mask
from .config import Ernie4_5Config

IGNORE_INDEX = -100
RECOMPUTE_GRANULARITIES = ("full", "full_attn", "core_attn")


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None  # fp32 scalar: sum of CE over labelled tokens / their count
    logits: torch.Tensor | None = None  # [B, S, V]; None when a fused or sparse head computed the loss
    num_label_tokens: torch.Tensor | None = None  # int64 scalar: tokens with label != -100


@dataclass
class RuntimeOptions:
    """Per-run switches (ERNIEKit names); they change speed and memory, never the result."""

    use_flash_attention: bool = True
    use_sparse_flash_attn: bool = True
    use_attn_mask_start_row_indices: bool = True
    fuse_rope: bool = False
    fuse_linear: bool = False
    use_fused_head_and_loss_fn: bool = False
    use_sparse_head_and_loss_fn: bool = False
    recompute: bool = False
    recompute_granularity: str = "full"
    recompute_use_reentrant: bool = False

    def __post_init__(self):
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            raise UserError(f"recompute_granularity: {self.recompute_granularity!r} is not one of "
                            f"{', '.join(RECOMPUTE_GRANULARITIES)}")

    @property
    def attention_mode(self) -> str:
        if not self.use_flash_attention:
            return "eager"
        if self.use_sparse_flash_attn and self.use_attn_mask_start_row_indices:
            return "flashmask"
        return "sdpa"

    def recomputes(self, granularity: str) -> bool:
        return self.recompute and self.recompute_granularity == granularity and torch.is_grad_enabled()


def _checkpoint(fn, x: torch.Tensor, *args, reentrant: bool):
    """torch.utils.checkpoint of fn(x, *args). The reentrant variant only builds a graph when an input
    requires grad; with a frozen embedding (LoRA) x would not, and every weight inside would silently
    get no gradient, so x is made a leaf that does (x needs no gradient itself then)."""
    if reentrant and not x.requires_grad:
        x = x.detach().requires_grad_(True)
    return checkpoint(fn, x, *args, use_reentrant=reentrant)


# ---- attention inputs, built once per forward and shared by every layer --------------------------
@dataclass
class AttentionInputs:
    """What every layer's attention needs besides q/k/v.

    flashmask mode: `indices` int32 [B, 1|Hkv, S, n]. Dense modes: `allowed` bool [B, 1|Hkv, S, S]
    (None = plain causal) and `row_valid` [B, S, 1|Hkv, 1] (None = every row sees some column):
    fully masked rows (pads) give 0 there, as FlashMask does, instead of a uniform average.
    """

    position_ids: torch.Tensor
    mode: str
    indices: torch.Tensor | None = None
    allowed: torch.Tensor | None = None
    row_valid: torch.Tensor | None = None
    _additive: dict = field(default_factory=dict)

    def additive_mask(self, dtype: torch.dtype, num_heads: int) -> torch.Tensor:
        """(mask - 1) * 1e6 in `dtype`, heads expanded to num_heads when the mask is per kv head.
        fp16 cannot hold 1e6; -3e4 still underflows exp() to exactly 0."""
        key = (dtype, num_heads)
        if key not in self._additive:
            fill = -3.0e4 if dtype == torch.float16 else -1.0e6
            m = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            m = m.masked_fill(~self.allowed, fill)
            if m.shape[1] not in (1, num_heads):
                m = m.repeat_interleave(num_heads // m.shape[1], dim=1)
            self._additive[key] = m
        return self._additive[key]


def build_attention_inputs(mode: str, input_ids: torch.Tensor, position_ids, indices) -> AttentionInputs:
    B, S = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(S, device=input_ids.device).unsqueeze(0).expand(B, S)
    if indices is not None and (indices.dim() != 4 or indices.shape[0] != B or indices.shape[2] != S):
        raise ValueError(f"attn_mask_startend_row_indices must be [B={B}, 1|Hkv, S={S}, n], "
                         f"got {tuple(indices.shape)}")
    if mode == "flashmask":
        if indices is None:  # plain causal: every column is visible to all rows below it
            indices = torch.full((B, 1, S, 1), S, dtype=torch.int32, device=input_ids.device)
        return AttentionInputs(position_ids, mode, indices=indices.to(torch.int32))
    if indices is None:
        if mode == "sdpa":
            return AttentionInputs(position_ids, mode)  # is_causal=True inside SDPA
        allowed = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril().view(1, 1, S, S)
        return AttentionInputs(position_ids, mode, allowed=allowed)
    if indices.shape[-1] == 1:
        # ERNIEKit's dense fallback, ernie_reference §5.3: (i < start_row[j]) & (j <= i).
        rows = torch.arange(S, device=indices.device).view(1, 1, S, 1)
        start_row = indices[..., 0].unsqueeze(2)  # [B, Hm, 1, S]: per column j
        allowed = (rows < start_row) & (rows >= rows.transpose(2, 3))
    else:
        allowed = startend_row_indices_to_mask(indices, causal=True)
    row_valid = allowed.any(dim=-1)  # [B, Hm, S]
    row_valid = None if bool(row_valid.all()) else row_valid.transpose(1, 2).unsqueeze(-1)
    return AttentionInputs(position_ids, mode, allowed=allowed, row_valid=row_valid)


def attend(q, k, v, inputs: AttentionInputs, dropout_p: float) -> torch.Tensor:
    """Causal GQA attention, q [B,S,Hq,D], k/v [B,S,Hkv,D] -> [B,S,Hq,D]; scale 1/sqrt(D)."""
    if inputs.mode == "flashmask":  # the op sets its own precision under autocast (ops/_dtypes.py)
        return flashmask_attention(q, k, v, inputs.indices, causal=True, dropout_p=dropout_p)
    Hq, Hkv = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
    if inputs.mode == "sdpa":
        mask = None if inputs.allowed is None else inputs.additive_mask(q.dtype, Hq)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p,
                                             is_causal=mask is None, enable_gqa=Hq != Hkv)
    else:  # eager: what the dense kernels compute, written out
        kt = kt.repeat_interleave(Hq // Hkv, dim=1)
        vt = vt.repeat_interleave(Hq // Hkv, dim=1)
        scores = torch.matmul(qt, kt.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        scores = scores + inputs.additive_mask(scores.dtype, Hq)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        out = torch.matmul(probs, vt)
    out = out.transpose(1, 2)
    if inputs.row_valid is not None:
        valid = inputs.row_valid
        if valid.shape[2] not in (1, Hq):  # per-kv-head mask -> per query head
            valid = valid.repeat_interleave(Hq // valid.shape[2], dim=2)
        out = out * valid.to(out.dtype)
    return out


# ---- modules -------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: Ernie4_5Config, runtime: RuntimeOptions):
        super().__init__()
        H, bias = cfg.hidden_size, cfg.use_bias
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.theta = cfg.rope_theta
        self.runtime = runtime
        self.dropout_p = 0.0  # attention-probability dropout, set by set_dropout
        if runtime.fuse_linear:  # one GEMM for q|k|v: rows [q heads | k heads | v heads]
            self.qkv_proj = nn.Linear(H, cfg.q_dim + 2 * cfg.kv_dim, bias=bias)
        else:
            self.q_proj = nn.Linear(H, cfg.q_dim, bias=bias)
            self.k_proj = nn.Linear(H, cfg.kv_dim, bias=bias)
            self.v_proj = nn.Linear(H, cfg.kv_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.q_dim, H, bias=bias)

    def forward(self, x, inputs: AttentionInputs):
        B, S, _ = x.shape
        if self.runtime.fuse_linear:
            q, k, v = self.qkv_proj(x).split(
                [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
                dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, S, self.num_heads, self.head_dim)
        k = k.view(B, S, self.num_kv_heads, self.head_dim)
        v = v.view(B, S, self.num_kv_heads, self.head_dim)
        if self.runtime.recomputes("core_attn") and self.training:
            out = _checkpoint(self.core, q, k, v, inputs, reentrant=self.runtime.recompute_use_reentrant)
        else:
            out = self.core(q, k, v, inputs)
        return self.o_proj(out.reshape(B, S, self.num_heads * self.head_dim))

    def core(self, q, k, v, inputs: AttentionInputs):
        """RoPE + the attention kernel: what `core_attn` recompute re-runs in backward."""
        rope_fn = rope if self.runtime.fuse_rope else rope_reference
        q, k = rope_fn(q, k, inputs.position_ids, self.theta)
        return attend(q, k, v, inputs, self.dropout_p if self.training else 0.0)


class MLP(nn.Module):
    def __init__(self, cfg: Ernie4_5Config, runtime: RuntimeOptions):
        super().__init__()
        H, I, bias = cfg.hidden_size, cfg.intermediate_size, cfg.use_bias
        self.fused = runtime.fuse_linear
        if self.fused:  # rows [gate | up], the order Paddle's up_gate_proj uses (§1.4)
            self.up_gate_proj = nn.Linear(H, 2 * I, bias=bias)
        else:
            self.gate_proj = nn.Linear(H, I, bias=bias)
            self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)

    def forward(self, x):
        if self.fused:
            gate, up = self.up_gate_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(swiglu(gate, up))


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + drop(attn(norm(x))); y = h + drop(mlp(norm(h))).

    `build_mlp` is the one place the feed-forward block is chosen: a subclass (e.g. a mixture of
    experts on some layers) overrides it per layer index and keeps the rest of the block."""

    def __init__(self, cfg: Ernie4_5Config, runtime: RuntimeOptions, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.runtime = runtime
        self.hidden_dropout_p = 0.0  # residual dropout, set by set_dropout
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, runtime)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = self.build_mlp(cfg, runtime, layer_idx)

    def build_mlp(self, cfg: Ernie4_5Config, runtime: RuntimeOptions, layer_idx: int) -> nn.Module:
        return MLP(cfg, runtime)

    def set_dropout(self, hidden_p: float, attn_p: float) -> None:
        self.hidden_dropout_p = float(hidden_p)
        self.self_attn.dropout_p = float(attn_p)

    def attention_block(self, x, inputs: AttentionInputs):
        return self.self_attn(self.input_layernorm(x), inputs)

    def forward(self, x, inputs: AttentionInputs):
        if self.runtime.recomputes("full_attn") and self.training:
            a = _checkpoint(self.attention_block, x, inputs, reentrant=self.runtime.recompute_use_reentrant)
        else:
            a = self.attention_block(x, inputs)
        h = x + self._drop(a)
        return h + self._drop(self.mlp(self.post_attention_layernorm(h)))

    def _drop(self, t):
        if self.training and self.hidden_dropout_p > 0.0:
            return F.dropout(t, p=self.hidden_dropout_p, training=True)
        return t


class Ernie4_5Model(nn.Module):
    """Embedding, decoder layers, final RMSNorm: input_ids [B,S] -> hidden [B,S,H].

    The layers live in an `nn.ModuleDict` keyed by their index ("0", "1", ...), so parameter names
    are Hugging Face's (`layers.7.mlp.up_proj.weight`) and a pipeline stage is this module with the
    pieces it does not own removed: layers deleted from the dict, `embed_tokens` or `norm` set to
    None. forward then takes the previous stage's hidden state [B,S,H] instead of token ids and
    returns the hidden state before the final norm."""

    layer_cls = DecoderLayer  # a subclass model swaps in its own block here

    def __init__(self, cfg: Ernie4_5Config, runtime: RuntimeOptions):
        super().__init__()
        self.runtime = runtime
        # No padding_idx: id 0 (<unk>/pad) may be a real input token and must keep its gradient.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): self.layer_cls(cfg, runtime, i) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, position_ids=None, attn_mask_startend_row_indices=None):
        """input_ids [B,S] int64 (or, without an embedding, the hidden state [B,S,H]); position_ids [B,S]
        (default 0..S-1); indices int32 [B,1|Hkv,S,n] (FlashMask start/end rows per column; default
        plain causal). Returns hidden [B,S,H], the final norm applied when this module has it."""
        if self.embed_tokens is not None:
            x = self.embed_tokens(input_ids)
            shape_of = input_ids
        else:  # a later pipeline stage: under sequence parallelism x holds only this rank's tokens
            x = input_ids
            shape_of = position_ids if position_ids is not None else x[..., 0]
        inputs = build_attention_inputs(self.runtime.attention_mode, shape_of, position_ids,
                                        attn_mask_startend_row_indices)
        full = self.runtime.recomputes("full") and self.training
        for layer in self.layers.values():
            if full:
                x = _checkpoint(layer, x, inputs, reentrant=self.runtime.recompute_use_reentrant)
            else:
                x = layer(x, inputs)
        return self.norm(x) if self.norm is not None else x


class Ernie4_5ForCausalLM(nn.Module):
    """ERNIE 4.5 dense causal LM. `Ernie4_5ForCausalLM(cfg, **runtime)` gives fresh weights with
    std sqrt(0.3333/H) (§1.1); `from_pretrained(dir, dtype=None, **runtime)` loads a checkpoint."""

    model_cls = Ernie4_5Model  # a subclass model swaps in its own decoder here

    def __init__(self, config: Ernie4_5Config, **runtime):
        super().__init__()
        config.validate_dense()
        self.config = config
        self.runtime = RuntimeOptions(**runtime)
        self.model = self.model_cls(config, self.runtime)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        if not _on_meta(self):
            self.init_weights()

    def tie_weights(self) -> None:
        """With tie_word_embeddings the LM head and the embedding are one Parameter."""
        if self.config.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        std = math.sqrt(0.3333 / self.config.hidden_size)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input_ids, position_ids=None, attn_mask_startend_row_indices=None, labels=None):
        """input_ids [B,S]; labels [B,S] aligned to positions (-100 = no loss). Returns CausalLMOutput.

        A pipeline stage without the LM head (`lm_head` None) returns its hidden state [B,S,H] for
        the next stage instead; one without the embedding takes that hidden state as input_ids."""
        hidden = self.model(input_ids, position_ids, attn_mask_startend_row_indices)
        if self.lm_head is None:
            return hidden
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(hidden))
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(hidden.shape[:-1])}")
        return self.head_and_loss(hidden, labels)

    def head_and_loss(self, hidden, labels) -> CausalLMOutput:
        """LM head + mean fp32 CE over labelled positions, by the configured head variant (§12.2)."""
        rt = self.runtime
        logits = None
        if rt.use_sparse_head_and_loss_fn or rt.use_fused_head_and_loss_fn:
            h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
            if rt.use_sparse_head_and_loss_fn:  # only labelled tokens reach the head
                keep = (y != IGNORE_INDEX).nonzero().squeeze(-1)
                h, y = h.index_select(0, keep), y.index_select(0, keep)
            if rt.use_fused_head_and_loss_fn:  # casts to the autocast dtype itself, like the head matmul
                loss_sum, n = fused_head_ce(h, self.lm_head.weight, y, IGNORE_INDEX)
            else:
                loss_sum = F.cross_entropy(self.lm_head(h).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")
                n = (y != IGNORE_INDEX).sum()
        else:
            logits = self.lm_head(hidden)
            loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
            n = (labels != IGNORE_INDEX).sum()
        # No labelled token: loss 0 with zero gradients rather than NaN.
        loss = loss_sum.float() / n.clamp(min=1).to(torch.float32)
        return CausalLMOutput(loss=loss, logits=logits, num_label_tokens=n)

    # ---- training helpers ----------------------------------------------------------------------
    def set_dropout(self, hidden_p: float, attn_p: float) -> None:
        """Dropout rates for this step; layer l of L uses p * l / L, so layer 0 never drops (ERNIE's
        progressive dropout). L counts all layers of the model, also on a pipeline stage holding a few."""
        L = self.config.num_hidden_layers
        for layer in self.model.layers.values():
            scale = layer.layer_idx / L
            layer.set_dropout(float(hidden_p) * scale, float(attn_p) * scale)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 32, eos_token_id=None) -> list[int]:
        """Greedy decoding for one prompt [1,T]; returns the new token ids (the eos that stops it is
        not included). No KV cache: every step re-runs the whole sequence, so it is for tiny models
        and short demos only (cost grows with the square of the length)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"generate takes one prompt [1, T], got {tuple(input_ids.shape)}")
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos = set(eos) if isinstance(eos, (list, tuple, set)) else ({eos} if eos is not None else set())
        was_training = self.training
        self.eval()
        ids, new = input_ids, []
        try:
            for _ in range(max_new_tokens):
                hidden = self.model(ids)[:, -1]
                token = int(self.lm_head(hidden).argmax(-1)[0])
                if token in eos:
                    break
                new.append(token)
                ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        finally:
            self.train(was_training)
        return new

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- checkpoints (ernie_core/models/io.py) -------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=None, **runtime) -> "Ernie4_5ForCausalLM":
        from .io import load_pretrained

        return load_pretrained(path, dtype=dtype, **runtime)

    def save_pretrained(self, path, max_shard_size="5GB", dtype=None):
        """HF checkpoint dir (config.json, shards + index), written atomically; dtype None = as is."""
        from .io import save_pretrained

        return save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype)


def _on_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())
