"""
gpt.py: a GPT-2 in one file that reads top to bottom: the model, the training loop and the sampler.

The model is GPT-2 exactly (OpenAI's weights load into it and give the same logits as HF transformers),
plus a few switches a learner wants to try: sinusoidal or rotary positions, ReLU, untied embeddings.

Sections, in reading order:
    1. The model: attention (the plain computation, then the fused kernel), MLP, block, config, GPT
       (forward, generation with a KV cache, sampling filters, beam search, GPT-2 import and export)
"""
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# 1. The model
#
# Shapes in the comments: B = batch, T = time (tokens), C = channels (n_embd), nh = heads, hs = C // nh,
# V = vocabulary size.


@dataclass
class GPTConfig:
    block_size: int = 1024      # longest context the model sees (positions 0 .. block_size-1)
    vocab_size: int = 50257     # GPT-2's 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0        # 0 for pretraining big models; ~0.1 helps small models on little data
    bias: bool = True           # biases in Linear and LayerNorm layers, as GPT-2 has them
    pos_emb: str = "learned"    # learned (GPT-2) | sinusoidal (fixed, "Attention is all you need") | rope
    activation: str = "gelu"    # gelu (GPT-2's tanh approximation) | relu
    tie_weights: bool = True    # the output layer reuses the token embedding matrix (GPT-2 does)
    attention: str = "sdpa"     # sdpa (fused kernel) | manual (the same maths written out)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                             f"pick n_embd as a multiple of n_head")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, got n_embd/n_head = {self.n_embd // self.n_head}")
        choices = {"pos_emb": ("learned", "sinusoidal", "rope"), "activation": ("gelu", "relu"),
                   "attention": ("sdpa", "manual")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nn.LayerNorm cannot switch its bias off in older torch)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def rotary_tables(head_size: int, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary positions, each (n_positions, head_size // 2).

    Channel pair i of a head at position p is rotated by the angle p / 10000^(2i / head_size): the dot
    product of a rotated query and key then depends only on how far apart they are."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_size, 2).float() / head_size))
    angles = torch.outer(torch.arange(n_positions).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys; cos and sin are (T, hs // 2) for their positions."""
    x1, x2 = x.chunk(2, dim=-1)  # the two halves of each head form the (x1, x2) pairs that rotate
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def sinusoidal_table(n_positions: int, n_embd: int) -> torch.Tensor:
    """(n_positions, n_embd) fixed position codes: sin on even channels, cos on odd, wavelengths 2pi..10000*2pi."""
    position = torch.arange(n_positions).float().unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, n_embd, 2).float() * (-math.log(10000.0) / n_embd))
    table = torch.zeros(n_positions, n_embd)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: n_embd // 2])
    return table


class KVCache:
    """One layer's keys and values for the tokens seen so far, preallocated so generation never reallocates.

    k, v: (B, nh, capacity, hs); `length` is how many positions are filled."""

    def __init__(self, batch: int, n_head: int, capacity: int, head_size: int, device, dtype):
        self.k = torch.zeros(batch, n_head, capacity, head_size, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nh, T, hs) new keys and values; return all keys and values so far."""
        end = self.length + k.size(2)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (beam search continues the best beams, some of them twice)."""
        self.k, self.v = self.k[rows], self.v[rows]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.manual = config.attention == "manual"

    def forward(self, x: torch.Tensor, rotary=None, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # Split the channels into heads: each head attends on its own hs-wide slice.  (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.append(k, v)  # the new queries attend to every earlier key too: (B, nh, past+T, hs)
        dropout = self.dropout if self.training else 0.0
        y = (manual_attention if self.manual else fused_attention)(q, k, v, dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def causal_mask(t_query: int, t_key: int, device) -> torch.Tensor:
    """(t_query, t_key) booleans, True where query i may see key j. The queries are the LAST t_query of the
    t_key positions, so query i sits at position t_key - t_query + i and sees keys up to there."""
    return torch.ones(t_query, t_key, dtype=torch.bool, device=device).tril(diagonal=t_key - t_query)


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Attention written out. q: (B, nh, Tq, hs), k and v: (B, nh, Tk, hs) -> (B, nh, Tq, hs)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, Tq, Tk): how well each query matches each key
    scores = scores.masked_fill(~causal_mask(q.size(2), k.size(2), q.device), float("-inf"))  # no peeking ahead
    weights = F.softmax(scores, dim=-1)  # each row sums to 1 over the visible keys
    weights = F.dropout(weights, dropout) if dropout else weights
    return weights @ v  # a weighted average of the values


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """The same computation in one kernel (flash attention on CUDA): the (Tq, Tk) score matrix is never stored."""
    t_query, t_key = q.size(2), k.size(2)
    if t_query == t_key:  # training, or the prompt of a generation: the usual square causal mask
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    if t_query == 1:      # one new token during generation: it may see every cached key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    # is_causal aligns the mask top-left; queries that come after cached keys need it bottom-right.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t_query, t_key, q.device),
                                          dropout_p=dropout)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.relu = config.activation == "relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, 4C): widen, apply the nonlinearity, project back
        h = F.relu(h) if self.relu else F.gelu(h, approximate="tanh")  # GPT-2 used the tanh approximation
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x)).

    Normalising the input of each branch (not the sum) keeps the residual stream a clean sum of updates,
    which is what lets deep stacks train without warm-up tricks."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotary=None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token id -> vector
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        head_size = config.n_embd // config.n_head
        if config.pos_emb == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos_emb == "sinusoidal":
            self.register_buffer("sinusoidal", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        else:
            cos, sin = rotary_tables(head_size, config.block_size)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # One matrix both reads tokens in and scores them out: fewer parameters, and better small models.
            self.transformer.wte.weight = self.lm_head.weight

        # GPT-2's initialisation: N(0, 0.02) everywhere; the projections that write into the residual stream
        # get 0.02 / sqrt(2 * n_layer), so the stream's variance does not grow with depth (2 writes per block).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counting a tied matrix once. non_embedding drops the position table, as the scaling-law
        papers do (the token embedding stays: it doubles as the output layer)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_emb == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per parameter (2 forward, 4 backward) plus the
        attention scores and weighted sums, 12 * n_layer * n_embd * T (PaLM paper, appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * (seq_len or c.block_size)

    # -- forward --------------------------------------------------------------------------------------------

    def hidden_states(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) final hidden states. With caches, idx continues the cached tokens."""
        B, T = idx.size()
        start = caches[0].length if caches else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        rotary = None
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        elif self.config.pos_emb == "sinusoidal":
            x = x + self.sinusoidal[start:start + T]
        else:  # rope: positions enter inside attention, as rotations of the queries and keys
            rotary = (self.rotary_cos[start:start + T], self.rotary_sin[start:start + T])
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rotary, caches[i] if caches else None)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy against targets (B, T) if given."""
        logits = self.lm_head(self.hidden_states(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    # -- generation -----------------------------------------------------------------------------------------
    #
    # Without a cache, every new token re-runs the whole context: token n costs n positions of work, so the
    # text slows down as it grows. The KV cache keeps each layer's keys and values, so a new token costs
    # one position. While the text fits in block_size the cached result is the same computation; once
    # it outgrows block_size, the model must see only the last block_size tokens, with positions counted
    # from the window's start, and every cached value depended on tokens that have now left the window. So
    # from then on each token is computed from the window afresh, exactly as the no-cache sampler does.

    def new_caches(self, batch: int, capacity: int) -> list[KVCache]:
        c = self.config
        p = self.lm_head.weight
        return [KVCache(batch, c.n_head, capacity, c.n_embd // c.n_head, p.device, p.dtype) for _ in range(c.n_layer)]

    @torch.inference_mode()
    def next_token_logits(self, idx: torch.Tensor, caches: list[KVCache] | None) -> torch.Tensor:
        """Logits (B, V) for the token after idx; with caches, idx holds only the tokens not yet cached."""
        return self.lm_head(self.hidden_states(idx, caches)[:, -1, :])  # only the last position is needed

    @torch.inference_mode()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, stop_token: int | None = None,
                        generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
        """Yield (B,) new tokens, one step at a time, for the prompts idx (B, T).

        temperature 0 is greedy (argmax). Rows that produced stop_token keep yielding stop_token; the stream
        ends when every row has, or after max_new_tokens."""
        check_sampling(temperature, top_k, top_p)
        block = self.config.block_size
        idx = idx[:, -block:]
        caches = self.new_caches(idx.size(0), min(block, idx.size(1) + max_new_tokens)) if use_cache else None
        logits = self.next_token_logits(idx, caches)  # the prompt in one forward pass
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            next_token = sample_from_logits(logits, temperature, top_k, top_p, generator)  # (B,)
            if stop_token is not None:
                next_token = next_token.masked_fill(finished, stop_token)
                finished |= next_token == stop_token
            yield next_token
            if finished.all() or step == max_new_tokens - 1:
                return
            idx = torch.cat((idx, next_token[:, None]), dim=1)
            if caches and caches[0].length < block:
                logits = self.next_token_logits(idx[:, -1:], caches)  # one position of work
            else:  # no cache, or the text outgrew the context: recompute the last block_size tokens
                caches = None
                logits = self.next_token_logits(idx[:, -block:], None)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, stop_token: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Continue the prompts idx (B, T); returns (B, T + new tokens). See generate_stream for the options."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token, generator,
                                        use_cache))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)

    @torch.inference_mode()
    def beam_search(self, idx: torch.Tensor, max_new_tokens: int, beam_size: int, length_penalty: float = 1.0,
                    stop_token: int | None = None) -> torch.Tensor:
        """The most likely continuation of one prompt idx (1, T) that beam_size parallel hypotheses find.

        Each step extends every beam by every token and keeps the beam_size best by total log-probability.
        Finished hypotheses (those that produced stop_token, or all of them at the end) are ranked by
        log-probability / length ** length_penalty, so that longer texts are not punished merely for
        having more factors below 1. Returns (1, T + new tokens)."""
        if idx.size(0) != 1:
            raise ValueError(f"beam search continues one prompt, got a batch of {idx.size(0)}")
        if beam_size < 1:
            raise ValueError(f"beam={beam_size} must be at least 1")
        block = self.config.block_size
        prompt = idx[:, -block:]
        beams = prompt.new_empty(1, 0)                    # (n_beams, generated so far)
        scores = torch.zeros(1, device=idx.device)        # (n_beams,) summed log-probabilities
        caches = self.new_caches(1, min(block, prompt.size(1) + max_new_tokens))
        logits = self.next_token_logits(prompt, caches)
        finished: list[tuple[float, torch.Tensor]] = []   # (normalised score, tokens)
        for step in range(max_new_tokens):
            logprobs = scores[:, None] + F.log_softmax(logits.float(), dim=-1)  # (n_beams, V)
            top_scores, flat = logprobs.view(-1).topk(beam_size)
            rows, tokens = flat // logits.size(-1), flat % logits.size(-1)
            beams = torch.cat((beams[rows], tokens[:, None]), dim=1)
            scores = top_scores
            length = step + 1
            done = tokens == stop_token if stop_token is not None else torch.zeros_like(tokens, dtype=torch.bool)
            for i in done.nonzero().flatten().tolist():
                finished.append((scores[i].item() / length ** length_penalty, beams[i]))
            alive = (~done).nonzero().flatten()
            if len(alive) == 0 or step == max_new_tokens - 1:
                break
            beams, scores, rows = beams[alive], scores[alive], rows[alive]
            context = torch.cat((prompt.expand(len(alive), -1), beams), dim=1)
            if caches and caches[0].length < block:
                for cache in caches:
                    cache.reorder(rows)
                logits = self.next_token_logits(context[:, -1:], caches)
            else:
                caches = None
                logits = self.next_token_logits(context[:, -block:], None)
        for i in (~done).nonzero().flatten().tolist():  # the beams still alive at the end count as finished too
            finished.append((scores[i].item() / length ** length_penalty, beams[i]))
        best = max(finished, key=lambda pair: pair[0])[1]
        return torch.cat((idx, best[None]), dim=1)

    # -- GPT-2 checkpoints (Hugging Face layout) ------------------------------------------------------------
    #
    # HF's GPT-2 stores its linear layers as "Conv1D" modules whose weight is (in, out), the transpose of
    # nn.Linear's (out, in). Everything else has the same name and shape as here.

    HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    GPT2_SIZES = {  # model_type: (n_layer, n_head, n_embd)
        "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600),
    }

    @classmethod
    def from_gpt2(cls, model_type: str = "gpt2", gpt2_dir: str | os.PathLike | None = None) -> "GPT":
        """GPT-2 with OpenAI's weights, from a directory holding HF's model.safetensors (and config.json), or
        downloaded from the Hugging Face hub (openai-community/<model_type>) when no directory is given."""
        from safetensors.torch import load_file

        if gpt2_dir is None:
            if model_type not in cls.GPT2_SIZES:
                raise ValueError(f"unknown GPT-2 model {model_type!r}: use one of {', '.join(cls.GPT2_SIZES)}")
            from huggingface_hub import snapshot_download
            try:
                gpt2_dir = snapshot_download(f"openai-community/{model_type}",
                                             allow_patterns=["config.json", "model.safetensors"])
            except Exception as e:
                raise ValueError(f"could not download {model_type} from the Hugging Face hub ({type(e).__name__}); "
                                 f"download it elsewhere and pass --gpt2_dir=DIR") from None
        gpt2_dir = Path(gpt2_dir)
        weights_file = gpt2_dir / "model.safetensors"
        if not weights_file.is_file():
            raise FileNotFoundError(f"{weights_file} not found: --gpt2_dir must hold HF's model.safetensors")
        config_file = gpt2_dir / "config.json"
        if config_file.is_file():
            hf = json.loads(config_file.read_text())
            config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                               n_head=hf["n_head"], n_embd=hf["n_embd"])
        else:
            if model_type not in cls.GPT2_SIZES:
                raise ValueError(f"{gpt2_dir} has no config.json and {model_type!r} is not a GPT-2 size")
            n_layer, n_head, n_embd = cls.GPT2_SIZES[model_type]
            config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        try:
            hf_state = load_file(weights_file)
        except Exception as e:
            raise ValueError(f"{weights_file} is not a readable safetensors file ({e})") from None
        model = cls(config)
        model.load_state_dict(cls._from_hf_names(hf_state, model, weights_file))
        return model

    @classmethod
    def _from_hf_names(cls, hf_state: dict, model: "GPT", source: Path) -> dict:
        """HF's tensor names and layout -> ours; name every missing, extra or misshapen tensor."""
        ours = model.state_dict()
        state, problems = {}, []
        for name, tensor in hf_state.items():
            if name.endswith((".attn.bias", ".attn.masked_bias")):  # old checkpoints store the causal mask
                continue
            key = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
            if key.endswith(cls.HF_TRANSPOSED):
                tensor = tensor.t()
            if key not in ours:
                problems.append(f"unexpected {name}")
            elif tensor.shape != ours[key].shape:
                problems.append(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(ours[key].shape)}")
            else:
                state[key] = tensor
        state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))  # tied: HF may store it once
        problems += [f"missing {key}" for key in ours if state.get(key) is None]
        if problems:
            raise ValueError(f"{source} does not match a GPT-2 of this shape: {'; '.join(problems[:5])}"
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        return state

    def export_hf(self, out_dir: str | os.PathLike) -> None:
        """Write this model as a Hugging Face GPT-2 checkpoint: config.json + model.safetensors, loadable with
        transformers.GPT2LMHeadModel.from_pretrained(out_dir). Only GPT-2-shaped models have such a form."""
        from safetensors.torch import save_file

        c = self.config
        differences = [f"{name}={getattr(c, name)!r} (GPT-2 has {want!r})"
                       for name, want in (("pos_emb", "learned"), ("activation", "gelu"), ("tie_weights", True),
                                          ("bias", True)) if getattr(c, name) != want]
        if differences:
            raise ValueError(f"cannot export to HF GPT-2: {', '.join(differences)}")
        state = {}
        for key, tensor in self.state_dict().items():
            if key == "lm_head.weight":  # tied to wte; HF re-ties it on load
                continue
            tensor = tensor.detach().float().cpu()
            state[key] = (tensor.t() if key.endswith(self.HF_TRANSPOSED) else tensor).contiguous()
        hf_config = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
            "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
            "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "initializer_range": 0.02,
            "tie_word_embeddings": True, "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1,
        }
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(out_dir / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        write_atomically(out_dir / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2)))


# -- Sampling: turning logits into a token ----------------------------------------------------------------------
#
# The standard order: divide by the temperature (below 1 sharpens, above 1 flattens), keep the top_k most
# likely tokens, then keep the smallest set whose probabilities add up to top_p (the "nucleus"), renormalise
# and draw. Temperature 0 means greedy: always the most likely token.

def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf. (B, V) -> (B, V); ties with the k-th stay."""
    kth_largest = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[:, [-1]]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probabilities add up to at least p; -inf for the rest."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # A token is dropped when the tokens before it already reach p; the most likely token always stays.
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)


def write_atomically(path: Path, write) -> None:
    """Call write(temp_path) on a temp file beside path, then rename it over path: readers see the old file
    or the new one, never half of one (a crash or Ctrl-C mid-write leaves the old file intact)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
