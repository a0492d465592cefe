"""The classic sequence-to-sequence chat model, trained by the user on a dialogue corpus.

An RNN encoder (GRU or LSTM, optionally bidirectional) reads the recent turns; an RNN
decoder with Luong attention over the encoder's states writes the reply, token by token
(greedy) or by beam search. Small and fast: trained in minutes on a CPU, by
``chinwag train seq2seq``, from chatterbot-corpus, a file of pairs or the bot's own stored
conversations; served by ``bot.generators.seq2seq``. It answers in the style of its
corpus, with no general knowledge: pick it for a bot of a narrow domain, a language the
built-in model lacks, or a machine too small for a transformer.

Modules: ``options`` (what a model is, how it is trained), ``corpus`` (pairs),
``tokenizer``, ``model`` (the network), ``training``, ``decoding``, ``files`` (a model on
disk), ``command`` (the CLI command).
"""
