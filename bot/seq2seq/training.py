"""Training: tokenizer and model from dialogue pairs, with a held-out split (by prompt),
teacher forcing, per-epoch loss and held-out perplexity, and early stopping.

Deterministic on a CPU for a given seed: the split, the batches, the initial weights and
dropout all come from it (the global torch generator is seeded inside ``fork_rng``, so the
caller's random state is left as it was; so is its number of torch threads).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from bot.errors import TrainingError
from bot.seq2seq.corpus import Pair, split_by_prompt
from bot.seq2seq.model import Seq2Seq
from bot.seq2seq.options import ModelConfig, TrainOptions
from bot.seq2seq.tokenizer import Seq2SeqTokenizer, encoder_input


@dataclass(frozen=True, slots=True)
class EpochReport:
    epoch: int
    train_loss: float
    """Mean cross-entropy per target token (nats), with dropout on."""
    held_out_perplexity: float
    seconds: float
    best: bool


@dataclass(frozen=True)
class Trained:
    model: Seq2Seq
    tokenizer: Seq2SeqTokenizer
    train_pairs: list[Pair]
    held_out_pairs: list[Pair]
    epochs: list[EpochReport]
    initial_perplexity: float
    """On the held-out pairs before the first update."""
    unigram_perplexity: float
    """The baseline on the same held-out pairs (``unigram_perplexity``)."""
    best_epoch: int
    """The epoch whose weights the model has (0: none improved on the initial ones)."""

    @property
    def held_out_perplexity(self) -> float:
        """The model's, as returned."""
        if self.best_epoch == 0:
            return self.initial_perplexity
        return self.epochs[self.best_epoch - 1].held_out_perplexity


@dataclass(frozen=True, slots=True)
class Example:
    source: list[int]
    target: list[int]
    """``<bos>`` reply ``<eos>``, cut to the model's target length plus one."""


def make_examples(pairs: Sequence[Pair], tokenizer: Seq2SeqTokenizer,
                  config: ModelConfig) -> list[Example]:
    replies = tokenizer.encode_batch([p.reply for p in pairs])
    examples = []
    for pair, reply in zip(pairs, replies, strict=True):
        # The rendering chat uses (``Seq2SeqGenerator.source_ids``): the same markers, cut.
        source = encoder_input(tokenizer, pair.turns(), config.max_source_len)
        target = [tokenizer.bos_id, *reply, tokenizer.eos_id][: config.max_target_len + 1]
        examples.append(Example(source, target))
    return examples


def _pad(rows: Sequence[Sequence[int]]) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[*r, *[0] * (width - len(r))] for r in rows], dtype=torch.long)


@dataclass(frozen=True, slots=True)
class Batch:
    source: Tensor
    lengths: Tensor
    target_in: Tensor
    target_out: Tensor

    @classmethod
    def of(cls, examples: Sequence[Example]) -> Batch:
        return cls(_pad([e.source for e in examples]),
                   torch.tensor([len(e.source) for e in examples]),
                   _pad([e.target[:-1] for e in examples]),
                   _pad([e.target[1:] for e in examples]))


def batches(examples: Sequence[Example], size: int, rng: random.Random | None) -> list[Batch]:
    """Batches of similar target lengths (less padding); shuffled when ``rng`` is given."""
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    # Sort within windows of 20 batches: similar lengths together, yet a new mix each epoch.
    window = size * 20
    for start in range(0, len(order), window):
        order[start:start + window] = sorted(order[start:start + window],
                                             key=lambda i: len(examples[i].target))
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    if rng is not None:
        rng.shuffle(groups)
    return [Batch.of([examples[i] for i in group]) for group in groups]


def perplexity(model: Seq2Seq, data: Sequence[Batch]) -> float:
    """exp of the mean negative log-likelihood per target token (EOS included)."""
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in data:
            logits = model(batch.source, batch.lengths, batch.target_in)
            total += float(nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch.target_out.reshape(-1),
                ignore_index=0, reduction="sum"))
            count += int((batch.target_out != 0).sum())
    return math.exp(total / max(1, count))


def unigram_perplexity(train: Sequence[Example], held_out: Sequence[Example],
                       vocab_size: int) -> float:
    """The baseline a model of replies must beat: each reply token (EOS included) drawn
    from the training replies' token frequencies, add-one smoothed over the vocabulary."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for example in train:
        counts += torch.bincount(torch.tensor(example.target[1:]), minlength=vocab_size)
    log_p = torch.log((counts + 1) / (counts.sum() + vocab_size))
    tokens = torch.tensor([t for e in held_out for t in e.target[1:]], dtype=torch.long)
    return math.exp(-float(log_p[tokens].mean()))


def train(pairs: Sequence[Pair], options: TrainOptions,
          report: Callable[[EpochReport], None] = lambda _: None) -> Trained:
    """Split ``pairs`` by prompt, train the tokenizer on the training side, then the model
    until ``options.epochs`` or early stopping; the returned model has the weights of the
    epoch with the best held-out perplexity."""
    train_pairs, held_pairs = split_by_prompt(pairs, options.held_out, options.seed)
    if not train_pairs or not held_pairs:
        raise TrainingError(f"the corpus's {len(pairs)} pairs are too few to hold some out: "
                            "it needs at least two different prompts")
    tokenizer = Seq2SeqTokenizer.train(
        [text for p in train_pairs for text in (p.prompt, p.reply)],
        vocab_size=options.model.vocab_size)
    config = replace(options.model, vocab_size=tokenizer.vocab_size)
    rng = random.Random(options.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            model = Seq2Seq(config)
            train_examples = make_examples(train_pairs, tokenizer, config)
            held_examples = make_examples(held_pairs, tokenizer, config)
            held_batches = batches(held_examples, options.batch_size, None)
            initial = perplexity(model, held_batches)
            epochs, best_epoch = _fit(model, train_examples, held_batches, options, rng,
                                      report)
    finally:
        torch.set_num_threads(threads)
    baseline = unigram_perplexity(train_examples, held_examples, config.vocab_size)
    return Trained(model, tokenizer, train_pairs, held_pairs, epochs, initial, baseline,
                   best_epoch)


def _fit(model: Seq2Seq, train_examples: Sequence[Example], held_batches: Sequence[Batch],
         options: TrainOptions, rng: random.Random,
         report: Callable[[EpochReport], None]) -> tuple[list[EpochReport], int]:
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr,
                                 weight_decay=options.weight_decay)
    best = math.inf
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    best_epoch = 0
    reports: list[EpochReport] = []
    for epoch in range(1, options.epochs + 1):
        started = time.perf_counter()
        loss = _epoch(model, optimizer, batches(train_examples, options.batch_size, rng),
                      options, f"epoch {epoch}/{options.epochs}")
        held = perplexity(model, held_batches)
        improved = held < best
        if improved:
            best, best_epoch = held, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        reports.append(EpochReport(epoch, loss, held, time.perf_counter() - started, improved))
        report(reports[-1])
        if epoch - best_epoch >= options.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return reports, best_epoch


def _epoch(model: Seq2Seq, optimizer: torch.optim.Optimizer, data: Sequence[Batch],
           options: TrainOptions, label: str) -> float:
    from tqdm import tqdm

    model.train()
    total, count = 0.0, 0
    with tqdm(data, desc=label, unit="batch", leave=False,
              disable=not options.progress) as bar:
        for batch in bar:
            logits = model(batch.source, batch.lengths, batch.target_in)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                               batch.target_out.reshape(-1), ignore_index=0)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            nn.utils.clip_grad_norm_(model.parameters(), options.clip)
            optimizer.step()
            tokens = int((batch.target_out != 0).sum())
            total += loss.item() * tokens
            count += tokens
            bar.set_postfix(loss=f"{total / max(1, count):.3f}")
    return total / max(1, count)
