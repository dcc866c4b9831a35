"""The HF-layout model peft wraps in these tests: the stand-in (tests/reference_standin: the real GLM-4V
module tree), loaded through auto_map with trust_remote_code from a copy of a fixture checkpoint."""
import copy

import pytest
import torch
from helpers.adapters import standin_folder


@pytest.fixture(scope="module")
def hf_base(hf_modules, tmp_path_factory):
    """hf_base(fixture="tiny") -> a fresh fp32 HF-layout model of that fixture (peft changes models in place)."""
    import transformers
    root, loaded = tmp_path_factory.mktemp("standins"), {}

    def make(fixture: str = "tiny"):
        if fixture not in loaded:
            loaded[fixture] = transformers.AutoModelForCausalLM.from_pretrained(
                standin_folder(root, fixture), trust_remote_code=True, torch_dtype=torch.float32)
        return copy.deepcopy(loaded[fixture])
    return make
