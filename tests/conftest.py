"""Shared fixtures. Tests run offline: no model or dataset is ever downloaded."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from mechme.models.tiny import Plant, tiny_model  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    from mechme.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    from mechme.models import load_model

    return load_model("gemma3-270m")


@pytest.fixture
def planted_llama():
    return tiny_model("llama", plant=Plant(layer=2, dim=17))


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def planted_folder(tmp_path_factory):
    """A saved tiny llama with a massive activation planted at layer 2, dim 17."""
    folder = tmp_path_factory.mktemp("planted-llama")
    model = tiny_model("llama", plant=Plant(layer=2, dim=17))
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder
