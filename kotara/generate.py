"""Generating text from the fused model (DESIGN §5a): M >= 2 causal LMs decoded as one.

Every step, each model runs one forward over the new token only, with its own KV cache
(``transformers.DynamicCache``); the next-token distribution is the same fused q that scoring uses,
``moc_kernels.fused_log_probs`` over the whole vocabulary, with the strategy's weights computed
from that step's logits (``entropy``, ``gap``, ``mixture_*``) or fixed (``average``, ``poe``,
``mixture``). Greedy takes argmax q; sampling reshapes q by the decoding temperature, then
``top_k``, then ``top_p`` (always on q, after fusion, never on one model), and draws.

Each model is stepped the way its own ``generate`` steps it: the arguments of every forward (the new
tokens, the mask or none, positions, the cache ``generate`` would create) come from the model's
``prepare_inputs_for_generation`` and ``_update_model_kwargs_for_generation``, so attention models,
sliding windows, soft-capping, state-space models (Mamba, Mamba2, FalconMamba) and hybrids (Jamba,
RecurrentGemma) decode what their own greedy ``generate`` decodes (tests/test_kotara_architectures.py).
Prompts are batched with left padding. Each model is probed once on a tiny batch (prefill and two
steps): one whose padded row does not give the unpadded row's logits is run in groups of prompts of
equal length instead, one group after the other (the results are the same, the batch is just split);
one whose other rows change when a finished row is dropped from the cache (a state kept outside the
cache, as RecurrentGemma's) carries its finished rows to the batch's end, as ``generate`` does.
Elsewhere rows that finish (EOS, a stop string) leave the batch and every cache at once. A module
passed twice (A+A) runs once per step.
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

import moc_kernels
from kotara.loading import LoadedModel, model_label, resolve_prefix

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class Generation:
    """One prompt's completion. ``token_ids`` are the generated ids (an ending EOS included, the
    prompt excluded); ``weights[t][i]`` is the weight model i received at generated token t."""

    prompt: str
    completion: str  # decoded text, without an ending EOS and cut before a stop string
    token_ids: list[int]
    weights: list[list[float]]
    strategy: str
    finish_reason: str  # "eos", "stop" or "length"

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "completion": self.completion,
            "token_ids": self.token_ids,
            "weights": self.weights,
            "strategy": self.strategy,
            "finish_reason": self.finish_reason,
        }


@dataclass
class Sampling:
    """How the next token is chosen from log q. Greedy unless ``do_sample``."""

    do_sample: bool = False
    temperature: float = 1.0  # decoding temperature: q^(1/temperature), renormalised
    top_k: int | None = None  # keep the k most probable tokens (ties at the k-th value all kept)
    top_p: float | None = None  # then the fewest most probable tokens whose probability sums to >= top_p

    def check(self) -> None:
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ValueError(f"sampling temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def restrict_support(scores: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``scores`` [N, V] (log-probabilities up to a per-row constant) with the tokens outside the
    top-k / top-p set at -inf. top-k keeps every token scoring at least the k-th largest score;
    top-p then keeps the fewest most probable tokens whose probabilities (``softmax(scores)`` after
    top-k) sum to at least ``top_p``, at least one token."""
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Token j is kept while the mass of the tokens before it is still < top_p (so token 0 always is).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scores


def next_tokens(log_q: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row: log_q [N, V] fp32 -> [N] int64 (argmax, or a draw as ``sampling`` says)."""
    if not sampling.do_sample:
        return log_q.argmax(-1)
    scores = restrict_support(log_q / sampling.temperature, sampling.top_k, sampling.top_p)
    return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(1)


# ------------------------------------------------------------------------------------------ models


def _new_cache(module: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    config = module.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    try:  # transformers 5: the config tells the cache its layer types (sliding windows, ...)
        return DynamicCache(config=config)
    except TypeError:  # older releases take no config
        return DynamicCache()


@dataclass
class StepModel:
    """A causal LM as generation calls it: how its forward takes the cache, positions and logits."""

    name: str
    module: torch.nn.Module
    device: torch.device
    columns: int  # logit columns (may exceed the vocabulary: padding, dropped)
    cache_arg: str = field(init=False)
    takes_positions: bool = field(init=False)
    takes_logits_to_keep: bool = field(init=False)

    def __post_init__(self) -> None:
        params = inspect.signature(self.module.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.takes_positions = "position_ids" in params
        self.takes_logits_to_keep = "logits_to_keep" in params

    @classmethod
    def wrap(cls, model: LoadedModel | torch.nn.Module, index: int) -> StepModel:
        if isinstance(model, LoadedModel):
            return cls(model.name, model.module, model.device, model.logit_columns)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        columns = head.weight.shape[0] if head is not None else int(model.config.vocab_size)
        return cls(model_label(index), model, next(model.parameters()).device, int(columns))

    def last_logits(self, input_ids: torch.Tensor, cache: Any, mask: torch.Tensor | None, positions) -> torch.Tensor:
        """Logits [B, columns] after the last position of ``input_ids`` [B, T], extending ``cache``."""
        kwargs: dict[str, Any] = {self.cache_arg: cache, "use_cache": True}
        if mask is not None:
            kwargs["attention_mask"] = mask
        if positions is not None and self.takes_positions:
            kwargs["position_ids"] = positions
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1  # the prefill needs the last position's logits only
        out = self.module(input_ids=input_ids, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1]

    def max_positions(self) -> int | None:
        value = getattr(self.module.config, "max_position_embeddings", None)
        return int(value) if value else None


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: the count of real tokens before each one (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _cache_for_generation(module: torch.nn.Module) -> Any:
    """The cache ``generate`` would start with: a DynamicCache built from the config, or None for the
    models that build their own (``_supports_default_dynamic_cache`` false)."""
    supports = getattr(module, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return None
    return _new_cache(module)


class PaddedRunner:
    """One model stepped the way its own ``generate`` steps it, over a (left-padded) batch.

    Each forward's arguments come from the model's ``prepare_inputs_for_generation`` (which slices the
    new tokens, passes or drops the mask, builds 4D masks for sliding windows, ...) and are extended by
    its ``_update_model_kwargs_for_generation``, from the running ids, the 2D mask, the position ids
    (``cumsum(mask) - 1``, as ``generate`` makes them) and the cache ``generate`` would create. So
    Mamba gets no full-length mask with one new token, Jamba and RecurrentGemma get their own states.
    Rows that finish leave the batch only where the probe showed that selecting cache rows is exact
    (see :func:`_probe`); elsewhere they are carried along (fed their last token, their logits unused),
    as ``generate`` itself carries finished rows.
    """

    def __init__(self, model: StepModel) -> None:
        self.model = model
        self.module = model.module

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, compacts: bool | None = None) -> torch.Tensor:
        device = self.model.device
        self.ids = input_ids.to(device)
        mask = mask.to(device)
        self.kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": True}
        cache = _cache_for_generation(self.module)
        if cache is not None:
            self.kwargs[self.model.cache_arg] = cache
        if self.model.takes_positions:
            self.kwargs["position_ids"] = _positions(mask)
        if self.model.takes_logits_to_keep:
            self.kwargs["logits_to_keep"] = 1
        if not _generation_params()[0]:  # transformers 4: generate slices the new tokens by cache_position
            self.kwargs["cache_position"] = torch.arange(input_ids.shape[1], device=device)
        self.active: torch.Tensor | None = None  # rows of the batch still generating (None: all)
        if compacts is None:
            compacts = _probe(self.model).compacts if input_ids.shape[0] > 1 else True
        self.compacts = compacts
        return self._forward(first=True)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        next_ids = next_ids.to(self.model.device)
        if self.active is not None:  # finished rows are carried: fed their last token again
            full = self.ids[:, -1].clone()
            full[self.active] = next_ids
            next_ids = full
        self.ids = torch.cat([self.ids, next_ids[:, None]], dim=1)
        logits = self._forward(first=False)
        return logits if self.active is None else logits[self.active]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` ([b] int64, positions among the rows still generating)."""
        rows = rows.to(self.model.device)
        if not self.compacts:
            self.active = rows if self.active is None else self.active[rows]
            return
        batch = self.ids.shape[0]
        self.ids = self.ids[rows]
        for key, value in list(self.kwargs.items()):
            if key == "cache_position":
                continue
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                self.kwargs[key] = value[rows]
            elif hasattr(value, "batch_select_indices"):
                value.batch_select_indices(rows)

    def _forward(self, first: bool) -> torch.Tensor:
        module = self.module
        kwargs = dict(self.kwargs)
        takes_next_length, params = _generation_params()
        if takes_next_length:
            kwargs["next_sequence_length"] = None if first else 1
        if "is_first_iteration" in params or takes_next_length:
            kwargs["is_first_iteration"] = first
        inputs = module.prepare_inputs_for_generation(self.ids, **kwargs)
        out = module(**inputs, return_dict=True)
        self.kwargs = module._update_model_kwargs_for_generation(out, self.kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1]


class GroupedRunner(PaddedRunner):
    """A model whose padded rows do not give its unpadded rows' logits (the probe says so): the batch
    is generated in groups of equal prompt length, one group after the other, with no padding at all
    (``generate_batch`` splits it; every model then runs group by group)."""


@functools.cache
def _generation_params() -> tuple[bool, frozenset[str]]:
    """(whether ``prepare_inputs_for_generation`` takes ``next_sequence_length`` (transformers 5), its
    parameters); read on first use: importing transformers' generation code costs seconds that
    ``import kotara`` (the CLI's error paths, the word path's toy models) does not need."""
    try:
        from transformers import GenerationMixin
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False, frozenset()
    params = frozenset(inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters)
    return "next_sequence_length" in params, params


@dataclass
class _Probe:
    pads: bool  # a left-padded row gives the logits of the same row unpadded, at the prefill and a step
    compacts: bool  # dropping a finished row from the batch (cache rows selected) leaves the others exact


_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # Different shapes round differently: ~1e-6 relative in fp32, up to ~1e-2 through a deep bf16 model.
    # A model that ignores the mask, the positions or its cache is off by far more (tens of percent).
    tolerance = 1e-4 if got.dtype == torch.float32 else 5e-2
    return bool((got.double() - want.double()).norm() <= tolerance * want.double().norm())


@torch.no_grad()
def _probe(model: StepModel) -> _Probe:
    """Run once per model (2-3 rows, 3 tokens, two steps): does left padding give the unpadded logits at
    the prefill and at the steps after it (a state-space model fed a full-length mask with one new token
    fails here), and does dropping a finished row (selecting cache rows) keep the other rows exact
    (false for models that keep states outside the cache, as RecurrentGemma does)?"""
    if model.module in _PROBES:
        return _PROBES[model.module]
    device = model.device
    steps = [torch.tensor([4, 4], device=device), torch.tensor([1, 1], device=device)]

    def run(ids: list[list[int]], drop_first_row_after: int | None = None) -> list[torch.Tensor]:
        """The last row's logits at the prefill and each step."""
        width = max(len(r) for r in ids)
        tokens = torch.tensor([[0] * (width - len(r)) + r for r in ids], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=device)
        runner = PaddedRunner(model)
        out = [runner.prefill(tokens, mask, compacts=True)]
        for k, step in enumerate(steps):
            if drop_first_row_after == k:
                runner.keep(torch.tensor([len(ids) - 1]))
            out.append(runner.step(step[: runner.ids.shape[0]]))
        return [o[-1] for o in out]

    errors = (ValueError, RuntimeError, TypeError, NotImplementedError, AttributeError, IndexError)
    try:
        alone = run([[2, 3]])
        pads = all(_close(p, a) for p, a in zip(run([[1, 2, 3], [2, 3]]), alone))
    except errors:
        pads = False
    try:
        rows = [[1, 2, 3], [2, 3]] if pads else [[1, 2, 3], [2, 1, 3]]
        dropped = run(rows, drop_first_row_after=1)
        compacts = all(_close(d, r) for d, r in zip(dropped, run(rows[1:])))
    except errors:
        compacts = False
    _PROBES[model.module] = result = _Probe(pads, compacts)
    return result


def handles_left_padding(model: StepModel) -> bool:
    """Whether a left-padded row gives the logits of the same row unpadded, at the prefill and the
    next steps (mask, positions and cache honoured as the model's own ``generate`` passes them).

    Checked once per model on a 2-row batch. A model that raises on padding (``LunarisForCausalLM``
    before it took padded batches) or gets it wrong fails, and is then run in groups of equal prompt
    length instead (correct, less batched).
    """
    return _probe(model).pads


# ------------------------------------------------------------------------------------------ rows


@dataclass
class PromptRow:
    """A prompt being completed."""

    index: int  # in the prompts list
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_at: int | None = None  # where the completion text is cut (a stop string starts there)


class RowText:
    """Decoding a row: EOS, stop strings, the completion text.

    The completion is decoded together with the prompt and the prompt's own decoding is cut off, so
    that tokenizers that drop a leading space when a sequence starts (SentencePiece) keep it.
    """

    def __init__(self, tokenizer: Any, eos_ids: set[int], stops: Sequence[str]) -> None:
        self.tokenizer, self.eos_ids, self.stops = tokenizer, eos_ids, list(stops)

    def _decode(self, row: PromptRow, token_ids: list[int]) -> str:
        prefix = self.tokenizer.decode(row.prompt_ids, skip_special_tokens=True)
        full = self.tokenizer.decode(row.prompt_ids + token_ids, skip_special_tokens=True)
        if full.startswith(prefix):
            return full[len(prefix) :]
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def update(self, row: PromptRow) -> None:
        """Set ``finish_reason`` if the row's last token ends it."""
        if row.token_ids[-1] in self.eos_ids:
            row.finish_reason = "eos"
        elif self.stops:
            text = self._decode(row, row.token_ids)
            found = [text.find(s) for s in self.stops if s in text]
            if found:
                row.finish_reason, row.stop_at = "stop", min(found)

    def completion(self, row: PromptRow) -> str:
        ids = row.token_ids[:-1] if row.finish_reason == "eos" else row.token_ids
        return self._decode(row, ids)[: row.stop_at]


# ------------------------------------------------------------------------------------------ generate


@dataclass
class StepFusion:
    strategy: str
    temperatures: list[float] | None
    weights: list[float] | None
    sampling: Sampling
    generator: torch.Generator | None
    device: torch.device
    vocab_size: int

    def choose(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each model's logits [b, columns] -> next ids [b] int64 and the weights [b, M] fp32."""
        rows = [lg[:, : self.vocab_size].to(self.device) for lg in logits]
        log_q, alphas = moc_kernels.fused_log_probs(
            rows, self.strategy, self.temperatures, self.weights, return_weights=True
        )
        return next_tokens(log_q, self.sampling, self.generator), alphas.t()


def _left_pad(rows: list[PromptRow], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.prompt_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for k, row in enumerate(rows):
        input_ids[k, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
        mask[k, width - len(row.prompt_ids) :] = 1
    return input_ids, mask


def generate_batch(
    runners: list[Any],
    rows: list[PromptRow],
    fusion: StepFusion,
    text: RowText,
    max_new_tokens: int,
    pad_id: int,
    bar: tqdm,
) -> None:
    """Complete ``rows`` in place: prefill every model, then one fused step per new token.

    If a model cannot take left padding (a ``GroupedRunner``), the rows are completed in groups of
    equal prompt length, one group after the other, every model unpadded. A module given twice (A+A)
    is run once and its logits used for both."""
    lengths = sorted({len(r.prompt_ids) for r in rows})
    if len(lengths) > 1 and any(isinstance(r, GroupedRunner) for r in runners):
        for length in lengths:
            group = [r for r in rows if len(r.prompt_ids) == length]
            fresh = [type(runner)(runner.model) for runner in runners]
            generate_batch(fresh, group, fusion, text, max_new_tokens, pad_id, bar)
        return
    first_of: dict[int, int] = {}
    owner = [first_of.setdefault(id(runner.model.module), k) for k, runner in enumerate(runners)]
    stepped = [runners[k] for k in sorted(set(owner))]

    def each(call) -> list[torch.Tensor]:
        out = {id(runner): call(runner) for runner in stepped}
        return [out[id(runners[k])] for k in owner]

    input_ids, mask = _left_pad(rows, pad_id)
    logits = each(lambda runner: runner.prefill(input_ids, mask))
    active = list(rows)
    for step in range(max_new_tokens):
        next_ids, alphas = fusion.choose(logits)
        still = []
        for k, (row, token, weights) in enumerate(zip(active, next_ids.tolist(), alphas.tolist())):
            row.token_ids.append(token)
            row.weights.append(weights)
            text.update(row)
            if row.finish_reason is None:
                still.append(k)
        bar.update(len(active) - len(still))
        if not still or step == max_new_tokens - 1:
            break
        if len(still) < len(active):  # finished rows leave every cache: no more work for them
            keep = torch.tensor(still)
            for runner in stepped:
                runner.keep(keep)
            next_ids = next_ids[keep.to(next_ids.device)]
            active = [active[k] for k in still]
        logits = each(lambda runner, ids=next_ids: runner.step(ids))
    for row in active:
        if row.finish_reason is None:
            row.finish_reason = "length"
            bar.update(1)


def _encode_prompts(tokenizer: Any, prompts: Sequence[str], prefix: str | None) -> list[PromptRow]:
    _, prefix_id = resolve_prefix(tokenizer, prefix, scoring=False)
    rows = []
    for index, prompt in enumerate(prompts):
        ids = ([] if prefix_id is None else [prefix_id]) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {index + 1} is empty and the tokenizer has no BOS to start from")
        rows.append(PromptRow(index, prompt, ids))
    return rows


def _check_models(models: list[StepModel], rows: list[PromptRow], vocab_size: int, max_new_tokens: int) -> None:
    longest = max(rows, key=lambda r: len(r.prompt_ids))
    for model in models:
        if model.columns < vocab_size:
            raise ValueError(
                f"vocab mismatch: model {model.name} has {model.columns} output columns but the tokenizer has "
                f"{vocab_size} tokens"
            )
        limit = model.max_positions()
        if limit is not None and len(longest.prompt_ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {longest.index + 1} has {len(longest.prompt_ids)} tokens: with max_new_tokens "
                f"{max_new_tokens} it needs {len(longest.prompt_ids) + max_new_tokens} positions, model "
                f"{model.name} has {limit}"
            )


@torch.no_grad()
def generate(
    models: Sequence[LoadedModel | torch.nn.Module],
    tokenizer: Any,
    prompts: Sequence[str],
    strategy: str = "entropy",
    max_new_tokens: int = 64,
    *,
    temperatures: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    do_sample: bool = False,
    sampling_temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int = 8,
    prefix_token: str | None = None,
    progress: bool = False,
) -> list[Generation]:
    """Complete each prompt with the fused model of ``models`` (M >= 2 causal LMs sharing ``tokenizer``).

    strategy, temperatures (per model, > 0) and weights (PoE betas, negative allowed, or fixed mixture
    weights) are those of ``moc_kernels.fused_log_probs``. Greedy unless ``do_sample``; then q is
    reshaped by ``sampling_temperature``, ``top_k`` and ``top_p`` (see :func:`restrict_support`) and
    ``seed`` makes the draws reproducible. A row stops at EOS (``eos_token_id``, default the
    tokenizer's), when its completion contains a ``stop`` string, or after ``max_new_tokens``.
    ``prefix_token``: "bos", "eos" or "none" before every prompt (default: BOS if the tokenizer has
    one, as in scoring). Returns one :class:`Generation` per prompt, in order.

    Example::

        from transformers import AutoModelForCausalLM, AutoTokenizer
        import kotara

        tok = AutoTokenizer.from_pretrained("out/a/hf")
        a, b = (AutoModelForCausalLM.from_pretrained(p).eval() for p in ("out/a/hf", "out/b/hf"))
        out = kotara.generate([a, b], tok, ["def parse(", "The HTTP"], strategy="poe", weights=[1.5, -0.5],
                              max_new_tokens=32)
        print(out[0].completion, out[0].finish_reason)
    """
    sampling = Sampling(do_sample, sampling_temperature, top_k, top_p)
    sampling.check()
    if len(models) < 2:
        raise ValueError(f"fusion needs at least 2 models, got {len(models)}")
    if not prompts:
        raise ValueError("no prompt to complete")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(not s for s in stop):
        raise ValueError("a stop string must not be empty")
    wrapped = [StepModel.wrap(m, i) for i, m in enumerate(models)]
    vocab_size = len(tokenizer)
    rows = _encode_prompts(tokenizer, prompts, prefix_token)
    _check_models(wrapped, rows, vocab_size, max_new_tokens)
    # The op checks the fusion arguments; a one-row call makes a bad strategy or weight fail here, early.
    probe = [torch.zeros(1, vocab_size, device=wrapped[0].device)] * len(wrapped)
    moc_kernels.fused_log_probs(probe, strategy, temperatures, weights)

    device = wrapped[0].device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    fusion = StepFusion(strategy, temperatures, weights, sampling, generator, device, vocab_size)
    eos_ids = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
    eos_set = set() if eos_ids is None else ({eos_ids} if isinstance(eos_ids, int) else set(eos_ids))
    text = RowText(tokenizer, eos_set, stop)
    runner_types = [PaddedRunner if handles_left_padding(m) else GroupedRunner for m in wrapped]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with tqdm(total=len(rows), desc="kotara generate", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            runners = [kind(m) for kind, m in zip(runner_types, wrapped)]
            generate_batch(runners, rows[start : start + batch_size], fusion, text, max_new_tokens, pad_id, bar)
    return [
        Generation(r.prompt, text.completion(r), r.token_ids, r.weights, strategy, str(r.finish_reason)) for r in rows
    ]
