"""A real T5 SentencePiece tokenizer trained in a fraction of a second, for tiny text models without a hub.

The tests' tiny PixArt and Wan pipelines (tests/tiny_text_models.py) and the architecture benchmarks
(bench/families.py) need a tokenizer laid out like the hub's; this one has T5's special ids.
"""

import io
import json
import random
from pathlib import Path

CORPUS_WORDS = (
    "a an the of in on under with at red green blue yellow white black small large fox cat dog bird "
    "tree house river mountain city boat car sky sunset night photo painting drawing blurry ugly"
)
VOCAB_SIZE = 48  # pieces: <pad>=0, </s>=1, <unk>=2 (T5's layout), then the corpus' pieces


def build_t5_tokenizer(path: Path, seed: int = 0) -> Path:
    """Train a SentencePiece unigram model with T5's special ids and save it as a T5 tokenizer folder."""
    import sentencepiece

    rng, words = random.Random(seed), CORPUS_WORDS.split()
    corpus = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(2000)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "spiece.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path
