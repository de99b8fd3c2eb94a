"""``python -m kotara.demo OUT_DIR``: two random GPT-2 models, a shared tokenizer and a text, built offline.

For trying the CLI and measuring throughput without any download: the models are random (their
perplexities mean nothing), but their shapes (default: GPT-2 small, V = 50257) make the forward
and fusion costs realistic. The tests build their tiny models with the same functions.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def write_corpus(path: Path, words: list[str], num_words: int, seed: int = 0, line_words: int = 12) -> Path:
    """A deterministic text of ``num_words`` words drawn with Zipf-like frequencies, ~``line_words`` per line."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    drawn = rng.choices(words, weights, k=num_words)
    lines = [" ".join(drawn[i : i + line_words]) for i in range(0, num_words, line_words)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_tokenizer(directory: Path, words: list[str]) -> Path:
    """A whitespace WordLevel tokenizer over ``words`` plus <pad> <s> </s> <unk>, saved as a HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *sorted(set(words) - set(SPECIAL_TOKENS))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(directory)
    return directory


def build_bpe_tokenizer(directory: Path, text_path: Path, vocab_size: int) -> Path:
    """A byte-level BPE (GPT-2's pre-tokenizer) trained on the text, <s> </s> <pad>, saved as a HF directory.

    Its tokens start at every space after a word, so fusion per word (``--fusion_unit word``) works with it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([text_path.read_text(encoding="utf-8")], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    return directory


def build_gpt2(
    directory: Path,
    tokenizer_dir: Path,
    seed: int,
    extra_columns: int = 0,
    n_positions: int = 64,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    lm_head_std: float | None = 0.5,
) -> Path:
    """A random GPT-2 for the tokenizer in ``tokenizer_dir``, saved (with that tokenizer) to ``directory``.

    ``extra_columns`` pads the output layer past the tokenizer, as real checkpoints pad to a multiple
    of 64/128 columns. ``lm_head_std`` re-draws the (tied) embedding sharper than GPT-2's default
    init so that two seeds disagree measurably; None keeps the default init.
    """
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer) + extra_columns,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    if lm_head_std is not None:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, lm_head_std)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (as kotara's CLI; argparse adds the usage)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before anything is built, what the tokenizer or GPT-2 cannot take (ValueError, one line)."""
    if args.vocab <= len(SPECIAL_TOKENS):
        raise ValueError(f"--vocab must be > {len(SPECIAL_TOKENS)}, got {args.vocab}")
    for flag in ("words", "n_layer", "n_embd", "n_head", "n_positions"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.n_embd % args.n_head:
        raise ValueError(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head} (the heads split it)")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"out_dir {str(args.out_dir)!r} exists and is not a directory")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m kotara.demo", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path, help="directory to create (text.txt, tokenizer/, model_a/, model_b/)")
    p.add_argument("--vocab", type=int, default=50257, help="tokenizer size incl. 4 special tokens (default 50257)")
    p.add_argument("--words", type=int, default=8192, help="words of text (= tokens, word-level tokenizer)")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768, help="width; a multiple of --n_head")
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_positions", type=int, default=1024, help="context length; the printed command uses it")
    p.add_argument(
        "--tokenizer",
        choices=["word", "bpe"],
        default="word",
        help="word: one token per word (default); bpe: a byte-level BPE of at most --vocab tokens trained on the text "
        "(tokens start at spaces, as fusion per word needs)",
    )
    args = p.parse_args(argv)
    try:
        check_args(args)
        build(args)
    except (ValueError, OSError) as err:
        p.error(" ".join(str(err).split("\n")))
    except KeyboardInterrupt:
        print(f"{p.prog}: interrupted", file=sys.stderr)
        return 130
    n = args.n_positions
    print(
        f"built {args.out_dir}: try\n  python kotara.py --model_a {args.out_dir / 'model_a'} "
        f"--model_b {args.out_dir / 'model_b'} --dataset_path {args.out_dir / 'text.txt'} --strategy all "
        f"--max_length {n} --stride {n}"
    )
    return 0


def build(args: argparse.Namespace) -> None:
    """The text, the tokenizer and the two models in ``args.out_dir``."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(args.vocab - len(SPECIAL_TOKENS))]
    text = write_corpus(args.out_dir / "text.txt", words, args.words)
    if args.tokenizer == "bpe":
        tokenizer_dir = build_bpe_tokenizer(args.out_dir / "tokenizer", text, args.vocab)
    else:
        tokenizer_dir = build_tokenizer(args.out_dir / "tokenizer", words)
    shape = dict(n_positions=args.n_positions, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head)
    for name, seed in (("model_a", 1), ("model_b", 2)):
        build_gpt2(args.out_dir / name, tokenizer_dir, seed, lm_head_std=None, **shape)


if __name__ == "__main__":
    raise SystemExit(main())
