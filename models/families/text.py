"""T5-family prompt encoding shared by the text-conditioned families: each distinct text encoded once."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EncodedTexts:
    """Every distinct text of a batch, encoded once; `index[text]` is its row."""

    embeddings: torch.Tensor  # (U, L, D)
    mask: torch.Tensor  # (U, L) 1 for tokens, 0 for padding
    index: dict[str, int]

    def rows(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L, D) embeddings and (N, L) masks of `texts`, in order."""
        picks = torch.tensor([self.index[text] for text in texts], device=self.embeddings.device)
        return self.embeddings[picks], self.mask[picks]


@torch.no_grad()
def encode_texts(
    tokenizer: object, text_encoder: torch.nn.Module, texts: list[str], max_length: int
) -> EncodedTexts:
    """Tokenise to `max_length` (padded, truncated, special tokens added) and encode, as the pipelines do.

    Padding to a fixed length makes each text's embedding independent of which others share the call.
    """
    distinct = list(dict.fromkeys(texts))
    tokens = tokenizer(  # type: ignore[operator]
        distinct,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)  # (U, L), (U, L)
    embeddings = text_encoder(ids, attention_mask=mask)[0]  # (U, L, D)
    return EncodedTexts(embeddings, mask, {text: i for i, text in enumerate(distinct)})
