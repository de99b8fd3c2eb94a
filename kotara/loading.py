"""Loading what Kotara evaluates: the text, its token ids, the shared tokenizer and the models.

Every user error here raises ``ValueError`` with a one-line message naming the bad value; the CLI
turns it into exit code 2. Nothing is downloaded: models and tokenizers come from local
directories or the local Hugging Face cache.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREFIX_TOKENS = ("bos", "eos", "none")


@dataclass
class Text:
    """The evaluation text as token ids. token_ids: [n] int64, prefix token (if any) first."""

    token_ids: torch.Tensor
    num_bytes: int  # UTF-8 bytes of the text (for bits per byte); the prefix token adds none
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

    Pieces are tokenized separately (large files never sit in one tokenizer call) and their ids
    concatenated; cutting at line ends keeps the pieces' tokens equal to the whole text's for
    tokenizers whose pre-tokenizer splits at newlines. Errors: missing, not a file, not UTF-8, empty.
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


def resolve_prefix(tokenizer: Any, prefix: str | None) -> tuple[str, int | None]:
    """The prefix token kind and id; ``None`` means the tokenizer's BOS if it has one, else none."""
    if prefix is None:
        prefix = "bos" if tokenizer.bos_token_id is not None else "none"
    if prefix not in PREFIX_TOKENS:
        raise ValueError(f"unknown prefix token {prefix!r}; expected one of {', '.join(PREFIX_TOKENS)}")
    if prefix == "none":
        return prefix, None
    token_id = tokenizer.bos_token_id if prefix == "bos" else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError(f"--prefix_token {prefix}: the tokenizer has no {prefix.upper()} token; use 'none'")
    return prefix, int(token_id)


def tokenize_file(tokenizer: Any, path: str, prefix: str | None = None, chunk_bytes: int = 1 << 20) -> Text:
    """Read and tokenize ``path`` once (in line-aligned pieces), prefix token first."""
    pieces = read_text_pieces(path, chunk_bytes)
    prefix, prefix_id = resolve_prefix(tokenizer, prefix)
    ids: list[int] = [] if prefix_id is None else [prefix_id]
    for piece in pieces:
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    num_bytes = sum(len(piece.encode("utf-8")) for piece in pieces)
    if len(ids) < 2:
        raise ValueError(f"dataset {path!r} has {len(ids)} token(s); at least 2 are needed to score one")
    return Text(torch.tensor(ids, dtype=torch.int64), num_bytes, prefix, prefix_id)


def check_model_path(path: str, what: str) -> None:
    # A path that looks local but is missing would otherwise become a confusing hub lookup.
    # (a hub id is "name" or "org/name"; anything else is a path).
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise ValueError(f"{what} directory not found: {path!r}")


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The shared tokenizer from a local directory or the local HF cache (never downloads)."""
    from transformers import AutoTokenizer

    check_model_path(path, "tokenizer")
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=True)
    try:
        try:
            return AutoTokenizer.from_pretrained(path, **kwargs)
        except (ValueError, KeyError):
            # The directory's config may name a model type only the project's `model` package registers.
            _register_project_models()
            return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as err:  # noqa: BLE001 - missing files, a damaged tokenizer.json (tokenizers' Exception), ...
        raise ValueError(f"cannot load a tokenizer from {path!r}: {one_line(err)}") from None


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def check_same_tokenizer(tokenizer: Any, model_path: str, trust_remote_code: bool = False) -> None:
    """Raise if the model's own tokenizer (when its directory has one) differs from the shared one.

    Fusing per token is only meaningful when token id k means the same string for every model.
    """
    if not (os.path.isdir(model_path) and _has_tokenizer(model_path)):
        return
    own = load_tokenizer(model_path, trust_remote_code)
    if own.get_vocab() != tokenizer.get_vocab():
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
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=True)
    kwargs[_dtype_kwarg()] = dtype
    try:
        module = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (ValueError, KeyError):
        # An unknown model_type, e.g. our own exports before `import model` registered them.
        _register_project_models()
        try:
            module = AutoModelForCausalLM.from_pretrained(path, **kwargs)
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
