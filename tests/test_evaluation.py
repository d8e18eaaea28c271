"""Tests of `mechme eval`: extraction rules, statistics, the shared-prefix scorer, data
readers and splits, errors, and small real runs of SmolLM2 on each task family."""

import argparse
import json

import numpy as np
import pytest
import xarray as xr

from mechme.errors import SpecError
from mechme.evaluation import data, scoring, stats
from mechme.evaluation.tasks import TASKS, evaluate, get_task, hash_halves
from mechme.models.tiny import tiny_model

# -- extraction ----------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (" She has 3 + 4 = 7 apples. So the answer is 7.", "7"),
    (" So the answer is 1,234.", "1234"),
    (" The total is $18. So the answer is $18.", "18"),
    (" So the answer is -5.", "-5"),
    (" 16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars", "18"),  # flexible rule: the last number
    (" It costs $2,125.50 in total", "2125.50"),
    (" So the answer is 12. Then 99 more", "12"),  # "answer is" wins over the last number
    (" no numbers here", None),
])
def test_gsm8k_extraction(text, expected):
    assert scoring.extract_gsm8k(text) == expected


def test_gsm8k_numeric_match():
    assert scoring.numbers_equal("18.00", "18")
    assert scoring.numbers_equal("2125", "2,125")
    assert not scoring.numbers_equal("1", "18")  # the released substring checker accepted this
    assert not scoring.numbers_equal(None, "18")
    assert not scoring.numbers_equal("", "18")


@pytest.mark.parametrize("text, expected", [
    ("so $\\boxed{5}$.", "5"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\fbox{x+1}", "x+1"),
    ("answer \\boxed 7$.", "7"),
    ("unclosed \\boxed{3", None),
    ("no box", None),
])
def test_last_boxed(text, expected):
    assert scoring.last_boxed(text) == expected


def test_math_extraction_and_check():
    assert scoring.extract_math("Final Answer: The final answer is $24$. I hope") == "24"
    assert scoring.extract_math("Thus \\boxed{} is empty") is None
    assert scoring.math_equal("\\frac{1}{2}", "0.5")
    assert scoring.math_equal("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)")
    assert not scoring.math_equal("1", "18")
    assert not scoring.math_equal("", "18")
    assert not scoring.math_equal(None, "18")


def test_math500_gold_from_solution():
    items = data.read_math500()
    assert all(item["answer"] for item in items)
    first = items[0]
    assert first["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


# -- statistics ----------------------------------------------------------------


def test_mcnemar_exact_known_table():
    # b = 1 item right only at baseline, c = 9 right only when treated:
    # p = 2 * P(Binomial(10, 1/2) <= 1) = 2 * 11 / 1024.
    baseline = np.array([1] * 1 + [0] * 9 + [1] * 5 + [0] * 5)
    treated = np.array([0] * 1 + [1] * 9 + [1] * 5 + [0] * 5)
    assert stats.mcnemar_exact(baseline, treated) == pytest.approx(22 / 1024)
    assert stats.mcnemar_exact(baseline, baseline) == 1.0


def test_bootstrap_ci_contains_mean():
    values = np.random.default_rng(1).normal(2.0, 1.0, size=200)
    low, high = stats.bootstrap_ci(values, seed=0)
    assert low < values.mean() < high
    assert high - low < 0.5
    assert stats.bootstrap_ci(values, seed=0) == [low, high]


def test_permutation_identical_samples():
    values = np.random.default_rng(2).normal(size=50)
    assert stats.paired_permutation(values, values.copy()) == 1.0


def test_permutation_detects_shift():
    rng = np.random.default_rng(3)
    values = rng.normal(size=60)
    assert stats.paired_permutation(values, values + 0.5 + 0.1 * rng.normal(size=60)) < 0.01


def test_ratio_metric_with_transform():
    nll, tokens = np.array([10.0, 30.0]), np.array([10.0, 10.0])
    assert stats.ratio(nll, tokens, np.exp) == pytest.approx(np.exp(2.0))


# -- shared-prefix scorer ------------------------------------------------------

CASES = [
    ("Question: What colour is the sky?\nAnswer:", [" blue", " green and very long answer here", " red"]),
    ("Q: 2+2?\nA:", [" 4", " five"]),
    ("A longer prompt that goes on about nothing in particular, for padding.\nAnswer:", [" yes", " no", " maybe"]),
]


def _requests(tokenizer):
    return [(tokenizer(p).input_ids, [tokenizer(c, add_special_tokens=False).input_ids for c in cs]) for p, cs in CASES]


def _assert_matches_unshared(loaded, **options):
    requests = _requests(loaded.tokenizer)
    shared = scoring.score_continuations(loaded, requests, **options)
    for (prompt, conts), scores in zip(requests, shared):
        for cont, score in zip(conts, scores):
            reference = scoring.score_unshared(loaded, prompt, cont)
            assert score.n_tokens == len(cont)
            assert score.logprob == pytest.approx(reference.logprob, abs=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_shared_prefix_tiny(family):
    # max_chunk_tokens=20 forces several choice chunks from one prompt cache.
    _assert_matches_unshared(tiny_model(family), batch_size=3, max_chunk_tokens=20)


def test_shared_prefix_smollm2(smollm2):
    _assert_matches_unshared(smollm2, batch_size=3)


def test_shared_prefix_runs_prompt_once(smollm2):
    calls = []
    handle = smollm2.model.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        scoring.score_continuations(smollm2, _requests(smollm2.tokenizer), batch_size=3)
    finally:
        handle.remove()
    # One pass over the 3 prompts, one over the 8 continuations.
    assert [shape[0] for shape in calls] == [3, 8]


# -- data and splits -----------------------------------------------------------


@pytest.mark.parametrize("reader, args, count", [
    (data.read_gsm8k, (), 1319),
    (data.read_math500, (), 500),
    (data.read_math_heldout, (), 4500),
    (data.read_arc, ("challenge", "test"), 1172),
    (data.read_arc, ("challenge", "validation"), 299),
    (data.read_arc, ("easy", "test"), 2376),
    (data.read_piqa, (), 1838),
    (data.read_mmlu, ("test",), 14042),
    (data.read_mmlu, ("validation",), 1531),
    (data.read_ifeval, (), 541),
])
def test_reader_counts(reader, args, count):
    records = reader(*args)
    assert len(records) == count
    assert len({r["id"] for r in records}) == count


def test_gsm8k_record_shape():
    first = data.read_gsm8k()[0]
    assert first["short_answer"] == "18"
    assert first["prompt"].count("Question:") == 9  # 8 exemplars and the question
    assert first["prompt"].endswith("Answer:")
    assert first["solution"].endswith("So the answer is 18.")


@pytest.mark.parametrize("task", list(TASKS))
def test_splits_disjoint(task, smollm2):
    read = get_task(task).read
    validation = read("validation", smollm2)
    test = read("test", smollm2)
    ids_v, ids_t = {r["id"] for r in validation}, {r["id"] for r in test}
    assert validation and test
    assert not ids_v & ids_t
    if task == "math500":
        assert not {r["problem"] for r in validation} & {r["problem"] for r in test}
        assert len(test) == 500


def test_hash_halves_fixed():
    records = [{"id": str(i)} for i in range(11)]
    first = hash_halves(records, "x", "test")
    assert len(first) == 6
    assert hash_halves(list(reversed(records)), "x", "test") == first


def test_missing_package_message():
    with pytest.raises(data.DataMissingError, match="pip install --no-deps nothing-here==1"):
        data.package_folder(("mechme_no_such_package", "pip install --no-deps nothing-here==1"))


# -- errors --------------------------------------------------------------------


def test_unknown_task_lists_names(tiny_llama):
    with pytest.raises(SpecError, match="unknown task 'arc'.*arc_challenge, arc_easy"):
        evaluate(tiny_llama, "arc", out=None)


def test_limit_too_large(tiny_llama):
    with pytest.raises(SpecError, match="limit 5000 is larger than .* 1172 items"):
        evaluate(tiny_llama, "arc_challenge", limit=5000, out=None, progress=False)


@pytest.mark.parametrize("options, message", [
    ({"split": "train"}, "invalid split 'train'"),
    ({"limit": 0}, "limit must be a positive"),
    ({"max_new_tokens": 5}, "max_new_tokens applies to generation tasks only"),
    ({"batch_size": 0}, "batch_size must be a positive"),
])
def test_invalid_options(tiny_llama, options, message):
    with pytest.raises(SpecError, match=message):
        evaluate(tiny_llama, "arc_easy", out=None, progress=False, **options)


# -- real runs on SmolLM2 ------------------------------------------------------


def test_arc_easy_run(smollm2, tmp_path):
    result = evaluate(smollm2, "arc_easy", limit=20, out=tmp_path, progress=False)
    assert result["n"] == 20
    assert result["metric"] == "acc_norm"
    assert 0.3 <= result["score"] <= 0.9
    assert 0.3 <= result["metrics"]["acc"]["score"] <= 0.95
    low, high = result["ci95"]
    assert low <= result["score"] <= high
    ds = xr.open_dataset(result["run_file"], engine="h5netcdf")
    assert ds.sizes["item"] == 20
    assert set(np.unique(ds.acc_norm.values)) <= {0.0, 1.0}
    assert ds.acc_norm.values.mean() == pytest.approx(result["score"])
    assert "acc_norm" in open(result["table_file"]).read()


def test_limit_draw_is_seeded(smollm2):
    from mechme.evaluation.tasks import select_items

    items = get_task("piqa").read("test", smollm2)
    first = select_items(items, 5, 0, task="piqa", split="test")
    assert first == select_items(items, 5, 0, task="piqa", split="test")
    assert first != select_items(items, 5, 1, task="piqa", split="test")


def test_exclude_leaves_items_out(tiny_llama):
    ids = [item["id"] for item in get_task("arc_easy").read("test", tiny_llama)]
    result = evaluate(tiny_llama, "arc_easy", exclude=ids[3:], out=None, progress=False)
    assert result["n"] == 3
    assert result["excluded"] == len(ids) - 3


def test_finished_evaluation_is_reused(tiny_llama, tmp_path):
    first = evaluate(tiny_llama, "arc_easy", limit=4, out=tmp_path, progress=False)
    again = evaluate(tiny_llama, "arc_easy", limit=4, out=tmp_path, progress=False)
    assert again["reused"]
    assert "reused" not in first
    assert again["score"] == first["score"]
    assert again["run_file"] == first["run_file"]
    other = evaluate(tiny_llama, "arc_easy", limit=5, out=tmp_path, progress=False)
    assert "reused" not in other
    fresh = evaluate(tiny_llama, "arc_easy", limit=4, out=tmp_path, progress=False, resume=False)
    assert "reused" not in fresh
    assert fresh["score"] == first["score"]


def test_eval_cli_leaves_out_finetune_sources(tmp_path):
    from mechme.cli_eval import _finetune_overlap

    assert _finetune_overlap(str(tmp_path)) == []
    (tmp_path / "mechme-finetune.json").write_text('{"excluded_gsm8k_ids": ["gsm8k-3", "gsm8k-7"]}')
    assert _finetune_overlap(str(tmp_path)) == ["gsm8k-3", "gsm8k-7"]


def test_gsm8k_run(smollm2, tmp_path):
    result = evaluate(smollm2, "gsm8k", limit=2, max_new_tokens=12, out=tmp_path, progress=False)
    assert result["n"] == 2
    assert result["score"] in (0.0, 0.5, 1.0)
    loglik = result["metrics"]["gold_loglik_per_token"]["score"]
    assert -3.0 < loglik < -0.3
    assert 0.2 < result["metrics"]["gold_bits_per_byte"]["score"] < 2.0
    ds = xr.open_dataset(result["run_file"], engine="h5netcdf")
    assert all(isinstance(text, str) for text in ds.generation.values[0])


def test_ifeval_run(smollm2, tmp_path):
    result = evaluate(smollm2, "ifeval", limit=3, max_new_tokens=24, out=tmp_path, progress=False)
    assert result["metric"] == "prompt_level_strict"
    for name in ("prompt_level_strict", "prompt_level_loose", "inst_level_strict", "inst_level_loose"):
        assert 0.0 <= result["metrics"][name]["score"] <= 1.0
    ds = xr.open_dataset(result["run_file"], engine="h5netcdf")
    assert (ds.inst_strict <= ds.inst_loose).all()
    assert (ds.inst_loose <= ds.n_instructions).all()
    assert all(len(text) > 0 for text in ds.generation.values[0])


def test_perplexity_run(smollm2, tmp_path):
    result = evaluate(smollm2, "perplexity", limit=3, out=tmp_path, progress=False)
    assert result["metric"] == "perplexity"
    assert 10 < result["score"] < 300
    assert 0.8 < result["metrics"]["bits_per_byte"]["score"] < 3.0
    ds = xr.open_dataset(result["run_file"], engine="h5netcdf")
    assert (ds.tokens == 255).all()  # 256-token rows; the first token of each is not predicted


class ScaleLayer:
    """A trivial intervention: scale one decoder layer's output with a forward hook."""

    def __init__(self, model, layer, factor):
        self.module = model.layer_module(layer)
        self.factor = factor
        self.handle = None

    def __call__(self):
        return self

    def __enter__(self):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (output[0] * self.factor,) + tuple(output[1:])
            return output * self.factor

        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_intervention_run(smollm2, tmp_path):
    intervention = ScaleLayer(smollm2, 20, 0.5)
    result = evaluate(smollm2, "arc_easy", limit=8, intervention=intervention, out=tmp_path, progress=False)
    assert "baseline_score" in result
    assert 0.0 <= result["paired_p"] <= 1.0
    assert result["metrics"]["acc"]["paired_test"] == "exact McNemar"
    ds = xr.open_dataset(result["run_file"], engine="h5netcdf")
    assert list(ds.condition.values) == ["baseline", "intervention"]
    baseline, treated = ds.choice_logprob.values
    assert not np.allclose(baseline, treated, equal_nan=True)
    # The hook is gone afterwards: a rerun reproduces the baseline exactly.
    again = evaluate(smollm2, "arc_easy", limit=8, out=None, progress=False)
    assert again["score"] == result["baseline_score"]


def _cli_args(argv):
    from mechme.cli_eval import add_parser

    parser = argparse.ArgumentParser(prog="mechme")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_json(tmp_path, capsys):
    from mechme.cli_eval import COMMANDS

    args = _cli_args(["eval", "--task", "arc_challenge", "--split", "validation", "--limit", "4", "--json",
                      "--out", str(tmp_path)])
    assert COMMANDS["eval"](args) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("task", "n", "metric", "score", "ci95"):
        assert key in result
    assert result["split"] == "validation"
    assert result["n"] == 4


def test_cli_wemask(tmp_path, capsys):
    pytest.importorskip("mechme.mitigation.wemask")
    from mechme.cli_eval import COMMANDS

    args = _cli_args(["eval", "--task", "arc_easy", "--limit", "4", "--json", "--out", str(tmp_path),
                      "--wemask", "dims=gain,k=4,me_layer=11"])
    assert COMMANDS["eval"](args) == 0
    result = json.loads(capsys.readouterr().out)
    assert "baseline_score" in result
    assert 0.0 <= result["paired_p"] <= 1.0


def test_cli_unknown_task():
    from mechme.cli_eval import COMMANDS

    with pytest.raises(SpecError, match="valid tasks: gsm8k"):
        COMMANDS["eval"](_cli_args(["eval", "--task", "nope"]))


def test_generation_restores_order(smollm2):
    tokenizer = smollm2.tokenizer
    prompts = [tokenizer("The capital of France is").input_ids, tokenizer("One, two, three,").input_ids]
    both = scoring.generate(smollm2, prompts, max_new_tokens=4, batch_size=2)
    alone = [scoring.generate(smollm2, [p], max_new_tokens=4)[0] for p in prompts]
    assert both == alone
