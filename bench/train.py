"""Training the seq2seq model on chatterbot-corpus English: time, and perplexity against
the unigram baseline, on prompts it never saw.

The corpus repeats prompts with different replies, so every split here is by prompt: a
test split (10% of the distinct prompts) is set aside first and used only for the final
figures; ``train`` splits what is left again by prompt into training and held-out pairs
(for per-epoch perplexity and early stopping). The baseline draws each reply token from
the training replies' token frequencies, add-one smoothed over the vocabulary; both
perplexities are per reply token, EOS included, with the same tokenizer. The model is the
``chinwag train seq2seq`` default (bidirectional GRU, Luong attention). One torch thread:
on a busy 2-core machine two threads are several times slower.

Target: test perplexity at most 0.4× the baseline, in at most 5 minutes of training.

Usage: python bench/train.py [--seed 0] [--threads 1] [--quick]
Last line: train: unigram_ppl=… model_ppl=… ratio=… seconds=… target_met=…
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.seq2seq.corpus import load_pairs, split_by_prompt
from bot.seq2seq.decoding import beam_search, greedy
from bot.seq2seq.options import ModelConfig, TrainOptions
from bot.seq2seq.tokenizer import encoder_input
from bot.seq2seq.training import (
    EpochReport,
    batches,
    make_examples,
    perplexity,
    train,
    unigram_perplexity,
)

TARGET_RATIO = 0.4
TARGET_SECONDS = 300
TEST_SEED = 1234
SAMPLES = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model, two epochs, a slice of the corpus: checks that "
                             "the bench runs, not the target")
    args = parser.parse_args()

    pairs = load_pairs("chatterbot:english")
    options = TrainOptions(seed=args.seed, threads=args.threads)
    if args.quick:
        pairs = pairs[:300]
        options = replace(options, epochs=2, model=ModelConfig(
            vocab_size=300, hidden=32, embedding=32))
    rest, test = split_by_prompt(pairs, 0.1, TEST_SEED)
    print(f"corpus: {len(pairs)} pairs; test: {len(test)} pairs of "
          f"{len({p.prompt for p in test})} prompts set aside")

    def show(report: EpochReport) -> None:
        print(f"epoch {report.epoch}: loss {report.train_loss:.3f}, held-out perplexity "
              f"{report.held_out_perplexity:.1f} ({report.seconds:.1f} s)", flush=True)

    started = time.perf_counter()
    trained = train(rest, options, show)
    seconds = time.perf_counter() - started

    model, tokenizer = trained.model, trained.tokenizer
    config = model.config
    train_examples = make_examples(trained.train_pairs, tokenizer, config)
    test_examples = make_examples(test, tokenizer, config)
    baseline = unigram_perplexity(train_examples, test_examples, config.vocab_size)
    model_ppl = perplexity(model, batches(test_examples, options.batch_size, None))
    ratio = model_ppl / baseline
    print(f"train/held-out/test pairs: {len(trained.train_pairs)}/"
          f"{len(trained.held_out_pairs)}/{len(test)}; vocabulary {config.vocab_size}; "
          f"best epoch {trained.best_epoch} of {len(trained.epochs)}")
    print(f"held-out (early stopping): perplexity {trained.held_out_perplexity:.1f}, "
          f"unigram {trained.unigram_perplexity:.1f}")
    print(f"test: unigram baseline perplexity {baseline:.1f}, model perplexity "
          f"{model_ppl:.1f}, ratio {ratio:.3f} (target ≤ {TARGET_RATIO})")
    print(f"training took {seconds:.0f} s (target ≤ {TARGET_SECONDS} s)")
    seen: set[str] = set()
    for pair in test:
        if len(seen) == SAMPLES:
            break
        if pair.prompt in seen:
            continue
        seen.add(pair.prompt)
        source = encoder_input(tokenizer, pair.turns(), config.max_source_len)
        ends = tokenizer.bos_id, tokenizer.eos_id, config.max_target_len
        print(f"  > {pair.prompt}\n"
              f"  < {tokenizer.decode(greedy(model, source, *ends).ids)}   (greedy)\n"
              f"  < {tokenizer.decode(beam_search(model, source, *ends, beam=4).ids)}"
              "   (beam 4)")
    met = ratio <= TARGET_RATIO and seconds <= TARGET_SECONDS
    print(f"train: unigram_ppl={baseline:.1f} model_ppl={model_ppl:.1f} ratio={ratio:.3f} "
          f"seconds={seconds:.0f} target_met={met}")


if __name__ == "__main__":
    main()
