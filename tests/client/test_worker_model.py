"""A worker process loads the base model once and reuses it for every client and round it serves."""

from client.lora_client import worker_model
from fedlm.settings import LoraSettings, ModelSettings


def test_the_base_model_is_loaded_once_per_process(tiny_llama_dir):
    worker_model.cache_clear()
    settings = ModelSettings(name_or_path=str(tiny_llama_dir))
    first, _ = worker_model(settings, LoraSettings(r=2), 0, "")
    again, _ = worker_model(ModelSettings(name_or_path=str(tiny_llama_dir)), LoraSettings(r=2), 0, "")
    assert again is first and worker_model.cache_info().hits == 1
