"""The network: an RNN encoder, and an RNN decoder with Luong attention over its states.

Luong (global) attention, not Bahdanau: the decoder RNN runs first and its output attends
over the encoder's states, so with teacher forcing the whole target runs through the RNN in
one call and all steps attend at once (one batched matrix product), which is several times
faster on a CPU than Bahdanau's step-by-step loop, where each step's attention must come
before its RNN input. The score is ``general`` (``h_t·W·h_s``, the default), ``dot``
(``h_t·h_s``) or ``concat`` (``v·tanh(W[h_t; h_s])``, the additive score). No input
feeding, for the same reason.

The embedding is shared by the encoder, the decoder and the output layer (tied weights):
one vocabulary, a third fewer parameters, and better estimates of rare tokens on the small
corpora this model is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from bot.seq2seq.options import ModelConfig

State = Tensor | tuple[Tensor, Tensor]
"""An RNN's state: ``h`` for a GRU, ``(h, c)`` for an LSTM, each (layers, batch, hidden)."""


def _rnn(config: ModelConfig, bidirectional: bool) -> nn.GRU | nn.LSTM:
    kind = nn.GRU if config.cell == "gru" else nn.LSTM
    return kind(config.embedding, config.hidden, num_layers=config.layers, batch_first=True,
                bidirectional=bidirectional,
                dropout=config.dropout if config.layers > 1 else 0.0)


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        self.rnn = _rnn(config, config.bidirectional)
        directions = 2 if config.bidirectional else 1
        # A bidirectional encoder's two halves are joined to the decoder's size, for the
        # attention's keys and for the decoder's first state.
        self.memory = nn.Linear(directions * config.hidden, config.hidden) \
            if directions == 2 else nn.Identity()
        self.bridge_h = nn.Linear(directions * config.hidden, config.hidden) \
            if directions == 2 else nn.Identity()
        self.bridge_c = nn.Linear(directions * config.hidden, config.hidden) \
            if directions == 2 and config.cell == "lstm" else nn.Identity()

    def forward(self, embedded: Tensor, lengths: Tensor) -> tuple[Tensor, State]:
        """``embedded`` (batch, time, embedding), padded; ``lengths`` (batch,). Returns the
        states to attend over (batch, time, hidden) and the decoder's first state."""
        packed = pack_padded_sequence(self.dropout(embedded), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        outputs, final = self.rnn(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True,
                                         total_length=embedded.size(1))
        memory = self.memory(outputs)
        if isinstance(final, tuple):
            return memory, (self._bridge(final[0], self.bridge_h),
                            self._bridge(final[1], self.bridge_c))
        return memory, self._bridge(final, self.bridge_h)

    def _bridge(self, final: Tensor, layer: nn.Module) -> Tensor:
        if not self.config.bidirectional:
            return final
        layers, batch, hidden = self.config.layers, final.size(1), self.config.hidden
        # (layers * 2, batch, hidden) → (layers, batch, 2 * hidden): forward and backward.
        joined = final.view(layers, 2, batch, hidden).transpose(1, 2).reshape(
            layers, batch, 2 * hidden)
        return torch.tanh(layer(joined))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.score = config.attention
        hidden = config.hidden
        if config.attention == "general":
            self.keys = nn.Linear(hidden, hidden, bias=False)
        elif config.attention == "concat":
            self.keys = nn.Linear(hidden, hidden, bias=False)
            self.queries = nn.Linear(hidden, hidden)
            self.v = nn.Linear(hidden, 1, bias=False)

    def prepare(self, memory: Tensor) -> Tensor:
        """The keys for ``memory``, computed once per input rather than once per step."""
        return memory if self.score == "dot" else self.keys(memory)

    def forward(self, queries: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        """``queries`` (batch, steps, hidden); ``mask`` (batch, time) true on real tokens.
        Returns the context vectors (batch, steps, hidden)."""
        if self.score == "concat":
            mixed = torch.tanh(self.queries(queries).unsqueeze(2) + keys.unsqueeze(1))
            scores = self.v(mixed).squeeze(-1)
        else:
            scores = torch.bmm(queries, keys.transpose(1, 2))
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        return torch.bmm(torch.softmax(scores, dim=-1), memory)


@dataclass(frozen=True, slots=True)
class Encoded:
    """One batch of inputs, encoded: what every decoding step attends over."""

    memory: Tensor
    keys: Tensor
    mask: Tensor

    def repeat(self, index: Tensor) -> Encoded:
        """Rows chosen by ``index`` (a beam's hypotheses share their input)."""
        return Encoded(self.memory[index], self.keys[index], self.mask[index])


class Seq2Seq(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding, padding_idx=0)
        self.encoder = Encoder(config)
        self.decoder_rnn = _rnn(config, bidirectional=False)
        self.attention = Attention(config)
        self.dropout = nn.Dropout(config.dropout)
        # Luong's attentional state: tanh(W[context; decoder output]), sized to the
        # embedding so that the output layer can be the embedding itself.
        self.combine = nn.Linear(2 * config.hidden, config.embedding)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))

    def encode(self, source: Tensor, lengths: Tensor) -> tuple[Encoded, State]:
        memory, state = self.encoder(self.embedding(source), lengths)
        positions = torch.arange(source.size(1), device=source.device)
        mask = positions.unsqueeze(0) < lengths.to(source.device).unsqueeze(1)
        return Encoded(memory, self.attention.prepare(memory), mask), state

    def decode(self, target_in: Tensor, encoded: Encoded,
               state: State) -> tuple[Tensor, State]:
        """Logits (batch, steps, vocab) for ``target_in`` (batch, steps) given the encoded
        input: all steps at once in training (teacher forcing), one at a time in decoding."""
        embedded = self.dropout(self.embedding(target_in))
        outputs, state = self.decoder_rnn(embedded, state)
        context = self.attention(outputs, encoded.keys, encoded.memory, encoded.mask)
        attentional = torch.tanh(self.combine(torch.cat([context, outputs], dim=-1)))
        logits = nn.functional.linear(self.dropout(attentional), self.embedding.weight,
                                      self.output_bias)
        return logits, state

    def forward(self, source: Tensor, lengths: Tensor, target_in: Tensor) -> Tensor:
        encoded, state = self.encode(source, lengths)
        logits, _ = self.decode(target_in, encoded, state)
        return logits


def select_state(state: State, index: Tensor) -> State:
    """The state's rows (batch entries) chosen by ``index``."""
    if isinstance(state, tuple):
        return state[0][:, index], state[1][:, index]
    return state[:, index]
