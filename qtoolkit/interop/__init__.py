"""Models in and out: the tools users already run.

    hf_names      parameter names of transformers' Llama/BitNet models <-> qtoolkit's DecoderLM
    hf_import     a local Hugging Face Llama directory -> a qtoolkit training checkpoint (`qtool import`)
    hf_export     a quantized checkpoint -> a transformers-loadable directory (`qtool export --format hf`)
    gguf_types    which GGML tensor type each stored qtoolkit format becomes, and its blocks
    gguf_vocab    the checkpoint's byte-level BPE as GGUF tokenizer metadata
    gguf_export   a quantized checkpoint -> a llama.cpp GGUF file (`qtool export --format gguf`)
"""
