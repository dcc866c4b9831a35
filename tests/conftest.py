import sys
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURES

from glm4v_core.model import glm4v as model_glm4v
from glm4v_core.model import splice as model_splice


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def consecutive_image_positions(monkeypatch) -> None:
    """The usual multi-image bug for negative controls: image patch rows numbered like text
    (the splice's position ids replaced by 0, 1, 2, ...), so position and logit checks must fail."""
    pass

    real_splice = model_splice.splice_images

    def consecutive(*args, **kwargs):
        spliced = real_splice(*args, **kwargs)
        spliced.position_ids = torch.arange(spliced.position_ids.shape[1]).expand_as(spliced.position_ids)
        return spliced

    monkeypatch.setattr(model_glm4v, "splice_images", consecutive)


@pytest.fixture(scope="module")
def hf_modules(tmp_path_factory):
    """transformers copies remote code into its modules cache: keep it inside the test's temp folder.
    Everything is local: the hub is never asked (CI may be offline)."""
    cache = tmp_path_factory.mktemp("hf_modules")
    loaded = sys.modules.get("transformers_modules")
    if loaded is not None:  # imported by another test module: its cache is where Python finds that package
        cache = Path(list(loaded.__path__)[0]).parent
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_MODULES_CACHE", str(cache))
    import transformers.dynamic_module_utils as dmu
    mp.setattr(dmu, "HF_MODULES_CACHE", str(cache))
    yield cache
    mp.undo()
