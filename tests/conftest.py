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
