"""
gpt.py: a GPT-2 in one file that reads top to bottom: the model, the training loop and the sampler.

The model is GPT-2 exactly (OpenAI's weights load into it and give the same logits as HF transformers),
plus a few switches a learner wants to try: sinusoidal or rotary positions, ReLU, untied embeddings, and
the changes behind the GPT-2 speedrun (RMSNorm, QK-norm, ReLU squared, a logit soft-cap, zero-initialised
projections, the Muon optimizer), each off by default.
The loop trains it on CUDA (one GPU, or many with torchrun), Apple's MPS or the CPU, and a stopped run
continues from its checkpoint exactly as if it had never stopped.

Run it (prepare_fineweb.py first writes the token shards it trains on; the README's recipes are tested
sets of flags, with the losses they reach):
    python gpt.py --data_dir=data/tinystories ...              # train: out/ckpt.pt, out/log.jsonl
    python gpt.py --init_from=resume                           # continue out/ckpt.pt (Ctrl-C saves it)
    python gpt.py --sample --ckpt=out/ckpt.pt --prompt="Once"  # stream a sample to stdout
    python gpt.py --sample --init_from=gpt2                    # OpenAI's GPT-2 (or gpt2-medium/-large/-xl)
    torchrun --standalone --nproc_per_node=8 gpt.py ...        # 8 GPUs (DDP); multi-node: torchrun's --nnodes
    python gpt.py --plot --ckpt=out/ckpt.pt                    # curves, attention, weights as PNGs in out/
    python gpt.py --plot --compare=out/a,out/b                 # several runs' curves on one figure
    python gpt.py --export_hf=DIR                              # the checkpoint as a Hugging Face GPT-2
    python gpt.py --eval=val --ckpt=out/best.pt                # loss on the whole val split (or hellaswag)
    python gpt.py --init_from=out/ckpt.pt --out_dir=out/sft ... # a new run from its weights (LoRA, chat)
    python gpt.py --chat --out_dir=out/sft                     # talk to a model tuned on --chat data
    python gpt.py --help                                       # every knob with its default and meaning

Part I, the lesson: stop at its end and you have read the whole program.
    1. Configuration: every knob a plain global, and the flag parser that overrides them
    2. The model: config, LayerNorm (or RMSNorm), positions, attention (written out, then the fused kernel),
       MLP, block, from logits to a token (temperature, top-k, top-p), the KV cache, GPT (init, forward,
       generation)
    3. Data: the shard format, and random windows read from it
    4. Training: device and precision, optimiser (AdamW, or Muon), schedule, evaluation, checkpoints, and
       the loop in steps (start, one optimizer step, evaluate and checkpoint, log)
    5. Sampling from the command line, and main
Part II, the workshop: what makes the lesson fast, safe, interoperable and visible.
    6. Beam search, on the same advance-or-recompute step as generation
    7. Devices and speed routes: choosing the device and precision, Linear's CPU route for generation,
       the chunked loss (and its soft-cap), padded vocabulary rows, Muon's state beside AdamW, MFU and the
       device's peak FLOPs, --bench
    8. Safety and resume plumbing: shards, meta.json, token ids and checkpoints checked before use,
       random-generator states, stopping on a signal, one run per out_dir, the run log, the console, and
       file-system errors as one line
    9. GPT-2 / Hugging Face: import, export, GPT-2's tokenizer
   10. Plots (one function per figure)
   11. Command-line conveniences: --help, the flag checks, --prompt
   12. Evaluation and workflow: the best weights kept (best.pt), early stopping, a checkpoint scored on a
       whole split, on any text or on HellaSwag, samples written to a file
   13. Post-training: a new run from any checkpoint, LoRA, instruction tuning and a terminal chat,
       distillation, DPO
"""
import codecs
import difflib
import errno
import inspect
import json
import math
import os
import re
import signal
import socket
import sys
import time
import warnings
from bisect import bisect_right
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Iterator, get_origin

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor  # for the loss op's signature, which torch.library reads
from torch.nn.parallel import DistributedDataParallel as DDP

from bpe import CHAT_END, CHAT_TOKENS, Tokenizer, load_tokenizer, write_atomically

# ==========================================================================================================
# Part I: the lesson
# ==========================================================================================================

# ----------------------------------------------------------------------------------------------------------
# 1. Configuration
#
# Every knob is a plain global below; `python gpt.py --batch_size=16` (or `--batch_size 16`) overrides one.
# Each is annotated Annotated[type, "what it does"], and --help prints those words: the parser reads them
# as data, never this file's text. A value must parse as its default's type (an int is fine for a float;
# bools take true/false/1/0, and a bare `--sample` means true), so a typo stops the run instead of training
# the wrong model. The defaults are GPT-2 124M; the README's recipes are small models that were run.

# I/O
out_dir: Annotated[str, "ckpt.pt, best.pt, log.jsonl (a JSON record per step and evaluation) go here"] = "out"
init_from: Annotated[str, "scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | PATH/ckpt.pt"] = \
    "scratch"
ckpt: Annotated[str, "checkpoint to resume, sample, score or export; empty: out_dir's (weights_path)"] = ""
gpt2_dir: Annotated[str, "HF's GPT-2 files (model.safetensors, merges.txt, vocab.json); empty: download"] = ""
eval_interval: Annotated[int, "evaluate every this many steps (and checkpoint, see below)"] = 250
eval_iters: Annotated[int, "batches per split in each evaluation"] = 20
log_interval: Annotated[int, "print a training line every this many steps (log.jsonl gets every step)"] = 1
always_save_checkpoint: Annotated[bool, "checkpoint at every evaluation, not only when val improves"] = False
early_stop: Annotated[int, "stop after this many evaluations in a row without a lower val loss; 0: off"] = 0
# data
data_dir: Annotated[str, "shards, meta.json and tokenizer.bpe from prepare_fineweb.py"] = "data/fineweb"
batch_size: Annotated[int, "sequences per micro-step in each process"] = 8
total_batch_tokens: Annotated[int, "tokens per optimizer step over all processes; 0: one micro-step"] = 0
# model (the vocabulary size comes from the data's meta.json)
n_layer: Annotated[int, "transformer blocks"] = 12
n_head: Annotated[int, "attention heads per block; must divide n_embd"] = 12
n_embd: Annotated[int, "channels of the residual stream"] = 768
block_size: Annotated[int, "context length in tokens"] = 1024
dropout: Annotated[float, "~0.1 for small models on little data; on a CPU it unfuses attention"] = 0.0
bias: Annotated[bool, "biases in Linear and LayerNorm layers, as in GPT-2"] = True
pos_emb: Annotated[str, "learned | sinusoidal | rope"] = "learned"
norm: Annotated[str, "layernorm (GPT-2) | rmsnorm (scale only: no mean subtracted, no shift)"] = "layernorm"
qk_norm: Annotated[bool, "scale each head's queries and keys to unit RMS before their dot product"] = False
activation: Annotated[str, "gelu | relu | relu2 (ReLU squared)"] = "gelu"
logit_softcap: Annotated[float, "output scores become cap * tanh(score / cap), within +-cap; 0: off"] = 0.0
zero_init_proj: Annotated[bool, "the projections that write into the residual stream start at 0"] = False
tie_weights: Annotated[bool, "the output layer shares the token embedding matrix"] = True
attention: Annotated[str, "sdpa (fused kernel) | manual (the same computation written out)"] = "sdpa"
# optimiser and schedule
learning_rate: Annotated[float, "peak learning rate, reached at the end of the warmup"] = 6e-4
min_lr: Annotated[float, "where the cosine decay ends (about learning_rate / 10)"] = 6e-5
warmup_steps: Annotated[int, "linear warmup from ~0, while Adam's moment estimates settle"] = 100
max_steps: Annotated[int, "optimizer steps to train for"] = 5000
lr_decay_steps: Annotated[int, "the cosine reaches min_lr here; 0: max_steps (set it to extend a run)"] = 0
weight_decay: Annotated[float, "AdamW decay of the 2-D weights; biases and norm gains get none"] = 0.1
beta1: Annotated[float, "AdamW's momentum"] = 0.9
beta2: Annotated[float, "AdamW's second-moment decay; < 0.999, so a large gradient spike fades fast"] = 0.95
grad_clip: Annotated[float, "clip the global gradient norm to this; 0 turns clipping off"] = 1.0
optimizer: Annotated[str, "adamw | muon (Muon for the blocks' matrices, AdamW for the rest)"] = "adamw"
muon_lr: Annotated[float, "Muon's peak learning rate; --learning_rate's warmup and cosine scale it"] = 0.02
# system
device: Annotated[str, "auto (cuda, then mps, then cpu) | cuda | cuda:N | mps | cpu"] = "auto"
dtype: Annotated[str, "auto (see setup_device) | float32 | bfloat16 | float16"] = "auto"
compile: Annotated[bool, "torch.compile (faster CUDA steps after compiling); ignored on MPS, Windows"] = False
peak_flops: Annotated[float, "peak FLOP/s for MFU; 0: the table of known GPUs, else a timed matmul"] = 0.0
seed: Annotated[int, "seeds the weights, the data order and the samples"] = 1337
# sampling, export and plotting
sample: Annotated[bool, "sample from --ckpt (or --init_from=gpt2...) instead of training"] = False
prompt: Annotated[str, "text to continue, or FILE:path; the default starts a new document"] = "<|endoftext|>"
num_samples: Annotated[int, "samples to draw; one sample streams to stdout as it is generated"] = 1
max_new_tokens: Annotated[int, "tokens to generate per sample"] = 200
temperature: Annotated[float, "below 1 sharpens the distribution, above 1 flattens it; 0 is greedy"] = 0.8
top_k: Annotated[int, "sample only from the k most likely tokens; 0 turns it off"] = 200
top_p: Annotated[float, "sample only from the most likely tokens holding this much probability; 1: off"] = 1.0
greedy: Annotated[bool, "always take the most likely token (the same as --temperature=0)"] = False
beam: Annotated[int, "beam search with this many beams (deterministic; one sample); 0 samples"] = 0
ignore_eot: Annotated[bool, "keep generating past <|endoftext|> instead of stopping there"] = False
output_file: Annotated[str, "write the samples here, each under its settings; sample i uses seed + i"] = ""
export_hf: Annotated[str, "write the checkpoint's model to this folder as a Hugging Face GPT-2 and exit"] = ""
plot: Annotated[bool, "write PNG plots of --ckpt's run beside it (curves, attention, weights); exit"] = False
compare: Annotated[str, "with --plot: run folders, comma-separated, whose curves share one figure"] = ""
bench: Annotated[bool, "time training steps of the model the flags describe on random tokens; exit"] = False
# evaluation
eval: Annotated[str, "val: score --ckpt on the whole val split of --data_dir | hellaswag; exit"] = ""
eval_text: Annotated[str, "score --ckpt on this UTF-8 text file: loss, perplexity, bits/byte; exit"] = ""
eval_stride: Annotated[int, "tokens scored per window after the first; 0: block_size // 2"] = 0
hellaswag_file: Annotated[str, "HellaSwag's val jsonl; empty: data/hellaswag_val.jsonl (downloaded)"] = ""
# post-training (the workshop, section 13)
lora_rank: Annotated[int, "train low-rank adapters of this rank, the base weights frozen; 0: off"] = 0
lora_alpha: Annotated[float, "the adapters' output is scaled by lora_alpha / lora_rank"] = 16.0
lora_targets: Annotated[str, "where adapters go: attention | mlp | both"] = "attention"
teacher: Annotated[str, "distil from this checkpoint (or gpt2...): its softened predictions in the loss"] = ""
distill_temperature: Annotated[float, "softens both distributions in the distillation term"] = 2.0
distill_weight: Annotated[float, "w: loss = (1 - w) * cross-entropy + w * T^2 * KL(teacher||student)"] = 0.5
dpo_data: Annotated[str, "DPO on this jsonl of {prompt, chosen, rejected}; reference: the start model"] = ""
dpo_beta: Annotated[float, "DPO's beta: how far from the reference model the policy may move"] = 0.1
chat: Annotated[bool, "a terminal chat with --ckpt (trained on prepare_fineweb.py --chat data)"] = False

KNOB_GROUPS = {"out_dir": "I/O", "data_dir": "data", "learning_rate": "optimiser and schedule",
               "n_layer": "model (the vocabulary size comes from the data's meta.json)", "device": "system",
               "sample": "sampling, export and plotting",
               "eval": "evaluation",
               "lora_rank": "post-training (the workshop, section 13)"}  # --help's headings, by first knob
MODEL_KNOBS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "pos_emb", "norm", "qk_norm",
               "activation", "logit_softcap", "zero_init_proj", "tie_weights", "attention")  # in GPTConfig
INIT_CHOICES = ("scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}


def config_knobs() -> list[tuple[str, str, str]]:
    """(group, name, comment) of every knob, in the order of the block above, read from its annotations."""
    knobs, group = [], ""
    for name, hint in inspect.get_annotations(sys.modules[__name__]).items():
        if get_origin(hint) is Annotated:
            group = KNOB_GROUPS.get(name, group)
            knobs.append((group, name, hint.__metadata__[0]))
    return knobs


class FlagError(ValueError):
    """A bad flag (unknown, mistyped, out of range, or at odds with another flag): main exits with 2 for it,
    as argparse does, and with 1 for a run that failed."""


def parse_value(name: str, text: str, default: bool | int | float | str) -> bool | int | float | str:
    """text converted to the type of the knob's default, or a FlagError that names the flag."""
    if isinstance(default, bool):
        if text.lower() not in BOOL_WORDS:
            raise FlagError(f"--{name} takes true/false/1/0, got {text!r}")
        return BOOL_WORDS[text.lower()]
    if isinstance(default, (int, float)):
        kind = type(default)
        try:
            return kind(text)
        except ValueError:
            expected = "an int" if kind is int else "a number"
            raise FlagError(f"--{name} takes {expected}, got {text!r}") from None
    return text


def parse_flags(argv: list[str]) -> dict:
    """Command-line flags -> {knob: typed value} for the knobs given. --help prints the knobs and exits."""
    defaults = {name: globals()[name] for _, name, _ in config_knobs()}
    overrides, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(help_text())  # the knobs, grouped, with defaults and comments: Part II, help_text
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise FlagError(f"unexpected argument {arg!r}: flags look like --key=value (see --help)")
        name, has_value, text = arg[2:].partition("=")
        if name not in defaults:
            close = ["--" + c for c in difflib.get_close_matches(name, defaults, n=3)]
            hint = f"did you mean {' or '.join(close)}?" if close else "see --help for the list"
            raise FlagError(f"unknown flag --{name}: {hint}")
        default = defaults[name]
        if not has_value:
            if isinstance(default, bool) and (i == len(argv) or argv[i].lower() not in BOOL_WORDS):
                text = "true"  # a bare --sample switches it on
            elif i < len(argv):
                text, i = argv[i], i + 1  # --key value
            else:
                raise FlagError(f"--{name} needs a value, e.g. --{name}={default}")
        overrides[name] = parse_value(name, text, default)
    return overrides


def make_config(overrides: dict, base: dict | None = None) -> SimpleNamespace:
    """The knobs' defaults, then base (a checkpoint's saved settings, when resuming), then the flags."""
    settings = {name: globals()[name] for _, name, _ in config_knobs()}
    settings.update({k: v for k, v in (base or {}).items() if k in settings})
    settings.update(overrides)
    cfg = SimpleNamespace(**settings)
    return check_config(cfg)  # the choices and ranges a type cannot say: Part II, check_config


# ----------------------------------------------------------------------------------------------------------
# 2. The model
#
# Shapes in the comments: B = batch, T = time (tokens), C = channels (n_embd), nh = heads, hs = head size
# = C // nh, V = vocabulary size. In GPT-2 124M: C = 768, nh = 12, so hs = 64 and nh * hs = C; V = 50257.


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
    norm: str = "layernorm"     # layernorm (GPT-2) | rmsnorm
    qk_norm: bool = False       # queries and keys normalised per head before attention
    activation: str = "gelu"    # gelu (GPT-2's tanh approximation) | relu | relu2 (ReLU squared)
    logit_softcap: float = 0.0  # output scores squashed into +-logit_softcap; 0: off (GPT-2)
    zero_init_proj: bool = False  # c_proj weights start at 0 (only the initialisation: GPT-2-shaped)
    tie_weights: bool = True    # the output layer reuses the token embedding matrix (GPT-2 does)
    attention: str = "sdpa"     # sdpa (fused kernel) | manual (the same maths written out)
    vocab_multiple: int = 64    # embedding and output rows padded to a multiple of this (see below)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output matrices: vocab_size rounded up to vocab_multiple. GPT-2's 50257
        is odd, and a matmul with an odd dimension misses the GPU's tensor-core tiles; 50304 fits them. The
        padding ids are never targets and never sampled: the real vocabulary decides what can be."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def __post_init__(self):
        check_model_config(self)  # sizes at least 1, n_head dividing n_embd, known choices: Part II



def model_config(cfg: SimpleNamespace, vocab_size: int) -> GPTConfig:
    """The model knobs as a GPTConfig (which checks them, e.g. that n_head divides n_embd)."""
    return GPTConfig(vocab_size=vocab_size, **{name: getattr(cfg, name) for name in MODEL_KNOBS})


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nn.LayerNorm cannot switch its bias off in older torch)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    """LayerNorm without its mean and shift: x / rms(x) * gain. Only the scale of the residual stream needs
    taming before a branch reads it; dropping the mean costs nothing in quality (Zhang & Sennrich, 2019),
    and one reduction fewer is a little faster. --norm=rmsnorm; modern models (Llama, nanochat) use it."""

    def __init__(self, ndim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, 1e-5)


def norm_layer(config: "GPTConfig") -> nn.Module:
    """The normalisation that --norm chooses, for the blocks and the final one."""
    return RMSNorm(config.n_embd) if config.norm == "rmsnorm" else LayerNorm(config.n_embd, config.bias)


# -- Positions: attention alone cannot tell where a token is, so its position is added or rotated in -------

def sinusoidal_table(n_positions: int, n_embd: int) -> torch.Tensor:
    """(n_positions, n_embd) fixed position codes: sin on even channels, cos on odd, wavelengths 2pi to
    10000 * 2pi, scaled to a std of 0.02."""
    position = torch.arange(n_positions).float().unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, n_embd, 2).float() * (-math.log(10000.0) / n_embd))
    table = torch.zeros(n_positions, n_embd)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: n_embd // 2])
    # sin and cos have a std of ~0.7, while token embeddings start at 0.02: added as they are, positions
    # would drown out the tokens (training stalls on the bigram plateau). So scale them to the 0.02 that a
    # learned position table starts with.
    return table * (0.02 / table.std())


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


# -- Attention: written out first, then the same through the fused kernel ----------------------------------

def causal_mask(t_query: int, t_key: int, device) -> torch.Tensor:
    """(t_query, t_key) booleans, True where query i may see key j.

    Subtle: the queries are the LAST t_query of the t_key positions (after cached keys, they continue the
    text), so query i sits at position t_key - t_query + i and sees keys up to there: the mask's diagonal
    runs into the bottom-right corner, not from the top-left."""
    return torch.ones(t_query, t_key, dtype=torch.bool, device=device).tril(diagonal=t_key - t_query)


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q: (B, nh, Tq, hs), k: (B, nh, Tk, hs) -> (B, nh, Tq, Tk): how much each query looks at each key."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # how well each query matches each key
    scores = scores.masked_fill(~causal_mask(q.size(2), k.size(2), q.device), float("-inf"))  # no peeking
    return F.softmax(scores, dim=-1)  # each row sums to 1 over the visible keys


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Attention written out. q: (B, nh, Tq, hs), k and v: (B, nh, Tk, hs) -> (B, nh, Tq, hs)."""
    weights = attention_weights(q, k)
    weights = F.dropout(weights, dropout) if dropout else weights
    return weights @ v  # a weighted average of the values


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """The same computation in one kernel (flash attention on CUDA): the (Tq, Tk) scores are never stored."""
    t_query, t_key = q.size(2), k.size(2)
    if t_query == t_key:  # training, or the prompt of a generation: the usual square causal mask
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    if t_query == 1:      # one new token during generation: it may see every cached key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    # Trap: is_causal aligns its mask top-left, but queries after cached keys need it bottom-right.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t_query, t_key, q.device),
                                          dropout_p=dropout)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        # Linear: nn.Linear, with a faster CPU route for a generation step's few rows (the workshop, Linear).
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.manual = config.attention == "manual"
        self.qk_norm = config.qk_norm

    def queries_keys_values(self, x: torch.Tensor, rotary=None) -> tuple[torch.Tensor, ...]:
        """(B, T, C) -> q, k, v, each (B, nh, T, hs): each head attends on its own hs-wide channel slice."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            # A score q.k / sqrt(hs) grows with the lengths of q and k; once scores are large the softmax is
            # one-hot and passes back almost no gradient, a way training stalls or diverges at high learning
            # rates. Unit-RMS queries and keys keep every score within +-sqrt(hs).
            q, k = F.rms_norm(q, (q.size(-1),), eps=1e-5), F.rms_norm(k, (k.size(-1),), eps=1e-5)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k, v

    def forward(self, x: torch.Tensor, rotary=None, cache: "KVCache | None" = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.queries_keys_values(x, rotary)
        if cache is not None:
            k, v = cache.append(k, v)  # the new queries attend to every earlier key too: (B, nh, past+T, hs)
        dropout = self.dropout if self.training else 0.0
        y = (manual_attention if self.manual else fused_attention)(q, k, v, dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, 4C): widen, apply the nonlinearity, project back
        if self.activation == "gelu":
            h = F.gelu(h, approximate="tanh")  # GPT-2 used the tanh approximation
        elif self.activation == "relu":
            h = F.relu(h)
        else:  # ReLU squared, found by the Primer paper's architecture search: as sparse as ReLU (most
            h = F.relu(h).square()  # units exactly 0) but smooth at 0; GPTs reach a lower loss than with GELU
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x)).

    Normalising the input of each branch (not the sum) keeps the residual stream a clean sum of updates,
    which is what lets deep stacks train without warm-up tricks."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotary=None, cache: "KVCache | None" = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary, cache)
        return x + self.mlp(self.ln_2(x))


# -- Decoding: from logits to a token ------------------------------------------------------------------------
#
# The standard order: divide by the temperature (below 1 sharpens, above 1 flattens), keep the top_k most
# likely tokens, then keep the smallest set whose probabilities add up to top_p (the "nucleus"), renormalise
# and draw. Temperature 0 means greedy: always the most likely token.

def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if not math.isfinite(temperature):  # nan would pass the test above; inf would sample uniformly
        raise ValueError(f"temperature={temperature} must be a finite number (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


def filter_top_p(sorted_logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probabilities add up to at least p; -inf for the rest.
    sorted_logits: (B, n) in descending order, as torch.topk and torch.sort return them."""
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens before it already reach p; the most likely token always stays.
    drop = (probs.cumsum(dim=-1) - probs) >= p
    return sorted_logits.masked_fill(drop, float("-inf"))


def sample_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids.

    With top_k, only the k candidates that torch.topk returns are softmaxed and drawn from, not all V
    logits: the same distribution, with k values to exponentiate instead of V."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)  # greedy
    logits = logits.float() / temperature
    token_ids = None  # None: the candidates are the whole vocabulary, in vocabulary order
    if top_k is not None and top_k < logits.size(-1):
        logits, token_ids = torch.topk(logits, top_k, dim=-1)  # (B, k), most likely first
    if top_p is not None and top_p < 1.0:
        if token_ids is None:
            logits, token_ids = torch.sort(logits, dim=-1, descending=True)
        logits = filter_top_p(logits, top_p)
    choice = torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)  # (B, 1)
    return (choice if token_ids is None else token_ids.gather(-1, choice)).squeeze(1)


# -- The KV cache, then the model --------------------------------------------------------------------------

class KVCache:
    """One layer's keys and values for the tokens seen so far, preallocated so generation never reallocates.

    Why a cache: without one, every new token re-runs the whole context, so token n costs n positions of
    work and the text slows down as it grows. But a causal model's keys and values for a position never
    change once computed (later tokens cannot reach back into them), so each layer keeps them here and a
    new token costs one position: its query attends to the cached keys. That holds while the text fits in
    block_size; what happens after is GPT.advance's business.

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


class GPT(nn.Module):
    """GPT-2: token embeddings (+ positions), n_layer blocks, a final LayerNorm, and the output layer that
    scores every token of the vocabulary.

    Initialisation, all of it (GPT-2's):
        parameter                                   distribution                      why
        transformer.wte (token embedding)           N(0, 0.02)                        small: a near-uniform
        transformer.wpe (learned positions)         N(0, 0.02)                          first prediction
        attn.c_attn, mlp.c_fc weights               N(0, 0.02)
        attn.c_proj, mlp.c_proj weights             N(0, 0.02 / sqrt(2 * n_layer))    see below (0 with
                                                                                      zero_init_proj)
        lm_head (the same matrix as wte if tied)    N(0, 0.02)
        their padding rows (padded_vocab_size)      0                                 never used
        every Linear bias                           0
        LayerNorm (RMSNorm) gains, shifts           1, 0
        sinusoidal and rotary tables                fixed buffers, not parameters
    c_proj writes into the residual stream, twice per block: scaling it by 1 / sqrt(2 * n_layer) keeps the
    stream's variance from growing with depth. zero_init_proj goes all the way: each block starts as x + 0,
    so the model starts shallow and grows its blocks' share as it learns (c_proj's gradient is not 0)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token id -> vector
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm_layer(config),
        ))
        if config.pos_emb == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos_emb == "sinusoidal":
            table = sinusoidal_table(config.block_size, config.n_embd)
            self.register_buffer("sinusoidal", table, persistent=False)
        else:
            cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size)  # (hs, positions)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        # Padding rows are added after construction, so the random numbers drawn for every other weight
        # are the same as in an unpadded model: the workshop, pad_rows.
        for module in (self.transformer.wte, self.lm_head):
            module.weight = nn.Parameter(pad_rows(module.weight.detach(), config.padded_vocab_size))
        self.transformer.wte.num_embeddings = self.lm_head.out_features = config.padded_vocab_size
        if config.tie_weights:
            # One matrix both reads tokens in and scores them out: fewer parameters, and better small models.
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)  # the table above
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") and config.zero_init_proj:
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            weight = module.weight
            if module is self.transformer.wte or module is self.lm_head:
                # Padding rows stay 0: never targeted nor sampled, they get no gradient. The real rows draw
                # the same random numbers as an unpadded matrix would.
                nn.init.zeros_(weight[self.config.vocab_size:])
                weight = weight[:self.config.vocab_size]
            nn.init.normal_(weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -- forward --------------------------------------------------------------------------------------------

    def hidden_states(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) final hidden states. With caches, idx continues the cached tokens."""
        B, T = idx.size()
        start = caches[0].length if caches else 0
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} tokens are longer than block_size={self.config.block_size}")
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
        """idx (B, T) -> (logits (B, T, V), None); with targets (B, T) -> (None, mean cross-entropy).

        Training needs only the loss, and the (B, T, V) logits are the largest tensor in the model, so
        with targets they are not returned. Targets of -1 are ignored."""
        x = self.hidden_states(idx)  # (B, T, C)
        if targets is None:
            return self.logits(x), None
        x, targets = x.view(-1, x.size(-1)), targets.reshape(-1)  # (B*T, C), (B*T,)
        # F.cross_entropy(self.logits(x), targets, ignore_index=-1), without ever holding the (B*T, V)
        # logits: the workshop, chunked_cross_entropy.
        return None, chunked_cross_entropy(x, output_rows(self, x.device), targets, self.config.vocab_size,
                                           self.config.logit_softcap)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states -> (..., V) scores of the real vocabulary (Part II: linear, output_rows).
        logit_softcap keeps every score within +-cap but small ones as they are (tanh(z) ~ z): the model
        cannot grow more confident by inflating its logits, a runaway that destabilises training (Gemma 2
        caps at 30). The loss applies the same cap."""
        logits = linear(x, output_rows(self, x.device))[..., :self.config.vocab_size]
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    # -- generation -----------------------------------------------------------------------------------------

    def new_caches(self, batch: int, capacity: int) -> list[KVCache]:
        """Empty caches, in the dtype keys and values are computed in (the autocast dtype, when it is on)."""
        c, device = self.config, self.lm_head.weight.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
            else self.lm_head.weight.dtype
        return [KVCache(batch, c.n_head, capacity, c.n_embd // c.n_head, device, dtype)
                for _ in range(c.n_layer)]

    @torch.inference_mode()
    def next_token_logits(self, idx: torch.Tensor, caches: list[KVCache] | None) -> torch.Tensor:
        """Logits (B, V) for the token after idx; with caches, idx holds only the tokens not yet cached."""
        return self.logits(self.hidden_states(idx, caches)[:, -1, :])  # only the last position is needed

    def advance(self, idx: torch.Tensor, caches: list[KVCache] | None) -> tuple[torch.Tensor, list | None]:
        """(logits (B, V) for the token after idx (B, T), the whole text so far; the caches to go on with).

        While the text fits in block_size, only its last token runs, against the cache. Once it outgrows
        block_size, the model must see only the last block_size tokens, with positions counted from the
        window's start, and every cached value depended on tokens that have now left the window: from then
        on each token is computed from the window afresh (caches None), exactly as without a cache."""
        block = self.config.block_size
        if caches and caches[0].length < block:
            return self.next_token_logits(idx[:, -1:], caches), caches  # one position of work
        return self.next_token_logits(idx[:, -block:], None), None

    @torch.inference_mode()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, stop_token: int | None = None,
                        generator: torch.Generator | None = None,
                        use_cache: bool = True) -> Iterator[torch.Tensor]:
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
            logits, caches = self.advance(idx, caches)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, stop_token: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Continue the prompts idx (B, T); returns (B, T + new tokens). Options: see generate_stream."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token,
                                        generator, use_cache))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)


# ----------------------------------------------------------------------------------------------------------
# 3. Data
#
# prepare_fineweb.py writes each split as shards in llm.c's format, and meta.json beside them:
#
#     header: 256 int32 (1024 bytes): [0] magic 20240520, [1] version 1, [2] token count N, the rest 0
#     body:   N uint16 token ids (so the file is exactly 1024 + 2 * N bytes)
#
#     meta.json: {"dataset", "tokenizer": "tokenizer.bpe", "vocab_size", "eot_id",
#                 "splits": {"train": {"shards": [...], "tokens", "documents", "bytes"}, "val": {...}}, ...}
#
# Documents are concatenated, each after an <|endoftext|>, so a training example is any window of
# block_size + 1 consecutive tokens: the first block_size are the input and the last block_size, shifted by
# one, the targets. Windows are drawn at random positions, so an epoch has no fixed order to resume.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_BYTES = 256 * 4


class TokenWindows:
    """Random windows of block_size + 1 tokens from one split's shards.

    Each window has a global id: shard 0's possible start positions first, then shard 1's, and so on, so a
    uniform id is a uniform position over the whole split. Reading a batch opens a fresh memmap of each
    shard it touches and drops it afterwards: a long-lived memmap keeps every page it ever read mapped and
    counted as the process's resident memory, which grows towards the size of the dataset."""

    def __init__(self, data_dir: Path, shard_names: list[str], block_size: int, split: str):
        self.block_size = block_size
        self.paths, self.token_counts, self.first_window = [], [], []
        total_windows = 0
        for name in shard_names:
            path = data_dir / name
            count = shard_token_count(path)  # the header, checked against the file: Part II
            if count > block_size:  # shards shorter than one window (a small last shard) hold no window
                self.paths.append(path)
                self.token_counts.append(count)
                self.first_window.append(total_windows)
                total_windows += count - block_size
        if not self.paths:
            raise ValueError(f"block_size={block_size} needs windows of {block_size + 1} tokens but every "
                             f"{split} shard in {data_dir} is shorter: lower --block_size or prepare more "
                             f"data")
        self.num_windows = total_windows

    def draw(self, generator: torch.Generator, num_batches: int, batch_size: int) -> torch.Tensor:
        """(num_batches, batch_size) random window ids: the data order's only randomness is generator's."""
        return torch.randint(self.num_windows, (num_batches, batch_size), generator=generator)

    def read(self, window_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) window ids -> inputs x and targets y, each (B, T) int64 on device."""
        maps, rows = {}, []
        for window in window_ids.tolist():
            shard = bisect_right(self.first_window, window) - 1
            if shard not in maps:
                maps[shard] = np.memmap(self.paths[shard], dtype=np.uint16, mode="r", offset=HEADER_BYTES,
                                        shape=(self.token_counts[shard],))
            start = window - self.first_window[shard]
            rows.append(maps[shard][start:start + self.block_size + 1])
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1), copied out of the maps
        del maps, rows  # unmap the shards
        if device.type == "cuda":  # pinned memory lets the copy to the GPU run while the CPU goes on
            batch = batch.pin_memory().to(device, non_blocking=True)
        else:
            batch = batch.to(device)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def tokenizer_from_text(text: str) -> Tokenizer:
    """A bpe.Tokenizer from its saved text (Tokenizer.dumps), as checkpoints carry it."""
    return Tokenizer.loads(text)


# ----------------------------------------------------------------------------------------------------------
# 4. Training
#
# Device and precision, the optimiser, the learning-rate schedule, evaluation, checkpoints, then the loop.


@dataclass
class Runtime:
    """Where the model runs and in what precision: decided once, for everything else, by setup_device
    (Part II): the fastest device there is, and bfloat16 autocast where the hardware has it, float16 plus
    a GradScaler on CUDA GPUs without it, float32 on CPUs."""
    device: torch.device
    autocast_dtype: torch.dtype    # float32 means no autocast
    scaler: torch.amp.GradScaler   # enabled only for float16, whose narrow range needs the loss scaled up
    compile: bool                  # whether torch.compile is used
    fused_adamw: bool              # AdamW's fused kernel (CUDA): one launch for all parameters
    why: str = ""                  # why this precision, for the start-up line

    def autocast(self):
        """Matmuls in bfloat16/float16, reductions (softmax, norms, the loss) kept in float32."""
        if self.autocast_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def make_optimizer(model: GPT, cfg: SimpleNamespace, runtime: Runtime) -> torch.optim.Optimizer:
    """AdamW with weight decay on the 2-D weights only; with --optimizer=muon, Muon (below) takes the
    matrices inside the blocks and AdamW the rest: embeddings, the output layer, gains and biases.

    Decay pulls weights towards zero; it regularises the matmuls and embeddings, while biases and
    LayerNorm gains (1-D) are few, and pulling a gain towards 0 would just fight the normalisation."""
    muon = cfg.optimizer == "muon"
    matrices = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2 and muon}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in matrices]  # tied: once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                              fused=True if runtime.fused_adamw else None)
    # Muon's momentum state and AdamW's, stepped and saved as one optimizer: the workshop, MuonWithAdamW
    return MuonWithAdamW(model, adamw, cfg.muon_lr) if muon else adamw


# Muon (Keller Jordan, 2024; the optimizer of the GPT-2 speedrun records). A weight matrix's gradient, and
# its momentum, is dominated by a few directions: its singular values fall off steeply, so a step along it
# mostly grows what is already large. Muon replaces the update G = U S V^T by U V^T: the same directions,
# each at strength 1, so the rare ones learn as fast as the common ones. An SVD per step would be slow; a
# few Newton-Schulz iterations (matmuls only) come close enough. Embedding and output rows are tokens,
# updated as they occur, and 1-D gains and biases have no directions: those stay with AdamW. Muon's
# momentum is Nesterov's, warmed up from 0.85 to 0.95 over the first 300 steps, and each update is scaled
# by sqrt(max(1, rows / cols)) so that its RMS matches across shapes: the workshop, Muon. In recipe 1 it
# lowers the val loss more than any other switch here, in the same steps (the README's ablation).

def orthogonalize(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """(..., rows, cols) -> about U V^T, where U S V^T is its SVD: singular values near 1, vectors kept.

    Dividing by the Frobenius norm puts every singular value s in (0, 1]; each iteration then maps s to
    a s + b s^3 + c s^5 and keeps the singular vectors. These coefficients make the map steep at 0 (slope
    3.4), so in 5 steps every value above 1/500 of the norm ends between 0.68 and 1.21: near 1, not at it,
    which trains as well (what matters is that no direction dominates), in far fewer steps."""
    x = update.float()
    tall = x.size(-2) > x.size(-1)
    x = x.mT if tall else x  # then x @ x.mT is the smaller of the two Gram matrices
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(update.dtype)


def learning_rate_at(step: int, cfg: SimpleNamespace) -> float:
    """Linear warmup to learning_rate over warmup_steps, then a cosine down to min_lr at lr_decay_steps."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / (decay_steps - cfg.warmup_steps)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def evaluate(model: torch.nn.Module, splits: dict[str, TokenWindows], cfg: SimpleNamespace, runtime: Runtime,
             rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split.

    The batches come from a generator seeded afresh each time, so every evaluation sees the same windows
    and two evaluations differ only because the model did. With W processes, process r evaluates batches
    r, r + W, r + 2W, ...: the same batches as one process would, in a W-th of the time."""
    model.eval()
    losses = {}
    for split, windows in splits.items():
        batches = windows.draw(torch.Generator().manual_seed(cfg.seed), cfg.eval_iters, cfg.batch_size)
        total = torch.zeros((), device=runtime.device)
        for i in range(rank, cfg.eval_iters, world_size):
            x, y = windows.read(batches[i], runtime.device)
            with runtime.autocast():
                _, loss = model(x, y)
            total += loss.float()
        if world_size > 1:
            dist.all_reduce(total)
        losses[split] = total.item() / cfg.eval_iters
    model.train()
    return losses


# -- Checkpoints ---------------------------------------------------------------------------------------------
#
# One dict holds everything a run needs to continue exactly where it stopped, and nothing but tensors,
# dicts, lists, strings and numbers, so torch.load(..., weights_only=True) can read it without running any
# code from the file:
#     model, optimizer, scaler    state_dicts (the model's taken from the module as built: never a compiled
#                                 or DDP wrapper, whose keys would carry "_orig_mod." or "module.")
#     step, best_val_loss         steps done so far; the best evaluation loss so far
#     best_step, evals_since_best the best evaluation's step; evaluations since then (for --early_stop)
#     config, model_config        every knob of the run; the GPTConfig fields
#     tokenizer                   the tokenizer as text (Tokenizer.dumps), so sampling needs no other file
#     rng                         the data generator's state (the position in the data) and each process's
#                                 torch / CUDA / MPS generator states (dropout)
#     lora                        a LoRA run's only: the adapters' rank, alpha, targets and the base whose
#                                 frozen weights they adapt (model then holds only the adapters)
#
# When: at an evaluation whose val loss is the best so far (every evaluation with always_save_checkpoint;
# never at step 0, which has learned nothing), at the end of the run and when Ctrl-C stops it, so that
# every run can be continued. A run that stops on a non-finite loss writes nothing: the last good
# checkpoint stays. The best evaluation's weights are never lost: before ckpt.pt moves on from them,
# they go to best.pt (the weights and what sampling needs, no optimizer), which sampling then prefers.

def checkpoint_path(cfg: SimpleNamespace) -> Path:
    return Path(cfg.ckpt) if cfg.ckpt else Path(cfg.out_dir) / "ckpt.pt"


def training_state(model: GPT, optimizer: torch.optim.Optimizer, runtime: Runtime, step: int,
                   best_val_loss: float, cfg: SimpleNamespace, tokenizer_text: str,
                   data_generator: torch.Generator, world_size: int = 1) -> dict:
    """Everything a run needs to continue exactly, as one dict. With several processes every one of them
    must call this: their RNG states are gathered into the list."""
    states = [rng_states(runtime.device)]  # this process's dropout generators: Part II, rng_states
    if world_size > 1:
        states = [None] * world_size
        dist.all_gather_object(states, rng_states(runtime.device))
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": runtime.scaler.state_dict(), "step": step, "best_val_loss": best_val_loss,
            "config": dict(vars(cfg)), "model_config": asdict(model.config), "tokenizer": tokenizer_text,
            "rng": {"data": data_generator.get_state(), "processes": states}}


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Write atomically: a crash or Ctrl-C during the write leaves the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda tmp: torch_save(checkpoint, tmp))  # atomic; a full disk in one line: Part II


# -- The training loop, in steps ----------------------------------------------------------------------------

def build_model(cfg: SimpleNamespace, overrides: dict, meta: dict,
                checkpoint: dict | None) -> tuple[GPT, str]:
    """The model to train and its tokenizer's text: the checkpoint's, GPT-2's weights, or a new model."""
    if checkpoint is not None:
        # GPT(its model_config) with its weights, or one clear error: the workshop, model_from_checkpoint
        model = model_from_checkpoint(checkpoint, checkpoint_path(cfg), dropout=cfg.dropout)
        # model flags that contradict the loaded weights are refused: the workshop, check_architecture
        check_architecture(model.config, overrides, str(checkpoint_path(cfg)))
        return model, checkpoint["tokenizer"]
    tokenizer_text = (Path(cfg.data_dir) / meta["tokenizer"]).read_text(encoding="utf-8")
    if cfg.init_from == "scratch":
        return GPT(model_config(cfg, vocab_size=int(meta["vocab_size"]))), tokenizer_text
    if cfg.init_from.endswith(".pt"):  # a checkpoint's weights, a new run: the workshop, fine_tune_from
        return fine_tune_from(cfg, overrides, tokenizer_text)
    # Fine-tuning GPT-2 (with a lower --learning_rate), on data tokenized with GPT-2's tokenizer; OpenAI's
    # weights come in through the workshop's from_gpt2.
    model = from_gpt2(cfg.init_from, cfg.gpt2_dir or None)
    check_architecture(model.config, overrides, cfg.init_from)
    if cfg.dropout != model.config.dropout:  # dropout has no weights: rebuild with it and copy them over
        weights = model.state_dict()
        model = GPT(replace(model.config, dropout=cfg.dropout))
        model.load_state_dict(weights)
    model = fit_gpt2_vocabulary(model, cfg, meta, tokenizer_text)  # chat tokens' rows: the workshop, sec. 13
    return model, tokenizer_text


def micro_steps(cfg: SimpleNamespace, world_size: int) -> tuple[int, int]:
    """(micro-steps per optimizer step, tokens per step). Each process runs batch_size * block_size tokens
    at a time and adds up gradients until the step has seen total_batch_tokens."""
    tokens_per_micro_step = cfg.batch_size * cfg.block_size * world_size
    tokens_per_step = cfg.total_batch_tokens or tokens_per_micro_step
    if tokens_per_step % tokens_per_micro_step:
        raise ValueError(f"--total_batch_tokens={tokens_per_step} is not a multiple of batch_size * "
                         f"block_size * processes = {tokens_per_micro_step}: change one of them")
    return tokens_per_step // tokens_per_micro_step, tokens_per_step


@dataclass
class Run:
    """One process's training: what start_run builds, and the three numbers the loop moves forward."""
    cfg: SimpleNamespace
    runtime: Runtime
    rank: int                          # this process; 0 prints, logs and writes checkpoints
    world_size: int
    meta: dict                         # the data's meta.json
    model: GPT                         # as built: its state_dict is what a checkpoint holds
    fast_model: nn.Module              # the same model, compiled when --compile: evaluation runs it
    train_model: nn.Module             # fast_model, wrapped in DDP with several processes: training runs it
    optimizer: torch.optim.Optimizer
    tokenizer: Tokenizer               # for the sample printed at each evaluation
    tokenizer_text: str                # the same, as the text a checkpoint carries
    windows: dict[str, TokenWindows]   # "train" and "val"
    data_generator: torch.Generator    # the order of training windows; its state is the position in the data
    accumulation_steps: int            # micro-steps per optimizer step
    tokens_per_step: int
    flops_per_token: float             # training FLOPs per token, and the device's peak FLOP/s: for MFU
    peak_flops: float
    post: "PostTraining"               # distillation's teacher, DPO's reference: the workshop, section 13
    step: int = 0                      # optimizer steps done
    best_val_loss: float = math.inf
    saved_step: int = -1               # the step the checkpoint on disk holds (-1: none yet)
    best_step: int = -1                # the step of the best evaluation so far
    evals_since_best: int = 0          # evaluations since then that did not improve on it (--early_stop)


def start_run(cfg: SimpleNamespace, overrides: dict, checkpoint: dict | None, runtime: Runtime, rank: int,
              world_size: int) -> Run:
    """Build the model, data and optimiser, or restore them from the checkpoint: everything but the loop."""
    device, data_dir = runtime.device, Path(cfg.data_dir)
    meta = load_meta(data_dir) if not cfg.dpo_data else dpo_meta(cfg)  # DPO's pairs: no shards (section 13)
    # The data before the model: a --block_size the shards cannot fill is refused before it is allocated.
    windows = {split: TokenWindows(data_dir, meta["splits"][split]["shards"], cfg.block_size, split)
               for split in ("train", "val") if not cfg.dpo_data}
    # Chat shards with a loss mask, or DPO's preference pairs, read the same way: the workshop, section 13
    windows = post_training_windows(cfg, meta, data_dir, windows)
    # torch.manual_seed first, so every process builds the same initial weights (DDP also copies process
    # 0's to the others).
    torch.manual_seed(cfg.seed)
    with out_of_memory_as_one_line(cfg):  # a model too large for the memory: Part II
        model, tokenizer_text = build_model(cfg, overrides, meta, checkpoint)
    check_model_fits_data(model, meta, cfg)  # vocabulary, context, every token id: Part II
    model = add_lora(model, cfg, checkpoint)  # --lora_rank: adapters on frozen weights (the workshop)
    model.to(device)
    accumulation_steps, tokens_per_step = micro_steps(cfg, world_size)
    optimizer = make_optimizer(model, cfg, runtime)
    data_generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + rank)  # each process its own dropout masks
    # MFU's numerator and denominator: the workshop, flops_per_token and peak_flops_per_second. Trap: a timed
    # peak draws its matrix from dropout's generator, so it must come before a resume restores that generator.
    flops, peak_flops = flops_per_token(model, cfg.block_size), peak_flops_per_second(runtime, cfg.peak_flops)
    step, best_val_loss, saved_step, best = 0, math.inf, -1, (-1, 0)  # best: best_step, evals_since_best
    if checkpoint is not None:
        # the optimizer, scaler and random generators as they were: the workshop, restore_training_state
        step, best_val_loss, *best = restore_training_state(checkpoint, optimizer, runtime, data_generator,
                                                            rank)
        saved_step = step
        checkpoint.clear()  # free the CPU copy of the weights and optimizer state (train() holds this dict)
    fast_model = torch.compile(model) if runtime.compile else model
    train_model = fast_model
    if world_size > 1:
        # DDP averages gradients across processes. broadcast_buffers=False: the only buffers are the
        # position tables, the same in every process, so there is nothing to copy before each forward.
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          broadcast_buffers=False)
        if runtime.compile:
            # Compile the DDP wrapper, not the other way round: compile then cuts the graph at DDP's
            # gradient buckets, so each bucket's all-reduce runs while the rest of backward goes on.
            train_model = torch.compile(train_model)
    run = Run(cfg, runtime, rank, world_size, meta, model, fast_model, train_model, optimizer,
              tokenizer_from_text(tokenizer_text), tokenizer_text, windows, data_generator,
              accumulation_steps, tokens_per_step, flops, peak_flops,
              start_post_training(cfg, model, runtime, tokenizer_text), step, best_val_loss, saved_step,
              *best)
    if rank == 0:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        print_start(run)  # the model, the device, the step's tokens, the data: Part II
    return run


def forward_backward(run: Run, windows: torch.Tensor) -> torch.Tensor:
    """Gradients of one optimizer step, summed over its micro-steps; returns this process's mean loss."""
    device, world_size, ddp = run.runtime.device, run.world_size, run.world_size > 1
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(run.accumulation_steps):
        x, y = run.windows["train"].read(windows[micro_step * world_size + run.rank], device)
        # DDP averages gradients across processes during backward(). Only the last micro-step needs that;
        # no_sync() skips it for the others and must cover their forward as well as backward.
        last = micro_step == run.accumulation_steps - 1
        with run.train_model.no_sync() if ddp and not last else nullcontext():
            with run.runtime.autocast():
                loss = training_loss(run, x, y)  # the model's loss (or distillation's, DPO's: the workshop)
            loss = loss / run.accumulation_steps  # gradients add up over micro-steps: this makes them a mean
            run.runtime.scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
    return loss_sum


def optimizer_step(run: Run, stop: "StopOnSignal") -> dict:
    """One optimizer step; returns its record for the log.

    All windows of the step (every micro-step of every process) come from one draw of the data generator;
    process r's micro-step m takes row m * W + r, so 1 process with 2 micro-steps sees exactly the windows
    of 2 processes with 1, and a resumed run the same as a straight one."""
    cfg, runtime, optimizer, device = run.cfg, run.runtime, run.optimizer, run.runtime.device
    t0 = time.perf_counter()
    lr = learning_rate_at(run.step, cfg)
    for group in optimizer.param_groups:  # Muon's groups take the same schedule, scaled to --muon_lr
        group["lr"] = lr * cfg.muon_lr / cfg.learning_rate if group.get("muon") and lr else lr
    windows = run.windows["train"].draw(run.data_generator, run.accumulation_steps * run.world_size,
                                        cfg.batch_size)
    loss_sum = forward_backward(run, windows)
    runtime.scaler.unscale_(optimizer)  # clip the true gradients, not the float16-scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or math.inf)
    # One all-reduce carries the step's loss for the log, and whether any process was asked to stop (the
    # processes decide together: the workshop, StopOnSignal). One read brings them and the gradient norm
    # to the CPU: the step's only wait for the GPU.
    stats = torch.stack([loss_sum, torch.tensor(float(stop.requested), device=device)])
    if run.world_size > 1:
        dist.all_reduce(stats)
    loss_total, stop_votes, grad_norm = torch.cat((stats, grad_norm.float()[None])).tolist()
    train_loss, stop.agreed = loss_total / run.world_size, stop_votes > 0
    check_loss_is_finite(run, train_loss, run.step + 1)  # never step on a NaN: Part II
    runtime.scaler.step(optimizer)  # skips the step if float16 gradients overflowed
    runtime.scaler.update()
    optimizer.zero_grad(set_to_none=True)  # free the gradients' memory until the next backward
    run.step += 1
    step_time = time.perf_counter() - t0
    tokens_per_second = run.tokens_per_step / step_time
    mfu = run.flops_per_token * tokens_per_second / (run.peak_flops * run.world_size)
    return {"kind": "train", "step": run.step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
            "ms": step_time * 1000, "tokens_per_s": tokens_per_second, "mfu": mfu}


def save_run(run: Run) -> None:
    """Checkpoint where the run stands. Every process gathers its state (DDP needs them all); 0 writes."""
    state = training_state(run.model, run.optimizer, run.runtime, run.step, run.best_val_loss, run.cfg,
                           run.tokenizer_text, run.data_generator, run.world_size)
    state.update(best_step=run.best_step, evals_since_best=run.evals_since_best)
    state = lora_checkpoint(run.model, state)  # a LoRA run keeps only its adapters: the workshop, section 13
    if run.rank == 0:
        path = Path(run.cfg.out_dir) / "ckpt.pt"
        keep_best_weights(run, path, state)  # to best.pt, if ckpt.pt holds them and moves on: Part II
        save_checkpoint(path, state)
        print(f"saved {path} at step {run.step}")
    run.saved_step = run.step


def evaluate_and_checkpoint(run: Run, log: "RunLog") -> None:
    """Evaluate both splits, report, and checkpoint when the val loss improved (or always, if asked)."""
    cfg, device = run.cfg, run.runtime.device
    # the model's cross-entropy, or for DPO the pairs' preference loss: the workshop, evaluated_model
    losses = evaluate(evaluated_model(run), run.windows, cfg, run.runtime, run.rank, run.world_size)
    check_loss_is_finite(run, sum(losses.values()), run.step, " (evaluation)")  # before sampling from it
    record = {"kind": "eval", "step": run.step, "train_loss": losses["train"], "val_loss": losses["val"],
              "val_perplexity": math.exp(min(losses["val"], 50.0))}
    val = run.meta["splits"]["val"]
    val_tokens, val_bytes = val.get("tokens", 0), val.get("bytes", 0)
    if val_bytes and "masks" not in val:  # bits per byte of text (chat data's loss covers answers only)
        record["val_bits_per_byte"] = losses["val"] / math.log(2) * val_tokens / val_bytes
    if device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    record.update(post_training_metrics(run))  # DPO's reward margin and accuracy: the workshop, section 13
    improved = losses["val"] < run.best_val_loss
    if improved:
        run.best_val_loss, run.best_step = losses["val"], run.step
    run.evals_since_best = 0 if improved else run.evals_since_best + 1
    if cfg.early_stop:
        record["evals_without_improvement"] = run.evals_since_best
    print_eval(run, record)  # the losses and a short sample of the model's text: Part II, print_eval
    log.write(record)
    if run.step > 0 and (improved or cfg.always_save_checkpoint):  # nothing to keep before step 1
        save_run(run)


def train_loop(cfg: SimpleNamespace, overrides: dict, checkpoint: dict | None, runtime: Runtime, rank: int,
               world_size: int) -> None:
    """One process's training: start (or restore) the run, then step, evaluating and checkpointing."""
    resumed = checkpoint is not None
    run = start_run(cfg, overrides, checkpoint, runtime, rank, world_size)
    # log.jsonl (cut back to the checkpoint on resume) and Ctrl-C: the workshop, RunLog and StopOnSignal
    log_path = Path(cfg.out_dir) / "log.jsonl"
    with RunLog(log_path, rank == 0, run.step if resumed else None) as log, StopOnSignal(rank == 0) as stop:
        # ---- TRAINING SECTION BEGIN
        while True:
            # Evaluate every eval_interval steps and at the end, except where the checkpoint on disk was
            # written right after this step's evaluation (a resumed run starts there).
            due = run.step % cfg.eval_interval == 0 or run.step == cfg.max_steps
            if due and run.step != run.saved_step:
                evaluate_and_checkpoint(run, log)
            # --early_stop: evaluations without a better val loss, resumes too (the workshop, stops_early)
            if run.step >= cfg.max_steps or stop.agreed or stops_early(run, log):
                break
            record = optimizer_step(run, stop)
            log.write(record)
            print_step(run, record)  # Part II, print_step
        # ---- TRAINING SECTION END
        if run.saved_step != run.step:  # the end of the run, or Ctrl-C: save, so that it can be continued
            save_run(run)
        if stop.agreed and run.step < cfg.max_steps:
            raise TrainingStopped(f"stopped at step {run.step}")  # saved: main exits 130 (Part II)


def train(overrides: dict) -> None:
    """Train (or continue training) the model the flags describe; see the docstring for the commands."""
    cfg = make_config(overrides)
    checkpoint = None
    if cfg.init_from == "resume":
        # The run continues with its own saved settings; flags given now still win (e.g. a larger max_steps).
        checkpoint = load_checkpoint(checkpoint_path(cfg))  # torch.load, checked: Part II, load_checkpoint
        check_resumable(checkpoint, checkpoint_path(cfg))  # optimizer and RNG states there: Part II
        cfg = make_config(overrides, base=checkpoint["config"])
    elif cfg.init_from.endswith(".pt"):  # a new run from a checkpoint's weights: the workshop, section 13
        cfg = make_config(overrides, base=model_knobs_of(Path(cfg.init_from)))

    # torchrun starts one process per GPU (or per CPU slot) and tells each its place in these variables.
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_schedule(cfg, print_warnings=rank == 0)  # --min_lr above --learning_rate, and such: Part II
    runtime = setup_device(cfg.device, cfg.dtype, local_rank, cfg.compile)  # Part II, setup_device
    ddp = world_size > 1
    if ddp:  # NCCL moves CUDA tensors between GPUs; gloo is the CPU backend
        if runtime.device.type == "mps":
            raise ValueError("torchrun with MPS is not supported: run one process on a Mac")
        dist.init_process_group("nccl" if runtime.device.type == "cuda" else "gloo")
    try:
        with OutDirLock(Path(cfg.out_dir), enabled=rank == 0):  # one run per out_dir: Part II, OutDirLock
            train_loop(cfg, overrides, checkpoint, runtime, rank, world_size)
        if ddp:  # wait for rank 0's last checkpoint: a process group torn down while a peer works can abort
            dist.barrier()
    finally:
        if ddp:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# 5. Sampling from the command line, and main

def load_for_sampling(cfg: SimpleNamespace, device: torch.device) -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from --init_from=gpt2... or from the checkpoint (which carries its tokenizer)."""
    if cfg.init_from.startswith("gpt2"):  # OpenAI's weights and tokenizer: Part II, from_gpt2, gpt2_tokenizer
        model, tokenizer = from_gpt2(cfg.init_from, cfg.gpt2_dir or None), gpt2_tokenizer(cfg.gpt2_dir)
    else:
        path = weights_path(cfg)  # --ckpt, else best.pt if there is one, else ckpt.pt: Part II
        checkpoint = load_checkpoint(path)  # Part II, load_checkpoint
        say_which_weights(cfg, path, checkpoint)  # Part II
        model = model_from_checkpoint(checkpoint, path)  # Part II, model_from_checkpoint
        tokenizer = tokenizer_from_text(checkpoint["tokenizer"])
    return model.to(device).eval(), tokenizer


def decode_until(ids: list[int], tokenizer: Tokenizer, stop_token: int | None) -> str:
    """Text of ids up to (not including) the first stop_token."""
    return tokenizer.decode(ids[:ids.index(stop_token)] if stop_token in ids else ids)


def run_sampling(cfg: SimpleNamespace, overrides: dict) -> None:
    """Print num_samples continuations of the prompt; a single sample streams token by token."""
    check_sampling_flags(cfg, overrides)  # --beam with sampling flags: Part II
    runtime = setup_device(cfg.device, cfg.dtype)  # Part II, setup_device
    model, tokenizer = load_for_sampling(cfg, runtime.device)
    check_model_for_sampling(model, cfg)  # NaN weights, more beams than tokens: Part II
    # --prompt as ids (text, or FILE:path): the workshop, encode_prompt
    prompt = torch.tensor([encode_prompt(cfg.prompt, tokenizer)], device=runtime.device)  # (1, T)
    stop_token = None if cfg.ignore_eot else tokenizer.eot_token
    generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed)
    options = dict(temperature=0.0 if cfg.greedy else cfg.temperature, top_k=cfg.top_k or None,
                   top_p=None if cfg.top_p == 1.0 else cfg.top_p, stop_token=stop_token, generator=generator)
    shown_prompt = "" if cfg.prompt == "<|endoftext|>" else tokenizer.decode(prompt[0].tolist())
    with runtime.autocast():
        if cfg.output_file:  # every sample under its settings, sample i drawn with seed + i: Part II
            write_samples(cfg, model, tokenizer, prompt, options, shown_prompt)
        elif cfg.beam:
            out = beam_search(model, prompt, cfg.max_new_tokens, cfg.beam, stop_token=stop_token)
            print(shown_prompt + decode_until(out[0, prompt.size(1):].tolist(), tokenizer, stop_token))
        elif cfg.num_samples == 1:  # printed token by token as it is generated: Part II, stream_sample
            stream_sample(model.generate_stream(prompt, cfg.max_new_tokens, **options), tokenizer,
                          shown_prompt, stop_token)
        else:
            out = model.generate(prompt.expand(cfg.num_samples, -1), cfg.max_new_tokens, **options)
            for row in out[:, prompt.size(1):].tolist():
                print(shown_prompt + decode_until(row, tokenizer, stop_token))
                print("-" * 80)


def main(argv: list[str] | None = None) -> None:
    """Train, sample, export, plot, benchmark or score, as the flags say. Bad input: one `error: ...` line."""
    try:
        overrides = parse_flags(sys.argv[1:] if argv is None else argv)
        cfg = make_config(overrides)
        if cfg.sample:
            run_sampling(cfg, overrides)
        elif cfg.export_hf:
            run_export(cfg)  # Part II, run_export
        elif cfg.plot:
            run_plot(cfg, overrides)  # Part II, run_plot
        elif cfg.bench:
            run_bench(cfg)  # Part II, run_bench
        elif cfg.eval or cfg.eval_text:
            run_evaluation(cfg, overrides)  # whole split, any text, HellaSwag: Part II, run_evaluation
        elif cfg.chat:
            run_chat(cfg, overrides)  # a terminal chat: Part II, run_chat
        else:
            train(overrides)
    except (ValueError, OSError, FloatingPointError, KeyboardInterrupt) as e:
        # One line, and the exit status: 2 a bad flag, 1 a failed run, 130 Ctrl-C. The workshop, exit_with
        exit_with(e)


# ===== Part II: the workshop (speed routes, safety and resume plumbing, GPT-2/HF interop, plots) ==========


# ----------------------------------------------------------------------------------------------------------
# 6. Beam search: another way to decode, beside the model, on the same advance-or-recompute step as
#    generate_stream
@torch.inference_mode()
def beam_search(model: GPT, idx: torch.Tensor, max_new_tokens: int, beam_size: int,
                length_penalty: float = 1.0, stop_token: int | None = None) -> torch.Tensor:
    """The most likely continuation of one prompt idx (1, T) that beam_size parallel hypotheses find.

    Each step extends every beam by every token and keeps the beam_size best by total log-probability.
    Finished hypotheses (those that produced stop_token, or all of them at the end) are ranked by
    log-probability / length ** length_penalty, so that longer texts are not punished merely for
    having more factors below 1. Returns (1, T + new tokens)."""
    if idx.size(0) != 1:
        raise ValueError(f"beam search continues one prompt, got a batch of {idx.size(0)}")
    if beam_size < 1:
        raise ValueError(f"beam={beam_size} must be at least 1")
    block = model.config.block_size
    prompt = idx[:, -block:]
    beams = prompt.new_empty(1, 0)                    # (n_beams, generated so far)
    scores = torch.zeros(1, device=idx.device)        # (n_beams,) summed log-probabilities
    caches = model.new_caches(1, min(block, prompt.size(1) + max_new_tokens))
    logits = model.next_token_logits(prompt, caches)
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
        for cache in caches or []:  # each surviving beam continues the cache of the beam it extends
            cache.reorder(rows)
        logits, caches = model.advance(torch.cat((prompt.expand(len(alive), -1), beams), dim=1), caches)
    for i in (~done).nonzero().flatten().tolist():  # the beams still alive at the end count as finished too
        finished.append((scores[i].item() / length ** length_penalty, beams[i]))
    best = max(finished, key=lambda pair: pair[0])[1]
    return torch.cat((idx, best[None]), dim=1)


# ----------------------------------------------------------------------------------------------------------
# 7. Devices and speed routes: the same results as the lesson's plain code, sooner

def choose_precision(device: torch.device) -> tuple[str, str]:
    """The training precision this device does best, and why, asked of the device itself.

    CUDA: compute capability 8.0 and up (A100, RTX 30xx, H100, ...) has bfloat16 tensor cores; older cards
    (V100, T4) only emulate bfloat16, slowly, so they get float16 with a GradScaler. (torch's
    is_bf16_supported() counts emulation as support, so it cannot decide this.) MPS: bfloat16 autocast
    where it really runs. CPUs: float32 (bfloat16 is emulated on CPUs without bfloat16 units)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bfloat16", f"compute capability {major}.{minor}: bfloat16 tensor cores"
        return "float16", f"compute capability {major}.{minor}: no bfloat16 units, float16 with loss scaling"
    if device.type == "mps":
        if mps_has_bfloat16():
            return "bfloat16", "MPS runs bfloat16 autocast here"
        return "float32", "MPS autocast in bfloat16 does not run here (it needs macOS 14+ and a recent torch)"
    return "float32", "CPU: bfloat16 would be emulated"


def mps_has_bfloat16() -> bool:
    """Whether MPS autocast really computes in bfloat16 here; tried, not guessed. Some torch versions only
    warn and run the autocast block in float32, so the result's dtype is what counts."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast("mps", dtype=torch.bfloat16):
                out = torch.ones(2, 2, device="mps") @ torch.ones(2, 2, device="mps")
        return out.dtype == torch.bfloat16
    except (RuntimeError, TypeError):
        return False


def setup_device(device_name: str, dtype_name: str = "auto", local_rank: int = 0,
                 compile_model: bool = False) -> Runtime:
    """Pick the device and precision.

    auto picks cuda, then mps, then cpu; the precision is the one choose_precision finds the device does
    best (--dtype asks for another, e.g. bfloat16 on a CPU that has bfloat16 units)."""
    if device_name == "auto":
        mps = torch.backends.mps.is_available()
        device_name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    kind = device_name.split(":")[0]
    if kind not in ("cuda", "mps", "cpu"):
        raise FlagError(f"--device={device_name!r} is not one of auto, cuda, cuda:N, mps, cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={device_name} but CUDA is not available (no GPU, or a CPU-only torch): "
                         f"use --device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device=mps but MPS is not available (it needs Apple silicon and macOS 12.3+): "
                         "use --device=cpu")
    device = torch.device(device_name if ":" in device_name or kind != "cuda" else f"cuda:{local_rank}")
    if kind == "cuda":
        torch.cuda.set_device(device)  # first: asking about "the" GPU would open a context on GPU 0
    auto_dtype, why = choose_precision(device)
    if dtype_name == "auto":
        dtype_name = auto_dtype
    elif dtype_name != auto_dtype:
        why = "--dtype"
    if dtype_name == "float16" and kind != "cuda":
        raise ValueError(f"--dtype=float16 needs loss scaling, done here on CUDA only: use bfloat16 or "
                         f"float32 on {kind}")
    if dtype_name == "bfloat16" and kind == "cuda" and auto_dtype != "bfloat16":
        raise ValueError(f"--dtype=bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 units "
                         f"({why}): use float16")
    if kind == "cuda":
        # TF32: float32 matmuls on tensor cores with a 10-bit mantissa, precise enough for training.
        torch.set_float32_matmul_precision("high")
    # torch.compile has no MPS backend worth using, and no Windows support for its default backend.
    use_compile = compile_model and kind != "mps" and sys.platform != "win32"
    if compile_model and not use_compile:
        print(f"note: --compile is ignored on {kind if kind == 'mps' else 'Windows'}")
    scaler = torch.amp.GradScaler("cuda", enabled=dtype_name == "float16")
    return Runtime(device, DTYPES[dtype_name], scaler, use_compile, fused_adamw=kind == "cuda", why=why)


class Linear(nn.Linear):
    """nn.Linear, with a faster route on a multi-core CPU for the few rows of a generation step.

    A generation step multiplies 1 to 16 rows by every weight matrix, so its time goes into reading the
    weights from memory, and F.linear reads them on one core. Cut into one slice of output rows per
    thread and multiplied as a batch (bmm), the matrix is read by every core at once (the README's
    generation table has the figures). The products are the same; only float rounding can differ."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), multiplied one slice of output rows per thread for a few rows on a CPU."""
    # The device and compile checks come first: torch.get_num_threads() cannot be traced, and calling it
    # under torch.compile would break the graph at every layer.
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    threads, rows = torch.get_num_threads(), x.numel() // x.size(-1)
    out_features, in_features = weight.shape
    if threads == 1 or rows > 16 or out_features % threads:
        return F.linear(x, weight, bias)  # training, and anything else
    columns = x.reshape(rows, in_features).t().expand(threads, -1, -1)  # (threads, in, rows)
    slices = weight.view(threads, out_features // threads, in_features)
    # Trap: .contiguous(), because sdpa's fused CPU kernel needs contiguous q, k, v (split from this
    # output); the transposed bmm result would send attention down a slower path.
    y = torch.bmm(slices, columns).reshape(out_features, rows).t().contiguous()  # (rows, out)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)


def loss_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows of logits per chunk of the fused loss. On a CPU about 2M logits (8 MB in float32), so a chunk's
    logits are still in the cache when their gradient is formed; on a GPU about 128M (thousands of rows at
    GPT-2's vocabulary), so each chunk is a few large kernels rather than many small ones."""
    return max(1, (1 << (21 if device.type == "cpu" else 27)) // vocab_size)


@torch.library.custom_op("gpt::cross_entropy_and_grads", mutates_args=())
def cross_entropy_and_grads(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                            chunk_rows: int, need_grads: bool,
                            softcap: float) -> tuple[Tensor, Tensor, Tensor]:
    """Summed cross-entropy of the logits x @ weight.T (N, V_padded) against targets (N,), -1 = ignore, and
    the gradients of that sum with respect to x (N, C) and weight (V_padded, C), a chunk of rows at a time.

    x and weight come in the compute dtype (float32, or bfloat16/float16 under autocast): the matmuls run in
    it, while the logsumexp, the softmax and the loss are float32. Logit columns from vocab_size on are
    padding rows of weight: they are set to -inf, so they take no probability and get no gradient. softcap > 0
    scores softcap * tanh(logits / softcap) instead (GPT.logits), whose derivative 1 - tanh^2 then multiplies
    the logits' gradient before it reaches x and weight. Being a custom op, it is one opaque node to
    torch.compile: the chunk loop runs as written instead of being unrolled into the graph."""
    with torch.autocast(x.device.type, enabled=False):
        counted = targets != -1
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_grads else x.new_empty(0)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_grads \
            else x.new_empty(0, dtype=torch.float32)
        for start in range(0, x.size(0), chunk_rows):
            xs, ts = x[start:start + chunk_rows], targets[start:start + chunk_rows].clamp(min=0)
            keep = counted[start:start + chunk_rows]
            logits = (xs @ weight.t()).float()                          # (rows, V_padded), float32
            if softcap:
                squashed = torch.tanh(logits / softcap)                 # kept for the derivative below
                logits = squashed * softcap
            if vocab_size < logits.size(1):
                logits[:, vocab_size:] = float("-inf")                  # padding ids are never predicted
            logsumexp = torch.logsumexp(logits, dim=-1, keepdim=True)   # (rows, 1)
            row = torch.arange(len(ts), device=x.device)
            loss += ((logsumexp.squeeze(1) - logits[row, ts]) * keep).sum()  # -log softmax at the target
            if not need_grads:
                continue
            grad_logits = logits.sub_(logsumexp).exp_()                 # softmax, in place of the logits
            grad_logits[row, ts] -= 1.0                                 # minus the one-hot target
            grad_logits *= keep[:, None]                                # ignored rows contribute nothing
            if softcap:
                grad_logits *= squashed.square_().neg_().add_(1.0)      # d(cap * tanh(z / cap))/dz
            grad_logits = grad_logits.to(x.dtype)                       # (a no-op in float32)
            torch.mm(grad_logits, weight, out=grad_x[start:start + chunk_rows])
            if x.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), xs)
            else:  # accumulate the weight's gradient in float32 over the chunks
                grad_weight += grad_logits.t() @ xs
    return loss, grad_x, grad_weight


@cross_entropy_and_grads.register_fake
def _(x, weight, targets, vocab_size, chunk_rows, need_grads, softcap):
    # Shapes only, for torch.compile's tracing.
    n = x.new_empty((), dtype=torch.float32)
    if not need_grads:
        return n, x.new_empty(0), x.new_empty(0, dtype=torch.float32)
    return n, torch.empty_like(x), x.new_empty(weight.shape, dtype=torch.float32)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T against targets, and its gradients, a chunk of rows at
    a time. x: (N, C) hidden states, weight: (V_padded, C) the output layer, targets: (N,) ids, -1 = ignore.

    The plain way, F.cross_entropy(lm_head(x), targets), writes the (N, V) logits to memory, reads them back
    for the softmax, writes the log-probabilities, and does it all again in the backward pass: at GPT-2's
    64 x 1024 tokens per micro-step and V = 50257 that is 13 GB of float32 log-probabilities alone.
    But the gradient of the loss with respect to the logits is just softmax(logits) - onehot(target) (over
    N), so we compute it at once, chunk by chunk, and turn it straight into the gradients of x and weight;
    backward then only scales them by the incoming gradient. Only one chunk of logits ever exists. (llm.c's
    "fused classifier" does the same.) Under autocast the matmuls run in the autocast dtype and the softmax
    in float32, as F.cross_entropy would."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                compute_dtype: torch.dtype, need_grads: bool, softcap: float) -> torch.Tensor:
        n_counted = (targets != -1).sum().clamp(min=1)
        loss, grad_x, grad_weight = cross_entropy_and_grads(
            x.to(compute_dtype), weight.to(compute_dtype), targets, vocab_size,
            loss_chunk_rows(weight.size(0), x.device), need_grads, softcap)
        ctx.save_for_backward(grad_x.to(x.dtype), grad_weight.to(weight.dtype), n_counted)
        return loss / n_counted

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_weight, n_counted = ctx.saved_tensors
        scale = grad_loss / n_counted
        return grad_x * scale, grad_weight * scale, None, None, None, None, None


def chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                          softcap: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of x (N, C) @ weight.T (soft-capped if softcap > 0) against targets (N,), without
    ever holding the (N, V) logits: in the autocast dtype when autocast is on, and with gradients only when
    they are needed."""
    device_type = x.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) \
        else torch.float32
    need_grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return ChunkedCrossEntropy.apply(x, weight, targets, vocab_size, compute_dtype, need_grads,
                                     float(softcap))


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """tensor (R, ...) with zero rows appended up to `rows` (unchanged if it has that many or more)."""
    if tensor.size(0) >= rows:
        return tensor
    return torch.cat((tensor, tensor.new_zeros(rows - tensor.size(0), *tensor.shape[1:])))


def output_rows(model: "GPT", device: torch.device) -> torch.Tensor:
    """The output layer's rows to multiply by: all of them on a GPU, where the padded count fills the
    tensor-core tiles; only the real vocabulary's on a CPU, where padding rows would be wasted work."""
    weight = model.lm_head.weight
    return weight if device.type != "cpu" else weight[:model.config.vocab_size]


# -- Muon: its state and momentum warm-up, and AdamW beside it as one optimizer ------------------------------

MUON_MOMENTUM = (0.85, 0.95, 300)  # Nesterov momentum from 0.85 up to 0.95 over the first 300 steps


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose every update is orthogonalised (Part I, orthogonalize): 2-D only.

    Its state per matrix, the momentum buffer and the steps taken (which set the momentum's warm-up), is
    in state_dict(), so a resumed run continues exactly. With several processes each one applies the same
    update to the same all-reduced gradient: the weights stay identical with no further communication. A
    group's "pieces" cuts its matrices into that many stacked blocks, each orthogonalised on its own
    (c_attn stacks the query, key and value matrices). No weight decay: the update's size is fixed."""

    def __init__(self, groups: list[dict], lr: float):
        super().__init__(groups, dict(lr=lr, pieces=1, muon=True))

    @torch.no_grad()
    def step(self) -> None:
        first, last, warmup_steps = MUON_MOMENTUM
        # Pieces of one shape are orthogonalised together, as one (n, rows, cols) batch: a GPT has many
        # matrices but few shapes, and on a GPU one batched product per shape replaces a dozen kernel
        # launches per matrix. A tall piece goes in transposed, which is what orthogonalize does with it
        # anyway (the same arithmetic), so c_fc's (4C, C) pieces share a batch with c_proj's (C, 4C).
        batches: dict[tuple, list] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"], state["momentum_buffer"] = 0, torch.zeros_like(p)
                momentum = first + (last - first) * min(state["step"] / warmup_steps, 1.0)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)        # the average of recent gradients
                update = p.grad.lerp(buffer, momentum)    # Nesterov: the gradient, pushed along the average
                pieces = update.view(group["pieces"], -1, p.size(1))  # (pieces, rows, cols)
                tall = pieces.size(1) > pieces.size(2)
                pieces = pieces.mT if tall else pieces
                shape = (*pieces.shape[1:], pieces.dtype)
                batches.setdefault(shape, []).append((p, pieces, tall, group["lr"]))
                state["step"] += 1
        for items in batches.values():
            done = orthogonalize(torch.cat([pieces for _, pieces, _, _ in items]))
            counts = [pieces.size(0) for _, pieces, _, _ in items]
            for (p, pieces, tall, lr), out in zip(items, done.split(counts)):
                rows, cols = p.size(0) // pieces.size(0), p.size(1)
                scale = max(1.0, rows / cols) ** 0.5  # the same RMS for every shape
                p.add_((out.mT if tall else out).reshape(p.shape), alpha=-lr * scale)


class MuonWithAdamW:
    """Muon for the 2-D matrices inside the blocks, AdamW (already built) for every other parameter, as one
    optimizer: param_groups, step, zero_grad and state_dict cover both, which is all the training loop and
    GradScaler use."""

    def __init__(self, model: "GPT", adamw: torch.optim.AdamW, lr: float):
        # With LoRA the weights are frozen and the adapters are the matrices (c_attn's B stacks q, k, v).
        matrices = [(name, p) for name, p in model.transformer.h.named_parameters()
                    if p.dim() == 2 and p.requires_grad]
        qkv = ("attn.c_attn.weight", "attn.c_attn.lora_B")
        stacked = [p for name, p in matrices if name.endswith(qkv)]
        others = [p for name, p in matrices if not name.endswith(qkv)]
        self.muon, self.adamw = Muon([{"params": stacked, "pieces": 3}, {"params": others}], lr), adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups + self.muon.param_groups  # fresh lists after load_state_dict

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


# -- MFU: the share of the device's peak FLOP/s that training uses -----------------------------------------

def num_params(model: GPT, non_embedding: bool = True) -> int:
    """Parameters, counting a tied matrix once and no padding row. non_embedding drops the position table, as
    the scaling-law papers do (the token embedding stays: tied, it is the output layer too)."""
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    n -= (c.padded_vocab_size - c.vocab_size) * c.n_embd * (1 if c.tie_weights else 2)  # padding rows
    if non_embedding and c.pos_emb == "learned":
        n -= model.transformer.wpe.weight.numel()
    return n


def flops_per_token(model: GPT, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 per parameter (2 forward, 4 backward) plus the
    attention scores and weighted sums, 12 * n_layer * n_embd * T (PaLM paper, appendix B). An untied token
    embedding is a table lookup, not a matmul: only the output layer's copy of the vocabulary counts."""
    c = model.config
    lookup = 0 if c.tie_weights else c.vocab_size * c.n_embd
    return 6 * (num_params(model) - lookup) + 12 * c.n_layer * c.n_embd * (seq_len or c.block_size)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU, so that a timer measures the work and not just its queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# Dense bfloat16 (float16 for V100 and T4) tensor-core peaks from the vendors' data sheets, in FLOP/s.
# The first name contained in torch.cuda.get_device_name() wins, hence "H100 PCIe" before "H100", "L40S"
# before "L40" before "L4". Other GPUs are measured, or take --peak_flops.
GPU_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12,
                  "L40": 181e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
                  "T4": 65e12}


def peak_flops_per_second(runtime: Runtime, configured: float) -> float:
    """The device's peak, the denominator of MFU: --peak_flops, else the GPU table, else measured."""
    if configured > 0:
        return configured
    if runtime.device.type == "cuda":
        name = torch.cuda.get_device_name(runtime.device)
        for gpu, flops in GPU_PEAK_FLOPS.items():
            if gpu in name:
                return flops
    # Unknown device: time a large matmul in the training precision; the best of a few runs after a warm-up.
    # (On a machine shared with other work this reads low and MFU high: pass --peak_flops for a fixed figure.)
    n = 8192 if runtime.device.type == "cuda" else 2048
    # On a CPU, bfloat16 without bf16 units is emulated: timing it would take minutes. Time float32 instead.
    dtype = torch.float32 if runtime.device.type == "cpu" else runtime.autocast_dtype
    a = torch.randn(n, n, device=runtime.device, dtype=dtype)
    a @ a
    best = math.inf
    for _ in range(5):
        synchronize(runtime.device)
        t0 = time.perf_counter()
        a @ a
        synchronize(runtime.device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops_source(runtime: Runtime, configured: float) -> str:
    """Where peak_flops_per_second's figure comes from, for the start-up line: MFU is only as good as it."""
    if configured > 0:
        return "from --peak_flops"
    if runtime.device.type == "cuda" and any(gpu in torch.cuda.get_device_name(runtime.device)
                                             for gpu in GPU_PEAK_FLOPS):
        return "from the data sheet"
    dtype = torch.float32 if runtime.device.type == "cpu" else runtime.autocast_dtype  # as timed there
    measured = str(dtype).removeprefix("torch.")
    return f"an estimate: a {measured} matmul timed here; --peak_flops sets it"


# -- --bench: one command that times training on any machine, no data needed ------------------------------

BENCH_VOCAB_SIZE = 50257  # GPT-2's vocabulary: the output layer is a large share of a small model's work
BENCH_WARMUP_STEPS, BENCH_TIMED_STEPS = 3, 10  # warm-up covers allocation and torch.compile


def run_bench(cfg: SimpleNamespace) -> None:
    """Time full training steps (forward, backward, clipping, AdamW) of the configured model on random
    tokens, so any machine can be compared with the README's figures without preparing data."""
    runtime = setup_device(cfg.device, cfg.dtype, compile_model=cfg.compile)
    device = runtime.device
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, vocab_size=BENCH_VOCAB_SIZE)).to(device)
    optimizer = make_optimizer(model, cfg, runtime)
    fast_model = torch.compile(model) if runtime.compile else model
    batch = torch.randint(0, BENCH_VOCAB_SIZE, (cfg.batch_size, cfg.block_size + 1), device=device)
    x, y = batch[:, :-1], batch[:, 1:]
    peak_flops = peak_flops_per_second(runtime, cfg.peak_flops)
    print(f"bench: {num_params(model) / 1e6:.2f}M parameters, batch {cfg.batch_size} x {cfg.block_size}, "
          f"{device}, {str(runtime.autocast_dtype).removeprefix('torch.')} ({runtime.why})"
          f"{', compiled' if runtime.compile else ''}; {BENCH_WARMUP_STEPS} warm-up + {BENCH_TIMED_STEPS} "
          f"timed steps; peak {peak_flops / 1e12:.2f} TFLOP/s for MFU "
          f"({peak_flops_source(runtime, cfg.peak_flops)})", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(BENCH_WARMUP_STEPS + BENCH_TIMED_STEPS):
        synchronize(device)
        t0 = time.perf_counter()
        with runtime.autocast():
            _, loss = fast_model(x, y)
        runtime.scaler.scale(loss).backward()
        runtime.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        runtime.scaler.step(optimizer)
        runtime.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    step_time = sorted(times[BENCH_WARMUP_STEPS:])[BENCH_TIMED_STEPS // 2]  # the median timed step
    tokens_per_second = cfg.batch_size * cfg.block_size / step_time
    mfu = flops_per_token(model, cfg.block_size) * tokens_per_second / peak_flops
    print(f"{step_time * 1000:.1f} ms/step | {tokens_per_second:,.0f} tokens/s | MFU {mfu:.1%} | peak memory "
          f"{peak_memory_gib(device):.2f} GiB | loss {loss.item():.3f} (random tokens: ln V = "
          f"{math.log(BENCH_VOCAB_SIZE):.3f})")


def peak_memory_gib(device: torch.device) -> float:
    """The most memory this process has held: allocated on a CUDA device, resident on the CPU and MPS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # Unix; ru_maxrss is in KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


# ----------------------------------------------------------------------------------------------------------
# 8. Safety and resume plumbing: inputs checked before a run, a stopped run continued exactly, a signal
#    that stops it cleanly, one run per out_dir, the log, the console, and file-system errors as one line

def check_model_fits_data(model: "GPT", meta: dict, cfg: SimpleNamespace) -> None:
    """The data's vocabulary and every token id within the model's, and --block_size within its context."""
    data_dir = Path(cfg.data_dir)
    if int(meta["vocab_size"]) > model.config.vocab_size:
        raise ValueError(f"{data_dir}/meta.json has vocab_size {meta['vocab_size']} but the model only "
                         f"{model.config.vocab_size} token ids: prepare the data with the model's tokenizer")
    if cfg.block_size > model.config.block_size:
        raise ValueError(f"--block_size={cfg.block_size} is longer than the model's context "
                         f"({model.config.block_size})")
    check_token_ids(meta, data_dir, model.config.vocab_size)


def shard_token_count(path: Path) -> int:
    """Check a shard's header and size; return its token count."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard listed in meta.json is missing; re-run prepare_fineweb.py")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype=np.int32)
    if header.size < 256:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is shorter than the 1024-byte shard header; "
                         f"re-run prepare_fineweb.py")
    magic, version, count = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise ValueError(f"{path}: not a token shard (magic {magic}, expected {SHARD_MAGIC})")
    if version != SHARD_VERSION:
        raise ValueError(f"{path}: shard version {version}, this reader knows version {SHARD_VERSION}")
    size, expected = path.stat().st_size, HEADER_BYTES + 2 * count
    if size != expected:
        raise ValueError(f"{path}: the header says {count:,} tokens ({expected:,} bytes) but the file has "
                         f"{size:,} bytes (truncated?); re-run prepare_fineweb.py")
    return count


def load_meta(data_dir: Path) -> dict:
    """meta.json of a prepared dataset, checked to list train and val shards and an existing tokenizer."""
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no shards in {data_dir} (no meta.json): run prepare_fineweb.py to write "
                                f"them, or point --data_dir at its output")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        shard_lists = {split: meta["splits"][split]["shards"] for split in ("train", "val")}
        tokenizer_path = data_dir / meta["tokenizer"]
        int(meta["vocab_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: not a meta.json written by prepare_fineweb.py "
                         f"({type(e).__name__}: {e})") from None
    if meta.get("complete") is False:  # prepare_fineweb.py was stopped part way; it can resume
        raise ValueError(f"{meta_path} says its preparation did not finish: run prepare_fineweb.py again")
    for split, shards in shard_lists.items():
        if not shards:
            raise FileNotFoundError(f"{meta_path} lists no {split} shards: run prepare_fineweb.py again")
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path}: the tokenizer meta.json names is missing; "
                                f"run prepare_fineweb.py again")
    check_splits(meta, meta_path)
    return meta


def check_splits(meta: dict, meta_path: Path) -> None:
    """meta.json's shard lists are lists of file names, its counts are numbers, and no shard is in both
    splits: what would otherwise fail in the middle of a run, or quietly measure the wrong thing."""
    for split in ("train", "val"):
        entry = meta["splits"][split]
        shards = entry["shards"]
        if not isinstance(shards, list) or not all(isinstance(name, str) for name in shards):
            raise ValueError(f"{meta_path}: splits.{split}.shards must list file names, got "
                             f"{str(shards)[:60]}; re-run prepare_fineweb.py")
        for key in ("tokens", "bytes"):
            value = entry.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{meta_path}: splits.{split}.{key} is {value!r}, not a count; "
                                 f"re-run prepare_fineweb.py")
    data_dir = meta_path.parent
    train_paths = {(data_dir / name).resolve() for name in meta["splits"]["train"]["shards"]}
    leaked = [name for name in meta["splits"]["val"]["shards"] if (data_dir / name).resolve() in train_paths]
    if leaked:
        raise ValueError(f"{meta_path} lists {leaked[0]} as a train and a val shard: the val loss would "
                         f"measure memory, not generalisation; re-run prepare_fineweb.py")


MAX_ID_BLOCK_TOKENS = 1 << 23  # 16 MB of uint16 ids read at a time while looking for a shard's largest id


def shard_max_token_id(path: Path, listed: dict | None) -> int:
    """The largest token id in a shard (-1 if empty): from meta.json's "shards" entry when prepare_fineweb.py
    recorded it for a file of the size it still has, else read in blocks from fresh memmaps, so that memory
    stays flat however large the shard (older folders do not record it)."""
    count = shard_token_count(path)  # also checks that the file has the size its header gives
    if isinstance(listed, dict) and listed.get("tokens") == count and type(listed.get("max_token_id")) is int:
        return listed["max_token_id"]
    largest = -1
    for start in range(0, count, MAX_ID_BLOCK_TOKENS):
        length = min(MAX_ID_BLOCK_TOKENS, count - start)
        block = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES + 2 * start, shape=(length,))
        largest = max(largest, int(block.max()))
        del block  # unmap it before the next one
    return largest


def check_token_ids(meta: dict, data_dir: Path, model_vocab_size: int) -> None:
    """Every token id in the shards must be below meta.json's vocab_size and the model's, and meta.json's
    vocab_size must be its tokenizer's: an id past the embedding table would stop the run at the first batch
    that holds it, with an IndexError (on CUDA a device-side assert) that names nothing."""
    meta_path, vocab_size = data_dir / "meta.json", int(meta["vocab_size"])
    tokenizer_path = data_dir / meta["tokenizer"]
    tokenizer_size = tokenizer_from_text(tokenizer_path.read_text(encoding="utf-8")).vocab_size
    if tokenizer_size != vocab_size:
        raise ValueError(f"{meta_path} has vocab_size {vocab_size} but {tokenizer_path} has {tokenizer_size} "
                         f"tokens (another tokenizer): re-run prepare_fineweb.py with the tokenizer you want")
    listed = meta.get("shards") if isinstance(meta.get("shards"), dict) else {}
    for name in meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"]:
        largest = shard_max_token_id(data_dir / name, listed.get(name))
        if largest >= min(vocab_size, model_vocab_size):
            limit = (f"{meta_path} has vocab_size {vocab_size}" if vocab_size <= model_vocab_size
                     else f"the model has {model_vocab_size} token ids")
            raise ValueError(f"{data_dir / name} holds token id {largest} but {limit}: the shard was written "
                             f"with another tokenizer; re-run prepare_fineweb.py")


@contextmanager
def out_of_memory_as_one_line(cfg: SimpleNamespace) -> Iterator[None]:
    """Around building the model: a model too large for the memory (MemoryError, or the allocator's
    RuntimeError) becomes one line naming the knobs that size it."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "alloc" not in str(e):
            raise
        sizes = ", ".join(f"--{k}={getattr(cfg, k)}" for k in ("n_layer", "n_embd", "block_size"))
        reason = str(e).splitlines()[0][-90:]
        raise ValueError(f"the model does not fit in memory ({sizes}; {reason}): make it smaller") from None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint dict, on the CPU; one-line errors for a missing, unreadable or foreign file."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first, or pass --ckpt=PATH")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here (pickle, zip, unsupported global)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({reason[:150]})") from None
    needed = ("model", "model_config", "config", "tokenizer", "step")
    missing = [k for k in needed if k not in checkpoint] if isinstance(checkpoint, dict) else list(needed)
    if missing:
        raise ValueError(f"{path} is not a checkpoint of gpt.py (missing {', '.join(missing)})")
    return checkpoint


def check_resumable(checkpoint: dict, path: Path) -> None:
    """A checkpoint to resume needs more than one to sample: the optimizer, scaler and RNG states, and its
    settings as a dict. One trimmed for sampling (or edited) cannot continue exactly, so it is refused."""
    needed = ("optimizer", "scaler", "best_val_loss", "rng")
    problems = [f"no {key}" for key in needed if key not in checkpoint]
    rng = checkpoint.get("rng", {})
    complete = (isinstance(rng, dict) and "data" in rng and isinstance(rng.get("processes"), list)
                and rng["processes"] and isinstance(checkpoint.get("optimizer"), dict))
    if not problems and not complete:
        problems.append("an incomplete optimizer or rng state")
    if not isinstance(checkpoint["config"], dict):
        problems.append(f"a config that is a {type(checkpoint['config']).__name__}, not a dict")
    if problems:
        raise ValueError(f"{path} cannot be resumed (it has {', '.join(problems)}): sample from it with "
                         f"--sample, or train a new run with --init_from=scratch")


def model_from_checkpoint(checkpoint: dict, path: Path, dropout: float | None = None) -> GPT:
    """The GPT a checkpoint describes, with its weights; dropout may be changed (it has no weights)."""
    try:
        # Checkpoints from before vocabulary padding have no vocab_multiple: their matrices are unpadded.
        config = GPTConfig(**{"vocab_multiple": 1, **checkpoint["model_config"]})
    except TypeError as e:
        raise ValueError(f"{path}: its model_config does not fit this gpt.py's GPTConfig ({e})") from None
    if dropout is not None:
        config = replace(config, dropout=dropout)
    if "lora" in checkpoint:  # adapters only: their base's weights, the adapters merged in (section 13)
        return merge_adapters(lora_base_model(checkpoint, path, config), checkpoint, path)
    model = GPT(config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        reason = str(e).splitlines()[0]
        raise ValueError(f"{path}: weights do not match its model_config ({reason})") from None
    return model


def check_model_for_sampling(model: GPT, cfg: SimpleNamespace) -> None:
    """Refuse weights that are NaN or infinite (an edited or damaged checkpoint: every draw would fail) and
    more beams than the vocabulary has tokens (the first step cannot fill them)."""
    source = weights_source(cfg)
    broken = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if broken is not None:
        raise ValueError(f"{source} holds non-finite weights (NaN or inf in {broken}): it cannot be sampled; "
                         f"use an earlier checkpoint")
    if cfg.beam > model.config.vocab_size:
        raise ValueError(f"--beam={cfg.beam} is more than the model's {model.config.vocab_size} tokens: "
                         f"use at most {model.config.vocab_size} beams")


def check_architecture(model_config: GPTConfig, overrides: dict, source: str) -> None:
    """Refuse model flags that contradict a loaded model (resume or GPT-2): the weights fix its shape."""
    conflicts = [f"--{k}={overrides[k]} but {source} has {k}={getattr(model_config, k)}"
                 for k in MODEL_KNOBS if k in overrides and k not in ("dropout", "block_size")
                 and overrides[k] != getattr(model_config, k)]
    if conflicts:
        raise ValueError(f"{conflicts[0]}: drop the model flags, they come from {source}")


def rng_states(device: torch.device) -> dict:
    """This process's random generators that training draws from: dropout on the CPU, CUDA or MPS."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        states["mps"] = torch.mps.get_rng_state()
    return states


def restore_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    elif device.type == "mps" and "mps" in states:
        torch.mps.set_rng_state(states["mps"])


def restore_training_state(checkpoint: dict, optimizer: torch.optim.Optimizer, runtime: Runtime,
                           data_generator: torch.Generator, rank: int) -> tuple[int, float, int, int]:
    """Put the checkpoint's optimizer, scaler and random generators back; return (step, best_val_loss,
    best_step, evals_since_best). Checkpoints from before --early_stop count from 0, best step unknown."""
    saved = checkpoint["config"].get("optimizer", "adamw")
    current = "muon" if isinstance(optimizer, MuonWithAdamW) else "adamw"
    if saved != current:  # the two keep different state
        raise FlagError(f"--optimizer={current} but the checkpoint was trained with {saved}, whose state "
                        f"cannot continue in {current}: resume without --optimizer, or start a new run")
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"]:  # empty when saved without float16 (the scaler was off)
        runtime.scaler.load_state_dict(checkpoint["scaler"])
    data_generator.set_state(checkpoint["rng"]["data"])
    saved_ranks = checkpoint["rng"]["processes"]
    restore_rng_states(saved_ranks[rank] if rank < len(saved_ranks) else saved_ranks[0], runtime.device)
    return (checkpoint["step"], checkpoint["best_val_loss"], checkpoint.get("best_step", -1),
            checkpoint.get("evals_since_best", 0))


class StopOnSignal:
    """Ctrl-C (or a scheduler's SIGTERM) asks training to stop at the end of the current step and save.

    The signal may reach the processes at different moments, so they decide together, in the step's
    all-reduce: `requested` is this process's wish, `agreed` the decision. A second Ctrl-C aborts. Used as
    a `with` block, which puts the previous handlers back at its end."""

    def __init__(self, announce: bool):
        self.requested = self.agreed = False
        self.announce = announce  # process 0 says what is happening
        self.previous_handlers = {}

    def __enter__(self) -> "StopOnSignal":
        self.previous_handlers = {sig: signal.signal(sig, self.request)
                                  for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)

    def request(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nstopping after this step (Ctrl-C again to abort without saving)", flush=True)


class TrainingStopped(KeyboardInterrupt):
    """Raised once a run that Ctrl-C or SIGTERM stopped has saved its checkpoint. An interruption, so main
    exits with 130, as shells expect of an interrupted command: a script can tell it from a finished run."""


def pid_is_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 checks without sending anything)."""
    if sys.platform == "win32":
        return True  # os.kill would terminate it: assume alive, and let the user remove the lock
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, and belongs to another user
    return True


class OutDirLock:
    """out_dir/.lock while a run trains there: a second run into the same out_dir would interleave its
    log lines and overwrite the first one's checkpoint, so it is refused with one line.

    The lock file holds the owner's PID and host. One left by a run that was killed (kill -9, a power cut)
    names a PID that is no longer alive: the next run on that host takes it over, with a note. The lock is
    removed when the run ends, also on an error. enabled=False (the other DDP processes) does nothing."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.out_dir, self.path, self.enabled = out_dir, out_dir / ".lock", enabled
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> "OutDirLock":
        if not self.enabled:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)  # a file in the way, read-only: one line in main
        for attempt in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                if attempt == 0 and self.take_over_if_stale():
                    continue
                holder = self.read_owner() or {}
                pid, host = holder.get("pid", "?"), holder.get("host", "?")
                raise ValueError(f"{self.out_dir} is in use by another training run (pid {pid} on {host}): "
                                 f"wait for it, choose another --out_dir, or delete {self.path} if that run "
                                 f"is gone") from None
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self.out_dir)) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.owner) + "\n")
            break
        remove_stale_temp_files(self.out_dir)
        return self

    def read_owner(self) -> dict | None:
        """The lock's {"pid", "host"}, or None if it cannot be read (a moment after its creation it may be
        empty: read it again once)."""
        for attempt in range(2):
            try:
                owner = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(owner, dict) and type(owner.get("pid")) is int and owner["pid"] > 0:
                    return owner
            except (OSError, ValueError):
                pass
            if attempt == 0:
                time.sleep(0.2)
        return None

    def take_over_if_stale(self) -> bool:
        """Remove a lock whose owner on this host has died (or that is unreadable); True if removed."""
        owner = self.read_owner()
        if owner is not None and (owner.get("host") != self.owner["host"] or pid_is_alive(owner["pid"])):
            return False
        who = f"pid {owner['pid']}, no longer running" if owner else "unreadable"
        print(f"note: took over the stale lock {self.path} ({who})")
        self.path.unlink(missing_ok=True)
        return True

    def __exit__(self, *exc_info) -> None:
        if self.enabled and self.read_owner() == self.owner:
            self.path.unlink(missing_ok=True)


# The names of write_atomically's temp files for a checkpoint and the log: .ckpt.pt.<pid>.<8 hex>.tmp
STALE_TEMP_FILE = re.compile(r"\.(ckpt\.pt|best\.pt|log\.jsonl)\.\d+\.[0-9a-f]{8}\.tmp")


def remove_stale_temp_files(out_dir: Path) -> None:
    """Remove the hidden temp files of checkpoint and log writes that a killed run left (kill -9 during
    write_atomically). Only a run that holds out_dir's lock calls this, so none of them is being written."""
    stale = [p for p in out_dir.iterdir() if STALE_TEMP_FILE.fullmatch(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        print(f"note: removed {len(stale)} unfinished write(s) that a killed run left in {out_dir} "
              f"({stale[0].name})")


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl. A last line cut short (a crash mid-write) is dropped with a note; any other
    line that is not a record is an error naming the file and line."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("step"), int) and "kind" in record):
                raise ValueError("not a record of gpt.py")
        except ValueError as e:
            if number == len(lines) and not line.endswith("\n"):
                print(f"note: dropped the unfinished last line of {path} (line {number}, cut off by a crash)")
                break
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise ValueError(f"{path}, line {number}: {reason}; fix or delete that line (the checkpoint does "
                             f"not need it)") from None
        records.append(record)
    return records


def trim_log(path: Path, last_step: int) -> None:
    """Keep the log up to the checkpoint's step: steps logged after it (before a crash, or a non-finite
    loss) are about to be run again. Records are written back as RunLog.write writes them."""
    kept = "".join(json.dumps(r) + "\n" for r in read_log(path) if r["step"] <= last_step)
    write_file(path, lambda tmp: Path(tmp).write_text(kept, encoding="utf-8"))


class RunLog:
    """log.jsonl: one JSON object per training step and per evaluation, written by process 0 only.

    A resumed run first cuts the log back to its checkpoint's step: the steps logged after it (before a
    crash, or a non-finite loss) are about to be run again."""

    def __init__(self, path: Path, enabled: bool, resumed_at: int | None):
        self.file = None
        if not enabled:
            return
        if resumed_at is not None and path.is_file():
            trim_log(path, resumed_at)
        self.file = open(path, "a" if resumed_at is not None else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.file:
            self.file.close()


def check_loss_is_finite(run: Run, loss: float, step: int, when: str = "") -> None:
    """Stop on a NaN or infinite loss, before it is stepped on (it would poison every weight) or sampled
    from; the checkpoint on disk (run.saved_step, -1 for none) stays as it is."""
    if not math.isfinite(loss):
        path = Path(run.cfg.out_dir) / "ckpt.pt"
        kept = f"{path} keeps step {run.saved_step}" if run.saved_step >= 0 else "nothing saved"
        raise FloatingPointError(f"the loss became {loss} at step {step}{when}; stopped ({kept}): "
                                 f"try a lower --learning_rate or a longer --warmup_steps")


def print_eval(run: Run, record: dict) -> None:
    """Process 0 prints an evaluation's losses, and a short sample of what the model writes by now."""
    if run.rank != 0:
        return
    bpb = f", {record['val_bits_per_byte']:.3f} bits/byte" if "val_bits_per_byte" in record else ""
    memory = f", peak GPU memory {record['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in record else ""
    print(f"step {record['step']}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f} "
          f"(perplexity {record['val_perplexity']:.1f}{bpb}){memory}")
    print(f"  sample: {eval_sample(run.model, run.tokenizer, run.cfg, run.runtime)!r}")


EVAL_SAMPLE_TOKENS = 64  # a glimpse of the model's text at each evaluation


def eval_sample(model: GPT, tokenizer: Tokenizer, cfg: SimpleNamespace, runtime: Runtime) -> str:
    """A short sample from the start of a document, drawn with its own generator: training's RNG is
    untouched."""
    generator = torch.Generator(device=runtime.device).manual_seed(cfg.seed)
    start = torch.tensor([[tokenizer.eot_token or 0]], device=runtime.device)
    model.eval()
    with runtime.autocast():
        out = model.generate(start, EVAL_SAMPLE_TOKENS, temperature=cfg.temperature, top_k=cfg.top_k or None,
                             stop_token=tokenizer.eot_token, generator=generator)
    model.train()
    return tokenizer.decode([t for t in out[0, 1:].tolist() if t != tokenizer.eot_token])


def print_start(run: Run) -> None:
    """The start-up lines: the model, the device and precision (and why), what a step holds, the data."""
    cfg, runtime, model = run.cfg, run.runtime, run.model
    print(f"model: {num_params(model) / 1e6:.2f}M parameters, {model.config}")
    if getattr(model, "lora", None):
        print(lora_summary(model))  # trainable and total parameters: section 13
    print(f"device {runtime.device}, autocast {str(runtime.autocast_dtype).removeprefix('torch.')} "
          f"({runtime.why}), {run.world_size} process(es); {run.tokens_per_step:,} tokens per step = "
          f"{cfg.batch_size} x {cfg.block_size} x {run.world_size} x {run.accumulation_steps} micro-step(s); "
          f"data: {run.windows['train'].num_windows:,} train windows; peak {run.peak_flops / 1e12:.2f} "
          f"TFLOP/s for MFU ({peak_flops_source(runtime, cfg.peak_flops)})")


def stream_sample(tokens: Iterator[torch.Tensor], tokenizer: Tokenizer, shown_prompt: str,
                  stop_token: int | None) -> None:
    """Print a sample as its (1,) tokens arrive. A token may end in the middle of a UTF-8 character (an
    emoji can take 4 tokens), so bytes go through an incremental decoder that prints each character once
    it is complete."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(shown_prompt)
    for token in tokens:
        if token.item() == stop_token:
            break
        sys.stdout.write(utf8.decode(tokenizer.decode_bytes([token.item()])))
        sys.stdout.flush()
    print(utf8.decode(b"", final=True))


def print_step(run: Run, record: dict) -> None:
    """Process 0 prints a training line every log_interval steps (and after the first)."""
    if run.rank == 0 and (run.step % run.cfg.log_interval == 0 or run.step == 1):
        print(f"step {run.step}/{run.cfg.max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
              f"grad norm {record['grad_norm']:.2f} | {record['ms']:.0f} ms | "
              f"{record['tokens_per_s']:,.0f} tok/s | MFU {record['mfu']:.1%}", flush=True)


# -- Files: a write that fails says why, on the path the user named; a closed stdout is no error ------------

FILE_SYSTEM_CAUSES = {  # errno -> (the cause in words, what to do)
    errno.ENOSPC: ("no space left on device", "free some space or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
    errno.EFBIG: ("file too large (over the file-size limit, ulimit -f)", "raise it or write elsewhere"),
    errno.EROFS: ("read-only file system", "choose a folder you can write to"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
}


def file_system_error(error: OSError) -> str:
    """One line for a failed file operation: what failed, on which path, and what to do."""
    path = error.filename
    if error.errno in (errno.EEXIST, errno.ENOTDIR):  # mkdir of a folder where a file has the name
        return f"cannot create the folder {path}: a file is in the way; remove it or choose another folder"
    unknown = (error.strerror or type(error).__name__, "check the path")
    cause, remedy = FILE_SYSTEM_CAUSES.get(error.errno, unknown)
    if error.errno == errno.ENOSPC:
        return f"no space left on device writing {path}: {remedy}"
    return f"cannot write {path}: {cause}; {remedy}"


def write_file(path: Path, write) -> None:
    """bpe.write_atomically(path, write), with a failure reported on path (not on its hidden temp file) as
    an OSError that main turns into one line. The file that was there before is left whole."""
    try:
        write_atomically(path, write)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def torch_save(obj: object, path: Path) -> None:
    """torch.save through a Python file: when a write fails (a full disk), torch.save to a path reports only
    "[enforce fail at inline_container.cc] unexpected pos"; through a file, the OSError that says why is
    raised from the file's write, and torch's RuntimeError keeps it as its context, to be raised here."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def exit_with(error: BaseException) -> None:
    """End the program for main: one `error: ...` line on stderr and the status a shell expects: 2 for a
    bad flag (as argparse), 1 for a run that failed, 130 for Ctrl-C or a signal that stopped (and saved) a
    training run, 141 when the reader of stdout went away (| head)."""
    if isinstance(error, KeyboardInterrupt):
        raise SystemExit(130) from None
    if isinstance(error, BrokenPipeError):
        exit_quietly_on_broken_pipe()
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        print(f"error: {file_system_error(error)}", file=sys.stderr)  # a full disk, a read-only folder
        raise SystemExit(1) from None
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2 if isinstance(error, FlagError) else 1) from None


def exit_quietly_on_broken_pipe() -> None:
    """`python gpt.py --sample ... | head` closes the pipe early: stop without a traceback. stdout is pointed
    at /dev/null so that Python's flush at exit does not fail again; the status is 128 + SIGPIPE, as for a
    shell tool that the pipe stopped."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(141)


# ----------------------------------------------------------------------------------------------------------
# 9. GPT-2 / Hugging Face: OpenAI's weights in, our models out
#
# HF's GPT-2 stores its linear layers as "Conv1D" modules whose weight is (in, out), the transpose of
# nn.Linear's (out, in). Everything else has the same name and shape as here.

HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The GPTConfig fields HF's GPT2LMHeadModel has no way to express: a model must have these values to export.
GPT2_ARCHITECTURE = {"pos_emb": "learned", "norm": "layernorm", "qk_norm": False, "activation": "gelu",
                     "logit_softcap": 0.0, "tie_weights": True, "bias": True}
GPT2_SIZES = {  # model_type: (n_layer, n_head, n_embd)
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


def from_gpt2(model_type: str = "gpt2", gpt2_dir: str | os.PathLike | None = None,
              vocab_multiple: int = 64) -> GPT:
    """GPT-2 with OpenAI's weights, from a directory holding HF's model.safetensors (and config.json), or
    downloaded from the Hugging Face hub (openai-community/<model_type>) when no directory is given. The
    vocabulary rows are padded to vocab_multiple (1: as HF stores them)."""
    from safetensors.torch import load_file

    if gpt2_dir is None:
        if model_type not in GPT2_SIZES:
            raise ValueError(f"unknown GPT-2 model {model_type!r}: use one of {', '.join(GPT2_SIZES)}")
        from huggingface_hub import snapshot_download
        try:
            gpt2_dir = snapshot_download(f"openai-community/{model_type}",
                                         allow_patterns=["config.json", "model.safetensors"])
        except Exception as e:
            raise ValueError(f"could not download {model_type} from the Hugging Face hub "
                             f"({type(e).__name__}); download it elsewhere and pass --gpt2_dir=DIR") from None
    gpt2_dir = Path(gpt2_dir)
    weights_file = gpt2_dir / "model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} not found: --gpt2_dir must hold HF's model.safetensors")
    config_file = gpt2_dir / "config.json"
    if config_file.is_file():
        hf = json.loads(config_file.read_text())
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], vocab_multiple=vocab_multiple)
    else:
        if model_type not in GPT2_SIZES:
            raise ValueError(f"{gpt2_dir} has no config.json and {model_type!r} is not a GPT-2 size")
        n_layer, n_head, n_embd = GPT2_SIZES[model_type]
        config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_multiple=vocab_multiple)
    try:
        hf_state = load_file(weights_file)
    except Exception as e:
        raise ValueError(f"{weights_file} is not a readable safetensors file ({e})") from None
    model = GPT(config)
    model.load_state_dict(state_from_hf(hf_state, model, weights_file))
    return model


def state_from_hf(hf_state: dict, model: GPT, source: Path) -> dict:
    """HF's tensor names and layout -> ours; name every missing, extra or misshapen tensor."""
    ours = model.state_dict()
    state, problems = {}, []
    for name, tensor in hf_state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # old checkpoints store the causal mask
            continue
        key = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        if key.endswith(HF_TRANSPOSED):
            tensor = tensor.t()
        if key in ("transformer.wte.weight", "lm_head.weight") and key in ours:
            tensor = pad_rows(tensor, ours[key].size(0))  # HF stores the real vocabulary only
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


def export_to_hf(model: GPT, out_dir: str | os.PathLike) -> None:
    """Write the model as a Hugging Face GPT-2 checkpoint: config.json + model.safetensors, loadable with
    transformers.GPT2LMHeadModel.from_pretrained(out_dir). Only GPT-2-shaped models have such a form."""
    from safetensors.torch import save_file

    c = model.config
    differences = [f"{name}={getattr(c, name)!r} (GPT-2 has {want!r})"
                   for name, want in GPT2_ARCHITECTURE.items() if getattr(c, name) != want]
    if differences:
        raise ValueError(f"cannot export to HF GPT-2: {', '.join(differences)}")
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":  # tied to wte; HF re-ties it on load
            continue
        tensor = tensor.detach().float().cpu()
        if key == "transformer.wte.weight":
            tensor = tensor[:c.vocab_size]  # HF holds the real vocabulary: the padding rows stay behind
        state[key] = (tensor.t() if key.endswith(HF_TRANSPOSED) else tensor).contiguous()
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "initializer_range": 0.02,
        "tie_word_embeddings": True, "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_file(out_dir / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_file(out_dir / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2)))


def gpt2_tokenizer(gpt2_dir: str) -> Tokenizer:
    """GPT-2's tokenizer: from gpt2_dir when it holds GPT-2's tokenizer files, else tiktoken's "gpt2"."""
    has_files = gpt2_dir and any((Path(gpt2_dir) / name).is_file() for name in ("vocab.bpe", "merges.txt"))
    return load_tokenizer(gpt2_dir if has_files else "gpt2", flag="--gpt2_dir")


def run_export(cfg: SimpleNamespace) -> None:
    """--export_hf: the checkpoint's (or GPT-2's) model as a Hugging Face GPT-2."""
    model, _ = load_for_sampling(cfg, torch.device("cpu"))
    export_to_hf(model, cfg.export_hf)
    print(f"wrote {Path(cfg.export_hf) / 'model.safetensors'} and config.json "
          f"(load with transformers.GPT2LMHeadModel.from_pretrained)")


# ----------------------------------------------------------------------------------------------------------
# 10. Plots: one function per figure

PLOT_PROMPT = "First Citizen: Once upon a time, a little girl asked the king why the sky was blue."
WEIGHT_KINDS = {"attn.c_attn": "attention q,k,v", "attn.c_proj": "attention output",
                "mlp.c_fc": "MLP in", "mlp.c_proj": "MLP out"}


def run_plot(cfg: SimpleNamespace, overrides: dict) -> None:
    """PNG plots of a run, written next to its checkpoint (weights_path: best.pt, else ckpt.pt): training
    curves from the log.jsonl beside it, attention heatmaps for --prompt, weight histograms and spectral
    norms. With --compare, the curves of several runs on one figure instead."""
    if cfg.compare:
        return run_comparison(cfg, overrides)
    path = weights_path(cfg)
    checkpoint = load_checkpoint(path)
    say_which_weights(cfg, path, checkpoint)
    model = model_from_checkpoint(checkpoint, path).eval()
    tokenizer = tokenizer_from_text(checkpoint["tokenizer"])
    log_path = path.parent / "log.jsonl"
    records = read_log(log_path) if log_path.is_file() else []  # a garbled line: one error naming it
    if not records:
        print(f"no training log at {log_path}: plotting the weights and attention only")
    prompt = PLOT_PROMPT if cfg.prompt == "<|endoftext|>" else cfg.prompt
    for written in plot_run(model, tokenizer, records, path.parent, prompt):
        print(f"wrote {written}")


def plot_run(model: GPT, tokenizer: Tokenizer, records: list[dict], out_dir: Path, prompt: str) -> list[Path]:
    """Write the training curves, attention heatmaps and weight statistics as PNGs in out_dir."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    figures = {}
    train = [r for r in records if r["kind"] == "train"]
    if train:
        evals = [r for r in records if r["kind"] == "eval"]
        figures.update({"loss.png": plot_loss(plt, train, evals), "lr.png": plot_learning_rate(plt, train),
                        "throughput.png": plot_throughput(plt, train)})
    ids = tokenizer.encode_ordinary(prompt)[-min(24, model.config.block_size):]
    if ids:
        figures["attention.png"] = plot_attention(plt, model, tokenizer, ids)
    matrices = {title: [block.get_submodule(key).weight.detach().float().cpu()  # one matrix per layer
                        for block in model.transformer.h] for key, title in WEIGHT_KINDS.items()}
    figures["weights.png"] = plot_weight_histograms(plt, matrices)
    figures["spectral_norms.png"] = plot_spectral_norms(plt, matrices)
    written = []
    for name, fig in figures.items():
        path = out_dir / name
        write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        written.append(path)
    return written


def moving_average(values: list[float], width: int) -> list[float]:
    """Mean of the last `width` values at each point (fewer at the start): the trend through the noise."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def plot_loss(plt, train: list[dict], evals: list[dict]):
    """Does it learn, and does it overfit? Per-step loss is noisy: show it faint, with its moving average."""
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.7, label="train loss (each step)")
    ax.plot(steps, moving_average(losses, max(1, len(losses) // 50)), color="tab:blue", lw=1.5,
            label="train loss (moving average)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:red",
                ms=3, label="val loss (evaluation)")
    # The first few percent of the steps fall from ~ln(V); zoom on the rest, where runs differ.
    val_losses = [r["val_loss"] for r in evals]
    ax.set_ylim(0.97 * min(losses + val_losses), sorted(losses)[int(0.97 * (len(losses) - 1))] + 0.05)
    ax.set(xlabel="step", ylabel="cross-entropy (nats / token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_learning_rate(plt, train: list[dict]):
    """What did the schedule do? Warm-up, then cosine decay."""
    fig, ax = plt.subplots(figsize=(8, 3), layout="constrained")
    ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax.set(xlabel="step", ylabel="learning rate", title="Learning-rate schedule")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    return fig


def plot_throughput(plt, train: list[dict]):
    """How fast did it run? The first steps include warm-up work (allocation, compilation)."""
    fig, ax = plt.subplots(figsize=(8, 3), layout="constrained")
    ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="tab:purple", lw=0.8)
    ax.set(xlabel="step", ylabel="tokens / s", title="Training throughput")
    ax.grid(alpha=0.3)
    return fig


# -- Several runs on one figure: --plot --compare=out/a,out/b ----------------------------------------------

# Settings that do not change what a run learns (or only name where it ran), left out of the legend.
NOT_COMPARED = {"out_dir", "init_from", "ckpt", "gpt2_dir", "log_interval", "always_save_checkpoint",
                "device", "dtype", "compile", "peak_flops"}


def run_settings(folder: Path) -> dict | None:
    """The settings a run in folder trained with (every knob: the defaults, then its checkpoint's config), or
    None when the folder holds no checkpoint."""
    for name in ("ckpt.pt", BEST_FILE):
        if (folder / name).is_file():
            saved = read_checkpoint_lazily(folder / name).get("config")
            defaults = {name: globals()[name] for _, name, _ in config_knobs()}
            return {**defaults, **(saved if isinstance(saved, dict) else {})}
    return None


def comparison_labels(folders: list[Path], settings: list[dict | None]) -> list[str]:
    """A legend label per run: the training settings in which the runs differ (n_layer=4, n_embd=128), or
    the folder's name for a run without a checkpoint or when nothing differs."""
    compared = [name for group, name, _ in config_knobs() if name not in NOT_COMPARED
                and group not in ("sampling, export and plotting", "evaluation")]
    known = [s for s in settings if s is not None]
    differing = [name for name in compared if len({repr(s.get(name)) for s in known}) > 1]
    labels = [", ".join(f"{name}={s[name]}" for name in differing) if s and differing else folder.name
              for folder, s in zip(folders, settings)]
    if len(set(labels)) < len(labels):  # runs alike in every setting compared: their folders tell them apart
        labels = [f"{folder.name}: {label}" if label != folder.name else label
                  for folder, label in zip(folders, labels)]
    return labels


def run_comparison(cfg: SimpleNamespace, overrides: dict) -> None:
    """--plot --compare=A,B,...: the train and val curves of the runs in folders A, B, ... on shared axes, as
    compare.png in the first folder (or --out_dir). Every folder is read before anything is written."""
    folders = [Path(name.strip()) for name in cfg.compare.split(",") if name.strip()]
    runs = []
    for folder in folders:
        log_path = folder / "log.jsonl"
        if not log_path.is_file():
            raise FileNotFoundError(f"--compare: {folder} has no log.jsonl; name the out_dir folders of "
                                    f"training runs")
        records = [r for r in read_log(log_path) if r["kind"] in ("train", "eval")]
        if not records:
            raise ValueError(f"--compare: {log_path} holds no training or evaluation records")
        runs.append(records)
    labels = comparison_labels(folders, [run_settings(folder) for folder in folders])
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    fig = plot_comparison(plt, list(zip(labels, runs)))
    out_dir = Path(cfg.out_dir) if "out_dir" in overrides else folders[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "compare.png"
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    for folder, label in zip(folders, labels):
        print(f"{folder}: {label}")
    print(f"wrote {path}")


def plot_comparison(plt, runs: list[tuple[str, list[dict]]]):
    """Which run learns faster, and which overfits? A colour per run: train loss as a moving average (solid),
    val loss at each evaluation (dashed, dots)."""
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    shown = []
    for i, (label, records) in enumerate(runs):
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        losses = [r["loss"] for r in train]
        if train:
            ax.plot([r["step"] for r in train], moving_average(losses, max(1, len(losses) // 50)),
                    color=f"C{i % 10}", lw=1.2, alpha=0.7, label=None if evals else label)
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o--", color=f"C{i % 10}",
                    ms=3, label=label)
        shown += sorted(losses)[:int(0.97 * len(losses))] + [r["val_loss"] for r in evals]
    ax.set_ylim(0.97 * min(shown), max(shown) + 0.05)  # past the first steps' fall from ~ln(V)
    ax.set(xlabel="step", ylabel="cross-entropy (nats / token)",
           title="Loss: train (moving average, solid) and val (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


@torch.no_grad()
def attention_maps(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Attention weights for one prompt idx (1, T): (n_layer, n_head, T, T), row i = where token i looks.

    Forward hooks catch each attention layer's input; the weights are then recomputed from it with the
    functions manual_attention uses (the fused kernel never materialises them)."""
    inputs = []
    hooks = [block.attn.register_forward_hook(lambda mod, args, out: inputs.append(args))
             for block in model.transformer.h]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for block, (x, rotary, _cache) in zip(model.transformer.h, inputs):
        q, k, _ = block.attn.queries_keys_values(x, rotary)
        maps.append(attention_weights(q, k)[0])
    return torch.stack(maps)


def plot_attention(plt, model: GPT, tokenizer: Tokenizer, ids: list[int]):
    """Where does each head look? One heatmap per (layer, head) for the prompt's tokens."""
    maps = attention_maps(model, torch.tensor([ids], device=model.lm_head.weight.device)).float().cpu()
    labels = [tokenizer.decode([i]).replace("\n", "\\n") for i in ids]
    n_layer, n_head = maps.shape[:2]
    size = 0.18 * len(ids) + 0.8
    fig, axes = plt.subplots(n_layer, n_head, figsize=(size * n_head, size * n_layer), squeeze=False,
                             layout="constrained")
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == n_layer - 1:
                ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=6)
            if head == 0:
                ax.set_yticks(range(len(ids)), labels, fontsize=6)
                ax.set_ylabel(f"layer {layer}", fontsize=8)
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
    fig.suptitle("Attention weights (row: query token, column: the token it attends to)", fontsize=9)
    return fig


def plot_weight_histograms(plt, matrices: dict[str, list[torch.Tensor]]):
    """Are the weights healthy? A histogram per layer for each kind of matrix."""
    n_layer = len(next(iter(matrices.values())))
    colors = plt.cm.viridis([i / max(1, n_layer - 1) for i in range(n_layer)])
    fig, axes = plt.subplots(1, len(matrices), figsize=(4 * len(matrices), 3.2), layout="constrained")
    for ax, (title, weights) in zip(axes, matrices.items()):
        for layer, weight in enumerate(weights):
            ax.hist(weight.flatten().numpy(), bins=80, histtype="step", color=colors[layer],
                    label=f"layer {layer}")
        ax.set(title=title, xlabel="weight value", ylabel="count")
        ax.set_yscale("log")
    axes[-1].legend(fontsize=7)
    return fig


def plot_spectral_norms(plt, matrices: dict[str, list[torch.Tensor]]):
    """Each matrix's largest singular value (its spectral norm: how much it can stretch a vector), which
    grows when training is unstable."""
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    for title, weights in matrices.items():
        ax.plot(range(len(weights)), [torch.linalg.matrix_norm(w, ord=2).item() for w in weights], "o-",
                label=title)
    n_layer = len(next(iter(matrices.values())))
    ax.set(xlabel="layer", ylabel="largest singular value", title="Spectral norm of each weight matrix")
    ax.set_xticks(range(n_layer))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------------------
# 11. Command-line conveniences: --help, the flag checks, --prompt

def help_text() -> str:
    """--help: the commands, then every knob with its default (as typed on the command line) and comment."""
    lines = ["usage: python gpt.py [--key=value ...]      train (the default)",
             "       python gpt.py --sample [--ckpt=out/ckpt.pt] [--prompt=TEXT] ...",
             "       python gpt.py --export_hf=DIR [--ckpt=...]   |   python gpt.py --plot [--out_dir=...]",
             "       python gpt.py --eval=val|hellaswag [--ckpt=...]   |   python gpt.py --eval_text=FILE",
             "       python gpt.py --chat [--ckpt=...] [--prompt=SYSTEM]   a user turn per line of stdin:",
             "                     an empty line is skipped, end of input (Ctrl-D) ends the chat"]
    group = None
    for knob_group, name, comment in config_knobs():
        if knob_group != group:
            group = knob_group
            lines.append(f"\n{group}:")
        default = globals()[name]
        shown = repr(default) if isinstance(default, str) else str(default).lower()  # --bias=true, as typed
        lines.append(f"  --{name}={shown}".ljust(34) + f" {comment}")
    return "\n".join(lines)


def check_config(cfg: SimpleNamespace) -> SimpleNamespace:
    """cfg, once every knob with a fixed set of choices or a range is within it; else a FlagError."""
    if cfg.init_from not in INIT_CHOICES and not cfg.init_from.endswith(".pt"):
        raise FlagError(f"--init_from={cfg.init_from!r} is not one of {', '.join(INIT_CHOICES)} or a "
                        f"checkpoint (PATH/ckpt.pt)")
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        raise FlagError(f"--dtype={cfg.dtype!r} is not one of auto, {', '.join(DTYPES)}")
    for name in ("batch_size", "eval_interval", "eval_iters", "log_interval", "num_samples",
                 "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise FlagError(f"--{name}={getattr(cfg, name)} must be at least 1")
    for name in ("max_steps", "warmup_steps", "lr_decay_steps", "total_batch_tokens", "beam", "top_k",
                 "grad_clip", "early_stop", "eval_stride"):
        if getattr(cfg, name) < 0:
            raise FlagError(f"--{name}={getattr(cfg, name)} must not be negative")
    if not 0 <= cfg.temperature < math.inf:  # nan fails this too
        raise FlagError(f"--temperature={cfg.temperature} must be a finite number >= 0 (0 is greedy)")
    if not 0 < cfg.top_p <= 1:
        raise FlagError(f"--top_p={cfg.top_p} must be in (0, 1]")
    if cfg.eval not in ("", "val", "hellaswag"):
        raise FlagError(f"--eval={cfg.eval!r} is not one of val, hellaswag")
    for name, needs in (("compare", "plot"), ("output_file", "sample")):
        if getattr(cfg, name) and not getattr(cfg, needs):
            raise FlagError(f"--{name} goes with --{needs}: add --{needs}")
    if cfg.optimizer not in ("adamw", "muon"):
        raise FlagError(f"--optimizer={cfg.optimizer!r} is not one of adamw, muon")
    if not 0 <= cfg.muon_lr < math.inf:
        raise FlagError(f"--muon_lr={cfg.muon_lr} must be a finite number >= 0")
    check_post_training_flags(cfg)  # section 13
    return cfg


def check_model_config(config: "GPTConfig") -> None:
    """One clear error for a GPTConfig that cannot be built (flags, or a checkpoint's model_config)."""
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)} must be at least 1")
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}: "
                         f"pick n_embd as a multiple of n_head")
    if config.pos_emb == "rope" and (config.n_embd // config.n_head) % 2:
        raise ValueError(f"rope needs an even head size, got n_embd/n_head = "
                         f"{config.n_embd // config.n_head}")
    choices = {"pos_emb": ("learned", "sinusoidal", "rope"), "norm": ("layernorm", "rmsnorm"),
               "activation": ("gelu", "relu", "relu2"), "attention": ("sdpa", "manual")}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"{name}={getattr(config, name)!r} is not one of {', '.join(allowed)}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout={config.dropout} must be in [0, 1)")
    if not 0.0 <= config.logit_softcap < math.inf:
        raise ValueError(f"logit_softcap={config.logit_softcap} must be a finite number >= 0 (0 is off)")


def check_sampling_flags(cfg: SimpleNamespace, overrides: dict) -> None:
    """Beam search is deterministic and finds one continuation: sampling flags beside it are a mistake."""
    sampling_flags = [k for k in ("temperature", "top_k", "top_p", "greedy") if k in overrides]
    if cfg.beam and sampling_flags:
        raise FlagError(f"--beam is deterministic: drop --{sampling_flags[0]}")
    if cfg.beam and cfg.num_samples > 1:
        raise FlagError("--beam finds one best continuation: drop --num_samples")


def check_schedule(cfg: SimpleNamespace, print_warnings: bool = True) -> None:
    """Refuse a learning-rate schedule that cannot be what was meant; warn about one that can, but surprises.

    --min_lr above --learning_rate would make the cosine "decay" upwards (a fine-tuning command that lowers
    --learning_rate must lower --min_lr too), so it is an error. A zero learning rate is a way to measure a
    model's losses on other data without changing it, and a run shorter than its warm-up is a quick trial
    run, so those two go on, with a warning that says what will happen."""
    for name in ("learning_rate", "min_lr"):
        if not 0 <= getattr(cfg, name) < math.inf:
            raise FlagError(f"--{name}={getattr(cfg, name)} must be a finite number >= 0")
    if cfg.min_lr > cfg.learning_rate:
        raise FlagError(f"--min_lr={cfg.min_lr} is above --learning_rate={cfg.learning_rate}: the cosine "
                         f"would raise the rate as it decays; set --min_lr to about --learning_rate / 10")
    notes = []
    if cfg.learning_rate == 0:
        notes.append("--learning_rate=0: the weights will not change (the losses are still measured)")
    if cfg.max_steps < cfg.warmup_steps:
        notes.append(f"--max_steps={cfg.max_steps} ends inside the warm-up (--warmup_steps="
                        f"{cfg.warmup_steps}): the rate never reaches --learning_rate={cfg.learning_rate}")
    for warning in notes if print_warnings else []:
        print(f"warning: {warning}", file=sys.stderr)


def prompt_text(prompt_flag: str) -> str:
    """--prompt's text: as given, or FILE:path reads it from a file."""
    if not prompt_flag.startswith("FILE:"):
        return prompt_flag
    path = Path(prompt_flag.removeprefix("FILE:"))
    if not path.is_file():
        raise FileNotFoundError(f"--prompt=FILE:{path}: no such file")
    return path.read_text(encoding="utf-8")


def encode_prompt(prompt_flag: str, tokenizer: Tokenizer) -> list[int]:
    """--prompt as ids; FILE:path reads the text from a file. Special tokens in it (<|endoftext|>) count."""
    ids = tokenizer.encode(prompt_text(prompt_flag), allowed_special="all")
    if not ids:
        raise ValueError("--prompt encodes to no tokens: give some text, or leave it out to start a new "
                         "document")
    return ids


# ----------------------------------------------------------------------------------------------------------
# 12. Evaluation and workflow: the best weights kept, early stopping, a checkpoint scored on a whole split,
#     on any text or on HellaSwag, and samples written to a file with their settings

BEST_FILE = "best.pt"


def weights_path(cfg: SimpleNamespace) -> Path:
    """The checkpoint whose weights --sample, --export_hf, --plot and --eval use: --ckpt when given, else
    <out_dir>/best.pt when there is one (the best evaluation's weights), else <out_dir>/ckpt.pt."""
    if cfg.ckpt:
        return Path(cfg.ckpt)
    best = Path(cfg.out_dir) / BEST_FILE
    return best if best.is_file() else Path(cfg.out_dir) / "ckpt.pt"


def weights_source(cfg: SimpleNamespace) -> str | Path:
    """What sampling, scoring and --chat read, for messages: --init_from=gpt2..., or weights_path's file."""
    return cfg.init_from if cfg.init_from.startswith("gpt2") else weights_path(cfg)


def say_which_weights(cfg: SimpleNamespace, path: Path, checkpoint: dict) -> None:
    """Say whose weights are used. --sample says it on stderr (stdout is the sample), and only when it chose
    the file itself: with --ckpt its output stays exactly the sample."""
    if cfg.sample and cfg.ckpt:
        return
    what = f"step {checkpoint['step']}"
    if "val_loss" in checkpoint:  # best.pt
        what += f", val loss {checkpoint['val_loss']:.4f}: the best evaluation; ckpt.pt has the latest state"
    print(f"weights: {path} ({what})", file=sys.stderr if cfg.sample else sys.stdout)


def read_checkpoint_lazily(path: Path) -> dict:
    """A checkpoint whose tensors are read from the file only when used (mmap): for its settings or step, or
    to copy its weights, without loading the optimizer state."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds here (pickle, zip, unsupported global)
        raise ValueError(f"{path} is not a readable checkpoint ({str(e).strip()[:150]})") from None


def best_weights(state: dict, val_loss: float) -> dict:
    """What best.pt holds: a checkpoint's weights and what sampling needs, and the evaluation's val loss."""
    keys = ("model", "model_config", "config", "tokenizer", "step") + (("lora",) if "lora" in state else ())
    return {**{key: state[key] for key in keys}, "val_loss": val_loss}


def keep_best_weights(run: Run, path: Path, state: dict) -> None:
    """Called before ckpt.pt (path) is overwritten with state: the best evaluation's weights stay on disk.

    While ckpt.pt holds the best evaluation's weights they need no other copy. When a later state that is
    not the best is about to replace them, they are first copied to best.pt (read back from ckpt.pt, so no
    copy is kept in memory); from then on best.pt is rewritten at every better evaluation. A run whose last
    evaluation is its best (most short runs) has no best.pt: its ckpt.pt is both."""
    best_path = path.with_name(BEST_FILE)
    if run.step == run.best_step:  # state is the best so far: ckpt.pt will hold it
        if best_path.is_file():  # best.pt holds an earlier, worse evaluation
            save_checkpoint(best_path, best_weights(state, run.best_val_loss))
        return
    if run.best_step < 1 or run.saved_step != run.best_step or not path.is_file():
        return  # the best is step 0 (never saved), or ckpt.pt does not hold it
    if best_path.is_file():
        try:
            if read_checkpoint_lazily(best_path).get("step") == run.best_step:
                return  # kept already
        except ValueError:
            pass  # an unreadable best.pt: write it anew
    on_disk = read_checkpoint_lazily(path)
    if on_disk.get("step") == run.best_step:
        save_checkpoint(best_path, best_weights(on_disk, run.best_val_loss))


def stops_early(run: Run, log: RunLog) -> bool:
    """--early_stop=N: true once N evaluations in a row have not lowered the val loss. The count is saved in
    the checkpoint, so a resumed run goes on counting (and one that stopped early stops again at once)."""
    patience = run.cfg.early_stop
    if not patience or run.evals_since_best < patience:
        return False
    if run.rank == 0:
        kept = ", whose weights go to best.pt" if run.best_step > 0 else ""
        print(f"early stop at step {run.step}: {run.evals_since_best} evaluations without a val loss below "
              f"{run.best_val_loss:.4f} (step {run.best_step}{kept})")
        log.write({"kind": "early_stop", "step": run.step, "evals_without_improvement": run.evals_since_best,
                   "best_step": run.best_step, "best_val_loss": run.best_val_loss})
    return True


# -- Scoring a checkpoint: every token once, with as much context as the window allows ----------------------

class SplitTokens:
    """The tokens of a split's shards as one sequence, read a slice at a time through fresh memmaps (as
    TokenWindows reads them), so memory stays flat on a large split."""

    def __init__(self, data_dir: Path, shard_names: list[str]):
        self.paths = [data_dir / name for name in shard_names]
        self.counts = [shard_token_count(path) for path in self.paths]
        self.firsts = [sum(self.counts[:i]) for i in range(len(self.counts))]

    def __len__(self) -> int:
        return sum(self.counts)

    def __getitem__(self, where: slice) -> np.ndarray:
        start, stop, _ = where.indices(len(self))
        pieces = [np.zeros(0, dtype=np.uint16)]
        for path, first, count in zip(self.paths, self.firsts, self.counts):
            low, high = max(start, first), min(stop, first + count)
            if low < high:
                shard = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(count,))
                pieces.append(np.array(shard[low - first:high - first]))
        return np.concatenate(pieces)


def scoring_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first) per window over a sequence of n_tokens: the window reads tokens start..end-1,
    predicts tokens start+1..end, and scores its predictions of tokens first..end.

    The first window scores everything it predicts; each later one moves on by `stride` tokens and scores
    only the new ones, which so see at least block_size - stride tokens of context. Every token but the
    first is scored exactly once (the first has nothing before it to be predicted from)."""
    if n_tokens < 2:
        return []
    end = min(block_size, n_tokens - 1)
    windows = [(0, end, 1)]
    while end < n_tokens - 1:
        next_end = min(end + stride, n_tokens - 1)
        windows.append((next_end - block_size, next_end, end + 1))
        end = next_end
    return windows


@torch.no_grad()
def score_tokens(model: GPT, tokens, block_size: int, stride: int, batch_size: int,
                 runtime: Runtime) -> tuple[float, int]:
    """(summed loss in nats, tokens scored) over a token sequence (an array, or SplitTokens), in the windows
    scoring_windows cuts, batch_size windows per forward pass. Targets a window does not score are -1,
    which the loss ignores, so the mean it returns times the scored count is their sum."""
    model.eval()
    windows = scoring_windows(len(tokens), block_size, stride)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        rows = torch.from_numpy(np.stack([tokens[start:end + 1] for start, end, _ in batch]).astype(np.int64))
        x, y = rows[:, :-1], rows[:, 1:].clone()  # (B, T) inputs and targets
        for row, (start, _, first) in enumerate(batch):
            y[row, :first - start - 1] = -1  # predicted by an earlier window
        scored = int((y != -1).sum())
        with runtime.autocast():
            _, loss = model(x.to(runtime.device), y.to(runtime.device))
        total, count = total + loss.item() * scored, count + scored
        if (i // batch_size) % 500 == 499:
            print(f"  {count:,} of {len(tokens) - 1:,} tokens scored", flush=True)
    return total, count


def print_score(source, what: str, total: float, count: int, n_tokens: int, n_bytes: int, block_size: int,
                stride: int) -> None:
    """The result line of --eval=val and --eval_text. Bits per byte use the formula training prints (loss
    / ln 2 * tokens / bytes), so the figures compare."""
    if not count:
        raise ValueError(f"{what} holds fewer than 2 tokens: nothing to score")
    loss = total / count
    bits = f", {loss / math.log(2) * n_tokens / n_bytes:.3f} bits/byte" if n_bytes else ""
    print(f"{source} on {what}: {count:,} tokens, each scored once (windows of {block_size}, stride "
          f"{stride}): loss {loss:.4f}, perplexity {math.exp(min(loss, 50.0)):.2f}{bits}")


def read_utf8(path: Path) -> str:
    """--eval_text's file as text; a byte that is not UTF-8 is an error naming the file and its offset."""
    if not path.is_file():
        raise FileNotFoundError(f"--eval_text={path}: no such file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                         f"({e.reason}); convert it to UTF-8 (e.g. iconv -t UTF-8)") from None


def run_evaluation(cfg: SimpleNamespace, overrides: dict) -> None:
    """--eval=val, --eval=hellaswag, --eval_text=FILE: score --ckpt's weights (best.pt, else ckpt.pt; or
    --init_from=gpt2's) and print the result. Bad input is refused before the model is loaded."""
    if cfg.eval and cfg.eval_text:
        raise FlagError("--eval and --eval_text each score something: give one of them")
    text = read_utf8(Path(cfg.eval_text)) if cfg.eval_text else None
    items = read_hellaswag(hellaswag_path(cfg)) if cfg.eval == "hellaswag" else None
    runtime = setup_device(cfg.device, cfg.dtype)
    model, tokenizer = load_for_sampling(cfg, runtime.device)
    gpt2 = cfg.init_from.startswith("gpt2")
    source = cfg.init_from if gpt2 else weights_path(cfg)
    check_model_for_sampling(model, cfg)  # NaN weights
    block = min(cfg.block_size, model.config.block_size) if "block_size" in overrides \
        else model.config.block_size
    if items is not None:
        return run_hellaswag(model, tokenizer, items, hellaswag_path(cfg), source, block, runtime)
    stride = cfg.eval_stride or max(1, block // 2)
    if stride > block:
        raise FlagError(f"--eval_stride={stride} is longer than the context ({block} tokens): tokens would "
                        f"go unscored; use at most {block}")
    if text is not None:
        tokens = np.array(([tokenizer.eot_token] if tokenizer.eot_token is not None else [])
                          + tokenizer.encode_ordinary(text), dtype=np.int64)  # a document, as in the shards
        total, count = score_tokens(model, tokens, block, stride, cfg.batch_size, runtime)
        return print_score(source, cfg.eval_text, total, count, len(tokens), len(text.encode("utf-8")), block,
                           stride)
    data_dir = cfg.data_dir
    if "data_dir" not in overrides and not gpt2:  # the data the checkpoint was trained on
        saved = read_checkpoint_lazily(source).get("config")
        data_dir = saved.get("data_dir", data_dir) if isinstance(saved, dict) else data_dir
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    check_model_fits_data(model, meta, SimpleNamespace(data_dir=str(data_dir), block_size=block))
    if (data_dir / meta["tokenizer"]).read_text(encoding="utf-8") != tokenizer.dumps():
        print(f"warning: {data_dir} was tokenized with another tokenizer than {source}'s: the loss measures "
              f"a token stream the model was not trained on", file=sys.stderr)
    tokens = SplitTokens(data_dir, meta["splits"]["val"]["shards"])
    total, count = score_tokens(model, tokens, block, stride, cfg.batch_size, runtime)
    val = meta["splits"]["val"]
    print_score(source, f"the whole val split of {data_dir}", total, count, val.get("tokens", 0),
                val.get("bytes", 0), block, stride)


# -- HellaSwag: which of 4 endings does the model find likeliest? ------------------------------------------
#
# Each item of HellaSwag's validation set (10,042 of them) is a context ("A man is sitting on a roof. he")
# and 4 endings, one right ("label"). Scored as build-nanogpt scores it (completion style): each ending's
# tokens, after the context, get the model's loss; the prediction is the ending with the lowest mean loss
# per token ("acc_norm": long endings are not penalised for being long), or the lowest summed loss ("acc").
# build-nanogpt reports, for OpenAI's GPT-2 124M, acc_norm 0.2955 and acc 0.2859; random guessing is 0.25.

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_DEFAULT = Path("data") / "hellaswag_val.jsonl"


def hellaswag_path(cfg: SimpleNamespace) -> Path:
    """--hellaswag_file, else data/hellaswag_val.jsonl, downloaded the first time."""
    if cfg.hellaswag_file:
        return Path(cfg.hellaswag_file)
    if not HELLASWAG_DEFAULT.is_file():
        download_hellaswag(HELLASWAG_DEFAULT)
    return HELLASWAG_DEFAULT


def download_hellaswag(path: Path) -> None:
    """HellaSwag's validation jsonl from its authors' repository, written atomically (nothing on failure)."""
    import urllib.request

    print(f"downloading {HELLASWAG_URL} to {path}")
    try:
        with urllib.request.urlopen(HELLASWAG_URL, timeout=60) as response:
            data = response.read()
    except Exception as e:  # no network, a proxy, an HTTP error: urllib raises several kinds
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not download {HELLASWAG_URL} ({reason}): download it elsewhere and pass "
                         f"--hellaswag_file=FILE") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda tmp: Path(tmp).write_bytes(data))


def hellaswag_item(item: object) -> tuple[str, list[str], int]:
    """(context, 4 endings, index of the right one) from one parsed line; ValueError says what is wrong."""
    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    ctx, endings, label = item.get("ctx"), item.get("endings"), item.get("label")
    if not isinstance(ctx, str) or not ctx:
        raise ValueError('"ctx" is missing or not a non-empty string')
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        raise ValueError('"endings" is missing or not a list of 4 strings')
    if isinstance(label, str) and label.isdigit():  # some copies of the data store it as text
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label <= 3:
        raise ValueError(f'"label" is {label!r}, not 0, 1, 2 or 3')
    return ctx, endings, label


def read_hellaswag(path: Path) -> list[tuple[str, list[str], int]]:
    """The items of a HellaSwag jsonl file (a JSON object per line with "ctx", "endings", "label", as in the
    official files); a line that is not one is an error naming the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"--hellaswag_file={path}: no such file (HellaSwag's validation set is "
                                f"{HELLASWAG_URL})")
    items = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(hellaswag_item(json.loads(line)))  # bytes: json decodes UTF-8 (or says it is not)
        except ValueError as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise ValueError(f"{path}, line {number}: {reason}; each line must be a HellaSwag item (ctx, "
                             f"endings: 4 strings, label: 0-3)") from None
    if not items:
        raise ValueError(f"{path} holds no items: expected HellaSwag's jsonl, one item per line")
    return items


@torch.no_grad()
def hellaswag_losses(model: GPT, tokenizer: Tokenizer, ctx: str, endings: list[str], block_size: int,
                     device: torch.device) -> tuple[list[float], list[float]]:
    """(summed, mean) loss in nats of each ending's tokens after the context, the 4 endings as one batch.

    An ending is encoded with a space before it, as it follows the context's last word. A row longer than
    the context window keeps its last block_size + 1 tokens: the ending, and as much context as fits."""
    context = tokenizer.encode_ordinary(ctx)
    rows, ending_lengths = [], []
    for ending in endings:
        ending_ids = tokenizer.encode_ordinary(" " + ending)
        row = (context + ending_ids)[-(block_size + 1):]
        rows.append(row)
        ending_lengths.append(min(len(ending_ids), len(row) - 1))
    width = max(map(len, rows)) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)  # right-padded: causal, so padding changes nothing
    y = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: not an ending token, not scored
    for i, (row, n) in enumerate(zip(rows, ending_lengths)):
        x[i, :len(row) - 1] = torch.tensor(row[:-1])
        y[i, len(row) - 1 - n:len(row) - 1] = torch.tensor(row[-n:])
    logits, _ = model(x.to(device))  # (4, T, V)
    losses = F.cross_entropy(logits.float().transpose(1, 2), y.to(device), ignore_index=-1, reduction="none")
    sums = losses.sum(dim=1)  # (4,)
    return sums.tolist(), (sums / torch.tensor(ending_lengths, device=device)).tolist()


def run_hellaswag(model: GPT, tokenizer: Tokenizer, items: list, path: Path, source, block_size: int,
                  runtime: Runtime) -> None:
    """Accuracy on HellaSwag's items, by the lowest mean loss (acc_norm) and the lowest summed loss (acc)."""
    model.eval()
    right_by_mean = right_by_sum = 0
    for n, (ctx, endings, label) in enumerate(items, start=1):
        with runtime.autocast():
            sums, means = hellaswag_losses(model, tokenizer, ctx, endings, block_size, runtime.device)
        right_by_mean += min(range(4), key=means.__getitem__) == label  # ties: the first ending
        right_by_sum += min(range(4), key=sums.__getitem__) == label
        if n % 1000 == 0:
            print(f"  {n:,} of {len(items):,} items: acc_norm {right_by_mean / n:.4f}", flush=True)
    n = len(items)
    print(f"{source} on HellaSwag ({path}, {n:,} items): acc_norm {right_by_mean / n:.4f} "
          f"({right_by_mean}/{n}, lowest mean loss per ending token), acc {right_by_sum / n:.4f} "
          f"({right_by_sum}/{n}, lowest summed loss)")


# -- Samples to a file ---------------------------------------------------------------------------------------

def write_samples(cfg: SimpleNamespace, model: GPT, tokenizer: Tokenizer, prompt: torch.Tensor, options: dict,
                  shown_prompt: str) -> None:
    """--output_file: num_samples samples, each under a line of the settings that made it. Sample i is drawn
    alone with the generator seeded seed + i, so it is exactly what --seed=<seed + i> prints; the file is
    written atomically, once every sample is drawn."""
    source = weights_source(cfg)
    stop_token, n = options["stop_token"], cfg.num_samples
    samples = []
    for i in range(n):
        seed = cfg.seed + i
        if cfg.beam:
            out = beam_search(model, prompt, cfg.max_new_tokens, cfg.beam, stop_token=stop_token)
            settings = f"beam {cfg.beam}"
        else:
            options["generator"].manual_seed(seed)
            out = model.generate(prompt, cfg.max_new_tokens, **options)
            settings = (f"seed {seed} | temperature {options['temperature']} | top_k {cfg.top_k} | "
                        f"top_p {cfg.top_p}")
        text = shown_prompt + decode_until(out[0, prompt.size(1):].tolist(), tokenizer, stop_token)
        settings += f" | max_new_tokens {cfg.max_new_tokens}" + (" | ignore_eot" if cfg.ignore_eot else "")
        samples.append(f"==> sample {i + 1} of {n} | checkpoint {source} | prompt {cfg.prompt!r} | "
                       f"{settings}\n{text}\n")
    path = Path(cfg.output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda tmp: Path(tmp).write_text("\n".join(samples), encoding="utf-8"))
    seeds = "" if cfg.beam else f" (seeds {cfg.seed} to {cfg.seed + n - 1})"
    print(f"wrote {n} sample(s) to {path}{seeds}")


# ----------------------------------------------------------------------------------------------------------
# 13. Post-training: a new run from any checkpoint, LoRA, instruction tuning and a terminal chat,
#     distillation into a smaller model, DPO
#
# Each is a change to one of the loop's parts, switched on by its flags, never a second loop: the model
# (adapters on frozen weights), the data (chat shards with a loss mask, preference pairs), the loss
# (distillation's, DPO's). With every flag at its default, each hook below gives back what it was given.

def check_post_training_flags(cfg: SimpleNamespace) -> None:
    """The post-training knobs within their ranges; else a FlagError."""
    if cfg.lora_rank < 0:
        raise FlagError(f"--lora_rank={cfg.lora_rank} must not be negative (0 turns LoRA off)")
    if not 0 < cfg.lora_alpha < math.inf:
        raise FlagError(f"--lora_alpha={cfg.lora_alpha} must be a finite number > 0")
    if cfg.lora_targets not in LORA_TARGETS:
        raise FlagError(f"--lora_targets={cfg.lora_targets!r} is not one of {', '.join(LORA_TARGETS)}")
    if not 0 < cfg.distill_temperature < math.inf:
        raise FlagError(f"--distill_temperature={cfg.distill_temperature} must be a finite number > 0")
    if not 0 <= cfg.distill_weight <= 1:
        raise FlagError(f"--distill_weight={cfg.distill_weight} must be in [0, 1]")
    if not 0 < cfg.dpo_beta < math.inf:
        raise FlagError(f"--dpo_beta={cfg.dpo_beta} must be a finite number > 0")


# -- A new run from any checkpoint ---------------------------------------------------------------------------

def model_knobs_of(path: Path) -> dict:
    """The model knobs of the run that wrote the checkpoint at path (block_size, dropout, ...): a run that
    starts from its weights keeps them unless a flag says otherwise (a smaller block_size, a new dropout)."""
    if not path.is_file():
        raise FileNotFoundError(f"--init_from={path}: no such checkpoint (a run's ckpt.pt or best.pt)")
    config = read_checkpoint_lazily(path).get("config")
    return {k: config[k] for k in MODEL_KNOBS if k in config} if isinstance(config, dict) else {}


def fine_tune_from(cfg: SimpleNamespace, overrides: dict, data_tokenizer_text: str) -> tuple[GPT, str]:
    """--init_from=PATH: the checkpoint's weights (best.pt or ckpt.pt of any run) start a new run: step 0,
    a fresh optimizer, the data's tokenizer, which must be the checkpoint's (or extend it: fit_vocabulary)."""
    path = Path(cfg.init_from)
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path, dropout=cfg.dropout)
    check_architecture(model.config, overrides, str(path))
    model = fit_vocabulary(model, checkpoint["tokenizer"], data_tokenizer_text, path, cfg)
    return model, data_tokenizer_text


def fit_vocabulary(model: GPT, model_tokenizer_text: str, data_tokenizer_text: str, source: Path,
                   cfg: SimpleNamespace) -> GPT:
    """The model, for data tokenized with data_tokenizer_text: the model's own tokenizer, or the same plus
    new special tokens after its ids (the chat template's: prepare_fineweb.py --chat), for which the
    vocabulary grows (grow_vocabulary, deterministic from the weights); any other tokenizer is refused."""
    if model_tokenizer_text == data_tokenizer_text:
        return model
    ours, data = tokenizer_from_text(model_tokenizer_text), tokenizer_from_text(data_tokenizer_text)
    new_ids = [i for token, i in data.special_tokens.items() if token not in ours.special_tokens]
    if (data.mergeable_ranks != ours.mergeable_ranks or data.pattern != ours.pattern or not new_ids
            or min(new_ids) < ours.vocab_size
            or any(data.special_tokens.get(token) != i for token, i in ours.special_tokens.items())):
        their_data = "gpt2" if str(source).startswith("gpt2") else "<that run's data folder>/tokenizer.bpe"
        raise ValueError(f"{cfg.data_dir} was tokenized with another tokenizer than {source}'s: prepare it "
                         f"with --tokenizer={their_data}")
    return grow_vocabulary(model, data)


def grow_vocabulary(model: GPT, tokenizer: Tokenizer) -> GPT:
    """The model with the tokenizer's vocabulary, in place: each new row of the embedding (and of an untied
    output layer) starts as the mean of the rows of its name's tokens (<|user|>: those of "user"), or of
    all real rows if the name has none. A new token then reads in like the word it names, and the four
    chat tokens start apart (a row they shared would make them one token: under LoRA, which freezes the
    embedding, for good). A random row would be noise the first steps must undo, and a zero row would give
    it no gradient through the embedding. No random numbers: a run that rebuilds the model from the same
    weights gets the same rows."""
    old = model.config.vocab_size
    config = replace(model.config, vocab_size=tokenizer.vocab_size)
    if config.vocab_size <= old:
        return model
    names = {i: token for token, i in tokenizer.special_tokens.items()}
    sources = [[i for i in tokenizer.encode_ordinary(names.get(new, "").strip("<|>")) if i < old]
               for new in range(old, config.vocab_size)]  # (the ids each new row averages)

    def grown(weight: torch.Tensor) -> nn.Parameter:
        rows = weight.detach()[:old]  # (old, C), the padding rows left behind
        new = [rows[ids].mean(dim=0) if ids else rows.mean(dim=0) for ids in sources]
        return nn.Parameter(pad_rows(torch.cat((rows, torch.stack(new))), config.padded_vocab_size))

    model.lm_head.weight = grown(model.lm_head.weight)
    model.transformer.wte.weight = model.lm_head.weight if config.tie_weights \
        else grown(model.transformer.wte.weight)
    model.transformer.wte.num_embeddings = model.lm_head.out_features = config.padded_vocab_size
    model.config = config
    return model


def fit_gpt2_vocabulary(model: GPT, cfg: SimpleNamespace, meta: dict, data_tokenizer_text: str) -> GPT:
    """--init_from=gpt2...: data with GPT-2's ids trains as it is; data with more (prepare_fineweb.py --chat
    --tokenizer=gpt2) must be GPT-2's tokenizer plus special tokens, which fit_vocabulary gives rows."""
    if int(meta["vocab_size"]) <= model.config.vocab_size:
        return model  # check_model_fits_data checks every id
    return fit_vocabulary(model, gpt2_tokenizer(cfg.gpt2_dir).dumps(), data_tokenizer_text,
                          Path(cfg.init_from), cfg)


# -- LoRA ----------------------------------------------------------------------------------------------------
#
# LoRA (Hu et al., 2021): a fine-tune changes a weight matrix W (out, in) by an update of low rank, so it
# is learned as one: W x + b + (alpha / r) * B (A x), with A (r, in) and B (out, r), r small (4 to 64),
# and W and every other weight frozen. The optimizer's state shrinks with the trainable parameters, and a
# checkpoint holds only A and B, plus the name of the base whose weights they adapt. A is drawn as a Linear's
# weight would be (kaiming-uniform, as peft does) and B starts at 0, so step 0 is the base model exactly.
# Scaling by alpha / r spares re-tuning the learning rate when r changes (the paper's reason). Sampling,
# evaluation, plots and export use a plain GPT with W + (alpha / r) B A as weights (model_from_checkpoint).
#
# Checkpoint: model holds only the adapters ("transformer.h.0.attn.c_attn.lora_A", ...), and
#     lora = {"rank", "alpha", "targets", "base": the run's --init_from (a checkpoint's absolute path, or
#             gpt2...), "base_checksum": the sum of |w| over the base's weights, to notice a changed base}
# A base that is itself a LoRA checkpoint is merged first, like any base loaded by model_from_checkpoint.
# A vocabulary the run's data extended (chat tokens) is rebuilt from the base by fit_vocabulary, which is
# deterministic: the new embedding rows are frozen too, so they are not in the checkpoint.

LORA_TARGETS = {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj"),
                "both": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}  # the Linears per block


class LoRALinear(nn.Module):
    """A frozen Linear's weight and bias (the same Parameters, under the same names) and a trainable low-rank
    update beside them: (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # None without --bias
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear draws its weight
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Through the rank-r bottleneck: A x is (..., r); B = 0 adds exactly 0 until B has learned something.
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return linear(x, self.weight, self.bias) + self.scale * update


def add_lora(model: GPT, cfg: SimpleNamespace, checkpoint: dict | None) -> GPT:
    """--lora_rank > 0: adapters on the chosen matrices, every other weight frozen; else the model as is.
    Resuming, the checkpoint's adapters on its base's weights; the flags must be the run's."""
    saved = checkpoint.get("lora") if checkpoint is not None else None
    wanted = (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) if cfg.lora_rank else None
    if checkpoint is not None and wanted != (saved and (saved["rank"], saved["alpha"], saved["targets"])):
        path = checkpoint_path(cfg)
        has = f"adapters of rank {saved['rank']}, alpha {saved['alpha']:g} on {saved['targets']}" if saved \
            else "no LoRA adapters"
        flags = f"--lora_rank={cfg.lora_rank} --lora_alpha={cfg.lora_alpha:g} " \
                f"--lora_targets={cfg.lora_targets}"
        raise FlagError(f"{flags if wanted else '--lora_rank=0'} but {path} holds {has}: resume without the "
                        f"--lora flags, or start a new run from it with --init_from={path}")
    if not cfg.lora_rank:
        return model
    if checkpoint is not None:
        # build_model merged the adapters into the weights, as sampling wants them; training needs them apart.
        path = checkpoint_path(cfg)
        model = attach_adapters(lora_base_model(checkpoint, path, model.config), saved)
        load_adapters(model, checkpoint["model"], path)
        return model
    if cfg.init_from == "scratch":
        raise FlagError("--lora_rank adapts trained weights: name them with --init_from=PATH/ckpt.pt or gpt2")
    base = cfg.init_from if cfg.init_from.startswith("gpt2") else str(Path(cfg.init_from).resolve())
    if Path(base).name in ("ckpt.pt", BEST_FILE) and Path(base).parent == Path(cfg.out_dir).resolve():
        raise FlagError(f"--init_from={cfg.init_from} is in --out_dir={cfg.out_dir}, where this run's "
                        f"checkpoints would overwrite the base its adapters need: choose another --out_dir")
    lora = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets, "base": base,
            "base_checksum": weights_checksum(model)}
    return attach_adapters(model, lora)


def attach_adapters(model: GPT, lora: dict) -> GPT:
    """Freeze every weight and put adapters on the lora dict's targets in each block; model.lora = lora."""
    model.requires_grad_(False)
    for block in model.transformer.h:
        for target in LORA_TARGETS[lora["targets"]]:
            parent, _, name = target.rpartition(".")
            layer = block.get_submodule(parent)
            setattr(layer, name, LoRALinear(getattr(layer, name), lora["rank"], lora["alpha"]))
    model.lora = lora
    return model


def weights_checksum(model: GPT) -> float:
    """The sum of |w| over every weight (in float64): a base checkpoint overwritten since (a run continued
    into the same file) sums to something else."""
    return sum(p.detach().abs().sum(dtype=torch.float64).item() for p in model.parameters())


def load_adapters(model: GPT, adapters: dict, path: Path) -> None:
    """The checkpoint's adapters into the model's (from attach_adapters); every name and shape must fit."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(adapters) != set(trainable) or any(adapters[k].shape != p.shape for k, p in trainable.items()):
        raise ValueError(f"{path}: its adapters do not fit its lora settings {model.lora['rank']}, "
                         f"{model.lora['targets']} (an edited or damaged checkpoint): train them anew")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(adapters[name])


def lora_base_model(checkpoint: dict, path: Path, config: GPTConfig) -> GPT:
    """A plain GPT(config) with the weights of the LoRA checkpoint's base, as its run started from them (the
    vocabulary extended again, if the run's data added tokens); one line if the base is gone or changed."""
    lora, run_config = checkpoint["lora"], checkpoint["config"]
    base, base_tokenizer = lora["base"], None
    if base.startswith("gpt2"):
        base_model = from_gpt2(base, run_config.get("gpt2_dir") or None, config.vocab_multiple)
    else:
        if not Path(base).is_file():
            raise FileNotFoundError(f"{path} holds LoRA adapters for the base {base}, which is gone: put "
                                    f"that checkpoint back there (the adapters alone are no model)")
        base_checkpoint = load_checkpoint(Path(base))
        base_model = model_from_checkpoint(base_checkpoint, Path(base))  # a LoRA base: merged, recursively
        base_tokenizer = base_checkpoint["tokenizer"]
    if base_model.config.vocab_size != config.vocab_size:  # the run's data added tokens: rebuilt the same way
        base_tokenizer = base_tokenizer or gpt2_tokenizer(run_config.get("gpt2_dir", "")).dumps()
        base_model = fit_vocabulary(base_model, base_tokenizer, checkpoint["tokenizer"], Path(base),
                                    SimpleNamespace(**run_config))
    model = GPT(config)
    try:
        model.load_state_dict(base_model.state_dict())
    except RuntimeError as e:
        raise ValueError(f"{path}: its LoRA base {base} no longer fits the adapters' model "
                         f"({str(e).splitlines()[0]}): restore the base they were trained on") from None
    if not math.isclose(weights_checksum(model), lora["base_checksum"], rel_tol=1e-9):
        raise ValueError(f"{path}: its LoRA base {base} has changed since the adapters were trained on it: "
                         f"restore that checkpoint, or train new adapters with --init_from={base}")
    return model


def merge_adapters(model: GPT, checkpoint: dict, path: Path) -> GPT:
    """The plain model with the checkpoint's adapters merged into its weights: W + (alpha / r) B A."""
    lora, adapters = checkpoint["lora"], checkpoint["model"]
    names = [f"transformer.h.{i}.{target}" for i in range(model.config.n_layer)
             for target in LORA_TARGETS[lora["targets"]]]
    weights = dict(model.named_parameters())
    if set(adapters) != {f"{name}.lora_{m}" for name in names for m in "AB"}:
        raise ValueError(f"{path}: its adapters do not fit its lora settings {lora['rank']}, "
                         f"{lora['targets']} (an edited or damaged checkpoint): train them anew")
    with torch.no_grad():
        for name in names:
            update = adapters[f"{name}.lora_B"].float() @ adapters[f"{name}.lora_A"].float()  # (out, in)
            weights[f"{name}.weight"].add_(update, alpha=lora["alpha"] / lora["rank"])
    return model


def lora_checkpoint(model: GPT, state: dict) -> dict:
    """A LoRA run's checkpoint: the trainable parameters (the adapters) for model, and the lora dict."""
    if not getattr(model, "lora", None):
        return state
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {**state, "model": {k: v for k, v in state["model"].items() if k in trainable}, "lora": model.lora}


def lora_summary(model: GPT) -> str:
    """The start-up line of a LoRA run: what trains, out of how much."""
    lora = model.lora
    total = num_params(model, non_embedding=False)  # padding rows left out, as in the line above it
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"lora: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%), rank "
            f"{lora['rank']}, alpha {lora['alpha']:g}, on {', '.join(LORA_TARGETS[lora['targets']])}; "
            f"base {lora['base']}")


# -- Instruction tuning: chat shards with a loss mask, and a terminal chat -----------------------------------

def post_training_windows(cfg: SimpleNamespace, meta: dict, data_dir: Path,
                          windows: dict[str, TokenWindows]) -> dict[str, TokenWindows]:
    """The training and val windows: chat data's with its loss mask, DPO's pairs, or the plain ones."""
    if cfg.dpo_data:  # DPO's preference pairs: section 13, Distillation and DPO
        return dpo_windows(cfg, meta)
    if any("masks" in meta["splits"][split] for split in windows):  # prepare_fineweb.py --chat
        return {split: MaskedTokenWindows(w, data_dir, meta["splits"][split], split) for split, w in
                windows.items()}
    return windows


class MaskedTokenWindows(TokenWindows):
    """Chat data's windows: the same windows of tokens, with the targets that the loss mask marks as not
    learned (all but the assistant's answers) set to -1, which the loss ignores. The masks are shards of
    the same format beside the token shards (meta.json: "masks", parallel to "shards"), read at the same
    positions. A micro-batch with no learned target at all (a long user message) has a loss of 0 and no
    gradient: the chunked loss divides by at least 1 target."""

    def __init__(self, windows: TokenWindows, data_dir: Path, split_meta: dict, split: str):
        vars(self).update(vars(windows))
        shards, masks = split_meta["shards"], split_meta.get("masks")
        if not isinstance(masks, list) or len(masks) != len(shards):
            raise ValueError(f"{data_dir / 'meta.json'}: the {split} split lists {len(shards)} shards but "
                             f"{len(masks) if isinstance(masks, list) else 'no'} loss masks; re-run "
                             f"prepare_fineweb.py --chat")
        mask_of = {data_dir / shard: data_dir / mask for shard, mask in zip(shards, masks)}
        self.masks = TokenWindows.__new__(TokenWindows)  # the same windows, read from the masks
        vars(self.masks).update(vars(windows), paths=[mask_of[path] for path in windows.paths])
        for path, mask, count in zip(windows.paths, self.masks.paths, windows.token_counts):
            if shard_token_count(mask) != count or shard_max_token_id(mask, None) > 1:
                raise ValueError(f"{mask} is not the loss mask of {path} ({count:,} values of 0 or 1); "
                                 f"re-run prepare_fineweb.py --chat")

    def read(self, window_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().read(window_ids, device)
        _, learned = self.masks.read(window_ids, device)  # (B, T): the mask at the targets' positions
        return x, y.masked_fill(learned == 0, -1)


def run_chat(cfg: SimpleNamespace, overrides: dict) -> None:
    """python gpt.py --chat --ckpt=...: a terminal chat. Each line on stdin is a user turn (an empty line is
    skipped); the reply streams to stdout until <|end|>; end of input ends the chat. --prompt gives the
    system message. The prompt "> " shows only on a terminal, so a pipe's output is the replies alone."""
    for name in ("beam", "num_samples"):
        if name in overrides:
            raise FlagError(f"--{name} is for --sample: --chat answers each line with one sampled reply")
    runtime = setup_device(cfg.device, cfg.dtype)
    quiet = SimpleNamespace(**{**vars(cfg), "sample": True})  # say whose weights on stderr, as --sample does
    model, tokenizer = load_for_sampling(quiet, runtime.device)
    check_model_for_sampling(model, cfg)
    missing = [token for token in CHAT_TOKENS if token not in tokenizer.special_tokens]
    if missing:
        source = weights_source(cfg)
        raise ValueError(f"{source} has no chat tokens ({', '.join(missing)}): fine-tune it first on the "
                         f"data of prepare_fineweb.py --chat (--init_from={source} --data_dir=THAT_FOLDER)")
    session = ChatSession(model, tokenizer, system_message(cfg, overrides), cfg)
    with runtime.autocast(), torch.inference_mode():
        while True:
            if sys.stdin.isatty():
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:  # end of input
                return
            if line.strip():
                session.answer(line.rstrip("\r\n"))


def system_message(cfg: SimpleNamespace, overrides: dict) -> str:
    """--chat's system message: --prompt's text (FILE:path reads a file), none unless it is given."""
    return prompt_text(cfg.prompt) if "prompt" in overrides else ""


class ChatSession:
    """A conversation, kept in the model's KV cache.

    The model sees a window: <|endoftext|> and the system message (kept whatever happens), then the
    exchanges (a user message and the reply), oldest first, then the one in progress. Each new token runs
    alone against the cache, as in GPT.advance, while the window fits in block_size. When it no longer
    does, the oldest exchanges leave it, until it fits with room for a reply, and the rest is computed
    afresh once; a single exchange longer than the context keeps its last block_size tokens.

    Exchanges are kept as the ids the model saw and wrote, never re-encoded from text: a reply encoded
    afresh could split into other tokens than those the model generated."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, system: str, cfg: SimpleNamespace):
        self.model, self.tokenizer = model, tokenizer
        self.head = [tokenizer.eot_token] + (tokenizer.render_message("system", system)[0] if system else [])
        self.exchanges: list[list[int]] = []
        self.current: list[int] = []
        self.caches, self.cached = None, 0  # the caches hold the window's first `cached` tokens
        self.room = min(cfg.max_new_tokens, model.config.block_size // 2)
        self.max_new_tokens = cfg.max_new_tokens
        device = model.lm_head.weight.device
        self.sampling = dict(temperature=0.0 if cfg.greedy else cfg.temperature, top_k=cfg.top_k or None,
                             top_p=None if cfg.top_p == 1.0 else cfg.top_p,
                             generator=torch.Generator(device=device).manual_seed(cfg.seed))

    def window(self) -> list[int]:
        return self.head + [i for exchange in self.exchanges for i in exchange] + self.current

    def next_token_logits(self) -> torch.Tensor:
        """(1, V) logits for the token after the window; only the tokens not yet cached run."""
        block, window = self.model.config.block_size, self.window()
        if self.caches is None or len(window) > block:
            while self.exchanges and len(window) > block - self.room:
                self.exchanges.pop(0)  # the oldest exchange leaves the window
                window = self.window()
            window = window[-block:]
            self.caches, self.cached = self.model.new_caches(1, block), 0
        new = torch.tensor([window[self.cached:]], device=self.model.lm_head.weight.device)
        self.cached = len(window)
        return self.model.next_token_logits(new, self.caches)

    def answer(self, text: str) -> list[int]:
        """Stream the reply to a user message to stdout; returns its ids (without <|end|>)."""
        tokenizer, specials = self.tokenizer, set(self.tokenizer.special_tokens.values())
        self.current = tokenizer.render_message("user", text)[0] + [tokenizer.special_tokens["<|assistant|>"]]
        utf8, reply = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
        for _ in range(self.max_new_tokens):
            token = sample_from_logits(self.next_token_logits(), **self.sampling).item()
            if token in specials:  # <|end|>; any special token ends a reply, since no content holds one
                break
            reply.append(token)
            self.current.append(token)
            sys.stdout.write(utf8.decode(tokenizer.decode_bytes([token])))
            sys.stdout.flush()
        print(utf8.decode(b"", final=True), flush=True)
        # Closed as the template closes every message; the model reads <|end|> with the next turn.
        self.exchanges.append(self.current + [tokenizer.special_tokens[CHAT_END]])
        self.current = []
        return reply


# -- Distillation and DPO: other losses for the same loop ----------------------------------------------------
#
# Distillation (Hinton et al., 2015) trains a student on a teacher's whole distribution, not just the one
# token that came next: both are softened by a temperature T, and the student's cross-entropy is mixed
# with KL(teacher || student), scaled by T^2 so that its gradients keep their size as T grows. DPO (Rafailov
# et al., 2023) trains on pairs of answers to one prompt, a chosen and a rejected one: the policy's
# log-probability of each, minus the frozen reference's, is its implicit reward, and the loss pushes the
# chosen answer's reward above the rejected one's, -log sigmoid(beta * difference). Both losses need the
# full (B, T, V) logits of their micro-batch, so they suit small models (or small batches).

@dataclass
class PostTraining:
    """The frozen models a loss may need beside the one being trained."""
    teacher: GPT | None = None     # --teacher: distillation's
    reference: GPT | None = None   # --dpo_data: DPO's, the model the run starts from


def frozen_model(spec: str, cfg: SimpleNamespace, runtime: Runtime, flag: str, tokenizer_text: str) -> GPT:
    """A model that only scores (eval mode, no gradients, on the run's device): a checkpoint's (PATH) or
    OpenAI's GPT-2 (gpt2...). Refused in one line unless its tokenizer is tokenizer_text, the run's: the
    two models' predictions are compared token id by token id."""
    if spec in GPT2_SIZES:
        same_tokenizer = gpt2_tokenizer(cfg.gpt2_dir).dumps() == tokenizer_text
        remedy = "prepare the data with prepare_fineweb.py --tokenizer=gpt2"
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{flag}={spec}: no such checkpoint (a run's ckpt.pt or best.pt, or "
                                    f"gpt2...)")
        checkpoint = load_checkpoint(path)
        same_tokenizer = checkpoint["tokenizer"] == tokenizer_text
        remedy = "use a model trained on data prepared with --tokenizer=<its data folder>/tokenizer.bpe"
    if not same_tokenizer:
        raise ValueError(f"{flag}={spec} has another tokenizer than this run's data: the two models' "
                         f"predictions are compared token by token; {remedy}")
    # Trap: GPT() draws its initial weights from the generator that dropout uses, which a resumed run has
    # restored by now; building this model must leave it where it was.
    with torch.random.fork_rng(devices=[]):
        model = from_gpt2(spec, cfg.gpt2_dir or None) if spec in GPT2_SIZES else \
            model_from_checkpoint(checkpoint, path)
    return model.to(runtime.device).eval().requires_grad_(False)


def start_post_training(cfg: SimpleNamespace, model: GPT, runtime: Runtime,
                        tokenizer_text: str) -> PostTraining:
    """The teacher and the reference the flags ask for (none by default); each must have the run's
    tokenizer, tokenizer_text (for DPO, the start model's own: dpo_meta made it the run's)."""
    if cfg.teacher:
        teacher = frozen_model(cfg.teacher, cfg, runtime, "--teacher", tokenizer_text)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"--teacher={cfg.teacher} scores {teacher.config.vocab_size} token ids, the "
                             f"model {model.config.vocab_size}: distil from a model of the same vocabulary")
        if teacher.config.block_size < cfg.block_size:
            raise ValueError(f"--teacher={cfg.teacher} has a context of {teacher.config.block_size} tokens, "
                             f"shorter than --block_size={cfg.block_size}: lower --block_size")
        return PostTraining(teacher=teacher)
    if cfg.dpo_data:
        start = dpo_start(cfg)
        # A resumed run's settings say init_from=resume: this one keeps its start model's name there
        # instead, so that every later resume finds the same reference.
        cfg.init_from = start
        reference = frozen_model(start, cfg, runtime, "--init_from", tokenizer_text)
        return PostTraining(reference=reference)
    return PostTraining()


def training_loss(run: Run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of one micro-batch: the model's cross-entropy, or distillation's or DPO's loss."""
    cfg = run.cfg
    if run.post.reference is not None:
        return preference_loss(run.train_model, run.post.reference, x, y, cfg.dpo_beta)
    if run.post.teacher is not None and cfg.distill_weight > 0:  # weight 0: exactly the plain loss below
        weight, temperature = cfg.distill_weight, cfg.distill_temperature
        cross_entropy, kl = distillation_terms(run.train_model, run.post.teacher, x, y, temperature)
        return (1 - weight) * cross_entropy + weight * temperature ** 2 * kl
    _, loss = run.train_model(x, y)
    return loss


def post_training_metrics(run: Run) -> dict:
    """What an evaluation adds to its record: DPO's reward margin and accuracy on held-out pairs, or the
    distillation term on the val windows."""
    if run.post.reference is not None:
        return preference_metrics(run)
    if run.post.teacher is not None:
        return distillation_metrics(run)
    return {}


def eval_sums(run: Run, split: str, measure, count: int) -> list[float]:
    """measure(x, y) -> a (count,) tensor of sums, added up over the batches evaluate() scores on split: the
    same windows (a generator seeded afresh), shared among the processes the same way (a process may get
    none, with more processes than --eval_iters: its zeros still join the all-reduce)."""
    cfg, device = run.cfg, run.runtime.device
    windows = run.windows[split]
    batches = windows.draw(torch.Generator().manual_seed(cfg.seed), cfg.eval_iters, cfg.batch_size)
    total = torch.zeros(count, device=device)
    run.fast_model.eval()
    with torch.no_grad():
        for i in range(run.rank, cfg.eval_iters, run.world_size):
            x, y = windows.read(batches[i], device)
            with run.runtime.autocast():
                sums = measure(x, y).float()
            total += sums
    run.fast_model.train()
    if run.world_size > 1:
        dist.all_reduce(total)
    return total.tolist()


# Distillation: the teacher's softened distribution as a second target.

def distillation_terms(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the student's cross-entropy, KL(softmax(teacher / T) || softmax(student / T))), each a mean over
    the positions whose target is not -1. Both models' logits cover the real vocabulary only, soft-capped
    as the model's loss caps them (GPT.logits); float32 for the softmaxes."""
    logits = student(x)[0].float().flatten(0, 1)  # (B*T, V)
    with torch.no_grad():
        teacher_logits = teacher(x)[0].float().flatten(0, 1)  # (B*T, V)
    targets = y.flatten()
    counted = targets != -1
    count = counted.sum().clamp(min=1)
    cross_entropy = F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum") / count
    student_log = F.log_softmax(logits / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)  # (B*T,)
    return cross_entropy, torch.where(counted, kl, 0.0).sum() / count


def distillation_metrics(run: Run) -> dict:
    """The distillation term, KL(teacher || student) at --distill_temperature, on the val windows (the
    val loss is the cross-entropy term)."""
    def measure(x, y):
        _, kl = distillation_terms(run.fast_model, run.post.teacher, x, y, run.cfg.distill_temperature)
        return kl[None]
    kl = eval_sums(run, "val", measure, 1)[0] / run.cfg.eval_iters
    if run.rank == 0:
        print(f"distillation at step {run.step}: val KL(teacher || student) {kl:.4f} "
              f"(T={run.cfg.distill_temperature:g})")
    return {"val_distill_kl": kl}


# DPO: preference pairs read like token windows, and their loss.

def dpo_start(cfg: SimpleNamespace) -> str:
    """The model a DPO run starts from, which stays its reference: --init_from (a resumed run's, as its
    checkpoint recorded it)."""
    if cfg.teacher:
        raise FlagError("--teacher and --dpo_data are two different losses: use one of them")
    start = cfg.init_from
    if start == "resume":
        config = read_checkpoint_lazily(checkpoint_path(cfg)).get("config")
        start = config.get("init_from", "") if isinstance(config, dict) else ""
    if start not in GPT2_SIZES and not start.endswith(".pt"):
        raise FlagError(f"--dpo_data needs a model to start from, which is also its reference: "
                        f"--init_from=PATH/ckpt.pt or gpt2..., not {start or 'nothing'}")
    if start in GPT2_SIZES:
        return start
    if not Path(start).is_file():
        raise FileNotFoundError(f"--init_from={start}: no such checkpoint (DPO's start and reference model)")
    out = Path(cfg.out_dir).resolve()
    if Path(start).resolve() in (out / "ckpt.pt", out / BEST_FILE):
        raise FlagError(f"--init_from={start} is a file this run overwrites, but it must stay DPO's "
                        f"reference: copy it elsewhere, or choose another --out_dir")
    return str(Path(start).resolve())  # absolute: a resume from another folder finds the reference


def start_tokenizer(start: str, cfg: SimpleNamespace) -> str:
    """The tokenizer (as text) of DPO's start model: its checkpoint's, or GPT-2's."""
    if start in GPT2_SIZES:
        return gpt2_tokenizer(cfg.gpt2_dir).dumps()
    return read_checkpoint_lazily(Path(start))["tokenizer"]


def dpo_meta(cfg: SimpleNamespace) -> dict:
    """What start_run needs of meta.json, for DPO, which reads no shards: the start model's tokenizer (written
    to out_dir/dpo_tokenizer.bpe, a name no other program writes, where build_model reads it) and empty
    splits (post_training_windows reads the pairs instead)."""
    if cfg.batch_size % 2:
        raise FlagError(f"--batch_size={cfg.batch_size} must be even with --dpo_data: a micro-batch holds "
                        f"chosen/rejected pairs")
    text = start_tokenizer(dpo_start(cfg), cfg)
    path = Path(cfg.out_dir).resolve() / "dpo_tokenizer.bpe"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    tokenizer = tokenizer_from_text(text)
    return {"dataset": cfg.dpo_data, "tokenizer": str(path), "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_token, "splits": {split: {"shards": [], "tokens": 0, "bytes": 0}
                                                      for split in ("train", "val")}}


DPO_FIELDS = ("prompt", "chosen", "rejected")


def read_preference_pairs(path: Path, tokenizer: Tokenizer, block_size: int) -> list[tuple]:
    """--dpo_data's lines as (chosen ids, rejected ids, prompt length): each sequence is <|endoftext|> +
    prompt + response + <|endoftext|>, or, for a model with the chat tokens, the conversation --chat has:
    <|endoftext|><|user|> prompt <|end|><|assistant|> response <|end|>. It is cut to block_size + 1 tokens
    at the response's end; the prompt length counts the leading tokens. A line that is not such a pair is
    refused in one line."""
    if not path.is_file():
        raise FileNotFoundError(f"--dpo_data={path}: no such file (a jsonl of {{prompt, chosen, rejected}})")
    eot, pairs = tokenizer.eot_token, []
    if eot is None:
        raise ValueError("the tokenizer has no <|endoftext|> token, which DPO's sequences start and end with")
    chat = all(token in tokenizer.special_tokens for token in CHAT_TOKENS)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path} line {number}"
            try:
                item = json.loads(raw.decode("utf-8")) if raw.strip() else None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{where}: not a JSON object ({type(e).__name__}: {str(e)[:80]}); each line "
                                 f"is {{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}}") from None
            if item is None:
                continue  # a blank line
            if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in DPO_FIELDS):
                raise ValueError(f"{where}: needs the string fields prompt, chosen and rejected; fix the "
                                 f"line")
            if chat:  # the prompt as a user turn, the answers as the assistant's: the format --chat speaks
                prompt = tokenizer.render_chat([{"role": "user", "content": item["prompt"]}])[0] + \
                    [tokenizer.special_tokens["<|assistant|>"]]
                end = [tokenizer.special_tokens[CHAT_END]]
            else:
                prompt, end = [eot] + tokenizer.encode_ordinary(item["prompt"]), [eot]
            if len(prompt) > block_size:
                raise ValueError(f"{where}: the prompt is {len(prompt) - 1} tokens, which leaves no room for "
                                 f"an answer in --block_size={block_size}: shorten it or raise --block_size")
            chosen, rejected = ((prompt + tokenizer.encode_ordinary(item[k]) + end)[:block_size + 1]
                                for k in ("chosen", "rejected"))
            pairs.append((chosen, rejected, len(prompt)))
    if len(pairs) < 2:
        raise ValueError(f"--dpo_data={path} holds {len(pairs)} pair(s): DPO needs at least 2 (the last 10% "
                         f"are held out for evaluation)")
    return pairs


class PreferencePairs:
    """One split's DPO pairs, with TokenWindows' interface (num_windows, draw, read): a window is a pair.
    A micro-batch of batch_size sequences holds batch_size // 2 pairs: row 2i the prompt and the chosen
    answer, row 2i + 1 the prompt and the rejected one. Rows are padded on the right to the longest in the
    batch (causal attention: padding never changes the positions before it), and targets are -1 except on
    the answer's tokens, its closing <|endoftext|> (or <|end|>) included."""

    def __init__(self, pairs: list[tuple], block_size: int, pad_id: int):
        self.pairs, self.block_size, self.pad_id = pairs, block_size, pad_id
        self.num_windows = len(pairs)

    def draw(self, generator: torch.Generator, num_batches: int, batch_size: int) -> torch.Tensor:
        """(num_batches, batch_size // 2) random pair ids: the data order's only randomness is generator's."""
        return torch.randint(self.num_windows, (num_batches, batch_size // 2), generator=generator)

    def read(self, pair_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(P,) pair ids -> inputs x and targets y, each (2P, T) int64 on device, T the longest row."""
        rows = [(self.pairs[i][side], self.pairs[i][2]) for i in pair_ids.tolist() for side in (0, 1)]
        width = max(len(ids) for ids, _ in rows) - 1
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), -1, dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(rows):
            ids = torch.tensor(ids)
            x[row, :len(ids) - 1] = ids[:-1]
            y[row, prompt_length - 1:len(ids) - 1] = ids[prompt_length:]  # the answer's tokens only
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def dpo_windows(cfg: SimpleNamespace, meta: dict) -> dict[str, PreferencePairs]:
    """--dpo_data's pairs, tokenized with the run's tokenizer: the last 10% (at least 1) are the val pairs."""
    tokenizer = tokenizer_from_text(Path(meta["tokenizer"]).read_text(encoding="utf-8"))
    pairs = read_preference_pairs(Path(cfg.dpo_data), tokenizer, cfg.block_size)
    held_out = max(1, len(pairs) // 10)
    return {split: PreferencePairs(part, cfg.block_size, tokenizer.eot_token)
            for split, part in (("train", pairs[:-held_out]), ("val", pairs[-held_out:]))}


def sequence_log_probs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) each row's summed log-probability of its targets (those that are not -1)."""
    logits = model(x)[0].float()  # (B, T, V)
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")  # 0 at -1
    return -nll.view(y.shape).sum(1)


def preference_margins(policy: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       beta: float) -> torch.Tensor:
    """(P,) DPO's reward margins of the P pairs in x, y: beta * ((pc - rc) - (pr - rr)), p the policy's
    log-probability of an answer, r the reference's, c chosen, r rejected."""
    policy_log_probs = sequence_log_probs(policy, x, y)  # (2P,)
    with torch.no_grad():
        reference_log_probs = sequence_log_probs(reference, x, y)
    rewards = policy_log_probs - reference_log_probs
    return beta * (rewards[0::2] - rewards[1::2])


def preference_loss(policy: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """DPO's loss, the pairs' mean -log sigmoid(margin): ln 2 where the policy is still the reference."""
    return -F.logsigmoid(preference_margins(policy, reference, x, y, beta)).mean()


class PreferenceLoss(nn.Module):
    """For evaluate(), which scores model(x, y): DPO's loss of the pairs in x, y instead of cross-entropy, so
    that the val loss printed, kept with best.pt and watched by --early_stop is the one DPO lowers."""

    def __init__(self, policy: nn.Module, reference: GPT, beta: float):
        super().__init__()
        self.policy, self.beta = policy, beta
        # In a tuple, not a submodule: evaluate's .train() afterwards must leave the reference in eval mode.
        self.frozen = (reference,)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, preference_loss(self.policy, self.frozen[0], x, y, self.beta)


def evaluated_model(run: Run) -> nn.Module:
    """What evaluate() scores: the model (its cross-entropy), or for DPO the pairs' preference loss."""
    if run.post.reference is None:
        return run.fast_model
    return PreferenceLoss(run.fast_model, run.post.reference, run.cfg.dpo_beta)


def preference_metrics(run: Run) -> dict:
    """DPO on the val pairs evaluate() scores: the mean reward margin, and the share of pairs whose chosen
    answer the policy prefers more than the reference does (margin > 0)."""
    def measure(x, y):
        margins = preference_margins(run.fast_model, run.post.reference, x, y, run.cfg.dpo_beta)
        count = torch.tensor(float(margins.numel()), device=x.device)
        return torch.stack([margins.sum(), (margins > 0).float().sum(), count])
    margin_sum, preferred, pairs = eval_sums(run, "val", measure, 3)
    record = {"dpo_val_margin": margin_sum / pairs, "dpo_val_accuracy": preferred / pairs}
    if run.rank == 0:
        print(f"DPO at step {run.step}: val reward margin {record['dpo_val_margin']:.4f}, accuracy "
              f"{record['dpo_val_accuracy']:.1%} of {pairs:.0f} pairs")
    return record


if __name__ == "__main__":
    main()
