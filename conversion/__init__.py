"""The folder conversion/ is imported as `glm4v_conversion` (pyproject.toml maps it).

glm4v_conversion: HF <-> native tensor names and shapes, safetensors I/O, and `glm4v-convert`.

The lowest layer of the project: it imports neither glm4v_core nor glm4v_kernels (configs are
plain dicts here), only torch, safetensors-format files, json and tqdm.

The native format (format_version 1), as `glm4v-convert SRC DST` writes it:

    DST/
      config.json                      the HF config dict, unchanged (GLM4VConfig.from_json reads it);
                                       only `torch_dtype` is updated when --dtype changed the dtype
      model.safetensors                one file, or shards model-0000k-of-0000n.safetensors plus
      model.safetensors.index.json     {"metadata": {"total_size": bytes}, "weight_map": name -> file}
      glm4v_native.json                provenance: format, format_version, tool and tool_version,
                                       dtype, and the source: layout, dtype, each HF file's bytes,
                                       sha256 and header metadata, whether it had an index, its full
                                       weight_map, and the bytes of the HF-only buffers

- Tensor names are those of our module tree (`vision.*`, `projector.*`, `text.*`; the one table
  is names.HF_TO_NATIVE), shapes are the HF ones (no permutation, no fusing or splitting).
- One dtype for the whole folder (bf16 for the real model); the loader refuses a tensor that
  differs from the dtype glm4v_native.json records.
- By default native shard k holds exactly the tensors of HF shard k, so conversion streams one
  shard at a time and `--to hf` rebuilds the original files bit for bit (and checks that against
  the recorded sha256).
- The HF-only rotary buffer `transformer.rotary_pos_emb.inv_freq` is not a native tensor: its
  bytes are kept in glm4v_native.json (`source.buffers`, base64) together with each HF file's
  header metadata (`source.files.<name>.metadata`), and `--to hf` writes them back; without such
  a record it recomputes the buffer exactly as the reference does.
- Every safetensors file's `__metadata__` is stamped {"format": "glm4v-native",
  "format_version": "1", "dtype": ..., "tool": "glm4v-convert <version>", "source_files": ...};
  files are byte-for-byte what `safetensors.torch.save_file` writes for the same tensors, so
  any safetensors reader opens them.

`glm4v-convert SRC DST --quantize int8|int4 [--group-size N]` writes the quantized variant of this
format (weight-only int8 / int4 Linear weights, everything else in the source dtype, a
`quantization` record in glm4v_native.json); it is documented in quantize.py.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("glm4v-core")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
