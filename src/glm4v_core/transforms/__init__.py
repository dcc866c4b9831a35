"""Transforms applied to a built GLM4V (the model never imports them): quant.py (int8 / int4
weight-only Linear), lora.py (adapters, merge, save / load), distributed.py (tensor parallel and
FSDP2 plans, DTensor helpers, the rank launcher). distributed.py is imported lazily by its callers:
torch.distributed.tensor takes seconds to import."""
