"""Fine-tuning with and without WeMask on a tiny model."""

import json

import pytest
import torch

from mechme.errors import SpecError
from mechme.mitigation.finetune import FinetuneSpec, finetune, template_sources, training_examples
from mechme.mitigation.wemask import parse_spec
from mechme.models import load_model
from mechme.models.tiny import Plant, tiny_model


def test_training_examples_are_seeded_and_formatted():
    a = training_examples(4, seed=1)
    assert a == training_examples(4, seed=1)
    assert a != training_examples(4, seed=2)
    for example in a:
        assert example["text"].startswith("Question: ")
        assert "So the answer is " in example["text"]


def test_template_sources_find_the_rewritten_gsm8k_questions():
    from mechme.evaluation.data import read_gsm8k
    from mechme.mitigation.finetune import _words

    examples = training_examples(30, seed=0)
    excluded = set(template_sources(examples))
    assert 0 < len(excluded) <= 30
    questions = {r["id"]: _words(r["question"]) for r in read_gsm8k()}
    for example in examples:
        words = _words(example["question"])
        sims = {i: len(words & q) / len(words | q) for i, q in questions.items()}
        best = max(sims, key=sims.get)
        # The closest GSM8K question of every training problem is among the excluded ones.
        assert best in excluded, (example["template"], best, sims[best])


@pytest.mark.parametrize("wemask", [None, "dims=gain,k=4,me_layer=1", "dims=activation,k=2,gamma=0.5,me_layer=1",
                                    "dims=activation,k=2,token=released,gamma=0.5,me_layer=1"])
def test_finetune_changes_weights_and_saves(tmp_path, wemask):
    model = tiny_model("llama", plant=Plant(layer=1, dim=17))
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    spec = FinetuneSpec(steps=3, batch_size=2, seq_len=48, lr=1e-3, warmup=1, n_examples=8, wemask=wemask)
    summary = finetune(model, spec, out=tmp_path, progress=False)
    assert len(summary["losses"]) == 3
    changed = [k for k, v in model.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no weight changed"
    reloaded = load_model(summary["saved"])
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids).logits, model.model(ids).logits)
    record = json.loads((tmp_path / summary["saved"].split("/")[-1] / "mechme-finetune.json").read_text())
    assert record["wemask"] == (None if wemask is None else parse_spec(wemask).describe())
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_mask_changes_training_trajectory(tmp_path):
    runs = []
    for wemask in (None, "dims=gain,k=8,me_layer=1"):
        # No planted activation here: a planted dim would swamp the masked ones.
        model = tiny_model("llama")
        spec = FinetuneSpec(steps=2, batch_size=2, seq_len=48, lr=1e-3, warmup=1, n_examples=8, wemask=wemask)
        runs.append(finetune(model, spec, out=tmp_path / str(wemask is None), progress=False)["losses"])
    assert runs[0] != runs[1]


def test_bad_finetune_options():
    with pytest.raises(SpecError, match="steps must be at least 1"):
        FinetuneSpec(steps=0)
    with pytest.raises(SpecError, match="lr must be positive"):
        FinetuneSpec(lr=0.0)


def test_finetune_reuses_a_saved_run(tmp_path):
    spec = FinetuneSpec(steps=2, batch_size=2, seq_len=32, lr=1e-3, warmup=1, n_examples=4)
    first = finetune(tiny_model("llama"), spec, out=tmp_path, progress=False, reuse=True)
    again = finetune(tiny_model("llama"), spec, out=tmp_path, progress=False, reuse=True)
    assert again["reused"]
    assert "reused" not in first
    assert again["saved"] == first["saved"]
    assert again["losses"] == first["losses"]
