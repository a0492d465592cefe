"""The seq2seq model's tokenizer: byte-level BPE trained on the corpus with ``tokenizers``.

Byte-level, so any text encodes (no unknown token: an emoji or a character the corpus
never had becomes its bytes). Chinese, Japanese kanji and other Han characters are split
one character a token before BPE runs, so merges never join two of them: a Chinese
sentence is a sequence of characters, the unit Chinese text is usually modelled in
without a word segmenter (a character seen only once in training stays as its bytes).

It also offers the few methods of a Hugging Face tokenizer that incremental decoding
(``bot.generators.reply_text``) uses, so streaming works as it does for the other models.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, BOS, EOS, USER, BOT = "<pad>", "<bos>", "<eos>", "<user>", "<bot>"
SPECIAL_TOKENS = (PAD, BOS, EOS, USER, BOT)
"""In this order, so their ids are 0 to 4 in every trained tokenizer."""
HAN = Regex(r"\p{Han}")


class Seq2SeqTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # "<eos>" or "<bot>" typed in a message is text, not a marker the model acts on.
        tokenizer.encode_special_tokens = True
        ids = list(range(len(SPECIAL_TOKENS)))
        if [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] != ids:
            raise ValueError("not a seq2seq tokenizer: its special tokens are missing")
        self.pad_id, self.bos_id, self.eos_id, self.user_id, self.bot_id = ids
        self.all_special_ids = ids

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int,
              min_frequency: int = 2) -> Seq2SeqTokenizer:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(HAN, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: Path) -> Seq2SeqTokenizer:
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        self._tokenizer.save(str(path))

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """The text's ids, without special tokens."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in
                self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def tokens(self, text: str) -> list[str]:
        """What each token of the text decodes to (to show how it was split)."""
        return [self.decode([i]) for i in self.encode(text)]

    def head(self, text: str, max_tokens: int) -> str:
        """The longest start of ``text`` (as written) that is at most ``max_tokens`` tokens."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= max_tokens:
            return text
        # Cut after a token, then check: a cut inside a word may encode in more pieces than
        # the word did, and a character's bytes share its offsets; step back until it fits.
        for kept in range(max_tokens, 0, -1):
            start = text[:encoding.offsets[kept - 1][1]]
            if len(self.encode(start)) <= max_tokens:
                return start
        return ""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, token: int) -> str | None:
        piece = self._tokenizer.id_to_token(token)
        return None if piece is None else str(piece)


def encoder_input(tokenizer: Seq2SeqTokenizer, turns: Sequence[tuple[str, str]],
                  max_len: int) -> list[int]:
    """The encoder's input for a conversation's turns, ``(role, text)`` oldest first: each
    turn is its role's marker (``<user>``, or ``<bot>`` for the assistant) and its text.
    Only the newest ``max_len`` tokens are kept: a long history is cut from its oldest end
    (and older turns are not even tokenized). Training renders each pair's turns with it
    too (``Pair.turns``), so the model is trained on what chat shows it."""
    pieces: list[list[int]] = []
    size = 0
    for role, text in reversed(turns):
        if size >= max_len:
            break
        marker = tokenizer.bot_id if role == "assistant" else tokenizer.user_id
        pieces.append([marker, *tokenizer.encode(text)])
        size += len(pieces[-1])
    ids = [token for piece in reversed(pieces) for token in piece]
    return ids[len(ids) - max_len:] if size > max_len else ids
