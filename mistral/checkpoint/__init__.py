"""Reading and writing model folders, with errors a person can act on.

Two layouts load without a conversion step:

    native   params.json + consolidated.safetensors | consolidated-0000i-of-0000N.safetensors | consolidated.00.pth
    hf       config.json (model_type mistral or mixtral) + model.safetensors | model-0000i-of-0000N.safetensors

Either way, the tokenizer is in the same folder (mistral/tokenizer.py says under which names).

    layouts.py   which layout a folder holds, the model its config describes (read_args), its weight files
    hf.py        Hugging Face's config keys, tensor names and RoPE row order: the model only ever sees native keys
    read.py      where each tensor's bytes are (_plan, checked against the model), and reading them
    load.py      a folder's model, ready to run (load_model), and its weights (load_weights)
    write.py     new folders: convert (to either layout) and quantize (to int8 or int4)

Which device and dtype a run gets is mistral/device.py's, what it needs in memory mistral/memory.py's. Names with a
leading underscore are shared by these modules only.

On a CPU, a tensor kept as stored is mapped from its file (copy-on-write), so the page cache is its only copy. Any
other (converted to another dtype, quantized, put in our RoPE order, or bound for a GPU) is read with ordinary file
reads, a chunk at a time, straight into the tensor the model keeps (safetensors and torch-zip files both store each
tensor as one contiguous run of little-endian bytes). Mapping the file of a tensor that is converted would leave its
pages resident beside the copy, so peak memory would approach twice the weights.
"""
from mistral.checkpoint.hf import (args_from_hf_config, from_hf_rope_order, hf_config_from_args, hf_name, rope_heads,
                                   to_hf_rope_order)
from mistral.checkpoint.layouts import TOKENIZER_FILES, layout, read_args, weight_files
from mistral.checkpoint.load import load_model, load_weights
from mistral.checkpoint.write import convert, quantize

__all__ = ["TOKENIZER_FILES", "args_from_hf_config", "convert", "from_hf_rope_order", "hf_config_from_args", "hf_name",
           "layout", "load_model", "load_weights", "quantize", "read_args", "rope_heads", "to_hf_rope_order",
           "weight_files"]
