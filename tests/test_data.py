"""training/data.py: packing, BOS/EOS, seeded order, resume, rank slices, streamed datasets, bad columns."""

from __future__ import annotations

import json

import pytest
import torch

from dictionaries.errors import DatasetColumnError, MissingFileError
from dictionaries.recipe import DatasetSpec
from training.data import TokenStream, check_dataset, holdout_documents, open_dataset
from training.toymodel import corpus_documents

DOCS = corpus_documents()[:300]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS))
    return path


def _stream(path, tokenizer, **kw):
    kw = {"context_length": 16, "seed": 0, "shuffle_buffer": 50, **kw}
    return TokenStream(DatasetSpec(path=str(path)), tokenizer, **kw)


def test_packing_is_documents_joined_by_eos(text_file, tokenizer):
    stream = _stream(text_file, tokenizer, shuffle_buffer=1)  # buffer of 1: stored order
    contexts = stream.next_contexts(40)
    assert contexts.shape == (40, 16)
    assert contexts.dtype == torch.long
    expected = []
    for doc in DOCS:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(expected) >= 40 * 16:
            break
    assert contexts.flatten().tolist() == expected[: 40 * 16]


def test_prepend_bos_starts_every_context(text_file, tokenizer):
    contexts = _stream(text_file, tokenizer, prepend_bos=True).next_contexts(10)
    assert (contexts[:, 0] == tokenizer.bos_token_id).all()
    plain = _stream(text_file, tokenizer, prepend_bos=False).next_contexts(10)
    assert contexts[:, 1:].flatten().tolist()[:15] == plain.flatten().tolist()[:15]


def test_seed_decides_the_order(text_file, tokenizer):
    a = _stream(text_file, tokenizer, seed=1).next_contexts(20)
    b = _stream(text_file, tokenizer, seed=1).next_contexts(20)
    c = _stream(text_file, tokenizer, seed=2).next_contexts(20)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_resume_continues_exactly(text_file, tokenizer):
    whole = _stream(text_file, tokenizer).next_contexts(60)
    first = _stream(text_file, tokenizer)
    head = first.next_contexts(25)
    state = first.state_dict()
    second = _stream(text_file, tokenizer)
    second.load_state_dict(state)
    tail = second.next_contexts(35)
    assert torch.equal(torch.cat([head, tail]), whole)


def test_ranks_read_disjoint_documents(text_file, tokenizer):
    r0 = _stream(text_file, tokenizer, rank=0, world_size=2, shuffle_buffer=1)
    r1 = _stream(text_file, tokenizer, rank=1, world_size=2, shuffle_buffer=1)
    c0, c1 = r0.next_contexts(5), r1.next_contexts(5)
    first_doc = tokenizer(DOCS[0], add_special_tokens=False)["input_ids"]
    second_doc = tokenizer(DOCS[1], add_special_tokens=False)["input_ids"]
    assert c0.flatten().tolist()[: min(16, len(first_doc))] == first_doc[:16]
    assert c1.flatten().tolist()[: min(16, len(second_doc))] == second_doc[:16]


def test_running_out_returns_fewer_contexts(tmp_path, tokenizer):
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(DOCS[:3]))
    stream = _stream(path, tokenizer)
    n_tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in DOCS[:3])
    got = stream.next_contexts(10_000)
    assert len(got) == n_tokens // 16
    assert stream.exhausted
    assert len(stream.next_contexts(5)) == 0


def test_folder_of_text_files(tmp_path, tokenizer):
    (tmp_path / "b.txt").write_text(DOCS[1])
    (tmp_path / "a.txt").write_text(DOCS[0] + "\n\n" + DOCS[2])
    assert list(open_dataset(DatasetSpec(path=str(tmp_path)))) == [DOCS[0], DOCS[2], DOCS[1]]


def test_streamed_json_dataset_matches_text_file(tmp_path, text_file, tokenizer):
    """A datasets `json` set read with streaming=True gives the same contexts as the same text in a .txt."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    spec = DatasetSpec(path=str(path), column="body")
    streamed = TokenStream(spec, tokenizer, context_length=16, seed=3, shuffle_buffer=50).next_contexts(30)
    plain = _stream(text_file, tokenizer, seed=3).next_contexts(30)
    assert torch.equal(streamed, plain)


def test_missing_column_lists_the_columns(tmp_path, tokenizer):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS[:5])))
    with pytest.raises(DatasetColumnError) as info:
        TokenStream(DatasetSpec(path=str(path), column="text"), tokenizer, context_length=16).next_contexts(1)
    assert info.value.columns == ["body", "id"]
    assert "'body'" in str(info.value)
    assert "'text'" in str(info.value)


def test_held_out_documents_never_reach_training(tmp_path, tokenizer):
    """The eval contexts (the head of the seeded stream) and the training stream share no document."""
    import re

    path = tmp_path / "numbered.txt"
    path.write_text("\n\n".join(f"doc{i} " + "word " * (5 + i % 17) for i in range(400)))
    spec = DatasetSpec(path=str(path))
    n = holdout_documents(spec, tokenizer, context_length=32, prepend_bos=False, seed=3, tokens=32 * 10)
    evaluation = TokenStream(spec, tokenizer, context_length=32, seed=3).next_contexts(10)
    training = TokenStream(spec, tokenizer, context_length=32, seed=3, skip_documents=n)
    seen = training.next_contexts(10_000)

    def docs(contexts):
        return set(re.findall(r"doc(\d+) ", tokenizer.decode(contexts.flatten().tolist())))

    assert len(evaluation) == 10
    assert 0 < n < 400
    assert docs(evaluation)
    assert docs(evaluation).isdisjoint(docs(seen))
    assert len(docs(evaluation)) + len(docs(seen)) >= 399   # everything else is still trained on


@pytest.mark.parametrize("path", ["{tmp}/nowhere.txt", "./nowhere", "~/no-such-dataset-here", "nowhere.jsonl"])
def test_a_local_dataset_that_is_not_there_is_a_missing_file(tmp_path, path):
    """Said at once, not as the datasets library's FileNotFoundError from inside a training run."""
    spec = DatasetSpec(path=path.format(tmp=tmp_path))
    with pytest.raises(MissingFileError, match="nowhere|no-such-dataset"):
        check_dataset(spec)
    with pytest.raises(MissingFileError):
        open_dataset(spec)
    check_dataset(DatasetSpec(path="org/some-hub-dataset"))  # a Hub id is looked up when opened, not here
