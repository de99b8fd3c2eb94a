"""Loading what Kotara evaluates: the text, its token ids, the shared tokenizer and the models.

A model path is a directory ``from_pretrained`` reads, a hub id in the local cache, or a ``.gguf``
file (llama.cpp's format; transformers dequantizes it, which needs the ``gguf`` package), whose
tokenizer comes from the same file.

Every user error here raises ``ValueError`` with a one-line message naming the bad value; the CLI
turns it into exit code 2. Nothing is downloaded: models and tokenizers come from local
directories or the local Hugging Face cache.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREFIX_TOKENS = ("bos", "eos", "none")


@dataclass
class Text:
    """The evaluation text as token ids. token_ids: [n] int64, prefix token (if any) first."""

    token_ids: torch.Tensor
    num_bytes: int  # UTF-8 bytes scored (for bits per byte): the text's, less the first token's if no prefix
    prefix: str  # "bos", "eos" or "none"
    prefix_id: int | None


@dataclass
class LoadedModel:
    """A causal LM ready for evaluation; ``vocab_size`` columns of its logits are used."""

    name: str  # "a", "b", "c", ...
    path: str
    module: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    logit_columns: int  # width of the model's output layer (may exceed vocab_size: padding)


def one_line(err: BaseException) -> str:
    """An exception's whole message on one line (libraries' messages span lines; cutting at the first
    left "... from one of: " with the list gone)."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__


def model_label(index: int) -> str:
    """'a', 'b', …, 'z', then 'm27', … (the original tool's keys are model_a/model_b)."""
    return chr(ord("a") + index) if index < 26 else f"m{index + 1}"


def read_text_pieces(path: str, chunk_bytes: int = 1 << 20) -> list[str]:
    """The file's text in pieces of about ``chunk_bytes`` cut at line boundaries.

    Large files never sit in one tokenizer call: :func:`tokenize_pieces` tokenizes them in parts cut
    near these pieces' ends where the cut is checked not to change the tokens. Errors: missing, not a
    file, not UTF-8, empty.
    """
    if not os.path.exists(path):
        raise ValueError(f"dataset not found: {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"dataset is not a file: {path!r}")
    pieces, current, size = [], [], 0
    try:
        # newline="" keeps \r\n as is, so the text is exactly the file's bytes (bits per byte).
        with open(path, encoding="utf-8", newline="") as handle:
            for line in handle:
                current.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    pieces.append("".join(current))
                    current, size = [], 0
    except UnicodeDecodeError as err:
        raise ValueError(f"dataset {path!r} is not valid UTF-8 (byte {err.start}: {err.reason})") from None
    if current:
        pieces.append("".join(current))
    if not any(piece.strip() for piece in pieces):
        raise ValueError(f"dataset {path!r} is empty")
    return pieces


def resolve_prefix(tokenizer: Any, prefix: str | None, scoring: bool = True) -> tuple[str, int | None]:
    """The prefix token kind and id. ``None`` (the default) means the tokenizer's BOS if it has one;
    else, for scoring, its EOS (the end-of-text token of GPT-2, Qwen, GLM-4, cl100k-style tokenizers),
    as lm-evaluation-harness does for rolling log-likelihoods, so the text's first token is predicted
    too and every byte counted in bits/byte is scored; else none (then :func:`tokenize_file` leaves the
    first token's bytes out of the count). Generation (``scoring=False``) starts from BOS or nothing,
    as the model's own ``generate`` on the tokenized prompt does."""
    if prefix is None:
        if tokenizer.bos_token_id is not None:
            prefix = "bos"
        else:
            prefix = "eos" if scoring and tokenizer.eos_token_id is not None else "none"
    if prefix not in PREFIX_TOKENS:
        raise ValueError(f"unknown prefix token {prefix!r}; expected one of {', '.join(PREFIX_TOKENS)}")
    if prefix == "none":
        return prefix, None
    token_id = tokenizer.bos_token_id if prefix == "bos" else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError(f"--prefix_token {prefix}: the tokenizer has no {prefix.upper()} token; use 'none'")
    return prefix, int(token_id)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# Candidate cuts looked at per piece, and the characters around a cut that are tokenized to check it.
_CUT_CANDIDATES = 64
_CUT_CONTEXT = 512


def _cut_is_exact(tokenizer: Any, text: str, cut: int) -> bool:
    """Whether tokenizing ``text[a:cut]`` and ``text[cut:b]`` apart gives the tokens of ``text[a:b]``
    (a, b: ``_CUT_CONTEXT`` characters either side): no merge, no pre-token and no added prefix space
    (SentencePiece's ``▁`` at a sequence start) crosses or marks the cut."""
    a, b = max(0, cut - _CUT_CONTEXT), min(len(text), cut + _CUT_CONTEXT)
    return _ids(tokenizer, text[a:b]) == _ids(tokenizer, text[a:cut]) + _ids(tokenizer, text[cut:b])


# Where a cut is tried: a line start after a non-blank line, before a non-blank character (no run of
# newlines or spaces is split), or a single space between two words (SentencePiece tokenizers that
# mark a sequence start with ``▁`` write that space as the same ``▁``).
_CUT_CANDIDATE = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")


def _exact_cut(tokenizer: Any, text: str, start: int, end: int) -> int | None:
    """The last candidate offset in ``[start, end]`` (see ``_CUT_CANDIDATE``) where the text can be
    tokenized in two parts without changing its tokens, as :func:`_cut_is_exact` checks; None if none
    of the last ``_CUT_CANDIDATES`` checks (the pieces are then tokenized together)."""
    offsets = [m.start() for m in _CUT_CANDIDATE.finditer(text, start, min(end + 1, len(text)))]
    for offset in reversed(offsets[-_CUT_CANDIDATES:]):
        if 0 < offset < len(text) and _cut_is_exact(tokenizer, text, offset):
            return offset
    return None


def exact_parts(tokenizer: Any, pieces: Sequence[str]) -> list[str]:
    """``"".join(pieces)`` re-cut into parts of about one piece each, cut only where the cut is checked
    not to change the tokens (:func:`_exact_cut`): tokenizing the parts apart gives the ids of the
    whole text (tests check it on Llama-3, Mistral SentencePiece, Qwen2.5, DeepSeek, GLM-4 and GPT-2
    tokenizers). A piece with no checkable cut is tokenized together with the next one."""
    text = "".join(pieces)
    parts, done, end = [], 0, 0
    for piece in pieces[:-1]:
        end += len(piece)
        if end - done < 2:
            continue
        cut = _exact_cut(tokenizer, text, done + (end - done) // 2, end)
        if cut is not None:
            parts.append(text[done:cut])
            done = cut
    parts.append(text[done:])
    return parts


def tokenize_pieces(tokenizer: Any, pieces: Sequence[str]) -> list[int]:
    """The token ids of ``"".join(pieces)``, equal to tokenizing it whole (see :func:`exact_parts`)."""
    return [i for part in exact_parts(tokenizer, pieces) for i in _ids(tokenizer, part)]


def _first_token_bytes(tokenizer: Any, text: str, first_id: int) -> int:
    """UTF-8 bytes of the text that the first token covers (by offsets where the tokenizer has them)."""
    try:
        encoding = tokenizer(text[:256], add_special_tokens=False, return_offsets_mapping=True)
        end = encoding["offset_mapping"][0][1]
        return len(text[:end].encode("utf-8"))
    except (NotImplementedError, ValueError, KeyError, IndexError, TypeError):
        return len(tokenizer.decode([first_id]).encode("utf-8"))


def tokenize_file(tokenizer: Any, path: str, prefix: str | None = None, chunk_bytes: int = 1 << 20) -> Text:
    """Read and tokenize ``path`` once (in pieces cut where the tokens cannot change), prefix token first.

    ``num_bytes`` counts the bytes that are scored: all of them with a prefix token (the default
    whenever the tokenizer has a BOS or an EOS); with none (``--prefix_token none``, or a tokenizer with
    neither) the first token is context only, so its bytes are left out of bits/byte.
    """
    pieces = read_text_pieces(path, chunk_bytes)
    prefix, prefix_id = resolve_prefix(tokenizer, prefix)
    ids: list[int] = [] if prefix_id is None else [prefix_id]
    ids.extend(tokenize_pieces(tokenizer, pieces))
    num_bytes = sum(len(piece.encode("utf-8")) for piece in pieces)
    if len(ids) < 2:
        raise ValueError(f"dataset {path!r} has {len(ids)} token(s); at least 2 are needed to score one")
    if prefix_id is None:
        num_bytes -= _first_token_bytes(tokenizer, "".join(pieces), ids[0])
    return Text(torch.tensor(ids, dtype=torch.int64), num_bytes, prefix, prefix_id)


def is_gguf(path: str) -> bool:
    """Whether ``path`` names a GGUF file (llama.cpp's format), which transformers reads with ``gguf_file=``."""
    return path.lower().endswith(".gguf")


def _pretrained_args(path: str) -> tuple[str, dict[str, Any]]:
    """``from_pretrained``'s first argument and extra keywords: a GGUF file is its directory plus
    ``gguf_file`` (transformers dequantizes it to the requested dtype; needs the ``gguf`` package)."""
    path = os.path.expanduser(path)
    if is_gguf(path):
        return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    return path, {}


def check_model_path(path: str, what: str) -> None:
    # A path that looks local but is missing would otherwise become a confusing hub lookup.
    # (a hub id is "name" or "org/name"; anything else is a path).
    if is_gguf(path):
        if not os.path.isfile(os.path.expanduser(path)):
            raise ValueError(f"{what} GGUF file not found: {path!r}")
        if importlib.util.find_spec("gguf") is None:
            raise ValueError(f"{what}: reading {path!r} needs the gguf package (pip install gguf)")
        return
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise ValueError(f"{what} directory not found: {path!r}")


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The shared tokenizer from a local directory or the local HF cache (never downloads)."""
    from transformers import AutoTokenizer

    check_model_path(path, "tokenizer")
    source, extra = _pretrained_args(path)
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=True, **extra)
    try:
        try:
            return AutoTokenizer.from_pretrained(source, **kwargs)
        except (ValueError, KeyError):
            # The directory's config may name a model type only the project's `model` package registers.
            _register_project_models()
            return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as err:  # noqa: BLE001 - missing files, a damaged tokenizer.json (tokenizers' Exception), ...
        raise ValueError(f"cannot load a tokenizer from {path!r}: {one_line(err)}") from None


def _has_tokenizer(path: str) -> bool:
    if is_gguf(path):
        return os.path.isfile(path)  # a GGUF file carries its tokenizer
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def extends(big: dict[str, int], small: dict[str, int], added: set[str] | None = None) -> bool:
    """Whether vocabulary ``big`` is ``small`` plus added tokens: every token of ``small`` has the same id
    in ``big`` and every other token of ``big`` has an id past ``small``'s (as Qwen3 over Qwen2.5) and,
    when ``added`` is given (``big``'s ``get_added_vocab()``), is one of them: added tokens are matched
    before the model, so they do not change how any other text is tokenized (an extra BPE merge or
    word would)."""
    if len(big) < len(small) or any(big.get(token) != i for token, i in small.items()):
        return False
    top = max(small.values(), default=-1)
    extra = [(token, i) for token, i in big.items() if token not in small]
    return all(i > top and (added is None or token in added) for token, i in extra)


def tokenizer_extends(big: Any, small: Any) -> bool:
    """:func:`extends` for two tokenizers (the extra tokens must be ``big``'s added tokens)."""
    return extends(big.get_vocab(), small.get_vocab(), set(big.get_added_vocab()))


def check_same_tokenizer(tokenizer: Any, model_path: str, trust_remote_code: bool = False) -> None:
    """Raise if the model's own tokenizer (when its directory has one) differs from the shared one.

    Fusing per token is only meaningful when token id k means the same string for every model. A
    model whose own tokenizer is the shared one plus added tokens is accepted: fusion runs over the
    shared vocabulary, the model's extra tokens are columns past it (dropped as padding columns are),
    so they are no token for any model and never a target. The other way round (the shared tokenizer
    has tokens the model lacks) is refused with the fix: pass the smaller tokenizer as ``--tokenizer``.
    """
    if not ((os.path.isdir(model_path) or is_gguf(model_path)) and _has_tokenizer(model_path)):
        return
    own = load_tokenizer(model_path, trust_remote_code)
    own_vocab, shared = own.get_vocab(), tokenizer.get_vocab()
    if own_vocab == shared or tokenizer_extends(own, tokenizer):
        return
    if tokenizer_extends(tokenizer, own):
        extra = sorted(set(shared) - set(own_vocab), key=shared.__getitem__)
        raise ValueError(
            f"tokenizer mismatch: the shared tokenizer ({len(shared)} tokens) adds {len(extra)} token(s) "
            f"({', '.join(map(repr, extra[:3]))}{', ...' if len(extra) > 3 else ''}) to the one in {model_path!r}; "
            f"pass --tokenizer {model_path}: fusion then runs over the vocabulary all models share"
        )
    raise ValueError(
        f"tokenizer mismatch: the tokenizer in {model_path!r} ({len(own)} tokens) differs from the shared "
        f"one ({len(tokenizer)} tokens); fusion needs one vocabulary (pass --tokenizer only for identical ones)"
    )


def resolve_device(name: str) -> torch.device:
    """A torch.device; CUDA asked for but absent is a user error. Under torchrun 'cuda' means cuda:LOCAL_RANK."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for but CUDA is not available on this machine; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; expected cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it, else fp16 on CUDA, fp32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _register_project_models() -> None:
    """Import the project's ``model`` package if present so its Auto classes get registered.

    Kotara does not depend on it: any failure to import leaves plain transformers in charge.
    """
    for name in ("model", "model.hf"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional; a broken or absent package is not Kotara's concern
            return


def _dtype_kwarg() -> str:
    # transformers 5 renamed from_pretrained's torch_dtype to dtype; pyproject allows >= 4.46.
    import transformers

    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def load_model(
    path: str, name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False
) -> LoadedModel:
    """``AutoModelForCausalLM`` from a local directory or the local HF cache, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    check_model_path(path, f"model {name}")
    source, extra = _pretrained_args(path)
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=True, **extra)
    kwargs[_dtype_kwarg()] = dtype
    try:
        module = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (ValueError, KeyError):
        # An unknown model_type, e.g. our own exports before `import model` registered them.
        _register_project_models()
        try:
            module = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except Exception as err:  # noqa: BLE001 - as below, and an unknown type stays unknown
            raise ValueError(f"cannot load model {name} from {path!r}: {one_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - a missing or damaged file (OSError, safetensors' SafetensorError, ...)
        raise ValueError(f"cannot load model {name} from {path!r}: {one_line(err)}") from None
    module = module.to(device).eval()
    if hasattr(module.config, "use_cache"):
        module.config.use_cache = False  # scoring never generates: no KV cache to allocate per forward
    columns = module.get_output_embeddings().weight.shape[0] if module.get_output_embeddings() is not None else None
    if columns is None:
        columns = int(module.config.vocab_size)
    return LoadedModel(name, path, module, device, dtype, int(columns))


def check_vocab(models: list[LoadedModel], vocab_size: int) -> None:
    """Every model must predict at least the tokenizer's ``vocab_size`` tokens (extra columns are padding)."""
    for m in models:
        if m.logit_columns < vocab_size:
            raise ValueError(
                f"vocab mismatch: model {m.name} ({m.path!r}) has {m.logit_columns} output columns but the "
                f"tokenizer has {vocab_size} tokens"
            )
