"""The training data loader over real memory-mapped token shards (tests/support/tinydata.py)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from llmforge.model.data import IGNORE_INDEX, ShardBatcher
from llmforge.model.evaluate import split_stream, window_batches
from llmforge.model.runtime import DistInfo
from llmforge.pipeline.shards import Dataset

try:
    from support.tinydata import tiny_dataset
except ImportError:  # tests/ is a package
    from tests.support.tinydata import tiny_dataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return Dataset.open(tiny_dataset(tmp_path_factory.mktemp("data")))


def test_batches_are_shifted_windows_inside_one_shard(ds: Dataset) -> None:
    T = 48
    b = ShardBatcher(ds, "train", T, 16, seed=3)
    shards = [s.tokens for s in ds.shards("train")]
    assert len(shards) == 2  # the multi-shard path is exercised
    for step in range(5):
        x, y = b.get_batch(step, 0)
        assert x.shape == y.shape == (16, T) and x.dtype == y.dtype == torch.int64
        which, start = b.window_starts(step, 0)
        for i in range(16):
            toks = shards[which[i]]
            assert start[i] + T + 1 <= len(toks)  # never crosses the end of its shard
            assert np.array_equal(x[i].numpy(), toks[start[i] : start[i] + T])
            assert np.array_equal(y[i].numpy(), toks[start[i] + 1 : start[i] + T + 1])


def test_same_coordinates_give_same_batch_in_a_fresh_loader(ds: Dataset) -> None:
    a = ShardBatcher(ds, "train", 32, 8, seed=11)
    b = ShardBatcher(ds, "train", 32, 8, seed=11)  # e.g. a resumed process
    assert torch.equal(a.get_batch(7, 1)[0], b.get_batch(7, 1)[0])
    assert not torch.equal(a.get_batch(7, 0)[0], a.get_batch(7, 1)[0])
    assert not torch.equal(a.get_batch(7, 0)[0], a.get_batch(8, 0)[0])
    c = ShardBatcher(ds, "train", 32, 8, seed=12)
    assert not torch.equal(a.get_batch(7, 0)[0], c.get_batch(7, 0)[0])


def test_ranks_split_the_global_batch_of_one_process(ds: Dataset) -> None:
    world, B = 3, 4
    one = ShardBatcher(ds, "train", 32, world * B, seed=5)
    for step, micro in [(0, 0), (9, 2)]:
        parts = [ShardBatcher(ds, "train", 32, B, seed=5, rank=r, world_size=world).get_batch(step, micro)
                 for r in range(world)]
        x1, y1 = one.get_batch(step, micro)
        assert torch.equal(torch.cat([p[0] for p in parts]), x1)
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
        assert not torch.equal(parts[0][0], parts[1][0])


def test_windows_are_drawn_uniformly_over_all_shards(ds: Dataset) -> None:
    T = 64
    b = ShardBatcher(ds, "train", T, 512, seed=0)
    lengths = np.array([len(s.tokens) - T for s in ds.shards("train")], dtype=float)
    which = np.concatenate([b.window_starts(s)[0] for s in range(40)])
    observed = np.bincount(which, minlength=len(lengths)) / len(which)
    expected = lengths / lengths.sum()
    assert np.allclose(observed, expected, atol=0.01), (observed, expected)


def test_state_dict_round_trips_and_rejects_another_seed(ds: Dataset) -> None:
    a = ShardBatcher(ds, "train", 16, 2, seed=1)
    a.get_batch(41, 0)
    state = a.state_dict()
    assert state == {"seed": 1, "step": 42}
    b = ShardBatcher(ds, "train", 16, 2, seed=1)
    b.load_state_dict(state)
    assert b.state_dict() == state
    with pytest.raises(ValueError, match="seed 1 but this run uses seed 2"):
        ShardBatcher(ds, "train", 16, 2, seed=2).load_state_dict(state)


def test_rejects_block_size_longer_than_every_shard(ds: Dataset) -> None:
    too_long = max(len(s.tokens) for s in ds.shards("val"))
    with pytest.raises(ValueError, match=r"no shard with at least .* tokens"):
        ShardBatcher(ds, "val", too_long, 2, seed=0)


def test_scorer_windows_cover_every_target_once_in_order(ds: Dataset) -> None:
    stream, counts = split_stream(ds, "val")
    assert counts["tokens"] == ds.num_tokens("val") == len(stream) - 1
    batches = list(window_batches(stream, 100, 100, 7, ds.eos_id))
    ys = np.concatenate([y[y != IGNORE_INDEX].numpy() for _, y in batches])
    assert np.array_equal(ys, stream.slice(1, len(stream)))  # every token after the leading EOS, once
    x0, y0 = batches[0]
    assert torch.equal(x0[0, 1:], y0[0, :-1])  # y is x shifted by one


def test_scorer_honours_max_tokens_with_whole_documents_and_splits_ranks(ds: Dataset) -> None:
    stream, counts = split_stream(ds, "val", max_tokens=1000)
    assert counts["documents"] >= 1 and (counts["tokens"] <= 1000 or counts["documents"] == 1)  # whole documents
    whole = sum(int((y != IGNORE_INDEX).sum()) for _, y in window_batches(stream, 64, 64, 4, ds.eos_id))
    per_rank = [sum(int((y != IGNORE_INDEX).sum()) for _, y in
                    window_batches(stream, 64, 64, 4, ds.eos_id, dist=DistInfo(rank=r, world_size=2)))
                for r in range(2)]
    assert whole == counts["tokens"] and sum(per_rank) == whole and min(per_rank) > 0


def test_loader_maps_the_shards_instead_of_copying_them(ds: Dataset) -> None:
    b = ShardBatcher(ds, "train", 32, 4, seed=0)
    for view in b._views:
        assert not view.flags.owndata and not view.flags.writeable  # a view of the read-only map
        base = view
        while isinstance(base.base, np.ndarray):
            base = base.base
        assert not isinstance(base.base, (bytes, bytearray))  # backed by the Arrow memory map


def test_loader_refuses_token_ids_beyond_the_vocabulary_even_with_a_matching_sha256(tmp_path) -> None:
    """A shard written with ids the model has no embedding for (another tokenizer's, say) has a
    manifest that matches it byte for byte: only the id check stands between it and an
    IndexError deep inside the first forward pass."""
    from llmforge.errors import DataError
    from llmforge.pipeline.shards import split_summary, write_manifest, write_shard

    root = tmp_path / "ds"
    (root / "train").mkdir(parents=True)
    (root / "tokenizer.model").write_bytes(b"x")
    tokens = np.array([5, 9, 1, 7, 700, 1, 3, 4, 1], dtype=np.uint16)  # vocab 512, EOS 1
    entry = write_shard(root / "train" / "s0.arrow", ["a", "b", "c"], [3, 3, 3], tokens, [3, 3, 3], eos_id=1)
    write_manifest(root, {"fingerprint": "f", "token_dtype": "uint16", "splits": {"train": split_summary([entry])},
                          "tokenizer": {"file": "tokenizer.model", "vocab_size": 512, "eos_id": 1, "fingerprint": "t"}})
    with pytest.raises(DataError, match=r"s0\.arrow: token id 700 at position 4 is not below the vocabulary size 512"):
        ShardBatcher(Dataset.open(root), "train", 4, 2, seed=0)
    assert Dataset.open(root, check=False).verify(full=True) == [
        f"{root / 'train' / 's0.arrow'}: token id 700 at position 4 is not below the vocabulary size 512 "
        "(1 such tokens)"]
