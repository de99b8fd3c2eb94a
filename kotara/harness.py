"""The fused model as an lm-evaluation-harness model (DESIGN §5b): ``FusedLM``, registered as ``kotara``.

``FusedLM`` is lm-eval's own ``HFLM`` with the scoring and the decoding replaced: tokenisation
(``tok_encode``, ``_encode_pair``, the empty-context prefix token), truncation, ``max_length``,
the rolling windows of ``loglikelihood_rolling``, the request sorting and batching (``Collator``,
one-token-continuation reuse) and the stop-string handling are HFLM's, called, not copied. So M
copies of one model give that model's ``hf`` numbers, and two models are scored on exactly the
tokens ``hf`` would score each of them on.

What differs: every batch runs each model's forward once, and from those logits every *row* is
derived — each model alone (``a``, ``b``, …: ``log_softmax`` at temperature 1) and each fusion
strategy (log q of the continuation from ``moc_kernels.fused_logit_nll_multi``; ``is_greedy`` judged
under q, over the whole vocabulary). Every row's answer is kept per request (keyed by its tokens), and
``select_row`` picks the row that lm-eval is answered with: ``evaluate_rows`` then runs lm-eval once
per row, the forwards happening in the first run only. Generation (``generate_until``) decodes with
Kotara's fused generation (``kotara.generate``: per-model KV caches, fused q per step); its rows
cannot share forwards (each row writes different tokens), so each row decodes on its own.

Logits are sliced to ``len(tokenizer)`` columns before any softmax (the models may pad their output
layers differently); HFLM normalises over every output column, which differs only for models whose
output layer is wider than the tokenizer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

import moc_kernels
from kotara.generate import (
    GroupedRunner,
    PaddedRunner,
    PromptRow,
    RowText,
    Sampling,
    StepFusion,
    StepModel,
    generate_batch,
    handles_left_padding,
    next_tokens,
)
from kotara.loading import LoadedModel, model_label
from kotara.steps import FusionSpec
from moc_kernels.reference.fused_logit_nll import LINEAR_POOLS

EXTRA_HINT = "lm-evaluation-harness is not installed: pip install -e '.[eval]' (or pip install 'lm-eval[hf]')"

try:
    import lm_eval
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import (
        Collator,
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
        resolve_max_length,
    )
except ImportError as err:  # one line for the CLI; the import error itself is chained for --debug
    raise ImportError(EXTRA_HINT) from err

# generation_kwargs that Kotara's decoding honours (DESIGN §5a); any other key is an error, not ignored.
GENERATION_KEYS = {"do_sample", "temperature", "top_p", "top_k", "until", "max_gen_toks", "max_length"}

ROW_BLOCK = 256  # scored positions fused at a time (bounds the [rows, V] temporaries)
_Request = tuple[Any, list[int], list[int]]  # (strings or None, context tokens, continuation tokens)


def row_names(model_names: Sequence[str], strategies: Sequence[str]) -> list[str]:
    """The rows of ``--strategy all``: each model alone, then each strategy."""
    return [*model_names, *strategies]


@register_model("kotara")
class FusedLM(HFLM):
    """M >= 2 causal LMs sharing one tokenizer, fused per token, as an ``lm_eval.api.model.LM``.

    models: paths (local directories or cached hub ids), ``kotara.loading.LoadedModel``s or
    ``transformers`` modules; a string is split at ``|`` (``model_args="models=A|B,strategy=poe"``).
    strategy: one of ``moc_kernels.STRATEGIES`` or ``"all"`` (every strategy and each model alone
    from one set of forwards; pick the row lm-eval sees with ``select_row``). temperatures, weights
    (fixed mixture weights) and poe_betas: one float per model, as in ``kotara score``.
    tokenizer: a path or tokenizer object (default: the first model path's); every model directory
    with a tokenizer must have the same vocabulary. batch_size, max_length, truncation,
    add_bos_token, prefix_token_id, logits_cache: as in lm-eval's ``hf`` model; ``max_length``
    defaults to the smallest of the models'. seed: the sampling draws of ``do_sample`` tasks.
    ``progress = False`` (an attribute, as ``kotara eval --no_progress`` sets it) hides Kotara's bars.
    """

    progress: bool = True

    def __init__(
        self,
        models: Sequence[str | LoadedModel | torch.nn.Module] | str,
        strategy: str = "entropy",
        tokenizer: Any = None,
        temperatures: Sequence[float] | None = None,
        weights: Sequence[float] | None = None,
        poe_betas: Sequence[float] | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        device: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        truncation: bool = False,
        logits_cache: bool = True,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        seed: int | None = None,
        max_batch_size: int | None = None,  # noqa: ARG002 - passed by lm-eval's simple_evaluate; unused
    ) -> None:
        if isinstance(models, str):
            models = [m for m in models.split("|") if m]
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size 'auto' is not supported by kotara: give a number of requests per forward")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        loaded, tokenizer = _load(list(models), tokenizer, device, dtype, trust_remote_code)
        self.models = loaded
        self.paths = [m.path for m in loaded]
        count = len(loaded)
        strategies = list(moc_kernels.STRATEGIES) if strategy == "all" else [strategy]
        if strategy != "all" and strategy not in moc_kernels.STRATEGIES:
            expected = ", ".join(moc_kernels.STRATEGIES)
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {expected}, or all")
        self.spec = FusionSpec(
            strategies=strategies,
            temperatures=[float(t) for t in temperatures] if temperatures else [1.0] * count,
            weights=[float(w) for w in weights] if weights else [1.0 / count] * count,
            poe_betas=[float(b) for b in poe_betas] if poe_betas else [1.0 / count] * count,
        )
        names = [m.name for m in loaded]
        self.rows = row_names(names, strategies) if strategy == "all" else list(strategies)
        self.row = strategies[0]
        self.strategy = strategy
        self.seed = seed
        self.vocab_columns = len(tokenizer)
        # One fused-q row checks the fusion arguments (lengths, signs) now, not in the first batch.
        probe = [torch.zeros(1, self.vocab_columns)] * count
        for name in strategies:
            moc_kernels.fused_log_probs(probe, name, self.spec.temperatures, self._weights_for(name))
        super().__init__(
            pretrained=loaded[0].module,
            backend="causal",
            tokenizer=tokenizer,
            batch_size=int(batch_size),
            max_length=max_length,
            truncation=truncation,
            logits_cache=logits_cache,
            add_bos_token=add_bos_token,
            prefix_token_id=prefix_token_id,
        )
        self._scores: dict[tuple[tuple[int, ...], tuple[int, ...]], dict[str, tuple[float, bool]]] = {}
        self._generations: dict[str, dict[tuple[str, str], str]] = {}
        self._runner_types: list[type] | None = None
        self.forward_calls = 0  # model forwards run (one per model per batch), for the tests and timings
        self.forward_s = 0.0
        self.fusion_s = 0.0

    # ------------------------------------------------------------------------------------ rows

    def select_row(self, row: str) -> None:
        """Answer lm-eval's requests with ``row`` (a model label or a strategy of ``rows``)."""
        if row not in self.rows:
            raise ValueError(f"unknown row {row!r}; expected one of {', '.join(self.rows)}")
        self.row = row

    def _weights_for(self, strategy: str) -> list[float]:
        return self.spec.poe_betas if strategy == "poe" else self.spec.weights

    def _score_rows(self) -> list[str]:
        """The rows scored from each batch's logits: all of them (they are cheap next to the forwards)."""
        return self.rows

    def _token_answers(
        self, logits: list[torch.Tensor], positions: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every scored row's log q of ``targets`` [P] fp64 and whether each is argmax q [P] bool.

        logits: each model's [N, V]; positions [P] int64 (rows of the logits; repeated where requests
        share an input), targets [P] int64. A model alone is its log_softmax (as HFLM computes it).
        The strategies come from one ``fused_logit_nll_multi`` call per weight group (each model's
        statistics computed once for all of them, not once per strategy), and argmax q from the
        weights it returns, without forming log q: a log-linear pool's log q is ``Σ α_i z_i`` less a
        per-row constant, a linear pool's q is ``Σ α_i softmax(z_i)`` (``z_i`` = logits_i / T_i).
        Rows are taken ROW_BLOCK at a time, so memory stays a few [ROW_BLOCK, V] buffers per model.
        """
        names = [m.name for m in self.models]
        scored = self._score_rows()
        strategies = [r for r in scored if r not in names]
        spec = FusionSpec(strategies, self.spec.temperatures, self.spec.weights, self.spec.poe_betas)
        parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {row: [] for row in scored}
        for start in range(0, positions.numel(), ROW_BLOCK):
            where, wanted = positions[start : start + ROW_BLOCK], targets[start : start + ROW_BLOCK]
            rows = [lg[where] for lg in logits]  # [b, V] per model
            for name in set(scored) & set(names):
                log_p = torch.log_softmax(rows[names.index(name)].float(), dim=-1)
                parts[name].append((log_p.gather(1, wanted[:, None]).squeeze(1).double(), log_p.argmax(-1) == wanted))
            fused = {}
            for group, weights in spec.groups() if strategies else []:
                fused.update(moc_kernels.fused_logit_nll_multi(rows, wanted, group, spec.temperatures, weights))
            tempered = [z.float() / t for z, t in zip(rows, spec.temperatures)]
            probs = [torch.softmax(z, dim=-1) for z in tempered] if set(strategies) & set(LINEAR_POOLS) else []
            for strategy in strategies:
                alphas = fused[strategy].weights  # [M, b]
                pooled = probs if strategy in LINEAR_POOLS else tempered
                score = sum(a[:, None] * x for a, x in zip(alphas, pooled))
                parts[strategy].append((-fused[strategy].nll.double(), score.argmax(-1) == wanted))
        return {
            row: (torch.cat([p[0] for p in chunks]), torch.cat([p[1] for p in chunks])) for row, chunks in parts.items()
        }

    # ------------------------------------------------------------------------------ properties

    @property
    def max_length(self) -> int:
        """``max_length`` if given, else the smallest of the models' own (as HFLM resolves each one)."""
        if self._max_length:
            return self._max_length
        return min(
            resolve_max_length(m.module.config, self.tokenizer, default=self._DEFAULT_MAX_LENGTH) for m in self.models
        )

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records under ``config`` (HFLM's would ask the hub for a revision: no network here)."""
        return {
            "models": self.paths,
            "strategy": self.strategy,
            "row": self.row,
            "model_num_parameters": [sum(p.numel() for p in m.module.parameters()) for m in self.models],
            "model_dtype": [str(m.dtype).removeprefix("torch.") for m in self.models],
            "temperatures": self.spec.temperatures,
            "weights": self.spec.weights,
            "poe_betas": self.spec.poe_betas,
            "kernels": moc_kernels.get_backend(),
        }

    # ------------------------------------------------------------------------- loglikelihood

    def _loglikelihood_tokens(
        self, requests: list[_Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        """(log q of the continuation, every continuation token is argmax q) per request, for ``row``.

        HFLM's ``loglikelihood`` and ``loglikelihood_rolling`` (its windows) call this with token
        requests; requests scored before (for any row) are answered from the kept scores.
        """
        todo = [r for r in requests if _key(r[1], r[2]) not in self._scores]
        if todo:
            self._score_requests(todo, disable_tqdm)
        answers = [self._scores[_key(r[1], r[2])][self.row] for r in requests]
        for request, answer in zip(requests, answers):
            if request[0] is not None:  # rolling windows are cached per document by HFLM itself
                self.cache_hook.add_partial("loglikelihood", request[0], answer)
        return answers

    def _forward(self, model: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] (V = the tokenizer's length) of one right-padded batch."""
        self.forward_calls += 1
        with torch.no_grad():
            out = model.module(input_ids=input_ids.to(model.device))
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[..., : self.vocab_columns]

    def _score_requests(self, requests: list[_Request], disable_tqdm: bool) -> None:
        """Score ``requests`` for every row, batched and sorted as HFLM does, into ``self._scores``."""
        collator = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
            group_by="contexts" if self.logits_cache else None,
            group_fn=lambda r: r[-2] + r[-1][:-1],
        )
        quiet = disable_tqdm or not self.progress or self.rank != 0
        bar = tqdm(total=len(requests), disable=quiet, desc="kotara loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            members = self._score_chunk(collator, chunk)
            bar.update(members)
        bar.close()

    def _score_chunk(self, collator: Collator, chunk: list[_Request]) -> int:
        """One batch: each model's forward once, then every row's answers for every request it covers."""
        # HFLM's causal input: context + continuation, left-truncated to max_length + 1, minus the last token.
        inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
        width = max(len(i) for i in inputs)
        batch = torch.zeros(len(inputs), width, dtype=torch.long)  # right padding (causal: no mask needed)
        for j, ids in enumerate(inputs):
            batch[j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        t0 = time.perf_counter()
        fuse_device = self.models[0].device
        per_model = []
        for model in self.models:
            logits = self._forward(model, batch)
            per_model.append(
                torch.cat([logits[j, len(ids) - len(cont) : len(ids)] for j, (ids, (_, _, cont)) in enumerate(
                    zip(inputs, chunk))]).to(fuse_device)
            )  # fmt: skip
        t1 = time.perf_counter()

        # Each request of the chunk stands for its group of requests with the same input tokens
        # (HFLM's one-token-continuation reuse); a member scores the last len(its continuation) positions.
        keys, positions, targets, owners = [], [], [], []
        offset = 0
        for _, ctx, cont in chunk:
            end = offset + len(cont)
            for _, member_cont, _ in collator.get_cache(req_str=None, cxt_toks=ctx, cont_toks=cont, logits=_DUMMY):
                member_ctx = (ctx + cont[:-1] + member_cont[-1:])[: -len(member_cont)]
                owners += [len(keys)] * len(member_cont)
                keys.append(_key(member_ctx, member_cont))
                positions += range(end - len(member_cont), end)
                targets += member_cont
            offset = end
        positions_t = torch.tensor(positions, device=fuse_device)
        targets_t = torch.tensor(targets, device=fuse_device)
        owners_t = torch.tensor(owners, device=fuse_device)
        answers: list[dict[str, tuple[float, bool]]] = [{} for _ in keys]
        lengths = torch.bincount(owners_t, minlength=len(keys)).double()
        for row, (token_lp, token_greedy) in self._token_answers(per_model, positions_t, targets_t).items():
            lp = torch.zeros(len(keys), dtype=torch.float64, device=fuse_device).index_add_(0, owners_t, token_lp)
            hits = torch.zeros(len(keys), dtype=torch.float64, device=fuse_device)
            hits.index_add_(0, owners_t, token_greedy.double())
            for k, (value, hit, n) in enumerate(zip(lp.tolist(), hits.tolist(), lengths.tolist())):
                answers[k][row] = (value, hit == n)
        for key, answer in zip(keys, answers):
            self._scores[key] = answer
        self.forward_s += t1 - t0
        self.fusion_s += time.perf_counter() - t1
        return len(keys)

    # ------------------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Fused greedy or sampled decoding for ``row``, until a stop string, EOS or ``max_gen_toks``."""
        done = self._generations.setdefault(self.row, {})
        args = [req.args for req in requests]
        keys = [(context, json.dumps(kwargs, sort_keys=True, default=str)) for context, kwargs in args]
        todo = list({key: arg for key, arg in zip(keys, args) if key not in done}.values())
        if todo:
            self._generate(todo, done, disable_tqdm)
        answers = [done[key] for key in keys]
        for (context, kwargs), answer in zip(args, answers):
            self.cache_hook.add_partial("generate_until", (context, kwargs), answer)
        return answers

    @torch.no_grad()
    def _generate(self, args: list[tuple[str, dict]], done: dict[tuple[str, str], str], disable_tqdm: bool) -> None:
        """Decode ``args`` ((context, generation kwargs) pairs), grouped and sorted as HFLM does."""
        collator = Collator(
            args, sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]), group_by="gen_kwargs", group_fn=lambda a: a[1]
        )
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=self.models[0].device)
            generator.manual_seed(int(self.seed))
        quiet = disable_tqdm or not self.progress or self.rank != 0
        bar = tqdm(total=len(args), disable=quiet, desc=f"kotara generate ({self.row})")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts = [context for context, _ in chunk]
            kwargs = normalize_gen_kwargs(chunk[0][1], self.max_gen_toks)
            unknown = sorted(set(kwargs) - GENERATION_KEYS)
            if unknown:
                raise ValueError(f"generation_kwargs {', '.join(unknown)} not supported by kotara eval")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            if self.max_length - max_new <= 0:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for context in max_length {self.max_length}")
            ids, mask = self.tok_batch_encode(
                contexts, left_truncate_len=self.max_length - max_new, truncation=self.truncation
            )
            rows = [PromptRow(k, context, ids[k][mask[k].bool()].tolist()) for k, context in enumerate(contexts)]
            sampling = _sampling(kwargs)
            runners, chooser = self._decoder(sampling, generator)
            text = RowText(self.tokenizer, self._eos_ids(), [s for s in until if s])
            generate_batch(runners, rows, chooser, text, max_new, self.tokenizer.pad_token_id or 0, bar)
            for (context, gen_kwargs), row in zip(chunk, rows):
                completion = postprocess_generated_text(self.tok_decode(row.token_ids), until, None)
                done[(context, json.dumps(gen_kwargs, sort_keys=True, default=str))] = completion
        bar.close()

    def _eos_ids(self) -> set[int]:
        """The tokenizer's EOS and every model's generation-config EOS (what HF's generate stops at)."""
        ids = {self.eot_token_id} if self.eot_token_id is not None else set()
        for m in self.models:
            value = getattr(getattr(m.module, "generation_config", None), "eos_token_id", None)
            ids |= set(value) if isinstance(value, list) else ({value} if value is not None else set())
        return ids

    def _decoder(self, sampling: Sampling, generator: torch.Generator | None) -> tuple[list[Any], Any]:
        """The runners to step and the next-token chooser of ``row`` (one model, or the fusion)."""
        wrapped = [StepModel.wrap(m, i) for i, m in enumerate(self.models)]
        if self._runner_types is None:
            self._runner_types = [PaddedRunner if handles_left_padding(m) else GroupedRunner for m in wrapped]
        names = [m.name for m in self.models]
        device = self.models[0].device
        if self.row in names:
            i = names.index(self.row)
            return [self._runner_types[i](wrapped[i])], _AloneChooser(sampling, generator, device, self.vocab_columns)
        chooser = StepFusion(
            self.row, self.spec.temperatures, self._weights_for(self.row), sampling, generator, device,
            self.vocab_columns,
        )  # fmt: skip
        return [kind(m) for kind, m in zip(self._runner_types, wrapped)], chooser


class _AloneChooser:
    """One model's next token (``StepFusion``'s interface): log_softmax of its logits, then greedy or a draw."""

    def __init__(self, sampling: Sampling, generator: torch.Generator | None, device: torch.device, vocab: int):
        self.sampling, self.generator, self.device, self.vocab = sampling, generator, device, vocab

    def choose(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = torch.log_softmax(logits[0][:, : self.vocab].to(self.device).float(), dim=-1)
        return next_tokens(log_p, self.sampling, self.generator), torch.ones(log_p.shape[0], 1)


_DUMMY = torch.zeros(1, 1, 1)  # Collator.get_cache only expands the logits it is given; ours are per row


def _key(context: Sequence[int], continuation: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(context), tuple(continuation)


def _sampling(kwargs: dict[str, Any]) -> Sampling:
    """lm-eval's normalised generation kwargs -> Kotara's sampling settings (greedy at temperature 0)."""
    temperature = float(kwargs.get("temperature", 0.0))
    do_sample = bool(kwargs.get("do_sample", False)) and temperature > 0
    sampling = Sampling(
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_k=int(kwargs["top_k"]) if kwargs.get("top_k") is not None else None,
        top_p=float(kwargs["top_p"]) if kwargs.get("top_p") is not None else None,
    )
    sampling.check()
    return sampling


def _load(
    models: list[Any], tokenizer: Any, device: str | None, dtype: str, trust_remote_code: bool
) -> tuple[list[LoadedModel], Any]:
    """LoadedModels and the shared tokenizer, with Kotara's checks (one vocabulary, enough logit columns)."""
    from kotara import loading

    if len(models) < 2:
        raise ValueError(f"fusion needs at least 2 models, got {len(models)}")
    paths = [m for m in models if isinstance(m, str)]
    if tokenizer is None:
        if not paths:
            raise ValueError("pass tokenizer= when the models are not given as paths")
        tokenizer = paths[0]
    tokenizer_path = tokenizer if isinstance(tokenizer, str) else None
    if tokenizer_path is not None:
        tokenizer = loading.load_tokenizer(tokenizer_path, trust_remote_code)
        for path in paths:
            if path != tokenizer_path:
                loading.check_same_tokenizer(tokenizer, path, trust_remote_code)
    target = loading.resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = []
    for i, m in enumerate(models):
        name = model_label(i)
        if isinstance(m, LoadedModel):
            loaded.append(m)
        elif isinstance(m, str):
            loaded.append(loading.load_model(m, name, target, loading.resolve_dtype(dtype, target), trust_remote_code))
        else:
            head = m.get_output_embeddings()
            columns = head.weight.shape[0] if head is not None else int(m.config.vocab_size)
            param = next(m.parameters())
            path = getattr(m, "name_or_path", name)
            loaded.append(LoadedModel(name, path, m.eval(), param.device, param.dtype, columns))
    loading.check_vocab(loaded, len(tokenizer))
    return loaded, tokenizer


def evaluate_rows(
    lm: FusedLM, tasks: list[Any], rows: Sequence[str] | None = None, **simple_evaluate_kwargs: Any
) -> dict[str, dict[str, Any]]:
    """lm-eval's ``simple_evaluate`` once per row of ``lm`` (or of ``rows``): {row: its results, with ``time_s``}.

    The first row runs the forwards; the other rows' loglikelihood requests are answered from the
    scores kept then (generation rows decode each on their own). lm-eval re-seeds every run, so
    each row sees the same few-shot examples and the same ``limit`` subset.
    """
    if simple_evaluate_kwargs.get("task_manager") is None:  # one index for every row (lm-eval's takes ~13 s)
        from lm_eval.tasks import TaskManager

        simple_evaluate_kwargs["task_manager"] = TaskManager()
    out = {}
    for row in lm.rows if rows is None else rows:
        lm.select_row(row)
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), **simple_evaluate_kwargs)
        results["time_s"] = time.perf_counter() - start
        out[row] = results
    return out
