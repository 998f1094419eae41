"""Ray actors (one module each) and the model backends they run (llama.cpp, Ollama)."""
