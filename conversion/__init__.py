"""glm4v_conversion: HF <-> native tensor names, safetensors I/O and the glm4v-convert CLI (imports neither glm4v_core nor glm4v_kernels)."""
