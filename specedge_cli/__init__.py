"""SpecEdge client: chat with a hub-hosted target model, drafting locally with llama.cpp."""
