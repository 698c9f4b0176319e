"""The local draft model (llama.cpp) and the chat template that frames prompts."""
