"""Transforms applied to a built GLM4V (the model never imports them): quant.py (int8 / int4
weight-only Linear), lora.py (adapters, merge), adapter_files.py / peft_config.py / peft_format.py
(adapter files: ours and PEFT folders, save / load), distributed.py (tensor parallel and
FSDP2 plans, DTensor helpers, the rank launcher), dtensor.py (DTensor helpers that never import
torch.distributed.tensor: `whole`).

distributed.py is imported lazily: torch.distributed.tensor, which it imports, takes seconds to
import, so each caller imports distributed.py inside the function that needs it (a sharded or
multi-rank run), marked `# lazy: see glm4v_core.transforms`; a one-process command never pays for it."""
