"""Export and serve: a trained run as merged weights, GGUF, an Ollama Modelfile or a LoRA GGUF (stage.py), each
checked against the evaluated model (verify.py), and behind an OpenAI-compatible endpoint (serve.py)."""
