"""The tokenizer of the built-in models, built at run time so no files are needed.

A byte-level BPE trained on a fixed text: any input string tokenizes (bytes are the base
alphabet), it decodes back exactly, and a few hundred merges make token counts look like a
real tokenizer's. Training is deterministic for a given `tokenizers` version; router and
workers share one image, so they agree.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
VOCAB_SIZE = 512

_CORPUS = """
Serving large language models splits generation into two phases. Prefill reads the whole
prompt at once and is bound by compute; decode produces one token per step and is bound by
memory bandwidth. Running both on the same GPU makes them interfere: a long prefill stalls
every decoding request behind it, and batching decode steps delays the next prompt. Placing
the phases on different GPUs removes that interference, and each phase can then be given
its own parallelism and its own number of replicas. The cost is moving the key-value cache
from the prefill worker to the decode worker, which a fast network hides well.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine,
thank you. What time is it? It is ten past nine in the morning, and the weather is nice.
def main(): return 0 if __name__ == "__main__" else 1  # numbers 0 1 2 3 4 5 6 7 8 9 10 100
Kubernetes runs containers in pods; an operator watches custom resources and reconciles them.
"""


@lru_cache(maxsize=1)
def _trained_json() -> str:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[UNK, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tokenizer.to_str()


def builtin_tokenizer() -> Tokenizer:
    """A fresh tokenizer object (they are not safe to share across threads while mutating)."""
    return Tokenizer.from_str(_trained_json())
