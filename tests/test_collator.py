import pytest
import torch

from coconut_fast.data.collator import CoconutCollator

P, LAT, X = 0, 9, -100


def feat(ids, labels=None, idx=None, positions=True):
    f = {"input_ids": ids, "attention_mask": [1] * len(ids)}
    if labels is not None:
        f["labels"] = labels
    if positions:
        f["position_ids"] = list(range(len(ids)))
    if idx is not None:
        f["idx"] = idx
    return f


def batch_as_lists(batch):
    for v in batch.values():
        assert v.dtype == torch.int64
    return {k: v.tolist() for k, v in batch.items()}


# First latents at columns 2, 4 and 1: the official collator shifts rows 1 and 3 right.
def three_features():
    return [
        feat([1, 2, LAT, LAT, 3], [X, X, X, X, 3], idx=10),
        feat([1, 2, 3, 4, LAT, 5], [X, X, X, X, X, 5], idx=11),
        feat([1, LAT, 6, 7], [X, X, 6, 7], idx=12),
    ]


def test_official_alignment():
    out = batch_as_lists(CoconutCollator(P, LAT, align_latents=True)(three_features()))
    assert out == {
        "input_ids": [
            [P, P, 1, 2, LAT, LAT, 3],
            [1, 2, 3, 4, LAT, 5, P],
            [P, P, P, 1, LAT, 6, 7],
        ],
        "attention_mask": [
            [0, 0, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 1],
        ],
        "labels": [
            [X, X, X, X, X, X, 3],
            [X, X, X, X, X, 5, X],
            [X, X, X, X, X, 6, 7],
        ],
        "position_ids": [
            [0, 0, 0, 1, 2, 3, 4],
            [0, 1, 2, 3, 4, 5, 0],
            [0, 0, 0, 0, 1, 2, 3],
        ],
        "idx": [10, 11, 12],
    }


def test_default_is_plain_right_padding():
    out = batch_as_lists(CoconutCollator(P, LAT)(three_features()))
    assert out == {
        "input_ids": [
            [1, 2, LAT, LAT, 3, P],
            [1, 2, 3, 4, LAT, 5],
            [1, LAT, 6, 7, P, P],
        ],
        "attention_mask": [
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0, 0],
        ],
        "labels": [
            [X, X, X, X, 3, X],
            [X, X, X, X, X, 5],
            [X, X, 6, 7, X, X],
        ],
        "position_ids": [
            [0, 1, 2, 3, 4, 0],
            [0, 1, 2, 3, 4, 5],
            [0, 1, 2, 3, 0, 0],
        ],
        "idx": [10, 11, 12],
    }


def test_mixed_batch_only_latent_rows_shift():
    features = [
        feat([1, 2, 3, 4, 5, 6, 7, 8]),
        feat([1, 2, LAT, 3]),
        feat([1, 2, 3, LAT, LAT]),
    ]
    out = batch_as_lists(CoconutCollator(P, LAT, align_latents=True)(features))
    assert out == {
        "input_ids": [
            [1, 2, 3, 4, 5, 6, 7, 8],
            [P, 1, 2, LAT, 3, P, P, P],
            [1, 2, 3, LAT, LAT, P, P, P],
        ],
        "attention_mask": [
            [1, 1, 1, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
        ],
        "position_ids": [
            [0, 1, 2, 3, 4, 5, 6, 7],
            [0, 0, 1, 2, 3, 0, 0, 0],
            [0, 1, 2, 3, 4, 0, 0, 0],
        ],
    }


def test_no_latent_batch_keeps_position_ids():
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "position_ids": [3, 4, 5], "labels": [X, 6, 7]},
        {"input_ids": [5], "attention_mask": [1], "position_ids": [0], "labels": [5]},
    ]
    for align in (False, True):
        out = batch_as_lists(CoconutCollator(P, LAT, align_latents=align)(features))
        assert out == {
            "input_ids": [[5, 6, 7], [5, P, P]],
            "attention_mask": [[1, 1, 1], [1, 0, 0]],
            "labels": [[X, 6, 7], [5, X, X]],
            "position_ids": [[3, 4, 5], [0, 0, 0]],
        }


def test_keys_follow_features():
    features = [feat([1, LAT], positions=False), feat([1, 2, LAT], positions=False)]
    out = batch_as_lists(CoconutCollator(P, LAT)(features))
    assert out == {"input_ids": [[1, LAT, P], [1, 2, LAT]], "attention_mask": [[1, 1, 0], [1, 1, 1]]}
    # alignment always yields position_ids, as the official collator does
    out = batch_as_lists(CoconutCollator(P, LAT, align_latents=True)(features))
    assert out == {
        "input_ids": [[P, 1, LAT], [1, 2, LAT]],
        "attention_mask": [[0, 1, 1], [1, 1, 1]],
        "position_ids": [[0, 0, 1], [0, 1, 2]],
    }


def test_custom_pad_ids_and_tensor_inputs():
    features = [
        {"input_ids": torch.tensor([1, 2, 3]), "attention_mask": torch.tensor([1, 1, 1]), "labels": [1, 2, 3]},
        {"input_ids": [4], "attention_mask": [1], "labels": [4]},
    ]
    out = batch_as_lists(CoconutCollator(pad_token_id=50, latent_id=LAT, label_pad_token_id=-1)(features))
    assert out == {
        "input_ids": [[1, 2, 3], [4, 50, 50]],
        "attention_mask": [[1, 1, 1], [1, 0, 0]],
        "labels": [[1, 2, 3], [4, -1, -1]],
    }


def test_errors():
    c = CoconutCollator(P, LAT)
    with pytest.raises(ValueError, match="empty"):
        c([])
    with pytest.raises(ValueError, match="'labels' has length 2"):
        c([feat([1, 2, 3], labels=[1, 2])])
    with pytest.raises(ValueError, match="'attention_mask' has length"):
        c([{"input_ids": [1, 2], "attention_mask": [1]}])
    with pytest.raises(ValueError, match="feature 1 has keys"):
        c([feat([1], labels=[1]), feat([1])])
    with pytest.raises(ValueError, match="attention_mask"):
        c([{"input_ids": [1]}])
    with pytest.raises(ValueError, match="unsupported keys"):
        c([{"input_ids": [1], "attention_mask": [1], "answer": "5"}])
