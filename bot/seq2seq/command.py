"""``chinwag train seq2seq``: its options, and the run (corpus → training → model folder).

The CLI (``bot/cli.py``) only adds these options to its parser; ``bot/app.py`` passes in
the bot's stored conversations for ``--corpus db``.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.seq2seq.corpus import Pair, corpus_slug, load_pairs
from bot.seq2seq.options import CELLS, DEFAULT_VOCAB, SCORES, ModelConfig, TrainOptions

if TYPE_CHECKING:
    from bot.seq2seq.training import EpochReport, Trained

DEFAULT_CORPUS = "chatterbot:english"


@dataclass(frozen=True, slots=True)
class TrainCommand:
    corpus: str
    out: Path | None
    """``None``: ``<data dir>/models/seq2seq-<corpus>``."""
    options: TrainOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainOptions()
    model = ModelConfig(vocab_size=DEFAULT_VOCAB)
    parser.add_argument("--corpus", default=DEFAULT_CORPUS,
                        help="chatterbot:<language> (chatterbot:english, chatterbot:chinese), "
                             "a .yml/.tsv/.jsonl file of pairs, or db (this bot's own "
                             f"conversations); default {DEFAULT_CORPUS}")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where to write the model (default: "
                             "<CHINWAG_DATA_DIR>/models/seq2seq-<corpus>)")
    parser.add_argument("--cell", choices=CELLS, default=model.cell)
    parser.add_argument("--bidirectional", action=argparse.BooleanOptionalAction,
                        default=model.bidirectional, help="bidirectional encoder")
    parser.add_argument("--attention", choices=SCORES, default=model.attention,
                        help="Luong attention score (default %(default)s)")
    parser.add_argument("--hidden", type=_positive, default=model.hidden)
    parser.add_argument("--embedding", type=_positive, default=model.embedding)
    parser.add_argument("--layers", type=_positive, default=model.layers)
    parser.add_argument("--dropout", type=_fraction, default=model.dropout)
    parser.add_argument("--vocab", type=_positive, default=DEFAULT_VOCAB,
                        help="tokenizer size to train (default %(default)s)")
    parser.add_argument("--epochs", type=_positive, default=defaults.epochs)
    parser.add_argument("--lr", type=_positive_float, default=defaults.lr)
    parser.add_argument("--batch-size", type=_positive, default=defaults.batch_size)
    parser.add_argument("--patience", type=_positive, default=defaults.patience,
                        help="stop after this many epochs without a better held-out "
                             "perplexity (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=_positive, default=defaults.threads,
                        help="torch threads (default %(default)s: small RNNs gain little from "
                             "more, and lose much when the cores are busy)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 0 and below 1")
    return value


def from_args(args: argparse.Namespace) -> TrainCommand:
    model = ModelConfig(vocab_size=args.vocab, hidden=args.hidden, embedding=args.embedding,
                        layers=args.layers, cell=args.cell, bidirectional=args.bidirectional,
                        attention=args.attention, dropout=args.dropout)
    options = TrainOptions(model=model, epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed, patience=args.patience,
                           progress=not args.no_progress and sys.stderr.isatty(),
                           threads=args.threads)
    return TrainCommand(args.corpus, args.out, options)


def run(command: TrainCommand, data_dir: Path,
        stored: Callable[[], Iterable[Pair]] | None = None,
        write: Callable[[str], None] = print) -> Path:
    """Load the corpus, train, save; returns the model folder. ``write`` gets the
    per-epoch lines and the summary."""
    from tqdm import tqdm

    from bot.seq2seq import files
    from bot.seq2seq.training import train

    out = command.out or data_dir / "models" / f"seq2seq-{corpus_slug(command.corpus)}"
    files.check_writable(out)
    pairs = load_pairs(command.corpus, stored)
    write(f"{len(pairs)} pairs from {command.corpus}")

    def epoch_line(report: EpochReport) -> None:
        line = (f"epoch {report.epoch}: loss {report.train_loss:.3f}, held-out perplexity "
                f"{report.held_out_perplexity:.1f} ({report.seconds:.1f} s)"
                f"{' best so far' if report.best else ''}")
        if command.options.progress:
            tqdm.write(line, file=sys.stdout)
        else:
            write(line)

    trained = train(pairs, command.options, epoch_line)
    files.save(out, trained.model, trained.tokenizer, summary(command, trained))
    write(f"held-out perplexity {trained.held_out_perplexity:.1f} at epoch "
          f"{trained.best_epoch} (before training {trained.initial_perplexity:.1f}; unigram "
          f"baseline {trained.unigram_perplexity:.1f}, ratio "
          f"{trained.held_out_perplexity / trained.unigram_perplexity:.2f})")
    write(f"saved to {out}; chat with it: CHINWAG_GENERATOR=seq2seq CHINWAG_MODEL={out} "
          "chinwag console")
    return out


def summary(command: TrainCommand, trained: Trained) -> dict[str, Any]:
    """How the model was trained, for its ``config.json``."""
    options = command.options
    return {
        "corpus": command.corpus,
        "train_pairs": len(trained.train_pairs),
        "held_out_pairs": len(trained.held_out_pairs),
        "epochs_run": len(trained.epochs),
        "best_epoch": trained.best_epoch,
        "held_out_perplexity": round(trained.held_out_perplexity, 3),
        "unigram_perplexity": round(trained.unigram_perplexity, 3),
        "lr": options.lr, "batch_size": options.batch_size, "seed": options.seed,
        "held_out": options.held_out, "patience": options.patience,
        "torch": torch_version(), "python": platform.python_version(),
    }


def torch_version() -> str:
    import torch

    return str(torch.__version__)
