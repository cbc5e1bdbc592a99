"""Batch padding for Coconut examples."""
from __future__ import annotations

import torch

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")
_KNOWN_KEYS = frozenset(_SEQUENCE_KEYS + ("idx",))


def _as_list(value) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


class CoconutCollator:
    """Pad a list of examples into int64 tensors.

    Default (align_latents=False): plain right padding -- input_ids with pad_token_id,
    attention_mask 0, labels label_pad_token_id, position_ids 0 -- keeping each
    example's own position_ids. CoconutModel.forward aligns the latent columns of a
    batch internally, so no alignment is needed here.

    align_latents=True reproduces the official collator: examples with latents are
    left-padded so that their first <|latent|> falls in the same column (position_ids
    restart at 0 after the left pad), then everything is right-padded as above.

    input_ids and attention_mask are required; labels, position_ids and idx are
    returned when the examples have them (all examples must have the same keys).
    """

    def __init__(self, pad_token_id: int, latent_id: int, align_latents: bool = False, label_pad_token_id: int = -100):
        self.pad_token_id = pad_token_id
        self.latent_id = latent_id
        self.align_latents = align_latents
        self.label_pad_token_id = label_pad_token_id

    def _pad_values(self) -> dict[str, int]:
        return {
            "input_ids": self.pad_token_id,
            "attention_mask": 0,
            "labels": self.label_pad_token_id,
            "position_ids": 0,
        }

    def _normalize(self, features: list[dict]) -> tuple[list[dict], set[str]]:
        if not features:
            raise ValueError("cannot collate an empty list of features")
        keys = set(features[0])
        rows = []
        for i, feature in enumerate(features):
            if set(feature) != keys:
                raise ValueError(f"feature {i} has keys {sorted(feature)}, feature 0 has {sorted(keys)}")
            unknown = set(feature) - _KNOWN_KEYS
            if unknown:
                raise ValueError(f"feature {i} has unsupported keys {sorted(unknown)}")
            for key in ("input_ids", "attention_mask"):
                if key not in feature:
                    raise ValueError(f"feature {i} is missing {key!r}")
            row = {k: _as_list(feature[k]) for k in _SEQUENCE_KEYS if k in feature}
            n = len(row["input_ids"])
            for k, v in row.items():
                if len(v) != n:
                    raise ValueError(f"feature {i}: {k!r} has length {len(v)}, input_ids has length {n}")
            if "idx" in feature:
                row["idx"] = int(feature["idx"])
            rows.append(row)
        return rows, keys

    def _align(self, rows: list[dict], keys: set[str]) -> set[str]:
        firsts = [r["input_ids"].index(self.latent_id) if self.latent_id in r["input_ids"] else None for r in rows]
        present = [f for f in firsts if f is not None]
        if not present:
            return keys
        target = max(present)
        pads = self._pad_values()
        for row, first in zip(rows, firsts):
            n_pad = 0 if first is None else target - first
            # Like the official collator, position ids restart after the left pad for every example.
            row["position_ids"] = list(range(len(row["input_ids"])))
            for k in _SEQUENCE_KEYS:
                if k in row:
                    row[k] = [pads[k]] * n_pad + row[k]
        return keys | {"position_ids"}

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows, keys = self._normalize(features)
        if self.align_latents:
            keys = self._align(rows, keys)
        width = max(len(r["input_ids"]) for r in rows)
        batch = {}
        for k, pad in self._pad_values().items():
            if k in keys:
                batch[k] = torch.tensor([r[k] + [pad] * (width - len(r[k])) for r in rows], dtype=torch.long)
        if "idx" in keys:
            batch["idx"] = torch.tensor([r["idx"] for r in rows], dtype=torch.long)
        return batch
