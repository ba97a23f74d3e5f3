"""RWKV World tokenizer: greedy longest match over a 65 529-token vocabulary.

``Tokenizer()`` (see ``world.py``) runs on a native C core (``_trie.c``, built by the project's
install step) or its pure-Python twin (``_pure.py``); both give the ids of the reference
``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``. ``vocab.py`` reads vocabulary files.
"""

from rwkvkit.tokenizer.vocab import DEFAULT_VOCAB, VocabError, load_vocab, parse_vocab
from rwkvkit.tokenizer.world import StreamDecoder, Tokenizer, native_available

__all__ = [
    "DEFAULT_VOCAB",
    "StreamDecoder",
    "Tokenizer",
    "VocabError",
    "load_vocab",
    "native_available",
    "parse_vocab",
]
